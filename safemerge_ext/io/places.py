"""Whether two paths are one place on disk: by the file's identity (device and inode) where it
exists, since spellings differ for one folder (``./a`` and ``a/``, a symbolic link, a bind mount,
a hard link, and on macOS' and Windows' case-insensitive file systems ``Task`` and ``task``)."""

from __future__ import annotations

import os
from pathlib import Path


def identity(path: str | os.PathLike) -> tuple:
    """What is the same for every spelling of one place: its device and inode where it exists
    (links followed), else its resolved path."""
    full = os.path.realpath(os.path.expanduser(os.fspath(path)))
    try:
        st = os.stat(full)
    except (OSError, ValueError):
        return ("path", os.path.normcase(full))
    return ("file", st.st_dev, st.st_ino)


def same_place(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name one file or folder."""
    return identity(a) == identity(b)


def within(inner: str | os.PathLike, outer: str | os.PathLike) -> bool:
    """Whether ``inner`` is ``outer`` or lies inside it (every folder on its way up compared)."""
    target = identity(outer)
    full = Path(os.path.realpath(os.path.expanduser(os.fspath(inner))))
    return any(identity(p) == target for p in (full, *full.parents))
