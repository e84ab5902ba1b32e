"""Tiny synthetic checkpoints for ``make demo`` and the tests (built on the spot, never downloaded).

A Llama with grouped-query attention (so q/k/v/o and the MLP have different shapes), saved in
several safetensors shards; an "unaligned" twin that differs by a random V; a task adapter (rank
and alpha patterns) and a safety adapter (rsLoRA, another rank) made with peft.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Fixture:
    root: Path
    aligned: Path
    unaligned: Path
    task: Path
    safety: Path


def llama_config(layers: int = 3):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def save_model(model, path: Path, dtype: torch.dtype, shard: str = "60KB") -> None:
    model.to(dtype).save_pretrained(path, max_shard_size=shard)


def build(root: str | os.PathLike, *, layers: int = 3, dtype: torch.dtype = torch.float32, seed: int = 0) -> Fixture:
    """Write aligned/unaligned models and task/safety adapters under ``root``."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cfg = llama_config(layers)
    aligned = LlamaForCausalLM(cfg).eval()
    save_model(aligned, root / "aligned", dtype)
    unaligned = LlamaForCausalLM(cfg).eval()
    unaligned.load_state_dict(aligned.state_dict())
    with torch.no_grad():
        for name, p in unaligned.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                # V is low-rank-ish plus noise, so cosines spread over a useful range
                u = torch.randn(p.shape[0], 3) @ torch.randn(3, p.shape[1])
                p.sub_(0.02 * u + 0.005 * torch.randn_like(p))
    save_model(unaligned, root / "unaligned", dtype)

    def adapter(path: Path, **kw) -> None:
        base = LlamaForCausalLM.from_pretrained(root / "aligned", dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(target_modules=TARGETS, init_lora_weights=False, **kw))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn_like(p) * 0.1)
        model.save_pretrained(path)

    adapter(root / "task", r=4, lora_alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3.0})
    adapter(root / "safety", r=6, lora_alpha=12, use_rslora=True)
    return Fixture(root, root / "aligned", root / "unaligned", root / "task", root / "safety")


def main(argv: list[str] | None = None) -> int:
    """``python -m safemerge_ext.demo DIR``: build the fixtures (once) and run ``safemerge merge`` on them."""
    import argparse

    from safemerge_ext.cli import main as cli

    ap = argparse.ArgumentParser(prog="python -m safemerge_ext.demo", description=main.__doc__)
    ap.add_argument("root", nargs="?", default="demo", help="folder for the demo checkpoints and output (default: demo)")
    args = ap.parse_args(argv)
    root = Path(args.root)
    if not (root / "safety" / "adapter_config.json").is_file():
        try:
            import transformers  # noqa: F401  (the demo builds its checkpoints with it)
        except ImportError:
            print("the demo builds its checkpoints with transformers: pip install 'safemerge-ext[test]'",
                  file=sys.stderr)
            return 2
        print(f"building tiny aligned/unaligned Llama models and task/safety LoRA adapters in {root}/ ...")
        build(root)
    cmd = ["merge", "--aligned", str(root / "aligned"), "--unaligned", str(root / "unaligned"),
           "--task-adapter", str(root / "task"), "--safety-adapter", str(root / "safety"),
           "--out", str(root / "merged"), "--threshold", "0.2", "--force", "--no-progress"]
    print("$ safemerge " + " ".join(cmd))
    return cli(cmd)


if __name__ == "__main__":
    raise SystemExit(main())
