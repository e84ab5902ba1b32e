"""PEFT LoRA adapters: read (with each module's scaling) and write (mixed ranks, loadable by PEFT).

A module's update is ``scaling * lora_B @ lora_A`` with ``scaling = alpha / r`` (or
``alpha / sqrt(r)`` with ``use_rslora``), where r and alpha come from ``rank_pattern`` /
``alpha_pattern`` when a pattern matches the module, else from ``r`` / ``lora_alpha``. Patterns
match as PEFT matches them (``re.match(rf"(.*\\.)?({key})$", module)``, first key wins). Module names
are the base model's (``model.layers.0.self_attn.q_proj``): PEFT's ``base_model.model.`` prefix is
stripped on read and added back on write.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Collection, Iterable

import torch

from safemerge_ext.errors import SafeMergeError, not_a_folder
from safemerge_ext.io.models import (ModelReader, canonical_name, config_value, experts_count, module_key,
                                     namings, natural_key, renamed_on_load)
from safemerge_ext.io.safetensors_stream import StreamingWriter

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
# Config switches that change what the saved tensors mean; we refuse rather than misread them.
_UNSUPPORTED = {
    "use_dora": "DoRA adapters (use_dora: true) carry a magnitude vector that SafeMERGE does not model",
    "fan_in_fan_out": "fan_in_fan_out adapters (GPT-2 Conv1D layers) store transposed factors",
    "modules_to_save": "modules_to_save holds fully trained copies of whole modules",
    "trainable_token_indices": "trainable tokens are not LoRA updates",
    "lora_bias": "LoRA bias terms are not part of the B @ A update",
    "target_parameters": "LoRA on raw parameters (MoE experts) is not a linear module's B @ A update",
    "alora_invocation_tokens": "activated LoRA applies its update only after invocation tokens",
    "use_bdlora": "BD-LoRA (use_bdlora) stores block-diagonal factors whose update is not the plain B @ A",
    "kasa_config": "KaSA truncates the base weights and puts learned singular values between A and B",
    "use_qalora": "QA-LoRA applies lora_A to group-pooled inputs, so B @ A is not the weight update",
    "arrow_config": "Arrow routes each token between several adapters",
    # (their B A is the update, as peft's merge computes it, but the file holds more than the factors)
    "velora_config": "VeLoRA adapters (velora_config) save activation-compression buffers (lora_velora_*) beside "
                     "the factors",
    "monteclora_config": "MonteCLoRA adapters (monteclora_config) save a variational sampler "
                         "(lora_monteclora_sampler.*) beside the factors",
    "layer_replication": "layer_replication builds the adapted model from copies of the checkpoint's layers, "
                         "whose layer numbers are not the checkpoint's",
}

# Of those, what PEFT's merge_and_unload folds into the weights as the adapted model computes
# them: right for mergekit's model+lora inputs, scored as W_task - W_aligned.
_FOLDED_BY_PEFT = frozenset({"use_dora", "fan_in_fan_out", "modules_to_save", "lora_bias", "trainable_token_indices",
                             "velora_config", "monteclora_config"})

_REMEDY = {
    # (peft's target_modules="all-linear" adds the experts' parameters on transformers 5 MoE models)
    "target_parameters": "; train it with target_modules naming only the attention and other linear layers (on "
                         "transformers-5 MoE models PEFT turns a router or experts named there, or reached by "
                         "'all-linear', into target_parameters; it also saves an adapter trained on transformers 4 "
                         "so once it has loaded it: give the copy saved before)",
}
# (what PEFT folds into the weights, a safemerge-yaml recipe takes as aligned+adapter)
_FOLD = "; safemerge-yaml takes it as aligned+adapter in a recipe (PEFT folds it into the weights first)"
_REMEDY.update(dict.fromkeys(_FOLDED_BY_PEFT, _FOLD))
_REMEDY["lora_bias"] = ("; safemerge-yaml takes it as aligned+adapter in a recipe where every layer it adapts has a "
                        "bias (PEFT folds the LoRA bias into that bias; a model without linear biases, such as Llama, "
                        "cannot take it: train the adapter without lora_bias)")
_REMEDY["layer_replication"] = "; train the adapter without layer_replication"

# init_lora_weights values for which PEFT subtracts the initial factors from the base weights when
# it creates (or loads) the adapter: the saved B A is then not the update. PEFT's
# save_pretrained(..., path_initial_model_for_weight_conversion=...) converts such an adapter into
# a plain one (and sets init_lora_weights to true).
_REWRITES_BASE = ("pissa", "corda", "olora", "loftq", "lora_ga")


@functools.lru_cache(maxsize=None)
def _pattern(key: str) -> re.Pattern[str]:
    """A rank/alpha pattern key as PEFT matches it, compiled once: past re's own cache of 512, an
    adapter with a key per module (as merge and project write them; 560 for a 70B all-linear one)
    recompiled a pattern at every match, 3 s to read it, 28 s at 405B (review149)."""
    return re.compile(rf"(.*\.)?({key})$")


def pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """The first pattern that PEFT would match against ``module`` (None if none does)."""
    for key in patterns:
        if _pattern(key).match(module):
            return key
    return None


def peft_module(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


@dataclass
class LoraModule:
    """One adapted linear module: its rank, alpha and scaling, and its factors' shapes and dtypes.

    ``A`` (r x d_in) and ``B`` (d_out x r) are read from the adapter file at each access into fresh
    memory, so an adapter holds no weights between uses: a run keeps one module's factors at a time,
    however many modules (an ``all-linear`` adapter of a 70B model is over a GB in fp32).
    """

    name: str
    rank: int
    alpha: float
    scaling: float
    d_out: int
    d_in: int
    dtypes: tuple[torch.dtype, torch.dtype]  # lora_A's, lora_B's
    reader: ModelReader = field(repr=False)
    keys: tuple[str, str] = field(repr=False)  # lora_A's, lora_B's tensor names in the file

    @property
    def A(self) -> torch.Tensor:
        return self.reader.get(self.keys[0])

    @property
    def B(self) -> torch.Tensor:
        return self.reader.get(self.keys[1])

    @property
    def nbytes(self) -> int:
        return self.rank * (self.d_in * self.dtypes[0].itemsize + self.d_out * self.dtypes[1].itemsize)

    def delta(self) -> torch.Tensor:
        """The full update ``scaling * B @ A`` in fp32."""
        return (self.B.float() @ self.A.float()) * self.scaling


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter on disk; ``modules`` keep the file's module names (base naming)."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]
    flag: str

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.modules.values())

    def close(self) -> None:
        """Close the adapter's file now (else when the last reference to it goes)."""
        for reader in {id(m.reader): m.reader for m in self.modules.values()}.values():
            reader.close()


def read_adapter(path: str | os.PathLike, flag: str = "--adapter", *, folded: bool = False) -> LoraAdapter:
    """Open and validate a PEFT LoRA adapter folder: config, names, shapes, ranks, and that every
    factor is finite (each is read once for that and dropped; modules read their factors again
    when asked).

    ``folded``: the adapter is to be folded into its model by PEFT (mergekit's ``model+lora``),
    whose update is then read back as W_task - W_aligned: what PEFT folds as the adapted model runs
    (DoRA magnitudes, saved modules, LoRA biases, trained tokens) is allowed, and only its B @ A
    factors are returned, for their shapes."""
    p = Path(path)
    cfg_path, w_path = p / CONFIG, p / WEIGHTS
    if not p.is_dir():
        raise not_a_folder(flag, p, f"a PEFT adapter folder (adapter_config.json + {WEIGHTS})")
    if not cfg_path.is_file():
        named = sorted(d.name for d in p.iterdir() if (d / CONFIG).is_file())
        if named:  # save_pretrained puts every adapter but "default" in a subfolder of its name
            raise SafeMergeError(f"{flag} {p}: no {CONFIG}, but named adapters in subfolders ({', '.join(named)}); "
                                 f"pass one of those, e.g. {p / named[0]}")
        raise SafeMergeError(f"{flag} {p}: no {CONFIG}; give a folder saved by PeftModel.save_pretrained")
    try:
        config = json.loads(cfg_path.read_bytes())  # (JSON is UTF-8 whatever the locale; bytes: json detects it)
    except (ValueError, RecursionError) as exc:
        raise SafeMergeError(f"{flag} {cfg_path}: not valid JSON ({' '.join(str(exc).split())}); repair it, or save "
                             "the adapter again with save_pretrained") from None
    if not isinstance(config, dict):
        raise SafeMergeError(f"{flag} {cfg_path}: not a PEFT config (a JSON object); re-save the adapter with save_pretrained")
    peft_type = str(config.get("peft_type", "")).upper()
    if not peft_type and "lora_parameters" in config:  # (mlx-lm's adapter_config.json)
        raise SafeMergeError(f"{flag} {cfg_path}: an mlx-lm adapter (lora_parameters, no peft_type); convert it to "
                             "PEFT's format (adapter_config.json with peft_type LORA, adapter_model.safetensors)")
    if peft_type != "LORA":
        raise SafeMergeError(f"{flag} {cfg_path}: peft_type is {peft_type or 'missing'}; only LoRA adapters are supported "
                             "(give a LoRA adapter saved by PEFT's save_pretrained: its config has peft_type LORA)")
    for key, why in _UNSUPPORTED.items():
        if folded and key in _FOLDED_BY_PEFT:
            continue
        value = config.get(key)
        if value or (key.endswith("_config") and value is not None):  # (an empty *_config: the defaults)
            raise SafeMergeError(f"{flag} {cfg_path}: {key} is set; {why}, so this adapter is not supported"
                                 + _REMEDY.get(key, ""))
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_REWRITES_BASE):
        raise SafeMergeError(
            f"{flag} {cfg_path}: init_lora_weights is {init!r}, for which PEFT rewrites the base weights (W - s B0 A0), "
            "so s B A is not the adapter's update; save it converted (save_pretrained(dir, "
            "path_initial_model_for_weight_conversion=<the initial adapter>)) and pass that"
        )
    if not w_path.is_file():
        if (p / "adapter_model.bin").is_file():
            raise SafeMergeError(
                f"{flag} {p} has only adapter_model.bin: re-save it with safetensors (save_pretrained(dir, safe_serialization=True))"
            )
        raise SafeMergeError(f"{flag} {p}: no {WEIGHTS} beside its {CONFIG}; give the folder PEFT's save_pretrained "
                             "wrote, which holds both")

    r_default, alpha_default, rank_pattern, alpha_pattern = _ranks_and_alphas(config, f"{flag} {cfg_path}")
    _check_layers_pattern(config, f"{flag} {cfg_path}")
    reader = ModelReader(p, flag, single=WEIGHTS)
    keys: dict[str, dict[str, str]] = {}
    for key in reader.names:
        m = _KEY.match(key)
        if m is None:
            if folded:
                continue
            raise _not_a_factor(key, reader.names, config, f"{flag} {w_path}")
        factors = keys.setdefault(peft_module(m["module"]), {})
        if m["ab"] in factors:  # (e.g. lora_A.weight and lora_A.other.weight: two adapters' factors in one file)
            raise SafeMergeError(
                f"{flag} {w_path}: module {peft_module(m['module'])} has two lora_{m['ab']} tensors ({factors[m['ab']]} "
                f"and {key}); save each adapter in its own folder"
            )
        factors[m["ab"]] = key

    modules: dict[str, LoraModule] = {}
    for name, ab in keys.items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise SafeMergeError(f"{flag} {w_path}: module {name} has no {missing}; the adapter file is incomplete")
        (a_shape, a_dtype), (b_shape, b_dtype) = reader.meta(ab["A"]), reader.meta(ab["B"])
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise SafeMergeError(
                f"{flag} {w_path}: module {name} has lora_A {tuple(a_shape)} and lora_B {tuple(b_shape)}; "
                "they must be r x d_in and d_out x r"
            )
        rank = a_shape[0]
        if rank < 1:
            raise SafeMergeError(f"{flag} {w_path}: module {name} has rank 0 (lora_A {tuple(a_shape)}); the adapter is empty or corrupt")
        rk = pattern_key(rank_pattern, name)
        expected = int(rank_pattern[rk]) if rk is not None else r_default
        if expected != rank:
            raise SafeMergeError(
                f"{flag} {w_path}: module {name} has rank {rank} but the config says {expected}; the config does not match the weights"
            )
        ak = pattern_key(alpha_pattern, name)
        alpha = float(alpha_pattern[ak]) if ak is not None else alpha_default
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        for dtype, which in ((a_dtype, "lora_A"), (b_dtype, "lora_B")):
            if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
                raise SafeMergeError(f"{flag} {w_path}: {name}.{which} is {dtype}, not a floating-point tensor; the adapter is corrupt")
        modules[name] = LoraModule(name, rank, alpha, scaling, b_shape[0], a_shape[1], (a_dtype, b_dtype),
                                   reader, (ab["A"], ab["B"]))
    if not modules:
        raise SafeMergeError(f"{flag} {w_path}: no LoRA factors found (no lora_A/lora_B weights); give the folder "
                             "PeftModel.save_pretrained wrote for a LoRA adapter")
    _check_finite(reader, modules, f"{flag} {w_path}")
    return LoraAdapter(p, config, modules, flag)


def _ranks_and_alphas(config: dict[str, Any], where: str) -> tuple[int, float, dict[str, Any], dict[str, Any]]:
    """The config's default rank and alpha and its per-module patterns, checked: numbers, and
    patterns that are objects whose keys are regular expressions and whose values are numbers."""
    def number(v: Any, what: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise SafeMergeError(f"{where}: {what} is {v!r}, not a number; re-save the adapter with save_pretrained")
        return v

    r_default, alpha_default = number(config.get("r", 8), "r"), float(number(config.get("lora_alpha", 8), "lora_alpha"))
    if r_default != int(r_default):
        raise SafeMergeError(f"{where}: r is {r_default!r}, not a whole number; re-save the adapter with save_pretrained")
    patterns = []
    for key in ("rank_pattern", "alpha_pattern"):
        pat = config.get(key) or {}
        if not isinstance(pat, dict):
            raise SafeMergeError(f"{where}: {key} is {type(pat).__name__}, not an object of module pattern -> value")
        for k, v in pat.items():
            try:
                re.compile(k)
            except re.error as exc:
                raise SafeMergeError(f"{where}: {key} has {k!r}, not a regular expression ({exc})") from None
            number(v, f"{key}[{k!r}]")
        patterns.append(pat)
    return int(r_default), alpha_default, patterns[0], patterns[1]


def _check_layers_pattern(config: dict[str, Any], where: str) -> None:
    """``layers_pattern`` as PEFT reads it where ``layers_to_transform`` is set: a name (a regular
    expression) or a list of them, of the model's list of layers (``layers``, ``h``)."""
    layers, pattern = config.get("layers_to_transform"), config.get("layers_pattern")
    if layers in (None, [], ()) or isinstance(layers, bool) or not pattern:
        return
    patterns = [pattern] if isinstance(pattern, str) else pattern
    if not (isinstance(patterns, (list, tuple)) and all(isinstance(p, str) for p in patterns)):
        raise SafeMergeError(f"{where}: layers_pattern is {pattern!r}, not the name (or a list of names) of the "
                             "model's list of layers, e.g. 'layers'; correct it or re-save the adapter with save_pretrained")
    for p in patterns:
        try:
            re.compile(rf"(?:^|.*?\.){p}\.(\d+)\.")
        except re.error as exc:
            raise SafeMergeError(f"{where}: layers_pattern has {p!r}, not a regular expression ({exc}); correct it "
                                 "or re-save the adapter with save_pretrained") from None


def _not_a_factor(key: str, names: list[str], config: dict[str, Any], where: str) -> SafeMergeError:
    """The error for a tensor that is not a LoRA factor, naming what it is where PEFT's names say."""
    embedding = next((n for n in names if ".lora_embedding_" in n), None)
    if embedding is not None:
        module = peft_module(embedding.split(".lora_embedding_")[0])
        return SafeMergeError(f"{where}: adapts the embedding {module} (lora_embedding_A/B); embedding LoRA is not "
                              f"supported here{_FOLD}")
    if key.endswith(".base_layer.weight"):
        return SafeMergeError(
            f"{where}: holds {peft_module(key[:-len('.base_layer.weight')])}'s whole base weight (PEFT saves it "
            "when an embedding or output layer is adapted, in case the vocabulary was resized), which would replace "
            "the model's; if the vocabulary is unchanged, re-save the adapter with "
            "save_pretrained(dir, save_embedding_layers=False)"
        )
    if key.endswith(".bias"):
        return SafeMergeError(
            f"{where}: tensor {key} is a trained bias (bias: {config.get('bias')!r}); bias terms are not part of "
            f"the B @ A update, so this adapter is not supported here{_FOLD}"
        )
    if "lora" in key.lower() and "lora_magnitude" not in key:  # (factors named by another tool)
        return SafeMergeError(
            f"{where}: tensor {key} is not named as PEFT names LoRA factors (<module>.lora_A.weight and "
            "<module>.lora_B.weight), but as another tool does (mlx-lm's lora_a/lora_b, diffusers' lora.down/lora.up, "
            "kohya's lora_down/lora_up); convert the adapter to PEFT's names and format"
        )
    if ".lora_" not in key and key.endswith(".weight"):  # (save_embedding_layers=True: the whole layer)
        return SafeMergeError(
            f"{where}: holds {peft_module(key[:-len('.weight')])}'s whole weight (PEFT saves embedding and output "
            "layers with save_embedding_layers=True), which would replace the model's; if the vocabulary is "
            "unchanged, re-save the adapter with save_pretrained(dir, save_embedding_layers=False)"
        )
    return SafeMergeError(
        f"{where}: tensor {key} is not a LoRA factor (lora_A/lora_B); embedding LoRA, DoRA magnitudes and saved "
        f"modules are not supported here{_FOLD}"
    )


def _check_finite(reader: ModelReader, modules: dict[str, LoraModule], where: str) -> None:
    """Raise on the first factor with NaN or Inf (checked a run of the file at a time: measured,
    both 1B q/v adapters opened, 2.5-2.6 ms against 9.6-9.8 ms for an isfinite per factor)."""
    which = {m.keys[i]: (m.name, ("lora_A", "lora_B")[i]) for m in modules.values() for i in (0, 1)}
    bad = reader.first_nonfinite(which)
    if bad is not None:
        name, factor = which[bad]
        raise SafeMergeError(f"{where}: {name}.{factor} contains NaN or Inf; the adapter is corrupt")


@dataclass
class OutModule:
    """A module to write: its factors' shapes and dtypes, the alpha PEFT must use for it, and
    ``make``, which returns (A, B) when the module's turn to be written comes, so writing an adapter
    holds one module's factors at a time."""

    name: str
    shape_A: tuple[int, int]
    shape_B: tuple[int, int]
    dtypes: tuple[torch.dtype, torch.dtype]
    alpha: float
    make: Callable[[], tuple[torch.Tensor, torch.Tensor]]

    @property
    def rank(self) -> int:
        return self.shape_A[0]

    @classmethod
    def of(cls, name: str, A: torch.Tensor, B: torch.Tensor, alpha: float) -> "OutModule":
        """Factors already in memory."""
        return cls(name, tuple(A.shape), tuple(B.shape), (A.dtype, B.dtype), alpha, lambda: (A, B))

    @classmethod
    def from_lora(cls, m: LoraModule, B: torch.Tensor | None = None) -> "OutModule":
        """A read module written as it is (its own alpha), or with ``B`` (same shape; its own dtype)
        in place of its lora_B."""
        make = (lambda: (m.A, m.B)) if B is None else (lambda: (m.A, B))
        dtypes = m.dtypes if B is None else (m.dtypes[0], B.dtype)
        return cls(m.name, (m.rank, m.d_in), (m.d_out, m.rank), dtypes, m.alpha, make)


def _layer_index(name: str, patterns: Any) -> int | None:
    """The layer number in a module's name, as PEFT finds it for ``layers_to_transform``: the first
    number that is a whole dotted part after at least two parts (``model.layers.3.mlp``: 3), or with
    ``layers_pattern`` the number right after the first part it names (``h`` in ``transformer.h.3``)."""
    if not patterns:
        parts = name.split(".")
        return next((int(p) for p in parts[2:-1] if p.isdecimal()), None)
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        found = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name)
        if found:
            return int(found.group(1))
    return None


def untargeted(adapter: LoraAdapter) -> tuple[list[str], list[str]]:
    """The modules whose factors the adapter holds but that PEFT leaves out when it loads the adapter,
    by its config (PEFT's rules: ``exclude_modules``, a name or dotted suffix in a list, a regular
    expression matched whole in a string; ``target_modules`` the same, and ``layers_to_transform``
    (with ``layers_pattern``) keeps a listed ``target_modules``' modules of those layers only;
    ``all-linear`` and a missing or null value are PEFT's to resolve), each module tried as written
    and as transformers names it in memory. Also returns the config keys that left modules out."""
    cfg = adapter.config

    def rule(value: Any) -> Any:
        """``value``'s test of a name, None where it cannot be decided here."""
        if isinstance(value, str):
            try:
                rx = re.compile(value)
            except re.error:
                return None
            return lambda n: rx.fullmatch(n) is not None
        if isinstance(value, (list, tuple)) and value and all(isinstance(t, str) for t in value):
            return lambda n: any(n == t or n.endswith("." + t) for t in value)
        return None

    tm = cfg.get("target_modules")
    targets = None if tm == "all-linear" else rule(tm)
    excluded = rule(cfg.get("exclude_modules"))
    layers = cfg.get("layers_to_transform")
    by_layer = (isinstance(tm, (list, tuple)) and targets is not None and not isinstance(layers, bool)
                and (isinstance(layers, int) or (isinstance(layers, (list, tuple)) and len(layers) > 0)))
    wanted = {layers} if isinstance(layers, int) else set(layers) if by_layer else set()
    missed, why = [], set()
    for m in sorted(adapter.modules, key=natural_key):
        names = dict.fromkeys((m, canonical_name(m)))
        if excluded is not None and any(excluded(n) for n in names):
            missed.append(m)
            why.add("exclude_modules")
        elif targets is not None and not any(targets(n) for n in names):
            missed.append(m)
            why.add("target_modules")
        # (PEFT applies layers_to_transform to suffix matches only: a module listed by its full name is always loaded)
        elif by_layer and not any(n in tm for n in names) and not any(
                _layer_index(n, cfg.get("layers_pattern")) in wanted for n in names):
            missed.append(m)
            why.add("layers_to_transform")
    return missed, [k for k in ("target_modules", "layers_to_transform", "exclude_modules") if k in why]


def unit_alpha(rank: int, use_rslora: bool) -> float:
    """The lora_alpha that makes PEFT's scaling exactly 1 for this rank (x / x == 1.0 in floats)."""
    return math.sqrt(rank) if use_rslora else float(rank)


def alpha_for(scaling: float, rank: int, use_rslora: bool) -> float:
    """The lora_alpha that gives a module of this rank this scaling (``unit_alpha`` for 1)."""
    return scaling * unit_alpha(rank, use_rslora)


def check_default_rank(adapter: LoraAdapter) -> None:
    """An adapter written from this one takes its default scaling, ``lora_alpha / r``: ``r`` must
    be a rank (PEFT loads ``r: 0`` where ``rank_pattern`` names every module, and scores need no
    more)."""
    r = adapter.config.get("r", 8)
    if r < 1:
        raise SafeMergeError(f"{adapter.flag} {adapter.path / CONFIG}: r is {r!r}, but a LoRA rank is at least 1 "
                             "(the written adapter's default scaling is lora_alpha / r); set r to the rank its modules "
                             "have (the largest, where rank_pattern gives others)")


def check_safety_covers(task: LoraAdapter, safety: LoraAdapter, reader: ModelReader, task_label: str,
                        safety_label: str, left_alone: Callable[[str], bool] = lambda module: False) -> None:
    """The safety adapter, on the aligned model that ``reader`` reads, updates every module the task
    adapter does (matched by that model's weights, as ``safemerge merge`` matches them), except those
    ``left_alone`` (modules the merge passes through unscored): a flagged module it lacks would be
    merged as alpha * dW_task alone. One line, as the command's, where it does not."""
    have = {reader.resolve_module(m) or m for m in safety.modules}
    for module in task.modules:
        if (reader.resolve_module(module) or module) not in have and not left_alone(module):
            raise SafeMergeError(
                f"{safety_label} {safety.path}: has no update for module {module}, which {task_label} adapts; "
                "train the safety adapter on the same target modules"
            )


def check_fits(adapter: LoraAdapter, reader: ModelReader, label: str) -> None:
    """Every module the adapter targets is a weight of the model ``reader`` reads, with the factors'
    shape; else one line (``label`` says which input), since a fold would drop the module silently."""
    from safemerge_ext.io.models import config_value, is_conv1d, is_tied_head

    model_type = config_value(reader.path, "model_type")
    for module, m in adapter.modules.items():
        wname = reader.resolve_module(module)
        if wname is None:
            raise SafeMergeError(
                f"{label}: LoRA adapter {adapter.path} targets {module}, which {reader.path} "
                + ("ties to its input embeddings (tie_word_embeddings, no tensor of its own); LoRA on a tied "
                   "lm_head is not supported: train the adapter without lm_head in target_modules"
                   if is_tied_head(module, reader.path) else "does not have; give the model the adapter was trained on")
            )
        d_out, d_in = reader.meta(wname)[0]
        if is_conv1d(model_type, module):  # (stored in x out; PEFT's factors are B A, whatever fan_in_fan_out says:
            d_out, d_in = d_in, d_out      # PEFT sets it per module, and saves the last module's in the config)
        if adapter.config.get("lora_bias") and wname.endswith(".weight") and wname[:-len("weight")] + "bias" not in reader:
            raise SafeMergeError(
                f"{label}: LoRA adapter {adapter.path} has lora_bias: true, but {wname[:-len('.weight')]} of "
                f"{reader.path} has no bias for PEFT to fold the adapter's bias into (PEFT cannot merge it); train "
                "the adapter without lora_bias"
            )
        if m.d_out != d_out or m.d_in != d_in:
            raise SafeMergeError(
                f"{label}: LoRA adapter {adapter.path} module {module} is {m.d_out}x{m.d_in} "
                f"but the weight {wname} is {d_out}x{d_in}; the adapter belongs to another model"
            )


def check_peft_loads_factors(adapter: LoraAdapter, reader: ModelReader, label: str) -> None:
    """For an adapter that PEFT loads and folds into its model (mergekit's ``model+lora``): PEFT
    loads a module's factors only under ``base_model.model.<the module's name in the model>.lora_A.weight``
    (or ``lora_A.default.weight``; lora_B alike), and skips any other name with a warning (an adapter
    saved from the bare LlamaModel, keys without that prefix, another adapter name in them), folding
    that module at its initial values: none (B = 0), or PEFT's random ones (init_lora_weights false),
    which the merge would then take for the task update, with exit 0 (review184). The safemerge
    command reads such an adapter by its weights' names; refuse it here, in one line."""
    from safemerge_ext.io.models import HEADS, base_model_prefix

    # a checkpoint of the base model alone (the Hub's gpt2: h.0..., no transformer.) is loaded with the
    # class's base_model_prefix put before every name but a head's (as transformers names them: a
    # vision-language checkpoint's language_model.model... is model.language_model... already)
    prefix = base_model_prefix(reader.path)
    alone = prefix is not None and not any(module_key(n).startswith(f"{prefix}.") for n in reader.names)

    def loaded_as(wname: str) -> str:
        return f"{prefix}.{wname}" if alone and wname.split(".", 1)[0] not in HEADS else wname

    for name, m in adapter.modules.items():
        ok = {f"{PEFT_PREFIX}{name}.lora_{f}.{tail}" for f in "AB" for tail in ("weight", "default.weight")}
        wname = reader.resolve_module(name)
        wname = loaded_as(wname) if wname is not None else None
        # (module_key: the namings transformers renames on load, as PEFT loads them; a bare model's is none)
        if wname is not None and module_key(wname) != module_key(f"{name}.weight"):
            why = f"the model names that module {wname[: -len('.weight')]}, not {name}"
        elif not set(m.keys) <= ok:
            why = (f"its factor {next(k for k in m.keys if k not in ok)} is not named "
                   f"{PEFT_PREFIX}{name}.lora_A.weight / lora_B.weight")
        else:
            continue
        raise SafeMergeError(
            f"{label}: LoRA adapter {adapter.path}: PEFT loads a module's factors only as "
            f"{PEFT_PREFIX}<the module's name in the model>.lora_A.weight, and {why}, so PEFT would fold that "
            "module at its initial values, not its update; save the adapter with PeftModel.save_pretrained on the "
            "model it is for (AutoModelForCausalLM), or give it to the safemerge command (merge or project), which "
            "reads it as it is")


def _peft_moe_tables(model_type: object) -> tuple[dict[str, str], dict[str, Any]] | None:
    """PEFT's tables for converting a transformers-4 MoE adapter of ``model_type``: each old leaf
    name -> the name it targets instead, and the fusions; both empty where PEFT converts none for it,
    None where this PEFT (or transformers) has no such tables, so nothing can be told."""
    try:
        from peft.utils import transformers_weight_conversion as conversion

        if conversion.get_checkpoint_conversion_mapping(model_type) is None:
            return {}, {}
        base = conversion._MODEL_TO_CONVERSION_PATTERN.get(model_type)
        mapping, fused = conversion._MOE_TARGET_MODULE_MAPPING.get(base) or {}, conversion._MOE_FUSED_TARGETS.get(base)
    except Exception:  # (a PEFT without them; transformers 4, where PEFT converts nothing)
        return None
    return (dict(mapping), dict(fused)) if mapping and fused else ({}, {})  # (it converts only where it knows both)


def peft_moe_names(model_dir: str | os.PathLike, modules: Collection[str], target_modules: object = None,
                   ) -> tuple[dict[str, str], dict[str, str]]:
    """How PEFT with transformers 5 loads an adapter with ``modules`` (named as the model's files name
    them) onto an MoE model, where it converts adapters trained on transformers 4: the modules it
    loads under another name (the one it looks ``rank_pattern``/``alpha_pattern`` up by: the name
    transformers gives their weight on load, ``models.renamed_on_load``, or for a router that keeps its
    name, Qwen3-MoE's ``mlp.gate``, its weight's), and those whose LoRA it loads nowhere, each with
    why. PEFT's conversion works by leaf name, from its own tables (read here, so they follow the
    installed PEFT): it converts none for a model missing there (0.21: Qwen2-MoE itself, Jamba,
    Granite-MoE-Hybrid), so their renamed modules are lost, and it retargets every module with a
    converted leaf name to the experts, so a dense layer's or shared expert's ``gate_proj`` is lost too
    (in a tiny DeepSeek-V3 with no dense layer, the routed experts' LoRAs were lost with them). A regex
    ``target_modules`` (the adapter config's) it matches against the transformers-5 names, probing
    ``experts.w1`` for the fused experts: the modules whose leaf name it reaches no way there are lost
    (``experts\\.\\d+\\.w1`` spells the old path, review167). Dense models: nothing (nor any import)."""
    renamed = renamed_on_load(model_dir, modules)
    model_type = config_value(model_dir, "model_type")
    if not renamed and experts_count(model_dir) is None:
        return renamed, {}
    tables = _peft_moe_tables(model_type)
    if tables is None:
        return renamed, {}
    mapping, _ = tables
    lost = {m: f"transformers renames that module's weight on load (to {new}) and PEFT converts no adapter for it "
               f"in this model ({model_type})"
            for m, new in renamed.items() if m.rsplit(".", 1)[-1] not in mapping}
    for m in modules:
        leaf = m.rsplit(".", 1)[-1]
        if m in renamed or leaf not in mapping or canonical_name(m) != m:
            continue
        if mapping[leaf] == f"{leaf}.weight":  # (a router PEFT wraps as a parameter, its name unchanged)
            renamed[m] = f"{m}.weight"
        else:
            lost[m] = (f"PEFT retargets every {leaf} LoRA to the experts' fused {mapping[leaf]}, which this "
                       "module (no routed expert's) is not part of")
    if isinstance(target_modules, str) and target_modules.lower() != "all-linear" and mapping:
        try:
            regex = re.compile(target_modules)
        except re.error:  # (PEFT's load fails on it, and says so)
            regex = None
        reached = set()  # (the leaf names PEFT resolves the regex to, as its conversion does)
        for m in modules if regex is not None else ():
            leaf = m.rsplit(".", 1)[-1]
            container, _, param = renamed.get(m, f"{m}.weight").rpartition(".")
            keys = [k for k in (container, f"{container}.{param}") if k.rsplit(".", 1)[-1] == leaf]
            keys += [f"{container}.{leaf}"] if param == mapping.get(leaf) else []
            if any(regex.fullmatch(k) for k in keys):
                reached.add(leaf)
        for m, new in renamed.items():
            leaf = m.rsplit(".", 1)[-1]
            if regex is not None and m not in lost and leaf in mapping and leaf not in reached:
                lost[m] = (f"the adapter's target_modules regex {target_modules!r}, which PEFT matches against the "
                           f"transformers-5 names ({new}), reaches no {leaf} there")
    return renamed, dict(sorted(lost.items(), key=lambda kv: natural_key(kv[0])))


def fused_leaves(renamed: dict[str, str]) -> dict[str, list[str]]:
    """Each name PEFT loads modules under (``renamed``: module -> that name) -> the leaf names of the
    modules it stacks there, in order: two where each layer's experts fuse a pair (w1 and w3)."""
    leaves: dict[str, list[str]] = {}
    for name, new in renamed.items():
        group = leaves.setdefault(new, [])
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in group:
            group.append(leaf)
    return leaves


def check_fold_keeps_scalings(adapter: LoraAdapter, model_dir: str | os.PathLike, label: str) -> None:
    """For an adapter that PEFT folds into its model (mergekit's ``model+lora``, ``safemerge eval``'s
    ``model+adapter``): PEFT with
    transformers 5 folds a transformers-4 MoE adapter's router and experts (see
    ``models.renamed_on_load``) under their new names (``mlp.gate.weight``, ``experts.gate_up_proj``,
    ``experts.down_proj``), each layer's experts stacked, w1 and w3 fused with ``.*\\.gate_up_proj``
    patterns of twice ``r`` and ``lora_alpha`` added after the adapter's own; it looks
    ``rank_pattern``/``alpha_pattern`` up by those names. Refuse, in one line, an adapter for which
    that gives such a module another rank or scaling than it was trained with (an alpha_pattern
    written for ``w2``: folded at the default; under rsLoRA the fused pair scaled by sqrt(2)): its
    fold would not be the model it was trained to be (review162, review163)."""
    renamed, lost = peft_moe_names(model_dir, adapter.modules, adapter.config.get("target_modules"))
    if lost:
        first = next(iter(lost))
        raise SafeMergeError(
            f"{label}: LoRA adapter {adapter.path}: PEFT with transformers 5 folds nothing of its transformers-4 MoE "
            f"module {first}{f' (nor {len(lost) - 1} more)' if len(lost) > 1 else ''}: {lost[first]}; so the "
            "model PEFT folds from it lacks its update; the safemerge command (merge or project, with --output model) "
            "reads the adapter as trained and applies it")
    if not renamed:
        return
    r, alpha, rank_pattern, alpha_pattern = _ranks_and_alphas(adapter.config, f"{label}: {adapter.path / CONFIG}")
    leaves = fused_leaves(renamed)
    for name in sorted(renamed, key=natural_key):
        m, new = adapter.modules[name], renamed[name]
        fused = leaves[new]
        ranks, alphas = dict(rank_pattern), dict(alpha_pattern)
        if len(fused) > 1:  # (as PEFT's conversion adds them: after the adapter's own, first match wins)
            key = rf".*\.{re.escape(new.rsplit('.', 1)[-1])}"
            ranks[key], alphas[key] = r * len(fused), alpha * len(fused)
        rk, ak = pattern_key(ranks, new), pattern_key(alphas, new)
        rank = int(ranks[rk]) if rk is not None else r
        got = (float(alphas[ak]) if ak is not None else alpha) / unit_alpha(rank, adapter.use_rslora)
        siblings = [adapter.modules.get(name[: -len(name.rsplit(".", 1)[-1])] + leaf) for leaf in fused]
        want_rank = sum(s.rank for s in siblings if s is not None)
        if rank != want_rank or not math.isclose(got, m.scaling, rel_tol=1e-9, abs_tol=0.0):
            part = f"as part of {new}" if len(fused) > 1 else f"as {new}"
            raise SafeMergeError(
                f"{label}: LoRA adapter {adapter.path}: PEFT with transformers 5 folds its {name} (a "
                f"transformers-4 MoE module) {part} at rank {rank} and scaling {got:.4g}, but the adapter gives it "
                f"{'rank ' + str(want_rank) + ' and ' if rank != want_rank else ''}scaling {m.scaling:.4g} "
                "(its r, lora_alpha, rank_pattern, alpha_pattern and use_rslora), so the model PEFT folds from it "
                "is not the one trained; the safemerge command (merge or project, with --output model) reads the "
                "adapter as trained and takes it as it is")


def global_scaling(config: dict[str, Any]) -> float:
    """The scaling of the config's default ``r`` and ``lora_alpha`` (PEFT's defaults: 8 and 8):
    the one scaling that vLLM applies to every module, since it reads neither pattern."""
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    return alpha / (math.sqrt(r) if config.get("use_rslora", False) else r)


def at_rank(m: OutModule, rank: int, alpha: float, use_rslora: bool, stacked: bool = True) -> OutModule:
    """``m`` as a module of ``rank`` (at least its own) and ``alpha`` (not 0): the same update, its
    A padded with zero rows and its B with zero columns, B rescaled from ``m``'s scaling to theirs (in
    fp32 at least, as a merge writes its factors, where the scalings differ). float8 factors become
    fp32 where they change, and where PEFT stacks the module with others (``stacked``, MoE experts):
    torch does not promote float8."""
    factor = (m.alpha / unit_alpha(m.rank, use_rslora)) / (alpha / unit_alpha(rank, use_rslora))
    same = math.isclose(factor, 1.0, rel_tol=1e-12, abs_tol=0.0)
    f8 = any(d.is_floating_point and d.itemsize == 1 for d in m.dtypes)
    if rank == m.rank and same and not (f8 and stacked):
        return replace(m, alpha=alpha)
    dtype_A = torch.float32 if f8 else m.dtypes[0]
    dtype_B = m.dtypes[1] if same and not f8 else torch.float64 if m.dtypes[1] == torch.float64 else torch.float32

    def make() -> tuple[torch.Tensor, torch.Tensor]:
        A, B = m.make()
        A = A.to(dtype_A)
        B = B.to(dtype_B)
        if not same:
            B = B * factor
            if not bool(torch.isfinite(B).all()):
                raise SafeMergeError(
                    f"module {m.name}: its lora_B overflows {dtype_B} (Inf) when written at the adapter's default "
                    f"scaling (x{factor:.3g}, which PEFT needs for it); check lora_alpha and "
                    "alpha_pattern of the input adapters; nothing was written")
        return (torch.cat([A, A.new_zeros(rank - m.rank, A.shape[1])]),
                torch.cat([B, B.new_zeros(B.shape[0], rank - m.rank)], dim=1))

    return OutModule(m.name, (rank, m.shape_A[1]), (m.shape_B[0], rank), (dtype_A, dtype_B), alpha, make)


ADAPTER_RANKS = ("uniform", "per-module")


def _module_key(name: str, others: Collection[str]) -> str:
    """A ``rank_pattern``/``alpha_pattern`` key that PEFT matches (``(.*\\.)?key$``) to this module
    alone, under either naming transformers may load it by (``models.namings``), whatever the keys'
    order (PEFT takes the first that matches, and sorts them when it saves a config): a naming that
    another of its own ends with is dropped, as the match takes such suffixes anyway, unless one of
    ``others`` (the other modules' namings) ends with it too; then each naming must match whole
    (``\\A``)."""
    forms = namings(name)
    if any(o.endswith("." + f) for o in others for f in forms):
        return "|".join(r"\A" + re.escape(f) for f in forms)
    kept = [f for f in forms if not any(g != f and f.endswith("." + g) for g in forms)]
    return "|".join(re.escape(f) for f in kept)


def _per_module_patterns(modules: list[OutModule], scaling: float, rslora: bool) -> tuple[int, dict, dict]:
    """The default rank (the most common; the smaller on a tie) and the patterns that give every other
    module its own rank at ``scaling``; checked as PEFT matches them, under every naming of every
    module: its own key matches it and no other does."""
    counts: dict[int, int] = {}
    for m in modules:
        counts[m.rank] = counts.get(m.rank, 0) + 1
    r_default = min(counts, key=lambda r: (-counts[r], r))
    names = {m.name: namings(m.name) for m in modules}
    every = [n for forms in names.values() for n in forms]
    own = {m.name: _module_key(m.name, [n for n in every if n not in names[m.name]])
           for m in modules if m.rank != r_default}
    ranks = {own[m.name]: m.rank for m in sorted(modules, key=lambda m: natural_key(m.name)) if m.name in own}
    for m in modules:
        for name in names[m.name]:
            hits = [k for k in ranks if pattern_key([k], name) is not None]
            if hits != ([own[m.name]] if m.name in own else []):
                raise SafeMergeError(
                    f"--adapter-ranks per-module: the rank_pattern key of module {m.name} is not the only one that "
                    f"PEFT matches to it ({', '.join(map(repr, hits)) or 'none'}); nothing was written; write the "
                    "adapter with one rank for every module (--adapter-ranks uniform, the default)")
    return r_default, ranks, {k: alpha_for(scaling, r, rslora) for k, r in ranks.items()}


def check_per_module(renamed: Collection[str]) -> None:
    """An adapter with per-module ranks is refused where PEFT loads modules (``renamed``, from
    ``peft_moe_names``) under other names, which its patterns would not reach."""
    if renamed:
        first = sorted(renamed, key=natural_key)[0]
        raise SafeMergeError(
            f"--adapter-ranks per-module: PEFT with transformers 5 loads this transformers-4 MoE adapter's router and "
            f"expert modules (first: {first}) under other names, each layer's experts stacked into one LoRA of one "
            "rank, where per-module patterns do not reach; nothing was written; use --adapter-ranks uniform (the "
            "default)")


def write_adapter(out_dir: str | os.PathLike, template: dict[str, Any], modules: list[OutModule],
                  stacked: Collection[str] = (), ranks: str = "uniform") -> None:
    """Write a PEFT adapter (``template``: the task adapter's config) whose modules all have one
    scaling, the template's default (:func:`global_scaling`), each module's B rescaled where its own
    scaling differs (:func:`at_rank`; the same update). With ``ranks="uniform"`` every module has one
    rank, the largest, its factors padded with zeros, and no patterns: every loader then reads it as
    PEFT does: vLLM reads only ``r`` and ``lora_alpha``, llama.cpp (and Ollama) scale each tensor by
    ``lora_alpha`` over its own rank, TGI and LoRAX stack a module's factors across layers (a merge's
    flagged layers, of rank r_task + r_safety, among the others mis-scaled or failed there,
    review169), and PEFT stacks an MoE layer's experts (the modules named in ``stacked``:
    ``models.renamed_on_load``), which must share one rank. With ``ranks="per-module"`` each module
    keeps its own rank through ``rank_pattern``/``alpha_pattern`` (SPEC §1): a smaller file that PEFT
    (and transformers' ``load_adapter``) reads, those other loaders not."""
    if ranks not in ADAPTER_RANKS:
        raise ValueError(f"ranks must be one of {', '.join(ADAPTER_RANKS)}; got {ranks!r}")
    if ranks == "per-module":
        check_per_module(stacked)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(template)
    config["peft_type"] = "LORA"  # (as PEFT spells it: it reads no other case, which the input may have)
    # the factors are loaded over whatever PEFT initializes; an init scheme here could only refuse
    # the new ranks (orthogonal init needs an even rank, and a merge writes r_task + r_safety)
    config["init_lora_weights"] = True
    rslora = bool(template.get("use_rslora", False))
    # (a lora_alpha of 0 would drop every update: the modules keep theirs at scaling 1)
    scaling = global_scaling(template) or 1.0
    # (the template's own patterns would give some modules other ranks or scalings than written)
    config["rank_pattern"], config["alpha_pattern"] = {}, {}
    if modules and ranks == "per-module":
        r_default, config["rank_pattern"], config["alpha_pattern"] = _per_module_patterns(modules, scaling, rslora)
        config["r"], config["lora_alpha"] = r_default, alpha_for(scaling, r_default, rslora)
        modules = [at_rank(m, m.rank, alpha_for(scaling, m.rank, rslora), rslora, False) for m in modules]
    elif modules:
        r_max = max(m.rank for m in modules)
        config["r"], config["lora_alpha"] = r_max, alpha_for(scaling, r_max, rslora)
        modules = [at_rank(m, r_max, config["lora_alpha"], rslora, m.name in stacked) for m in modules]
    layout = []
    for m in modules:
        layout.append((f"{PEFT_PREFIX}{m.name}.lora_A.weight", m.shape_A, m.dtypes[0]))
        layout.append((f"{PEFT_PREFIX}{m.name}.lora_B.weight", m.shape_B, m.dtypes[1]))
    with StreamingWriter(out / WEIGHTS, layout) as w:
        for m, (a_name, _, _), (b_name, _, _) in zip(modules, layout[0::2], layout[1::2]):
            A, B = m.make()
            w.write(a_name, A)
            w.write(b_name, B)
            del A, B
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
