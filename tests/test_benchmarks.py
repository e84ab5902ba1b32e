"""The benchmark scripts run end to end on tiny shapes (their figures come from real runs; these
tests only keep the scripts from rotting) and their rows hold what RESULTS.md quotes."""

from __future__ import annotations

import json
import math
import os
import shutil
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
    cpp = "cpp" in _cpu_backends()
    if cpp:
        from safemerge_ext import _cpu

        pick = _cpu.isa()
    assert bench_scoring.main(["--device", "cpu", "--shapes", "67x131,64x64", "--ranks", "1,5", "--reps", "1",
                               "--backends", _cpu_backends(), "--cpp-isas", "baseline,avx9", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    providers = {r["provider"] for r in rows}
    assert {"naive", "torch", "materialized"} <= providers
    if cpp:  # one more contender per ISA this CPU runs (an unknown one is skipped), the pick left as it was
        assert "cpp@baseline" in providers and "cpp@avx9" not in providers
        assert _cpu.isa() == pick
    assert {(r["shape"], r["r"]) for r in rows} == {(s, r) for s in ("67x131", "64x64") for r in (1, 5)}
    assert all(r["time_ms"] > 0 and r["floor_ms"] > 0 and r["x_floor"] > 0 and r["gbps"] > 0 for r in rows)
    assert all(r["pct_copy_bw"] is None and "copy_gbps" not in r for r in rows)  # a GPU figure
    # the ratios are the same run's times: to the floor, and the speed-ups over naive torch and materialized C
    def ratio_of(value, num, den):  # (times are rounded to 1 us, ratios to 2 decimals or 3 digits)
        lo, hi = (num - 5e-4) / (den + 5e-4), (num + 5e-4) / max(den - 5e-4, 1e-9)
        return lo * 0.995 - 0.005 <= value <= hi * 1.005 + 0.005

    for r in rows:
        same = {o["provider"]: o for o in rows if (o["shape"], o["r"]) == (r["shape"], r["r"])}
        assert ratio_of(r["x_floor"], r["time_ms"], r["floor_ms"]), r
        assert ratio_of(r["x_naive"], same["naive"]["time_ms"], r["time_ms"]), r
        assert ratio_of(r["x_materialized"], same["materialized"]["time_ms"], r["time_ms"]), r

    out = tmp_path / "f.json"
    assert bench_scoring.main(["--device", "cpu", "--fullrank", "--shapes", "48x96", "--reps", "1",
                               "--backends", _cpu_backends(), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {"naive-full", "torch"} <= {r["provider"] for r in rows}
    assert all(r["r"] == "full" and r["tflops"] > 0 and r["pct_bf16_mm"] is None for r in rows)


def test_bench_scoring_round_robin_warms_or_flushes_before_each_timed_call(monkeypatch):
    """Without a flush each timed call follows an untimed call of its own; with one (the last cache
    level would keep a small pair from the previous call: an H200's L2, a Xeon's L3) it follows
    the flush instead. On a CPU the flush reads twice the last-level cache."""
    import bench_scoring

    log: list[str] = []
    monkeypatch.setattr(bench_scoring, "once_timer", lambda device: lambda fn: (log.append("timed"), fn(), 1.0)[2])
    fns = {"a": lambda: log.append("a"), "b": lambda: log.append("b")}
    times = bench_scoring.round_robin(torch.device("cpu"), fns, 2)
    assert times == {"a": [1.0, 1.0], "b": [1.0, 1.0]}
    assert log == ["a", "timed", "a", "b", "timed", "b"] * 2
    log.clear()
    bench_scoring.round_robin(torch.device("cpu"), fns, 2, flush=lambda: log.append("flush"))
    assert log == ["flush", "timed", "a", "flush", "timed", "b"] * 2
    log.clear()  # (the matmul that measures the arithmetic rate is warmed by its own call, not flushed)
    bench_scoring.round_robin(torch.device("cpu"), fns, 2, flush=lambda: log.append("flush"), warm=("b",))
    assert log == ["flush", "timed", "a", "b", "timed", "b"] * 2
    flush = bench_scoring.cache_flusher(torch.device("cpu"))
    assert flush.__self__.numel() * 8 >= max(64 << 20, 2 * bench_scoring.last_level_cache_bytes())
    flush()


def test_bench_scoring_gpu_columns(tmp_path, monkeypatch, capsys):
    """The GPU-only branch (L2 flush, copy bandwidth, pct_copy_bw) run on the CPU with stand-ins,
    so that a slip there shows up here rather than in a GPU session's few minutes."""
    import bench_scoring

    flushes = []
    monkeypatch.setattr(bench_scoring, "cache_flusher", lambda device: lambda: flushes.append(1))
    monkeypatch.setattr(bench_scoring, "gpu_columns", lambda device: True)
    monkeypatch.setattr(bench_scoring, "copy_gbps", lambda device: 50.0)
    monkeypatch.setattr(bench_scoring, "datasheet", lambda device: (80.0, 2.0))
    out = tmp_path / "g.json"
    assert bench_scoring.main(["--device", "cpu", "--shapes", "64x96", "--ranks", "4", "--reps", "2",
                               "--backends", _cpu_backends(), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert flushes and all(r["copy_gbps"] == 50.0 for r in rows)
    assert all(r["pct_copy_bw"] == pytest.approx(100 * r["gbps"] / 50.0, abs=0.1) for r in rows)
    assert all(r["pct_hbm_peak"] == pytest.approx(100 * r["gbps"] / 80.0, abs=0.1) for r in rows)
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| shape"))
    assert "pct_copy_bw" in header and "pct_hbm_peak" in header and "pages" not in header
    out = tmp_path / "gf.json"
    assert bench_scoring.main(["--device", "cpu", "--fullrank", "--shapes", "48x96", "--reps", "1",
                               "--backends", _cpu_backends(), "--out", str(out)]) == 0
    full = json.loads(out.read_text())
    assert all(r["copy_gbps"] == 50.0 for r in full)
    assert all(r["pct_bf16_peak"] == pytest.approx(100 * r["tflops"] / 2.0, rel=0.02, abs=0.1) for r in full)


def test_bench_scoring_rejects_a_disagreeing_provider_and_saves_as_it_goes(tmp_path, monkeypatch, capsys):
    """A provider off naive torch is reported and left out of the timing; the others still run, and
    the JSON holds every row finished so far (a GPU session's run cut short keeps them)."""
    import bench_scoring
    from safemerge_ext import backends

    torch_impl = backends.resolve("torch", "cpu")[1]

    class Off:  # the torch backend off on the second shape only: T by 1%, full-rank sums by NaN
        @staticmethod
        def lowrank_passes(wa, wu, B):
            T, P, vsq = torch_impl.lowrank_passes(wa, wu, B)
            return (T * 1.01 if wa.shape[0] == 64 else T), P, vsq

        @staticmethod
        def fullrank_sums(wa, wu, dW):
            m2, n2, d2, vsq = torch_impl.fullrank_sums(wa, wu, dW)
            return m2, n2, d2, (float("nan") if wa.shape[0] == 64 else vsq)  # a NaN must not pass

    real = backends.resolve
    monkeypatch.setattr(backends, "resolve", lambda name, dev: ("torch", Off) if name == "torch" else real(name, dev))
    saved = []
    out = tmp_path / "s.json"

    def save(rows):
        saved.append(len(rows))
        out.write_text(json.dumps(rows))

    import argparse

    ns = argparse.Namespace(device="cpu", dtype="bf16", backends="torch", shapes="67x131,64x64", ranks="3", reps=1,
                            offset=0, huge_pages=False, materialized="never", fullrank=False)
    rows = bench_scoring.run(ns, save=save)
    assert saved == [2, 4] and json.loads(out.read_text()) == rows
    bad = [r for r in rows if "error" in r]
    assert [(r["provider"], r["shape"]) for r in bad] == [("torch", "64x64")]
    assert {(r["provider"], r["shape"]) for r in rows if "error" not in r} == {
        ("torch", "67x131"), ("naive", "67x131"), ("naive", "64x64")}
    assert "REJECTED torch at 64x64 r=3" in capsys.readouterr().out
    saved.clear()
    ns.fullrank = True
    rows = bench_scoring.run(ns, save=save)
    assert saved == [2, 4] and json.loads(out.read_text()) == rows
    assert [(r["provider"], r["shape"], r["r"]) for r in rows if "error" in r] == [("torch", "64x64", "full")]
    assert "REJECTED torch at 64x64 r=full" in capsys.readouterr().out


def test_bench_scoring_goes_on_past_a_provider_that_raises(tmp_path, monkeypatch, capsys):
    """A provider that raises on one shape (a Triton compile or resource error) is reported there;
    the other shapes and providers are still timed."""
    import argparse

    import bench_scoring
    from safemerge_ext import backends

    torch_impl = backends.resolve("torch", "cpu")[1]

    def boom(wa):
        if wa.shape[0] == 64:
            raise RuntimeError("out of resources: shared memory\nsecond line")

    class Boom:
        @staticmethod
        def lowrank_passes(wa, wu, B):
            boom(wa)
            return torch_impl.lowrank_passes(wa, wu, B)

        @staticmethod
        def fullrank_sums(wa, wu, dW):
            boom(wa)
            return torch_impl.fullrank_sums(wa, wu, dW)

    real = backends.resolve
    monkeypatch.setattr(backends, "resolve", lambda name, dev: ("torch", Boom) if name == "torch" else real(name, dev))
    for fullrank, r in ((False, 3), (True, "full")):
        ns = argparse.Namespace(device="cpu", dtype="bf16", backends="torch", shapes="64x64,67x131", ranks="3", reps=1,
                                offset=0, huge_pages=False, materialized="never", fullrank=fullrank)
        rows = bench_scoring.run(ns)
        assert [(x["provider"], x["shape"], x["error"]) for x in rows if "error" in x] == [
            ("torch", "64x64", "raised RuntimeError: out of resources: shared memory")]
        assert {(x["provider"], x["shape"]) for x in rows if "error" not in x} >= {("torch", "67x131")}
        assert f"FAILED torch at 64x64 r={r}: raised RuntimeError" in capsys.readouterr().out


def test_bench_scoring_agreement_needs_every_output_and_checks_the_baseline(monkeypatch):
    """A provider that skips an output (and so does less work) never agrees; the materialized-C
    baseline is checked against naive torch before it is timed."""
    import argparse

    import bench_scoring

    T, P, vsq = torch.randn(5, 3), torch.randn(7, 3), 2.0
    assert bench_scoring.rel_err((T, P, vsq), (T, P, vsq)) == 0.0
    assert bench_scoring.rel_err((T, P), (T, P, vsq)) == math.inf
    assert bench_scoring.rel_err((T,), (T, P, vsq)) == math.inf
    monkeypatch.setattr(bench_scoring, "materialized", lambda wa, wu, B: torch.zeros(1))
    ns = argparse.Namespace(device="cpu", dtype="bf16", backends="torch", shapes="64x64", ranks="3", reps=1,
                            offset=0, huge_pages=False, materialized="always", fullrank=False)
    with pytest.raises(SystemExit, match="materialized-C baseline disagrees"):
        bench_scoring.run(ns, save=lambda rows: None)


def test_bench_scoring_materialized_baseline_where_and_how_often(tmp_path, monkeypatch, capsys):
    """`auto` forms C at every shape on a GPU and on a CPU up to MATERIALIZED_LIMIT; `always` forms
    it above the limit too, with as many timed calls as fit in MATERIALIZED_BUDGET_MS after the
    checked one (at least 1), and the rows and the printed notes say how many."""
    import bench_scoring

    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # (a device object: no GPU needed)
    big, small = (14336, 4096), (4096, 4096)
    want = bench_scoring.want_materialized
    assert want("auto", gpu, *big) and want("auto", gpu, 11008, 4096)
    assert want("auto", cpu, *small) and not want("auto", cpu, *big)
    assert want("always", cpu, *big) and not want("never", gpu, *small)
    reps = bench_scoring.materialized_reps
    assert (reps(25_000.0, 7), reps(930.0, 7), reps(107.0, 7), reps(0.0, 3)) == (1, 2, 7, 3)

    def rows(mode):
        out = tmp_path / f"{mode}.json"
        assert bench_scoring.main(["--device", "cpu", "--shapes", "67x131", "--ranks", "3", "--reps", "3",
                                   "--backends", _cpu_backends(), "--materialized", mode, "--out", str(out)]) == 0
        return json.loads(out.read_text())

    monkeypatch.setattr(bench_scoring, "MATERIALIZED_LIMIT", 67 * 67 * 131 - 1)  # 67x131 is now "big"
    auto = rows("auto")
    assert "materialized" not in {r["provider"] for r in auto}
    assert all(r["x_materialized"] is None and r["materialized_reps"] is None for r in auto)
    assert all(r["materialized_note"].startswith("not run on the CPU") for r in auto)
    assert "- 67x131: not run on the CPU" in capsys.readouterr().out
    monkeypatch.setattr(bench_scoring, "MATERIALIZED_BUDGET_MS", 0.0)  # as a 25 s call: one timed call
    always = rows("always")
    assert "materialized" in {r["provider"] for r in always}
    assert all(r["x_materialized"] > 0 and r["materialized_reps"] == 1 for r in always)
    assert "median of 1 timed call after a checked one" in always[0]["materialized_note"]
    assert "- 67x131: C formed once per shape, at r=3: median of 1 timed call" in capsys.readouterr().out
    monkeypatch.setattr(bench_scoring, "MATERIALIZED_BUDGET_MS", 1e9)  # fast calls: --reps of them
    assert {r["materialized_reps"] for r in rows("always")} == {3}
    assert {r["materialized_note"] for r in rows("never")} == {"not run: --materialized never"}


def test_gpu_session_scoring_forms_c_at_every_shape():
    """The GPU session's scoring run asks for the materialized baseline at every default shape."""
    script = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    scoring = script[script.index("scoring() {"):script.index("\n}", script.index("scoring() {"))]
    assert "bench_scoring.py --device cuda --materialized always" in scoring and "--shapes" not in scoring


def test_bench_scoring_copy_bandwidth_is_read_plus_write(monkeypatch):
    import bench_scoring

    monkeypatch.setattr(bench_scoring, "once_timer", lambda device: lambda fn: (fn(), 2.0)[1])
    # 4 MiB copied in 2 ms: 8 MiB moved (read + write) -> 4.19 GB/s
    assert bench_scoring.copy_gbps(torch.device("cpu"), nbytes=4 << 20, reps=3) == pytest.approx(2 * (4 << 20) / 2e6)


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


_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(not _THP.exists() or "[never]" in _THP.read_text(), reason="no transparent huge pages here")
def test_bench_scoring_huge_pages_rows_say_what_the_kernel_gave(tmp_path, monkeypatch):
    """--huge-pages: each matrix starts on a 2 MiB boundary (plus --offset) in memory advised for
    huge pages, holding the same values as the plain pair; each row names the pages the kernel
    actually gave (it may decline), as /proc/self/smaps reports them."""
    import bench_scoring

    wa, wu = bench_scoring.setup(1024, 4096, torch.bfloat16, torch.device("cpu"))
    xa, xu = bench_scoring.setup(1024, 4096, torch.bfloat16, torch.device("cpu"), offset=16, huge_pages=True)
    assert xa.data_ptr() % (2 << 20) == 16 and xu.data_ptr() % (2 << 20) == 16
    assert torch.equal(xa, wa) and torch.equal(xu, wu)
    nbytes = xa.numel() * xa.element_size()
    for x in (xa, xu):
        assert bench_scoring.huge_page_share(x) == pytest.approx(min(1.0, _anon_huge_kb(x.data_ptr()) * 1024 / nbytes))

    def rows(*extra):
        out = tmp_path / "o.json"
        assert bench_scoring.main(["--device", "cpu", "--shapes", "67x131,512x1024", "--ranks", "5", "--reps", "1",
                                   "--materialized", "never", "--backends", _cpu_backends(), "--out", str(out),
                                   *extra]) == 0
        return json.loads(out.read_text())

    for r in rows("--huge-pages"):
        assert 0.0 <= r["huge_page_share"] <= 1.0 and r["pages"] == bench_scoring.page_label(r["huge_page_share"])
    if bench_scoring.thp_mode() == "madvise":
        assert {r["pages"] for r in rows()} == {"4KiB"}  # without the advice this kernel gives no huge pages: the rows must say so
        monkeypatch.setattr(bench_scoring, "_advise_huge_pages", lambda buf, start, nbytes: None)
        assert {(r["pages"], r["huge_page_share"]) for r in rows("--huge-pages")} == {("4KiB", 0.0)}
    assert bench_scoring.page_label(1.0) == "2MiB" and bench_scoring.page_label(0.5) == "mixed (50% 2MiB)"
    with pytest.raises(SystemExit):
        bench_scoring.main(["--device", "cuda", "--huge-pages"])


def test_bench_end_to_end_tiny(tmp_path):
    out, md = tmp_path / "e.json", tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\n## End to end: `benchmarks/bench_end_to_end.py`\n\n### an older run\n\nold\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_end_to_end.py"), "--shape", "tiny", "--data", str(tmp_path),
         "--skip", "mergekit", "reference", "--threshold", "0.7", "--json", str(out), "--results", str(md)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = md.read_text()  # the newest section first under the heading, with what makes it repeatable
    new = doc.index("\n### ", doc.index("## End to end"))
    assert new < doc.index("### an older run") and "--shape tiny" in doc[new:doc.index("### an older run")]
    assert "| safemerge-model |" in doc[new:doc.index("### an older run")]
    assert "--json" not in doc and "--results" not in doc and "\n\n| name |" in doc  # (a table needs its blank line)
    header = next(line for line in doc.splitlines() if line.startswith("| name |"))
    assert "| read_gb | gbps |" in header and "| peak_rss_mb | base_rss_mb | rss_over_base_mb |" in header
    assert "bare interpreter (`python -c pass`)" in doc and "not over the bare interpreter's" in doc
    data = json.loads(out.read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert "error" not in str(rows), rows
    assert {"floor", "copy-floor", "safemerge-model"} <= set(rows)
    ours = [r for n, r in rows.items() if n.startswith("safemerge")]
    # (tiny's cosines lie in 0.55-0.85: at the default 0.35 nothing is flagged and agreement says nothing)
    assert ours and all(0 < r["flagged"] < 8 and r["time_s"] > 0 and r["peak_rss_mb"] > 0 for r in ours), ours
    assert data["meta"]["threshold"] == 0.7
    # bytes read: ours read exactly the floor's tensors; the read_gb column is bytes_read in GB
    assert all(r["read_gb"] == r["bytes_read"] / 1e9 and r["gbps"] == pytest.approx(r["read_gb"] / r["time_s"])
               for r in rows.values())
    assert all(r["bytes_read"] == rows["floor"]["bytes_read"] for n, r in rows.items() if n.startswith("safemerge-adapter"))
    assert data["meta"]["device"] == "cpu" and data["meta"]["cache"] == "warm" and data["meta"]["flagged_agree"]
    assert len(data["meta"]["huge_folio_share"]) == 2 and data["meta"]["recache"] is False
    # every row's memory over its own baseline after imports (the floors import torch too)
    for name in ("floor", "copy-floor"):
        assert "base_rss_mb" in rows[name] and rows[name]["rss_over_base_mb"] < 100, rows[name]


def test_bench_end_to_end_measures_memory_without_proc(monkeypatch):
    """Off Linux (macOS, Windows) there is no /proc: the memory columns fall back to the peak
    getrusage gives, or NaN, and the benchmark runs rather than failing in every child."""
    import builtins
    import math

    import bench_end_to_end as bench

    real_open = builtins.open

    def no_proc(file, *args, **kwargs):
        if str(file).startswith("/proc/"):
            raise FileNotFoundError(2, "No such file or directory", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    assert math.isnan(bench.rss_mb()) and math.isnan(bench.base_rss_mb())
    assert bench.peak_mb() > 10  # (ru_maxrss: this interpreter, torch imported)
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout="", stderr=""))
    assert math.isnan(bench.interpreter_baseline()["rss_mb"])


def test_bench_end_to_end_uses_data_drawn_on_its_device(tmp_path, monkeypatch):
    """gpu_session.sh draws the data on the GPU (make_synthetic --device cuda) and then runs the
    benchmark with --device cuda: the benchmark asks for the draw of its own device, which is kept,
    not redrawn on the CPU (25 GiB at llama2-7b, past the session's time limit)."""
    import bench_end_to_end
    import make_synthetic

    asked = []

    def make(shape, root, **kw):
        asked.append(kw.get("device", "cpu"))
        raise SystemExit("stop here")

    monkeypatch.setattr(make_synthetic, "make", make)
    monkeypatch.setattr(bench_end_to_end, "_gpu_name", lambda: "a GPU")
    monkeypatch.setattr(sys, "argv", ["bench_end_to_end.py", "--shape", "tiny", "--data", str(tmp_path),
                                      "--device", "cuda"])
    with pytest.raises(SystemExit, match="stop here"):
        bench_end_to_end.main()
    assert asked == ["cuda"]


def test_peak_rss_counts_from_where_the_work_starts():
    """A contender's peak RSS counts from its base (after the imports and a GPU warm-up): a peak
    before that is not the work's (VmHWM is reset where the base is taken)."""
    import subprocess

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("no /proc/self/clear_refs here (not Linux, or a sandboxed kernel): the peak counts from the start")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import bench_end_to_end as b\n"
            "x = bytearray(300 << 20); x[::4096] = b'1' * len(x[::4096]); del x\n"
            "before = b.peak_mb(); base = b.base_rss_mb(); print(before - base, b.peak_mb() - base)")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT / "benchmarks")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    before, after = map(float, done.stdout.split())
    assert before > 250 and after < 50, (before, after)


def test_bench_end_to_end_rewarm_puts_evicted_files_back(tmp_path):
    """A warm run puts each contender's files back in the page cache before it starts."""
    import bench_end_to_end

    from safemerge_ext.io import pagecache

    files = []
    for sub in ("aligned", "unaligned", "task-qv", "safety-qv"):
        (tmp_path / sub).mkdir()
        f = tmp_path / sub / "model.safetensors"
        f.write_bytes(os.urandom(3 << 20))
        files.append(f)
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if pagecache.resident(fd, 0, f.stat().st_size) is not False:
                pytest.skip("this system cannot tell (or did not drop) what is in the page cache")
        finally:
            os.close(fd)
    bench_end_to_end.rewarm(tmp_path, "qv")
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            assert pagecache.resident(fd, 0, f.stat().st_size) is True, f
        finally:
            os.close(fd)


def test_bench_end_to_end_huge_folio_share_and_recache(tmp_path):
    """The probe says what share of the inputs the page cache holds in 2 MiB folios (None for a
    file not wholly cached, which it must not read in), and --recache drops and re-reads them."""
    import bench_end_to_end

    from safemerge_ext.io import pagecache
    from safemerge_ext.io.models import _sendfile

    files = []
    block = os.urandom(4096)
    for sub, size in (("aligned", 64 << 20), ("unaligned", 4096), ("task-qv", 4096), ("safety-qv", 4096)):
        (tmp_path / sub).mkdir()
        f = tmp_path / sub / "model.safetensors"
        with open(f, "wb") as out:  # written 4 KiB at a time: cached in small folios
            for _ in range(size // 4096):
                out.write(block)
        files.append(f)
    small = bench_end_to_end.huge_folio_share(files)
    if small is None:
        pytest.skip("this system cannot tell how the page cache holds a file")
    # a control, the same bytes in another file: out of the cache, the probe says None and reads
    # nothing in; read back here, it tells whether this kernel caches such a file in 2 MiB folios
    # at all (a file's first 16 MiB come in smaller ones, as the read-ahead grows)
    control = tmp_path / "control.bin"
    shutil.copyfile(files[0], control)
    fd = os.open(control, os.O_RDONLY)
    try:
        size = control.stat().st_size
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if pagecache.resident(fd, 0, size) is not False:
            pytest.skip("this system did not drop the file from the page cache")
        assert bench_end_to_end.huge_folio_share([control]) is None
        assert pagecache.resident(fd, 0, size) is False
        with open(os.devnull, "wb") as null:
            _sendfile(fd, null.fileno(), 0, size)
    finally:
        os.close(fd)
    expect = bench_end_to_end.huge_folio_share([control])
    bench_end_to_end.rewarm(tmp_path, "qv", again=True)  # (every input is cached: only `again` reads them)
    after = bench_end_to_end.huge_folio_share(files)
    assert after is not None and 0.0 <= after <= 1.0
    if not expect:
        pytest.skip("this kernel does not cache these files in 2 MiB folios")
    assert small == 0.0 < after  # (how much of it comes in 2 MiB folios varies from run to run)


def test_bench_end_to_end_recache_is_for_warm_runs():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_end_to_end.py"), "--cold", "--recache"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 2 and "--recache is for warm runs" in proc.stderr


def test_bench_end_to_end_reference_keeps_unflagged_layers_at_the_task_update(tmp_path, monkeypatch):
    """The reference pipeline as the official code does it: flagged layers get PEFT's linear
    combination, every other layer keeps dW_f = s_f B_f A_f exactly (the merged adapter's scaling is
    not the task adapter's, so B is rescaled when copied). It asks the Hub nothing."""
    import bench_end_to_end
    import peft.utils.save_and_load
    from make_synthetic import make
    from safetensors.torch import load_file

    def no_hub(*a, **k):
        raise AssertionError(f"the benchmark asked the Hub {a}")
    monkeypatch.setattr(peft.utils.save_and_load, "check_file_exists_on_hf_hub", no_hub)

    data = make("tiny", tmp_path)
    res = bench_end_to_end.run_reference(data, "qv", tmp_path / "ref", threshold=0.7)
    cfg = json.loads((tmp_path / "ref" / "merged" / "adapter_config.json").read_text())
    merged = load_file(tmp_path / "ref" / "merged" / "adapter_model.safetensors")
    task = load_file(data / "task-qv" / "adapter_model.safetensors")
    tcfg = json.loads((data / "task-qv" / "adapter_config.json").read_text())
    s_task, s_merged = tcfg["lora_alpha"] / tcfg["r"], cfg["lora_alpha"] / cfg["r"]
    assert s_task != s_merged  # (else the check below could not fail)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in task})
    same = [m for m in modules
            if torch.allclose(s_merged * merged[f"{m}.lora_B.weight"].double() @ merged[f"{m}.lora_A.weight"].double(),
                              s_task * task[f"{m}.lora_B.weight"].double() @ task[f"{m}.lora_A.weight"].double(),
                              rtol=1e-5, atol=1e-9)]
    assert len(same) == len(modules) - res["flagged"] and 0 < res["flagged"] < len(modules), (len(same), res)


def test_bench_end_to_end_a_contender_past_its_timeout_is_an_error_row(tmp_path):
    """One contender past --timeout no longer ends the benchmark without a table or JSON."""
    out = tmp_path / "e.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_end_to_end.py"), "--shape", "tiny", "--data", str(tmp_path),
         "--skip", "mergekit", "reference", "safemerge-model", "copy-floor", "--timeout", "0.05", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["error"] == "stopped after --timeout 0.05 s" for r in rows), rows


def test_make_synthetic_checks_free_disk_before_writing(tmp_path, monkeypatch):
    """A shape that does not fit the free disk is refused before a byte is written."""
    import shutil as sh
    from collections import namedtuple

    import make_synthetic

    usage = namedtuple("usage", "total used free")
    need = make_synthetic.needed_bytes(make_synthetic.SHAPES["llama2-7b"])
    assert need > 20 * 2**30  # (bf16 aligned + unaligned, and the adapters)
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(2**40, 2**40 - 2**30, 2**30))
    with pytest.raises(SystemExit, match=rf"llama2-7b needs {need / 2**30:.1f} GiB but .* has 1.0 GiB free"):
        make_synthetic.make("llama2-7b", tmp_path)
    assert not any(tmp_path.rglob("*.safetensors"))
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(2**40, 0, int(need * 1.06)))
    monkeypatch.setattr(make_synthetic, "write_model", lambda a, out, *r, **k: out.mkdir(parents=True))  # (it fits)
    monkeypatch.setattr(make_synthetic, "write_adapters", lambda *a, **k: None)
    make_synthetic.make("llama2-7b", tmp_path)


def test_make_synthetic_redraws_data_of_another_seed(tmp_path, capsys):
    """A finished draw is reused only for the same seed and device; another one is redrawn (the
    old copy removed before the free-disk check, so its space counts as free)."""
    from make_synthetic import make
    from safetensors.torch import load_file

    def weights(folder):
        return {k: v for f in sorted((folder / "aligned").glob("*.safetensors")) for k, v in load_file(f).items()}

    first = weights(make("tiny", tmp_path))
    make("tiny", tmp_path)
    assert "already there" in capsys.readouterr().out
    other = weights(make("tiny", tmp_path, seed=1))
    assert "drawn with another seed or device (ok seed=0 device=cpu); redrawing" in capsys.readouterr().out
    assert first.keys() == other.keys() and any(not torch.equal(first[k], other[k]) for k in first)
    assert (tmp_path / "tiny" / ".complete").read_text() == "ok seed=1 device=cpu\n"
    (tmp_path / "tiny" / ".complete").write_text("ok\n")  # (a draw from before the stamp: seed 0 on the CPU)
    make("tiny", tmp_path)
    assert "already there" in capsys.readouterr().out
    make("tiny", tmp_path, seed=1)
    assert "redrawing" in capsys.readouterr().out


def test_make_synthetic_bf16_adapters_merge(tmp_path, capsys):
    """--adapter-dtype bfloat16 writes the same draw rounded to bf16 (fp32, PEFT's default save,
    stays the default); asking a complete draw for the other dtype rewrites only the adapters, and
    `safemerge merge` runs on bf16 adapters, giving the fp32 adapters' cosines to bf16's rounding."""
    from make_synthetic import make
    from safetensors.torch import load_file

    from safemerge_ext.cli import main as cli

    data = make("tiny", tmp_path)
    fp32 = {ad: load_file(data / ad / "adapter_model.safetensors") for ad in ("task-qv", "safety-all")}
    assert {v.dtype for sd in fp32.values() for v in sd.values()} == {torch.float32}
    shard = next((data / "aligned").glob("*.safetensors"))
    stamp = shard.stat().st_mtime_ns

    def merge(name):
        out = tmp_path / name
        assert cli(["merge", "--aligned", str(data / "aligned"), "--unaligned", str(data / "unaligned"),
                    "--task-adapter", str(data / "task-qv"), "--safety-adapter", str(data / "safety-qv"),
                    "--out", str(out), "--threshold", "0.7", "--no-progress", "--no-plot"]) == 0
        report = json.loads((out / "safemerge_report.json").read_text())
        merged = load_file(out / "adapter_model.safetensors")
        assert all(torch.isfinite(v.float()).all() for v in merged.values())
        return {row["module"]: row["cosine"] for row in report["layers"]}, merged

    cos32, _ = merge("m32")
    capsys.readouterr()
    make("tiny", tmp_path, adapter_dtype="bfloat16")
    assert "rewriting the adapters in bfloat16 (they were float32)" in capsys.readouterr().out
    assert shard.stat().st_mtime_ns == stamp  # (the models are not redrawn)
    for ad, sd in fp32.items():
        bf = load_file(data / ad / "adapter_model.safetensors")
        assert bf.keys() == sd.keys() and all(torch.equal(bf[k], sd[k].to(torch.bfloat16)) for k in sd)
    cos16, merged = merge("m16")
    assert cos16.keys() == cos32.keys() and len(cos16) == 8
    assert max(abs(cos16[m] - cos32[m]) for m in cos16) < 2e-3  # bf16 rounds each factor by <= 2^-9
    assert merged and all(v.dtype in (torch.bfloat16, torch.float32) for v in merged.values())
    make("tiny", tmp_path, adapter_dtype="bfloat16")
    assert "already there" in capsys.readouterr().out
    with pytest.raises(ValueError, match="adapter_dtype must be one of float32, bfloat16"):
        make("tiny", tmp_path, adapter_dtype="float16")


def test_gpu_smoke_passes_right_kernels_and_names_wrong_ones(monkeypatch, capsys):
    """gpu_smoke.py (run before the GPU tests) checks the CUDA entry points against float64: with
    the C++ backend standing in for the extension it passes; an entry point that is off by 1e-3,
    or that raises, is named on a WARNING line and fails the run; no extension is a warning only."""
    import gpu_smoke

    from safemerge_ext import cpp_backend

    if cpp_backend.unavailable_reason():
        pytest.skip(f"the C++ backend stands in for the CUDA one: {cpp_backend.unavailable_reason()}")
    cb = gpu_smoke.cb
    monkeypatch.setattr(cb, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cb, "lowrank_passes", cpp_backend.lowrank_passes)
    monkeypatch.setattr(cb, "fullrank_sums", cpp_backend.fullrank_sums)
    monkeypatch.setattr(cb, "project_full", cpp_backend.project_full)
    assert gpu_smoke.main("cpu") == 0
    out = capsys.readouterr().out
    assert all(f"smoke {n}: relative errors" in out for n in ("lowrank_passes", "fullrank_sums", "project_full"))
    assert "WARNING" not in out

    monkeypatch.setattr(cb, "fullrank_sums", lambda *a: tuple(x * (1 + 1e-3) for x in cpp_backend.fullrank_sums(*a)))
    monkeypatch.setattr(cb, "lowrank_passes", lambda *a: (_ for _ in ()).throw(RuntimeError("an illegal memory access")))
    assert gpu_smoke.main("cpu") == 1
    out = capsys.readouterr().out
    assert "WARNING: smoke lowrank_passes: RuntimeError: an illegal memory access" in out
    assert "WARNING: smoke fullrank_sums: relative errors" in out

    monkeypatch.setattr(cb, "unavailable_reason", lambda: "the CUDA extension was not built")
    assert gpu_smoke.main("cpu") == 0
    assert "WARNING: no CUDA extension to run" in capsys.readouterr().out


def test_gpu_smoke_runs_the_pipeline_against_the_cpu_run(monkeypatch, capsys):
    """gpu_smoke.py's pipeline check (project on a tiny model, against the CPU run), here with the
    torch backend in the GPU run's place: it passes, and a backend whose scores are off fails it."""
    import dataclasses

    import gpu_smoke

    from safemerge_ext import ops

    assert gpu_smoke.pipeline_smoke("torch", device="cpu") == 0
    out = capsys.readouterr().out
    assert "smoke pipeline --device cpu --backend torch (torch): cosines within" in out and "WARNING" not in out
    plain = ops.subspace_score

    def off(*args, backend="auto", **kw):
        s = plain(*args, backend=backend, **kw)
        return s if backend != "torch" else dataclasses.replace(s, cosine=s.cosine * 1.01)

    monkeypatch.setattr(ops, "subspace_score", off)
    assert gpu_smoke.pipeline_smoke("torch", device="cpu") == 1
    assert "WARNING: smoke pipeline --device cpu --backend torch" in capsys.readouterr().out


def _gpu_session_calls() -> list[tuple[str, list[str]]]:
    """(script, its arguments) for every benchmark script gpu_session.sh runs, with the shell's
    continuations joined, ``${VAR-default}``/``${VAR:-default}`` at their defaults and ``$out`` a path."""
    import re
    import shlex

    text = (ROOT / "benchmarks" / "gpu_session.sh").read_text().replace("\\\n", " ")
    text = re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", text).replace("$out", "/tmp/gpu-out")
    calls = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for m in re.finditer(r"benchmarks/(\w+)\.py((?:\s+(?!2>&1|\||&&|;)[^\s|;&]+)*)", line):
            calls.append((m.group(1), shlex.split(m.group(2))))
    return calls


def test_gpu_session_calls_parse(monkeypatch):
    """Every benchmark call in gpu_session.sh parses with its script's own options (a GPU is lent
    rarely and briefly: a renamed flag must not be found there)."""
    import argparse
    import importlib

    calls = _gpu_session_calls()
    assert {s for s, _ in calls} == {"gpu_smoke", "bench_scoring", "make_synthetic", "bench_end_to_end"}, calls

    class Parsed(Exception):
        pass

    real = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    for script, args in calls:
        if script == "gpu_smoke":  # (no options)
            assert args == []
            continue
        module = importlib.import_module(script)
        monkeypatch.setattr(sys, "argv", [f"{script}.py", *args])
        with pytest.raises(Parsed) as parsed:
            module.main()
        assert parsed.value.args[0].device == "cuda", (script, args)


def test_gpu_session_tests_exist():
    """The test files gpu_session.sh runs on the GPU exist, and each name its -k leaves out is a test."""
    import re

    text = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    files = re.findall(r"tests/\w+\.py", text)
    assert len(files) >= 4 and all((ROOT / f).is_file() for f in files), files
    names = re.findall(r"not (\w+)", re.search(r'skip="([^"]+)"', text[text.index("tests() {"):]).group(1))
    sources = "".join((ROOT / f).read_text() for f in files)
    assert names and all(re.search(rf"def test_\w*{n}\w*\(", sources) for n in names), names
