"""Bounded memory: the adapter pipeline's peak RSS does not grow with the number of layers or the
adapters' size, and `safemerge --help` / the adapter pipeline do not import heavy libraries they
do not need."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

PEAK = """
import json, sys
from safemerge_ext.cli import main
code = main(sys.argv[1:])
hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
heavy = sorted(m for m in ('transformers', 'mergekit', 'triton', 'peft', 'matplotlib.pyplot') if m in sys.modules)
print(json.dumps({"code": code, "hwm_kb": int(hwm), "heavy": heavy}))
"""


def run_merge(data: Path, out: Path, *extra: str, adapters: str = "qv") -> dict:
    argv = ["merge", "--aligned", str(data / "aligned"), "--unaligned", str(data / "unaligned"),
            "--task-adapter", str(data / f"task-{adapters}"), "--safety-adapter", str(data / f"safety-{adapters}"),
            "--out", str(out), "--threshold", "0.5", "--no-progress", *extra]
    proc = subprocess.run([sys.executable, "-c", PEAK, *argv], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def drop_from_page_cache(folder: Path) -> None:
    """Write back and drop the folder's files from the page cache, so the next run reads them
    with the read-ahead thread (a run that finds every pair cached maps them in turn)."""
    for path in folder.rglob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_rss_independent_of_depth(tmp_path):
    from make_synthetic import Arch, make, numel, tensors

    runs, cold = {}, {}
    for layers in (2, 16):
        arch = Arch(1024, 2752, layers, 16, 4, 512, False, 16 * 2**20)
        data = make(arch, tmp_path, name=f"l{layers}")
        runs[layers] = run_merge(data, tmp_path / f"out{layers}")
        drop_from_page_cache(data)
        cold[layers] = run_merge(data, tmp_path / f"cold{layers}")
        largest = max(numel(s) for _, s in tensors(arch)) * 4  # one fp32 copy of the largest tensor
    for name, by_depth in (("cached", runs), ("read-ahead", cold)):
        grow = (by_depth[16]["hwm_kb"] - by_depth[2]["hwm_kb"]) * 1024
        assert grow < 4 * largest, f"{name}: peak RSS grew by {grow / 2**20:.1f} MiB from 2 to 16 layers"
    # model output streams one tensor at a time too
    model_runs = {n: run_merge(tmp_path / f"l{n}", tmp_path / f"model{n}", "--output", "model") for n in (2, 16)}
    grow = (model_runs[16]["hwm_kb"] - model_runs[2]["hwm_kb"]) * 1024
    assert grow < 4 * largest, f"model output: peak RSS grew by {grow / 2**20:.1f} MiB from 2 to 16 layers"
    # the linear adapter pipeline needs none of transformers, mergekit, triton, peft
    assert runs[16]["heavy"] in ([], ["matplotlib.pyplot"]), runs[16]["heavy"]
    # Peak RSS does not grow with the adapters' size either: r=256 q/v adapters (52 MiB each in
    # fp32) are read a module at a time, scored, merged (rank 512 where flagged) and written a
    # module at a time
    from make_synthetic import write_adapter

    data, wide = tmp_path / "l16", 256
    write_adapter(arch, data / "task-wide", ("q_proj", "v_proj"), wide, 2 * wide, 1)
    write_adapter(arch, data / "safety-wide", ("q_proj", "v_proj"), wide, 2 * wide, 2)
    adapter_bytes = (data / "task-wide" / "adapter_model.safetensors").stat().st_size
    wide_run = run_merge(data, tmp_path / "wide", adapters="wide")
    grow = (wide_run["hwm_kb"] - runs[16]["hwm_kb"]) * 1024
    assert adapter_bytes > 48 * 2**20
    # a module's passes, float64 remainder and merged factors take several 1-2 MiB temporaries
    # (measured: +22 MiB); holding the two adapters would take twice adapter_bytes on top
    assert grow < adapter_bytes, (
        f"r=256 adapters raised peak RSS by {grow / 2**20:.1f} MiB over r=8; each adapter is {adapter_bytes / 2**20:.0f} MiB"
    )


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_model_output_never_holds_an_unchanged_tensor(tmp_path):
    """--output model copies the tensors it does not patch file to file inside the kernel: a
    model whose embedding and head are 64 MiB each peaks no higher than the adapter output of the
    same merge plus a fraction of one of them. (Peak RSS counts code pages too: from a freshly
    installed torch, held in 2 MiB page-cache folios, the write path's code alone measured 16 MiB
    more than the adapter output's, with the anonymous memory of both runs equal, so a 32 MiB
    table left too little room.)"""
    from make_synthetic import Arch, make

    arch = Arch(256, 688, 2, 8, 2, 131072, False, 1 << 30)
    data = make(arch, tmp_path, name="wide-vocab")
    big = arch.vocab * arch.hidden * 2
    adapter = run_merge(data, tmp_path / "adapter")
    model = run_merge(data, tmp_path / "model", "--output", "model")
    grow = (model["hwm_kb"] - adapter["hwm_kb"]) * 1024
    print(f"model over adapter output: {grow / 2**20:.1f} MiB")
    assert grow < big / 2, f"--output model peaked {grow / 2**20:.1f} MiB above adapter output; the embedding is {big / 2**20:.0f} MiB"


def test_help_answers_without_torch():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "safemerge_ext", "--help"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and "merge" in proc.stdout
    imported = {ln.split("|")[-1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")}
    assert "torch" not in imported, "safemerge --help imported torch"
