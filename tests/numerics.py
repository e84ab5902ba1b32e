"""Shared numerics for the tests: float64 references of SPEC section 1, and a comparison helper
that, on mismatch, names the worst indices and any NaN/Inf difference."""

from __future__ import annotations

import zlib

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def case_seed(*parts: object) -> int:
    """A fixed seed per case (crc32 is stable across processes, str hashes are not)."""
    return zlib.crc32(repr(parts).encode())


def drifted_pair(d_out: int, d_in: int, dtype: torch.dtype, seed: int):
    """Aligned/unaligned weights that differ by a small update, as real chat/base pairs do, and
    the generator that drew them (for the case's other inputs)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d_out, d_in, generator=g) * 0.02
    wa = base + 0.002 * torch.randn(d_out, d_in, generator=g)
    return wa.to(dtype), base.to(dtype), g


def ref_cosine(wa: torch.Tensor, wu: torch.Tensor, dW: torch.Tensor) -> float:
    """rho = cos(vec(C dW), vec(dW)), C = V V^T / ||V||, everything in float64 with C formed."""
    V = wa.double() - wu.double()
    C = V @ V.t() / V.norm()
    CdW = C @ dW.double()
    return float((CdW * dW.double()).sum() / (CdW.norm() * dW.double().norm()))


def ref_project(wa: torch.Tensor, wu: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """C X in float64 with C formed."""
    V = wa.double() - wu.double()
    return (V @ V.t() / V.norm()) @ X.double()


def project_error_scale(wa: torch.Tensor, wu: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Per element of C X, the sum of the magnitudes of its terms, (|V| |V|^T |X|) / ||V||, in
    float64: a computation in a precision with unit roundoff u, over n = d_out + d_in terms, is
    within n u of that of the exact value (Higham's gamma_n), whatever the order of its sums."""
    V = (wa.double() - wu.double()).abs()
    return (V @ (V.t() @ X.double().abs())) / V.norm()


def ref_lowrank_passes(wa: torch.Tensor, wu: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(T = V^T B, P = V T, ||V||^2) in float64, V formed whole: what the low-rank passes compute."""
    V = wa.double().cpu() - wu.double().cpu()
    T = V.t() @ B.double().cpu()
    return T, V @ T, float(V.square().sum())


def ref_fullrank(wa: torch.Tensor, wu: torch.Tensor, dW: torch.Tensor) -> tuple[float, float, float, float, torch.Tensor]:
    """(||M||^2, ||N||^2, ||dW||^2, ||V||^2, N) in float64, M = V^T dW and N = V M formed whole."""
    V, D = wa.double().cpu() - wu.double().cpu(), dW.double().cpu()
    M = V.t() @ D
    N = V @ M
    return float(M.square().sum()), float(N.square().sum()), float(D.square().sum()), float(V.square().sum()), N


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float | torch.Tensor, rtol: float,
                 what: str = "") -> None:
    """torch.testing-style check that reports the worst elements and non-finite mismatches; atol may
    be a tensor of per-element bounds."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    bad_finite = torch.isfinite(a) != torch.isfinite(e)
    if bad_finite.any():
        idx = bad_finite.nonzero()[:5].tolist()
        raise AssertionError(f"{what}: NaN/Inf differ at {idx}")
    err = (a - e).abs()
    if isinstance(atol, torch.Tensor):
        atol = atol.detach().double().cpu()
    allowed = atol + rtol * e.abs()
    over = err > allowed
    if over.any():
        flat = (err - allowed).flatten()
        worst = flat.topk(min(5, flat.numel())).indices
        rows = [
            f"{tuple(int(i) for i in torch.unravel_index(w, a.shape))}: got {a.flatten()[w]:.6g}, want {e.flatten()[w]:.6g}"
            for w in worst
        ]
        raise AssertionError(
            f"{what}: {int(over.sum())}/{a.numel()} elements off "
            f"(atol={'per element' if isinstance(atol, torch.Tensor) else atol}, rtol={rtol}); worst: " + "; ".join(rows)
        )
