"""End-to-end SafeMERGE on synthetic checkpoints: ours vs the reference pipeline vs mergekit.

Every contender runs in its own child process (so peak RSS is its own), in one run, on the same
files (see make_synthetic.py), with the page cache dropped before each (``--cold``) or the files
put back in it before each (warm, see ``rewarm``), so every contender sees the same page cache:

- ``floor``: read exactly the tensors the adapter pipeline needs (target weights of both models,
  both adapters) one at a time with safetensors ``safe_open``, every byte read once and nothing
  written (``get_tensor`` alone maps the file lazily and reads nothing; until 2026-12-02 each
  tensor was also copied into private memory, which made the warm floor 2-3x slower): the read
  floor.
- ``copy-floor``: read every aligned tensor and the unaligned targets, write the aligned shards
  with safetensors ``save_file``: the floor for full-model output.
- ``safemerge-adapter[-backend]`` / ``safemerge-model``: ``safemerge_ext.pipeline.merge``;
  ``safemerge-adapter-noplot``: the same with ``--no-plot`` (no matplotlib import or PNG render).
- ``reference``: the official code's approach, re-implemented here for comparison: both models
  loaded whole with transformers in fp32, C = V V^T / ||V|| materialized and kept for every target
  module, cosines from C, PEFT ``add_weighted_adapter(linear)`` for the flagged layers.
- ``mergekit``: ``mergekit`` linear merge of ``aligned+task`` and ``aligned+safety`` (mergekit
  writes a merged full copy of each LoRA'd model to its cache first).

Columns: ``time_s`` (the work, from first read to last byte written, the PNG report's rendering
included; imports, matplotlib's and the scoring backend's among them, reported apart as
``import_s``), ``read_gb`` (bytes the contender reads, 10^9: the tensors it reads, or for the
reference and mergekit the files they load), ``gbps`` (read_gb / time_s), ``x_floor`` (time over
the matching floor: ``floor`` for adapter output, ``copy-floor`` for full-model output),
``peak_rss_mb`` (the child process's peak resident memory, VmHWM, counted from where the work
starts), ``base_rss_mb`` (its resident memory after its imports, torch among them, and on a GPU
the warm-up, before the work starts), ``rss_over_base_mb``
(``peak_rss_mb - base_rss_mb``: the work's own memory, not counted from the bare interpreter,
whose RSS the line above the table gives), and ``x_ref_time`` / ``x_ref_mem`` (reference over
contender). ``flagged`` is the number of layers a SafeMERGE contender flagged; the reference and
every ``safemerge-*`` run must agree (the run says so where they do not; mergekit's linear merge
flags nothing).

    python benchmarks/bench_end_to_end.py --shape llama-1b --adapters qv
    python benchmarks/bench_end_to_end.py --shape llama-1b --repeat 3   # best of 3 runs each (noisy VMs)
    python benchmarks/bench_end_to_end.py --shape llama2-7b --device cuda     # on a GPU: the GPU backends
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ALPHA, TAU = 0.8, 0.35


def _status(key: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:  # (no /proc: macOS, Windows)
        pass
    return float("nan")


def rss_mb() -> float:
    return _status("VmRSS")


def peak_mb() -> float:
    """Peak RSS of this process (VmHWM: unlike ru_maxrss it is not inherited across exec); where
    there is no /proc, ru_maxrss (bytes on macOS, KiB elsewhere; it counts from the process start)."""
    peak = _status("VmHWM")
    if peak == peak:
        return peak
    try:
        import resource
    except ImportError:  # (Windows)
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


def base_rss_mb() -> float:
    """RSS now, where the timed work starts, with the peak (VmHWM) reset to it (Linux's clear_refs
    "5"), so that a peak of the imports or a GPU warm-up is not taken for the work's own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # (not Linux, or a kernel without it: the peak then counts from the start)
        pass
    return rss_mb()


# --- contenders (run in the child) ---------------------------------------------------------------


def _targets(data: Path, adapters: str) -> tuple[list[str], list[Path]]:
    from safetensors import safe_open

    ads = [data / f"task-{adapters}", data / f"safety-{adapters}"]
    with safe_open(ads[0] / "adapter_model.safetensors", "pt") as f:
        mods = sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in f.keys()})
    return [f"{m}.weight" for m in mods], ads


def _open(model: Path):
    from safetensors import safe_open

    idx = model / "model.safetensors.index.json"
    wm = json.loads(idx.read_text())["weight_map"] if idx.exists() else None
    handles = {}

    def get(name: str):
        fname = wm[name] if wm else "model.safetensors"
        if fname not in handles:
            handles[fname] = safe_open(model / fname, "pt")
        return handles[fname].get_tensor(name)
    return get, (sorted(set(wm.values())) if wm else ["model.safetensors"]), wm


def _read(t) -> int:
    """Read every byte of a tensor once, without writing a copy: a max over its bytes seen as
    integers of the element's width (``get_tensor`` alone maps the file and reads nothing, and
    ``clone()`` would also write each tensor into fresh memory). Returns the bytes read."""
    import torch

    if t.numel():
        t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).max()
    return t.numel() * t.element_size()


def run_floor(data: Path, adapters: str, out: Path, **_) -> dict:
    import torch  # noqa: F401 (imported before the baseline, as every contender's imports are)
    from safetensors import safe_open

    names, ads = _targets(data, adapters)
    base = base_rss_mb()
    t0 = time.perf_counter()
    nbytes = 0
    for model in ("aligned", "unaligned"):
        get, _, _ = _open(data / model)
        for n in names:
            nbytes += _read(get(n))
    for ad in ads:
        with safe_open(ad / "adapter_model.safetensors", "pt") as f:
            for k in f.keys():
                nbytes += _read(f.get_tensor(k))
    return {"time_s": time.perf_counter() - t0, "bytes_read": nbytes, "base_rss_mb": base}


def run_copy_floor(data: Path, adapters: str, out: Path, **_) -> dict:
    import torch  # noqa: F401 (imported before the baseline, as every contender's imports are)
    from safetensors import safe_open
    from safetensors.torch import save_file

    names, _ = _targets(data, adapters)
    base = base_rss_mb()
    t0 = time.perf_counter()
    nbytes = 0
    getu, _, _ = _open(data / "unaligned")
    for n in names:
        nbytes += _read(getu(n))
    out.mkdir(parents=True)
    _, files, _ = _open(data / "aligned")
    for fname in files:
        with safe_open(data / "aligned" / fname, "pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
        nbytes += sum(t.numel() * t.element_size() for t in sd.values())
        save_file(sd, out / fname, metadata={"format": "pt"})
        del sd
    return {"time_s": time.perf_counter() - t0, "bytes_read": nbytes, "base_rss_mb": base}


def _ours(data: Path, adapters: str, out: Path, output: str, backend: str, device: str, plot: bool = True,
          threshold: float = TAU) -> dict:
    t0 = time.perf_counter()
    from safemerge_ext import backends, pipeline

    backends.resolve(backend, device)  # imports the backend (the C++ extension, or Triton) the run will use
    if plot:  # matplotlib (the report's PNG) is an import too: counted in import_s, as issue 5 says
        from safemerge_ext.report import preload_plotting

        preload_plotting().join()
    t_import = time.perf_counter() - t0
    warmup = _warm_gpu(data, adapters, backend) if device == "cuda" else 0.0
    base = base_rss_mb()
    settings = pipeline.MergeSettings(pipeline.Selection(threshold=threshold), alpha=ALPHA, output=output)
    t1 = time.perf_counter()
    rep = pipeline.merge(data / "aligned", data / "unaligned", data / f"task-{adapters}", data / f"safety-{adapters}",
                         out, settings, backend=backend, device=device, progress=False, plot=plot)
    out_ = {"time_s": time.perf_counter() - t1, "import_s": t_import, "base_rss_mb": base,
            "bytes_read": rep["bytes_read"], "flagged": rep["counts"]["flagged"], "backend": rep["backend"]}
    return {**out_, "warmup_s": round(warmup, 3)} if device == "cuda" else out_


def _warm_gpu(data: Path, adapters: str, backend: str) -> float:
    """Start-up a GPU run pays once, kept out of ``time_s`` like the imports: the CUDA context and,
    for Triton, the compile of each kernel variant the run uses (one per weight shape, dtype and
    rank), by scoring random weights of those shapes once. Returns its seconds (``warmup_s``)."""
    import torch

    from safemerge_ext import ops
    from safemerge_ext.io.adapters import read_adapter
    from safemerge_ext.io.models import ModelReader

    t0 = time.perf_counter()
    reader, adapter = ModelReader(data / "aligned"), read_adapter(data / f"task-{adapters}")
    metas = {m: reader.meta(reader.resolve_module(m)) for m in adapter.modules}
    kinds = {(*metas[m][0], metas[m][1], lm.rank) for m, lm in adapter.modules.items()}
    for d_out, d_in, dtype, r in sorted(kinds, key=str):
        wa = torch.randn(d_out, d_in, device="cuda").to(dtype)
        ops.subspace_score(wa, wa * 0.5, lora_A=torch.randn(r, d_in, device="cuda"),
                           lora_B=torch.randn(d_out, r, device="cuda"), backend=backend)
    torch.cuda.synchronize()
    del wa
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()  # peak_gpu_mb is the pipeline's, not the warm-up's
    return time.perf_counter() - t0


def run_ours_adapter(data: Path, adapters: str, out: Path, backend: str = "auto", device: str = "cpu",
                     threshold: float = TAU, **_) -> dict:
    return _ours(data, adapters, out, "adapter", backend, device, threshold=threshold)


def run_ours_adapter_noplot(data: Path, adapters: str, out: Path, backend: str = "auto", device: str = "cpu",
                            threshold: float = TAU, **_) -> dict:
    return _ours(data, adapters, out, "adapter", backend, device, plot=False, threshold=threshold)


def run_ours_model(data: Path, adapters: str, out: Path, backend: str = "auto", device: str = "cpu",
                   threshold: float = TAU, **_) -> dict:
    return _ours(data, adapters, out, "model", backend, device, threshold=threshold)


def run_reference(data: Path, adapters: str, out: Path, threshold: float = TAU, **_) -> dict:
    t0 = time.perf_counter()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t_import = time.perf_counter() - t0
    base = base_rss_mb()
    t1 = time.perf_counter()
    aligned = AutoModelForCausalLM.from_pretrained(data / "aligned", dtype=torch.float32)
    unaligned = AutoModelForCausalLM.from_pretrained(data / "unaligned", dtype=torch.float32)
    names, ads = _targets(data, adapters)
    ua = dict(unaligned.named_parameters())
    C = {}
    with torch.no_grad():
        for name, p in aligned.named_parameters():
            if name in names:
                V = p - ua[name]
                C[name[: -len(".weight")]] = V @ V.t() / torch.norm(V)
    del unaligned, ua
    model = PeftModel.from_pretrained(aligned, ads[0], adapter_name="task")
    model.load_adapter(ads[1], adapter_name="safety")
    flagged = []
    with torch.no_grad():
        for name, mod in model.named_modules():
            key = name.removeprefix("base_model.model.")
            if key in C and hasattr(mod, "lora_A"):
                dW = mod.lora_B["task"].weight @ mod.lora_A["task"].weight * mod.scaling["task"]
                cos = torch.nn.functional.cosine_similarity((C[key] @ dW).flatten(), dW.flatten(), dim=0)
                if float(cos) < threshold:
                    flagged.append(key)
    model.add_weighted_adapter(["task", "safety"], [ALPHA, 1 - ALPHA], "merged", combination_type="linear")
    with torch.no_grad():
        for name, mod in model.named_modules():
            key = name.removeprefix("base_model.model.")
            if key in C and hasattr(mod, "lora_A") and key not in flagged:  # dW_f exactly, at "merged"'s scaling
                mod.lora_A["merged"].weight.copy_(mod.lora_A["task"].weight)
                mod.lora_B["merged"].weight.copy_(mod.lora_B["task"].weight * (mod.scaling["task"] / mod.scaling["merged"]))
    # (save_embedding_layers="auto" would ask the Hub about the adapters' base_model_name_or_path)
    model.save_pretrained(out, selected_adapters=["merged"], save_embedding_layers=False)
    nbytes = sum(p.stat().st_size for m in ("aligned", "unaligned") for p in (data / m).glob("*.safetensors"))
    return {"time_s": time.perf_counter() - t1, "import_s": t_import, "base_rss_mb": base,
            "bytes_read": nbytes, "flagged": len(flagged), "c_bytes": sum(c.numel() * 4 for c in C.values())}


def run_mergekit(data: Path, adapters: str, out: Path, **_) -> dict:
    t0 = time.perf_counter()
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    t_import = time.perf_counter() - t0
    base = base_rss_mb()
    recipe = {
        "merge_method": "linear", "dtype": "bfloat16",
        "models": [{"model": f"{data / 'aligned'}+{data / f'task-{adapters}'}", "parameters": {"weight": ALPHA}},
                   {"model": f"{data / 'aligned'}+{data / f'safety-{adapters}'}", "parameters": {"weight": 1 - ALPHA}}],
    }
    cfg = MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(recipe)))
    cache = out.parent / (out.name + "-lora-cache")
    t1 = time.perf_counter()
    run_merge(cfg, str(out), options=MergeOptions(copy_tokenizer=False, lora_merge_cache=str(cache), lazy_unpickle=True))
    # (as mergekit reads: the aligned model once per LoRA it folds, the adapters, then both folded
    # copies back from its cache; measured with strace)
    model = sum(p.stat().st_size for p in (data / "aligned").glob("*.safetensors"))
    ads = sum(p.stat().st_size for k in ("task", "safety") for p in (data / f"{k}-{adapters}").glob("*.safetensors"))
    nbytes = 4 * model + ads
    return {"time_s": time.perf_counter() - t1, "import_s": t_import, "base_rss_mb": base, "bytes_read": nbytes}


CONTENDERS = {
    "floor": run_floor, "copy-floor": run_copy_floor, "safemerge-adapter": run_ours_adapter,
    "safemerge-adapter-noplot": run_ours_adapter_noplot,
    "safemerge-model": run_ours_model, "reference": run_reference, "mergekit": run_mergekit,
}


def child(name: str, opts: dict) -> None:
    fn = CONTENDERS[name.split(":")[0]]
    res = fn(Path(opts["data"]), opts["adapters"], Path(opts["out"]), backend=opts.get("backend", "auto"),
             device=opts.get("device", "cpu"), threshold=opts.get("threshold", TAU))
    res["peak_rss_mb"] = peak_mb()
    try:
        import torch

        if torch.cuda.is_available():
            res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except ImportError:
        pass
    print("RESULT " + json.dumps(res), flush=True)


# --- parent -------------------------------------------------------------------------------------


def drop_caches() -> bool:
    """Empty the page cache (root only) so that every contender reads from the disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def input_files(data: Path, adapters: str) -> list[Path]:
    """The safetensors files the contenders read: both models' shards and both adapters."""
    return [path for sub in ("aligned", "unaligned", f"task-{adapters}", f"safety-{adapters}")
            for path in sorted((data / sub).glob("*.safetensors"))]


def rewarm(data: Path, adapters: str, *, again: bool = False) -> None:
    """Put every file a contender reads back into the page cache before it starts (outside its
    timed work). This VM's memory manager (DAMON-based reclaim) takes pages of idle cached files
    within seconds, so one warm-up at the start left later contenders of a "warm" run reading part
    of their input from the disk (measured: 5-16 of the 32 q/v pairs of a 1B model a few seconds
    after they were read). Cached files cost one ``cachestat`` call each. With ``again``, every
    file is first written back and dropped from the cache (``POSIX_FADV_DONTNEED``), so all of it is read back."""
    from safemerge_ext.io import pagecache
    from safemerge_ext.io.models import _copy_buffered, _NotHere, _sendfile

    with open(os.devnull, "wb") as null:
        for path in input_files(data, adapters):
            fd = os.open(path, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                if again and hasattr(os, "posix_fadvise"):
                    os.fdatasync(fd)  # (the kernel drops clean pages only: a file just written keeps its dirty ones)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                elif pagecache.resident(fd, 0, size):
                    continue
                try:  # the kernel's read path, no copy into this process (as the pipeline reads ahead)
                    _sendfile(fd, null.fileno(), 0, size)
                except _NotHere:
                    _copy_buffered(fd, null.fileno(), 0, size)
            finally:
                os.close(fd)


_HUGE = 2 << 20


def huge_folio_share(paths: list[Path]) -> float | None:
    """The share of the files' whole 2 MiB stretches that the page cache holds in 2 MiB folios,
    which a mapping maps with one entry each (``FilePmdMapped``); None when a file is not wholly
    in the cache (touching it would read it in) or this system cannot tell.

    A warm run's figures depend on it, the floor's most: it faults its tensors in through
    safetensors' memory map (1B q/v on the Intel VM of RESULTS.md, the same hour: models written
    4 KiB at a time, so cached in small folios, floor 0.071 s and ours 0.134 s, 1.9x; after
    ``--recache``, in 2 MiB folios, 0.031 s and 0.091 s, 2.9x). A file written in pieces under
    2 MiB stays cached in small folios until it leaves the cache; read back (``sendfile``, ``read``
    or a memory map), it comes in 2 MiB folios where the kernel makes them (Linux 6.18, ext4, on
    that VM). Each file is mapped and one byte per 2 MiB touched (no bytes read from the disk)."""
    import ctypes
    import mmap

    from safemerge_ext.io import pagecache

    stretches = pmd_kb = 0
    for path in paths:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = size // _HUGE
            if n == 0:
                continue
            if not pagecache.resident(f.fileno(), 0, size):
                return None
            mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # (private, as ModelReader.map; nothing written)
            try:
                first = ctypes.c_char.from_buffer(mm)
                addr = ctypes.addressof(first)
                del first  # (an export of mm would keep it from closing)
                for k in range(n):
                    mm[k * _HUGE]
                pmd = _smaps_kb(addr, "FilePmdMapped")
            finally:
                mm.close()
            if pmd is None:
                return None
            stretches += n
            pmd_kb += pmd
    return pmd_kb * 1024 / (stretches * _HUGE) if stretches else None


def _smaps_kb(addr: int, field: str) -> int | None:
    """A ``kB`` field of this process's mapping that starts at ``addr`` (/proc/self/smaps)."""
    try:
        with open("/proc/self/smaps") as f:
            lines = iter(f.read().splitlines())
    except OSError:
        return None
    head = f"{addr:x}-"
    for line in lines:
        if line.startswith(head):
            for line in lines:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
                if "-" in line.split(" ", 1)[0]:  # the next mapping's header
                    return None
    return None


def spawn(name: str, opts: dict, timeout: float, cold: bool = False) -> dict:
    if cold and not drop_caches():
        raise SystemExit("--cold needs permission to write /proc/sys/vm/drop_caches (run as root)")
    if not cold:
        rewarm(Path(opts["data"]), opts["adapters"])
    subprocess.run([sys.executable, "-c", "pass"])  # warm the interpreter files (not timed)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--opts", json.dumps(opts)],
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:  # (one contender past --timeout: an error row, the others still run)
        return {"name": name, "error": f"stopped after --timeout {timeout:g} s", "process_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"name": name, "error": " | ".join(tail), "returncode": proc.returncode, "process_s": wall}
    res = json.loads(lines[-1][len("RESULT "):])
    res.update(name=name, process_s=wall)
    return res


def interpreter_baseline() -> dict:
    out = subprocess.run([sys.executable, "-c", "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"],
                         capture_output=True, text=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"])
    rss = int(out.stdout) / 1024 if out.stdout.strip().isdigit() else float("nan")  # (no /proc: not Linux)
    return {"rss_mb": rss, "start_s": time.perf_counter() - t0}


def git_sha() -> str:
    """The checkout's commit; GIT_SHA where the tree was copied without .git (a lent GPU machine)."""
    if os.environ.get("GIT_SHA"):
        return os.environ["GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    except OSError:
        sha = ""
    return sha.strip() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child")
    ap.add_argument("--opts")
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--adapters", choices=("qv", "all"), default="qv")
    ap.add_argument("--data", default=str(HERE / "data"))
    ap.add_argument("--adapter-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the synthetic LoRA adapters' stored dtype (see make_synthetic.py: fp32 is what PEFT "
                         "saves by default)")
    ap.add_argument("--skip", nargs="*", default=[], help="contenders to leave out, by name or by the part before \":\" (e.g. reference mergekit safemerge-adapter:torch)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--threshold", type=float, default=TAU,
                    help=f"SafeMERGE's tau for our contenders and the reference (default {TAU}, the paper's; the "
                         "synthetic models' cosines spread around it at llama shapes, above it at tiny)")
    ap.add_argument("--cold", action="store_true",
                    help="drop the page cache before every contender (root): disk-bound figures instead of warm-cache ones")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where our contenders score (cuda: the GPU backends, weights staged through pinned memory)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each contender (but the slow reference and mergekit) this many times and keep "
                         "its fastest run: the floors and ours alike, so a noisy neighbour's burst does not skew a ratio")
    ap.add_argument("--recache", action="store_true",
                    help="warm runs: first drop the input files from the page cache and read them back with "
                         "sendfile, as the pipeline's read-ahead does, so the cache holds them in 2 MiB folios where "
                         "the kernel makes them, whoever read them before (see huge_folio_share)")
    ap.add_argument("--json", help="write results here (default: benchmarks/results/e2e-<shape>-<host>-<date>.json)")
    ap.add_argument("--results", metavar="MD",
                    help="also add the table, with machine, date, commit and command, to this Markdown file "
                         "(benchmarks/RESULTS.md), under its end-to-end heading")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.recache and args.cold:
        ap.error("--recache is for warm runs; --cold drops the page cache before every contender anyway")
    if args.child:
        child(args.child, json.loads(args.opts))
        return

    if args.device == "cuda" and _gpu_name() is None:
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    sys.path.insert(0, str(HERE))
    from make_synthetic import make

    # (on the device the data was drawn on: data of another device's draw would be drawn again)
    data = make(args.shape, Path(args.data), device=args.device, adapter_dtype=args.adapter_dtype)
    sys.path.insert(0, str(ROOT))
    from safemerge_ext.backends import NAMES, resolve

    def runs_here(name: str) -> bool:
        try:
            resolve(name, args.device)
            return True
        except ValueError:
            return False

    # Triton on CPU tensors is its interpreter: a test tool, far too slow to time
    backends = [n for n in NAMES if runs_here(n) and not (n == "triton" and args.device == "cpu")]
    if not backends:
        raise SystemExit(f"no scoring backend runs on {args.device} here (see `safemerge backends`)")
    tmp = Path(tempfile.mkdtemp(prefix="e2e-", dir=HERE))
    names = ["floor", "copy-floor"] + [f"safemerge-adapter:{b}" for b in backends] + [
        f"safemerge-adapter-noplot:{backends[0]}", "safemerge-model", "reference", "mergekit"]
    names = [n for n in names if n not in args.skip and n.split(":")[0] not in args.skip]
    rows = []
    files = input_files(data, args.adapters)
    huge = [None, None]  # the share of the inputs cached in 2 MiB folios, before the first contender and after the last
    interrupted = False
    try:
        if not args.cold:  # one warm-up read so every contender sees the same (warm) page cache
            if args.recache:
                rewarm(data, args.adapters, again=True)
            spawn("floor", {"data": str(data), "adapters": args.adapters, "out": str(tmp / "warm")}, args.timeout)
            huge[0] = huge_folio_share(files)
        for i, name in enumerate(names):
            opts = {"data": str(data), "adapters": args.adapters, "out": str(tmp / f"o{i}"),
                    "backend": name.split(":")[1] if ":" in name else "auto", "device": args.device,
                    "threshold": args.threshold}
            best = None
            for rep in range(1 if name in ("reference", "mergekit") else args.repeat):
                print(f"running {name} ..." + (f" ({rep + 1}/{args.repeat})" if args.repeat > 1 else ""), flush=True)
                got = spawn(name, opts, args.timeout, cold=args.cold)
                # each result as it comes, so that a run cut short (a GPU lease) still leaves its figures
                print("  " + (f"error: {got['error']}" if "error" in got else ", ".join(
                    f"{k} {got[k]:.4g}" for k in ("time_s", "import_s", "warmup_s", "peak_rss_mb", "peak_gpu_mb") if k in got)),
                      flush=True)
                shutil.rmtree(tmp / f"o{i}", ignore_errors=True)
                shutil.rmtree(tmp / f"o{i}-lora-cache", ignore_errors=True)
                if best is None or ("error" not in got and ("error" in best or got["time_s"] < best["time_s"])):
                    best = got
                if "error" in got:
                    break
            rows.append(best)
        if not args.cold:
            huge[1] = huge_folio_share(files)
    except KeyboardInterrupt:  # (a time limit's SIGINT, e.g. gpu_session.sh: the finished rows are still written)
        interrupted = True
        print(f"interrupted: writing the {len(rows)} finished contender(s)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    base = interpreter_baseline()
    by = {r["name"]: r for r in rows}
    floor = by.get("floor", {}).get("time_s")
    copy_floor = by.get("copy-floor", {}).get("time_s")
    ref = by.get("reference", {})
    for r in rows:
        if "error" in r:
            continue
        f = copy_floor if r["name"] in ("safemerge-model", "mergekit", "copy-floor") else floor
        r["read_gb"] = r["bytes_read"] / 1e9
        r["gbps"] = r["bytes_read"] / r["time_s"] / 1e9 if r.get("time_s") else None
        r["x_floor"] = r["time_s"] / f if f else None
        r["rss_over_base_mb"] = r["peak_rss_mb"] - r.get("base_rss_mb", base["rss_mb"])
        if "time_s" in ref and r["name"] != "reference":
            r["x_ref_time"] = ref["time_s"] / r["time_s"]
            r["x_ref_mem"] = ref["peak_rss_mb"] / r["peak_rss_mb"]
    flagged = {r["name"]: r["flagged"] for r in rows if "flagged" in r and "error" not in r}
    if len(set(flagged.values())) > 1:  # (the same selection, computed by each: a contender that differs is wrong)
        print(f"WARNING: the contenders flagged different layer counts: {flagged}", flush=True)
    meta = {"shape": args.shape, "adapters": args.adapters, "adapter_dtype": args.adapter_dtype, "threshold": args.threshold,
            "flagged_agree": len(set(flagged.values())) <= 1,
            "cache": "cold" if args.cold else "warm", "device": args.device,
            "gpu": _gpu_name() if args.device == "cuda" else None, "host": socket.gethostname(), "machine": machine(),
            "date": dt.date.today().isoformat(), "git_sha": git_sha(), "python": platform.python_version(),
            "interpreter": base, "repeat": args.repeat, "recache": args.recache, "huge_folio_share": huge,
            "interrupted": interrupted}
    print(table(rows, meta))
    tag = (f"{args.shape}-{args.adapters}" + ("-bf16" if args.adapter_dtype == "bfloat16" else "") + f"-{meta['cache']}"
           + ("-cuda" if args.device == "cuda" else ""))
    out = Path(args.json) if args.json else HERE / "results" / f"e2e-{tag}-{meta['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")
    if args.results:
        argv, skip = [], False  # (the command without where this run's files went)
        for a in sys.argv[1:]:
            if skip or a in ("--json", "--results") or a.startswith(("--json=", "--results=")):
                skip = a in ("--json", "--results")
                continue
            argv.append(a)
        add_to_results(Path(args.results), table(rows, meta), meta, " ".join(argv))
        print(f"added the table to {args.results}")


E2E_HEADING = "## End to end: `benchmarks/bench_end_to_end.py`"


def add_to_results(path: Path, text: str, meta: dict, argv: str) -> None:
    """The table as the newest section under the end-to-end heading of ``path`` (appended at the
    end, under a new heading, where the file has none)."""
    gpu = f", {meta['gpu']}" if meta.get("gpu") else ""
    section = (f"### {meta['machine']}{gpu}: {meta['date']}, git {meta['git_sha']}\n\n"
               f"`python benchmarks/bench_end_to_end.py {argv}`\n\n{text.replace(chr(10), chr(10) * 2, 1)}\n\n")
    doc = path.read_text() if path.is_file() else "# Benchmark results\n"
    if E2E_HEADING in doc:
        at = doc.index(E2E_HEADING) + len(E2E_HEADING)
        doc = doc[:at] + "\n\n" + section + doc[at:].lstrip("\n")
    else:
        doc = doc.rstrip("\n") + f"\n\n{E2E_HEADING}\n\n{section}"
    path.write_text(doc)


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def machine() -> str:
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    return f"{os.cpu_count()} cores, {model}"


def table(rows: list[dict], meta: dict) -> str:
    cols = ["name", "time_s", "import_s", "read_gb", "gbps", "x_floor", "peak_rss_mb", "base_rss_mb", "rss_over_base_mb",
            "x_ref_time", "x_ref_mem", "flagged"]
    if any("peak_gpu_mb" in r for r in rows):
        cols.insert(cols.index("x_ref_time"), "peak_gpu_mb")
    if any("warmup_s" in r for r in rows):  # (GPU: the CUDA context and Triton's compiles, kept out of time_s)
        cols.insert(3, "warmup_s")
    gpu = f" gpu={meta['gpu']}" if meta.get("gpu") else ""
    head = (f"shape={meta['shape']} adapters={meta['adapters']} ({meta.get('adapter_dtype', 'float32')}) "
            f"page-cache={meta['cache']} machine={meta['machine']}{gpu} date={meta['date']} "
            f"sha={meta['git_sha']} best of {meta.get('repeat', 1)}; bare interpreter (`python -c pass`): start "
            f"{meta['interpreter']['start_s']:.2f} s, rss {meta['interpreter']['rss_mb']:.0f} MB; "
            "rss_over_base_mb is each contender's peak RSS over its own RSS after its imports (base_rss_mb), "
            "not over the bare interpreter's")
    if meta.get("flagged_agree") is False:
        head += "; WARNING: the contenders' flagged counts differ"
    share = meta.get("huge_folio_share") or [None, None]
    if any(v is not None for v in share):
        pct = ["?" if v is None else f"{100 * v:.0f}%" for v in share]
        head += f"; inputs cached in 2 MiB folios: {pct[0]} at the start, {pct[1]} at the end"
        head += " (--recache)" if meta.get("recache") else ""

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)
    lines = [head, "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:150]} |")
        else:
            lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
