"""Low-rank scoring: T = V^T B and ||V||^2 in one pass over the weights, then P = V T.

V = W_aligned - W_unaligned is formed tile by tile in fp32 registers and never written. Both
passes split their reduction over contiguous chunks (rows of V for T, columns of V for P); every
chunk is reduced by exactly one program in a fixed order and the per-chunk partials are summed on
the host in float64 in a fixed order, so results are bit-for-bit reproducible (no atomics).
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
    MAX_RANK_TILE,
    check_block,
    check_inputs,
    exact_sum,
    fitting,
    fp32_if_fp64,
    is_interpreted,
    num_sms,
    on_device,
    ordered_sum,
    pow2_at_least,
    shared_memory,
    split_rows,
)


@triton.jit
def _vt_b_kernel(WA, WU, B, TP, SQ, d_out, d_in, r, rows_per_split,
                 s_wa_m, s_wa_n, s_wu_m, s_wu_n, s_b_m, s_b_r,
                 R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr):
    """TP[s, j, :] = sum_{i in chunk s} (WA[i, j] - WU[i, j]) * B[i, :] and SQ[s, jb] = sum V^2.

    Program (jb, s) owns columns jb*BLOCK_N.. of V and rows chunk s. Weights are read in their
    stored dtype and widened to fp32 before the subtraction (the difference of two bf16/fp16 values
    is exact in fp32 unless their exponents are more than 16 (bf16) or 13 (fp16) apart; not in
    bf16); B is widened to fp32; tl.dot accumulates in fp32. The squared norm is kept per column in
    fp32 and summed per program; the host adds programs in float64.
    Rank columns beyond r are masked to zero (R_PAD is r rounded up to a power of two >= 16).
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    ranks = tl.arange(0, R_PAD)
    col_ok = cols < d_in
    rank_ok = ranks < r
    acc = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row0 = pid_s * rows_per_split
    for m0 in range(0, rows_per_split, BLOCK_M):
        rows = (row0 + m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = rows < d_out
        mask = row_ok[:, None] & col_ok[None, :]
        a = tl.load(WA + rows[:, None] * s_wa_m + cols[None, :] * s_wa_n, mask=mask, other=0.0)
        u = tl.load(WU + rows[:, None] * s_wu_m + cols[None, :] * s_wu_n, mask=mask, other=0.0)
        v = a.to(tl.float32) - u.to(tl.float32)
        b = tl.load(B + rows[:, None] * s_b_m + ranks[None, :] * s_b_r,
                    mask=row_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)
        acc = dot(tl.trans(v), b, acc, PRECISION)
        sq += tl.sum(v * v, axis=0)
    out = TP + pid_s.to(tl.int64) * d_in * r + cols[:, None] * r + ranks[None, :]
    tl.store(out, acc, mask=col_ok[:, None] & rank_ok[None, :])
    tl.store(SQ + pid_s * tl.num_programs(0) + pid_n, tl.sum(sq, axis=0))


@triton.jit
def _v_t_kernel(WA, WU, T, PP, d_out, d_in, r, cols_per_split,
                s_wa_m, s_wa_n, s_wu_m, s_wu_n,
                R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                PRECISION: tl.constexpr):
    """PP[s, i, :] = sum_{j in chunk s} (WA[i, j] - WU[i, j]) * T[j, :].

    Program (ib, s) owns rows ib*BLOCK_M.. of V and columns chunk s. V is widened to fp32 as in
    the first pass; T (d_in x r, contiguous) is already fp32; tl.dot accumulates in fp32.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    ranks = tl.arange(0, R_PAD)
    row_ok = rows < d_out
    rank_ok = ranks < r
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    col0 = pid_s * cols_per_split
    for k0 in range(0, cols_per_split, BLOCK_K):
        cols = (col0 + k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        col_ok = cols < d_in
        mask = row_ok[:, None] & col_ok[None, :]
        a = tl.load(WA + rows[:, None] * s_wa_m + cols[None, :] * s_wa_n, mask=mask, other=0.0)
        u = tl.load(WU + rows[:, None] * s_wu_m + cols[None, :] * s_wu_n, mask=mask, other=0.0)
        v = a.to(tl.float32) - u.to(tl.float32)
        t = tl.load(T + cols[:, None] * r + ranks[None, :], mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
        acc = dot(v, t, acc, PRECISION)
    out = PP + pid_s.to(tl.int64) * d_out * r + rows[:, None] * r + ranks[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & rank_ok[None, :])


def _tiles(interpreted: bool, d_out: int, d_in: int, r_pad: int, precision: str = "ieee", elem: int = 2,
           smem: int = H100_SHARED_MEMORY) -> dict[str, int]:
    """Default tiles and warps of the two passes.

    The interpreter's cost grows with the number of programs and loop steps, so it gets the
    largest tiles. On a GPU (fp32 FMA dots, precision="ieee") the tiles are the largest that
    ptxas compiles without register spills, and that fit the block's shared memory ``smem``, for
    sm_80, sm_86 and sm_90, specialized as a launch on Llama shapes is (checked from the cubins'
    resource usage with triton 3.9; ``test_kernels_compile_for_cuda_without_a_gpu`` keeps it so):
    wide rank tiles take fewer rows per step. Pass 1 at r <= 16 runs 8 warps: with 4, triton 3.6
    needs 255 registers a thread and spills (3.9 fits it in 128). Pass 1 takes half the columns
    where its T tile would not fit the registers: at r > 128, at r > 64 with tf32x3 (which splits
    each operand in two), and below an H100's shared memory at r >= 64; tf32x3's pass 2 takes half
    the rows at r > 128. fp32 weights (``elem`` = 4 bytes) take half the rows of pass 1 at r <= 16:
    its pipelined tiles of both matrices would need 168 KB, over an A100's 163 KB. Below an
    A100's shared memory (99 KB on sm_86/sm_89/sm_120) both passes take half the rows again.
    """
    if interpreted:
        m, n = min(128, pow2_at_least(d_out)), min(128, pow2_at_least(d_in))
        return {"m1": m, "n1": n, "w1": 4, "m2": m, "k2": n, "w2": 4}
    big, small = smem >= 200_000, smem < 150_000
    m1 = 64 if r_pad <= 16 and elem <= 2 else 32 if r_pad <= 128 else 16
    m2 = 64
    if not big and r_pad > 64:  # the A100's registers at r = 128
        m1, m2 = 16, 32
    if small:
        m1, m2 = max(16, m1 // 2), max(16, m2 // 2)
    wide = precision == "tf32x3" and r_pad > 64
    narrow = wide or r_pad > 128 or (not big and r_pad >= 64)
    return {"m1": m1, "n1": 64 if narrow else 128, "w1": 8, "m2": min(m2, 32) if wide and r_pad > 128 else m2,
            "k2": 32, "w2": 8}


def lowrank_passes(
    wa: torch.Tensor,
    wu: torch.Tensor,
    lora_B: torch.Tensor,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    split: int | None = None,
    precision: str = "ieee",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """T = V^T B (d_in x r, fp32), P = V T (d_out x r, fp32) and ||V||_F^2 (float64 sum).

    Tiles: pass 1 steps BLOCK_M rows over BLOCK_N columns a program, pass 2 steps BLOCK_K columns
    over BLOCK_M rows a program (powers of two >= 16; the defaults, which differ per pass and
    rank, suit the device; ``block_m`` given here sets both passes). ``split`` cuts
    each pass's reduction into that many chunks (default: enough programs to fill the GPU).
    Any strides are accepted (weights whose rows are not unit-stride are copied first, as the
    other backends do); ranks above 256 are processed 256 columns of B at a time. Empty weights
    give zeros.
    """
    check_inputs(_vt_b_kernel, precision, wa=wa, wu=wu, lora_B=lora_B)
    if wu.shape != wa.shape:
        raise ValueError(f"triton backend: w_aligned is {tuple(wa.shape)} but w_unaligned {tuple(wu.shape)}")
    d_out, d_in = wa.shape
    if lora_B.shape[0] != d_out or lora_B.shape[1] < 1:
        raise ValueError(f"triton backend: lora_B is {tuple(lora_B.shape)}; want {d_out}xr with r >= 1")
    r = lora_B.shape[1]
    device = wa.device
    if d_out == 0 or d_in == 0:
        f32 = dict(dtype=torch.float32, device=device)
        return torch.zeros(d_in, r, **f32), torch.zeros(d_out, r, **f32), 0.0
    T = torch.empty(d_in, r, dtype=torch.float32, device=device)
    P = torch.empty(d_out, r, dtype=torch.float32, device=device)
    vsq = 0.0
    # Triton specializes a kernel on a unit stride and lays tiles out along it, so a column-major
    # view would get other in-thread sums than its row-major copy (other bits of ||V||^2): one row
    # layout for all inputs, as in the C++ and CUDA backends.
    wa, wu = unit_rows(fp32_if_fp64(wa)), unit_rows(fp32_if_fp64(wu))
    lora_B = fp32_if_fp64(lora_B)
    with on_device(device):
        for c0 in range(0, r, MAX_RANK_TILE):
            c1 = min(r, c0 + MAX_RANK_TILE)
            t, p, sq = _passes(wa, wu, lora_B[:, c0:c1], block_m, block_n, block_k, split, precision)
            T[:, c0:c1] = t
            P[:, c0:c1] = p
            if c0 == 0:
                vsq = sq
    return T, P, vsq


def _passes(wa, wu, B, block_m, block_n, block_k, split, precision):
    d_out, d_in = wa.shape
    r = B.shape[1]
    r_pad = pow2_at_least(r)
    interpreted = is_interpreted(_vt_b_kernel)
    smem = shared_memory(wa.device)
    tiles = _tiles(interpreted, d_out, d_in, r_pad, precision, wa.element_size(), smem)
    bm1 = check_block("block_m", block_m or tiles["m1"])
    bm2 = check_block("block_m", block_m or tiles["m2"])
    bn = check_block("block_n", block_n or tiles["n1"])
    bk = check_block("block_k", block_k or tiles["k2"])
    target = 1 if interpreted else 2 * num_sms(wa.device)
    f32 = dict(dtype=torch.float32, device=wa.device)

    # Pass 1: T = V^T B and ||V||^2, reduced over row chunks.
    n_col_blocks = math.ceil(d_in / bn)

    def pass1(bm: int):
        rows_per, n_row_chunks = split_rows(d_out, bm, n_col_blocks, split, target)
        TP = torch.empty(n_row_chunks, d_in, r, **f32)
        SQ = torch.empty(n_row_chunks, n_col_blocks, **f32)
        _vt_b_kernel[(n_col_blocks, n_row_chunks)](
            wa, wu, B, TP, SQ, d_out, d_in, r, rows_per,
            wa.stride(0), wa.stride(1), wu.stride(0), wu.stride(1), B.stride(0), B.stride(1),
            R_PAD=r_pad, BLOCK_M=bm, BLOCK_N=bn, PRECISION=precision, num_warps=tiles["w1"],
        )
        return TP, SQ

    TP, SQ = pass1(bm1) if block_m else fitting(pass1, bm1)
    T = ordered_sum(TP).float()

    # Pass 2: P = V T, reduced over column chunks.
    def pass2(bm: int):
        n_row_blocks = math.ceil(d_out / bm)
        cols_per, n_col_chunks = split_rows(d_in, bk, n_row_blocks, split, target)
        PP = torch.empty(n_col_chunks, d_out, r, **f32)
        _v_t_kernel[(n_row_blocks, n_col_chunks)](
            wa, wu, T, PP, d_out, d_in, r, cols_per,
            wa.stride(0), wa.stride(1), wu.stride(0), wu.stride(1),
            R_PAD=r_pad, BLOCK_M=bm, BLOCK_K=bk, PRECISION=precision, num_warps=tiles["w2"],
        )
        return PP

    PP = pass2(bm2) if block_m else fitting(pass2, bm2)
    return T, ordered_sum(PP).float(), exact_sum(SQ)


def lowrank_passes_reference(
    wa: torch.Tensor, wu: torch.Tensor, lora_B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The same three results in float64 with plain torch (V formed whole): what the kernels compute."""
    V = wa.double() - wu.double()
    T = V.t() @ lora_B.double()
    return T, V @ T, float(V.square().sum())
