"""``safemerge-yaml RECIPE OUT [any mergekit-yaml option]``: mergekit-yaml with the plugin loaded.

Unlike plain ``mergekit-yaml`` it registers the methods explicitly (no autoload needed), checks the
recipe before any weight is read (method, roles, paths, tensor shapes from safetensors headers,
parameter ranges), merges into a temporary folder beside OUT and renames it only when the merge
completed, then writes ``safemerge_report.json`` / ``.png`` into OUT and prints the summary table.
Every bad input is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

from safemerge_ext.backends import PRECISIONS, requested_precision
from safemerge_ext.errors import SafeMergeError
from safemerge_ext.mergekit_methods import METHOD_NAMES, ROLES, finalize_report, register_methods, report_to
from safemerge_ext.report import REPORT_JSON, REPORT_PNG, plot, summary_table, write_json

PARAMETERS = {
    "safemerge": ("threshold", "alpha", "merge", "density", "seed", "report_path", "precision"),
    "safelora": ("threshold", "report_path", "precision"),
    "resta": ("beta", "density", "seed", "report_path", "precision"),
}
_RANGES = {  # name -> (check, what the value must be)
    "threshold": (lambda v: -1.0 <= v <= 1.0, "in [-1, 1] (it is compared with a cosine)"),
    "alpha": (lambda v: 0.0 <= v <= 1.0, "in [0, 1] (the task update's weight)"),
    "density": (lambda v: 0.0 < v <= 1.0, "in (0, 1] (the fraction of each update kept)"),
    "beta": (lambda v: v >= 0.0, ">= 0 (the weight of the safety vector)"),
}


@dataclass(frozen=True)
class Checked:
    """A validated recipe: the mergekit config and what the checks learned."""

    config: MergeConfiguration
    method: str
    roles: dict[str, str]  # role -> model reference as written
    has_lora: bool
    tensors_checked: int


def _ref_str(ref: Any) -> str:
    return str(ref)


def _setting_values(name: str, setting: Any) -> list[Any]:
    """Every value a mergekit parameter setting can take (scalar, gradient list, or filter list)."""
    if isinstance(setting, list):
        out: list[Any] = []
        for item in setting:
            if isinstance(item, dict) or hasattr(item, "value"):
                value = item.get("value") if isinstance(item, dict) else item.value
                out.extend(_setting_values(name, value))
            else:
                out.append(item)
        return out
    return [setting]


def _check_parameters(method: str, params: dict[str, Any], where: str) -> None:
    for name, setting in (params or {}).items():
        if name == "role":
            continue
        if name not in PARAMETERS[method]:
            raise SafeMergeError(
                f"{where}: unknown parameter {name!r} for {method}; known: {', '.join(PARAMETERS[method])}"
            )
        for v in _setting_values(name, setting):
            if name == "merge":
                from safemerge_ext.merge import METHODS

                if v not in METHODS:
                    raise SafeMergeError(f"{where}: merge must be one of {', '.join(METHODS)}; got {v!r}")
            elif name == "seed":
                if not isinstance(v, int) or isinstance(v, bool):
                    raise SafeMergeError(f"{where}: seed must be an integer; got {v!r}")
            elif name == "report_path":
                if not isinstance(v, str):
                    raise SafeMergeError(f"{where}: report_path must be a path string; got {v!r}")
            elif name == "precision":
                if v is not None and v not in PRECISIONS:
                    raise SafeMergeError(f"{where}: precision must be one of {', '.join(PRECISIONS)}; got {v!r}")
            else:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise SafeMergeError(f"{where}: {name} must be a number; got {v!r}")
                ok, what = _RANGES[name]
                if not ok(float(v)):
                    raise SafeMergeError(f"{where}: {name} must lie {what}; got {v}")


def _groups(config: MergeConfiguration) -> list[tuple[str, list[tuple[Any, dict[str, Any]]]]]:
    """(label, [(model reference, its parameters)]) for every set of inputs merged together."""
    if config.models:
        return [("models", [(m.model, dict(m.parameters or {})) for m in config.models])]
    out = []
    for i, sl in enumerate(config.slices or []):
        out.append((f"slices[{i}]", [(s.model, dict(s.parameters or {})) for s in sl.sources]))
    for mname, mod in (config.modules or {}).items():
        for i, sl in enumerate(mod.slices or []):
            out.append((f"modules.{mname}.slices[{i}]", [(s.model, dict(s.parameters or {})) for s in sl.sources]))
        if mod.models:
            out.append((f"modules.{mname}.models", [(m.model, dict(m.parameters or {})) for m in mod.models]))
    return out


def _check_roles(method: str, config: MergeConfiguration) -> dict[str, str]:
    base = config.base_model
    roles: dict[str, str] = {}
    groups = _groups(config)
    if not groups:
        raise SafeMergeError(f"recipe: no models; list the {', '.join(ROLES[method])} models under models:")
    for label, inputs in groups:
        found: dict[str, list[str]] = {}
        for ref, params in inputs:
            role = params.get("role")
            if ref == base:
                if role is not None:
                    raise SafeMergeError(
                        f"{label}: {ref} is the base_model (the aligned model) and must not have a role; got role {role!r}"
                    )
                continue
            if role is None:
                raise SafeMergeError(
                    f"{label}: model {ref} has no role; add parameters: {{role: {'|'.join(ROLES[method])}}}"
                )
            if not isinstance(role, str) or role not in ROLES[method]:
                raise SafeMergeError(
                    f"{label}: model {ref} has role {role!r}; {method} takes the roles {', '.join(ROLES[method])}"
                )
            found.setdefault(role, []).append(_ref_str(ref))
            _check_parameters(method, params, f"{label}: model {ref}")
        for r in ROLES[method]:
            got = found.get(r, [])
            if len(got) != 1:
                raise SafeMergeError(
                    f"{label}: role {r!r} must be given to exactly one model; "
                    + (f"it is given to {len(got)}: {', '.join(got)}" if got else "no model has it")
                )
            roles[r] = got[0]
    return roles


def _local_dir(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_absolute():
        p = Path.cwd() / p
    if not p.is_dir():
        raise SafeMergeError(
            f"{what} {path}: no such directory; safemerge-yaml reads local Hugging Face folders only "
            f"(relative paths are relative to the working directory {Path.cwd()})"
        )
    return p


def _check_models(config: MergeConfiguration, roles: dict[str, str]) -> tuple[bool, int]:
    """Paths exist; 2-D tensors of the aligned model have the same shape in every input (headers only)."""
    from safemerge_ext.io.adapters import read_adapter
    from safemerge_ext.io.models import ModelReader

    by_str = {str(r): r for _, inputs in _groups(config) for r, _ in inputs}
    refs = [("base_model (aligned)", config.base_model)] + [(f"role {r}", by_str[s]) for r, s in roles.items()]
    readers, adapters, has_lora = [], [], False
    for label, ref in refs:
        path = _local_dir(ref.model.path, f"{label}: model")
        readers.append((label, ref, ModelReader(path, flag=f"{label}: model")))
        if ref.lora is not None:
            has_lora = True
            lpath = _local_dir(ref.lora.path, f"{label}: LoRA adapter")
            adapters.append((label, ref, read_adapter(lpath, flag=f"{label}: LoRA adapter")))
    base_label, _, base = readers[0]
    checked = 0
    for name in base.names:
        shape, _ = base.meta(name)
        if len(shape) != 2:
            continue
        for label, ref, reader in readers[1:]:
            if name not in reader:
                raise SafeMergeError(
                    f"tensor {name} is in the aligned model but missing from {label} ({ref.model.path}); "
                    "all models must share one architecture"
                )
            other, _ = reader.meta(name)
            if tuple(other) != tuple(shape):
                raise SafeMergeError(
                    f"tensor {name} has shape {tuple(shape)} in the aligned model but {tuple(other)} in {label} "
                    f"({ref.model.path}): the models must share one architecture"
                )
        checked += 1
    for label, ref, adapter in adapters:
        reader = next(r for lbl, _, r in readers if lbl == label)
        for module, m in adapter.modules.items():
            wname = reader.resolve_module(module)
            if wname is None:
                raise SafeMergeError(
                    f"{label}: LoRA adapter {ref.lora.path} targets {module}, which {ref.model.path} does not have"
                )
            d_out, d_in = reader.meta(wname)[0]
            if m.d_out != d_out or m.d_in != d_in:
                raise SafeMergeError(
                    f"{label}: LoRA adapter {ref.lora.path} module {module} is {m.d_out}x{m.d_in} "
                    f"but the weight {wname} is {d_out}x{d_in}"
                )
    return has_lora, checked


def validate_recipe(data: Any, recipe: str | os.PathLike = "recipe") -> Checked:
    """Check a recipe (parsed YAML) before any weight is read; raise SafeMergeError naming the culprit."""
    register_methods()
    if not isinstance(data, dict):
        raise SafeMergeError(f"{recipe}: not a mergekit recipe (expected a YAML mapping with merge_method:)")
    method = data.get("merge_method")
    if method not in METHOD_NAMES:
        raise SafeMergeError(
            f"{recipe}: merge_method {method!r} is not one of {', '.join(METHOD_NAMES)}; "
            "use plain mergekit-yaml for mergekit's own methods"
        )
    try:
        config = MergeConfiguration.model_validate(data)
    except Exception as exc:  # pydantic: keep the first error, on one line
        errors = getattr(exc, "errors", lambda: [])()
        first = errors[0] if errors else {"loc": (), "msg": str(exc)}
        loc = ".".join(str(p) for p in first.get("loc", ()))
        raise SafeMergeError(f"{recipe}: invalid recipe at {loc or 'top level'}: {first.get('msg')}") from None
    if config.base_model is None:
        raise SafeMergeError(f"{recipe}: base_model is missing; set it to the aligned model (e.g. the chat model)")
    _check_parameters(method, dict(config.parameters or {}), f"{recipe}: parameters")
    given = (config.parameters or {}).get("precision")
    try:
        requested_precision(given if isinstance(given, str) else None)  # else SAFEMERGE_PRECISION
    except ValueError as exc:
        raise SafeMergeError(str(exc)) from None
    roles = _check_roles(method, config)
    has_lora, checked = _check_models(config, roles)
    return Checked(config, method, roles, has_lora, checked)


def _fail(msg: str) -> None:
    click.echo(f"safemerge-yaml: error: {msg}", err=True)
    sys.exit(1)


@click.command("safemerge-yaml", cls=PrettyPrintHelp)
@click.argument("config_file")
@click.argument("out_path")
@click.option("--force", is_flag=True, default=False, help="Replace OUT_PATH if it exists")
@add_merge_options
def _command(merge_options: MergeOptions, config_file: str, out_path: str, force: bool) -> None:
    """Merge with safemerge / safelora / resta after checking the recipe; write the report into OUT_PATH."""
    merge_options.apply_global_options()
    try:
        source = Path(config_file).read_text(encoding="utf-8")
    except OSError as exc:
        _fail(f"{config_file}: cannot read the recipe ({exc.strerror})")
    try:
        data = yaml.safe_load(source)
    except yaml.YAMLError as exc:
        _fail(f"{config_file}: not valid YAML ({str(exc).splitlines()[0]})")
    try:
        checked = validate_recipe(data, config_file)
    except SafeMergeError as exc:
        _fail(str(exc))
    out = Path(out_path)
    if out.exists() and not force:
        _fail(f"{out}: exists; choose a new output folder or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    lora_cache = None
    if checked.has_lora and not merge_options.lora_merge_cache:
        lora_cache = tempfile.mkdtemp(prefix=".safemerge-lora-", dir=out.parent)
        merge_options = merge_options.model_copy(update={"lora_merge_cache": lora_cache})
    try:
        from mergekit.merge import run_merge

        own = (checked.config.parameters or {}).get("report_path")
        with report_to(tmp):
            run_merge(checked.config, str(tmp), options=merge_options, config_source=source)
        report = finalize_report(own if isinstance(own, str) and own else tmp, command="safemerge-yaml")
        if report is not None and isinstance(own, str) and own:  # also into OUT, as always
            write_json(report, tmp / REPORT_JSON)
            plot(report, tmp / REPORT_PNG)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except Exception as exc:  # one line; nothing is left at OUT
        shutil.rmtree(tmp, ignore_errors=True)
        _fail(f"merge failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    finally:
        if lora_cache:
            shutil.rmtree(lora_cache, ignore_errors=True)
    if report is not None:
        click.echo(summary_table(report))
    click.echo(f"merged model and report written to {out}")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``safemerge-yaml``)."""
    _command.main(args=argv, prog_name="safemerge-yaml")


if __name__ == "__main__":
    main()
