"""The Triton backend (safemerge_ext.kernels) against float64 references.

Without a CUDA device the kernels run on CPU tensors through triton's interpreter: TRITON_INTERPRET
is set here before anything imports triton (triton reads it when a kernel is decorated), the kernel
modules are imported, and the variable is put back as it was; every test here sets it again for its
own duration (the interpreter reads it at launch too). So the rest of a one-process suite sees the
backend as this machine offers it, not as this module needs it. With a GPU the same small cases run compiled on it, and the `gpu`
tests add Llama-sized shapes.

Every input dtype is widened exactly to fp32 before the subtraction and all products accumulate
in fp32, so one fp32-accumulation tolerance (relative to the largest reference value) serves
fp32, fp16 and bf16 inputs alike; the references see the same stored values in float64.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

import pytest  # noqa: E402

from numerics import DTYPES, assert_close, ref_cosine, ref_fullrank, ref_lowrank_passes, ref_project  # noqa: E402
from numerics import case_seed as _seed  # noqa: E402
from numerics import drifted_pair  # noqa: E402
from safemerge_ext import backends, ops  # noqa: E402

_ENV = "TRITON_INTERPRET"
_saved_env = os.environ.get(_ENV)
if not torch.cuda.is_available():
    os.environ.setdefault(_ENV, "1")
try:
    pytest.importorskip("triton")
    import safemerge_ext.kernels as tk

    REASON = tk.unavailable_reason()
    if REASON is None:  # decorate the kernels now, in the mode chosen above
        from safemerge_ext.kernels import _launch, fullrank, lowrank
finally:
    if _saved_env is None:
        os.environ.pop(_ENV, None)
    else:
        os.environ[_ENV] = _saved_env
if REASON is not None:
    pytest.skip(f"triton backend unavailable: {REASON}", allow_module_level=True)

INTERPRETED = _launch.is_interpreted(lowrank._vt_b_kernel)
DEVICE = "cpu" if INTERPRETED else "cuda"
# Interpreted kernels calling triton's own helpers compiled-mode fail with "Cannot call
# @triton.jit'd outside of the scope of a kernel": say what happened instead.
_helper = getattr(sys.modules.get("triton.language.standard"), "_sum_combine", None)
if INTERPRETED and _helper is not None and not _launch.is_interpreted(_helper):
    pytest.fail("triton was imported before TRITON_INTERPRET=1 was set (by an earlier test module or a "
                "conftest): set TRITON_INTERPRET=1 for the whole run or run this file alone", pytrace=False)
TOL = 2e-5  # fp32 accumulation over <= 256 terms, relative to the largest reference value
COS_TOL = 1e-5

SHAPES = [(64, 48), (67, 131), (96, 200), (128, 128)]
SHAPE_IDS = [f"shape={a}x{b}" for a, b in SHAPES]
DTYPE_PARAMS = pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=[f"dtype={k}" for k in DTYPES])
needs_gpu = pytest.mark.skipif(
    INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA device with compiled (not interpreted) Triton"
)


def _layer(d_out: int, d_in: int, dtype: torch.dtype, seed: int, device: str = DEVICE):
    """An aligned/unaligned pair that differs by a small update, as fine-tuned weights do."""
    wa, wu, g = drifted_pair(d_out, d_in, dtype, seed)
    return wa.to(device), wu.to(device), g


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = TOL) -> None:
    scale = float(expected.abs().max()) or 1.0
    assert_close(actual, expected, atol=tol * scale, rtol=tol, what=what)


def _rel(actual: float, expected: float, what: str, tol: float = TOL) -> None:
    assert abs(actual - expected) <= tol * abs(expected), f"{what}: got {actual!r}, want {expected!r}"


@pytest.fixture(autouse=True)
def interpreter_env(monkeypatch):
    """TRITON_INTERPRET=1 again for each test here when the kernels run in the interpreter."""
    if INTERPRETED:
        monkeypatch.setenv(_ENV, "1")


@pytest.fixture
def triton_registry(monkeypatch):
    """Let the registry hand out the Triton backend for DEVICE tensors (it lists only cuda today)."""
    specs = tuple(
        backends.BackendSpec(s.name, s.module, tuple(dict.fromkeys(s.devices + (DEVICE,))))
        if s.name == "triton" else s
        for s in backends._SPECS
    )
    monkeypatch.setattr(backends, "_SPECS", specs)
    monkeypatch.setattr(backends, "_loaded", {})


# --- backend module ------------------------------------------------------------------------

def test_kernels_match_the_mode():
    assert _launch.is_interpreted(lowrank._vt_b_kernel) == INTERPRETED
    assert _launch.is_interpreted(fullrank._vt_dw_kernel) == INTERPRETED


def test_import_needs_neither_triton_nor_cuda():
    code = (
        "import sys, torch, safemerge_ext.kernels as k\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "k.unavailable_reason()\n"
        "assert 'triton' not in sys.modules, 'triton imported by the probe'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
        "assert callable(k.lowrank_passes) and k.NAME == 'triton'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_unavailable_reasons(monkeypatch):
    assert tk.unavailable_reason() is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = tk.unavailable_reason()
    assert reason is not None and reason.startswith("no CUDA device") and "TRITON_INTERPRET=1" in reason
    monkeypatch.setattr(tk.importlib.metadata, "version", lambda name: "2.3.1")
    assert tk.unavailable_reason() == "triton 2.3 is too old: the kernels need triton >= 3.0"
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now raises ImportError
    assert tk.unavailable_reason().startswith("triton is not installed")


# --- low-rank passes ------------------------------------------------------------------------

# Low-rank cases: every shape above at every rank (r <= 16 share the 16-wide rank tile, masked
# below 16; 64 and 128 have tiles of their own), and GQA-style 4:1 layers both ways round
# (Llama-3-8B's k/v_proj are 1024x4096: d_out = d_in / 4; and its transpose), each two of the
# interpreter's 128-wide tiles long, at one rank per rank tile (all five ranks there would add
# ~40% to this test's interpreter time for no path the cases here do not take).
GQA_SHAPES = [(64, 256), (256, 64)]
LOWRANK_CASES = [(a, b, r) for a, b in SHAPES for r in (1, 8, 16, 64, 128)] + [
    (a, b, r) for a, b in GQA_SHAPES for r in (8, 64, 128)]


@DTYPE_PARAMS
@pytest.mark.parametrize("d_out, d_in, r", LOWRANK_CASES, ids=[f"shape={a}x{b}-r={r}" for a, b, r in LOWRANK_CASES])
def test_lowrank_passes(d_out, d_in, r, dtype):
    wa, wu, g = _layer(d_out, d_in, dtype, _seed("lowrank", d_out, d_in, r, dtype))
    B = (torch.randn(d_out, r, generator=g) * 0.1).to(dtype).to(DEVICE)
    T, P, vsq = tk.lowrank_passes(wa, wu, B)
    assert T.dtype == P.dtype == torch.float32 and isinstance(vsq, float)
    assert T.shape == (d_in, r) and P.shape == (d_out, r) and T.device == wa.device
    T_ref, P_ref, vsq_ref = ref_lowrank_passes(wa.cpu(), wu.cpu(), B.cpu())
    _close(T, T_ref, "T = V^T B")
    _close(P, P_ref, "P = V T")
    _rel(vsq, vsq_ref, "||V||^2")


@pytest.mark.parametrize("blocks, split", [((16, 32, 16), 3), ((32, 16, 64), 2), ((16, 16, 16), 100)],
                         ids=["m16-n32-k16-split3", "m32-n16-k64-split2", "m16-n16-k16-split100"])
def test_lowrank_small_tiles_and_splits(blocks, split):
    """Many programs, tails in every direction and partial sums over several chunks."""
    wa, wu, g = _layer(67, 131, torch.bfloat16, _seed("tiles", blocks, split))
    B = torch.randn(67, 5, generator=g).to(DEVICE)
    bm, bn, bk = blocks
    T, P, vsq = lowrank.lowrank_passes(wa, wu, B, block_m=bm, block_n=bn, block_k=bk, split=split)
    T_ref, P_ref, vsq_ref = ref_lowrank_passes(wa.cpu(), wu.cpu(), B.cpu())
    _close(T, T_ref, "T")
    _close(P, P_ref, "P")
    _rel(vsq, vsq_ref, "||V||^2")


@pytest.mark.parametrize("r", [256, 300], ids=lambda r: f"r={r}")
def test_lowrank_wide_ranks(r):
    """r = 256 fills one rank tile; r = 300 is processed in two chunks of B's columns."""
    wa, wu, g = _layer(40, 72, torch.float16, _seed("wide", r))
    B = torch.randn(40, r, generator=g).to(torch.float16).to(DEVICE)
    T, P, vsq = tk.lowrank_passes(wa, wu, B)
    T_ref, P_ref, vsq_ref = ref_lowrank_passes(wa.cpu(), wu.cpu(), B.cpu())
    _close(T, T_ref, "T")
    _close(P, P_ref, "P")
    _rel(vsq, vsq_ref, "||V||^2")


def test_lowrank_strided_inputs_give_the_same_bits():
    wa, wu, g = _layer(67, 131, torch.float32, _seed("strided"))
    B_wide = torch.randn(67, 24, generator=g).to(DEVICE)
    B = B_wide[:, 3:19:2]  # non-contiguous columns
    wa_t, wu_t = wa.t().contiguous().t(), wu.t().contiguous().t()  # column-major views
    assert not (wa_t.is_contiguous() or B.is_contiguous())
    got = tk.lowrank_passes(wa_t, wu_t, B)
    want = tk.lowrank_passes(wa, wu, B.contiguous())
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]


def test_lowrank_is_deterministic():
    wa, wu, g = _layer(96, 200, torch.bfloat16, _seed("det-low"))
    B = torch.randn(96, 16, generator=g).to(torch.bfloat16).to(DEVICE)
    for kw in ({}, {"block_m": 16, "block_n": 32, "block_k": 32, "split": 4}):
        runs = [lowrank.lowrank_passes(wa, wu, B, **kw) for _ in range(3)]
        for T, P, vsq in runs[1:]:
            assert torch.equal(T, runs[0][0]) and torch.equal(P, runs[0][1]) and vsq == runs[0][2], kw


# --- full-rank sums and projection ----------------------------------------------------------

@DTYPE_PARAMS
@pytest.mark.parametrize("panel", [None, 48], ids=["panel=all", "panel=48"])
@pytest.mark.parametrize("d_out, d_in", SHAPES, ids=SHAPE_IDS)
def test_fullrank_sums(d_out, d_in, panel, dtype):
    wa, wu, g = _layer(d_out, d_in, dtype, _seed("full", d_out, d_in, panel, dtype))
    delta = (torch.randn(d_out, d_in, generator=g) * 0.001).to(dtype).to(DEVICE)
    got = fullrank.fullrank_sums(wa, wu, delta, panel=panel)
    want = ref_fullrank(wa.cpu(), wu.cpu(), delta.cpu())[:4]
    for name, a, b in zip(("||M||^2", "||N||^2", "||dW||^2", "||V||^2"), got, want):
        _rel(a, b, name)


@DTYPE_PARAMS
@pytest.mark.parametrize("d_out, d_in", [(67, 131), (128, 128)], ids=["shape=67x131", "shape=128x128"])
def test_project_full(d_out, d_in, dtype):
    wa, wu, g = _layer(d_out, d_in, dtype, _seed("proj", d_out, d_in, dtype))
    delta = (torch.randn(d_out, d_in, generator=g) * 0.001).to(dtype).to(DEVICE)
    N, vsq = tk.project_full(wa, wu, delta)
    *_, vsq_ref, N_ref = ref_fullrank(wa.cpu(), wu.cpu(), delta.cpu())
    assert N.dtype == torch.float32 and N.shape == (d_out, d_in)
    _close(N, N_ref, "N = V V^T dW")
    _rel(vsq, vsq_ref, "||V||^2")


def test_fullrank_small_tiles_strided_and_deterministic():
    wa, wu, g = _layer(67, 131, torch.float16, _seed("full-tiles"))
    delta = (torch.randn(131, 67, generator=g) * 0.001).to(torch.float16).to(DEVICE).t()  # column-major
    kw = dict(block_m=32, block_n=32, block_k=16, panel=64)  # 3 panels, tails everywhere
    runs = [fullrank.project_full(wa, wu, delta, **kw) for _ in range(2)]
    sums = [fullrank.fullrank_sums(wa, wu, d, **kw) for d in (delta, delta.contiguous())]
    *ref_sums, N_ref = ref_fullrank(wa.cpu(), wu.cpu(), delta.cpu())
    _close(runs[0][0], N_ref, "N")
    for name, a, b in zip(("||M||^2", "||N||^2", "||dW||^2", "||V||^2"), sums[0], ref_sums):
        _rel(a, b, name)
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert sums[0] == sums[1]  # the same bits again, from strided and from contiguous dW


def test_fullrank_squares_tiles_past_the_fp32_range():
    """Entries of M and N above ~1.8e19 are finite in fp32 but their squares are not: the tile
    partials of ||M||^2 and ||N||^2 are squared in float64, as the reference and the CUDA kernel
    square them (fp32 weights of magnitude 1e8 here: N reaches ~1e26, ||N||^2 ~1e55)."""
    g = torch.Generator().manual_seed(_seed("full-huge"))
    wa, wu, delta = ((torch.rand(40, 56, generator=g) + 0.5) * 1e8 * torch.randn(40, 56, generator=g).sign()
                     for _ in range(3))
    got = fullrank.fullrank_sums(wa.to(DEVICE), wu.to(DEVICE), delta.to(DEVICE))
    want = ref_fullrank(wa, wu, delta)[:4]
    assert want[1] > 1e50  # (past fp32: the case this covers)
    for name, a, b in zip(("||M||^2", "||N||^2", "||dW||^2", "||V||^2"), got, want):
        _rel(a, b, name)


# --- through safemerge_ext.ops --------------------------------------------------------------

@DTYPE_PARAMS
@pytest.mark.parametrize("d_out, d_in, r", [(96, 200, 8), (67, 131, 1)], ids=["shape=96x200-r=8", "shape=67x131-r=1"])
def test_ops_scores_and_projections(triton_registry, d_out, d_in, r, dtype):
    wa, wu, g = _layer(d_out, d_in, dtype, _seed("ops", d_out, d_in, r, dtype))
    A = (torch.randn(r, d_in, generator=g) * 0.1).to(dtype)
    # B partly inside the span of V so that the cosine is far from 0 and 1.
    V = wa.cpu().double() - wu.cpu().double()
    B = (V[:, :r].float() * 10 + 0.01 * torch.randn(d_out, r, generator=g)).to(dtype)
    delta = (torch.randn(d_out, d_in, generator=g) * 0.001 + 0.3 * V.float()).to(dtype)
    A_d, B_d, delta_d = A.to(DEVICE), B.to(DEVICE), delta.to(DEVICE)

    score = ops.subspace_score(wa, wu, lora_A=A_d, lora_B=B_d, backend="triton")
    assert score.backend == "triton" and score.reason is None
    want = ref_cosine(wa.cpu(), wu.cpu(), B.double() @ A.double())
    assert abs(score.cosine - want) <= COS_TOL, (score.cosine, want)
    full = ops.subspace_cosine(wa, wu, delta=delta_d, backend="triton")
    want_full = ref_cosine(wa.cpu(), wu.cpu(), delta)
    assert abs(full - want_full) <= COS_TOL, (full, want_full)

    CB = ops.project_lora_B(wa, wu, B_d, backend="triton")
    assert CB.dtype == dtype
    ref_CB = ref_project(wa.cpu(), wu.cpu(), B).to(dtype)
    # (one rounding to the output dtype on top of fp32 work: 2^-10 for fp16, 2^-8 for bf16)
    _close(CB.float(), ref_CB.float(), "C B", tol={torch.float32: TOL, torch.float16: 2**-10, torch.bfloat16: 2**-8}[dtype])
    _close(ops.project_delta(wa, wu, delta_d, backend="triton"), ref_project(wa.cpu(), wu.cpu(), delta), "C dW")


def test_ops_degenerate_layers(triton_registry):
    wa, wu, g = _layer(67, 131, torch.bfloat16, _seed("degenerate"))
    A = torch.randn(4, 131, generator=g).to(DEVICE)
    B = torch.randn(67, 4, generator=g).to(DEVICE)
    delta = torch.randn(67, 131, generator=g).to(DEVICE)

    T, P, vsq = tk.lowrank_passes(wa, wa.clone(), B)  # V = 0
    assert vsq == 0.0 and not T.any() and not P.any()
    m2, n2, d2, vsq_full = fullrank.fullrank_sums(wa, wa.clone(), delta)
    assert m2 == n2 == vsq_full == 0.0 and d2 > 0.0
    same = ops.subspace_score(wa, wa.clone(), lora_A=A, lora_B=B, backend="triton")
    assert same.cosine != same.cosine and "identical" in same.reason
    zero_B = ops.subspace_score(wa, wu, lora_A=A, lora_B=torch.zeros_like(B), backend="triton")
    assert zero_B.cosine != zero_B.cosine and "zero" in zero_B.reason
    zero_full = ops.subspace_score(wa, wu, delta=torch.zeros_like(delta), backend="triton")
    assert zero_full.cosine != zero_full.cosine and "zero" in zero_full.reason
    with pytest.raises(ValueError, match="identical"):
        ops.project_delta(wa, wa.clone(), delta, backend="triton")


def test_nonfinite_inputs_surface(triton_registry):
    wa, wu, g = _layer(64, 48, torch.float32, _seed("nan"))
    B = torch.randn(64, 8, generator=g).to(DEVICE)
    A = torch.randn(8, 48, generator=g).to(DEVICE)
    wa[5, 7] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        ops.subspace_cosine(wa, wu, lora_A=A, lora_B=B, backend="triton")


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda wa, wu, B: lowrank.lowrank_passes(wa, wu, B, block_m=24), "power of two"),
    (lambda wa, wu, B: lowrank.lowrank_passes(wa, wu, B, precision="fp8"), "precision"),
    (lambda wa, wu, B: lowrank.lowrank_passes(wa, wu[:-1], B), "w_unaligned"),
    (lambda wa, wu, B: lowrank.lowrank_passes(wa, wu, B[:-1]), "lora_B"),
    (lambda wa, wu, B: lowrank.lowrank_passes(wa, wu.to(torch.int32), B), "fp32, fp16, bf16"),
    (lambda wa, wu, B: fullrank.fullrank_sums(wa, wu, B), "one shape"),
    (lambda wa, wu, B: fullrank.project_full(wa, wu, wa, panel=0), "panel"),
    *([(lambda wa, wu, B: lowrank.lowrank_passes(wa, wu, B, precision="bf16"), "needs a GPU")] if INTERPRETED else []),
], ids=["block", "precision", "shape", "lora_B", "dtype", "delta-shape", "panel", *(["bf16-interpreted"] if INTERPRETED else [])])
def test_bad_input_is_one_clear_line(call, match):
    wa, wu, g = _layer(64, 48, torch.float32, _seed("bad"))
    B = torch.randn(64, 4, generator=g).to(DEVICE)
    with pytest.raises(ValueError, match=match) as err:
        call(wa, wu, B)
    assert "\n" not in str(err.value) and str(err.value).startswith("triton backend:")


@pytest.mark.parametrize("d_out, d_in", [(0, 48), (64, 0)], ids=["rows=0", "cols=0"])
def test_empty_weights_give_zeros_as_the_reference_does(d_out, d_in):
    wa, wu = torch.empty(d_out, d_in, device=DEVICE), torch.empty(d_out, d_in, device=DEVICE)
    B = torch.randn(d_out, 3, device=DEVICE)
    T, P, vsq = lowrank.lowrank_passes(wa, wu, B)
    T_ref, P_ref, vsq_ref = backends.resolve("torch", "cpu")[1].lowrank_passes(wa.cpu(), wu.cpu(), B.cpu())
    assert T.shape == T_ref.shape == (d_in, 3) and P.shape == P_ref.shape == (d_out, 3)
    assert not T.any() and not P.any() and vsq == vsq_ref == 0.0
    assert fullrank.fullrank_sums(wa, wu, wa) == (0.0, 0.0, 0.0, 0.0)
    N, vsq = fullrank.project_full(wa, wu, wa)
    assert N.shape == (d_out, d_in) and vsq == 0.0


# --- compiled kernels ----------------------------------------------------------------------

_COMPILE = r"""
import os, re, subprocess, tempfile
import triton
import triton.backends.nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from safemerge_ext.kernels import fullrank, lowrank

CUOBJDUMP = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
# unit strides are constants at launch (triton specializes on 1), as for every input here
UNIT = {"s_wa_n": 1, "s_wu_n": 1, "s_b_r": 1, "s_d_n": 1}
# and pointers, sizes and row strides of Llama shapes are multiples of 16 (triton specializes on that)
DIV16 = {"d_out", "d_in", "rows_per_split", "cols_per_split", "s_wa_m", "s_wu_m", "s_d_m", "s_mp", "s_out", "panel_w"}
SHARED = {80: 166912, 86: 101376, 90: 232448}  # shared memory a block may use: A100, A10/A40/RTX 30xx, H100/H200

def build(name, fn, ptrs, consts, warps, arch):
    consts = {**{k: v for k, v in UNIT.items() if k in fn.arg_names}, **consts}
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in consts and (sig[n].startswith("*") or n in DIV16)}
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": warps})
    print(f"{name} sm_{arch} warps={warps} shared={k.metadata.shared}")
    if k.metadata.shared > SHARED[arch]:
        print(f"OVER-SHARED {name} sm_{arch}: {k.metadata.shared} > {SHARED[arch]}")
    if not os.path.exists(CUOBJDUMP):
        return
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"]); f.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?LOCAL:(\d+)", usage, re.S)
    print(f"{name} sm_{arch} warps={warps} REG={m[1]} STACK={m[2]} LOCAL={m[3]}")
    if m[2] != "0" or m[3] != "0":
        print(f"SPILLS {name} sm_{arch}")

f32 = {**dict.fromkeys(("TP", "SQ", "T", "PP", "MP", "OUT"), "*fp32"), "PART": "*fp64"}  # (full-rank tile sums: fp64)
for wd, bd in (("bf16", "fp16"), ("fp32", "fp32")):  # the pipeline's bf16 weights; fp32 checkpoints
    w = {"WA": f"*{wd}", "WU": f"*{wd}", "B": f"*{bd}", "D": f"*{wd}", **f32}
    elem = 4 if wd == "fp32" else 2
    for arch in (80, 86, 90):  # each GPU's own default tiles (its tier of shared memory)
        for r_pad, prec in ((16, "ieee"), (32, "ieee"), (64, "ieee"), (128, "ieee"), (256, "ieee"),
                            (128, "tf32x3"), (256, "tf32x3"), (64, "tf32"), (256, "tf32"), (256, "bf16")):
            t = lowrank._tiles(False, 4096, 4096, r_pad, prec, elem, SHARED[arch])
            build(f"W={wd} pass1 r_pad={r_pad} {prec}", lowrank._vt_b_kernel, w,
                  {"R_PAD": r_pad, "BLOCK_M": t["m1"], "BLOCK_N": t["n1"], "PRECISION": prec}, t["w1"], arch)
            build(f"W={wd} pass2 r_pad={r_pad} {prec}", lowrank._v_t_kernel, w,
                  {"R_PAD": r_pad, "BLOCK_M": t["m2"], "BLOCK_K": t["k2"], "PRECISION": prec}, t["w2"], arch)
        for prec in ("ieee", "tf32x3", "tf32", "bf16"):
            t = fullrank._tiles(False, 4096, 4096, prec, SHARED[arch])
            build(f"W={wd} V^T dW {prec}", fullrank._vt_dw_kernel, w,
                  {"BLOCK_K": t["k"], "BLOCK_N": t["n"], "PRECISION": prec}, t["w"], arch)
            build(f"W={wd} V M {prec}", fullrank._v_m_kernel, w,
                  {"STORE": True, "BLOCK_M": t["m"], "BLOCK_N": t["n"], "BLOCK_K": t["k"], "PRECISION": prec},
                  t["w"], arch)
print("compiled")
"""


def test_kernels_compile_for_cuda_without_a_gpu():
    """Interpreter runs skip triton's compiler: compile each kernel with the GPU default tiles for
    sm_80, sm_86 and sm_90 (triton ships ptxas), for bf16 and fp32 weights, specialized as a launch on
    Llama shapes is, so that compiled-mode errors show up on a CPU machine. The default tiles must
    fit each GPU's shared memory (else triton raises OutOfResources at launch) and, by each cubin's
    resources (triton's cuobjdump), not spill registers to local memory (the tiles were sized for
    that; a triton upgrade can change it)."""
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
    assert "OVER-SHARED" not in done.stdout, done.stdout  # triton raises OutOfResources at launch
    assert "SPILLS" not in done.stdout, done.stdout


# --- compiled kernels on a GPU --------------------------------------------------------------

# precision="bf16" rounds both operands of every product to bf16 (8 significant bits): each product
# is off by up to about 2^-8 relative, and a sum of them by about that much of its largest term.
BF16_TOL = 2e-2


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("precision, tol", [("ieee", 1e-4), ("tf32x3", 1e-4), ("tf32", 5e-3), ("bf16", BF16_TOL)],
                         ids=["precision=ieee", "precision=tf32x3", "precision=tf32", "precision=bf16"])
@pytest.mark.parametrize("d_out, d_in, r", [(4096, 1024, 128), (1024, 4096, 16), (4096, 4096, 256), (1000, 3000, 7)],
                         ids=["shape=4096x1024-r=128", "shape=1024x4096-r=16", "shape=4096x4096-r=256",
                              "shape=1000x3000-r=7"])
def test_gpu_lowrank(d_out, d_in, r, precision, tol):
    wa, wu, g = _layer(d_out, d_in, torch.bfloat16, _seed("gpu-low", d_out, d_in, r), device="cuda")
    B = (torch.randn(d_out, r, generator=g) * 0.1).to(torch.bfloat16).cuda()
    T, P, vsq = lowrank.lowrank_passes(wa, wu, B, precision=precision)
    T_ref, P_ref, vsq_ref = ref_lowrank_passes(wa, wu, B)
    _close(T, T_ref, "T", tol=tol)
    _close(P, P_ref, "P", tol=tol)
    _rel(vsq, vsq_ref, "||V||^2", tol=1e-5)
    again = lowrank.lowrank_passes(wa, wu, B, precision=precision)
    assert torch.equal(T, again[0]) and torch.equal(P, again[1]) and vsq == again[2]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("d_out, d_in", [(4096, 1024), (1024, 4096), (1000, 3000)],
                         ids=["shape=4096x1024", "shape=1024x4096", "shape=1000x3000"])
def test_gpu_fullrank(d_out, d_in):
    wa, wu, g = _layer(d_out, d_in, torch.bfloat16, _seed("gpu-full", d_out, d_in), device="cuda")
    delta = (torch.randn(d_out, d_in, generator=g) * 0.001).to(torch.bfloat16).cuda()
    *ref_sums, N_ref = ref_fullrank(wa, wu, delta)
    sums = fullrank.fullrank_sums(wa, wu, delta, panel=512)
    for name, a, b in zip(("||M||^2", "||N||^2", "||dW||^2", "||V||^2"), sums, ref_sums):
        _rel(a, b, name, tol=1e-4)
    N, vsq = fullrank.project_full(wa, wu, delta)
    _close(N, N_ref, "N", tol=1e-4)
    assert sums == fullrank.fullrank_sums(wa, wu, delta, panel=512)
    bf16 = fullrank.fullrank_sums(wa, wu, delta, precision="bf16")  # on the tensor cores' bf16 rate
    for name, a, b in zip(("||M||^2", "||N||^2", "||dW||^2", "||V||^2"), bf16, ref_sums):
        _rel(a, b, f"{name} (bf16 operands)", tol=BF16_TOL)


def test_triton_imported_before_the_interpreter_was_asked_for(tmp_path):
    """Something imported triton (compiled mode) before TRITON_INTERPRET=1 was set: one line that
    says so and what to do, not triton's "Cannot call @triton.jit'd outside of the scope"."""
    code = (
        "import os, triton, triton.language\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "import torch\n"
        "from safemerge_ext import ops\n"
        "g = torch.Generator().manual_seed(3)\n"
        "w = torch.randn(32, 16, generator=g)\n"
        "try:\n"
        "    ops.subspace_cosine(w, w * 0.9, lora_A=torch.randn(2, 16, generator=g),\n"
        "                        lora_B=torch.randn(32, 2, generator=g), backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ERR triton backend: triton was imported before TRITON_INTERPRET=1 was set")
    assert out.stdout.count("\n") == 1


def test_fp64_inputs_are_computed_in_fp32(monkeypatch):
    """float64 weights, factors and updates are narrowed to fp32 before launch (fp64 tiles would need
    twice the shared memory on a GPU): the kernels receive fp32, and give fp32 inputs' bits."""
    seen = []
    real_p, real_f = lowrank._passes, fullrank._launch_all
    monkeypatch.setattr(lowrank, "_passes", lambda wa, wu, B, *a: seen.append((wa.dtype, wu.dtype, B.dtype))
                        or real_p(wa, wu, B, *a))
    monkeypatch.setattr(fullrank, "_launch_all", lambda wa, wu, d, *a: seen.append((wa.dtype, wu.dtype, d.dtype))
                        or real_f(wa, wu, d, *a))
    wa, wu, g = _layer(67, 131, torch.float64, _seed("fp64"))
    B = (torch.randn(67, 5, generator=g, dtype=torch.float64) * 0.01).to(DEVICE)
    dW = (torch.randn(67, 131, generator=g, dtype=torch.float64) * 0.001).to(DEVICE)
    got, want = lowrank.lowrank_passes(wa, wu, B), lowrank.lowrank_passes(wa.float(), wu.float(), B.float())
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]
    assert fullrank.fullrank_sums(wa, wu, dW) == fullrank.fullrank_sums(wa.float(), wu.float(), dW.float())
    assert len(seen) == 4 and all(d == torch.float32 for call in seen for d in call), seen


def test_a_launch_short_of_resources_retries_with_half_the_block():
    """fitting(): on a GPU whose shared memory a default tile does not fit (triton's OutOfResources
    at launch), the block is halved until it fits (not below 16); nothing carries over to the next
    call, so the same inputs keep the same tiles whatever ran before."""
    from triton.runtime.errors import OutOfResources

    tried = []

    def launch(block):
        tried.append(block)
        if block > 32:
            raise OutOfResources(block * 2048, 101376, "shared memory")
        return f"ran with {block}"

    assert _launch.fitting(launch, 128) == "ran with 32" and tried == [128, 64, 32]
    tried.clear()
    assert _launch.fitting(launch, 16) == "ran with 16" and tried == [16]
    with pytest.raises(OutOfResources):
        _launch.fitting(lambda b: launch(b * 100), 64)


def test_float8_factors_reach_the_kernels_as_fp32():
    """float8 factors and updates, which ops accepts on every backend, are widened before the
    launch (the kernels take fp32/fp16/bf16/fp64 only)."""
    wa, wu, g = _layer(40, 72, torch.float32, _seed("fp8"))
    A, B = torch.randn(4, 72, generator=g), torch.randn(40, 4, generator=g)
    A8, B8 = (t.to(torch.float8_e4m3fn).to(DEVICE) for t in (A, B))
    want = ref_cosine(wa.cpu(), wu.cpu(), B8.cpu().double() @ A8.cpu().double())
    assert abs(ops.subspace_cosine(wa, wu, lora_A=A8, lora_B=B8, backend="triton") - want) < 1e-5
    dW8 = (B8.float() @ A8.float()).to(torch.float8_e5m2)
    assert abs(ops.subspace_cosine(wa, wu, delta=dW8, backend="triton") - ref_cosine(wa.cpu(), wu.cpu(), dW8.cpu().double())) < 1e-5


def test_interpreted_launches_from_threads_take_turns():
    """Triton's interpreter keeps the running grid in process-wide state: launches from several
    threads at once failed or mixed their sums; they take turns and agree with one after another."""
    from concurrent.futures import ThreadPoolExecutor

    if DEVICE != "cpu":
        pytest.skip("the interpreter's launches only")
    jobs = []
    for i in range(6):
        wa, wu, g = _layer(33, 70, torch.float32, _seed("threads", i))
        jobs.append((wa, wu, torch.randn(4, 70, generator=g), torch.randn(33, 4, generator=g)))
    alone = [ops.subspace_cosine(wa, wu, lora_A=A, lora_B=B, backend="triton") for wa, wu, A, B in jobs]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(2):
            together = list(pool.map(lambda j: ops.subspace_cosine(j[0], j[1], lora_A=j[2], lora_B=j[3], backend="triton"),
                                     jobs))
            assert together == alone


def _view(t: torch.Tensor, pad: int = 29) -> torch.Tensor:
    """t as a column slice of a wider tensor: unit column stride, row stride d_in + pad (kept as a view)."""
    wide = torch.full((t.shape[0], t.shape[1] + pad), float("nan"), dtype=t.dtype, device=t.device)
    wide[:, 3:3 + t.shape[1]] = t
    return wide[:, 3:3 + t.shape[1]]


@pytest.mark.parametrize("which", ["wa", "wu"])
def test_lowrank_weights_with_different_row_strides(which):
    """wa and wu (and dW) each have their own row stride: a kernel that reads one with the other's
    stride is wrong whenever they differ (a column slice of one, a contiguous other)."""
    wa, wu, g = _layer(67, 131, torch.bfloat16, _seed("rowstride", which))
    B = (torch.randn(67, 5, generator=g) * 0.1).to(DEVICE)
    args = (_view(wa), wu) if which == "wa" else (wa, _view(wu))
    assert args[0].stride(0) != args[1].stride(0)
    T, P, vsq = tk.lowrank_passes(*args, B)
    T_ref, P_ref, vsq_ref = ref_lowrank_passes(wa.cpu(), wu.cpu(), B.cpu())
    _close(T, T_ref, "T")
    _close(P, P_ref, "P")
    _rel(vsq, vsq_ref, "||V||^2")


@pytest.mark.parametrize("which", ["wa", "wu", "delta"])
def test_fullrank_inputs_with_different_row_strides(which):
    wa, wu, g = _layer(67, 131, torch.float16, _seed("rowstride-full", which))
    delta = (torch.randn(67, 131, generator=g) * 0.001).to(torch.float16).to(DEVICE)
    ins = {"wa": wa, "wu": wu, "delta": delta}
    ins[which] = _view(ins[which])
    *want, N_ref = ref_fullrank(wa.cpu(), wu.cpu(), delta.cpu())
    got = fullrank.fullrank_sums(ins["wa"], ins["wu"], ins["delta"])
    for name, a, b in zip(("||M||^2", "||N||^2", "||dW||^2", "||V||^2"), got, want):
        _rel(a, b, name)
    N, _ = fullrank.project_full(ins["wa"], ins["wu"], ins["delta"])
    _close(N, N_ref, "N")


@pytest.mark.parametrize("r", [17, 33, 65, 129], ids=lambda r: f"r={r}")
def test_lowrank_ranks_one_past_a_power_of_two(r):
    """The rank tile R_PAD must cover r when r is one past a power of two (ranks of merged adapters,
    r_f + r_s, and rank_pattern ranks are arbitrary): the tested ranks are powers of two, 5 and 44."""
    wa, wu, g = _layer(67, 131, torch.bfloat16, _seed("rank+1", r))
    B = (torch.randn(67, r, generator=g) * 0.1).to(DEVICE)
    T, P, vsq = tk.lowrank_passes(wa, wu, B)
    T_ref, P_ref, _ = ref_lowrank_passes(wa.cpu(), wu.cpu(), B.cpu())
    _close(T, T_ref, "T")
    _close(P, P_ref, "P")


def test_split_partials_are_summed_in_float64():
    """Row chunks whose partials of T cancel (2^24 + 1 - 2^24): summed in fp32 on the host they give
    0, in float64 the exact 1. Each chunk's partial is exact here, so only the host sum can lose it."""
    V = torch.zeros(48, 16)
    V[0, 0], V[16, 0], V[32, 0] = 2.0**24, 1.0, -(2.0**24)  # one non-zero a chunk of 16 rows
    wa, wu = V.to(DEVICE), torch.zeros_like(V).to(DEVICE)
    B = torch.ones(48, 1, device=DEVICE)
    T, P, _ = lowrank.lowrank_passes(wa, wu, B, block_m=16, block_n=16, block_k=16, split=3)
    assert T[0, 0].item() == 1.0 and not T[1:].any()
