"""Address ranges of the live private file mappings that ``ModelReader.map`` made: the only memory
whose pages a kernel may drop behind itself, since they read back from the file (dropping pages of
ordinary memory would zero it)."""

from __future__ import annotations

import mmap
import threading
import weakref
from typing import Iterable

import torch

_lock = threading.Lock()
# key (id of the mmap object) -> [lo, hi) addresses and a weak reference to the mmap
_live: dict[int, tuple[int, int, weakref.ref]] = {}


def add(mm: mmap.mmap, lo: int, hi: int) -> int:
    """Register ``mm``'s address range [lo, hi); returns its key for :func:`remove`."""
    with _lock:
        _live[id(mm)] = (lo, hi, weakref.ref(mm))
    return id(mm)


def remove(key: int) -> None:
    with _lock:
        _live.pop(key, None)


def _alive(ref: weakref.ref) -> bool:
    # CPython unmaps an mmap before it runs the weakref callbacks that remove its entry, so for a
    # moment an entry can outlive its pages, and fresh memory can land at its addresses. A weak
    # reference to an object being freed already gives None: the entry counts only while it answers.
    mm = ref()
    return mm is not None and not mm.closed


def covers(t: torch.Tensor, keys: Iterable[int] | None = None) -> bool:
    """Whether all of ``t``'s bytes (strided views included) lie in one live mapping (or in one of
    those registered under ``keys``, a caller's own subset of them)."""
    if t.device.type != "cpu" or t.numel() == 0:
        return False
    lo = t.data_ptr()
    hi = lo + (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()
    with _lock:
        entries = list(_live.values()) if keys is None else [_live[k] for k in keys if k in _live]
    return any(a <= lo and hi <= b and _alive(ref) for a, b, ref in entries)
