"""The native backends (C++ ``cpp``, CUDA ``cuda``) and the torch reference against float64.

Every backend is run on the device it serves (cpu for torch/cpp, cuda for cuda/triton when a GPU
is present) over dtypes x shapes (square, GQA-style, sizes that are not multiples of any tile) x
ranks. Inputs are rounded to the dtype first and the float64 references see the same stored
values; fp16/bf16 differences are exact in fp32, so what remains is fp32 accumulation, and the
tolerances (relative to the largest reference value) grow with the reduction length, not the dtype.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from numerics import DTYPES, assert_close, ref_cosine, ref_lowrank_passes, ref_project
from numerics import case_seed as _seed
from numerics import drifted_pair as _layer
from safemerge_ext import backends, ops

ROOT = Path(__file__).resolve().parents[1]
_AVAILABLE = backends.available_backends()
_DEVICE_OF = {"torch": "cpu", "cpp": "cpu", "cuda": "cuda", "triton": "cuda"}
# the torch reference always; every other backend that can run here, on its own device
BACKENDS = ["torch"] + [
    n for n in ("cpp", "cuda", "triton")
    if _AVAILABLE.get(n) is None and (_DEVICE_OF[n] == "cpu" or torch.cuda.is_available())
]
BACKEND_PARAMS = pytest.mark.parametrize("backend", BACKENDS, ids=[f"backend={b}" for b in BACKENDS])
# (dtype, rtol): fp32 accumulation over <= 1024 terms, relative to the largest reference value
DTYPE_PARAMS = pytest.mark.parametrize(
    "dtype, tol",
    [(DTYPES["fp32"], 2e-5), (DTYPES["fp16"], 2e-5), (DTYPES["bf16"], 2e-5)],
    ids=["dtype=fp32", "dtype=fp16", "dtype=bf16"],
)
SHAPES = [(256, 256), (1024, 256), (67, 131), (200, 96)]
SHAPE_PARAMS = pytest.mark.parametrize("d_out, d_in", SHAPES, ids=[f"shape={a}x{b}" for a, b in SHAPES])
RANKS = [1, 8, 16, 32, 64, 128]  # (32: the CUDA kernels at 4 ranks a thread)

needs_cpp = pytest.mark.skipif(_AVAILABLE["cpp"] is not None, reason=f"cpp backend unavailable: {_AVAILABLE['cpp']}")


def _impl(backend: str):
    return backends.resolve(backend, _DEVICE_OF[backend])[1]


def _check_passes(backend: str, wa, wu, B, tol: float) -> None:
    dev = _DEVICE_OF[backend]
    T, P, vsq = _impl(backend).lowrank_passes(wa.to(dev), wu.to(dev), B.to(dev))
    V = wa.double() - wu.double()
    T_ref = V.t() @ B.double()
    P_ref = V @ T_ref
    assert T.dtype == torch.float32 and P.dtype == torch.float32
    assert_close(T, T_ref, atol=tol * float(T_ref.abs().max()), rtol=tol, what=f"{backend} T")
    assert_close(P, P_ref, atol=tol * float(P_ref.abs().max()), rtol=tol, what=f"{backend} P")
    assert isinstance(vsq, float)
    assert math.isclose(vsq, float(V.square().sum()), rel_tol=1e-5, abs_tol=0.0), f"{backend} ||V||^2"


@BACKEND_PARAMS
@DTYPE_PARAMS
@SHAPE_PARAMS
@pytest.mark.parametrize("r", RANKS, ids=[f"r={r}" for r in RANKS])
def test_lowrank_passes_match_float64(backend, dtype, tol, d_out, d_in, r):
    wa, wu, g = _layer(d_out, d_in, dtype, _seed("passes", backend, dtype, d_out, d_in, r))
    B = torch.randn(d_out, r, generator=g) * 0.01
    _check_passes(backend, wa, wu, B, tol)


@BACKEND_PARAMS
@DTYPE_PARAMS
@SHAPE_PARAMS
def test_ops_match_float64(backend, dtype, tol, d_out, d_in):
    """subspace_cosine (LoRA and full), project_lora_B and project_delta against C formed in float64."""
    wa, wu, g = _layer(d_out, d_in, dtype, _seed("ops", backend, dtype, d_out, d_in))
    r = 8
    A = torch.randn(r, d_in, generator=g) * 0.01
    B = torch.randn(d_out, r, generator=g) * 0.01
    dW = (torch.randn(d_out, d_in, generator=g) * 0.001).to(dtype)
    dev = _DEVICE_OF[backend]
    wa_d, wu_d = wa.to(dev), wu.to(dev)

    want = ref_cosine(wa, wu, B.double() @ A.double())
    got = ops.subspace_cosine(wa_d, wu_d, lora_A=A.to(dev), lora_B=B.to(dev), backend=backend)
    assert abs(got - want) <= 1e-5, f"LoRA cosine {got} != {want}"
    score = ops.subspace_score(wa_d, wu_d, lora_A=A.to(dev), lora_B=B.to(dev), backend=backend)
    assert score.backend == backend and score.reason is None

    want_full = ref_cosine(wa, wu, dW.double())
    got_full = ops.subspace_cosine(wa_d, wu_d, delta=dW.to(dev), backend=backend)
    assert abs(got_full - want_full) <= 1e-5, f"full-rank cosine {got_full} != {want_full}"

    CB = ref_project(wa, wu, B)
    got_B = ops.project_lora_B(wa_d, wu_d, B.to(dev), backend=backend)
    assert got_B.dtype == B.dtype
    assert_close(got_B, CB, atol=tol * float(CB.abs().max()), rtol=tol, what=f"{backend} C B")

    CdW = ref_project(wa, wu, dW)
    got_dW = ops.project_delta(wa_d, wu_d, dW.to(dev), backend=backend)
    assert_close(got_dW, CdW, atol=tol * float(CdW.abs().max()), rtol=tol, what=f"{backend} C dW")


@BACKEND_PARAMS
def test_noncontiguous_inputs(backend):
    """Row-strided views, column-strided views and a transposed lora_B give the dense results."""
    d_out, d_in, r = 96, 80, 5
    g = torch.Generator().manual_seed(_seed("noncontig", backend))
    big_a = torch.randn(d_out, 2 * d_in + 3, generator=g).bfloat16()
    big_u = (big_a.float() + 0.01 * torch.randn(big_a.shape, generator=g)).bfloat16()
    wa = big_a[:, 3 : 3 + d_in]  # row stride 2*d_in+3, unit column stride
    wu = big_u[:, ::2][:, :d_in]  # column stride 2: must be copied
    assert not wa.is_contiguous() and not wu.is_contiguous()
    B = (torch.randn(r, d_out, generator=g) * 0.01).t()
    assert not B.is_contiguous()
    _check_passes(backend, wa, wu, B, 2e-5)
    dev = _DEVICE_OF[backend]
    dense = ops.project_lora_B(wa.contiguous().to(dev), wu.contiguous().to(dev), B.contiguous().to(dev), backend=backend)
    strided = ops.project_lora_B(wa.to(dev), wu.to(dev), B.to(dev), backend=backend)
    assert torch.equal(dense, strided)


def _off_line(w: torch.Tensor, off: int) -> torch.Tensor:
    """A contiguous copy of ``w`` that starts ``off`` elements past a 64-byte boundary."""
    flat = torch.empty(w.numel() + 64, dtype=w.dtype, device=w.device)
    skew = (-flat.data_ptr() // w.element_size()) % (64 // w.element_size())
    view = flat[skew + off : skew + off + w.numel()].view(w.shape)
    view.copy_(w)
    return view


@BACKEND_PARAMS
@pytest.mark.parametrize("dtype", [DTYPES["fp32"], DTYPES["bf16"]], ids=["dtype=fp32", "dtype=bf16"])
def test_unaligned_data_pointers(backend, dtype):
    """Contiguous weights that start off a cache line (as a tensor read in place from a safetensors
    file does: its data follows a header of any length that is a multiple of 8) give the same
    results as aligned copies, bit for bit on the CPU backends."""
    g = torch.Generator().manual_seed(_seed("unaligned", backend, dtype))
    dev = _DEVICE_OF[backend]
    for d_out, d_in, r in [(256, 640, 8), (67, 131, 5)]:
        wa, wu, _ = _layer(d_out, d_in, dtype, _seed("unaligned", backend, dtype, d_out, d_in))
        B = torch.randn(d_out, r, generator=g) * 0.01
        aligned = _impl(backend).lowrank_passes(wa.to(dev), wu.to(dev), B.to(dev))
        for off_a, off_u in [(1, 3), (4, 4), (5, 0), (27, 13)]:  # in elements: 2-54 bytes in bf16, 4-108 in fp32
            xa, xu = _off_line(wa.to(dev), off_a), _off_line(wu.to(dev), off_u)
            assert xa.is_contiguous() and xa.data_ptr() % 64 == off_a * xa.element_size() % 64
            T, P, vsq = _impl(backend).lowrank_passes(xa, xu, B.to(dev))
            if backend in ("cpp", "torch"):
                assert torch.equal(T, aligned[0]) and torch.equal(P, aligned[1]) and vsq == aligned[2], (d_out, off_a, off_u)
            _check_passes(backend, xa, xu, B, 2e-5)


@BACKEND_PARAMS
def test_degenerate_layers(backend):
    """V = 0: the passes return zeros and the score is nan with a reason; dW = 0 likewise."""
    dev = _DEVICE_OF[backend]
    g = torch.Generator().manual_seed(_seed("degenerate", backend))
    w = torch.randn(67, 131, generator=g).to(dev)
    A, B = torch.randn(4, 131, generator=g).to(dev), torch.randn(67, 4, generator=g).to(dev)
    T, P, vsq = _impl(backend).lowrank_passes(w, w.clone(), B)
    assert vsq == 0.0 and not T.any() and not P.any()
    s = ops.subspace_score(w, w.clone(), lora_A=A, lora_B=B, backend=backend)
    assert math.isnan(s.cosine) and "V = 0" in s.reason
    wu = w + 0.01 * torch.randn(w.shape, generator=g).to(dev)
    s = ops.subspace_score(w, wu, lora_A=A, lora_B=torch.zeros_like(B), backend=backend)
    assert math.isnan(s.cosine) and "zero" in s.reason
    s = ops.subspace_score(w, wu, delta=torch.zeros_like(w), backend=backend)
    assert math.isnan(s.cosine) and "zero" in s.reason
    with pytest.raises(ValueError, match="V = 0"):
        ops.project_lora_B(w, w.clone(), B, backend=backend)


@BACKEND_PARAMS
@pytest.mark.parametrize("dtype", [DTYPES["fp32"], DTYPES["bf16"]], ids=["dtype=fp32", "dtype=bf16"])
def test_same_bits_twice(backend, dtype):
    wa, wu, g = _layer(200, 333, dtype, _seed("bits", backend, dtype))
    B = torch.randn(200, 16, generator=g)
    dev = _DEVICE_OF[backend]
    impl = _impl(backend)
    T1, P1, v1 = impl.lowrank_passes(wa.to(dev), wu.to(dev), B.to(dev))
    T2, P2, v2 = impl.lowrank_passes(wa.to(dev), wu.to(dev), B.to(dev))
    assert torch.equal(T1, T2) and torch.equal(P1, P2) and v1 == v2
    dW = torch.randn(200, 333, generator=g).to(dtype).to(dev)
    assert impl.fullrank_sums(wa.to(dev), wu.to(dev), dW) == impl.fullrank_sums(wa.to(dev), wu.to(dev), dW)


# ------------------------------------------------------------------------------------------------
# The r x r remainder of a LoRA score: <T^T T, G>, <P^T P, G>, <B^T B, G> with G = A A^T

TRACE_BACKENDS = ["torch"] + (["cpp"] if _AVAILABLE["cpp"] is None else [])
# (d_out, d_in): one chunk; several chunks of 256 rows (d_out 2000: 8 chunks, d_in 600: 3); odd sizes
TRACE_SHAPES = [(256, 256), (2000, 600), (67, 131)]
TRACE_RANKS = [1, 3, 8, 13, 64, 128, 300]  # 64 and up: the Grams go parallel; 300: cpp hands them to torch


def _traces_ref(T, P, A, B):
    """The three traces in float64 from the stored values, and the sums of their terms' sizes."""
    A, T, P, B = (x.double() for x in (A, T, P, B))
    G = A @ A.t()
    out = []
    for X in (T, P, B):
        S = X.t() @ X
        out.append((float((S * G).sum()), float((S * G).abs().sum())))
    return out


def _traces_inputs(d_out, d_in, r, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    T = torch.randn(d_in, r, generator=g)
    P = torch.randn(d_out, r, generator=g)
    A = (torch.randn(r, d_in, generator=g) * 0.01).to(dtype)
    B = (torch.randn(d_out, r, generator=g) * 0.01).to(dtype)
    return T, P, A, B


@pytest.mark.parametrize("backend", TRACE_BACKENDS, ids=[f"backend={b}" for b in TRACE_BACKENDS])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=[f"dtype={k}" for k in DTYPES])
@pytest.mark.parametrize("d_out, d_in", TRACE_SHAPES, ids=[f"shape={a}x{b}" for a, b in TRACE_SHAPES])
@pytest.mark.parametrize("r", TRACE_RANKS, ids=[f"r={r}" for r in TRACE_RANKS])
def test_lowrank_traces_match_float64(backend, dtype, d_out, d_in, r):
    """float64 sums of exact products: off the float64 reference by rounding alone (1e-12 of the
    summed term sizes), for factors in every dtype, ranks with and without a padded tile."""
    from safemerge_ext import reference

    T, P, A, B = _traces_inputs(d_out, d_in, r, dtype, _seed("traces", backend, dtype, d_out, d_in, r))
    traces = getattr(_impl(backend), "lowrank_traces", reference.lowrank_traces)
    got = traces(T, P, A, B)
    for name, value, (want, size) in zip(("<TT,G>", "<PP,G>", "<BB,G>"), got, _traces_ref(T, P, A, B)):
        assert isinstance(value, float)
        assert abs(value - want) <= 1e-12 * size, f"{backend} {name}: {value} != {want}"


@needs_cpp
def test_cpp_traces_factors_of_two_dtypes():
    """lora_A and lora_B may be stored in different dtypes; each is read in its own."""
    from safemerge_ext import cpp_backend

    T, P, A, B = _traces_inputs(200, 96, 13, torch.float32, _seed("traces-mixed"))
    for a_dtype, b_dtype in [(torch.float32, torch.bfloat16), (torch.float16, torch.float32)]:
        Am, Bm = A.to(a_dtype), B.to(b_dtype)
        got = cpp_backend.lowrank_traces(T, P, Am, Bm)
        for value, (want, size) in zip(got, _traces_ref(T, P, Am, Bm)):
            assert abs(value - want) <= 1e-12 * size, (a_dtype, b_dtype, value, want)


@needs_cpp
def test_cpp_traces_bits_independent_of_thread_count_and_isa():
    """The Grams are summed per chunk of rows, then over chunks in order: the same bits from 1, 2
    or 3 threads (the shape is large enough to run in parallel) and from every ISA variant."""
    from safemerge_ext import _cpu

    T, P, A, B = _traces_inputs(2000, 600, 64, torch.bfloat16, _seed("traces-bits"))

    def call(threads):
        return _cpu.lowrank_traces(T.data_ptr(), P.data_ptr(), B.data_ptr(), 2, A.data_ptr(), 2, 2000, 600, 64, threads)

    first = call(1)
    assert call(2) == first and call(3) == first
    for isa in ISAS:
        if _cpu.set_isa(isa):
            try:
                assert call(2) == first, isa
            finally:
                _cpu.set_isa("best")


@needs_cpp
def test_cpp_traces_above_their_rank_use_the_reference():
    """Above TRACES_MAX_RANK (merged adapters of r_task + r_safety: 512 for two r=256 adapters) the
    float64 BLAS Grams of the reference are faster than the extension's, which grow as r^2 a row."""
    from safemerge_ext import cpp_backend, reference

    T, P, A, B = _traces_inputs(300, 200, cpp_backend.TRACES_MAX_RANK + 1, torch.bfloat16, _seed("traces-rank"))
    assert cpp_backend.lowrank_traces(T, P, A, B) == reference.lowrank_traces(T, P, A, B)


@needs_cpp
def test_cpp_traces_other_dtypes_use_the_reference():
    """Factors the extension does not read (float64 here) are scored by the torch reference."""
    from safemerge_ext import cpp_backend, reference

    T, P, A, B = _traces_inputs(67, 131, 5, torch.float64, _seed("traces-f64"))
    assert cpp_backend.lowrank_traces(T, P, A, B) == reference.lowrank_traces(T, P, A, B)


# ------------------------------------------------------------------------------------------------
# C++ extension specifics


def _cpu_call(wa, wu, B, threads):
    from safemerge_ext import _cpu

    d_out, d_in = wa.shape
    T = torch.empty(d_in, B.shape[1])
    P = torch.empty(d_out, B.shape[1])
    code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[wa.dtype]
    vsq = _cpu.lowrank_passes(wa.data_ptr(), wu.data_ptr(), d_out, d_in, d_in, d_in, code, B.data_ptr(),
                              B.shape[1], T.data_ptr(), P.data_ptr(), threads)
    return T, P, vsq


# The CPU's pick of kernels, the baseline build, which walks pass 1 by row groups up to r = 16 on
# every CPU, and AMD's AVX-512 build, which walks low ranks by column bands where the layer has a
# band for each core (where the CPU runs it), so both walks run here whatever the CPU picks.
WALK_ISAS = ["best", "baseline", "x86-64-v4"]


@pytest.fixture
def kernels(request, monkeypatch):
    """Select the C++ kernels named by the test's ``kernels`` parameter for the test, then restore."""
    from safemerge_ext import _cpu, cpp_backend

    monkeypatch.delenv(cpp_backend.ISA_ENV_VAR, raising=False)  # (it would pick the kernels on every call)
    before = _cpu.isa()
    if not _cpu.set_isa(request.param):
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    try:
        yield request.param
    finally:
        _cpu.set_isa(before)


@needs_cpp
@pytest.mark.parametrize("kernels", WALK_ISAS, ids=[f"isa={i}" for i in WALK_ISAS], indirect=True)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=[f"dtype={k}" for k in DTYPES])
@pytest.mark.parametrize("d_out, d_in", [(515, 1100), (300, 9000)], ids=["1 slice", "3 slices"])
def test_cpp_bits_independent_of_thread_count(kernels, dtype, d_out, d_in):
    """Pass 1 by row groups (r = 13, and r = 16 on AMX tiles where the CPU has them, where the build
    walks them so; in column slices of 4096 when d_in is wider) and by column bands (r = 40)
    alike; and right."""
    wa, wu, g = _layer(d_out, d_in, dtype, _seed("threads", dtype, d_in))
    for r in (13, 16, 40):
        B = torch.randn(d_out, r, generator=g)
        _check_passes("cpp", wa, wu, B, 2e-5)
        T1, P1, v1 = _cpu_call(wa, wu, B, 1)
        T2, P2, v2 = _cpu_call(wa, wu, B, 2)
        T3, P3, v3 = _cpu_call(wa, wu, B, 3)
        assert torch.equal(T1, T2) and torch.equal(T1, T3), r
        assert torch.equal(P1, P2) and torch.equal(P1, P3), r
        assert v1 == v2 == v3, r


def _mapped_pair(tmp_path: Path, d_out: int, d_in: int, dtype: torch.dtype, seed: int):
    """A weight pair written to a safetensors file (after a 3-element tensor, so neither starts on
    a page or line boundary), mapped back with ModelReader.map, and the in-memory originals."""
    from safetensors.torch import save_file

    from safemerge_ext.io.models import ModelReader

    wa, wu, g = _layer(d_out, d_in, dtype, seed)
    save_file({"pad": torch.ones(3, dtype=dtype), "a": wa, "u": wu}, str(tmp_path / "model.safetensors"))
    reader = ModelReader(tmp_path)
    return reader, reader.map("a"), reader.map("u"), wa, wu, g


RELEASE_SHAPES = [(333, 1100), (1000, 96), (4096, 700), (600, 8300)]


@needs_cpp
@pytest.mark.parametrize("kernels", WALK_ISAS, ids=[f"isa={i}" for i in WALK_ISAS], indirect=True)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=[f"dtype={k}" for k in DTYPES])
@pytest.mark.parametrize("d_out, d_in", RELEASE_SHAPES, ids=[f"shape={a}x{b}" for a, b in RELEASE_SHAPES])
def test_cpp_release_behind_same_bits(tmp_path, monkeypatch, kernels, dtype, d_out, d_in):
    """Weights mapped from a file, walked in row blocks whose pages are dropped as each pass is done
    with them (blocks of one 32-row chunk up to several; the last one partial): T, P and ||V||^2
    have the bits of the one-block walk, on any thread count, and the values stay those of the
    file (the dropped pages read back from the page cache)."""
    from safemerge_ext import cpp_backend

    reader, ma, mu, wa, wu, g = _mapped_pair(tmp_path, d_out, d_in, dtype, _seed("release", dtype, d_out, d_in))
    assert reader.is_mapped(ma) and reader.is_mapped(mu)
    row, default_threads = d_in * wa.element_size(), torch.get_num_threads()
    for r in (13, 16, 40):  # pass 1 by row groups (16: on AMX tiles where the CPU has them), and by column bands
        B = torch.randn(d_out, r, generator=g)
        want = cpp_backend.lowrank_passes(wa, wu, B)
        for block_bytes in (32 * row, 96 * row, 8 << 20):
            monkeypatch.setattr(cpp_backend, "RELEASE_BLOCK_BYTES", block_bytes)
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                try:
                    got = cpp_backend.lowrank_passes(ma, mu, B, release_behind=True)
                finally:
                    torch.set_num_threads(default_threads)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2], (
                    f"release_behind changed the bits: r = {r}, blocks of {block_bytes} bytes, {threads} threads")
    assert torch.equal(ma, wa) and torch.equal(mu, wu)
    _check_passes("cpp", ma, mu, B, 2e-5)
    # transposed views of the mappings are read through a contiguous copy, whose pages must stay
    monkeypatch.setattr(cpp_backend, "RELEASE_BLOCK_BYTES", 1)  # blocks of 32 rows
    Bt = torch.randn(d_in, 5, generator=g)
    want_t = cpp_backend.lowrank_passes(wa.t().contiguous(), wu.t().contiguous(), Bt)
    got_t = cpp_backend.lowrank_passes(ma.t(), mu.t(), Bt, release_behind=True)
    assert torch.equal(got_t[0], want_t[0]) and torch.equal(got_t[1], want_t[1]) and got_t[2] == want_t[2]


@needs_cpp
def test_cpp_release_behind_keeps_bytes_outside_the_view(tmp_path, monkeypatch):
    """Dropping pages behind a view of a mapping never takes bytes outside the view with them: rows
    before a row slice and columns beside a column slice keep what was written there (a dropped
    written page would read back the file's bytes)."""
    from safemerge_ext import cpp_backend

    reader, ma, mu, wa, wu, g = _mapped_pair(tmp_path, 3000, 1024, torch.bfloat16, 11)
    monkeypatch.setattr(cpp_backend, "RELEASE_BLOCK_BYTES", 64 * 1024 * 2)  # many row blocks
    ma[0] = 7.0
    cpp_backend.lowrank_passes(ma[1:], mu[1:], torch.randn(2999, 4, generator=g), release_behind=True)
    assert bool((ma[0] == 7.0).all()), "a page holding row 0 (outside ma[1:]) was dropped"
    ma2, mu2 = reader.map("a"), reader.map("u")
    ma2[:, 512:] = 3.0
    got = cpp_backend.lowrank_passes(ma2[:, :512], mu2[:, :512], torch.randn(3000, 4, generator=g),
                                     release_behind=True)
    assert bool((ma2[:, 512:] == 3.0).all()), "columns beside ma2[:, :512] went back to the file's bytes"
    assert torch.isfinite(got[1]).all()


@needs_cpp
def test_cpp_reads_fp64_weights_in_fp32(monkeypatch):
    """fp64 weights are computed in fp32, as the torch reference does, so `auto` takes them too."""
    from safemerge_ext import cpp_backend

    g = torch.Generator().manual_seed(5)
    wa = torch.randn(70, 50, generator=g, dtype=torch.float64)
    wu = wa + 0.1 * torch.randn(70, 50, generator=g, dtype=torch.float64)
    B = torch.randn(70, 3, generator=g)
    T, P, vsq = cpp_backend.lowrank_passes(wa, wu, B)
    T_ref, P_ref, vsq_ref = ref_lowrank_passes(wa, wu, B)
    assert_close(T, T_ref, atol=1e-5 * float(T_ref.abs().max()), rtol=1e-5, what="T")
    assert_close(P, P_ref, atol=1e-5 * float(P_ref.abs().max()), rtol=1e-5, what="P")
    assert abs(vsq - vsq_ref) <= 1e-6 * vsq_ref
    A = torch.randn(3, 50, generator=g)
    assert abs(ops.subspace_cosine(wa, wu, lora_A=A, lora_B=B, backend="cpp") - ref_cosine(wa, wu, B @ A)) < 1e-5


@needs_cpp
@pytest.mark.parametrize("r", [3, 40], ids=["low rank", "high rank"])
@pytest.mark.parametrize("d_out, d_in", [(0, 70), (50, 0)], ids=["no rows", "no columns"])
def test_cpp_empty_v_gives_zeros(d_out, d_in, r):
    """A direct call with an empty V (null data pointers for the empty operands) writes T = 0 and
    P = 0 at any rank (not what they held before), answered before either pass-1 walk."""
    from safemerge_ext import _cpu

    w = torch.randn(d_out, d_in)
    B = torch.randn(d_out, r)
    T, P = torch.full((d_in, r), float("nan")), torch.full((d_out, r), float("nan"))
    vsq = _cpu.lowrank_passes(w.data_ptr(), w.data_ptr(), d_out, d_in, d_in, d_in, 0, B.data_ptr(), r,
                              T.data_ptr(), P.data_ptr(), 2)
    assert vsq == 0.0
    assert torch.equal(T, torch.zeros(d_in, r)) and torch.equal(P, torch.zeros(d_out, r))


@needs_cpp
def test_cpp_release_rows_must_be_whole_chunks():
    from safemerge_ext import _cpu

    w = torch.randn(64, 16)
    B = torch.randn(64, 2)
    T, P = torch.empty(16, 2), torch.empty(64, 2)
    with pytest.raises(ValueError, match="multiple of 32"):
        _cpu.lowrank_passes(w.data_ptr(), w.data_ptr(), 64, 16, 16, 16, 0, B.data_ptr(), 2, T.data_ptr(),
                            P.data_ptr(), 1, 48)


_RSS_SCRIPT = """
import sys, torch
from safemerge_ext import cpp_backend
from safemerge_ext.io.models import ModelReader

def rss_kb(field):
    return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1])

cpp_backend.RELEASE_BLOCK_BYTES = 4 << 20
reader = ModelReader(sys.argv[1])
wa, wu = reader.map("a"), reader.map("u")
B = torch.randn(wa.shape[0], 8)
cpp_backend.lowrank_passes(wa[:64], wu[:64], B[:64])  # first touches of the code and buffers
try:
    with open('/proc/self/clear_refs', 'w') as f:  # the peak starts again from here
        f.write('5')
except OSError as e:
    print('SKIP', e)
    sys.exit(0)
before = rss_kb('VmRSS')
cpp_backend.lowrank_passes(wa, wu, B, release_behind=sys.argv[2] == '1')
print(rss_kb('VmHWM') - before, rss_kb('VmRSS') - before)
"""


@needs_cpp
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_cpp_release_behind_bounds_resident_pages(tmp_path):
    """Scoring a 2 x 32 MiB pair mapped from a file: without drop-behind the whole pair becomes
    resident; with it (4 MiB blocks) the peak is a few blocks and most pages have left by the end."""
    import os
    import sys

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(_seed("rss"))
    pair = {n: (torch.randn(4096, 4096, generator=g) * 0.02).bfloat16() for n in ("a", "u")}
    save_file({"pad": torch.ones(3, dtype=torch.bfloat16), **pair}, str(tmp_path / "model.safetensors"))
    pair_mib = 64
    grown = {}
    for release in ("0", "1"):
        proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path), release], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr[-2000:]
        if proc.stdout.startswith("SKIP"):
            pytest.skip(f"cannot reset the peak RSS here: {proc.stdout.strip()}")
        peak_kb, after_kb = (int(x) for x in proc.stdout.split())
        grown[release] = (peak_kb / 1024, after_kb / 1024)
    print(f"grown (peak, after) MiB: {grown}")
    assert grown["0"][0] > 0.85 * pair_mib, f"the control run never held the pair: {grown}"
    assert grown["1"][0] < 0.5 * pair_mib, f"drop-behind held {grown['1'][0]:.0f} of {pair_mib} MiB at its peak"
    assert grown["1"][1] < 0.3 * pair_mib, f"drop-behind left {grown['1'][1]:.0f} MiB resident"


ISAS = ["baseline", "x86-64-v3", "x86-64-v4", "x86-64-v4-512", "x86-64-v4-amx"]
# every remainder of both rank tilings (pass 1: tiles of 6, or 8 on x86-64-v4; pass 2: 3, or 4)
ISA_RANKS = [1, 2, 3, 4, 5, 7, 8, 11, 13, 16, 17]


@needs_cpp
@pytest.mark.parametrize("isa", ISAS, ids=[f"isa={i}" for i in ISAS])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=[f"dtype={k}" for k in DTYPES])
def test_cpp_every_isa_matches_float64(isa, dtype, monkeypatch):
    """Each compiled variant this CPU can run is correct, not only the one the import picks, at a
    shape with partial bands, row chunks, tiles and 16-column groups, and at every rank remainder."""
    from safemerge_ext import _cpu, cpp_backend

    monkeypatch.delenv(cpp_backend.ISA_ENV_VAR, raising=False)  # (it would pick the kernels on every call)

    best = _cpu.isa()
    if not _cpu.set_isa(isa):
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    try:
        assert _cpu.isa() == isa
        for r in ISA_RANKS:
            wa, wu, g = _layer(131, 1100, dtype, _seed("isa", isa, dtype, r))
            B = torch.randn(131, r, generator=g)
            _check_passes("cpp", wa, wu, B, 2e-5)
    finally:
        _cpu.set_isa(best)  # (the kernels this process ran before: the CPU's pick, or SAFEMERGE_CPU_ISA's)
    assert _cpu.isa() == best


def _want_walk(isa: str, d_out: int, d_in: int, r: int, procs: int) -> str:
    """Pass 1's walk rule: row groups up to r = 16 while a group's partial T (r x (d_in rounded up
    to 32, + 16) floats) stays within 512 KiB, column bands otherwise; AMD's AVX-512 build takes
    bands at low ranks too, unless the layer has fewer bands (512 columns) than the machine has
    logical CPUs and the row walk more work items (row groups x 4096-column slices)."""
    if r > 16 or r * (-(-d_in // 32) * 32 + 16) * 4 > 512 << 10:
        return "bands"
    if isa != "x86-64-v4":
        return "rows"
    bands, chunks = -(-d_in // 512), -(-d_out // 32)
    group_rows = 32 * max(8, -(-chunks // 16))
    items = -(-d_out // group_rows) * -(-d_in // 4096)
    return "rows" if bands < procs and items > bands else "bands"


@needs_cpp
def test_cpp_pass1_walk_follows_the_rule(monkeypatch):
    """Which walk pass 1 takes depends on the shape, the build and the machine's CPU count only
    (never a call's threads), at and across each boundary of the rule, for several CPU counts."""
    from safemerge_ext import _cpu, cpp_backend

    monkeypatch.delenv(cpp_backend.ISA_ENV_VAR, raising=False)
    before = _cpu.isa()
    shapes = [(4096, 4096, 8), (4096, 4096, 16), (4096, 4096, 17), (4096, 4096, 40), (512, 4096, 8),
              (11008, 512, 8), (64, 96, 3), (1024, 8160, 16), (1024, 8161, 16), (256, 512, 8), (512, 512, 8),
              (4096, 3584, 8), (4096, 4608, 8), (4096, 8192, 8)]
    try:
        for procs in (1, 2, 7, 8, 9, 16, 64):
            _cpu.set_procs(procs)
            assert _cpu.procs() == procs
            for isa in ISAS:
                if _cpu.set_isa(isa):
                    for d_out, d_in, r in shapes:
                        assert _cpu.pass1_walk(d_out, d_in, r) == _want_walk(isa, d_out, d_in, r, procs), \
                            (procs, isa, d_out, d_in, r)
        _cpu.set_procs(2)  # (this project's VMs)
        if _cpu.set_isa("x86-64-v4"):
            assert [_cpu.pass1_walk(4096, 4096, r) for r in (8, 16)] == ["bands", "bands"]
        with pytest.raises(ValueError, match="r >= 1"):
            _cpu.pass1_walk(1000, 96, 0)
    finally:
        _cpu.set_procs(0)
        _cpu.set_isa(before)
    assert _cpu.procs() >= 1


@needs_cpp
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=[f"dtype={k}" for k in DTYPES])
def test_cpp_amd_build_is_right_on_either_walk(dtype, monkeypatch):
    """AMD's AVX-512 build (where the CPU runs it) at low ranks on both of its walks: bands on a
    machine with few CPUs, row groups on one with more CPUs than the layer has bands; the same
    values to fp32 accuracy, and each walk's bits the same on 1, 2 and 3 threads."""
    from safemerge_ext import _cpu, cpp_backend

    monkeypatch.delenv(cpp_backend.ISA_ENV_VAR, raising=False)
    before = _cpu.isa()
    if not _cpu.set_isa("x86-64-v4"):
        pytest.skip("this CPU cannot run the x86-64-v4 kernels")
    try:
        wa, wu, g = _layer(2100, 1100, dtype, _seed("amd-walks", dtype))  # (3 bands, 9 row groups)
        for r in (5, 16):
            B = torch.randn(2100, r, generator=g)
            for procs, walk in ((2, "bands"), (64, "rows")):
                _cpu.set_procs(procs)
                assert _cpu.pass1_walk(2100, 1100, r) == walk
                _check_passes("cpp", wa, wu, B, 2e-5)
                T1, P1, v1 = _cpu_call(wa, wu, B, 1)
                for threads in (2, 3):
                    T, P, v = _cpu_call(wa, wu, B, threads)
                    assert torch.equal(T, T1) and torch.equal(P, P1) and v == v1, (r, walk, threads)
    finally:
        _cpu.set_procs(0)
        _cpu.set_isa(before)


AMX_SHAPES = [(131, 1100), (67, 131), (33, 17), (200, 96), (530, 520)]
AMX_RANKS = [16, 17, 31, 33, 64, 65, 100]


@needs_cpp
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=[f"dtype={k}" for k in DTYPES])
def test_cpp_amx_tiles_match_float64(dtype, monkeypatch):
    """The AMX build (where this CPU has it) at rows, columns and ranks that fill no whole tile,
    and with B's values needing one, two or three bf16 parts (a bf16, an fp16 and an fp32 adapter),
    by row groups and by column bands."""
    from safemerge_ext import _cpu, cpp_backend

    monkeypatch.delenv(cpp_backend.ISA_ENV_VAR, raising=False)  # (it would pick the kernels on every call)

    if not _cpu.set_isa("x86-64-v4-amx"):
        pytest.skip("this CPU (or OS) cannot run the AMX kernels")
    try:  # (the report says which ranks run which kernels)
        assert backends.backend_detail("cpp").endswith(f"ranks below {_cpu.AMX_MIN_RANK} on x86-64-v4-512 kernels")
        for d_out, d_in in AMX_SHAPES:
            wa, wu, g = _layer(d_out, d_in, dtype, _seed("amx", dtype, d_out, d_in))
            for r in AMX_RANKS:
                for b_dtype in (torch.bfloat16, torch.float16, torch.float32):
                    B = torch.randn(d_out, r, generator=g).to(b_dtype).float()
                    _check_passes("cpp", wa, wu, B, 2e-5)
    finally:
        _cpu.set_isa("best")


def _exact_case(case: str, dtype: torch.dtype, g: torch.Generator):
    """Integer inputs whose every product and partial sum fits fp32's 24 bits, so any correct kernel
    gives the float64 result to the bit; each case needs another part of the AMX kernels' splits."""
    def ints(lo, hi, *shape):
        return torch.randint(lo, hi + 1, shape, generator=g).float()

    if case == "B in three bf16 parts":  # 20-bit B; V = +-1 over 8 rows: |T| < 2^23
        a = ints(0, 1, 8, 48)
        u, B = 1 - a, ints(-(2**20) + 1, 2**20 - 1, 8, 17)
    elif case == "T in three bf16 parts":  # |T| < 8 * 2^17 (about 19 bits), |P| < 16 * 2^20
        a = ints(0, 1, 8, 16)
        u, B = 1 - a, ints(-(2**17) + 1, 2**17 - 1, 8, 17)
    else:  # V in [0, 510] (9 bits): |T| <= 4 * 510, |P| <= 16 * 510 * 2040 < 2^24
        a, u, B = ints(0, 255, 4, 16), ints(-255, 0, 4, 16), ints(-1, 1, 4, 17)
    return a.to(dtype), u.to(dtype), B


EXACT_CASES = ["B in three bf16 parts", "T in three bf16 parts", "V in two bf16 parts"]


@needs_cpp
@pytest.mark.parametrize("isa", ISAS, ids=[f"isa={i}" for i in ISAS])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=[f"dtype={k}" for k in DTYPES])
def test_cpp_exact_on_integer_inputs(isa, dtype):
    """Where fp32 sums are exact, every ISA build gives T, P and ||V||^2 to the bit (the AMX build
    included, whose bf16 splits of V, B and T must leave nothing out)."""
    from safemerge_ext import _cpu

    if not _cpu.set_isa(isa):
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    try:
        g = torch.Generator().manual_seed(_seed("exact", isa, dtype))
        for case in EXACT_CASES:
            wa, wu, B = _exact_case(case, dtype, g)
            T, P, vsq = _cpu_call(wa, wu, B, 2)
            V = wa.double() - wu.double()
            T_ref = V.t() @ B.double()
            assert torch.equal(T.double(), T_ref), f"{isa} {case}: T off by {(T.double() - T_ref).abs().max()}"
            assert vsq == float(V.square().sum()), f"{isa} {case}: ||V||^2"
            if case != "B in three bf16 parts":
                P_ref = V @ T_ref
                assert torch.equal(P.double(), P_ref), f"{isa} {case}: P off by {(P.double() - P_ref).abs().max()}"
    finally:
        _cpu.set_isa("best")


@needs_cpp
@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU flags from /proc/cpuinfo")
def test_cpp_best_isa_is_one_the_cpu_runs():
    """The import's pick, and what set_isa accepts, follow the CPU's flags (AVX-512 builds only
    with AVX-512, the AMX build only with AMX tiles and bf16)."""
    from safemerge_ext import _cpu

    line = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    flags = set(line.partition(":")[2].split())
    if not flags:
        pytest.skip("no CPU flags in /proc/cpuinfo")
    _cpu.set_isa("best")
    best = _cpu.isa()
    avx512 = {"avx512f", "avx512vl"} <= flags
    try:
        if not avx512:
            assert best in ("x86-64-v3", "baseline"), best
            assert not _cpu.set_isa("x86-64-v4-512") and not _cpu.set_isa("x86-64-v4")
        if not {"amx_tile", "amx_bf16", "avx512bw", "avx512dq"} <= flags or not avx512:
            assert best != "x86-64-v4-amx" and not _cpu.set_isa("x86-64-v4-amx")
        if {"avx2", "fma"} <= flags:
            assert best != "baseline"
        assert _cpu.procs() >= 1
    finally:
        _cpu.set_isa("best")


@needs_cpp
@pytest.mark.parametrize("isa", ISAS, ids=[f"isa={i}" for i in ISAS])
def test_cpp_non_finite_b_gives_non_finite_results(isa):
    """A NaN (any payload, all ones included) or an infinity in B reaches T and P, on every build,
    so the callers' checks see it (the AMX build splits B into bf16 parts: a NaN must stay one)."""
    from safemerge_ext import _cpu

    if not _cpu.set_isa(isa):
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    try:
        for bits in (0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0x7F800000):
            wa, wu, g = _layer(67, 131, torch.bfloat16, _seed("nonfinite", isa, bits))
            B = torch.randn(67, 17, generator=g)
            B.view(torch.int32)[5, 3] = bits - (1 << 32) if bits >= 1 << 31 else bits
            T, P, _ = _cpu_call(wa, wu, B, 2)
            assert not torch.isfinite(T[:, 3]).all() and not torch.isfinite(P).all(), (isa, hex(bits))
    finally:
        _cpu.set_isa("best")


@needs_cpp
def test_cpp_isa_env_override(monkeypatch, recwarn, capsys):
    """SAFEMERGE_CPU_ISA picks the kernels (and the report and `safemerge backends` name them); a
    name that is not an ISA turns the backend off, with a reason, a warning and an error on use."""
    from safemerge_ext import _cpu, cli, cpp_backend

    best = _cpu.isa()
    monkeypatch.setattr(cpp_backend, "_warned", set())
    try:
        monkeypatch.setenv(cpp_backend.ISA_ENV_VAR, "baseline")
        wa, wu, g = _layer(67, 131, torch.bfloat16, _seed("isa-env"))
        _check_passes("cpp", wa, wu, torch.randn(67, 5, generator=g), 2e-5)
        assert _cpu.isa() == "baseline"  # (each call reads the variable)
        _cpu.set_isa("best")
        assert backends.backend_detail("cpp").startswith("baseline kernels, ")
        assert cli.main(["backends"]) == 0
        assert "cpp     available (baseline kernels, " in capsys.readouterr().out

        monkeypatch.setenv(cpp_backend.ISA_ENV_VAR, "avx9")
        reason = backends.available_backends()["cpp"]
        assert reason and "SAFEMERGE_CPU_ISA='avx9' is not one of best, x86-64-v4-amx, x86-64-v4-512" in reason
        assert any("the C++ backend is off" in str(w.message) for w in recwarn.list)
        assert backends.resolve("auto", "cpu")[0] == "torch"  # (loaded before: asked again all the same)
        with pytest.raises(ValueError, match="'cpp' is unavailable: SAFEMERGE_CPU_ISA='avx9' is not one of"):
            ops.subspace_score(wa, wu, lora_A=torch.randn(5, 131), lora_B=torch.randn(67, 5), backend="cpp")
        can_512 = _cpu.set_isa("x86-64-v4-512")
        _cpu.set_isa("baseline")
        monkeypatch.setenv(cpp_backend.ISA_ENV_VAR, "x86-64-v4-512")
        reason = backends.available_backends()["cpp"]
        if can_512:
            assert reason is None and _cpu.isa() == "x86-64-v4-512"
        else:  # the ISA exists, this CPU cannot run it; a failed override leaves the selection as it was
            assert reason and "cannot run those kernels; it runs " in reason and reason.endswith("baseline")
            assert _cpu.isa() == "baseline"
        monkeypatch.delenv(cpp_backend.ISA_ENV_VAR)
        _cpu.set_isa("best")
        assert backends.available_backends()["cpp"] is None and _cpu.isa() == best
        # the variable unset again in the same process: the CPU's pick again (it kept the variable's,
        # review136), while a pick made with set_isa stays
        monkeypatch.setenv(cpp_backend.ISA_ENV_VAR, "baseline")
        assert backends.available_backends()["cpp"] is None and _cpu.isa() == "baseline"
        monkeypatch.delenv(cpp_backend.ISA_ENV_VAR)
        assert backends.available_backends()["cpp"] is None and _cpu.isa() == best
        assert backends.backend_detail("cpp").startswith(f"{best} kernels, ")
        _cpu.set_isa("baseline")
        assert backends.available_backends()["cpp"] is None and _cpu.isa() == "baseline"
    finally:
        _cpu.set_isa("best")


@needs_cpp
def test_cpp_fullrank_column_blocks(monkeypatch):
    """fullrank_sums / project_full with M_J split into several column blocks and the squares
    summed in several row chunks, against float64."""
    from safemerge_ext import cpp_backend, reference

    monkeypatch.setattr(cpp_backend, "_M_BYTES", 4 * 131 * 40)  # M_J of 40 columns: 4 column blocks
    monkeypatch.setattr(cpp_backend, "_MIN_COLS", 40)
    monkeypatch.setattr(cpp_backend, "_ROW_BLOCK", 32)
    monkeypatch.setattr(reference, "_SQ_CHUNK", 7 * 131)  # float64 squares summed 7 rows at a time
    wa, wu, g = _layer(67, 131, torch.bfloat16, _seed("fullrank"))
    dW = torch.randn(67, 131, generator=g) * 0.001
    V, D = wa.double() - wu.double(), dW.double()
    M = V.t() @ D
    N = V @ M
    m2, n2, d2, vsq = cpp_backend.fullrank_sums(wa, wu, dW)
    for got, want, name in [(m2, M.square().sum(), "m2"), (n2, N.square().sum(), "n2"),
                            (d2, D.square().sum(), "d2"), (vsq, V.square().sum(), "vsq")]:
        assert math.isclose(got, float(want), rel_tol=1e-5), f"{name}: {got} != {float(want)}"
    out, vsq2 = cpp_backend.project_full(wa, wu, dW)
    assert vsq2 == vsq
    assert_close(out, N, atol=2e-5 * float(N.abs().max()), rtol=2e-5, what="cpp project_full")


@needs_cpp
def test_cpp_rejects_bad_inputs():
    from safemerge_ext import cpp_backend

    w = torch.zeros(8, 4)
    with pytest.raises(ValueError, match="one dtype"):
        cpp_backend.lowrank_passes(w, w.bfloat16(), torch.zeros(8, 2))
    with pytest.raises(ValueError, match="one shape"):
        cpp_backend.lowrank_passes(w, torch.zeros(4, 8), torch.zeros(8, 2))
    with pytest.raises(ValueError, match="fp32, fp16, bf16 or fp64 weights; got torch.int32"):
        cpp_backend.lowrank_passes(w.int(), w.int(), torch.zeros(8, 2))
    with pytest.raises(ValueError, match="want 8xr"):
        cpp_backend.lowrank_passes(w, w, torch.zeros(7, 2))


@needs_cpp
def test_cpp_extension_has_no_torch_dependency():
    """The .so links against neither libtorch nor c10, so it survives torch upgrades."""
    from safemerge_ext import _cpu

    blob = Path(_cpu.__file__).read_bytes()
    for lib in (b"libtorch", b"libc10", b"at::Tensor"):
        assert lib not in blob, f"{_cpu.__file__} references {lib.decode()}"


def test_unavailable_reasons_are_strings():
    """Missing extensions become reasons, never import errors."""
    from safemerge_ext import cpp_backend, cuda_backend

    for mod in (cpp_backend, cuda_backend):
        reason = mod.unavailable_reason()
        assert reason is None or (isinstance(reason, str) and reason)
    if not torch.cuda.is_available():
        assert cuda_backend.unavailable_reason() is not None


@pytest.mark.parametrize("shape", [(0, 8), (8, 0), (0, 0)])
def test_cpp_fullrank_of_an_empty_weight(shape):
    """The blocked full-rank path called directly (ops refuses empty weights before): sums of nothing."""
    from safemerge_ext import cpp_backend

    if cpp_backend.unavailable_reason():
        pytest.skip(cpp_backend.unavailable_reason())
    z = torch.zeros(shape)
    assert cpp_backend.fullrank_sums(z, z, z) == (0.0, 0.0, 0.0, 0.0)
    out, vsq = cpp_backend.project_full(z, z, z)
    assert out.shape == shape and vsq == 0.0


@pytest.mark.parametrize("which", ["cpp", "cuda"])
def test_an_extension_that_is_there_but_does_not_load_is_not_called_unbuilt(monkeypatch, tmp_path, which):
    """A built .so that fails to load (a libstdc++ or driver mismatch) was reported as "not built"."""
    from safemerge_ext import _native, cpp_backend, cuda_backend

    mod, name = (cpp_backend, "_cpu") if which == "cpp" else (cuda_backend, "_cuda")
    loaded = getattr(mod, name)
    monkeypatch.setattr(mod, name, None)
    monkeypatch.setattr(mod, "_IMPORT_ERROR", "undefined symbol: _ZTVN10__cxxabiv117__class_type_infoE")
    so = tmp_path / f"{name}.cpython-311-x86_64-linux-gnu.so"
    monkeypatch.setattr(_native, "built_file", lambda m: str(so) if m == f"safemerge_ext.{name}" else None)
    reason = mod.unavailable_reason()
    assert reason.startswith(f"the {'C++' if which == 'cpp' else 'CUDA'} extension {so} is installed but does not "
                             "load (undefined symbol: ") and "reinstall safemerge-ext" in reason, reason
    monkeypatch.setattr(_native, "built_file", lambda m: None)
    assert "extension was not built" in mod.unavailable_reason()
    monkeypatch.undo()
    assert _native.built_file("safemerge_ext.no_such_extension") is None
    if loaded is not None:
        assert _native.built_file(f"safemerge_ext.{name}") == loaded.__file__


# ------------------------------------------------------------------------------------------------
# CUDA sources: compiled with nvcc here (nothing can run them without a GPU)


def _cudart_dirs(nvcc: str) -> list[Path]:
    root = Path(nvcc).resolve().parent.parent
    return [d for d in (root / "lib64", root / "lib", root / "targets/x86_64-linux/lib", Path("/usr/local/cuda/lib64"))
            if (d / "libcudart_static.a").exists()]


@pytest.fixture(scope="module")
def cuda_module_built_here(tmp_path_factory):
    """The CUDA extension built here for sm_90 (H100/H200) at the optimization users get: ptxas must
    report no register spills or local memory, the host compiler no warning. Linked and imported
    (it loads without a GPU; any CUDA call then fails), so the bindings can be called."""
    import importlib.util
    import sysconfig

    import pybind11

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found on PATH")
    tmp = tmp_path_factory.mktemp("cuda-build")
    obj = tmp / "cuda_ops.o"
    cmd = [nvcc, "-c", str(ROOT / "csrc" / "cuda_ops.cu"), "-o", str(obj), "-std=c++17",
           "-gencode", "arch=compute_90,code=sm_90", "-Xptxas", "-warn-spills,-warn-lmem-usage",
           "-Xcompiler", "-Wall,-fPIC"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}"
    assert "warning" not in res.stderr.lower(), f"{' '.join(cmd)}:\n{res.stderr[-4000:]}"
    dirs = _cudart_dirs(nvcc)
    if not dirs:
        pytest.skip(f"libcudart_static.a not found near {nvcc}")
    so = tmp / ("_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = ["g++", "-O1", "-shared", "-fPIC", "-std=c++17", "-Wall", f"-I{sysconfig.get_paths()['include']}",
           f"-I{pybind11.get_include()}", str(ROOT / "csrc" / "cuda_bindings.cpp"), str(obj), f"-L{dirs[0]}",
           "-lcudart_static", "-ldl", "-lrt", "-lpthread", "-o", str(so)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}"
    spec = importlib.util.spec_from_file_location("_cuda", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cuda_entry_points_check_their_workspace(cuda_module_built_here):
    """A plan made for another shape, a short workspace or r = 0 is refused before any launch
    (these checks run before the extension touches a device, so they run here)."""
    _cuda = cuda_module_built_here
    small = _cuda.lowrank_plan(64, 64, 8, 132)
    big = _cuda.lowrank_plan(8192, 8192, 8, 132)
    assert big.splits1 > 1 and small.ws_floats < big.ws_floats
    args = dict(wa=0, wu=0, d_out=8192, d_in=8192, lda=8192, ldu=8192, dtype=2, b=0, r=8, t_out=0, p_out=0,
                ws_f=0, ws_d=0, device=0, stream=0)
    with pytest.raises(ValueError, match="workspace"):
        _cuda.lowrank_passes(**args, ws_f_len=small.ws_floats, ws_d_len=small.ws_doubles, plan=big)
    with pytest.raises(ValueError, match="plan does not fit"):
        _cuda.lowrank_passes(**{**args, "d_out": 64, "d_in": 64, "lda": 64, "ldu": 64},
                             ws_f_len=big.ws_floats, ws_d_len=big.ws_doubles, plan=big)
    with pytest.raises(ValueError, match="rank"):
        _cuda.lowrank_passes(**{**args, "r": 0}, ws_f_len=big.ws_floats, ws_d_len=big.ws_doubles, plan=big)
    with pytest.raises(ValueError, match="row stride below d_in"):
        _cuda.lowrank_passes(**{**args, "lda": 8191}, ws_f_len=big.ws_floats, ws_d_len=big.ws_doubles, plan=big)
    with pytest.raises(ValueError, match="row stride below d_in"):
        _cuda.fullrank(wa=0, wu=0, w_dtype=2, delta=0, d_dtype=2, d_out=512, d_in=512, lda=512, ldu=512, ldd=500,
                       col_block=512, m_scratch=0, n_out=0, partials=0, partials_len=1 << 20, sums=0, device=0,
                       stream=0)
    with pytest.raises(ValueError, match="partials"):
        _cuda.fullrank(wa=0, wu=0, w_dtype=2, delta=0, d_dtype=2, d_out=512, d_in=512, lda=512, ldu=512, ldd=512,
                       col_block=512, m_scratch=0, n_out=0, partials=0, partials_len=3, sums=0, device=0, stream=0)


def test_cuda_device_problem_says_when_there_is_no_driver(cuda_module_built_here):
    """On a machine without an NVIDIA driver the reason says so, not only the runtime's "driver
    version is insufficient" (which reads as an old driver)."""
    import ctypes.util

    if ctypes.util.find_library("cuda") or Path("/proc/driver/nvidia").exists():
        pytest.skip("this machine has an NVIDIA driver")
    problem = cuda_module_built_here.device_problem()
    assert problem.startswith("no NVIDIA driver on this machine (the CUDA runtime reports: "), problem


def test_cuda_bindings_load_beside_another_build(cuda_module_built_here, tmp_path):
    """Two builds of the CUDA bindings load in one process (an installed extension and one built
    elsewhere, as this suite's own build beside a CUDA torch's `make setup`), and each one's plan
    type works with its own calls."""
    import importlib.util

    so = Path(cuda_module_built_here.__file__)
    copy = tmp_path / so.name
    shutil.copyfile(so, copy)
    # (under another module's name, as safemerge_ext._cuda beside this suite's _cuda; one copy and
    # name would be the same module again)
    spec = importlib.util.spec_from_file_location("another_build._cuda", copy)
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)  # (a type registered globally: "LowrankPlan" is already registered)
    for mod in (cuda_module_built_here, other):
        plan = mod.lowrank_plan(8192, 8192, 8, 132)
        assert plan.splits1 > 1
        with pytest.raises(ValueError, match="rank"):
            mod.lowrank_passes(wa=0, wu=0, d_out=8192, d_in=8192, lda=8192, ldu=8192, dtype=2, b=0, r=0, t_out=0,
                               p_out=0, ws_f=0, ws_f_len=plan.ws_floats, ws_d=0, ws_d_len=plan.ws_doubles, plan=plan,
                               device=0, stream=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the stubbed calls would launch on host memory")
def test_cuda_backend_calls_match_the_bindings(cuda_module_built_here, monkeypatch):
    """cuda_backend's calls bind to the extension's signatures (a mismatch would first show on a
    user's GPU): with the device calls stubbed, each call gets past argument binding and the
    workspace checks and fails only at the first CUDA runtime call, for want of a device."""
    from cuda_emulator import route_cuda_backend
    from safemerge_ext import cuda_backend

    route_cuda_backend(monkeypatch, cuda_module_built_here, sms=132)
    wa, wu, g = _layer(1024, 512, torch.bfloat16, _seed("bindings"))
    for r in (8, 256, 300):  # (the first rank group of 300 is 256 ranks: its plan and workspace)
        with pytest.raises(RuntimeError, match="cudaGetDevice"):
            cuda_backend.lowrank_passes(wa, wu, torch.randn(1024, r, generator=g))
    with pytest.raises(RuntimeError, match="cudaGetDevice"):
        cuda_backend.fullrank_sums(wa, wu, wa - wu)
    with pytest.raises(RuntimeError, match="cudaGetDevice"):
        cuda_backend.project_full(wa, wu, wa - wu)


_cuda_ok = torch.cuda.is_available() and _AVAILABLE["cuda"] is None


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ok, reason=f"needs a CUDA device and the CUDA extension: {_AVAILABLE['cuda']}")
@pytest.mark.parametrize("d_out, d_in, r", [(4096, 1024, 16), (4096, 4096, 64), (67, 131, 300)],
                         ids=["shape=4096x1024-r16", "shape=4096x4096-r64", "shape=67x131-r300"])
def test_cuda_large_shapes(d_out, d_in, r):
    wa, wu, g = _layer(d_out, d_in, torch.bfloat16, _seed("gpu", d_out, d_in, r))
    B = torch.randn(d_out, r, generator=g) * 0.01
    _check_passes("cuda", wa, wu, B, 1e-4)
    dW = (torch.randn(d_out, d_in, generator=g) * 0.001).bfloat16()
    V, D = wa.double() - wu.double(), dW.double()
    M = V.t() @ D
    want = float(M.square().sum()) / math.sqrt(float((V @ M).square().sum()) * float(D.square().sum()))
    got = ops.subspace_cosine(wa.cuda(), wu.cuda(), delta=dW.cuda(), backend="cuda")
    assert abs(got - want) <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ok, reason=f"needs a CUDA device and the CUDA extension: {_AVAILABLE['cuda']}")
def test_cuda_split_reductions_give_the_same_bits_twice():
    """4096x1024 on a GPU with tens of SMs splits both passes' reductions (lowrank_plan); the
    partials are summed in a fixed order, so two runs give the same bits."""
    from safemerge_ext import _cuda, cuda_backend

    wa, wu, g = _layer(4096, 1024, torch.bfloat16, _seed("gpu-splits"))
    plan = _cuda.lowrank_plan(4096, 1024, 16, torch.cuda.get_device_properties(0).multi_processor_count)
    if plan.splits1 == 1 or plan.splits2 == 1:
        pytest.skip(f"this GPU's {torch.cuda.get_device_properties(0).multi_processor_count} SMs split 4096x1024 in "
                    f"{plan.splits1} x {plan.splits2}: needs about 33 or more")
    B = (torch.randn(4096, 16, generator=g) * 0.01).cuda()
    runs = [cuda_backend.lowrank_passes(wa.cuda(), wu.cuda(), B) for _ in range(3)]
    for T, P, vsq in runs[1:]:
        assert torch.equal(T, runs[0][0]) and torch.equal(P, runs[0][1]) and vsq == runs[0][2]


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ok, reason=f"needs a CUDA device and the CUDA extension: {_AVAILABLE['cuda']}")
def test_cuda_fullrank_column_blocks(monkeypatch):
    """fullrank_sums / project_full with M_J formed in several column blocks (c0 > 0), which the
    default budget reaches only for d_in > 8192, against float64."""
    from safemerge_ext import cuda_backend

    monkeypatch.setattr(cuda_backend, "_M_BYTES", 4 * 1000 * 300)  # M_J of 300 columns: 4 blocks
    monkeypatch.setattr(cuda_backend, "_MIN_COLS", 300)
    wa, wu, g = _layer(700, 1000, torch.bfloat16, _seed("gpu-fullrank-blocks"))
    dW = (torch.randn(700, 1000, generator=g) * 0.001).bfloat16()
    V, D = wa.double() - wu.double(), dW.double()
    M = V.t() @ D
    N = V @ M
    m2, n2, d2, vsq = cuda_backend.fullrank_sums(wa.cuda(), wu.cuda(), dW.cuda())
    for got, want, name in [(m2, M.square().sum(), "m2"), (n2, N.square().sum(), "n2"),
                            (d2, D.square().sum(), "d2"), (vsq, V.square().sum(), "vsq")]:
        assert math.isclose(got, float(want), rel_tol=1e-5), f"{name}: {got} != {float(want)}"
    out, vsq2 = cuda_backend.project_full(wa.cuda(), wu.cuda(), dW.cuda())
    assert vsq2 == vsq
    assert_close(out.cpu(), N, atol=2e-5 * float(N.abs().max()), rtol=2e-5, what="cuda project_full")
    assert (m2, n2, d2, vsq) == cuda_backend.fullrank_sums(wa.cuda(), wu.cuda(), dW.cuda())


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ok, reason=f"needs a CUDA device and the CUDA extension: {_AVAILABLE['cuda']}")
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=[f"dtype={k}" for k in DTYPES])
def test_cuda_edge_shapes(dtype):
    """One row, one column, one element, and two rank groups with split reductions."""
    for d_out, d_in, r in [(1, 300, 3), (300, 1, 2), (1, 1, 1), (600, 33, 257), (5130, 32, 9)]:
        wa, wu, g = _layer(d_out, d_in, dtype, _seed("gpu-edge", d_out, d_in, r, dtype))
        _check_passes("cuda", wa, wu, torch.randn(d_out, r, generator=g) * 0.01, 2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ok, reason=f"needs a CUDA device and the CUDA extension: {_AVAILABLE['cuda']}")
def test_cuda_runs_on_the_current_stream():
    """Launched on torch's current stream: inputs made on a side stream behind a 50 ms sleep are
    read only once ready (a launch on another stream would read them unfinished), and the results
    are the default stream's, bit for bit."""
    from safemerge_ext import cuda_backend

    wa, wu, g = _layer(1024, 768, torch.bfloat16, _seed("gpu-stream"))
    wa, wu, B = wa.cuda(), wu.cuda(), (torch.randn(1024, 16, generator=g) * 0.01).cuda()
    dW = (wa.float() - wu.float()).mul_(0.5).bfloat16()
    want = cuda_backend.lowrank_passes(wa, wu, B)
    want_sums = cuda_backend.fullrank_sums(wa, wu, dW)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # about 50 ms of GPU clock
        wa2, wu2, B2, dW2 = wa.clone(), wu.clone(), B.clone(), dW.clone()
        got = cuda_backend.lowrank_passes(wa2, wu2, B2)
        torch.cuda._sleep(100_000_000)
        dW3 = dW2.clone()
        sums = cuda_backend.fullrank_sums(wa2, wu2, dW3)
    side.synchronize()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]
    assert sums == want_sums


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ok or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_second_device():
    """Tensors on cuda:1 while cuda:0 is current: the kernels run on cuda:1."""
    wa, wu, g = _layer(300, 200, torch.bfloat16, _seed("gpu-second"))
    B = torch.randn(300, 8, generator=g) * 0.01
    with torch.cuda.device(0):
        T, P, vsq = _impl("cuda").lowrank_passes(wa.to("cuda:1"), wu.to("cuda:1"), B.to("cuda:1"))
    assert T.device == torch.device("cuda:1") and torch.cuda.current_device() == 0
    V = wa.double() - wu.double()
    assert_close(T.cpu(), V.t() @ B.double(), atol=2e-5 * float((V.t() @ B.double()).abs().max()), rtol=2e-5,
                 what="cuda:1 T")



@needs_cpp
def test_cpp_reads_tensors_that_lie_at_odd_addresses(tmp_path):
    """A safetensors header whose length is not a multiple of 8 (valid JSON, one space longer) puts
    every tensor of the file at an odd address when mapped. The kernels' element loads assume
    alignment, so the backend copies such operands (and drops no pages of the copies): the same
    bits as from aligned memory. The extension itself refuses misaligned pointers."""
    import struct

    from safetensors.torch import save

    from safemerge_ext import _cpu
    from safemerge_ext.io.models import ModelReader

    g = torch.Generator().manual_seed(_seed("odd-address"))
    wa, wu = torch.randn(64, 96, generator=g).bfloat16(), torch.randn(64, 96, generator=g).bfloat16()
    A, B = torch.randn(5, 96, generator=g), torch.randn(64, 5, generator=g)
    raw = save({"wa": wa, "wu": wu, "A": A, "B": B})
    n = struct.unpack("<Q", raw[:8])[0]
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", n + 1) + raw[8:8 + n] + b" " + raw[8 + n:])
    reader = ModelReader(tmp_path)
    ma, mu, mA, mB = (reader.map(k) for k in ("wa", "wu", "A", "B"))
    assert all(t.data_ptr() % t.element_size() for t in (ma, mu, mA, mB)), "the tensors were not misaligned"
    assert torch.equal(ma, wa) and torch.equal(mB, B)
    want = ops.subspace_score(wa, wu, lora_A=A, lora_B=B, backend="cpp", with_projection=True)
    got = ops.subspace_score(ma, mu, lora_A=mA, lora_B=mB, backend="cpp", with_projection=True, file_backed=True)
    assert got.cosine == want.cosine and torch.equal(got.projected_B, want.projected_B)
    assert torch.equal(ma, wa) and torch.equal(mu, wu)  # (no page of theirs was dropped and re-read wrong)
    T, P = torch.empty(96, 5), torch.empty(64, 5)
    with pytest.raises(ValueError, match="aligned to their element size"):
        _cpu.lowrank_passes(ma.data_ptr(), mu.data_ptr(), 64, 96, 96, 96, 2, B.data_ptr(), 5, T.data_ptr(),
                            P.data_ptr(), 1, 0)
    with pytest.raises(ValueError, match="aligned to their element size"):
        _cpu.lowrank_traces(T.data_ptr(), P.data_ptr(), mB.data_ptr(), 0, A.data_ptr(), 0, 64, 96, 5, 1)


@needs_cpp
def test_cpp_drop_behind_needs_rows_back_to_back():
    """Dropping a block's pages would drop the bytes between rows too: the extension refuses
    release_rows with row strides wider than the rows (the Python side never asks for it)."""
    from safemerge_ext import _cpu

    g = torch.Generator().manual_seed(_seed("gaps"))
    wide = torch.randn(64, 100, generator=g).bfloat16()
    B, T, P = torch.randn(64, 3, generator=g), torch.empty(96, 3), torch.empty(64, 3)
    with pytest.raises(ValueError, match="back to back"):
        _cpu.lowrank_passes(wide.data_ptr(), wide.data_ptr(), 64, 96, 100, 100, 2, B.data_ptr(), 3, T.data_ptr(),
                            P.data_ptr(), 1, 32)
    other = torch.randn(64, 100, generator=g).bfloat16()
    _cpu.lowrank_passes(wide.data_ptr(), other.data_ptr(), 64, 96, 100, 100, 2, B.data_ptr(), 3, T.data_ptr(),
                        P.data_ptr(), 1, 0)  # (without drop-behind, row gaps are fine)
    V = wide[:, :96].double() - other[:, :96].double()
    want_T = V.T @ B.double()
    assert_close(T, want_T, atol=1e-5 * want_T.abs().max(), rtol=1e-5, what="T with row gaps")
    want_P = V @ want_T
    assert_close(P, want_P, atol=1e-5 * want_P.abs().max(), rtol=1e-5, what="P with row gaps")


_BUS_PROBE = """
import mmap, os, signal, sys
import torch
from safemerge_ext._faults import explain_bus_errors
if sys.argv[2] != "unset":
    assert explain_bus_errors(sys.argv[2])
size = 64 << 20 if sys.argv[3] == "threads" else 3 * 4096
os.truncate(open(sys.argv[1], "wb").name, size)
fd = os.open(sys.argv[1], os.O_RDONLY)
t = torch.frombuffer(mmap.mmap(fd, size, access=mmap.ACCESS_COPY), dtype=torch.uint8)
os.truncate(sys.argv[1], 0)  # the file is cut under the mapping, whose pages are not read yet
if sys.argv[3] == "kill":  # (a SIGBUS another process sends: no fault, no line)
    os.kill(os.getpid(), signal.SIGBUS)
torch.set_num_threads(16)  # (with "threads", several of them fault at once)
print(int(t.sum()))
"""


@needs_cpp
@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGBUS"), reason="no SIGBUS on this system")
@pytest.mark.parametrize("case", ["line", "line-and-faulthandler", "empty-line", "unset", "not-utf8", "threads",
                                  "kill"])
def test_sigbus_writes_the_line_and_still_ends_the_process(tmp_path, case):
    """A read of a mapped page the file no longer has: the line set with explain_bus_errors goes to
    stderr once, however many threads fault, and the process still dies of SIGBUS (after
    faulthandler's dump, where it is on). A SIGBUS sent with kill() is no such read: no line."""
    import os
    import signal
    import sys

    line = {"empty-line": "", "unset": "unset", "not-utf8": "probe: out\udcff went away"}.get(
        case, "probe: the file went away")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    if case == "line-and-faulthandler":
        env["PYTHONFAULTHANDLER"] = "1"
    mode = case if case in ("threads", "kill") else "touch"
    res = subprocess.run([sys.executable, "-c", _BUS_PROBE, str(tmp_path / "f.bin"), line, mode],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == -signal.SIGBUS, (res.returncode, res.stderr[-2000:])
    assert res.stdout == ""
    said = res.stderr.splitlines()
    want = {"not-utf8": ["probe: out\\udcff went away"], "empty-line": [], "unset": [], "kill": []}
    assert said[:1] == want.get(case, ["probe: the file went away"]), res.stderr
    assert res.stderr.count("went away") == len(want.get(case, ["once"])), res.stderr
    assert ("Fatal Python error: Bus error" in res.stderr) == (case == "line-and-faulthandler"), res.stderr


@needs_cpp
def test_cpp_vsq_partials_are_summed_in_float64():
    """||V||^2's per-work-item partials (16 row groups of 256 rows here) are added in float64: one
    entry of 2^20 in the first group and 4064 ones after it. Every partial is exact, and so is their
    float64 sum; an fp32 sum drops every later group's 256 (the fp32 ulp at 2^40 is 2^17). (The
    first 32 rows, one block of V formed at once, hold the large entry alone.)"""
    from safemerge_ext import cpp_backend as cpp

    wa = torch.ones(4096, 1)
    wa[:32] = 0.0
    wa[0, 0] = 2.0**20
    _, _, vsq = cpp.lowrank_passes(wa, torch.zeros_like(wa), torch.ones(4096, 1))
    assert vsq == 2.0**40 + 4064
