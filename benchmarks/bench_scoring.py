"""Low-rank scoring benchmark: the two passes over V = W_aligned - W_unaligned (T = V^T B,
P = V T, ||V||^2) for Llama layer shapes, per backend, against the floor and two baselines
measured in the same run (SPEC section 4, issue 4 item 5).

Providers
- every backend that runs on the device (``torch``, ``cpp`` on the CPU; ``triton``, ``cuda``,
  ``torch`` on a GPU), called through its ``lowrank_passes``;
- ``naive``: upcast, subtract, two full matmuls (V materialized in fp32, C never formed):
  ``V = wa.float() - wu.float(); T = V.T @ B; P = V @ T; ||V||^2``;
- ``materialized``: the reference approach, ``C = V V^T / ||V||`` formed, then ``C B``. It costs
  2 d_out^2 d_in flops and d_out^2 * 4 bytes (822 MB at 14336x4096). On a GPU that is
  milliseconds, and ``--materialized auto`` (the default) runs it at every shape; on a CPU
  (70 GFLOP/s here: ~1 s at 4096x4096, ~25 s at 14336x4096) ``auto`` runs it only where
  d_out^2 d_in <= 4096^3 (``MATERIALIZED_LIMIT``), and elsewhere its columns are null and the
  rows' ``materialized_note`` says so. ``--materialized always`` runs it at every shape on either,
  ``never`` nowhere. It runs once per shape, at the largest rank of the run (forming C dominates;
  ``C B`` adds 2 d_out^2 r): one checked call against naive torch, which is also its warm-up,
  then as many timed calls as fit in ``MATERIALIZED_BUDGET_MS`` (2 s) by the checked call's time,
  at least 1 and at most ``--reps`` (its median; one call of 25 s gets 1). How many is in each
  row's ``materialized_reps`` and in the notes printed after the table. It is timed apart from
  the round-robin of the others.

Floor (measured in the same run, per shape and rank): max(read, arithmetic) where
- read = one read of both matrices (:func:`read_once`): a max over their raw bytes viewed as
  integers of the element's width, torch's vectorized reduction with no writes. It runs at the
  memory's rate (4096x4096 bf16 pair on the 2-core Zen 4: 1.7-1.8 ms, 36-38 GB/s), where
  ``amax()`` in bf16 is held back by the conversion (3.5 ms); until 2026-12-02 the floor used
  ``amax()``, which made the r = 8 rows, whose floor is otherwise the arithmetic one, look 20-25%
  better than they are;
- arithmetic = 4 r d_out d_in flops (two passes, each r multiply-adds per element of V, 2 flops
  per multiply-add) at the rate of a large fp32 matmul (2048^3 on a CPU, 8192^3 on a GPU) timed here.
Our kernels read the matrices twice (T must be complete before P), so the read floor is a bound
they cannot reach when memory-bound; it is the honest one the issue asks for.

The floor's two figures are the fastest of their repetitions (the best this machine did in the
run: on a shared VM a median read can be inflated by a neighbour's burst and flatter the ratios),
the contenders' times the medians. Per shape and rank the read, the matmul and every contender are
timed in turn, one timed call each per round (``--reps`` rounds, each timed call right after an
untimed one of its own; on a GPU right after a write that evicts the L2 cache instead), so a slow
spell of a shared machine falls on the floor and the contenders alike instead of on whichever ran
during it.

Columns: time_ms (median of --reps after a warm-up; CUDA events on a GPU, perf_counter on a CPU),
mm_gflops (the fp32 matmul rate of that shape and rank's rounds), gbps (bytes of one read of both
matrices / time), pct_copy_bw (on a GPU: gbps over the device-to-device copy bandwidth measured in
the same run) and pct_hbm_peak (over the datasheet HBM bandwidth, ``DATASHEET``; issue 4's target
is >= 70% of HBM bandwidth: the datasheet figure is the target's, the measured copy says what the
card reaches), x_floor (time / floor), x_naive (naive time / time),
x_materialized (materialized time / time). Rows carry machine, date, version, git SHA and the load
average (this CPU is shared; figures are medians).

    python benchmarks/bench_scoring.py                # all shapes x ranks 8,16,64
    python benchmarks/bench_scoring.py --quick        # 4096x4096, r=16, 3 reps
    python benchmarks/bench_scoring.py --shapes 4096x4096,1024x4096 --ranks 16 --reps 9

``--fullrank`` times the full-fine-tune path instead (``fullrank_sums``: M = V^T dW, then ||V M||,
||M||, ||dW||, never forming V, dW or C) against ``naive-full`` (V, M and N = V M materialized in
fp32). Its floor is max(one read of W_aligned, W_unaligned and dW; 4 d_out d_in^2 flops at the
fp32 matmul rate). On a GPU the rows also give ``pct_bf16_mm``: the achieved flop rate over a
bf16 8192^3 matmul's rate measured in the same run, and ``pct_bf16_peak``: over the datasheet's
dense bf16 rate (issue 4's target: >= 50% of bf16 tensor-core peak).

On a GPU, Triton runs once more per tensor-core operand precision, low-rank and full-rank alike
(``triton-tf32x3``, ``triton-tf32``, ``triton-bf16``; plain ``triton`` is the default, exact fp32
``ieee``).

    python benchmarks/bench_scoring.py --fullrank                       # CPU: 1024x1024, 2048x2048, 1024x4096
    python benchmarks/bench_scoring.py --fullrank --shapes 4096x4096,1024x4096 --device cuda
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import safemerge_ext  # noqa: E402
from safemerge_ext import backends  # noqa: E402
from safemerge_ext.kernels._launch import PRECISIONS  # noqa: E402  (imports torch only, not triton)

LLAMA_SHAPES = ["4096x4096", "11008x4096", "1024x4096", "14336x4096"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MATERIALIZED_LIMIT = 4096**3  # d_out^2 * d_in above which `auto` does not form C on a CPU
MATERIALIZED_BUDGET_MS = 2000.0  # the materialized baseline's timed calls per shape, by its first call's time


def want_materialized(mode: str, device: torch.device, d_out: int, d_in: int) -> bool:
    """Whether the materialized-C baseline runs at this shape: ``always``, ``never``, or ``auto``:
    on a GPU at every shape (C costs milliseconds there), on a CPU where d_out^2 d_in is at most
    ``MATERIALIZED_LIMIT`` (seconds a call above it)."""
    if mode != "auto":
        return mode == "always"
    return device.type == "cuda" or d_out * d_out * d_in <= MATERIALIZED_LIMIT


def materialized_reps(first_ms: float, reps: int) -> int:
    """Timed calls of the materialized baseline after its checked first call of ``first_ms``: as
    many as fit in ``MATERIALIZED_BUDGET_MS``, at least 1, at most ``reps``."""
    return max(1, min(reps, int(MATERIALIZED_BUDGET_MS // max(first_ms, 1e-3))))


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def _git_sha() -> str:
    """The checkout's commit; GIT_SHA where the tree was copied without .git (a lent GPU machine)."""
    if os.environ.get("GIT_SHA"):
        return os.environ["GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def once_timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Return once(fn) -> milliseconds of one call, with the device's clock (CUDA events on a GPU)."""

    def cpu(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def gpu(fn: Callable[[], object]) -> float:
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    return gpu if device.type == "cuda" else cpu


def timer(device: torch.device) -> Callable[..., float]:
    """Return time(fn, reps, warmup, stat=statistics.median) -> milliseconds, with the device's clock."""
    once = once_timer(device)

    def time_ms(fn: Callable[[], object], reps: int, warmup: int = 1, stat=statistics.median) -> float:
        for _ in range(warmup):
            fn()
        return stat([once(fn) for _ in range(reps)])

    return time_ms


def round_robin(device: torch.device, fns: dict[str, Callable[[], object]], reps: int,
                flush: Callable[[], object] | None = None, warm: tuple[str, ...] = ("matmul",)) -> dict[str, list[float]]:
    """Milliseconds of ``reps`` calls of each of ``fns``, one timed call of each in turn per round,
    so that a shared machine's slow spells fall on all of them alike.

    With ``flush`` (see :func:`cache_flusher`), ``flush()`` runs before each timed call: the last
    cache level (an H200's 60 MB L2, a Xeon's 105 MiB L3) would otherwise hold a whole 1024x4096
    pair from the previous call, while the pipeline's next layer is always another pair, read from
    memory. On a CPU the flush reads (clean lines, which the timed call evicts for free: after a
    2048^3 matmul, whose dirty lines it must write back, a 4096x4096 r=8 C++ call took 6.4 ms
    against 5.6 ms). Without it, and for the functions named in ``warm`` (the matmul that measures
    the arithmetic rate: a rate of the cores, not of the memory), each timed call comes right after
    an untimed call of its own."""
    once = once_timer(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            (fn if flush is None or name in warm else flush)()
            times[name].append(once(fn))
    return times


# On a GPU, Triton runs once more per operand precision that uses the tensor cores (rows named
# ``triton-<precision>``; plain ``triton`` is the default, exact fp32 "ieee").
TENSOR_CORE_PRECISIONS = tuple(p for p in PRECISIONS if p != "ieee")


def agreement(provider: str) -> float:
    """Largest relative error against naive torch a provider may show before the run stops: fp32
    arithmetic, tf32 (10-bit mantissas) or bf16 operands (8 bits)."""
    return 3e-2 if provider.endswith("bf16") else 1e-2 if provider.endswith("tf32") else 1e-3


def cache_flusher(device: torch.device) -> Callable[[], object]:
    """A function that evicts the last cache level before a timed call (see :func:`round_robin`):
    on a GPU by writing a buffer four times the L2 (at least 256 MiB), on a CPU by reading one
    twice the last-level cache (at least 64 MiB)."""
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
        buf = torch.empty(max(256 << 20, 4 * l2), dtype=torch.uint8, device=device)
        return buf.zero_
    buf = torch.ones(max(64 << 20, 2 * last_level_cache_bytes()) // 8, dtype=torch.int64)
    return buf.max


def gpu_columns(device: torch.device) -> bool:
    """Whether the rows get the GPU's columns (copy bandwidth and its share, the datasheet's peaks)."""
    return device.type == "cuda"


def last_level_cache_bytes() -> int:
    """The size of this CPU's largest cache level, as Linux lists it for cpu0 (0 where it does not)."""
    best = (0, 0)
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level, size = int((d / "level").read_text()), (d / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        try:
            best = max(best, (level, int(size.rstrip("KMG")) * unit))
        except ValueError:
            continue
    return best[1]


# Datasheet peaks (dense, no sparsity) of the GPUs issue 4's targets name: HBM GB/s, bf16 TFLOP/s.
# Matched on torch.cuda.get_device_name; the first match wins (NVL / PCIe parts before the SXM ones).
DATASHEET = (("H200 NVL", 4800.0, 835.0), ("H200", 4800.0, 989.5), ("H100 NVL", 3900.0, 835.0),
             ("H100 PCIe", 2000.0, 756.0),
             ("H100", 3350.0, 989.5), ("A100-SXM4-80GB", 2039.0, 312.0), ("A100", 1555.0, 312.0))


def datasheet(device: torch.device) -> tuple[float, float] | None:
    """(HBM GB/s, bf16 TFLOP/s) from the datasheet for this GPU, None where it is not listed."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next(((bw, tf) for key, bw, tf in DATASHEET if key in name), None)


def copy_gbps(device: torch.device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device memory bandwidth as a large device-to-device copy moves it (bytes read plus bytes
    written, fastest of ``reps``): the ceiling a memory-bound kernel's GB/s is compared with."""
    once = once_timer(device)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = min(once(lambda: dst.copy_(src)) for _ in range(reps))
    return 2 * nbytes / ms / 1e6


def matmul_operands(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The two fp32 matrices whose product sets the arithmetic floor's rate (2048^2 on a CPU,
    8192^2 on a GPU)."""
    n = 8192 if device.type == "cuda" else 2048
    return torch.randn(n, n, device=device), torch.randn(n, n, device=device)


def matmul_gflops(a: torch.Tensor, ms: float) -> float:
    """The rate of ``a @ b`` (square, n x n) that took ``ms`` milliseconds, in GFLOP/s."""
    return 2 * a.shape[0] ** 3 / ms / 1e6


HUGE_PAGE = 2 << 20


def _advise_huge_pages(buf: "mmap.mmap", start: int, nbytes: int) -> None:
    """Ask for transparent huge pages on ``buf[start:start + nbytes]`` before its first touch."""
    import mmap

    if not hasattr(mmap, "MADV_HUGEPAGE"):
        raise SystemExit("--huge-pages: this system has no transparent huge pages (MADV_HUGEPAGE)")
    try:
        buf.madvise(mmap.MADV_HUGEPAGE, start, nbytes)
    except OSError as e:
        raise SystemExit(f"--huge-pages: madvise failed ({e.strerror})") from None


def place(w: torch.Tensor, offset: int = 0, huge_pages: bool = False) -> torch.Tensor:
    """A contiguous copy of ``w`` whose data starts ``offset`` bytes past a 64-byte boundary, or
    with ``huge_pages`` past a 2 MiB boundary in a mapping of its own advised for transparent huge
    pages (as the pipeline's weights are when it maps them from 2 MiB page-cache folios). The
    kernel may still decline; ``huge_page_share`` says what it gave."""
    import mmap

    if offset % w.element_size():
        raise SystemExit(f"--offset {offset} is not a multiple of the {w.element_size()}-byte element size")
    nbytes = w.numel() * w.element_size()
    if huge_pages:
        # every 2 MiB region the matrix touches lies whole inside the mapping, so each can be one page
        span = -(-(offset + nbytes) // HUGE_PAGE) * HUGE_PAGE
        mm = mmap.mmap(-1, span + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf = torch.frombuffer(mm, dtype=torch.uint8)  # holds the mapping for as long as a view lives
        base = (-buf.data_ptr()) % HUGE_PAGE
        _advise_huge_pages(mm, base, span)
        start = base + offset
    else:
        buf = torch.empty(nbytes + 64 + offset, dtype=torch.uint8, device=w.device)
        start = (-buf.data_ptr()) % 64 + offset
    out = buf[start : start + nbytes].view(w.dtype).view(w.shape)
    out.copy_(w)
    return out


def huge_page_share(t: torch.Tensor) -> float | None:
    """The share of ``t``'s bytes that the kernel backs with transparent huge pages: AnonHugePages
    of the mapping that holds it (/proc/self/smaps). None where that mapping also holds other
    memory (the heap), so its count would not be ``t``'s, or where smaps cannot be read."""
    addr, nbytes = t.data_ptr(), t.numel() * t.element_size()
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    size = None
    for line in lines:
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            size = hi - lo if lo <= addr < hi else None
        elif size is not None and head == "AnonHugePages:":
            if size > nbytes + 2 * HUGE_PAGE + (64 << 10):
                return None
            return min(1.0, int(line.split()[1]) * 1024 / nbytes)
    return None


def thp_mode() -> str:
    """The transparent-huge-page mode: ``always``, ``madvise``, ``never``, or ``none`` where absent."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "none"
    return text[text.index("[") + 1 : text.index("]")]


def page_label(share: float | None) -> str:
    """How a row names the pages its weights sat in: ``2MiB``, ``4KiB``, a measured mix, or
    ``unknown``."""
    if share is None:
        return "unknown"
    if share >= 0.99:
        return "2MiB"
    return "4KiB" if share == 0 else f"mixed ({100 * share:.0f}% 2MiB)"


def setup(d_out: int, d_in: int, dtype: torch.dtype, device: torch.device, seed: int = 0, offset: int = 0,
          huge_pages: bool = False):
    """One layer: an aligned/unaligned pair that differs by a small update, in the stored dtype;
    with ``offset``, each matrix starts that many bytes past a 64-byte boundary; with
    ``huge_pages``, in transparent huge pages."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d_out, d_in, generator=g) * 0.02
    wa = (base + 0.002 * torch.randn(d_out, d_in, generator=g)).to(dtype).to(device)
    wu = base.to(dtype).to(device)
    if not (offset or huge_pages):
        return wa, wu
    return place(wa, offset, huge_pages), place(wu, offset, huge_pages)


_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def read_once(*ts: torch.Tensor) -> list[torch.Tensor]:
    """Read every byte of each tensor once, at the memory's rate: a max over the raw bytes seen as
    integers of the element's width (no conversion, no writes)."""
    return [t.view(_INT_OF_WIDTH[t.element_size()]).max() for t in ts]


def naive(wa: torch.Tensor, wu: torch.Tensor, B: torch.Tensor):
    V = wa.float() - wu.float()
    T = V.t() @ B
    return T, V @ T, float(V.square().sum(dtype=torch.float64))


def materialized(wa: torch.Tensor, wu: torch.Tensor, B: torch.Tensor):
    V = wa.float() - wu.float()
    # ||V|| summed in float64: torch's fp32 norm of a 14336x4096 V is off by 1.8e-3 on an AVX2 CPU
    # (measured: C itself to 2.7e-7), which would fail the check against naive torch
    C = V @ V.t() / math.sqrt(float(V.square().sum(dtype=torch.float64)))
    return C @ B


def naive_full(wa: torch.Tensor, wu: torch.Tensor, dW: torch.Tensor) -> tuple[float, float, float, float]:
    V, D = wa.float() - wu.float(), dW.float()
    M = V.t() @ D
    return tuple(float(x.square().sum(dtype=torch.float64)) for x in (M, V @ M, D, V))


def rel_err(got, want) -> float:
    """Largest relative error over matching outputs (tensors by their largest entry, sums as is);
    inf when the outputs are not as many as the reference's (a missing one is no agreement)."""
    if len(got) != len(want):
        return math.inf
    errs = []
    for g, w in zip(got, want):
        if isinstance(w, torch.Tensor):
            errs.append(float((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-30)))
        else:
            errs.append(abs(g - w) / max(abs(w), 1e-300))
    return math.inf if any(math.isnan(e) for e in errs) else max(errs)  # NaN anywhere: no agreement


def bf16_tflops(device: torch.device, time_ms) -> float:
    """Rate of a bf16 8192^3 matmul on this GPU, measured now (the tensor-core reference)."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / time_ms(lambda: a @ b, 10, 3, stat=min) / 1e9


def pages_of(args: argparse.Namespace, *ws: torch.Tensor) -> dict:
    """The row fields that say which pages held the weights, as measured; a warning when
    --huge-pages asked for 2 MiB pages and the kernel gave fewer."""
    if ws[0].device.type != "cpu":
        return {"pages": "device", "huge_page_share": None}
    shares = [huge_page_share(w) for w in ws]
    if None in shares:  # heap memory: only the THP mode can tell, and only that it is not advised
        share = 0.0 if thp_mode() in ("madvise", "never", "none") else None
    else:
        share = min(shares)
    if args.huge_pages and (share or 0.0) < 0.99:
        print(f"warning: --huge-pages asked for 2 MiB pages, the kernel backed {100 * (share or 0):.0f}% of the "
              "weights with them (fragmented memory, or THP defrag off); rows say what it gave",
              file=sys.stderr, flush=True)
    return {"pages": page_label(share), "huge_page_share": None if share is None else round(share, 3)}


def _rejected(name: str, shape: str, r, err: float, meta: dict) -> dict:
    """A provider whose results disagree with naive torch: reported, left out of the timing (one
    outlier must not end a GPU session's only run)."""
    msg = f"rel err {err:.2e} over the {agreement(name):.0e} allowed"
    print(f"REJECTED {name} at {shape} r={r}: {msg} (not timed)", flush=True)
    return {"provider": name, "shape": shape, "r": r, "error": msg, **meta}


def _raised(name: str, shape: str, r, exc: Exception, meta: dict) -> dict:
    """A provider that raised (a Triton compile or resource error for one precision or rank):
    reported, left out of the timing, and the run goes on with the others."""
    msg = f"raised {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
    print(f"FAILED {name} at {shape} r={r}: {msg} (not timed)", flush=True)
    return {"provider": name, "shape": shape, "r": r, "error": msg, **meta}


def run_fullrank(args: argparse.Namespace, providers: list[str], meta: dict, time_ms,
                 mm: tuple[torch.Tensor, torch.Tensor], flush: Callable[[], object] | None = None,
                 save: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """Full-rank scoring per backend against naive-full and the floor; see the module docstring."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    tc = bf16_tflops(device, time_ms) if device.type == "cuda" else None
    if tc is not None:
        meta["bf16_matmul_tflops"] = round(tc, 1)
        print(f"bf16 matmul rate measured now: {tc:.0f} TFLOP/s", flush=True)
    mm_a, mm_b = mm
    calls: dict[str, Callable] = {}
    for name in providers:
        impl = backends.resolve(name, device.type)[1]
        calls[name] = impl.fullrank_sums
        if name == "triton" and device.type == "cuda":
            for prec in TENSOR_CORE_PRECISIONS:
                calls[f"triton-{prec}"] = (
                    lambda a, u, d, impl=impl, prec=prec: impl.fullrank_sums(a, u, d, precision=prec))
    rows = []
    for shape in args.shapes.split(","):
        d_out, d_in = (int(x) for x in shape.lower().split("x"))
        wa, wu = setup(d_out, d_in, dtype, device, offset=args.offset, huge_pages=args.huge_pages)
        dW = (torch.randn(d_out, d_in, device=device) * 0.001).to(dtype)
        pages = pages_of(args, wa, wu)
        nbytes = 3 * wa.numel() * wa.element_size()
        flops = 4 * d_out * d_in * d_in
        ref = naive_full(wa, wu, dW)
        agreed = {}
        for name, fn in calls.items():
            try:
                err = rel_err(fn(wa, wu, dW), ref)  # every output, ||dW||^2 and ||V||^2 included
            except Exception as exc:
                rows.append(_raised(name, f"{d_out}x{d_in}", "full", exc, meta))
                continue
            if not err <= agreement(name):
                rows.append(_rejected(name, f"{d_out}x{d_in}", "full", err, meta))
            else:
                agreed[name] = fn
        ts = round_robin(device, {
            "read": lambda: read_once(wa, wu, dW), "matmul": lambda: mm_a @ mm_b,
            "naive-full": lambda: naive_full(wa, wu, dW),
            **{name: (lambda fn=fn: fn(wa, wu, dW)) for name, fn in agreed.items()},
        }, args.reps, flush)
        read_ms = min(ts.pop("read"))
        gflops = matmul_gflops(mm_a, min(ts.pop("matmul")))
        arith_ms = flops / gflops / 1e6
        floor_ms = max(read_ms, arith_ms)
        times = {name: statistics.median(v) for name, v in ts.items()}
        naive_ms = times["naive-full"]
        for name, ms in times.items():
            rows.append({
                "provider": name, "shape": f"{d_out}x{d_in}", "r": "full", "time_ms": round(ms, 3),
                "gbps": _sig3(nbytes / ms / 1e6), "tflops": float(f"{flops / ms / 1e9:.4g}"),
                "pct_bf16_mm": round(100 * flops / ms / 1e9 / tc, 1) if tc else None,
                "pct_bf16_peak": (round(100 * flops / ms / 1e9 / meta["bf16_tflops_datasheet"], 1)
                                  if "bf16_tflops_datasheet" in meta else None),
                "x_floor": round(ms / floor_ms, 2), "x_naive": _sig3(naive_ms / ms),
                "floor_ms": round(floor_ms, 3), "read_ms": round(read_ms, 3), "arith_ms": round(arith_ms, 3),
                "loadavg_1m": round(os.getloadavg()[0], 2), "mm_gflops": round(gflops, 1), **pages, **meta,
            })
        _print_rows([r_ for r_ in rows if r_["shape"] == f"{d_out}x{d_in}" and "error" not in r_],
                    header=not any(x["shape"] != f"{d_out}x{d_in}" for x in rows), cols=_COLS_FULL)
        save(rows)
        del wa, wu, dW
    return rows


def run(args: argparse.Namespace, save: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """The rows of the run; ``save`` gets them after every shape and rank (a run cut short keeps them)."""
    device = torch.device(args.device)
    time_ms = timer(device)
    dtype = DTYPES[args.dtype]
    avail = backends.available_backends()
    providers = [n for n in backends.NAMES if avail[n] is None and device.type in
                 next(s for s in backends._SPECS if s.name == n).devices]
    if args.backends:
        providers = [p for p in args.backends.split(",") if p in providers]
    skipped = {n: r for n, r in avail.items() if r is not None}
    print(f"device {device} ({_machine(device)}); backends {', '.join(providers)}"
          + "".join(f"\n  skipped {n}: {r}" for n, r in skipped.items()), flush=True)
    mm_a, mm_b = matmul_operands(device)
    gflops = matmul_gflops(mm_a, time_ms(lambda: mm_a @ mm_b, 5, 1, stat=min))
    print(f"fp32 matmul rate measured now: {gflops:.1f} GFLOP/s (each row's floor uses its own rounds' rate)", flush=True)
    meta = {
        "machine": _machine(device), "host": socket.gethostname(), "device": str(device),
        "date": dt.datetime.now().isoformat(timespec="seconds"), "version": safemerge_ext.__version__,
        "git_sha": _git_sha(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "matmul_gflops": round(gflops, 1), "dtype": args.dtype, "offset_bytes": args.offset,
        "reps": args.reps, "argv": " ".join(sys.argv[1:]),  # (the run can be repeated from its JSON)
    }
    flush = cache_flusher(device)
    if gpu_columns(device):
        meta["copy_gbps"] = round(copy_gbps(device), 1)
        print(f"device-to-device copy measured now: {meta['copy_gbps']:.0f} GB/s (read + write)", flush=True)
        peak = datasheet(device)
        if peak is not None:
            meta["hbm_gbps_datasheet"], meta["bf16_tflops_datasheet"] = peak
    if "cpp" in providers:
        from safemerge_ext import _cpu

        meta["cpp_isa"], meta["cpp_openmp"] = _cpu.isa(), _cpu.openmp()
    if args.fullrank:
        return run_fullrank(args, providers, meta, time_ms, (mm_a, mm_b), flush, save)
    rows = []
    ranks = [int(r) for r in args.ranks.split(",")]
    once = once_timer(device)
    notes: dict[str, str] = {}  # per shape, how the materialized-C baseline ran (printed after the table)
    for shape in args.shapes.split(","):
        d_out, d_in = (int(x) for x in shape.lower().split("x"))
        wa, wu = setup(d_out, d_in, dtype, device, offset=args.offset, huge_pages=args.huge_pages)
        nbytes = 2 * wa.numel() * wa.element_size()
        pages = pages_of(args, wa, wu)
        mat_ms, mat_reps = None, None
        gflop_c = 2 * d_out * d_out * d_in / 1e9
        if want_materialized(args.materialized, device, d_out, d_in):
            Bm = torch.randn(d_out, max(ranks), device=device) * 0.01
            _, P, vsq = naive(wa, wu, Bm)  # C B = P / ||V||: the baseline must compute that before it is timed
            got: list = []
            first_ms = once(lambda: got.append(materialized(wa, wu, Bm)))  # checked, and its warm-up
            err = rel_err((got.pop(),), (P / math.sqrt(vsq),))
            del P
            if not err <= agreement("materialized"):
                raise SystemExit(f"the materialized-C baseline disagrees with naive torch at {d_out}x{d_in} (error {err:.2g})")
            mat_reps = materialized_reps(first_ms, args.reps)
            mat_ms = time_ms(lambda: materialized(wa, wu, Bm), mat_reps, 0)
            mat_note = (f"C formed once per shape, at r={max(ranks)}: median of {mat_reps} timed call"
                        f"{'s' if mat_reps > 1 else ''} after a checked one ({first_ms:.0f} ms)")
        elif args.materialized == "never":
            mat_note = "not run: --materialized never"
        else:
            mat_note = (f"not run on the CPU: C is {d_out}x{d_out} ({gflop_c:.0f} GFLOP, ~{gflop_c / gflops:.0f} s a "
                        f"call at {gflops:.0f} GFLOP/s); --materialized always runs it")
        notes[f"{d_out}x{d_in}"] = mat_note
        for r in ranks:
            B = torch.randn(d_out, r, device=device) * 0.01
            ref = naive(wa, wu, B)
            impls = {name: backends.resolve(name, device.type)[1].lowrank_passes for name in providers}
            impls.update(_cpp_isa_impls(args, impls))
            if "triton" in impls and device.type == "cuda":
                for prec in TENSOR_CORE_PRECISIONS:
                    impls[f"triton-{prec}"] = lambda a, u, b, f=impls["triton"], prec=prec: f(a, u, b, precision=prec)
            for name, impl in list(impls.items()):
                try:
                    err = rel_err(impl(wa, wu, B), ref)  # T, P and ||V||^2
                except Exception as exc:
                    rows.append(_raised(name, f"{d_out}x{d_in}", r, exc, meta))
                    del impls[name]
                    continue
                if not err <= agreement(name):
                    rows.append(_rejected(name, f"{d_out}x{d_in}", r, err, meta))
                    del impls[name]
            ts = round_robin(device, {
                "read": lambda: read_once(wa, wu), "matmul": lambda: mm_a @ mm_b,
                "naive": lambda: naive(wa, wu, B),
                **{name: (lambda impl=impl: impl(wa, wu, B)) for name, impl in impls.items()},
            }, args.reps, flush)
            read_ms = min(ts.pop("read"))
            gflops = matmul_gflops(mm_a, min(ts.pop("matmul")))
            arith_ms = 4 * r * d_out * d_in / gflops / 1e6
            floor_ms = max(read_ms, arith_ms)
            times = {name: statistics.median(v) for name, v in ts.items()}
            naive_ms = times["naive"]
            if mat_ms is not None:
                times["materialized"] = mat_ms
            for name, ms in times.items():
                rows.append({
                    "provider": name, "shape": f"{d_out}x{d_in}", "r": r, "time_ms": round(ms, 3),
                    "gbps": _sig3(nbytes / ms / 1e6), "x_floor": round(ms / floor_ms, 2),
                    "pct_copy_bw": round(100 * nbytes / ms / 1e6 / meta["copy_gbps"], 1) if "copy_gbps" in meta else None,
                    "pct_hbm_peak": (round(100 * nbytes / ms / 1e6 / meta["hbm_gbps_datasheet"], 1)
                                     if "hbm_gbps_datasheet" in meta else None),
                    "x_naive": _sig3(naive_ms / ms),
                    "x_materialized": _sig3(mat_ms / ms) if mat_ms is not None else None,
                    "floor_ms": round(floor_ms, 3), "read_ms": round(read_ms, 3), "arith_ms": round(arith_ms, 3),
                    # (how near the copy bandwidth the floor's own read runs: a slow read would flatter x_floor)
                    "read_pct_copy": (round(100 * nbytes / read_ms / 1e6 / meta["copy_gbps"], 1)
                                      if "copy_gbps" in meta else None),
                    "mm_gflops": round(gflops, 1), "materialized_note": mat_note, "materialized_reps": mat_reps,
                    "loadavg_1m": round(os.getloadavg()[0], 2), **pages, **meta,
                })
            _print_rows([r_ for r_ in rows if r_["shape"] == f"{d_out}x{d_in}" and r_["r"] == r and "error" not in r_],
                        header=not any(x["shape"] != f"{d_out}x{d_in}" or x["r"] != r for x in rows),
                        cols=_COLS_GPU if gpu_columns(device) else _COLS)
            save(rows)
        del wa, wu
    print("\nmaterialized-C baseline (x_materialized):" + "".join(f"\n- {k}: {v}" for k, v in notes.items()), flush=True)
    return rows


def _cpp_isa_impls(args: argparse.Namespace, impls: dict) -> dict:
    """``cpp@<isa>`` contenders: the C++ backend with its kernels' instruction set switched to each
    ISA of ``--cpp-isas`` that this CPU runs, for the call only (the others keep the CPU's pick)."""
    if "cpp" not in impls or not args.cpp_isas:
        return {}
    from safemerge_ext import _cpu

    out, pick = {}, _cpu.isa()
    for isa in args.cpp_isas.split(","):
        if not _cpu.set_isa(isa):
            print(f"  skipped cpp@{isa}: this CPU cannot run those kernels", flush=True)
            continue

        def call(a, u, b, isa=isa, f=impls["cpp"]):
            _cpu.set_isa(isa)
            try:
                return f(a, u, b)
            finally:
                _cpu.set_isa(pick)

        out[f"cpp@{isa}"] = call
    _cpu.set_isa(pick)
    return out


_COLS = ["shape", "r", "provider", "time_ms", "gbps", "x_floor", "x_naive", "x_materialized", "floor_ms",
         "read_ms", "arith_ms", "mm_gflops", "pages"]
_COLS_GPU = (_COLS[:5] + ["pct_copy_bw", "pct_hbm_peak"] + _COLS[5:10] + ["read_pct_copy"]
             + _COLS[10:-1])  # (no "pages" on a GPU)
_COLS_FULL = ["shape", "provider", "time_ms", "tflops", "pct_bf16_mm", "pct_bf16_peak", "x_floor", "x_naive",
              "floor_ms", "read_ms", "arith_ms", "mm_gflops", "pages"]


def _sig3(x: float) -> float:
    """A speed-up or a rate kept to 3 significant digits (two decimals would record a tiny shape's
    0.004 as 0)."""
    return float(f"{x:.3g}")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v and abs(v) < 0.01:  # (a CPU's full-rank TFLOP/s)
            return f"{v:.2g}"
        return f"{v:.2f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _print_rows(rows: list[dict], header: bool, cols: list[str] = _COLS) -> None:
    if header:
        print("| " + " | ".join(cols) + " |")
        print("|" + "|".join("---" for _ in cols) + "|")
    for row in rows:
        print("| " + " | ".join(_fmt(row[c]) for c in cols) + " |", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(LLAMA_SHAPES), help="d_outxd_in list, e.g. 4096x4096,1024x4096")
    p.add_argument("--ranks", default="8,16,64")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", default="", help="comma list to restrict the backends (default: all usable)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--cpp-isas", default="",
                   help="also time the C++ backend with these kernel ISAs (e.g. x86-64-v4-512), as cpp@<isa> rows")
    p.add_argument("--offset", type=int, default=0,
                   help="start each weight matrix this many bytes past a 64-byte boundary, as the pipeline's "
                        "in-place reads of safetensors files do (their data is only 8-byte aligned), e.g. 16")
    p.add_argument("--huge-pages", action="store_true",
                   help="place the weights in transparent huge pages (2 MiB), as the pipeline's are when it maps "
                        "them from large page-cache folios; default: 4 KiB pages, as for tensors torch allocates")
    p.add_argument("--materialized", choices=["auto", "always", "never"], default="auto",
                   help="the materialized-C baseline: auto (default) at every shape on a GPU, on a CPU only where "
                        "d_out^2 d_in <= 4096^3 (above it one call takes ~10-25 s here); always: every shape, "
                        "timed calls cut to what fits in 2 s (at least 1, stated in the rows); never")
    p.add_argument("--quick", action="store_true", help="4096x4096, r=16, 3 reps")
    p.add_argument("--fullrank", action="store_true",
                   help="time the full-fine-tune path (fullrank_sums) instead of the low-rank passes")
    p.add_argument("--out", default="", help="JSON path (default benchmarks/results/scoring-<host>-<date>.json)")
    args = p.parse_args(argv)
    if args.huge_pages and args.device != "cpu":
        p.error("--huge-pages places host memory; use it with --device cpu")
    if args.quick:
        args.shapes, args.ranks, args.reps = "4096x4096", "16", 3
    if args.fullrank and args.shapes == ",".join(LLAMA_SHAPES) and args.device == "cpu":
        args.shapes = "1024x1024,2048x2048,1024x4096"  # 4 d_out d_in^2 flops: seconds per call on a CPU
    kind = "fullrank" if args.fullrank else "scoring"
    out = Path(args.out) if args.out else (
        ROOT / "benchmarks" / "results" / f"{kind}-{socket.gethostname()}-{dt.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    run(args, save=lambda rows: out.write_text(json.dumps(rows, indent=1)))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
