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
from typing import TYPE_CHECKING, Iterable, Sequence, Union

import torch

if TYPE_CHECKING:
    from safemerge_ext.io.models import ModelReader

# Bits per element of every dtype code of the safetensors format (sub-byte codes pack elements).
DTYPE_BITS = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8,
    "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8, "C64": 64,
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4,
}
# The codes torch can hold, as torch dtypes (float8_e8m0fnu is torch >= 2.7).
TORCH_DTYPES = {
    code: dt for code, dt in {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
        "BOOL": torch.bool, "C64": torch.complex64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
        "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),
    }.items() if dt is not None
}
_CODES = {dt: code for code, dt in TORCH_DTYPES.items()}

# A layout entry: name, shape and dtype (a torch dtype or a safetensors code), and optionally the
# byte count (needed only for a code whose element size is unknown here).
Entry = Union[tuple[str, Sequence[int], Union[torch.dtype, str]], tuple[str, Sequence[int], Union[torch.dtype, str], int]]


def dtype_code(dtype: torch.dtype | str) -> str:
    """The safetensors code of a torch dtype (a code is returned as it is)."""
    if isinstance(dtype, str):
        return dtype
    try:
        return _CODES[dtype]
    except KeyError:
        raise ValueError(f"safetensors has no dtype for {dtype}") from None


def tensor_nbytes(code: str, shape: Sequence[int]) -> int | None:
    """Bytes of a tensor of this code and shape (None: an unknown code, or bits that do not fill
    whole bytes)."""
    bits = DTYPE_BITS.get(code)
    if bits is None or bits * math.prod(shape) % 8:
        return None
    return bits * math.prod(shape) // 8


class StreamingWriter:
    """``with StreamingWriter(path, [(name, shape, dtype), ...]) as w: w.write(name, tensor) ...``"""

    def __init__(self, path: str | os.PathLike, layout: Sequence[Entry], metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self._layout: list[tuple[str, tuple[int, ...], str, int]] = []
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, shape, dt, *given in layout:
            shape, code = tuple(int(s) for s in shape), dtype_code(dt)
            n = given[0] if given else tensor_nbytes(code, shape)
            if n is None:
                raise ValueError(f"{self.path.name}: the size of {name} ({code} {shape}) is unknown; give its byte count")
            self._layout.append((name, shape, code, n))
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        # unbuffered: tensors are large writes, and copy_from appends through the descriptor
        self._f = open(self.path, "wb", buffering=0)
        self._write_all(memoryview(struct.pack("<Q", len(blob)) + blob))
        self._next = 0
        self.nbytes = offset

    def _expect(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | str) -> int:
        """Check the next entry is this tensor; return its byte count."""
        want_name, want_shape, want_code, nbytes = self._layout[self._next]
        code = dtype_code(dtype)
        if name != want_name or shape != want_shape or code != want_code:
            raise ValueError(
                f"{self.path.name}: expected {want_name} {want_shape} {want_code} next, got {name} {shape} {code}"
            )
        return nbytes

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
        want = self._expect(name, tuple(int(x) for x in shape), dtype)
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
        shape, code, nbytes = reader.layout(name)
        want = self._expect(name, tuple(shape), code)
        if nbytes != want:
            raise ValueError(f"{self.path.name}: {name} holds {nbytes} bytes in {reader.path}, not the {want} laid out")
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
