"""What a report records about where its bits came from: the libraries the run used, and each input
as it was on disk. Cheap by design (no weight file is hashed): a file's size and modification time
tell whether it changed since, a safetensors header's SHA-256 whether its tensors' names, shapes
and dtypes did; the small JSON files (configs) are hashed whole. For a content hash of the weights,
``sha256sum`` them."""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import struct
import sys
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1  # the report's layout; raised when a key changes meaning or goes away

_LIBRARIES = ("torch", "safetensors", "numpy", "peft", "transformers", "mergekit", "triton")
_SMALL = 1 << 20  # JSON files up to this size are hashed whole
_HEADER_MAX = 100 << 20  # (safetensors' own limit on a header)


def environment() -> dict[str, Any]:
    """Python, the machine, and the versions of the libraries this process imported (those it did
    not import took no part in the run)."""
    uname = platform.uname()
    versions = {}
    for name in _LIBRARIES:
        mod = sys.modules.get(name)
        if mod is not None:
            versions[name] = getattr(mod, "__version__", None) or _distribution_version(name)
    return {"python": platform.python_version(), "system": f"{uname.system} {uname.release}",
            "machine": uname.machine, "libraries": versions}


def _distribution_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def fingerprint(path: str | os.PathLike, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """One input folder (or file) as it is now: its resolved path, the Hugging Face repository and
    revision where it is a snapshot in a Hub cache, and per file its size, modification time (UTC)
    and, for JSON files, the SHA-256 of the file, for safetensors files that of its header
    (``headers``: those the run read, by resolved path, taken as they are: a file is opened once)."""
    p = Path(path).resolve()
    out: dict[str, Any] = {"path": str(p)}
    parts = Path(os.path.abspath(path)).parts  # (a snapshot's files link into blobs/: the unresolved path)
    if "snapshots" in parts:
        i = parts.index("snapshots")
        if i + 1 < len(parts) and i > 0 and parts[i - 1].startswith("models--"):
            out["hub"] = {"repo": parts[i - 1].removeprefix("models--").replace("--", "/"), "revision": parts[i + 1]}
    try:
        files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p] if p.is_file() else []
        out["files"] = {f.name: _file(f, (headers or {}).get(os.path.realpath(f))) for f in files}
    except OSError:  # (gone or unreadable since the run read it)
        out["files"] = {}
    return out


def _file(f: Path, header_sha256: str | None = None) -> dict[str, Any]:
    st = f.stat()
    entry: dict[str, Any] = {
        "bytes": st.st_size,
        "modified": datetime.datetime.fromtimestamp(st.st_mtime, datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        if f.suffix == ".json" and st.st_size <= _SMALL:
            entry["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
        elif f.suffix == ".safetensors" and header_sha256 is not None:
            entry["header_sha256"] = header_sha256
        elif f.suffix == ".safetensors":
            with open(f, "rb") as fh:
                head = fh.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
                if n is not None and n <= min(_HEADER_MAX, st.st_size - 8):
                    entry["header_sha256"] = hashlib.sha256(fh.read(n)).hexdigest()
    except OSError:  # (unreadable now: the run's own reads said so, or it did not need this file)
        pass
    return entry
