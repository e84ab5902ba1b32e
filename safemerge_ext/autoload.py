"""Switch the mergekit autoload on or off in the active environment: ``safemerge autoload ...``.

The switch is one file, ``safemerge_ext_autoload.pth``, in the environment's site-packages. Its one
line loads :mod:`safemerge_ext._autoload_hook` at interpreter start-up (stdlib only; by its path, not
importing the package, so a source checkout run from its folder still imports its own), which
registers the ``safemerge``, ``safelora`` and ``resta`` methods the moment mergekit imports its
method registry, so plain ``mergekit-yaml`` finds them. ``pip install .`` installs the file;
editable installs get it from the build hook as well where setuptools allows (see README), and
:func:`enable` writes it when they do not.
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
from pathlib import Path

from safemerge_ext._env import switched_on
from safemerge_ext.errors import SafeMergeError

PTH_NAME = "safemerge_ext_autoload.pth"
PTH_LINE = (  # (any failure is swallowed: a half-installed package must not print at every start)
    'import sys; exec("try:\\n from importlib.util import find_spec, module_from_spec, spec_from_file_location\\n'
    ' from os.path import join\\n n = \'safemerge_ext._autoload_hook\'\\n'
    ' s = spec_from_file_location(n, join(find_spec(\'safemerge_ext\').submodule_search_locations[0], \'_autoload_hook.py\'))\\n'
    ' sys.modules[n] = m = module_from_spec(s)\\n s.loader.exec_module(m)\\n'
    'except Exception:\\n sys.modules.pop(\'safemerge_ext._autoload_hook\', None)")\n'
)
ENV = "SAFEMERGE_NO_AUTOLOAD"


def site_packages() -> Path:
    """The active environment's site-packages (where pip installs pure-Python packages)."""
    return Path(sysconfig.get_paths()["purelib"])


def _site_dirs() -> list[Path]:
    """The folders whose .pth files Python processes at start-up: the site directories (a venv's,
    the system's where the venv includes them, the user's), not every folder on sys.path (a
    checkout on PYTHONPATH holds this project's .pth too, and Python never runs it from there)."""
    dirs = [site_packages()] + [Path(p) for p in site.getsitepackages()]
    if site.ENABLE_USER_SITE and site.getusersitepackages():
        dirs.append(Path(site.getusersitepackages()))
    return dirs


def _pth_files() -> list[Path]:
    """Every copy of the .pth in a site directory (a venv with system site-packages can see two)."""
    dirs = _site_dirs()
    seen, found = set(), []
    for d in dirs:
        f = d / PTH_NAME
        key = str(f.resolve()) if f.exists() else str(f)
        if key not in seen and f.is_file():
            seen.add(key)
            found.append(f)
    return found


def enable(target: str | os.PathLike | None = None) -> str:
    """Write the .pth into ``target`` (default: the active site-packages); return a message."""
    d = Path(target) if target is not None else site_packages()
    f = d / PTH_NAME
    if f.is_file() and f.read_text(encoding="utf-8") == PTH_LINE:
        return f"autoload already enabled: {f}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        f.write_text(PTH_LINE, encoding="utf-8")
    except OSError as exc:
        raise SafeMergeError(
            f"cannot write {f} ({exc.strerror}): run this with the environment's own python, or with write access"
        ) from None
    return f"autoload enabled: {f} (plain mergekit-yaml now finds safemerge, safelora, resta)"


def disable(target: str | os.PathLike | None = None) -> str:
    """Remove the .pth from ``target`` (default: the active site-packages); return a message."""
    d = Path(target) if target is not None else site_packages()
    f = d / PTH_NAME
    if not f.is_file():
        others = [str(p) for p in _pth_files() if p.parent.resolve() != d.resolve()]
        tail = f"; another copy is active: {', '.join(others)}" if others else ""
        return f"autoload already disabled: no {f}{tail}"
    try:
        f.unlink()
    except OSError as exc:
        raise SafeMergeError(f"cannot remove {f} ({exc.strerror}): run this with write access") from None
    return (f"autoload disabled: removed {f} (plain mergekit-yaml no longer finds the methods, safemerge-yaml "
            "still does; `safemerge autoload enable` puts it back)")


_FINDS = ("import site, sys\n"
          "for d in sys.argv[1:]: site.addsitedir(d)\n"
          "from mergekit.merge_methods import registry\n"
          "print(' '.join(sorted({m.spec.name for m in registry.registered_methods()} & {'safemerge', 'safelora', 'resta'})))")


def mergekit_finds(*site_dirs: str | os.PathLike) -> tuple[list[str] | None, str]:
    """The methods of this package that mergekit registers in a fresh interpreter of this environment
    (``site_dirs`` added as site directories, their .pth files run), as plain mergekit-yaml would see
    them; (None, why) when that interpreter cannot tell (mergekit missing, an import that fails)."""
    import subprocess

    try:
        res = subprocess.run([sys.executable, "-c", _FINDS, *map(str, site_dirs)], capture_output=True, text=True,
                             timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, str(exc)
    if res.returncode != 0:
        return None, (res.stderr.strip().splitlines() or ["no output"])[-1]
    return res.stdout.split(), ""


def status(check: bool = False) -> str:
    """Where the .pth is, whether the env var turns it off, whether the hook runs in this process, and
    (``check``) whether a fresh interpreter's mergekit finds the methods, which takes a few seconds."""
    files = _pth_files()
    off = switched_on(ENV)
    hook = "safemerge_ext._autoload_hook" in sys.modules
    lines = [
        f"autoload .pth: {', '.join(map(str, files))}" if files else f"autoload .pth: not installed in {site_packages()}",
        f"{ENV}: {'set (autoload off)' if off else 'not set'}",
        "hook loaded in this interpreter: " + (("yes, inactive (" + ENV + ")" if off else "yes") if hook else "no"),
    ]
    if "mergekit.merge_methods.registry" in sys.modules:
        from mergekit.merge_methods import registry

        names = {m.spec.name for m in registry.registered_methods()}
        mine = [n for n in ("safemerge", "safelora", "resta") if n in names]
        lines.append(f"registered with mergekit here: {', '.join(mine) or 'none'}")
    if check and files and not off:
        found, why = mergekit_finds()
        lines.append(f"mergekit-yaml finds: {', '.join(found) or 'none of them (the hook ran but did not register)'}"
                     if found is not None else f"mergekit-yaml finds: cannot tell ({why})")
    lines.append("state: " + ("enabled" if files and not off else "disabled"))
    return "\n".join(lines)
