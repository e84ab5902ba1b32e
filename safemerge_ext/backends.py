"""Backend registry: which implementation of the scoring passes runs, and why the others cannot.

A backend is a module with ``lowrank_passes``, ``fullrank_sums`` and ``project_full`` (the
contract is written out in ``safemerge_ext.reference``). Native backends are imported lazily: a
missing extension or a missing Triton never breaks ``import safemerge_ext``; it becomes a reason
string in :func:`available_backends`, and an error only when that backend is asked for by name.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

AUTO = "auto"
ENV_VAR = "SAFEMERGE_BACKEND"
PRECISION_ENV_VAR = "SAFEMERGE_PRECISION"
# Operand precisions of the Triton kernels' products (kernels/_dot.py). "ieee" is exact fp32 FMA,
# the default: scores are compared against a threshold, so they should not depend on the GPU.
# "tf32x3" is near-fp32 on the tensor cores; "tf32" and "bf16" trade digits (about 3 significant
# digits per product for bf16) for the tensor cores' rate. Like torch's float32 matmul precision,
# a precision is a permission: the other backends always compute in exact fp32.
PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16")
EXACT = "ieee"
TENSOR_CORE_BACKENDS = ("triton",)
# set (in one thread or task only) where a caller turns a backend's "is off" warning into an error of its own
QUIET = contextvars.ContextVar("safemerge_quiet_backend_warnings", default=False)


_exact_lock = threading.Lock()
_exact_depth = 0  # calls inside exact_fp32_matmuls now, in every thread
_exact_saved: tuple[str, object] | None = None  # what the first of them found, put back by the last


def _matmul_settings(torch: ModuleType) -> list | None:
    matmul = [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul]
    return matmul if all(hasattr(m, "fp32_precision") for m in matmul) else None  # torch >= 2.9


def _make_exact(torch: ModuleType) -> tuple[str, object] | None:
    """Switch torch's fp32 products to full fp32; what to put back (None: they were exact)."""
    matmul = _matmul_settings(torch)
    if matmul is not None:
        saved = [m.fp32_precision for m in matmul]  # (the one in force: "none" when none was set)
        if all(s in ("ieee", "none") for s in saved):
            return None
        for m in matmul:
            m.fp32_precision = "ieee"
        return ("per-backend", saved)
    saved = torch.get_float32_matmul_precision()
    if saved == "highest":
        return None
    torch.set_float32_matmul_precision("highest")
    return ("global", saved)


def _put_back(torch: ModuleType, saved: tuple[str, object] | None) -> None:
    if saved is None:
        return
    kind, value = saved
    if kind == "per-backend":
        for m, s in zip(_matmul_settings(torch), value):
            m.fp32_precision = s
    else:
        torch.set_float32_matmul_precision(value)


@contextlib.contextmanager
def exact_fp32_matmuls() -> Iterator[None]:
    """torch's fp32 products in full fp32 inside (a decorator too), whatever the program set: a
    ``torch.set_float32_matmul_precision("medium")`` makes them bf16 on CPUs with AMX and TF32 on
    GPUs, which would change the scores (and merged weights) that the report says were computed
    in exact fp32. The settings are process-wide: the first call to enter (in any thread) switches
    them, and the last to leave puts back what the first found, so overlapping calls in several
    threads stay exact until all are done (another thread's products in the meantime are exact too)."""
    global _exact_depth, _exact_saved
    import torch

    with _exact_lock:
        if _exact_depth == 0:
            _exact_saved = _make_exact(torch)
        _exact_depth += 1
    try:
        yield
    finally:
        with _exact_lock:
            _exact_depth -= 1
            if _exact_depth == 0:
                saved, _exact_saved = _exact_saved, None
                _put_back(torch, saved)


@dataclass(frozen=True)
class BackendSpec:
    name: str
    module: str  # import path of the module that implements the contract
    devices: tuple[str, ...]  # torch device types `auto` uses it on
    # Triton's interpreter runs the kernels on CPU tensors (slowly): allowed when asked for by name.
    interpreted_on_cpu: bool = False
    # its reason is cheap and follows the environment: asked on every resolve, not only until loaded
    recheck: bool = False

    def runs_on(self, device_type: str, explicit: bool) -> bool:
        if self.interpreted_on_cpu and triton_interpret_enabled():
            # interpreted, on any tensors: only when asked for by name (``auto`` on a GPU would
            # otherwise run the kernels through the CPU interpreter, hours for a 7B model)
            return explicit and (device_type in self.devices or device_type == "cpu")
        return device_type in self.devices


def triton_interpret_enabled() -> bool:
    """True when triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1).

    Never imports triton: importing it fixes the interpreter mode of triton's own jit helpers for
    the whole process, which must stay the caller's choice. Once triton is imported its knob is
    read (it also sees values set in code); before, the variable, parsed as triton parses it.
    """
    knobs = getattr(sys.modules.get("triton"), "knobs", None)  # triton < 3.4 has no knobs
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")  # (no strip: triton does not)


# Order is the `auto` preference on each device type.
_SPECS: tuple[BackendSpec, ...] = (
    BackendSpec("triton", "safemerge_ext.kernels", ("cuda",), interpreted_on_cpu=True),
    BackendSpec("cuda", "safemerge_ext.cuda_backend", ("cuda",)),
    BackendSpec("cpp", "safemerge_ext.cpp_backend", ("cpu",), recheck=True),  # SAFEMERGE_CPU_ISA
    BackendSpec("torch", "safemerge_ext.reference", ("cpu", "cuda", "mps", "xpu", "meta")),
)
NAMES: tuple[str, ...] = tuple(s.name for s in _SPECS)

_loaded: dict[str, ModuleType | str] = {}


def _load(spec: BackendSpec, fresh: bool = False) -> ModuleType | str:
    """Import the backend module, or return the reason it cannot be used; ``fresh`` asks a loaded
    module again (the C++ one follows SAFEMERGE_CPU_ISA, and checks it again on every call)."""
    if spec.name not in _loaded:
        try:
            mod = importlib.import_module(spec.module)
        except Exception as exc:  # any import failure is a reason, never a crash
            _loaded[spec.name] = f"{type(exc).__name__}: {' '.join(str(exc).split())}".strip()  # (one line)
            return _loaded[spec.name]
        # (a module is kept; while it is unavailable its reason is asked again each time: it may
        # follow the environment, as Triton's does TRITON_INTERPRET until triton is imported)
        reason = _reason(mod)
        if reason:
            return reason
        _loaded[spec.name] = mod
    got = _loaded[spec.name]
    if (fresh or spec.recheck) and not isinstance(got, str):  # (asking Triton costs 0.5 ms: not every call)
        return _reason(got) or got
    return got


def _reason(mod: ModuleType) -> str | None:
    """The module's own reason it cannot run here; a check that fails is a reason too, never a crash."""
    try:
        return getattr(mod, "unavailable_reason", lambda: None)()
    except Exception as exc:
        return f"checking it failed: {type(exc).__name__}: {exc}".strip()


def available_backends(load: bool = False) -> dict[str, str | None]:
    """Map every backend name to None when it can run here, else the reason it cannot; with
    ``load``, a backend whose check passes is also loaded (Triton imports its kernels, fixing
    triton's interpreter mode for the process), so an install that cannot load says why."""
    out: dict[str, str | None] = {}
    for spec in _SPECS:
        got = _load(spec, fresh=True)
        if load and not isinstance(got, str) and not _ready(spec, got):
            got = _loaded[spec.name]
        out[spec.name] = got if isinstance(got, str) else None
    return out


def unavailable_reason(name: str) -> str | None:
    """Why the backend ``name`` cannot run here, or None (one backend's entry of
    :func:`available_backends`, without asking the others)."""
    got = _load(next(s for s in _SPECS if s.name == name), fresh=True)
    return got if isinstance(got, str) else None


def requested_backend(name: str | None, honour_env: bool = True) -> str:
    """What a request for ``name`` asks for, as a report records it: ``auto`` (or None) that
    follows the environment's choice is that choice (``"torch (SAFEMERGE_BACKEND)"``)."""
    requested = (name or AUTO).strip().lower()
    if requested == AUTO and (honour_env or name is None):
        env = os.environ.get(ENV_VAR, "").strip().lower()
        return f"{env} ({ENV_VAR})" if env and env != AUTO else AUTO
    return requested


def backend_detail(name: str) -> str | None:
    """What an available backend runs with (the C++ kernels' instruction set and threads), if it says."""
    spec = next((s for s in _SPECS if s.name == name), None)
    got = _load(spec) if spec is not None else None
    describe = getattr(got, "detail", None)
    return describe() if callable(describe) else None


def cpu_isa_refusal(device_type: str, choose_torch: str) -> str | None:
    """Under backend ``auto``: the line refusing a ``SAFEMERGE_CPU_ISA`` that turned the C++ backend
    off on the CPU (torch would score 5-20x slower without a word in the report), else None;
    ``choose_torch`` says how the user asks for torch instead."""
    off = unavailable_reason("cpp") if device_type == "cpu" else None
    if not off:
        return None
    from safemerge_ext.cpp_backend import ISA_ENV_VAR  # (loaded: its reason is one of its own)

    if not off.startswith(ISA_ENV_VAR):
        return None
    return f"{off} (else the C++ backend is off and torch scores 5-20x slower; {choose_torch} chooses that)"


def resolve(name: str | None, device_type: str, *, honour_env: bool = True) -> tuple[str, ModuleType]:
    """Return (name, module) for a request on a device type.

    ``auto`` (or None) honours ``SAFEMERGE_BACKEND`` (``auto`` only with ``honour_env``: a command
    line's explicit ``--backend auto`` does not), then falls back silently through the preference
    order; an explicit name that cannot run raises and lists the valid names.
    """
    if name is not None and not isinstance(name, str):
        raise ValueError(f"backend must be a name (auto, {', '.join(NAMES)}); got {name!r}")
    requested, source = (name or AUTO).strip().lower(), "backend"
    if requested == AUTO and (honour_env or name is None):
        requested, source = os.environ.get(ENV_VAR, AUTO).strip().lower() or AUTO, ENV_VAR
    # (named in the messages: a backend the environment chose was not asked for with --backend)
    where = f"{ENV_VAR}={requested}: " if source == ENV_VAR else ""
    if requested != AUTO:
        spec = next((s for s in _SPECS if s.name == requested), None)
        if spec is None:
            raise ValueError(f"{source} must be one of auto, {', '.join(NAMES)}; got {requested!r}")
        if not spec.runs_on(device_type, explicit=True):
            others = [s.name for s in _SPECS
                      if s is not spec and s.runs_on(device_type, explicit=False) and not isinstance(_load(s), str)]
            interpreter = (" (or set TRITON_INTERPRET=1 to run its kernels on the CPU through the interpreter, slowly)"
                           if spec.interpreted_on_cpu and device_type == "cpu" else "")
            raise ValueError(
                f"{where}backend {requested!r} runs on {'/'.join(spec.devices)} tensors, not {device_type}: "
                f"use --device {spec.devices[0]}{interpreter} or another backend ({', '.join(others)})"
            )
        got = _load(spec)
        if isinstance(got, str):
            usable = [s.name for s in _SPECS if s.runs_on(device_type, explicit=True) and not isinstance(_load(s), str)]
            raise ValueError(
                f"{where}backend must be one of {', '.join(usable)}; {requested!r} is unavailable: {got}"
            )
        return spec.name, got
    for spec in _SPECS:
        if spec.runs_on(device_type, explicit=False):
            got = _load(spec)
            if not isinstance(got, str) and _ready(spec, got):
                return spec.name, got
    raise ValueError(f"no backend runs on {device_type} tensors")  # torch covers every device


def _ready(spec: BackendSpec, mod: ModuleType) -> bool:
    """Whether a backend ``auto`` is about to pick loads (its ``load()``, where it has one: Triton
    imports its kernels, which its cheap check does not); one that fails keeps the reason (shown by
    :func:`available_backends`), and ``auto`` goes on to the next."""
    load = getattr(mod, "load", None)
    if load is None:
        return True
    try:
        load()
    except Exception as exc:
        _loaded[spec.name] = str(exc).removeprefix(f"{spec.name} backend: ") or type(exc).__name__
        return False
    return True


def requested_precision(precision: str | None) -> str:
    """The operand precision asked for: ``precision``, else ``SAFEMERGE_PRECISION``, else ``ieee``;
    an unknown name raises and lists the valid ones."""
    if precision is not None and not isinstance(precision, str):
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    requested = (precision or os.environ.get(PRECISION_ENV_VAR, "")).strip().lower() or EXACT  # (blank: unset)
    if requested not in PRECISIONS:
        source = "precision" if precision else PRECISION_ENV_VAR
        raise ValueError(f"{source} must be one of {', '.join(PRECISIONS)}; got {requested!r}")
    return requested


def resolve_precision(precision: str | None, backend: str, device_type: str = "cuda") -> str:
    """The operand precision ``backend`` computes with when ``precision`` is allowed: only the
    Triton kernels on a GPU round operands (``TENSOR_CORE_BACKENDS``); the others, and Triton's
    interpreter on the CPU (whose dot products ignore the operand precision), compute in ``ieee``."""
    requested = requested_precision(precision)
    return requested if backend in TENSOR_CORE_BACKENDS and device_type == "cuda" else EXACT
