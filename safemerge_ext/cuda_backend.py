"""CUDA-extension backend for CUDA tensors on machines without Triton: the low-rank passes and the
full-rank sums run in ``safemerge_ext._cuda`` (csrc/cuda_ops.cu), which forms V (and dW) tiles
from the stored fp32/fp16/bf16 weights and never stores V, dW or C. Kernels are enqueued on
torch's current stream; workspaces come from torch's allocator. Contract: ``safemerge_ext.reference``.
"""

from __future__ import annotations

import torch

from safemerge_ext._native import DTYPE_CODE, check_weights, checkout_hint, does_not_load, require, unit_rows

NAME = "cuda"

try:
    from safemerge_ext import _cuda
except ImportError as exc:  # not built here (no nvcc or CPU torch at build time) or a failed build
    _cuda = None
    _IMPORT_ERROR = str(exc)
else:
    _IMPORT_ERROR = None

_MAX_RANK = 256  # ranks per kernel launch; wider B is done in groups of columns
# Full-rank path: budget for M_J = V^T dW[:, J] (d_in x |J| fp32), which sets the column block.
_M_BYTES = 256 << 20
_MIN_COLS = 256


def unavailable_reason() -> str | None:
    """None when the extension is importable and a CUDA device is visible, else the reason."""
    if _cuda is None:
        return does_not_load("CUDA", "safemerge_ext._cuda", _IMPORT_ERROR) or (
            "the CUDA extension was not built (it needs nvcc at install time, and SAFEMERGE_BUILD_CUDA=1 to build it "
            f"for a CPU build of torch; `pip install -v` shows why it was skipped): {_IMPORT_ERROR}" + checkout_hint()
        )
    problem = _cuda.device_problem()
    if problem:
        return problem
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch (CPU build of torch?)"
    return None


# What the calls need of the device, in one place (tests/cuda_emulator.py's build runs the kernels
# on the CPU behind these): the tensors' device type, its SM count, a guard that makes it current,
# its index and torch's current stream on it.
_DEVICE_TYPE = "cuda"


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _on(device: torch.device):
    return torch.cuda.device(device)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def lowrank_passes(wa: torch.Tensor, wu: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """T = V^T B (d_in x r, fp32), P = V T (d_out x r, fp32) and ||V||^2 (float64 sum)."""
    require(unavailable_reason())
    wa, wu = check_weights(wa, wu, NAME, _DEVICE_TYPE)
    d_out, d_in = wa.shape
    if lora_B.dim() != 2 or lora_B.shape[0] != d_out or lora_B.shape[1] < 1:
        raise ValueError(f"lora_B has shape {tuple(lora_B.shape)}; want {d_out}xr with r >= 1")
    dev = wa.device
    r = lora_B.shape[1]
    T = torch.zeros(d_in, r, dtype=torch.float32, device=dev)
    P = torch.zeros(d_out, r, dtype=torch.float32, device=dev)
    if d_out == 0 or d_in == 0:
        return T, P, 0.0
    B = lora_B.to(device=dev, dtype=torch.float32)
    sms = _sm_count(dev)
    vsq = None
    with _on(dev):
        for k0 in range(0, r, _MAX_RANK):
            k1 = min(r, k0 + _MAX_RANK)
            plan = _cuda.lowrank_plan(d_out, d_in, k1 - k0, sms)
            ws_f = torch.empty(max(plan.ws_floats, 1), dtype=torch.float32, device=dev)
            ws_d = torch.empty(plan.ws_doubles, dtype=torch.float64, device=dev)
            Bg = B[:, k0:k1].contiguous()
            Tg = torch.empty(d_in, k1 - k0, dtype=torch.float32, device=dev)
            Pg = torch.empty(d_out, k1 - k0, dtype=torch.float32, device=dev)
            _cuda.lowrank_passes(
                wa.data_ptr(), wu.data_ptr(), d_out, d_in, wa.stride(0), wu.stride(0), DTYPE_CODE[wa.dtype],
                Bg.data_ptr(), k1 - k0, Tg.data_ptr(), Pg.data_ptr(), ws_f.data_ptr(), ws_f.numel(), ws_d.data_ptr(),
                ws_d.numel(), plan, _index(dev), _stream(dev),
            )
            T[:, k0:k1] = Tg
            P[:, k0:k1] = Pg
            if vsq is None:
                vsq = ws_d[-1]
    return T, P, float(vsq)


def _fullrank(wa: torch.Tensor, wu: torch.Tensor, delta: torch.Tensor, want_n: bool):
    require(unavailable_reason())
    wa, wu = check_weights(wa, wu, NAME, _DEVICE_TYPE)
    if delta.shape != wa.shape:
        raise ValueError(f"delta has shape {tuple(delta.shape)} but the weights {tuple(wa.shape)}")
    dev = wa.device
    delta = delta.to(dev)
    if delta.dtype not in DTYPE_CODE:
        delta = delta.float()
    delta = unit_rows(delta)
    d_out, d_in = wa.shape
    cols = max(_MIN_COLS, min(d_in, _M_BYTES // (4 * max(d_in, 1))))
    with _on(dev):
        M = torch.empty(d_in, min(cols, d_in), dtype=torch.float32, device=dev)
        N = torch.empty(d_out, d_in, dtype=torch.float32, device=dev) if want_n else None
        parts = torch.empty(_cuda.fullrank_partials(d_out, d_in, cols), dtype=torch.float64, device=dev)
        sums = torch.empty(4, dtype=torch.float64, device=dev)
        _cuda.fullrank(
            wa.data_ptr(), wu.data_ptr(), DTYPE_CODE[wa.dtype], delta.data_ptr(), DTYPE_CODE[delta.dtype],
            d_out, d_in, wa.stride(0), wu.stride(0), delta.stride(0), cols, M.data_ptr(),
            N.data_ptr() if N is not None else 0, parts.data_ptr(), parts.numel(), sums.data_ptr(), _index(dev),
            _stream(dev),
        )
        m2, n2, d2, vsq = (float(x) for x in sums.cpu())
    return m2, n2, d2, vsq, N


def fullrank_sums(wa: torch.Tensor, wu: torch.Tensor, delta: torch.Tensor) -> tuple[float, float, float, float]:
    """||V^T dW||^2, ||V V^T dW||^2, ||dW||^2, ||V||^2 (float64) from fused tiled GEMMs."""
    if wa.shape[0] == 0 or wa.shape[1] == 0:
        return 0.0, 0.0, 0.0, 0.0
    m2, n2, d2, vsq, _ = _fullrank(wa, wu, delta, want_n=False)
    return m2, n2, d2, vsq


def project_full(wa: torch.Tensor, wu: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, float]:
    """N = V (V^T dW) in fp32 (C dW times ||V||) and ||V||^2."""
    if wa.shape[0] == 0 or wa.shape[1] == 0:
        return torch.zeros(wa.shape, dtype=torch.float32, device=wa.device), 0.0
    _, _, _, vsq, N = _fullrank(wa, wu, delta, want_n=True)
    return N, vsq
