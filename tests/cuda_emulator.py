"""Builds csrc/cuda_ops.cu and csrc/cuda_bindings.cpp for the CPU over tests/cuda_emu/cuda_emu.h
(a CPU emulation of the CUDA features the kernels use), so the CUDA kernels and their host code run
on machines without a GPU. The module has the real extension's functions over host pointers."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
HEADER = Path(__file__).resolve().parent / "cuda_emu" / "cuda_emu.h"
_LAUNCH = re.compile(r"^([ \t]*)([A-Za-z_]\w*(?:<[^<>;]*>)?)<<<", re.M)
_CUDA_INCLUDE = re.compile(r"^#include <cuda[\w_]*\.h>\n", re.M)


def _split_top(text: str) -> list[str]:
    """Split at the commas outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def rewrite_launches(src: str) -> tuple[str, int]:
    """``k<<<grid, block, smem, stream>>>(args);`` -> ``::emu::launch(grid, block, [&] { k(args); });``
    for every launch (each begins a line); returns the new source and the number rewritten."""
    out, pos, count = [], 0, 0
    for m in _LAUNCH.finditer(src):
        if m.start() < pos:
            continue
        cfg_end = src.index(">>>", m.end())
        grid, block, *_ = _split_top(src[m.end():cfg_end])
        i = cfg_end + 3
        assert src[i] == "(", f"launch of {m.group(2)}: no argument list"
        depth = 0
        for j in range(i, len(src)):
            depth += src[j] == "("
            depth -= src[j] == ")"
            if depth == 0:
                break
        assert src[j + 1] == ";", f"launch of {m.group(2)}: no ';' after its arguments"
        out.append(src[pos:m.start()])
        out.append(f"{m.group(1)}::emu::launch({grid}, {block}, [&] {{ {m.group(2)}{src[i:j + 1]}; }});")
        pos = j + 2
        count += 1
    out.append(src[pos:])
    return "".join(out), count


def _cpu_has_fma() -> bool:
    try:
        return any(line.startswith("flags") and " fma " in f"{line} " for line in open("/proc/cpuinfo"))
    except OSError:
        return False


def build(tmp: Path) -> ModuleType:
    """Compile the emulated extension into ``tmp`` and import it (as ``cuda_emulated._cuda``)."""
    import pybind11

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise FileNotFoundError("no C++ compiler (g++) on PATH")
    src = (ROOT / "csrc" / "cuda_ops.cu").read_text()
    src, launches = rewrite_launches(_CUDA_INCLUDE.sub("", src))
    if launches != (ROOT / "csrc" / "cuda_ops.cu").read_text().count("<<<") or "<<<" in src:
        raise AssertionError(f"rewrote {launches} launches of csrc/cuda_ops.cu but it has others")
    cu = tmp / "cuda_ops_emulated.cpp"
    cu.write_text(src)
    so = tmp / ("_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    # (-U_FORTIFY_SOURCE: a fortified longjmp refuses to jump between the fibers' stacks; the
    # sanitizers report out-of-bounds indexing of fixed arrays (shared tiles among them), misaligned
    # accesses (which a GPU faults on and x86 allows) and int overflow, on stderr; a multiply and an
    # add are fused where the CPU can, as nvcc fuses them: at -O1 only with expensive optimizations)
    fma = ["-mfma", "-ffp-contract=fast", "-fexpensive-optimizations"] if _cpu_has_fma() else []
    cmd = [cxx, "-O1", "-U_FORTIFY_SOURCE", "-fsanitize=bounds,alignment,signed-integer-overflow", *fma, "-shared",
           "-fPIC", "-std=c++17", "-Wall", "-Wno-unknown-pragmas", "-include", str(HEADER), f"-I{ROOT / 'csrc'}",
           f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}", str(cu),
           str(ROOT / "csrc" / "cuda_bindings.cpp"), "-o", str(so)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}")
    spec = importlib.util.spec_from_file_location("cuda_emulated._cuda", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def route_cuda_backend(monkeypatch, module: ModuleType, sms: int) -> None:
    """Point ``safemerge_ext.cuda_backend`` at ``module`` (the emulated build, or the sm_90 one)
    for CPU tensors: its calls then run with host pointers, ``sms`` SMs, device 0 and stream 0."""
    import contextlib

    from safemerge_ext import cuda_backend

    monkeypatch.setattr(cuda_backend, "_cuda", module)
    monkeypatch.setattr(cuda_backend, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cuda_backend, "_DEVICE_TYPE", "cpu")
    monkeypatch.setattr(cuda_backend, "_sm_count", lambda dev: sms)
    monkeypatch.setattr(cuda_backend, "_on", lambda dev: contextlib.nullcontext())
    monkeypatch.setattr(cuda_backend, "_stream", lambda dev: 0)
    monkeypatch.setattr(cuda_backend, "_index", lambda dev: 0)
