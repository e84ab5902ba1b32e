"""SIGTERM handled as Ctrl-C is: raised in the main thread as an exception, so the commands'
clean-up (temporary outputs removed, an output that --force was replacing put back) runs for a
``kill`` or a job scheduler's stop too, not only for an interactive interrupt.

Neither is raised inside Python's import machinery: an exception there can leave the global import
lock held (``importlib._bootstrap``'s module-lock callbacks take it before their ``try``), and
then every other thread that imports (the plot's background import, the read-ahead) waits forever
and the run never ends. A signal that arrives there is delivered again a moment later."""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """The process got SIGTERM."""


# (the modules' names, frozen or not: -X frozen_modules=off runs them from their .py files)
_IMPORT_MACHINERY = frozenset({"importlib._bootstrap", "importlib._bootstrap_external",
                               "_frozen_importlib", "_frozen_importlib_external"})
RETRY_S = 0.01  # how soon a signal that came inside the import machinery is delivered again


def _in_import_machinery(frame: object) -> bool:
    """Whether the code a signal interrupted is the import machinery's own."""
    return getattr(frame, "f_globals", {}).get("__name__") in _IMPORT_MACHINERY


def _again_later(signum: int) -> None:
    """Send ``signum`` to this process again after ``RETRY_S`` (from a timer thread: the handler
    then runs anew in the main thread, wherever it is by then)."""
    timer = threading.Timer(RETRY_S, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()


def _raise(signum: int, frame: object) -> None:
    if _in_import_machinery(frame):
        _again_later(signum)
        return
    raise Terminated()


def _interrupt(signum: int, frame: object) -> None:
    if _in_import_machinery(frame):
        _again_later(signum)
        return
    raise KeyboardInterrupt()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` (where nobody else has a handler for it),
    and SIGINT raises KeyboardInterrupt as Python's own handler does, both outside the import
    machinery only (see above); only in the main thread, where Python delivers signals."""
    main = threading.current_thread() is threading.main_thread()
    ours = {sig: handler for sig, handler, theirs in ((signal.SIGTERM, _raise, (signal.SIG_DFL, None)),
                                                     (signal.SIGINT, _interrupt, (signal.default_int_handler,)))
            if main and signal.getsignal(sig) in theirs}
    previous = {sig: signal.signal(sig, handler) for sig, handler in ours.items()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def interrupts_held(resend: bool = True) -> Iterator[list[int]]:
    """While inside, SIGINT and SIGTERM are noted, not raised: clean-up (a staging folder of
    partial shards deleted) is not cut short by Ctrl-C. Those that came are sent again at the end
    (``resend``), or dropped where the caller is ending on an interrupt already; the list of those
    that came is yielded (a caller that does not resend can send them on later with
    :func:`send_on`). Main thread only (elsewhere: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    previous, held = {}, []
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            old = signal.getsignal(sig)
            if old is not None and old is not signal.SIG_IGN:  # (None: set outside Python, left alone)
                previous[sig] = signal.signal(sig, lambda signum, frame: held.append(signum))
        yield held
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if resend:
            send_on(held)


def send_on(held: list[int]) -> None:
    """Raise each signal that :func:`interrupts_held` noted, once, to the handlers in place now."""
    for sig in dict.fromkeys(held):
        signal.raise_signal(sig)
