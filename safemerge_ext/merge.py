"""How a flagged layer's two updates become one: ``merge(alpha * dW_f, (1 - alpha) * dW_s)``.

``linear`` on LoRA factors is exact by rank concatenation (no cross terms, unlike PEFT's
``add_weighted_adapter(combination_type="linear")``): ``[alpha s_f B_f, (1-alpha) s_s B_s] @ [A_f; A_s]``.
``ties``, ``dare_linear`` and ``dare_ties`` run ``peft.utils.merge_utils`` on the layer's full
updates, weighted ``alpha`` and ``1 - alpha`` before they are merged, as the formula says: TIES then
elects each entry's sign on the weighted updates (PEFT's ``add_weighted_adapter`` weights them only
after the election, so there an update of weight 0 still decides signs, and halves the entries where
the two agree). DARE's random mask is drawn as ``merge_utils.random_pruning`` draws it, from a
generator of the call's own seeded by (seed, module name), so a run is reproducible whatever the
order, and other threads' draws from torch's global generator neither change it nor repeat
(review174: seeding and restoring the global one did both).

``peft-linear`` (LoRA adapters only) is the reference code's combination, for reproducing its
numbers: PEFT's ``add_weighted_adapter([task, safety], [alpha, 1 - alpha], combination_type="linear")``,
which mixes the A's and the B's separately (``A = sum sqrt(w_i s_i) A_i``, ``B = sum sqrt(w_i s_i) B_i``,
each through ``merge_utils.task_arithmetic`` as PEFT runs it), so its update carries the cross terms
``sqrt(w_f s_f w_s s_s) (B_f A_s + B_s A_f)`` (PEFT issue 3004). It needs equal ranks, as PEFT does.
"""

from __future__ import annotations

import math
import zlib

import torch

METHODS = ("linear", "ties", "dare_linear", "dare_ties")  # on full updates (mergekit) and on adapters
PEFT_LINEAR = "peft-linear"
LORA_METHODS = (*METHODS, PEFT_LINEAR)  # on two LoRA adapters (safemerge merge)
USES_DENSITY = ("ties", "dare_linear", "dare_ties")  # (linear and peft-linear keep every entry)
USES_SEED = ("dare_linear", "dare_ties")  # (only DARE draws)


def validate(method: str, alpha: float, density: float, *, lora: bool = False) -> None:
    """Raise ValueError for an unknown method (``lora``: one that merges two adapters' factors
    may also be ``peft-linear``) or out-of-range alpha / density."""
    methods = LORA_METHODS if lora else METHODS
    if method not in methods:
        raise ValueError(f"merge method must be one of {', '.join(methods)}; got {method!r}")
    if not (0.0 <= alpha <= 1.0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must lie in [0, 1] (the task update's weight); got {alpha}")
    if not (0.0 < density <= 1.0):
        raise ValueError(f"density must lie in (0, 1] (the fraction of each update kept); got {density}")


def concat_lora(
    B_f: torch.Tensor, A_f: torch.Tensor, s_f: float,
    B_s: torch.Tensor, A_s: torch.Tensor, s_s: float, alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact linear merge of two LoRA updates as one rank r_f + r_s factor pair, scale 1 (fp32;
    float64 when a factor is)."""
    validate("linear", alpha, 1.0)
    wd = torch.float64 if torch.float64 in (B_f.dtype, A_f.dtype, B_s.dtype, A_s.dtype) else torch.float32
    B = torch.cat([B_f.to(wd) * (alpha * s_f), B_s.to(wd) * ((1.0 - alpha) * s_s)], dim=1)
    A = torch.cat([A_f.to(wd), A_s.to(wd)], dim=0)
    return B, A


def peft_linear(
    B_f: torch.Tensor, A_f: torch.Tensor, s_f: float,
    B_s: torch.Tensor, A_s: torch.Tensor, s_s: float, alpha: float, *, scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``add_weighted_adapter(combination_type="linear")`` of the task and safety factors with
    weights ``[alpha, 1 - alpha]``: factors ``(B, A)`` of rank r whose ``B @ A`` is the merged
    update, ``scale`` (the new adapter's scaling, :func:`peft_linear_scaling`) folded into B. The
    factors are read in fp32, as PEFT loads adapters by default (float64 when a factor is)."""
    from peft.utils import merge_utils

    validate(PEFT_LINEAR, alpha, 1.0, lora=True)
    if A_f.shape != A_s.shape or B_f.shape != B_s.shape:
        raise ValueError(f"peft-linear needs factors of one shape (PEFT's linear combination needs equal ranks); "
                         f"got lora_A {tuple(A_f.shape)} and {tuple(A_s.shape)}")
    wd = torch.float64 if torch.float64 in (B_f.dtype, A_f.dtype, B_s.dtype, A_s.dtype) else torch.float32
    # (as PEFT: Python floats into a tensor of the default dtype; a weight times scaling below 0, a
    # negative lora_alpha, puts its sign on A's weight alone)
    scaled = (alpha * s_f, (1.0 - alpha) * s_s)
    weights_B = torch.tensor([math.sqrt(abs(w)) for w in scaled], device=B_f.device)
    weights_A = torch.tensor([math.sqrt(abs(w)) * (1 if w >= 0 else -1) for w in scaled], device=A_f.device)
    A = merge_utils.task_arithmetic([A_f.to(wd), A_s.to(wd)], weights_A)
    B = merge_utils.task_arithmetic([B_f.to(wd), B_s.to(wd)], weights_B)
    return (B if scale == 1.0 else B * scale), A


def peft_linear_scaling(task_config: dict) -> float:
    """The scaling PEFT gives every module of the adapter that ``add_weighted_adapter`` makes: it
    copies the first (task) adapter's config with ``r = lora_alpha =`` that adapter's largest rank
    (``r`` or a ``rank_pattern`` value) and no patterns, so 1, or ``r / sqrt(r)`` where it keeps
    ``use_rslora``, whatever a module's own rank."""
    rank = max([int(task_config.get("r", 8)), *(int(v) for v in (task_config.get("rank_pattern") or {}).values())])
    return rank / math.sqrt(rank) if task_config.get("use_rslora") else rank / rank


def module_seed(seed: int, module: str) -> int:
    """A per-module seed that does not depend on the order layers are processed in."""
    return (int(seed) * 1_000_003 + zlib.crc32(module.encode())) % (2**63 - 1)


def dare_generator(seed: int, module: str, device: torch.device) -> torch.Generator:
    """The generator DARE draws ``module``'s masks from: its own, seeded by (seed, module), so that
    no other thread's draw shares it."""
    generator = torch.Generator(device=device)
    generator.manual_seed(module_seed(seed, module))
    return generator


def dare_pruned(tensors: list[torch.Tensor], density: float, seed: int, module: str) -> list[torch.Tensor]:
    """DARE's random pruning of ``tensors``, in turn, as ``merge_utils.random_pruning(t, density,
    rescale=True)`` does it (each entry kept with probability ``density``, the kept ones divided by
    it; the same bits as that function after ``torch.manual_seed``), its masks drawn from
    :func:`dare_generator`. The list is pruned in place: each tensor's pruned copy replaces it, so
    that only one is held twice at a time (the tensors themselves are not modified)."""
    generator = dare_generator(seed, module, tensors[0].device)
    for i, t in enumerate(tensors):
        kept = t * torch.bernoulli(torch.full_like(t, density), generator=generator)
        tensors[i] = kept.div_(density)
        del t, kept
    return tensors


BLOCK_ELEMS = 1 << 20  # elements of a row block formed at once (4 MiB of fp32)


def row_blocks(x: torch.Tensor) -> list[slice]:
    """Slices of ``x``'s first dimension of about ``BLOCK_ELEMS`` elements each (at least one index)."""
    rows = max(1, BLOCK_ELEMS // max(1, math.prod(x.shape[1:])))
    return [slice(i, i + rows) for i in range(0, x.shape[0], rows)]


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a matrix of its last dimension's rows (a 1-D or 0-D tensor: one row), to be walked
    with :func:`row_blocks`."""
    return x.flatten(0, -2) if x.dim() >= 2 else x.reshape(1, -1)  # (flatten: a last dimension of 0 too)


def combine_full(
    dW_f: torch.Tensor, dW_s: torch.Tensor, *, alpha: float, method: str, density: float, seed: int, module: str
) -> torch.Tensor:
    """``merge(alpha * dW_f, (1 - alpha) * dW_s)`` on full updates, in fp32 (float64 when an update is).

    What is drawn or ranked over a whole update (DARE's masks, TIES' magnitude pruning) is done to
    each update whole, in turn; the rest is elementwise and made a block of rows at a time, with
    ``merge_utils``' own functions (the same bits as on the whole, without its stacked copies)."""
    from peft.utils import merge_utils

    validate(method, alpha, density)
    wd = torch.float64 if torch.float64 in (dW_f.dtype, dW_s.dtype) else torch.float32
    tensors = [dW_f.to(wd), dW_s.to(wd)]
    weights = torch.tensor([alpha, 1.0 - alpha], dtype=wd, device=dW_f.device)
    elect = method in ("ties", "dare_ties")
    if elect:  # (the sign election sees the weighted updates: see the module's docstring)
        tensors = [tensors[0] * alpha, tensors[1] * (1.0 - alpha)]
        weights = torch.ones_like(weights)
    if method in ("dare_linear", "dare_ties") and density < 1.0:
        # merge_utils.dare_linear / dare_ties, with the pruning drawn from our own generator
        tensors = dare_pruned(tensors, density, seed, module)
    elif method == "ties" and density < 1.0:  # (merge_utils.ties' pruning; at density 1 peft's would only warn)
        for i in range(len(tensors)):
            tensors[i] = merge_utils.prune(tensors[i], density, method="magnitude")
    shape = tensors[0].shape
    tensors = [as_rows(t) for t in tensors]
    out = torch.empty(tensors[0].shape, dtype=wd, device=dW_f.device)
    for r in row_blocks(out):
        if not elect:
            out[r] = merge_utils.task_arithmetic([t[r] for t in tensors], weights)
            continue
        # elect signs, keep the agreeing entries (merge_utils.ties after its pruning)
        stacked = torch.stack([t[r] for t in tensors])
        mask = merge_utils.calculate_majority_sign_mask(stacked, method="total")
        out[r] = merge_utils.disjoint_merge(stacked * merge_utils.reshape_weight_task_tensors(stacked, weights), mask)
    return out.view(shape)


# LAPACK's SVD computes every singular vector: m n^2 work, 396 s for one 28672x8192 update on the
# 2-core Xeon (review187), where ties/dare keep r_task + r_safety of them. Above this smaller side
# a randomized SVD does (Halko, Martinsson & Tropp 2011: a Gaussian sketch with _OVERSAMPLE extra
# columns, _POWER_ITERS power iterations), m n k work; its error is the factors' own, as reported.
EXACT_SVD_MAX_SIDE = 2048
_OVERSAMPLE = 16
_POWER_ITERS = 4


def truncated_factors(dW: torch.Tensor, rank: int, *, seed: int = 0, module: str = "") -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-``rank`` factors (B = U S, A = V^T) of dW and their relative Frobenius error: the best
    (a full SVD) where dW's smaller side is at most ``EXACT_SVD_MAX_SIDE``, else from a randomized
    SVD whose sketch is drawn from a generator seeded by ``seed`` and ``module`` (the same bits
    run to run, whatever other threads draw)."""
    dW = dW if dW.dtype == torch.float64 else dW.float()
    k = min(rank, *dW.shape)
    if min(dW.shape) <= EXACT_SVD_MAX_SIDE or 2 * (k + _OVERSAMPLE) >= min(dW.shape):
        U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
        total = float(S.double().square().sum())
        rel = math.sqrt(float(S[k:].double().square().sum()) / total) if total > 0 else 0.0
        return U[:, :k] * S[:k], Vh[:k].contiguous(), rel
    # (the sketch's own stream: not DARE's mask's, which made dW)
    U, S, Vh = _randomized_svd(dW, k + _OVERSAMPLE, module_seed(seed, f"{module}/svd"))
    B, A = U[:, :k] * S[:k], Vh[:k].contiguous()
    # the factors' own error, in float64 a block of rows at a time (||dW||^2 - sum S_k^2 would lose
    # the small errors to the fp32 singular values' rounding: review189)
    total = err = 0.0
    A64 = A.double()
    for i in range(0, dW.shape[0], 1024):
        rows = dW[i:i + 1024].double()
        total += float(rows.square().sum())
        err += float((rows - B[i:i + 1024].double() @ A64).square().sum())
    return B, A, (math.sqrt(err / total) if total > 0 else 0.0)


def _randomized_svd(dW: torch.Tensor, q: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U S V^T of Q Q^T dW, Q an orthonormal basis of dW's dominant q-dimensional range (power
    iterations re-orthonormalized each step, so that no singular value is lost to rounding)."""
    generator = torch.Generator(device=dW.device)
    generator.manual_seed(seed)
    sketch = torch.randn(dW.shape[1], q, generator=generator, dtype=dW.dtype, device=dW.device)
    Q = torch.linalg.qr(dW @ sketch).Q
    for _ in range(_POWER_ITERS):
        Q = torch.linalg.qr(dW.mT @ Q).Q
        Q = torch.linalg.qr(dW @ Q).Q
    Uq, S, Vh = torch.linalg.svd(Q.mT @ dW, full_matrices=False)
    return Q @ Uq, S, Vh
