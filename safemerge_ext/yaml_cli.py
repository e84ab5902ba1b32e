"""``safemerge-yaml RECIPE OUT [any mergekit-yaml option]``: mergekit-yaml with the plugin loaded.

Unlike plain ``mergekit-yaml`` it registers the methods explicitly (no autoload needed), checks the
recipe before any weight is read (method, roles, paths, tensor shapes from safetensors headers,
parameter ranges), merges into a temporary folder beside OUT and renames it only when the merge
completed, then writes ``safemerge_report.json`` / ``.png`` into OUT and prints the summary table.
Every bad input is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import click
import yaml
from mergekit.common import ModelPath
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options
from pydantic import BaseModel

from safemerge_ext._faults import bus_error_line, explain_bus_errors
from safemerge_ext._signals import exit_code, interrupts_held, say, sigterm_as_interrupt, what_ended
from safemerge_ext.backends import requested_precision
from safemerge_ext.errors import SafeMergeError, blank_path, not_a_folder, symlink_loop
from safemerge_ext.io.model_writer import untie_stored_head
from safemerge_ext.io.places import identity, within
from safemerge_ext.io.output import (check_links_lead, check_not_input, check_out, check_parent, committed,
                                     let_go, scratch_dir, staged_dir, umask_modes, write_files)
from safemerge_ext.mergekit_methods import METHOD_NAMES, ROLES, check_device, passed_through, register_methods
from safemerge_ext.mergekit_run import discard_report, finalize_report, refusal, report_files
from safemerge_ext.report import REPORT_JSON, PlotUnavailable, json_writer, plot_writer, summary_table

# what mergekit's dtype / out_dtype take for a merge (mergekit.common.dtype_from_name also takes int64)
DTYPES = ("bfloat16", "float16", "float32", "float64")


@dataclass(frozen=True)
class Checked:
    """A validated recipe: the mergekit config and what the checks learned."""

    config: MergeConfiguration
    method: str
    roles: dict[str, str]  # role -> model reference as written
    has_lora: bool
    tensors_checked: int  # 2-D weights checked in every input (the ones a method may score)
    inputs: tuple[tuple[str, Path], ...] = ()  # (label, folder) of every model and adapter read


def _ref_str(ref: Any) -> str:
    return str(ref)


def _same_model_key(ref: Any) -> tuple:
    """What makes two model references one input: the model's and LoRA's folders (resolved: ./a and
    a/ are one), and their revisions."""
    def where(path: Any) -> tuple | None:
        return None if path is None else (identity(path.path), path.revision)
    return where(ref.model), where(ref.lora), ref.override_architecture


def _is_condition(setting: Any) -> bool:
    """A ``{filter, value}`` condition, as YAML gives it or as mergekit parsed it."""
    return isinstance(setting, dict) or hasattr(setting, "filter")


def _condition_value(setting: Any) -> Any:
    return setting.get("value") if isinstance(setting, dict) else setting.value


def _setting_values(setting: Any) -> list[Any]:
    """Every value a mergekit parameter setting can take: a scalar, a gradient list, or
    ``{filter, value}`` conditions (one, or a list of them)."""
    if _is_condition(setting):
        return _setting_values(_condition_value(setting))
    if isinstance(setting, list):
        return [v for item in setting for v in _setting_values(item)]
    return [setting]


def _gradients(setting: Any) -> list[list[Any]]:
    """The gradients in a setting: lists of two or more plain numbers, which mergekit interpolates
    layer by layer, given directly or as the value of a ``{filter, value}`` condition (a list of
    conditions is no gradient: each layer takes one condition's value)."""
    if _is_condition(setting):
        return _gradients(_condition_value(setting))
    if isinstance(setting, list):
        if len(setting) > 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            return [setting]
        return [g for item in setting for g in _gradients(item)]
    return []


def _specs(method: str) -> dict[str, Any]:
    """The method's shared parameters as mergekit declares them (name -> ParameterSpec)."""
    from mergekit.merge_methods import registry

    return {p.name: p for p in registry.get(method).spec.parameters if p.name != "role"}


def _check_parameters(method: str, params: dict[str, Any], where: str, *, on_model: bool = False) -> None:
    """Names and values of a parameters table, checked with mergekit's own validators (so a value
    passes here exactly when mergekit takes it), with one-line messages."""
    from pydantic import ValidationError

    specs = _specs(method)
    for name, setting in (params or {}).items():
        if name == "role":  # (which roles the models have between them is check_roles'; a value is checked here)
            if not isinstance(setting, str) or setting not in ROLES[method]:
                raise SafeMergeError(f"{where}: role {setting!r}; {method} takes the roles {', '.join(ROLES[method])}")
            continue
        if name not in specs:
            raise SafeMergeError(f"{where}: unknown parameter {name!r} for {method}; known: role, {', '.join(specs)}")
        if on_model:
            raise SafeMergeError(
                f"{where}: {name} is a setting of the whole merge, which mergekit does not read from a model; "
                + ("move it to the recipe's top-level parameters:" if name == "report_path"
                   else "move it to the recipe's (or the slice's) parameters:")
            )
        values = _setting_values(setting)
        if not values:  # (mergekit reads an empty list as "not given" and uses the default)
            raise SafeMergeError(f"{where}: {name} is an empty list; give a value, or a gradient of two or more")
        for gradient in _gradients(setting):
            # mergekit interpolates between its values layer by layer, so those in between must
            # pass too (an integer setting takes none; a point at an irrational fraction of the way
            # is whole only where the two ends are equal)
            for lo, hi in zip(gradient, gradient[1:]):
                between = lo + (hi - lo) / math.pi
                try:
                    specs[name].validate(between)
                except ValidationError:
                    raise SafeMergeError(
                        f"{where}: {name} takes one value, not a gradient {gradient!r} (mergekit would interpolate "
                        f"values such as {between:.4g} between the layers); give a single {name}"
                    ) from None
        for v in values:
            try:
                specs[name].validate(v)
            except ValidationError as exc:
                first = exc.errors()[0]
                if first.get("type") == "value_error" and "error" in first.get("ctx", {}):
                    msg = str(first["ctx"]["error"])  # (the parameter's own check: for a choice, with any hint)
                else:
                    msg = f"{name}: {first.get('msg', 'invalid value')}; got {v!r}"
                raise SafeMergeError(f"{where}: {msg}") from None


def _groups(config: MergeConfiguration) -> list[tuple[str, Any, list[tuple[Any, dict[str, Any]]], dict[str, Any]]]:
    """(label, base model, [(model reference, its parameters)], the group's own parameters) for
    every set of inputs merged together."""
    if config.models:
        return [("models", config.base_model, [(m.model, dict(m.parameters or {})) for m in config.models], {})]
    out = []

    def slices(label: str, items: Any) -> None:
        for i, sl in enumerate(items or []):
            out.append((f"{label}slices[{i}]", getattr(sl, "base_model", None) or config.base_model,
                        [(src.model, dict(src.parameters or {})) for src in sl.sources], dict(sl.parameters or {})))

    slices("", config.slices)
    for mname, mod in (config.modules or {}).items():
        slices(f"modules.{mname}.", mod.slices)
        if mod.models:
            out.append((f"modules.{mname}.models", config.base_model,
                        [(m.model, dict(m.parameters or {})) for m in mod.models], dict(mod.parameters or {})))
    return out


def check_parameter_names(config: MergeConfiguration, method: str, recipe: str | os.PathLike) -> None:
    """Every parameter a recipe gives, at the top, on a slice or a module, or on a model, checked by
    name and value as safemerge-yaml does. For plain ``mergekit-yaml``, whose resolver drops the
    names a method does not declare: a misspelt ``threshold`` would merge at the default one."""
    _check_parameters(method, dict(config.parameters or {}), f"{recipe}: parameters")
    _check_module_parameters(config, method, recipe)
    for label, _base, inputs, own in _groups(config):
        _check_parameters(method, own, f"{recipe}: {label}: parameters")
        _check_run_settings(own, f"{recipe}: {label}")
        for ref, params in inputs:
            _check_parameters(method, params, f"{recipe}: {label}: model {ref}", on_model=True)


def _check_module_parameters(config: MergeConfiguration, method: str, recipe: str | os.PathLike) -> None:
    """A module's own parameters (mergekit reads them for its slices too)."""
    for mname, mod in (config.modules or {}).items():
        _check_parameters(method, dict(mod.parameters or {}), f"{recipe}: modules.{mname}: parameters")
        _check_run_settings(dict(mod.parameters or {}), f"{recipe}: modules.{mname}")


def _check_run_settings(own: dict[str, Any], label: str) -> None:
    """A slice's or module's parameters hold no ``report_path``: mergekit would rank it above the
    recipe's, so part of the report would go there, and a run's report is of the whole run."""
    if "report_path" in own:
        raise SafeMergeError(f"{label}: parameters: report_path is a setting of the whole run; "
                             "move it to the recipe's top-level parameters:")


def _base_model(config: MergeConfiguration, recipe: str | os.PathLike = "recipe") -> Any:
    """The aligned model: the recipe's base_model, or the one every slice names."""
    bases = {str(base): base for _, base, _, _ in _groups(config)} or {str(config.base_model): config.base_model}
    if "None" in bases:
        raise SafeMergeError(f"{recipe}: base_model is missing; set it to the aligned model (e.g. the chat model)")
    if len(bases) != 1:
        raise SafeMergeError(f"{recipe}: the slices name different base models ({', '.join(sorted(bases))}); "
                             "SafeMERGE needs one aligned model")
    return next(iter(bases.values()))


def check_roles(method: str, config: MergeConfiguration, recipe: str | os.PathLike = "recipe") -> dict[str, str]:
    """Each role given to exactly one model, never to the base model, and no two roles to one model
    however its path is spelt (mergekit's own check compares the spellings); returns role -> model."""
    roles: dict[str, str] = {}
    groups = _groups(config)
    if not groups:
        raise SafeMergeError(f"{recipe}: no models; list the {', '.join(ROLES[method])} models under models:")
    for group_label, base, inputs, own in groups:
        label = f"{recipe}: {group_label}"  # (every line below names the recipe file, as its siblings do)
        _check_parameters(method, own, f"{label}: parameters")
        _check_run_settings(own, label)
        found: dict[str, list[str]] = {}
        same: dict[tuple, tuple[Any, str | None]] = {_same_model_key(base): (base, None)} if base is not None else {}
        # (as mergekit reads a parameter: the model's own, else its slice's, its module's, the recipe's)
        module = (config.modules or {}).get(group_label.split(".")[1]) if group_label.startswith("modules.") else None
        chain = [own, dict(module.parameters or {}) if module is not None else {}, dict(config.parameters or {})]
        default = next((c["role"] for c in chain if "role" in c), None)
        for ref, params in inputs:
            role = params.get("role", default if ref != base else None)
            if ref == base:
                if role is not None:
                    raise SafeMergeError(
                        f"{label}: {ref} is the base_model (the aligned model) and must not have a role; got role {role!r}"
                    )
                _check_parameters(method, params, f"{label}: base_model {ref}", on_model=True)
                continue
            if role is None:
                raise SafeMergeError(
                    f"{label}: model {ref} has no role; add parameters: {{role: {'|'.join(ROLES[method])}}}"
                )
            if not isinstance(role, (str, int, float, bool)):  # (a gradient or a list of {filter, value})
                raise SafeMergeError(
                    f"{label}: model {ref}: role must be one value for the whole model, not a list or a filter; "
                    f"give one of {', '.join(ROLES[method])}"
                )
            if not isinstance(role, str) or role not in ROLES[method]:
                raise SafeMergeError(
                    f"{label}: model {ref} has role {role!r}; {method} takes the roles {', '.join(ROLES[method])}"
                )
            key = _same_model_key(ref)
            if key in same:  # (mergekit refuses it too, "Duplicate merge inputs", but after folding every LoRA)
                first, first_role = same[key]
                raise SafeMergeError(
                    f"{label}: models {first} ({'the base_model' if first_role is None else 'role ' + first_role}) "
                    f"and {ref} (role {role}) are the same model"
                    + (", so a flagged layer would get the task update back, with no safety in it"
                       if {first_role, role} == {"task", "safety"} else "")
                    + "; give each role its own model")
            same[key] = (ref, role)
            found.setdefault(role, []).append(_ref_str(ref))
            _check_parameters(method, params, f"{label}: model {ref}", on_model=True)
        if "slices[" in group_label and not any(ref == base for ref, _ in inputs):  # (mergekit adds it to models: only)
            raise SafeMergeError(f"{label}: the base_model {base} (the aligned model) is not one of the slice's "
                                 "sources; add it as a source with the same layer_range")
        for r in ROLES[method]:
            got = found.get(r, [])
            if len(got) != 1:
                raise SafeMergeError(
                    f"{label}: role {r!r} must be given to exactly one model; "
                    + (f"it is given to {len(got)}: {', '.join(got)}" if got else "no model has it")
                )
            roles[r] = got[0]
    return roles


def _expand_home(value: Any) -> Any:
    """``value`` (a parsed recipe, or a part of it) with each model and LoRA path that starts with
    ``~`` expanded, as the report_path and the rest of safemerge-yaml read paths: mergekit takes it
    as written (a folder named "~", else a Hub id). Parts with nothing to expand are kept as they are."""
    if isinstance(value, ModelPath):
        home = os.path.expanduser(value.path)
        return value if home == value.path else value.model_copy(update={"path": home})
    if isinstance(value, BaseModel):
        changed = {name: new for name in type(value).model_fields
                   if (new := _expand_home(old := getattr(value, name))) is not old}
        return value.model_copy(update=changed) if changed else value
    if isinstance(value, (list, tuple)):
        items = [_expand_home(v) for v in value]
        return value if all(a is b for a, b in zip(items, value)) else type(value)(items)
    if isinstance(value, dict):
        items = {k: _expand_home(v) for k, v in value.items()}
        return value if all(items[k] is v for k, v in value.items()) else items
    return value


def _local_dir(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_absolute():
        p = Path.cwd() / p
    if not p.is_dir():
        raise not_a_folder(what, path, "a local Hugging Face folder: safemerge-yaml reads those only (relative "
                                       f"paths are relative to the working directory {Path.cwd()})")
    return p


def _check_models(config: MergeConfiguration, roles: dict[str, str], truncate_embeddings: bool = False,
                  method: str = "safemerge", recipe: str | os.PathLike = "recipe",
                  ) -> tuple[bool, int, tuple[tuple[str, Path], ...]]:
    """Paths exist; every tensor of the aligned model is in every input with the same shape (a
    resized vocabulary only with the recipe's tokenizer settings), 2-D weights in the same dtype in
    the unaligned one (headers only)."""
    from safemerge_ext.io.adapters import (check_fits, check_fold_keeps_scalings, check_peft_loads_factors,
                                           check_safety_covers, read_adapter)
    from safemerge_ext.io.models import ModelReader

    by_str = {str(r): r for _, _, inputs, _ in _groups(config) for r, _ in inputs}
    refs = [("base_model (aligned)", _base_model(config))] + [(f"role {r}", by_str[s]) for r, s in roles.items()]
    readers, adapters, has_lora = [], [], False
    try:  # (headers only: every file is closed as the check ends, a refusal too, whose traceback keeps them)
        for label, ref in refs:
            path = _local_dir(ref.model.path, f"{label}: model")
            readers.append((label, ref, ModelReader(path, flag=f"{label}: model")))
            if ref.lora is not None:
                has_lora = True
                lpath = _local_dir(ref.lora.path, f"{label}: LoRA adapter")
                adapters.append((label, ref, read_adapter(lpath, flag=f"{label}: LoRA adapter", folded=True)))
        base_label, _, base = readers[0]
        base_config = _transformers_config(base.path)
        if has_lora and base_config is not None:
            _check_lora_architecture(base_config, method, recipe)
        vocab = _vocab_size(base.path)
        # (mergekit's tokenizer settings align the embedding rows; --unsafe-truncate-embeddings cuts them)
        aligns_vocab = config.tokenizer is not None or config.tokenizer_source is not None or truncate_embeddings
        planned = _planned_names(base_config) if base_config is not None else set()
        arch = _architecture(config)
        if arch is not None:
            check_plan_covers(arch, base.names, base.path, recipe, base_config)
        checked = 0
        for name in base.names:
            shape, dtype = base.meta(name)
            if len(shape) != 2 and name not in planned:  # (a buffer such as rotary_emb.inv_freq: not merged)
                continue
            for label, ref, reader in readers[1:]:
                if name not in reader:
                    raise SafeMergeError(
                        f"tensor {name} is in the aligned model but missing from {label} ({ref.model.path}); "
                        "all models must share one architecture"
                    )
                other, other_dtype = reader.meta(name)
                if len(shape) == 2 and label == "role unaligned" and other_dtype != dtype:  # as the CLI: V = W_a - W_u
                    raise SafeMergeError(                                  # must not carry one model's rounding alone
                        f"tensor {name} is {dtype} in the aligned model but {other_dtype} in {label} "
                        f"({ref.model.path}): save both models in one dtype so their difference is meaningful"
                    )
                differ = [a for a, b in zip(shape, other) if a != b]
                if differ and vocab is not None and len(other) == len(shape) == 2 and all(a == vocab for a in differ):
                    if aligns_vocab:
                        continue  # a vocabulary table with added tokens: mergekit's tokenizer settings align it
                    raise SafeMergeError(
                        f"tensor {name} has {other[0]} rows in {label} ({ref.model.path}) but {shape[0]} in the "
                        "aligned model (a resized vocabulary): add tokenizer: {source: base} (or union) to the recipe, so "
                        "mergekit aligns the embedding rows"
                    )
                if tuple(other) != tuple(shape):
                    raise SafeMergeError(
                        f"tensor {name} has shape {tuple(shape)} in the aligned model but {tuple(other)} in {label} "
                        f"({ref.model.path}): the models must share one architecture"
                    )
            checked += len(shape) == 2
        for label, ref, adapter in adapters:
            reader = next(r for lbl, _, r in readers if lbl == label)
            check_fits(adapter, reader, label)
            check_peft_loads_factors(adapter, reader, label)
            check_fold_keeps_scalings(adapter, reader.path, label)
        lora = {label: (ref, adapter) for label, ref, adapter in adapters}
        # (a safety model of its own changes what its LoRA lacks: the run's warning names what it leaves)
        if method == "safemerge" and "role task" in lora and "role safety" in lora \
                and Path(lora["role safety"][0].model.path).resolve() == Path(base.path).resolve():
            check_safety_covers(lora["role task"][1], lora["role safety"][1], base, "role task: LoRA adapter",
                                "role safety: LoRA adapter", passed_through(base))
        inputs = tuple((f"{label} model", r.path) for label, _, r in readers) + tuple(
            (f"{label} LoRA adapter", a.path) for label, _, a in adapters)
        return has_lora, checked, inputs
    finally:
        for _, _, opened in readers + adapters:
            opened.close()


def _transformers_config(model_dir: str | os.PathLike) -> Any:
    """transformers' config of a model folder; None where transformers cannot read it (custom code:
    left to mergekit)."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(model_dir))
    except Exception:
        return None


def _check_lora_architecture(config: Any, method: str, recipe: str | os.PathLike) -> None:
    """mergekit infers the layout of a model it has no architecture definition for from every input's
    files, and (0.1.5) fails on a ``model+lora`` input there with "LoRA not merged"; say what to do.
    ``config``: the aligned model's (transformers')."""
    from mergekit.architecture import arch_info_for_config

    try:
        known = arch_info_for_config(config) is not None
    except Exception:  # (custom code, no or several architectures: left to mergekit)
        return
    if not known:
        arch = ", ".join(getattr(config, "architectures", None) or [config.model_type])
        cli = {"safemerge": "safemerge merge --output model", "safelora": "safemerge project --output model"}.get(method)
        raise SafeMergeError(
            f"{recipe}: mergekit has no architecture definition for {arch} (the aligned model), and cannot take "
            "model+lora inputs for it; fold each LoRA into its model first (PEFT: merge_and_unload, save_pretrained) "
            "and give those folders" + (f", or use `{cli}`, which takes the adapters as they are" if cli else "")
        )


def _planned_names(cfg: Any) -> set[str]:
    """The tensors mergekit's architecture definition for the model of this (transformers') config
    requires in every input (names and aliases; empty where mergekit has no definition, and then
    infers one from the tensors)."""
    try:
        from mergekit.architecture import arch_info_for_config

        arch = arch_info_for_config(cfg)
        weights = arch.all_weights(cfg) if arch is not None else []
    except Exception:  # (a config transformers cannot read: mergekit will say so itself)
        return set()
    return {n for w in weights if not w.optional for n in (w.name, *(w.aliases or ()))}


def _architecture(config: MergeConfiguration) -> Any:
    """mergekit's architecture for the merge (headers and configs only); None where it cannot make one
    (mixed architectures, custom code: mergekit says so when it runs)."""
    from mergekit.architecture import get_architecture_info
    from mergekit.options import MergeOptions

    try:
        return get_architecture_info(config, MergeOptions())
    except Exception:
        return None


def transformers_class(config: Any) -> Any:
    """The transformers class its ``architectures`` name (the first one transformers has), or None."""
    import transformers

    names = getattr(config, "architectures", None) or []
    return next((c for c in (getattr(transformers, a, None) for a in names) if isinstance(c, type)), None)


# buffers that transformers 4's GPT-2 (and others of its family) saved and listed as ignored on load; transformers
# 5's classes no longer list them, and .bin fine-tunes of that time carry them: never merged, never loaded
_LEGACY_BUFFERS = (r"\.attn\.masked_bias$", r"\.attention\.masked_bias$")


def check_plan_covers(arch: Any, names: Sequence[str], model_dir: str | os.PathLike, where: str | os.PathLike,
                      cfg: Any = None) -> None:
    """Refuse, before anything loads, where mergekit's architecture for the merge (its JSON definition,
    or the one it infers from the files) has no entry for some of the aligned model's tensors: its plan
    has no task for them, and it writes the merged model without them, with no word (the biases of a
    Llama checkpoint with attention_bias, which llama.json does not list; a LLaVA checkpoint's whole
    language model, which the inferred layout names as transformers does in memory). A tensor counts as
    planned by its name, an alias or tied name, or the name transformers' conversion of the checkpoint
    gives it (fused MoE experts). ``names``: the tensors the aligned model's folder ``model_dir``
    stores; ``cfg``: its transformers config, where read already."""
    from safemerge_ext.io.models import renamings

    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        cfg = cfg if cfg is not None else _transformers_config(model_dir)
        weights = arch.all_weights(cfg)
        transforms = get_checkpoint_conversion_mapping(cfg.model_type) or []
    except Exception:  # (a config transformers cannot read, custom code: left to mergekit)
        return
    stored = set(names)

    def kept(w: Any) -> bool:  # (mergekit plans an optional weight only where the files hold one of its names:
        return not w.optional or any(n in stored for n in (w.name, *(w.aliases or ())))  # not a converted one)

    planned = {n for w in weights if kept(w) for n in (w.name, *(w.aliases or ()), *(w.tied_names or ()))}

    def in_plan(name: str) -> bool:  # (as mergekit loads it: by any name the conversion gives it on the way)
        return any(n in planned for n in renamings(transforms, name))

    # (buffers: rotary inv_freq, and what older checkpoints saved and transformers ignores on load, as the model
    # class lists it: GPT-2's h.N.attn.bias causal masks in openai-community/gpt2; never merged, never needed)
    cls = transformers_class(cfg)
    ignored = [re.compile(p) for p in [*(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or []),
                                       *_LEGACY_BUFFERS]]
    left = [n for n in names
            if not n.endswith(".inv_freq") and not any(p.search(n) for p in ignored) and not in_plan(n)]
    if left:
        archs = ", ".join(getattr(cfg, "architectures", None) or [cfg.model_type])
        raise SafeMergeError(
            f"{where}: mergekit's layout of {archs} has no place for {len(left)} of the aligned model's "
            f"{len(names)} tensors (first: {left[0]}), so it would write the merged model without them; "
            "mergekit cannot merge these files as they are (with LoRA adapters, `safemerge merge --output model` "
            "keeps every tensor)")


def _vocab_size(model_dir: Path) -> int | None:
    """``vocab_size`` from a model folder's config.json (None when it has none)."""
    from safemerge_ext.io.models import config_value

    size = config_value(model_dir, "vocab_size")
    return size if isinstance(size, int) else None


_LORA_MERGE_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _check_lora_merge_dtype(name: str | None) -> None:
    """--lora-merge-dtype as mergekit reads it (else it fails when it folds the first LoRA input,
    minutes in, with a line that does not name the option)."""
    if name and name.removeprefix("torch.") not in _LORA_MERGE_DTYPES:
        raise SafeMergeError(f"--lora-merge-dtype {name}: not a dtype mergekit folds LoRA inputs in; "
                             f"use {', '.join(_LORA_MERGE_DTYPES)} (float32 is the default here)")


# (a slice's residual_weight: mergekit 0.1.5 declares it and no code of its reads it)
RESIDUAL_WEIGHT_UNUSED = ("residual_weight is a key mergekit accepts but never applies (the merge would ignore it); "
                          "remove it")


def check_recipe_keys(data: Any, recipe: str | os.PathLike = "recipe") -> None:
    """Keys mergekit's configuration does not declare, at the top, on a slice, a source, a model, a
    module, a parameter's ``{value, filter}`` or the tokenizer's settings: pydantic drops them
    without a word (a misspelt ``paramters:`` merges at the defaults, a misspelt ``fliter:`` gives
    its value to every tensor), so refuse them, naming the nearest key."""
    import difflib

    from mergekit.config import (ConditionalParameter, InputModelDefinition, InputSliceDefinition,
                                 OutputModuleDefinition, OutputSliceDefinition)
    from mergekit.tokenizer.config import TokenEmbeddingConfig, TokenizerConfig

    def check(item: Any, cls: Any, where: str) -> None:
        if not isinstance(item, dict):
            return
        known = sorted(cls.model_fields)
        for key in item:
            if key not in cls.model_fields:
                near = difflib.get_close_matches(str(key), known, n=1)
                raise SafeMergeError(f"{recipe}: {where}{key!r} is no key mergekit reads (it would drop it "
                                     "without a word); " + (f"did you mean {near[0]}?" if near
                                                            else f"the keys there are {', '.join(known)}"))

    def parameters(item: Any, where: str) -> None:
        params = item.get("parameters") if isinstance(item, dict) else None
        for name, value in params.items() if isinstance(params, dict) else ():
            for k, cond in enumerate(value if isinstance(value, list) else [value]):
                at = f"[{k}]" if isinstance(value, list) else ""
                check(cond, ConditionalParameter, f"{where}parameters.{name}{at}: ")

    def slices(items: Any, where: str) -> None:
        for i, sl in enumerate(items if isinstance(items, list) else []):
            check(sl, OutputSliceDefinition, f"{where}slices[{i}]: ")
            if isinstance(sl, dict) and sl.get("residual_weight") is not None:  # (declared; no mergekit code reads it)
                raise SafeMergeError(f"{recipe}: {where}slices[{i}]: {RESIDUAL_WEIGHT_UNUSED}")
            parameters(sl, f"{where}slices[{i}].")
            for j, src in enumerate((sl.get("sources") or []) if isinstance(sl, dict) else []):
                check(src, InputSliceDefinition, f"{where}slices[{i}].sources[{j}]: ")
                parameters(src, f"{where}slices[{i}].sources[{j}].")

    def models(items: Any, where: str) -> None:
        for i, m in enumerate(items if isinstance(items, list) else []):
            check(m, InputModelDefinition, f"{where}models[{i}]: ")
            parameters(m, f"{where}models[{i}].")

    if not isinstance(data, dict):
        return
    check(data, MergeConfiguration, "")
    parameters(data, "")
    slices(data.get("slices"), "")
    models(data.get("models"), "")
    modules = data.get("modules")
    for name, mod in modules.items() if isinstance(modules, dict) else ():
        check(mod, OutputModuleDefinition, f"modules.{name}: ")
        parameters(mod, f"modules.{name}.")
        if isinstance(mod, dict):
            slices(mod.get("slices"), f"modules.{name}.")
            models(mod.get("models"), f"modules.{name}.")
    tokenizer = data.get("tokenizer")
    check(tokenizer, TokenizerConfig, "tokenizer: ")
    tokens = tokenizer.get("tokens") if isinstance(tokenizer, dict) else None
    for token, setting in tokens.items() if isinstance(tokens, dict) else ():
        check(setting, TokenEmbeddingConfig, f"tokenizer.tokens.{token}: ")


def check_layer_ranges(config: MergeConfiguration, method: str, recipe: str | os.PathLike = "recipe") -> None:
    """Every source of a slice covers the layers the aligned model's source covers: the methods read
    a layer's task update as W_task - W_aligned and V as W_aligned - W_unaligned of the tensors
    mergekit pairs by position, so a source offset to other layers would be scored and merged as
    an update that no fine-tuning made."""
    def walk(items: Any, where: str) -> None:
        for i, sl in enumerate(items or []):
            base = getattr(sl, "base_model", None) or config.base_model
            ref = next((s for s in sl.sources if s.model == base), None)
            if ref is None:  # (check_roles says so)
                continue
            for s in sl.sources:
                if tuple(s.layer_range) != tuple(ref.layer_range):
                    raise SafeMergeError(
                        f"{recipe}: {where}slices[{i}]: model {s.model} takes layer_range {list(s.layer_range)} "
                        f"but the base_model {base} (the aligned model) takes {list(ref.layer_range)}; {method} "
                        "pairs every layer with the same layer of the aligned model: give each source the "
                        "base_model's layer_range (for a frankenmerge, add one slice per range)")

    walk(config.slices, "")
    for name, mod in (config.modules or {}).items():
        walk(mod.slices, f"modules.{name}.")


def validate_recipe(data: Any, recipe: str | os.PathLike = "recipe", truncate_embeddings: bool = False) -> Checked:
    """Check a recipe (parsed YAML) before any weight is read; raise SafeMergeError naming the culprit.
    ``truncate_embeddings``: mergekit's --unsafe-truncate-embeddings is on (vocabularies may differ)."""
    register_methods()
    if not isinstance(data, dict):
        raise SafeMergeError(f"{recipe}: not a mergekit recipe (expected a YAML mapping with merge_method:)")
    method = data.get("merge_method")
    if method not in METHOD_NAMES:
        raise SafeMergeError(
            f"{recipe}: merge_method {method!r} is not one of {', '.join(METHOD_NAMES)}; "
            "use plain mergekit-yaml for mergekit's own methods"
        )
    check_recipe_keys(data, recipe)
    try:
        config = MergeConfiguration.model_validate(data)
    except Exception as exc:  # pydantic: keep the first error, on one line
        errors = getattr(exc, "errors", lambda: [])()
        first = errors[0] if errors else {"loc": (), "msg": str(exc)}
        loc = ".".join(str(p) for p in first.get("loc", ()))
        raise SafeMergeError(f"{recipe}: invalid recipe at {loc or 'top level'}: {first.get('msg')}") from None
    config = _expand_home(config)  # (what mergekit is given too)
    _base_model(config, recipe)
    for key in ("dtype", "out_dtype"):
        name = getattr(config, key, None)
        if name is not None and str(name).removeprefix("torch.") not in DTYPES:
            raise SafeMergeError(f"{recipe}: {key} must be one of {', '.join(DTYPES)}; got {name!r}")
    _check_parameters(method, dict(config.parameters or {}), f"{recipe}: parameters")
    _check_module_parameters(config, method, recipe)
    if "precision" not in (config.parameters or {}):  # (a given one was just checked) SAFEMERGE_PRECISION
        try:
            requested_precision(None)
        except ValueError as exc:
            raise SafeMergeError(str(exc)) from None
    roles = check_roles(method, config, recipe)
    check_layer_ranges(config, method, recipe)
    has_lora, checked, inputs = _check_models(config, roles, truncate_embeddings, method, recipe)
    return Checked(config, method, roles, has_lora, checked, inputs)


def check_card_lookups(config: MergeConfiguration, write_model_card: bool, where: str | os.PathLike,
                       flag: str = "--no-write-model-card", stages: str | None = None) -> None:
    """mergekit's model card, written once every tensor is (unless ``flag``), asks the Hugging Face Hub
    whether each model path that is also a local folder and has at most one slash (``a/b``, ``a``) is a
    Hub repository; where that question fails (offline), the run fails there, its merge thrown away,
    on a line that names neither the path nor a remedy. Asked now, as mergekit's card asks it (its
    ``is_hf``), before any model loads (mergekit asks again at the end: one more request per such
    path), and refused in one line. ``stages``: mergekit-multi's ``-I`` folder, whose stages' folders
    (``-I/<name>``) the recipe names by their stage name alone."""
    if not write_model_card:
        return
    from mergekit.card import is_hf

    asked = set()
    for ref in config.referenced_models():
        for part in (ref.model, getattr(ref, "lora", None)):
            path = getattr(part, "path", None)
            if not isinstance(path, str) or not path or path in asked:
                continue
            asked.add(path)
            try:
                is_hf(path)  # (asks the Hub only where the path lies here and has at most one slash)
            except Exception as exc:
                why = str(exc).splitlines()[0] if str(exc) else ""
                inner = os.path.normpath(stages) if stages else os.curdir  # (-I . names stages ./<name>: none asked)
                if inner != os.curdir and os.path.normpath(os.path.dirname(path)) == inner:
                    fix = (f"for a stage of the file, give mergekit-multi's -I as ./{inner} or an absolute path, "
                           f"else write the path as ./{path}")
                else:
                    fix = f"write the path as ./{path}"
                raise SafeMergeError(
                    f"{where}: {path}: mergekit's model card asks the Hugging Face Hub whether this local folder is a "
                    f"Hub model, and that failed ({type(exc).__name__}: {why}), which would fail the run after the "
                    f"merge; {fix}, or pass {flag}") from None


def _check_report_path(own: str, out: Path, inputs: tuple[tuple[str, Path], ...] = ()) -> None:
    """Before any work: the recipe's ``report_path`` can be written, would replace no file of an
    input, and is not OUT_PATH or a folder in it (the report goes into OUT_PATH anyway; a folder
    made there early would stop the final rename)."""
    own_json, own_png = report_files(own)
    check_parent(own_json, "report_path", follow_links=True)
    for f in (own_json, own_png):
        if f.is_dir():
            raise SafeMergeError(f"report_path {own}: {f} is a folder; choose another report_path")
        check_not_input(f, "report_path", inputs)
    if within(own, out):
        raise SafeMergeError(f"report_path {own} is OUT_PATH or inside it, where the report is written anyway; "
                             "leave report_path out or choose a folder elsewhere")


FOLD_STAMP = ".safemerge-fold.json"  # in a --lora-merge-cache entry: what it was folded from


def _fold_source(ref: Any) -> dict[str, Any]:
    """The model and the LoRA a ``model+lora`` reference folds, as they are on disk now (paths
    resolved; each file's size, time and JSON or header digest: ``provenance.fingerprint``; the
    adapter's weights' whole SHA-256 too, since one retrained in place keeps its size and header;
    the model's files' times to the nanosecond, not hashed: a model is many GB, and a save within
    the second of the last one kept its record's time to the second)."""
    import hashlib

    from safemerge_ext.provenance import fingerprint

    source = {part: {**fingerprint(os.path.expanduser(path.path)), "revision": path.revision}
              for part, path in (("model", ref.model), ("lora", ref.lora))}
    model = Path(source["model"]["path"])
    for name, entry in source["model"].get("files", {}).items():
        with contextlib.suppress(OSError):
            entry["modified_ns"] = (model / name).stat().st_mtime_ns
    folder = Path(source["lora"]["path"])
    for name, entry in source["lora"].get("files", {}).items():
        if name.endswith((".safetensors", ".bin")):
            digest = hashlib.sha256()  # (hashlib.file_digest is 3.11's; 3.10 is supported)
            try:
                with open(folder / name, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 22), b""):
                        digest.update(block)
            except OSError:  # (unreadable: then mergekit's fold says so)
                continue
            entry["sha256"] = digest.hexdigest()
    return source


def _model_files(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A ``_fold_source`` record's entries for the model's files (empty where it has none)."""
    model = record.get("model")
    files = model.get("files") if isinstance(model, dict) else None
    return {n: f for n, f in files.items() if isinstance(f, dict)} if isinstance(files, dict) else {}


def _changed(then: dict[str, Any], now: dict[str, Any]) -> str:
    """What differs between two ``_fold_source`` records, in words."""
    for part, what in (("lora", "the adapter"), ("model", "the model")):
        a, b = then.get(part) or {}, now[part]
        if a.get("path") != b["path"] or a.get("revision") != b["revision"]:
            return f"{what} was {a.get('path')}, now {b['path']}"
        files = sorted(set(a.get("files") or {}) | set(b["files"]))
        name = next((f for f in files if (a.get("files") or {}).get(f) != b["files"].get(f)), None)
        if name is not None:
            return f"{what}'s {name} has changed since (it is {b['path']})"
    return "it differs"


def _check_lora_cache(config: MergeConfiguration, cache: str, dtype: str,
                      out: Path | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """A ``--lora-merge-cache`` that is a file, a link that names nothing or is under one (it could
    not be made), or OUT_PATH or inside it (the output replaces it: the run failed after folding
    every LoRA, or --force deleted the cache); one that an earlier run filled: mergekit reuses a
    folded model by the adapter's and the model's paths alone (as written), so one folded from
    another adapter at that path (retrained in place, or another project's ``./adapter``), in
    another dtype, or cut short would be scored as this run's task model. Refuse
    those (headers only; an entry records what it was folded from in ``FOLD_STAMP``). Returns the
    recipe's entries, each with the record to leave in it where this run will fold it (None: one
    that matches, reused; see :func:`_folding_into`)."""
    import json

    import torch

    from safemerge_ext.io.models import ModelReader

    check_links_lead(cache, "--lora-merge-cache", itself=True)
    where = Path(cache).resolve()
    if out is not None and within(where, out):
        raise SafeMergeError(f"--lora-merge-cache {cache} is OUT_PATH or inside it, which the output replaces; give "
                             "a folder elsewhere (or leave the option out: a temporary one is used)")
    if where.exists() and not where.is_dir():
        raise SafeMergeError(f"--lora-merge-cache {cache} is a file; give a folder")

    want = getattr(torch, dtype, None) if dtype else None
    to_fold: dict[Path, dict[str, Any] | None] = {}
    seen: set[Path] = set()
    for ref in config.referenced_models():  # (the base model's too: mergekit folds it into the cache alike)
        if ref.lora is None:
            continue
        entry = Path(cache) / f"{ref.model._unique_id()}_{ref.lora._unique_id()}"
        if entry in seen:
            continue
        seen.add(entry)
        source = _fold_source(ref)
        if not entry.exists():
            to_fold[entry] = source
            continue
        to_fold[entry] = None
        redo = f"remove {entry} so that mergekit folds {_ref_str(ref)} again"
        try:
            with ModelReader(entry, flag="--lora-merge-cache entry") as reader:
                got = next((reader.meta(n)[1] for n in reader.names if len(reader.meta(n)[0]) == 2), None)
        except SafeMergeError:
            raise SafeMergeError(f"--lora-merge-cache {cache}: {entry} holds no complete model (an interrupted "
                                 "fold, or one a plain mergekit-yaml run is making now); once no run is folding into "
                                 f"the cache, {redo}") from None
        if want is not None and got is not None and got != want:
            raise SafeMergeError(
                f"--lora-merge-cache {cache}: {entry} holds {_ref_str(ref)} folded in "
                f"{str(got).removeprefix('torch.')}, not {dtype} as this run folds it; {redo}, "
                f"or pass --lora-merge-dtype {str(got).removeprefix('torch.')}")
        try:
            then = json.loads((entry / FOLD_STAMP).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SafeMergeError(
                f"--lora-merge-cache {cache}: {entry} does not record what it was folded from (plain "
                "mergekit-yaml made it, or an older safemerge-yaml), and mergekit would reuse it "
                f"by the paths alone, whatever is at them now; {redo}") from None
        except (OSError, ValueError) as exc:
            raise SafeMergeError(f"--lora-merge-cache {cache}: {entry / FOLD_STAMP} cannot be read "
                                 f"({getattr(exc, 'strerror', None) or exc}); {redo}") from None
        if isinstance(then, dict) and not any("modified_ns" in f for f in _model_files(then).values()):
            source = {**source, "model": {**source["model"], "files": {  # (a record from before they had it)
                n: {k: v for k, v in f.items() if k != "modified_ns"} for n, f in _model_files(source).items()}}}
        if not isinstance(then, dict) or then != source:
            raise SafeMergeError(
                f"--lora-merge-cache {cache}: {entry} was folded from another {_ref_str(ref)} than the one "
                f"there now ({_changed(then if isinstance(then, dict) else {}, source)}), and mergekit would "
                f"reuse it; {redo}")
    return list(to_fold.items())


FOLDING = ".safemerge-folding-"  # a run's private folder in a --lora-merge-cache


def _clear_dead_folds(cache: str) -> None:
    """Remove the private folders that runs of this host left in the cache when they died (killed:
    no cleanup ran), whole models each, which no run would reuse or show (review151)."""
    from safemerge_ext.mergekit_run import _alive, _run_id

    here = _run_id().split("-", 1)[1]
    with contextlib.suppress(OSError):
        for left in Path(cache).glob(FOLDING + "*"):
            pid = left.name[len(FOLDING):].split("-", 1)[0]
            if pid.isdigit() and left.name.startswith(f"{FOLDING}{pid}-{here}-") and not _alive(int(pid)):
                shutil.rmtree(left, ignore_errors=True)


def _folding_into(cache: str, folds: list[tuple[Path, dict[str, Any] | None]]) -> Path:
    """A private folder in the cache for this run's mergekit to fold into: the entries it reuses
    linked there (where the file system has no links, folded there again), the ones it folds made
    there (so that a run beside it, sharing the cache, never takes a fold half made, or made from
    its own folder's ``./adapter``; review150)."""
    import tempfile

    from safemerge_ext.mergekit_run import _run_id

    Path(cache).mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(prefix=f"{FOLDING}{_run_id()}-", dir=cache))
    try:
        for entry, source in folds:
            if source is None:
                with contextlib.suppress(OSError):
                    (private / entry.name).symlink_to(entry.resolve(), target_is_directory=True)
    except BaseException:
        shutil.rmtree(private, ignore_errors=True)
        raise
    return private


def _keep_folds(private: Path, folds: list[tuple[Path, dict[str, Any] | None]]) -> None:
    """After a run that succeeded: each fold it made gets the record of what it was folded from
    (taken before the run) and moves into the cache, unless a run beside it put that entry there
    first (then that one stays, with its own record, which a later run checks)."""
    import json

    for entry, source in folds:
        made = private / entry.name
        if source is None or not made.is_dir() or made.is_symlink():
            continue
        try:
            (made / FOLD_STAMP).write_text(json.dumps(source, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            os.rename(made, entry)
        except OSError as exc:
            if not entry.is_dir():
                click.echo(f"safemerge-yaml: warning: --lora-merge-cache: the fold of {entry.name} could not be kept "
                           f"({exc.strerror or exc}); a later run folds it again", err=True)


def _disk_full(exc: BaseException) -> bool:
    """A write that found no room (disk, quota or file-size limit), also as safetensors' Rust I/O
    error reports it (its text only: "No space left on device (os error 28)")."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    text = str(exc)
    return any(f"(os error {code})" in text for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG))


def _fail(msg: str) -> None:
    click.echo(f"safemerge-yaml: error: {msg}", err=True)
    sys.exit(1)


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last
    without a word, so a second ``threshold:`` further down would quietly replace the first."""


def _no_key_twice(loader: _RecipeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # (`<<: *defaults`, whose keys the mapping may override)
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # (an unhashable key: PyYAML's own error follows)
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice (also at line {first}); "
                                                    "keep one", key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_key_twice)


def load_recipe(source: str) -> Any:
    """A YAML recipe's data, as ``yaml.safe_load`` reads it, except that a key given twice in one
    mapping raises (``yaml.YAMLError``)."""
    return yaml.load(source, Loader=_RecipeLoader)


def strict_document(node: yaml.Node, recipe: str | os.PathLike) -> None:
    """One composed document of a YAML stream (a ``mergekit-multi`` recipe) refused where it gives
    a key twice in one mapping, as :func:`load_recipe` refuses a file."""
    try:
        _RecipeLoader("").construct_document(node)
    except yaml.YAMLError as exc:
        raise SafeMergeError(f"{recipe}: {yaml_problem(exc)}") from None


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's problem and where it is ("expected ',' or ']', but got '<stream end>' at line 3, column 1"),
    on one line."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if not problem:
        return str(exc).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


@click.command("safemerge-yaml", cls=PrettyPrintHelp)
@click.argument("config_file")
@click.argument("out_path")
@click.option("--force", is_flag=True, default=False,
              help="Replace OUT_PATH if it exists (a previous output, holding safemerge_report.json, or an empty folder)")
@add_merge_options
def _command(merge_options: MergeOptions, config_file: str, out_path: str, force: bool) -> None:
    """Merge with safemerge / safelora / resta after checking the recipe; write the report into OUT_PATH."""
    _done["target"] = Path(out_path)  # (for an interrupt's line)
    explain_bus_errors(bus_error_line("safemerge-yaml", f"nothing was written to OUT_PATH {out_path}"))
    blank = blank_path("CONFIG_FILE", config_file)
    if blank is not None:  # (Path("") is the working directory: "Is a directory")
        _fail(str(blank))
    merge_options.apply_global_options()
    try:
        source = Path(config_file).read_text(encoding="utf-8")
    except OSError as exc:
        _fail(f"{config_file}: cannot read the recipe ({exc.strerror})")
    except UnicodeDecodeError:
        _fail(f"{config_file}: not a text file in UTF-8; give a YAML recipe")
    try:
        data = load_recipe(source)
    except yaml.YAMLError as exc:
        _fail(f"{config_file}: not valid YAML ({yaml_problem(exc)})")
    except RecursionError:  # (PyYAML parses nested collections recursively)
        _fail(f"{config_file}: not valid YAML (collections nested too deeply to read); give a recipe as mergekit documents it")
    try:
        checked = validate_recipe(data, config_file, truncate_embeddings=merge_options.unsafe_truncate_embeddings)
        check_device(merge_options)  # (before mergekit folds any LoRA input: minutes for a 7B model)
        check_card_lookups(checked.config, merge_options.write_model_card, config_file)
        _check_lora_merge_dtype(merge_options.lora_merge_dtype)
    except SafeMergeError as exc:
        _fail(str(exc))
    try:
        out = check_out(out_path, force, "OUT_PATH", inputs=checked.inputs, marker=REPORT_JSON, prog="safemerge-yaml")
    except SafeMergeError as exc:
        _fail(str(exc))
    if checked.has_lora and not merge_options.lora_merge_dtype:
        # W_aligned + B A in fp32: in the model's bf16 the adapter's update would be rounded
        # relative to the weights before it is recovered as W_task - W_aligned and scored
        merge_options = merge_options.model_copy(update={"lora_merge_dtype": "float32"})
    folds: list[tuple[Path, dict[str, Any] | None]] = []
    if checked.has_lora and merge_options.lora_merge_cache:
        try:
            folds = _check_lora_cache(checked.config, merge_options.lora_merge_cache, merge_options.lora_merge_dtype,
                                      out)
            _clear_dead_folds(merge_options.lora_merge_cache)
        except SafeMergeError as exc:
            _fail(str(exc))
    own = (checked.config.parameters or {}).get("report_path")
    own = os.path.expanduser(own) if isinstance(own, str) and own else None  # (as the methods read it)
    if own:
        try:
            _check_report_path(own, out, checked.inputs)
        except SafeMergeError as exc:
            _fail(str(exc))
    report, report_at, lora_cache, private = None, own, None, None
    try:
        from mergekit.merge import run_merge

        with staged_dir(out, force, "OUT_PATH", "safemerge-yaml", marker=REPORT_JSON) as tmp:
            report_at = own or tmp
            try:  # (from the LoRA cache's making on: its finally removes it)
                if checked.has_lora and not merge_options.lora_merge_cache:  # beside tmp, gone before staged_dir ends
                    with interrupts_held():  # (made and known as one step)
                        lora_cache = str(scratch_dir(out, "lora"))
                    merge_options = merge_options.model_copy(update={"lora_merge_cache": lora_cache})
                elif any(source is not None for _, source in folds):  # (else a cache read only is fine)
                    with interrupts_held():  # (made and known as one step)
                        private = _folding_into(merge_options.lora_merge_cache, folds)
                    merge_options = merge_options.model_copy(update={"lora_merge_cache": str(private)})
                # the report location travels with the recipe (no process-wide setting), so merges
                # in other threads of this process keep their own reports
                config = checked.config if own else checked.config.model_copy(
                    update={"parameters": {**(checked.config.parameters or {}), "report_path": str(tmp)}})
                run_merge(config, str(tmp), options=merge_options, config_source=source)
                if private is not None:
                    with interrupts_held():
                        _keep_folds(private, folds)
                untied = untie_stored_head(tmp)  # (mergekit copies the base model's tie_word_embeddings)
                # into OUT as always; to report_path only once OUT is in place (below)
                report = finalize_report(own or tmp, command="safemerge-yaml", into=tmp,
                                         warnings=[untied] if untied else ())
                if untied:
                    click.echo(f"safemerge-yaml: warning: {untied}", err=True)
                card = tmp / "README.md"
                if card.is_file():  # mergekit titles the card after the folder it wrote: the temporary one
                    text = card.read_text(encoding="utf-8").replace(tmp.name, out.name)
                    # (and lists the models from a set, in an order that changes run to run: sorted)
                    text = re.sub(r"(included in the merge:\n)((?:\* .*\n)+)",
                                  lambda m: m[1] + "".join(sorted(m[2].splitlines(True))), text)
                    card.write_text(text, encoding="utf-8")
                umask_modes(tmp)  # (safetensors >= 0.8 writes mergekit's shards 0600)
            finally:
                for scratch in (lora_cache, private):  # (whole: a Ctrl-C here waits, and the run ends on it after)
                    if scratch:
                        with interrupts_held():
                            shutil.rmtree(scratch, ignore_errors=True)
                            let_go(Path(scratch))
    except BaseException as exc:  # one line; nothing is left at OUT, and no report of the part that ran
        if not isinstance(exc, Exception) and committed(out):  # (a Ctrl-C as OUT was put in place: it is complete)
            _done["out"] = out
            raise
        if report_at is not None:
            discard_report(report_at)
        if not isinstance(exc, Exception):  # Ctrl-C, exit
            raise
        if _disk_full(exc):
            folds = (" (with LoRA inputs, the folded models need room beside OUT_PATH too; --lora-merge-cache DIR "
                     "puts them elsewhere)" if lora_cache else "")
            _fail(f"OUT_PATH {out}: its file system is full ({str(exc).splitlines()[0]}); free space there or write "
                  f"elsewhere{folds}")
        _fail(refusal(exc) or f"merge failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    _done["out"] = out  # (an interrupt from here on cuts short the report copy or the summary only)
    if report is not None and own:
        own_json, own_png = report_files(own)
        try:  # (write_files makes report_path's folder where the run's records have not)
            files = [(own_json, json_writer(report))]
            try:  # (both rendered, then both renamed into place: never another run's plot beside this JSON)
                files.insert(0, (own_png, plot_writer(report, own_png)))
            except PlotUnavailable:  # (finalize_report warned already)
                pass
            write_files(files, prog="safemerge-yaml")  # (naming what a killed copy left there)
            if len(files) == 1:
                own_png.unlink(missing_ok=True)  # (an earlier run's, which this JSON does not describe)
        except OSError as exc:
            _fail(f"report_path {own}: the merge and its report are in {out}, but the copy could not be written "
                  f"({exc.strerror or exc}); copy {out / own_json.name} yourself")
    if report is not None:
        click.echo(summary_table(report))
    click.echo(f"merged model and report written to {out}")


class _ShardSize(click.ParamType):
    """mergekit's ``--out-shard-size`` (500M, 5B, ...), a bad one refused as a usage error: mergekit's
    own type raises a bare ValueError, a traceback, and takes -1."""

    name = "size"

    def __init__(self, inner: click.ParamType) -> None:
        self.inner = inner

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            size = value if isinstance(value, int) else self.inner.convert(value, param, ctx)
        except (ValueError, TypeError):
            size = None
        if not isinstance(size, int) or size < 1:
            self.fail(f"{value!r} is not a size such as 500M or 5B", param, ctx)
        return size


# mergekit's options whose bad values fail (with a traceback) only once mergekit applies them
for _param in _command.params:
    if _param.name == "lora_merge_dtype":  # (mergekit's help for it; this command's default differs)
        _param.help = ("Override dtype when applying LoRAs (default here: float32, so that a bf16 model's "
                       "adapter update is not rounded before it is scored)")
    elif _param.name == "out_shard_size":
        _param.type = _ShardSize(_param.type)
    elif _param.name == "num_threads":  # (torch.set_num_threads)
        _param.type = click.IntRange(min=1)
    elif _param.name == "random_seed":  # (numpy's seeds)
        _param.type = click.IntRange(0, 2**32 - 1)

_done: dict[str, Path] = {}  # "target": OUT_PATH as given; "out": OUT_PATH, once the merge is in place there


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``safemerge-yaml``). Ctrl-C, SIGTERM and SIGHUP end in one line
    (exit 130, 143 and 129), after the command's own clean-up, not in click's "Aborted!"."""
    _done.clear()
    try:
        with sigterm_as_interrupt():
            code = _command.main(args=argv, prog_name="safemerge-yaml", standalone_mode=False)
    except click.exceptions.Abort as exc:  # (click's form of a KeyboardInterrupt)
        cause = exc.__cause__ if isinstance(exc.__cause__, KeyboardInterrupt) else KeyboardInterrupt()
        what = what_ended(cause)
        with interrupts_held(resend=False):  # (a second Ctrl-C does not cut this line short)
            done, target = _done.get("out"), _done.get("target")
            say(f"safemerge-yaml: {what} after the merge: {done} is complete; the report_path copy or the summary "
                "was cut short" if done is not None else f"safemerge-yaml: {what}; nothing was written"
                + (f" to OUT_PATH {target}" if target is not None else ""))
        sys.exit(exit_code(cause))
    except click.UsageError as exc:  # one line, as safemerge's are (click's own is a usage block and a hint)
        click.echo(f"safemerge-yaml: error: {' '.join(exc.format_message().split())} (see safemerge-yaml --help)",
                   err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except RuntimeError as exc:
        loop = symlink_loop(exc)
        if loop is None:
            raise
        click.echo(f"safemerge-yaml: error: {loop.filename}: {loop.strerror}; nothing was written", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def after_the_run(signum: int | BaseException) -> str | None:
    """The line for a signal that comes once the merge is in place (while the process exits after
    the command, or as it ends), or None when it is not."""
    done = _done.get("out")
    return f"safemerge-yaml: {what_ended(signum)} after the merge: {done} is complete" if done is not None else None


if __name__ == "__main__":  # (python -m: the imports above ran before any signal handling; safemerge-yaml has it)
    from safemerge_ext.cli import yaml_main

    yaml_main()
