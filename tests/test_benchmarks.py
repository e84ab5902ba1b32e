"""The benchmark scripts run end to end on tiny shapes (their figures come from real runs; these
tests only keep the scripts from rotting) and their rows hold what RESULTS.md quotes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _cpu_backends() -> str:
    from safemerge_ext.backends import available_backends

    return ",".join(n for n in ("cpp", "torch") if available_backends()[n] is None)


def test_bench_scoring_lowrank_and_fullrank(tmp_path):
    import bench_scoring

    out = tmp_path / "s.json"
    assert bench_scoring.main(["--device", "cpu", "--shapes", "67x131,64x64", "--ranks", "1,5", "--reps", "1",
                               "--backends", _cpu_backends(), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    providers = {r["provider"] for r in rows}
    assert {"naive", "torch", "materialized"} <= providers
    assert {(r["shape"], r["r"]) for r in rows} == {(s, r) for s in ("67x131", "64x64") for r in (1, 5)}
    assert all(r["time_ms"] > 0 and r["floor_ms"] > 0 and r["x_floor"] > 0 for r in rows)

    out = tmp_path / "f.json"
    assert bench_scoring.main(["--device", "cpu", "--fullrank", "--shapes", "48x96", "--reps", "1",
                               "--backends", _cpu_backends(), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {"naive-full", "torch"} <= {r["provider"] for r in rows}
    assert all(r["r"] == "full" and r["tflops"] > 0 and r["pct_bf16_mm"] is None for r in rows)


def test_bench_scoring_offset_places_weights_off_the_cache_line(tmp_path):
    """--offset N: both matrices start N bytes past a 64-byte boundary (as in-place reads of a
    safetensors file do) and hold the same values as the aligned pair."""
    import bench_scoring

    wa, wu = bench_scoring.setup(67, 131, torch.bfloat16, torch.device("cpu"))
    xa, xu = bench_scoring.setup(67, 131, torch.bfloat16, torch.device("cpu"), offset=16)
    assert xa.is_contiguous() and xa.data_ptr() % 64 == 16 and xu.data_ptr() % 64 == 16
    assert torch.equal(xa, wa) and torch.equal(xu, wu)
    out = tmp_path / "o.json"
    assert bench_scoring.main(["--device", "cpu", "--shapes", "67x131", "--ranks", "5", "--reps", "1", "--offset", "16",
                               "--materialized", "never", "--backends", _cpu_backends(), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert rows and all(r["offset_bytes"] == 16 and r["time_ms"] > 0 for r in rows)


def _anon_huge_kb(addr: int) -> int:
    """AnonHugePages of the mapping that holds ``addr`` in this process."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            if lo <= addr < hi:
                for field in lines[i + 1:]:
                    if field.startswith("AnonHugePages:"):
                        return int(field.split()[1])
    raise AssertionError(f"no mapping holds {addr:#x}")


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists(), reason="no THP here")
def test_bench_scoring_huge_pages_back_the_weights(tmp_path):
    """--huge-pages: each matrix starts on a 2 MiB boundary (plus --offset) in transparent huge
    pages, holding the same values as the plain pair."""
    import bench_scoring

    if "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
        pytest.skip("transparent huge pages are switched off on this machine")
    wa, wu = bench_scoring.setup(1024, 4096, torch.bfloat16, torch.device("cpu"))
    xa, xu = bench_scoring.setup(1024, 4096, torch.bfloat16, torch.device("cpu"), offset=16, huge_pages=True)
    assert xa.data_ptr() % (2 << 20) == 16 and xu.data_ptr() % (2 << 20) == 16
    assert torch.equal(xa, wa) and torch.equal(xu, wu)
    assert _anon_huge_kb(xa.data_ptr()) >= 2048 and _anon_huge_kb(xu.data_ptr()) >= 2048
    out = tmp_path / "o.json"
    assert bench_scoring.main(["--device", "cpu", "--shapes", "67x131", "--ranks", "5", "--reps", "1", "--huge-pages",
                               "--materialized", "never", "--backends", _cpu_backends(), "--out", str(out)]) == 0
    assert all(r["pages"] == "2MiB" for r in json.loads(out.read_text()))


def test_bench_end_to_end_tiny(tmp_path):
    out = tmp_path / "e.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_end_to_end.py"), "--shape", "tiny", "--data", str(tmp_path),
         "--skip", "mergekit", "reference", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert "error" not in str(rows), rows
    assert {"floor", "copy-floor", "safemerge-model"} <= set(rows)
    ours = [r for n, r in rows.items() if n.startswith("safemerge-adapter")]
    assert ours and all(r["flagged"] >= 0 and r["time_s"] > 0 and r["peak_rss_mb"] > 0 for r in ours)
    assert data["meta"]["device"] == "cpu" and data["meta"]["cache"] == "warm"
