"""What a user installs from: the sdist carries every source setup.py builds from (the CUDA ones
included) and what the tests need, never build outputs; the console scripts fail in one line when
an optional dependency is missing."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _setup_module(monkeypatch) -> dict:
    """setup.py's definitions, run as a module (``setup()`` not called, no extension decided at load)."""
    import runpy

    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.setenv("SAFEMERGE_SKIP_NATIVE", "1")
    monkeypatch.chdir(ROOT)
    mod = runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")
    monkeypatch.delenv("SAFEMERGE_SKIP_NATIVE")
    return mod


def test_sdist_carries_the_sources_and_no_build_outputs(tmp_path):
    """Built from a copy of the tracked files (a checkout's egg-info would add every file it ever
    listed) with the usual outputs planted beside them: every tracked source, recipe, test and
    example is in, and no build output, benchmark data, demo or experiment work folder."""
    import shutil

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split("\n")
    tracked = [t for t in tracked if t and (ROOT / t).is_file()]
    if not tracked:
        pytest.skip("not a git checkout")
    src = tmp_path / "src"
    for t in tracked:
        (src / t).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / t, src / t)
    planted = ["safemerge_ext/_cpu.cpython-311-x86_64-linux-gnu.so", "build/temp/cpu_ops.o", "demo/aligned/model.safetensors",
               "benchmarks/data/llama-1b/aligned/model.safetensors", "examples/safety_effect/work/merged/model.safetensors"]
    for p in planted:
        (src / p).parent.mkdir(parents=True, exist_ok=True)
        (src / p).write_bytes(b"output")
    env = {**os.environ, "SAFEMERGE_SKIP_NATIVE": "1"}
    done = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path / "dist")], cwd=src,
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = [t for t in tracked if t.startswith(("csrc/", "kernels/", "tests/", "recipes/", "examples/"))]
    assert set(wanted) <= names, f"missing from the sdist: {sorted(set(wanted) - names)}"
    assert "safemerge_ext_autoload.pth" in names and "pyproject.toml" in names and "setup.py" in names
    junk = [n for n in names if n.endswith((".so", ".o", ".pyc")) or n.startswith(("benchmarks/data", "build/", "demo/",
                                                                                    "examples/safety_effect/work"))]
    assert not junk, junk


def test_safemerge_yaml_without_mergekit_is_one_line(monkeypatch, capsys):
    import safemerge_ext
    from safemerge_ext.cli import yaml_main

    monkeypatch.delattr(safemerge_ext, "yaml_cli", raising=False)
    monkeypatch.delitem(sys.modules, "safemerge_ext.yaml_cli", raising=False)
    for name in ("mergekit", "mergekit.config"):  # (as Python reads a None there: not installed)
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(SystemExit) as done:
        yaml_main(["r.yml", "out"])
    err = capsys.readouterr().err.strip()
    assert done.value.code == 1 and err.count("\n") == 0 and "pip install 'safemerge-ext[mergekit]'" in err


def test_wheel_ships_the_autoload_pth(tmp_path):
    """A regular install (pip install ., from this wheel) puts the autoload .pth into site-packages:
    the wheel carries it at its root and lists it in RECORD (the editable install is what CI runs;
    SPEC section 2 asks for both modes)."""
    import zipfile

    from safemerge_ext import autoload

    src = tmp_path / "src"
    src.mkdir()
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True)
    if archive.returncode != 0:
        pytest.skip("not a git checkout")
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("safemerge_ext-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert z.read(autoload.PTH_NAME).decode() == autoload.PTH_LINE
        record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        assert any(line.split(",")[0] == autoload.PTH_NAME for line in z.read(record).decode().splitlines())
        assert any(n.startswith("safemerge_ext/_cpu.") for n in z.namelist()), "the C++ extension is not in the wheel"


def test_cuda_extension_relinks_when_its_kernels_or_headers_change(monkeypatch, tmp_path):
    """nvcc turns the .cu files into objects that setuptools links; it relinks only when a source or
    a dependency is newer than the library, so the .cu files and the headers must be dependencies
    (without them, an edited kernel left the old library in place)."""
    from setuptools.command.build_ext import build_ext

    mod = _setup_module(monkeypatch)
    monkeypatch.setenv("NVCC", "nvcc-that-is-not-run")
    seen = {"nvcc": []}

    def nvcc(cmd, **kw):
        seen["nvcc"].append(cmd)
        Path(cmd[cmd.index("-o") + 1]).write_bytes(b"object")

    monkeypatch.setattr(mod["subprocess"], "run", nvcc)
    monkeypatch.setattr(build_ext, "build_extension", lambda self, ext: seen.__setitem__("ext", ext))

    def build():
        class Ext:
            name, include_dirs, extra_objects, depends = "safemerge_ext._cuda", [], [], []
            sources = ["csrc/cuda_bindings.cpp", "csrc/cuda_ops.cu"]

        cmd = mod["BuildNative"].__new__(mod["BuildNative"])
        cmd.build_temp, cmd.force = str(tmp_path), False
        cmd.build_extension(Ext())
        return len(seen["nvcc"])

    assert build() == 1
    ext = seen["ext"]
    assert seen["nvcc"][0][:3] == ["nvcc-that-is-not-run", "-c", "csrc/cuda_ops.cu"]
    assert ext.sources == ["csrc/cuda_bindings.cpp"] and ext.extra_objects == [str(tmp_path / "cuda" / "cuda_ops.o")]
    headers = sorted(f"csrc/{p.name}" for p in (ROOT / "csrc").glob("*.h"))
    assert headers and set(ext.depends) == {"csrc/cuda_ops.cu", *headers}
    # nvcc runs again only for a newer source or header, or another command (a warm GPU machine
    # called twice spent a minute on it each time)
    assert build() == 1 and seen["ext"].extra_objects == [str(tmp_path / "cuda" / "cuda_ops.o")]
    obj = tmp_path / "cuda" / "cuda_ops.o"
    os.utime(obj, (1, 1))  # (older than the sources)
    assert build() == 2
    monkeypatch.setenv("SAFEMERGE_CUDA_ARCH", "80")
    assert build() == 3 and build() == 3


_VERSION_PY = """from typing import Optional

__all__ = ['__version__', 'debug', 'cuda', 'git_version', 'hip', 'rocm', 'xpu']
__version__ = '{version}'
debug = False
cuda: Optional[str] = {cuda!r}
git_version = '0123456789abcdef'
hip: Optional[str] = None
"""


@pytest.mark.parametrize("torch_build", ["not-importable", "isolated-cpu", "isolated-cuda", "cuda", "cpu"])
def test_the_cuda_extension_is_built_where_nvcc_is_unless_torch_is_a_cpu_build(monkeypatch, capsys, tmp_path,
                                                                              torch_build):
    """With nvcc found, the CUDA extension is built for a CUDA torch and also where there is no torch
    at all (the extension links no torch), and skipped, saying why, for a CPU build of torch
    (SAFEMERGE_BUILD_CUDA=1 forces it). Under pip's build isolation the build environment has no
    torch: the one installed where the package goes decides (its torch/version.py, not imported)."""
    import sysconfig
    import types

    mod = _setup_module(monkeypatch)
    monkeypatch.delenv("SAFEMERGE_BUILD_CUDA", raising=False)
    monkeypatch.setenv("NVCC", "/opt/cuda/bin/nvcc-that-is-not-run")
    importable = torch_build in ("cuda", "cpu")
    fake = types.SimpleNamespace(__version__="2.13.0", version=types.SimpleNamespace(
        cuda="12.8" if torch_build == "cuda" else None)) if importable else None
    monkeypatch.setitem(sys.modules, "torch", fake)
    site = tmp_path / "site-packages"  # where the package goes; a torch there only when isolated-*
    site.mkdir()
    if torch_build.startswith("isolated-"):
        (site / "torch").mkdir()
        cuda = "12.8" if torch_build == "isolated-cuda" else None
        version = "2.13.0" if cuda else "2.13.0+cpu"
        (site / "torch" / "version.py").write_text(_VERSION_PY.format(version=version, cuda=cuda))
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"purelib": str(site), "platlib": str(site)})
    capsys.readouterr()
    names = [e.name for e in mod["native_extensions"]()]
    said = capsys.readouterr().err
    if torch_build in ("cpu", "isolated-cpu"):
        assert names == ["safemerge_ext._cpu"]
        where = "in the build environment" if torch_build == "cpu" else f"installed in {site}"
        version = "2.13.0" if torch_build == "cpu" else "2.13.0+cpu"
        assert f"skipping CUDA extension safemerge_ext._cuda: torch {version} {where} is a CPU build" in said, said
        monkeypatch.setenv("SAFEMERGE_BUILD_CUDA", "1")
        assert [e.name for e in mod["native_extensions"]()] == ["safemerge_ext._cpu", "safemerge_ext._cuda"]
    else:
        assert names == ["safemerge_ext._cpu", "safemerge_ext._cuda"], said
        assert "will build with /opt/cuda/bin/nvcc-that-is-not-run" in said
        assert ("build isolation" in said) == (torch_build == "not-importable")
        assert (f"(CUDA 12.8) installed in {site}" in said) == (torch_build == "isolated-cuda"), said


@pytest.mark.parametrize("value, archs", [("", ["75", "80", "86", "89", "90"]), ("80;90", ["80", "90"]),
                                          ("80, 90", ["80", "90"]), ("80 90a", ["80", "90a"]),
                                          ("8.0;9.0+PTX", ["80", "90"]), ("sm_80", None), ("8.0.1", None)])
def test_cuda_arch_setting_is_read_as_nvcc_and_torch_write_it(monkeypatch, capsys, value, archs):
    """SAFEMERGE_CUDA_ARCH: empty is the default list (it was an IndexError, and no CUDA extension), torch's
    "8.0;9.0+PTX" spelling is taken; anything else skips the CUDA extension with a line naming the setting."""
    mod = _setup_module(monkeypatch)
    monkeypatch.setenv("SAFEMERGE_CUDA_ARCH", value)
    monkeypatch.setenv("NVCC", "/opt/cuda/bin/nvcc-that-is-not-run")
    monkeypatch.setitem(sys.modules, "torch", None)
    if archs is None:
        with pytest.raises(ValueError, match="SAFEMERGE_CUDA_ARCH=.* is no GPU architecture"):
            mod["_cuda_archs"]()
        capsys.readouterr()
        assert [e.name for e in mod["native_extensions"]()] == ["safemerge_ext._cpu"]
        assert "skipping CUDA extension safemerge_ext._cuda: SAFEMERGE_CUDA_ARCH=" in capsys.readouterr().err
        return
    assert mod["_cuda_archs"]() == archs
    flags = mod["_nvcc_arch_flags"]()
    ptx = {"90a": "90"}.get(archs[-1], archs[-1])  # (an arch-specific "a" PTX would not JIT on later GPUs)
    assert flags[-1] == f"arch=compute_{ptx},code=compute_{ptx}"
    assert [f for f in flags[1::2]][:-1] == [f"arch=compute_{a},code=sm_{a}" for a in archs]


def _fake_toolkit(root: Path) -> Path:
    """A toolkit folder with a static runtime and an nvcc whose dry run names it, as the real one does."""
    (root / "bin").mkdir(parents=True)
    (root / "lib64").mkdir()
    (root / "lib64" / "libcudart_static.a").write_bytes(b"")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f'#!/bin/sh\necho "#$ _HERE_={root}/bin" >&2\necho "#$ TOP={root}/bin/.." >&2\n')
    nvcc.chmod(0o755)
    return nvcc


@pytest.mark.parametrize("through", ["nvcc", "wrapper"])
def test_the_cuda_runtime_linked_is_nvccs_own(monkeypatch, tmp_path, through):
    """NVCC set to a CUDA 12 toolkit to match torch (the advice the mismatch warning gives) while
    CUDA_HOME names CUDA 13: the objects nvcc 12 compiled are linked with CUDA 12's static runtime
    (CUDA_HOME's came first, and the extension then needed a CUDA 13 driver); also where NVCC is a
    wrapper script outside the toolkit (review132)."""
    mod = _setup_module(monkeypatch)
    nvcc = _fake_toolkit(tmp_path / "cuda-12.4")
    _fake_toolkit(tmp_path / "cuda-13.0")
    if through == "wrapper":
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "nvcc").write_text(f'#!/bin/sh\nexec {nvcc} "$@"\n')
        (tmp_path / "bin" / "nvcc").chmod(0o755)
        nvcc = tmp_path / "bin" / "nvcc"
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda-13.0"))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    dirs = mod["_cuda_lib_dirs"](str(nvcc))
    assert dirs[0] == str(tmp_path / "cuda-12.4" / "lib64") and str(tmp_path / "cuda-13.0" / "lib64") in dirs


@pytest.mark.parametrize("layout, runtime", [("targets/aarch64-linux/lib", "libcudart_static.a"),  # (Jetson)
                                             ("lib/x64", "cudart_static.lib")])  # (Windows)
def test_the_cuda_runtime_is_found_where_other_toolkits_keep_it(monkeypatch, tmp_path, layout, runtime):
    """A Jetson toolkit keeps its static runtime under targets/aarch64-linux/lib, a Windows one
    under lib/x64 as cudart_static.lib: the build links it from there (review141)."""
    mod = _setup_module(monkeypatch)
    nvcc = _fake_toolkit(tmp_path / "cuda")
    (tmp_path / "cuda" / "lib64" / "libcudart_static.a").unlink()
    (tmp_path / "cuda" / layout).mkdir(parents=True)
    (tmp_path / "cuda" / layout / runtime).write_bytes(b"")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    assert mod["_cuda_lib_dirs"](str(nvcc))[0] == str(tmp_path / "cuda" / layout)  # (then /usr/local/cuda's, if any)


def test_the_real_nvcc_names_its_toolkit(monkeypatch, tmp_path):
    """The dry run the build reads the toolkit from works with the nvcc on PATH (a wrapper script
    here), whatever CUDA_HOME says."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found on PATH")
    mod = _setup_module(monkeypatch)
    top = mod["_nvcc_top"](nvcc)
    assert top is not None and Path(top, "bin", "nvcc").is_file()
    monkeypatch.setenv("CUDA_HOME", str(_fake_toolkit(tmp_path / "other").parent.parent))
    dirs = mod["_cuda_lib_dirs"](nvcc)
    if (Path(top) / "lib64" / "libcudart_static.a").exists():
        assert dirs[0] == str(Path(top) / "lib64")


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_build_cuda_off_skips_the_cuda_extension(monkeypatch, capsys, value):
    """SAFEMERGE_BUILD_CUDA=0 skips nvcc (a minute or more of every install) where it would build."""
    mod = _setup_module(monkeypatch)
    monkeypatch.setenv("SAFEMERGE_BUILD_CUDA", value)
    monkeypatch.setenv("NVCC", "/opt/cuda/bin/nvcc-that-is-not-run")
    monkeypatch.setitem(sys.modules, "torch", None)
    capsys.readouterr()
    assert [e.name for e in mod["native_extensions"]()] == ["safemerge_ext._cpu"]
    assert f"skipping CUDA extension safemerge_ext._cuda: SAFEMERGE_BUILD_CUDA={value}" in capsys.readouterr().err


def test_under_build_isolation_nvccs_release_is_checked_against_the_installed_torch(monkeypatch, capsys, tmp_path):
    """The CUDA-release check (the extension's static runtime needs a driver for nvcc's major) also
    reads the torch installed where the package goes when the build environment has none."""
    import sysconfig

    mod = _setup_module(monkeypatch)
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.48'\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("NVCC", str(nvcc))
    monkeypatch.setitem(sys.modules, "torch", None)  # (not importable: pip's build isolation)
    site = tmp_path / "site-packages"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "version.py").write_text(_VERSION_PY.format(version="2.7.0", cuda="12.8"))
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"purelib": str(site), "platlib": str(site)})
    capsys.readouterr()
    assert [e.name for e in mod["native_extensions"]()] == ["safemerge_ext._cpu", "safemerge_ext._cuda"]
    said = capsys.readouterr().err
    assert f"WARNING: {nvcc} is CUDA 13.0 but torch was built for CUDA 12.8" in said, said


def test_without_nvcc_the_build_does_not_import_torch(monkeypatch, capsys):
    """Without nvcc there is no CUDA decision to make: the build says so and never imports torch
    (whose import, before pip has installed numpy, prints a NumPy warning into the install)."""
    mod = _setup_module(monkeypatch)
    monkeypatch.delenv("NVCC", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    imported = []

    class Watch:  # (and stops it: a torch imported again into this process would not be the same)
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                imported.append(name)
                raise ImportError("torch is not to be imported here")
            return None

    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Watch(), *sys.meta_path])
    capsys.readouterr()
    assert [e.name for e in mod["native_extensions"]()] == ["safemerge_ext._cpu"]
    assert "skipping CUDA extension safemerge_ext._cuda: nvcc not found on PATH" in capsys.readouterr().err
    assert imported == []


def test_an_extension_that_fails_to_build_leaves_no_older_build_in_place(monkeypatch, tmp_path):
    """A failed build of an extension degrades to the other backends; an older build of it left in
    place (an in-place build on a warm machine) would load as if this one had worked."""
    import types

    mod = _setup_module(monkeypatch)
    stale = tmp_path / "_cuda.cpython-311-x86_64-linux-gnu.so"
    stale.write_bytes(b"an older build")
    cmd = mod["BuildNative"].__new__(mod["BuildNative"])
    cmd.compiler = types.SimpleNamespace(compiler_type="unix")
    cmd.extensions = [types.SimpleNamespace(name="safemerge_ext._cuda")]
    cmd.inplace = True
    cmd.get_ext_fullpath = lambda name: str(stale)
    cmd.build_extension = lambda ext: (_ for _ in ()).throw(RuntimeError("nvcc failed"))
    cmd.build_extensions()
    assert not stale.exists() and cmd.extensions == []


def test_msvc_skips_the_cpu_extension_with_a_reason_and_gnu_compilers_get_its_flags(monkeypatch, capsys):
    """csrc/cpu_ops.cpp uses GCC/Clang vector extensions: under MSVC the build skips it with one
    line (the torch backend is used) instead of failing on GNU flags; GCC/Clang get -O3 etc."""
    import types

    mod = _setup_module(monkeypatch)
    monkeypatch.setitem(mod, "_compiler_accepts", lambda *a, **k: False)
    built = []
    for cc in ("msvc", "unix"):
        cmd = mod["BuildNative"].__new__(mod["BuildNative"])
        cmd.compiler = types.SimpleNamespace(compiler_type=cc)
        cpu = types.SimpleNamespace(name="safemerge_ext._cpu", extra_compile_args=[], extra_link_args=[],
                                    define_macros=[])
        cmd.extensions = [cpu]
        cmd.inplace = False
        cmd.build_extension = lambda ext, cc=cc: built.append((cc, ext.name, list(ext.extra_compile_args)))
        cmd.build_extensions()
    err = capsys.readouterr().err
    assert "MSVC cannot build safemerge_ext._cpu" in err and "built: nothing native" in err
    assert built == [("unix", "safemerge_ext._cpu", mod["_CPU_FLAGS"])] and "-O3" in mod["_CPU_FLAGS"]


def test_the_checkouts_kernels_folder_does_not_shadow_hugging_faces_kernels():
    """transformers >= 5.25 imports Hugging Face's `kernels` package; run from this checkout's root
    (`python -m pytest`, `python -c`), the top-level kernels/ folder (safemerge_ext.kernels once
    installed) must hand that name over where the package is installed."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed here")
    res = subprocess.run([sys.executable, "-c", "import kernels, safemerge_ext.kernels as ours; "
                          "print(kernels.__file__); print(ours.NAME)"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    hf, ours = res.stdout.split()
    assert not Path(hf).resolve().is_relative_to(ROOT / "kernels") and ours == "triton", res.stdout


def test_backends_command_gives_each_unavailable_backends_reason(monkeypatch, capsys):
    """`safemerge backends` prints the reason, not only 'unavailable' (the README test
    compares the first word of each line only)."""
    from safemerge_ext import backends
    from safemerge_ext.cli import main

    monkeypatch.setattr(backends, "available_backends", lambda load=False: {
        "triton": "no CUDA device", "cuda": "the CUDA extension was not built", "cpp": None, "torch": None})
    monkeypatch.setattr(backends, "backend_detail", lambda name: "baseline kernels, 2 threads" if name == "cpp" else None)
    assert main(["backends"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "triton  unavailable: no CUDA device", "cuda    unavailable: the CUDA extension was not built",
        "cpp     available (baseline kernels, 2 threads)", "torch   available"]


def test_autoload_status_command_asks_what_mergekit_finds(monkeypatch, capsys, tmp_path):
    """`safemerge autoload status` runs the fresh-interpreter check (the one CLI test of it
    sets SAFEMERGE_NO_AUTOLOAD, where the check is skipped either way)."""
    from safemerge_ext import autoload
    from safemerge_ext.cli import main

    monkeypatch.delenv("SAFEMERGE_NO_AUTOLOAD", raising=False)
    monkeypatch.setattr(autoload, "_pth_files", lambda: [tmp_path / autoload.PTH_NAME])
    monkeypatch.setattr(autoload, "mergekit_finds", lambda *d: (["resta", "safelora", "safemerge"], ""))
    assert main(["autoload", "status"]) == 0
    out = capsys.readouterr().out
    assert "\nmergekit-yaml finds: resta, safelora, safemerge\nstate: enabled" in out, out


@pytest.mark.parametrize("value, off", [("", False), ("0", False), ("false", False), ("no", False), ("off", False),
                                        (" OFF ", False), ("1", True), ("yes", True), ("true", True)])
def test_the_switch_reads_the_same_in_the_hook_and_the_package(monkeypatch, value, off):
    """SAFEMERGE_NO_AUTOLOAD=0/false/no/off leaves the autoload on, in the start-up hook
    and in `safemerge autoload status` alike."""
    from safemerge_ext import _autoload_hook, _env, autoload

    monkeypatch.setenv("SAFEMERGE_NO_AUTOLOAD", value)
    assert _autoload_hook.disabled() is off
    assert _env.switched_on("SAFEMERGE_NO_AUTOLOAD") is off
    if off:  # (on, status would run its fresh-interpreter check)
        assert autoload.status().endswith("state: disabled")


def _only_sites(monkeypatch, venv, user=None):
    from safemerge_ext import autoload

    monkeypatch.setattr(autoload, "site_packages", lambda: venv)
    monkeypatch.setattr(site, "getsitepackages", lambda: [str(venv)])
    monkeypatch.setattr(site, "ENABLE_USER_SITE", user is not None)
    monkeypatch.setattr(site, "getusersitepackages", lambda: str(user) if user else "")


def test_disable_names_a_copy_in_another_site_directory(tmp_path, monkeypatch):
    """disable in a venv whose .pth is absent, while one in the user site is active: says so."""
    from safemerge_ext import autoload

    venv, user = tmp_path / "venv", tmp_path / "user"
    venv.mkdir()
    autoload.enable(user)
    _only_sites(monkeypatch, venv, user)
    msg = autoload.disable()
    assert msg.startswith("autoload already disabled") and f"another copy is active: {user / autoload.PTH_NAME}" in msg


def test_a_pth_in_the_user_site_counts(tmp_path, monkeypatch):
    """pip install --user puts the .pth in the user site, which Python runs at start-up."""
    from safemerge_ext import autoload

    venv, user = tmp_path / "venv", tmp_path / "user"
    venv.mkdir()
    autoload.enable(user)
    _only_sites(monkeypatch, venv, user)
    assert autoload._pth_files() == [user / autoload.PTH_NAME]
    assert autoload.status().endswith("state: enabled")


def test_enable_rewrites_a_stale_pth(tmp_path):
    """A .pth of another version (another line) is replaced, not taken as enabled."""
    from safemerge_ext import autoload

    f = tmp_path / autoload.PTH_NAME
    f.write_text("import safemerge_ext._old_hook\n")
    assert autoload.enable(tmp_path).startswith("autoload enabled: ")
    assert f.read_text() == autoload.PTH_LINE


def test_a_checkout_that_hides_the_installed_package_is_named(monkeypatch, tmp_path):
    """`python -m safemerge_ext ...` in the checkout after a plain `pip install .` imports the
    checkout's package, which has no built extension: the backends' reason said to reinstall, which
    does not help (review138); it names the checkout. Not where the installed copy is this one."""
    from importlib import metadata

    from safemerge_ext import _native

    class Installed:
        files = ["safemerge_ext/__init__.py"]

        def __init__(self, site: Path) -> None:
            self.site = site

        def locate_file(self, f):
            return self.site / str(f)

    monkeypatch.setattr(metadata, "distribution", lambda name: Installed(tmp_path / "site-packages"))
    assert _native.checkout_hint() == (f" (safemerge_ext is imported from the source checkout {ROOT}, not the "
                                       "installed copy: run from another folder, use the `safemerge` command, or "
                                       "`pip install -e .`)")
    monkeypatch.setattr(metadata, "distribution", lambda name: Installed(ROOT))  # (the checkout is the install)
    assert _native.checkout_hint() == ""


@pytest.mark.parametrize("case", ["old", "missing"])
def test_make_setup_names_a_python_too_old_before_anything_is_installed(tmp_path, case):
    """`make setup` with a Python before 3.10 (macOS' Command Line Tools give 3.9) made the venv and
    then failed at torch with pip's ResolutionImpossible, no word of the Python: now one line names
    it, and nothing is made."""
    if case == "old":
        import glob

        found = [shutil.which(f"python3.{v}") for v in (9, 8, 7)] + sorted(
            glob.glob(os.path.expanduser("~/.pyenv/versions/3.[6-9].*/bin/python3")))
        runs = [(p, subprocess.run([p, "-c", "import platform; print(platform.python_version())"],
                                   capture_output=True, text=True)) for p in found if p]
        python, version = next(((p, r.stdout.strip()) for p, r in runs if r.returncode == 0), (None, None))
        if python is None:
            pytest.skip("no Python before 3.10 on this machine")
        want = f"{python} is Python {version}; safemerge-ext needs Python 3.10 or later"
    else:
        python = str(tmp_path / "no-such-python")
        want = f"{python} was not found; safemerge-ext needs Python 3.10 or later"
    venv = tmp_path / "venv"
    done = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), f"VENV={venv}", f"PYTHON={python}", "setup"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stdout.startswith(want), (done.stdout, done.stderr)
    assert not venv.exists()
