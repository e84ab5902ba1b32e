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
import json, os, sys
from safemerge_ext.cli import main
if os.environ.get("KEEP_PAIRS"):  # a regression, for the test of the test: hold a copy of every pair scored
    from safemerge_ext import ops
    kept, score = [], ops.subspace_score
    def keeping(wa, wu, **kw):
        kept.append((wa.clone(), wu.clone()) if os.environ["KEEP_PAIRS"] == "both" else wa.clone())
        return score(wa, wu, **kw)
    ops.subspace_score = keeping
code = main(sys.argv[1:])
hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
heavy = sorted(m for m in ('transformers', 'mergekit', 'triton', 'peft', 'matplotlib.pyplot') if m in sys.modules)
print(json.dumps({"code": code, "hwm_kb": int(hwm), "heavy": heavy}))
"""


def run_merge(data: Path, out: Path, *extra: str, adapters: str = "qv", keep: str = "") -> dict:
    argv = ["merge", "--aligned", str(data / "aligned"), "--unaligned", str(data / "unaligned"),
            "--task-adapter", str(data / f"task-{adapters}"), "--safety-adapter", str(data / f"safety-{adapters}"),
            "--out", str(out), "--threshold", "0.5", "--no-progress", *extra]
    proc = subprocess.run([sys.executable, "-c", PEAK, *argv], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "KEEP_PAIRS": keep})
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


# Fixed slack on top of the tensor-sized allowances below, for what a deeper run holds that is
# not a tensor (a record per layer, the allocator's arenas, pages of code first run at some
# depth). Measured on the model below, 2 -> 16 layers (2026-12-04, 14 runs each): adapter output
# +0.5 to +1.8 MiB, cached and read-ahead alike. Model output +2 to +11 MiB, in steps: the 2-layer
# run peaks at 268 or 271-275 MiB from run to run, the 16-layer one at 278-280; 8 layers peak as
# 2 do and 32 layers at 275-283, so the steps are the allocator's (the row blocks of PATCH_BYTES
# the writer forms, the NaN scan's thread), not depth; the model allowance takes four such blocks.
SLACK = 4 << 20


def depth_allowance(arch, data: Path, adapters: str = "qv") -> tuple[int, int, int]:
    """(pair, allowance for adapter output, allowance for model output), in bytes, from what the
    run reads: ``pair``, the largest aligned + unaligned weight pair of the adapted modules (q_proj
    here) in the stored dtype (bf16). The read-ahead holds two pairs beyond the one being scored at
    any depth, so depth should add none: two pairs of room for when the shallow run's read-ahead
    finished early or a pair's pages were dropped late, plus SLACK. Model output also holds the
    adapters' factors for the write (their files' size) and forms the patched weights in blocks
    of rows of PATCH_BYTES (four of them)."""
    from make_synthetic import numel, tensors

    from safemerge_ext.io.model_writer import PATCH_BYTES

    shapes = dict(tensors(arch))
    pair = max(2 * numel(shapes[f"model.layers.0.self_attn.{m}.weight"]) * 2 for m in ("q_proj", "v_proj"))
    ad_bytes = sum((data / f"{k}-{adapters}" / "adapter_model.safetensors").stat().st_size for k in ("task", "safety"))
    return pair, 2 * pair + SLACK, 2 * pair + ad_bytes + 4 * PATCH_BYTES + SLACK


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
    pair, allowed, allowed_model = depth_allowance(arch, tmp_path / "l16")
    # what the allowance must catch: 14 more layers' q/v weights of one model kept (35 MiB), let
    # alone both models' (70 MiB); the fp32 size of the largest tensor (an MLP weight this run
    # never reads), the allowance until 2026-12-04, was 4 x 11 MiB and let the first pass
    shapes = dict(tensors(arch))
    one_model = 14 * sum(numel(shapes[f"model.layers.0.self_attn.{m}.weight"]) * 2 for m in ("q_proj", "v_proj"))
    assert allowed_model < one_model, (allowed_model, one_model)
    for name, by_depth in (("cached", runs), ("read-ahead", cold)):
        grow = (by_depth[16]["hwm_kb"] - by_depth[2]["hwm_kb"]) * 1024
        print(f"{name}: peak RSS +{grow / 2**20:.1f} MiB from 2 to 16 layers (allowed {allowed / 2**20:.1f})")
        assert grow < allowed, (f"{name}: peak RSS grew by {grow / 2**20:.1f} MiB from 2 to 16 layers, over "
                                f"{allowed / 2**20:.1f} MiB (two {pair / 2**20:.0f} MiB weight pairs + slack)")
    # the allowance is not too loose to notice: the same run holding a copy of every aligned
    # weight it scores (one model's q/v, the regression above) goes over it
    kept = run_merge(tmp_path / "l16", tmp_path / "kept16", keep="aligned")
    grow = (kept["hwm_kb"] - runs[2]["hwm_kb"]) * 1024
    print(f"holding every aligned q/v weight: peak RSS +{grow / 2**20:.1f} MiB from 2 to 16 layers")
    assert grow > allowed_model, f"holding every aligned q/v weight raised peak RSS by only {grow / 2**20:.1f} MiB"
    # model output streams one tensor at a time too
    model_runs = {n: run_merge(tmp_path / f"l{n}", tmp_path / f"model{n}", "--output", "model") for n in (2, 16)}
    grow = (model_runs[16]["hwm_kb"] - model_runs[2]["hwm_kb"]) * 1024
    print(f"model output: peak RSS +{grow / 2**20:.1f} MiB from 2 to 16 layers (allowed {allowed_model / 2**20:.1f})")
    assert grow < allowed_model, (f"model output: peak RSS grew by {grow / 2**20:.1f} MiB from 2 to 16 layers, over "
                                  f"{allowed_model / 2**20:.1f} MiB (two weight pairs, the adapters, row blocks, slack)")
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


FULLRANK_PEAK = """
import sys, torch
seed, op, backend, d_out, d_in, m_bytes = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:])
if backend == "cpp":
    from safemerge_ext import cpp_backend as cb
    if cb._cpu is None:
        print("skip"); sys.exit(0)
else:
    from safemerge_ext import reference as cb
g = torch.Generator().manual_seed(int(seed))
wa = torch.randn(d_out, d_in, generator=g).bfloat16()
wu = (wa.float() + 0.01 * torch.randn(d_out, d_in, generator=g)).bfloat16()
dW = (0.01 * torch.randn(d_out, d_in, generator=g)).bfloat16()
cb.fullrank_sums(wa[:256, :512], wu[:256, :512], dW[:256, :512])  # (BLAS and OpenMP set up)
cb._M_BYTES = m_bytes  # (M_J: the blocks and BLAS's buffers are small beside it)
def rss(key):
    return int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith(key))) * 1024
open('/proc/self/clear_refs', 'w').write('5')  # (VmHWM from here)
before = rss('VmRSS')
getattr(cb, op)(wa, wu, dW)
print(rss('VmHWM') - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize("op", ["fullrank_sums", "project_full"])
@pytest.mark.parametrize("backend, d_out, d_in, m_bytes, slack", [("cpp", 1024, 8192, 128 << 20, 128 << 20),
                                                                   ("torch", 16384, 1024, 4 << 20, 64 << 20)])
def test_cpu_fullrank_path_holds_one_column_block_and_a_few_rows(op, backend, d_out, d_in, m_bytes, slack):
    """The full-rank path (C++ and torch backends) forms M_J = V^T dW[:, J] (128 MiB for the
    C++ case) one column block at a time, plus row blocks of V, dW and V M_J, BLAS's buffers and
    what the allocator keeps of freed blocks (60-90 MiB for the C++ case, allowed 128; 18 MiB for the
    torch case, allowed 64); its float64
    sums took a float64 copy of M_J and its square (peaking at 5x M_J), and the next block was
    allocated while the caller still held the last. The torch backend formed V whole in fp32 and
    two fp32 copies of the weights on the way (192 MiB for the torch case; review187)."""
    res = subprocess.run([sys.executable, "-c", FULLRANK_PEAK, "7", op, backend, str(d_out), str(d_in), str(m_bytes)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if res.returncode != 0 and "clear_refs" in res.stderr:
        pytest.skip(f"cannot reset the peak RSS here: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, res.stderr[-2000:]
    if res.stdout.strip() == "skip":
        pytest.skip("the C++ extension is not built")
    grow = int(res.stdout.split()[-1])
    out = d_out * d_in * 4 if op == "project_full" else 0  # (its result, fp32)
    print(f"{backend} {op}: peak RSS +{grow / 2**20:.1f} MiB (M_J {m_bytes / 2**20:.0f} MiB, result {out / 2**20:.0f} MiB)")
    assert grow < m_bytes + out + slack, f"{op} peaked {grow / 2**20:.1f} MiB above its inputs"


MERGEKIT_PEAK = """
import sys, torch
import peft.utils.merge_utils  # (imported before the peak is reset: a module, not the merge)
from mergekit.merge_methods.base import TensorGroup
from safemerge_ext import mergekit_methods as mm
d, method, merge, density = int(sys.argv[1]), sys.argv[3], sys.argv[4], float(sys.argv[5])
g = torch.Generator().manual_seed(int(sys.argv[2]))
def weights(base=None, s=0.0):  # (bf16, made a few rows at a time: no fp32 copy before the peak)
    out = torch.empty(d, d, dtype=torch.bfloat16)
    for i in range(0, d, 256):
        r = torch.randn(min(256, d - i), d, generator=g)
        out[i:i + 256] = r if base is None else base[i:i + 256].float() + s * r
    return out
wa = weights()
t = {"aligned": wa, "task": weights(wa, 0.02), "unaligned": weights(wa, 0.01)}
if method == "safemerge":
    t["safety"] = weights(wa, 0.02)
ids = list(t)
group = TensorGroup.from_tensors(list(t.values()), ids=ids, base_index=0, name="model.layers.0.mlp.up_proj.weight")
role = {i: i for i in ids[1:]}
def run(threshold):
    if method == "safemerge":
        return mm._safemerge_tensor(group, role, threshold, 0.8, merge, density, 0, "", None)
    if method == "safelora":
        return mm._safelora_tensor(group, role, threshold, "", None)
    return mm._resta_tensor(group, role, 0.5, density, 0, "", None)
def rss(key):
    return int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith(key))) * 1024
run(0.35)  # (BLAS set up)
open('/proc/self/clear_refs', 'w').write('5')
before = rss('VmRSS')
out = run(1.01)  # (safemerge, safelora: flagged)
assert out.dtype == torch.bfloat16 and not torch.equal(out, t["task"])
print(rss('VmHWM') - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize("method, merge, density, limit", [
    ("safemerge", "linear", 1.0, 4.5), ("safemerge", "ties", 0.5, 13.5), ("safemerge", "dare_ties", 0.5, 8.5),
    ("safelora", "", 1.0, 4.0), ("resta", "", 1.0, 3.5), ("resta", "", 0.5, 3.5)])
def test_mergekit_methods_hold_few_copies_of_a_tensor(method, merge, density, limit):
    """The mergekit methods on a bf16 4096x4096 tensor, peak RSS above the inputs in fp32 copies of
    it, measured. safemerge, flagged, linear merge: dW_f and the score's M_J (one each), row blocks
    and its bf16 result, 2.2-2.6; it held fp32 copies of W_aligned, W_unaligned, dW_s, the merge's
    stack and sum, and their sum with W_aligned besides (9.2; review187: 10.1 GiB for 8192x28672).
    ties and dare_ties prune each weighted update whole (peft's magnitude pruning, whose torch.topk
    alone holds 5-7, or DARE's mask), then merge a block of rows at a time: 11.5-11.7 and 6.1-6.6;
    they held the merge's stacks, sign mask and products whole too (15.8 and 15.4).
    safelora, flagged: dW, the projection's M_J (at most 64 MiB: here the whole tensor's size) and
    C dW, one each, and the score's band (an fp32 norm of W_task), 3.2-3.5; its finite check on C dW
    made |C dW| and masks, and C dW was divided into a second copy (3.7-4.1; at 8192x8192, 3.7 ->
    2.3-2.6, review194).
    resta: dW and M_J while it scores, then row blocks and its bf16 result, or DARE's mask (drawn
    whole: two fp32 copies as it is drawn), 2.2-2.4 with or without DARE; it held fp32 copies of
    W_aligned and W_unaligned throughout, with dW and W_task's while it scored, then their
    difference, W_task's and the sum (4.1; 4.2 with DARE)."""
    d = 4096
    res = subprocess.run([sys.executable, "-c", MERGEKIT_PEAK, str(d), "11", method, merge, str(density)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if res.returncode != 0 and "clear_refs" in res.stderr:
        pytest.skip(f"cannot reset the peak RSS here: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, res.stderr[-2000:]
    copies = int(res.stdout.split()[-1]) / (d * d * 4)
    print(f"{method} {merge} (density {density}): peak RSS {copies:.1f} fp32 copies of the tensor")
    assert copies < limit, f"{method} peaked at {copies:.1f} fp32 copies of the tensor (limit {limit})"
