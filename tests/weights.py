"""Test-side access to whole checkpoints, for float64 references (the product never does this)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_model(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def load_adapter(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module -> (A, B, scaling), with the scaling computed here from the config independently."""
    import re

    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    sd = load_file(Path(path) / "adapter_model.safetensors")
    mods: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = re.match(r"base_model\.model\.(.+)\.lora_([AB])\.weight$", k)
        mods.setdefault(m[1], {})[m[2]] = v
    out = {}
    for name, ab in mods.items():
        r = ab["A"].shape[0]
        alpha = cfg["lora_alpha"]
        for key, val in (cfg.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({key})$", name):
                alpha = val
                break
        s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        out[name] = (ab["A"], ab["B"], s)
    return out


def twins_and_v4_adapters(model: torch.nn.Module, root: Path, modules: str, target_modules: list[str],
                          alpha_pattern: dict[str, float] | None = None) -> Path:
    """``model`` saved as ``root``/aligned and, perturbed, as ``root``/unaligned (its files keep the
    checkpoint naming: one 2-D weight per expert for the MoE models that had one before transformers
    5), and task (r 4; ``alpha_pattern``) and safety (r 2) adapters written by hand in that naming on
    the modules whose names match ``modules``, as adapters trained before transformers 5 are."""
    import re

    from safetensors.torch import save_file

    model.save_pretrained(root / "aligned")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(root / "unaligned")
    shapes = {n[:-len(".weight")]: t.shape for n, t in load_model(root / "aligned").items()
              if re.search(rf"{modules}\.weight$", n)}
    assert shapes, f"no weight of the model matches {modules}"
    for name, r in (("task", 4), ("safety", 2)):
        factors = {}
        for m, (d_out, d_in) in shapes.items():
            factors[f"base_model.model.{m}.lora_A.weight"] = 0.1 * torch.randn(r, d_in)
            factors[f"base_model.model.{m}.lora_B.weight"] = 0.1 * torch.randn(d_out, r)
        (root / name).mkdir()
        save_file(factors, str(root / name / "adapter_model.safetensors"), metadata={"format": "pt"})
        (root / name / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "bias": "none",
            "alpha_pattern": alpha_pattern if name == "task" and alpha_pattern else {},
            "target_modules": target_modules}))
    return root


def qwen3_moe_v4(root: Path, dense_layers: list[int], alpha_pattern: dict[str, float] | None = None) -> Path:
    """A tiny Qwen3-MoE (``dense_layers`` get a dense MLP) with transformers-4-named adapters on
    q_proj, the router (mlp.gate) and every gate/up/down projection (see twins_and_v4_adapters)."""
    import transformers

    cfg = transformers.Qwen3MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      vocab_size=64, num_experts=4, num_experts_per_tok=2, mlp_only_layers=dense_layers)
    torch.manual_seed(0)
    return twins_and_v4_adapters(transformers.Qwen3MoeForCausalLM(cfg), root,
                                 r"\.(q_proj|gate_proj|up_proj|down_proj|mlp\.gate)",
                                 ["q_proj", "gate", "gate_proj", "up_proj", "down_proj"], alpha_pattern)
