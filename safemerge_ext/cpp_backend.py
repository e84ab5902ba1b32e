"""C++ (OpenMP) backend for CPU tensors: the two passes over V = W_aligned - W_unaligned run in the
``safemerge_ext._cpu`` extension (csrc/cpu_ops.cpp), which reads fp32/fp16/bf16 weights in place
through their data pointers and never stores V.

The full-rank ops (``fullrank_sums``, ``project_full``) are GEMM-shaped, so here they are the
reference's blocked BLAS matmuls (``reference.fullrank_blocks``), which form V and dW one block at a
time: memory stays at a few blocks and the speed is the BLAS's. The contract is the one written out
in ``safemerge_ext.reference``.
"""

from __future__ import annotations

import os
import warnings

import torch

from safemerge_ext import backends, reference
from safemerge_ext._native import DTYPE_CODE, aligned, check_weights, checkout_hint, does_not_load, require

NAME = "cpp"

try:
    from safemerge_ext import _cpu
except ImportError as exc:  # the build skipped or failed; the reason goes to available_backends()
    _cpu = None
    _IMPORT_ERROR = str(exc)
else:
    _IMPORT_ERROR = None

# Full-rank path: rows of V and dW formed at once (256 x 14336 fp32 is 14 MiB), and the budget for
# M_J = V^T dW[:, J] (d_in x |J| fp32), which sets the column block; at least 256 columns.
_ROW_BLOCK = 256
_M_BYTES = 64 << 20
_MIN_COLS = 256


# The extension picks its kernels' instruction set from the CPU (AMX tiles for ranks of 16 and up where
# the CPU and OS allow them, 16-float AVX-512 vectors on Intel, 8-float ones on AMD, AVX2, or the
# baseline); this variable overrides the pick. The ISA builds sum in different orders, so their
# scores differ in the last bits (each is deterministic).
ISA_ENV_VAR = "SAFEMERGE_CPU_ISA"
ISAS = ("best", "x86-64-v4-amx", "x86-64-v4-512", "x86-64-v4", "x86-64-v3", "baseline")


def _apply_isa() -> str | None:
    """Select the kernels ``SAFEMERGE_CPU_ISA`` names; the reason when it names none this CPU can
    run. Unset, it leaves the selection as it is (the CPU's pick, or one a caller made with
    ``_cpu.set_isa``), except one the variable made, which goes back to the CPU's pick."""
    global _env_isa
    want = os.environ.get(ISA_ENV_VAR, "").strip().lower()
    if not want:
        if _env_isa is not None and _cpu.isa() == _env_isa:  # (unset since: the default again)
            _cpu.set_isa("best")
        _env_isa = None
        return None
    if want not in ISAS:
        reason = f"{ISA_ENV_VAR}={want!r} is not one of {', '.join(ISAS)}; unset it or pick one of them"
    elif _cpu.isa() == want or _cpu.set_isa(want):
        _env_isa = _cpu.isa()
        return None
    else:
        prev = _cpu.isa()
        runs = [name for name in ISAS[1:] if _cpu.set_isa(name)]
        _cpu.set_isa(prev)
        reason = f"{ISA_ENV_VAR}={want}: this CPU cannot run those kernels; it runs {', '.join(runs)}"
    if want not in _warned and not backends.QUIET.get():  # `auto` then scores with torch, 5-20x slower: say so once
        _warned.add(want)
        warnings.warn(f"the C++ backend is off: {reason}", stacklevel=2)
    return reason


_warned: set[str] = set()
_env_isa: str | None = None  # the kernels SAFEMERGE_CPU_ISA selected, while they are in use


def unavailable_reason() -> str | None:
    """None when the extension is importable, else why the ``cpp`` backend cannot run."""
    if _cpu is None:
        return does_not_load("C++", "safemerge_ext._cpu", _IMPORT_ERROR) or (
            "the C++ extension was not built (SAFEMERGE_SKIP_NATIVE=1, no compiler, or a failed build; "
            f"reinstall safemerge-ext to build it): {_IMPORT_ERROR}" + checkout_hint()
        )
    return _apply_isa()


def detail() -> str:
    """What the kernels run with, for ``safemerge backends`` and the report (``backends.backend_detail``
    asks after ``unavailable_reason``, which has applied SAFEMERGE_CPU_ISA)."""
    threads = torch.get_num_threads() if _cpu.openmp() else 1
    isa = _cpu.isa()
    tail = (f", ranks below {_cpu.AMX_MIN_RANK} on x86-64-v4-512 kernels"
            if isa == "x86-64-v4-amx" and hasattr(_cpu, "AMX_MIN_RANK") else "")
    return (f"{isa} kernels, {'OpenMP' if _cpu.openmp() else 'no OpenMP'}, "
            f"{threads} thread{'s' if threads != 1 else ''}{tail}")


# Drop-behind (weights mapped from files): rows per block, so that a block of the wider matrix is
# about this many bytes; each matrix of a pair then holds one or two blocks in the resident set
# (measured: a 2 x 32 MiB pair in 4 MiB blocks peaks at 10 MiB).
RELEASE_BLOCK_BYTES = 8 << 20
_KC = 32  # the kernel's row-chunk height, which the blocks are a multiple of


def lowrank_passes(wa: torch.Tensor, wu: torch.Tensor, lora_B: torch.Tensor, *,
                   release_behind: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:
    """T = V^T B (d_in x r, fp32), P = V T (d_out x r, fp32) and ||V||^2 (float64 sum).

    ``release_behind`` is for weights that are private mappings of files (``ModelReader.map``;
    ``ModelReader.is_mapped`` says so) and nothing else: on other memory it would lose data. The
    rows are then walked in blocks of about ``RELEASE_BLOCK_BYTES``, and each block's pages leave
    the resident set once both passes are done with it (they come back from the page cache if
    touched again), so a pair larger than a few blocks is never resident whole. Same bits.
    """
    require(unavailable_reason())
    given = wa, wu
    wa, wu = check_weights(wa, wu, NAME, "cpu")
    # a copy that check_weights made (rows not unit-stride) is anonymous memory: never drop its pages;
    # nor those of a view with gaps between its rows (the bytes in between are not the view's)
    release_behind = (release_behind and wa is given[0] and wu is given[1]
                      and wa.stride(0) == wa.shape[1] and wu.stride(0) == wu.shape[1])
    d_out, d_in = wa.shape
    if lora_B.dim() != 2 or lora_B.shape[0] != d_out or lora_B.shape[1] < 1:
        raise ValueError(f"lora_B has shape {tuple(lora_B.shape)}; want {d_out}xr with r >= 1")
    B = aligned(lora_B.to(device="cpu", dtype=torch.float32).contiguous())
    r = B.shape[1]
    T = torch.empty(d_in, r, dtype=torch.float32, device="cpu")  # (not a program's default device)
    P = torch.empty(d_out, r, dtype=torch.float32, device="cpu")
    release_rows = 0
    if release_behind:
        row_bytes = max(wa.stride(0), wu.stride(0)) * wa.element_size()
        release_rows = max(_KC, RELEASE_BLOCK_BYTES // row_bytes // _KC * _KC)
    vsq = _cpu.lowrank_passes(
        wa.data_ptr(), wu.data_ptr(), d_out, d_in, wa.stride(0), wu.stride(0), DTYPE_CODE[wa.dtype],
        B.data_ptr(), r, T.data_ptr(), P.data_ptr(), torch.get_num_threads(), release_rows,
    )
    return T, P, float(vsq)


# Above this rank the reference's float64 BLAS Grams are faster than the extension's (which grow
# as r^2 per row): measured on the 2-core Xeon, 11008x4096, cpp / torch: r=128 0.036 / 0.025 s,
# r=256 0.13 / 0.056 s, r=512 0.55 / 0.17 s, r=1024 2.8 / 0.55 s (review187: merged adapters have
# r_task + r_safety, 512 for two r=256 adapters). Both are float64 sums of exact products.
TRACES_MAX_RANK = 128


def lowrank_traces(T: torch.Tensor, P: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[float, float, float]:
    """``<T^T T, G>``, ``<P^T P, G>``, ``<B^T B, G>`` with ``G = A A^T`` in one call (float64 sums of
    exact fp32 products); factors in a dtype the extension does not read, and ranks above
    ``TRACES_MAX_RANK``, go to the reference."""
    if (_cpu is None or lora_A.dtype not in DTYPE_CODE or lora_B.dtype not in DTYPE_CODE
            or lora_A.device.type != "cpu" or lora_B.device.type != "cpu" or T.shape[1] > TRACES_MAX_RANK):
        return reference.lowrank_traces(T, P, lora_A, lora_B)
    d_in, r = T.shape
    d_out = P.shape[0]
    if d_in == 0 or d_out == 0:
        return 0.0, 0.0, 0.0
    T, P = aligned(T.float().contiguous()), aligned(P.float().contiguous())
    A, B = aligned(lora_A.contiguous()), aligned(lora_B.contiguous())
    return _cpu.lowrank_traces(T.data_ptr(), P.data_ptr(), B.data_ptr(), DTYPE_CODE[B.dtype], A.data_ptr(),
                               DTYPE_CODE[A.dtype], d_out, d_in, r, torch.get_num_threads())


def _checked_delta(wa: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    if delta.shape != wa.shape:
        raise ValueError(f"delta has shape {tuple(delta.shape)} but the weights {tuple(wa.shape)}")
    if delta.device.type != "cpu":
        raise ValueError(f"the cpp backend runs on CPU tensors; delta is on {delta.device}")
    return delta


def _sizes() -> dict[str, int]:
    return {"row_block": _ROW_BLOCK, "m_bytes": _M_BYTES, "min_cols": _MIN_COLS}


def fullrank_sums(wa: torch.Tensor, wu: torch.Tensor, delta: torch.Tensor) -> tuple[float, float, float, float]:
    """||V^T dW||^2, ||V V^T dW||^2, ||dW||^2, ||V||^2 from blocked BLAS matmuls (float64 sums)."""
    wa, wu = check_weights(wa, wu, NAME, "cpu")
    return reference.fullrank_sums(wa, wu, _checked_delta(wa, delta), **_sizes())


def project_full(wa: torch.Tensor, wu: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, float]:
    """N = V (V^T dW) in fp32 (C dW times ||V||) and ||V||^2, with the blocks of :func:`fullrank_sums`."""
    wa, wu = check_weights(wa, wu, NAME, "cpu")
    return reference.project_full(wa, wu, _checked_delta(wa, delta), **_sizes())