"""Whether two paths are one place on disk: by the file's identity (device and inode) where it
exists, since spellings differ for one folder (``./a`` and ``a/``, a symbolic link, a bind mount,
a hard link, and on macOS' and Windows' case-insensitive file systems ``Task`` and ``task``)."""

from __future__ import annotations

import os
from pathlib import Path


def identity(path: str | os.PathLike) -> tuple:
    """What is the same for every spelling of one place: the device and inode of the path (links
    followed) or, where it does not exist yet, of its nearest folder that does, with the names below
    that folder."""
    try:
        full = Path(os.path.realpath(os.path.expanduser(os.fspath(path))))
    except ValueError:  # (a NUL in it: nothing on disk, so nothing else is this place)
        return ("path", os.fspath(path))
    below: list[str] = []
    for p in (full, *full.parents):
        try:
            st = os.stat(p)
        except (OSError, ValueError):
            below.insert(0, p.name)
            continue
        return ("file", st.st_dev, st.st_ino, *below)
    return ("path", str(full))


def same_place(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name one file or folder (or would, once made)."""
    return identity(a) == identity(b)


def within(inner: str | os.PathLike, outer: str | os.PathLike) -> bool:
    """Whether ``inner`` is ``outer`` or lies inside it (every folder on its way up compared)."""
    target = identity(outer)
    try:
        full = Path(os.path.realpath(os.path.expanduser(os.fspath(inner))))
    except ValueError:
        return False
    return any(identity(p) == target for p in (full, *full.parents))
