"""The adapter pipeline behind ``safemerge score | merge | project``.

io (read the two models' target weights, one layer at a time, with read-ahead) -> ops (score on
the chosen backend) -> selection -> output (a PEFT adapter or a streamed full model, written to a
temporary folder and renamed into place) -> report. Every input is validated from file headers
before any weight is read.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import heapq
import math
import numbers
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from safemerge_ext import merge as merging
from safemerge_ext import ops
from safemerge_ext._signals import raise_pending
from safemerge_ext.backends import exact_fp32_matmuls
from safemerge_ext.errors import SafeMergeError
from safemerge_ext.io.adapters import (ADAPTER_RANKS, LoraAdapter, LoraModule, OutModule, alpha_for,
                                       check_default_rank, check_per_module, fused_leaves, global_scaling,
                                       peft_moe_names, read_adapter, untargeted, write_adapter)
from safemerge_ext.io.model_writer import check_model_output, write_model
from safemerge_ext.io.places import same_place, within
from safemerge_ext.io.models import (INDEX, ModelReader, config_value, is_conv1d, is_tied_head, module_key,
                                     natural_key)
from safemerge_ext.io.output import (check_given, check_not_input, check_out, check_parent, put_at, staged_dir,
                                     write_files)
from safemerge_ext.io.read_ahead import Prefetch, in_batches, prefetch
from safemerge_ext.report import (
    REPORT_JSON,
    REPORT_PNG,
    LayerRecord,
    build_report,
    check_plot_path,
    json_writer,
    plot,
    plot_writer,
    preload_plotting,
    summary_table,
    write_json,
)
from safemerge_ext.selection import Selection, _as_float

OUTPUTS = ("adapter", "model")


@dataclass
class Layer:
    """One target module: its weight name in the models and the adapters' factors for it."""

    module: str
    weight: str
    shape: tuple[int, int]
    task: LoraModule
    safety: LoraModule | None = None
    unaligned_weight: str = ""  # its name in --unaligned, where that names it otherwise (default: weight)

    def __post_init__(self) -> None:
        self.unaligned_weight = self.unaligned_weight or self.weight


@dataclass
class Run:
    """Everything one pipeline run opened, plus its clocks and warnings."""

    aligned: ModelReader
    unaligned: ModelReader
    layers: list[Layer]
    device: torch.device
    backend: str
    precision: str = "ieee"  # the operand precision the backend computes with (backends.PRECISIONS)
    precision_requested: str = "ieee"  # what --precision or SAFEMERGE_PRECISION asked for
    backend_requested: str = "auto"  # what --backend or SAFEMERGE_BACKEND asked for
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    adapter_bytes: int = 0

    @property
    def scored_weights(self) -> set[str]:
        """The aligned weights the run scores (and so checks for NaN/Inf while scoring)."""
        return {layer.weight for layer in self.layers}
    started: float = field(default_factory=time.perf_counter)

    reading: Prefetch | None = field(default=None, repr=False)  # a read-ahead a Ctrl-C did not wait for

    @property
    def bytes_read(self) -> int:
        return self.aligned.bytes_read + self.unaligned.bytes_read + self.adapter_bytes

    def still_reading(self) -> bool:
        """Whether a read the run did not wait for (a Ctrl-C during a stalled read) still goes on."""
        return self.reading is not None and not self.reading.finished(timeout=0.5)

    def close(self) -> None:
        """Close the models' and adapters' files now (else when the last reference goes)."""
        readers = [self.aligned, self.unaligned]
        for layer in self.layers:
            readers += [layer.task.reader] + ([layer.safety.reader] if layer.safety is not None else [])
        for reader in {id(r): r for r in readers}.values():
            reader.close()

    def tick(self, key: str, since: float) -> float:
        now = time.perf_counter()
        self.timings[key] = self.timings.get(key, 0.0) + now - since
        return now


def resolve_device(name: str, *, scoring: bool = True) -> torch.device:
    """``--device`` as a torch device, or one line saying why it cannot be used here (for
    ``scoring``, only cpu and cuda: the backends run nowhere else)."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SafeMergeError(f"--device {name}: not a device name torch knows; use cpu, cuda or cuda:N") from None
    if scoring and dev.type not in ("cpu", "cuda"):  # (the scorer would run on the CPU and the report name this one)
        raise SafeMergeError(f"--device {name}: scoring runs on cpu or cuda only; use --device cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SafeMergeError(f"--device {name}: no CUDA device is available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SafeMergeError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                             "use cuda or cuda:N with a smaller N")
    return dev


_OPENED: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("safemerge_opened", default=None)


def _opened(thing: Any) -> Any:
    """Note a file reader (a Run, a model, an adapter) a command opened, which it closes when it ends
    (:func:`_closes_files`)."""
    noted = _OPENED.get()
    if noted is not None:
        noted.append(thing)
    return thing


def _closes_files(fn: Any) -> Any:
    """A command that closes the model and adapter files it opened as it ends, also when it fails:
    a program that keeps the exception (a notebook keeps the last one) kept them, and the mapped
    weights its frames held, open until it let go of it."""
    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        noted: list[Any] = []
        token = _OPENED.set(noted)
        try:
            return fn(*args, **kwargs)
        finally:
            _OPENED.reset(token)
            # (files a read still uses are left to close when the last reference goes)
            if not any(isinstance(thing, Run) and thing.still_reading() for thing in noted):
                for thing in reversed(noted):
                    thing.close()
    return command


def open_run(
    aligned_dir: str | Path,
    unaligned_dir: str | Path,
    task: LoraAdapter,
    safety: LoraAdapter | None = None,
    *,
    device: str = "cpu",
    backend: str = "auto",
    precision: str | None = None,
    honour_env: bool = True,
) -> Run:
    """Open both models and match every task module to its weight; check shapes and dtypes.

    ``backend="auto"`` follows ``SAFEMERGE_BACKEND`` unless ``honour_env`` is False (the command
    line's explicit ``--backend auto``). ``precision`` allows the Triton kernels a tensor-core
    operand precision (None: ``SAFEMERGE_PRECISION``, else exact ``ieee``); a run whose backend
    cannot use it says so."""
    dev = resolve_device(device)
    if same_place(aligned_dir, unaligned_dir):
        raise SafeMergeError(f"--aligned and --unaligned are the same folder ({aligned_dir}), so V = W_aligned - "
                             "W_unaligned is zero everywhere; give as --unaligned the base model --aligned was tuned from")
    # (a bad SAFEMERGE_CPU_ISA is an error below, not also a warning; not warnings.catch_warnings(),
    # whose filter list is process-wide: two runs in threads would leave its filter to the program)
    quiet = ops.backends.QUIET.set(True)
    try:
        backend_name, _ = ops.backends.resolve(backend, dev.type, honour_env=honour_env)
        isa_off = ops.backends.cpu_isa_refusal(dev.type, "--backend torch") if backend_name != "cpp" else None
    except ValueError as exc:  # (a message that starts with SAFEMERGE_BACKEND: the environment chose)
        msg = str(exc)
        raise SafeMergeError(msg if msg.startswith(ops.backends.ENV_VAR) else f"--backend {backend}: {msg}") from None
    finally:
        ops.backends.QUIET.reset(quiet)
    if isa_off and ops.backends.requested_backend(backend, honour_env) == "auto":
        raise SafeMergeError(isa_off)
    try:
        requested = ops.backends.requested_precision(precision)
    except ValueError as exc:
        raise SafeMergeError(f"--{exc}" if precision else str(exc)) from None
    used = ops.backends.resolve_precision(requested, backend_name, dev.type)
    if requested == "bf16" and backend_name in ops.backends.TENSOR_CORE_BACKENDS and dev.type != "cuda":
        raise SafeMergeError("--precision bf16 needs a GPU: triton's interpreter does not round operands to bf16 "
                             "as the tensor cores do; use ieee, tf32 or tf32x3 here")
    aligned = _opened(ModelReader(aligned_dir, "--aligned"))
    unaligned = _opened(ModelReader(unaligned_dir, "--unaligned"))
    layers: list[Layer] = []
    # (the safety adapter's modules by every name they go by: one trained on another transformers
    # version may name a vision-language model's modules differently)
    safety_as = {} if safety is None else {module_key(m): m for m in safety.modules}
    safety_at: dict[str | None, str] | None = None  # (its modules by the aligned weight they adapt, when needed)
    model_type = config_value(aligned.path, "model_type")
    for module in sorted(task.modules, key=natural_key):
        lm = task.modules[module]
        weight = aligned.resolve_module(module)
        if weight is None:
            raise _no_such_module(task, module, aligned)
        if is_conv1d(model_type, module):
            # (PEFT marks such adapters fan_in_fan_out, which read_adapter refuses; a config edited
            # by hand would have a square one scored transposed)
            raise SafeMergeError(
                f"{task.flag} {task.path}: module {module} is a Conv1D layer of this {model_type} model (its weight "
                "is stored d_in x d_out), which PEFT adapts as fan_in_fan_out; fold the adapter into the model with "
                "PEFT (merge_and_unload, save_pretrained) and merge that model as a full fine-tune with safemerge-yaml"
            )
        shape, dtype = aligned.meta(weight)
        # (a vision-language model saved by another transformers version names the text model's
        # tensors the other way: the same module, read by its own name there)
        uweight = weight if weight in unaligned else unaligned.resolve_module(module)
        if uweight is None:
            stale = _stale_index(unaligned, module)
            if stale is not None:
                raise stale
            raise SafeMergeError(
                f"--unaligned {unaligned.path}: tensor {weight} is missing (it is in --aligned); "
                "the two models must share an architecture"
            )
        named = weight if uweight == weight else f"{weight} ({uweight} in --unaligned)"
        ushape, udtype = unaligned.meta(uweight)
        for reader, name, code in ((aligned, weight, dtype), (unaligned, uweight, udtype)):
            if not isinstance(code, torch.dtype):  # (a safetensors dtype code this torch has no type for)
                raise SafeMergeError(f"{reader.flag} {reader.path / reader.shard_of(name)}: tensor {name} has dtype "
                                     f"{code}, which torch cannot hold; LoRA targets must be fp32/fp16/bf16 weights")
        if ushape != shape:
            raise SafeMergeError(
                f"tensor {named} has shape {shape} in --aligned but {ushape} in --unaligned: "
                "the two models must share an architecture"
            )
        if udtype != dtype:
            raise SafeMergeError(
                f"tensor {named} is {dtype} in --aligned but {udtype} in --unaligned: "
                "save both models in one dtype (e.g. torch_dtype=torch.bfloat16) so their difference is meaningful"
            )
        if dtype not in (torch.float32, torch.float16, torch.bfloat16) or len(shape) != 2:
            raise SafeMergeError(f"--aligned tensor {weight} is {dtype} {shape}; LoRA targets must be 2-D fp32/fp16/bf16 weights")
        if (lm.d_out, lm.d_in) != shape:
            raise SafeMergeError(
                f"{task.flag} {task.path}: module {module} is {lm.d_out}x{lm.d_in} but {weight} is "
                f"{shape[0]}x{shape[1]}; the adapter belongs to another model"
            )
        sm = None
        if safety is not None:
            sm = safety.modules.get(module)
            if sm is None:
                sm = safety.modules.get(safety_as.get(module_key(module), ""))
            if sm is None:  # (one adapter trained on the bare LlamaModel, the other on LlamaForCausalLM)
                if safety_at is None:
                    safety_at = {aligned.resolve_module(m): m for m in safety.modules}
                sm = safety.modules.get(safety_at.get(weight, ""))
            if sm is None:
                raise SafeMergeError(
                    f"{safety.flag} {safety.path}: has no update for module {module}, which {task.flag} adapts; "
                    "train the safety adapter on the same target modules"
                )
            if (sm.d_out, sm.d_in) != shape:
                raise SafeMergeError(
                    f"{safety.flag} {safety.path}: module {module} is {sm.d_out}x{sm.d_in} but {weight} is "
                    f"{shape[0]}x{shape[1]}; the adapter belongs to another model"
                )
        layers.append(Layer(module, weight, shape, lm, sm, uweight))
    run = _opened(Run(aligned, unaligned, layers, dev, backend_name, used, requested,
                      ops.backends.requested_backend(backend, honour_env)))
    if used != requested:
        run.warnings.append(
            f"precision {requested} applies to the triton backend on a GPU only; the {backend_name} backend "
            f"{'(interpreted on the CPU) ' if backend_name == 'triton' else ''}computes in exact fp32 ({used})"
        )
    run.adapter_bytes = task.nbytes + (safety.nbytes if safety is not None else 0)
    for adapter in (task, safety) if safety is not None else (task,):
        missed, keys = untargeted(adapter)
        if missed:
            said = ", ".join(f"{k} {adapter.config.get(k)!r}" for k in keys)
            run.warnings.append(
                f"{adapter.flag} {adapter.path}: its config ({said}) leaves out {len(missed)} of the "
                f"{len(adapter.modules)} modules whose factors it holds (first: {missed[0]}): PEFT loads the adapter "
                "without them, and so the adapter written from its config; here they are scored and merged as the "
                "factors say, and --output model adds them"
            )
    if safety is not None:
        paired = {id(layer.safety) for layer in layers}  # (by any of the names it goes by)
        extra = sorted((m for m, sm in safety.modules.items() if id(sm) not in paired), key=natural_key)
        foreign = next((m for m in extra if aligned.resolve_module(m) is None), None)
        if foreign is not None:
            raise _no_such_module(safety, foreign, aligned)
        if extra:
            run.warnings.append(
                f"{len(extra)} safety-adapter module(s) have no task update and are ignored (e.g. {extra[0]})"
            )
        other_base = _other_base(task, safety)
        if other_base:
            run.warnings.append(other_base)
    return run


def _model_name(name_or_path: str) -> str:
    """The model a ``base_model_name_or_path`` names, as far as its text tells: a Hub id's or a
    folder's last part, the model's name in the Hub's cache (``models--org--name/snapshots/<sha>``),
    '' where it does not tell (empty, ``.``)."""
    parts = [p for p in name_or_path.replace("\\", "/").split("/") if p not in ("", ".")]
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].split("--")[-1].lower()
    return parts[-1].lower() if parts and parts[-1] != ".." else ""


def _other_base(task: LoraAdapter, safety: LoraAdapter) -> str | None:
    """A warning where the two adapters' configs name different base models (by :func:`_model_name`,
    so a Hub id and a local copy of it agree): a safety adapter trained on, say, the unaligned base
    has the same module names and shapes, so nothing else would show that its update is not one on
    --aligned."""
    names = [str(a.config.get("base_model_name_or_path") or "") for a in (task, safety)]
    last = [_model_name(n) for n in names]
    if not all(last) or last[0] == last[1]:
        return None
    return (f"{task.flag} names base model {names[0]!r} but {safety.flag} {names[1]!r} (base_model_name_or_path in "
            "their adapter_config.json): SafeMERGE needs both trained on the aligned model (--aligned)")


def _stale_index(reader: ModelReader, module: str) -> SafeMergeError | None:
    """The error for a module weight that a shard holds but the model's index does not list."""
    found = reader.unlisted(module)
    if found is None:
        return None
    shard, name = found
    return SafeMergeError(
        f"{reader.flag} {reader.path / INDEX}: does not list tensor {name}, which {shard} holds: the index is out "
        "of date; list it in the index (or re-save the model)"
    )


def _no_such_module(adapter: LoraAdapter, module: str, aligned: ModelReader) -> SafeMergeError:
    """The error for an adapter module the model has no weight for: a tied output layer (which has
    no tensor of its own), or another architecture."""
    if is_tied_head(module, aligned.path):
        return SafeMergeError(
            f"{adapter.flag} {adapter.path}: adapts {module}, which --aligned {aligned.path} ties to its input "
            "embeddings (tie_word_embeddings, no tensor of its own); LoRA on a tied lm_head is not supported"
        )
    stale = _stale_index(aligned, module)
    if stale is not None:
        return stale
    return SafeMergeError(
        f"{adapter.flag} {adapter.path}: targets module {module}, but --aligned {aligned.path} has no tensor "
        f"{module}.weight; the adapter was trained on another architecture"
    )


# ties/dare updates are full rank: as an adapter they are re-factorized to rank r_task + r_safety,
# and a relative error above this is reported as a warning.
SVD_WARN = 1e-3

READ_AHEAD_LAYERS = 2
READ_AHEAD_BYTES = 64 << 20
"""How far the read-ahead runs beyond the layer being scored: at most this many layers and this
many bytes (always at least one layer). On the CPU that is reads into the page cache, which the
process does not hold; with ``--device cuda`` it is pinned buffers and device copies, so
peak memory there is about two layers' weights for large models and three for small ones."""

MAP_BATCH_BYTES = 8 << 20
"""When every weight pair is in the page cache, the scorer maps the pairs and reads the task
adapter's factors a batch of layers at a time: as many layers as have this many bytes of factors
(the memory a batch holds: a mapping holds none until the kernel reads it, and each pair is
unmapped once scored). The 1B benchmark's q/v layers at r = 8 in fp32 (3.3 MiB) are one batch."""
MAP_BATCH_LAYERS = 64
"""... and at most this many layers: each mapping holds a file descriptor (Python's mmap keeps a
duplicate), so many tiny-rank modules in one batch could use up the process's descriptors."""


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, desc: str, progress: bool | None):
    """A tqdm bar, shown when ``progress`` is True, or when None and stderr is a terminal (tqdm's
    own rule). When it would not show, no tqdm at all: its first bar creates a multiprocessing
    lock and a monitor thread (measured, 2-4 ms of a 75 ms warm run)."""
    if not (progress if progress is not None else sys.stderr is not None and sys.stderr.isatty()):
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="layer", leave=False, disable=False)


def _non_finite(run: Run, layer: Layer, wa: torch.Tensor, wu: torch.Tensor, exc: BaseException | None = None,
                ) -> SafeMergeError:
    if exc is not None and str(exc).startswith(ops.CANCELLED):  # (ops' diagnosis, with what to do)
        return SafeMergeError(f"scoring {layer.module} of {layer.task.reader.path}: {exc}")
    for reader, t, name in ((run.aligned, wa, layer.weight), (run.unaligned, wu, layer.unaligned_weight)):
        if not torch.isfinite(t).all():
            return SafeMergeError(
                f"{reader.flag} {reader.path / reader.shard_of(name)}: tensor {name} contains NaN or Inf; "
                "the checkpoint is corrupt or was saved in a dtype that overflowed"
            )
    return SafeMergeError(f"scoring {layer.module} lost its precision in fp32 sums: the weights or the update are "
                          "far too small or too large in magnitude (real checkpoints are near unit scale), or the "
                          "adapter's factors cancel (B A is almost zero next to B and A)")


def read_order(run: Run) -> list[int]:
    """Layer indices grouped by the aligned model's shard (each file read front to back once)."""
    shard_rank = {shard: i for i, shard in enumerate(run.aligned.shards())}
    return sorted(range(len(run.layers)), key=lambda i: (shard_rank[run.aligned.shard_of(run.layers[i].weight)], i))


class _KeptProjections:
    """Which layers' Safe LoRA ``C @ B`` a run keeps while it scores the rest: those ``selection``
    may flag (with a threshold, the ones it flags; with a count or a fraction, the k lowest so far,
    k an upper bound), the others' dropped at once. Every layer's until the end was 1.7 GB for a
    70B model at r = 64 (review149)."""

    def __init__(self, selection: Selection, n: int) -> None:
        self.selection, self.heap = selection, []
        self.k = selection.count(n)  # (of all n layers: at least as many as of the scorable ones)

    def add(self, scores: list[ops.Score], i: int) -> None:
        s = scores[i]
        if s.projected_B is None:
            return
        if math.isnan(s.cosine) or (self.k is None and not self.selection.flag([s.cosine])[0]):
            scores[i] = dataclasses.replace(s, projected_B=None)
            return
        if self.k is not None:  # (the one to drop: the largest cosine, the later layer of equal ones)
            heapq.heappush(self.heap, (-s.cosine, -i))
            if len(self.heap) > self.k:
                j = -heapq.heappop(self.heap)[1]
                scores[j] = dataclasses.replace(scores[j], projected_B=None)


def score_layers(run: Run, *, progress: bool | None = None, with_projection: bool | Selection = False,
                 ) -> list[ops.Score]:
    """Score every layer's task update, reading each weight pair once, with read-ahead.

    On the CPU a background thread reads the next layers into the page cache (``will_need``),
    and the scorer reads each pair straight from there (a private mapping, no copy) and drops it
    before the next: the process holds one pair, whatever the model's depth. Within a pair, the
    C++ kernel drops the pages of rows it is done with (``file_backed``), so a large pair (a 70B
    MLP's is 900 MB) is never resident whole either. When every pair is
    in the page cache already (a second run), there is nothing to overlap, and the thread would
    only compete with the kernels for the GIL and the cores: the pairs are mapped in the caller's
    thread instead (measured, warm 1B q/v: about 5 ms of 90), a batch of them at a time, with their
    adapter factors (see ``in_batches``). On CUDA the thread reads the next layers into
    pinned memory and copies them on a side stream, and the scorer waits on an event. Scores
    come back in model order. ``with_projection``: with Safe LoRA's ``C @ B`` (a Selection: only
    for the layers it may flag, see :class:`_KeptProjections`).
    """
    keeper = _KeptProjections(with_projection, len(run.layers)) if isinstance(with_projection, Selection) else None
    cuda = run.device.type == "cuda"
    side = torch.cuda.Stream(run.device) if cuda else None
    cached = not cuda and all(
        run.aligned.resident(layer.weight) and run.unaligned.resident(layer.unaligned_weight) for layer in run.layers
    )

    def pair_bytes(i: int) -> int:
        shape, dtype = run.aligned.meta(run.layers[i].weight)
        return 2 * math.prod(shape) * dtype.itemsize

    def load(i: int):
        layer = run.layers[i]
        t0 = time.perf_counter()
        factors = layer.task.A, layer.task.B
        if not cuda:
            if not cached:  # (when every pair was cached, will_need would only ask again)
                run.aligned.will_need(layer.weight)
                run.unaligned.will_need(layer.unaligned_weight)
            wa, wu = run.aligned.map(layer.weight), run.unaligned.map(layer.unaligned_weight)
            run.tick("read_s", t0)
            return wa, wu, None, factors
        wa = run.aligned.get(layer.weight, pin_memory=True)
        wu = run.unaligned.get(layer.unaligned_weight, pin_memory=True)
        # (the device first: entering only the stream would make this thread's device 0 current on
        # the way out, which creates a context there when the run is on another GPU)
        with torch.cuda.device(run.device), torch.cuda.stream(side):
            wa = wa.to(run.device, non_blocking=True)
            wu = wu.to(run.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(side)
        run.tick("read_s", t0)
        return wa, wu, ready, factors

    scores: dict[int, ops.Score] = {}
    bar = _progress_bar(len(run.layers), "scoring", progress)
    t_loop = time.perf_counter()
    pairs = None
    try:
        if cached:  # (mapping reads nothing and holds no memory until the kernel touches the pages)
            pairs = in_batches(read_order(run), load, size=lambda i: run.layers[i].task.nbytes, budget=MAP_BATCH_BYTES,
                               max_items=MAP_BATCH_LAYERS)
        else:
            pairs = prefetch(read_order(run), load, size=pair_bytes, budget=READ_AHEAD_BYTES, depth=READ_AHEAD_LAYERS)
        for i, (wa, wu, ready, (A, B)) in pairs:
            try:
                raise_pending()  # (a Ctrl-C that library code swallowed: acted on now, not after the last layer)
                layer = run.layers[i]
                if ready is not None:
                    torch.cuda.current_stream(run.device).wait_event(ready)
                    wa.record_stream(torch.cuda.current_stream(run.device))
                    wu.record_stream(torch.cuda.current_stream(run.device))
                try:
                    scores[i] = ops.subspace_score(
                        wa, wu, lora_A=A, lora_B=B, backend=run.backend,
                        precision=run.precision, with_projection=bool(with_projection),
                        file_backed=ready is None and run.aligned.is_mapped(wa) and run.unaligned.is_mapped(wu),
                    )
                except FloatingPointError as exc:
                    exc.__traceback__ = None  # (its frames hold the pair: not kept by the error that replaces it)
                    raise _non_finite(run, layer, wa, wu, exc) from None
                if layer.task.scaling == 0 and not math.isnan(scores[i].cosine):  # (B A scaled by 0: no update)
                    scores[i] = dataclasses.replace(scores[i], cosine=math.nan, projected_B=None,
                                                    reason="the update is zero (its scaling, lora_alpha, is 0)")
                if scores[i].projected_B is not None and scores[i].projected_B.device.type != "cpu":
                    # (kept until the output is written, which reads it on the CPU: not in GPU memory,
                    # where every layer's would add up, 1.7 GB for a 70B model at r = 64)
                    scores[i] = dataclasses.replace(scores[i], projected_B=scores[i].projected_B.cpu())
                if keeper is not None:
                    keeper.add(scores, i)
            finally:  # unmaps the pair (CPU) before the next read is admitted (see prefetch), and one an
                # error came with is not kept, mapped or on the GPU, by its traceback
                del wa, wu, ready, A, B
            bar.update(1)
    finally:
        # (at once, not when an exception's traceback lets go of this frame: the read-ahead
        # thread stops, and what the loaders hold ahead, mapped pairs or pinned buffers, goes)
        if pairs is not None:
            # (a Ctrl-C or SIGTERM does not wait for a read in progress, which a stalled network
            # mount can make last minutes: the read-ahead thread ends when that read returns)
            if isinstance(pairs, Prefetch) and isinstance(sys.exc_info()[1], (KeyboardInterrupt, SystemExit)):
                pairs.abandon()
                run.reading = pairs
            else:
                pairs.close()
        bar.close()
        if cuda:  # (torch keeps freed pinned buffers for reuse, rounded up to a power of two: 2-3 GB
            # after a 70B model's MLPs; a program that goes on after the run gets them back)
            _release_pinned_memory()
    run.tick("score_loop_s", t_loop)
    return [scores[i] for i in range(len(run.layers))]


def _release_pinned_memory() -> None:
    """Free the pinned host memory torch's caching allocator holds unused (torch >= 2.8)."""
    memory = getattr(getattr(torch, "accelerator", None), "memory", None)
    empty = getattr(memory, "empty_host_cache", None)
    if empty is not None:
        empty()


def _select(run: Run, scores: list[ops.Score], selection: Selection) -> list[bool]:
    """Flags in model order; warns when --num-layers asks for more layers than can be scored, or
    when the threshold can flag none."""
    scorable = sum(not math.isnan(s.cosine) for s in scores)
    if selection.never_flags:
        run.warnings.append(selection.never_flags)
    if scores and not scorable:
        run.warnings.append(f"no layer could be scored (all {len(scores)} are degenerate: see each one's reason); "
                            "none was flagged, so the output keeps the adapter's updates unchanged")
    elif selection.num_layers is not None and selection.num_layers > scorable:
        run.warnings.append(
            f"--num-layers {selection.num_layers} exceeds the {scorable} scorable layers; all of them were flagged"
        )
    flags = selection.flag([s.cosine for s in scores])
    tie = selection.tie_cut([s.cosine for s in scores], flags)
    if tie:
        run.warnings.append(tie)
    return flags


def _records(run: Run, scores: list[ops.Score], flags: list[bool], action: str) -> list[LayerRecord]:
    out = []
    for layer, s, f in zip(run.layers, scores, flags):
        out.append(
            LayerRecord(
                module=layer.module,
                cosine=s.cosine,
                flagged=f,
                reason=s.reason,
                action=action if f else ("skipped" if s.reason else "kept"),
                shape=layer.shape,
                rank=layer.task.rank,
                v_norm=s.v_norm,
                delta_norm=s.delta_norm * abs(layer.task.scaling),
            )
        )
    return out


def _finish(run: Run, command: str, method: str, records: list[LayerRecord], settings: dict[str, Any]) -> dict[str, Any]:
    run.timings["total_s"] = time.perf_counter() - run.started
    inputs = {k: settings[k] for k in ("aligned", "unaligned", "adapter", "task_adapter", "safety_adapter") if k in settings}
    headers: dict[str, str] = {}
    for reader in {id(r): r for r in (run.aligned, run.unaligned, *(m.reader for layer in run.layers
                                                                    for m in (layer.task, layer.safety) if m is not None))}.values():
        headers.update(reader.header_digests())
    return build_report(
        command=command, method=method, layers=records, settings=settings, backend=run.backend,
        precision=run.precision, timings=run.timings, bytes_read=run.bytes_read, warnings=run.warnings,
        backend_detail=ops.backends.backend_detail(run.backend), inputs=inputs, headers=headers,
    )


def _save_report(report: dict[str, Any], folder: Path, with_plot: bool) -> None:
    write_json(report, folder / REPORT_JSON)
    if with_plot:
        plot(report, folder / REPORT_PNG)


# --- commands --------------------------------------------------------------------------------


@_closes_files
@exact_fp32_matmuls()
def score(
    aligned: str | Path, unaligned: str | Path, adapter: str | Path, *,
    threshold: float = 0.35, backend: str = "auto", device: str = "cpu", precision: str | None = None,
    report_path: str | Path | None = None, plot_path: str | Path | None = None, progress: bool | None = None,
    honour_env: bool = True,
) -> dict[str, Any]:
    """Score one adapter's layers; flag by SafeMERGE's rule at ``threshold`` for the report only."""
    selection = Selection(threshold=threshold)
    inputs = (("--aligned", aligned), ("--unaligned", unaligned), ("--adapter", adapter))
    check_given(inputs)
    for path, flag in ((report_path, "--report"), (plot_path, "--plot")):
        if path is not None and not str(path).strip():
            raise SafeMergeError(f"{flag} is empty; give a file name or leave {flag} out")
        if path and str(path).endswith(("/", os.sep)):  # (Path() drops the slash: it would become a file)
            name = REPORT_JSON if flag == "--report" else REPORT_PNG
            raise SafeMergeError(f"{flag} {path} names a folder (it ends in a slash); give a file name such as "
                                 f"{Path(path) / name}")
        if path:
            check_parent(path, flag, follow_links=True)
            check_not_input(path, flag, inputs)
    if report_path and plot_path:
        if same_place(report_path, plot_path):
            raise SafeMergeError(f"--report and --plot are both {report_path}; give them different names")
        if within(report_path, plot_path) or within(plot_path, report_path):
            inner, outer = ("--report", "--plot") if within(report_path, plot_path) else ("--plot", "--report")
            raise SafeMergeError(f"{inner} would lie inside {outer}, which is a file; give them separate names")
    if report_path and Path(report_path).is_dir():
        raise SafeMergeError(f"--report {report_path} is a folder; give a file name such as "
                             f"{Path(report_path) / REPORT_JSON}")
    if plot_path:
        check_plot_path(plot_path)
    task = _opened(read_adapter(adapter, "--adapter"))
    run = open_run(aligned, unaligned, task, device=device, backend=backend, precision=precision,
                   honour_env=honour_env)
    if plot_path:
        preload_plotting()
    scores = score_layers(run, progress=progress)
    if selection.never_flags:
        run.warnings.append(selection.never_flags)
    flags = selection.flag([s.cosine for s in scores])
    settings = {"aligned": str(Path(aligned).resolve()), "unaligned": str(Path(unaligned).resolve()),
                "adapter": str(Path(adapter).resolve()), "device": device, "backend_requested": run.backend_requested,
                "precision_requested": run.precision_requested,
                **selection.describe()}
    report = _finish(run, "score", "score", _records(run, scores, flags, "kept"), settings)
    # both rendered first, then both renamed into place: a failure in either leaves neither
    files = [(plot_path, plot_writer(report, plot_path))] if plot_path else []
    if report_path:
        files.append((report_path, json_writer(report)))
    write_files(files, prog="safemerge")
    return report


@dataclass(frozen=True)
class MergeSettings:
    """Validated settings of ``safemerge merge``."""

    selection: Selection
    alpha: float = 0.8
    method: str = "linear"
    density: float = 1.0
    seed: int = 0
    output: str = "adapter"
    adapter_ranks: str = "uniform"

    def __post_init__(self) -> None:
        if not isinstance(self.selection, Selection):
            raise TypeError(f"selection must be a Selection, e.g. Selection(threshold=0.35); got {self.selection!r}")
        for name in ("alpha", "density"):  # (checked here, not after every layer is scored)
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number; got {value!r}")
            object.__setattr__(self, name, _as_float(value))  # (a NumPy scalar becomes a Python float)
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be an integer; got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))
        merging.validate(self.method, self.alpha, self.density, lora=True)
        if self.density != 1.0 and self.method not in merging.USES_DENSITY:  # (it would change nothing)
            raise ValueError(f"density applies to method ties, dare_linear and dare_ties; {self.method} keeps every "
                             "entry")
        if self.seed != 0 and self.method not in merging.USES_SEED:
            raise ValueError(f"seed applies to method dare_linear and dare_ties (their random masks); {self.method} "
                             "draws nothing")
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}; got {self.output!r}")
        _check_adapter_ranks(self.adapter_ranks, self.output)


def _check_adapter_ranks(adapter_ranks: str, output: str) -> None:
    if adapter_ranks not in ADAPTER_RANKS:
        raise ValueError(f"adapter_ranks must be one of {', '.join(ADAPTER_RANKS)}; got {adapter_ranks!r}")
    if adapter_ranks != "uniform" and output != "adapter":  # (it would change nothing)
        raise ValueError(f"adapter_ranks applies to output adapter; output {output} writes the model's weights")


def _check_equal_ranks(run: Run) -> None:
    """peft-linear mixes the two adapters' A's and B's entry by entry, so (as PEFT's
    ``add_weighted_adapter(combination_type="linear")``) it needs each module at one rank in both."""
    for layer in run.layers:
        t, s = layer.task, layer.safety
        if t.rank != s.rank:
            raise SafeMergeError(
                f"--method peft-linear: module {layer.module} has rank {t.rank} in --task-adapter but {s.rank} in "
                "--safety-adapter; PEFT's linear combination needs equal ranks (--method linear, the exact merge, "
                "takes any)"
            )


# a written adapter past this many times the factors its modules' own ranks need is said in the report
# (a merge's flagged r_task + r_safety among the task's r_task stays below it unless r_safety > 3 r_task)
PADDING_WARN = 4.0


def _note_padding(run: Run, modules: list[OutModule]) -> None:
    """Warn where one rank for every module (``write_adapter``) makes the written adapter many times
    larger than per-module ranks would: a task adapter whose ``rank_pattern`` gives one module rank
    256 and the rest 8 has every module written at 256, and vLLM then needs --max-lora-rank 256."""
    if not modules:
        return
    sides = [m.shape_A[1] + m.shape_B[0] for m in modules]
    widest = max(modules, key=lambda m: m.rank)
    own, padded = sum(m.rank * n for m, n in zip(modules, sides)), widest.rank * sum(sides)
    if padded > PADDING_WARN * own:
        run.warnings.append(
            f"the written adapter holds {padded / own:.1f}x the factors its modules' own ranks need: every module "
            f"is written at r = {widest.rank}, the rank of {widest.name}, zero-padded, so that every loader (vLLM, "
            "llama.cpp, TGI) reads it as PEFT does; --adapter-ranks per-module keeps each module's own rank (for PEFT "
            "only), and --output model writes the model with the updates instead"
        )


def _check_per_module(run: Run, task: LoraAdapter, adapter_ranks: str) -> None:
    """Before any scoring: a per-module adapter is refused where PEFT loads modules under other names
    (see ``write_adapter``), which is known from the task adapter's modules alone."""
    if adapter_ranks == "per-module":
        check_per_module(peft_moe_names(run.aligned.path, list(task.modules), task.config.get("target_modules"))[0])


def _peft_names(run: Run, modules: list[OutModule], task: LoraAdapter) -> dict[str, str]:
    """The written adapter's modules (the ``task`` adapter's config) that PEFT loads under another name,
    stacked with others (see ``write_adapter``), with a warning for those it loads nowhere
    (``adapters.peft_moe_names``) and, under rsLoRA, for those whose update its fusion rescales."""
    renamed, lost = peft_moe_names(run.aligned.path, [m.name for m in modules], task.config.get("target_modules"))
    if lost:
        first = next(iter(lost))
        run.warnings.append(
            f"{len(lost)} transformers-4 MoE module(s) of the written adapter (first: {first}) that PEFT with "
            f"transformers 5 loads nowhere ({lost[first]}): PEFT loads the adapter without them, with no word (or, for "
            "a module it cannot wrap, such as Qwen2-MoE's router, refuses the adapter), so their updates are lost "
            "there; --output model applies them"
        )
    loaded = {m: new for m, new in renamed.items() if m not in lost}
    leaves = fused_leaves(loaded)
    pairs = sorted((m for m, new in loaded.items() if len(leaves[new]) > 1), key=natural_key)
    if task.use_rslora and pairs:
        run.warnings.append(
            f"{len(pairs)} transformers-4 MoE expert module(s) of the written adapter (first: {pairs[0]}) that PEFT "
            "with transformers 5 fuses in pairs (w1 with w3, gate_proj with up_proj) into one LoRA of twice the rank "
            "and lora_alpha, which under use_rslora scales their update by sqrt(2): PEFT's load of the adapter is not "
            "the merged model; --output model applies them as merged"
        )
    return renamed


@contextmanager
def _whole_update_memory(layer: Layer, method: str) -> Iterator[None]:
    """ties and dare_* hold a flagged module's whole merged update in fp32, several copies at once
    (as each update is pruned whole: 10-13 measured for ties, whose torch.topk alone holds 5-7,
    about 6 for dare): where that does not fit, one line that says so, not the allocator's traceback."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
                or ("allocate" in str(exc) and "memory" in str(exc))):
            raise
        d_out, d_in = layer.shape
        copies = 13 if method == "ties" else 7
        asked = re.search(r"allocate (\d+) bytes", str(exc))  # (torch's words: kept, a size out of line shows a bug)
        more = f", {int(asked[1]) / 1e9:.1f} GB asked for at once" if asked else ""
        raise SafeMergeError(
            f"module {layer.module} ({d_out}x{d_in}): out of memory forming its {method} merge, which holds the whole "
            f"update in fp32 several times over (about {copies * 4 * d_out * d_in / 1e9:.1f} GB{more}); run it on a "
            "machine with more memory, or use --method linear, which merges the factors; nothing was written") from None


@_closes_files
@exact_fp32_matmuls()
def merge(
    aligned: str | Path, unaligned: str | Path, task_adapter: str | Path, safety_adapter: str | Path, out: str | Path,
    settings: MergeSettings, *, backend: str = "auto", device: str = "cpu", precision: str | None = None,
    force: bool = False, progress: bool | None = None, plot: bool = True, honour_env: bool = True,
) -> dict[str, Any]:
    """SafeMERGE: score the task adapter, merge flagged layers with the safety adapter, write ``out``
    (with ``safemerge_report.json`` and, unless ``plot=False``, ``safemerge_report.png``). A threshold
    flags ``cosine < threshold``, as SafeMERGE defines it, whatever ``selection.inclusive`` says."""
    if not isinstance(settings, MergeSettings):
        raise TypeError(f"settings must be a MergeSettings, e.g. MergeSettings(Selection(threshold=0.35)); "
                        f"got {settings!r}")
    settings = dataclasses.replace(settings, selection=dataclasses.replace(settings.selection, inclusive=False))
    check_out(out, force, inputs=(("--aligned", aligned), ("--unaligned", unaligned),
                                  ("--task-adapter", task_adapter), ("--safety-adapter", safety_adapter)),
              marker=REPORT_JSON, prog="safemerge")
    if same_place(task_adapter, safety_adapter):
        raise SafeMergeError(f"--task-adapter and --safety-adapter are the same folder ({task_adapter}), so a flagged "
                             "layer would get the task update back, with no safety in it; give as --safety-adapter "
                             "the adapter trained on safety data")
    task = _opened(read_adapter(task_adapter, "--task-adapter"))
    safety = _opened(read_adapter(safety_adapter, "--safety-adapter"))
    run = open_run(aligned, unaligned, task, safety, device=device, backend=backend, precision=precision,
                   honour_env=honour_env)
    if settings.output == "model":
        check_model_output(run.aligned)
    else:
        check_default_rank(task)
        _check_per_module(run, task, settings.adapter_ranks)
    if settings.method == merging.PEFT_LINEAR:
        _check_equal_ranks(run)
    if plot:
        preload_plotting()
    scores = score_layers(run, progress=progress)
    flags = _select(run, scores, settings.selection)
    records = _records(run, scores, flags, "merged")
    t0 = time.perf_counter()
    use_rslora = task.use_rslora
    # (the adapter's default scaling, which flagged modules are written at; lora_alpha 0 scales nothing)
    scaling = (global_scaling(task.config) or 1.0) if settings.output == "adapter" else 1.0
    peft_scale = merging.peft_linear_scaling(task.config) if settings.method == merging.PEFT_LINEAR else 1.0

    def merged_update(layer: Layer) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(full dW or None, B, A) of a flagged layer's merged update (fp32)."""
        t, s = layer.task, layer.safety
        if settings.method == "linear":
            B, A = merging.concat_lora(t.B, t.A, t.scaling, s.B, s.A, s.scaling, settings.alpha)
            return None, B, A
        if settings.method == merging.PEFT_LINEAR:
            B, A = merging.peft_linear(t.B, t.A, t.scaling, s.B, s.A, s.scaling, settings.alpha, scale=peft_scale)
            return None, B, A
        with _whole_update_memory(layer, settings.method):
            dW = merging.combine_full(t.delta(), s.delta(), alpha=settings.alpha, method=settings.method,
                                      density=settings.density, seed=settings.seed, module=layer.module)
        return dW, None, None

    def merged_module(layer: Layer, rec: LayerRecord) -> OutModule:
        """A flagged layer's merged factors, made when written: rank r_f + r_s (at most the layer's
        smaller side for the SVD of ties/dare; r for peft-linear), in the two adapters' promoted
        dtype and at least fp32: the scales folded into B (alpha s_f, (1 - alpha) s_s) would round
        in bf16/fp16, and PEFT computes LoRA in fp32 unless told otherwise."""
        t, s = layer.task, layer.safety
        rank = (t.rank if settings.method == merging.PEFT_LINEAR else t.rank + s.rank if settings.method == "linear"
                else min(t.rank + s.rank, *layer.shape))
        # (by hand: torch.promote_types refuses float8)
        dt = torch.float64 if torch.float64 in (t.dtypes[1], s.dtypes[1]) else torch.float32

        def make() -> tuple[torch.Tensor, torch.Tensor]:
            dW, B, A = merged_update(layer)
            if dW is not None:
                if not bool(torch.isfinite(dW).all()):  # (an SVD of it fails with a LinAlgError)
                    raise SafeMergeError(
                        f"module {layer.module}: its merged update overflows {dW.dtype} (Inf) once the adapters' "
                        f"B A and scalings are combined; check the factors and lora_alpha/alpha_pattern in "
                        f"{t.reader.path / 'adapter_config.json'} and {s.reader.path / 'adapter_config.json'}; "
                        "nothing was written")
                with _whole_update_memory(layer, settings.method):
                    B, A, rel = merging.truncated_factors(dW, t.rank + s.rank, seed=settings.seed,
                                                          module=layer.module)
                rec.extra["svd_rel_error"] = rel
            B = B.to(dt) / scaling
            if not bool(torch.isfinite(B).all()):  # (the scales folded into B: a huge lora_alpha overflows here)
                raise SafeMergeError(
                    f"module {layer.module}: its merged lora_B overflows {dt} (Inf) once the adapters' scalings are "
                    f"folded in; check lora_alpha and alpha_pattern in {t.reader.path / 'adapter_config.json'} and "
                    f"{s.reader.path / 'adapter_config.json'}; nothing was written")
            return A.to(dt), B

        # written at the task adapter's default scaling (B divided by it), as every module is (write_adapter)
        return OutModule(layer.module, (rank, t.d_in), (t.d_out, rank), (dt, dt),
                         alpha_for(scaling, rank, use_rslora), make)

    with staged_dir(out, force, marker=REPORT_JSON) as tmp:
        if settings.output == "adapter":
            modules = [merged_module(layer, rec) if rec.flagged else OutModule.from_lora(layer.task)
                       for layer, rec in zip(run.layers, records)]
            if settings.adapter_ranks == "uniform":
                _note_padding(run, modules)
            # (makes each module's factors as it writes it)
            write_adapter(tmp, task.config, modules, _peft_names(run, modules, task), settings.adapter_ranks)
            lossy = [rec.extra["svd_rel_error"] for rec in records if rec.extra.get("svd_rel_error", 0.0) > SVD_WARN]
            if lossy:
                run.warnings.append(
                    f"--method {settings.method} as an adapter: {len(lossy)} flagged layer(s), re-factorized to rank "
                    f"r_task + r_safety, keep their merged update only up to a relative error of {max(lossy):.2g} "
                    "(svd_rel_error per layer); --output model writes the exact merge"
                )
        else:
            by_weight = {layer.weight: (layer, rec) for layer, rec in zip(run.layers, records)}

            def update_for(name: str) -> torch.Tensor | None:
                hit = by_weight.get(name)
                if hit is None:
                    return None
                layer, rec = hit
                if not rec.flagged:
                    return layer.task.B.float() * layer.task.scaling, layer.task.A.float()
                dW, B, A = merged_update(layer)
                return dW if dW is not None else (B, A)

            write_model(run.aligned, tmp, update_for, checked=run.scored_weights, warnings=run.warnings)
        run.tick("write_s", t0)
        report = _finish(run, "merge", "safemerge", records, {
            "aligned": str(Path(aligned).resolve()), "unaligned": str(Path(unaligned).resolve()),
            "task_adapter": str(Path(task_adapter).resolve()), "safety_adapter": str(Path(safety_adapter).resolve()),
            "out": str(put_at(out)), **settings.selection.describe(), "alpha": settings.alpha,
            "merge": settings.method, "output": settings.output,
            "adapter_ranks": settings.adapter_ranks if settings.output == "adapter" else None,
            # (null where the method has no use for them: linear keeps every entry, only DARE draws)
            "density": settings.density if settings.method in merging.USES_DENSITY else None,
            "seed": settings.seed if settings.method in merging.USES_SEED else None,
            "device": device, "backend_requested": run.backend_requested, "precision_requested": run.precision_requested,
        })
        _save_report(report, tmp, plot)
    return report


@_closes_files
@exact_fp32_matmuls()
def project(
    aligned: str | Path, unaligned: str | Path, adapter: str | Path, out: str | Path, selection: Selection, *,
    output: str = "adapter", adapter_ranks: str = "uniform", backend: str = "auto", device: str = "cpu",
    precision: str | None = None, force: bool = False, progress: bool | None = None, plot: bool = True,
    honour_env: bool = True,
) -> dict[str, Any]:
    """Safe LoRA: flagged layers (cosine <= threshold, or the k lowest) get ``lora_B <- C lora_B``
    (``<=`` as Safe LoRA defines it, whatever ``selection.inclusive`` says). ``adapter_ranks``: see
    ``io.adapters.write_adapter``."""
    if not isinstance(selection, Selection):
        raise TypeError(f"selection must be a Selection, e.g. Selection(threshold=0.5) or Selection(num_layers=4); "
                        f"got {selection!r}")
    selection = dataclasses.replace(selection, inclusive=True)
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}; got {output!r}")
    _check_adapter_ranks(adapter_ranks, output)
    check_out(out, force, inputs=(("--aligned", aligned), ("--unaligned", unaligned), ("--adapter", adapter)),
              marker=REPORT_JSON, prog="safemerge")
    task = _opened(read_adapter(adapter, "--adapter"))
    run = open_run(aligned, unaligned, task, device=device, backend=backend, precision=precision,
                   honour_env=honour_env)
    if output == "model":
        check_model_output(run.aligned)
    else:
        check_default_rank(task)
        _check_per_module(run, task, adapter_ranks)
    if plot:
        preload_plotting()
    scores = score_layers(run, progress=progress, with_projection=selection)
    flags = _select(run, scores, selection)
    records = _records(run, scores, flags, "projected")
    t0 = time.perf_counter()
    # in lora_B's dtype for an adapter where that dtype holds C @ B (else fp32, as merge writes its
    # merged factors); fp32 for a model, whose weights then round once (W + s C B A)
    new_B = {layer.module: s.projected_B for layer, s, f in zip(run.layers, scores, flags) if f}
    kept = []
    for layer in run.layers if output == "adapter" else ():  # (a model's C @ B stays fp32)
        B, dtype = new_B.get(layer.module), layer.task.dtypes[1]
        if B is None:
            continue
        big, lost = ops.out_of_range(B, dtype), ops.lost_in_cast(B, dtype)
        if big is None and lost is None:
            new_B[layer.module] = B.to(dtype)
        else:
            info = torch.finfo(dtype)
            why = (f"reaches {big:.3g}, beyond what {dtype} holds ({info.max:.3g})" if big is not None
                   else f"lies below {dtype}'s normal range ({info.tiny:.2g}), where a cast errs by {lost:.1%}")
            kept.append((layer.module, dtype, why))
    if kept:
        module, dtype, why = kept[0]
        run.warnings.append(
            f"lora_B of {len(kept)} projected module(s) written in float32, not the adapter's {dtype}: C @ lora_B of "
            f"{module}{' (the first)' if len(kept) > 1 else ''} {why}; PeftModel loads mixed dtypes (in float32 by "
            "default; transformers' load_adapter in the model's dtype)"
        )
    with staged_dir(out, force, marker=REPORT_JSON) as tmp:
        if output == "adapter":
            modules = [OutModule.from_lora(layer.task, new_B.get(layer.module)) for layer in run.layers]
            if adapter_ranks == "uniform":
                _note_padding(run, modules)
            write_adapter(tmp, task.config, modules, _peft_names(run, modules, task), adapter_ranks)
        else:
            by_weight = {layer.weight: layer for layer in run.layers}

            def update_for(name: str) -> torch.Tensor | None:
                layer = by_weight.get(name)
                if layer is None:
                    return None
                B = new_B[layer.module] if layer.module in new_B else layer.task.B
                return B.float() * layer.task.scaling, layer.task.A.float()

            write_model(run.aligned, tmp, update_for, checked=run.scored_weights, warnings=run.warnings)
        run.tick("write_s", t0)
        report = _finish(run, "project", "safelora", records, {
            "aligned": str(Path(aligned).resolve()), "unaligned": str(Path(unaligned).resolve()),
            "adapter": str(Path(adapter).resolve()), "out": str(put_at(out)), **selection.describe(),
            "output": output, "adapter_ranks": adapter_ranks if output == "adapter" else None, "device": device,
            "backend_requested": run.backend_requested, "precision_requested": run.precision_requested,
        })
        _save_report(report, tmp, plot)
    return report


__all__ = ["MergeSettings", "Selection", "merge", "project", "score", "summary_table"]
