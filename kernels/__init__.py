"""Triton backend: fused kernels for the two passes over V = W_aligned - W_unaligned.

Implements the backend contract of ``safemerge_ext.reference`` (``lowrank_passes``,
``fullrank_sums``, ``project_full``) with one file per op: ``lowrank`` (T = V^T B, P = V T,
||V||^2) and ``fullrank`` (M = V^T dW, N = V M and their norms). Importing this package imports
neither triton nor CUDA; the op modules are imported on first use, and ``unavailable_reason``
says why the backend cannot run here. The kernels run on CUDA tensors, or on CPU tensors through
triton's interpreter when ``TRITON_INTERPRET=1`` is set before the first op runs.
"""

from __future__ import annotations

import torch

NAME = "triton"

__all__ = ["NAME", "fullrank_sums", "lowrank_passes", "project_full", "unavailable_reason"]


def unavailable_reason() -> str | None:
    """None when the kernels can run here, else one line saying why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'safemerge-ext[triton]')"
    except Exception as exc:  # a broken install is a reason, not a crash
        return f"triton failed to import: {type(exc).__name__}: {exc}"
    from ._launch import interpret_enabled

    if interpret_enabled() or torch.cuda.is_available():
        return None
    return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU through the interpreter)"


def lowrank_passes(wa: torch.Tensor, wu: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """T = V^T B (d_in x r, fp32), P = V T (d_out x r, fp32), ||V||^2 (float64 sum)."""
    from .lowrank import lowrank_passes as run

    return run(wa, wu, lora_B)


def fullrank_sums(wa: torch.Tensor, wu: torch.Tensor, delta: torch.Tensor) -> tuple[float, float, float, float]:
    """||V^T dW||^2, ||V V^T dW||^2, ||dW||^2, ||V||^2 (float64 sums), never forming V, dW or C."""
    from .fullrank import fullrank_sums as run

    return run(wa, wu, delta)


def project_full(wa: torch.Tensor, wu: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, float]:
    """N = V (V^T dW) in fp32 and ||V||^2; the caller divides N by ||V|| to get C dW."""
    from .fullrank import project_full as run

    return run(wa, wu, delta)
