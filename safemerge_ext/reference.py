"""Pure-torch reference backend for the two passes over V = W_aligned - W_unaligned.

Every native backend (C++, CUDA, Triton) implements the same three primitives and is tested
against a float64 computation; this module is also the fallback that always works. V is formed
one row block at a time in fp32 (bf16/fp16 differences are exact in fp32 unless the exponents
are more than 16 (bf16) or 13 (fp16) apart), so memory stays at a few blocks even for
14336 x 4096 MLP weights; the final reductions are float64.

Contract shared by all backends (see ``safemerge_ext.backends``):

- ``lowrank_passes(wa, wu, lora_B) -> (T, P, vsq)``: ``T = V^T B`` (d_in x r, fp32),
  ``P = V T`` (d_out x r, fp32), ``vsq = ||V||_F^2`` (Python float, summed in float64).
- ``fullrank_sums(wa, wu, delta) -> (m2, n2, d2, vsq)``: ``||V^T dW||^2``, ``||V V^T dW||^2``,
  ``||dW||^2`` and ``||V||^2`` as Python floats, never materializing a d_out x d_out matrix.
- ``project_full(wa, wu, delta) -> (N, vsq)``: ``N = V (V^T dW)`` in fp32 and ``||V||^2``
  (the caller divides N by ||V||).
- optional, ``lowrank_traces(T, P, lora_A, lora_B) -> (inner, n2, d2)``: the r x r remainder of
  a LoRA score, ``<T^T T, G>``, ``<P^T P, G>`` and ``<B^T B, G>`` with ``G = A A^T``, in float64.
  A backend without it gets :func:`lowrank_traces` here.
"""

from __future__ import annotations

import torch

NAME = "torch"
# Rows of V formed at once: 256 x 14336 fp32 is 14 MiB, small next to the inputs.
_ROW_BLOCK = 256
# Columns of dW handled at once by the float64 rescoring (fullrank_sums64: 4 x this).
_COL_BLOCK = 256
# Full-rank path: the budget for M_J = V^T dW[:, J] (d_in x |J| fp32), which sets the column block;
# at least 256 columns.
_M_BYTES = 64 << 20
_MIN_COLS = 256


def detail() -> str:
    """What this backend runs with, for ``safemerge backends`` and the report: torch's version and
    its CPU threads (its BLAS matmuls' sums follow the thread count, so the bits on the CPU do)."""
    threads = torch.get_num_threads()
    return f"torch {torch.__version__}, {threads} CPU thread{'s' if threads != 1 else ''}"


def _sq(x: torch.Tensor) -> torch.Tensor:
    """Sum of squares in float64, squared in float64 too (fp32 squares of entries below 1e-19 are 0)."""
    return x.double().square().sum()


_SQ_CHUNK = 1 << 18  # elements upcast at a time by _square_sum (2 MiB of float64)


def _square_sum(t: torch.Tensor) -> float:
    """The float64 sum of the squares of a 2-D tensor, a few rows at a time: ``t.double()`` whole
    would be twice the tensor (a full-rank block M_J is up to 64 MiB) and its square as much again."""
    return float(_square_sums(t))


def _square_sums(t: torch.Tensor) -> torch.Tensor:
    """:func:`_square_sum` as a float64 tensor on ``t``'s device (no wait for a GPU per chunk)."""
    rows = max(1, _SQ_CHUNK // max(t.shape[1], 1))
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    for i in range(0, t.shape[0], rows):
        total += _sq(t[i:i + rows])
    return total


def _v_block(wa: torch.Tensor, wu: torch.Tensor, i0: int, i1: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return wa[i0:i1].to(dtype) - wu[i0:i1].to(dtype)


def lowrank_passes(wa: torch.Tensor, wu: torch.Tensor, lora_B: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, float]:
    """T = V^T B and ||V||^2 in one pass over V, then P = V T in a second pass (in ``dtype``:
    float64 where ops rescores an ill-conditioned layer)."""
    d_out, d_in = wa.shape
    B = lora_B.to(dtype)
    T = torch.zeros(d_in, B.shape[1], dtype=dtype, device=wa.device)
    vsq = torch.zeros((), dtype=torch.float64, device=wa.device)
    for i0 in range(0, d_out, _ROW_BLOCK):
        i1 = min(i0 + _ROW_BLOCK, d_out)
        V = _v_block(wa, wu, i0, i1, dtype)
        T.addmm_(V.t(), B[i0:i1])
        vsq += _sq(V)
    P = torch.empty(d_out, B.shape[1], dtype=dtype, device=wa.device)
    for i0 in range(0, d_out, _ROW_BLOCK):
        i1 = min(i0 + _ROW_BLOCK, d_out)
        torch.mm(_v_block(wa, wu, i0, i1, dtype), T, out=P[i0:i1])
    return T, P, float(vsq)


def lowrank_traces(T: torch.Tensor, P: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[float, float, float]:
    """``<T^T T, G>``, ``<P^T P, G>``, ``<B^T B, G>`` with ``G = A A^T``: float64 Grams on the CPU."""
    A = lora_A.detach().to("cpu", torch.float64)
    G = A @ A.t()
    T, P, B = (x.detach().to("cpu", torch.float64) for x in (T, P, lora_B))
    return (float(((T.t() @ T) * G).sum()), float(((P.t() @ P) * G).sum()), float(((B.t() @ B) * G).sum()))


def _blocks(n: int, size: int):
    for i0 in range(0, n, size):
        yield i0, min(i0 + size, n)


def fullrank_blocks(wa: torch.Tensor, wu: torch.Tensor, delta: torch.Tensor, sums: dict[str, torch.Tensor], *,
                    row_block: int | None = None, m_bytes: int | None = None, min_cols: int | None = None):
    """Yield (J, M_J, row_blocks_of_N) over column blocks J of dW: M_J = V^T dW[:, J] is accumulated
    over row blocks of V and dW (addmm), then N[:, J] = V M_J is produced one row block at a time.
    Memory: M_J (at most ``m_bytes``) plus a few row blocks (and float64 sums taken a few rows at a
    time); V, dW and C are never formed whole. ``sums`` receives ||V||^2 ("vsq") and ||dW||^2 ("d2")
    as float64 sums (0-d tensors on the weights' device). The C++ backend's full-rank ops are these
    blocks too (with its own sizes)."""
    row_block = _ROW_BLOCK if row_block is None else row_block
    m_bytes = _M_BYTES if m_bytes is None else m_bytes
    d_out, d_in = wa.shape
    cols = max(_MIN_COLS if min_cols is None else min_cols, min(d_in, m_bytes // (4 * max(d_in, 1))))
    sums["vsq"], sums["d2"] = (torch.zeros((), dtype=torch.float64, device=wa.device) for _ in range(2))
    for j0, j1 in _blocks(d_in, cols):
        M = torch.zeros(d_in, j1 - j0, dtype=torch.float32, device=wa.device)
        for i0, i1 in _blocks(d_out, row_block):
            V = _v_block(wa, wu, i0, i1)
            D = delta[i0:i1, j0:j1].float()
            M.addmm_(V.t(), D)
            if j0 == 0:
                sums["vsq"] += _square_sums(V)
            sums["d2"] += _square_sums(D)
        yield slice(j0, j1), M, ((i0, i1, _v_block(wa, wu, i0, i1) @ M) for i0, i1 in _blocks(d_out, row_block))
        del M  # (the caller drops its references too: one M_J at a time, not two)


def fullrank_sums(wa: torch.Tensor, wu: torch.Tensor, delta: torch.Tensor,
                  **sizes: int) -> tuple[float, float, float, float]:
    """||V^T dW||^2, ||V V^T dW||^2, ||dW||^2, ||V||^2 in float64 sums over the blocks of
    :func:`fullrank_blocks` (``sizes``: its block sizes)."""
    m2 = n2 = torch.zeros((), dtype=torch.float64, device=wa.device)
    sums: dict[str, torch.Tensor] = {}
    for _, M, rows in fullrank_blocks(wa, wu, delta, sums, **sizes):
        m2 = m2 + _square_sums(M)
        for _, _, N in rows:
            n2 = n2 + _square_sums(N)
            del N
        del M, rows
    return float(m2), float(n2), float(sums["d2"]), float(sums["vsq"])


def fullrank_sums64(wa: torch.Tensor, wu: torch.Tensor, delta: torch.Tensor) -> tuple[float, float, float]:
    """||V^T dW||^2, ||V V^T dW||^2, ||dW||^2 with every product in float64 (ops' rescoring of an
    ill-conditioned layer): V formed a row block at a time, twice per block of dW's columns, so
    memory stays at a few float64 blocks (M_J is d_in x 1024) for any layer."""
    d_out, d_in = wa.shape
    m2 = n2 = d2 = 0.0
    for j0 in range(0, d_in, 4 * _COL_BLOCK):
        j1 = min(j0 + 4 * _COL_BLOCK, d_in)
        M = torch.zeros(d_in, j1 - j0, dtype=torch.float64, device=wa.device)
        for i0 in range(0, d_out, _ROW_BLOCK):
            i1 = min(i0 + _ROW_BLOCK, d_out)
            M.addmm_(_v_block(wa, wu, i0, i1, torch.float64).t(), delta[i0:i1, j0:j1].double())
        m2 += float(_sq(M))
        d2 += _square_sum(delta[:, j0:j1])
        for i0 in range(0, d_out, _ROW_BLOCK):
            n2 += float(_sq(_v_block(wa, wu, i0, min(i0 + _ROW_BLOCK, d_out), torch.float64) @ M))
    return m2, n2, d2


def _vsq(wa: torch.Tensor, wu: torch.Tensor) -> float:
    total = 0.0
    for i0 in range(0, wa.shape[0], _ROW_BLOCK):
        total += float(_sq(_v_block(wa, wu, i0, min(i0 + _ROW_BLOCK, wa.shape[0]))))
    return total


def project_full(wa: torch.Tensor, wu: torch.Tensor, delta: torch.Tensor,
                 **sizes: int) -> tuple[torch.Tensor, float]:
    """V (V^T dW) in fp32 (C dW times ||V||) and ||V||^2, with the blocks of :func:`fullrank_blocks`."""
    out = torch.empty(delta.shape, dtype=torch.float32, device=delta.device)
    sums: dict[str, torch.Tensor] = {}
    for J, M, rows in fullrank_blocks(wa, wu, delta, sums, **sizes):
        for i0, i1, N in rows:
            out[i0:i1, J] = N
            del N
        del M, rows
    return out, float(sums["vsq"])
