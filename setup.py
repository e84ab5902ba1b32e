"""Native parts of safemerge-ext; everything else is declared in pyproject.toml.

- ``safemerge_ext._cpu`` (csrc/cpu_ops.cpp): always attempted; OpenMP when the compiler accepts
  ``-fopenmp`` (tested on a tiny program first).
- ``safemerge_ext._cuda`` (csrc/*.cu): built when nvcc is found, unless the build is for a CPU
  build of torch (then ``SAFEMERGE_BUILD_CUDA=1`` forces it): the build environment's torch, else
  (pip's build isolation) the one installed where the package goes. Where neither exists, nvcc
  decides: the extension links no torch.
- ``SAFEMERGE_BUILD_CUDA=0`` never builds the CUDA part; ``SAFEMERGE_CUDA_ARCH`` picks its GPUs.
- ``SAFEMERGE_SKIP_NATIVE=1`` builds nothing native.

The build degrades instead of failing: a native part that cannot be compiled is reported and
skipped, and the package falls back to the torch backend (``available_backends()`` says why).
Neither extension includes torch headers, so an installed wheel survives torch upgrades.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension
    import pybind11
except ImportError:  # only when building without build isolation and without pybind11
    Pybind11Extension = None
    pybind11 = None

HERE = Path(__file__).resolve().parent
CSRC = "csrc"


def _say(msg: str) -> None:
    print(f"safemerge-ext build: {msg}", file=sys.stderr, flush=True)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _off(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("0", "false", "no", "off")


def _compiler_accepts(compiler, flags: list[str], source: str) -> bool:
    """Compile and link a tiny C++ program with ``flags``; True when it works."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write(source)
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=flags)
            # (the compile step sees CFLAGS; the executable's link does not see LDFLAGS unless told,
            # and a CFLAGS=-fsanitize=... build would otherwise fail every probe)
            ldflags = shlex.split(os.environ.get("LDFLAGS", ""))
            compiler.link_executable(objs, os.path.join(tmp, "probe"), extra_postargs=flags + ldflags)
            return True
        except Exception:
            return False


_OMP_PROBE = """
#include <omp.h>
int main() { int n = 0;
#pragma omp parallel reduction(+:n)
  n += 1;
  return n > 0 && omp_get_max_threads() > 0 ? 0 : 1; }
"""


# The AMX kernels need a compiler and an assembler that know the tile instructions (GCC 11 or
# clang 12, binutils 2.36); where this fails they are left out (SM_NO_AMX), not the whole module.
_AMX_PROBE = """
#include <immintrin.h>
__attribute__((target("amx-tile,amx-bf16"))) void f(const void* p) {
  _tile_loadd(1, p, 64);
  _tile_dpbf16ps(0, 1, 2);
  _tile_release();
}
int main() { return 0; }
"""


def _cuda_torch() -> tuple[bool | None, str]:
    """Whether the build is for a CUDA build of torch (and which); None: no torch found.

    The build environment's torch, else (pip's build isolation hides the installed packages) the
    torch installed where this package is going (its ``torch/version.py``, read as text, not imported).
    """
    try:
        import torch
    except Exception as exc:
        installed = _installed_torch()
        if installed is not None:
            version, cuda, where = installed
            if cuda is None:
                return False, f"torch {version} installed in {where} is a CPU build"
            return True, f"torch {version} (CUDA {cuda}) installed in {where}"
        return None, (f"torch is not importable in the build environment ({type(exc).__name__}: pip's build "
                      "isolation, or `python -m build`/uv's own build venv?) nor installed where the package goes, "
                      "and the extension links no torch; SAFEMERGE_BUILD_CUDA=0 leaves it out")
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} in the build environment is a CPU build"
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda})"


def _installed_torch() -> tuple[str, str | None, str] | None:
    """(version, CUDA version or None, site dir) of the torch in the target environment's
    site-packages, from its generated ``torch/version.py``; None where there is none or it cannot
    be read."""
    import ast

    paths = sysconfig.get_paths()
    for site in dict.fromkeys((paths.get("platlib"), paths.get("purelib"))):
        if not site:
            continue
        try:
            text = (Path(site) / "torch" / "version.py").read_text()
        except OSError:
            continue
        found = {}
        for key in ("__version__", "cuda"):
            m = re.search(rf"^{key}\s*(?::[^=\n]*)?=\s*(.+?)\s*$", text, re.M)
            try:
                found[key] = ast.literal_eval(m.group(1)) if m else ...
            except (ValueError, SyntaxError):
                found[key] = ...
        if isinstance(found["__version__"], str) and (found["cuda"] is None or isinstance(found["cuda"], str)):
            return found["__version__"], found["cuda"], site
    return None


_CPU_FLAGS = ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-Wno-psabi"]


class BuildNative(build_ext):
    """build_ext that probes OpenMP, compiles .cu sources with nvcc, and skips what fails."""

    def build_extensions(self) -> None:
        cc = self.compiler.compiler_type
        if cc == "msvc" and any(e.name.endswith("._cpu") for e in self.extensions):
            # (csrc/cpu_ops.cpp uses GCC/Clang vector extensions, which MSVC does not have)
            self.extensions = [e for e in self.extensions if not e.name.endswith("._cpu")]
            _say("WARNING: MSVC cannot build safemerge_ext._cpu (its kernels use GCC/Clang vector "
                 "extensions); skipped, the torch backend is used. Build with MinGW-w64 or clang for it")
        for ext in self.extensions:
            if ext.name.endswith("._cpu"):
                ext.extra_compile_args += _CPU_FLAGS
                works = _compiler_accepts(self.compiler, [], "int main() { return 0; }\n")
                if not works:
                    # (then every probe fails too: no OpenMP or AMX verdict, the build's own error follows)
                    cxx = (getattr(self.compiler, "compiler_so", None) or ["?"])[0]
                    _say(f"WARNING: the C++ compiler ({cxx}) does not build a test program; safemerge_ext._cpu is "
                         "tried all the same")
                elif _compiler_accepts(self.compiler, ["-fopenmp"], _OMP_PROBE):
                    ext.extra_compile_args.append("-fopenmp")
                    ext.extra_link_args.append("-fopenmp")
                    _say("C++ extension safemerge_ext._cpu: OpenMP enabled (-fopenmp)")
                else:
                    _say("WARNING: the compiler does not accept -fopenmp; safemerge_ext._cpu is built "
                         "single-threaded")
                if platform.machine().lower() in ("x86_64", "amd64") and works \
                        and not _compiler_accepts(self.compiler, [], _AMX_PROBE):
                    ext.define_macros.append(("SM_NO_AMX", "1"))
                    _say("C++ extension safemerge_ext._cpu: the toolchain cannot build the AMX kernels; "
                         "left out (the AVX-512 ones stay)")
        built, skipped = [], []
        for ext in self.extensions:
            try:
                self.build_extension(ext)
                built.append(ext.name)
            except Exception as exc:  # degrade: the torch backend still works
                skipped.append(ext.name)
                if self.inplace:  # (an older build left in place would load as if this one had worked)
                    Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
                _say(f"WARNING: could not build {ext.name} ({type(exc).__name__}: {exc}); "
                     "that backend will be unavailable, the torch backend still works")
        # drop what failed so that the in-place / editable copy steps do not look for it
        self.extensions = [e for e in self.extensions if e.name in built]
        _say(f"built: {', '.join(built) or 'nothing native'}" + (f"; failed: {', '.join(skipped)}" if skipped else ""))

    def build_extension(self, ext) -> None:
        cu = [s for s in ext.sources if s.endswith(".cu")]
        if not cu:
            return super().build_extension(ext)
        # nvcc compiles the .cu files to objects; the host compiler links them with the rest.
        nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
        build_dir = Path(self.build_temp) / "cuda"
        build_dir.mkdir(parents=True, exist_ok=True)
        include = [f"-I{p}" for p in ext.include_dirs] + [f"-I{sysconfig.get_paths()['include']}"]
        objects = []
        headers = sorted(f"{CSRC}/{p.name}" for p in (HERE / CSRC).glob("*.h"))
        for src in cu:
            obj = build_dir / (Path(src).stem + ".o")
            host = (["-Xcompiler", "/MD"] if os.name == "nt"  # (nvcc's host compiler there is cl.exe; setuptools' CRT)
                    else ["-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden"])
            cmd = [nvcc, "-c", src, "-o", str(obj), "-O3", "-std=c++17", *host, *_nvcc_arch_flags(), *include]
            # (nvcc takes a minute a build: skipped where the object is newer than its sources and
            # was made by this same command, e.g. a second call on a warm GPU machine)
            stamp = obj.with_suffix(".cmd")
            if (not self.force and obj.is_file() and stamp.is_file() and stamp.read_text() == " ".join(cmd)
                    and obj.stat().st_mtime >= max(os.path.getmtime(d) for d in (src, *headers))):
                _say(f"{obj} is up to date")
            else:
                _say(" ".join(cmd))
                stamp.unlink(missing_ok=True)
                subprocess.run(cmd, check=True)
                stamp.write_text(" ".join(cmd))
            objects.append(str(obj))
        ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        ext.extra_objects = list(ext.extra_objects or []) + objects
        # setuptools relinks only when a source or a dependency is newer than the library: the .cu
        # files and the headers are neither once taken out of the sources
        ext.depends = list(ext.depends or []) + cu + headers
        super().build_extension(ext)


CUDA_ARCHS = "75;80;86;89;90"


def _cuda_archs() -> list[str]:
    """The GPU architectures to compile for: SAFEMERGE_CUDA_ARCH ("80;90", "80,90", "80 90", or torch's
    spelling "8.0;9.0+PTX"; empty: the default), else CUDA_ARCHS; ValueError for anything else."""
    text = os.environ.get("SAFEMERGE_CUDA_ARCH", "").strip() or CUDA_ARCHS
    archs = []
    for a in re.split(r"[;,\s]+", text):
        a = a.strip().lower().removesuffix("+ptx")  # (the last one is always also compiled as PTX)
        if not a:
            continue
        m = re.fullmatch(r"(\d+)(?:\.(\d))?([af]?)", a)
        if m is None:
            raise ValueError(f"SAFEMERGE_CUDA_ARCH={text!r}: {a!r} is no GPU architecture; give compute "
                             "capabilities such as \"80;90\" (or 8.0;9.0)")
        archs.append(m.group(1) + (m.group(2) or "") + m.group(3))
    return archs


def _nvcc_arch_flags() -> list[str]:
    """SASS for common data-centre and consumer GPUs plus PTX for newer ones (override with
    SAFEMERGE_CUDA_ARCH, e.g. "80;90")."""
    archs = _cuda_archs()
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    ptx = archs[-1].rstrip("af")  # (PTX for "90a" or "100f" would not JIT on later GPUs)
    flags += ["-gencode", f"arch=compute_{ptx},code=compute_{ptx}"]
    return flags


def _nvcc_release(nvcc: str) -> str | None:
    """The CUDA release nvcc compiles for ("13.0"), or None when it does not say."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _warn_cuda_mismatch(nvcc: str) -> None:
    """The extension links nvcc's own static CUDA runtime, which needs a driver for that CUDA major
    version: with torch built for an older major, the driver may be too old for the extension."""
    try:
        import torch

        torch_cuda = torch.version.cuda
    except Exception:  # (pip's build isolation: the torch installed where the package goes, if any)
        installed = _installed_torch()
        if installed is None:
            _say("note: torch is found neither in the build environment nor where the package goes, so nvcc's "
                 "CUDA release is not checked against torch's; `safemerge backends` says whether the extension "
                 "runs with this driver")
            return
        torch_cuda = installed[1]
    release = _nvcc_release(nvcc)
    if torch_cuda and release and release.split(".")[0] != torch_cuda.split(".")[0]:
        _say(f"WARNING: {nvcc} is CUDA {release} but torch was built for CUDA {torch_cuda}: the CUDA extension "
             f"needs a driver for CUDA {release.split('.')[0]} (if the driver is older, `safemerge backends` says so "
             f"and the other backends are used); put a CUDA {torch_cuda.split('.')[0]} nvcc first on PATH or set NVCC")


def _nvcc_top(nvcc: str) -> str | None:
    """The toolkit nvcc compiles with: a dry run prints it (``#$ TOP=...``), also through a wrapper
    script outside the toolkit (/usr/local/bin/nvcc); None when it does not say."""
    try:
        done = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+?)\s*$", done.stderr + done.stdout, re.M)
    return str(Path(m.group(1)).resolve()) if m else None


def _cuda_lib_dirs(nvcc: str) -> list[str]:
    """Library folders of the CUDA toolkit nvcc belongs to first (its static runtime must match what
    nvcc compiled: CUDA_HOME may name a newer toolkit than the NVCC a user chose to match torch's
    CUDA), then CUDA_HOME's, CUDA_PATH's and /usr/local/cuda's."""
    roots = [_nvcc_top(nvcc), str(Path(nvcc).resolve().parent.parent), os.environ.get("CUDA_HOME"),
             os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    dirs = []
    for root in filter(None, roots):
        for sub in ("lib64", "lib", "lib/x64", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib",
                    "targets/aarch64-linux/lib"):
            p = Path(root) / sub
            if ((p / "libcudart_static.a").exists() or (p / "cudart_static.lib").exists()) and str(p) not in dirs:
                dirs.append(str(p))
    return dirs


def native_extensions() -> list:
    """The extensions to build here, with a line on stderr for each decision."""
    if _flag("SAFEMERGE_SKIP_NATIVE"):
        _say("SAFEMERGE_SKIP_NATIVE=1: building no native extension (the torch backend is used)")
        return []
    if Pybind11Extension is None:
        _say("WARNING: pybind11 is not importable; building no native extension")
        return []
    exts = [
        Pybind11Extension(
            "safemerge_ext._cpu",
            [f"{CSRC}/cpu_ops.cpp"],
            cxx_std=17,  # (GCC/Clang flags: BuildNative adds _CPU_FLAGS, and skips MSVC)
        )
    ]
    _say("C++ extension safemerge_ext._cpu: will build from csrc/cpu_ops.cpp")
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if _off("SAFEMERGE_BUILD_CUDA"):
        _say(f"skipping CUDA extension safemerge_ext._cuda: SAFEMERGE_BUILD_CUDA={os.environ['SAFEMERGE_BUILD_CUDA']}")
        return exts
    forced = _flag("SAFEMERGE_BUILD_CUDA")
    if nvcc:
        try:
            _cuda_archs()
        except ValueError as exc:
            _say(f"WARNING: skipping CUDA extension safemerge_ext._cuda: {exc}")
            return exts
    has_cuda_torch, torch_why = _cuda_torch() if nvcc else (None, "")  # (no torch import without nvcc)
    if nvcc and (has_cuda_torch is not False or forced):
        why = "forced by SAFEMERGE_BUILD_CUDA=1" if forced else torch_why
        _say(f"CUDA extension safemerge_ext._cuda: will build with {nvcc} ({why})")
        _warn_cuda_mismatch(nvcc)
        exts.append(
            Pybind11Extension(
                "safemerge_ext._cuda",
                [f"{CSRC}/cuda_bindings.cpp"] + sorted(f"{CSRC}/{p.name}" for p in (HERE / CSRC).glob("*.cu")),
                cxx_std=17,
                # static runtime: no libcudart.so needed at import; torch's streams are driver handles
                library_dirs=_cuda_lib_dirs(nvcc),
                # (dl, rt and pthread are glibc's; Windows links cudart_static.lib alone)
                libraries=["cudart_static"] if os.name == "nt" else ["cudart_static", "dl", "rt", "pthread"],
            )
        )
    else:
        reason = "nvcc not found on PATH (set NVCC or CUDA_HOME/bin on PATH)" if not nvcc else (
            f"{torch_why}; set SAFEMERGE_BUILD_CUDA=1 to build it anyway"
        )
        _say(f"skipping CUDA extension safemerge_ext._cuda: {reason}")
    return exts


def _autoload_build_py() -> type:
    """build_py that also ships safemerge_ext_autoload.pth (mergekit autoload; see safemerge_ext/_pth_build.py)."""
    import importlib.util

    from setuptools.command.build_py import build_py

    spec = importlib.util.spec_from_file_location("_safemerge_pth_build", HERE / "safemerge_ext" / "_pth_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.with_autoload_pth(build_py)


setup(ext_modules=native_extensions(), cmdclass={"build_ext": BuildNative, "build_py": _autoload_build_py()})
