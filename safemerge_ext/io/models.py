"""Read single tensors from a Hugging Face model folder without loading the model.

A folder holds ``model.safetensors`` or shards listed by ``model.safetensors.index.json``. Shapes
and dtypes come from the safetensors headers; a tensor's bytes are read only when asked for, via
``safe_open`` (memory-mapped), and counted in ``bytes_read``.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open

from safemerge_ext.errors import SafeMergeError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_BIN_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")

_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def natural_key(name: str) -> tuple:
    """Sort key that puts layers.2 before layers.10 (model order, not string order)."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


class ModelReader:
    """Lazy, per-tensor access to a safetensors model folder; ``flag`` names it in errors."""

    def __init__(self, path: str | os.PathLike, flag: str = "model") -> None:
        self.path = Path(path)
        self.flag = flag
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._handles: dict[str, object] = {}
        self._weight_map = self._read_layout()
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    def _read_layout(self) -> dict[str, str]:
        p = self.path
        if not p.is_dir():
            raise SafeMergeError(f"{self.flag} {p}: no such directory; give a local Hugging Face model folder")
        if (p / INDEX).is_file():
            try:
                weight_map = json.loads((p / INDEX).read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise SafeMergeError(f"{self.flag} {p / INDEX}: not a valid safetensors index ({exc}); re-save the model") from None
            for shard in sorted(set(weight_map.values())):
                if not (p / shard).is_file():
                    raise SafeMergeError(
                        f"{self.flag} {p / INDEX} lists shard {shard}, which is missing; copy the complete model folder"
                    )
            return dict(weight_map)
        if (p / SINGLE).is_file():
            with safe_open(p / SINGLE, framework="pt") as f:
                return {k: SINGLE for k in f.keys()}
        bins = [b.name for pat in _BIN_PATTERNS for b in p.glob(pat)]
        if bins:
            raise SafeMergeError(
                f"{self.flag} {p} has only PyTorch checkpoints ({bins[0]}): convert it to safetensors first, e.g. "
                f"AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
            )
        raise SafeMergeError(f"{self.flag} {p}: no {SINGLE} or {INDEX}; give a Hugging Face model folder saved with safetensors")

    # -- layout -------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """All tensor names, in model order."""
        return sorted(self._weight_map, key=natural_key)

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def shard_of(self, name: str) -> str:
        return self._weight_map[name]

    def shards(self) -> "OrderedDict[str, list[str]]":
        """Shard file -> its tensor names (model order), shards in file-name order."""
        out: OrderedDict[str, list[str]] = OrderedDict()
        for shard in sorted(set(self._weight_map.values())):
            out[shard] = []
        for name in self.names:
            out[self._weight_map[name]].append(name)
        return out

    @property
    def is_sharded(self) -> bool:
        return (self.path / INDEX).is_file()

    def _handle(self, shard: str):
        with self._lock:
            h = self._handles.get(shard)
            if h is None:
                try:
                    h = safe_open(self.path / shard, framework="pt", device="cpu")
                except Exception as exc:
                    raise SafeMergeError(f"{self.flag} {self.path / shard}: cannot read safetensors file ({exc})") from None
                self._handles[shard] = h
            return h

    def _check(self, name: str) -> str:
        shard = self._weight_map.get(name)
        if shard is None:
            raise SafeMergeError(f"{self.flag} {self.path}: tensor {name} is missing; the models must share an architecture")
        return shard

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of a tensor from the file header, without reading its data."""
        if name not in self._meta:
            sl = self._handle(self._check(name)).get_slice(name)
            dt = sl.get_dtype()
            self._meta[name] = (tuple(sl.get_shape()), _DTYPES.get(dt, dt))
        return self._meta[name]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (CPU) and count its bytes."""
        t = self._handle(self._check(name)).get_tensor(name)
        with self._lock:
            self.bytes_read += t.numel() * t.element_size()
        return t

    def close(self) -> None:
        with self._lock:
            self._handles.clear()

    def __enter__(self) -> "ModelReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def resolve_module(self, module: str) -> str | None:
        """The weight name of a linear module (``module + '.weight'``), tolerating one wrapper prefix."""
        exact = f"{module}.weight"
        if exact in self._weight_map:
            return exact
        hits = [n for n in self._weight_map if n.endswith("." + exact) or exact.endswith("." + n)]
        return hits[0] if len(hits) == 1 else None
