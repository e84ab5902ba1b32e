"""What the two compiled backends (``cpp_backend``, ``cuda_backend``) share: the dtype codes of
their pointer-based kernels and the checks on a weight pair before its pointers are handed over."""

from __future__ import annotations

import torch

# dtype -> the extensions' dtype code (fp32 = 0, fp16 = 1, bf16 = 2).
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def built_file(module: str) -> str | None:
    """The file of an extension module that is installed (whether or not it loads), else None."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None else None


def does_not_load(what: str, module: str, error: str | None) -> str | None:
    """Why an extension that failed to import is unavailable, where its file is there (a library
    mismatch, which rebuilding fixes); None where it was never built."""
    built = built_file(module)
    return (f"the {what} extension {built} is installed but does not load ({error}); reinstall safemerge-ext to "
            "build it for this system") if built else None


def checkout_hint() -> str:
    """" (...)" when safemerge_ext is imported from a source checkout (setup.py beside it) that holds
    no built extension while the installed distribution lies elsewhere: `python -m safemerge_ext...`
    run in the clone after a plain `pip install .` puts the checkout first on sys.path."""
    from importlib import metadata
    from pathlib import Path

    pkg = Path(__file__).resolve().parent
    if not (pkg.parent / "setup.py").is_file():
        return ""
    try:  # (an editable install lists no package file: nothing is shadowed there)
        dist = metadata.distribution("safemerge-ext")
        init = next((f for f in dist.files or () if str(f) == "safemerge_ext/__init__.py"), None)
        if init is None or Path(dist.locate_file(init)).resolve() == pkg / "__init__.py":
            return ""
    except Exception:
        return ""
    return (f" (safemerge_ext is imported from the source checkout {pkg.parent}, not the installed copy: "
            "run from another folder, use the `safemerge` command, or `pip install -e .`)")


def require(reason: str | None) -> None:
    """Raise the backend's unavailability reason, if any, as one RuntimeError line."""
    if reason:
        raise RuntimeError(reason)


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its data starts on a multiple of its element size, else a copy that does.
    (A safetensors header whose length is not a multiple of 8 leaves every tensor of the file at
    odd addresses, and a kernel's element loads assume alignment.)"""
    return t if t.data_ptr() % t.element_size() == 0 else t.clone(memory_format=torch.contiguous_format)


def unit_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its rows are unit-stride, do not overlap and start aligned, else a
    contiguous copy."""
    if t.stride(1) == 1 and t.stride(0) >= max(t.shape[1], 1):
        return aligned(t)
    return t.contiguous()  # (a fresh copy, aligned by the allocator)


def check_weights(wa: torch.Tensor, wu: torch.Tensor, backend: str, device_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a weight pair for a native backend; return views the kernels can read row by row."""
    if wa.dim() != 2 or wa.shape != wu.shape:
        raise ValueError(f"wa and wu must be 2-D and of one shape; got {tuple(wa.shape)} and {tuple(wu.shape)}")
    if wa.dtype != wu.dtype:
        raise ValueError(f"wa is {wa.dtype} but wu is {wu.dtype}: the {backend} backend needs one dtype for both")
    if wa.dtype == torch.float64:  # computed in fp32, as the torch reference and Triton do
        wa, wu = wa.float(), wu.float()
    if wa.dtype not in DTYPE_CODE:
        raise ValueError(f"the {backend} backend reads fp32, fp16, bf16 or fp64 weights; got {wa.dtype}")
    if wa.device.type != device_type or wu.device != wa.device:
        raise ValueError(
            f"the {backend} backend needs both weights on one {device_type.upper()} device; got {wa.device} and {wu.device}"
        )
    return unit_rows(wa), unit_rows(wu)
