"""Build hook (used by setup.py, stdlib + setuptools only): ship ``safemerge_ext_autoload.pth``.

A regular build copies the .pth into ``build_lib`` so that ``pip install .`` puts it in
site-packages. setuptools' editable wheels (PEP 660) do not take files from ``build_lib``; they
take every file under the unpacked wheel, which is the ``install`` command's ``install_lib`` in
editable mode, so the .pth goes there. If a future setuptools changes that, the editable install
simply has no .pth and ``safemerge autoload enable`` writes it.
"""

from __future__ import annotations

import os
import shutil

PTH = "safemerge_ext_autoload.pth"
# the same line as safemerge_ext.autoload.PTH_LINE (a test keeps them equal); used when the file is
# not beside setup.py, e.g. in an sdist without it
LINE = (  # (any failure is swallowed: a half-installed package must not print at every start)
    'import sys; exec("try:\\n from importlib.util import find_spec, module_from_spec, spec_from_file_location\\n'
    ' from os.path import join\\n n = \'safemerge_ext._autoload_hook\'\\n'
    ' s = spec_from_file_location(n, join(find_spec(\'safemerge_ext\').submodule_search_locations[0], \'_autoload_hook.py\'))\\n'
    ' sys.modules[n] = m = module_from_spec(s)\\n s.loader.exec_module(m)\\n'
    'except Exception:\\n sys.modules.pop(\'safemerge_ext._autoload_hook\', None)")\n'
)


def with_autoload_pth(base: type) -> type:
    """A subclass of the build_py command ``base`` that also ships the autoload .pth."""

    class BuildPyWithAutoload(base):  # type: ignore[misc, valid-type]
        def run(self) -> None:
            super().run()
            src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PTH)
            if getattr(self, "editable_mode", False):
                dest_dir = self.get_finalized_command("install").install_lib
                if not dest_dir or not any(n.endswith(".dist-info") for n in os.listdir(dest_dir)):
                    print(f"safemerge-ext build: editable install without {PTH}; "
                          "run `safemerge autoload enable`", flush=True)
                    return
            else:
                dest_dir = self.build_lib
            os.makedirs(dest_dir, exist_ok=True)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(dest_dir, PTH))
            else:
                with open(os.path.join(dest_dir, PTH), "w", encoding="utf-8") as fh:
                    fh.write(LINE)
            if not getattr(self, "editable_mode", False):
                self._autoload_outputs = [os.path.join(dest_dir, PTH)]

        def get_outputs(self, *args, **kwargs) -> list[str]:
            return list(super().get_outputs(*args, **kwargs)) + list(getattr(self, "_autoload_outputs", []))

    return BuildPyWithAutoload
