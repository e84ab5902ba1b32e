"""safemerge-ext: SafeMERGE (selective, safety-preserving layer-wise merging) for LoRA adapters
and full fine-tunes, with native backends and streaming safetensors io.

Importing the package is cheap: no torch, triton or CUDA until an op is used.
"""

__version__ = "0.1.0"
