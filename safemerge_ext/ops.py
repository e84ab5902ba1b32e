"""SafeMERGE's per-layer math on tensors, dispatched to a backend.

With ``V = W_aligned - W_unaligned`` and ``C = V V^T / ||V||_F`` (SPEC section 1), the score of an
update dW is ``rho = cos(vec(C dW), vec(dW))``. C is never formed: for a LoRA update dW = B A the
backend makes two passes over V (``T = V^T B``, ``P = V T``) and the rest is r x r work here in
float64; for a full update it returns the three Frobenius norms. Scales of C and dW cancel.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from types import ModuleType

import torch

from safemerge_ext import _mapped, backends, reference
from safemerge_ext.backends import available_backends

__all__ = [
    "Score",
    "available_backends",
    "project_delta",
    "project_lora_B",
    "subspace_cosine",
    "subspace_score",
]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class Score:
    """A layer's score: the cosine (nan when undefined), the norms behind it, and why if nan."""

    cosine: float
    v_norm: float
    delta_norm: float
    reason: str | None
    backend: str
    projected_B: torch.Tensor | None = None  # C @ lora_B (fp32), when asked for and defined
    precision: str = backends.EXACT  # the operand precision the backend computed with


def _check_tensor(what: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor; got {type(t).__name__} (convert it with torch.as_tensor)")
    if t.layout != torch.strided:
        raise ValueError(f"{what} is a sparse tensor ({t.layout}); pass a dense one (.to_dense())")


def _check_pair(wa: torch.Tensor, wu: torch.Tensor) -> None:
    _check_tensor("w_aligned", wa)
    _check_tensor("w_unaligned", wu)
    if wa.dim() != 2 or wu.shape != wa.shape:
        raise ValueError(
            f"w_aligned and w_unaligned must be 2-D and of one shape; got {tuple(wa.shape)} and {tuple(wu.shape)}"
        )
    if wa.numel() == 0:
        raise ValueError(f"the weights are empty ({tuple(wa.shape)}): there is no layer to score")
    if wa.device != wu.device:
        raise ValueError(f"w_aligned is on {wa.device} but w_unaligned on {wu.device}: move both to one device")
    if wa.device.type == "meta":
        raise ValueError("the weights are on the meta device, which holds no values: load them first")
    for t in (wa, wu):
        if t.dtype not in _FLOATS:
            raise ValueError(f"weights must be fp32, fp16, bf16 or fp64; got {t.dtype}")
    if wa.dtype != wu.dtype:  # V = W_a - W_u would carry one side's rounding alone
        raise ValueError(f"w_aligned is {wa.dtype} but w_unaligned {wu.dtype}: give both in one dtype")


def _pair(wa: torch.Tensor, wu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights as the backends take them: float64 weights become (V, 0) with V formed in
    float64 first (their difference can lie below fp32's rounding of each; it is scored in fp32,
    as every backend computes)."""
    if wa.dtype != torch.float64:
        return wa, wu
    V = (wa - wu).float()
    return V, torch.zeros_like(V)


def _operand(t: torch.Tensor) -> torch.Tensor:
    """A factor or update in a dtype every backend reads (float8 as fp32)."""
    return t if t.dtype in _FLOATS else t.float()


def _check_update(what: str, t: torch.Tensor) -> None:
    """A LoRA factor or full update: floating point (float8 included), with values (not on the meta
    device)."""
    _check_tensor(what, t)
    if not t.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor; got {t.dtype}")
    if t.device.type == "meta":
        raise ValueError(f"{what} is on the meta device, which holds no values: load it first")


def _lowrank_factors(wa: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    _check_update("lora_A", lora_A)
    _check_update("lora_B", lora_B)
    d_out, d_in = wa.shape
    if lora_B.dim() != 2 or lora_A.dim() != 2 or lora_B.shape[0] != d_out or lora_A.shape[1] != d_in \
            or lora_A.shape[0] != lora_B.shape[1] or lora_A.shape[0] < 1:
        raise ValueError(
            f"LoRA factors do not fit a {d_out}x{d_in} weight: lora_B is {tuple(lora_B.shape)} "
            f"(want {d_out}xr), lora_A is {tuple(lora_A.shape)} (want rx{d_in})"
        )


def _resolve(backend: str, device_type: str, precision: str | None) -> tuple[str, ModuleType, dict[str, str], str]:
    """(backend name, module, keywords for its ops, operand precision used) for a request."""
    name, impl = backends.resolve(backend, device_type)
    used = backends.resolve_precision(precision, name, device_type)
    return name, impl, ({"precision": used} if used != backends.EXACT else {}), used


_FP32_FULL = 2.0 ** -120  # (fp32 keeps all 24 bits down to 2^-126; a margin for the entries below the largest)
_LOST = ("the fp32 sums lost their precision: the weights or the update are too small or too large in magnitude "
         "to score, or the update's factors cancel (B A is almost zero next to B and A)")


# ||B A||^2 against ||B||^2 ||A||^2: below 2^-20 (factors 2^10 larger than their product) the
# factors are re-made; below 2^-40 the product is under fp32's resolution of them (an error, not a
# score); below 2^-80 float64's QR cannot tell it from zero either
_CANCELLING, _CANCELLED, _FLOAT64_NOISE = 2.0 ** -20, 2.0 ** -40, 2.0 ** -80
CANCELLED = "the update's factors cancel"  # (how that error begins)


_SQUARES_SAFE = (2.0 ** -60, 2.0 ** 100)  # sums of fp32 squares trusted between these

# ||V||^2 ||V^T dW||^2 / ||V V^T dW||^2: ||V||_F^2 over the squared singular values of V that dW
# meets (at most d_out x the effective rank's share where dW meets V's directions evenly, as
# any real update does). fp32's rounding of T and P, relative to ||V||, is that ratio times
# 2^-24 of the signal. Measured (review196: rank-1 dW along one of V's singular directions, or
# mixing its weakest ones, 48x32 and 256x128, torch and cpp, in fp32 alone): the cosine's
# absolute error stays below 7e-6 up to 2^15, is 6e-5 to 3e-4 at 2^17.8-2^20 where the cosine is
# about 5e-4 (the order of such layers can change, not a flag at a threshold near 0.35), 1e-5 to
# 7e-5 at 2^21-2^23 where it is 1, and 0.02-0.2 from 2^25. Above 2^20 the layer is scored again in
# float64 (0.5-1.5 s for a 4096-wide layer: too dear where a cosine near 0 is a few digits off).
_ILL_CONDITIONED = 2.0 ** 20


def _checked_sum(value: float, *tensors: torch.Tensor) -> float:
    """A backend's sum of squares (``||V||^2`` of ``tensors = (wa, wu)``, or ``||dW||^2`` of one
    tensor), summed again in float64 where its fp32 squares may have gone subnormal (entries below
    about 1e-19) or overflowed (above about 1e19): those kernels square in fp32, and the C++ build
    for one CPU kept digits another lost (review145: a Safe LoRA projection 2.7x off at V ~ 1e-23).
    Real weights sum to far inside the range, and pay nothing; the rest pay one more read."""
    if math.isfinite(value) and _SQUARES_SAFE[0] <= value <= _SQUARES_SAFE[1]:
        return value
    if value == 0.0 and (torch.equal(*tensors) if len(tensors) == 2 else not bool(tensors[0].any())):
        return 0.0  # (V = 0, or dW = 0, indeed: one comparison, not a float64 sum)
    if len(tensors) == 2:
        return reference._vsq(*tensors)
    return reference._square_sum(tensors[0])


def _square_sum64(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t if t.dtype in _FLOATS else t.double(), dtype=torch.float64)) ** 2


def _refactored(lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """fp32 factors ``A2``, ``B2`` of the same product ``B A`` whose rows and columns are orthogonal
    (float64 thin QRs of B and A^T, then an SVD of the r x r core), and ``||B A||^2`` from that core."""
    Qb, Rb = torch.linalg.qr(lora_B.double())
    Qa, Ra = torch.linalg.qr(lora_A.double().t())
    U, S, Wh = torch.linalg.svd(Rb @ Ra.t(), full_matrices=False)
    return (Wh @ Qa.t()).float(), (Qb @ (U * S)).float(), float(S.square().sum())


def _non_finite(message: str, *tensors: torch.Tensor | None) -> FloatingPointError:
    """``message`` where an input holds NaN or Inf; where every input is finite, an fp32 sum
    overflowed instead (entries near 1e30), which is the lost-precision error. Reads the inputs
    once more, on this error path only."""
    if all(t is None or bool(torch.isfinite(t).all()) for t in tensors):
        return FloatingPointError(_LOST)
    return FloatingPointError(message)


def _abs_max(X: torch.Tensor) -> float:
    """max |X| (no copy of X; float8 read as fp32)."""
    lo, hi = torch.aminmax(_operand(X))
    return max(float(hi), -float(lo))


def _below_full_precision(*tensors: torch.Tensor) -> bool:
    """Whether an fp32 result's largest entry is nonzero but below 2^-120: its entries are near or
    below fp32's normal range and have lost significant bits (weights near 1e-21)."""
    return any(0.0 < _abs_max(X) < _FP32_FULL for X in tensors if X.numel())


def _underflowed_to_zero(vsq: float, update: torch.Tensor) -> bool:
    """Whether a projection of ``update`` (B or dW, d_out rows) that came out all zero may have
    underflowed: bounds of its two products' terms (``||V|| max|update|`` and ``||V||^2 max|update|
    sqrt(d_out)``) are nonzero but below fp32's full precision. A zero update projects to zero."""
    v, umax = math.sqrt(vsq), _abs_max(update)
    return 0.0 < min(v * umax, vsq * umax * math.sqrt(update.shape[0])) < _FP32_FULL


def _v_is_zero(vsq: float, wa: torch.Tensor, wu: torch.Tensor) -> bool:
    """Whether V = 0; raises where ||V||^2 is 0 but the weights differ (entries too small to square
    in fp32, below about 1e-19): checked against the tensors, a read on that path only."""
    if vsq == 0.0 and not torch.equal(wa, wu):
        raise FloatingPointError(_LOST)
    return vsq == 0.0


def _cos(num: float, n2: float, d2: float) -> float:
    denom = math.sqrt(max(n2, 0.0) * max(d2, 0.0))
    return num / denom if denom > 0 else math.nan


@backends.exact_fp32_matmuls()
def subspace_score(
    w_aligned: torch.Tensor,
    w_unaligned: torch.Tensor,
    *,
    lora_A: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    delta: torch.Tensor | None = None,
    backend: str = "auto",
    with_projection: bool = False,
    file_backed: bool = False,
    precision: str | None = None,
) -> Score:
    """Score one layer's update against its safety subspace; see :func:`subspace_cosine`.

    With ``with_projection`` and a LoRA update, also return Safe LoRA's ``C @ lora_B`` (fp32),
    which falls out of the second pass (``P / ||V||``) at no extra read of the weights.
    ``file_backed`` says the weights are views of live private file mappings made by
    ``ModelReader.map`` (checked: anything else is a ValueError, since dropping pages of ordinary
    memory would zero it): the C++ backend then drops their pages from the resident set as it
    finishes with them (they read back from the file). The views must be unmodified: a page
    written to is a private copy, and dropping it would read the file's values back in its place.
    ``precision`` allows the Triton kernels a tensor-core operand precision (``backends.PRECISIONS``;
    None: ``SAFEMERGE_PRECISION``, else exact ``ieee``); the score says which one was used.
    """
    _check_pair(w_aligned, w_unaligned)
    for what, t in (("lora_A", lora_A), ("lora_B", lora_B), ("delta", delta)):
        if t is not None:
            _check_tensor(what, t)
    lowrank = lora_A is not None or lora_B is not None
    if lowrank == (delta is not None) or (lowrank and (lora_A is None or lora_B is None)):
        raise ValueError("give exactly one of lora_A+lora_B (a LoRA update) or delta (a full update)")
    if file_backed and not (_mapped.covers(w_aligned) and _mapped.covers(w_unaligned)):
        raise ValueError("file_backed=True, but the weights are not views of live ModelReader.map mappings: "
                         "their pages cannot be dropped; leave file_backed off")
    # (scores are not differentiable; a tensor that requires grad is read as it is)
    w_aligned, w_unaligned = w_aligned.detach(), w_unaligned.detach()
    lora_A, lora_B, delta = (None if t is None else t.detach() for t in (lora_A, lora_B, delta))
    name, impl, kw, used = _resolve(backend, w_aligned.device.type, precision)
    wa, wu = _pair(w_aligned.contiguous(), w_unaligned.contiguous())
    if lowrank:
        _lowrank_factors(wa, lora_A, lora_B)
        B = _operand(lora_B).to(wa.device).contiguous()
        # (only the weights themselves may drop pages, never a copy that .contiguous() made)
        drop = file_backed and name == "cpp" and wa is w_aligned and wu is w_unaligned
        release = {"release_behind": True} if drop else {}
        T, P, vsq = impl.lowrank_passes(wa, wu, B, **release, **kw)
        vsq = _checked_sum(vsq, wa, wu)
        # with G = A A^T: <C dW, dW> = <T^T T, G>/||V||, ||C dW||^2 = <P^T P, G>/||V||^2,
        # ||dW||^2 = <B^T B, G>
        traces = getattr(impl, "lowrank_traces", reference.lowrank_traces)
        inner, n2, d2 = traces(T, P, lora_A, lora_B)
        if _below_full_precision(T, P):  # (the score would be off in its fourth digit)
            raise FloatingPointError(_LOST)
        projected = P / math.sqrt(vsq) if with_projection and vsq > 0 else None  # (C B of the factors given)
        scale = _square_sum64(lora_B) * _square_sum64(lora_A)
        factors = (lora_A, lora_B)  # (the factors scored)
        if d2 < _CANCELLING * scale:
            # B A is far smaller than B and A: T's fp32 rounding (relative to ||V|| ||B||) no longer
            # cancels as B A does, and the cosine drifts by about 2^-26 ||B|| ||A|| / ||B A||. Scored
            # again with factors of the same product that do not cancel (a second read of the pair)
            A2, B2, s2 = _refactored(lora_A, lora_B)
            if s2 <= _CANCELLED * scale:  # below what fp32 resolves of its factors: noise, or zero
                if s2 <= _FLOAT64_NOISE * scale:  # (zero in float64; the backend's d2 is its rounding, either sign)
                    d2 = 0.0
                else:
                    raise FloatingPointError(
                        f"{CANCELLED}: ||B A|| is {math.sqrt(s2 / scale):.1e} of ||B|| ||A||, "
                        "below what fp32 resolves of them (2^-20), so B A is rounding noise; rebuild the adapter "
                        "without the parts that cancel, or leave this module out of it")
            else:
                T, P2, _ = impl.lowrank_passes(wa, wu, B2.to(wa.device), **release, **kw)
                inner, n2, d2 = traces(T, P2, A2, B2)
                factors = (A2, B2)
                if _below_full_precision(T, P2):
                    raise FloatingPointError(_LOST)
        # rho = (inner/||V||) / (sqrt(n2)/||V|| * sqrt(d2)): ||V|| cancels.
        num = inner

        def exact() -> tuple[float, float, float]:
            fA, fB = factors
            T64, P64, _ = reference.lowrank_passes(wa, wu, fB.to(wa.device), dtype=torch.float64)
            return reference.lowrank_traces(T64, P64, fA, fB)
    else:
        if delta.shape != wa.shape:
            raise ValueError(f"delta has shape {tuple(delta.shape)} but the weights {tuple(wa.shape)}")
        _check_update("delta", delta)
        dW = _operand(delta).to(wa.device).contiguous()
        m2, n2, d2, vsq = impl.fullrank_sums(wa, wu, dW, **kw)
        vsq, d2 = _checked_sum(vsq, wa, wu), _checked_sum(d2, dW)
        num, projected = m2, None

        def exact() -> tuple[float, float, float]:
            return reference.fullrank_sums64(wa, wu, dW)
        d_out, d_in = wa.shape  # (M = V^T dW, N = V M: their entries' RMS below 2^-120, see above)
        if 0.0 < m2 < _FP32_FULL ** 2 * d_in * d_in or 0.0 < n2 < _FP32_FULL ** 2 * d_out * d_in:
            raise FloatingPointError(_LOST)
    values = (vsq, num, n2, d2)
    if not all(math.isfinite(v) for v in values):
        raise _non_finite("the layer's weights or update contain NaN or Inf", w_aligned, w_unaligned, lora_A, lora_B,
                          delta)
    v_norm, d_norm = math.sqrt(vsq), math.sqrt(max(d2, 0.0))
    # a zero sum of squares from entries too small to square in fp32 (below about 1e-19) is not a
    # zero V or update: checked against the tensors themselves, which costs a read only then
    v_zero = _v_is_zero(vsq, w_aligned, w_unaligned)
    if d2 <= 0.0 and delta is not None and bool(delta.any()):
        raise FloatingPointError(_LOST)
    if v_zero:
        return Score(math.nan, v_norm, d_norm, "aligned and unaligned weights are identical (V = 0)", name,
                     precision=used)
    if d2 <= 0.0:
        return Score(math.nan, v_norm, d_norm, "the update is zero", name, precision=used)
    if n2 <= 0.0 and num != 0.0:  # (V^T dW != 0 forces V V^T dW != 0: the fp32 sums underflowed)
        raise FloatingPointError(_LOST)
    if n2 > 0.0 and num > 0.0 and vsq * num > _ILL_CONDITIONED * n2:
        # dW meets only V's weakest directions: fp32's rounding of V^T dW (relative to ||V||) is
        # no longer small next to them. Rare (see _ILL_CONDITIONED); the torch passes in float64
        num, n2, d2 = exact()
    cos = _cos(num, n2, d2)
    if abs(cos) > 1.0 + 1e-3:  # (|cos| <= 1 exactly; beyond rounding, the fp32 sums lost their digits)
        raise FloatingPointError(f"{_LOST} (|cos| = {abs(cos):.4g})")
    if math.isnan(cos):
        # every product in V^T dW is at most ||V|| max|dW|: below 2^-120 they all lost their bits in
        # fp32, and a zero sum says nothing about C dW
        if v_norm * (_abs_max(B) if lowrank else d_norm) < _FP32_FULL:
            raise FloatingPointError(_LOST)
        # C dW = 0: the update lies wholly outside V's column space. rho tends to 0 as an update
        # turns away from it (rho <= ||V^T dW|| / (s ||dW||), s the least nonzero singular value
        # of V), and the official code's cosine_similarity gives 0 here: the most drifted layer
        # scores 0; it is not left out
        cos = 0.0
    return Score(min(1.0, max(-1.0, cos)), v_norm, d_norm, None, name,
                 projected.float() if projected is not None else None, used)


def subspace_cosine(
    w_aligned: torch.Tensor,
    w_unaligned: torch.Tensor,
    *,
    lora_A: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    delta: torch.Tensor | None = None,
    backend: str = "auto",
    precision: str | None = None,
) -> float:
    """rho = cos(vec(C dW), vec(dW)) for dW = lora_B @ lora_A or dW = delta.

    Exactly one of ``lora_A``+``lora_B`` or ``delta``; a LoRA scale does not matter. Returns nan for
    degenerate layers (V = 0 or dW = 0), and 0 where C dW = 0 (dW wholly outside V's column space).
    Raises FloatingPointError on NaN/Inf inputs.
    """
    return subspace_score(
        w_aligned, w_unaligned, lora_A=lora_A, lora_B=lora_B, delta=delta, backend=backend, precision=precision
    ).cosine


@backends.exact_fp32_matmuls()
def project_lora_B(
    w_aligned: torch.Tensor, w_unaligned: torch.Tensor, lora_B: torch.Tensor, backend: str = "auto",
    precision: str | None = None,
) -> torch.Tensor:
    """Safe LoRA's ``C @ lora_B = V (V^T B) / ||V||`` without forming C, in lora_B's dtype."""
    _check_pair(w_aligned, w_unaligned)
    _check_tensor("lora_B", lora_B)
    if lora_B.dim() != 2 or lora_B.shape[0] != w_aligned.shape[0] or lora_B.shape[1] < 1:
        raise ValueError(f"lora_B has shape {tuple(lora_B.shape)}; want {w_aligned.shape[0]}xr, r >= 1")
    _check_update("lora_B", lora_B)
    w_aligned, w_unaligned, lora_B = w_aligned.detach(), w_unaligned.detach(), lora_B.detach()
    _, impl, kw, _ = _resolve(backend, w_aligned.device.type, precision)
    wa, wu = _pair(w_aligned.contiguous(), w_unaligned.contiguous())
    T, P, vsq = impl.lowrank_passes(wa, wu, _operand(lora_B).to(w_aligned.device).contiguous(), **kw)
    vsq = _checked_sum(vsq, wa, wu)
    if not math.isfinite(vsq) or not torch.isfinite(P).all():
        raise _non_finite("the weights or lora_B contain NaN or Inf", w_aligned, w_unaligned, lora_B)
    if _v_is_zero(vsq, w_aligned, w_unaligned):
        raise ValueError("aligned and unaligned weights are identical (V = 0): the projection is undefined")
    # (T != 0 forces P = V T != 0: a zero P underflowed; a zero T says nothing where V^T B's terms
    # all lie below fp32's full precision, or B's entries below fp32's range: review196)
    if _below_full_precision(T, P) or (bool(T.any()) and not bool(P.any())):
        raise FloatingPointError(_LOST)
    if not bool(P.any()) and _underflowed_to_zero(vsq, lora_B):
        raise FloatingPointError(_LOST)
    out = P.double() / math.sqrt(vsq)
    if out_of_range(out, lora_B.dtype) is not None:
        raise FloatingPointError(f"C @ lora_B exceeds the range of {lora_B.dtype}; pass lora_B in float32")
    lost = lost_in_cast(out, lora_B.dtype)
    if lost is not None:
        warnings.warn(f"C @ lora_B lies below the normal range of {lora_B.dtype} (smallest normal "
                      f"{torch.finfo(lora_B.dtype).tiny:.2g}), where a cast to it errs by {lost:.1%}; pass lora_B in "
                      "float32 to keep its digits", RuntimeWarning, stacklevel=2)
    return out.to(device=lora_B.device, dtype=lora_B.dtype)


def out_of_range(x: torch.Tensor, dtype: torch.dtype) -> float | None:
    """The largest magnitude of ``x`` where ``dtype`` cannot hold it (Inf or NaN included), else
    None. Checked before the cast: float8_e4m3fn saturates at 448 instead of overflowing."""
    if not dtype.is_floating_point or x.numel() == 0:
        return None
    big = float(x.detach().abs().max())
    return big if not math.isfinite(big) or big > torch.finfo(dtype).max else None


def lost_in_cast(x: torch.Tensor, dtype: torch.dtype) -> float | None:
    """The relative error (Frobenius) of casting ``x`` to ``dtype`` where it exceeds ``dtype``'s
    epsilon, else None. Rounding within the normal range errs by at most half an epsilon an entry,
    so more means that entries fell below it (fp16 below 6.1e-5), where fewer bits are left."""
    if not dtype.is_floating_point or x.numel() == 0:
        return None
    x64 = x.detach().double()
    norm = float(x64.norm())
    if norm == 0.0 or not math.isfinite(norm):
        return None
    err = float((x.detach().to(dtype).double() - x64).norm()) / norm
    return err if err > torch.finfo(dtype).eps else None


@backends.exact_fp32_matmuls()
def project_delta(
    w_aligned: torch.Tensor, w_unaligned: torch.Tensor, delta: torch.Tensor, backend: str = "auto",
    precision: str | None = None,
) -> torch.Tensor:
    """Safe LoRA on a full update: ``C dW`` (fp32), column block by column block, never forming C."""
    _check_pair(w_aligned, w_unaligned)
    _check_tensor("delta", delta)
    if delta.shape != w_aligned.shape:
        raise ValueError(f"delta has shape {tuple(delta.shape)} but the weights {tuple(w_aligned.shape)}")
    _check_update("delta", delta)
    w_aligned, w_unaligned, delta = w_aligned.detach(), w_unaligned.detach(), delta.detach()
    _, impl, kw, _ = _resolve(backend, w_aligned.device.type, precision)
    wa, wu = _pair(w_aligned.contiguous(), w_unaligned.contiguous())
    N, vsq = impl.project_full(wa, wu, _operand(delta).to(w_aligned.device).contiguous(), **kw)
    vsq = _checked_sum(vsq, wa, wu)
    # (one read of N, no copy: isfinite(N) made |N| and masks, more than a copy of N at the peak of
    # Safe LoRA's merge, review194; aminmax gives NaN where N holds one)
    big = _abs_max(N) if N.numel() else 0.0
    if not math.isfinite(vsq) or not math.isfinite(big):
        raise _non_finite("the weights or the update contain NaN or Inf", w_aligned, w_unaligned, delta)
    if _v_is_zero(vsq, w_aligned, w_unaligned):
        raise ValueError("aligned and unaligned weights are identical (V = 0): the projection is undefined")
    # N = V M, M = V^T dW: entries of N below 2^-120 lost their bits; and an all-zero N says nothing
    # where either product's terms all lie below it (bounds: ||V|| max|dW|, and ||V||^2 max|dW| sqrt(d_out))
    if 0.0 < big < _FP32_FULL or (big == 0.0 and _underflowed_to_zero(vsq, delta)):
        raise FloatingPointError(_LOST)
    return N.div_(math.sqrt(vsq))  # (N is the backend's own: no second copy of it)
