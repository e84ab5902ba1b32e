"""All-or-nothing output folders: build in a temporary sibling, rename into place at the end."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from safemerge_ext.errors import SafeMergeError


def check_out(out: str | os.PathLike, force: bool) -> Path:
    """Fail early when --out exists and --force was not given."""
    p = Path(out)
    if p.exists() and not force:
        raise SafeMergeError(f"--out {p} already exists; choose a new path or pass --force to replace it")
    if p.exists() and not p.is_dir():
        raise SafeMergeError(f"--out {p} exists and is not a directory; remove it or choose another path")
    return p


@contextmanager
def staged_dir(out: str | os.PathLike, force: bool) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; on success it replaces ``out``, else vanishes.

    The temporary sits in the same parent so the final rename is atomic on one file system.
    """
    final = check_out(out, force)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
