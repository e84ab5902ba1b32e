"""ops semantics beyond numerics: argument rules, scale invariance, degenerate layers, backend
selection, and the selection rules (strict vs inclusive, k lowest, fraction)."""

from __future__ import annotations

import json
import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch

from numerics import assert_close, project_error_scale, ref_cosine, ref_project
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
    # C B in lora_B's dtype: computed in fp32 (within the rounding bound of its n = d_out + d_in
    # terms), then rounded to lora_B's dtype (one unit in its last place)
    got, want = ops.project_lora_B(wa, wu, B, backend="torch"), ref_project(wa, wu, B)
    fp32 = (d_out + d_in) * 2.0**-24 * project_error_scale(wa, wu, B)
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
    assert got.dtype == dtype
    assert_close(got, want, atol=fp32 + eps * 1e-2 * float(want.abs().max()), rtol=eps, what="C B")


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


CPU_BACKENDS = [n for n in ("cpp", "torch") if backends.available_backends()[n] is None]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scores_keep_the_relations_the_math_has(backend):
    """Transformed inputs that SPEC §1 says give the same score (review133's metamorphic relations):
    V -> -V and dW -> -dW (bit for bit: C and the cosine are even in both), zero rank columns,
    (B c, A / c), a consistent permutation of rows and columns, delta = B A; and C B is even in V."""
    wa, wu, A, B = inputs(d_out=33, d_in=17, r=4, seed=5)
    g = torch.Generator().manual_seed(6)

    def score(wa, wu, A, B):
        return ops.subspace_cosine(wa, wu, lora_A=A, lora_B=B, backend=backend)

    s0 = score(wa, wu, A, B)
    assert 0.05 < s0 < 0.95  # (a relation between 0s and 1s could hold by accident)
    assert score(wu, wa, A, B) == s0 and score(wa, wu, -A, B) == s0
    padded_A, padded_B = torch.cat([A, torch.randn(2, 17, generator=g)]), torch.cat([B, torch.zeros(33, 2)], 1)
    assert score(wa, wu, padded_A, padded_B) == pytest.approx(s0, abs=1e-7)
    assert score(wa, wu, A / 4, B * 4) == pytest.approx(s0, abs=1e-7)
    rows, cols = torch.randperm(33, generator=g), torch.randperm(17, generator=g)
    assert score(wa[rows][:, cols], wu[rows][:, cols], A[:, cols], B[rows]) == pytest.approx(s0, abs=1e-7)
    assert ops.subspace_cosine(wa, wu, delta=B @ A, backend=backend) == pytest.approx(s0, abs=1e-7)
    assert torch.equal(ops.project_lora_B(wa, wu, B, backend=backend), ops.project_lora_B(wu, wa, B, backend=backend))


@pytest.mark.parametrize("setting", ["legacy", "per-backend"])
@pytest.mark.usefixtures("matmul_precision_restored")
def test_a_programs_reduced_matmul_precision_does_not_reach_the_scores(setting):
    """A program that set `torch.set_float32_matmul_precision("medium")` (bf16 products on CPUs
    with AMX, TF32 on GPUs) got torch-backend scores 5e-5 off on this machine while the report said
    exact fp32 (review132): the ops run exact, and the program's setting is put back after."""
    wa, wu, A, B = inputs(d_out=300, d_in=200, r=8, seed=3)
    want = ref_cosine(wa, wu, B.double() @ A.double())
    matmul = torch.backends.mkldnn.matmul
    per_backend = hasattr(matmul, "fp32_precision")
    if setting == "per-backend" and not per_backend:
        pytest.skip("torch < 2.9 has no per-backend precision setting")

    def state():
        return (torch.backends.cuda.matmul.fp32_precision, matmul.fp32_precision) if per_backend \
            else torch.get_float32_matmul_precision()

    if setting == "legacy":
        torch.set_float32_matmul_precision("medium")
    else:
        matmul.fp32_precision = "bf16"
    before = state()
    for backend in CPU_BACKENDS:
        assert abs(ops.subspace_cosine(wa, wu, lora_A=A, lora_B=B, backend=backend) - want) < 1e-6, backend
        got, ref = ops.project_lora_B(wa, wu, B, backend=backend), ref_project(wa, wu, B)
        assert float((got.double() - ref).abs().max()) < 1e-5 * float(ref.abs().max()), backend
    assert state() == before


@pytest.mark.usefixtures("matmul_precision_restored")
def test_overlapping_calls_in_threads_stay_exact_fp32():
    """The first of two overlapping calls to leave put the program's "medium" back while the other
    still computed, whose products then ran in bf16 (review136): the last to leave puts it back."""
    import threading

    torch.set_float32_matmul_precision("medium")
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with backends.exact_fp32_matmuls():
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second():
        first_in.wait(10)
        with backends.exact_fp32_matmuls():
            second_in.set()
            first_out.wait(10)
            seen["mkldnn"] = getattr(torch.backends.mkldnn.matmul, "fp32_precision", None)
            seen["legacy"] = torch.get_float32_matmul_precision()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen["mkldnn"] in (None, "ieee") and (seen["mkldnn"] is not None or seen["legacy"] == "highest"), seen
    assert torch.get_float32_matmul_precision() == "medium"  # (the program's again, after the last)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_tensors_get_one_clear_error_and_are_left_alone(backend):
    """What the API refuses, on every backend alike, without touching the caller's tensors: integer
    factors or updates (the projection was cast back to int), meta tensors, weights of two dtypes,
    empty weights, rank 0."""
    wa, wu, A, B = inputs(seed=11)
    before = [t.clone() for t in (wa, wu, A, B)]
    cases = [
        (dict(lora_A=A, lora_B=(B * 10).int()), "lora_B must be a floating-point tensor"),
        (dict(lora_A=A.bool(), lora_B=B), "lora_A must be a floating-point tensor"),
        (dict(delta=(B @ A).long()), "delta must be a floating-point tensor"),
        (dict(lora_A=A.to("meta"), lora_B=B), "lora_A is on the meta device"),
        (dict(lora_A=A[:0], lora_B=B[:, :0]), "do not fit"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            ops.subspace_score(wa, wu, backend=backend, **kw)
    with pytest.raises(ValueError, match="lora_B must be a floating-point tensor"):
        ops.project_lora_B(wa, wu, (B * 10).int(), backend=backend)
    with pytest.raises(ValueError, match="delta must be a floating-point tensor"):
        ops.project_delta(wa, wu, (B @ A).int(), backend=backend)
    with pytest.raises(ValueError, match="w_aligned is torch.float32 but w_unaligned torch.bfloat16"):
        ops.subspace_score(wa, wu.bfloat16(), lora_A=A, lora_B=B, backend=backend)
    with pytest.raises(ValueError, match="empty"):
        ops.subspace_score(wa[:0], wu[:0], lora_A=A, lora_B=B[:0], backend=backend)
    with pytest.raises(ValueError, match="meta device"):
        ops.subspace_score(wa.to("meta"), wu.to("meta"), lora_A=A, lora_B=B)
    assert all(torch.equal(x, y) for x, y in zip((wa, wu, A, B), before))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_shapes_and_nonfinite_inputs_of_the_projections_are_named(backend):
    """The public ops name a wrong shape and NaN/Inf in what they project, on every backend: a full
    update not shaped like the weights, a lora_B with the wrong row count or no columns."""
    wa, wu, A, B = inputs(seed=14)
    with pytest.raises(ValueError, match=r"delta has shape \(40, 23\) but the weights \(40, 24\)"):
        ops.subspace_score(wa, wu, delta=(B @ A)[:, :23], backend=backend)
    with pytest.raises(ValueError, match=r"delta has shape \(24, 40\) but the weights \(40, 24\)"):
        ops.project_delta(wa, wu, (B @ A).t(), backend=backend)
    for bad in (B[:39], B[:, :0]):
        with pytest.raises(ValueError, match=rf"lora_B has shape \({bad.shape[0]}, {bad.shape[1]}\); want 40xr, r >= 1"):
            ops.project_lora_B(wa, wu, bad, backend=backend)
    for where in ("wu", "update"):
        x_wu, x_B, x_dW = wu.clone(), B.clone(), B @ A
        if where == "wu":
            x_wu[3, 5] = float("nan")
        else:
            x_B[7, 1], x_dW[7, 1] = float("inf"), float("inf")
        with pytest.raises(FloatingPointError, match="NaN or Inf"):
            ops.project_lora_B(wa, x_wu, x_B, backend=backend)
        with pytest.raises(FloatingPointError, match="NaN or Inf"):
            ops.project_delta(wa, x_wu, x_dW, backend=backend)


def test_selection_settings_are_checked():
    from safemerge_ext.selection import Selection

    with pytest.raises(ValueError, match="the number of layers to flag must be at least 1; got 0"):
        Selection(num_layers=0)
    for f in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="fraction must lie in \\(0, 1\\]"):
            Selection(fraction=f)
    with pytest.raises(ValueError, match="num_layers must be a whole number; got 2.5"):
        Selection(num_layers=2.5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tensors_that_require_grad_are_scored_as_they_are(backend):
    wa, wu, A, B = inputs(seed=12)
    want = ops.subspace_score(wa, wu, lora_A=A, lora_B=B, backend=backend).cosine
    grads = [t.clone().requires_grad_() for t in (wa, wu, A, B)]
    assert ops.subspace_score(grads[0], grads[1], lora_A=grads[2], lora_B=grads[3], backend=backend).cosine == want
    assert torch.equal(ops.project_lora_B(*grads[:2], grads[3], backend=backend), ops.project_lora_B(wa, wu, B, backend=backend))
    got = ops.project_delta(*grads[:2], (grads[3] @ grads[2]), backend=backend)
    assert not got.requires_grad and torch.equal(got, ops.project_delta(wa, wu, B @ A, backend=backend))


def test_backend_names_are_checked_and_their_source_named(monkeypatch):
    wa, wu, A, B = inputs(seed=13)
    with pytest.raises(ValueError, match="backend must be a name"):
        ops.subspace_score(wa, wu, lora_A=A, lora_B=B, backend=3)
    monkeypatch.setenv("SAFEMERGE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SAFEMERGE_BACKEND must be one of auto, .*; got 'bogus'"):
        ops.subspace_score(wa, wu, lora_A=A, lora_B=B)
    monkeypatch.setenv("SAFEMERGE_BACKEND", " Torch ")
    assert ops.subspace_score(wa, wu, lora_A=A, lora_B=B).backend == "torch"
    # a backend the environment picked, that cannot run here: the message names the variable
    monkeypatch.setenv("SAFEMERGE_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"^SAFEMERGE_BACKEND=cuda: backend 'cuda' runs on cuda tensors, not cpu"):
        ops.subspace_score(wa, wu, lora_A=A, lora_B=B)
    with pytest.raises(ValueError, match=r"^backend 'cuda' runs on"):  # (asked for by name: no variable)
        ops.subspace_score(wa, wu, lora_A=A, lora_B=B, backend="cuda")


def test_a_backend_chosen_by_the_environment_is_not_blamed_on_the_backend_flag(fx, tmp_path, monkeypatch, capsys):
    from safemerge_ext.cli import main

    args = ["score", "--aligned", str(fx.aligned), "--unaligned", str(fx.unaligned), "--adapter", str(fx.task),
            "--report", str(tmp_path / "s.json"), "--no-progress"]
    monkeypatch.setenv("SAFEMERGE_BACKEND", "cuda")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("safemerge: error: SAFEMERGE_BACKEND=cuda: backend 'cuda' runs on cuda tensors"), err
    assert "--backend" not in err and "\n" not in err
    # the variable sets the default only: a --backend given, auto included, is what runs
    assert main(args + ["--backend", "auto"]) == 0
    settings = json.loads((tmp_path / "s.json").read_text())["settings"]
    assert settings["backend_requested"] == "auto"
    monkeypatch.setenv("SAFEMERGE_BACKEND", " Torch")
    assert main(args) == 0
    rep = json.loads((tmp_path / "s.json").read_text())
    assert rep["backend"] == "torch" and rep["settings"]["backend_requested"] == "torch (SAFEMERGE_BACKEND)"
    monkeypatch.delenv("SAFEMERGE_BACKEND")
    assert main(args + ["--backend", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("safemerge: error: --backend cuda: backend 'cuda' runs on") and "SAFEMERGE_BACKEND" not in err, err


def test_the_pipeline_api_follows_the_environment_as_ops_do(fx, monkeypatch):
    """Through the API, backend="auto" follows SAFEMERGE_BACKEND as ops and backends.resolve do;
    only the command line's explicit --backend auto (honour_env=False) does not."""
    from safemerge_ext import pipeline

    monkeypatch.setenv("SAFEMERGE_BACKEND", "torch")
    rep = pipeline.score(fx.aligned, fx.unaligned, fx.task, progress=False)
    assert rep["backend"] == "torch" and rep["settings"]["backend_requested"] == "torch (SAFEMERGE_BACKEND)"
    rep = pipeline.score(fx.aligned, fx.unaligned, fx.task, progress=False, honour_env=False)
    assert rep["backend"] == backends.resolve("auto", "cpu", honour_env=False)[0]
    assert rep["settings"]["backend_requested"] == "auto"


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
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        bad = wa.clone()
        bad[0, 0] = float("nan")
        ops.subspace_cosine(bad, wu, lora_A=A, lora_B=B, backend="torch")
    with pytest.raises(ValueError, match="V = 0"):
        ops.project_lora_B(wa, wa, B, backend="torch")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_an_update_wholly_outside_the_safety_subspace_scores_zero(backend):
    """V lives in rows 0-9 and dW in rows 10-19, so V^T dW = 0 and C dW = 0 exactly: rho's limit
    (and the official code's cosine_similarity) is 0, so the layer is flagged, not left out."""
    g = torch.Generator().manual_seed(17)
    wu = torch.randn(20, 30, generator=g)
    wa = wu.clone()
    wa[:10] += torch.randn(10, 30, generator=g) * 0.1
    B, A = torch.randn(20, 3, generator=g), torch.randn(3, 30, generator=g)
    B[:10] = 0
    for kw in ({"lora_A": A, "lora_B": B}, {"delta": B @ A}):
        s = ops.subspace_score(wa, wu, **kw, backend=backend)
        assert s.cosine == 0.0 and s.reason is None and s.v_norm > 0 and s.delta_norm > 0, s
    assert Selection(threshold=0.35).flag([0.0]) == [True]
    # a little of the update inside the subspace: a small score, continuous with that 0
    B[0] = 1e-3
    assert 0.0 < ops.subspace_cosine(wa, wu, lora_A=A, lora_B=B, backend=backend) < 0.05


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
        for off in ("0", "off", ""):  # read as triton reads it
            monkeypatch.setenv("TRITON_INTERPRET", off)
            with pytest.raises(ValueError, match="runs on cuda") as err:
                backends.resolve("triton", "cpu")
            assert "set TRITON_INTERPRET=1" in str(err.value)
            assert str(err.value).endswith(f"another backend ({', '.join(n for n in ('cpp', 'torch') if avail[n] is None)})")
        monkeypatch.setenv("TRITON_INTERPRET", "true")
        assert backends.resolve("triton", "cpu")[0] == "triton"
    monkeypatch.setenv("SAFEMERGE_BACKEND", "torch")
    assert backends.resolve("auto", "cpu")[0] == "torch"


def test_precision_is_a_permission_only_triton_uses(monkeypatch):
    """--precision / SAFEMERGE_PRECISION: validated up front; the Triton kernels get it, every other
    backend computes in exact fp32 and says ieee."""
    monkeypatch.delenv("SAFEMERGE_PRECISION", raising=False)
    assert backends.requested_precision(None) == "ieee"
    assert backends.requested_precision("BF16") == "bf16"
    with pytest.raises(ValueError, match="precision must be one of ieee, tf32, tf32x3, bf16; got 'fp8'"):
        backends.requested_precision("fp8")
    monkeypatch.setenv("SAFEMERGE_PRECISION", "tf32")
    assert backends.requested_precision(None) == "tf32" and backends.requested_precision("ieee") == "ieee"
    assert backends.resolve_precision(None, "triton") == "tf32"
    assert [backends.resolve_precision(None, b) for b in ("cuda", "cpp", "torch")] == ["ieee"] * 3
    monkeypatch.setenv("SAFEMERGE_PRECISION", "half")
    with pytest.raises(ValueError, match="SAFEMERGE_PRECISION must be one of"):
        backends.requested_precision(None)
    monkeypatch.setenv("SAFEMERGE_PRECISION", " TF32 ")  # (read as SAFEMERGE_BACKEND is)
    assert backends.requested_precision(None) == "tf32"
    for blank in (" ", "\t"):  # (set but blank: unset, as SAFEMERGE_BACKEND and SAFEMERGE_CPU_ISA are)
        monkeypatch.setenv("SAFEMERGE_PRECISION", blank)
        assert backends.requested_precision(None) == "ieee"
    for bad in (3, 1.5, ["ieee"]):  # not a name: one line, as for backend=
        with pytest.raises(ValueError, match="precision must be one of ieee, tf32, tf32x3, bf16"):
            backends.requested_precision(bad)


def test_ops_pass_the_precision_to_triton_only(monkeypatch):
    """What each backend's ops receive, and what the score reports, for an allowed precision."""
    monkeypatch.delenv("SAFEMERGE_PRECISION", raising=False)
    wa, wu, A, B = inputs(48, 40, 4)
    torch_impl = backends.resolve("torch", "cpu")[1]
    seen: list[dict] = []

    class Spy:
        """The torch reference, recording the keywords each op was called with."""

        def __getattr__(self, op):
            def call(*args, **kw):
                seen.append({"op": op, **kw})
                kw.pop("precision", None)
                return getattr(torch_impl, op)(*args, **kw)
            return call

    real_precision = backends.resolve_precision
    monkeypatch.setattr(backends, "resolve_precision", lambda p, b, d="cuda": real_precision(p, b, "cuda"))  # a GPU
    for name, want in (("triton", "tf32x3"), ("cpp", "ieee")):
        monkeypatch.setattr(backends, "resolve", lambda *a, name=name: (name, Spy()))
        seen.clear()
        s = ops.subspace_score(wa, wu, lora_A=A, lora_B=B, precision="tf32x3")
        f = ops.subspace_score(wa, wu, delta=B @ A, precision="tf32x3")
        ops.project_lora_B(wa, wu, B, precision="tf32x3")
        ops.project_delta(wa, wu, B @ A, precision="tf32x3")
        assert s.precision == f.precision == want and s.backend == name
        # (the r x r remainder, lowrank_traces, is float64 work in every backend: no precision)
        assert [c["op"] for c in seen] == ["lowrank_passes", "lowrank_traces", "fullrank_sums", "lowrank_passes",
                                           "project_full"]
        assert all(c.get("precision") == (want if name == "triton" and c["op"] != "lowrank_traces" else None)
                   for c in seen), seen
        assert ops.subspace_score(wa, wu, lora_A=A, lora_B=B).precision == "ieee"  # the default asks nothing
    # on the CPU (Triton's interpreter, whose dot products ignore it) nothing is asked, and the score says ieee
    monkeypatch.setattr(backends, "resolve_precision", real_precision)
    monkeypatch.setattr(backends, "resolve", lambda *a: ("triton", Spy()))
    seen.clear()
    assert ops.subspace_score(wa, wu, lora_A=A, lora_B=B, precision="tf32x3").precision == "ieee"
    assert all("precision" not in c for c in seen), seen


@pytest.mark.skipif(backends.available_backends()["triton"] is not None, reason="triton cannot run here")
@pytest.mark.parametrize("precision", ["tf32x3", "tf32"])
def test_triton_scores_with_an_allowed_precision(monkeypatch, precision):
    """Through ops, the Triton kernels score at the precision asked for (on the CPU: the interpreter,
    whose products are exact fp32 whatever the precision; a GPU rounds tf32 operands, see
    test_backend_triton's GPU tests) and the score says which."""
    monkeypatch.delenv("SAFEMERGE_PRECISION", raising=False)
    wa, wu, A, B = inputs(70, 45, 5, seed=7)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    wa, wu, A, B = (t.to(device) for t in (wa, wu, A, B))
    want = ref_cosine(wa.cpu(), wu.cpu(), B.cpu().double() @ A.cpu().double())
    s = ops.subspace_score(wa, wu, lora_A=A, lora_B=B, backend="triton", precision=precision)
    # (the interpreter's dot products ignore the operand precision: the score says it was exact)
    assert s.backend == "triton" and s.precision == (precision if device == "cuda" else "ieee")
    assert abs(s.cosine - want) < (5e-3 if precision == "tf32" else 1e-5)


def test_selection_rules():
    scores = [0.4, 0.35, float("nan"), 0.1, 0.35, 0.9]
    assert Selection(threshold=0.35).flag(scores) == [False, False, False, True, False, False]
    assert Selection(threshold=0.35, inclusive=True).flag(scores) == [False, True, False, True, True, False]
    assert Selection(num_layers=2).flag(scores) == [False, True, False, True, False, False]  # tie -> model order
    assert Selection(num_layers=99).flag(scores) == [True, True, False, True, True, True]
    ten = [i / 10 for i in range(10)]
    assert sum(Selection(fraction=0.3).flag(ten)) == 3  # not ceil(3.0000000000000004)
    assert sum(Selection(fraction=0.31).flag(ten)) == 4
    assert sum(Selection(fraction=1e-10).flag(ten)) == 1  # any fraction > 0 flags ceil(F x n) >= 1
    assert sum(Selection(fraction=0.2000000001).flag(ten)) == 3
    assert sum(Selection(fraction=np.float64(0.3)).flag(ten)) == 3  # a numpy scalar from the Python API
    assert sum(Selection(fraction=0.4).flag(scores)) == 2  # ceil(0.4 x 5 defined scores); of all 6 it would be 3
    assert Selection(num_layers=np.int64(2)).flag(scores) == Selection(num_layers=2).flag(scores)
    # a float32 threshold is the number it holds, compared in float64 (not the score cast to float32)
    assert Selection(threshold=np.float32(0.2)).flag([0.2000000020, 0.2000000040]) == [True, False]
    assert all(type(f) is bool for f in Selection(threshold=np.float64(0.35)).flag(scores))
    # beyond float's range: the range's one line, not an OverflowError from the conversion (review150)
    for kw in ({"threshold": 10 ** 400}, {"fraction": Fraction(10 ** 400, 3)}):
        with pytest.raises(ValueError, match="must lie in"):
            Selection(**kw)
    # the Python API's wrong types: one ValueError when built, not a TypeError when flagging
    for kw, msg in (({"num_layers": 2.5}, "num_layers must be a whole number; got 2.5"),
                    ({"num_layers": True}, "num_layers must be a whole number; got True"),
                    ({"threshold": "0.3"}, "threshold must be a number; got '0.3'"),
                    ({"fraction": np.bool_(True)}, "fraction must be a number")):
        with pytest.raises(ValueError, match=msg):
            Selection(**kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sums_that_lost_their_digits_are_an_error_not_a_score(backend):
    """Weights near 1e-20 make fp32's P = V T subnormal: the sums have lost their digits, which is
    an error, not a score (T and P below fp32's full precision are caught before any cosine)."""
    g = torch.Generator().manual_seed(14)
    base = torch.randn(40, 70, generator=g, dtype=torch.float64) * 0.02  # weights of 0.02, V of 0.002
    wa, wu = ((base + 0.002 * torch.randn(40, 70, generator=g, dtype=torch.float64)) * 1e-20).float(), (base * 1e-20).float()
    A, B = torch.randn(4, 70, generator=g) * 0.1, torch.randn(40, 4, generator=g) * 0.1
    with pytest.raises(FloatingPointError, match="lost their precision"):
        ops.subspace_score(wa, wu, lora_A=A, lora_B=B, backend=backend)
    want = ref_cosine(wa * 1e20, wu * 1e20, B @ A)  # (the same layer at a scale fp32 keeps)
    assert abs(ops.subspace_score(wa * 1e20, wu * 1e20, lora_A=A, lora_B=B, backend=backend).cosine - want) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_an_update_along_v_itself_scores_1_never_more(backend):
    """V = u v^T and dW = V (a LoRA update B = u, A = v, or a full one): rho = 1 exactly; the fp32
    sums land within 1e-6 either side, and a cosine is never above 1."""
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        u, v = torch.randn(48, 1, generator=g), torch.randn(1, 40, generator=g)
        wu = torch.randn(48, 40, generator=g)
        wa = wu + u @ v
        for kw in ({"lora_A": v, "lora_B": u}, {"delta": wa - wu}):
            c = ops.subspace_cosine(wa, wu, **kw, backend=backend)
            assert abs(c - 1.0) < 1e-6 and c <= 1.0, (seed, sorted(kw), repr(c))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_cosine_beyond_rounding_is_an_error_and_within_rounding_is_clamped(backend, monkeypatch):
    """A raw cosine of 1 + 1e-4 (fp32 rounding) is returned as 1.0; one of 1.01 means the sums lost
    their digits: an error, not a score clamped to 1."""
    from safemerge_ext import reference

    impl = backends.resolve(backend, "cpu")[1]
    real = getattr(impl, "lowrank_traces", reference.lowrank_traces)
    g = torch.Generator().manual_seed(40)
    u, v = torch.randn(48, 1, generator=g), torch.randn(1, 40, generator=g)
    wu = torch.randn(48, 40, generator=g)
    wa = wu + u @ v  # rho = 1
    for factor, raises in ((1 + 1e-4, False), (1.01, True)):
        def scaled(*a, f=factor):
            inner, n2, d2 = real(*a)
            return inner * f, n2, d2

        monkeypatch.setattr(impl, "lowrank_traces", scaled, raising=False)
        if raises:
            with pytest.raises(FloatingPointError, match="lost their precision"):
                ops.subspace_score(wa, wu, lora_A=v, lora_B=u, backend=backend)
        else:
            assert ops.subspace_cosine(wa, wu, lora_A=v, lora_B=u, backend=backend) == 1.0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_score_carries_the_norms_behind_it(backend):
    """Score.v_norm = ||V||, Score.delta_norm = ||dW|| (of B A as given: no adapter scaling here)."""
    wa, wu, A, B = inputs(seed=30)
    V = wa.double() - wu.double()
    for kw, dW in (({"lora_A": A, "lora_B": B}, B.double() @ A.double()), ({"delta": B @ A}, (B @ A).double())):
        s = ops.subspace_score(wa, wu, **kw, backend=backend)
        assert math.isclose(s.v_norm, float(V.norm()), rel_tol=1e-6), s
        assert math.isclose(s.delta_norm, float(dW.norm()), rel_tol=1e-5), s


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_tiny_v_with_a_large_update_is_scored(backend):
    """V of 1e-22 (its squares below fp32's range) with an update of 1e17: every product the score
    needs is in fp32's normal range (V^T dW ~ 1e-4, V V^T dW ~ 1e-26), so the layer is scored;
    only the squares of V and dW need float64."""
    g = torch.Generator().manual_seed(1)
    wu = torch.randn(40, 60, generator=g) * 1e-21
    wa = wu + torch.randn(40, 60, generator=g) * 1e-22
    dW = torch.randn(40, 60, generator=g) * 1e17
    s = ops.subspace_score(wa, wu, delta=dW, backend=backend)
    assert s.reason is None and abs(s.cosine - ref_cosine(wa, wu, dW)) < 1e-5, s
    assert abs(s.v_norm - float((wa.double() - wu.double()).norm())) < 1e-5 * s.v_norm


@pytest.mark.parametrize("backend", CPU_BACKENDS + [n for n in ("triton",) if backends.available_backends()[n] is None])
@pytest.mark.parametrize("v, b", [(1e-23, 1e22), (1e-24, 1e30), (1e18, 1e-19)], ids=["tiny-V", "tinier-V", "huge-V"])
def test_norms_of_v_beyond_fp32_squares_are_exact_on_every_backend(backend, v, b):
    """||V||^2 from fp32 squares: V ~ 1e-23 gave Safe LoRA's C B 2.7x too large on the C++ and
    Triton backends (no error), V ~ 1e-24 an error, V ~ 1e18 an error on some CPUs' builds only
    (review145). Every product the ops need is in fp32's range; ||V|| and ||dW|| are summed again
    in float64 where their fp32 squares cannot be trusted: scores, norms and projections match
    float64 on every backend."""
    g = torch.Generator().manual_seed(21)
    wu = torch.randn(70, 90, generator=g) * v * 10
    wa = wu + torch.randn(70, 90, generator=g) * v
    A, B = torch.randn(4, 90, generator=g), torch.randn(70, 4, generator=g) * b
    V = wa.double() - wu.double()
    for kw, dW in (({"lora_A": A, "lora_B": B}, B.double() @ A.double()), ({"delta": (B @ A)}, (B @ A).double())):
        s = ops.subspace_score(wa, wu, **kw, backend=backend, with_projection="lora_A" in kw)
        assert s.reason is None and abs(s.cosine - ref_cosine(wa, wu, dW)) < 1e-5, (kw.keys(), s)
        assert s.v_norm == pytest.approx(float(V.norm()), rel=1e-5)
        assert s.delta_norm == pytest.approx(float(dW.norm()), rel=1e-5)
    want = ref_project(wa, wu, B)
    for got in (ops.project_lora_B(wa, wu, B, backend=backend),
                ops.subspace_score(wa, wu, lora_A=A, lora_B=B, backend=backend, with_projection=True).projected_B):
        assert float((got.double() - want).norm()) < 1e-5 * float(want.norm())
    want = ref_project(wa, wu, (B @ A).double())
    got = ops.project_delta(wa, wu, B @ A, backend=backend)
    assert float((got.double() - want).norm()) < 1e-5 * float(want.norm())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_identical_weights_are_compared_not_summed_again(backend, monkeypatch):
    """V = 0 sums to 0 on every backend: one comparison of the pair says so, not a float64 sum of
    it too (that made V = 0 layers 4x slower; review150)."""
    from safemerge_ext import reference

    g = torch.Generator().manual_seed(3)
    w = torch.randn(50, 40, generator=g)
    A, B = torch.randn(2, 40, generator=g), torch.randn(50, 2, generator=g)
    import types

    spy = types.SimpleNamespace(**{k: getattr(reference, k) for k in dir(reference) if not k.startswith("__")})
    spy._vsq = lambda *a: pytest.fail("||V||^2 summed again")
    monkeypatch.setattr(ops, "reference", spy)  # (what ops itself calls; the backends keep theirs)
    for kw in ({"lora_A": A, "lora_B": B}, {"delta": B @ A}):
        s = ops.subspace_score(w, w.clone(), **kw, backend=backend)
        assert math.isnan(s.cosine) and "V = 0" in s.reason or "identical" in s.reason, s


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tiny_but_nonzero_v_or_update_is_never_called_zero(backend):
    """Entries below about 1e-19 square to 0 in fp32: a V or an update made of them is not zero,
    so it gets a score or an error, never "identical" / "the update is zero"."""
    g = torch.Generator().manual_seed(15)
    wu = torch.randn(30, 50, generator=g) * 1e-21
    wa = wu + torch.randn(30, 50, generator=g) * 1e-22
    A, B = torch.randn(3, 50, generator=g), torch.randn(30, 3, generator=g)
    assert not torch.equal(wa, wu)
    want = ref_cosine(wa, wu, B @ A)
    for kw in ({"lora_A": A, "lora_B": B}, {"delta": B @ A}):
        try:
            s = ops.subspace_score(wa, wu, **kw, backend=backend)
        except FloatingPointError as exc:
            assert "lost their precision" in str(exc)
        else:
            assert s.reason is None and abs(s.cosine - want) < 1e-5, (s, want)
    wa, wu = torch.randn(30, 50, generator=g), torch.randn(30, 50, generator=g)
    tiny = torch.randn(30, 50, generator=g, dtype=torch.float64) * 1e-25
    want = ref_cosine(wa, wu, tiny)
    try:
        s = ops.subspace_score(wa, wu, delta=tiny.float(), backend=backend)
    except FloatingPointError as exc:
        assert "lost their precision" in str(exc)
    else:
        assert s.reason is None and abs(s.cosine - want) < 1e-5, (s, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_factors_that_cancel_give_no_score(backend):
    """B = [b, b/10], A = [a/10; -a]: B A is rounding noise next to unit-size factors. The sums
    cannot tell noise from an update: the layer is an error that names the cancelling factors, or
    an update of zero; never a cosine made of noise."""
    g = torch.Generator().manual_seed(16)
    wa, wu = torch.randn(40, 60, generator=g), torch.randn(40, 60, generator=g)
    a, b = torch.randn(1, 60, generator=g), torch.randn(40, 1, generator=g)
    B, A = torch.cat([b, b / 10], 1), torch.cat([a / 10, -a], 0)
    try:
        s = ops.subspace_score(wa, wu, lora_A=A, lora_B=B, backend=backend)
    except FloatingPointError as exc:
        assert "factors cancel" in str(exc)
    else:
        assert math.isnan(s.cosine) and s.reason == "the update is zero", s


@pytest.mark.parametrize("backend", CPU_BACKENDS + [n for n in ("triton",) if backends.available_backends()[n] is None])
@pytest.mark.parametrize("shape", [(256, 192), (130, 300)])
def test_factors_that_nearly_cancel_are_scored_or_refused(backend, shape):
    """B = [b, b + eps e], A = [a; -a]: B A = -eps e a is a real update, eps/2 of its factors. The fp32
    T = V^T B rounds relative to B, not to B A: the cosine drifted by about 2^-26 / (eps/2) (3e-7:
    0.35 for 0.29, a flag flipped; review145). Down to 2^-20 of the factors it is scored as the
    product of factors that do not cancel; below, it is an error, never a cosine made of noise."""
    g = torch.Generator().manual_seed(shape[0])
    d_out, d_in = shape
    wu = torch.randn(d_out, d_in, generator=g) * 0.02
    wa = wu + 0.002 * torch.randn(d_out, d_in, generator=g)
    b, e = torch.randn(d_out, 1, generator=g), torch.randn(d_out, 1, generator=g)
    a = torch.randn(1, d_in, generator=g)
    for eps in (1e-2, 1e-4, 1e-5):
        B, A = torch.cat([b, b + eps * e], 1), torch.cat([a, -a], 0)
        want = ref_cosine(wa, wu, B.double() @ A.double())
        s = ops.subspace_score(wa, wu, lora_A=A, lora_B=B, backend=backend)
        assert s.reason is None and abs(s.cosine - want) < 1e-5, (eps, s, want)
        assert s.delta_norm == pytest.approx(float((B.double() @ A.double()).norm()), rel=1e-5)
        for dtype in (torch.bfloat16, torch.float16):  # (factors read in their own dtype)
            Bh, Ah = B.to(dtype), A.to(dtype)
            want = ref_cosine(wa, wu, Bh.double() @ Ah.double())
            assert abs(ops.subspace_cosine(wa, wu, lora_A=Ah, lora_B=Bh, backend=backend) - want) < 1e-5
    for eps in (1e-6, 3e-8):
        B, A = torch.cat([b, b + eps * e], 1), torch.cat([a, -a], 0)
        with pytest.raises(FloatingPointError, match="the update's factors cancel: .* rebuild the adapter"):
            ops.subspace_score(wa, wu, lora_A=A, lora_B=B, backend=backend)
    B, A = torch.cat([b, b], 1), torch.cat([a, -a], 0)  # (exactly zero)
    s = ops.subspace_score(wa, wu, lora_A=A, lora_B=B, backend=backend)
    assert math.isnan(s.cosine) and s.reason == "the update is zero"
    # exactly zero at rank 2 too (PEFT's add_weighted_adapter([x, x], [1, -1], "cat")): the backend's
    # ||B A||^2 is then its rounding, of either sign, and the C++ one's positive noise was refused as
    # factors that cancel, for some draws (review178)
    for _ in range(8):
        b2, a2 = torch.randn(d_out, 2, generator=g), torch.randn(2, d_in, generator=g)
        s = ops.subspace_score(wa, wu, lora_A=torch.cat([a2, -a2], 0), lora_B=torch.cat([b2, b2], 1), backend=backend)
        assert math.isnan(s.cosine) and s.reason == "the update is zero" and s.delta_norm == 0.0, s


@pytest.mark.parametrize("backend", CPU_BACKENDS + [n for n in ("triton",) if backends.available_backends()[n] is None])
@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_an_update_in_the_weakest_directions_of_v_is_scored_in_float64(backend, full, monkeypatch):
    """V with singular values from 1 down to 1e-4 and dW along the weakest one: fp32's rounding of
    V^T dW, relative to ||V||, swamped the signal (0.79 for 0.94, and another value per backend;
    review178). Such a layer is scored again in float64; an update that meets V's directions as
    any real one does (1% of it elsewhere) is not, and is right in fp32."""
    from safemerge_ext import reference

    g = torch.Generator().manual_seed(11)
    d_out, d_in = 64, 96
    U, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))
    W, _ = torch.linalg.qr(torch.randn(d_in, d_out, generator=g, dtype=torch.float64))
    wa = ((U * torch.logspace(0, -4, d_out, dtype=torch.float64)) @ W.t()).float()
    wu = 0.01 * torch.randn(d_out, d_in, generator=g)
    wa += wu  # (V = wa - wu up to fp32 rounding; the reference reads the same fp32 pair)
    rescored = []
    passes, sums64 = reference.lowrank_passes, reference.fullrank_sums64
    monkeypatch.setattr(reference, "lowrank_passes", lambda *a, **k: rescored.append(k) or passes(*a, **k))
    monkeypatch.setattr(reference, "fullrank_sums64", lambda *a: rescored.append({"dtype": torch.float64}) or sums64(*a))
    for mix, float64 in ((0.0, True), (0.01, False)):
        B = (U[:, -1:] + mix * torch.randn(d_out, 1, generator=g, dtype=torch.float64)).float()
        A = torch.randn(1, d_in, generator=g)
        update = {"delta": B @ A} if full else {"lora_A": A, "lora_B": B}
        want = ref_cosine(wa, wu, (B @ A).double() if full else B.double() @ A.double())
        rescored.clear()
        s = ops.subspace_score(wa, wu, backend=backend, **update)
        assert abs(s.cosine - want) < 1e-6, (mix, s.cosine, want)
        assert [k.get("dtype") for k in rescored if k.get("dtype") == torch.float64] == [torch.float64] * float64


def test_backend_reasons_follow_the_environment(monkeypatch):
    """An unavailable backend's reason is asked again each time (Triton's follows TRITON_INTERPRET
    until triton is imported), and TRITON_INTERPRET is parsed as triton parses it (no stripping)."""
    import types

    calls = []
    fake = types.ModuleType("fake_backend")
    fake.unavailable_reason = lambda: calls.append(1) or ("off" if len(calls) == 1 else None)
    monkeypatch.setitem(__import__("sys").modules, "fake_backend", fake)
    spec = backends.BackendSpec("fake", "fake_backend", ("cpu",))
    monkeypatch.delitem(backends._loaded, "fake", raising=False)
    assert backends._load(spec) == "off" and backends._load(spec) is fake and backends._load(spec) is fake
    # a check that raises (a driver call, say) is a reason too, not a crash of `safemerge backends`
    broken = types.ModuleType("broken_backend")
    broken.unavailable_reason = lambda: 1 / 0
    monkeypatch.setitem(__import__("sys").modules, "broken_backend", broken)
    monkeypatch.delitem(backends._loaded, "broken", raising=False)
    spec = backends.BackendSpec("broken", "broken_backend", ("cpu",))
    assert backends._load(spec) == "checking it failed: ZeroDivisionError: division by zero"
    # before triton is imported the variable is read, as triton parses it (no stripping); once it
    # is (the Triton tests import it at collection), its knob: hide it for the first check
    monkeypatch.delitem(__import__("sys").modules, "triton", raising=False)
    for value, on in ((" 1", False), ("1", True), ("TRUE", True), ("0", False), ("", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert backends.triton_interpret_enabled() is on, value


_BROKEN_TRITON = r"""
import json, sys
import torch
torch.cuda.is_available = lambda: True  # (a GPU machine whose triton cannot load)
sys.path.insert(0, sys.argv[1])
from safemerge_ext import backends
before = backends.available_backends()["triton"]
imported = "triton" in sys.modules
if sys.argv[2] == "list":  # what `safemerge backends` shows
    print(json.dumps({"before": before, "imported": imported, "listed": backends.available_backends(load=True)["triton"]}))
else:
    name, _ = backends.resolve("auto", "cuda")
    print(json.dumps({"before": before, "imported": imported, "auto": name, "triton": backends.available_backends()["triton"]}))
"""


def test_auto_goes_past_a_triton_that_fails_to_import(tmp_path):
    """On a CUDA device `auto` prefers Triton, but an install that fails to import (one built for
    another CUDA, say) is a reason like any other once `auto` tries to load it: `auto` takes the
    next backend, and the backends' list names the error from then on, as `safemerge backends`
    (which loads what it lists) does. (The cheap check imports nothing: importing triton would fix
    its interpreter mode for the process.)"""
    import subprocess
    import sys

    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("raise ImportError('libcuda.so.1: cannot open shared object file')\n")
    env = {**__import__("os").environ, "TRITON_INTERPRET": "0", "SAFEMERGE_BACKEND": "auto"}
    why = "triton failed to import: ImportError: libcuda.so.1: cannot open shared object file"
    for mode in ("auto", "list"):
        done = subprocess.run([sys.executable, "-c", _BROKEN_TRITON, str(tmp_path), mode], capture_output=True, text=True,
                              env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        got = json.loads(done.stdout.strip().splitlines()[-1])
        assert got["before"] is None and not got["imported"]
        if mode == "auto":
            assert got["auto"] != "triton" and got["triton"] == why
        else:
            assert got["listed"] == why


_NO_COMPILER = r"""
import json, sys
import torch
torch.cuda.is_available = lambda: True  # (a GPU machine without a C compiler)
from safemerge_ext import backends
name, _ = backends.resolve("auto", "cuda")
print(json.dumps({"auto": name, "triton": backends.available_backends()["triton"]}))
"""


def test_auto_goes_past_a_triton_that_cannot_build_its_launcher(tmp_path):
    """triton builds its CUDA launcher with the system's C compiler at the first launch: where it
    cannot (no gcc, no Python headers), `auto` used to pick triton and the run stopped at the first
    layer; loading the backend now sets triton's driver up, and `auto` goes on (review132)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0", "SAFEMERGE_BACKEND": "auto", "CC": str(tmp_path / "no-cc"),
           "TRITON_CACHE_DIR": str(tmp_path / "cache"), "TRITON_LIBCUDA_PATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _NO_COMPILER], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["auto"] != "triton", got
    assert got["triton"].startswith("triton could not set up its CUDA driver (it builds a launcher with gcc, "
                                    "clang or $CC and Python's headers): "), got
    assert "\n" not in got["triton"]


_DISPATCH_ON_A_GPU = r"""
import json
from safemerge_ext import backends
out = {"auto": backends.resolve("auto", "cuda")[0]}
try:
    out["triton"] = backends.resolve("triton", "cuda")[0]
except ValueError as exc:
    out["triton"] = str(exc)
print(json.dumps(out))
"""


@pytest.mark.parametrize("interpret", ["1", "0"])
def test_auto_never_picks_the_triton_interpreter_on_a_gpu(interpret):
    """A TRITON_INTERPRET=1 left in the environment (from running the tests, say) would make
    `auto` run a GPU's scoring through triton's CPU interpreter: `auto` leaves interpreted kernels
    to be asked for by name (and takes the CUDA extension or torch). When an explicit backend
    cannot run, the names offered instead are those that run on that device (not cpp for CUDA
    tensors)."""
    import subprocess
    import sys

    env = {**__import__("os").environ, "TRITON_INTERPRET": interpret, "SAFEMERGE_BACKEND": "auto"}
    done = subprocess.run([sys.executable, "-c", _DISPATCH_ON_A_GPU], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    if interpret == "1":
        assert got["auto"] != "triton" and got["triton"] == "triton"  # asked for by name, it runs interpreted
        return
    if torch.cuda.is_available():
        pytest.skip("a GPU machine: Triton runs compiled here, as auto's first choice")
    assert got["auto"] == "torch"  # (no GPU: neither the CUDA extension nor compiled Triton runs)
    assert got["triton"].startswith("backend must be one of torch; 'triton' is unavailable: "), got["triton"]


def test_combine_full_keeps_float64_updates_in_float64():
    """A float64 model's updates are merged in float64 (fp32 would cost 1e-7 of dW); fp32 and
    half-precision updates in fp32."""
    from safemerge_ext.merge import combine_full

    g = torch.Generator().manual_seed(18)
    a, b = (torch.randn(20, 30, generator=g, dtype=torch.float64) for _ in range(2))
    got = combine_full(a, b, alpha=0.7, method="linear", density=1.0, seed=0, module="m")
    assert got.dtype == torch.float64 and float((got - (0.7 * a + (1 - 0.7) * b)).abs().max()) < 1e-14
    assert combine_full(a.bfloat16(), b.float(), alpha=0.7, method="ties", density=0.5, seed=0,
                        module="m").dtype == torch.float32
    # the linear merge of factors too: [alpha s_f B_f, (1 - alpha) s_s B_s] @ [A_f; A_s]
    from safemerge_ext.merge import concat_lora

    Bf, Af, Bs, As = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((20, 3), (3, 30), (20, 5), (5, 30)))
    B, A = concat_lora(Bf, Af, 0.3, Bs, As, 1.7, 0.7)
    want = 0.7 * 0.3 * Bf @ Af + 0.3 * 1.7 * Bs @ As
    assert B.dtype == A.dtype == torch.float64 and float((B @ A - want).abs().max()) < 1e-14
    assert concat_lora(Bf.half(), Af.half(), 0.3, Bs.float(), As.float(), 1.7, 0.7)[0].dtype == torch.float32


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_truncated_factors_of_a_large_update_are_near_the_best(monkeypatch, method, dtype):
    """ties/dare written as an adapter keep r_task + r_safety components of the merged update. A
    full SVD of a large one took minutes (396 s for one 28672x8192 module, review187): above
    EXACT_SVD_MAX_SIDE (lowered here) a seeded randomized SVD gives factors whose error is the best
    rank-k error to 1e-3 of itself, reports that error as it is, and is the same run to run; a
    small update still gets the exact SVD."""
    from safemerge_ext import merge as merging

    g = torch.Generator().manual_seed(31)
    m, n, rt, rs = 600, 400, 8, 6
    Bt, At, Bs, As = (torch.randn(*shape, generator=g, dtype=dtype) * 0.05
                      for shape in ((m, rt), (rt, n), (m, rs), (rs, n)))
    dW = merging.combine_full(Bt @ At, Bs @ As, alpha=0.7, method=method, density=0.5, seed=2, module="m")
    U, S, Vh = torch.linalg.svd(dW.double(), full_matrices=False)
    k = rt + rs
    best = math.sqrt(float(S[k:].square().sum() / S.square().sum()))
    exact = merging.truncated_factors(dW, k)
    assert abs(exact[2] - best) <= 1e-6 * best
    monkeypatch.setattr(merging, "EXACT_SVD_MAX_SIDE", 64)
    B, A, rel = merging.truncated_factors(dW, k, seed=2, module="layers.0.q_proj")
    assert B.shape == (m, k) and A.shape == (k, n) and B.dtype == A.dtype == dtype
    actual = float((dW.double() - B.double() @ A.double()).norm() / dW.double().norm())
    # (DARE's pruning leaves no gap between the kept and the dropped singular values here, the
    # hardest case for a sketch: 4e-4 off the best; ties, with its gap, 1e-6)
    assert abs(rel - actual) <= 1e-5 * actual and best <= actual * (1 + 1e-6) and actual <= best * (1 + 1e-3)
    again = merging.truncated_factors(dW, k, seed=2, module="layers.0.q_proj")
    assert torch.equal(again[0], B) and torch.equal(again[1], A) and again[2] == rel
    other = merging.truncated_factors(dW, k, seed=3, module="layers.0.q_proj")  # (another sketch, as good)
    assert not torch.equal(other[0], B) and abs(other[2] - best) <= 1e-3 * best


@pytest.mark.parametrize("noise", [0.0, 3e-5, 3e-4, 1e-3])
def test_randomized_truncation_reports_small_errors_as_they_are(monkeypatch, noise):
    """svd_rel_error of the randomized SVD was ||dW||^2 - sum S_k^2, which the fp32 singular
    values' rounding swamps below about 1e-4: 0 reported for an error of 2.9e-4, 1.08e-3 (over the
    1e-3 warning) for 9.8e-4 (review189). It is the factors' own error, summed in float64."""
    from safemerge_ext import merge as merging

    monkeypatch.setattr(merging, "EXACT_SVD_MAX_SIDE", 64)
    g = torch.Generator().manual_seed(32)
    m, n, k = 700, 500, 16
    low = (torch.randn(m, k, generator=g) @ torch.randn(k, n, generator=g)) / math.sqrt(k)
    dW = low + noise * torch.randn(m, n, generator=g) * float(low.norm()) / math.sqrt(m * n)
    B, A, rel = merging.truncated_factors(dW, k, seed=1, module="m")
    actual = float((dW.double() - B.double() @ A.double()).norm() / dW.double().norm())
    assert abs(rel - actual) <= 1e-6 * actual + 1e-9, (rel, actual)
    assert actual <= noise * 1.01 + 1e-6


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_draws_from_a_generator_of_its_own(method):
    """DARE's mask is PEFT's (merge_utils.dare_* after torch.manual_seed(module_seed), the same bits)
    but drawn from the call's own generator: merges beside a thread drawing from torch's global
    generator are the same, and that thread's numbers do not repeat. Seeding and restoring the
    global generator made both depend on the timing (review174)."""
    import threading

    from peft.utils import merge_utils

    from safemerge_ext.merge import combine_full, module_seed

    g = torch.Generator().manual_seed(20)
    f, s = (torch.randn(96, 80, generator=g) for _ in range(2))
    torch.manual_seed(module_seed(4, "m"))
    peft = getattr(merge_utils, method)([f * 0.8, s * 0.2] if method == "dare_ties" else [f, s],
                                        torch.tensor([1.0, 1.0]) if method == "dare_ties" else torch.tensor([0.8, 0.2]),
                                        0.4)
    alone = combine_full(f, s, alpha=0.8, method=method, density=0.4, seed=4, module="m")
    assert torch.equal(alone, peft)
    stop, drawn = threading.Event(), []

    def draw() -> None:
        while not (stop.is_set() and len(drawn) >= 2000):
            drawn.extend(torch.randint(0, 2**62, (64,)).tolist())

    thread = threading.Thread(target=draw)
    thread.start()
    while not drawn:  # (drawing before the merges begin)
        threading.Event().wait(0.001)
    try:
        beside = [combine_full(f, s, alpha=0.8, method=method, density=0.4, seed=4, module="m") for _ in range(20)]
    finally:
        stop.set()
        thread.join()
    assert all(torch.equal(b, alone) for b in beside)
    assert len(set(drawn)) == len(drawn) >= 2000


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_ties_merges_the_weighted_updates(method):
    """merge(alpha dW_f, (1 - alpha) dW_s): TIES elects each entry's sign on the weighted updates.
    So alpha = 1 gives dW_f and alpha = 0 gives dW_s (at density 1), and in between each entry is the
    mean of the weighted entries that agree with the sign of their sum (float64 reference)."""
    from safemerge_ext.merge import combine_full

    g = torch.Generator().manual_seed(19)
    f, s = (torch.randn(24, 40, generator=g, dtype=torch.float64) for _ in range(2))
    for alpha, want in ((1.0, f), (0.0, s)):
        got = combine_full(f, s, alpha=alpha, method=method, density=1.0, seed=3, module="m")
        assert torch.equal(got, want), (alpha, float((got - want).abs().max()))
    got = combine_full(f, s, alpha=0.8, method=method, density=1.0, seed=3, module="m")
    w = torch.stack([0.8 * f, 0.2 * s])
    agree = w.sign() == torch.where(w.sum(0) >= 0, 1.0, -1.0).double()
    want = (w * agree).sum(0) / agree.sum(0)
    assert float((got - want).abs().max()) < 1e-15
    assert (agree.sum(0) == 1).any() and (agree.sum(0) == 2).any()  # (both cases occur in this draw)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_merges_at_density_1_are_peft_s_without_its_warning(method):
    """At density 1 (the default) nothing is pruned: the same bits as peft's function, without
    the UserWarning it gives at every call that it prunes nothing."""
    import warnings

    from peft.utils import merge_utils

    from safemerge_ext.merge import combine_full

    g = torch.Generator().manual_seed(20)
    f, s = (torch.randn(24, 40, generator=g) for _ in range(2))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = combine_full(f, s, alpha=0.7, method=method, density=1.0, seed=3, module="m")
    assert not [w for w in seen if "density" in str(w.message)], [str(w.message) for w in seen]
    tensors, weights = [f, s], torch.tensor([0.7, 0.3])
    if method.endswith("ties"):
        tensors, weights = [0.7 * f, 0.3 * s], torch.ones(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = getattr(merge_utils, method)(tensors, weights, 1.0)
    assert torch.equal(got, want)


@pytest.mark.parametrize("method", ["linear", "ties", "dare_linear", "dare_ties"])
@pytest.mark.parametrize("shape", [(50, 24), (3, 10, 7), (130,), (5, 0)])
def test_merges_made_a_block_of_rows_at_a_time_are_peft_s_on_the_whole(method, shape, monkeypatch):
    """combine_full prunes each update whole and merges a block of rows at a time (it held the
    merge's stacks and masks whole: 15-16 fp32 copies of a 4096x4096 update); the same bits as
    peft's functions on the whole updates, for many blocks (a block of 40 elements here), tensors
    of other ranks (a 1-D one is one row; an empty one, review193), and magnitudes that tie where
    TIES prunes (values rounded to a tenth)."""
    import warnings

    from peft.utils import merge_utils

    from safemerge_ext import merge as merging

    monkeypatch.setattr(merging, "BLOCK_ELEMS", 40)
    blocks = len(merging.row_blocks(merging.as_rows(torch.empty(shape))))
    assert blocks == {(50, 24): 50, (3, 10, 7): 6, (130,): 1, (5, 0): 1}[shape]
    g = torch.Generator().manual_seed(23)
    f, s = (torch.randn(shape, generator=g).mul(2).round(decimals=1) for _ in range(2))
    for alpha, density in ((0.7, 1.0), (0.7, 0.3), (0.25, 0.55)):
        if method == "linear" and density < 1.0:
            continue
        got = merging.combine_full(f, s, alpha=alpha, method=method, density=density, seed=6, module="m")
        tensors, weights = [f, s], torch.tensor([alpha, 1.0 - alpha])
        if method.endswith("ties"):
            tensors, weights = [alpha * f, (1.0 - alpha) * s], torch.ones(2)
        torch.manual_seed(merging.module_seed(6, "m"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (peft's at density 1: it prunes nothing)
            want = (merge_utils.task_arithmetic(tensors, weights) if method == "linear"
                    else getattr(merge_utils, method)(tensors, weights, density))
        assert got.shape == want.shape and torch.equal(got, want), (alpha, density)
        assert density == 1.0 or not got.numel() or float((got == 0).double().mean()) > 0.1  # (pruned)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_density_is_the_fraction_kept(method):
    """density is the fraction of entries kept (at 0.2, not 0.8): TIES keeps the largest 20% of the
    update unchanged; DARE keeps each entry with probability 0.2, rescaled by 1 / 0.2."""
    from safemerge_ext.merge import combine_full

    g = torch.Generator().manual_seed(31)
    f, s = (torch.randn(64, 80, generator=g, dtype=torch.float64) for _ in range(2))
    got = combine_full(f, s, alpha=1.0, method=method, density=0.2, seed=5, module="m")  # alpha 1: f alone
    kept = got != 0
    if method == "ties":
        assert int(kept.sum()) == int(0.2 * f.numel())
        assert float(f.abs()[kept].min()) >= float(f.abs()[~kept].max())
        assert torch.equal(got[kept], f[kept])
    else:  # (5120 draws: 5 sigma is +-0.028)
        assert abs(float(kept.double().mean()) - 0.2) < 0.03
        assert torch.allclose(got[kept], f[kept] / 0.2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sums_that_underflow_or_overflow_are_named_so(backend):
    """fp32 sums that underflow to zero (V near 1e-30) or overflow (entries near 1e30) from finite
    inputs are the lost-precision error, never a score of 0 ("C dW = 0") nor "NaN or Inf"; a C B
    beyond lora_B's dtype is an error, not inf."""
    g = torch.Generator().manual_seed(21)
    u, v = torch.randn(30, 1, generator=g), torch.randn(1, 50, generator=g)
    wu = torch.randn(30, 50, generator=g)
    for scale in (1e-30, 1e30):  # (the layer's score is 1 at any scale: V = scale u v^T, dW = u v^T)
        wa = scale * wu + scale * (u @ v)
        assert torch.isfinite(wa).all() and not torch.equal(wa, scale * wu)
        for kw in ({"lora_A": v, "lora_B": u}, {"delta": u @ v}):
            with pytest.raises(FloatingPointError, match="lost their precision"):
                ops.subspace_score(wa, scale * wu, **kw, backend=backend)
    with pytest.raises(FloatingPointError, match="lost their precision"):  # (not "identical", not zeros)
        ops.project_lora_B(1e-30 * wu + 1e-30 * (u @ v), 1e-30 * wu, u, backend=backend)
    nan = wu.clone()
    nan[3, 4] = float("nan")
    with pytest.raises(FloatingPointError, match="contain NaN or Inf"):
        ops.subspace_score(nan, wu, lora_A=v, lora_B=u, backend=backend)
    wa = wu + torch.randn(30, 50, generator=g) * 100
    want = ref_project(wa, wu, u * 1e3)
    assert float(want.abs().max()) > 65504  # (beyond fp16)
    with pytest.raises(FloatingPointError, match="C @ lora_B exceeds the range of torch.float16; pass lora_B in float32"):
        ops.project_lora_B(wa, wu, (u * 1e3).half(), backend=backend)
    # float8_e4m3fn saturates at 448 instead of overflowing: the range is checked before the cast
    f8 = (u * 4).to(torch.float8_e4m3fn)
    assert float(ref_project(wa, wu, f8).abs().max()) > 448
    with pytest.raises(FloatingPointError, match="exceeds the range of torch.float8_e4m3fn"):
        ops.project_lora_B(wa, wu, f8, backend=backend)
    small = (u / 64).to(torch.float8_e4m3fn)
    wa = wu + torch.randn(30, 50, generator=g) * 1e-2
    got = ops.project_lora_B(wa, wu, small, backend=backend)
    want = ref_project(wa, wu, small)
    assert got.dtype == torch.float8_e4m3fn and float(want.abs().max()) < 448
    assert ((got.double() - want).abs() <= want.abs() * 2.0 ** -4 + 2.0 ** -10).all()  # (e4m3: 3 mantissa bits)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_products_that_underflow_to_zero_are_an_error_not_a_zero(backend):
    """Where every product of V^T dW lies below fp32's normal range, the sums come out exactly 0:
    that is the lost-precision error, not "C dW = 0" scored 0 (always flagged), and project_delta's
    all-zero or subnormal C dW is that error too, not a projection that deletes the update. A true
    C dW = 0 (disjoint supports: exact zeros at unit scale) still scores 0 and projects to 0."""
    g = torch.Generator().manual_seed(24)
    wu = torch.zeros(64, 48)
    V = torch.randn(64, 48, generator=g)
    A, B = torch.randn(4, 48, generator=g), torch.randn(64, 4, generator=g)
    for wa, kw in ((V * 1e-8, {"delta": (B @ A) * 1e-40}), (V * 1e-20, {"lora_A": A * 1e-30, "lora_B": B * 1e-30})):
        dW = kw["delta"] if "delta" in kw else kw["lora_B"].double() @ kw["lora_A"].double()
        assert abs(ref_cosine(wa, wu, dW)) > 0.3  # (what float64 says: no zero)
        with pytest.raises(FloatingPointError, match="lost their precision"):
            ops.subspace_score(wa, wu, **kw, backend=backend)
    for scale in (1e-22, 1e-30):  # C dW near 1e-22 (subnormal N = V V^T dW), near 1e-30 (N all zero)
        assert float(ref_project(V * scale, wu, B @ A).abs().max()) > 0
        with pytest.raises(FloatingPointError, match="lost their precision"):
            ops.project_delta(V * scale, wu, B @ A, backend=backend)
    u, w = torch.randn(64, 1, generator=g), torch.randn(64, 1, generator=g)
    u[32:], w[:32] = 0, 0
    wa, dW = u @ torch.randn(1, 48, generator=g), w @ A[:1]
    assert ops.subspace_score(wa, wu, lora_A=A[:1], lora_B=w, backend=backend).cosine == 0.0
    assert ops.subspace_score(wa, wu, delta=dW, backend=backend).cosine == 0.0
    assert not ops.project_delta(wa, wu, dW, backend=backend).any()
    assert not ops.project_delta(V, wu, torch.zeros_like(V), backend=backend).any()  # (a zero update: no error)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp16_projection_below_the_normal_range_warns(backend):
    """C B of plausible fp16 adapters (V of 1e-3, B of 1e-3, d = 1024: entries near 6e-6) lies below
    fp16's smallest normal (6.1e-5), where a cast keeps a few bits: project_lora_B says so; in
    float32 lora_B the projection keeps its digits."""
    g = torch.Generator().manual_seed(25)
    wu = torch.randn(1024, 512, generator=g) * 0.02
    wa = wu + torch.randn(1024, 512, generator=g) * 1e-3
    B = (torch.randn(1024, 8, generator=g) * 1e-3).half()
    want = ref_project(wa, wu, B)
    assert float(want.abs().max()) < torch.finfo(torch.float16).tiny
    with pytest.warns(RuntimeWarning, match="below the normal range of torch.float16"):
        got = ops.project_lora_B(wa, wu, B, backend=backend)
    assert got.dtype == torch.float16
    assert float((got.double() - want).norm() / want.norm()) > torch.finfo(torch.float16).eps  # (why it warns)
    exact = ops.project_lora_B(wa, wu, B.float(), backend=backend)
    assert float((exact.double() - want).norm() / want.norm()) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.project_lora_B(wa, wu, (B.float() * 100).half(), backend=backend)  # (normal range: no warning)


def test_sparse_tensors_and_wrong_selection_types_are_named():
    wa, wu, A, B = inputs()
    for kw in ({"delta": (B @ A).to_sparse()}, {"lora_A": A, "lora_B": B.to_sparse()}):
        with pytest.raises(ValueError, match="is a sparse tensor .*pass a dense one"):
            ops.subspace_score(wa, wu, **kw, backend="torch")
    with pytest.raises(ValueError, match="w_aligned is a sparse tensor"):
        ops.project_lora_B(wa.to_sparse(), wu, B, backend="torch")
    from safemerge_ext import pipeline
    with pytest.raises(TypeError, match="selection must be a Selection, e.g. Selection"):
        pipeline.project("a", "u", "ad", "out", 0.3)
    with pytest.raises(TypeError, match="settings must be a MergeSettings"):
        pipeline.merge("a", "u", "t", "s", "out", Selection(threshold=0.3))
    with pytest.raises(TypeError, match="selection must be a Selection"):
        pipeline.MergeSettings(0.35)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float64_weights_form_v_before_rounding(backend):
    """float64 weights whose difference lies below fp32's rounding of each: V is formed in float64,
    then scored in fp32 (rounding each weight to fp32 first scored another V: 0.51 for 0.12)."""
    g = torch.Generator().manual_seed(22)
    wu = torch.randn(40, 60, generator=g, dtype=torch.float64)
    wa = wu + 1e-9 * torch.randn(40, 60, generator=g, dtype=torch.float64)
    A, B = torch.randn(4, 60, generator=g, dtype=torch.float64), torch.randn(40, 4, generator=g, dtype=torch.float64)
    s = ops.subspace_score(wa, wu, lora_A=A, lora_B=B, backend=backend, with_projection=True)
    assert abs(s.cosine - ref_cosine(wa, wu, B @ A)) < 1e-5
    assert abs(s.v_norm - float((wa - wu).norm())) < 1e-5 * s.v_norm
    want = ref_project(wa, wu, B)
    for got in (s.projected_B, ops.project_lora_B(wa, wu, B, backend=backend)):
        assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-5, what="C B")
    assert abs(ops.subspace_cosine(wa, wu, delta=B @ A, backend=backend) - ref_cosine(wa, wu, B @ A)) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float8_factors_and_updates_are_scored(backend):
    g = torch.Generator().manual_seed(23)
    wu = torch.randn(40, 60, generator=g)
    wa = wu + 0.1 * torch.randn(40, 60, generator=g)
    A, B = torch.randn(4, 60, generator=g), torch.randn(40, 4, generator=g)
    A8, B8 = A.to(torch.float8_e4m3fn), B.to(torch.float8_e4m3fn)
    want = ref_cosine(wa, wu, B8.double() @ A8.double())
    assert abs(ops.subspace_cosine(wa, wu, lora_A=A8, lora_B=B8, backend=backend) - want) < 1e-5
    assert abs(ops.subspace_cosine(wa, wu, delta=(B8.float() @ A8.float()).to(torch.float8_e5m2), backend=backend)
               - ref_cosine(wa, wu, (B8.float() @ A8.float()).to(torch.float8_e5m2).double())) < 1e-5


def test_what_is_not_a_tensor_is_one_line():
    import numpy as np

    wa, wu, A, B = inputs()
    calls = [
        (lambda: ops.subspace_score(wa.tolist(), wu, lora_A=A, lora_B=B), "w_aligned must be a torch.Tensor; got list"),
        (lambda: ops.subspace_score(wa, wu.numpy(), lora_A=A, lora_B=B), "w_unaligned must be a torch.Tensor; got ndarray"),
        (lambda: ops.subspace_score(wa, wu, lora_A=A.numpy(), lora_B=B), "lora_A must be a torch.Tensor; got ndarray"),
        (lambda: ops.subspace_score(wa, wu, delta=np.zeros(wa.shape)), "delta must be a torch.Tensor; got ndarray"),
        (lambda: ops.project_lora_B(wa, wu, B.tolist()), "lora_B must be a torch.Tensor; got list"),
        (lambda: ops.project_delta(wa, wu, 3.0), "delta must be a torch.Tensor; got float"),
    ]
    for call, msg in calls:
        with pytest.raises(ValueError, match=msg + r" \(convert it with torch.as_tensor\)$"):
            call()


def test_backend_requested_auto_from_the_environment_is_plain_auto(monkeypatch):
    """SAFEMERGE_BACKEND=auto chose nothing: the report records plain 'auto'."""
    for value in ("auto", " AUTO "):
        monkeypatch.setenv("SAFEMERGE_BACKEND", value)
        assert backends.requested_backend(None) == "auto"
        assert backends.requested_backend("auto") == "auto"
    monkeypatch.setenv("SAFEMERGE_BACKEND", "torch")
    assert backends.requested_backend(None) == "torch (SAFEMERGE_BACKEND)"
    assert backends.requested_backend("auto", honour_env=False) == "auto"


def test_the_backends_offered_instead_run_on_that_device(monkeypatch):
    """An explicit backend that cannot run on the device offers only those `auto` would
    run there: never Triton (CUDA-only, interpreted only by name) for mps or cuda tensors of cpp."""
    monkeypatch.delenv("SAFEMERGE_BACKEND", raising=False)
    for device in ("mps", "meta"):
        with pytest.raises(ValueError) as err:
            backends.resolve("cpp", device)
        assert str(err.value).endswith("another backend (torch)"), str(err.value)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_default_device_the_program_set_does_not_reach_cpu_tensors(backend):
    """review196: under torch.set_default_device (meta stands in for cuda), the C++ backend made its
    T and P there and handed their addresses to the kernel ("null data pointer"; on a GPU, device
    addresses). CPU tensors are scored on the CPU, with the same bits as without it."""
    wa, wu, A, B = inputs(48, 40, 5, seed=21)
    dW = B @ A

    def run():
        return [ops.subspace_cosine(wa, wu, lora_A=A, lora_B=B, backend=backend),
                ops.subspace_cosine(wa, wu, delta=dW, backend=backend),
                ops.project_lora_B(wa, wu, B, backend=backend), ops.project_delta(wa, wu, dW, backend=backend)]

    plain = run()
    with torch.device("meta"):
        moved = run()
    assert moved[:2] == plain[:2]
    for got, want in zip(moved[2:], plain[2:]):
        assert got.device.type == "cpu" and torch.equal(got, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_projection_of_lora_b_that_underflowed_to_zero_is_an_error(backend):
    """review196: where V^T B's terms all lie below fp32's range (weights near 1e-16 and B near 1e-31,
    or a float64 B below fp32's range) the projection came back all zero without a word, where
    project_delta and the score on the same layer raise. A B that V^T truly sends to zero, or a zero
    B, still projects to zero."""
    g = torch.Generator().manual_seed(22)
    wa = (torch.randn(40, 24, generator=g) * 2.0 ** -54).bfloat16()
    wu = (wa.float() + 2.0 ** -57 * torch.randn(40, 24, generator=g)).bfloat16()
    B = torch.randn(40, 3, generator=g)
    for tiny in (B * 2.0 ** -102, B.double() * 1e-50):
        with pytest.raises(FloatingPointError, match="lost their precision"):
            ops.project_lora_B(wa, wu, tiny, backend=backend)
    with pytest.raises(FloatingPointError, match="lost their precision"):  # (as project_delta does)
        ops.project_delta(wa, wu, B.double() * 1e-50 @ torch.randn(3, 24, generator=g, dtype=torch.float64),
                          backend=backend)
    wa, wu, _, _ = inputs(40, 24, 3, seed=23)
    null = torch.linalg.svd((wa - wu).double()).U[:, 24:27]  # (V^T sends 16 of the 40 directions to zero)
    out = ops.project_lora_B(wa, wu, torch.zeros(40, 3), backend=backend)
    assert out.shape == (40, 3) and not out.any()
    out = ops.project_lora_B(wa, wu, null.float(), backend=backend)
    assert float(out.abs().max()) < 1e-6, float(out.abs().max())
