"""Session-scoped pico Llama models for the mergekit-method tests (built here, never downloaded).

Four full models share one architecture (2 layers, GQA: 4 query heads, 2 key/value heads, untied
lm_head), each saved in several safetensors shards: ``unaligned``; ``aligned = unaligned + V`` with
a low-rank V per linear weight (so C has a small range and scores spread over [0, 1]); ``task``
with updates that mix a direction inside V's column space and noise (some layers flagged, some
not); ``safety`` with random updates. Two layers are degenerate on purpose: V = 0 in
``model.layers.1.mlp.up_proj`` and dW = 0 in ``model.layers.0.mlp.gate_proj``. Two LoRA adapters on
the aligned model (PEFT, ``init_lora_weights=False``) serve the ``aligned+lora`` tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

V_ZERO = "model.layers.1.mlp.up_proj.weight"
DW_ZERO = "model.layers.0.mlp.gate_proj.weight"
SHARD = "24KB"


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )


def is_linear(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name


def read_model(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (sharded) safetensors model folder, as saved."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


def save_model(sd: dict[str, torch.Tensor], path: Path) -> None:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config())
    model.load_state_dict(sd, strict=True)
    model.save_pretrained(path, max_shard_size=SHARD)


@dataclass(frozen=True)
class PicoModels:
    root: Path
    unaligned: Path
    aligned: Path
    task: Path
    safety: Path
    lora_task: Path
    lora_safety: Path


def _build(root: Path) -> PicoModels:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    unaligned = {k: v.detach().clone().float() for k, v in LlamaForCausalLM(llama_config()).state_dict().items()}
    g = torch.Generator().manual_seed(1234)
    aligned, task, safety = {}, {}, {}
    mixes = [0.0, 0.15, 0.3, 0.5, 0.7, 0.85, 1.0]
    for i, (name, wu) in enumerate(sorted(unaligned.items())):
        if is_linear(name, wu):
            d_out, d_in = wu.shape
            U = torch.randn(d_out, 3, generator=g)
            V = U @ torch.randn(3, d_in, generator=g) * 0.02
            if name == V_ZERO:
                V = torch.zeros_like(wu)
            gamma = mixes[i % len(mixes)]
            inside = U @ torch.randn(3, d_in, generator=g)
            noise = torch.randn(d_out, d_in, generator=g)
            dW = (gamma * inside / inside.norm() + (1 - gamma) * noise / noise.norm()) * 0.3
            if name == DW_ZERO:
                dW = torch.zeros_like(wu)
        else:
            V = torch.randn(wu.shape, generator=g) * 0.02
            dW = torch.randn(wu.shape, generator=g) * 0.01
        aligned[name] = wu + V
        task[name] = aligned[name] + dW
        safety[name] = aligned[name] + torch.randn(wu.shape, generator=g) * 0.01
    paths = PicoModels(root, root / "unaligned", root / "aligned", root / "task", root / "safety",
                       root / "lora_task", root / "lora_safety")
    for sd, p in ((unaligned, paths.unaligned), (aligned, paths.aligned), (task, paths.task), (safety, paths.safety)):
        save_model(sd, p)
    _lora(paths.aligned, paths.lora_task, seed=1, r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    _lora(paths.aligned, paths.lora_safety, seed=2, r=2, alpha=4, targets=["q_proj", "v_proj", "down_proj"])
    return paths


def _lora(base: Path, out: Path, *, seed: int, r: int, alpha: int, targets: list[str]) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # make the updates large enough to matter against V
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(3.0)
    peft_model.save_pretrained(out)


def lora_delta(adapter: Path, weight_name: str) -> torch.Tensor | None:
    """s * B @ A in float64 for one base weight name, or None when the adapter does not touch it."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    module = weight_name[: -len(".weight")]
    with safe_open(adapter / "adapter_model.safetensors", framework="pt") as fh:
        keys = {k: k for k in fh.keys()}
        a = next((k for k in keys if k.endswith(f"{module}.lora_A.weight")), None)
        b = next((k for k in keys if k.endswith(f"{module}.lora_B.weight")), None)
        if a is None or b is None:
            return None
        return scale * fh.get_tensor(b).double() @ fh.get_tensor(a).double()


@pytest.fixture(scope="session")
def pico(tmp_path_factory: pytest.TempPathFactory) -> PicoModels:
    """The four pico models and two adapters, built once per test session."""
    return _build(tmp_path_factory.mktemp("pico"))
