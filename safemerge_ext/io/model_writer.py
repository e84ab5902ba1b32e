"""Write a full model: the aligned model's shards, streamed, with merged updates added.

Each shard is written one tensor at a time (the safetensors header is laid out from the source
headers first): a tensor with an update is read, patched and written a block of rows at a time,
and every other tensor is copied file to file inside the kernel, so memory holds a few MiB of one
tensor, whatever the tensors' or the shards' size; every floating tensor is checked for NaN/Inf
first, by a thread reading ahead of the writer (a bounded distance: LOOKAHEAD_BYTES). Sharding
and the index are kept, and every other file of the folder (config, generation config, tokenizer,
chat template) is copied.
"""

from __future__ import annotations

import json
import math
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import accumulate
from pathlib import Path
from typing import Callable, Collection, Iterator, Union

import torch
from safemerge_ext.errors import SafeMergeError
from safemerge_ext.io.models import INDEX, ModelReader, stored_names, ties_embeddings
from safemerge_ext.io.safetensors_stream import StreamingWriter

# weights in any format (PyTorch, TF, Flax, GGUF, rust-bert, TFLite, ONNX, NumPy, Core ML): a copy
# would load as the unmerged model in the tools that read it
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".ot", ".tflite",
                    ".onnx", ".onnx_data", ".npz", ".mlmodel")


# the report a run writes beside its output (report.REPORT_JSON, REPORT_PNG): one found in the
# input is an earlier run's, about another merge
RUN_FILES = ("safemerge_report.json", "safemerge_report.png", "mergekit_config.yml")


def _merge_card(f: Path) -> bool:
    """Whether ``f`` is the model card mergekit wrote for an earlier merge (a ``mergekit`` tag in
    its front matter): it describes that merge, not this output."""
    if f.name != "README.md":
        return False
    try:
        with open(f, encoding="utf-8", errors="replace") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    front = head.split("\n---", 1)[0] if head.startswith("---") else ""
    return any(line.strip() == "- mergekit" for line in front.splitlines())


def side_files(src: Path) -> list[Path]:
    """The files :func:`copy_side_files` copies: config, generation config, tokenizer and other small
    non-weight files (not weights, nor an index of weights: a pytorch_model.bin.index.json beside the
    safetensors would name files the output does not have; nor what describes an earlier run where
    ``src`` is itself a merge: its report, mergekit's recipe and card, hidden files such as a report's
    sidecar)."""
    return [f for f in sorted(src.iterdir())
            if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and not f.name.endswith(".index.json")
            and f.name not in RUN_FILES and not f.name.startswith(".") and not _merge_card(f)]


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy :func:`side_files` of ``src`` into ``dst``."""
    copied = []
    for f in side_files(src):
        shutil.copyfile(f, dst / f.name)  # (contents only: the output's files all get the umask's mode)
        copied.append(f.name)
    return copied


# A weight's update: dense (same shape as the weight), or low-rank factors (B, A) whose product is
# the update (B: d_out x r with any scale folded in, A: r x d_in).
Update = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]

# Rows patched at once: about this many bytes of the fp32 working copy. Small, because glibc keeps
# freed blocks of a few MiB in its heap: 8 MiB blocks left 1B --output model 42 MB higher after
# writing, 2 MiB blocks 8 MB (peak +2 MB), in the same time.
PATCH_BYTES = 2 << 20

# How far (bytes of tensors, in write order) the NaN/Inf check may read ahead of the tensor being
# written: enough to keep it ahead, small enough that the pages it brought in are still cached
# when the copy reads them (else a model larger than the page cache is read from disk twice).
LOOKAHEAD_BYTES = 1 << 30


def write_model(
    reader: ModelReader,
    out_dir: Path,
    update_for: Callable[[str], Update | None],
    on_tensor: Callable[[str], None] | None = None,
    checked: Collection[str] = (),
    warnings: list[str] | None = None,
) -> int:
    """Write ``reader``'s model to ``out_dir`` with ``W + update_for(name)`` where an update exists.

    Updates are added in fp32 and rounded once to the weight's dtype, a block of rows at a time
    (the weight's rows read as needed, a low-rank update's rows formed as needed), so a patched
    tensor is never whole in memory either. Every floating tensor is checked for NaN/Inf before
    it is written, except those in ``checked`` (the caller has: the scored weights). An output head
    that gets an update is untied from the input embeddings in the output's config (see
    :func:`untie_updated_head`; said in ``warnings``). Returns bytes written.
    """
    _check_index(reader)
    written = 0
    updated: list[str] = []

    def tracked(name: str) -> Update | None:
        upd = update_for(name)
        if upd is not None:
            updated.append(name)
        return upd

    # Every floating tensor is checked for NaN/Inf by a thread that reads ahead of the writer (one
    # chunk of PATCH_BYTES in memory; on a cold cache its reads also bring the copy's pages in).
    with _FiniteAhead(reader, checked) as finite:
        written = _write_shards(reader, out_dir, tracked, on_tensor, finite)
    if reader.is_sharded:
        shutil.copyfile(reader.path / INDEX, out_dir / INDEX)
    copy_side_files(reader.path, out_dir)
    note = untie_updated_head(out_dir, updated)
    if note and warnings is not None:
        warnings.append(note)
    return written


_HEAD_WEIGHTS = ("lm_head.weight", "embed_out.weight")


def _is_head(name: str) -> bool:
    return name in _HEAD_WEIGHTS or name.endswith(tuple("." + h for h in _HEAD_WEIGHTS))


def untie_stored_head(folder: Path) -> str | None:
    """:func:`untie_updated_head` for a model another tool wrote (mergekit, from a task model that
    PEFT untied): a head the output stores is the one the merge computed, so a config that ties it
    to the embeddings is untied; returns what was done, or None."""
    try:  # (safetensors, or mergekit's --no-safe-serialization .bin files)
        names = stored_names(folder, "the output")
    except SafeMergeError:
        return None
    return untie_updated_head(folder, [n for n in names if _is_head(n)])


def untie_updated_head(out_dir: Path, updated: Collection[str]) -> str | None:
    """A config that ties the output head to the input embeddings (``tie_word_embeddings``), in a
    checkpoint that stores the head anyway, makes loaders that honour the tie (vLLM, for one) use
    the embeddings as the head: the head's update would be dropped. When the head was updated, the
    output's config unties it; returns what was done, or None."""
    head = next((n for n in updated if _is_head(n)), None)
    path = out_dir / "config.json"
    if head is None or not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict) or not ties_embeddings(out_dir):
        return None
    holders = [c for c in (cfg, cfg.get("text_config")) if isinstance(c, dict) and c.get("tie_word_embeddings")]
    if not holders:  # (tied by the config class's default, which the file leaves out)
        holders = [c for c in (cfg, cfg.get("text_config")) if isinstance(c, dict)]
    for c in holders:
        c["tie_word_embeddings"] = False
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return (f"{head} is written as its own tensor, but the config ties it to the input embeddings "
            "(tie_word_embeddings); the output's config.json unties them (tie_word_embeddings: false), so "
            "loaders use the written head")


def check_model_output(reader: ModelReader) -> None:
    """What :func:`write_model` needs of the model, from its headers alone, so that a run can refuse
    before it reads any weight: every shard's header parses and lays out, the index lists every
    tensor, and every side file it copies can be read."""
    _check_index(reader)
    for names in reader.shards().values():
        for name in names:
            reader.layout(name)
    for f in side_files(reader.path):  # (copied after every shard is written: an unreadable one fails now)
        try:
            with open(f, "rb"):
                pass
        except OSError as exc:
            raise SafeMergeError(f"{reader.flag} {f}: cannot read it ({exc.strerror or exc}), and --output model "
                                 "copies it; give this user read access to it") from None


def _check_index(reader: ModelReader) -> None:
    """Every tensor of every shard is one the index lists: the output is laid out from the index, and
    a tensor it leaves out (which transformers still loads from the shard) would be dropped."""
    for shard, names in reader.shards().items():
        extra = sorted(set(reader.shard_names(shard)) - set(names))
        if extra:
            raise SafeMergeError(
                f"{reader.flag} {reader.path / shard} holds {len(extra)} tensor(s) that {INDEX} does not list "
                f"(e.g. {extra[0]}): the index is out of date; list them in it (or remove them from the shard)"
            )


class _FiniteAhead:
    """The NaN/Inf checks of a model's floating tensors (but ``checked``), in write order, by one
    thread that reads at most LOOKAHEAD_BYTES past the start of the tensor being written (a tensor
    is checked ahead only where it ends within that; the one being written always is):
    ``ok(name)`` as the writer reaches ``name``."""

    def __init__(self, reader: ModelReader, checked: Collection[str]) -> None:
        self.reader = reader
        self.order = [name for names in reader.shards(as_stored=True).values() for name in names]
        sizes = [reader.layout(n)[2] for n in self.order]
        self.start = dict(zip(self.order, accumulate(sizes, initial=0)))
        self.end = {n: self.start[n] + size for n, size in zip(self.order, sizes)}
        self.todo = [n for n in self.order if n not in checked and reader.holds_floats(n)]
        self.next = 0  # todo[next:] not yet submitted
        self.futures: dict[str, Future] = {}
        self.scratch = torch.empty(PATCH_BYTES, dtype=torch.uint8, device="cpu")
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="safemerge-nan-scan")

    def __enter__(self) -> "_FiniteAhead":
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def ok(self, name: str) -> bool:
        limit = self.start[name] + LOOKAHEAD_BYTES
        while self.next < len(self.todo) and (self.end[self.todo[self.next]] <= limit
                                              or self.todo[self.next] == name):
            ahead = self.todo[self.next]
            self.futures[ahead] = self.pool.submit(self.reader.scan_finite, ahead, self.scratch)
            self.next += 1
        found = self.futures.pop(name, None)
        return True if found is None else found.result()


def _write_shards(reader: ModelReader, out_dir: Path, update_for: Callable[[str], Update | None],
                  on_tensor: Callable[[str], None] | None, finite: _FiniteAhead) -> int:
    written = 0
    for shard, names in reader.shards(as_stored=True).items():
        layout = [(name, *reader.layout(name)) for name in names]
        with StreamingWriter(out_dir / shard, layout, metadata=reader.metadata(shard)) as out:
            for name in names:
                if not finite.ok(name):
                    raise SafeMergeError(
                        f"{reader.flag} {reader.path / shard}: tensor {name} contains NaN or Inf; the model is "
                        "corrupt (nothing was written)"
                    )
                upd = update_for(name)
                if upd is None:  # unchanged: file to file inside the kernel
                    out.copy_from(name, reader)
                else:
                    shape, dtype = reader.meta(name)
                    out.write_parts(name, shape, dtype, _patched_rows(reader, name, tuple(shape), upd))
                if on_tensor is not None:
                    on_tensor(name)
            written += out.nbytes
    return written


def _patched_rows(reader: ModelReader, name: str, shape: tuple[int, ...], upd: Update) -> Iterator[torch.Tensor]:
    """``W + upd`` in blocks of rows, each rounded once from fp32 to W's dtype."""
    if isinstance(upd, tuple):
        B, A = upd
        if len(shape) != 2 or B.dim() != 2 or A.dim() != 2 or B.shape[0] != shape[0] or A.shape[1] != shape[1] \
                or B.shape[1] != A.shape[0]:
            raise SafeMergeError(
                f"update for {name} has factors {tuple(B.shape)} @ {tuple(A.shape)} but the weight is {shape}")
        B, A = B.to(device="cpu", dtype=torch.float32), A.to(device="cpu", dtype=torch.float32)
    elif tuple(upd.shape) != shape:
        raise SafeMergeError(f"update for {name} has shape {tuple(upd.shape)} but the weight {shape}")
    if not shape:  # a 0-d weight: one block
        w = reader.get(name)
        yield (w.float() + upd.to(device="cpu", dtype=torch.float32)).to(w.dtype)
        return
    step = max(1, PATCH_BYTES // (4 * max(math.prod(shape[1:]), 1)))
    for i in range(0, shape[0], step):
        j = min(shape[0], i + step)
        w = reader.get_rows(name, i, j)
        if isinstance(upd, tuple):
            d = B[i:j] @ A
        else:
            d = upd[i:j].to(device="cpu", dtype=torch.float32, copy=True)
        # in place: the sum is the same fp32 addition, without a third block-sized buffer
        block = d.reshape(w.shape).add_(w).to(w.dtype)
        if not bool(torch.isfinite(block).all()):
            raise SafeMergeError(
                f"tensor {name}: the weight plus its update overflows {w.dtype} (Inf); the update is far larger "
                "than the weights (check the adapters' scaling); nothing was written"
            )
        yield block
