"""mergekit merge methods ``safemerge``, ``safelora`` and ``resta`` (mergekit >= 0.1.5 method API).

Each method is a per-tensor kernel over one ``TensorGroup``: the base input is the aligned model,
the other inputs carry a ``role`` (``task``, ``safety``, ``unaligned``). For a 2-D weight the task
update ``dW = W_task - W_aligned`` is scored with :func:`safemerge_ext.ops.subspace_score` (the same
backend-dispatched math as the CLI) and, if flagged, merged (SafeMERGE, via
:func:`safemerge_ext.merge.combine_full`) or projected (Safe LoRA, via
:func:`safemerge_ext.ops.project_delta`). Everything else -- 1-D tensors, embeddings and ``lm_head``
(not linear layers LoRA targets; their rows are the vocabulary), position and token-type embedding
tables, degenerate layers -- is the task model's tensor, bit for bit. (``resta`` is no selection: it
adds ``beta (W_aligned - W_unaligned)`` to every floating tensor.) A Conv1D layer (GPT-2 and its
family store the weight d_in x d_out) is scored and projected as the linear map it computes, the
transpose. Inputs are upcast to fp32 here; no kernel stacks its inputs.

The run around them (the report assembled from each tensor's record, one-line refusals in
``mergekit-yaml``) is :mod:`safemerge_ext.mergekit_run`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
import re
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, PerNonBase, TensorGroup
from mergekit.merge_methods.easy_define import merge_method
from pydantic import AfterValidator, BeforeValidator
from typing_extensions import Annotated

from safemerge_ext import backends, ops, reference
from safemerge_ext.backends import PRECISIONS, backend_detail, exact_fp32_matmuls, requested_precision
from safemerge_ext.errors import SafeMergeError
from safemerge_ext.io.models import (EXPERTS_KEYS, ModelReader, all_finite, config_value, is_conv1d,
                                     named_like_conv1d, open_model, renamings, stored_names)
from safemerge_ext.io.places import same_place
from safemerge_ext.merge import METHODS as MERGE_METHODS
from safemerge_ext.merge import PEFT_LINEAR, as_rows, combine_full, dare_generator, row_blocks
from safemerge_ext.mergekit_run import (REPORT_DIR_ENV, SIDECAR, _append, _failing_run, _in_mergekit_multi,
                                        _in_mergekit_yaml, _install_excepthook, _mergekit_multi_args,
                                        _mergekit_yaml_args, _mergekit_yaml_out, discard_report, finalize_report,
                                        mergekit_cli, pending_reports, report_files, report_to)
from safemerge_ext.report import LayerRecord

__all__ = [  # (with the report API of mergekit_run, which a recipe's user reaches from here)
    "METHOD_NAMES",
    "REPORT_DIR_ENV",
    "SIDECAR",
    "discard_report",
    "finalize_report",
    "pending_reports",
    "register_methods",
    "report_files",
    "report_to",
    "resta_method",
    "safelora_method",
    "safemerge_method",
]

LOG = logging.getLogger(__name__)

METHOD_NAMES = ("safemerge", "safelora", "resta")
ROLES = {"safemerge": ("task", "safety", "unaligned"), "safelora": ("task", "unaligned"), "resta": ("task", "unaligned")}
# unit roundoff of the half-precision formats (relative error of one rounding)
_UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _in_range(name: str, lo: float, hi: float, what: str, lo_open: bool = False) -> AfterValidator:
    """A pydantic check whose message names the parameter (mergekit shows it while planning)."""

    def check(v: float) -> float:
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi
        if not ok:
            raise ValueError(f"{name} must lie in {'(' if lo_open else '['}{lo:g}, {hi:g}] ({what}); got {v}")
        return v

    return AfterValidator(check)


def _no_switch(name: str, kind: str = "number") -> BeforeValidator:
    """Refuse true/false for a numeric parameter (pydantic would read them as 1 and 0), and
    anything else that is no number (``kind``: "number" or "whole number"), with a message that
    names the parameter: pydantic's own names only its validators' chain. A numeric string passes
    (mergekit reads YAML's "1e-3" as a number)."""
    whole = kind == "whole number"

    def check(v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError(f"{name} takes a {kind}, not {str(v).lower()}")
        try:
            x = float(v) if isinstance(v, (str, numbers.Real)) else None
        except ValueError:
            x = None
        if x is None or (whole and not x.is_integer()):
            raise ValueError(f"{name} takes a {kind}; got {v!r}")
        return int(x) if whole and isinstance(v, str) else v

    return BeforeValidator(check)


def _one_of(name: str, choices: Sequence[str], none_ok: bool = False,
            hints: Optional[dict[str, str]] = None) -> BeforeValidator:
    """Refuse a value outside ``choices`` with a message that names the parameter (pydantic's own
    says only "Input should be ..."), and what to do instead where ``hints`` knows the value."""

    def check(v: Any) -> Any:
        if not (v is None and none_ok) and not (isinstance(v, str) and v in choices):
            hint = (hints or {}).get(v) if isinstance(v, str) else None
            raise ValueError(f"{name} must be one of {', '.join(choices)}; got {v!r}" + (f" ({hint})" if hint else ""))
        return v

    return BeforeValidator(check)


Role = Annotated[Literal["task", "safety", "unaligned"], _one_of("role", ("task", "safety", "unaligned"))]
Threshold = Annotated[float, _no_switch("threshold"), _in_range("threshold", -1.0, 1.0, "it is compared with a cosine")]
Fraction = Annotated[float, _no_switch("alpha"), _in_range("alpha", 0.0, 1.0, "the task update's weight")]
Density = Annotated[float, _no_switch("density"),
                    _in_range("density", 0.0, 1.0, "the fraction of each update kept", lo_open=True)]
# (at most fp32's largest: torch.add takes it as an fp32 factor, and refused more with a RuntimeError)
Beta = Annotated[float, _no_switch("beta"), _in_range("beta", 0.0, float(torch.finfo(torch.float32).max),
                                                      "the weight of the safety vector")]
Seed = Annotated[int, _no_switch("seed", "whole number")]
MergeName = Annotated[Literal["linear", "ties", "dare_linear", "dare_ties"], _one_of("merge", tuple(MERGE_METHODS), hints={
    PEFT_LINEAR: "it mixes two LoRA adapters' factors, which mergekit folds into full weights first; "
                 "use safemerge merge --method peft-linear with the adapters"})]
# the operand precision the triton kernels may use (None: SAFEMERGE_PRECISION, else exact ieee)
Precision = Annotated[Optional[Literal[PRECISIONS]], _one_of("precision", PRECISIONS, none_ok=True)]
assert set(MERGE_METHODS) == {"linear", "ties", "dare_linear", "dare_ties"}


# ---------------------------------------------------------------------------------------------
# per-tensor helpers


def _roles(group: TensorGroup, role: Any, method: str) -> dict[str, torch.Tensor]:
    """Map each required role to its input tensor; raise naming the role and models otherwise."""
    name = group.metadata.name or "?"
    if group.base is None:
        raise ValueError(f"{method}: tensor {name} has no base input; set base_model to the aligned model")
    found: dict[str, list[Any]] = {}
    for entry in group.non_base:
        found.setdefault(role[entry.id], []).append(entry)
    for r in ROLES[method]:
        got = found.get(r, [])
        if len(got) != 1:
            models = ", ".join(str(e.id) for e in got) or "none"
            raise ValueError(
                f"{method}: role {r!r} must be given to exactly one model (parameters: {{role: {r}}}); "
                f"tensor {name} has {len(got)} ({models})"
            )
    extra = sorted(set(found) - set(ROLES[method]))
    if extra:
        raise ValueError(
            f"{method}: role {extra[0]!r} is not used by this method; roles are {', '.join(ROLES[method])}"
        )
    _check_loras(group, role)
    if method == "safemerge":
        _check_safety_lora(found["task"][0], found["safety"][0], group.base)
    out = {r: found[r][0].tensor for r in ROLES[method]}
    out["aligned"] = group.base.tensor
    return out


# tables that are no linear layer, by name (mergekit gives them no vocabulary axis, or has no definition of
# the architecture): GPT-2's wpe, BERT's position_embeddings and token_type_embeddings, a vision tower's
# pos_embed and position_embedding, Whisper's embed_positions, Llama 4's positional_embedding_vlm, T5's
# relative_attention_bias; and the vocabulary tables. (Not any "*embedding": SigLIP2's patch_embedding is
# a linear layer.)
_TABLE = re.compile(r"(?:^|\.)(?:wpe|wte|pos_embed|embed_positions|embed_tokens|word_embeddings|position_embeddings?"
                    r"|token_type_embeddings|positional_embedding\w*|relative_attention_bias)$")


# 2-D parameters that are no linear map: a Mamba mixer's A_log (d_inner x d_state, the log of its state
# matrix); the 2-D biases of an MoE layer's experts. (Not "anything but .weight": DBRX stores its experts'
# linear maps as ffn.experts.mlp.w1, v1, w2; review163.)
_NOT_LINEAR = re.compile(r"(?:^|\.)A_log$|bias$")


def _scorable(group: TensorGroup, t: torch.Tensor) -> bool:
    """2-D floating weights of linear layers: not vocabulary tables (embeddings, lm_head) nor other
    embedding tables (positions, token types), nor the other 2-D parameters in ``_NOT_LINEAR``."""
    name = group.metadata.name or ""
    return (t.dim() == 2 and t.is_floating_point() and group.metadata.vocabulary_axis is None
            and not _TABLE.search(_module(name)) and not _NOT_LINEAR.search(name))


@dataclass(frozen=True)
class _Piece:
    """One linear map a method scores within a tensor: the whole 2-D weight, or one expert's (and,
    in a fused gate_up_proj, its gate or its up projection) in a 3-D MoE experts weight."""

    module: str  # the report's name for it
    transposed: bool  # stored d_in x d_out (a Conv1D layer, transposed experts): scored transposed
    expert: int | None = None
    rows: slice | None = None  # its output rows (of the gate or up projection), along the output axis

    def of(self, x: torch.Tensor) -> torch.Tensor:
        """Its part of ``x`` (a tensor of the group's shape), in the stored layout: a view."""
        y = x if self.expert is None else x[self.expert]
        if self.rows is None:
            return y
        return y[:, self.rows] if self.transposed else y[self.rows]


def _pieces(group: TensorGroup, t: torch.Tensor) -> list[_Piece]:
    """The linear maps to score in the group's tensor (``t``, the task's): none where it is no linear
    layer's weight; one for a 2-D weight; one per expert (and projection) for an MoE layer's 3-D
    experts weight (mergekit reads a transformers 5 MoE checkpoint's experts fused, as transformers
    does: ``mlp.experts.gate_up_proj`` (E, 2I, H), ``mlp.experts.down_proj`` (E, H, I); some
    definitions name the files' fused tensors, Granite 4's ``block_sparse_moe.input_linear``). Each
    expert's gate, up and down projection is scored, and merged, on its own, as the per-expert
    checkpoint has them and as a full fine-tune's own files would be scored."""
    name = group.metadata.name or "?"
    if _scorable(group, t):
        return [_Piece(_module(name), _conv1d(group))]
    if t.dim() != 3 or not t.is_floating_point() or group.metadata.vocabulary_axis is not None or name.endswith("bias"):
        return []
    info = _experts_info(group)
    module, _, param = (info.in_memory(name) if info is not None else name).rpartition(".")
    if module.rsplit(".", 1)[-1] != "experts":
        if info is not None and info.experts is not None and t.shape[0] == info.experts:
            raise SafeMergeError(
                f"tensor {name}: a 3-D weight {tuple(t.shape)} over the model's {info.experts} experts that is no "
                "experts module transformers defines, so safemerge-ext cannot tell its experts' linear maps apart "
                "to score them; merge these models with another method")
        return []
    transposed, parts = _expert_layout(name, f"{module}.{param}", tuple(t.shape), info)
    return [_Piece(f"{module}.{e}.{suffix}", transposed, e, rows) for e in range(t.shape[0]) for suffix, rows in parts]


def expert_parts(param: str, shape: tuple[int, ...], hidden: int | None, declared: dict[str, bool] | None,
                 ) -> tuple[bool, list[tuple[str, slice | None]]] | None:
    """How a 3-D experts weight (E, a, b) holds each expert's linear maps: whether a slice is stored
    d_in x d_out (transposed), and each map's name and output rows (a fused gate_up_proj: the gate's,
    then the up projection's, or interleaved). ``declared``: what transformers' experts module says
    (``is_transposed``, ``has_gate``, ``is_concatenated``), where it says it; else the orientation is
    read from the model's hidden size (the input of gate and up, the output of down); None where
    neither decides it."""
    _, a, b = shape
    declared = declared or {}
    transposed = declared.get("is_transposed")
    if transposed is None and hidden is not None:
        output_is_hidden = "down" in param
        stored = (a == hidden, b == hidden)  # (the rows, the columns of a slice)
        if stored[0] != stored[1]:
            transposed = stored[1] if output_is_hidden else stored[0]
    if transposed is None:
        return None
    outputs = b if transposed else a
    if "gate_up" in param and declared.get("has_gate", True) and outputs % 2 == 0:
        half = outputs // 2
        rows = ((slice(0, half), slice(half, outputs)) if declared.get("is_concatenated", True)
                else (slice(0, outputs, 2), slice(1, outputs, 2)))
        return transposed, [("gate_proj", rows[0]), ("up_proj", rows[1])]
    return transposed, [(param, None)]


@dataclass
class _ExpertsInfo:
    """What the aligned model's config and transformers' definition of it say of its experts."""

    folder: str
    hidden: int | None
    experts: int | None  # per MoE layer
    transforms: list[Any]  # transformers' conversion of its checkpoints to its in-memory names
    declared: dict[str, dict[str, Any]] | None = None  # experts module -> its layout (see _declared_experts)
    config: Any = None  # transformers' config of the model, read once

    def in_memory(self, name: str) -> str:
        """``name`` as transformers names the tensor in memory (the renames its checkpoint conversion makes)."""
        return renamings(self.transforms, name)[-1]


# (the aligned model's folder, its time of last change) -> its _ExpertsInfo; None: no config to read
_experts_infos: dict[tuple[str, int], _ExpertsInfo | None] = {}


def _experts_info(group: TensorGroup) -> _ExpertsInfo | None:
    folder = _config_folder(group)
    if folder is None:
        return None
    key = _stamped(folder)
    with _readers_lock:
        if key not in _experts_infos:
            _experts_infos[key] = _read_experts_info(folder)
        return _experts_infos[key]


def _read_experts_info(folder: str) -> _ExpertsInfo | None:
    try:
        import transformers
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        cfg = transformers.AutoConfig.from_pretrained(folder)
        transforms = list(get_checkpoint_conversion_mapping(cfg.model_type) or [])
    except Exception:  # (custom code, a config transformers cannot read)
        return None
    text = getattr(cfg, "text_config", None) or cfg
    hidden = getattr(text, "hidden_size", None)
    experts = next((v for k in EXPERTS_KEYS
                    if isinstance(v := getattr(text, k, None), int) and not isinstance(v, bool)), None)
    return _ExpertsInfo(folder, hidden if isinstance(hidden, int) else None, experts, transforms, config=cfg)


def _expert_layout(name: str, as_named: str, shape: tuple[int, ...], info: _ExpertsInfo | None,
                   ) -> tuple[bool, list[tuple[str, slice | None]]]:
    """``expert_parts`` for the experts weight ``name`` (``as_named`` in memory), with what the aligned
    model's transformers class declares (its experts modules, built on the meta device once per model:
    no memory, no weights read); one line where the layout cannot be told."""
    module, _, param = as_named.rpartition(".")
    mine: dict[str, Any] = {}
    if info is not None:
        with _readers_lock:
            if info.declared is None:
                info.declared = _declared_experts(info.config)
        mine = dict(info.declared.get(module) or {})
        held = mine.pop(f"shape:{param}", None)  # (its shape in transformers' model)
        if held is not None and shape[1:] != held[1:] and shape[1:] == held[1:][::-1]:
            # the files hold it transposed, and transformers' conversion turns it on load (a Qwen3-VL-MoE
            # checkpoint from the Hub), where mergekit hands it over as stored
            mine["is_transposed"] = not mine.get("is_transposed", False)
    hidden = info.hidden if info is not None else None
    got = expert_parts(param, shape, hidden, mine)
    if got is None:
        raise SafeMergeError(
            f"tensor {name}: an MoE experts weight of shape {shape} whose layout (which axis is an expert's output) "
            f"neither transformers' definition of the aligned model nor its hidden size ({hidden}) tells; "
            "safemerge-ext cannot score it. Save the models with one 2-D weight per expert, or merge the experts "
            "with another method")
    return got


def _declared_experts(cfg: Any) -> dict[str, dict[str, Any]]:
    """What each experts module of the model declares of its weights' layout (transformers 5's
    ``use_experts_implementation``: is_transposed, has_gate, is_concatenated), and its 3-D
    parameters' shapes in memory (``shape:NAME``)."""
    from safemerge_ext.yaml_cli import transformers_class

    declared: dict[str, dict[str, Any]] = {}
    try:
        cls = transformers_class(cfg)
        if cls is None:
            return declared
        with torch.device("meta"):
            model = cls(cfg)
        for mname, mod in model.named_modules():
            mine = {k: getattr(mod, k) for k in ("is_transposed", "has_gate", "is_concatenated")
                    if isinstance(getattr(mod, k, None), bool)}
            if mname.rsplit(".", 1)[-1] == "experts":
                mine.update({f"shape:{p}": tuple(t.shape) for p, t in mod.named_parameters(recurse=False) if t.dim() == 3})
            if mine:
                declared[mname] = mine
        del model
    except Exception:  # (a class that cannot be built from this config here: the shapes decide)
        pass
    return declared


# (aligned model folder or Hub id, its time of last change) -> its config's model_type
_model_types: dict[tuple[str, int], object] = {}


def _stamped(path: str) -> tuple[str, int]:
    """(path, its folder's time of last change; 0 for what is no local folder, a Hub id): a cache key
    (the caches are emptied at each run's start: files rewritten in place leave the time as it was)."""
    return path, Path(path).stat().st_mtime_ns if Path(path).is_dir() else 0


def _config_folder(group: TensorGroup) -> str | None:
    """The folder holding the aligned model's config.json: its own, or for a Hub id the cache's copy
    (mergekit fetched it there); None where there is none."""
    ref = group.base.id if group.base is not None else None
    path = getattr(getattr(ref, "model", None), "path", None)
    if not isinstance(path, str) or not path:
        return None
    if Path(path).is_dir():
        return path
    with contextlib.suppress(Exception):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json", revision=getattr(ref.model, "revision", None))
        return str(Path(cached).parent) if isinstance(cached, str) else None
    return None


def _conv1d(group: TensorGroup) -> bool:
    """Whether the group's weight is a Conv1D layer's (stored d_in x d_out, the transpose of the linear
    map it computes: GPT-2 and its family), by the aligned model's config."""
    module = _module(group.metadata.name)
    if group.base is None or not named_like_conv1d(module):  # (no config read for other layers)
        return False
    path = getattr(getattr(group.base.id, "model", None), "path", None)
    if not isinstance(path, str) or not path:
        return False
    key = _stamped(path)
    with _readers_lock:
        if key not in _model_types:
            folder = _config_folder(group)
            _model_types[key] = config_value(folder, "model_type") if folder else None
            if _model_types[key] is None:
                LOG.warning("safemerge-ext: cannot read the model type of %s (its config.json): a GPT-2-family "
                            "Conv1D weight such as %s would be scored as stored, transposed; give a local folder", path,
                            group.metadata.name)
        return is_conv1d(_model_types[key], module)


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _minus(a: torch.Tensor, b: torch.Tensor, wd: torch.dtype) -> torch.Tensor:
    """``a - b`` in ``wd``, formed a block of rows at a time: no whole ``wd`` copy of either."""
    out = torch.empty(a.shape, dtype=wd, device=a.device)
    for r in row_blocks(a):
        torch.sub(a[r].to(wd), b[r].to(wd), out=out[r])
    return out


def _as_scored(wa: torch.Tensor, wu: torch.Tensor, wd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights as ``ops`` scores them: as stored where it reads that dtype (it forms V in fp32 a
    block at a time, the same values as from fp32 copies), else both in ``wd`` (two dtypes; float64
    weights with a task below it)."""
    if wa.dtype == wu.dtype and wa.dtype in (torch.float32, torch.float16, torch.bfloat16, wd):
        return wa, wu
    return wa.to(wd), wu.to(wd)


def _module(name: str | None) -> str:
    name = name or "?"
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _finite(name: str, out: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``out`` when every value is finite; else one line naming the tensor and the input models
    that hold NaN or Inf (what the method writes must not carry them silently)."""
    if all_finite(out):
        return out
    raise FloatingPointError(f"tensor {name}: NaN or Inf in {_nonfinite(inputs) or 'the merged result'}; "
                             "check the input models")


def _nonfinite(inputs: dict[str, torch.Tensor]) -> str | None:
    """The roles whose tensors hold NaN or Inf, as in "the unaligned model"; None when all are finite."""
    bad = [role for role, x in inputs.items() if x.is_floating_point() and not all_finite(x)]
    return f"the {' and '.join(bad)} model{'s' if len(bad) > 1 else ''}" if bad else None


def _score(name: str, wa: torch.Tensor, wu: torch.Tensor, dW: torch.Tensor, precision: str | None,
           inputs: dict[str, torch.Tensor], transposed: bool = False) -> ops.Score:
    """The score of dW; ``transposed``: of the linear map the stored (d_in x d_out) tensors are the
    transpose of (a Conv1D layer, transposed experts)."""
    if transposed:
        wa, wu, dW = wa.T, wu.T, dW.T
    try:
        return ops.subspace_score(wa, wu, delta=dW, precision=precision)
    except FloatingPointError as exc:
        where = _nonfinite(inputs)
        raise FloatingPointError(f"tensor {name}: NaN or Inf in {where}; check the input models" if where
                                 else f"tensor {name}: {exc}; check the input models") from None


def _value_precision(t: torch.Tensor) -> torch.dtype | None:
    """The half-precision format whose values ``t`` holds exactly, else None.

    Read from the values, not from ``t.dtype``: mergekit hands over tensors in the recipe's
    ``dtype``, so a bf16 checkpoint loaded with ``dtype: float32``, or a LoRA that mergekit folded
    in bf16 (its ``lora_merge_dtype`` defaults to the model's dtype), arrives as fp32 values that
    carry bf16 rounding all the same.
    """
    if t.dtype in _UNIT_ROUNDOFF or not t.is_floating_point():
        return t.dtype if t.dtype in _UNIT_ROUNDOFF else None

    def exact(x: torch.Tensor, half: torch.dtype) -> bool:
        if x.dtype == torch.float32 and half == torch.bfloat16:  # the low 16 bits of every value are zero
            return not torch.any(torch.bitwise_and(x.view(torch.int32), 0xFFFF))
        return torch.equal(x.to(half).to(x.dtype), x)

    # a block of rows at a time (temporaries of a few MiB, not of the tensor), stopping at the first
    # that fails: most fp32 weights fail on their first rows
    blocks = [t] if t.dim() == 0 else [t[r] for r in row_blocks(t)]
    return next((h for h in _UNIT_ROUNDOFF if all(exact(b, h) for b in blocks)), None)


def _rounding_band(src_dtype: torch.dtype | None, wt: torch.Tensor, wa: torch.Tensor, d_norm: float) -> float | None:
    """Estimated cosine uncertainty when dW was recovered from half-precision weights.

    Each weight carries a rounding error of at most u|w|, so ``||E|| <= u (||W_task|| + ||W_aligned||)``;
    a relative perturbation ``e = ||E|| / ||dW||`` of dW moves the cosine by about ``2 e`` to first
    order (an estimate: it assumes C does not amplify E relative to dW).
    """
    u = _UNIT_ROUNDOFF.get(src_dtype)
    if u is None or d_norm <= 0:
        return None
    # (float64 sums a few rows at a time: a norm in fp32 of bf16 weights made an fp32 copy of them,
    # at the peak of a large tensor's merge; review194)
    err = u * (math.sqrt(reference._square_sum(as_rows(wt))) + math.sqrt(reference._square_sum(as_rows(wa))))
    return min(2.0, 2.0 * err / d_norm)


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


# (local model folder, its time of last change) -> its header reader (None: not one); emptied at each
# run's start (_forget_inputs), and the time keeps a folder to which a run adds files from being read
# with its old headers
_readers: dict[tuple[str, int], ModelReader | None] = {}
_readers_lock = threading.Lock()


def _bytes_read(group: TensorGroup) -> int:
    """The group's inputs as stored on disk: mergekit casts them to the recipe's ``dtype`` before a
    method sees them (bf16 checkpoints under ``dtype: float32`` arrive twice their size), so the
    size is the safetensors header's; as received where the file is not known (a LoRA that
    mergekit folded into its cache, a Hub id)."""
    name, total = group.metadata.name, 0
    info = _experts_info(group) if name else None  # (outside the lock: it takes it)
    for e in group.entries:
        stored = None
        path = getattr(getattr(e.id, "model", None), "path", None)  # (a ModelReference's local folder or Hub id)
        if name and isinstance(path, str) and path and not getattr(e.id, "lora", None):
            key = _stamped(path)
            with _readers_lock:  # (the headers stay parsed; no file stays open between tensors)
                if key not in _readers:
                    try:
                        _readers[key] = ModelReader(path) if key[1] else None
                    except SafeMergeError:
                        _readers[key] = None
                reader = _readers[key]
                names = _stored_names_of(name, reader, info)
                if names:
                    try:
                        stored = sum(reader.layout(n)[2] for n in names)
                    except SafeMergeError:
                        stored = None
                    finally:
                        reader.close()
        total += stored if stored is not None else e.tensor.numel() * e.tensor.element_size()
    return total


def _stored_names_of(name: str, reader: ModelReader | None, info: "_ExpertsInfo | None") -> list[str]:
    """The files' tensors mergekit reads as ``name``: itself, else those transformers' conversion turns
    into it (a fused MoE experts weight from per-expert tensors, a renamed router); none where unknown."""
    if reader is None:
        return []
    if name in reader:
        return [name]
    return _stored_as(reader, info).get(name, []) if info is not None and info.transforms else []


_stored_names: "weakref.WeakKeyDictionary[Any, dict[str, list[str]]]" = weakref.WeakKeyDictionary()


def _stored_as(reader: ModelReader, info: "_ExpertsInfo") -> dict[str, list[str]]:
    """The files' tensor names by the name transformers' conversion gives them in memory (once per reader)."""
    if reader not in _stored_names:
        by: dict[str, list[str]] = {}
        for n in reader.names:
            by.setdefault(info.in_memory(n), []).append(n)
        _stored_names[reader] = by
    return _stored_names[reader]


# (model folder, LoRA folder, their times of last change) already checked by _check_loras
_loras_checked: set[tuple[str, str, int, int]] = set()


def _check_loras(group: TensorGroup, role: Any) -> None:
    """Each local ``model+lora`` input's adapter fits its model (headers only; once per pair and
    run): mergekit folds the adapter before a method sees a tensor, and drops a module the
    model does not have without a word."""
    for e in group.entries:
        lora, model = getattr(e.id, "lora", None), getattr(e.id, "model", None)
        lpath, mpath = getattr(lora, "path", None), getattr(model, "path", None)
        if not (isinstance(lpath, str) and isinstance(mpath, str) and Path(lpath).is_dir() and Path(mpath).is_dir()):
            continue  # (no LoRA, or a Hub id: mergekit fetched it, nothing here to read)
        key = (mpath, lpath, Path(mpath).stat().st_mtime_ns, Path(lpath).stat().st_mtime_ns)
        with _readers_lock:
            if key in _loras_checked:
                continue
        from safemerge_ext.io.adapters import (check_fits, check_fold_keeps_scalings, check_peft_loads_factors,
                                               read_adapter)

        label = "base_model" if e.is_base else f"role {role[e.id]}"
        reader = adapter = None
        with contextlib.suppress(SafeMergeError):  # (what these refuse and PEFT folds is left to mergekit)
            reader = open_model(mpath, flag=f"{label}: model")  # (safetensors or .bin, as mergekit reads either)
            adapter = read_adapter(lpath, flag=f"{label}: LoRA adapter", folded=True)
        try:
            if adapter is not None:
                check_fits(adapter, reader, label)
                check_peft_loads_factors(adapter, reader, label)
                check_fold_keeps_scalings(adapter, mpath, label)
        finally:
            if reader is not None:
                reader.close()
        with _readers_lock:
            _loras_checked.add(key)


# (task model, task LoRA, safety LoRA, the LoRAs' times of last change) checked by _check_safety_lora
_pairs_checked: set[tuple[str, str, str, int, int]] = set()


def _check_safety_lora(task: Any, safety: Any, base: Any) -> None:
    """safemerge, where the task and the safety inputs are both local ``model+lora`` and the safety
    LoRA's model is the aligned one (``base``): the safety adapter updates every module the task
    adapter does that the method scores, as ``safemerge merge`` and safemerge-yaml check (headers
    only; once per pair and run): mergekit folds both before a method sees a tensor, and a flagged
    module the safety adapter lacks would be merged as alpha * dW_task alone. (A safety model of its
    own changes the modules its LoRA lacks: :func:`_unchanged_safety`'s warning is for what it leaves.)"""
    paths = []
    for e in (task, safety):
        lora, model = getattr(e.id, "lora", None), getattr(e.id, "model", None)
        lpath, mpath = getattr(lora, "path", None), getattr(model, "path", None)
        if not (isinstance(lpath, str) and isinstance(mpath, str) and Path(lpath).is_dir() and Path(mpath).is_dir()):
            return  # (no LoRA, or a Hub id: mergekit fetched it, nothing here to read)
        paths.append((mpath, lpath))
    aligned = getattr(getattr(getattr(base, "id", None), "model", None), "path", None)
    if not isinstance(aligned, str) or Path(aligned).resolve() != Path(paths[1][0]).resolve():
        return
    key = (paths[0][0], paths[0][1], paths[1][1], Path(paths[0][1]).stat().st_mtime_ns,
           Path(paths[1][1]).stat().st_mtime_ns)
    with _readers_lock:
        if key in _pairs_checked:
            return
    from safemerge_ext.io.adapters import check_safety_covers, read_adapter

    opened: list[Any] = []
    try:
        with contextlib.suppress(SafeMergeError):  # (what these refuse is _check_loras' or mergekit's to say)
            opened.append(open_model(paths[0][0], flag="role task: model"))
            opened.append(read_adapter(paths[0][1], flag="role task: LoRA adapter", folded=True))
            opened.append(read_adapter(paths[1][1], flag="role safety: LoRA adapter", folded=True))
        if len(opened) == 3:
            check_safety_covers(opened[1], opened[2], opened[0], "role task: LoRA adapter", "role safety: LoRA adapter",
                                passed_through(opened[0]))
    finally:
        for o in opened:
            o.close()
    with _readers_lock:
        _pairs_checked.add(key)


def passed_through(reader: ModelReader) -> Callable[[str], bool]:
    """Whether a module of the model ``reader`` reads is one the methods pass through unscored (as
    :func:`_scorable` tells by mergekit's metadata): a vocabulary table (a weight outside the numbered
    layers with the config's vocab_size as a side, lm_head among them: a layer's weight may have that
    size by chance) or another embedding table (``_TABLE``)."""
    from safemerge_ext.io.models import config_value

    vocab = config_value(reader.path, "vocab_size")

    def left_alone(module: str) -> bool:
        if _TABLE.search(module):
            return True
        if not isinstance(vocab, int) or any(part.isdecimal() for part in module.split(".")):
            return False
        weight = reader.resolve_module(module)
        return weight is not None and vocab in reader.meta(weight)[0]
    return left_alone


def _models(group: TensorGroup, role: Any) -> dict[str, dict[str, str | None]]:
    """The inputs by role (the base model as "aligned"), as the report records them: each model's
    path (a folder, or a Hub id) and its LoRA's, for ``model+lora``."""
    def ref(e: Any) -> dict[str, str | None]:
        model, lora = getattr(e.id, "model", None), getattr(e.id, "lora", None)
        return {"model": getattr(model, "path", str(e.id)), "lora": getattr(lora, "path", None)}
    out = {"aligned": ref(group.base)} if group.base is not None else {}
    out.update({str(role[e.id]): ref(e) for e in group.non_base})
    return out


def _task_lora(group: TensorGroup, role: Any) -> bool:
    """Whether the task input is ``model+lora`` (mergekit folded the adapter before loading it)."""
    return any(role[e.id] == "task" and getattr(e.id, "lora", None) for e in group.non_base)


def _record(
    method: str, group: TensorGroup, score: ops.Score, *, flagged: bool, action: str, settings: dict[str, Any],
    src_dtype: torch.dtype, band: float | None, elapsed: float, nbytes: int, report_path: str,
    precision: str | None, rounding: torch.dtype | None = None, task_lora: bool = False,
    models: dict[str, dict[str, str | None]] | None = None, piece: _Piece | None = None,
    safety_unchanged: bool = False,
) -> None:
    name = group.metadata.name or "?"
    whole = piece is None or piece.expert is None
    rec = LayerRecord(
        module=_module(name) if piece is None else piece.module,
        cosine=score.cosine,
        flagged=flagged,
        reason=score.reason,
        action=action,
        shape=tuple(group.base.tensor.shape if whole else piece.of(group.base.tensor).shape),
        v_norm=score.v_norm,
        delta_norm=score.delta_norm,
        extra={"tensor": name, **({} if whole else {"expert": piece.expert}), "input_dtype": _dtype_name(src_dtype),
               "rounding_dtype": _dtype_name(rounding), "task_lora": task_lora, "rounding_band": band, **settings,
               **({"safety_unchanged": True} if safety_unchanged else {})},
    )
    _append(report_path, {"method": method, "backend": score.backend, "backend_detail": backend_detail(score.backend),
                          "backend_requested": backends.requested_backend(None),
                          "device": str(group.base.tensor.device) if group.base is not None else None,
                          "models": models or {},
                          "precision": score.precision,
                          "precision_requested": requested_precision(precision),
                          "time_s": elapsed, "end": time.time(), "bytes": nbytes, "layer": rec.to_json()})


@dataclass
class _Scored:
    """One linear map (a ``_Piece``) scored for safemerge / safelora: its weights as stored, dW_f
    (fp32, or float64 for a float64 task), its score, the clock."""

    name: str  # the tensor's, or for an expert's piece, the piece's (in error messages)
    piece: _Piece
    task: torch.Tensor
    wd: torch.dtype
    wa: torch.Tensor
    wu: torch.Tensor
    dW: torch.Tensor
    score: ops.Score
    band: float | None
    rounding: torch.dtype | None
    task_lora: bool
    start: float
    precision: str | None
    models: dict[str, dict[str, str | None]]
    safety_unchanged: bool = False  # (set where a flagged piece's safety weights are the aligned ones)

    @classmethod
    def of(cls, group: TensorGroup, t: dict[str, torch.Tensor], role: Any, precision: str | None,
           piece: _Piece) -> "_Scored":
        start = time.perf_counter()
        task = piece.of(t["task"])
        name = group.metadata.name or "?" if piece.expert is None else piece.module
        wd = _work_dtype(task)
        wa, wu = piece.of(t["aligned"]), piece.of(t["unaligned"])
        dW = _minus(task, wa, wd)
        score = _score(name, *_as_scored(wa, wu, wd), dW, precision, t, piece.transposed)
        rounding = _value_precision(task)
        return cls(name, piece, task, wd, wa, wu, dW, score, _rounding_band(rounding, task, wa, score.delta_norm),
                   rounding, _task_lora(group, role), start, precision, _models(group, role))

    def projected(self) -> torch.Tensor:
        """W_aligned + C dW (Safe LoRA's weights), in the stored layout and dtype."""
        wa, wu = _as_scored(self.wa, self.wu, self.wd)
        if self.piece.transposed:
            N = ops.project_delta(wa.T, wu.T, self.dW.T, precision=self.precision).T
        else:
            N = ops.project_delta(wa, wu, self.dW, precision=self.precision)
        return self.plus(lambda r: N[r].to(self.wd))

    def plus(self, update: Callable[[slice], torch.Tensor]) -> torch.Tensor:
        """W_aligned + ``update(rows)`` a block of rows at a time, in the stored dtype: the new weights
        without a whole work-dtype copy of W_aligned or of their sum."""
        out = torch.empty(self.task.shape, dtype=self.task.dtype, device=self.task.device)
        for r in row_blocks(out):
            out[r] = self.wa[r].to(self.wd) + update(r)
        return out

    def record(self, method: str, group: TensorGroup, flagged: bool, action: str, settings: dict[str, Any],
               report_path: str, nbytes: int) -> None:
        _record(method, group, self.score, flagged=flagged, action=action, settings=settings,
                src_dtype=self.task.dtype, band=self.band, elapsed=time.perf_counter() - self.start,
                nbytes=nbytes, report_path=report_path,
                precision=self.precision, rounding=self.rounding, task_lora=self.task_lora, models=self.models,
                piece=self.piece, safety_unchanged=self.safety_unchanged)


def _shares(group: TensorGroup, pieces: list[_Piece]) -> list[int]:
    """The group's bytes read (one reckoning per tensor), split among its pieces to add up exactly."""
    total = _bytes_read(group)
    n = len(pieces)
    return [total // n + (i < total % n) for i in range(n)]


def _put(out: torch.Tensor, task: torch.Tensor, piece: _Piece, pieces: list[_Piece], value: torch.Tensor,
         ) -> torch.Tensor:
    """The tensor a method returns, with ``value`` (a flagged piece's new weights) in ``piece``'s place:
    ``value`` itself for a whole 2-D weight; for an expert's, a copy of the task's tensor, made once."""
    if len(pieces) == 1 and piece.expert is None:
        return value
    if out is task:
        out = task.clone()
    piece.of(out).copy_(value)
    return out


def _per_piece(group: TensorGroup, t: dict[str, torch.Tensor], pieces: list[_Piece], role: Any,
               precision: str | None, method: str, flags: Callable[[float], bool],
               weights: Callable[[_Scored], torch.Tensor], action: str, settings: dict[str, Any],
               report_path: str) -> torch.Tensor:
    """The task's tensor with each of its ``pieces`` (``_pieces``) that ``flags`` (on its cosine)
    given ``weights`` (the piece's new weights, W_aligned + its new update), each piece recorded; a
    tensor with no piece is checked and passed through."""
    if not pieces:
        return _finite(group.metadata.name or "?", t["task"], {"task": t["task"]})
    out = t["task"]
    for piece, nbytes in zip(pieces, _shares(group, pieces)):
        s = _Scored.of(group, t, role, precision, piece)
        flagged = not math.isnan(s.score.cosine) and flags(s.score.cosine)
        if flagged:
            out = _put(out, t["task"], piece, pieces, _finite(s.name, weights(s), t))
        s.record(method, group, flagged, action if flagged else "skipped" if s.score.reason else "kept", settings,
                 report_path, nbytes)
    return out


# ---------------------------------------------------------------------------------------------
# the three methods


@merge_method(
    name="safemerge",
    pretty_name="SafeMERGE",
    reference_url="https://arxiv.org/abs/2503.17239",
    contract=InputContract(base=BasePolicy.REQUIRED, min_inputs=4, max_inputs=4),
)
def safemerge_method(
    group: TensorGroup,
    role: PerNonBase[Role],
    threshold: Threshold = 0.35,
    alpha: Fraction = 0.8,
    merge: MergeName = "linear",
    density: Density = 1.0,
    seed: Seed = 0,
    report_path: str = "",
    precision: Precision = None,
) -> torch.Tensor:
    """Flag a weight when cos(C dW_f, dW_f) < threshold; flagged: W_a + merge(alpha dW_f, (1-alpha) dW_s)."""
    with _failing_run(report_path):
        return _safemerge_tensor(group, role, threshold, alpha, merge, density, seed, report_path, precision)


@exact_fp32_matmuls()
def _safemerge_tensor(
    group: TensorGroup, role: Any, threshold: float, alpha: float, merge: str, density: float,
    seed: int, report_path: str, precision: str | None,
) -> torch.Tensor:
    t = _roles(group, role, "safemerge")
    pieces = _pieces(group, t["task"])
    if pieces:
        _finite(group.metadata.name or "?", t["safety"], {"safety": t["safety"]})  # flagged or not

    def merged(s: _Scored) -> torch.Tensor:
        safety = s.piece.of(t["safety"])
        s.safety_unchanged = _equal_values(safety, s.wa)  # (said in the report: merged as alpha dW_task alone)
        if merge == "linear":  # (elementwise: the same bits a block of rows at a time)
            return s.plus(lambda r: combine_full(s.dW[r], _minus(safety[r], s.wa[r], s.wd), alpha=alpha,
                                                 method=merge, density=density, seed=seed,
                                                 module=s.piece.module).to(s.wd))
        update = combine_full(s.dW, _minus(safety, s.wa, s.wd), alpha=alpha, method=merge, density=density,
                              seed=seed, module=s.piece.module).to(s.wd)  # (ties' threshold is the whole tensor's)
        return s.plus(lambda r: update[r])

    return _per_piece(group, t, pieces, role, precision, "safemerge", lambda cos: cos < threshold, merged, "merged",
                      {"threshold": threshold, "alpha": alpha, "merge": merge, "density": density, "seed": seed},
                      report_path)


@merge_method(
    name="safelora",
    pretty_name="Safe LoRA",
    reference_url="https://arxiv.org/abs/2405.16833",
    contract=InputContract(base=BasePolicy.REQUIRED, min_inputs=3, max_inputs=3),
)
def safelora_method(
    group: TensorGroup,
    role: PerNonBase[Role],
    threshold: Threshold = 0.5,
    report_path: str = "",
    precision: Precision = None,
) -> torch.Tensor:
    """Flag a weight when cos(C dW, dW) <= threshold; flagged: W_a + C dW (C never formed)."""
    with _failing_run(report_path):
        return _safelora_tensor(group, role, threshold, report_path, precision)


@exact_fp32_matmuls()
def _safelora_tensor(
    group: TensorGroup, role: Any, threshold: float, report_path: str, precision: str | None,
) -> torch.Tensor:
    t = _roles(group, role, "safelora")
    return _per_piece(group, t, _pieces(group, t["task"]), role, precision, "safelora", lambda cos: cos <= threshold,
                      _Scored.projected, "projected", {"threshold": threshold}, report_path)


@merge_method(
    name="resta",
    pretty_name="RESTA",
    reference_url="https://arxiv.org/abs/2402.11746",
    contract=InputContract(base=BasePolicy.REQUIRED, min_inputs=3, max_inputs=3),
)
def resta_method(
    group: TensorGroup,
    role: PerNonBase[Role],
    beta: Beta = 0.5,
    density: Density = 1.0,
    seed: Seed = 0,
    report_path: str = "",
    precision: Precision = None,
) -> torch.Tensor:
    """W_task + beta * DARE(W_aligned - W_unaligned) on every floating tensor; 2-D weights are also scored."""
    with _failing_run(report_path):
        return _resta_tensor(group, role, beta, density, seed, report_path, precision)


@exact_fp32_matmuls()
def _resta_tensor(
    group: TensorGroup, role: Any, beta: float, density: float, seed: int, report_path: str,
    precision: str | None,
) -> torch.Tensor:
    t = _roles(group, role, "resta")
    task = t["task"]
    if not task.is_floating_point():
        return task
    name, wd = group.metadata.name or "?", _work_dtype(task)
    wa, wu = t["aligned"], t["unaligned"]
    pieces = _pieces(group, task)
    scored = []
    for piece in pieces:
        start = time.perf_counter()
        pa = piece.of(wa)
        dW = _minus(piece.of(task), pa, wd)
        score = _score(name if piece.expert is None else piece.module, *_as_scored(pa, piece.of(wu), wd), dW,
                       precision, t, piece.transposed)
        scored.append((piece, score, time.perf_counter() - start))
        del dW
    start = time.perf_counter()
    out = _finite(name, _shifted(task, wa, wu, beta, density, seed, _module(name)), t)
    shifting = (time.perf_counter() - start) / max(len(pieces), 1)
    task_lora, models = _task_lora(group, role), _models(group, role)
    for (piece, score, elapsed), nbytes in zip(scored, _shares(group, pieces) if pieces else []):
        _record("resta", group, score, flagged=False, action="shifted", settings={"beta": beta, "density": density,
                "seed": seed}, src_dtype=task.dtype, band=None, elapsed=elapsed + shifting,
                nbytes=nbytes, report_path=report_path,
                precision=precision, task_lora=task_lora, models=models, piece=piece)
    return out


def _equal_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one shape hold the same values (dtypes may differ), compared a block of
    rows at a time (no whole mask)."""
    a, b = as_rows(a), as_rows(b)
    return not any(bool((a[r] != b[r]).any()) for r in row_blocks(a))


def _shifted(task: torch.Tensor, wa: torch.Tensor, wu: torch.Tensor, beta: float, density: float, seed: int,
             module: str) -> torch.Tensor:
    """``W_task + beta * DARE(W_aligned - W_unaligned)`` in the task's dtype, formed a block of rows
    at a time in the work dtype (elementwise: the same bits as whole, without whole work-dtype copies
    of the three). DARE's mask is drawn whole, in the order of the tensor's entries, as
    ``merge.dare_pruned`` draws it."""
    wd, shape = _work_dtype(task), task.shape
    task, wa, wu = as_rows(task), as_rows(wa), as_rows(wu)  # (experts, 1-D and 0-D tensors too)
    mask = None
    if density < 1.0:
        mask = torch.bernoulli(torch.full(task.shape, density, dtype=wd, device=task.device),
                               generator=dare_generator(seed, module, task.device))
    out = torch.empty(task.shape, dtype=task.dtype, device=task.device)
    for r in row_blocks(out):
        shift = wa[r].to(wd) - wu[r].to(wd)
        if mask is not None:
            shift = shift * mask[r] / density
        out[r] = torch.add(task[r].to(wd), shift, alpha=beta)
    return out.view(shape)


_METHODS = {"safemerge": safemerge_method, "safelora": safelora_method, "resta": resta_method}


def _checking_the_recipe(method: Any) -> None:
    """Have ``method`` check a running ``mergekit-yaml``'s recipe by its parameters' names before
    mergekit plans the merge (its ``validate_inputs``, which the planner calls first): mergekit's
    resolver drops names a method does not declare, so a misspelt parameter would merge silently
    at its default."""
    contract = method.validate_inputs

    def validate_inputs(input_ids: Sequence[Any], base_id: Any = None, *, group_name: Optional[str] = None) -> None:
        _check_mergekit_yaml_recipe(method.spec.name)
        _check_planned_config(method.spec.name, sys._getframe(1))
        contract(input_ids, base_id, group_name=group_name)

    method.validate_inputs = validate_inputs


_recipe_checked: list[str] = []


def _check_mergekit_yaml_recipe(name: str) -> None:
    """Once per process: in ``mergekit-yaml``, the recipe named on its command line, checked as
    safemerge-yaml checks its parameters (``yaml_cli.check_parameter_names``); in ``mergekit-multi``,
    each of its recipes that merges with these methods (when the first of them is planned)."""
    multi = _in_mergekit_multi()
    if _recipe_checked or not (_in_mergekit_yaml() or multi):
        return
    _recipe_checked.append(name)
    recipe = (_mergekit_multi_args() if multi else _mergekit_yaml_args()).get("config_file")
    try:  # (mergekit has read and validated this file already: anything odd here is not ours to report)
        import yaml
        from mergekit.config import MergeConfiguration

        nodes = list(yaml.compose_all(Path(recipe).read_text(encoding="utf-8"), Loader=yaml.SafeLoader))
        documents = [(node, yaml.SafeLoader("").construct_document(node)) for node in nodes if node is not None]
    except Exception:
        return
    from safemerge_ext.yaml_cli import (check_layer_ranges, check_parameter_names, check_recipe_keys, check_roles,
                                        strict_document)

    for node, data in documents:  # (mergekit-multi's recipes: a file of several)
        if not isinstance(data, dict) or data.get("merge_method") not in _METHODS:
            continue
        where = recipe
        if multi:  # (mergekit-multi's own key: the stage's name, which later recipes give as a model)
            data = dict(data)
            where = _stage_label(recipe, data.pop("name", None))
        strict_document(node, where)  # (a key given twice: mergekit took the last one without a word)
        try:
            config = MergeConfiguration.model_validate(data)
        except Exception:
            continue
        check_recipe_keys(data, where)
        check_parameter_names(config, config.merge_method, where)
        check_roles(config.merge_method, config, where)
        check_layer_ranges(config, config.merge_method, where)


def _stage_label(recipe: str | os.PathLike, name: str | None) -> str:
    """How a refusal names one of a mergekit-multi file's recipes."""
    return f"{recipe} ({f'recipe {name}' if name is not None else 'the final recipe'})"


def _check_no_residual_weight(config: Any, label: str) -> None:
    """A slice's ``residual_weight``, which mergekit 0.1.5 declares and never applies, refused where
    the configuration comes from Python too (a recipe's is refused with its other keys)."""
    places = [("", config.slices)] + [(f"modules.{n}.", m.slices) for n, m in (config.modules or {}).items()]
    for where, slices in places:
        for i, sl in enumerate(slices or []):
            if getattr(sl, "residual_weight", None) is not None:
                from safemerge_ext.yaml_cli import RESIDUAL_WEIGHT_UNUSED

                raise SafeMergeError(f"{label}: {where}slices[{i}]: {RESIDUAL_WEIGHT_UNUSED}")


def _planned_label(out: str | os.PathLike | None) -> str:
    """How a refusal names the configuration mergekit's planner plans (in mergekit-multi, with its recipe)."""
    laid_out = "merge_config (as mergekit's planner lays it out)"
    args = _mergekit_multi_args()
    if not args or out is None:
        return laid_out
    folder = os.path.abspath(out)
    if args.get("out_path") and folder == os.path.abspath(args["out_path"]):
        return f"{_stage_label(args.get('config_file'), None)}: {laid_out}"
    name = os.path.relpath(folder, os.path.abspath(args.get("intermediate_dir") or ""))
    if name.startswith(os.pardir) or name == os.curdir:
        return laid_out
    return f"{_stage_label(args.get('config_file'), name.replace(os.sep, '/'))}: {laid_out}"


def _check_planned_config(name: str, caller: Any) -> None:
    """``run_merge`` from Python (and the console scripts): the configuration and the options that
    mergekit's planner (the caller) plans with, checked before it starts: the parameters by name
    and value as a recipe's are (mergekit's in-memory API refuses unknown names itself; its planner
    drops them), and the math device. By now the planner has folded ``models:`` into each module's
    slices, so the messages name places as it lays them out."""
    from mergekit.plan import MergePlanner

    planner = caller.f_locals.get("self")
    if not isinstance(planner, MergePlanner):
        return
    config = planner.config
    first = planner not in _planned
    _planned.add(planner)
    if first:
        _forget_inputs()
        _read_afresh(planner)
    if config.merge_method == name:
        out = _check_out_is_no_input(config, caller)
        if first and out is not None and _in_mergekit_multi():
            from safemerge_ext.mergekit_run import begin_stage

            begin_stage(out)
        from safemerge_ext.yaml_cli import check_layer_ranges, check_parameter_names, check_roles

        laid_out = _planned_label(out)
        _check_no_residual_weight(config, laid_out)
        check_parameter_names(config, name, laid_out)
        check_roles(name, config, laid_out)
        check_layer_ranges(config, name, laid_out)
    check_device(planner.options)
    if first and config.merge_method == name:
        _check_plan_covers(planner)
        from safemerge_ext.yaml_cli import check_card_lookups

        check_card_lookups(config, getattr(planner.options, "write_model_card", False), laid_out,
                           "--no-write-model-card (MergeOptions.write_model_card=False)",
                           _mergekit_multi_args().get("intermediate_dir"))
        # (once nothing refuses the run: a refused one leaves an earlier run's records as they were; its
        # report_path is the recipe's, as check_parameter_names allows no other)
        from safemerge_ext.mergekit_run import begin_run, note_run_settings

        loras = any(getattr(ref, "lora", None) is not None for ref in config.referenced_models())
        begin_run(str((config.parameters or {}).get("report_path") or ""), out)
        note_run_settings(str((config.parameters or {}).get("report_path") or ""), {
            "dtype": config.dtype, "out_dtype": config.out_dtype,
            "lora_merge_dtype": getattr(planner.options, "lora_merge_dtype", None) if loras else None})


_planned: "weakref.WeakSet[Any]" = weakref.WeakSet()  # the planners seen: their run reads its inputs afresh, once


def _check_plan_covers(planner: Any) -> None:
    """The planner's architecture has a place for every tensor of the aligned model (a local folder;
    see ``yaml_cli.check_plan_covers``): else mergekit writes the merged model without them."""
    from safemerge_ext.yaml_cli import check_plan_covers

    base = planner.config.base_model
    path = getattr(getattr(base, "model", None), "path", None)
    if not isinstance(path, str) or not Path(path).is_dir():
        return
    try:  # (safetensors or .bin files, as mergekit reads either)
        names = stored_names(path, flag="base_model (aligned)")
    except (SafeMergeError, ValueError, OSError):  # (what mergekit reads: its own error comes when it does)
        return
    check_plan_covers(planner.arch_info, names, path, "merge_config")


def _forget_inputs() -> None:
    """Once per run: drop what earlier runs of the process read of their inputs (parsed headers,
    configs, the adapters checked against their models). Their folders' times, which key those, stay
    as they were when files are rewritten in place (``cp`` over them; review160)."""
    with _readers_lock:
        for cache in (_readers, _model_types, _experts_infos, _loras_checked, _pairs_checked):
            cache.clear()


def _read_afresh(planner: Any) -> None:
    """Once per run, before it plans a tensor: have it read its inputs as they are now. mergekit
    keeps one loader per model for the life of the process (``LoaderCache.loaders``, never
    emptied), with the shard it last read open: a program's second merge read a model saved again
    since, or a LoRA's deleted fold, from the first run's files (review147). Each of this run's
    models gets a new loader, made as mergekit makes one (its LoRA folded into this run's cache);
    the entry is replaced, never removed, so a run in another thread that looks the model up at
    that moment finds one (removing it was a KeyError there; review150, review151)."""
    from mergekit.io.tasks import LoaderCache

    cache = LoaderCache()  # (this thread's, set up by this run's run_merge)
    for model in planner.config.referenced_models():
        if model not in LoaderCache.loaders:
            continue
        merged = model.merged(cache_dir=cache.lora_cache_dir, trust_remote_code=cache.trust_remote_code,
                              lora_merge_dtype=cache.lora_merge_dtype)
        LoaderCache.loaders[model] = merged.lazy_loader(cache_dir=cache.hf_cache_dir,
                                                        lazy_unpickle=cache.lazy_unpickle)


def _check_out_is_no_input(config: Any, planner_frame: Any) -> str | os.PathLike | None:
    """OUT_PATH (``run_merge``'s ``out_path``) that is one of the recipe's model or LoRA folders:
    mergekit writes in place, so the merged model would land beside that model's own files, and
    the folder would hold two (safemerge-yaml refuses it; so does this, before anything is written).
    Returns OUT_PATH (None where it cannot be told)."""
    out, flag = _mergekit_yaml_out(), "OUT_PATH"
    frame = planner_frame
    while not out and frame is not None and frame.f_code.co_name != "run_merge":
        frame = frame.f_back  # (the planner plans from plan_to_disk, which run_merge calls)
    if frame is not None and not out:
        out, flag = frame.f_locals.get("out_path"), "run_merge's out_path"
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        return None
    for ref in config.referenced_models():
        for part in (ref.model, getattr(ref, "lora", None)):
            if part is not None and same_place(part.path, out):
                raise SafeMergeError(f"{flag} {out} is the folder of the recipe's input {ref}, where mergekit would "
                                     "write the merged model beside that model's own files; give a new folder")
    return out


def check_device(options: Any) -> None:
    """mergekit's math device (``--cuda``, ``--device``; ``MergeOptions.cuda``/``.device``) refused
    in one line where torch cannot use it, before the merge starts (mergekit alone fails at its
    first tensor, with a traceback). A device type torch cannot be asked about is left to mergekit."""
    if getattr(options, "multi_gpu", False):  # (mergekit's MultiGPUExecutor reads the accelerator's type)
        acc = getattr(torch, "accelerator", None)
        if (acc.current_accelerator() if acc is not None else None) is None and not torch.cuda.is_available():
            given = ("--gpu-rich (MergeOptions.gpu_rich, which sets --multi-gpu and --cuda)"
                     if getattr(options, "gpu_rich", False) else "--multi-gpu (MergeOptions.multi_gpu)")
            raise SafeMergeError(f"mergekit's {given}: torch {torch.__version__} sees no accelerator here; merge "
                                 f"without {given.split()[0]}, on the CPU")
    device = str(getattr(options, "device", None) or "cpu")
    flag = getattr(options, "cuda", False) and device == "cuda"
    given = "--cuda (MergeOptions.cuda)" if flag else f"--device {device} (MergeOptions.device)"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SafeMergeError(f"mergekit's {given}: not a device name torch knows; use cpu, cuda or cuda:N") from None
    _check_backend_setting(dev.type)
    if dev.type == "cpu":
        return
    if dev.type == "mps":  # (the scores, projections and their checks are float64, which MPS does not have)
        raise SafeMergeError(f"mergekit's {given}: safemerge-ext's methods compute in float64, which Apple's MPS "
                             "cannot hold; use --device cpu")
    backend = getattr(torch, dev.type, None)
    available, count = getattr(backend, "is_available", None), getattr(backend, "device_count", None)
    if not callable(available):
        return
    if not available():
        raise SafeMergeError(f"mergekit's {given}: torch {torch.__version__} has no usable {dev.type} device here; "
                             + ("merge without --cuda, on the CPU" if flag else "use --device cpu"))
    if dev.index is not None and callable(count) and dev.index >= count():
        raise SafeMergeError(f"mergekit's {given}: this machine has {count()} {dev.type} device(s); "
                             f"use {dev.type} or {dev.type}:N with a smaller N")


def _check_backend_setting(device_type: str) -> None:
    """``SAFEMERGE_BACKEND`` naming no backend, or one that cannot run on mergekit's device or is not
    built: refused before the merge (the methods meet it at their first tensor, after every LoRA
    input was folded)."""
    quiet = backends.QUIET.set(True)
    try:
        if os.environ.get(backends.ENV_VAR, "").strip().lower() in ("", backends.AUTO):
            # as safemerge's commands: a bad SAFEMERGE_CPU_ISA under auto is one line before the merge, not a
            # Python UserWarning (two lines, a source path) inside mergekit's progress bar and a torch fallback
            refusal = backends.cpu_isa_refusal(device_type, "SAFEMERGE_BACKEND=torch")
            if refusal:
                raise SafeMergeError(refusal)
            return
        backends.resolve(None, device_type)
    except ValueError as exc:  # (its message starts with the setting)
        raise SafeMergeError(str(exc)) from None
    finally:
        backends.QUIET.reset(quiet)


for _method in _METHODS.values():
    _checking_the_recipe(_method)


def register_methods() -> list[str]:
    """Register the three methods with mergekit once; return the names registered by this call.

    Idempotent: a name that is already ours is skipped; a different method of the same name is left
    alone with a warning (somebody else owns it).
    """
    from mergekit.merge_methods import registry

    done = []
    current = {m.spec.name: m for m in registry.registered_methods()}
    for name, method in _METHODS.items():
        if name in current:
            if current[name] is not method:
                LOG.warning("mergekit already has a merge method %r that is not safemerge-ext's; leaving it", name)
            continue
        registry.register(method)
        done.append(name)
    cli = mergekit_cli()
    if cli is not None:
        _install_excepthook()
        from safemerge_ext._faults import bus_error_line, explain_bus_errors

        # (mergekit's own argv parsing may be half imported yet: OUT_PATH is not named here)
        explain_bus_errors(bus_error_line(cli, "what it wrote to OUT_PATH is incomplete" if cli == "mergekit-yaml"
                                          else "what it wrote to the stage's output folder is incomplete"))
    return done


_hook = sys.modules.get("safemerge_ext._autoload_hook")
if _hook is not None and getattr(_hook, "pending", False):  # mergekit was first imported from here
    _hook.pending = False
    register_methods()
