"""A merge run through mergekit, around the methods of :mod:`safemerge_ext.mergekit_methods`: its
report, and in plain ``mergekit-yaml`` and ``mergekit-multi`` the one-line refusals.

Reports: mergekit has no end-of-run hook and may run tensors in several threads, so every scored
tensor appends one JSON line to a sidecar file under a lock; :func:`finalize_report` (called by
``safemerge-yaml``, by tests, and at interpreter exit for plain ``mergekit-yaml``; in
``mergekit-multi`` as each stage's ``run_merge`` returns) turns it into
``safemerge_report.json`` + ``.png``. Where: the ``report_path`` parameter, else
``$SAFEMERGE_REPORT_DIR``, else the ``OUT_PATH`` of a running ``mergekit-yaml`` (the output folder
of the running ``mergekit-multi`` stage), else none (a warning says so).
"""

from __future__ import annotations

import atexit
import contextlib
import dis
import functools
import glob
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from safemerge_ext._env import switched_on
from safemerge_ext._signals import exit_code, raise_pending, say, what_ended
from safemerge_ext.backends import EXACT
from safemerge_ext.errors import SafeMergeError
from safemerge_ext.io.places import within
from safemerge_ext.merge import METHODS as MERGE_METHODS
from safemerge_ext.merge import USES_DENSITY, USES_SEED
from safemerge_ext.report import (REPORT_JSON, REPORT_PNG, LayerRecord, PlotUnavailable, build_report, plot,
                                  summary_table, write_json)
from safemerge_ext.selection import unreachable_threshold

__all__ = [
    "REPORT_DIR_ENV",
    "SIDECAR",
    "TRACEBACK_ENV",
    "discard_report",
    "finalize_report",
    "pending_reports",
    "refusal",
    "report_files",
    "report_to",
]

LOG = logging.getLogger(__name__)
SIDECAR = ".safemerge_layers.{pid}.jsonl"
REPORT_DIR_ENV = "SAFEMERGE_REPORT_DIR"


# ---------------------------------------------------------------------------------------------
# plain mergekit-yaml: input these methods refuse ends in one line, as in safemerge-yaml

TRACEBACK_ENV = "SAFEMERGE_TRACEBACK"
_PACKAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "")


def _run_yaml_is_main() -> bool:
    """Whether mergekit's run_yaml module is ``__main__`` (``python -m mergekit.scripts.run_yaml``)."""
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return main_spec is not None and main_spec.name == "mergekit.scripts.run_yaml"


def _in_mergekit_yaml() -> bool:
    """Whether this process is a ``mergekit-yaml`` run (the console script or ``python -m``)."""
    return _run_yaml_is_main() or (bool(sys.argv) and os.path.basename(sys.argv[0]).startswith("mergekit-yaml"))


def _multimerge_is_main() -> bool:
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return main_spec is not None and main_spec.name == "mergekit.scripts.multimerge"


def _in_mergekit_multi() -> bool:
    """Whether this process is a ``mergekit-multi`` run: several recipes, each a ``run_merge`` into
    its own output folder, one after the other."""
    return _multimerge_is_main() or (bool(sys.argv) and os.path.basename(sys.argv[0]).startswith("mergekit-multi"))


def mergekit_cli() -> str | None:
    """The mergekit console script this process runs, as its error lines name it; None in a program."""
    return "mergekit-yaml" if _in_mergekit_yaml() else "mergekit-multi" if _in_mergekit_multi() else None


_RAISE = dis.opmap["RAISE_VARARGS"]


def _raised_here(exc: BaseException) -> bool:
    """Whether a ``raise`` statement in this package threw ``exc``: its innermost frame is ours and
    stopped on a raise instruction. That is a refusal of bad input, whose message is written for a
    person; a ValueError of a builtin called from here (an unpacking, ``int()``) is a bug instead,
    and an error of a library called from here is not ours either."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    if not os.path.abspath(code.co_filename).startswith(_PACKAGE_DIR):
        return False
    return 0 <= tb.tb_lasti < len(code.co_code) and code.co_code[tb.tb_lasti] == _RAISE


def refusal(exc: BaseException) -> str | None:
    """The one-line message of input that these methods or their parameter checks refused (through
    pydantic while mergekit plans the merge), else None: any other error keeps its traceback."""
    if type(exc).__name__ == "ValidationError" and callable(getattr(exc, "errors", None)):  # (pydantic's)
        causes = [(e.get("ctx") or {}).get("error") for e in exc.errors()]
        ours = [str(c) for c in causes if isinstance(c, ValueError) and _raised_here(c)]
        return "; ".join(ours) if ours and len(ours) == len(causes) else None
    if isinstance(exc, (ValueError, FloatingPointError)) and _raised_here(exc):  # (SafeMergeError: by definition)
        return str(exc).splitlines()[0] if str(exc) else None
    if isinstance(exc, SafeMergeError) and str(exc):
        return str(exc).splitlines()[0]
    return None


def _tracebacks_wanted() -> bool:
    """``SAFEMERGE_TRACEBACK`` set to anything but empty/0/false/no/off."""
    return switched_on(TRACEBACK_ENV)


def _excepthook(etype: type[BaseException], value: BaseException, tb: Any) -> None:
    msg = None if _tracebacks_wanted() else refusal(value)
    if msg is None:
        return _prev_excepthook(etype, value, tb)
    try:
        print(f"{mergekit_cli() or 'mergekit'}: error: {msg}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


_prev_excepthook = sys.excepthook


def _install_excepthook() -> None:
    """In ``mergekit-yaml`` (``mergekit-multi``), an uncaught refusal prints its one line instead of
    mergekit's traceback (``SAFEMERGE_TRACEBACK=1`` keeps the traceback); every other error goes to
    the hook before. A Ctrl-C is noted as it is raised (see :func:`_unfinished`); a SIGTERM or
    SIGHUP too, and it ends the run through the exit hook."""
    global _prev_excepthook
    if sys.excepthook is not _excepthook:
        _prev_excepthook, sys.excepthook = sys.excepthook, _excepthook
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _noted_interrupt)
    if mergekit_cli():  # (a run killed after its config.json must not look done, nor its sidecar stay: below)
        for name in ("SIGTERM", "SIGHUP"):
            signum = getattr(signal, name, None)
            if signum is not None and signal.getsignal(signum) is signal.SIG_DFL:  # (nohup's ignored SIGHUP stays so)
                signal.signal(signum, _noted_termination)


_interrupts: list[int] = []  # the Ctrl-Cs, SIGTERMs and SIGHUPs a mergekit-yaml (mergekit-multi) run got


def _noted_interrupt(signum: int, frame: Any) -> None:
    """Python's own Ctrl-C, noted first: click ends such a run as "Aborted!" (exit 1), which leaves
    no trace an exit hook could see."""
    _interrupts.append(signum)
    raise KeyboardInterrupt


def _noted_termination(signum: int, frame: Any) -> None:
    """mergekit-yaml's (mergekit-multi's) SIGTERM/SIGHUP: noted, and the run ends with the signal's
    exit status through the exit hook, which says there is no report and why, removes the run's
    records and voids a mergekit-multi stage it stopped (the default action skips the hook, and
    ended the run without a word, its records left in OUT_PATH; review182)."""
    _interrupts.append(signum)
    raise SystemExit(128 + signum)

# ---------------------------------------------------------------------------------------------
# reports: a locked JSON-lines sidecar per report location, assembled at the end

_lock = threading.Lock()
_pending: dict[str, str] = {}  # sidecar path -> report target (directory or .json path)
_started: dict[str, float] = {}  # sidecar path -> time of this run's first record there
_failed: dict[str, str] = {}  # sidecar path -> why its run ended in a method (its records are void)
_run_settings: dict[str, dict[str, Any]] = {}  # sidecar path -> the recipe's settings no record carries
_dropped: dict[str, str] = {}  # sidecar path -> a warning for its report: an earlier run's records were dropped
_begun: dict[str, tuple[float, str]] = {}  # sidecar path -> (when the run was planned, the folder mergekit writes)


def begin_run(report_path: str, out: str | os.PathLike | None = None) -> None:
    """A new run is planned that reports at ``report_path`` (as the methods resolve it). Where an
    earlier run of this process recorded there and its report was neither written nor discarded (a
    program that calls finalize_report once after several merges, or leaves it to the exit hook),
    its records are dropped, so that the report is of one run (it was the last run's layers with
    the first run's models and inputs, and the bytes of both; review160); a warning says so, logged
    now and in the report. ``out``: the folder mergekit writes in place (see
    :func:`_remove_earlier_report`)."""
    target = _target(report_path)
    if not target:
        return
    sidecar = _locations(target)[0]
    key = str(sidecar.resolve())
    if out is not None:
        _begun[key] = (time.time(), os.fspath(out))
    with _lock:
        if key not in _started or key in _failed:  # (nothing, or a failed run's: its first record drops them)
            return
        for state in (_pending, _started, _run_settings):
            state.pop(key, None)
        with contextlib.suppress(OSError):
            sidecar.unlink(missing_ok=True)
        _dropped[key] = (f"the report at {target} is of this run only: an earlier run_merge of this process recorded "
                         "there too and its report was not written (call finalize_report after each run), so its "
                         "records were dropped")
        LOG.warning("safemerge-ext: %s", _dropped[key])


def _remove_earlier_report(key: str, target: str) -> None:
    """A run that did not finish (sidecar ``key``, reporting at ``target``) after mergekit wrote
    into its output folder (in place): an earlier run's report there goes, since it no longer
    describes what the folder holds (a rerun stopped part way left new weights beside it, which a
    reader took for theirs; review182). Where the run wrote nothing there (refused, or stopped
    before its first tensor), the earlier output and its report stand as they were (review185). A
    ``.json`` there that is no report of these methods is left; a report elsewhere (a
    ``report_path``, which safemerge-yaml replaces only once its run is done) stays as it is."""
    begun, out = _begun.pop(key, (None, None))
    if begun is None:
        return
    json_path, png_path = report_files(target)
    if not within(json_path.parent, out) or not _written_since(out, begun, (json_path, png_path, Path(key))):
        return
    try:
        earlier = json.loads(json_path.read_text(encoding="utf-8"))
        ours = isinstance(earlier, dict) and {"method", "layers", "counts"} <= earlier.keys()
    except (OSError, ValueError):
        ours = False
    for path in (json_path, png_path) if ours else (png_path,):
        with contextlib.suppress(OSError):
            if path.is_file():
                path.unlink()


def _written_since(folder: str, since: float, besides: Iterable[Path]) -> bool:
    """Whether a file in ``folder`` (not one of ``besides``) changed at or after ``since`` (its clock:
    a new file's own time, against the folder's file system; a second of slack)."""
    skip = {os.path.realpath(p) for p in besides}
    try:
        with os.scandir(folder) as entries:
            return any(e.is_file() and e.stat().st_mtime >= since - 1.0 and os.path.realpath(e.path) not in skip
                       for e in entries)
    except OSError:
        return False


def note_run_settings(report_path: str, settings: dict[str, Any]) -> None:
    """Settings of a run that shape its output but reach no method (the recipe's ``dtype`` and
    ``out_dtype``, mergekit's ``--lora-merge-dtype``), noted when it is planned for the report at
    its ``report_path`` (as the methods resolve it) to record with the rest."""
    target = _target(report_path)
    if target:
        with _lock:
            _run_settings[str(_locations(target)[0].resolve())] = dict(settings)
_override: str | None = None
_entered: list[Any] = []  # the open report_to blocks, in the order entered
_before: str | None = None  # _override before the first of them
_atexit_registered = False
_cli_out: list[str | None] = []
_stage_out: list[str] = []  # mergekit-multi: the output folder of the stage now planned or running
_stage_outs: dict[str, str] = {}  # mergekit-multi: sidecar path -> the output folder of the stage that recorded there


class report_to:
    """Context manager: send this process's reports to ``path`` (a directory or a ``.json`` file).

    Process-wide (mergekit may score tensors in other threads): for merges that run at the same
    time in one process, give each recipe its own ``report_path`` parameter instead, as
    ``safemerge-yaml`` does."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = None if path is None else os.fspath(path)

    def __enter__(self) -> "report_to":
        global _override, _before
        with _lock:
            if not _entered:
                _before = _override  # (restored after the last)
            _entered.append(self)
            _override = self.path
        return self

    def __exit__(self, *exc: object) -> None:
        global _override
        with _lock:  # (blocks entered in one thread and left in another order: the latest still open wins)
            open_at = [i for i, b in enumerate(_entered) if b is self]
            if not open_at:  # (left twice, or never entered: nothing of this block to undo)
                return
            del _entered[open_at[-1]]
            _override = _entered[-1].path if _entered else _before


def _mergekit_yaml_args() -> dict[str, Any]:
    """The arguments of a running ``mergekit-yaml`` (argv parsed with mergekit's own click command);
    empty in any other process, or where they cannot be parsed (never a reason to break a merge)."""
    if not _in_mergekit_yaml():
        return {}
    return _cli_args("mergekit-yaml", "__main__" if _run_yaml_is_main() else "mergekit.scripts.run_yaml")


def _mergekit_multi_args() -> dict[str, Any]:
    """The arguments of a running ``mergekit-multi``, as :func:`_mergekit_yaml_args` reads them."""
    if not _in_mergekit_multi():
        return {}
    return _cli_args("mergekit-multi", "__main__" if _multimerge_is_main() else "mergekit.scripts.multimerge")


def _cli_args(name: str, module: str) -> dict[str, Any]:
    script = sys.modules.get(module)
    if script is None:
        return {}
    try:
        return dict(script.main.make_context(name, list(sys.argv[1:]), resilient_parsing=True).params)
    except Exception:
        return {}


def begin_stage(out: str | os.PathLike) -> None:
    """``mergekit-multi`` plans a stage with these methods that writes to ``out``: it reports into
    ``out`` unless told otherwise, and from now on each stage's ``run_merge`` is watched."""
    _stage_out[:] = [os.fspath(out)]
    script = sys.modules.get("__main__" if _multimerge_is_main() else "mergekit.scripts.multimerge")
    original = getattr(script, "run_merge", None)
    if not callable(original) or getattr(original, "_safemerge_stages", False):
        return

    @functools.wraps(original)
    def run_stage(*args: Any, **kwargs: Any) -> Any:
        # mergekit-multi runs a stage only once those before it have returned: their reports are
        # written (and a head untied) now, before this stage reads their folders or is killed
        _finalize_pending()
        result = original(*args, **kwargs)
        _finalize_pending()  # (this one's, when it was one of these methods'; a stage that raised has none)
        return result

    run_stage._safemerge_stages = True  # type: ignore[attr-defined]
    script.run_merge = run_stage


def _mergekit_yaml_out() -> str | None:
    """OUT_PATH of a running ``mergekit-yaml``."""
    if not _cli_out:
        _cli_out.append(_mergekit_yaml_args().get("out_path"))
    return _cli_out[0]


@functools.lru_cache(maxsize=None)
def _here() -> str:
    """Where this process runs, for its sidecar's name: the pid namespace (Linux: each container has
    its own, where pids start again at 1) and the host (a report folder on a network mount is shared
    by other machines' runs), so that a pid names one process among all that may share the folder."""
    import socket

    try:
        ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        ns = "0"
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"
    return f"{ns}-{host}"


def _run_id(pid: int | None = None) -> str:
    """The part of a sidecar's name that names its process: "<pid>-<pid namespace>-<host>"."""
    return f"{os.getpid() if pid is None else pid}-{_here()}"


def _locations(report_path: str | os.PathLike, pid: int | str | None = None) -> tuple[Path, Path, Path]:
    """(sidecar, json, png) for a directory or a ``.json`` file path. The sidecar is this process's
    own (its pid, pid namespace and host in the name; another ``pid`` part on request): two runs that
    share a report location never mix their layers, in containers or on other hosts too."""
    p, pid = Path(os.path.expanduser(os.fspath(report_path))), _run_id() if pid is None else pid
    if p.suffix.lower() == ".json":
        return p.with_name(f"{p.name}.{pid}.layers.jsonl"), p, p.with_suffix(".png")
    return p / SIDECAR.format(pid=pid), p / REPORT_JSON, p / REPORT_PNG


def _target(report_path: str) -> str | None:
    """Where a method's records go: its ``report_path``, else ``report_to``'s, else
    ``$SAFEMERGE_REPORT_DIR``, else a running ``mergekit-yaml``'s OUT_PATH (None: nowhere)."""
    return (report_path or _override or os.environ.get(REPORT_DIR_ENV) or _mergekit_yaml_out()
            or (_stage_out[0] if _stage_out else None))


def _named(report_path: str) -> tuple[str, str]:
    """(the setting the report's location came from, as an error names it; what to set instead)."""
    if report_path:
        return f"report_path {report_path}", "give a report_path that can be written"
    if _override:
        return f"report_to({_override})", "report to a folder that can be written"
    if os.environ.get(REPORT_DIR_ENV):
        return f"{REPORT_DIR_ENV}={os.environ[REPORT_DIR_ENV]}", f"set {REPORT_DIR_ENV} to a folder that can be written"
    if _mergekit_yaml_out():
        return f"OUT_PATH {_mergekit_yaml_out()}", "give an OUT_PATH that can be written"
    return f"the stage's output folder {_stage_out[0]}", "give the stage a report_path that can be written"


def _key(target: str | os.PathLike) -> str:
    return str(_locations(target)[0].resolve())


@contextmanager
def _failing_run(report_path: str) -> Iterator[None]:
    """Around one tensor of a method: when it raises, the run it belongs to will not finish, so its
    records are void: no report is assembled from them, and the next record there starts afresh.
    A Ctrl-C that library code swallowed (safemerge-yaml's handlers) is raised here, at the next tensor."""
    try:
        raise_pending()
        yield
    except BaseException as exc:
        target = _target(report_path)
        if target:
            with _lock:
                # (SystemExit: a SIGTERM or SIGHUP, see _noted_termination)
                _failed[_key(target)] = ("the run was interrupted" if isinstance(exc, (KeyboardInterrupt, SystemExit))
                                         else "a merge method raised an error")
        raise


def report_files(report_path: str | os.PathLike) -> tuple[Path, Path]:
    """(json, png) a report at ``report_path`` (a directory or a ``.json`` path) is written to."""
    return _locations(report_path)[1:]


def _append(report_path: str, line: dict[str, Any]) -> None:
    global _atexit_registered
    target = _target(report_path)
    with _lock:
        if not target:
            if "nowhere" not in _started:
                _started["nowhere"] = time.time()
                LOG.warning("safemerge-ext: no report location; set parameters: {report_path: DIR} to get a report")
            return
        sidecar = _locations(target)[0]
        key = str(sidecar.resolve())
        try:
            sidecar.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # (mergekit-yaml checks no parameter before it merges: say so in one line)
            folder, (setting, instead) = sidecar.parent, _named(report_path)
            why = (f"{folder} is a file, not a folder; give a folder, or a file name ending in .json"
                   if folder.exists() and not folder.is_dir() else
                   f"cannot make the folder {folder} ({exc.strerror or exc}); {instead}")
            raise SafeMergeError(f"{setting}: {why}") from None
        mode = "a"
        # this run's first record here: drop a stale sidecar. (With mergekit's --multi-gpu executor,
        # the other GPUs' workers of a run that failed may still record after the failure and land
        # here too; mergekit-yaml and safemerge-yaml then still discard them, at exit or on failure.)
        if key not in _started or key in _failed:
            _started[key] = time.time()
            _failed.pop(key, None)
            mode = "w"
            _drop_dead_sidecars(target)
            if _stage_out:
                _stage_outs[key] = _stage_out[0]
        _pending[key] = os.fspath(target)
        if not _atexit_registered:
            atexit.register(_finalize_pending)
            _atexit_registered = True
        with open(sidecar, mode, encoding="utf-8") as fh:
            _flock(fh)
            fh.write(json.dumps(line, allow_nan=True) + "\n")


def _alive(pid: int) -> bool:
    if os.name == "nt":  # (there os.kill(pid, 0) sends a Ctrl-C event, and a dead pid is a plain OSError)
        return _alive_windows(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # (EPERM: someone else's process, alive)
        return True
    return True


def _alive_windows(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    kernel32.OpenProcess.restype = ctypes.c_void_p
    kernel32.OpenProcess.argtypes = [ctypes.c_ulong, ctypes.c_int, ctypes.c_ulong]
    kernel32.GetExitCodeProcess.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulong)]
    kernel32.CloseHandle.argtypes = [ctypes.c_void_p]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.get_last_error() == 5  # ERROR_ACCESS_DENIED: someone else's process, alive
    try:
        code = ctypes.c_ulong()
        return not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)) or code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _drop_dead_sidecars(target: str | os.PathLike) -> None:
    """Remove the sidecars at ``target`` of processes that are gone: a mergekit-yaml killed by a
    signal (SIGTERM runs no exit hook) leaves its own in OUT_PATH, and the next run into the same
    folder would otherwise ship it inside the model. Live processes' sidecars are left alone."""
    pattern = _locations(target, pid="*")[0]
    head, tail = pattern.name.rsplit("*", 1)  # (the pid's: a report_path's own name may hold a "*" too)
    try:
        stale = list(pattern.parent.glob(glob.escape(head) + "*" + glob.escape(tail)))
    except OSError:
        return
    for p in stale:
        pid, _, where = p.name[len(head):len(p.name) - len(tail)].partition("-")
        # (only this host's and pid namespace's: another's pid means nothing here; a name of pid
        # alone is an older version's, from before runs were told apart by where they ran)
        if pid.isdecimal() and where in ("", _here()) and int(pid) != os.getpid() and not _alive(int(pid)):
            try:
                p.unlink()
            except OSError:
                pass


def _flock(fh: Any) -> None:
    try:
        import fcntl

        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # released on close
    except (ImportError, OSError):
        pass


def pending_reports() -> list[str]:
    """Sidecar files this process has written and not yet assembled."""
    with _lock:
        return list(_pending)


def discard_report(report_path: str | os.PathLike) -> None:
    """Forget the records at ``report_path`` (a run that failed or was abandoned): remove the
    sidecar, so neither :func:`finalize_report` nor the exit hook makes a report of them."""
    sidecar = _locations(report_path)[0]
    key = str(sidecar.resolve())
    with _lock:
        _pending.pop(key, None)
        _started.pop(key, None)
        _failed.pop(key, None)
        _run_settings.pop(key, None)
        _dropped.pop(key, None)
        try:
            sidecar.unlink(missing_ok=True)
        except OSError:  # (its folder cannot hold it: then there is nothing to forget)
            pass


def _unfinished(key: str) -> str | None:
    """Why the run that wrote sidecar ``key`` did not finish (None: nothing says so), at exit: a
    method that raised; in a running ``mergekit-yaml`` (a ``mergekit-multi`` stage), also an
    uncaught exception (Python keeps it as sys.last_value), a Ctrl-C, or an OUT_PATH (the stage's
    folder) that got no config.json after the run's last record (mergekit writes it once every
    tensor is written). A mergekit-multi stage followed by another has its report by then."""
    if key in _failed:
        return _failed[key]
    out = _mergekit_yaml_out() or _stage_outs.get(key)
    if not out:  # (in a program of one's own, finalize_report says when a run is over)
        return None
    if getattr(sys, "last_exc", None) is not None or getattr(sys, "last_value", None) is not None:
        return "the merge stopped on an error"
    if _interrupts:  # (a Ctrl-C as mergekit finished, after its config.json: "Aborted!")
        return "the run was interrupted"
    try:
        config_written = os.stat(Path(out) / "config.json").st_mtime
    except OSError:
        return f"mergekit did not finish writing {out}"
    # against the sidecar's own time of last change where it sits on OUT's file system (the same
    # clock), else this process's clock at the run's first record; a second of slack either way
    sidecar = Path(key)
    try:
        same_fs = sidecar.stat().st_dev == os.stat(out).st_dev
        since = sidecar.stat().st_mtime if same_fs else _started.get(key, 0.0)
    except OSError:
        since = _started.get(key, 0.0)
    return None if config_written >= since - 1.0 else f"mergekit did not finish writing {out}"


def _finalize_pending() -> None:
    untied: list[str] | None = None  # (mergekit-yaml: once per process, for the first finished run)
    for key in pending_reports():
        target, stage = _pending.get(key, key), None
        try:
            why, stage = _unfinished(key), _stage_outs.pop(key, None)
            if why is not None:
                discard_report(_pending[key])
                _remove_earlier_report(key, target)
                out = _mergekit_yaml_out() if stage is None else None
                if out and out not in why:  # (mergekit writes OUT_PATH in place: what it holds now is no merge)
                    why += f"; OUT_PATH {out} holds what was written before that: merge again into it, or delete it"
                LOG.error("safemerge-ext: no report: %s", why)
                _redo_stage(stage)
                continue
            if stage is not None:  # (mergekit-multi: each stage's own output)
                stage_untied = _untie(stage)
            else:
                if untied is None:
                    untied = _untie(_mergekit_yaml_out())
                stage_untied = untied
            rep = finalize_report(_pending[key], warnings=stage_untied, command=mergekit_cli() or "run_merge")
            if rep is not None:
                print(summary_table(rep), file=sys.stderr)
        except Exception as exc:  # at exit: report, never raise
            json_path, png_path = report_files(target)
            half = " (its JSON is written, the plot is not)" if json_path.is_file() and not png_path.is_file() else ""
            LOG.error("safemerge-ext: could not write the report at %s%s: %s", target, half, exc)
        except KeyboardInterrupt as exc:  # (Ctrl-C while it is written: none, and the run ends on it)
            for path in report_files(target):  # (whole or not at all)
                path.unlink(missing_ok=True)
            say(f"safemerge-ext: {what_ended(exc)} while the report was written; no report at {target}")
            _redo_stage(stage)
            os._exit(exit_code(exc))  # (an exception here would be printed with its traceback, and the exit be 0)


def _redo_stage(stage: str | None) -> None:
    """A mergekit-multi stage that gets no report: its config.json is removed, so that the next run
    merges it again (mergekit-multi's --lazy takes a folder with one for a finished stage, and would
    feed it, reportless and perhaps with its head still tied, to the stages after it)."""
    if stage is None:
        return
    with contextlib.suppress(OSError):
        (Path(stage) / "config.json").unlink()
        say(f"safemerge-ext: removed {Path(stage) / 'config.json'}, so that mergekit-multi merges that stage "
            "again on its next run")


def _untie(out: str | None) -> list[str]:
    """In a finished ``mergekit-yaml`` run (a ``mergekit-multi`` stage): a head its OUT_PATH stores
    (a task model that PEFT untied) beside a config mergekit copied from a tied base model is
    untied there, as ``safemerge-yaml`` does; returns the warning, if any."""
    if not out:
        return []
    from safemerge_ext.io.model_writer import untie_stored_head

    try:
        untied = untie_stored_head(Path(out))
    except OSError as exc:  # (the reports still get written)
        LOG.error("safemerge-ext: could not untie the head in %s: %s", Path(out) / "config.json", exc)
        return []
    if untied is None:
        return []
    LOG.warning("safemerge-ext: %s", untied)
    return [untied]


def _load_layers(sidecar: Path) -> tuple[str, list[LayerRecord], list[dict[str, Any]]]:
    method, by_module, lines = "", {}, []
    for raw in sidecar.read_text(encoding="utf-8").splitlines():
        if not raw.strip():
            continue
        line = json.loads(raw)
        lines.append(line)
        method = line["method"]
        d = dict(line["layer"])
        fixed = {k: d.pop(k) for k in ("module", "cosine", "flagged", "reason", "action", "shape", "rank",
                                         "v_norm", "delta_norm")}
        fixed["cosine"] = math.nan if fixed["cosine"] is None else fixed["cosine"]
        fixed["shape"] = tuple(fixed["shape"])
        by_module[fixed["module"]] = LayerRecord(**fixed, extra=d)  # a re-run tensor: the last one wins
    from safemerge_ext.io.models import natural_key

    layers = sorted(by_module.values(), key=lambda r: natural_key(r.module))
    return method, layers, lines


def _settings(method: str, layers: list[LayerRecord]) -> dict[str, Any]:
    keys = {"safemerge": ("threshold", "alpha", "merge", "density", "seed"), "safelora": ("threshold",),
            "resta": ("beta", "density", "seed")}[method]
    settings: dict[str, Any] = {}
    for k in keys:
        values = {json.dumps(r.extra.get(k)) for r in layers}
        settings[k] = layers[0].extra.get(k) if len(values) == 1 else "varies by layer (see layers)"
    if method == "safemerge" and settings["merge"] in MERGE_METHODS:  # (null where the merge has no use for them)
        for key, users in (("density", USES_DENSITY), ("seed", USES_SEED)):
            if settings["merge"] not in users:
                settings[key] = None
    if method == "resta" and settings["density"] == 1.0:  # (no mask is drawn)
        settings["seed"] = None
    if method != "resta":
        fixed = not isinstance(settings["threshold"], str)
        settings.update({"selection": "threshold" if fixed else "threshold (per layer)",
                         "comparison": "<" if method == "safemerge" else "<="})
    settings["scored"] = "2-D weights except embeddings and lm_head; " + (
        "every floating-point tensor, scored or not, is shifted by beta (W_aligned - W_unaligned)" if method == "resta"
        else "other tensors are the task model's")
    return settings


def _model_refs(lines: list[dict[str, Any]]) -> dict[str, str]:
    """The run's inputs by role as mergekit names them (``path`` or ``path+lora``), from its records."""
    refs: dict[str, str] = {}
    for ln in lines:
        for role, ref in (ln.get("models") or {}).items():
            refs.setdefault(role, ref["model"] + (f"+{ref['lora']}" if ref.get("lora") else ""))
    return refs


def _inputs(lines: list[dict[str, Any]]) -> dict[str, str]:
    """The run's local input folders by role (a LoRA's as "<role>_lora"), for the report's record
    of them; Hub ids, which mergekit fetched, are left out."""
    found: dict[str, str] = {}
    for ln in lines:
        for role, ref in (ln.get("models") or {}).items():
            for key, path in ((role, ref.get("model")), (f"{role}_lora", ref.get("lora"))):
                if path and key not in found and os.path.isdir(os.path.expanduser(path)):
                    found[key] = os.path.expanduser(path)
    return found


def _unreachable_threshold(method: str, layers: list[LayerRecord]) -> list[str]:
    """A warning when one threshold serves every layer and can flag none (a threshold that varies
    by layer may mean "never flag" for some on purpose)."""
    values = {r.extra.get("threshold") for r in layers}
    if method == "resta" or len(values) != 1 or not isinstance(tau := values.pop(), (int, float)):
        return []
    why = unreachable_threshold(float(tau), inclusive=method == "safelora")
    return [why] if why else []


def _unused_density(method: str, layers: list[LayerRecord]) -> list[str]:
    """A warning when a safemerge recipe sets a density its linear merge cannot use."""
    if method != "safemerge":
        return []
    unused = [r.module for r in layers
              if r.extra.get("merge") in MERGE_METHODS and r.extra["merge"] not in USES_DENSITY
              and r.extra.get("density", 1.0) != 1.0]
    return [f"density applies to merge: ties, dare_linear and dare_ties; with merge: linear it changed nothing "
            f"({len(unused)} layer(s), e.g. {unused[0]})"] if unused else []


def _unchanged_safety(method: str, layers: list[LayerRecord]) -> list[str]:
    """A warning naming the flagged layers where the safety model's weights are the aligned model's
    (a safety LoRA without those modules, or layers its fine-tune left alone): merged there is
    alpha * dW_task alone, no safety update."""
    same = [r.module for r in layers if r.flagged and r.extra.get("safety_unchanged")]
    if method != "safemerge" or not same:
        return []
    names = ", ".join(same[:6]) + (", ..." if len(same) > 6 else "")
    return [f"role safety does not change {len(same)} of the {sum(r.flagged for r in layers)} flagged layers (its "
            f"weights there are the aligned model's: a safety LoRA without those modules, or layers its fine-tune "
            f"left alone), so they got alpha * dW_task and no safety update: {names}; give a safety model or "
            "adapter that updates every module the task does"]


def _precision_warnings(method: str, layers: list[LayerRecord]) -> list[str]:
    """A warning when task weights arrived rounded to a half format, with what would avoid it."""
    # layers with an update recovered from rounded weights (an untouched layer's dW = 0 is exact)
    rounded = [r for r in layers if r.extra.get("rounding_dtype") and r.extra.get("rounding_band") is not None]
    if not rounded or method == "resta":
        return []
    fmt = "/".join(sorted({r.extra["rounding_dtype"] for r in rounded}))
    near = [r.module for r in rounded if math.isfinite(r.cosine) and abs(r.cosine - r.extra["threshold"]) <= r.extra["rounding_band"]]
    names = (": " + ", ".join(near[:6]) + (", ..." if len(near) > 6 else "")) if near else ""
    loaded_half = any(r.extra.get("input_dtype") in ("bfloat16", "float16") for r in rounded)
    folded = any(r.extra.get("task_lora") for r in rounded)
    advice = []
    if loaded_half:
        advice.append("set dtype: float32 in the recipe (this helps where the models are stored in float32)")
    if folded:
        advice.append("fold the task LoRA in float32 (--lora-merge-dtype float32, safemerge-yaml's default)")
    if not advice:
        advice.append(f"the task model is stored in {fmt}, so no setting here removes this noise")
    return [
        f"{fmt} task weights: task updates are recovered as W_task - W_aligned from weights rounded to {fmt}, "
        f"whose rounding error is relative to the weights, not to the small update; {len(near)} of {len(layers)} "
        f"layers have a cosine within the estimated rounding error of the threshold{names}; " + "; ".join(advice)
    ]


def _unused_precision(lines: list[dict[str, Any]]) -> list[str]:
    """A warning when a precision was asked for (the recipe's ``precision`` or SAFEMERGE_PRECISION)
    that the backend could not use."""
    unused = sorted({(ln["precision_requested"], ln["backend"]) for ln in lines
                     if ln.get("precision_requested", EXACT) != ln.get("precision", EXACT)})
    return [f"precision {asked} applies to the triton backend on a GPU only; the {backend} backend computed in exact fp32 "
            f"(ieee)" for asked, backend in unused]


def _timings(lines: list[dict[str, Any]]) -> dict[str, float]:
    """tensors_s: the time spent in the method itself; total_s: wall clock from the first scored
    tensor's start to the last one's end (mergekit's loading and writing in between included)."""
    busy = sum(ln["time_s"] for ln in lines)
    ends = [ln["end"] for ln in lines if "end" in ln]
    starts = [ln["end"] - ln["time_s"] for ln in lines if "end" in ln]
    return {"tensors_s": busy, "total_s": (max(ends) - min(starts)) if ends else busy}


def finalize_report(report_path: str | os.PathLike, *, command: str = "run_merge",
                    into: str | os.PathLike | None = None, warnings: Sequence[str] = ()) -> dict[str, Any] | None:
    """Assemble the sidecar at ``report_path`` (directory or ``.json``) into the JSON + PNG report,
    written there (or into the folder ``into``); ``warnings``: the caller's own, added to the
    method's.

    Returns the report (``None`` when no tensor was scored there, or the run failed); removes the
    sidecar.
    """
    sidecar, json_path, png_path = _locations(report_path)
    if into is not None:
        json_path, png_path = Path(into) / REPORT_JSON, Path(into) / REPORT_PNG
    key = str(sidecar.resolve())
    with _lock:
        _pending.pop(key, None)
        _started.pop(key, None)
        _begun.pop(key, None)
        noted = _run_settings.pop(key, {})
        dropped = _dropped.pop(key, None)
        if key in _failed:  # the run did not finish: its records describe part of it
            _failed.pop(key, None)
            sidecar.unlink(missing_ok=True)
            return None
        if not sidecar.is_file():
            return None
        method, layers, lines = _load_layers(sidecar)
        sidecar.unlink()
    if not layers:
        return None
    backends = sorted({ln["backend"] for ln in lines})
    precisions = sorted({ln.get("precision", EXACT) for ln in lines})
    details = sorted({ln["backend_detail"] for ln in lines if ln.get("backend_detail")})
    settings, inputs = {**_settings(method, layers), **noted}, _inputs(lines)
    for key in ("device", "backend_requested", "precision_requested"):  # (as the command line's reports say them)
        values = sorted({str(ln.get(key)) for ln in lines if ln.get(key) is not None})
        settings[key] = ",".join(values) or None
    report = build_report(
        command=command,
        method=method,
        layers=layers,
        settings={"models": _model_refs(lines), **settings},
        inputs=inputs,
        backend=backends[0] if len(backends) == 1 else ",".join(backends),
        precision=",".join(precisions),
        backend_detail="; ".join(details) or None,
        timings=_timings(lines),
        bytes_read=sum(ln["bytes"] for ln in lines),
        warnings=(_unreachable_threshold(method, layers) + _precision_warnings(method, layers) + _unused_precision(lines)
                  + _unused_density(method, layers) + _unchanged_safety(method, layers) + ([dropped] if dropped else [])
                  + list(warnings)),
    )
    band_layers = [r for r in layers if r.extra.get("rounding_band") is not None]
    if band_layers and method != "resta":
        report["counts"]["near_threshold"] = sum(
            1 for r in band_layers
            if math.isfinite(r.cosine) and abs(r.cosine - r.extra["threshold"]) <= r.extra["rounding_band"]
        )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(report, json_path)
    try:
        plot(report, png_path)
    except BaseException as exc:  # (never an earlier run's plot beside this JSON)
        with contextlib.suppress(OSError):
            png_path.unlink(missing_ok=True)
        if not isinstance(exc, PlotUnavailable):
            raise
        # (no recipe switch turns the plot off: the JSON report is the report)
        LOG.warning("safemerge-ext: %s; the report %s has no plot", exc.reason,
                    json_path.name if into is not None else json_path)
    return report
