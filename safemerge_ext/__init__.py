"""safemerge-ext: SafeMERGE (selective, safety-preserving layer-wise merging) for LoRA adapters
and full fine-tunes, with native backends and streaming safetensors io.

Importing the package is cheap: no torch, triton or CUDA until an op is used.
"""

__version__ = "0.1.0"

from safemerge_ext.errors import SafeMergeError  # (stdlib only: the import stays cheap)

__all__ = ["SafeMergeError", "__version__"]

# (the start-up hook is loaded by its path, before this package: an attribute like any submodule's)
_hook = __import__("sys").modules.get(__name__ + "._autoload_hook")
if _hook is not None:
    _autoload_hook = _hook
del _hook
