"""Whether a file's byte range is already in the page cache, without reading it.

Linux 6.5+ answers with the ``cachestat`` system call (a count of the range's cached pages, no
data touched, no mapping needed). Python has no binding for it, so it is called through libc's
``syscall``; where it does not exist (older kernels, other systems, seccomp filters) the answer
is ``None``, "unknown", and the first such failure turns the probe off for the process.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys

# cachestat's number is the same on every Linux architecture (new system calls share one table).
_SYS_CACHESTAT = 451
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(f, ctypes.c_uint64) for f in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


_syscall = None
if sys.platform.startswith("linux"):
    try:
        _syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        _syscall = None


def resident(fd: int, start: int, end: int) -> bool | None:
    """True when every page holding bytes [start, end) of ``fd`` is in the page cache, False when
    some is not, None when this system cannot tell."""
    global _syscall
    if _syscall is None:
        return None
    if end <= start:
        return True
    rng, stat = _Range(start, end - start), _Stat()
    if _syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(stat), 0) != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP):
            _syscall = None  # not on this kernel (or filtered): stop asking
        return None
    return stat.nr_cache >= (end + _PAGE - 1) // _PAGE - start // _PAGE
