"""PEFT LoRA adapters: read (with each module's scaling) and write (mixed ranks, loadable by PEFT).

A module's update is ``scaling * lora_B @ lora_A`` with ``scaling = alpha / r`` (or
``alpha / sqrt(r)`` with ``use_rslora``), where r and alpha come from ``rank_pattern`` /
``alpha_pattern`` when a pattern matches the module, else from ``r`` / ``lora_alpha``. Patterns
match as PEFT matches them (``re.match(rf"(.*\\.)?({key})$", module)``, first key wins). Module names
are the base model's (``model.layers.0.self_attn.q_proj``): PEFT's ``base_model.model.`` prefix is
stripped on read and added back on write.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from safemerge_ext.errors import SafeMergeError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
# Config switches that change what the saved tensors mean; we refuse rather than misread them.
_UNSUPPORTED = {
    "use_dora": "DoRA adapters (use_dora: true) carry a magnitude vector that SafeMERGE does not model",
    "fan_in_fan_out": "fan_in_fan_out adapters (GPT-2 Conv1D layers) store transposed factors",
    "modules_to_save": "modules_to_save holds fully trained copies of whole modules",
    "trainable_token_indices": "trainable tokens are not LoRA updates",
    "lora_bias": "LoRA bias terms are not part of the B @ A update",
    "target_parameters": "LoRA on raw parameters (MoE experts) is not a linear module's B @ A update",
    "alora_invocation_tokens": "activated LoRA applies its update only after invocation tokens",
}


def pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """The first pattern that PEFT would match against ``module`` (None if none does)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def peft_module(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


@dataclass
class LoraModule:
    """One adapted linear module: factors as stored, its rank, alpha and resulting scaling."""

    name: str
    A: torch.Tensor  # r x d_in
    B: torch.Tensor  # d_out x r
    rank: int
    alpha: float
    scaling: float

    def delta(self) -> torch.Tensor:
        """The full update ``scaling * B @ A`` in fp32."""
        return (self.B.float() @ self.A.float()) * self.scaling


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter read from disk; ``modules`` keep the file's module names (base naming)."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]
    flag: str

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def nbytes(self) -> int:
        return sum(m.A.numel() * m.A.element_size() + m.B.numel() * m.B.element_size() for m in self.modules.values())


def read_adapter(path: str | os.PathLike, flag: str = "--adapter") -> LoraAdapter:
    """Read and validate a PEFT LoRA adapter folder (small: all factors are loaded)."""
    p = Path(path)
    cfg_path, w_path = p / CONFIG, p / WEIGHTS
    if not p.is_dir():
        raise SafeMergeError(f"{flag} {p}: no such directory; give a PEFT adapter folder (adapter_config.json + {WEIGHTS})")
    if not cfg_path.is_file():
        raise SafeMergeError(f"{flag} {p}: no {CONFIG}; give a folder saved by PeftModel.save_pretrained")
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise SafeMergeError(f"{flag} {cfg_path}: not valid JSON ({exc})") from None
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise SafeMergeError(f"{flag} {cfg_path}: peft_type is {peft_type or 'missing'}; only LoRA adapters are supported")
    for key, why in _UNSUPPORTED.items():
        if config.get(key):
            raise SafeMergeError(f"{flag} {cfg_path}: {key} is set; {why}, so this adapter is not supported")
    if not w_path.is_file():
        if (p / "adapter_model.bin").is_file():
            raise SafeMergeError(
                f"{flag} {p} has only adapter_model.bin: re-save it with safetensors (save_pretrained(dir, safe_serialization=True))"
            )
        raise SafeMergeError(f"{flag} {p}: no {WEIGHTS}")

    factors: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(w_path, framework="pt", device="cpu") as f:
        for key in f.keys():
            m = _KEY.match(key)
            if m is None:
                raise SafeMergeError(
                    f"{flag} {w_path}: tensor {key} is not a LoRA factor (lora_A/lora_B); "
                    "embedding LoRA, DoRA magnitudes and saved modules are not supported"
                )
            factors.setdefault(peft_module(m["module"]), {})[m["ab"]] = f.get_tensor(key)

    r_default, alpha_default = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    modules: dict[str, LoraModule] = {}
    for name, ab in factors.items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise SafeMergeError(f"{flag} {w_path}: module {name} has no {missing}; the adapter file is incomplete")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise SafeMergeError(
                f"{flag} {w_path}: module {name} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; "
                "they must be r x d_in and d_out x r"
            )
        rank = A.shape[0]
        rk = pattern_key(rank_pattern, name)
        expected = int(rank_pattern[rk]) if rk is not None else r_default
        if expected != rank:
            raise SafeMergeError(
                f"{flag} {w_path}: module {name} has rank {rank} but the config says {expected}; the config does not match the weights"
            )
        ak = pattern_key(alpha_pattern, name)
        alpha = float(alpha_pattern[ak]) if ak is not None else alpha_default
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        for t, which in ((A, "lora_A"), (B, "lora_B")):
            if not torch.is_floating_point(t) or not torch.isfinite(t).all():
                raise SafeMergeError(f"{flag} {w_path}: {name}.{which} contains NaN or Inf; the adapter is corrupt")
        modules[name] = LoraModule(name, A, B, rank, alpha, scaling)
    if not modules:
        raise SafeMergeError(f"{flag} {w_path}: no LoRA factors found")
    return LoraAdapter(p, config, modules, flag)


@dataclass
class OutModule:
    """A module to write: factors and the (rank, alpha) PEFT must use for it."""

    name: str
    A: torch.Tensor
    B: torch.Tensor
    alpha: float


def unit_alpha(rank: int, use_rslora: bool) -> float:
    """The lora_alpha that makes PEFT's scaling exactly 1 for this rank (x / x == 1.0 in floats)."""
    return math.sqrt(rank) if use_rslora else float(rank)


def write_adapter(out_dir: str | os.PathLike, template: dict[str, Any], modules: list[OutModule]) -> None:
    """Write a PEFT adapter; every module gets an explicit ``rank_pattern``/``alpha_pattern`` entry.

    Explicit per-module entries make mixed ranks load in PEFT and keep each module's scaling
    independent of the template's default ``r`` / ``lora_alpha`` and of any regex it had.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(template)
    config["rank_pattern"] = {m.name: int(m.A.shape[0]) for m in modules}
    config["alpha_pattern"] = {m.name: m.alpha for m in modules}
    tensors: dict[str, torch.Tensor] = {}
    for m in modules:
        tensors[f"{PEFT_PREFIX}{m.name}.lora_A.weight"] = m.A.contiguous()
        tensors[f"{PEFT_PREFIX}{m.name}.lora_B.weight"] = m.B.contiguous()
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
