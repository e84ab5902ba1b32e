"""The README's examples run and print what the README shows.

Each ``$ safemerge ...`` command of a console block runs (in a subprocess, from a folder whose
``demo/`` holds the ``make demo`` checkpoints) and must exit 0 with the block's output: line for
line, a ``...`` line standing for any number of lines; numbers may differ by 1.5e-4 (the last digit
of a cosine on another CPU's kernels), the ``time`` row and the backend's name by anything. The
``safemerge backends`` block is checked by its backends' names (the rest describes the machine it
ran on). The report section's JSON is the merge example's report; the bash block of the mergekit
section and the Python API block run too.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, re.M | re.S)


def console_examples() -> list[tuple[str, list[str]]]:
    """(command, output lines) for every ``$ `` command of the console blocks."""
    examples = []
    for block in _blocks("console"):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            assert lines[i].startswith("$ "), f"console block line {lines[i]!r} is not a command"
            cmd = lines[i][2:]
            while cmd.endswith("\\"):
                i += 1
                cmd = cmd[:-1] + lines[i].strip()
            i += 1
            out = []
            while i < len(lines) and not lines[i].startswith("$ "):
                out.append(lines[i])
                i += 1
            examples.append((cmd, out))
    return examples


EXAMPLES = console_examples()


def _number(token: str) -> float | None:
    try:
        return float(token.rstrip(","))
    except ValueError:
        return None


def line_matches(want: str, got: str) -> bool:
    if want.startswith(("time ", "backend ")):  # wall time, and the backend `auto` picks here
        return got.split()[:1] == want.split()[:1]
    w, g = want.split(), got.split()
    if len(w) != len(g):
        return False
    for a, b in zip(w, g):
        if a != b and (_number(a) is None or _number(b) is None or abs(_number(a) - _number(b)) > 1.5e-4):
            return False
    return True


def output_matches(want: list[str], got: list[str]) -> str | None:
    """None when ``got`` is ``want`` with each ``...`` line standing for any lines, else why not."""
    segments, seg = [], []
    for line in want:
        if line.strip() == "...":
            segments.append(seg)
            seg = []
        else:
            seg.append(line)
    segments.append(seg)
    pos = 0
    for k, seg in enumerate(segments):
        last = k == len(segments) - 1
        starts = [pos] if k == 0 else range(pos, len(got) - len(seg) + 1)
        for s in starts:
            if all(line_matches(w, g) for w, g in zip(seg, got[s:s + len(seg)])) and len(got[s:]) >= len(seg) \
                    and (not last or s + len(seg) == len(got)):
                pos = s + len(seg)
                break
        else:
            if k == 0:  # (fixed at the top: name the first line that differs)
                for w, g in zip(seg + [None], got + [None]):
                    if w is None or g is None or not line_matches(w, g):
                        return f"the README shows {w!r} where the output has {g!r}"
            return f"the README's lines {seg[0]!r} ... {seg[-1]!r} are not in the output after its line {pos}"
    return None


def test_the_readme_has_its_examples():
    """(so the tests below cannot pass by finding nothing)"""
    names = [shlex.split(cmd)[:2] for cmd, _ in EXAMPLES]
    assert names == [["safemerge", "score"], ["safemerge", "merge"], ["safemerge", "merge"], ["safemerge", "project"],
                     ["safemerge", "backends"]], names
    assert len(_blocks("python")) == 1 and any("safemerge-yaml" in b for b in _blocks("bash"))


def test_output_matching_can_fail():
    want = ["flagged                    9", "...", "wrote demo/merged (report: x)"]
    assert output_matches(want, ["flagged                    9", "a", "b", "wrote demo/merged (report: x)"]) is None
    assert output_matches(want, ["flagged                    10", "wrote demo/merged (report: x)"]) is not None
    assert output_matches(want, ["flagged 9", "wrote demo/merged (report: x)", "extra"]) is not None
    assert output_matches(["cosine  0.1684  yes"], ["cosine  0.1685  yes"]) is None
    assert output_matches(["cosine  0.1684  yes"], ["cosine  0.1688  yes"]) is not None


@pytest.fixture(scope="module")
def demo_dir(fx, tmp_path_factory):
    """A folder whose demo/ holds the `make demo` checkpoints (fx is the same build)."""
    root = tmp_path_factory.mktemp("readme")
    for name in ("aligned", "unaligned", "task", "safety"):
        shutil.copytree(fx.root / name, root / "demo" / name)
    return root


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # (stdout and stderr in the order a terminal shows)
    return subprocess.run(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          timeout=600)


def test_console_examples_print_what_the_readme_shows(demo_dir):
    for cmd, want in EXAMPLES:  # (in the README's order: later commands may read what earlier ones wrote)
        argv = shlex.split(cmd)
        proc = _run([sys.executable, "-m", "safemerge_ext", *argv[1:]], demo_dir)
        got = proc.stdout.splitlines()
        assert proc.returncode == 0, f"$ {cmd}\n{proc.stdout}"
        if argv[1] == "backends":
            assert [ln.split()[0] for ln in got] == [ln.split()[0] for ln in want], proc.stdout
            continue
        problem = output_matches(want, got)
        assert problem is None, f"$ {cmd}\n{problem}; the output:\n{proc.stdout}"


def json_matches(want, got, path: str = "report") -> str | None:
    """None when the README's JSON ``want`` is in ``got``: its keys (but "..."), its values (numbers to
    1.5e-4, timings any number, a string ending in "..." by its start, a list up to a "..." item)."""
    if isinstance(want, dict):
        for k, v in want.items():
            if k == "...":
                continue
            if not isinstance(got, dict) or k not in got:
                return f"{path}: no key {k!r}"
            problem = json_matches(v, got[k], f"{path}.{k}")
            if problem:
                return problem
        return None
    if isinstance(want, list):
        if not isinstance(got, list):
            return f"{path}: not a list"
        for i, v in enumerate(want):
            if v == "...":
                return None
            problem = json_matches(v, got[i], f"{path}[{i}]") if i < len(got) else f"{path}: no item {i}"
            if problem:
                return problem
        return None if len(got) == len(want) else f"{path}: {len(got)} items, the README shows {len(want)}"
    if isinstance(want, str) and want.endswith("..."):
        ok = isinstance(got, str) and got.startswith(want[:-3])
    elif isinstance(want, (int, float)) and not isinstance(want, bool):
        ok = isinstance(got, (int, float)) and (".timings." in path or abs(got - want) <= 1.5e-4)
    else:
        ok = got == want
    return None if ok else f"{path}: the README shows {want!r}, the report has {got!r}"


def test_report_example_is_what_the_merge_example_writes(demo_dir):
    """The report section's JSON against the report of the README's first `safemerge merge`
    (its settings: --threshold 0.2 into demo/merged)."""
    (block,) = [b for b in _blocks("json") if '"tool": "safemerge-ext"' in b]
    want = json.loads(block)
    cmd = next(c for c, _ in EXAMPLES if c.startswith("safemerge merge") and "--out demo/merged " in c + " ")
    proc = _run([sys.executable, "-m", "safemerge_ext", *shlex.split(cmd)[1:]], demo_dir)
    assert proc.returncode == 0, proc.stdout
    got = json.loads((demo_dir / "demo" / "merged" / "safemerge_report.json").read_text())
    want["version"] = got["version"]  # (the package's version, whatever it is now)
    problem = json_matches(want, got)
    assert problem is None, problem


def test_json_matching_can_fail():
    want = {"a": 1, "b": [{"c": "x..."}, "..."], "timings": {"t": 1.0}, "...": "..."}
    assert json_matches(want, {"a": 1, "b": [{"c": "xyz"}, 2, 3], "timings": {"t": 9.0}, "z": 0}) is None
    assert json_matches(want, {"a": 2, "b": [{"c": "xyz"}], "timings": {"t": 1.0}}) is not None
    assert json_matches(want, {"a": 1, "b": [{"c": "yz"}], "timings": {"t": 1.0}}) is not None
    assert json_matches(want, {"a": 1, "timings": {"t": 1.0}}) is not None


def test_python_api_example_runs(tmp_path):
    (code,) = _blocks("python")
    proc = _run([sys.executable, "-c", code], tmp_path)
    assert proc.returncode == 0, proc.stdout
    assert "torch.Size([64, 4])" in proc.stdout


@pytest.mark.skipif(not (BIN / "safemerge-yaml").exists() or not (BIN / "mergekit-yaml").exists(),
                    reason="the safemerge-yaml / mergekit-yaml console scripts are not installed")
def test_mergekit_examples_run(demo_dir):
    """The mergekit section's commands, with its recipe (recipes/tiny.yml names demo/ paths)."""
    (block,) = [b for b in _blocks("bash") if "safemerge-yaml recipes/tiny.yml" in b]
    shutil.copytree(ROOT / "recipes", demo_dir / "recipes", dirs_exist_ok=True)
    commands = [ln for ln in block.splitlines() if ln and not ln.startswith("#")]
    assert [c.split()[0] for c in commands] == ["safemerge-yaml", "mergekit-yaml"]
    for cmd in commands:
        argv = shlex.split(cmd, comments=True)
        proc = _run([str(BIN / argv[0]), *argv[1:]], demo_dir)
        assert proc.returncode == 0, f"$ {cmd}\n{proc.stdout[-4000:]}"
        out = demo_dir / argv[2]
        assert (out / "safemerge_report.json").is_file(), f"$ {cmd}: no report in {out}"
