"""SIGTERM handled as Ctrl-C is: raised in the main thread as an exception, so the commands'
clean-up (temporary outputs removed, an output that --force was replacing put back) runs for a
``kill`` or a job scheduler's stop too, not only for an interactive interrupt."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """The process got SIGTERM."""


def _raise(signum: int, frame: object) -> None:
    raise Terminated()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` (where nobody else has a handler for it,
    and only in the main thread, where Python delivers signals)."""
    ours = (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None))
    previous = signal.signal(signal.SIGTERM, _raise) if ours else None
    try:
        yield
    finally:
        if ours:
            signal.signal(signal.SIGTERM, previous)


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
