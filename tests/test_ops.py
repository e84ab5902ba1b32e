"""ops semantics beyond numerics: argument rules, scale invariance, degenerate layers, backend
selection, and the selection rules (strict vs inclusive, k lowest, fraction)."""

from __future__ import annotations

import math

import pytest
import torch

from numerics import assert_close, ref_cosine, ref_project
from safemerge_ext import backends, ops
from safemerge_ext.selection import Selection


def inputs(d_out=40, d_in=24, r=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    wa = torch.randn(d_out, d_in, generator=g).to(dtype)
    wu = (wa.float() + 0.1 * torch.randn(d_out, d_in, generator=g)).to(dtype)
    return wa, wu, torch.randn(r, d_in, generator=g).to(dtype), torch.randn(d_out, r, generator=g).to(dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 1e-5), (torch.bfloat16, 1e-5)],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("d_out, d_in, r", [(64, 64, 8), (67, 131, 3), (200, 96, 1), (96, 300, 16)])
def test_torch_reference_vs_float64(dtype, tol, d_out, d_in, r):
    wa, wu, A, B = inputs(d_out, d_in, r, seed=d_out * r, dtype=dtype)
    want = ref_cosine(wa, wu, B.double() @ A.double())
    assert abs(ops.subspace_cosine(wa, wu, lora_A=A, lora_B=B, backend="torch") - want) < tol
    assert abs(ops.subspace_cosine(wa, wu, delta=(B.float() @ A.float()), backend="torch") - want) < 10 * tol
    assert_close(ops.project_lora_B(wa, wu, B, backend="torch").float(), ref_project(wa, wu, B),
                 atol=1e-2 if dtype != torch.float32 else 1e-5, rtol=1e-2 if dtype != torch.float32 else 1e-5)


def test_scale_invariance_and_arguments():
    wa, wu, A, B = inputs()
    c = ops.subspace_cosine(wa, wu, lora_A=A, lora_B=B, backend="torch")
    assert math.isclose(c, ops.subspace_cosine(wa, wu, lora_A=A * 3.5, lora_B=B * 0.01, backend="torch"), rel_tol=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        ops.subspace_cosine(wa, wu, lora_A=A, lora_B=B, delta=B @ A)
    with pytest.raises(ValueError, match="exactly one"):
        ops.subspace_cosine(wa, wu, lora_A=A)
    with pytest.raises(ValueError, match="do not fit"):
        ops.subspace_cosine(wa, wu, lora_A=A.t().contiguous(), lora_B=B)
    with pytest.raises(ValueError, match="one shape"):
        ops.subspace_cosine(wa, wu[:5], lora_A=A, lora_B=B)


def test_non_contiguous_inputs():
    wa, wu, A, B = inputs(30, 50, 4)
    wat, wut = wa.t(), wu.t()  # 50 x 30 views
    At, Bt = torch.randn(4, 30), torch.randn(50, 4)
    want = ref_cosine(wat, wut, Bt.double() @ At.double())
    assert abs(ops.subspace_cosine(wat, wut, lora_A=At, lora_B=Bt, backend="torch") - want) < 1e-6


def test_degenerate_layers():
    wa, wu, A, B = inputs()
    s = ops.subspace_score(wa, wa.clone(), lora_A=A, lora_B=B, backend="torch")
    assert math.isnan(s.cosine) and "V = 0" in s.reason
    s = ops.subspace_score(wa, wu, lora_A=A, lora_B=torch.zeros_like(B), backend="torch")
    assert math.isnan(s.cosine) and "zero" in s.reason
    with pytest.raises(FloatingPointError):
        bad = wa.clone()
        bad[0, 0] = float("nan")
        ops.subspace_cosine(bad, wu, lora_A=A, lora_B=B, backend="torch")
    with pytest.raises(ValueError, match="V = 0"):
        ops.project_lora_B(wa, wa, B, backend="torch")


def test_project_delta_vs_float64():
    wa, wu, A, B = inputs(70, 33, 5)
    dW = torch.randn(70, 33)
    assert_close(ops.project_delta(wa, wu, dW, backend="torch"), ref_project(wa, wu, dW), atol=1e-5, rtol=1e-5)


def test_backend_registry(monkeypatch):
    avail = ops.available_backends()
    assert set(avail) == {"torch", "cpp", "cuda", "triton"} and avail["torch"] is None
    assert all(v is None or (isinstance(v, str) and v) for v in avail.values())
    with pytest.raises(ValueError, match="backend must be one of auto"):
        backends.resolve("nope", "cpu")
    with pytest.raises(ValueError, match="cuda"):
        backends.resolve("cuda", "cpu")
    name, _ = backends.resolve("auto", "cpu")
    assert name == ("cpp" if avail["cpp"] is None else "torch")
    if avail["triton"] is None:  # the interpreter: by name only, never picked by auto on the CPU
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert backends.resolve("triton", "cpu")[0] == "triton"
        assert backends.resolve("auto", "cpu")[0] != "triton"
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="runs on cuda"):
            backends.resolve("triton", "cpu")
    monkeypatch.setenv("SAFEMERGE_BACKEND", "torch")
    assert backends.resolve("auto", "cpu")[0] == "torch"


def test_selection_rules():
    scores = [0.4, 0.35, float("nan"), 0.1, 0.35, 0.9]
    assert Selection(threshold=0.35).flag(scores) == [False, False, False, True, False, False]
    assert Selection(threshold=0.35, inclusive=True).flag(scores) == [False, True, False, True, True, False]
    assert Selection(num_layers=2).flag(scores) == [False, True, False, True, False, False]  # tie -> model order
    assert Selection(num_layers=99).flag(scores) == [True, True, False, True, True, True]
    ten = [i / 10 for i in range(10)]
    assert sum(Selection(fraction=0.3).flag(ten)) == 3  # not ceil(3.0000000000000004)
    assert sum(Selection(fraction=0.31).flag(ten)) == 4
    assert sum(Selection(fraction=0.3).flag(scores)) == 2  # n counts only the 5 defined scores
