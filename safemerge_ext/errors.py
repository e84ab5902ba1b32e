"""The one exception type for bad input: its message is a single line meant for a person."""

import errno
import os
from pathlib import Path


class SafeMergeError(Exception):
    """Bad input or an impossible request: says what is wrong, where, and what to do."""


def symlink_loop(exc: RuntimeError) -> OSError | None:
    """Path.resolve's RuntimeError for a link loop (Python < 3.13) as the OSError 3.13 raises,
    so that it ends in the commands' one line; None for any other RuntimeError."""
    text = str(exc)
    if not text.startswith("Symlink loop from "):
        return None
    return OSError(errno.ELOOP, os.strerror(errno.ELOOP), text.removeprefix("Symlink loop from ").strip("'"))


def is_link_loop(path: "str | os.PathLike[str]") -> bool:
    """Whether ``path`` is a symbolic link whose chain never ends (a loop): told apart the same way
    on every Python (Path.resolve raises for it before 3.13 and returns it from 3.13)."""
    return os.path.islink(path) and os.path.islink(os.path.realpath(path))


def link_loop_error(flag: str, path: "str | os.PathLike[str]") -> SafeMergeError:
    return SafeMergeError(f"{flag} {path} is a symbolic link loop (it leads back to itself); remove the link or "
                          "give another path")


def blank_path(flag: str, path: "str | os.PathLike[str]") -> SafeMergeError | None:
    """The error for a path that is empty or only white space (an unset shell variable, a stray
    quote), else None: ``Path("")`` is the working directory, which would be read or written instead.
    A NUL character, which no path can hold (the Python API can pass one), is named too; a value
    that is no path at all (None, a number: the Python API) is a TypeError naming ``flag``."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{flag} must be a path (str or os.PathLike); got {type(path).__name__}")
    text = os.fspath(path)
    if "\0" in (text if isinstance(text, str) else text.decode("latin-1")):
        return SafeMergeError(f"{flag} {text!r} holds a NUL character, which no path can; give a path")
    if text.strip():
        return None
    return SafeMergeError(f"{flag} is empty; give a path" if not text else
                          f"{flag} {text!r} is only white space; give a path")


def not_a_folder(flag: str, path: "str | os.PathLike[str]", want: str) -> SafeMergeError:
    """The error for a path that should be a folder: a file there (``config.json``,
    ``adapter_config.json`` given for their folder) is called a file, with its folder to give;
    else "no such directory". ``want`` says what folder to give."""
    p = Path(path)
    if p.exists():
        return SafeMergeError(f"{flag} {path}: a file, not a folder; give the folder that holds it ({p.parent}), {want}")
    return SafeMergeError(f"{flag} {path}: no such directory; give {want}")
