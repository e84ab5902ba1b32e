"""The one matrix product every Triton kernel here steps with, at a chosen operand precision."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` accumulated in fp32 from fp32 operands. PRECISION is one of tl.dot's input
    precisions ("ieee": exact fp32 FMA; "tf32"; "tf32x3": near-fp32 on tensor cores), or "bf16":
    both operands rounded to bf16 first, for the tensor cores' bf16 rate (V = W_aligned - W_unaligned
    is exact in fp32, not in bf16, so this costs about 3 significant digits per product)."""
    if PRECISION == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)
