"""The one exception type for bad input: its message is a single line meant for a person."""

import errno
import os


class SafeMergeError(Exception):
    """Bad input or an impossible request: says what is wrong, where, and what to do."""


def symlink_loop(exc: RuntimeError) -> OSError | None:
    """Path.resolve's RuntimeError for a link loop (Python < 3.13) as the OSError 3.13 raises,
    so that it ends in the commands' one line; None for any other RuntimeError."""
    text = str(exc)
    if not text.startswith("Symlink loop from "):
        return None
    return OSError(errno.ELOOP, os.strerror(errno.ELOOP), text.removeprefix("Symlink loop from ").strip("'"))
