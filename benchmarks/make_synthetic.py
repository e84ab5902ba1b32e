"""Write synthetic checkpoints with real architectures' tensor names, shapes and sharding.

For a shape (tiny, llama-1b, llama2-7b, llama3-8b) it writes, seeded: ``aligned/`` and
``unaligned/`` in bf16 (Hugging Face folders: config.json, shards, index), and four PEFT LoRA
adapters: ``task-qv``/``safety-qv`` (r=8 on q/v) and ``task-all``/``safety-all`` (r=16 on every
linear layer), in fp32 by default: PEFT upcasts a LoRA's weights on a bf16 or fp16 base model to
fp32 (``get_peft_model`` / ``PeftModel.from_pretrained``, ``autocast_adapter_dtype=True`` by
default) and saves them so; ``--adapter-dtype bfloat16`` writes them as a training that turned
that off, or cast its adapter, saves them: the same draw, rounded to bf16. Asking an existing draw
for the other adapter dtype rewrites only the adapters. Values are random (this is for speed
and memory, not for safety numbers):
``W_unaligned = W_aligned - (low-rank drift + noise)``. Tensors are generated and streamed to
disk one at a time, so memory stays at one tensor; free disk is checked first.

    python benchmarks/make_synthetic.py --shape llama-1b --out benchmarks/data
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from safemerge_ext.io.safetensors_stream import StreamingWriter  # noqa: E402


@dataclass(frozen=True)
class Arch:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    shard_bytes: int  # max shard size, as the published checkpoints are split
    rope_theta: float = 10000.0


SHAPES = {
    "tiny": Arch(256, 688, 4, 8, 2, 1024, False, 2 * 2**20),
    # shard limits in decimal GB, as transformers reads "5GB" (the published repos' shard sizes)
    "llama-1b": Arch(2048, 8192, 16, 32, 8, 128256, True, 5 * 10**9, 500000.0),    # Llama-3.2-1B: one file
    "llama2-7b": Arch(4096, 11008, 32, 32, 32, 32000, False, 10 * 10**9),          # two shards (9.98 + 3.50 GB)
    "llama3-8b": Arch(4096, 14336, 32, 32, 8, 128256, False, 5 * 10**9, 500000.0),  # four shards
}
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def tensors(a: Arch) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes in Hugging Face Llama order."""
    hd = a.hidden // a.heads
    out = [("model.embed_tokens.weight", (a.vocab, a.hidden))]
    for i in range(a.layers):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.self_attn.q_proj.weight", (a.hidden, a.hidden)),
            (f"{p}.self_attn.k_proj.weight", (a.kv_heads * hd, a.hidden)),
            (f"{p}.self_attn.v_proj.weight", (a.kv_heads * hd, a.hidden)),
            (f"{p}.self_attn.o_proj.weight", (a.hidden, a.hidden)),
            (f"{p}.mlp.gate_proj.weight", (a.intermediate, a.hidden)),
            (f"{p}.mlp.up_proj.weight", (a.intermediate, a.hidden)),
            (f"{p}.mlp.down_proj.weight", (a.hidden, a.intermediate)),
            (f"{p}.input_layernorm.weight", (a.hidden,)),
            (f"{p}.post_attention_layernorm.weight", (a.hidden,)),
        ]
    out.append(("model.norm.weight", (a.hidden,)))
    if not a.tied:
        out.append(("lm_head.weight", (a.vocab, a.hidden)))
    return out


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def shards(a: Arch) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split tensors into shards of at most ``shard_bytes`` (bf16), in order, as HF does."""
    out: list[list] = [[]]
    size = 0
    for name, shape in tensors(a):
        n = numel(shape) * 2
        if out[-1] and size + n > a.shard_bytes:
            out.append([])
            size = 0
        out[-1].append((name, shape))
        size += n
    return out


def gen(name: str, shape: tuple[int, ...], seed: int, which: str, device: str = "cpu") -> torch.Tensor:
    """Deterministic per-tensor values; the unaligned twin is recomputed from the aligned one.
    Drawn on ``device`` (a GPU draws a 7B checkpoint in seconds; its values differ from the CPU's,
    seeded all the same)."""
    g = torch.Generator(device=device).manual_seed(seed * 7919 + zlib.crc32(name.encode()))
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    w = torch.randn(shape, generator=g, device=device).mul_(0.02)
    if which == "unaligned" and "layers." in name:
        k = 4
        drift = torch.randn(shape[0], k, generator=g, device=device) @ torch.randn(k, shape[1], generator=g,
                                                                                    device=device)
        w.sub_(drift.mul_(2e-4)).sub_(torch.randn(shape, generator=g, device=device).mul_(1e-3))
    return w.to(torch.bfloat16).cpu()


def config(a: Arch) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.hidden,
        "intermediate_size": a.intermediate, "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads, "vocab_size": a.vocab, "tie_word_embeddings": a.tied,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": a.rope_theta,
        "hidden_act": "silu", "torch_dtype": "bfloat16", "dtype": "bfloat16",
    }


def write_model(a: Arch, out: Path, which: str, seed: int, device: str = "cpu") -> None:
    out.mkdir(parents=True, exist_ok=True)
    parts = shards(a)
    weight_map, total = {}, 0
    for i, part in enumerate(parts):
        fname = "model.safetensors" if len(parts) == 1 else f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        with StreamingWriter(out / fname, [(n, s, torch.bfloat16) for n, s in part]) as w:
            for name, shape in part:
                w.write(name, gen(name, shape, seed, which, device))
                weight_map[name] = fname
                total += numel(shape) * 2
        print(f"  {out.name}/{fname}", flush=True)
    if len(parts) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(config(a), indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))


ADAPTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def write_adapter(a: Arch, out: Path, targets: tuple[str, ...], r: int, alpha: float, seed: int,
                  dtype: torch.dtype = torch.float32) -> None:
    """A PEFT LoRA adapter on ``targets``, drawn in fp32 and stored in ``dtype``."""
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in tensors(a):
        mod = name.rsplit(".", 2)[-2]
        if mod in targets and "layers." in name:
            m = name[: -len(".weight")]
            sd[f"base_model.model.{m}.lora_A.weight"] = (torch.randn(r, shape[1], generator=g) * 0.01).to(dtype)
            sd[f"base_model.model.{m}.lora_B.weight"] = (torch.randn(shape[0], r, generator=g) * 0.01).to(dtype)
    save_file(sd, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "target_modules": list(targets),
        "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
        "base_model_name_or_path": "aligned", "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    }, indent=2))


def needed_bytes(a: Arch) -> int:
    return 2 * sum(numel(s) * 2 for _, s in tensors(a)) + 2**28


def write_adapters(a: Arch, out: Path, seed: int, adapter_dtype: str = "float32") -> None:
    """The four adapters (q/v r=8, all linear layers r=16, task and safety), in ``adapter_dtype``,
    and the ``.adapters`` stamp that names it."""
    dtype = ADAPTER_DTYPES[adapter_dtype]
    write_adapter(a, out / "task-qv", ("q_proj", "v_proj"), 8, 16, seed + 1, dtype)
    write_adapter(a, out / "safety-qv", ("q_proj", "v_proj"), 8, 16, seed + 2, dtype)
    write_adapter(a, out / "task-all", ATTN + MLP, 16, 32, seed + 3, dtype)
    write_adapter(a, out / "safety-all", ATTN + MLP, 16, 32, seed + 4, dtype)
    (out / ".adapters").write_text(adapter_dtype + "\n")


def make(shape: str | Arch, root: Path, seed: int = 0, force: bool = False, name: str | None = None,
         device: str = "cpu", adapter_dtype: str = "float32") -> Path:
    """Write the checkpoints for ``shape`` (a name or an Arch) under ``root/name`` (skipped when
    complete; a complete draw whose adapters are in another dtype gets its adapters rewritten)."""
    if adapter_dtype not in ADAPTER_DTYPES:
        raise ValueError(f"adapter_dtype must be one of {', '.join(ADAPTER_DTYPES)}, not {adapter_dtype!r}")
    a = SHAPES[shape] if isinstance(shape, str) else shape
    out = root / (name or str(shape))
    done = out / ".complete"
    # (the draw depends on the seed and on the device's generator: data of another draw is redone)
    stamp = f"ok seed={seed} device={torch.device(device).type}\n"
    if done.is_file() and not force:
        # ("ok": written before the stamp named its draw, always by the default seed 0 on the CPU)
        if done.read_text() in (stamp, "ok\n" if seed == 0 and torch.device(device).type == "cpu" else stamp):
            stored = out / ".adapters"  # (none: written before adapters could be bf16, so fp32)
            have = stored.read_text().strip() if stored.is_file() else "float32"
            if have != adapter_dtype:
                print(f"{out}: rewriting the adapters in {adapter_dtype} (they were {have})")
                write_adapters(a, out, seed, adapter_dtype)
            else:
                print(f"{out}: already there")
            return out
        print(f"{out}: drawn with another seed or device ({done.read_text().strip()}); redrawing")
    root.mkdir(parents=True, exist_ok=True)
    if out.exists():  # (before the disk check: a stale or partial copy's space is freed by redrawing)
        shutil.rmtree(out)
    free = shutil.disk_usage(root).free
    need = needed_bytes(a)
    if free < need * 1.05:
        raise SystemExit(f"make_synthetic: {out.name} needs {need / 2**30:.1f} GiB but {root} has {free / 2**30:.1f} GiB free")
    print(f"writing {out.name} ({need / 2**30:.1f} GiB) to {out}")
    write_model(a, out / "aligned", "aligned", seed, device)
    write_model(a, out / "unaligned", "unaligned", seed, device)
    write_adapters(a, out, seed, adapter_dtype)
    done.write_text(stamp)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--out", default="benchmarks/data", help="root folder (default: benchmarks/data)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rewrite even when complete")
    ap.add_argument("--device", default="cpu", help="draw the weights there (cuda: seconds for a 7B checkpoint; "
                                                    "other values than the CPU's, equally seeded)")
    ap.add_argument("--adapter-dtype", choices=sorted(ADAPTER_DTYPES), default="float32",
                    help="the LoRA adapters' stored dtype (the models are bf16 either way). Default float32: PEFT "
                         "upcasts adapter weights on a bf16/fp16 base to fp32 (autocast_adapter_dtype=True, its "
                         "default) and saves them so; bfloat16: as saved by a training that turned that off")
    args = ap.parse_args()
    make(args.shape, Path(args.out), args.seed, args.force, device=args.device, adapter_dtype=args.adapter_dtype)


if __name__ == "__main__":
    main()
