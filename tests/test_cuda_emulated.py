"""The CUDA kernels (csrc/cuda_ops.cu) and their host code, run on the CPU over a CUDA emulation
(tests/cuda_emu/cuda_emu.h, built by tests/cuda_emulator.py), through ``safemerge_ext.cuda_backend``
against float64: the shapes, dtypes, ranks, split reductions and column blocks of the GPU tests,
where no GPU is, built with the bounds, alignment and int-overflow sanitizers. Blocks, and each
block's threads between barriers, run in order, then in reverse order: the bits must not change (a
read of shared memory that another thread writes without a barrier between them would change
them). Not covered here: warps, the memory model, the GPU's own bits (the multiply-adds nvcc fuses),
timing (the GPU tests and benchmarks/gpu_session.sh)."""

from __future__ import annotations

import ctypes
import math
import platform
import shutil
import subprocess

import pytest
import torch

from cuda_emulator import HEADER, build, route_cuda_backend
from numerics import DTYPES, assert_close, case_seed, drifted_pair, ref_fullrank, ref_lowrank_passes

pytestmark = [
    pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the emulation's fibers need glibc's ucontext"),
    pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the emulated CUDA extension"),
]

H100_SMS = 132


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    pytest.importorskip("pybind11")
    return build(tmp_path_factory.mktemp("cuda-emulated"))


@pytest.fixture
def cuda_backend(emulated, monkeypatch, capfd):
    """safemerge_ext.cuda_backend over the emulated build, for CPU tensors (4 SMs unless changed);
    the test fails where the kernels indexed out of bounds, misaligned or overflowed an int (the
    sanitizers' reports, on the process's stderr)."""
    from safemerge_ext import cuda_backend

    route_cuda_backend(monkeypatch, emulated, sms=4)
    yield cuda_backend
    err = capfd.readouterr().err
    assert "runtime error:" not in err, f"the sanitizers report:\n{err[-4000:]}"


def _layer(d_out: int, d_in: int, dtype: torch.dtype, *key: object):
    """A drifted weight pair (numerics.drifted_pair), fixed per case, and its generator."""
    return drifted_pair(d_out, d_in, dtype, case_seed(d_out, d_in, dtype, *key))


def _check_passes(cuda_backend, wa, wu, B, tol: float):
    T, P, vsq = cuda_backend.lowrank_passes(wa, wu, B)
    T_ref, P_ref, vsq_ref = ref_lowrank_passes(wa, wu, B)
    assert T.dtype == P.dtype == torch.float32
    assert_close(T, T_ref, atol=tol * float(T_ref.abs().max()), rtol=tol, what="emulated cuda T")
    assert_close(P, P_ref, atol=tol * float(P_ref.abs().max()), rtol=tol, what="emulated cuda P")
    assert math.isclose(vsq, vsq_ref, rel_tol=1e-5), f"||V||^2 {vsq} != {vsq_ref}"
    return T, P, vsq


# (dtype, rtol relative to the largest reference value): fp16/bf16 differences are exact in fp32,
# so every dtype leaves fp32 accumulation over at most ~1100 terms
TOLS = {"fp32": 2e-5, "fp16": 2e-5, "bf16": 2e-5}
SHAPES = [(256, 256), (1024, 256), (67, 131), (200, 96), (96, 1100)]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=[f"dtype={k}" for k in DTYPES])
@pytest.mark.parametrize("d_out, d_in", SHAPES, ids=[f"shape={a}x{b}" for a, b in SHAPES])
@pytest.mark.parametrize("r", [1, 8, 16, 32, 64, 128], ids=lambda r: f"r={r}")
def test_lowrank_passes_match_float64(cuda_backend, emulated, dtype, d_out, d_in, r):
    """1024x256 splits pass 1's rows in 2 on 4 SMs and 96x1100 pass 2's columns in 4."""
    wa, wu, g = _layer(d_out, d_in, DTYPES[dtype], r)
    _check_passes(cuda_backend, wa, wu, torch.randn(d_out, r, generator=g) * 0.01, TOLS[dtype])


def test_the_cases_split_both_passes(emulated):
    """(so the test above reaches the split-K reductions of both passes)"""
    assert emulated.lowrank_plan(1024, 256, 8, 4).splits1 > 1
    assert emulated.lowrank_plan(96, 1100, 8, 4).splits2 > 1


@pytest.mark.parametrize("dtype", list(DTYPES), ids=[f"dtype={k}" for k in DTYPES])
def test_edge_shapes_and_rank_groups(cuda_backend, monkeypatch, dtype):
    """One row, one column, one element; ranks over 256 (two launches); an H100's 132 SMs, which
    split 5130x32's rows in 20 and 600x33's in 2."""
    from safemerge_ext import cuda_backend as cb

    monkeypatch.setattr(cb, "_sm_count", lambda dev: H100_SMS)
    for d_out, d_in, r in [(1, 300, 3), (300, 1, 2), (1, 1, 1), (600, 33, 257), (5130, 32, 9), (67, 131, 300)]:
        wa, wu, g = _layer(d_out, d_in, DTYPES[dtype], r, "edge")
        _check_passes(cuda_backend, wa, wu, torch.randn(d_out, r, generator=g) * 0.01, TOLS[dtype])


def test_row_strides_and_fp64_weights(cuda_backend):
    """Rows that are not back to back (a column slice) are read at their stride; fp64 weights are
    read in fp32, as the other backends do."""
    wa, wu, g = _layer(150, 300, torch.bfloat16, "strided")
    B = torch.randn(150, 12, generator=g) * 0.01
    _check_passes(cuda_backend, wa[:, 17:250], wu[:, 17:250], B, 2e-5)
    wa, wu, g = _layer(150, 300, torch.float64, "fp64")
    T, P, _ = cuda_backend.lowrank_passes(wa, wu, B)
    T32, P32, _ = cuda_backend.lowrank_passes(wa.float(), wu.float(), B)
    assert torch.equal(T, T32) and torch.equal(P, P32)


@pytest.mark.parametrize("d_out, d_in, r, sms", [(1024, 256, 16, 4), (96, 1100, 8, 4), (5130, 32, 9, H100_SMS),
                                                 (200, 96, 40, 4), (70, 300, 200, 4)])
def test_same_bits_in_either_thread_order_and_twice(cuda_backend, monkeypatch, d_out, d_in, r, sms):
    """Blocks, and their threads between barriers, run in reverse order: every bit is the same (no
    thread reads shared memory before the barrier after another's write), and so on a second run.
    Ranks per thread: 2, 1, 2, 8 and 32."""
    from safemerge_ext import cuda_backend as cb

    monkeypatch.setattr(cb, "_sm_count", lambda dev: sms)
    wa, wu, g = _layer(d_out, d_in, torch.bfloat16, "order")
    B = torch.randn(d_out, r, generator=g) * 0.01
    dW = (torch.randn(d_out, d_in, generator=g) * 0.001).bfloat16()
    forward = [cuda_backend.lowrank_passes(wa, wu, B), cuda_backend.fullrank_sums(wa, wu, dW)]
    monkeypatch.setenv("SAFEMERGE_CUDA_EMU_ORDER", "reverse")
    backward = [cuda_backend.lowrank_passes(wa, wu, B), cuda_backend.fullrank_sums(wa, wu, dW)]
    monkeypatch.delenv("SAFEMERGE_CUDA_EMU_ORDER")
    again = [cuda_backend.lowrank_passes(wa, wu, B), cuda_backend.fullrank_sums(wa, wu, dW)]
    for other in (backward, again):
        (T, P, vsq), sums = other
        assert torch.equal(T, forward[0][0]) and torch.equal(P, forward[0][1]) and vsq == forward[0][2]
        assert sums == forward[1]


FULL_CASES = [(70, 90, "bf16", "bf16"), (130, 65, "fp16", "fp32"), (64, 200, "fp32", "bf16"), (1, 70, "bf16", "fp16")]


@pytest.mark.parametrize("d_out, d_in, w_dtype, d_dtype", FULL_CASES,
                         ids=[f"shape={a}x{b}-w={w}-dW={d}" for a, b, w, d in FULL_CASES])
def test_fullrank_sums_and_projection_match_float64(cuda_backend, d_out, d_in, w_dtype, d_dtype):
    wa, wu, g = _layer(d_out, d_in, DTYPES[w_dtype], "full")
    _check_fullrank(cuda_backend, wa, wu, (torch.randn(d_out, d_in, generator=g) * 0.001).to(DTYPES[d_dtype]))


def _check_fullrank(cuda_backend, wa, wu, dW) -> None:
    *want, N_ref = ref_fullrank(wa, wu, dW)
    got = cuda_backend.fullrank_sums(wa, wu, dW)
    for name, a, b in zip(["||M||^2", "||N||^2", "||dW||^2", "||V||^2"], got, want):
        assert math.isclose(a, b, rel_tol=1e-5), f"{name}: {a} != {b}"
    N, vsq = cuda_backend.project_full(wa, wu, dW)
    assert vsq == got[3]
    assert_close(N, N_ref, atol=2e-5 * float(N_ref.abs().max()), rtol=2e-5, what="emulated cuda project_full")


def test_fullrank_column_blocks(cuda_backend, monkeypatch):
    """M_J formed in 4 column blocks (c0 > 0), as d_in > 8192 gets with the default budget."""
    from safemerge_ext import cuda_backend as cb

    monkeypatch.setattr(cb, "_M_BYTES", 4 * 500 * 130)
    monkeypatch.setattr(cb, "_MIN_COLS", 130)
    wa, wu, g = _layer(300, 500, torch.bfloat16, "blocks")
    _check_fullrank(cuda_backend, wa, wu, (torch.randn(300, 500, generator=g) * 0.001).bfloat16())


# ------------------------------------------------------------------------------------------------
# The emulation itself: it must see what it is here to see.

_SELF_TEST = r"""
constexpr int kN = 64;
__global__ void neighbour(float* out, int barrier, int salt) {
  __shared__ float s[kN];
  s[threadIdx.x] = float(salt + 100 * blockIdx.x + threadIdx.x);
  if (barrier) __syncthreads();
  out[blockIdx.x * kN + threadIdx.x] = s[(threadIdx.x + 1) % kN];
}
__global__ void diverge(int* out) {
  if (threadIdx.x == 3) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}
extern "C" int run_neighbour(float* out, int barrier, int salt) {
  try { ::emu::launch(2, kN, [&] { neighbour(out, barrier, salt); }); } catch (...) { return 1; }
  return 0;
}
extern "C" const char* run_diverge(int* out) {
  static std::string err;
  try {
    ::emu::launch(1, kN, [&] { diverge(out); });
  } catch (const std::exception& e) {
    err = e.what();
    return err.c_str();
  }
  return nullptr;
}
"""


@pytest.fixture(scope="module")
def self_test(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cuda-emu-self-test")
    (tmp / "self_test.cpp").write_text(_SELF_TEST)
    so = tmp / "self_test.so"
    cmd = ["g++", "-O2", "-U_FORTIFY_SOURCE", "-shared", "-fPIC", "-std=c++17", "-include", str(HEADER),
           str(tmp / "self_test.cpp"), "-o", str(so)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    lib = ctypes.CDLL(str(so))
    lib.run_diverge.restype = ctypes.c_char_p
    return lib


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_emulation_sees_a_missing_barrier(self_test, monkeypatch, order):
    """With the barrier every thread reads its neighbour's value; without it, a thread that runs
    before its neighbour reads what was there before (all but the last thread forward, the last
    one reversed: the previous block's or the previous launch's value)."""
    monkeypatch.setenv("SAFEMERGE_CUDA_EMU_ORDER", order)

    def run(barrier: int, salt: int) -> torch.Tensor:
        out = torch.full((128,), -1.0)
        assert self_test.run_neighbour(ctypes.c_void_p(out.data_ptr()), barrier, salt) == 0
        return out

    def want(salt: int) -> torch.Tensor:
        return torch.tensor([float(salt + 100 * b + (t + 1) % 64) for b in range(2) for t in range(64)])

    assert torch.equal(run(1, 1), want(1))
    stale = (run(0, 5000) != want(5000)).view(2, 64).sum(dim=1).tolist()
    assert stale == ([63, 63] if order == "forward" else [1, 1])


def test_emulation_refuses_a_barrier_some_threads_skip(self_test):
    out = torch.zeros(64, dtype=torch.int32)
    err = self_test.run_diverge(ctypes.c_void_p(out.data_ptr()))
    assert err is not None and b"1 threads of block (0, 0) returned while 63 wait at __syncthreads()" in err


def test_weights_with_different_row_strides(cuda_backend):
    """wa, wu and dW each have their own row stride (lda, ldu, ldd): a column slice of one beside a
    contiguous other. (test_row_strides_and_fp64_weights slices both alike, so lda == ldu there.)"""
    wa, wu, g = _layer(150, 300, torch.bfloat16, "strides-differ")
    B = torch.randn(150, 12, generator=g) * 0.01
    dW = (torch.randn(150, 233, generator=g) * 0.001).bfloat16()
    wa_s, wu_s = wa[:, 17:250], wu[:, 17:250]
    for a, u in ((wa_s, wu_s.contiguous()), (wa_s.contiguous(), wu_s)):
        assert a.stride(0) != u.stride(0)
        _check_passes(cuda_backend, a, u, B, 2e-5)
    wide = torch.zeros(150, 300, dtype=torch.bfloat16)
    wide[:, 40:273] = dW
    for a, u, d in ((wa_s.contiguous(), wu_s.contiguous(), wide[:, 40:273]), (wa_s, wu_s, dW)):
        assert d.stride(0) != a.stride(0)
        _check_fullrank(cuda_backend, a, u, d)


def test_vsq_is_summed_in_float64_across_row_tiles(cuda_backend):
    """One large entry alone in its 32-row tile and 4064 small ones in later tiles of its column:
    every tile's fp32 sum of squares is exact, and so is their float64 sum; summed in fp32 across
    tiles the small ones vanish (2^28 + 16 per thread-tile rounds back to 2^28)."""
    wa = torch.full((4096, 1), 2.0)
    wa[:32] = 0.0
    wa[0, 0] = 2.0**14
    wu = torch.zeros_like(wa)
    _, _, vsq = cuda_backend.lowrank_passes(wa, wu, torch.ones(4096, 1))
    assert vsq == 2.0**28 + 4.0 * 4064


def test_fullrank_squares_tiles_past_the_fp32_range(cuda_backend):
    """As the Triton test of that name: entries of M and N above ~1.8e19 are finite in fp32 but
    their fp32 squares are not; the tile sums square them in float64."""
    g = torch.Generator().manual_seed(7)
    wa, wu, delta = ((torch.rand(40, 56, generator=g) + 0.5) * 1e8 * torch.randn(40, 56, generator=g).sign()
                     for _ in range(3))
    got = cuda_backend.fullrank_sums(wa, wu, delta)
    want = ref_fullrank(wa, wu, delta)[:4]
    assert want[1] > 1e50
    for name, a, b in zip(("||M||^2", "||N||^2", "||dW||^2", "||V||^2"), got, want):
        assert math.isclose(a, b, rel_tol=1e-5), f"{name}: {a} != {b}"
