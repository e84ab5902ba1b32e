"""All-or-nothing output folders: build in a temporary sibling, rename into place at the end."""

from __future__ import annotations

import errno
import os
import random
import re
import secrets
import shutil
import stat
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from safemerge_ext._signals import interrupts_held, raise_pending, send_on
from safemerge_ext.errors import SafeMergeError, blank_path, is_link_loop, link_loop_error
from safemerge_ext.io.places import same_place, within

try:
    import fcntl
except ImportError:  # (Windows: no working folder is told from a killed run's)
    fcntl = None  # type: ignore[assignment]


def check_parent(path: str | os.PathLike, flag: str, follow_links: bool = False) -> Path:
    """Fail early when ``path`` could not be created: its nearest existing ancestor must be a
    writable directory (missing folders in between are made when the output is written). With
    ``follow_links`` (a file that replaces what a link names: see :func:`write_files`), a link that
    names nothing must name a file in a folder that exists (no folders are made where it points)."""
    blank = blank_path(flag, path)
    if blank is not None:
        raise blank
    p = Path(path)
    _committed.discard(os.path.abspath(p))  # (a run for it starts: not in place until it is written)
    if claim_descriptor(p, flag):  # (this process's own stdout, say: written into as it is)
        return p
    if is_link_loop(p):
        raise link_loop_error(flag, p)
    if follow_links and p.is_symlink() and not p.exists():
        target = Path(os.path.realpath(p))
        if not target.parent.is_dir():
            raise SafeMergeError(f"{flag} {p} links to {target}, whose folder does not exist; "
                                 "create it, or give a path that is no such link")
        return check_parent(target, flag)
    if is_special(p):  # (written into, not replaced: the file itself must be writable)
        if not os.access(p, os.W_OK):
            raise SafeMergeError(f"{flag} {p} is not writable; choose another path")
        return p
    check_links_lead(p, flag)
    anc = p.absolute().parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise SafeMergeError(f"{flag} {p}: {anc} is a file, not a folder; choose another path")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise SafeMergeError(f"{flag} {p}: the folder {anc} is not writable; choose another path")
    return p


def check_links_lead(path: str | os.PathLike, flag: str, itself: bool = False) -> None:
    """Refuse a path under a symbolic link that names nothing (an unmounted disk, a removed folder),
    or ``itself`` such a link (a folder to be made there): its folders could not be made, and the
    run would fail only as it writes, after all its work."""
    p = Path(path)
    whole = p.absolute()
    for link in [whole] * itself + list(whole.parents):
        if link.exists():  # (and so does every folder above it)
            return
        named = (flag, p) if link == whole else (f"{flag} {p}:", link)
        if is_link_loop(link):
            raise link_loop_error(*named)
        if link.is_symlink():
            raise SafeMergeError(f"{named[0]} {named[1]} links to {os.path.realpath(link)}, which does not exist; "
                                 "create it, or give a path that is no such link")


def check_given(inputs: Iterable[tuple[str, str | os.PathLike]]) -> None:
    """Refuse an input path ((flag, path) pairs) that is empty or only white space: read as the
    working directory, it would be scored (run from inside a model folder) or named as "."."""
    for name, path in inputs:
        blank = blank_path(name, path)
        if blank is not None:
            raise blank


def check_out(out: str | os.PathLike, force: bool, flag: str = "--out",
              inputs: Iterable[tuple[str, str | os.PathLike]] = (), marker: str | None = None,
              prog: str | None = None) -> Path:
    """Fail early when the output (``flag`` names it in errors) exists and --force was not given, or
    could not be made, or when replacing it would delete the working directory or one of
    ``inputs`` ((flag, path) pairs: --force replaces the whole folder), or a file system mounted
    inside it, or while another run is writing it (it would be refused as it started writing, its
    models read and scored for nothing); with ``marker`` (a file every output of the command
    holds), a folder that is neither empty nor holds it is not replaced either. With ``prog`` (the
    command, for warnings), an output refused because it exists first has the hidden leftovers of a
    killed run beside it named."""
    check_given(inputs)
    p = check_parent(out, flag)
    here, where = Path.cwd().resolve(), p.resolve()
    if within(here, where):  # (and Path(".").name is empty)
        raise SafeMergeError(f"{flag} {out} is the working directory or holds it; choose a new folder")
    for name, path in inputs:
        if is_link_loop(path):
            raise link_loop_error(name, path)
        src = Path(path).resolve()
        if within(src, where):
            raise SafeMergeError(f"{flag} {out} is {name} {path} or holds it, which the output would replace; "
                                 "choose a new folder")
        # (a Hugging Face cache: snapshots/<rev>/* link into blobs/, which --force would delete)
        for link, target in (_links(src) if force and p.exists() else ()):
            if within(target, where):
                raise SafeMergeError(f"{flag} {out} holds {target}, which {name} {Path(path) / link} links to "
                                     "and the output would replace; choose a new folder")
    other = _writer(p)
    if other is not None:  # (before its models are read and scored: refused as it would start writing anyway)
        raise _busy(flag, p, other)
    _committed.discard(os.path.abspath(p))  # (a run for it starts: not in place until staged_dir says so)
    if (p.exists() or p.is_symlink()) and not force:
        if prog is not None:  # (a rerun without --force is where a user learns of them)
            _warn_leftovers(p, flag, prog)
        raise SafeMergeError(f"{flag} {p} already exists; choose a new path or pass --force to replace it")
    if p.exists() and not p.is_dir():
        raise SafeMergeError(f"{flag} {p} exists and is not a directory; remove it or choose another path")
    if force and p.is_dir() and not p.is_symlink():  # (a link is replaced, not what it points to)
        _check_replaceable(p, flag, marker)
    return p


def put_at(out: str | os.PathLike) -> Path:
    """The folder an output is written as, absolute: its parent resolved, its own name kept (an
    ``out`` that is a symbolic link is replaced by the output, not followed: see :func:`check_out`)."""
    p = Path(out).absolute()
    return p.parent.resolve() / p.name


def _check_replaceable(p: Path, flag: str, marker: str | None) -> None:
    """--force deletes the folder it replaces: never one with a file system mounted inside it (a
    bind mount of an input would be emptied; resolved paths do not show it), and with ``marker``
    only a previous output or an empty folder (a mistyped --out is not deleted)."""
    if marker is not None:  # (first: where no mount table is read, the mount check walks the folder)
        try:
            other = _holds_other_files(p, marker)
        except OSError as exc:
            raise SafeMergeError(f"{flag} {p}: cannot list it ({exc.strerror or exc}); choose another path") from None
        if other:
            raise SafeMergeError(f"{flag} {p} holds no {marker}, which every output of safemerge holds, and --force "
                                 "would delete all of it; remove it yourself or choose another path")
    mounted = mounts_under(p)
    if mounted:
        raise SafeMergeError(f"{flag} {p} has {mounted[0]} mounted inside it, whose files --force would delete; "
                             "unmount it or choose another path")


def _holds_other_files(p: Path, marker: str) -> bool:
    """Whether the folder ``p`` is neither empty nor an output (``marker`` in it): not --force's to delete."""
    with os.scandir(p) as entries:
        empty = next(entries, None) is None
    return not empty and not (p / marker).is_file()


_MOUNTINFO = "/proc/self/mountinfo"


def _unescape_mountinfo(field: bytes) -> str:
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), field))


def mounts_under(folder: Path) -> list[str]:
    """The mount points strictly inside ``folder`` (bind mounts included: Linux's mountinfo lists
    them; elsewhere, folders on another device than their parent)."""
    root = os.path.realpath(folder)
    prefix = root.rstrip(os.sep) + os.sep
    try:
        with open(_MOUNTINFO, "rb") as f:
            points = [_unescape_mountinfo(fields[4]) for fields in map(bytes.split, f) if len(fields) > 4]
        return sorted({m for m in points if m != root and m.startswith(prefix)})
    except OSError:
        pass
    found = []
    for here, dirs, _ in os.walk(root):
        for d in list(dirs):
            path = os.path.join(here, d)
            if os.path.ismount(path):
                found.append(path)
                dirs.remove(d)
    return found


def _links(folder: Path) -> Iterator[tuple[str, Path]]:
    """(name, resolved target) of each symbolic link directly in ``folder``."""
    try:
        entries = list(os.scandir(folder)) if folder.is_dir() else []
    except OSError:
        return
    for e in entries:
        if e.is_symlink():
            try:
                target = Path(e.path).resolve()
            except (OSError, RuntimeError):  # (a loop: it links to nothing --out could hold)
                continue
            yield e.name, target


def check_not_input(path: str | os.PathLike, flag: str, inputs: Iterable[tuple[str, str | os.PathLike]]) -> None:
    """Fail early when writing the file ``path`` would replace an input: one of ``inputs`` ((flag,
    path) pairs) itself, or a file in one of those folders (a new file beside them is fine)."""
    p = Path(path).resolve()
    for name, src in inputs:
        if same_place(p, src):
            raise SafeMergeError(f"{flag} {path} is {name} {src} itself, which writing it would replace; "
                                 "choose another path")
        if p.exists() and within(p.parent, src):
            raise SafeMergeError(f"{flag} {path} is a file of {name} {src}, which writing it would replace; "
                                 "choose another path")


def is_special(path: str | os.PathLike) -> bool:
    """Whether ``path`` is, or links to, something other than a file or a folder: a device or a
    pipe (``/dev/null``, a named pipe), which output is written into rather than replaced."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


_STD = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}
_FD_PATH = re.compile(r"/(?:dev/fd|proc/(?:self|thread-self|(\d+))/fd)/(\d+)")
_claimed: dict[str, int] = {}  # descriptor path -> a duplicate of its descriptor, taken at check time


def descriptor_of(path: str | os.PathLike) -> int | None:
    """The descriptor number of this process that ``path`` names (``/dev/stdout``, ``/dev/fd/N``,
    ``/proc/self/fd/N``, a shell's ``>(jq .)``, or a link to one of them), open or not; else None."""
    p = os.fspath(path)
    for _ in range(40):  # (links followed by name: /dev/stdout -> /proc/self/fd/1 -> the redirect)
        norm = _key(p)
        if norm in _STD:
            return _STD[norm]
        m = _FD_PATH.fullmatch(norm)
        if m is not None:
            return int(m.group(2)) if m.group(1) is None or int(m.group(1)) == os.getpid() else None
        try:
            target = os.readlink(norm)
        except (OSError, ValueError):
            return None
        p = os.path.join(os.path.dirname(norm), target)
    return None


def _writable_descriptor(path: str | os.PathLike, flag: str) -> int | None:
    """The open, writable descriptor ``path`` names (see :func:`descriptor_of`); a closed one, a
    read-only one or standard input is one error line."""
    fd = descriptor_of(path)
    if fd is None:
        return None
    what = f"{flag} {path}" if flag else str(path)
    if fd == 0:
        raise SafeMergeError(f"{what} is standard input; give a file, or /dev/stdout")
    try:
        import fcntl
    except ImportError:  # (Windows: no access mode to ask; a write to a closed one fails then)
        return fd
    try:
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError:
        raise SafeMergeError(f"{what}: descriptor {fd} is not open in this command; give a file, or open it for "
                             "writing (e.g. 3> FILE)") from None
    if mode == os.O_RDONLY:
        raise SafeMergeError(f"{what}: descriptor {fd} is open for reading only; give a file, or open it for "
                             "writing (e.g. 3> FILE)")
    return fd


def _key(path: str | os.PathLike) -> str:
    """``path`` absolute, with one leading slash (POSIX keeps a leading //)."""
    return "/" + os.path.abspath(path).lstrip("/")


def claim_descriptor(path: str | os.PathLike, flag: str) -> bool:
    """At a command's check of an output that names a descriptor: check it (open, writable) and
    keep a duplicate of it for the write, which comes after the inputs are opened (they may then
    take its number, were it closed). True when ``path`` names one."""
    fd = _writable_descriptor(path, flag)
    if fd is None:
        return False
    old = _claimed.pop(_key(path), None)
    if old is not None:
        os.close(old)
    _claimed[_key(path)] = os.dup(fd)
    return True


def _write_into(tmp: Path, path: Path) -> None:
    """Send the bytes of ``tmp`` into ``path``: a descriptor of this process (the duplicate taken
    when it was checked, else one checked now), or a device or pipe opened for writing. A reader
    that goes away is named: what it read is cut short."""
    fd = _claimed.pop(_key(path), None)
    own = fd is not None
    if fd is None:
        fd = _writable_descriptor(path, "")
    total, sent = tmp.stat().st_size, 0
    try:
        if fd is None:
            with open(tmp, "rb") as src, open(path, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    sent += len(chunk)
            return
        for stream in (sys.stdout, sys.stderr):  # (what Python buffered for the same file goes first)
            if stream is not None:
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
        with open(tmp, "rb") as src:
            while chunk := src.read(1 << 20):
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    view, sent = view[n:], sent + n
    except BrokenPipeError:
        raise SafeMergeError(f"{path}: its reader closed it after {sent} of {total} bytes, so what it read is cut "
                             "short") from None
    finally:
        if own:
            os.close(fd)


def write_whole(path: str | os.PathLike, fill: Callable[[Path], object]) -> None:
    """``fill(tmp)`` writes a temporary file beside ``path`` (with its suffix, which some writers
    read the format from), which then replaces ``path``: a failure or an interruption leaves
    ``path`` as it was."""
    write_files([(path, fill)])


def _temp_suffix(path: Path) -> str:
    """The suffix of a file's temporaries: its own (a format's, for writers that read it), if short."""
    return path.suffix if len(path.suffix) <= 16 else ""


def write_files(files: Iterable[tuple[str | os.PathLike, Callable[[Path], object]]], prog: str | None = None) -> None:
    """Each ``(path, fill)``: ``fill(tmp)`` writes a temporary beside ``path``; once all are
    written, each replaces its ``path``. A failure or an interruption while any is written leaves
    every ``path`` as it was, and takes back the folders made for them. A ``path`` that links to a
    file replaces that file (the link stays). One that is written into instead (a descriptor of
    this process such as ``/dev/stdout``, a device, a pipe: see :func:`descriptor_of` and
    :func:`is_special`) gets its bytes from a temporary in the system's temporary folder, before
    any file is replaced; bytes a pipe took cannot be taken back if a later one fails. With
    ``prog`` (the command, for warnings), the temporaries a killed run left beside a path are named."""
    targets, given = [], []
    for p, fill in files:
        given.append(os.path.abspath(p))
        path = Path(p)
        into = descriptor_of(path) is not None or is_special(path)
        if not into and path.is_symlink():
            path = Path(os.path.realpath(path))
        targets.append((path, fill, into))
        if prog is not None and not into:
            _warn_leftovers(path.absolute(), "", prog, _temp_suffix(path), kinds=("tmp",))
    made: list[Path] = []
    temps: list[Path] = []
    try:
        for path, fill, into in targets:
            suffix = _temp_suffix(path)
            if into:
                handle, name = tempfile.mkstemp(prefix="safemerge-", suffix=suffix)
                os.close(handle)
                temps.append(Path(name))
            else:
                for parent in reversed([path.parent, *path.parent.parents]):
                    if not parent.exists():
                        with interrupts_held():  # (made and known as one step)
                            parent.mkdir()
                            made.append(parent)
                temps.append(path.with_name(_hidden_name(path.name, f"tmp-{secrets.token_hex(4)}{suffix}")))
            fill(temps[-1])
        raise_pending()  # (a Ctrl-C that library code swallowed while they were written: none replaces its path)
        for (path, _, into), tmp in zip(targets, temps):  # (what cannot be taken back first)
            if into:
                _write_into(tmp, path)
        with interrupts_held():  # (every path replaced, or none: an interrupt comes after the last)
            for (path, _, into), tmp in zip(targets, temps):
                if not into:
                    os.replace(tmp, path)
            # (the renamed ones are gone; those copied into a descriptor or device are deleted below)
            made, temps = [], [tmp for (_, _, into), tmp in zip(targets, temps) if into]
            _committed.update(given)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        for p in reversed(made):  # deepest first; only if still empty
            try:
                p.rmdir()
            except OSError:
                break


def _fsync(path: Path) -> None:
    """Flush a file's data (or a folder's entries; not on Windows, which opens no folder) to the disk."""
    if os.name == "nt" and path.is_dir():
        return
    # (Windows' fsync is FlushFileBuffers, which needs a handle with write access: on a read-only
    # one it fails, EBADF below, and nothing would be flushed; a read-only file there is opened as one)
    binary = getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, (os.O_RDWR if os.name == "nt" else os.O_RDONLY) | binary)
    except PermissionError:
        if os.name != "nt":
            raise
        fd = os.open(path, os.O_RDONLY | binary)
    try:
        _sync(fd)
    except OSError as exc:  # (a file system that cannot sync a folder, or a file opened read-only)
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _sync(fd: int) -> None:
    """fsync, or on macOS F_FULLFSYNC: its fsync leaves the data in the drive's write cache, which a
    power loss empties (Apple's fsync(2)); F_FULLFSYNC flushes that too, where the file system can."""
    if sys.platform == "darwin":
        import fcntl

        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError:  # (a file system without it: a network share, FAT)
            pass
    os.fsync(fd)


def _umask() -> int:
    """The process's umask, read without setting it where Linux shows it (os.umask sets it, for a
    moment, for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_modes(folder: Path) -> None:
    """Give the files in ``folder`` that another writer made owner-only the mode a plain ``open``
    gives (``0o666 & ~umask``), as the rest of the output has: safetensors 0.8 writes through a
    0600 temporary file (safetensors#782), so another account serving the model could not read it."""
    want = 0o666 & ~_umask()
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode) and not mode & 0o077 and stat.S_IMODE(mode) != want:
                os.chmod(path, want)


def sync_tree(folder: Path) -> None:
    """Put what ``folder`` holds on disk (its files' data, then the folders' entries), so that a
    rename of it that follows never publishes files whose data a power loss would take back."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                _fsync(Path(root, name))
        try:
            _fsync(Path(root))
        except OSError:  # (a folder some systems cannot open, Windows': its entries are the OS's to keep)
            pass


NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems alike


def _hidden_name(name: str, tag: str) -> str:
    """``.<name>.<tag>``, with ``name`` cut short where the whole would pass the file-name limit
    (a valid output name near the limit must still get a temporary beside it)."""
    room = NAME_MAX - len(os.fsencode(f"..{tag}"))
    while name and len(os.fsencode(name)) > room:  # (whole characters off the end; at most a few hundred)
        name = name[:-1]
    return f".{name}.{tag}"


def _sibling(final: Path, kind: str) -> Path:
    """A name next to ``final`` that nothing uses (a hidden ``.<name>.<kind>-<random>``)."""
    while True:
        p = final.with_name(_hidden_name(final.name, f"{kind}-{secrets.token_hex(4)}"))
        if not p.exists():
            return p


def scratch_dir(out: str | os.PathLike, kind: str) -> Path:
    """Make a hidden working folder beside ``out`` (``.<name>.<kind>-<random>``, as the staged
    output's), which a later run for ``out`` names if a killed run left it (see LEFTOVERS). It is
    held (:func:`hold`) until :func:`let_go`."""
    final = Path(out).absolute()
    while True:
        p = _sibling(final, kind)
        try:
            p.mkdir(mode=0o700)
        except FileExistsError:
            continue
        hold(p)
        return p


_held: dict[str, int] = {}  # working folders of this process: path as made -> a descriptor locking it


def hold(folder: Path) -> None:
    """Mark ``folder`` as worked in by a live run until :func:`let_go` (an exclusive ``flock`` on a
    descriptor of it, which the system drops when the process dies, however it dies): a run for the
    same output tells it from a killed run's leftover. Where locks are not had, nothing is marked."""
    if fcntl is None:
        return
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    for _ in range(200):  # (another run's look at it, a shared lock, lasts microseconds)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            time.sleep(0.001)
            continue
        except OSError:  # (a file system without locks)
            break
        _held[os.fspath(folder)] = fd
        return
    os.close(fd)


def _forget_held() -> None:
    """In a forked child: close its copies of the held descriptors (which leaves the parent's locks
    as they are), so that a child outliving a killed parent does not keep its folders held."""
    for fd in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_held)


def let_go(folder: Path) -> None:
    """End :func:`hold` of ``folder`` (by the path it was held under)."""
    fd = _held.pop(os.fspath(folder), None)
    if fd is not None:
        os.close(fd)


def _live(path: Path) -> bool:
    """Whether a live run holds ``path`` (see :func:`hold`)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))  # (a FIFO: not waited on)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # (and with it the shared lock)
    return False


# the hidden siblings a run for an output makes, by kind, and what a killed run's one holds
# (report.REPORT_JSON) every output of the commands holds it, written last: a staged folder with it is finished
_FINISHED = "safemerge_report.json"
LEFTOVERS = {"tmp": "a partial output of an earlier run for {what} that was killed",
             "old": "the output an earlier run for {what} replaced and did not delete (it was killed, or was denied)",
             "lora": "the LoRA inputs folded by mergekit (its --lora-merge-cache) of an earlier run for {what} that "
                     "was killed"}


def _siblings(final: Path, kinds: Iterable[str] = LEFTOVERS, suffix: str = "") -> Iterator[tuple[str, Path]]:
    """(kind, path) of the hidden siblings runs for ``final`` make (``.<name>.<kind>-<8 hex>``), by name."""
    if not final.parent.is_dir():
        return
    prefixes = {kind: _hidden_name(final.name, f"{kind}-00000000{suffix}")[:-8 - len(suffix)] for kind in kinds}
    try:
        names = sorted(p.name for p in final.parent.iterdir())
    except OSError:
        return
    for name in names:
        for kind, prefix in prefixes.items():
            tail = name[len(prefix):len(name) - len(suffix)]
            if (name.startswith(prefix) and name.endswith(suffix) and len(tail) == 8
                    and all(c in "0123456789abcdef" for c in tail)):
                yield kind, final.parent / name


def _warn_leftovers(final: Path, flag: str, prog: str = "safemerge", suffix: str = "",
                    kinds: Iterable[str] = LEFTOVERS) -> None:
    """Name the hidden siblings a killed run left (SIGKILL, OOM, power loss: nothing could clean
    up), which can be as large as a model. They are not deleted: another run may be writing one
    (a live run's own folders, which it holds, are not named). ``suffix`` ends a file's
    temporaries (see :func:`write_files`); ``flag`` may be empty."""
    what = f"{flag} {final}" if flag else str(final)
    for kind, path in _siblings(final, kinds, suffix):
        if _live(path):
            continue
        if kind == "tmp" and (path / _FINISHED).is_file():  # (killed as it was put in place)
            print(f"{prog}: warning: {path} holds the finished output (its report written) of an "
                  f"earlier run for {what} that was killed as it put it in place; rename it to keep it, or "
                  "delete it", file=sys.stderr)
            continue
        print(f"{prog}: warning: {path} holds {LEFTOVERS[kind].format(what=what)}; delete it "
              "unless a run is writing there now", file=sys.stderr)


_committed: set[str] = set()  # outputs this process put in place (staged_dir's final rename)


def committed(out: str | os.PathLike) -> bool:
    """Whether this process has put the output ``out`` in place: an interrupt after that point
    cuts short only what follows (a summary, a report copy), not the output."""
    return os.path.abspath(out) in _committed


@contextmanager
def staged_dir(out: str | os.PathLike, force: bool, flag: str = "--out", prog: str = "safemerge",
               marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; on success it replaces ``out``, else vanishes.

    The temporary sits in the same parent so the final rename is atomic on one file system. It is
    made with ``mkdir`` under the process umask (as a plain ``mkdir`` of ``out`` would be), not
    ``mkdtemp``'s 0700, so the output is as readable as any other folder the user makes. Without
    ``force``, an ``out`` that appeared while the run was writing is never replaced; with it and
    ``marker`` (as :func:`check_out`'s), one that appeared is replaced only if it is an output or
    empty. While another run writes the same ``out`` (its temporary held: :func:`hold`), this one
    is refused as it starts writing. ``flag`` names the output in errors, ``prog`` the command in
    warnings.
    """
    final = check_out(out, force, flag, prog=prog)
    made = [p for p in (final.parent, *final.parent.parents) if not p.exists()]  # parents this run adds
    tmp: Path | None = None

    def undo(failure: BaseException) -> None:
        # (a Ctrl-C here would leave a hidden folder of partial shards: held, and sent on after
        # unless the run is ending on one already)
        with interrupts_held(resend=not isinstance(failure, KeyboardInterrupt)):
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                let_go(tmp)
            for p in made:  # deepest first; only if still empty
                try:
                    p.rmdir()
                except OSError:
                    break

    _warn_leftovers(final, flag, prog)
    try:  # (from the first folder made: an interrupt anywhere after it takes back what was made)
        final.parent.mkdir(parents=True, exist_ok=True)
        while tmp is None:
            candidate = _sibling(final, "tmp")
            with interrupts_held():  # (made and known as one step: an interrupt between them would leave it)
                try:
                    candidate.mkdir()
                except FileExistsError:
                    continue
                tmp = candidate
                hold(tmp)
        _check_alone(final, tmp, flag)
        yield tmp
    except BaseException as exc:
        undo(exc)
        raise
    old, held = None, []
    try:  # (an interruption between the two renames puts the old output back: see the except)
        raise_pending()  # (a Ctrl-C that library code swallowed while the output was written: not committed)
        sync_tree(tmp)  # (the data on disk before the name: never an output of empty files after a power loss)
        with interrupts_held(resend=False) as held:  # (the renames and their fsync: sent on once the run is done)
            old = _put_in_place(tmp, final, force, flag, made, marker)
            if old is not None:
                hold(old)  # (being deleted, not a killed run's leftover)
    except BaseException as exc:
        if old is not None and not (final.exists() or final.is_symlink()):
            old.rename(final)
        undo(exc)
        if not isinstance(exc, KeyboardInterrupt):
            send_on(held)  # (a Ctrl-C that came while the renames failed: the run ends on it)
        raise
    let_go(tmp)  # (the output, in place)
    if old is not None:
        try:
            _remove_replaced(old, final, flag, prog)
        except KeyboardInterrupt:
            # the new output is in place, the old one only half gone: said here, and the run ends as
            # interrupted (130/143, as for a signal during the renames: a `&&` chain stops)
            print(f"{prog}: warning: {flag} {final} was written, but deleting the output it replaced was "
                  f"interrupted; delete {old} by hand", file=sys.stderr)
            raise
        finally:
            let_go(old)
    # a Ctrl-C held during the renames cut nothing short: sent on now (the run ends as interrupted,
    # and committed() tells the command that its output is complete)
    send_on(held)


def _writer(final: Path, mine: Path | None = None) -> Path | None:
    """The temporary of a live run writing ``final`` (held: :func:`hold`) other than ``mine``; None
    when there is none. (A name cut short to fit beside ``final`` could be another output's: not
    looked at.)"""
    if _hidden_name(final.name, "tmp-00000000") != f".{final.name}.tmp-00000000":
        return None
    return next((o for _, o in _siblings(final, ("tmp",)) if o != mine and _live(o)), None)


def _busy(flag: str, final: Path, other: Path) -> SafeMergeError:
    return SafeMergeError(f"{flag} {final}: another run is writing it now (in {other}); wait for it to finish (then "
                          "pass --force to replace its output), or choose another path")


def _check_alone(final: Path, tmp: Path, flag: str) -> None:
    """Refuse to write ``final`` while another run holds a temporary for it (:func:`check_out` refused
    one already writing when this run started; this is for one that started since). Two runs that
    start writing at the same moment each see the other's: each lets go of its own and looks again
    once, after a random moment, so that one of them goes on."""
    for attempt in range(2):
        other = _writer(final, tmp)
        if other is None:
            return
        if attempt == 0:
            let_go(tmp)
            time.sleep(random.uniform(0.02, 0.2))
            hold(tmp)
    raise _busy(flag, final, other)


def _put_in_place(tmp: Path, final: Path, force: bool, flag: str, made: list[Path],
                  marker: str | None = None) -> Path | None:
    """Rename the finished ``tmp`` to ``final`` (moving an existing output aside first, with
    ``force``: with ``marker``, only an output or an empty folder), record it for :func:`committed`,
    and sync the renames; returns where the replaced output went, if any. Runs with interrupts held:
    a rename is not cut in half by Ctrl-C."""
    old = None
    try:
        if final.exists() or final.is_symlink():
            if not force:
                raise SafeMergeError(
                    f"{flag} {final} appeared while this run was writing; nothing was replaced: choose a new path "
                    "or pass --force"
                )
            aside = _sibling(final, "old")
            try:
                final.rename(aside)
                old = aside
            except FileNotFoundError:  # (another --force run moved it aside first: nothing to move)
                pass
            except OSError as exc:  # (a mount point, an immutable folder, a parent one cannot write)
                raise SafeMergeError(f"{flag} {final}: --force could not move the existing output aside "
                                     f"({exc.strerror or exc}); nothing was replaced: remove it yourself or choose "
                                     "another path") from None
            # (looked at once moved aside: what took the name while the run wrote, a folder of other
            # files or a file, is not deleted)
            if old is not None and marker is not None and not old.is_symlink():
                try:
                    other = not old.is_dir() or _holds_other_files(old, marker)
                except OSError:
                    other = True
                if other:  # (the except below puts it back)
                    why = f" (no {marker} in it)" if old.is_dir() else ""
                    raise SafeMergeError(f"{flag} {final} appeared while this run was writing and is no earlier "
                                         f"output{why}: --force would delete all of it, so nothing was replaced; "
                                         "remove it yourself or choose another path")
        try:
            tmp.rename(final)  # (fails, rather than replaces, if a non-empty out appeared meanwhile)
        except OSError as exc:
            if old is not None:
                try:
                    old.rename(final)
                except OSError:  # (another run's output took the place between the two renames)
                    raise SafeMergeError(
                        f"{flag} {final} was written by another run while this one replaced it; this run's output "
                        f"is not kept, and the output it moved aside is at {old}: delete it, or move it back"
                    ) from None
                old = None
            raise SafeMergeError(f"{flag} {final}: could not move the finished output into place ({exc}); "
                                 "nothing was replaced") from None
    except BaseException:
        if old is not None and not (final.exists() or final.is_symlink()):
            old.rename(final)
        raise
    _committed.add(os.path.abspath(final))
    # (the rename and the folders this run made on disk before the output it replaced is deleted)
    for folder in (final, *made):
        try:
            _fsync(folder.parent)
        except OSError:
            pass
    return old


def _remove_replaced(old: Path, final: Path, flag: str, prog: str = "safemerge") -> None:
    """Delete the output that --force replaced (moved aside to ``old``); say so if some of it stays."""
    failed: list[str] = []
    if old.is_symlink():
        old.unlink()
    elif mounted := mounts_under(old):  # (mounted since the check: its files are not the old output's to delete)
        failed.append(f"{mounted[0]} is mounted inside it")
    else:
        if sys.version_info >= (3, 12):
            shutil.rmtree(old, onexc=lambda _f, path, exc: failed.append(f"{path}: {exc}"))
        else:
            shutil.rmtree(old, onerror=lambda _f, path, info: failed.append(f"{path}: {info[1]}"))
    if failed:
        print(f"{prog}: warning: {flag} {final} was replaced, but the old output could not be removed from "
              f"{old} ({failed[0]}); delete it by hand", file=sys.stderr)
