"""Read single tensors from a Hugging Face model folder without loading the model.

A folder holds ``model.safetensors`` or shards listed by ``model.safetensors.index.json``. Shapes,
dtypes and byte ranges come from the safetensors headers (an 8-byte length and a JSON table); a
tensor's bytes are touched only when asked for, and counted in ``bytes_read``:

- :meth:`ModelReader.map` gives a view of the tensor's pages in the page cache (no copy), one
  private mapping per tensor. Its pages count in the resident set only while the tensor lives, so
  a scorer that drops each tensor after use holds one at a time; :meth:`ModelReader.is_mapped`
  tells such views from copies, for a kernel that drops pages as it goes (they read back from
  the page cache). :meth:`ModelReader.will_need` reads a tensor into the page cache ahead of
  time without bringing anything into the process.
- :meth:`ModelReader.get` copies the bytes with ``os.preadv`` (:func:`pread_into`) into fresh
  memory, pinned if asked (the staging buffer of a host-to-GPU copy), for callers that keep or modify the tensor.

Why not ``safe_open(...).get_tensor``: it hands out tensors backed by one memory map of the whole
file, and every page the scorer touches stays in the resident set until the file is closed, so
peak RSS grew with the number of layers read (measured: +87 MB for a 16-layer q/v run).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import json
import math
import mmap
import os
import re
import struct
import sys
import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from safemerge_ext import _mapped
from safemerge_ext.errors import SafeMergeError, is_link_loop, link_loop_error, not_a_folder
from safemerge_ext.io import pagecache
from safemerge_ext.io.safetensors_stream import TORCH_DTYPES, dtype_code, tensor_nbytes

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_BIN_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")
_MAX_HEADER = 100 * 2**20


def _pmd_size() -> int:
    """The size of a huge page that maps file data with one page-table entry (2 MiB on x86-64;
    Linux says it in sysfs), or 2 MiB where the system does not say; 0 (map tensors as they lie)
    where it is larger: 32 or 512 MiB on arm64 kernels with 16 or 64 KiB pages, where the
    neighbours' bytes a widened mapping brings into the resident set would outweigh a tensor."""
    try:
        size = int(Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size").read_text())
    except (OSError, ValueError):
        size = 2 << 20
    return size if 0 < size <= 2 << 20 else 0


_PMD = _pmd_size()


class _NotHere(Exception):
    """This way of copying between the two files is not available; try the next one."""


# errors that mean "this kernel or file system pair cannot copy this way", not "the copy failed"
# (ENOTSOCK: macOS's sendfile writes only to sockets)
_UNSUPPORTED = {errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF, errno.ENOTSOCK}
_seek_lock = threading.Lock()


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Read up to ``len(view)`` bytes at ``offset`` into ``view``; the count (0 at the end).
    ``os.preadv`` where it exists (Linux, BSD, macOS 11+), else ``os.pread``, else (Windows) a
    seek and a read under one lock, since the read-ahead thread shares the descriptors (and
    Windows' mmap seeks them too: :meth:`ModelReader.map` maps under the same lock there)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    if hasattr(os, "pread"):
        data = os.pread(fd, len(view), offset)
    else:
        with _seek_lock:
            os.lseek(fd, offset, os.SEEK_SET)
            data = os.read(fd, len(view))
    view[: len(data)] = data
    return len(data)


def _copy_loop(step, src: int, dst: int, offset: int, count: int) -> int:
    """Run ``step(src, dst, offset, count) -> bytes`` until ``count`` bytes are copied or the
    source ends; raise _NotHere if the first step is unsupported or copies nothing (some file
    systems answer 0 instead of an error; the last way, a plain read, tells a real end)."""
    done = 0
    while done < count:
        try:
            n = step(src, dst, offset + done, count - done)
        except OSError as e:
            if done == 0 and e.errno in _UNSUPPORTED:
                raise _NotHere from e
            raise
        if n == 0:
            if done == 0:
                raise _NotHere
            break
        done += n
    return done


def _copy_file_range(src: int, dst: int, offset: int, count: int) -> int:
    if not hasattr(os, "copy_file_range"):
        raise _NotHere
    return _copy_loop(lambda s, d, o, n: os.copy_file_range(s, d, min(n, 1 << 30), o), src, dst, offset, count)


def _sendfile(src: int, dst: int, offset: int, count: int) -> int:
    if not hasattr(os, "sendfile") or not sys.platform.startswith("linux"):  # (elsewhere: sockets only)
        raise _NotHere
    return _copy_loop(lambda s, d, o, n: os.sendfile(d, s, o, min(n, 1 << 30)), src, dst, offset, count)


def _copy_buffered(src: int, dst: int, offset: int, count: int) -> int:
    buf = bytearray(min(count, 8 << 20))
    done = 0
    while done < count:
        got = pread_into(src, memoryview(buf)[: min(len(buf), count - done)], offset + done)
        if got <= 0:
            break
        view = memoryview(buf)[:got]
        while view:
            view = view[os.write(dst, view):]
        done += got
    return done


# where composite models keep their language model's settings in config.json: multimodal models'
# text_config, the Omni models' thinker's (Qwen2.5-Omni, Qwen3-Omni-MoE)
_TEXT_SECTIONS = (("text_config",), ("thinker_config", "text_config"))


def config_value(model_dir: str | os.PathLike, key: str) -> object:
    """``key`` from a model folder's config.json, or from its language model's section (``text_config``,
    or ``thinker_config.text_config``); None where the file or the key is missing."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    for path in ((),) + _TEXT_SECTIONS:
        section = cfg
        for name in path:
            section = section.get(name) if isinstance(section, dict) else None
        if isinstance(section, dict) and key in section:
            return section[key]
    return None


# transformers models whose projections are Conv1D layers (GPT-2's weight layout, d_in x d_out; JAIS
# is GPT-2's code with trust_remote_code)
_CONV1D_MODELS = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "jais"})
_CONV1D_LAYERS = frozenset({"c_attn", "c_proj", "c_fc", "c_fc2", "q_attn"})


def named_like_conv1d(module: str) -> bool:
    """Whether ``module`` is named as a Conv1D layer is in the models that have them."""
    return module.rsplit(".", 1)[-1] in _CONV1D_LAYERS


def is_conv1d(model_type: object, module: str) -> bool:
    """Whether ``module`` of a ``model_type`` model is a Conv1D layer: its weight is stored
    d_in x d_out, the transpose of the linear map SPEC's formulas take."""
    # (config.json is the user's: a model_type that is a list or an object names no Conv1D model)
    return isinstance(model_type, str) and model_type in _CONV1D_MODELS and named_like_conv1d(module)


def ties_embeddings(model_dir: str | os.PathLike) -> bool:
    """Whether the model at ``model_dir`` ties its output head to its input embeddings: config.json's
    ``tie_word_embeddings`` (or its ``text_config``'s); where it has none, the config class's default,
    which transformers leaves out of the files it saves (Gemma's is to tie, Llama's not), read with
    transformers (imported only here); True where that cannot tell (``PretrainedConfig``'s default).
    False without a config.json."""
    value = config_value(model_dir, "tie_word_embeddings")
    if value is not None:
        return bool(value)
    if not (Path(model_dir) / "config.json").is_file():
        return False
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(model_dir))
        value = getattr(cfg, "tie_word_embeddings", None)
        if value is None and hasattr(cfg, "get_text_config"):
            value = getattr(cfg.get_text_config(), "tie_word_embeddings", None)
    except Exception:  # (transformers missing, or a model_type it does not know)
        value = None
    return True if value is None else bool(value)


def base_model_prefix(model_dir: str | os.PathLike) -> str | None:
    """The name transformers' class for the model (config.json's ``architectures``) gives its base
    model (``transformer`` for GPT-2, ``model`` for Llama): a checkpoint that stores its weights
    without it (the Hub's gpt2) loads them under it. None where that cannot be told."""
    archs = config_value(model_dir, "architectures")
    if not isinstance(archs, list):
        return None
    try:
        import transformers

        for arch in archs:
            prefix = getattr(getattr(transformers, arch, None), "base_model_prefix", None) if isinstance(arch, str) else None
            if isinstance(prefix, str) and prefix:
                return prefix
    except Exception:  # (a transformers that cannot import that class: nothing to tell)
        return None
    return None


def is_tied_head(module: str, model_dir: str | os.PathLike) -> bool:
    """Whether ``module`` is an lm_head the model at ``model_dir`` ties to its input embeddings."""
    return module.rsplit(".", 1)[-1] == "lm_head" and ties_embeddings(model_dir)


_FLOAT_CODES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite (no NaN, no Inf; True for non-floating tensors), in
    one min/max pass without a tensor-sized temporary (isfinite makes one); float8, which torch's
    min/max do not take, in fp32."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.reshape(-1).float() if t.dtype.itemsize == 1 else t.reshape(-1))
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


# Within a block, the order in which the common architectures define their modules (attention
# before the MLP; Llama's q, k, v, o and gate, up, down; GPT-NeoX's and Falcon's fused
# query_key_value, dense and dense_h_to_4h, dense_4h_to_h; OPT's out_proj, fc1, fc2; Phi-3's o_proj
# before its fused qkv_proj, then gate_up_proj, down_proj); any other name sorts after these,
# alphabetically.
_MODULE_ORDER = {n: i for i, n in enumerate((
    "self_attn", "self_attention", "attention", "attn", "mlp", "feed_forward", "block_sparse_moe",
    "q_proj", "k_proj", "v_proj", "query_key_value", "c_attn", "o_proj", "qkv_proj", "out_proj", "dense",
    "gate_proj", "up_proj", "gate_up_proj", "dense_h_to_4h", "fc1", "c_fc", "down_proj", "dense_4h_to_h", "fc2",
    "c_proj",
))}
# Outside the blocks: input embeddings come first, the output head (Llama's lm_head, GPT-NeoX's
# embed_out) last, and what else has no block number (the final norm) between the blocks and it.
_EMBEDDINGS = ("embed_tokens", "tok_embeddings", "embed_positions", "embed_in", "wte", "wpe", "word_embeddings",
               "word_embeddings_layernorm", "embeddings")
HEADS = ("lm_head", "embed_out", "output", "score", "classifier")  # (the output heads beside the base model)


def _stage(name: str) -> int:
    parts = name.split(".")
    if any(p.isdecimal() for p in parts):
        return 1
    if any(p in HEADS for p in parts):
        return 3
    return 0 if any(p in _EMBEDDINGS for p in parts) else 2


@functools.lru_cache(maxsize=1 << 16)  # (a run sorts the same names several times: the models', the adapters')
def natural_key(name: str) -> tuple:
    """Sort key in model order, as the common architectures define it: the embeddings, then the
    blocks (layers.2 before layers.10, and within a block the modules in the order the model
    defines them, self_attn.q_proj before mlp.down_proj, not string order), then the final norm
    and the output head. Numbers inside a name part sort as numbers too (h_2 before h_10)."""
    return (_stage(name), *((0, int(p), ()) if p.isdecimal() else
                            (1, _MODULE_ORDER.get(p, len(_MODULE_ORDER)), _natural(p)) for p in name.split(".")))


def _natural(part: str) -> tuple:
    # (text, number, text, ...): the split alternates, so two keys compare position by position
    return tuple(int(x) if i % 2 else x for i, x in enumerate(re.split(r"(\d+)", part)))


# LLaVA-style vision-language checkpoints (Gemma 3, Mistral 3, PaliGemma, ...) keep the names their
# models had before transformers 4.52 moved the text model under `model.` (its loader renames them):
# the same tensor as stored and as named in memory, and so in PEFT adapters trained with newer versions.
_STORED_PREFIXES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def canonical_name(name: str) -> str:
    """A tensor's (or module's) name as the current transformers names it in memory, whichever
    naming it is in."""
    dotted = name + "."  # (a module's name may end where a prefix does: language_model.lm_head)
    for stored, in_memory in _STORED_PREFIXES:
        if dotted.startswith(stored):
            return (in_memory + dotted[len(stored):])[:-1]
    return name


def namings(name: str) -> list[str]:
    """Every name a module goes by (``canonical_name``'s naming and the stored one, where they
    differ): PEFT looks an adapter's patterns up by the name the loading transformers gives it."""
    forms = {name, canonical_name(name)}
    dotted = canonical_name(name) + "."
    for stored, in_memory in _STORED_PREFIXES:
        if dotted.startswith(in_memory):
            forms.add((stored + dotted[len(in_memory):])[:-1])
            break
    return sorted(forms)


# what transformers' MoE configs call the number of experts in a layer
EXPERTS_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def experts_count(model_dir: str | os.PathLike) -> int | None:
    """The experts per MoE layer that a model folder's config.json gives; None for a dense model."""
    return next((v for k in EXPERTS_KEYS if isinstance(v := config_value(model_dir, k), int)
                 and not isinstance(v, bool) and v > 0), None)


def renamings(transforms: Iterable[Any], name: str) -> list[str]:
    """``name``, then each name transformers' checkpoint conversion (``transforms``, from
    ``get_checkpoint_conversion_mapping``) gives it in turn, in order, each on the name the ones
    before gave: the last is its name in memory."""
    names = [name]
    for transform in transforms:
        renamed, pattern = transform.rename_source_key(names[-1])
        if pattern is not None:
            names.append(renamed)
    return names


def renamed_on_load(model_dir: str | os.PathLike, modules: Iterable[str]) -> dict[str, str]:
    """Of ``modules`` (named as the model's files name them), those whose weight transformers'
    conversion of the model's checkpoints renames or fuses on load, beyond the prefix moves
    :func:`canonical_name` follows, each with the name it gets: a Mixtral's router
    (``block_sparse_moe.gate``: ``mlp.gate.weight`` in transformers 5) and experts
    (``experts.N.w1`` and ``w3``: ``experts.gate_up_proj``). PEFT loads an adapter's LoRA on them
    under those names, looking ``rank_pattern``/``alpha_pattern`` up by them, so a per-module key in
    the files' naming does not reach them. Empty where transformers has no such conversion for the model
    (transformers 4: none at all), and for models whose config counts no experts: the renames that
    matter here are of MoE layers, and importing transformers costs the adapter commands seconds
    they otherwise do without."""
    model_type = config_value(model_dir, "model_type")
    modules = [m for m in modules if canonical_name(m) == m]
    if not isinstance(model_type, str) or not modules or experts_count(model_dir) is None:
        return {}
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        transforms = get_checkpoint_conversion_mapping(model_type) or []
    except Exception:  # (transformers 4 has no conversion mapping; nor does PEFT convert there)
        return {}
    renamed = {}
    for module in modules:
        name = renamings(transforms, module + ".weight")[-1]
        if name != module + ".weight":
            renamed[module] = name
    return renamed


def module_key(name: str) -> str:
    """One key for every name a module (or its weight) goes by: as stored or in memory, and, for
    the vision-language models whose text model moved from ``model.layers`` (Qwen2-VL's files,
    adapters trained before transformers 4.52) to ``model.language_model.layers``, before or after; and for
    their CLIP/SigLIP vision towers, whose ``vision_model`` level the files have and transformers 5 drops in
    memory (so in the adapters it trains: ``model.vision_tower.encoder...``)."""
    name = canonical_name(name)
    tower = "model.vision_tower.vision_model."
    if name.startswith(tower):
        name = "model.vision_tower." + name[len(tower):]
    return "model." + name[len("model.language_model."):] if name.startswith("model.language_model.") else name


def _ints(x: Any) -> bool:
    """A JSON list of whole numbers (not booleans), as safetensors headers hold shapes and offsets."""
    return isinstance(x, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in x)


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes at ``offset``, however many reads that takes (network and FUSE file systems
    return short reads); fewer only at the end of the file."""
    buf, got = bytearray(n), 0
    view = memoryview(buf)
    while got < n:
        part = pread_into(fd, view[got:], offset + got)
        if not part:
            break
        got += part
    return bytes(buf[:got])


class ModelReader:
    """Lazy, per-tensor access to a safetensors model folder; ``flag`` names it in errors.

    ``single`` names the one file to read where a folder is not a sharded model (the PEFT adapter
    reader passes ``adapter_model.safetensors``); a sharded index is looked for only by default.
    """

    def __init__(self, path: str | os.PathLike, flag: str = "model", *, single: str = SINGLE) -> None:
        self.path = Path(path)
        self.flag = flag
        self._single = single
        self.bytes_read = 0
        self._lock = threading.Lock()
        # shard -> its file, open for reading (a file object, not a bare descriptor: an interrupt raised as
        # open() returns drops the object, which closes it; a bare os.open's number was lost open, review174)
        self._files: dict[str, io.FileIO] = {}
        self._maps: dict[int, tuple[int, int]] = {}  # id(mmap) -> its address range, while it lives
        self._null: io.FileIO | None = None  # /dev/null, the sink of will_need's sendfile, once opened
        self._use_sendfile = hasattr(os, "sendfile")  # (False once it fails here: posix_fadvise instead)
        # shard -> {name: (dtype code, shape, absolute start, absolute end)}, and its __metadata__
        self._headers: dict[str, dict[str, tuple[str, tuple[int, ...], int, int]]] = {}
        self._digests: dict[str, str] = {}  # shard -> SHA-256 of its header, as read
        self._metadata: dict[str, dict[str, str] | None] = {}
        self._weight_map = self._read_layout()
        self._names: list[str] | None = None  # (sorted once: the layout does not change)
        self._by_key: dict[str, str | None] | None = None  # module_key -> name, made when first needed

    def _read_layout(self) -> dict[str, str]:
        p = self.path
        if is_link_loop(p):
            raise link_loop_error(self.flag, p)
        if not p.is_dir():
            raise not_a_folder(self.flag, p, "a local Hugging Face model folder")
        if self._single == SINGLE and (p / INDEX).is_file():
            try:
                weight_map = json.loads((p / INDEX).read_bytes())["weight_map"]
                if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
                ):
                    raise ValueError("weight_map is not a table of tensor names to shard files")
            except (ValueError, KeyError, TypeError, RecursionError) as exc:
                why = ("it has no weight_map table" if isinstance(exc, (KeyError, TypeError)) else
                       " ".join(str(exc).split()))
                raise SafeMergeError(f"{self.flag} {p / INDEX}: not a valid safetensors index ({why}); re-save the model") from None
            for shard in sorted(set(weight_map.values())):
                if Path(shard).name != shard or shard in (".", ".."):
                    raise SafeMergeError(
                        f"{self.flag} {p / INDEX} lists shard {shard!r}, which is not a file name in the model folder; "
                        "re-save the model"
                    )
                if not (p / shard).is_file() and (p / SINGLE).is_file():  # (transformers re-saved it in place)
                    raise SafeMergeError(
                        f"{self.flag} {p} holds {SINGLE}, which transformers loads, and {INDEX}, which lists shard "
                        f"{shard}, which is missing: the index is stale (a save in place leaves it); remove it")
                if not (p / shard).is_file():
                    raise SafeMergeError(
                        f"{self.flag} {p / INDEX} lists shard {shard}, which is missing; copy the complete model folder"
                    )
            others = sorted(set(weight_map.values()) - {SINGLE})
            if (p / SINGLE).is_file() and (others or not weight_map):  # (a folder re-saved in place)
                lists = f"which lists other shards ({others[0]}, ...)" if others else "which lists no tensor"
                raise SafeMergeError(f"{self.flag} {p} holds both {SINGLE}, which transformers loads, and {INDEX}, "
                                     f"{lists}: one of them is stale; remove it")
            return dict(weight_map)
        if (p / self._single).is_file():
            return {k: self._single for k in self._header(self._single)}
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
        if self._names is None:
            self._names = sorted(self._weight_map, key=natural_key)
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def shard_of(self, name: str) -> str:
        return self._weight_map[name]

    def shards(self, as_stored: bool = False) -> "OrderedDict[str, list[str]]":
        """Shard file -> its tensor names (model order; ``as_stored``: in the order of their bytes in
        the file, which reads each file front to back and, written so, keeps the alignment its
        writer gave each tensor), shards in file-name order."""
        out: OrderedDict[str, list[str]] = OrderedDict()
        for shard in sorted(set(self._weight_map.values())):
            out[shard] = []
        for name in self.names:
            out[self._weight_map[name]].append(name)
        if as_stored:
            for names in out.values():
                names.sort(key=lambda n: self._entry(n)[1][2])
        return out

    @property
    def is_sharded(self) -> bool:
        return self._single == SINGLE and (self.path / INDEX).is_file()

    def header_digests(self) -> dict[str, str]:
        """The SHA-256 of each header this reader has read, by the file's resolved path (the report
        records them without opening the files again)."""
        return {os.path.realpath(self.path / shard): digest for shard, digest in self._digests.items()}

    def _header(self, shard: str) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
        """Parse (once) a shard's safetensors header: dtype, shape and absolute byte range per tensor."""
        hdr = self._headers.get(shard)
        if hdr is not None:
            return hdr
        path = self.path / shard
        try:  # (through the descriptor the tensors are read with: each shard is opened once)
            fd = self._fd(shard)
            size = os.fstat(fd).st_size
            (n,) = struct.unpack("<Q", _pread_all(fd, 8, 0))
            if not 0 < n <= min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            blob = _pread_all(fd, n, 8)
            self._digests[shard] = hashlib.sha256(blob).hexdigest()  # (for the report's record of the input)
            raw = json.loads(blob)
            if not isinstance(raw, dict):
                raise ValueError("the header is not a JSON object")
            hdr = {}
            for name, info in raw.items():
                if name == "__metadata__":
                    continue
                offsets, dims = info["data_offsets"], info["shape"]
                if not (_ints(offsets) and len(offsets) == 2):
                    raise ValueError(f"tensor {name} has data_offsets {offsets!r}, not two whole numbers")
                if not _ints(dims) or any(d < 0 for d in dims):
                    raise ValueError(f"tensor {name} has shape {dims!r}, not a list of whole numbers")
                start, end = (8 + n + o for o in offsets)
                if not 8 + n <= start <= end <= size:
                    raise ValueError(f"tensor {name} lies outside the file (truncated download?)")
                code, shape = str(info["dtype"]), tuple(dims)
                want = tensor_nbytes(code, shape)
                if want is not None and want != end - start:
                    raise ValueError(f"tensor {name} ({code} {list(shape)}) spans {end - start} bytes, not {want}")
                hdr[name] = (code, shape, start, end)
            # as safetensors checks: the tensors follow one another, no overlap, no gap, to the end
            # (an overlap in bounds would read another tensor's bytes without a word)
            pos = 8 + n
            for name, (_, _, start, end) in sorted(hdr.items(), key=lambda kv: kv[1][2:]):
                if start != pos:
                    raise ValueError(f"tensor {name}'s data_offsets start at {start - 8 - n}, but the tensors before "
                                     f"it end at {pos - 8 - n}: they {'overlap' if start < pos else 'leave a gap'}")
                pos = end
            if pos != size:
                raise ValueError(f"the tensors end at byte {pos}, but the file has {size}")
            meta = raw.get("__metadata__")
            ok = isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
        except (OSError, ValueError, KeyError, TypeError, struct.error, RecursionError) as exc:
            if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
                raise SafeMergeError(f"{self.flag} {path}: cannot open it: too many open files ({exc.strerror}); "
                                     "raise the limit (ulimit -n 65536) and run again") from None
            if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM):
                raise SafeMergeError(f"{self.flag} {path}: cannot read it ({exc.strerror}); "
                                     "give this user read access to it") from None
            why = f"a tensor entry has no {exc.args[0]!r}" if isinstance(exc, KeyError) else str(exc)
            raise SafeMergeError(f"{self.flag} {path}: not a readable safetensors file ({why}); re-download or re-save it") from None
        self._headers[shard], self._metadata[shard] = hdr, (dict(meta) if ok else None)
        return hdr

    def shard_names(self, shard: str) -> list[str]:
        """Every tensor a shard's header holds (the index may list fewer)."""
        return list(self._header(shard))

    def metadata(self, shard: str) -> dict[str, str] | None:
        """A shard's ``__metadata__`` table (None: it has none, or not one of strings)."""
        self._header(shard)
        return self._metadata[shard]

    def _entry(self, name: str) -> tuple[str, tuple[str, tuple[int, ...], int, int]]:
        shard = self._weight_map.get(name)
        if shard is None:
            raise SafeMergeError(f"{self.flag} {self.path}: tensor {name} is missing; the models must share an architecture")
        entry = self._header(shard).get(name)
        if entry is None:
            raise SafeMergeError(
                f"{self.flag} {self.path / shard}: tensor {name} is listed in the index but not in the shard; re-save the model"
            )
        return shard, entry

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of a tensor from the file header, without reading its data."""
        _, (code, shape, _, _) = self._entry(name)
        return shape, TORCH_DTYPES.get(code, code)

    def layout(self, name: str) -> tuple[tuple[int, ...], str, int]:
        """(shape, safetensors dtype code, byte count) of a tensor, as its file lays it out."""
        _, (code, shape, start, end) = self._entry(name)
        return shape, code, end - start

    def get(self, name: str, *, pin_memory: bool = False) -> torch.Tensor:
        """Read one tensor into fresh CPU memory (pinned if asked) and count its bytes."""
        shard, (code, shape, start, end) = self._entry(name)
        dtype = self._dtype(shard, name, code)
        return self._read(shard, start, end, name, pin_memory).view(dtype).reshape(shape)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor (along its first dimension) in fresh CPU memory: only
        their bytes are read and counted."""
        shard, (code, shape, begin, end) = self._entry(name)
        dtype = self._dtype(shard, name, code)
        if not shape or not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"rows [{start}, {stop}) of {name} {tuple(shape)}")
        row = (end - begin) // shape[0] if shape[0] else 0
        buf = self._read(shard, begin + start * row, begin + stop * row, name)
        return buf.view(dtype).reshape(stop - start, *shape[1:])

    def _read(self, shard: str, start: int, end: int, what: str, pin_memory: bool = False) -> torch.Tensor:
        """Bytes [start, end) of a shard in fresh memory, counted in ``bytes_read``."""
        buf = torch.empty(end - start, dtype=torch.uint8, device="cpu", pin_memory=pin_memory)
        view = memoryview(buf.numpy())
        fd = self._fd(shard)
        done = 0
        while done < len(view):
            got = pread_into(fd, view[done:], start + done)
            if got <= 0:
                raise SafeMergeError(f"{self.flag} {self.path / shard}: file ended inside tensor {what}; re-download it")
            done += got
        with self._lock:
            self.bytes_read += done
        return buf

    def scan_finite(self, name: str, buf: torch.Tensor | None = None) -> bool:
        """Whether a floating tensor holds no NaN or Inf, read through ``buf`` (a uint8 scratch,
        default 2 MiB) a chunk at a time: memory stays at the chunk, and reading is cheaper than
        mapping the pages (measured, the 1B model's 2.5 GB from the page cache: 1.1 s read, about
        1.7 s mapped). Not counted in ``bytes_read`` (the copy that follows counts the bytes)."""
        shard, (code, _, start, end) = self._entry(name)
        if code not in _FLOAT_CODES:
            return True
        dtype = self._dtype(shard, name, code)
        buf = torch.empty(2 << 20, dtype=torch.uint8, device="cpu") if buf is None else buf
        step = len(buf) - len(buf) % 8
        view, fd = memoryview(buf.numpy()), self._fd(shard)
        while start < end:
            got = pread_into(fd, view[: min(step, end - start)], start)
            if got <= 0 or got % dtype.itemsize:
                raise SafeMergeError(f"{self.flag} {self.path / shard}: file ended inside tensor {name}; re-download it")
            if not all_finite(buf[:got].view(dtype)):
                return False
            start += got
        return True

    def copy_into(self, name: str, out_fd: int) -> int:
        """Append one tensor's bytes to ``out_fd`` at its file position, copied inside the kernel
        (``copy_file_range``, else ``sendfile``, else through an 8 MiB buffer), so an unchanged
        tensor of any size never enters this process. Counted in ``bytes_read``; returns the count."""
        shard, (_, _, start, end) = self._entry(name)
        fd, done = self._fd(shard), 0
        for copy in (_copy_file_range, _sendfile, _copy_buffered):
            try:
                done += copy(fd, out_fd, start + done, end - start - done)
            except _NotHere:
                continue
            break
        if done < end - start:
            raise SafeMergeError(f"{self.flag} {self.path / shard}: file ended inside tensor {name}; re-download it")
        with self._lock:
            self.bytes_read += done
        return done

    def _dtype(self, shard: str, name: str, code: str) -> torch.dtype:
        dtype = TORCH_DTYPES.get(code)
        if dtype is None:
            raise SafeMergeError(f"{self.flag} {self.path / shard}: tensor {name} has dtype {code}, which torch cannot hold")
        return dtype

    def _fd(self, shard: str) -> int:
        with self._lock:
            f = self._files.get(shard)
            if f is None:
                f = self._files[shard] = open(self.path / shard, "rb", buffering=0)
            return f.fileno()

    def holds_floats(self, name: str) -> bool:
        """Whether a tensor's dtype is a floating type torch can hold (the ones NaN/Inf apply to)."""
        return self._entry(name)[1][0] in _FLOAT_CODES

    def first_nonfinite(self, names: Iterable[str]) -> str | None:
        """The first of ``names`` holding NaN or Inf (floating tensors only), else None. Checked a
        run of back-to-back tensors at a time (one mapping and one min/max per run, dropped at
        once, so none is held); a run that fails is searched tensor by tensor."""
        for group, flat in self.map_runs([n for n in names if self.holds_floats(n)]):
            if not all_finite(flat):
                return next((n for n in group if not all_finite(self.map(n))), group[0])
        return None

    def map(self, name: str) -> torch.Tensor:
        """One tensor as a view of its pages in the page cache (no copy), counted in ``bytes_read``.

        The pages count in the process's resident set only while they are mapped, that is while
        the returned tensor (or a view of it) is alive. The mapping is private: writing to the
        tensor copies the page and never reaches the file (and such a view must not be scored
        with ``file_backed=True``, which drops pages: see ``ops.subspace_score``). Where the file cannot be mapped (some
        network or FUSE file systems), this falls back to :meth:`get`.
        """
        shard, (code, shape, start, end) = self._entry(name)
        return self._map(shard, start, end, self._dtype(shard, name, code), name).reshape(shape)

    def map_runs(self, names: Iterable[str], max_bytes: int = 1 << 20) -> Iterator[tuple[list[str], torch.Tensor]]:
        """Yield (names, flat view) for the given tensors grouped into runs that lie back to back
        in one file with one dtype and span at most ``max_bytes`` (a larger tensor is a run of its
        own): one mapping per run instead of one per tensor, for a check over many small tensors
        such as an adapter's factors. The views are :meth:`map`'s; dropping one unmaps its run."""
        runs: list[tuple[str, str, int, int, list[str]]] = []  # shard, dtype code, start, end, names
        for shard, (code, _, start, end), name in sorted(
            ((*self._entry(n), n) for n in names), key=lambda e: (e[0], e[1][2])
        ):
            last = runs[-1] if runs else None
            if last and (shard, code, start) == (last[0], last[1], last[3]) and end - last[2] <= max_bytes:
                runs[-1] = (shard, code, last[2], end, last[4] + [name])
            else:
                runs.append((shard, code, start, end, [name]))
        for shard, code, start, end, group in runs:
            yield group, self._map(shard, start, end, self._dtype(shard, group[0], code), group[0])

    def _map(self, shard: str, start: int, end: int, dtype: torch.dtype, what: str) -> torch.Tensor:
        """Bytes [start, end) of a shard as a flat ``dtype`` view of a private mapping (read
        instead where the file cannot be mapped), counted in ``bytes_read``."""
        if end == start:
            return torch.empty(0, dtype=dtype, device="cpu")
        fd = self._fd(shard)
        base, stop = start - start % mmap.ALLOCATIONGRANULARITY, end
        if _PMD and end - start >= _PMD:
            # Widened to whole huge pages of the file: where the page cache holds the tensor in
            # huge folios (read through the kernel's read path, see will_need), its head and tail
            # are then mapped with one entry each instead of 512 small ones (measured, the 1B
            # model's 32 q/v pairs: mapping faults 11.4 -> 2.0 ms, unmapping 4.4 -> 3.1 ms).
            base = start - start % _PMD
            stop = max(end, min(end + (-end) % _PMD, os.fstat(fd).st_size))
        try:
            if os.name == "nt":  # (there mmap seeks the descriptor to 0, which pread_into's seek+read shares)
                with _seek_lock:
                    mm = mmap.mmap(fd, stop - base, access=mmap.ACCESS_COPY, offset=base)
            else:
                mm = mmap.mmap(fd, stop - base, access=mmap.ACCESS_COPY, offset=base)
        except (OSError, ValueError):  # (ValueError: the file is shorter now than its header says; read names it)
            return self._read(shard, start, end, what).view(dtype)
        with self._lock:
            self.bytes_read += end - start
        # the tensor keeps the mapping alive; the last reference to it unmaps the pages
        t = torch.frombuffer(mm, dtype=dtype, count=(end - start) // dtype.itemsize, offset=start - base)
        lo = t.data_ptr() - (start - base)
        key = _mapped.add(mm, lo, lo + len(mm))
        self._maps[key] = (lo, lo + len(mm))
        weakref.finalize(mm, self._unmapped, key)
        return t

    def _unmapped(self, key: int) -> None:
        self._maps.pop(key, None)
        _mapped.remove(key)

    def is_mapped(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s bytes lie in a private file mapping that :meth:`map` made and that is
        still alive (not a copy: :meth:`get`, or :meth:`map`'s fallback where mapping failed). Only
        such memory, and only while nobody has written to it (a written page would go back to the
        file's bytes), may have its pages dropped and read back from the file."""
        # (a copy: a finalizer may drop an entry from another thread while this looks)
        return _mapped.covers(t, list(self._maps.copy()))

    def resident(self, name: str) -> bool | None:
        """Whether all of one tensor's bytes are in the page cache (None: this system cannot tell)."""
        shard, (_, _, start, end) = self._entry(name)
        return pagecache.resident(self._fd(shard), start, end)

    def will_need(self, name: str) -> None:
        """Read one tensor's bytes into the page cache and return once they are there; nothing
        lands in this process's memory (a no-op where neither call below exists).

        The bytes go through the kernel's read path, ``sendfile`` to /dev/null (no copy to user
        space), rather than ``posix_fadvise(WILLNEED)``: on Linux 6.18 / ext4 the read path fills
        the page cache with large folios and fadvise with 4 KiB pages, and a later :meth:`map`
        faults and unmaps large folios several times faster (measured, the 1B model's q/v pairs
        mapped and scored: 41 vs 61-84 ms). Cold runs take the same time either way (1B: 0.48-0.59
        vs 0.52-0.54 s; 7B: 3.6-3.9 vs 3.7 s); the warm run that follows is 25-35% faster.
        Where ``sendfile`` cannot write to a file (not Linux), ``posix_fadvise`` starts the read.

        Bytes already in the page cache are not read again: walking 300 MB of cached pages costs
        7-10 ms of a core, which a warm run's kernels need (``pagecache.resident``; Linux 6.5+).
        """
        shard, (_, _, start, end) = self._entry(name)
        if end <= start:
            return
        fd = self._fd(shard)
        if pagecache.resident(fd, start, end):
            return
        with self._lock:
            if self._use_sendfile and self._null is None:
                self._null = open(os.devnull, "wb", buffering=0)
            null = self._null if self._use_sendfile else None
        if null is not None:
            try:
                while start < end:
                    sent = os.sendfile(null.fileno(), fd, start, end - start)
                    if sent <= 0:  # the file ended early; map() or get() will say so
                        return
                    start += sent
                return
            except (OSError, ValueError):  # (ValueError: the sink closed by another thread's failure)
                with self._lock:
                    if self._null is null:
                        null.close()
                        self._null, self._use_sendfile = None, False
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        with self._lock:
            if self._null is not None:
                self._null.close()
            self._null = None
            for f in self._files.values():
                f.close()
            self._files.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> "ModelReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def unlisted(self, module: str) -> tuple[str, str] | None:
        """(shard, tensor name) of a shard that holds ``module``'s weight though the index does not
        list it (an index that is out of date), else None. Reads every shard's header: for errors."""
        if not self.is_sharded:
            return None
        want = module_key(f"{module}.weight")
        for shard in sorted({*self._weight_map.values(), *(p.name for p in self.path.glob("*.safetensors"))}):
            try:
                held = self.shard_names(shard)
            except SafeMergeError:
                continue
            hit = next((n for n in held if n not in self._weight_map and module_key(n) == want), None)
            if hit is not None:
                return shard, hit
        return None

    def resolve_module(self, module: str) -> str | None:
        """The weight name of a linear module (``module + '.weight'``), across the namings of
        vision-language checkpoints (``language_model.model.layers...`` on disk, as the Hub's Gemma 3,
        Mistral 3 and LLaVA files and transformers' own saves have them, or Qwen2-VL's ``model.layers...``;
        ``model.language_model.layers...`` in memory, as PEFT names the modules: see ``module_key``), and
        tolerating one wrapper prefix."""
        exact = f"{module}.weight"
        if exact in self._weight_map:
            return exact
        if self._by_key is None:
            self._by_key = {}
            for n in self._weight_map:  # (a key two tensors share matches neither)
                k = module_key(n)
                self._by_key[k] = None if k in self._by_key else n
        hit = self._by_key.get(module_key(exact))
        if hit is not None:
            return hit
        hits = [n for n in self._weight_map if n.endswith("." + exact) or exact.endswith("." + n)]
        return hits[0] if len(hits) == 1 else None


BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


def _bin_state(path: Path, flag: str, listed: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of one PyTorch .bin file (a shard), memory-mapped: no weight is read. A file in
    torch's old, non-zip format cannot be mapped: ``listed``, its tensors are on the meta device (as
    mergekit lists them), else read whole."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="meta" if listed else "cpu", weights_only=True)
    except Exception as exc:  # (no checkpoint, or one that holds more than tensors and plain values)
        raise SafeMergeError(f"{flag} {path}: cannot list its tensors ({exc})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # (as mergekit reads it)
    if not isinstance(state, dict):
        raise SafeMergeError(f"{flag} {path}: holds no state dict")
    # (a training step or other value saved beside the weights is no tensor: mergekit merges none)
    return {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _code_of(dtype: torch.dtype) -> str:
    try:
        return dtype_code(dtype)
    except ValueError:  # (a dtype safetensors has no code for: its name, as meta() gives unknown codes)
        return str(dtype)


class BinModelReader(ModelReader):
    """A folder of PyTorch ``pytorch_model.bin`` files (one, or shards with their index), which
    mergekit reads too, seen as :class:`ModelReader` sees safetensors: names, shapes and dtypes (from
    the files, memory-mapped), for the checks of mergekit's inputs; :meth:`get` reads a tensor, and
    what reads a safetensors file's bytes (rows, maps, scans) refuses."""

    def _read_layout(self) -> dict[str, str]:
        p = self.path
        if not p.is_dir():
            raise not_a_folder(self.flag, p, "a local Hugging Face model folder")
        if (p / BIN_INDEX).is_file():
            try:
                weight_map = json.loads((p / BIN_INDEX).read_bytes())["weight_map"]
                if not isinstance(weight_map, dict) or not all(
                        isinstance(k, str) and isinstance(v, str) and Path(v).name == v for k, v in weight_map.items()):
                    raise TypeError
            except (OSError, ValueError, KeyError, TypeError, RecursionError):
                raise SafeMergeError(f"{self.flag} {p / BIN_INDEX}: not a valid index (no weight_map table of "
                                     "tensor names to files in the folder); re-save the model") from None
            return dict(weight_map)
        if (p / BIN_SINGLE).is_file():
            return {name: BIN_SINGLE for name in self._header(BIN_SINGLE)}
        raise SafeMergeError(f"{self.flag} {p}: no {BIN_SINGLE} or {BIN_INDEX}")

    def _state(self, shard: str) -> dict[str, torch.Tensor]:
        return _bin_state(self.path / shard, self.flag)

    def _header(self, shard: str) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
        hdr = self._headers.get(shard)
        if hdr is None:
            hdr = {n: (_code_of(t.dtype), tuple(t.shape), 0, t.numel() * t.element_size())
                   for n, t in self._state(shard).items()}
            self._headers[shard], self._metadata[shard] = hdr, None
        return hdr

    @property
    def is_sharded(self) -> bool:
        return (self.path / BIN_INDEX).is_file()

    def _fd(self, shard: str) -> int:  # (every read of a safetensors file's bytes goes through it)
        raise SafeMergeError(f"{self.flag} {self.path / shard}: a PyTorch .bin file is read a whole tensor at a time "
                             "(get), not as safetensors bytes; convert the model to safetensors")

    def get(self, name: str, *, pin_memory: bool = False) -> torch.Tensor:
        shard, _ = self._entry(name)
        t = self._state(shard)[name]
        if t.is_meta:  # (an old, non-zip file: read whole)
            t = _bin_state(self.path / shard, self.flag, listed=False)[name]
        out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin_memory)
        out.copy_(t)
        self.bytes_read += out.numel() * out.element_size()
        return out


def open_model(model_dir: str | os.PathLike, flag: str = "model") -> ModelReader:
    """A reader of a model folder as mergekit finds its files: safetensors, else PyTorch's .bin
    (:class:`BinModelReader`); a folder with neither gets ModelReader's error."""
    p = Path(model_dir)
    if not ((p / SINGLE).is_file() or (p / INDEX).is_file()) and ((p / BIN_INDEX).is_file() or
                                                                   (p / BIN_SINGLE).is_file()):
        return BinModelReader(p, flag)
    return ModelReader(p, flag)


def stored_names(model_dir: str | os.PathLike, flag: str = "model") -> list[str]:
    """The tensor names a model folder stores (model order), from its files as mergekit finds them:
    safetensors (their headers), else PyTorch's ``pytorch_model.bin`` (its index's weight map, else
    the file's tensors, memory-mapped: no weight is read). mergekit reads and writes (``--no-safe-
    serialization``) both, and what is checked of its inputs and output holds for both."""
    p = Path(model_dir)
    if not ((p / SINGLE).is_file() or (p / INDEX).is_file()) and not ((p / BIN_INDEX).is_file() or
                                                                       (p / BIN_SINGLE).is_file()):
        raise SafeMergeError(f"{flag} {p}: no {SINGLE}, {INDEX}, {BIN_SINGLE} or {BIN_INDEX}")
    with open_model(p, flag) as reader:
        return reader.names
