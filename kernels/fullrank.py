"""Full-rank scoring and projection: M = V^T dW, N = V M, and ||M||^2, ||N||^2, ||dW||^2, ||V||^2.

For a full fine-tune dW (d_out x d_in), rho = ||M||^2 / (||N|| ||dW||) (SPEC section 1), and Safe
LoRA's projection is C dW = N / ||V||. Two fused GEMMs form V (and read dW) tile by tile in fp32
registers: neither V nor C is ever written. M is produced one column panel at a time
(d_in x panel, fp32), so memory stays bounded for 14336-wide MLP weights; N is either reduced to
its norm or written (project_full). Every output tile belongs to one program with a fixed loop
order and per-program partial norms are summed on the host with math.fsum: reproducible bits.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._native import unit_rows
from ._dot import dot
from ._launch import (
    H100_SHARED_MEMORY,
    check_block,
    check_inputs,
    exact_sum,
    fitting,
    fp32_if_fp64,
    is_interpreted,
    on_device,
    pow2_at_least,
    shared_memory,
)


@triton.jit
def _vt_dw_kernel(WA, WU, D, MP, PART, d_out, d_in, j_lo, panel_w,
                  s_wa_m, s_wa_n, s_wu_m, s_wu_n, s_d_m, s_d_n, s_mp,
                  BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """MP[i, j] = sum_k V[k, i] * D[k, j_lo + j] for one BLOCK_N x BLOCK_N tile of the panel, with
    PART[0] = sum of MP^2 over the tile (squared in float64), PART[1] = sum of V^2 and PART[2] = sum of D^2 over the
    columns the tile reads (the host takes ||V||^2 from the programs with pid_j = 0 of the first
    panel and ||dW||^2 from those with pid_i = 0).

    Weights and dW are read in their stored dtype and widened to fp32 before the subtraction (the
    difference of two bf16/fp16 values is exact in fp32 unless their exponents are far apart; not in bf16); tl.dot accumulates in fp32
    over BLOCK_K rows a step; M is written in fp32 because the second GEMM reads it back.
    """
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    ci = (pid_i * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cl = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    cj = (j_lo + cl).to(tl.int64)
    i_ok = ci < d_in
    j_ok = cl < panel_w
    acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    vsq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dsq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, d_out, BLOCK_K):
        rows = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        row_ok = rows < d_out
        vmask = row_ok[:, None] & i_ok[None, :]
        a = tl.load(WA + rows[:, None] * s_wa_m + ci[None, :] * s_wa_n, mask=vmask, other=0.0)
        u = tl.load(WU + rows[:, None] * s_wu_m + ci[None, :] * s_wu_n, mask=vmask, other=0.0)
        v = a.to(tl.float32) - u.to(tl.float32)
        d = tl.load(D + rows[:, None] * s_d_m + cj[None, :] * s_d_n,
                    mask=row_ok[:, None] & j_ok[None, :], other=0.0).to(tl.float32)
        acc = dot(tl.trans(v), d, acc, PRECISION)
        vsq += tl.sum(v * v, axis=0)
        dsq += tl.sum(d * d, axis=0)
    tl.store(MP + ci[:, None] * s_mp + cl[None, :], acc, mask=i_ok[:, None] & j_ok[None, :])
    n_tiles = tl.num_programs(0) * tl.num_programs(1)
    tile = pid_i * tl.num_programs(1) + pid_j
    a64 = acc.to(tl.float64)  # (an entry of M above ~1.8e19 is finite but its fp32 square is not)
    tl.store(PART + tile, tl.sum(tl.sum(a64 * a64, axis=1), axis=0))
    tl.store(PART + n_tiles + tile, tl.sum(vsq, axis=0))
    tl.store(PART + 2 * n_tiles + tile, tl.sum(dsq, axis=0))


@triton.jit
def _v_m_kernel(WA, WU, MP, OUT, PART, d_out, d_in, j_lo, panel_w,
                s_wa_m, s_wa_n, s_wu_m, s_wu_n, s_mp, s_out,
                STORE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """N[i, j] = sum_k V[i, k] * MP[k, j] for one BLOCK_M x BLOCK_N tile, PART = sum of N^2 over
    it (squared in float64), and (STORE) OUT[i, j_lo + j] = N[i, j] in fp32.

    V is widened to fp32 as in the first GEMM; MP is fp32; tl.dot accumulates in fp32 over
    BLOCK_K columns of V a step.
    """
    pid_m = tl.program_id(0)
    pid_j = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cl = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < d_out
    j_ok = cl < panel_w
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = ks < d_in
        vmask = row_ok[:, None] & k_ok[None, :]
        a = tl.load(WA + rows[:, None] * s_wa_m + ks[None, :] * s_wa_n, mask=vmask, other=0.0)
        u = tl.load(WU + rows[:, None] * s_wu_m + ks[None, :] * s_wu_n, mask=vmask, other=0.0)
        v = a.to(tl.float32) - u.to(tl.float32)
        m = tl.load(MP + ks[:, None] * s_mp + cl[None, :], mask=k_ok[:, None] & j_ok[None, :], other=0.0)
        acc = dot(v, m, acc, PRECISION)
    a64 = acc.to(tl.float64)
    tl.store(PART + pid_m * tl.num_programs(1) + pid_j, tl.sum(tl.sum(a64 * a64, axis=1), axis=0))
    if STORE:
        tl.store(OUT + rows[:, None] * s_out + (j_lo + cl[None, :]), acc, mask=row_ok[:, None] & j_ok[None, :])


# Largest fp32 M panel (d_in x panel) held at once on a GPU.
_PANEL_BYTES = 256 << 20


def _tiles(interpreted: bool, d_out: int, d_in: int, precision: str = "ieee",
           smem: int = H100_SHARED_MEMORY) -> dict[str, int]:
    """Default tiles and warps. The interpreter's cost grows with programs and loop steps: largest
    tiles there. On a GPU, 128 x 128 tiles of M, 64 x 128 tiles of N, 32-deep steps: the largest
    that ptxas compiles without register spills for sm_90 (triton 3.9, specialized as a launch on
    Llama shapes is) with fp32 FMA, tf32 or bf16 dots; tf32x3, which splits each operand in two,
    and fp32 FMA below an H100's shared memory (sm_80) step 16 deep; below an A100's (99 KB:
    sm_86/sm_89/sm_120) the tiles of M are 64 x 64, with 4 warps, and tf32 steps 16 deep too (at
    32, ptxas spills 16 B of V M for sm_86 with bf16 weights)."""
    if interpreted:
        return {"m": min(128, pow2_at_least(d_out)), "n": min(128, pow2_at_least(d_in)),
                "k": min(128, pow2_at_least(max(d_out, d_in))), "w": 4}
    small = smem < 150_000
    shallow = precision == "tf32x3" or (smem < 200_000 and precision == "ieee") or (small and precision == "tf32")
    return {"m": 64, "n": 64 if small else 128, "k": 16 if shallow else 32, "w": 4 if small else 8}


def _run(
    wa: torch.Tensor,
    wu: torch.Tensor,
    delta: torch.Tensor,
    out: torch.Tensor | None,
    block_m: int | None,
    block_n: int | None,
    block_k: int | None,
    panel: int | None,
    precision: str,
) -> tuple[float, float, float, float]:
    check_inputs(_vt_dw_kernel, precision, wa=wa, wu=wu, delta=delta)
    if wu.shape != wa.shape or delta.shape != wa.shape:
        raise ValueError(
            f"triton backend: w_aligned {tuple(wa.shape)}, w_unaligned {tuple(wu.shape)} and delta "
            f"{tuple(delta.shape)} must have one shape"
        )
    d_out, d_in = wa.shape
    if d_out == 0 or d_in == 0:
        return 0.0, 0.0, 0.0, 0.0
    # one row layout (see lowrank.py); fp64 in fp32, as the other backends compute it
    wa, wu, delta = (unit_rows(fp32_if_fp64(t)) for t in (wa, wu, delta))
    with on_device(wa.device):
        return _launch_all(wa, wu, delta, out, block_m, block_n, block_k, panel, precision)


def _launch_all(wa, wu, delta, out, block_m, block_n, block_k, panel, precision):
    d_out, d_in = wa.shape
    interpreted = is_interpreted(_vt_dw_kernel)
    tiles = _tiles(interpreted, d_out, d_in, precision, shared_memory(wa.device))
    bm = check_block("block_m", block_m or tiles["m"])
    bn = check_block("block_n", block_n or tiles["n"])
    bk = check_block("block_k", block_k or tiles["k"])
    if panel is None:
        panel = d_in if interpreted else max(bn, (_PANEL_BYTES // (4 * d_in)) // bn * bn)
    if panel < 1:
        raise ValueError(f"triton backend: panel must be >= 1 column; got {panel}")
    panel = min(panel, d_in)
    warps = tiles["w"]
    f32 = dict(dtype=torch.float32, device=wa.device)
    f64 = dict(dtype=torch.float64, device=wa.device)  # tile partials: squares of M and N in float64
    MP = torch.empty(d_in, panel, **f32)
    n_i, n_m = math.ceil(d_in / bn), math.ceil(d_out / bm)
    m2_parts, n2_parts, d2_parts, vsq_parts = [], [], [], None
    store = out is not None
    out_arg = out if store else MP  # never written when STORE is off
    for j_lo in range(0, d_in, panel):
        w = min(panel, d_in - j_lo)
        n_j = math.ceil(w / bn)
        part_a = torch.empty(3, n_i, n_j, **f64)

        def vt_dw(k: int) -> None:
            _vt_dw_kernel[(n_i, n_j)](
                wa, wu, delta, MP, part_a, d_out, d_in, j_lo, w,
                wa.stride(0), wa.stride(1), wu.stride(0), wu.stride(1), delta.stride(0), delta.stride(1),
                MP.stride(0), BLOCK_K=k, BLOCK_N=bn, PRECISION=precision, num_warps=warps,
            )

        part_b = torch.empty(n_m, n_j, **f64)

        def v_m(k: int) -> None:
            _v_m_kernel[(n_m, n_j)](
                wa, wu, MP, out_arg, part_b, d_out, d_in, j_lo, w,
                wa.stride(0), wa.stride(1), wu.stride(0), wu.stride(1), MP.stride(0), out_arg.stride(0),
                STORE=store, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=k, PRECISION=precision, num_warps=warps,
            )

        if block_k:
            vt_dw(bk)
            v_m(bk)
        else:  # on a GPU short of shared memory for these tiles: shallower steps, the same tiles of M
            fitting(vt_dw, bk)
            fitting(v_m, bk)
        m2_parts.append(part_a[0])
        d2_parts.append(part_a[2, 0])
        n2_parts.append(part_b)
        if vsq_parts is None:
            vsq_parts = part_a[1, :, 0]
    sums = (torch.cat([p.flatten() for p in parts]) for parts in (m2_parts, n2_parts, d2_parts))
    m2, n2, d2 = (exact_sum(s) for s in sums)
    return m2, n2, d2, exact_sum(vsq_parts)


def fullrank_sums(
    wa: torch.Tensor,
    wu: torch.Tensor,
    delta: torch.Tensor,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    panel: int | None = None,
    precision: str = "ieee",
) -> tuple[float, float, float, float]:
    """||V^T dW||^2, ||V V^T dW||^2, ||dW||^2 and ||V||^2 as float64 sums of tile partials (squares of M
    and N in float64, of V and dW in fp32).

    Tiles (powers of two >= 16): BLOCK_N x BLOCK_N tiles of M and BLOCK_M x BLOCK_N tiles of N,
    both GEMMs stepping BLOCK_K deep; ``panel`` columns of M are formed at a time.
    """
    return _run(wa, wu, delta, None, block_m, block_n, block_k, panel, precision)


def project_full(
    wa: torch.Tensor,
    wu: torch.Tensor,
    delta: torch.Tensor,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    panel: int | None = None,
    precision: str = "ieee",
) -> tuple[torch.Tensor, float]:
    """N = V (V^T dW) (d_out x d_in, fp32) and ||V||^2; C dW = N / ||V||. Tiles as in fullrank_sums."""
    out = torch.empty(wa.shape, dtype=torch.float32, device=wa.device)
    *_, vsq = _run(wa, wu, delta, out, block_m, block_n, block_k, panel, precision)
    return out, vsq


def fullrank_reference(
    wa: torch.Tensor, wu: torch.Tensor, delta: torch.Tensor
) -> tuple[float, float, float, float, torch.Tensor]:
    """(m2, n2, d2, vsq, N) in float64 with plain torch (V and M formed whole)."""
    V, D = wa.double() - wu.double(), delta.double()
    M = V.t() @ D
    N = V @ M
    return float(M.square().sum()), float(N.square().sum()), float(D.square().sum()), float(V.square().sum()), N
