"""Write a safetensors file one tensor at a time, so a multi-GB shard never sits in memory.

The format is an 8-byte little-endian header length, a JSON header (dtype, shape and byte range of
every tensor, padded with spaces to 8 bytes), then the raw little-endian bytes in header order.
The header is laid out up front from the shapes and dtypes; tensors are then appended in that
order and each is checked against its declared shape and dtype. Files load with ``safe_open``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import torch

if TYPE_CHECKING:
    from safemerge_ext.io.models import ModelReader

_CODES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


class StreamingWriter:
    """``with StreamingWriter(path, [(name, shape, dtype), ...]) as w: w.write(name, tensor) ...``"""

    def __init__(self, path: str | os.PathLike, layout: Sequence[tuple[str, Sequence[int], torch.dtype]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self._layout = [(n, tuple(int(s) for s in shape), dt) for n, shape, dt in layout]
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, shape, dt in self._layout:
            n = dt.itemsize
            for s in shape:
                n *= s
            header[name] = {"dtype": _CODES[dt], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        # unbuffered: tensors are large writes, and copy_from appends through the descriptor
        self._f = open(self.path, "wb", buffering=0)
        self._write_all(memoryview(struct.pack("<Q", len(blob)) + blob))
        self._next = 0
        self.nbytes = offset

    def _expect(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        want_name, want_shape, want_dt = self._layout[self._next]
        if name != want_name or shape != want_shape or dtype != want_dt:
            raise ValueError(
                f"{self.path.name}: expected {want_name} {want_shape} {want_dt} next, got {name} {shape} {dtype}"
            )

    def _write_all(self, view: memoryview) -> None:
        while view:
            view = view[self._f.write(view):]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor of the layout (it must come in layout order)."""
        self._expect(name, tuple(tensor.shape), tensor.dtype)
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._write_all(memoryview(raw.numpy()))
        self._next += 1

    def write_parts(self, name: str, shape: Sequence[int], dtype: torch.dtype, parts: Iterable[torch.Tensor]) -> None:
        """Append the next tensor of the layout as consecutive parts (row blocks, in order), so it
        is never whole in memory; the parts must add up to exactly its bytes."""
        self._expect(name, tuple(int(x) for x in shape), dtype)
        want = dtype.itemsize * math.prod(shape)
        done = 0
        for part in parts:
            if part.dtype != dtype:
                raise ValueError(f"{self.path.name}: a part of {name} is {part.dtype}, not {dtype}")
            raw = part.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            done += raw.numel()
            if done > want:
                break
            self._write_all(memoryview(raw.numpy()))
        if done != want:
            raise ValueError(f"{self.path.name}: the parts of {name} hold {done} bytes, not {want}")
        self._next += 1

    def copy_from(self, name: str, reader: "ModelReader") -> None:
        """Append the next tensor of the layout as ``reader`` holds it, byte for byte, copied
        between the files inside the kernel (``ModelReader.copy_into``): an unchanged tensor never
        passes through this process's memory."""
        shape, dtype = reader.meta(name)
        self._expect(name, tuple(shape), dtype)
        reader.copy_into(name, self._f.fileno())
        self._next += 1

    def close(self) -> None:
        complete = self._next == len(self._layout)
        self._f.close()
        if not complete:
            raise ValueError(f"{self.path}: only {self._next} of {len(self._layout)} tensors were written")

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()
