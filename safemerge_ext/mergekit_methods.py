"""mergekit merge methods ``safemerge``, ``safelora`` and ``resta`` (mergekit >= 0.1.5 method API).

Each method is a per-tensor kernel over one ``TensorGroup``: the base input is the aligned model,
the other inputs carry a ``role`` (``task``, ``safety``, ``unaligned``). For a 2-D weight the task
update ``dW = W_task - W_aligned`` is scored with :func:`safemerge_ext.ops.subspace_score` (the same
backend-dispatched math as the CLI) and, if flagged, merged (SafeMERGE, via
:func:`safemerge_ext.merge.combine_full`) or projected (Safe LoRA, via
:func:`safemerge_ext.ops.project_delta`). Everything else -- 1-D tensors, embeddings and ``lm_head``
(not linear layers LoRA targets; their rows are the vocabulary), position and token-type embedding
tables, degenerate layers -- is the task model's tensor, bit for bit. A Conv1D layer (GPT-2 and its
family store the weight d_in x d_out) is scored and projected as the linear map it computes, the
transpose. Inputs are upcast to fp32 here; no kernel stacks its inputs.

Reports: mergekit has no end-of-run hook and may run tensors in several threads, so every scored
tensor appends one JSON line to a sidecar file under a lock; :func:`finalize_report` (called by
``safemerge-yaml``, by tests, and at interpreter exit for plain ``mergekit-yaml``) turns it into
``safemerge_report.json`` + ``.png``. Where: the ``report_path`` parameter, else
``$SAFEMERGE_REPORT_DIR``, else the ``OUT_PATH`` of a running ``mergekit-yaml``, else none (a
warning says so).
"""

from __future__ import annotations

import atexit
import contextlib
import dis
import functools
import glob
import json
import logging
import math
import numbers
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, PerNonBase, TensorGroup
from mergekit.merge_methods.easy_define import merge_method
from pydantic import AfterValidator, BeforeValidator
from typing_extensions import Annotated

from safemerge_ext import ops
from safemerge_ext._env import switched_on
from safemerge_ext._signals import raise_pending
from safemerge_ext.backends import EXACT, PRECISIONS, backend_detail, requested_precision
from safemerge_ext.errors import SafeMergeError
from safemerge_ext.io.models import ModelReader, all_finite, config_value, is_conv1d, named_like_conv1d
from safemerge_ext.merge import METHODS as MERGE_METHODS
from safemerge_ext.merge import PEFT_LINEAR, USES_DENSITY, USES_SEED, combine_full, seeded
from safemerge_ext.report import (REPORT_JSON, REPORT_PNG, LayerRecord, PlotUnavailable, build_report, plot,
                                  summary_table, write_json)
from safemerge_ext.selection import unreachable_threshold

__all__ = [
    "METHOD_NAMES",
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
SIDECAR = ".safemerge_layers.{pid}.jsonl"
REPORT_DIR_ENV = "SAFEMERGE_REPORT_DIR"
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
Beta = Annotated[float, _no_switch("beta"), _in_range("beta", 0.0, math.inf, "the weight of the safety vector")]
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


def _scorable(group: TensorGroup, t: torch.Tensor) -> bool:
    """2-D floating weights of linear layers: not vocabulary tables (embeddings, lm_head) nor other
    embedding tables (positions, token types)."""
    return (t.dim() == 2 and t.is_floating_point() and group.metadata.vocabulary_axis is None
            and not _TABLE.search(_module(group.metadata.name)))


# (aligned model folder or Hub id, its time of last change) -> its config's model_type
_model_types: dict[tuple[str, int], object] = {}


def _stamped(path: str) -> tuple[str, int]:
    """(path, its folder's time of last change; 0 for what is no local folder, a Hub id): a cache key
    that a folder rewritten between two merges of one process does not match."""
    return path, Path(path).stat().st_mtime_ns if Path(path).is_dir() else 0


def _conv1d(group: TensorGroup) -> bool:
    """Whether the group's weight is a Conv1D layer's (stored d_in x d_out, the transpose of the linear
    map it computes: GPT-2 and its family), by the aligned model's config."""
    module = _module(group.metadata.name)
    if group.base is None or not named_like_conv1d(module):  # (no config read for other layers)
        return False
    ref = group.base.id
    path = getattr(getattr(ref, "model", None), "path", None)
    if not isinstance(path, str) or not path:
        return False
    key = _stamped(path)
    with _readers_lock:
        if key not in _model_types:
            folder: str | None = path if key[1] else None
            if folder is None:  # (a Hub id: mergekit fetched its config into the cache, read there)
                with contextlib.suppress(Exception):
                    from huggingface_hub import try_to_load_from_cache

                    cached = try_to_load_from_cache(path, "config.json", revision=getattr(ref.model, "revision", None))
                    folder = str(Path(cached).parent) if isinstance(cached, str) else None
            _model_types[key] = config_value(folder, "model_type") if folder else None
            if _model_types[key] is None:
                LOG.warning("safemerge-ext: cannot read the model type of %s (its config.json): a GPT-2-family "
                            "Conv1D weight such as %s would be scored as stored, transposed; give a local folder", path,
                            group.metadata.name)
        return is_conv1d(_model_types[key], module)


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


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
           inputs: dict[str, torch.Tensor], conv1d: bool = False) -> ops.Score:
    """The score of dW; ``conv1d``: of the linear map the stored (d_in x d_out) tensors are the transpose of."""
    if conv1d:
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
    if t.dim() == 0:
        blocks = [t]
    else:
        rows = max(1, (1 << 20) // max(1, t.shape[-1])) if t.dim() == 2 else max(1, t.shape[0])
        blocks = [t[i : i + rows] for i in range(0, t.shape[0], rows)]
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
    wide = torch.promote_types(wt.dtype, torch.float32)  # (a float64 load of half-precision values too)
    err = u * (float(torch.linalg.vector_norm(wt, dtype=wide)) + float(torch.linalg.vector_norm(wa)))
    return min(2.0, 2.0 * err / d_norm)


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


# (local model folder, its time of last change) -> its header reader (None: not one); the time keeps a
# folder rewritten between two merges of one process from being read with its old headers
_readers: dict[tuple[str, int], ModelReader | None] = {}
_readers_lock = threading.Lock()


def _bytes_read(group: TensorGroup) -> int:
    """The group's inputs as stored on disk: mergekit casts them to the recipe's ``dtype`` before a
    method sees them (bf16 checkpoints under ``dtype: float32`` arrive twice their size), so the
    size is the safetensors header's; as received where the file is not known (a LoRA that
    mergekit folded into its cache, a Hub id)."""
    name, total = group.metadata.name, 0
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
                if reader is not None and name in reader:
                    try:
                        stored = reader.layout(name)[2]
                    except SafeMergeError:
                        stored = None
                    finally:
                        reader.close()
        total += stored if stored is not None else e.tensor.numel() * e.tensor.element_size()
    return total


# (model folder, LoRA folder, their times of last change) already checked by _check_loras
_loras_checked: set[tuple[str, str, int, int]] = set()


def _check_loras(group: TensorGroup, role: Any) -> None:
    """Each local ``model+lora`` input's adapter fits its model (headers only; once per pair and
    process): mergekit folds the adapter before a method sees a tensor, and drops a module the
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
        from safemerge_ext.io.adapters import check_fits, read_adapter

        label = "base_model" if e.is_base else f"role {role[e.id]}"
        reader = adapter = None
        with contextlib.suppress(SafeMergeError):  # (what these refuse and PEFT folds, .bin files or
            reader = ModelReader(mpath, flag=f"{label}: model")  # fan_in_fan_out say, is left to mergekit)
            adapter = read_adapter(lpath, flag=f"{label}: LoRA adapter", folded=True)
        try:
            if adapter is not None:
                check_fits(adapter, reader, label)
        finally:
            if reader is not None:
                reader.close()
        with _readers_lock:
            _loras_checked.add(key)


def _task_lora(group: TensorGroup, role: Any) -> bool:
    """Whether the task input is ``model+lora`` (mergekit folded the adapter before loading it)."""
    return any(role[e.id] == "task" and getattr(e.id, "lora", None) for e in group.non_base)


def _record(
    method: str, group: TensorGroup, score: ops.Score, *, flagged: bool, action: str, settings: dict[str, Any],
    src_dtype: torch.dtype, band: float | None, elapsed: float, nbytes: int, report_path: str,
    precision: str | None, rounding: torch.dtype | None = None, task_lora: bool = False,
) -> None:
    name = group.metadata.name or "?"
    rec = LayerRecord(
        module=_module(name),
        cosine=score.cosine,
        flagged=flagged,
        reason=score.reason,
        action=action,
        shape=tuple(group.base.tensor.shape),
        v_norm=score.v_norm,
        delta_norm=score.delta_norm,
        extra={"tensor": name, "input_dtype": _dtype_name(src_dtype), "rounding_dtype": _dtype_name(rounding),
               "task_lora": task_lora, "rounding_band": band, **settings},
    )
    _append(report_path, {"method": method, "backend": score.backend, "backend_detail": backend_detail(score.backend),
                          "precision": score.precision,
                          "precision_requested": requested_precision(precision),
                          "time_s": elapsed, "end": time.time(), "bytes": nbytes, "layer": rec.to_json()})


@dataclass
class _Scored:
    """One 2-D weight scored for safemerge / safelora: fp32 inputs, dW_f, its score, the clock."""

    name: str
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
    conv1d: bool  # (wa, wu and dW as stored, d_in x d_out; scored and projected transposed)

    @classmethod
    def of(cls, group: TensorGroup, t: dict[str, torch.Tensor], role: Any, precision: str | None) -> "_Scored":
        start = time.perf_counter()
        task = t["task"]
        name, wd = group.metadata.name or "?", _work_dtype(task)
        wa, wu = t["aligned"].to(wd), t["unaligned"].to(wd)
        dW = task.to(wd) - wa
        conv1d = _conv1d(group)
        score = _score(name, wa, wu, dW, precision, t, conv1d)
        rounding = _value_precision(task)
        return cls(name, task, wd, wa, wu, dW, score, _rounding_band(rounding, task, wa, score.delta_norm), rounding,
                   _task_lora(group, role), start, precision, conv1d)

    def projected(self) -> torch.Tensor:
        """C dW (Safe LoRA's update), in the stored layout."""
        if self.conv1d:
            return ops.project_delta(self.wa.T, self.wu.T, self.dW.T, precision=self.precision).T
        return ops.project_delta(self.wa, self.wu, self.dW, precision=self.precision)

    def record(self, method: str, group: TensorGroup, flagged: bool, action: str, settings: dict[str, Any],
               report_path: str) -> None:
        _record(method, group, self.score, flagged=flagged, action=action, settings=settings,
                src_dtype=self.task.dtype, band=self.band, elapsed=time.perf_counter() - self.start,
                nbytes=_bytes_read(group), report_path=report_path,
                precision=self.precision, rounding=self.rounding, task_lora=self.task_lora)


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


def _safemerge_tensor(
    group: TensorGroup, role: Any, threshold: float, alpha: float, merge: str, density: float,
    seed: int, report_path: str, precision: str | None,
) -> torch.Tensor:
    t = _roles(group, role, "safemerge")
    if not _scorable(group, t["task"]):
        return _finite(group.metadata.name or "?", t["task"], {"task": t["task"]})
    _finite(group.metadata.name or "?", t["safety"], {"safety": t["safety"]})  # flagged or not
    s = _Scored.of(group, t, role, precision)
    flagged = not math.isnan(s.score.cosine) and s.score.cosine < threshold
    out = s.task
    if flagged:
        dWs = t["safety"].to(s.wd) - s.wa
        merged = combine_full(s.dW, dWs, alpha=alpha, method=merge, density=density, seed=seed, module=_module(s.name))
        del dWs
        out = _finite(s.name, (s.wa + merged.to(s.wd)).to(s.task.dtype), t)
    s.record("safemerge", group, flagged, "merged" if flagged else "kept",
             {"threshold": threshold, "alpha": alpha, "merge": merge, "density": density, "seed": seed}, report_path)
    return out


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


def _safelora_tensor(
    group: TensorGroup, role: Any, threshold: float, report_path: str, precision: str | None,
) -> torch.Tensor:
    t = _roles(group, role, "safelora")
    if not _scorable(group, t["task"]):
        return _finite(group.metadata.name or "?", t["task"], {"task": t["task"]})
    s = _Scored.of(group, t, role, precision)
    flagged = not math.isnan(s.score.cosine) and s.score.cosine <= threshold
    out = s.task
    if flagged:
        out = _finite(s.name, (s.wa + s.projected().to(s.wd)).to(s.task.dtype), t)
    s.record("safelora", group, flagged, "projected" if flagged else "kept", {"threshold": threshold}, report_path)
    return out


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


def _resta_tensor(
    group: TensorGroup, role: Any, beta: float, density: float, seed: int, report_path: str,
    precision: str | None,
) -> torch.Tensor:
    t = _roles(group, role, "resta")
    task = t["task"]
    if not task.is_floating_point():
        return task
    start = time.perf_counter()
    name, wd = group.metadata.name or "?", _work_dtype(task)
    wa, wu = t["aligned"].to(wd), t["unaligned"].to(wd)
    score = None
    if _scorable(group, task):
        dW = task.to(wd) - wa
        score = _score(name, wa, wu, dW, precision, t, _conv1d(group))
        del dW
    shift = wa - wu  # inputs are borrowed: never modified in place
    del wa, wu
    if density < 1.0:
        from peft.utils.merge_utils import random_pruning

        with seeded(seed, _module(name), shift.device):
            shift = random_pruning(shift, density, rescale=True)
    out = _finite(name, torch.add(task.to(wd), shift, alpha=beta).to(task.dtype), t)
    if score is not None:
        _record("resta", group, score, flagged=False, action="shifted", settings={"beta": beta, "density": density,
                "seed": seed}, src_dtype=task.dtype, band=None, elapsed=time.perf_counter() - start,
                nbytes=_bytes_read(group), report_path=report_path,
                precision=precision, task_lora=_task_lora(group, role))
    return out


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
    safemerge-yaml checks its parameters (``yaml_cli.check_parameter_names``)."""
    if _recipe_checked or not _in_mergekit_yaml():
        return
    _recipe_checked.append(name)
    recipe = _mergekit_yaml_args().get("config_file")
    try:  # (mergekit has read and validated this file already: anything odd here is not ours to report)
        import yaml
        from mergekit.config import MergeConfiguration

        config = MergeConfiguration.model_validate(yaml.safe_load(Path(recipe).read_text(encoding="utf-8")))
    except Exception:
        return
    if config.merge_method != name:
        return
    from safemerge_ext.yaml_cli import check_parameter_names

    check_parameter_names(config, name, recipe)


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
    if config.merge_method == name:
        from safemerge_ext.yaml_cli import check_parameter_names

        check_parameter_names(config, name, "merge_config (as mergekit's planner lays it out)")
    _check_device(planner.options)


def _check_device(options: Any) -> None:
    """mergekit's math device (``--cuda``, ``--device``; ``MergeOptions.cuda``/``.device``) refused
    in one line where torch cannot use it, before the merge starts (mergekit alone fails at its
    first tensor, with a traceback). A device type torch cannot be asked about is left to mergekit."""
    device = str(getattr(options, "device", None) or "cpu")
    flag = getattr(options, "cuda", False) and device == "cuda"
    given = "--cuda (MergeOptions.cuda)" if flag else f"--device {device} (MergeOptions.device)"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SafeMergeError(f"mergekit's {given}: not a device name torch knows; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return
    backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
    available, count = getattr(backend, "is_available", None), getattr(backend, "device_count", None)
    if not callable(available):
        return
    if not available():
        raise SafeMergeError(f"mergekit's {given}: torch {torch.__version__} has no usable {dev.type} device here; "
                             + ("merge without --cuda, on the CPU" if flag else "use --device cpu"))
    if dev.index is not None and callable(count) and dev.index >= count():
        raise SafeMergeError(f"mergekit's {given}: this machine has {count()} {dev.type} device(s); "
                             f"use {dev.type} or {dev.type}:N with a smaller N")


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
    if _in_mergekit_yaml():
        _install_excepthook()
        from safemerge_ext._faults import bus_error_line, explain_bus_errors

        # (mergekit's own argv parsing may be half imported yet: OUT_PATH is not named here)
        explain_bus_errors(bus_error_line("mergekit-yaml", "what it wrote to OUT_PATH is incomplete"))
    return done


# ---------------------------------------------------------------------------------------------
# plain mergekit-yaml: input these methods refuse ends in one line, as in safemerge-yaml

TRACEBACK_ENV = "SAFEMERGE_TRACEBACK"
_PACKAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "")


def _run_yaml_is_main() -> bool:
    """Whether mergekit's run_yaml module is ``__main__`` (``python -m mergekit.scripts.run_yaml``)."""
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return main_spec is not None and main_spec.name == "mergekit.scripts.run_yaml"


def _in_mergekit_yaml() -> bool:
    """Whether this process is a ``mergekit-yaml`` run (the console script or ``python -m``)."""
    return _run_yaml_is_main() or (bool(sys.argv) and os.path.basename(sys.argv[0]).startswith("mergekit-yaml"))


_RAISE = dis.opmap["RAISE_VARARGS"]


def _raised_here(exc: BaseException) -> bool:
    """Whether a ``raise`` statement in this package threw ``exc``: its innermost frame is ours and
    stopped on a raise instruction. That is a refusal of bad input, whose message is written for a
    person; a ValueError of a builtin called from here (an unpacking, ``int()``) is a bug instead,
    and an error of a library called from here is not ours either."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    if not os.path.abspath(code.co_filename).startswith(_PACKAGE_DIR):
        return False
    return 0 <= tb.tb_lasti < len(code.co_code) and code.co_code[tb.tb_lasti] == _RAISE


def refusal(exc: BaseException) -> str | None:
    """The one-line message of input that these methods or their parameter checks refused (through
    pydantic while mergekit plans the merge), else None: any other error keeps its traceback."""
    if type(exc).__name__ == "ValidationError" and callable(getattr(exc, "errors", None)):  # (pydantic's)
        causes = [(e.get("ctx") or {}).get("error") for e in exc.errors()]
        ours = [str(c) for c in causes if isinstance(c, ValueError) and _raised_here(c)]
        return "; ".join(ours) if ours and len(ours) == len(causes) else None
    if isinstance(exc, (ValueError, FloatingPointError)) and _raised_here(exc):  # (SafeMergeError: by definition)
        return str(exc).splitlines()[0] if str(exc) else None
    if isinstance(exc, SafeMergeError) and str(exc):
        return str(exc).splitlines()[0]
    return None


def _tracebacks_wanted() -> bool:
    """``SAFEMERGE_TRACEBACK`` set to anything but empty/0/false/no/off."""
    return switched_on(TRACEBACK_ENV)


def _excepthook(etype: type[BaseException], value: BaseException, tb: Any) -> None:
    msg = None if _tracebacks_wanted() else refusal(value)
    if msg is None:
        return _prev_excepthook(etype, value, tb)
    try:
        print(f"mergekit-yaml: error: {msg}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


_prev_excepthook = sys.excepthook


def _install_excepthook() -> None:
    """In ``mergekit-yaml``, an uncaught refusal prints its one line instead of mergekit's traceback
    (``SAFEMERGE_TRACEBACK=1`` keeps the traceback); every other error goes to the hook before."""
    global _prev_excepthook
    if sys.excepthook is not _excepthook:
        _prev_excepthook, sys.excepthook = sys.excepthook, _excepthook


_hook = sys.modules.get("safemerge_ext._autoload_hook")
if _hook is not None and getattr(_hook, "pending", False):  # mergekit was first imported from here
    _hook.pending = False
    register_methods()


# ---------------------------------------------------------------------------------------------
# reports: a locked JSON-lines sidecar per report location, assembled at the end

_lock = threading.Lock()
_pending: dict[str, str] = {}  # sidecar path -> report target (directory or .json path)
_started: dict[str, float] = {}  # sidecar path -> time of this run's first record there
_failed: dict[str, str] = {}  # sidecar path -> why its run ended in a method (its records are void)
_override: str | None = None
_entered: list[Any] = []  # the open report_to blocks, in the order entered
_before: str | None = None  # _override before the first of them
_atexit_registered = False
_cli_out: list[str | None] = []


class report_to:
    """Context manager: send this process's reports to ``path`` (a directory or a ``.json`` file).

    Process-wide (mergekit may score tensors in other threads): for merges that run at the same
    time in one process, give each recipe its own ``report_path`` parameter instead, as
    ``safemerge-yaml`` does."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = None if path is None else os.fspath(path)

    def __enter__(self) -> "report_to":
        global _override, _before
        with _lock:
            if not _entered:
                _before = _override  # (restored after the last)
            _entered.append(self)
            _override = self.path
        return self

    def __exit__(self, *exc: object) -> None:
        global _override
        with _lock:  # (blocks entered in one thread and left in another order: the latest still open wins)
            open_at = [i for i, b in enumerate(_entered) if b is self]
            if not open_at:  # (left twice, or never entered: nothing of this block to undo)
                return
            del _entered[open_at[-1]]
            _override = _entered[-1].path if _entered else _before


def _mergekit_yaml_args() -> dict[str, Any]:
    """The arguments of a running ``mergekit-yaml`` (argv parsed with mergekit's own click command);
    empty in any other process, or where they cannot be parsed (never a reason to break a merge)."""
    run_yaml = sys.modules.get("__main__" if _run_yaml_is_main() else "mergekit.scripts.run_yaml")
    if run_yaml is None or not _in_mergekit_yaml():
        return {}
    try:
        return dict(run_yaml.main.make_context("mergekit-yaml", list(sys.argv[1:]), resilient_parsing=True).params)
    except Exception:
        return {}


def _mergekit_yaml_out() -> str | None:
    """OUT_PATH of a running ``mergekit-yaml``."""
    if not _cli_out:
        _cli_out.append(_mergekit_yaml_args().get("out_path"))
    return _cli_out[0]


@functools.lru_cache(maxsize=None)
def _here() -> str:
    """Where this process runs, for its sidecar's name: the pid namespace (Linux: each container has
    its own, where pids start again at 1) and the host (a report folder on a network mount is shared
    by other machines' runs), so that a pid names one process among all that may share the folder."""
    import socket

    try:
        ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        ns = "0"
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"
    return f"{ns}-{host}"


def _run_id(pid: int | None = None) -> str:
    """The part of a sidecar's name that names its process: "<pid>-<pid namespace>-<host>"."""
    return f"{os.getpid() if pid is None else pid}-{_here()}"


def _locations(report_path: str | os.PathLike, pid: int | str | None = None) -> tuple[Path, Path, Path]:
    """(sidecar, json, png) for a directory or a ``.json`` file path. The sidecar is this process's
    own (its pid, pid namespace and host in the name; another ``pid`` part on request): two runs that
    share a report location never mix their layers, in containers or on other hosts too."""
    p, pid = Path(os.path.expanduser(os.fspath(report_path))), _run_id() if pid is None else pid
    if p.suffix.lower() == ".json":
        return p.with_name(f"{p.name}.{pid}.layers.jsonl"), p, p.with_suffix(".png")
    return p / SIDECAR.format(pid=pid), p / REPORT_JSON, p / REPORT_PNG


def _target(report_path: str) -> str | None:
    """Where a method's records go: its ``report_path``, else ``report_to``'s, else
    ``$SAFEMERGE_REPORT_DIR``, else a running ``mergekit-yaml``'s OUT_PATH (None: nowhere)."""
    return report_path or _override or os.environ.get(REPORT_DIR_ENV) or _mergekit_yaml_out()


def _key(target: str | os.PathLike) -> str:
    return str(_locations(target)[0].resolve())


@contextmanager
def _failing_run(report_path: str) -> Iterator[None]:
    """Around one tensor of a method: when it raises, the run it belongs to will not finish, so its
    records are void: no report is assembled from them, and the next record there starts afresh.
    A Ctrl-C that library code swallowed (safemerge-yaml's handlers) is raised here, at the next tensor."""
    try:
        raise_pending()
        yield
    except BaseException as exc:
        target = _target(report_path)
        if target:
            with _lock:
                _failed[_key(target)] = ("the run was interrupted" if isinstance(exc, KeyboardInterrupt)
                                         else "a merge method raised an error")
        raise


def report_files(report_path: str | os.PathLike) -> tuple[Path, Path]:
    """(json, png) a report at ``report_path`` (a directory or a ``.json`` path) is written to."""
    return _locations(report_path)[1:]


def _append(report_path: str, line: dict[str, Any]) -> None:
    global _atexit_registered
    target = _target(report_path)
    with _lock:
        if not target:
            if "nowhere" not in _started:
                _started["nowhere"] = time.time()
                LOG.warning("safemerge-ext: no report location; set parameters: {report_path: DIR} to get a report")
            return
        sidecar = _locations(target)[0]
        key = str(sidecar.resolve())
        try:
            sidecar.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # (mergekit-yaml checks no parameter before it merges: say so in one line)
            folder = sidecar.parent
            why = (f"{folder} is a file, not a folder; give a folder, or a file name ending in .json"
                   if folder.exists() and not folder.is_dir() else
                   f"cannot make the folder {folder} ({exc.strerror or exc}); give a report_path that can be written")
            raise SafeMergeError(f"report_path {target}: {why}") from None
        mode = "a"
        # this run's first record here: drop a stale sidecar. (With mergekit's --multi-gpu executor,
        # the other GPUs' workers of a run that failed may still record after the failure and land
        # here too; mergekit-yaml and safemerge-yaml then still discard them, at exit or on failure.)
        if key not in _started or key in _failed:
            _started[key] = time.time()
            _failed.pop(key, None)
            mode = "w"
            _drop_dead_sidecars(target)
        _pending[key] = os.fspath(target)
        if not _atexit_registered:
            atexit.register(_finalize_pending)
            _atexit_registered = True
        with open(sidecar, mode, encoding="utf-8") as fh:
            _flock(fh)
            fh.write(json.dumps(line, allow_nan=True) + "\n")


def _alive(pid: int) -> bool:
    if os.name == "nt":  # (there os.kill(pid, 0) sends a Ctrl-C event, and a dead pid is a plain OSError)
        return _alive_windows(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # (EPERM: someone else's process, alive)
        return True
    return True


def _alive_windows(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    kernel32.OpenProcess.restype = ctypes.c_void_p
    kernel32.OpenProcess.argtypes = [ctypes.c_ulong, ctypes.c_int, ctypes.c_ulong]
    kernel32.GetExitCodeProcess.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulong)]
    kernel32.CloseHandle.argtypes = [ctypes.c_void_p]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.get_last_error() == 5  # ERROR_ACCESS_DENIED: someone else's process, alive
    try:
        code = ctypes.c_ulong()
        return not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)) or code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _drop_dead_sidecars(target: str | os.PathLike) -> None:
    """Remove the sidecars at ``target`` of processes that are gone: a mergekit-yaml killed by a
    signal (SIGTERM runs no exit hook) leaves its own in OUT_PATH, and the next run into the same
    folder would otherwise ship it inside the model. Live processes' sidecars are left alone."""
    pattern = _locations(target, pid="*")[0]
    head, tail = pattern.name.rsplit("*", 1)  # (the pid's: a report_path's own name may hold a "*" too)
    try:
        stale = list(pattern.parent.glob(glob.escape(head) + "*" + glob.escape(tail)))
    except OSError:
        return
    for p in stale:
        pid, _, where = p.name[len(head):len(p.name) - len(tail)].partition("-")
        # (only this host's and pid namespace's: another's pid means nothing here; a name of pid
        # alone is an older version's, from before runs were told apart by where they ran)
        if pid.isdecimal() and where in ("", _here()) and int(pid) != os.getpid() and not _alive(int(pid)):
            try:
                p.unlink()
            except OSError:
                pass


def _flock(fh: Any) -> None:
    try:
        import fcntl

        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # released on close
    except (ImportError, OSError):
        pass


def pending_reports() -> list[str]:
    """Sidecar files this process has written and not yet assembled."""
    with _lock:
        return list(_pending)


def discard_report(report_path: str | os.PathLike) -> None:
    """Forget the records at ``report_path`` (a run that failed or was abandoned): remove the
    sidecar, so neither :func:`finalize_report` nor the exit hook makes a report of them."""
    sidecar = _locations(report_path)[0]
    key = str(sidecar.resolve())
    with _lock:
        _pending.pop(key, None)
        _started.pop(key, None)
        _failed.pop(key, None)
        try:
            sidecar.unlink(missing_ok=True)
        except OSError:  # (its folder cannot hold it: then there is nothing to forget)
            pass


def _unfinished(key: str) -> str | None:
    """Why the run that wrote sidecar ``key`` did not finish (None: nothing says so), at exit: a
    method that raised; in a running ``mergekit-yaml``, also an uncaught exception (Python keeps it
    as sys.last_value) or an OUT_PATH that got no config.json after the run's last record (mergekit
    writes it once every tensor is written; an interrupted run, Ctrl-C included, never gets there)."""
    if key in _failed:
        return _failed[key]
    out = _mergekit_yaml_out()
    if not out:  # (in a program of one's own, finalize_report says when a run is over)
        return None
    if getattr(sys, "last_exc", None) is not None or getattr(sys, "last_value", None) is not None:
        return "the merge stopped on an error"
    try:
        config_written = os.stat(Path(out) / "config.json").st_mtime
    except OSError:
        return f"mergekit did not finish writing {out}"
    # against the sidecar's own time of last change where it sits on OUT's file system (the same
    # clock), else this process's clock at the run's first record; a second of slack either way
    sidecar = Path(key)
    try:
        same_fs = sidecar.stat().st_dev == os.stat(out).st_dev
        since = sidecar.stat().st_mtime if same_fs else _started.get(key, 0.0)
    except OSError:
        since = _started.get(key, 0.0)
    return None if config_written >= since - 1.0 else f"mergekit did not finish writing {out}"


def _finalize_pending() -> None:
    untied: list[str] | None = None  # (once per process, for the first finished run)
    for key in pending_reports():
        target = _pending.get(key, key)
        try:
            why = _unfinished(key)
            if why is not None:
                discard_report(_pending[key])
                LOG.error("safemerge-ext: no report: %s", why)
                continue
            if untied is None:
                untied = _untie_mergekit_yaml_out()
            rep = finalize_report(_pending[key], warnings=untied)
            if rep is not None:
                print(summary_table(rep), file=sys.stderr)
        except Exception as exc:  # at exit: report, never raise
            json_path, png_path = report_files(target)
            half = " (its JSON is written, the plot is not)" if json_path.is_file() and not png_path.is_file() else ""
            LOG.error("safemerge-ext: could not write the report at %s%s: %s", target, half, exc)


def _untie_mergekit_yaml_out() -> list[str]:
    """In a finished ``mergekit-yaml`` run: a head its OUT_PATH stores (a task model that PEFT
    untied) beside a config mergekit copied from a tied base model is untied there, as
    ``safemerge-yaml`` does; returns the warning, if any."""
    out = _mergekit_yaml_out()
    if not out:
        return []
    from safemerge_ext.io.model_writer import untie_stored_head

    try:
        untied = untie_stored_head(Path(out))
    except OSError as exc:  # (the reports still get written)
        LOG.error("safemerge-ext: could not untie the head in %s: %s", Path(out) / "config.json", exc)
        return []
    if untied is None:
        return []
    LOG.warning("safemerge-ext: %s", untied)
    return [untied]


def _load_layers(sidecar: Path) -> tuple[str, list[LayerRecord], list[dict[str, Any]]]:
    method, by_module, lines = "", {}, []
    for raw in sidecar.read_text(encoding="utf-8").splitlines():
        if not raw.strip():
            continue
        line = json.loads(raw)
        lines.append(line)
        method = line["method"]
        d = dict(line["layer"])
        fixed = {k: d.pop(k) for k in ("module", "cosine", "flagged", "reason", "action", "shape", "rank",
                                         "v_norm", "delta_norm")}
        fixed["cosine"] = math.nan if fixed["cosine"] is None else fixed["cosine"]
        fixed["shape"] = tuple(fixed["shape"])
        by_module[fixed["module"]] = LayerRecord(**fixed, extra=d)  # a re-run tensor: the last one wins
    from safemerge_ext.io.models import natural_key

    layers = sorted(by_module.values(), key=lambda r: natural_key(r.module))
    return method, layers, lines


def _settings(method: str, layers: list[LayerRecord]) -> dict[str, Any]:
    keys = {"safemerge": ("threshold", "alpha", "merge", "density", "seed"), "safelora": ("threshold",),
            "resta": ("beta", "density", "seed")}[method]
    settings: dict[str, Any] = {}
    for k in keys:
        values = {json.dumps(r.extra.get(k)) for r in layers}
        settings[k] = layers[0].extra.get(k) if len(values) == 1 else "varies by layer (see layers)"
    if method == "safemerge" and settings["merge"] in MERGE_METHODS:  # (null where the merge has no use for them)
        for key, users in (("density", USES_DENSITY), ("seed", USES_SEED)):
            if settings["merge"] not in users:
                settings[key] = None
    if method != "resta":
        fixed = not isinstance(settings["threshold"], str)
        settings.update({"selection": "threshold" if fixed else "threshold (per layer)",
                         "comparison": "<" if method == "safemerge" else "<="})
    settings["scored"] = "2-D weights except embeddings and lm_head; " + (
        "every floating-point tensor, scored or not, is shifted by beta (W_aligned - W_unaligned)" if method == "resta"
        else "other tensors are the task model's")
    return settings


def _unreachable_threshold(method: str, layers: list[LayerRecord]) -> list[str]:
    """A warning when one threshold serves every layer and can flag none (a threshold that varies
    by layer may mean "never flag" for some on purpose)."""
    values = {r.extra.get("threshold") for r in layers}
    if method == "resta" or len(values) != 1 or not isinstance(tau := values.pop(), (int, float)):
        return []
    why = unreachable_threshold(float(tau), inclusive=method == "safelora")
    return [why] if why else []


def _unused_density(method: str, layers: list[LayerRecord]) -> list[str]:
    """A warning when a safemerge recipe sets a density its linear merge cannot use."""
    if method != "safemerge":
        return []
    unused = [r.module for r in layers
              if r.extra.get("merge") in MERGE_METHODS and r.extra["merge"] not in USES_DENSITY
              and r.extra.get("density", 1.0) != 1.0]
    return [f"density applies to merge: ties, dare_linear and dare_ties; with merge: linear it changed nothing "
            f"({len(unused)} layer(s), e.g. {unused[0]})"] if unused else []


def _precision_warnings(method: str, layers: list[LayerRecord]) -> list[str]:
    """A warning when task weights arrived rounded to a half format, with what would avoid it."""
    # layers with an update recovered from rounded weights (an untouched layer's dW = 0 is exact)
    rounded = [r for r in layers if r.extra.get("rounding_dtype") and r.extra.get("rounding_band") is not None]
    if not rounded or method == "resta":
        return []
    fmt = "/".join(sorted({r.extra["rounding_dtype"] for r in rounded}))
    near = [r.module for r in rounded if math.isfinite(r.cosine) and abs(r.cosine - r.extra["threshold"]) <= r.extra["rounding_band"]]
    names = (": " + ", ".join(near[:6]) + (", ..." if len(near) > 6 else "")) if near else ""
    loaded_half = any(r.extra.get("input_dtype") in ("bfloat16", "float16") for r in rounded)
    folded = any(r.extra.get("task_lora") for r in rounded)
    advice = []
    if loaded_half:
        advice.append("set dtype: float32 in the recipe (this helps where the models are stored in float32)")
    if folded:
        advice.append("fold the task LoRA in float32 (--lora-merge-dtype float32, safemerge-yaml's default)")
    if not advice:
        advice.append(f"the task model is stored in {fmt}, so no setting here removes this noise")
    return [
        f"{fmt} task weights: task updates are recovered as W_task - W_aligned from weights rounded to {fmt}, "
        f"whose rounding error is relative to the weights, not to the small update; {len(near)} of {len(layers)} "
        f"layers have a cosine within the estimated rounding error of the threshold{names}; " + "; ".join(advice)
    ]


def _unused_precision(lines: list[dict[str, Any]]) -> list[str]:
    """A warning when a precision was asked for (the recipe's ``precision`` or SAFEMERGE_PRECISION)
    that the backend could not use."""
    unused = sorted({(ln["precision_requested"], ln["backend"]) for ln in lines
                     if ln.get("precision_requested", EXACT) != ln.get("precision", EXACT)})
    return [f"precision {asked} applies to the triton backend on a GPU only; the {backend} backend computed in exact fp32 "
            f"(ieee)" for asked, backend in unused]


def _timings(lines: list[dict[str, Any]]) -> dict[str, float]:
    """tensors_s: the time spent in the method itself; total_s: wall clock from the first scored
    tensor's start to the last one's end (mergekit's loading and writing in between included)."""
    busy = sum(ln["time_s"] for ln in lines)
    ends = [ln["end"] for ln in lines if "end" in ln]
    starts = [ln["end"] - ln["time_s"] for ln in lines if "end" in ln]
    return {"tensors_s": busy, "total_s": (max(ends) - min(starts)) if ends else busy}


def finalize_report(report_path: str | os.PathLike, *, command: str = "mergekit-yaml",
                    into: str | os.PathLike | None = None, warnings: Sequence[str] = ()) -> dict[str, Any] | None:
    """Assemble the sidecar at ``report_path`` (directory or ``.json``) into the JSON + PNG report,
    written there (or into the folder ``into``); ``warnings``: the caller's own, added to the
    method's.

    Returns the report (``None`` when no tensor was scored there, or the run failed); removes the
    sidecar.
    """
    sidecar, json_path, png_path = _locations(report_path)
    if into is not None:
        json_path, png_path = Path(into) / REPORT_JSON, Path(into) / REPORT_PNG
    key = str(sidecar.resolve())
    with _lock:
        _pending.pop(key, None)
        _started.pop(key, None)
        if key in _failed:  # the run did not finish: its records describe part of it
            _failed.pop(key, None)
            sidecar.unlink(missing_ok=True)
            return None
        if not sidecar.is_file():
            return None
        method, layers, lines = _load_layers(sidecar)
        sidecar.unlink()
    if not layers:
        return None
    backends = sorted({ln["backend"] for ln in lines})
    precisions = sorted({ln.get("precision", EXACT) for ln in lines})
    details = sorted({ln["backend_detail"] for ln in lines if ln.get("backend_detail")})
    report = build_report(
        command=command,
        method=method,
        layers=layers,
        settings=_settings(method, layers),
        backend=backends[0] if len(backends) == 1 else ",".join(backends),
        precision=",".join(precisions),
        backend_detail="; ".join(details) or None,
        timings=_timings(lines),
        bytes_read=sum(ln["bytes"] for ln in lines),
        warnings=(_unreachable_threshold(method, layers) + _precision_warnings(method, layers) + _unused_precision(lines)
                  + _unused_density(method, layers) + list(warnings)),
    )
    band_layers = [r for r in layers if r.extra.get("rounding_band") is not None]
    if band_layers and method != "resta":
        report["counts"]["near_threshold"] = sum(
            1 for r in band_layers
            if math.isfinite(r.cosine) and abs(r.cosine - r.extra["threshold"]) <= r.extra["rounding_band"]
        )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(report, json_path)
    try:
        plot(report, png_path)
    except PlotUnavailable as exc:  # (no recipe switch turns the plot off: the JSON report is the report)
        LOG.warning("safemerge-ext: %s; %s has no plot", exc.reason, json_path)
    return report
