"""Address ranges of the live private file mappings that ``ModelReader.map`` made: the only memory
whose pages a kernel may drop behind itself, since they read back from the file (dropping pages of
ordinary memory would zero it)."""

from __future__ import annotations

import threading
from typing import Iterable

import torch

_lock = threading.Lock()
_live: dict[int, tuple[int, int]] = {}  # key (id of the mmap object) -> [lo, hi) addresses


def add(key: int, lo: int, hi: int) -> None:
    with _lock:
        _live[key] = (lo, hi)


def remove(key: int) -> None:
    with _lock:
        _live.pop(key, None)


def covers(t: torch.Tensor, ranges: Iterable[tuple[int, int]] | None = None) -> bool:
    """Whether all of ``t``'s bytes (strided views included) lie in one live mapping (or in one of
    ``ranges``, a caller's own subset of them)."""
    if t.device.type != "cpu" or t.numel() == 0:
        return False
    lo = t.data_ptr()
    hi = lo + (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()
    if ranges is None:
        with _lock:
            ranges = list(_live.values())
    return any(a <= lo and hi <= b for a, b in ranges)
