"""Triton backend: fused kernels for the two passes over V = W_aligned - W_unaligned.

Implements the backend contract of ``safemerge_ext.reference`` (``lowrank_passes``,
``fullrank_sums``, ``project_full``) with one file per op: ``lowrank`` (T = V^T B, P = V T,
||V||^2) and ``fullrank`` (M = V^T dW, N = V M and their norms). Importing this package imports
neither triton nor CUDA; the op modules (and triton) are imported on first use, and
``unavailable_reason`` says why the backend cannot run here without importing triton either:
importing triton decorates its own jit helpers in the interpreter mode of that moment, for the
whole process, so a probe must not fix that mode before the caller sets TRITON_INTERPRET. The kernels run on CUDA tensors, or on CPU tensors through
triton's interpreter when ``TRITON_INTERPRET=1`` is set before the first op runs.
"""

from __future__ import annotations

import sys as _sys

if __name__ == "kernels":
    # Imported under the top-level name because a checkout's root is on sys.path (`python -m pytest`,
    # `python -c` or PYTHONPATH=. there): this folder would then shadow Hugging Face's `kernels`
    # package, which transformers >= 5.25 imports. Where that package is installed, it gets the name:
    # the import statement returns what sys.modules holds once this module has run.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root])
    if _spec is not None and _spec.loader is not None:
        _hf = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _hf
        try:
            _spec.loader.exec_module(_hf)
        except BaseException:
            del _sys.modules["kernels"]
            raise

import importlib.metadata
import importlib.util
import sys
from types import ModuleType

import torch

NAME = "triton"

__all__ = ["NAME", "fullrank_sums", "load", "lowrank_passes", "project_full", "unavailable_reason"]


_MIN_TRITON = (3, 0)


def _triton_version() -> tuple[int, int] | None:
    """triton's (major, minor) if it is installed, else None; imports nothing."""
    try:
        if sys.modules.get("triton", False) is None or importlib.util.find_spec("triton") is None:
            return None
        parts = importlib.metadata.version("triton").split(".")[:2]
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (ImportError, ValueError, importlib.metadata.PackageNotFoundError):
        return None


def unavailable_reason() -> str | None:
    """None when the kernels can run here, else one line saying why not (triton is not imported:
    that would fix its interpreter mode for the process; :func:`load` does, when they are used)."""
    version = _triton_version()
    if version is None:
        return "triton is not installed (pip install 'safemerge-ext[triton]')"
    if version < _MIN_TRITON:
        return f"triton {version[0]}.{version[1]} is too old: the kernels need triton >= 3.0"
    from ._launch import interpret_enabled

    if interpret_enabled() or torch.cuda.is_available():
        return None
    return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU through the interpreter)"


def load() -> None:
    """Import the kernels (and triton) now, as ``auto`` does before it picks this backend, and on a
    GPU set up triton's CUDA driver: an install that fails to import (a triton built for another
    CUDA, say) or a machine where triton cannot build its launcher raises RuntimeError, one line,
    and ``auto`` goes on to the next backend."""
    for name in ("lowrank", "fullrank"):
        _op(name)
    from ._launch import interpret_enabled

    if torch.cuda.is_available() and not interpret_enabled():
        _check_driver()


def _check_driver() -> None:
    """triton compiles its CUDA launcher with the system's C compiler on first use (cached after):
    with no compiler or no Python headers the first kernel launch fails, after ``auto`` chose it."""
    from triton.runtime import driver

    try:
        driver.active  # (reading it makes the driver, which builds the launcher)
    except Exception as exc:
        why = (str(exc).strip().splitlines() or [""])[0]
        raise RuntimeError(f"triton backend: triton could not set up its CUDA driver (it builds a launcher with "
                           f"gcc, clang or $CC and Python's headers): {type(exc).__name__}: {why}") from exc


def _op(name: str) -> ModuleType:
    """Import an op module (and triton with it); a broken triton install becomes one clear line."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except (ImportError, OSError) as exc:  # (a triton built for another CUDA fails to load a library)
        raise RuntimeError(f"triton backend: triton failed to import: {type(exc).__name__}: {exc}") from exc


def lowrank_passes(wa: torch.Tensor, wu: torch.Tensor, lora_B: torch.Tensor, **tiles) -> tuple[torch.Tensor, torch.Tensor, float]:
    """T = V^T B (d_in x r, fp32), P = V T (d_out x r, fp32), ||V||^2 (float64 sum).

    Optional keywords (block_m, block_n, block_k, split, precision) go to ``lowrank.lowrank_passes``.
    """
    return _op("lowrank").lowrank_passes(wa, wu, lora_B, **tiles)


def fullrank_sums(wa: torch.Tensor, wu: torch.Tensor, delta: torch.Tensor, **tiles) -> tuple[float, float, float, float]:
    """||V^T dW||^2, ||V V^T dW||^2, ||dW||^2, ||V||^2 (float64 sums), never forming V, dW or C.

    Optional keywords (block_m, block_n, block_k, panel, precision) go to ``fullrank.fullrank_sums``.
    """
    return _op("fullrank").fullrank_sums(wa, wu, delta, **tiles)


def project_full(wa: torch.Tensor, wu: torch.Tensor, delta: torch.Tensor, **tiles) -> tuple[torch.Tensor, float]:
    """N = V (V^T dW) in fp32 and ||V||^2; the caller divides N by ||V|| to get C dW."""
    return _op("fullrank").project_full(wa, wu, delta, **tiles)
