"""Helpers shared by the Triton ops: input checks, tile sizes, and deterministic host-side sums.

Imports torch only; triton itself is imported by the op modules, so that this package can be
imported (and its reason for being unavailable reported) where triton is missing.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
from typing import Callable, TypeVar

import torch

from safemerge_ext.backends import PRECISIONS, triton_interpret_enabled  # (what each precision means is there)

# Weights and updates are read in their stored dtype and widened to fp32 in registers; float64
# inputs are accepted and computed in fp32 too, as the torch reference backend does.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Widest rank tile one launch handles; larger ranks are processed in column chunks of B.
MAX_RANK_TILE = 256
T = TypeVar("T")


def fp32_if_fp64(t: torch.Tensor) -> torch.Tensor:
    """float64 inputs as fp32 before launch: they are computed in fp32 anyway, and fp64 tiles would
    need twice the shared memory (more than an H100 has for pass 1's defaults)."""
    return t.float() if t.dtype == torch.float64 else t


interpret_enabled = triton_interpret_enabled  # one reading of TRITON_INTERPRET for the package


def is_interpreted(kernel: object) -> bool:
    """Whether a @triton.jit function was decorated while the interpreter was on."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_inputs(kernel: object, precision: str, **tensors: torch.Tensor) -> torch.device:
    """One-line errors for what the kernels cannot take; returns the common device."""
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        where = ", ".join(f"{n} on {t.device}" for n, t in tensors.items())
        raise ValueError(f"triton backend: all tensors must be on one device; got {where}")
    device = devices.pop()
    for name, t in tensors.items():
        if t.dim() != 2:
            raise ValueError(f"triton backend: {name} must be 2-D; got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"triton backend: {name} must be fp32, fp16, bf16 or fp64; got {t.dtype}")
    if precision not in PRECISIONS:
        raise ValueError(f"triton backend: precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if is_interpreted(kernel):
        helper = getattr(sys.modules.get("triton.language.standard"), "_sum_combine", None)
        if helper is not None and not is_interpreted(helper):
            raise RuntimeError("triton backend: triton was imported before TRITON_INTERPRET=1 was set, so its own "
                               "helpers run compiled and the interpreted kernels cannot call them; set "
                               "TRITON_INTERPRET=1 before anything imports triton (in the shell)")
        if precision == "bf16":
            raise ValueError("triton backend: precision='bf16' needs a GPU: triton's interpreter does not round "
                             "operands to bf16 as the tensor cores do; use 'ieee' here")
        return device
    if device.type != "cuda":
        raise ValueError(
            f"triton backend: tensors are on {device.type} but the kernels were compiled for CUDA: "
            "move them to a CUDA device, or set TRITON_INTERPRET=1 before the first Triton op runs"
        )
    return device


# Triton's interpreter keeps the running program's grid in process-wide state: launches from two
# threads at once failed ("x >= grid_dim[0]") or read each other's partial sums; one at a time.
_INTERPRETER = threading.RLock()


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current for the launches (triton launches on the current CUDA device); on
    the CPU (the interpreter), hold the launches of other threads off until these are done."""
    return torch.cuda.device(device) if device.type == "cuda" else _INTERPRETER


def pow2_at_least(n: int, floor: int = 16) -> int:
    """Smallest power of two >= max(n, floor): tl.arange and tl.dot need power-of-two tiles >= 16."""
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


def check_block(name: str, value: int) -> int:
    if value < 16 or value & (value - 1):
        raise ValueError(f"triton backend: {name} must be a power of two >= 16; got {value}")
    return value


# Shared memory one block may use (the opt-in limit), in bytes, by compute capability: where torch
# does not report it. Tiles are sized in three tiers (kernels' _tiles): >= 200 KB (H100, H200,
# B200), >= 150 KB (A100), less (A10/A40/L4/L40S, RTX 30xx-50xx: 99 KB).
SHARED_MEMORY = {80: 166912, 87: 166912, 90: 232448, 100: 232448, 103: 232448}
H100_SHARED_MEMORY = 232448


def shared_memory(device: torch.device) -> int:
    """Bytes of shared memory a block may use on a CUDA device; an H100's elsewhere (the
    interpreter, whose tiles do not depend on it)."""
    if device.type != "cuda":
        return H100_SHARED_MEMORY
    optin = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0)
    if optin:
        return int(optin)
    major, minor = torch.cuda.get_device_capability(device)
    return SHARED_MEMORY.get(major * 10 + minor, 101376)


def fitting(launch: Callable[[int], T], block: int) -> T:
    """``launch(block)``, halving ``block`` (down to 16) while the GPU lacks the shared memory for
    it (triton raises OutOfResources at launch, before running anything): the default tiles are
    checked for the GPUs named in SHARED_MEMORY, this keeps any other one working. Nothing is
    remembered between calls: the same inputs get the same tiles (and bits) whatever ran before,
    and triton re-raises a cached kernel's failure without reloading it."""
    from triton.runtime.errors import OutOfResources

    while True:
        try:
            return launch(block)
        except OutOfResources:
            if block <= 16:
                raise
            block //= 2


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (used to size split reductions); 1 elsewhere."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_rows(n: int, block: int, programs_per_split: int, split: int | None, target: int) -> tuple[int, int]:
    """Cut n rows into at most `split` contiguous chunks of whole blocks: (chunk length, chunks).

    With split=None, enough chunks to give about `target` programs in all. Each chunk is summed by
    one program in a fixed order, and the chunks on the host in a fixed order: deterministic.
    """
    blocks = max(1, math.ceil(n / block))
    if split is None:
        split = max(1, math.ceil(target / max(1, programs_per_split)))
    if split < 1:
        raise ValueError(f"triton backend: split must be >= 1; got {split}")
    per = math.ceil(blocks / min(split, blocks))
    return per * block, math.ceil(blocks / per)


def ordered_sum(parts: torch.Tensor) -> torch.Tensor:
    """Sum a stack of partial results over dim 0 in float64, always in the same order."""
    total = parts[0].double()
    for k in range(1, parts.shape[0]):
        total += parts[k]
    return total


def exact_sum(parts: torch.Tensor) -> float:
    """Correctly rounded float64 sum of per-program partials (math.fsum: independent of order)."""
    return math.fsum(parts.detach().cpu().double().flatten().tolist())
