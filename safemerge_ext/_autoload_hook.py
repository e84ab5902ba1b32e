"""Start-up hook (loaded by ``safemerge_ext_autoload.pth``): registers safemerge-ext's mergekit
methods right after ``mergekit.merge_methods.registry`` is first imported.

mergekit has no plugin discovery, so plain ``mergekit-yaml`` can only find ``safemerge`` if
something registers it in the same interpreter. This module installs a one-shot meta-path finder
that wraps the registry module's loader; it imports only ``os`` and ``sys`` (never torch or
mergekit) so that interpreter start-up stays as cheap as before. ``SAFEMERGE_NO_AUTOLOAD=1``
turns it off.

The .pth line loads this file by its path, as ``safemerge_ext._autoload_hook``, without importing
the package: at start-up the working directory is not yet on ``sys.path``, so an imported package
would be the installed copy even for a program run from a source checkout (``python -m pytest``
there). The package is imported when mergekit's registry is, from whatever ``sys.path`` says then.
"""

from __future__ import annotations

import os
import sys

TARGET = "mergekit.merge_methods.registry"
ENV = "SAFEMERGE_NO_AUTOLOAD"


def disabled() -> bool:
    """True when ``SAFEMERGE_NO_AUTOLOAD`` is set to anything but empty/0/false/no/off (as
    ``safemerge_ext._env.switched_on`` reads it; not imported: it is in the package)."""
    return os.environ.get(ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


pending = False  # set when the registry was imported from inside safemerge_ext.mergekit_methods


def _register() -> None:
    global pending
    if disabled():
        return
    partial = sys.modules.get("safemerge_ext.mergekit_methods")
    if partial is not None and not hasattr(partial, "register_methods"):
        pending = True  # that module is still initialising; it registers when it is done
        return
    try:
        from safemerge_ext.mergekit_methods import register_methods

        register_methods()
    except Exception as exc:  # never break mergekit because of the plugin
        import warnings

        msg = (f"safemerge-ext: could not register the mergekit methods ({type(exc).__name__}: {exc}); "
               f"use safemerge-yaml, or set {ENV}=1 to silence this")
        try:
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        except Exception:  # (warnings as errors, -W error: the warning must not become mergekit's import error)
            print(f"warning: {msg}", file=sys.stderr)


class _LoaderProxy:
    """Delegates to the real loader; runs the registration after the module has executed."""

    def __init__(self, loader: object) -> None:
        self._loader = loader

    def create_module(self, spec):  # noqa: ANN001 - importlib protocol
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class RegistryFinder:
    """Meta-path finder that only answers for mergekit's registry module, then removes itself."""

    def find_spec(self, fullname: str, path=None, target=None):  # noqa: ANN001
        if fullname != TARGET:
            return None
        uninstall()
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _LoaderProxy(spec.loader)
        return spec


def install() -> bool:
    """Install the finder (once); register at once if mergekit's registry is already imported."""
    if disabled():
        return False
    if TARGET in sys.modules:
        _register()
        return True
    if not any(isinstance(f, RegistryFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, RegistryFinder())
    return True


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, RegistryFinder)]


install()
