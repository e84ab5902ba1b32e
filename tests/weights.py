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
