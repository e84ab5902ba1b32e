"""SIGTERM handled as Ctrl-C is: raised in the main thread as an exception, so the commands'
clean-up (temporary outputs removed, an output that --force was replacing put back) runs for a
``kill`` or a job scheduler's stop too, not only for an interactive interrupt. SIGHUP (the terminal
closed, an ssh connection dropped) is handled as SIGTERM is, where the platform has it (not
Windows), ending a run with 129 and its name in the line. SIGQUIT (Ctrl-\\) is left alone: it stays
the way to end at once a run that Ctrl-C cannot reach (stuck in C code), leaving its temporary folders.

Neither is raised while an import is under way, nor in a callback that C code runs and whose
exception it prints and drops (isinstance's ABC checks, weakref finalizers, ``__del__`` methods). Inside the import
machinery an exception can leave the global import lock held (``importlib._bootstrap``'s
module-lock callbacks take it before their ``try``), and then every other thread that imports (the
plot's background import, the read-ahead) waits forever; inside a module's initialization (torch's
C code importing numpy) it can be swallowed, the run going on to exit 0, or leave a module
half-initialized. A signal that arrives then is delivered again a moment later, until the import
is done (or ``PATIENCE_S`` has passed: an import that hangs does not make the process deaf to
Ctrl-C). One raised in a callback from C that these checks cannot see (a library's weakref callback,
a generator closed as it is collected, both run by the garbage collector wherever the main thread
is) reaches ``sys.unraisablehook`` instead of being printed and dropped: it is delivered again a
moment later too. One that is swallowed all the same is raised again at the commands' checkpoints
(:func:`raise_pending`)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator


# the signals that end a run as SIGTERM does (SIGHUP is POSIX's only)
ENDING = tuple(sig for sig in (getattr(signal, name, None) for name in ("SIGTERM", "SIGHUP")) if sig is not None)


class Terminated(KeyboardInterrupt):
    """The process got SIGTERM, or another of ``ENDING`` (``signum`` says which)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__()
        self.signum = signum


# (the modules' names, frozen or not: -X frozen_modules=off runs them from their .py files), and
# the callbacks that C code runs and whose exceptions it prints and drops: isinstance's ABC checks,
# weakref finalizers, WeakSet's and WeakValueDictionary's removals
_IMPORT_MACHINERY = frozenset({"importlib._bootstrap", "importlib._bootstrap_external",
                               "_frozen_importlib", "_frozen_importlib_external"})
_CALLED_FROM_C = frozenset({"abc", "_py_abc", "weakref", "_weakrefset"})
_DEFER_IN = _IMPORT_MACHINERY | _CALLED_FROM_C
RETRY_S = 0.01  # how soon a signal that came during an import is delivered again
PATIENCE_S = 10.0  # how long a signal waits for an import to end before it is raised anyway
_waiting: dict[int, float] = {}  # signal -> when it first came during an import


def _importing(frame: object) -> bool:
    """Whether the code a signal interrupted runs inside an import (the import machinery's own, or
    a module's initialization that it called, anywhere up the stack) or a callback from C (a
    ``__del__`` method among them: Python prints its exception, "Exception ignored in", and drops it)."""
    while frame is not None:
        if getattr(frame, "f_globals", {}).get("__name__") in _DEFER_IN:
            return True
        code = getattr(frame, "f_code", None)
        if getattr(code, "co_name", None) == "__del__" or code is _HOOK_CODE:
            return True
        frame = getattr(frame, "f_back", None)
    return False


_timers: dict[int, threading.Timer] = {}  # signal -> the re-send waiting to go
_in_flight: set[int] = set()  # re-sent (by a timer), not arrived yet
_called_off: set[int] = set()  # in flight when the interrupt was delivered otherwise: its arrival is ignored
_lock = threading.RLock()  # (reentrant: the handler can run in the main thread while it holds it)
# (Windows' os.kill is TerminateProcess for any signal but CTRL_C_EVENT/CTRL_BREAK_EVENT: the
# re-send there goes through interrupt_main, which runs the signal's Python handler in the main thread)
_RESEND_BY_KILL = os.name != "nt"


def _again_later(signum: int) -> None:
    """Send ``signum`` to this process again after ``RETRY_S`` (from a timer thread: the handler
    then runs anew in the main thread, wherever it is by then). One re-send per signal at a time:
    a second Ctrl-C while one waits is the same request, not another one to replay later."""
    if signum in _timers:
        return

    def fire() -> None:
        with _lock:
            if _timers.get(signum) is not timer:  # (called off as it was due)
                return
            del _timers[signum]  # (before the signal: its handler may need to wait again)
            _in_flight.add(signum)
        if _RESEND_BY_KILL:
            os.kill(os.getpid(), signum)
        else:
            import _thread

            _thread.interrupt_main(signum)  # (3.10+: a signal number)

    timer = _timers[signum] = threading.Timer(RETRY_S, fire)
    timer.daemon = True
    timer.start()


def _call_off(*signums: int) -> None:
    """These interrupts are delivered (or the run is over): a re-send of one still to go is called
    off, and one already sent is ignored when it lands (a second KeyboardInterrupt would cut short
    the clean-up the first one started)."""
    with _lock:
        for signum in signums:
            timer = _timers.pop(signum, None)
            if timer is not None:
                timer.cancel()
            if signum in _in_flight:
                _called_off.add(signum)


def _arrived(signum: int) -> bool:
    """The handler's first step: whether this arrival of ``signum`` is to be acted on (not a re-send
    called off after it was sent)."""
    with _lock:
        _in_flight.discard(signum)
        if signum in _called_off:
            _called_off.discard(signum)
            return False
    return True


def _forget_waiting() -> None:
    """The run is over: re-sends still on their way are called off (they would land in whatever
    the process runs next, a host program's code), and nothing is pending."""
    with _lock:
        _call_off(*_timers, *_in_flight)
    _waiting.clear()
    _raised.clear()


def _deferred(signum: int, frame: object) -> bool:
    """True (and the signal comes again later) when it must not be raised here and now."""
    if _importing(frame) and time.monotonic() - _waiting.setdefault(signum, time.monotonic()) < PATIENCE_S:
        _again_later(signum)
        return True
    _waiting.pop(signum, None)
    return False


_raised: list[int] = []  # signals raised as exceptions in the current run (see raise_pending)


def acted_on() -> None:
    """The interrupt raised in this run is being handled (its caller ends the run as interrupted after
    keeping what it can): :func:`raise_pending` is not to raise it again, nor is a deferred one re-sent."""
    _forget_waiting()


def _raise(signum: int, frame: object) -> None:
    if _arrived(signum) and not _deferred(signum, frame):
        _call_off(signum)  # (a re-send of an earlier one is the same request)
        _raised.append(signum)
        raise Terminated(signum)


def _interrupt(signum: int, frame: object) -> None:
    if _arrived(signum) and not _deferred(signum, frame):
        _call_off(signum)
        _raised.append(signum)
        raise KeyboardInterrupt()


def _signum(cause: BaseException | int) -> int:
    """The signal behind an interrupt: its exception's (Terminated, KeyboardInterrupt) or its number."""
    if isinstance(cause, Terminated):
        return cause.signum
    return signal.SIGINT if isinstance(cause, BaseException) else cause


def what_ended(cause: BaseException | int) -> str:
    """How the commands' lines name an interrupt: its exception (Terminated, KeyboardInterrupt) or
    its signal number ("terminated (SIGHUP)", "interrupted" for Ctrl-C)."""
    signum = _signum(cause)
    return f"terminated ({signal.Signals(signum).name})" if signum in ENDING else "interrupted"


def exit_code(cause: BaseException | int) -> int:
    """The exit status of a run that an interrupt ended: 128 + the signal's number as a shell reports
    it (143 for SIGTERM, 129 for SIGHUP), 130 for Ctrl-C."""
    signum = _signum(cause)
    return 128 + signum if signum in ENDING else 130


def say(line: str) -> None:
    """``line`` on stderr, the one that ends a run on a signal: dropped where stderr cannot take it
    (SIGHUP's closed terminal fails the write with EIO, a dropped ssh connection with EPIPE), so the
    run still ends with the signal's status, not 1 and a traceback."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def pending_signal() -> int | None:
    """A signal of the current run not acted on yet: waiting for an import to end, or raised into
    code that swallowed it. A command that finished meanwhile ends as interrupted after its run."""
    return _raised[-1] if _raised else next(iter(_waiting), None)


def raise_pending() -> None:
    """Raise again a signal whose exception the code it landed in swallowed (a library calling back
    into Python from C that catches what it calls), so that no Ctrl-C or SIGTERM is lost: the
    commands call this per layer, and before an output is put in place. A re-send of it on its way
    is called off (this is its delivery: a second one would cut short the clean-up it starts). A
    no-op outside :func:`sigterm_as_interrupt` (leaving it forgets what the run did not act on)."""
    if _raised:
        signum = _raised[-1]
        _raised.clear()
        _call_off(signum)
        raise Terminated(signum) if signum in ENDING else KeyboardInterrupt()


def _dropping(previous: Callable[[object], object]) -> Callable[[object], None]:
    """A ``sys.unraisablehook`` that sends again, a moment later, an interrupt of this run that C code
    is about to print and drop (raised into a callback it ran: see the module's docstring), and
    hands anything else to ``previous``."""

    def hook(unraisable: object) -> None:
        exc = getattr(unraisable, "exc_value", None)
        if (isinstance(exc, KeyboardInterrupt) and _raised and _signum(exc) == _raised[-1]
                and threading.current_thread() is threading.main_thread()):
            _again_later(_signum(exc))
            return
        previous(unraisable)

    return hook


_HOOK_CODE = _dropping(print).__code__  # (a signal that lands in the hook waits for it to end)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise :class:`Terminated` (where nobody else has a
    handler for them: one ignored, ``nohup``'s SIGHUP, stays ignored), and SIGINT raises
    KeyboardInterrupt as Python's own handler does, all outside imports and callbacks from C only,
    and one that C code drops is sent again (see above); only in the main thread, where Python
    delivers signals."""
    main = threading.current_thread() is threading.main_thread()
    ours = {sig: handler for sig, handler, theirs in (*((sig, _raise, (signal.SIG_DFL, None)) for sig in ENDING),
                                                     (signal.SIGINT, _interrupt, (signal.default_int_handler,)))
            if main and signal.getsignal(sig) in theirs}
    previous = {sig: signal.signal(sig, handler) for sig, handler in ours.items()}
    theirs_hook = sys.unraisablehook
    hook = _dropping(theirs_hook) if ours else None
    if ours:
        _forget_waiting()
        with _lock:
            _in_flight.clear()  # (a new run: what an earlier one sent has landed, or never will)
            _called_off.clear()
        sys.unraisablehook = hook
    try:
        yield
    finally:
        try:
            if ours:
                _forget_waiting()  # (what the run did not act on stays with it)
        finally:  # (a re-send that fires as the run ends is raised here: the handlers still go back)
            if ours and sys.unraisablehook is hook:  # (one set inside since stays: it is the newer)
                sys.unraisablehook = theirs_hook
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@contextmanager
def interrupts_held(resend: bool = True) -> Iterator[list[int]]:
    """While inside, SIGINT and the ``ENDING`` signals are noted, not raised: clean-up (a staging
    folder of partial shards deleted) is not cut short by Ctrl-C. Those that came are sent again at
    the end (``resend``), or dropped where the caller is ending on an interrupt already; the list of
    those that came is yielded (a caller that does not resend can send them on later with
    :func:`send_on`). Main thread only (elsewhere: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    previous, held = {}, []
    try:
        for sig in (signal.SIGINT, *ENDING):
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


def exit_on_signal(line: Callable[[int], str | None]) -> None:
    """From here to the end of the process (the interpreter's teardown, half a second or more with
    torch loaded), SIGINT and the ``ENDING`` signals end it at once, with :func:`exit_code`'s status
    and ``line(signum)`` (if any) on stderr, instead of killing it with no word. For a command whose
    work is done and said. Main thread only; handlers someone else installed are left alone."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: object) -> None:
        try:
            sys.stdout.flush()
            msg = line(signum)
            if msg:
                print(msg, file=sys.stderr, flush=True)
        except BaseException:  # (a closed stream: the exit matters more than the line)
            pass
        os._exit(exit_code(signum))

    for sig, theirs in (*((sig, (signal.SIG_DFL, _raise)) for sig in ENDING),
                        (signal.SIGINT, (signal.default_int_handler, _interrupt))):
        if signal.getsignal(sig) in theirs:
            signal.signal(sig, handler)
