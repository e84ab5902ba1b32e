"""Write a full model: the aligned model's shards, streamed, with merged updates added.

Each shard is written one tensor at a time (the safetensors header is laid out from the source
headers first): a tensor with an update is read, patched and written, and every other tensor is
copied file to file inside the kernel without entering the process, so memory holds at most one
patched tensor, whatever the shard or the embedding's size. Sharding and the index are kept, and
every other file of the folder (config, generation config, tokenizer, chat template) is copied.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch
from safemerge_ext.errors import SafeMergeError
from safemerge_ext.io.models import INDEX, ModelReader
from safemerge_ext.io.safetensors_stream import StreamingWriter

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy config, generation config, tokenizer and other small non-weight files."""
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and f.name != INDEX:
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def write_model(
    reader: ModelReader,
    out_dir: Path,
    update_for: Callable[[str], torch.Tensor | None],
    on_tensor: Callable[[str], None] | None = None,
) -> int:
    """Write ``reader``'s model to ``out_dir`` with ``W + update_for(name)`` where an update exists.

    Updates are added in fp32 and rounded once to the weight's dtype. Returns bytes written.
    """
    written = 0
    for shard, names in reader.shards().items():
        layout = [(name, *reader.meta(name)) for name in names]
        with StreamingWriter(out_dir / shard, layout) as out:
            for name in names:
                upd = update_for(name)
                if upd is None:  # unchanged: file to file inside the kernel
                    out.copy_from(name, reader)
                else:
                    w = reader.get(name)
                    if tuple(upd.shape) != tuple(w.shape):
                        raise SafeMergeError(
                            f"update for {name} has shape {tuple(upd.shape)} but the weight {tuple(w.shape)}"
                        )
                    out.write(name, (w.float() + upd.to(device="cpu", dtype=torch.float32)).to(w.dtype))
                if on_tensor is not None:
                    on_tensor(name)
            written += out.nbytes
    if reader.is_sharded:
        shutil.copy2(reader.path / INDEX, out_dir / INDEX)
    copy_side_files(reader.path, out_dir)
    return written
