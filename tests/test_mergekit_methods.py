"""mergekit methods safemerge / safelora / resta on pico Llama models: exact outputs against float64
references written here, the report, mergekit's own methods untouched, aligned+lora inputs, bad
recipes, the safemerge-yaml and mergekit-yaml console scripts, and the start-up autoload hook."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import re
import subprocess
import sys
import sysconfig
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

pytest.importorskip("mergekit")
pytest.importorskip("transformers")

from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import MergeOptions, run_merge  # noqa: E402
from mergekit_fixtures import DW_ZERO, V_ZERO, is_linear, lora_delta, pico, read_model  # noqa: E402,F401
from numerics import assert_close  # noqa: E402

from safemerge_ext import autoload  # noqa: E402
from safemerge_ext.errors import SafeMergeError  # noqa: E402
from safemerge_ext.mergekit_methods import finalize_report, register_methods, report_to  # noqa: E402
from safemerge_ext.yaml_cli import validate_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TAU = 0.6  # with the pico models this flags some layers and keeps others


def recipe(p, method: str = "safemerge", params: dict | None = None, dtype: str = "float32", **models: str) -> dict:
    """A recipe dict on the pico models; ``models`` maps role -> reference (defaults: full models)."""
    refs = {"task": str(p.task), "unaligned": str(p.unaligned)}
    if method == "safemerge":
        refs["safety"] = str(p.safety)
    refs.update(models)
    return {
        "merge_method": method,
        "base_model": str(p.aligned),
        "models": [{"model": ref, "parameters": {"role": role}} for role, ref in refs.items()],
        "parameters": params or {},
        "dtype": dtype,
    }


def merge(cfg: dict, out: Path, **options: Any) -> tuple[dict[str, torch.Tensor], dict | None]:
    """run_merge in-process with the plugin registered; the output tensors and the report."""
    register_methods()
    with report_to(out):
        run_merge(MergeConfiguration.model_validate(cfg), str(out),
                  MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False, **options))
    return read_model(out), finalize_report(out)


def ref_cos(wa: torch.Tensor, wu: torch.Tensor, dW: torch.Tensor) -> float:
    V = wa.double() - wu.double()
    if V.norm() == 0 or dW.norm() == 0:
        return math.nan
    C = V @ V.t() / V.norm()
    CdW = C @ dW
    return float((CdW * dW).sum() / (CdW.norm() * dW.norm()))


def ref_ties(d1: torch.Tensor, d2: torch.Tensor, weights: tuple[float, float], density: float) -> torch.Tensor:
    """TIES of the weighted updates, merge(w1 d1, w2 d2) as SPEC writes it (magnitude prune, elect
    the sign on the sum, mean of the entries that agree with it), float64."""
    def prune(t: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros(t.numel(), dtype=t.dtype)
        keep[t.abs().flatten().topk(int(density * t.numel())).indices] = 1
        return t * keep.view_as(t)

    W = torch.stack([prune(d1 * weights[0]), prune(d2 * weights[1])])
    agree = W.sign() == torch.where(W.sum(0) >= 0, 1.0, -1.0).to(W.dtype)
    return (W * agree).sum(0) / agree.sum(0).clamp(min=1)


def reference(p, method: str, *, tau: float = TAU, alpha: float = 0.8, merge_name: str = "linear",
              density: float = 1.0, beta: float = 0.5, task: dict | None = None, safety: dict | None = None):
    """Expected output (float64) and flags of every tensor, straight from SPEC section 1."""
    A, U = read_model(p.aligned), read_model(p.unaligned)
    T = task or read_model(p.task)
    S = safety or read_model(p.safety)
    out, flags = {}, {}
    for name, wa in A.items():
        wa, wu, wt = wa.double(), U[name].double(), T[name].double()
        if method == "resta":
            out[name] = wt + beta * (wa - wu)
            continue
        if not is_linear(name, wa):
            out[name] = wt
            continue
        dW = wt - wa
        rho = ref_cos(wa, wu, dW)
        flagged = not math.isnan(rho) and (rho < tau if method == "safemerge" else rho <= tau)
        assert math.isnan(rho) or abs(rho - tau) > 1e-6, f"{name}: cosine {rho} too close to the threshold for a test"
        flags[name[: -len(".weight")]] = flagged
        if not flagged:
            out[name] = wt
        elif method == "safelora":
            V = wa - wu
            out[name] = wa + (V @ V.t() / V.norm()) @ dW
        else:
            dWs = S[name].double() - wa
            merged = alpha * dW + (1 - alpha) * dWs if merge_name == "linear" else \
                ref_ties(dW, dWs, (alpha, 1 - alpha), density)
            out[name] = wa + merged
    return out, flags


def check_all(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 2e-6) -> None:
    assert set(got) == set(want), f"tensors differ: missing {set(want) - set(got)}, extra {set(got) - set(want)}"
    for name in sorted(want):
        assert torch.isfinite(got[name]).all(), f"{name}: NaN/Inf in the output"
        assert_close(got[name], want[name], atol=atol, rtol=1e-5, what=name)


def check_report(report: dict, flags: dict[str, bool], method: str) -> None:
    layers = {r["module"]: r for r in report["layers"]}
    assert report["method"] == method and set(layers) == set(flags)
    kinds = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]  # model order: blocks by number, modules as Llama defines them
    assert [r["module"] for r in report["layers"]] == sorted(
        layers, key=lambda m: (int(m.split(".")[2]), kinds.index(m.split(".", 3)[3])))
    assert {m: r["flagged"] for m, r in layers.items()} == flags
    assert layers[V_ZERO[:-7]]["cosine"] is None and "V = 0" in layers[V_ZERO[:-7]]["reason"]
    assert layers[DW_ZERO[:-7]]["cosine"] is None and "zero" in layers[DW_ZERO[:-7]]["reason"]
    if method != "resta":  # (the words the commands' reports use: degenerate layers are skipped; review148)
        assert {layers[w[:-7]]["action"] for w in (V_ZERO, DW_ZERO)} == {"skipped"}
        assert {r["action"] for r in report["layers"] if not r["flagged"] and r["cosine"] is not None} <= {"kept"}
    assert report["counts"]["flagged"] == sum(flags.values())
    if report["backend"] == "cpp":  # which kernels scored (their bits differ between ISA builds)
        from safemerge_ext import _cpu

        assert report["backend_detail"].startswith(f"{_cpu.isa()} kernels, ")


# -- exact outputs -------------------------------------------------------------------------------


def test_safemerge_linear_matches_float64_reference(pico, tmp_path):
    got, report = merge(recipe(pico, params={"threshold": TAU, "alpha": 0.8, "merge": "linear"}), tmp_path / "o")
    want, flags = reference(pico, "safemerge")
    assert 0 < sum(flags.values()) < len(flags) - 2, "the pico models must flag some layers and keep others"
    check_all(got, want)
    check_report(report, flags, "safemerge")
    assert report["settings"]["threshold"] == TAU and report["settings"]["comparison"] == "<"
    # (and the recipe's settings no method sees, which shape the output too: review148)
    assert (report["settings"]["dtype"], report["settings"]["out_dtype"], report["settings"]["lora_merge_dtype"]) == (
        "float32", None, None)
    assert report["command"] == "run_merge"  # (finalize_report from a program: no mergekit-yaml ran)
    assert (tmp_path / "o" / "safemerge_report.png").stat().st_size > 0
    task = read_model(pico.task)
    for name, t in task.items():  # kept layers and every non-linear tensor: the task model's, bit for bit
        if not flags.get(name[:-7], False):
            assert torch.equal(got[name], t), name


def test_safelora_precision_parameter(pico, tmp_path, monkeypatch):
    """A recipe's ``precision`` reaches the scoring: on the CPU the backend computes in exact fp32,
    the outputs are the same as without it, and the report says so in a warning."""
    monkeypatch.delenv("SAFEMERGE_PRECISION", raising=False)
    got, report = merge(recipe(pico, "safelora", params={"threshold": TAU, "precision": "bf16"}), tmp_path / "o")
    want, flags = reference(pico, "safelora", tau=TAU)
    check_all(got, want)
    check_report(report, flags, "safelora")
    assert report["precision"] == "ieee" and report["backend"] != "triton"
    assert f"precision bf16 applies to the triton backend on a GPU only; the {report['backend']} backend computed in " \
           "exact fp32 (ieee)" in report["warnings"]
    _, plain = merge(recipe(pico, "safelora", params={"threshold": TAU}), tmp_path / "p")
    assert plain["precision"] == "ieee" and not any("precision" in w for w in plain["warnings"])


def test_safemerge_ties_matches_float64_reference(pico, tmp_path):
    params = {"threshold": TAU, "alpha": 0.7, "merge": "ties", "density": 0.5}
    got, report = merge(recipe(pico, params=params), tmp_path / "o")
    want, flags = reference(pico, "safemerge", alpha=0.7, merge_name="ties", density=0.5)
    check_all(got, want)
    check_report(report, flags, "safemerge")
    assert (report["settings"]["density"], report["settings"]["seed"]) == (0.5, None)  # (ties draws nothing)


def test_a_linear_recipe_records_no_density_and_warns_of_one_set(pico, tmp_path):
    """merge: linear keeps every entry and draws nothing: the report's density and seed are null,
    and a density the recipe set is said to have changed nothing."""
    _, report = merge(recipe(pico, params={"threshold": TAU, "density": 0.5, "seed": 3}), tmp_path / "o")
    assert (report["settings"]["merge"], report["settings"]["density"], report["settings"]["seed"]) == ("linear", None, None)
    assert [w for w in report["warnings"] if w.startswith("density")] == [
        f"density applies to merge: ties, dare_linear and dare_ties; with merge: linear it changed nothing "
        f"({len(report['layers'])} layer(s), e.g. {report['layers'][0]['module']})"]
    _, report = merge(recipe(pico, params={"threshold": TAU}), tmp_path / "o2")
    assert not [w for w in report["warnings"] if w.startswith("density")]


def test_safelora_matches_float64_reference(pico, tmp_path):
    got, report = merge(recipe(pico, "safelora", params={"threshold": TAU}), tmp_path / "o")
    want, flags = reference(pico, "safelora")
    assert 0 < sum(flags.values())
    check_all(got, want)
    check_report(report, flags, "safelora")
    assert {r["action"] for r in report["layers"] if r["flagged"]} == {"projected"}


@pytest.fixture(scope="module")
def gpt2_models(tmp_path_factory):
    """Four pico GPT-2 models (Conv1D layers: weights stored d_in x d_out), ``aligned`` = ``unaligned`` + a
    rank-3 V per layer in the linear map's orientation; safety = aligned + noise (wpe too), task the same
    plus, in block 0, an update inside V's column space (so block 0 scores high, block 1 low)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=24, n_layer=2, n_head=2, n_inner=40)
    base = GPT2LMHeadModel(cfg).state_dict()
    g = torch.Generator().manual_seed(1)
    sds = {k: {n: t.clone() for n, t in base.items()} for k in ("aligned", "task", "safety")}
    for n, w in base.items():
        if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            d_in, d_out = w.shape
            V = torch.randn(d_out, 3, generator=g) @ torch.randn(3, d_in, generator=g) * 0.05
            sds["aligned"][n] = w + V.T
            if ".h.0." in n:
                sds["task"][n] = sds["task"][n] + (V @ torch.randn(d_in, d_in, generator=g) * 0.05).T
        if w.dim() == 2 and "wte" not in n:
            for k in ("task", "safety"):
                sds[k][n] = sds["aligned"][n] + (sds[k][n] - base[n]) + torch.randn(w.shape, generator=g) * 0.02
    paths = {"unaligned": root / "unaligned"}
    GPT2LMHeadModel(cfg).save_pretrained(paths["unaligned"], state_dict=base)
    for k, sd in sds.items():
        paths[k] = root / k
        GPT2LMHeadModel(cfg).save_pretrained(paths[k], state_dict=sd)
    return types.SimpleNamespace(**paths)


@pytest.mark.parametrize("name, scored", [
    ("transformer.wpe.weight", False), ("bert.embeddings.position_embeddings.weight", False),
    ("bert.embeddings.token_type_embeddings.weight", False), ("model.visual.pos_embed.weight", False),
    ("model.embed_positions.weight", False), ("vision_model.positional_embedding_vlm", False),
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", False),
    ("embeddings.position_embedding.weight", False),
    ("model.layers.0.self_attn.q_proj.weight", True), ("transformer.h.0.attn.c_attn.weight", True),
    ("vision_model.embeddings.patch_embedding.weight", True),  # (SigLIP2's: a linear layer)
    ("patch_embedding.linear.weight", True), ("model.embed_proj.weight", True),
])
def test_tables_that_are_no_linear_layer_are_passed_through(name, scored):
    """Position, token-type and relative-position tables carry no vocabulary axis in mergekit's
    definitions, and are no linear layer: not scored; a linear layer named "*embedding" is."""
    from mergekit.merge_methods.base import TensorMetadata

    from safemerge_ext.mergekit_methods import _scorable

    group = types.SimpleNamespace(metadata=TensorMetadata(name=name, vocabulary_axis=None))
    assert _scorable(group, torch.randn(8, 4)) is scored
    assert not _scorable(types.SimpleNamespace(metadata=TensorMetadata(name=name, vocabulary_axis=0)), torch.randn(8, 4))


@pytest.mark.parametrize("method", ["safelora", "safemerge", "resta"])
def test_conv1d_layers_are_scored_as_the_linear_map_they_compute(gpt2_models, tmp_path, method):
    """GPT-2 stores c_attn/c_proj/c_fc as d_in x d_out: C = V V^T / ||V|| is formed on the output side of the
    map (the transpose of the stored tensor); the position table wpe is no layer (the task's, bit for bit)."""
    p, tau = gpt2_models, 0.5
    got, report = merge(recipe(p, method, params={"threshold": tau} if method != "resta" else {}), tmp_path / "o")
    A, U, T, S = (read_model(x) for x in (p.aligned, p.unaligned, p.task, p.safety))
    layers = {r["module"]: r for r in report["layers"]}
    assert "transformer.wpe" not in layers and "transformer.wte" not in layers
    assert sorted(layers) == sorted(n[:-7] for n in A if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")))
    if method != "resta":
        assert torch.equal(got["transformer.wpe.weight"], T["transformer.wpe.weight"])
    flagged = 0
    for m, rec in layers.items():
        n = m + ".weight"
        wa, wu, wt = A[n].double(), U[n].double(), T[n].double()
        V, dW = (wa - wu).T, (wt - wa).T  # the linear map's orientation, d_out x d_in
        rho = ref_cos(V, torch.zeros_like(V), dW)
        assert rec["cosine"] == pytest.approx(rho, abs=1e-6), m
        assert abs(rho - ref_cos(wa, wu, wt - wa)) > 0.01, f"{m}: the test cannot tell the orientations apart"
        if method == "safelora" and rho <= tau:
            flagged += 1
            want = wa + ((V @ V.T / V.norm()) @ dW).T
            assert_close(got[n], want, atol=2e-6, rtol=1e-5, what=n)
        elif method == "safemerge" and rho < tau:
            flagged += 1
            assert_close(got[n], wa + 0.8 * (wt - wa) + 0.2 * (S[n].double() - wa), atol=2e-6, rtol=1e-5, what=n)
        elif method != "resta":
            assert torch.equal(got[n], T[n]), n
    assert method == "resta" or 0 < flagged < len(layers)


def test_resta_matches_float64_reference(pico, tmp_path):
    got, report = merge(recipe(pico, "resta", params={"beta": 0.3}), tmp_path / "o")
    want, _ = reference(pico, "resta", beta=0.3)
    check_all(got, want)
    assert report["method"] == "resta" and {r["action"] for r in report["layers"]} == {"shifted"}
    # the report says what check_all just verified: the norms are shifted too, not the task model's
    assert "every floating-point tensor, scored or not, is shifted" in report["settings"]["scored"]
    assert not torch.equal(got["model.norm.weight"], read_model(pico.task)["model.norm.weight"])
    assert (report["settings"]["density"], report["settings"]["seed"]) == (1.0, None)  # (no mask drawn: review148)


def test_resta_dare_is_seeded(pico, tmp_path):
    params = {"beta": 0.5, "density": 0.5, "seed": 3}
    a, rep = merge(recipe(pico, "resta", params=params), tmp_path / "a")
    assert (rep["settings"]["density"], rep["settings"]["seed"]) == (0.5, 3)
    b, _ = merge(recipe(pico, "resta", params=params), tmp_path / "b")
    task, dense = read_model(pico.task), reference(pico, "resta")[0]
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a[name], b[name])
    assert not torch.allclose(a[name].double(), dense[name], atol=1e-6)  # DARE changed the safety vector
    assert not torch.equal(a[name], task[name])
    # the values: W_task + beta * m * V / density, with the Bernoulli mask m drawn as DARE draws it
    # (seeded per module by merge.module_seed), every other entry of V dropped
    from safemerge_ext.merge import module_seed

    A, U = read_model(pico.aligned), read_model(pico.unaligned)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        V = A[name].float() - U[name].float()
        torch.manual_seed(module_seed(3, name.removesuffix(".weight")))
        keep = torch.bernoulli(torch.full_like(V, 0.5))
        want = task[name].double() + 0.5 * (keep.double() * V.double() / 0.5)
        assert 0.3 < float(keep.mean()) < 0.7
        assert_close(a[name], want, atol=1e-6, rtol=1e-6, what=name)


def test_gradient_and_filter_parameters(pico, tmp_path):
    """threshold per tensor via a filter list: only attention layers can be flagged."""
    params = {"threshold": [{"filter": "self_attn", "value": TAU}, {"value": -1.0}], "alpha": 0.8}
    got, report = merge(recipe(pico, params=params), tmp_path / "o")
    _, flags = reference(pico, "safemerge")
    attn = {m: f and "self_attn" in m for m, f in flags.items()}
    assert {r["module"]: r["flagged"] for r in report["layers"]} == attn
    assert report["settings"]["threshold"] == "varies by layer (see layers)"
    assert not [w for w in report["warnings"] if "flags no layer" in w]  # (-1 here means "never", on purpose)


@pytest.mark.parametrize("method, tau, warned", [("safemerge", 0.0, True), ("safemerge", -1.0, True),
                                                ("safelora", 0.0, False), ("safelora", -0.2, True)])
def test_a_threshold_the_score_never_falls_below_warns(pico, tmp_path, method, tau, warned):
    """One threshold for every layer that no score can fall below (the score is never negative):
    the merge runs, and its report says why nothing was flagged."""
    got, report = merge(recipe(pico, method=method, params={"threshold": tau}), tmp_path / "o")
    said = [w for w in report["warnings"] if "flags no layer" in w]
    assert len(said) == warned and all(w.startswith(f"threshold {tau:g} flags no layer") for w in said), said
    assert min(r["cosine"] for r in report["layers"] if r["cosine"] is not None) >= 0
    if warned:
        assert report["counts"]["flagged"] == 0


def test_numbers_written_as_text_pass_as_mergekit_reads_them():
    """YAML's "1e-1" is a string that mergekit reads as a number; the checks that name the
    parameter in their messages let it through, and refuse what is no number in one line."""
    from pydantic import TypeAdapter, ValidationError

    from safemerge_ext.mergekit_methods import Fraction, Seed, Threshold
    from safemerge_ext.mergekit_run import refusal

    assert TypeAdapter(Threshold).validate_python("1e-1") == pytest.approx(0.1)
    assert TypeAdapter(Fraction).validate_python("0.8") == pytest.approx(0.8)
    assert TypeAdapter(Seed).validate_python("3") == 3 and TypeAdapter(Seed).validate_python(4.0) == 4
    for kind, value, message in ((Fraction, "high", "alpha takes a number; got 'high'"),
                                 (Fraction, [0.5], "alpha takes a number; got [0.5]"),
                                 (Seed, "2.5", "seed takes a whole number; got '2.5'")):
        with pytest.raises(ValidationError) as err:
            TypeAdapter(kind).validate_python(value)
        assert refusal(err.value) == message


def test_aligned_plus_lora_inputs_with_lora_merge_cache(pico, tmp_path):
    cache = tmp_path / "lora-cache"
    cfg = recipe(pico, params={"threshold": TAU, "alpha": 0.8},
                 task=f"{pico.aligned}+{pico.lora_task}", safety=f"{pico.aligned}+{pico.lora_safety}")
    got, report = merge({**cfg, "out_dtype": "bfloat16"}, tmp_path / "bf16", lora_merge_cache=str(cache),
                        lora_merge_dtype="float32")
    assert (report["settings"]["dtype"], report["settings"]["out_dtype"], report["settings"]["lora_merge_dtype"]) == (
        "float32", "bfloat16", "float32")
    got, report = merge(cfg, tmp_path / "o", lora_merge_cache=str(cache))
    assert any(cache.iterdir()), "mergekit did not use --lora-merge-cache"
    A = read_model(pico.aligned)

    def with_lora(adapter):
        return {n: w.double() + (d if (d := lora_delta(adapter, n)) is not None else 0) for n, w in A.items()}

    task, safety = with_lora(pico.lora_task), with_lora(pico.lora_safety)
    want, flags = reference(pico, "safemerge", task=task, safety=safety)
    check_all(got, want, atol=2e-5)
    scored = [r for r in report["layers"] if r["cosine"] is not None]
    assert {r["module"].rsplit(".", 1)[1] for r in scored} == {"q_proj", "v_proj", "down_proj"}
    assert {m: f for m, f in flags.items()} == {r["module"]: r["flagged"] for r in report["layers"]}


def test_lora_inputs_on_an_architecture_mergekit_does_not_define_are_refused_before_the_run(pico, tmp_path):
    """mergekit 0.1.5 infers such a model's layout from every input's files and fails on a model+lora
    input there ("LoRA not merged - use .merged()"); safemerge-yaml says what to do instead."""
    models = {}
    for role in ("aligned", "unaligned"):
        models[role] = tmp_path / role
        shutil.copytree(getattr(pico, role), models[role])
        cfg = json.loads((models[role] / "config.json").read_text())
        (models[role] / "config.json").write_text(json.dumps({**cfg, "architectures": ["PicoLlamaForCausalLM"]}))
    lora = recipe(pico, unaligned=str(models["unaligned"]),
                  task=f"{models['aligned']}+{pico.lora_task}", safety=f"{models['aligned']}+{pico.lora_safety}")
    lora["base_model"] = str(models["aligned"])
    with pytest.raises(SafeMergeError, match=r"^recipe: mergekit has no architecture definition for "
                       r"PicoLlamaForCausalLM \(the aligned model\), and cannot take model\+lora inputs for it; fold "
                       r"each LoRA .*, or use `safemerge merge --output model`, which takes the adapters as they are$"):
        validate_recipe(lora)
    with pytest.raises(SafeMergeError, match=r"^r\.yml: mergekit .*and give those folders$"):  # (resta: no CLI face)
        validate_recipe({**lora, "merge_method": "resta", "parameters": {"beta": 0.5},
                         "models": [m for m in lora["models"] if m["parameters"]["role"] != "safety"]}, "r.yml")
    full = recipe(pico)
    full["base_model"] = str(models["aligned"])
    validate_recipe(full)  # (full models: mergekit infers the layout from their files)


@pytest.mark.parametrize("architectures", [None, ["LlamaForCausalLM", "LlamaModel"]])
def test_the_architecture_check_leaves_configs_it_cannot_read_to_mergekit(pico, tmp_path, architectures):
    """A config without architectures (or with two) made mergekit's lookup raise inside the check: a
    traceback from safemerge-yaml, where the run before said one line."""
    aligned = tmp_path / "aligned"
    shutil.copytree(pico.aligned, aligned)
    cfg = json.loads((aligned / "config.json").read_text())
    cfg.pop("architectures", None)
    (aligned / "config.json").write_text(json.dumps({**cfg, **({"architectures": architectures} if architectures else {})}))
    lora = recipe(pico, task=f"{aligned}+{pico.lora_task}", safety=f"{aligned}+{pico.lora_safety}")
    lora["base_model"] = str(aligned)
    validate_recipe(lora)


def test_lora_inputs_that_peft_folds_are_taken_by_safemerge_yaml(pico, tmp_path):
    """A model+lora input is folded by PEFT before the method sees it, so a DoRA task adapter with
    a saved lm_head (modules_to_save) is scored as W_task - W_aligned of the folded model: the
    recipe passes safemerge-yaml's checks, and the merge matches the reference on that model.
    (The adapter-level CLI, which reads the factors themselves, still refuses such adapters.)"""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(5)
    model = LlamaForCausalLM.from_pretrained(pico.aligned, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True,
                     modules_to_save=["lm_head"], init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n or "magnitude" in n:
                p.add_(0.05 * torch.randn_like(p))
    adapter = tmp_path / "dora"
    peft_model.save_pretrained(adapter)
    folded = {k: v.detach().double() for k, v in peft_model.merge_and_unload().state_dict().items()}
    folded = {k: v for k, v in folded.items() if k in read_model(pico.aligned)}

    rcfg = recipe(pico, params={"threshold": TAU}, task=f"{pico.aligned}+{adapter}")
    checked = validate_recipe(rcfg, "r.yml")
    assert checked.has_lora
    with pytest.raises(SafeMergeError, match="use_dora is set"):
        from safemerge_ext.io.adapters import read_adapter

        read_adapter(adapter)
    got, report = merge(rcfg, tmp_path / "o", lora_merge_dtype="float32", lora_merge_cache=str(tmp_path / "cache"))
    want, flags = reference(pico, "safemerge", task=folded)
    check_all(got, want, atol=2e-5)
    assert flags == {r["module"]: r["flagged"] for r in report["layers"]}
    assert not torch.equal(got["lm_head.weight"], read_model(pico.aligned)["lm_head.weight"])


def test_mergekit_own_methods_unchanged_by_plugin(pico, tmp_path):
    """linear and ties give bit-identical output in a fresh interpreter without the plugin."""
    cfgs = {
        "linear": {"merge_method": "linear", "models": [{"model": str(pico.task), "parameters": {"weight": 0.6}},
                                                          {"model": str(pico.safety), "parameters": {"weight": 0.4}}],
                   "dtype": "float32"},
        "ties": {"merge_method": "ties", "base_model": str(pico.aligned),
                 "models": [{"model": str(pico.task), "parameters": {"weight": 0.6, "density": 0.5}},
                            {"model": str(pico.safety), "parameters": {"weight": 0.4, "density": 0.5}}],
                 "dtype": "float32"},
    }
    script = (
        "import json, sys\n"
        "from mergekit.config import MergeConfiguration\n"
        "from mergekit.merge import MergeOptions, run_merge\n"
        "import mergekit.merge_methods as mm\n"
        "assert 'safemerge' not in [m.spec.name for m in mm.registered_methods()], 'plugin loaded'\n"
        "for name, cfg in json.loads(sys.argv[1]).items():\n"
        "    run_merge(MergeConfiguration.model_validate(cfg), sys.argv[2] + '/' + name,\n"
        "              MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))\n"
    )
    env = dict(os.environ, SAFEMERGE_NO_AUTOLOAD="1")
    res = subprocess.run([sys.executable, "-c", script, json.dumps(cfgs), str(tmp_path / "without")],
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    register_methods()
    for name, cfg in cfgs.items():
        with_plugin, _ = merge(cfg, tmp_path / "with" / name)
        without = read_model(tmp_path / "without" / name)
        assert set(with_plugin) == set(without)
        for k in without:
            assert torch.equal(with_plugin[k], without[k]), f"{name}: {k} differs with the plugin loaded"


def test_register_methods_is_idempotent():
    import mergekit.merge_methods as mm

    register_methods()
    assert register_methods() == []
    names = [m.spec.name for m in mm.registered_methods()]
    assert all(names.count(n) == 1 for n in ("safemerge", "safelora", "resta"))
    spec = mm.get("safemerge").spec
    assert (spec.pretty_name, spec.reference_url) == ("SafeMERGE", "https://arxiv.org/abs/2503.17239")
    assert mm.get("safelora").spec.reference_url == "https://arxiv.org/abs/2405.16833"
    assert mm.get("resta").spec.reference_url == "https://arxiv.org/abs/2402.11746"


# -- bad recipes ---------------------------------------------------------------------------------


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Fail the test if validation reads any tensor's data (headers are fine)."""
    from safemerge_ext.io.models import ModelReader

    def refuse(self, name, *a, **k):
        raise AssertionError(f"validation read the data of {name}")

    monkeypatch.setattr(ModelReader, "get", refuse)


def _mismatched_model(tmp: Path) -> Path:
    """A Llama of the same family whose MLP is narrower (intermediate_size 40, not 48)."""
    import transformers
    from mergekit_fixtures import llama_config

    out = tmp / "mismatch"
    cfg = transformers.LlamaConfig(**{**llama_config().to_dict(), "intermediate_size": 40})
    transformers.LlamaForCausalLM(cfg).save_pretrained(out, max_shard_size="24KB")
    return out


@pytest.mark.parametrize(
    "case, culprit",
    [
        ("missing_role", "role 'safety'"),
        ("duplicate_role", "role 'task' must be given to exactly one model"),
        ("unknown_merge", "merge must be one of"),
        ("peft_linear_merge", "merge must be one of linear, ties, dare_linear, dare_ties; got 'peft-linear' (it mixes "
                              "two LoRA adapters' factors, which mergekit folds into full weights first; use safemerge "
                              "merge --method peft-linear with the adapters)"),
        ("unknown_precision", "precision must be one of ieee, tf32, tf32x3, bf16; got 'fp8'"),
        ("model_level_threshold", "threshold is a setting of the whole merge, which mergekit does not read from a model"),
        ("model_level_report_path", "report_path is a setting of the whole merge, which mergekit does not read from a "
                                    "model; move it to the recipe's top-level parameters:"),
        ("slice_typo", "slices[0]: parameters: unknown parameter 'thresold'"),
        ("slice_merge", "slices[0]: parameters: merge must be one of linear, ties, dare_linear, dare_ties; got 'slerp'"),
        ("dtype", "dtype must be one of bfloat16, float16, float32, float64; got 'bf16'"),
        ("bad_precision_env", "SAFEMERGE_PRECISION must be one of ieee, tf32, tf32x3, bf16; got 'fp8'"),
        ("threshold_range", "threshold must lie in [-1, 1]"),
        ("unknown_method", "merge_method 'safemerj'"),
        ("no_role", "has no role"),
        ("missing_path", "no such directory"),
        ("shape_mismatch", "model.layers.0.mlp.gate_proj.weight has shape"),  # the first in model order
        ("unaligned_dtype", "is torch.float32 in the aligned model but torch.bfloat16 in role unaligned"),
        ("missing_norm", "tensor model.layers.1.input_layernorm.weight is in the aligned model but missing from role task"),
        ("integer_gradient", "seed takes one value, not a gradient [0, 1]"),
        ("integer_gradient_whole_midpoint", "seed takes one value, not a gradient [0, 2]"),  # (0.64 at layer 1 of 3)
        ("integer_gradient_in_filter", "seed takes one value, not a gradient [0, 1]"),
        ("integer_gradient_in_filter_list", "seed takes one value, not a gradient [4, 5]"),
        ("slice_report_path", "slices[0]: parameters: report_path is a setting of the whole run"),
        ("slice_without_base", "slices[0]: the base_model"),
        ("base_model_threshold", "is a setting of the whole merge, which mergekit does not read from a model"),
        ("base_model_typo", "unknown parameter 'alhpa'"),
        ("boolean", "threshold takes a number, not true"),  # (pydantic would read 1.0)
        ("boolean_in_filter", "seed takes a whole number, not false"),
        ("not_a_number", "alpha takes a number; got 'high'"),  # (pydantic's message names no parameter)
        ("fractional_seed", "seed takes a whole number; got 2.5"),
        ("empty_list", "alpha is an empty list"),  # (mergekit would use the default)
    ],
)
def test_bad_recipes_fail_before_loading_weights(pico, tmp_path, no_weight_reads, case, culprit, monkeypatch,
                                                  request):
    cfg = recipe(pico, params={"threshold": 0.35})
    models = cfg["models"]
    if case == "missing_role":
        cfg["models"] = [m for m in models if m["parameters"]["role"] != "safety"]
    elif case == "duplicate_role":
        models[1]["parameters"]["role"] = "task"
    elif case == "unknown_merge":
        cfg["parameters"]["merge"] = "slerp"
    elif case == "peft_linear_merge":
        cfg["parameters"]["merge"] = "peft-linear"
    elif case == "unknown_precision":
        cfg["parameters"]["precision"] = "fp8"
    elif case == "model_level_threshold":
        models[0]["parameters"]["threshold"] = 0.6
    elif case == "model_level_report_path":
        models[0]["parameters"]["report_path"] = str(tmp_path / "model-report")
    elif case in ("slice_typo", "slice_merge", "slice_report_path"):
        own = {"slice_typo": {"thresold": 0.9}, "slice_merge": {"merge": "slerp"},
               "slice_report_path": {"threshold": 0.9, "report_path": str(tmp_path / "slice-report")}}[case]
        cfg["slices"] = [{"sources": [{**m, "layer_range": [0, 2]} for m in cfg.pop("models")]
                          + [{"model": cfg["base_model"], "layer_range": [0, 2]}], "parameters": own}]
    elif case == "slice_without_base":
        cfg["slices"] = [{"sources": [{**m, "layer_range": [0, 2]} for m in cfg.pop("models")]}]
    elif case in ("base_model_threshold", "base_model_typo"):  # the base model listed with settings of its own
        own = {"threshold": 0.9} if case == "base_model_threshold" else {"alhpa": 0.1}
        models.append({"model": cfg["base_model"], "parameters": own})
    elif case == "dtype":
        cfg["dtype"] = "bf16"
    elif case == "bad_precision_env":
        monkeypatch.setenv("SAFEMERGE_PRECISION", "fp8")
    elif case == "threshold_range":
        cfg["parameters"]["threshold"] = 1.5
    elif case == "integer_gradient":  # mergekit would interpolate 0.5 between the layers, then refuse it
        cfg["parameters"]["seed"] = [0, 1]
    elif case == "integer_gradient_whole_midpoint":
        cfg["parameters"]["seed"] = [0, 2]
    elif case == "integer_gradient_in_filter":
        cfg["parameters"]["seed"] = {"filter": "self_attn", "value": [0, 1]}
    elif case == "integer_gradient_in_filter_list":
        cfg["parameters"]["seed"] = [{"filter": "self_attn", "value": 3}, {"value": [4, 5]}]
    elif case == "boolean":
        cfg["parameters"]["threshold"] = True
    elif case == "boolean_in_filter":
        cfg["parameters"]["seed"] = [{"filter": "q_proj", "value": 3}, {"value": False}]
    elif case == "empty_list":
        cfg["parameters"]["alpha"] = []
    elif case == "not_a_number":
        cfg["parameters"]["alpha"] = "high"
    elif case == "fractional_seed":
        cfg["parameters"]["seed"] = 2.5
    elif case == "unknown_method":
        cfg["merge_method"] = "safemerj"
    elif case == "no_role":
        del models[0]["parameters"]["role"]
    elif case == "missing_path":
        models[0]["model"] = str(tmp_path / "nowhere")
    elif case == "shape_mismatch":
        models[2]["model"] = str(_mismatched_model(tmp_path))
    elif case == "unaligned_dtype":  # V = W_a - W_u would carry the bf16 rounding of one side only
        unaligned = next(m for m in models if m["parameters"]["role"] == "unaligned")
        unaligned["model"] = str(request.getfixturevalue("pico_bf16") / "unaligned")
    elif case == "missing_norm":  # a 1-D tensor: mergekit reads it from every input too
        from safetensors.torch import load_file, save_file

        task, name = Path(shutil.copytree(pico.task, tmp_path / "task")), "model.layers.1.input_layernorm.weight"
        index = json.loads((task / "model.safetensors.index.json").read_text())
        shard = task / index["weight_map"].pop(name)
        save_file({k: v for k, v in load_file(shard).items() if k != name}, shard, metadata={"format": "pt"})
        (task / "model.safetensors.index.json").write_text(json.dumps(index))
        next(m for m in models if m["parameters"]["role"] == "task")["model"] = str(task)
    with pytest.raises(SafeMergeError) as err:
        validate_recipe(cfg, "r.yml")
    msg = str(err.value)
    assert culprit in msg and "\n" not in msg, msg


@pytest.mark.parametrize("params, culprit", [({"threshold": 1.5}, r"threshold must lie in \[-1, 1\]"),
                                             ({"threshold": True}, "threshold takes a number, not true"),
                                             ({"seed": False}, "seed takes a whole number, not false"),
                                             ({"alpha": "high"}, "alpha takes a number; got 'high'"),
                                             ({"seed": 2.5}, "seed takes a whole number; got 2.5")])
def test_plain_run_merge_rejects_bad_parameters_while_planning(pico, tmp_path, params, culprit):
    cfg = recipe(pico, params=params)
    register_methods()
    with pytest.raises(Exception, match=culprit):
        run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "o"), MergeOptions(copy_tokenizer=False, quiet=True))
    assert not list((tmp_path).glob("o/*.safetensors"))


def test_plain_run_merge_names_a_duplicate_role(pico, tmp_path):
    """Refused when mergekit plans the merge (it was at the first tensor, naming it), as a recipe is."""
    cfg = recipe(pico)
    cfg["models"][1]["parameters"]["role"] = "task"
    register_methods()
    with pytest.raises(SafeMergeError) as err:
        run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "o"), MergeOptions(copy_tokenizer=False, quiet=True))
    assert str(err.value) == ("merge_config (as mergekit's planner lays it out): modules.default.slices[0]: role 'task' "
                              f"must be given to exactly one model; it is given to 2: {pico.task}, {pico.unaligned}")
    assert not (tmp_path / "o").exists()


# -- console scripts ------------------------------------------------------------------------------


def _script(name: str) -> str:
    path = shutil.which(name, path=os.pathsep.join([sysconfig.get_paths()["scripts"], os.environ.get("PATH", "")]))
    if path is None:
        pytest.skip(f"console script {name} is not installed (pip install -e . installs it)")
    return path


def _write(cfg: dict, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def test_safemerge_yaml_console_script(pico, tmp_path):
    exe = _script("safemerge-yaml")
    cfg = recipe(pico, params={"threshold": TAU, "alpha": 0.8}, dtype="bfloat16")
    out = tmp_path / "out"
    res = subprocess.run([exe, str(_write(cfg, tmp_path / "r.yml")), str(out), "--no-copy-tokenizer"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "flagged" in res.stdout and "cosine min / median / max" in res.stdout
    report = json.loads((out / "safemerge_report.json").read_text())
    assert (out / "safemerge_report.png").is_file() and list(out.glob("*.safetensors"))
    assert report["command"] == "safemerge-yaml" and len(report["layers"]) == 14
    assert any("bfloat16" in w for w in report["warnings"]) and "near_threshold" in report["counts"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
    bad = dict(cfg, parameters={"threshold": 2.0})
    res = subprocess.run([exe, str(_write(bad, tmp_path / "bad.yml")), str(tmp_path / "out2")],
                         capture_output=True, text=True)
    assert res.returncode == 1 and not (tmp_path / "out2").exists()
    assert res.stderr.strip().count("\n") == 0 and "threshold must lie in [-1, 1]" in res.stderr, res.stderr


def test_plain_mergekit_yaml_finds_the_methods(pico, tmp_path):
    exe = _script("mergekit-yaml")
    if not (autoload.site_packages() / autoload.PTH_NAME).is_file():
        pytest.skip(f"{autoload.PTH_NAME} is not in {autoload.site_packages()}: reinstall (pip install -e .) "
                    "or run `safemerge autoload enable`")
    cfg = recipe(pico, params={"threshold": TAU, "alpha": 0.8})
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("SAFEMERGE_NO_AUTOLOAD", "SAFEMERGE_REPORT_DIR")}
    res = subprocess.run([exe, str(_write(cfg, tmp_path / "r.yml")), str(out), "--no-copy-tokenizer"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    want, flags = reference(pico, "safemerge")
    check_all(read_model(out), want)
    report = json.loads((out / "safemerge_report.json").read_text())
    check_report(report, flags, "safemerge")
    assert not list(out.glob(".safemerge_layers*.jsonl"))


def _run_plain_mergekit_yaml(driver: str, pico, tmp_path: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """(OUT_PATH, the finished process) of ``driver`` (a plain mergekit-yaml run, patched) on the
    safemerge recipe, with the autoload hook on (skipped where its .pth is not installed)."""
    if not (autoload.site_packages() / autoload.PTH_NAME).is_file():
        pytest.skip(f"{autoload.PTH_NAME} is not in {autoload.site_packages()}")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("SAFEMERGE_NO_AUTOLOAD", "SAFEMERGE_REPORT_DIR")}
    env["PYTHONPATH"] = str(ROOT)
    recipe_file = _write(recipe(pico, params={"threshold": TAU}), tmp_path / "r.yml")
    return out, subprocess.run([sys.executable, "-c", driver, str(recipe_file), str(out), "--no-copy-tokenizer"],
                               capture_output=True, text=True, timeout=300, env=env)


_MK_EXIT_HOOK_DRIVER = r"""
import sys
sys.argv[0] = "mergekit-yaml"  # (as the console script starts: before mergekit is imported)
import mergekit.merge  # (the autoload hook registers the methods)
import safemerge_ext.mergekit_run as mr


def plot(report, path):  # (a Ctrl-C while the exit hook draws the report's plot)
    raise KeyboardInterrupt


mr.plot = plot
from mergekit.scripts.run_yaml import main
main()
"""


def test_plain_mergekit_yaml_ctrl_c_while_its_report_is_written(pico, tmp_path):
    """A Ctrl-C while plain mergekit-yaml's exit hook writes the report: one line, exit 130, and no
    report (review130: a traceback "Exception ignored in atexit callback", exit 0, and the JSON
    without its plot)."""
    out, res = _run_plain_mergekit_yaml(_MK_EXIT_HOOK_DRIVER, pico, tmp_path)
    assert res.returncode == 130 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == f"safemerge-ext: interrupted while the report was written; no report " \
                                                  f"at {out}"
    assert (out / "config.json").is_file()  # (mergekit's output stays: it is mergekit's, written in place)
    assert not (out / "safemerge_report.json").exists() and not (out / "safemerge_report.png").exists()


_MK_AFTER_CONFIG_DRIVER = r"""
import signal, sys
sys.argv[0] = "mergekit-yaml"  # (as the console script starts: before mergekit is imported)
import mergekit.merge


def card(*a, **k):  # (mergekit writes the model card right after OUT_PATH/config.json)
    signal.raise_signal(signal.SIGINT)


mergekit.merge.generate_card = card
from mergekit.scripts.run_yaml import main
main()
"""


def test_plain_mergekit_yaml_interrupted_after_its_config_gets_no_report(pico, tmp_path):
    """A Ctrl-C after mergekit wrote config.json but before the run ended (click's "Aborted!", exit
    1): no report, as for any interrupted run (review130: the exit hook took config.json for the end
    of the run and wrote the report and its summary)."""
    out, res = _run_plain_mergekit_yaml(_MK_AFTER_CONFIG_DRIVER, pico, tmp_path)
    assert res.returncode == 1 and "Aborted!" in res.stderr, res.stderr[-3000:]
    assert (out / "config.json").is_file()  # (the interrupt came after it)
    assert res.stderr.strip().splitlines()[-1].endswith(
        f"safemerge-ext: no report: the run was interrupted; OUT_PATH {out} holds what was written before that: merge "
        "again into it, or delete it"), res.stderr[-2000:]
    assert not (out / "safemerge_report.json").exists() and not list(out.glob(".safemerge_layers*"))


_MK_TERM_DRIVER = r"""
import signal, sys
sys.argv[0] = "mergekit-yaml"  # (as the console script starts: before mergekit is imported)
import mergekit.merge
import mergekit.io.tensor_writer as tw
import safemerge_ext.mergekit_run as mr

SIG = getattr(signal, sys.argv.pop(1))
real = tw.TensorWriter.save_tensor


def save_tensor(self, *a, **k):  # (the signal comes as mergekit writes a tensor once a layer was recorded)
    if mr.pending_reports():
        signal.raise_signal(SIG)
    return real(self, *a, **k)


tw.TensorWriter.save_tensor = save_tensor
from mergekit.scripts.run_yaml import main
main()
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_plain_mergekit_yaml_terminated_says_so_and_leaves_no_records(pico, tmp_path, sig):
    """SIGTERM or SIGHUP (a scheduler's stop, a closed terminal) ended plain mergekit-yaml without a
    word, its records left in OUT_PATH as a hidden .safemerge_layers file (review182; only
    mergekit-multi had a handler). Now the run ends through the exit hook: exit 128 + the signal,
    one line that says there is no report and what OUT_PATH holds, no records left."""
    import signal

    out, res = _run_plain_mergekit_yaml(_MK_TERM_DRIVER.replace("sys.argv.pop(1)", repr(sig)), pico, tmp_path)
    assert res.returncode == 128 + getattr(signal, sig) and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1].endswith(
        f"safemerge-ext: no report: the run was interrupted; OUT_PATH {out} holds what was written before that: merge "
        "again into it, or delete it"), res.stderr[-2000:]
    assert not list(out.glob(".safemerge_layers*")) and not (out / "safemerge_report.json").exists()
    assert not (out / "config.json").exists()


def test_plain_mergekit_yaml_refusal_is_one_line(pico, tmp_path):
    """A parameter these methods refuse ends plain mergekit-yaml in one line (exit 1), not in
    mergekit's traceback; SAFEMERGE_TRACEBACK=1 brings the traceback back."""
    exe = _script("mergekit-yaml")
    if not (autoload.site_packages() / autoload.PTH_NAME).is_file():
        pytest.skip(f"{autoload.PTH_NAME} is not in {autoload.site_packages()}: reinstall (pip install -e .) "
                    "or run `safemerge autoload enable`")
    bad = _write(recipe(pico, params={"threshold": 2.0}), tmp_path / "bad.yml")
    env = {k: v for k, v in os.environ.items() if k not in ("SAFEMERGE_NO_AUTOLOAD", "SAFEMERGE_TRACEBACK")}

    def refusal(recipe_path: Path, *flags: str) -> str:
        """The last stderr line of a refused run, which wrote nothing and printed no traceback."""
        res = subprocess.run([exe, str(recipe_path), str(tmp_path / "out"), "--no-copy-tokenizer", *flags],
                             capture_output=True, text=True, env=env)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
        assert not (tmp_path / "out").exists()
        return res.stderr.strip().splitlines()[-1]

    assert refusal(bad) == (  # (checked with the recipe, before mergekit plans the merge)
        f"mergekit-yaml: error: {bad}: parameters: threshold must lie in [-1, 1] (it is compared with a cosine); "
        "got 2.0")
    res = subprocess.run([exe, str(bad), str(tmp_path / "out"), "--no-copy-tokenizer"],
                         capture_output=True, text=True, env={**env, "SAFEMERGE_TRACEBACK": "1"})
    assert res.returncode == 1 and "Traceback (most recent call last)" in res.stderr, res.stderr[-3000:]
    # a misspelt parameter, which mergekit's resolver would drop (merging at the default threshold)
    typo = _write(recipe(pico, params={"treshold": 0.3, "alpha": 0.8}), tmp_path / "typo.yml")
    assert refusal(typo) == (
        f"mergekit-yaml: error: {typo}: parameters: unknown parameter 'treshold' for safemerge; known: role, "
        "threshold, alpha, merge, density, seed, report_path, precision")
    # a misspelt key of the recipe itself, which mergekit's configuration drops (review134)
    cfg = recipe(pico, params={"threshold": TAU})
    cfg["paramters"] = cfg.pop("parameters")
    typo = _write(cfg, tmp_path / "typo-key.yml")
    assert refusal(typo) == (f"mergekit-yaml: error: {typo}: 'paramters' is no key mergekit reads (it would drop it "
                             "without a word); did you mean parameters?")
    if not torch.cuda.is_available():  # --cuda where torch sees no CUDA device: one line too
        good = _write(recipe(pico, params={"threshold": TAU}), tmp_path / "good.yml")
        assert refusal(good, "--cuda") == (
            f"mergekit-yaml: error: mergekit's --cuda (MergeOptions.cuda): torch {torch.__version__} has no usable "
            "cuda device here; merge without --cuda, on the CPU")


def test_mergekit_multi_stages_report_into_their_outputs_and_refuse_in_one_line(pico, tmp_path):
    """mergekit-multi (several recipes, each run_merge'd into its own folder): each stage with these
    methods reports into that folder, and a misspelt key in any of its recipes ends the run in one
    line before anything is merged (review176: they merged with no report, at the default setting,
    and a refusal was a traceback)."""
    exe = _script("mergekit-multi")
    if not (autoload.site_packages() / autoload.PTH_NAME).is_file():
        pytest.skip(f"{autoload.PTH_NAME} is not in {autoload.site_packages()}: reinstall (pip install -e .)")
    env = {k: v for k, v in os.environ.items()
           if k not in ("SAFEMERGE_NO_AUTOLOAD", "SAFEMERGE_TRACEBACK", "SAFEMERGE_REPORT_DIR")}
    first = {"name": "first", **recipe(pico, params={"threshold": 0.5})}
    second = recipe(pico, params={"threshold": TAU}, task="first")  # (the final recipe: into --out-path)
    stages = tmp_path / "stages"

    def run(docs: list[dict]) -> subprocess.CompletedProcess:
        (tmp_path / "multi.yml").write_text(yaml.safe_dump_all(docs))
        return subprocess.run([exe, str(tmp_path / "multi.yml"), "-I", str(stages), "--out-path", str(tmp_path / "out"),
                               "--no-copy-tokenizer"], capture_output=True, text=True, env=env)

    typo = dict(second, paramters=second["parameters"])
    del typo["parameters"]
    res = run([first, typo])
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == (
        f"mergekit-multi: error: {tmp_path / 'multi.yml'} (the final recipe): 'paramters' is no key mergekit reads "
        "(it would drop it without a word); did you mean parameters?")
    assert not (stages / "first").exists() and not (tmp_path / "out").exists()

    res = run([first, second])
    assert res.returncode == 0, res.stderr[-3000:]
    for folder, threshold, task in ((stages / "first", 0.5, str(pico.task)), (tmp_path / "out", TAU, str(stages / "first"))):
        report = json.loads((folder / "safemerge_report.json").read_text())
        assert (report["command"], report["settings"]["threshold"]) == ("mergekit-multi", threshold)
        assert report["settings"]["models"]["task"] == task
        assert not list(folder.glob(".safemerge_layers*"))


def test_mergekit_multi_writes_a_stage_report_and_unties_its_head_before_the_next_stage(pico, tmp_path):
    """A stage's report waited for the next stage of these methods, or the exit: a later stage
    killed (SIGTERM skips atexit) lost it, and its head was untied only after a later stage had
    copied its tied config (review177). Both happen as the stage's run_merge returns: here a later
    stage fails, and the reports and configs before it are as they should be. A key given twice in
    a recipe of mergekit's own methods is left to mergekit, as in mergekit-yaml."""
    exe = _script("mergekit-multi")
    if not (autoload.site_packages() / autoload.PTH_NAME).is_file():
        pytest.skip(f"{autoload.PTH_NAME} is not in {autoload.site_packages()}: reinstall (pip install -e .)")
    tied = tmp_path / "tied"
    for name in ("aligned", "unaligned", "task", "safety"):
        m = Path(shutil.copytree(getattr(pico, name), tied / name))
        cfg = json.loads((m / "config.json").read_text())
        (m / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    first = {"name": "first", **recipe(pico, params={"threshold": TAU}, task=str(tied / "task"),
                                       safety=str(tied / "safety"), unaligned=str(tied / "unaligned")),
             "base_model": str(tied / "aligned")}
    copy = "name: copy\nmerge_method: linear\ndtype: float32\ndtype: float32\nmodels:\n  - model: first\n" \
           "    parameters: {weight: 1.0}\n"
    broken = {"merge_method": "linear", "models": [{"model": str(tmp_path / "missing"), "parameters": {"weight": 1.0}}]}
    (tmp_path / "multi.yml").write_text(yaml.safe_dump(first) + "---\n" + copy + "---\n" + yaml.safe_dump(broken))
    env = {k: v for k, v in os.environ.items()
           if k not in ("SAFEMERGE_NO_AUTOLOAD", "SAFEMERGE_TRACEBACK", "SAFEMERGE_REPORT_DIR")}
    res = subprocess.run([exe, str(tmp_path / "multi.yml"), "-I", str(tmp_path / "stages"), "--out-path",
                          str(tmp_path / "out"), "--no-copy-tokenizer"], capture_output=True, text=True,
                         env={**env, "HF_HUB_OFFLINE": "1"})
    assert res.returncode != 0 and "is given twice" not in res.stderr, res.stderr[-3000:]
    stage = tmp_path / "stages" / "first"
    report = json.loads((stage / "safemerge_report.json").read_text())
    assert report["command"] == "mergekit-multi" and report["layers"]
    assert any("lm_head.weight is written as its own tensor" in w for w in report["warnings"])
    assert not list(stage.glob(".safemerge_layers*"))
    for folder in (stage, tmp_path / "stages" / "copy"):
        assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False, folder


def test_mergekit_multi_stage_without_a_report_is_merged_again_next_time(pico, tmp_path, monkeypatch, capsys,
                                                                         request):
    """A mergekit-multi stage voided at exit (a Ctrl-C, an error, a SIGTERM, after mergekit wrote its
    config.json) kept that config.json, and mergekit-multi's --lazy took the folder for a finished
    stage on the next run: reused without a report, its head perhaps still tied (review180). Its
    config.json is removed; a finished stage keeps it. SIGTERM and SIGHUP end a mergekit-multi run
    through the exit hook."""
    import signal

    from safemerge_ext import mergekit_run as mr

    monkeypatch.setattr(mr, "_override", None)
    monkeypatch.delenv(mr.REPORT_DIR_ENV, raising=False)
    monkeypatch.setattr(mr, "_cli_out", [None])

    def stage(name: str, interrupted: bool) -> Path:
        out = tmp_path / name
        monkeypatch.setattr(mr, "_stage_out", [str(out)])
        monkeypatch.setattr(mr, "_interrupts", [signal.SIGTERM] if interrupted else [])
        register_methods()
        run_merge(MergeConfiguration.model_validate(recipe(pico, params={"threshold": TAU})), str(out),
                  MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
        mr._finalize_pending()
        return out

    done = stage("done", interrupted=False)
    assert (done / "config.json").is_file() and (done / "safemerge_report.json").is_file()
    capsys.readouterr()
    voided = stage("voided", interrupted=True)
    assert not (voided / "config.json").exists() and not (voided / "safemerge_report.json").exists()
    assert not list(voided.glob(".safemerge_layers*")) and (voided / "model.safetensors").is_file()
    assert f"removed {voided / 'config.json'}, so that mergekit-multi merges that stage again" in capsys.readouterr().err

    before = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for n, handler in before.items():
        request.addfinalizer(lambda n=n, handler=handler: signal.signal(n, handler))
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    for n in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(n, signal.SIG_DFL)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/python", "my_program.py"])
    mr._install_excepthook()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # (a program of one's own: as it was)
    for script in (["/venv/bin/mergekit-yaml", "r.yml", "out"], ["/venv/bin/mergekit-multi", "m.yml", "-I", "I"]):
        for n in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(n, signal.SIG_DFL)
        monkeypatch.setattr(sys, "argv", script)
        mr._install_excepthook()
        assert signal.getsignal(signal.SIGTERM) is signal.getsignal(signal.SIGHUP) is mr._noted_termination
    with pytest.raises(SystemExit) as ended:
        mr._noted_termination(signal.SIGTERM, None)
    assert ended.value.code == 143 and mr._interrupts[-1] == signal.SIGTERM


def test_mergekit_multi_refusals_name_the_recipe(monkeypatch, tmp_path):
    """What mergekit's planner plans in a mergekit-multi run is named with its recipe in a refusal."""
    from safemerge_ext import mergekit_methods as mm

    args = {"config_file": "m.yml", "intermediate_dir": str(tmp_path / "I"), "out_path": str(tmp_path / "I" / "final")}
    monkeypatch.setattr(mm, "_mergekit_multi_args", lambda: args)
    laid_out = "merge_config (as mergekit's planner lays it out)"
    assert mm._planned_label(tmp_path / "I" / "sm") == f"m.yml (recipe sm): {laid_out}"
    assert mm._planned_label(tmp_path / "I" / "a" / "b") == f"m.yml (recipe a/b): {laid_out}"  # (a stage named a/b)
    assert mm._planned_label(str(tmp_path / "I" / "final")) == f"m.yml (the final recipe): {laid_out}"
    assert mm._planned_label(tmp_path / "elsewhere") == laid_out
    monkeypatch.setattr(mm, "_mergekit_multi_args", lambda: {})
    assert mm._planned_label(tmp_path / "I" / "sm") == laid_out


def test_run_merge_refuses_a_slice_residual_weight(pico, tmp_path):
    """run_merge from Python: a slice's residual_weight, which mergekit never applies, is refused
    as a recipe's is (review179)."""
    cfg = _sliced(pico, (0, 1))
    cfg["slices"][0]["residual_weight"] = 0.3
    with pytest.raises(SafeMergeError) as err:
        merge(cfg, tmp_path / "o")
    assert str(err.value).startswith("merge_config (as mergekit's planner lays it out): "), str(err.value)
    assert str(err.value).endswith("slices[0]: residual_weight is a key mergekit accepts but never applies (the merge "
                                   "would ignore it); remove it"), str(err.value)
    assert not (tmp_path / "o").exists()


def test_safemerge_yaml_explains_a_bus_error(tmp_path, monkeypatch):
    """safemerge-yaml sets the line a SIGBUS (a mapped model file cut short) ends the run with,
    before it reads anything."""
    from safemerge_ext import yaml_cli
    from safemerge_ext._faults import bus_error_line

    lines = []
    monkeypatch.setattr(yaml_cli, "explain_bus_errors", lines.append)
    with pytest.raises(SystemExit):
        yaml_cli.main([str(tmp_path / "missing.yml"), str(tmp_path / "out")])
    assert lines == [bus_error_line("safemerge-yaml", f"nothing was written to OUT_PATH {tmp_path / 'out'}")]


@pytest.mark.parametrize("where", ["top", "module", "slice", "model"])
def test_parameter_names_are_checked_wherever_mergekit_reads_them(where):
    """check_parameter_names (plain mergekit-yaml's check, and safemerge-yaml's) refuses a misspelt
    parameter at the top level, on a module (whose slices mergekit gives its parameters), on a
    slice, and a whole-merge setting under one model, naming the recipe and the place."""
    from mergekit.config import MergeConfiguration

    from safemerge_ext.yaml_cli import check_parameter_names

    sources = [{"model": "./a", "layer_range": [0, 2]}] + [
        {"model": f"./{r[0]}", "layer_range": [0, 2], "parameters": {"role": r}} for r in ("task", "safety", "unaligned")]
    module = {"slices": [{"sources": sources}]}
    cfg = {"merge_method": "safemerge", "base_model": "./a", "modules": {"text": module}}
    if where == "top":
        cfg["parameters"], want = {"treshold": 0.3}, "r.yml: parameters: unknown parameter 'treshold'"
    elif where == "module":
        module["parameters"], want = {"treshold": 0.3}, "r.yml: modules.text: parameters: unknown parameter 'treshold'"
    elif where == "slice":
        module["slices"][0]["parameters"] = {"treshold": 0.3}
        want = "r.yml: modules.text.slices[0]: parameters: unknown parameter 'treshold'"
    else:
        sources[1]["parameters"]["threshold"] = 0.3
        want = "r.yml: modules.text.slices[0]: model ./t: threshold is a setting of the whole merge"
    with pytest.raises(SafeMergeError) as err:
        check_parameter_names(MergeConfiguration.model_validate(cfg), "safemerge", "r.yml")
    assert str(err.value).startswith(want), str(err.value)
    # the same recipe with the setting spelt right, in a place mergekit reads it, passes
    for table in (cfg.get("parameters"), module.get("parameters"), module["slices"][0].get("parameters")):
        if table:
            table["threshold"] = table.pop("treshold")
    if where == "model":
        cfg["parameters"] = {"threshold": sources[1]["parameters"].pop("threshold")}
    check_parameter_names(MergeConfiguration.model_validate(cfg), "safemerge", "r.yml")


@pytest.mark.parametrize("where", ["top", "model"])
def test_run_merge_refuses_a_misspelt_parameter(pico, tmp_path, where):
    """run_merge from Python: mergekit's planner drops a name the method does not declare (its
    in-memory API refuses it); the methods check the configuration it plans, as a recipe, before
    the merge starts, and the same configuration spelt right merges."""
    cfg = recipe(pico, params={"treshold": TAU} if where == "top" else {})
    if where == "model":
        cfg["models"][0]["parameters"]["threshold"] = TAU
    label = "merge_config (as mergekit's planner lays it out): "
    want = (f"{label}parameters: unknown parameter 'treshold' for safemerge; known: role, threshold" if where == "top"
            else f"{label}modules.default.slices[0]: model {pico.task}: threshold is a setting of the whole merge")
    with pytest.raises(SafeMergeError) as err:
        merge(cfg, tmp_path / "o")
    assert str(err.value).startswith(want), str(err.value)
    assert not (tmp_path / "o").exists()
    if where == "model":
        del cfg["models"][0]["parameters"]["threshold"]
    cfg["parameters"] = {"threshold": TAU}
    out, report = merge(cfg, tmp_path / "p")
    assert out and report["settings"]["threshold"] == TAU


@pytest.mark.parametrize("options, want", [
    ({"cuda": True}, "--cuda (MergeOptions.cuda): torch {v} has no usable cuda device here; merge without --cuda, "
                     "on the CPU"),
    ({"device": "cuda:1"}, "--device cuda:1 (MergeOptions.device): torch {v} has no usable cuda device here; "
                           "use --device cpu"),
    # (with or without an Apple GPU: the scores and their checks are float64, which MPS lacks)
    ({"device": "mps"}, "--device mps (MergeOptions.device): safemerge-ext's methods compute in float64, which "
                        "Apple's MPS cannot hold; use --device cpu"),
    ({"device": "CUDA"}, "--device CUDA (MergeOptions.device): not a device name torch knows; use cpu, cuda or cuda:N"),
])
def test_run_merge_refuses_a_device_torch_lacks(pico, tmp_path, options, want):
    """mergekit's --cuda / --device where torch has no such device: one line before the merge
    starts (mergekit alone fails at its first tensor with a traceback), and nothing is written."""
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("the refusals are for a torch that sees no CUDA or MPS device")
    with pytest.raises(SafeMergeError) as err:
        merge(recipe(pico, params={"threshold": TAU}), tmp_path / "o", **options)
    assert str(err.value) == "mergekit's " + want.format(v=torch.__version__)
    assert not (tmp_path / "o").exists()


def test_the_mergekit_report_says_what_ran_on_what(pico, tmp_path, monkeypatch):
    """The mergekit faces' report records, as the command line's does, the inputs by role (with a
    LoRA's folder), how each input was on disk, the device, the backend and precision asked for,
    the libraries and the report's schema version (review143: none of these were there)."""
    monkeypatch.setenv("SAFEMERGE_BACKEND", "torch")
    cfg = recipe(pico, params={"threshold": TAU}, task=f"{pico.aligned}+{pico.lora_task}")
    _, report = merge(cfg, tmp_path / "o", lora_merge_dtype="float32", lora_merge_cache=str(tmp_path / "cache"))
    assert report["schema_version"] == 1
    assert {"torch", "mergekit"} <= set(report["environment"]["libraries"])
    s = report["settings"]
    assert s["models"] == {"aligned": str(pico.aligned), "task": f"{pico.aligned}+{pico.lora_task}",
                           "unaligned": str(pico.unaligned), "safety": str(pico.safety)}
    assert (s["device"], s["backend_requested"], s["precision_requested"]) == ("cpu", "torch (SAFEMERGE_BACKEND)", "ieee")
    assert set(report["inputs"]) == {"aligned", "task", "task_lora", "unaligned", "safety"}
    lora = report["inputs"]["task_lora"]
    assert lora["path"] == str(Path(pico.lora_task).resolve())
    assert lora["files"]["adapter_config.json"]["sha256"] == hashlib.sha256(
        (Path(pico.lora_task) / "adapter_config.json").read_bytes()).hexdigest()
    assert "header_sha256" in lora["files"]["adapter_model.safetensors"]


def test_an_unknown_role_names_its_model(pico, tmp_path):
    """run_merge (and plain mergekit-yaml) with a role no method has: one line that names the model,
    as safemerge-yaml's does, not pydantic's multi-line error about a literal."""
    cfg = recipe(pico, params={"threshold": TAU})
    (bad,) = [m for m in cfg["models"] if m["parameters"]["role"] == "safety"]
    bad["parameters"]["role"] = "safe"
    with pytest.raises(SafeMergeError) as err:
        merge(cfg, tmp_path / "o")
    assert str(err.value).endswith(f": model {pico.safety}: role 'safe'; safemerge takes the roles task, safety, "
                                   "unaligned"), str(err.value)
    assert not (tmp_path / "o").exists()
    with pytest.raises(SafeMergeError, match=f"model {re.escape(str(pico.safety))} has role 'safe'; safemerge takes"):
        validate_recipe(cfg, "r.yml")


def test_safemerge_yaml_refuses_a_missing_device_before_folding_any_lora(pico, tmp_path, capsys):
    """safemerge-yaml checks mergekit's --cuda with the recipe, before mergekit folds a model+lora
    input into the LoRA cache (for a 7B recipe, minutes and a model copy on disk)."""
    from safemerge_ext import yaml_cli

    if torch.cuda.is_available():
        pytest.skip("the refusal is for a torch that sees no CUDA device")
    cache = tmp_path / "lora-cache"
    cfg = recipe(pico, params={"threshold": TAU}, task=f"{pico.aligned}+{pico.lora_task}")
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(_write(cfg, tmp_path / "r.yml")), str(tmp_path / "out"), "--no-copy-tokenizer", "--cuda",
                       "--lora-merge-cache", str(cache)])
    assert done.value.code == 1
    assert capsys.readouterr().err == (f"safemerge-yaml: error: mergekit's --cuda (MergeOptions.cuda): torch "
                                       f"{torch.__version__} has no usable cuda device here; merge without --cuda, "
                                       "on the CPU\n")
    assert not cache.exists() or not any(cache.iterdir())
    assert not (tmp_path / "out").exists()


def test_safemerge_yaml_refuses_multi_gpu_without_an_accelerator_and_a_bad_lora_merge_dtype(pico, tmp_path, capsys,
                                                                                          monkeypatch):
    """--multi-gpu where torch sees no accelerator (mergekit 0.1.5's executor fails with "'NoneType'
    object has no attribute 'type'") and a --lora-merge-dtype mergekit cannot fold in ("fp32": its
    "Unimplemented dtype" named no option) were found only after every LoRA input was folded
    (review134): both are refused with the recipe, in one line. --gpu-rich's refusal named --multi-gpu,
    which the user had not typed and could not turn off (review199)."""
    from safemerge_ext import yaml_cli

    if hasattr(torch, "accelerator"):
        monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cache = tmp_path / "lora-cache"
    cfg = _write(recipe(pico, params={"threshold": TAU}, task=f"{pico.aligned}+{pico.lora_task}"), tmp_path / "r.yml")
    for flags, want in ((["--multi-gpu"], f"mergekit's --multi-gpu (MergeOptions.multi_gpu): torch {torch.__version__} "
                                         "sees no accelerator here; merge without --multi-gpu, on the CPU"),
                        # (--gpu-rich sets multi_gpu whatever --no-multi-gpu says: the line names what was typed)
                        (["--gpu-rich", "--no-multi-gpu"], "mergekit's --gpu-rich (MergeOptions.gpu_rich, which sets "
                         f"--multi-gpu and --cuda): torch {torch.__version__} sees no accelerator here; merge without "
                         "--gpu-rich, on the CPU"),
                        (["--lora-merge-dtype", "fp32"], "--lora-merge-dtype fp32: not a dtype mergekit folds LoRA "
                         "inputs in; use float32, bfloat16, float16, float64 (float32 is the default here)")):
        with pytest.raises(SystemExit) as done:
            yaml_cli.main([str(cfg), str(tmp_path / "out"), "--no-copy-tokenizer", "--lora-merge-cache", str(cache),
                           *flags])
        assert done.value.code == 1
        assert capsys.readouterr().err == f"safemerge-yaml: error: {want}\n"
        assert not cache.exists() or not any(cache.iterdir())
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("nested", [True, False])
def test_a_model_card_hub_question_that_fails_is_refused_before_the_merge(pico, tmp_path, capsys, monkeypatch,
                                                                          nested):
    """mergekit's model card asks the Hub whether a local folder written a/b is a Hub model once every
    tensor is written: offline, the whole merge ran and was thrown away with "merge failed: ConnectError:
    [Errno -2] Name or service not known" (review199). Asked before any model loads, and refused in
    one line that names the path and the remedies; ./a/b, --no-write-model-card, or a Hub that answers,
    merge. mergekit asks about a bare folder name too (review201)."""
    import huggingface_hub
    import mergekit.io.tasks

    from safemerge_ext import yaml_cli
    from safemerge_ext.yaml_cli import check_card_lookups

    from huggingface_hub.utils import validate_repo_id

    asked = []

    def offline(repo_id, **kwargs):  # (as huggingface_hub does: an id such as ./a is refused before it asks)
        validate_repo_id(repo_id)
        asked.append(repo_id)
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "repo_exists", offline)
    monkeypatch.chdir(pico.root.parent if nested else pico.root)
    rel = {role: f"{pico.root.name}/{role}" if nested else role for role in ("aligned", "task", "safety", "unaligned")}
    cfg = {**recipe(pico, params={"threshold": TAU}, task=rel["task"], safety=rel["safety"],
                    unaligned=rel["unaligned"]), "base_model": rel["aligned"]}
    recipe_file = _write(cfg, tmp_path / "r.yml")
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(recipe_file), str(tmp_path / "out"), "--no-copy-tokenizer"])
    assert done.value.code == 1
    err = capsys.readouterr().err
    path = asked[0]
    assert err == (f"safemerge-yaml: error: {recipe_file}: {path}: mergekit's model card asks the Hugging Face Hub "
                   "whether this local folder is a Hub model, and that failed (ConnectionError: [Errno -2] Name or "
                   "service not known), which would fail the run after the merge; write the path as "
                   f"./{path}, or pass --no-write-model-card\n")
    assert path in rel.values() and not (tmp_path / "out").exists()
    monkeypatch.setattr(mergekit.io.tasks.LoadTensor, "execute", lambda self: pytest.fail("a tensor loaded"))
    register_methods()
    with pytest.raises(SafeMergeError, match=r"^merge_config \(as mergekit's planner lays it out\): .*, or pass "
                                             r"--no-write-model-card \(MergeOptions\.write_model_card=False\)$"):
        with report_to(tmp_path / "rm"):
            run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "rm"),
                      MergeOptions(copy_tokenizer=False, quiet=True))
    # nothing is asked where the card is not written, or the paths are not a/b; a Hub that answers passes
    asked.clear()
    config = MergeConfiguration.model_validate(cfg)
    check_card_lookups(config, False, "r.yml")
    dotted = {**cfg, "base_model": f"./{rel['aligned']}",
              "models": [{**m, "model": f"./{m['model']}"} for m in cfg["models"]]}
    check_card_lookups(MergeConfiguration.model_validate(dotted), True, "r.yml")
    assert asked == []
    monkeypatch.setattr(huggingface_hub, "repo_exists",
                        lambda repo_id, **kw: validate_repo_id(repo_id) or asked.append(repo_id) or False)
    check_card_lookups(config, True, "r.yml")
    assert sorted(asked) == sorted(rel.values())
    # mergekit-multi names a stage's folder -I/<name>: the remedy is the -I it was given
    monkeypatch.setattr(huggingface_hub, "repo_exists", offline)
    stage = pico.root.name if nested else os.curdir  # (-I . names them ./<name>, which the Hub is not asked about)
    with pytest.raises(SafeMergeError, match=(rf"; for a stage of the file, give mergekit-multi's -I as \./{pico.root.name} or an absolute path, else write "
                                              rf"the path as \./{pico.root.name}/\w+"
                                              if nested else r"; write the path as \./(aligned|task|safety|unaligned)")
                       + r", or pass -X$"):
        check_card_lookups(MergeConfiguration.model_validate(cfg), True, "r.yml", "-X", stages=stage)


@pytest.mark.parametrize("flags, want", [
    (["-j", "0"], "Invalid value for '--num-threads' / '-j': 0 is not in the range x>=1."),
    (["--random-seed", "-1"], "Invalid value for '--random-seed': -1 is not in the range 0<=x<=4294967295."),
    (["--random-seed", "4294967296"], "Invalid value for '--random-seed': 4294967296 is not in the range "
                                      "0<=x<=4294967295."),
    (["--out-shard-size", "-1"], "Invalid value for '--out-shard-size': '-1' is not a size such as 500M or 5B"),
    (["--out-shard-size", "abc"], "Invalid value for '--out-shard-size': 'abc' is not a size such as 500M or 5B"),
    (["--forc"], "No such option '--forc'. Did you mean '--force'?"),
    ([], "Missing argument 'OUT_PATH'."),
])
def test_safemerge_yaml_command_line_errors_are_one_line(pico, tmp_path, capsys, flags, want):
    """mergekit's -j 0, --random-seed -1 and --out-shard-size abc ended in a traceback once mergekit
    applied them (torch.set_num_threads, numpy's seed, a bare ValueError), and click's usage errors
    were a usage block, a hint and the error (review140): one line, exit 2, nothing written."""
    from safemerge_ext import yaml_cli

    argv = [str(_write(recipe(pico, params={"threshold": TAU}), tmp_path / "r.yml"))]
    argv += [str(tmp_path / "out"), "--no-copy-tokenizer", *flags] if flags else []
    with pytest.raises(SystemExit) as done:
        yaml_cli.main(argv)
    assert done.value.code == 2
    assert capsys.readouterr().err == f"safemerge-yaml: error: {want} (see safemerge-yaml --help)\n"
    assert not (tmp_path / "out").exists()


def test_safemerge_yaml_takes_a_shard_size(pico, tmp_path):
    """--out-shard-size as mergekit reads it (500M, 5B, a number) still works through the check."""
    from safemerge_ext import yaml_cli

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(_write(recipe(pico, params={"threshold": TAU}), tmp_path / "r.yml")), str(out),
                       "--no-copy-tokenizer", "--out-shard-size", "20K"])
    assert done.value.code in (0, None)
    assert len(list(out.glob("model-*.safetensors"))) > 1


@pytest.mark.parametrize("where", ["out", "inside", "file"])
def test_safemerge_yaml_refuses_a_lora_cache_the_output_would_replace(pico, tmp_path, capsys, where):
    """--lora-merge-cache OUT_PATH failed after every LoRA was folded ("appeared while this run was
    writing"), one inside OUT_PATH was deleted by --force, a file failed after the work
    (review140): refused with the recipe, nothing folded."""
    from safemerge_ext import yaml_cli

    out = tmp_path / "out"
    cache = {"out": out, "inside": out / "cache", "file": tmp_path / "r.yml"}[where]
    cfg = _write(recipe(pico, params={"threshold": TAU}, task=f"{pico.aligned}+{pico.lora_task}"), tmp_path / "r.yml")
    if where == "inside":
        out.mkdir()
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(cfg), str(out), "--no-copy-tokenizer", "--force", "--lora-merge-cache", str(cache)])
    assert done.value.code == 1
    want = (f"--lora-merge-cache {cache} is a file; give a folder" if where == "file" else
            f"--lora-merge-cache {cache} is OUT_PATH or inside it, which the output replaces; give a folder "
            "elsewhere (or leave the option out: a temporary one is used)")
    assert capsys.readouterr().err == f"safemerge-yaml: error: {want}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["r.yml", *(["out"] if where == "inside" else [])])
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("where", ["OUT_PATH", "cache", "cache under"])
def test_safemerge_yaml_refuses_a_path_through_a_link_to_nothing(pico, tmp_path, capsys, where):
    """OUT_PATH under a symbolic link that names nothing (an unmounted disk), or a
    --lora-merge-cache that is or is under one: one line with the recipe, naming the link and where
    it points; the run merged everything, or folded, then failed with a raw FileExistsError."""
    from safemerge_ext import yaml_cli

    far = tmp_path / "unplugged"
    big = tmp_path / "big"
    big.symlink_to(far)
    out, cache = tmp_path / "out", tmp_path / "cache"
    if where == "OUT_PATH":
        out = big / "out"
    else:
        cache = big / "cache" if where == "cache under" else big
    cfg = _write(recipe(pico, params={"threshold": TAU}, task=f"{pico.aligned}+{pico.lora_task}"), tmp_path / "r.yml")
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(cfg), str(out), "--no-copy-tokenizer", "--lora-merge-cache", str(cache)])
    flag, path = ("OUT_PATH", out) if where == "OUT_PATH" else ("--lora-merge-cache", cache)
    named = f"{flag} {path}" + (f": {big}" if path != big else "")
    assert done.value.code == 1
    assert capsys.readouterr().err == (f"safemerge-yaml: error: {named} links to {far}, which does not exist; create "
                                       "it, or give a path that is no such link\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "r.yml"]


@pytest.mark.parametrize("value, want", [
    ("bogus", "SAFEMERGE_BACKEND must be one of auto, triton, cuda, cpp, torch; got 'bogus'"),
    ("cuda", "SAFEMERGE_BACKEND=cuda: backend 'cuda' runs on cuda tensors, not cpu: use --device cuda or another "
             "backend ({others})"),
])
def test_safemerge_yaml_checks_the_backend_setting_before_folding(pico, tmp_path, capsys, monkeypatch, value, want):
    """SAFEMERGE_BACKEND naming no backend, or one that cannot run on mergekit's device, failed at
    the first tensor, after every LoRA input was folded (review140); SAFEMERGE_PRECISION was
    already checked with the recipe: so is this, for plain mergekit-yaml's check too."""
    from safemerge_ext import yaml_cli
    from safemerge_ext.backends import available_backends

    monkeypatch.setenv("SAFEMERGE_BACKEND", value)
    others = ", ".join(n for n in ("cpp", "torch") if available_backends()[n] is None)
    cache = tmp_path / "lora-cache"
    cfg = _write(recipe(pico, params={"threshold": TAU}, task=f"{pico.aligned}+{pico.lora_task}"), tmp_path / "r.yml")
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(cfg), str(tmp_path / "out"), "--no-copy-tokenizer", "--lora-merge-cache", str(cache)])
    assert done.value.code == 1
    assert capsys.readouterr().err == f"safemerge-yaml: error: {want.format(others=others)}\n"
    assert not cache.exists() and not (tmp_path / "out").exists()
    with pytest.raises(SafeMergeError) as err:  # (run_merge: what plain mergekit-yaml runs)
        merge(recipe(pico, params={"threshold": TAU}), tmp_path / "o")
    assert str(err.value) == want.format(others=others) and not (tmp_path / "o").exists()


def test_safemerge_yaml_refuses_a_bad_cpu_isa_setting_as_safemerge_does(pico, tmp_path, capsys, monkeypatch):
    """SAFEMERGE_CPU_ISA naming no kernels, under backend auto: `safemerge` refuses it in one line;
    safemerge-yaml merged on torch after a two-line Python UserWarning inside mergekit's progress
    bar (review144). Now the same one line, before the merge."""
    from safemerge_ext import backends, cpp_backend, yaml_cli

    if backends.available_backends()["cpp"] is not None:
        pytest.skip("the C++ backend is unavailable here")
    monkeypatch.setattr(cpp_backend, "_warned", set())
    try:
        monkeypatch.setenv("SAFEMERGE_CPU_ISA", "avx9")
        with pytest.raises(SystemExit) as done:
            yaml_cli.main([str(_write(recipe(pico, params={"threshold": TAU}), tmp_path / "r.yml")),
                           str(tmp_path / "out"), "--no-copy-tokenizer"])
        assert done.value.code == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("safemerge-yaml: error: SAFEMERGE_CPU_ISA='avx9' is not one "
                                                       "of best, "), err
        assert "SAFEMERGE_BACKEND=torch" in err and not (tmp_path / "out").exists()
    finally:
        monkeypatch.delenv("SAFEMERGE_CPU_ISA")
        backends.available_backends()  # (puts back the CPU's own kernels)


@pytest.mark.parametrize("broken, want", [
    ("missing", "safemerge-yaml: error: it needs mergekit: pip install 'safemerge-ext[mergekit]'"),
    ("other version", "safemerge-yaml: error: mergekit is installed but does not import (cannot import name "
                      "'MergeOptions' from 'mergekit.options' (unknown location)); install the versions of its "
                      "requirements it supports (python -c 'import mergekit.options' shows where it fails)"),
])
def test_safemerge_yaml_says_whether_mergekit_is_missing_or_broken(capsys, monkeypatch, broken, want):
    """Any ImportError was "it needs mergekit: pip install ...", also where mergekit is installed and
    does not import as this package expects, where reinstalling changes nothing (review144)."""
    import safemerge_ext
    from safemerge_ext.cli import yaml_main

    monkeypatch.delitem(sys.modules, "safemerge_ext.yaml_cli")
    monkeypatch.delattr(safemerge_ext, "yaml_cli")
    if broken == "missing":  # (as Python reads a None there: not installed)
        for name in ("mergekit", "mergekit.config"):
            monkeypatch.setitem(sys.modules, name, None)
    else:
        monkeypatch.setitem(sys.modules, "mergekit.options", types.ModuleType("mergekit.options"))
    with pytest.raises(SystemExit) as done:
        yaml_main(["r.yml", "out"])
    assert done.value.code == 1
    assert capsys.readouterr().err == want + "\n"


def test_safemerge_yaml_refuses_one_model_in_two_roles(pico, tmp_path, capsys):
    """The task model given again as the safety model (./a and a/ are one folder): mergekit refuses
    it too ("Duplicate merge inputs"), but only after folding every LoRA input (review140)."""
    from safemerge_ext import yaml_cli

    cfg = recipe(pico, params={"threshold": TAU}, safety=f"{pico.task}/")
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(_write(cfg, tmp_path / "r.yml")), str(tmp_path / "out"), "--no-copy-tokenizer"])
    assert done.value.code == 1
    assert capsys.readouterr().err == (
        f"safemerge-yaml: error: {tmp_path / 'r.yml'}: models: models {pico.task} (role task) and {pico.task}/ (role "
        "safety) are the same "
        "model, so a flagged layer would get the task update back, with no safety in it; give each role its own "
        "model\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["two-roles", "base-role"])
def test_run_merge_checks_the_roles_as_safemerge_yaml_does(pico, tmp_path, case):
    """run_merge (plain mergekit-yaml, mergekit-multi): the task model given again as the safety
    model under another spelling passed mergekit's "Duplicate merge inputs" check and merged every
    flagged layer back to the task update, exit 0; a role on the base model was dropped without a
    word (review176). Both are refused before the merge, as safemerge-yaml refuses them."""
    cfg = recipe(pico, params={"threshold": TAU}, safety=f"{pico.task}/")
    want = (f"models {pico.task} (role task) and {pico.task}/ (role safety) are the same model, so a flagged layer "
            "would get the task update back, with no safety in it; give each role its own model")
    if case == "base-role":
        cfg = recipe(pico, params={"threshold": TAU})
        cfg["models"].append({"model": str(pico.aligned), "parameters": {"role": "safety"}})
        want = f"{pico.aligned} is the base_model (the aligned model) and must not have a role; got role 'safety'"
    with pytest.raises(SafeMergeError) as err:
        merge(cfg, tmp_path / "o")
    assert str(err.value).startswith("merge_config (as mergekit's planner lays it out): "), str(err.value)
    assert str(err.value).endswith(want), str(err.value)
    assert not (tmp_path / "o").exists()


def test_safemerge_yaml_calls_an_empty_recipe_path_so(tmp_path, capsys):
    from safemerge_ext import yaml_cli

    with pytest.raises(SystemExit) as done:
        yaml_cli.main(["", str(tmp_path / "out")])
    assert done.value.code == 1
    assert capsys.readouterr().err == "safemerge-yaml: error: CONFIG_FILE is empty; give a path\n"


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_safemerge_yaml_output_files_follow_the_umask(pico, tmp_path, umask):
    """safetensors 0.8 writes mergekit's shards 0600 whatever the umask (safetensors#782), so
    another account serving the merged model could not read its weights while every other file
    was readable (review135): the output's files all get the umask's modes."""
    import stat

    from safemerge_ext import yaml_cli

    out = tmp_path / "out"
    old = os.umask(umask)
    try:
        with pytest.raises(SystemExit) as done:
            yaml_cli.main([str(_write(recipe(pico, params={"threshold": TAU}), tmp_path / "r.yml")), str(out),
                           "--no-copy-tokenizer"])
    finally:
        os.umask(old)
    assert done.value.code in (0, None)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()}
    assert any(name.endswith(".safetensors") for name in modes) and "safemerge_report.json" in modes
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_safemerge_yaml_refused_because_the_output_exists_names_a_killed_runs_leftovers(pico, tmp_path, capsys):
    """The leftovers of a killed run beside an OUT_PATH that exists are named before the refusal
    (they went unnamed until a --force run; review130)."""
    from safemerge_ext import yaml_cli

    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / ".out.tmp-0a1b2c3d").mkdir()
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(_write(recipe(pico, params={"threshold": TAU}), tmp_path / "r.yml")), str(out)])
    assert done.value.code == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"safemerge-yaml: warning: {tmp_path / '.out.tmp-0a1b2c3d'} holds a partial output of an "
                      f"earlier run for OUT_PATH {out} that was killed; delete it unless a run is writing there now")
    assert err[1].startswith(f"safemerge-yaml: error: OUT_PATH {out} already exists") and len(err) == 2


def _sliced(p, task_range: tuple[int, int]) -> dict:
    """safemerge over one slice of the pico models, the task's source taking ``task_range``."""
    def source(path, role=None, layers=(0, 1)):
        return {"model": str(path), "layer_range": list(layers), **({"parameters": {"role": role}} if role else {})}

    return {"merge_method": "safemerge", "base_model": str(p.aligned), "dtype": "float32",
            "parameters": {"threshold": TAU},
            "slices": [{"sources": [source(p.aligned), source(p.task, "task", task_range), source(p.safety, "safety"),
                                    source(p.unaligned, "unaligned")]}]}


def test_a_slice_source_offset_to_other_layers_is_refused_before_the_merge(pico, tmp_path):
    """W_task of layer 1 minus W_aligned of layer 0 is no task update: safemerge-yaml and run_merge
    scored and merged it without a word (review134); each source must take the aligned model's
    layers."""
    with pytest.raises(SafeMergeError, match=r"r.yml: slices\[0\]: model .*task takes layer_range \[1, 2\] but the "
                                             r"base_model .* \(the aligned model\) takes \[0, 1\]; safemerge pairs"):
        validate_recipe(_sliced(pico, (1, 2)), "r.yml")
    register_methods()
    with report_to(tmp_path / "o"), pytest.raises(SafeMergeError, match=r"slices\[0\]: .* takes layer_range \[1, 2\]"):
        run_merge(MergeConfiguration.model_validate(_sliced(pico, (1, 2))), str(tmp_path / "o"),
                  MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    validate_recipe(_sliced(pico, (0, 1)), "r.yml")  # (the same layers pass, as any frankenmerge slice does)
    got, _ = merge(_sliced(pico, (1, 2)) | {"slices": [{"sources": [
        dict(s, layer_range=[1, 2]) for s in _sliced(pico, (1, 2))["slices"][0]["sources"]]}]}, tmp_path / "o2")
    assert got  # (one slice of other layers, all its sources alike: merged)


@pytest.mark.parametrize("edit, want", [
    (lambda r: r.__setitem__("paramters", r.pop("parameters")), r"r.yml: 'paramters' is no key mergekit reads .* did "
                                                                r"you mean parameters\?"),
    (lambda r: r.__setitem__("tokenizer_sorce", "base"), "'tokenizer_sorce' .* did you mean tokenizer_source"),
    (lambda r: r["models"][0].__setitem__("paramters", {"threshold": 0.5}), r"models\[0\]: 'paramters'"),
    (lambda r: r.__setitem__("parameters", {"threshold": [{"fliter": "self_attn", "value": 0.5}, {"value": TAU}]}),
     r"parameters.threshold\[0\]: 'fliter' .* did you mean filter"),
    (lambda r: r.__setitem__("tokenizer", {"source": "base", "tokns": {}}), r"tokenizer: 'tokns' .* did you mean tokens"),
    (lambda r: r.__setitem__("embed_slerp", True), "'embed_slerp' is no key mergekit reads"),
], ids=["parameters", "tokenizer_source", "model-parameters", "filter", "tokenizer-tokens", "unknown"])
def test_a_key_mergekit_drops_is_refused(pico, tmp_path, edit, want):
    """mergekit's configuration drops keys it does not declare: a misspelt `paramters:` merged at the
    default threshold instead of the recipe's, a misspelt `fliter:` gave its value to every tensor,
    with no word (review134). safemerge-yaml refuses them with the recipe (plain mergekit-yaml too:
    test_plain_mergekit_yaml_refusal_is_one_line)."""
    cfg = recipe(pico, params={"threshold": TAU})
    edit(cfg)
    with pytest.raises(SafeMergeError, match=want):
        validate_recipe(cfg, "r.yml")


def test_a_slice_residual_weight_is_refused(pico):
    """mergekit 0.1.5 declares a slice's residual_weight and never reads it: a recipe that sets it
    merged as if it were not there (review176)."""
    cfg = _sliced(pico, (0, 1))
    validate_recipe(cfg, "r.yml")
    cfg["slices"][0]["residual_weight"] = 0.5
    with pytest.raises(SafeMergeError, match=r"^r\.yml: slices\[0\]: residual_weight is a key mergekit accepts but "
                                             r"never applies \(the merge would ignore it\); remove it$"):
        validate_recipe(cfg, "r.yml")


def test_a_role_given_per_tensor_is_refused_in_words(pico):
    """A role is one value for the whole model; a filter list printed pydantic's objects (review134)."""
    cfg = recipe(pico, params={"threshold": TAU})
    cfg["models"][1]["parameters"]["role"] = [{"filter": "self_attn", "value": "safety"}, {"value": "task"}]
    with pytest.raises(SafeMergeError, match=r"role must be one value for the whole model, not a list or a filter; "
                                             r"give one of task, safety, unaligned$"):
        validate_recipe(cfg, "r.yml")


def test_safemerge_yaml_says_a_too_deeply_nested_recipe_in_one_line(tmp_path, capsys):
    """PyYAML reads nested collections recursively: 2000 of them were a RecursionError's traceback
    (review137)."""
    from safemerge_ext import yaml_cli

    recipe = tmp_path / "r.yml"
    recipe.write_text("merge_method: safemerge\nfoo: " + "[" * 2000 + "]" * 2000 + "\n")
    with pytest.raises(SystemExit) as exc:
        yaml_cli.main([str(recipe), str(tmp_path / "out")])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(recipe) in err and "not valid YAML" in err, err
    assert not (tmp_path / "out").exists()


def test_a_recipe_key_given_twice_is_refused(pico, tmp_path, capsys, monkeypatch):
    """PyYAML keeps the last of two equal keys without a word: a second `threshold:` further down
    quietly replaced the first (review137). safemerge-yaml and plain mergekit-yaml's check refuse it."""
    from safemerge_ext import mergekit_methods, yaml_cli

    text = yaml.safe_dump(recipe(pico, params={"threshold": TAU})) + "parameters:\n  threshold: 0.1\n"
    (tmp_path / "r.yml").write_text(text)
    line = text.count("\n") - 1
    want = f"key 'parameters' is given twice (also at line {text.splitlines().index('parameters:') + 1}); keep one " \
           f"at line {line}, column 1"
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(tmp_path / "r.yml"), str(tmp_path / "out")])
    assert done.value.code == 1 and not (tmp_path / "out").exists()
    assert capsys.readouterr().err == f"safemerge-yaml: error: {tmp_path / 'r.yml'}: not valid YAML ({want})\n"
    monkeypatch.setattr(mergekit_methods, "_in_mergekit_yaml", lambda: True)
    monkeypatch.setattr(mergekit_methods, "_mergekit_yaml_args", lambda: {"config_file": str(tmp_path / "r.yml")})
    monkeypatch.setattr(mergekit_methods, "_recipe_checked", [])
    with pytest.raises(SafeMergeError, match=re.escape(f"{tmp_path / 'r.yml'}: {want}")):
        mergekit_methods._check_mergekit_yaml_recipe("safemerge")


def test_mergekit_multi_checks_every_recipe_of_its_file_up_front(pico, tmp_path, monkeypatch):
    """mergekit-multi's recipes that use these methods are all checked when the first is planned,
    layer ranges included (review180: a final recipe's offset slice was refused only after the
    stages before it had merged); mergekit's own recipes are left to it."""
    from safemerge_ext import mergekit_methods

    first = {"name": "first", **recipe(pico, params={"threshold": TAU})}
    linear = "name: lin\nmerge_method: linear\ndtype: float32\ndtype: float32\nmodels: [{model: first}]\n"
    final = _sliced(pico, (0, 1))
    final["slices"][0]["sources"][3]["layer_range"] = [0, 1]  # (the unaligned model's: other layers than [0, 2])
    final["slices"][0]["sources"][0]["layer_range"] = [0, 2]
    for src in final["slices"][0]["sources"][1:3]:
        src["layer_range"] = [0, 2]
    (tmp_path / "m.yml").write_text(yaml.safe_dump(first) + "---\n" + linear + "---\n" + yaml.safe_dump(final))
    monkeypatch.setattr(mergekit_methods, "_in_mergekit_yaml", lambda: False)
    monkeypatch.setattr(mergekit_methods, "_in_mergekit_multi", lambda: True)
    monkeypatch.setattr(mergekit_methods, "_mergekit_multi_args", lambda: {"config_file": str(tmp_path / "m.yml")})
    monkeypatch.setattr(mergekit_methods, "_recipe_checked", [])
    with pytest.raises(SafeMergeError, match=re.escape(f"{tmp_path / 'm.yml'} (the final recipe): slices[0]: model "
                                                       f"{pico.unaligned} takes layer_range [0, 1] but the ")):
        mergekit_methods._check_mergekit_yaml_recipe("safemerge")
    final["slices"][0]["sources"][3]["layer_range"] = [0, 2]
    (tmp_path / "m.yml").write_text(yaml.safe_dump(first) + "---\n" + linear + "---\n" + yaml.safe_dump(final))
    monkeypatch.setattr(mergekit_methods, "_recipe_checked", [])
    mergekit_methods._check_mergekit_yaml_recipe("safemerge")  # (lin's dtype given twice: mergekit's to read)


@pytest.mark.parametrize("text, want", [
    ("merge_method: safemerge\nbase_model: [\n", "expected the node content, but found '<stream end>' at line 3, column 1"),
    ("merge_method: safemerge\nbase_model: a: b\n", "mapping values are not allowed here at line 2, column 14"),
])
def test_safemerge_yaml_says_where_the_yaml_is_broken(tmp_path, capsys, text, want):
    """A recipe that is not YAML: one line with PyYAML's problem and its line and column."""
    from safemerge_ext import yaml_cli

    (tmp_path / "bad.yml").write_text(text)
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(tmp_path / "bad.yml"), str(tmp_path / "out")])
    assert done.value.code == 1
    assert capsys.readouterr().err == f"safemerge-yaml: error: {tmp_path / 'bad.yml'}: not valid YAML ({want})\n"


def test_filtered_whole_numbers_are_no_gradient(pico):
    """A list of {filter, value} conditions gives each layer one condition's value: whole numbers
    there are no gradient (mergekit interpolates nothing), so the recipe passes."""
    cfg = recipe(pico, params={"threshold": 0.35, "merge": "dare_linear", "density": 0.5,
                               "seed": [{"filter": "self_attn", "value": 1}, {"value": 2}]})
    assert validate_recipe(cfg, "r.yml").config.parameters["seed"]


def test_report_path_forms(tmp_path, monkeypatch):
    """report_path: "~" is the home folder (as in a shell), ".JSON" names a file as ".json" does,
    and a path that is a file where a folder is meant is one line of error, not a traceback."""
    from safemerge_ext import mergekit_run as mr

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert mr.report_files("~/reports") == (tmp_path / "home" / "reports" / mr.REPORT_JSON,
                                            tmp_path / "home" / "reports" / mr.REPORT_PNG)
    assert mr.report_files(tmp_path / "r.JSON") == (tmp_path / "r.JSON", tmp_path / "r.png")
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(SafeMergeError) as err:
        mr._append(str(tmp_path / "afile"), {"module": "m"})
    assert str(err.value) == (f"report_path {tmp_path / 'afile'}: {tmp_path / 'afile'} is a file, not a folder; give "
                              "a folder, or a file name ending in .json")
    assert (tmp_path / "afile").read_text() == "mine"
    # a location no recipe gave is named by the setting it came from (it said "report_path", review135)
    unmakeable = tmp_path / "afile" / "reports"
    monkeypatch.setenv("SAFEMERGE_REPORT_DIR", str(unmakeable))
    with pytest.raises(SafeMergeError) as err:
        mr._append("", {"module": "m"})
    assert str(err.value) == (f"SAFEMERGE_REPORT_DIR={unmakeable}: cannot make the folder {unmakeable} (Not a "
                              "directory); set SAFEMERGE_REPORT_DIR to a folder that can be written")
    with mr.report_to(unmakeable), pytest.raises(SafeMergeError) as err:
        mr._append("", {"module": "m"})
    assert str(err.value).startswith(f"report_to({unmakeable}): cannot make the folder {unmakeable} (Not a directory)")


def test_safemerge_yaml_report_path_under_home(pico, tmp_path, monkeypatch):
    """safemerge-yaml writes a report_path of "~/..." under the home folder, not into a folder "~"."""
    from safemerge_ext import yaml_cli

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg = recipe(pico, params={"threshold": TAU, "report_path": "~/reports/run1"})
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(_write(cfg, tmp_path / "r.yml")), str(tmp_path / "out"), "--no-copy-tokenizer"])
    assert done.value.code == 0
    assert (tmp_path / "home" / "reports" / "run1" / "safemerge_report.json").is_file()
    assert not (tmp_path / "~").exists()


def test_safemerge_yaml_model_paths_under_home(pico, tmp_path, monkeypatch):
    """Model and LoRA paths written "~/..." are read under the home folder, as report_path is (they
    were refused as "no such directory"), and mergekit is given them expanded (it would look for a
    folder named "~", then ask the Hub)."""
    import mergekit.merge

    from safemerge_ext import yaml_cli

    monkeypatch.setenv("HOME", str(pico.root))
    monkeypatch.chdir(tmp_path)
    home = {name: f"~/{getattr(pico, name).relative_to(pico.root)}" for name in ("aligned", "unaligned", "task",
                                                                                  "safety", "lora_task")}
    cfg = {**recipe(pico, params={"threshold": TAU}, task=f"{home['aligned']}+{home['lora_task']}",
                    safety=home["safety"], unaligned=home["unaligned"]), "base_model": home["aligned"]}
    seen, real = [], mergekit.merge.run_merge
    monkeypatch.setattr(mergekit.merge, "run_merge", lambda config, *a, **k: (seen.append(config),
                                                                             real(config, *a, **k))[1])
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(_write(cfg, tmp_path / "r.yml")), str(tmp_path / "out"), "--no-copy-tokenizer"])
    assert done.value.code == 0
    (config,) = seen
    paths = {p.path for ref in config.referenced_models() for p in (ref.model, ref.lora) if p is not None}
    assert paths == {str(pico.aligned), str(pico.unaligned), str(pico.safety), str(pico.lora_task)}
    assert (tmp_path / "out" / "safemerge_report.json").is_file() and not (tmp_path / "~").exists()


def test_refusal_tells_own_errors_from_others():
    """Only errors a ``raise`` in safemerge_ext threw (directly, or as the cause of pydantic's
    error for a parameter check) count as refusals; a ValueError from elsewhere does not."""
    from pydantic import BaseModel, TypeAdapter, ValidationError

    from safemerge_ext import mergekit_methods as mm
    from safemerge_ext import mergekit_run as mr

    def caught(fn):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 (the test wants whichever it is)
            return exc
        raise AssertionError("no error")

    alpha = caught(lambda: TypeAdapter(mm.Fraction).validate_python(1.8))
    assert isinstance(alpha, ValidationError)
    assert mr.refusal(alpha) == "alpha must lie in [0, 1] (the task update's weight); got 1.8"
    beta = caught(lambda: TypeAdapter(mm.Beta).validate_python(1e39))  # (review145: a RuntimeError at a tensor)
    assert mr.refusal(beta) == "beta must lie in [0, 3.40282e+38] (the weight of the safety vector); got 1e+39"
    from safemerge_ext import merge as merging

    assert mr.refusal(caught(lambda: merging.validate("linear", 0.5, 7.0))) == (
        "density must lie in (0, 1] (the fraction of each update kept); got 7.0")

    class Both(BaseModel):
        alpha: mm.Fraction
        n: int

    both = caught(lambda: Both(alpha=1.8, n="x"))
    assert mr.refusal(both) is None  # (one of its errors is pydantic's own: keep the traceback)
    assert mr.refusal(caught(lambda: Both(alpha=-1, n=1))) == "alpha must lie in [0, 1] (the task update's weight); got -1.0"
    for kind, bad, want in ((mm.MergeName, "lineer", "merge must be one of linear, ties, dare_linear, dare_ties"),
                            (mm.Role, "unalign", "role must be one of task, safety, unaligned"),
                            (mm.Precision, "fp8", "precision must be one of ieee, tf32, tf32x3, bf16"),
                            (mm.Precision, 16, "precision must be one of ieee, tf32, tf32x3, bf16")):
        assert mr.refusal(caught(lambda: TypeAdapter(kind).validate_python(bad))) == f"{want}; got {bad!r}"
    assert mr.refusal(caught(lambda: TypeAdapter(mm.MergeName).validate_python("peft-linear"))) == (
        "merge must be one of linear, ties, dare_linear, dare_ties; got 'peft-linear' (it mixes two LoRA adapters' "
        "factors, which mergekit folds into full weights first; use safemerge merge --method peft-linear with the adapters)")
    assert TypeAdapter(mm.Precision).validate_python(None) is None
    assert TypeAdapter(mm.Precision).validate_python("tf32") == "tf32"
    assert TypeAdapter(mm.Role).validate_python("safety") == "safety"
    assert mr.refusal(caught(lambda: int("x"))) is None
    # in the package's own files: a raise statement (one line or several) is a refusal; a builtin's
    # ValueError from there (an unpacking that does not fit) is a bug, which keeps its traceback
    here = str(Path(mm.__file__).parent / "probe.py")
    scope: dict = {}
    exec(compile("def one():\n    raise ValueError('bad value; give a good one')\n"
                 "def several(v):\n    raise ValueError(\n        f'bad {v}; '\n        'give a good one'\n    ) from None\n"
                 "def unpack(name):\n    head, tail = name.split('*')\n", here, "exec"), scope)
    assert mr.refusal(caught(scope["one"])) == "bad value; give a good one"
    assert mr.refusal(caught(lambda: scope["several"](3))) == "bad 3; give a good one"
    assert mr.refusal(caught(lambda: scope["unpack"]("a*b*c"))) is None
    assert mr.refusal(caught(lambda: TypeAdapter(int).validate_python("x"))) is None
    assert mr.refusal(caught(lambda: torch.zeros(2).view(3))) is None
    assert mr.refusal(SafeMergeError("bad input\nsecond line")) == "bad input"


def test_excepthook_only_in_mergekit_yaml(monkeypatch, capsys, request):
    """register_methods() installs the hook in mergekit-yaml only; it prints a refusal's line and
    hands every other error (and any with SAFEMERGE_TRACEBACK=1) to the hook it replaced."""
    from safemerge_ext import mergekit_methods as mm
    from safemerge_ext import mergekit_run as mr

    from safemerge_ext import _faults

    seen, lines = [], []
    before = lambda *exc: seen.append(exc[1])  # noqa: E731
    monkeypatch.setattr(sys, "excepthook", before)
    monkeypatch.setattr(_faults, "explain_bus_errors", lines.append)
    monkeypatch.delenv("SAFEMERGE_TRACEBACK", raising=False)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/pytest"])
    # (the hook also notes Ctrl-C, SIGTERM and SIGHUP in handlers of its own: put back as the test
    # ends, for the later tests, which check the handlers they find)
    import signal

    for n in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        request.addfinalizer(lambda n=n, previous=signal.getsignal(n): signal.signal(n, previous))
    mm.register_methods()
    assert sys.excepthook is before and lines == []
    monkeypatch.setattr(sys, "argv", ["/venv/bin/mergekit-yaml", "r.yml", "out"])
    mm.register_methods()
    mm.register_methods()  # (idempotent: the hook it replaced stays the one it hands on to)
    assert sys.excepthook is mr._excepthook and mr._prev_excepthook is before
    assert lines[-1] == _faults.bus_error_line("mergekit-yaml", "what it wrote to OUT_PATH is incomplete")

    try:
        mm._roles(types.SimpleNamespace(base=None, metadata=types.SimpleNamespace(name="w")), {}, "safemerge")
    except ValueError as exc:
        own = exc
    other = RuntimeError("boom")
    sys.excepthook(type(own), own, own.__traceback__)
    assert capsys.readouterr().err == ("mergekit-yaml: error: safemerge: tensor w has no base input; set base_model "
                                       "to the aligned model\n") and seen == []
    sys.excepthook(RuntimeError, other, None)
    monkeypatch.setenv("SAFEMERGE_TRACEBACK", "0")  # (off, as SAFEMERGE_NO_AUTOLOAD=0 is)
    sys.excepthook(type(own), own, own.__traceback__)
    assert seen == [other] and capsys.readouterr().err.startswith("mergekit-yaml: error: safemerge: tensor w")
    monkeypatch.setenv("SAFEMERGE_TRACEBACK", "1")
    sys.excepthook(type(own), own, own.__traceback__)
    assert seen == [other, own] and capsys.readouterr().err == ""


# -- autoload ----------------------------------------------------------------------------------------


_PROBE = (
    "import site, sys\n"
    "site.addsitedir(sys.argv[1])\n"
    "print('hook' if 'safemerge_ext._autoload_hook' in sys.modules else 'nohook')\n"
    "print(sorted(m for m in ('torch', 'mergekit', 'transformers') if m in sys.modules))\n"
    "import mergekit.merge_methods as mm\n"
    "print('registered' if 'safemerge' in [m.spec.name for m in mm.registered_methods()] else 'absent')\n"
)


def _probe(tmp_path: Path, **env: str) -> list[str]:
    site_dir = tmp_path / "site"
    msg = autoload.enable(site_dir)
    assert (site_dir / autoload.PTH_NAME).read_text() == (ROOT / autoload.PTH_NAME).read_text(), msg
    full_env = {k: v for k, v in os.environ.items() if k != "SAFEMERGE_NO_AUTOLOAD"} | env
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), full_env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", _PROBE, str(site_dir)], capture_output=True, text=True, env=full_env)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.split("\n")


def test_pth_hook_is_lazy_and_registers_on_mergekit_import(tmp_path):
    """Processing the .pth (as site does at start-up) imports neither torch nor mergekit."""
    hook, imported, registered = _probe(tmp_path)[:3]
    assert hook == "hook" and imported == "[]" and registered == "registered"


def test_pth_hook_leaves_the_package_to_be_imported_from_sys_path_as_it_is_later(tmp_path):
    """The .pth ran before the working directory joins sys.path: importing the package there made the
    installed copy win over a source checkout run from its folder (python -m pytest in a clone)."""
    site_dir = tmp_path / "site"
    autoload.enable(site_dir)
    checkout = tmp_path / "checkout" / "safemerge_ext"
    checkout.mkdir(parents=True)
    (checkout / "__init__.py").write_text("WHERE = 'checkout'\n")
    code = ("import site, sys\nsite.addsitedir(sys.argv[1])\n"
            "print('safemerge_ext' in sys.modules, 'safemerge_ext._autoload_hook' in sys.modules)\n"
            "sys.path.insert(0, sys.argv[2])\nimport safemerge_ext\nprint(getattr(safemerge_ext, 'WHERE', 'installed'))\n")
    env = {k: v for k, v in os.environ.items() if k != "SAFEMERGE_NO_AUTOLOAD"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    for off in ("", "1"):
        res = subprocess.run([sys.executable, "-c", code, str(site_dir), str(checkout.parent)], capture_output=True,
                             text=True, env={**env, "SAFEMERGE_NO_AUTOLOAD": off})
        assert res.returncode == 0 and res.stdout.split() == ["False", "True", "checkout"], res.stdout + res.stderr


def test_no_autoload_env_turns_the_hook_off(tmp_path):
    hook, imported, registered = _probe(tmp_path, SAFEMERGE_NO_AUTOLOAD="1")[:3]
    assert imported == "[]" and registered == "absent"


def test_installed_pth_keeps_startup_free_of_torch():
    """With the .pth in the real site-packages, a fresh interpreter still imports no torch/mergekit."""
    if not (autoload.site_packages() / autoload.PTH_NAME).is_file():
        pytest.skip(f"{autoload.PTH_NAME} is not installed in {autoload.site_packages()}")
    res = subprocess.run([sys.executable, "-c", "import sys; print('safemerge_ext._autoload_hook' in sys.modules, "
                          "'torch' in sys.modules, 'mergekit' in sys.modules)"], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "SAFEMERGE_NO_AUTOLOAD"})
    assert res.stdout.split() == ["True", "False", "False"], res.stdout + res.stderr


def test_pth_line_is_the_same_everywhere():
    from safemerge_ext import _pth_build

    assert (ROOT / autoload.PTH_NAME).read_text() == autoload.PTH_LINE == _pth_build.LINE


def test_pth_line_is_silent_when_the_package_is_half_installed(tmp_path):
    """site runs the .pth line at every interpreter start: a safemerge_ext that cannot import its
    hook (an interrupted uninstall, an old checkout) must not print a traceback there."""
    broken = tmp_path / "pkg" / "safemerge_ext"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("")  # (no _autoload_hook)
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / autoload.PTH_NAME).write_text(autoload.PTH_LINE)
    # (-S: no site-packages, whose editable-install finder would supply the real hook)
    res = subprocess.run([sys.executable, "-S", "-c", f"import site; site.addsitedir({str(site_dir)!r}); print('started')"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "pkg")},
                         cwd=tmp_path)  # (not the checkout, whose own safemerge_ext would be found first)
    assert res.returncode == 0 and res.stdout.strip() == "started" and res.stderr == "", res.stderr


def test_autoload_enable_disable_status(tmp_path):
    d = tmp_path / "sp"
    assert "enabled" in autoload.enable(d) and (d / autoload.PTH_NAME).is_file()
    assert "already enabled" in autoload.enable(d)
    assert "disabled" in autoload.disable(d) and not (d / autoload.PTH_NAME).exists()
    assert "already disabled" in autoload.disable(d)


def test_autoload_counts_only_site_directories(tmp_path, monkeypatch):
    """A .pth on sys.path but outside the site directories (a checkout on PYTHONPATH, the working
    directory of python -m) is never run by Python: status and disable do not count it."""
    import site

    checkout, site_dir = tmp_path / "checkout", tmp_path / "site"
    autoload.enable(checkout)
    monkeypatch.setattr(sys, "path", [str(checkout), *sys.path])
    monkeypatch.setattr(autoload, "site_packages", lambda: site_dir)
    monkeypatch.setattr(site, "getsitepackages", lambda: [str(site_dir)])
    monkeypatch.setattr(site, "ENABLE_USER_SITE", False)
    assert autoload._pth_files() == [] and autoload.status().endswith("state: disabled")
    assert "another copy" not in autoload.disable()
    autoload.enable()
    assert autoload._pth_files() == [site_dir / autoload.PTH_NAME] and autoload.status().endswith("state: enabled")


def test_autoload_status_says_the_env_switch_turns_the_hook_off():
    env = {**os.environ, "SAFEMERGE_NO_AUTOLOAD": "1"}
    out = subprocess.run([_script("safemerge"), "autoload", "status"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "state: disabled" in out.stdout
    assert "hook loaded in this interpreter: yes, inactive (SAFEMERGE_NO_AUTOLOAD)" in out.stdout, out.stdout


def test_autoload_status_asks_a_fresh_interpreter_what_mergekit_finds(tmp_path, monkeypatch):
    """`safemerge autoload status` says what plain mergekit-yaml will find, from a fresh interpreter of
    this environment: all three methods with the hook, none with SAFEMERGE_NO_AUTOLOAD, and why it
    cannot tell when mergekit does not import."""
    site_dirs = []
    if not autoload._pth_files():  # (an editable install whose setuptools left the .pth out)
        autoload.enable(tmp_path / "site")
        site_dirs = [tmp_path / "site"]
    monkeypatch.delenv("SAFEMERGE_NO_AUTOLOAD", raising=False)
    assert autoload.mergekit_finds(*site_dirs) == (["resta", "safelora", "safemerge"], "")
    if not site_dirs:
        assert "\nmergekit-yaml finds: resta, safelora, safemerge\nstate: enabled" in autoload.status(check=True)
    monkeypatch.setenv("SAFEMERGE_NO_AUTOLOAD", "1")
    assert autoload.mergekit_finds(*site_dirs) == ([], "")
    monkeypatch.delenv("SAFEMERGE_NO_AUTOLOAD")
    broken = tmp_path / "broken" / "mergekit"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('mergekit is broken here')\n")
    monkeypatch.setenv("PYTHONPATH", str(broken.parent))
    assert autoload.mergekit_finds(*site_dirs) == (None, "ImportError: mergekit is broken here")


def test_pth_hook_when_the_plugin_module_is_imported_first(tmp_path):
    """Importing safemerge_ext.mergekit_methods first (it imports mergekit) registers once, without warnings."""
    site_dir = tmp_path / "site"
    autoload.enable(site_dir)
    code = ("import site, sys, warnings\nwarnings.simplefilter('error')\nsite.addsitedir(sys.argv[1])\n"
            "import safemerge_ext.mergekit_methods\nimport mergekit.merge_methods as mm\n"
            "print([m.spec.name for m in mm.registered_methods()].count('safemerge'))\n")
    env = {k: v for k, v in os.environ.items() if k != "SAFEMERGE_NO_AUTOLOAD"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code, str(site_dir)], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "1", res.stdout + res.stderr[-2000:]


# -- recipes -------------------------------------------------------------------------------------------

PAPER_RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.yml") if p.name != "tiny.yml")


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipes_validate_with_local_models(pico, name):
    """Each shipped recipe is valid once its paths point at real folders (here: the pico models)."""
    import yaml

    data = yaml.safe_load((ROOT / "recipes" / name).read_text())
    data["base_model"] = str(pico.aligned)
    for m in data["models"]:
        role = m["parameters"]["role"]
        lora = {"task": pico.lora_task, "safety": pico.lora_safety}.get(role)
        full = {"task": pico.task, "safety": pico.safety, "unaligned": pico.unaligned}[role]
        m["model"] = f"{pico.aligned}+{lora}" if "+" in m["model"] else str(full)
    checked = validate_recipe(data, name)
    assert checked.method == data["merge_method"] and checked.tensors_checked == 16


def test_tiny_recipe_runs_through_safemerge_yaml(pico, tmp_path, capsys, monkeypatch):
    """The recipe runs; LoRAs are folded in fp32 (not the model's dtype) before dW is recovered;
    the model card names OUT (not the temporary folder), which has the umask's mode."""
    import mergekit.merge

    from safemerge_ext import yaml_cli

    seen = []
    real = mergekit.merge.run_merge
    monkeypatch.setattr(mergekit.merge, "run_merge", lambda *a, **k: (seen.append(k["options"]), real(*a, **k))[1])

    text = (ROOT / "recipes" / "tiny.yml").read_text()
    for old, new in (("./demo/aligned+./demo/task", f"{pico.aligned}+{pico.lora_task}"),
                     ("./demo/aligned+./demo/safety", f"{pico.aligned}+{pico.lora_safety}"),
                     ("./demo/unaligned", str(pico.unaligned)), ("./demo/aligned", str(pico.aligned))):
        text = text.replace(old, new)
    assert "demo/" not in text.split("merge_method")[1]
    (tmp_path / "tiny.yml").write_text(text)
    out = tmp_path / "merged"
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(tmp_path / "tiny.yml"), str(out), "--no-copy-tokenizer"])
    assert done.value.code in (0, None)
    assert "cosine min / median / max" in capsys.readouterr().out
    report = json.loads((out / "safemerge_report.json").read_text())
    A = read_model(pico.aligned)
    task = {n: w.double() + (d if (d := lora_delta(pico.lora_task, n)) is not None else 0) for n, w in A.items()}
    safety = {n: w.double() + (d if (d := lora_delta(pico.lora_safety, n)) is not None else 0) for n, w in A.items()}
    want, flags = reference(pico, "safemerge", tau=0.2, task=task, safety=safety)
    check_all(read_model(out), want, atol=2e-5)
    assert {r["module"]: r["flagged"] for r in report["layers"]} == flags
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # (the LoRA folds went with the run)
    assert [o.lora_merge_dtype for o in seen] == ["float32"]
    assert [Path(o.lora_merge_cache).name[:-8] for o in seen] == [".merged.lora-"]
    card = (out / "README.md").read_text()
    assert "merged" in card and ".tmp-" not in card
    # (mergekit lists the models from a set, in PYTHONHASHSEED's order: sorted, the same every run)
    listed = card.split("included in the merge:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(listed) == 3 and listed == sorted(listed), listed
    assert (out.stat().st_mode & 0o777) == 0o777 & ~_umask()


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_recipes_mergekit_takes_are_accepted(pico, tmp_path):
    """Validation accepts what mergekit accepts: one {filter, value} condition, numbers YAML reads
    as strings (1e-1), a base_model given on the slices, and a task model with an added token."""
    import transformers
    from mergekit_fixtures import llama_config

    cfg = yaml.safe_load(f"""
merge_method: safemerge
base_model: {pico.aligned}
models:
  - {{model: {pico.task}, parameters: {{role: task}}}}
  - {{model: {pico.safety}, parameters: {{role: safety}}}}
  - {{model: {pico.unaligned}, parameters: {{role: unaligned}}}}
parameters: {{threshold: {{filter: self_attn, value: 0.6}}, alpha: 5e-1, density: 1e-0}}
dtype: float32
""")
    assert cfg["parameters"]["alpha"] == "5e-1"  # (YAML 1.1 has no exponent without a dot)
    assert validate_recipe(cfg).roles["task"] == str(pico.task)
    sliced = recipe(pico, params={"threshold": 0.5})
    layers = [0, 2]
    sliced["slices"] = [{"base_model": sliced.pop("base_model"), "parameters": {"alpha": 0.7},
                         "sources": [{**m, "layer_range": layers} for m in sliced.pop("models")]
                         + [{"model": str(pico.aligned), "layer_range": layers}]}]
    assert validate_recipe(sliced).method == "safemerge"
    wide = tmp_path / "wide-vocab"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**llama_config().to_dict(), "vocab_size": 65})) \
        .save_pretrained(wide)
    # a tensor mergekit's architecture does not plan (an old checkpoint's rotary buffer) in one model only
    from safetensors.torch import load_file, save_file

    old = Path(shutil.copytree(pico.aligned, tmp_path / "old-aligned"))
    index = json.loads((old / "model.safetensors.index.json").read_text())
    shard = old / index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    buffer = "model.layers.0.self_attn.rotary_emb.inv_freq"
    save_file({**load_file(shard), buffer: torch.rand(8)}, shard, metadata={"format": "pt"})
    index["weight_map"][buffer] = shard.name
    (old / "model.safetensors.index.json").write_text(json.dumps(index))
    assert validate_recipe({**recipe(pico), "base_model": str(old)}).method == "safemerge"
    # (the first resized tensor in model order is named: the input embeddings)
    with pytest.raises(SafeMergeError, match=r"tensor model.embed_tokens.weight has 65 rows in role task .* add tokenizer: \{source: base\}"):
        validate_recipe(recipe(pico, task=str(wide)))  # mergekit would stop on the size mismatch
    for tok in ({"tokenizer": {"source": "base"}}, {"tokenizer_source": "union"}):
        assert validate_recipe({**recipe(pico, task=str(wide)), **tok}).roles["task"] == str(wide)
    # mergekit's --unsafe-truncate-embeddings cuts the rows to the smallest vocabulary instead
    assert validate_recipe(recipe(pico, task=str(wide)), truncate_embeddings=True).roles["task"] == str(wide)
    # a role that the recipe's parameters give every model without one (mergekit's default)
    top = recipe(pico)
    top["parameters"] = {**(top.get("parameters") or {}), "role": "task"}
    task_entry = next(m for m in top["models"] if (m.get("parameters") or {}).get("role") == "task")
    task_entry.pop("parameters")
    assert validate_recipe(top).roles["task"] == str(pico.task)
    for m in top["models"]:  # (a role twice, once by default: still refused)
        if (m.get("parameters") or {}).get("role") == "safety":
            m.pop("parameters")
    with pytest.raises(SafeMergeError, match="role 'task' must be given to exactly one model; it is given to 2"):
        validate_recipe(top)


def test_sidecars_of_other_runs_are_left_alone(tmp_path, monkeypatch):
    """Two processes reporting to one location at once (as two merges with one report_path do)
    keep their layers apart: each appends to and assembles only its own sidecar."""
    from safemerge_ext import mergekit_run as mr
    from safemerge_ext.report import LayerRecord

    settings = {"threshold": 0.35, "alpha": 0.8, "merge": "linear", "density": 1.0, "seed": 0,
                "input_dtype": "float32", "rounding_band": None}

    def line(module):
        rec = LayerRecord(module=module, cosine=0.5, extra=dict(settings))
        return {"method": "safemerge", "backend": "cpp", "precision": "ieee", "precision_requested": "ieee",
                "time_s": 0.1, "end": 1.0, "bytes": 8, "layer": rec.to_json()}

    out = tmp_path / "shared"
    monkeypatch.setattr(mr, "_alive", lambda pid: True)  # (both "processes" are running)
    for pid, module in ((1111, "model.layers.0.a"), (2222, "model.layers.0.b"), (1111, "model.layers.1.a"),
                        (2222, "model.layers.1.b")):
        monkeypatch.setattr(mr.os, "getpid", lambda pid=pid: pid)
        mr._append(str(out), line(module))
    reports = {}
    for pid in (1111, 2222):
        monkeypatch.setattr(mr.os, "getpid", lambda pid=pid: pid)
        reports[pid] = [r["module"] for r in mr.finalize_report(out)["layers"]]
    assert reports == {1111: ["model.layers.0.a", "model.layers.1.a"], 2222: ["model.layers.0.b", "model.layers.1.b"]}
    assert not list(out.glob(".safemerge_layers*.jsonl"))


def test_a_dead_process_is_told_on_windows_without_os_kill(monkeypatch):
    """On Windows os.kill(pid, 0) would send a Ctrl-C event and a dead pid gives a plain OSError
    (taken for alive): there the liveness check asks OpenProcess / GetExitCodeProcess."""
    import ctypes

    from safemerge_ext import mergekit_run as mr

    procs = {10: 259, 11: 0}  # 10 runs (STILL_ACTIVE), 11 has exited; 12 is someone else's; 13 is gone
    last = {"error": 0}

    class Fn:
        def __init__(self, fn):
            self.fn, self.restype, self.argtypes = fn, None, None

        def __call__(self, *args):
            return self.fn(*args)

    def open_process(access, inherit, pid):
        assert access == 0x1000 and not inherit
        last["error"] = 5 if pid == 12 else 87
        return 1000 + pid if pid in procs else None

    def exit_code(handle, ref):
        ref._obj.value = procs[handle - 1000]
        return 1

    closed = []
    kernel32 = types.SimpleNamespace(OpenProcess=Fn(open_process), GetExitCodeProcess=Fn(exit_code),
                                     CloseHandle=Fn(closed.append))
    monkeypatch.setattr(ctypes, "WinDLL", lambda name, use_last_error=False: kernel32, raising=False)
    monkeypatch.setattr(ctypes, "get_last_error", lambda: last["error"], raising=False)
    monkeypatch.setattr(mr.os, "name", "nt")
    monkeypatch.setattr(mr.os, "kill", lambda *a: pytest.fail("os.kill must not be called on Windows"))
    assert [mr._alive(pid) for pid in (10, 11, 12, 13)] == [True, False, True, False]
    assert closed == [1010, 1011]


def test_exit_hook_says_which_part_of_the_report_it_could_not_write(pico, tmp_path, monkeypatch, caplog):
    """At exit, a report whose plot cannot be written (a full disk) is one error line naming the
    report's location (not the hidden sidecar) and that its JSON is there, the plot not."""
    from safemerge_ext import mergekit_run as mr

    out = tmp_path / "out"
    monkeypatch.setattr(mr, "_cli_out", [str(out)])
    monkeypatch.setattr(mr, "_override", None)
    monkeypatch.delenv(mr.REPORT_DIR_ENV, raising=False)

    def full(report, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(mr, "plot", full)
    register_methods()
    run_merge(MergeConfiguration.model_validate(recipe(pico, params={"threshold": TAU})), str(out),
              MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    with caplog.at_level("ERROR", logger=mr.LOG.name):
        mr._finalize_pending()
    assert [r.getMessage() for r in caplog.records if r.name == mr.LOG.name] == [
        f"safemerge-ext: could not write the report at {out} (its JSON is written, the plot is not): [Errno 28] No "
        f"space left on device: '{out / 'safemerge_report.png'}'"]
    assert (out / "safemerge_report.json").is_file() and not list(out.glob(".safemerge_layers*"))


def test_sidecars_are_named_by_pid_namespace_and_host_too(tmp_path, monkeypatch):
    """Two containers' runs (each pid 1) sharing a report folder took one sidecar, and one host's run took
    a container's live one for a dead process's and deleted it: the reports came out mixed, exit 0."""
    from safemerge_ext import mergekit_run as mr

    sidecar = mr._locations(tmp_path)[0].name
    assert sidecar == f".safemerge_layers.{os.getpid()}-{mr._here()}.jsonl"
    ns, host = mr._here().split("-", 1)
    assert ns.isdecimal() and host and "-" not in host
    if Path("/proc/self/ns/pid").exists():
        assert ns == str(os.stat("/proc/self/ns/pid").st_ino)
    other = mr.SIDECAR.format(pid=f"{os.getpid()}-{int(ns) + 1}-{host}")  # (the same pid in another container)
    (tmp_path / other).write_text("{}\n")
    monkeypatch.setattr(mr, "_alive", lambda pid: False)
    mr._drop_dead_sidecars(tmp_path)
    assert (tmp_path / other).exists()


def test_a_ctrl_c_inside_a_method_is_told_as_an_interrupt_not_an_error(tmp_path, monkeypatch):
    """Plain mergekit-yaml stopped with Ctrl-C said "no report: a merge method raised an error"."""
    from safemerge_ext import mergekit_run as mr

    monkeypatch.setattr(mr, "_failed", {})
    for exc, why in ((KeyboardInterrupt(), "the run was interrupted"), (ValueError("x"), "a merge method raised an error")):
        target = tmp_path / type(exc).__name__
        with pytest.raises(type(exc)):
            with mr._failing_run(str(target)):
                raise exc
        assert mr._unfinished(mr._key(target)) == why


def test_report_to_blocks_left_in_another_order_keep_the_open_ones(tmp_path, monkeypatch):
    """report_to entered by two threads (A, then B) and left in that order restored what was there
    before B, A's folder, for good: later runs of the process reported into A's folder."""
    from safemerge_ext import mergekit_run as mr

    monkeypatch.setattr(mr, "_override", None)
    monkeypatch.setattr(mr, "_entered", [])
    a, b = mr.report_to(tmp_path / "a"), mr.report_to(tmp_path / "b")
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert mr._override == str(tmp_path / "b")
    b.__exit__(None, None, None)
    assert mr._override is None and mr._entered == []
    with mr.report_to(tmp_path / "a"):
        with mr.report_to(tmp_path / "b"):
            assert mr._override == str(tmp_path / "b")
        assert mr._override == str(tmp_path / "a")
    assert mr._override is None


@pytest.mark.parametrize("where", ["folder", "json-file", "json-file-with-star"])
def test_a_killed_runs_sidecar_is_dropped_by_the_next_run(pico, tmp_path, monkeypatch, where):
    """A mergekit-yaml killed by SIGTERM (no exit hook runs) leaves its sidecar in OUT_PATH; the
    next run there removes it (its process is gone) instead of shipping it inside the model, and
    leaves a live process's alone."""
    from safemerge_ext import mergekit_run as mr

    out = tmp_path / "out"
    report = "rep*ort.json" if where == "json-file-with-star" else "report.json"  # (a "*" is a name's letter too)
    target = out if where == "folder" else out / report
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, live_pid = int(dead.stdout), os.getppid()
    name = (lambda pid: mr.SIDECAR.format(pid=pid)) if where == "folder" else (lambda pid: f"{report}.{pid}.layers.jsonl")
    here = mr._here()
    # (another container's or host's pid names nothing here, dead or alive: left alone; a name of the
    # pid alone is an older version's)
    gone = [name(f"{dead_pid}-{here}"), name(dead_pid)]
    kept = [name(f"{live_pid}-{here}"), name(live_pid), name(f"{dead_pid}-1234-elsewhere"),
            name(f"{dead_pid}-{here.split('-', 1)[0]}-otherhost")]
    for n in gone + kept:
        (out / n).write_text("{}\n")
    monkeypatch.setattr(mr, "_override", None)
    monkeypatch.delenv(mr.REPORT_DIR_ENV, raising=False)
    cfg = recipe(pico, params={"threshold": TAU, "report_path": str(target)})
    register_methods()
    run_merge(MergeConfiguration.model_validate(cfg), str(out),
              MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    assert not any((out / n).exists() for n in gone) and all((out / n).exists() for n in kept)
    assert mr.finalize_report(target)["layers"]


@pytest.mark.parametrize("how", ["console-script", "python-m"])
def test_report_location_of_a_running_mergekit_yaml(monkeypatch, tmp_path, how):
    """Plain mergekit-yaml puts the report into its OUT_PATH, however it was started: as the
    console script or as ``python -m mergekit.scripts.run_yaml`` (mergekit's module is __main__)."""
    import importlib.machinery
    import types

    from mergekit.scripts import run_yaml

    from safemerge_ext import mergekit_run as mr

    monkeypatch.setattr(mr, "_cli_out", [])
    if how == "python-m":
        fake = types.ModuleType("__main__")
        fake.__spec__ = importlib.machinery.ModuleSpec("mergekit.scripts.run_yaml", None)
        fake.main = run_yaml.main
        monkeypatch.setitem(sys.modules, "__main__", fake)
        monkeypatch.delitem(sys.modules, "mergekit.scripts.run_yaml")
        argv0 = "/usr/lib/python3/runpy.py"
    else:
        argv0 = "/venv/bin/mergekit-yaml"
    monkeypatch.setattr(sys, "argv", [argv0, str(tmp_path / "r.yml"), str(tmp_path / "out"), "--cuda"])
    assert mr._mergekit_yaml_out() == str(tmp_path / "out")


def test_failed_safemerge_yaml_leaves_no_folders(pico, tmp_path, monkeypatch, capsys):
    """A LoRA recipe whose merge fails leaves nothing: no OUT, no LoRA cache, no parent folders."""
    import mergekit.merge

    from safemerge_ext import yaml_cli

    def disk_full(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mergekit.merge, "run_merge", disk_full)
    cfg = recipe(pico, params={"threshold": TAU}, task=f"{pico.aligned}+{pico.lora_task}")
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(_write(cfg, tmp_path / "r.yml")), str(tmp_path / "new" / "deeper" / "out")])
    assert done.value.code == 1 and "disk full" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yml"]


@pytest.fixture(scope="module")
def pico_bf16(pico, tmp_path_factory):
    """The pico aligned, unaligned and task models stored in bf16."""
    from transformers import LlamaForCausalLM

    from mergekit_fixtures import SHARD

    root = tmp_path_factory.mktemp("pico-bf16")
    for name in ("aligned", "unaligned", "task"):
        LlamaForCausalLM.from_pretrained(getattr(pico, name), dtype=torch.bfloat16) \
            .save_pretrained(root / name, max_shard_size=SHARD)
    return root


@pytest.mark.parametrize("case", ["lora-folded-in-bf16", "lora-folded-in-fp32", "bf16-checkpoint", "bf16-checkpoint-fp64"])
def test_rounding_is_read_from_the_values_not_the_loaded_dtype(pico, pico_bf16, tmp_path, monkeypatch, case):
    """With ``dtype: float32``, mergekit hands over fp32 tensors even where the values are bf16: a
    bf16 checkpoint, or a LoRA that mergekit folded in the model's bf16 (its default). The report
    still finds the rounding, estimates its band and says what would avoid it."""
    aligned = str(pico_bf16 / "aligned")
    checkpoint = case.startswith("bf16-checkpoint")
    task = str(pico_bf16 / "task") if checkpoint else f"{aligned}+{pico.lora_task}"
    loaded = "float64" if case.endswith("fp64") else "float32"
    cfg = {**recipe(pico, params={"threshold": TAU}, task=task, safety=str(pico.safety),
                    unaligned=str(pico_bf16 / "unaligned"), dtype=loaded), "base_model": aligned}
    options = {"lora_merge_dtype": "float32"} if case == "lora-folded-in-fp32" else {}
    from mergekit.io.tasks import LoaderCache

    monkeypatch.setattr(LoaderCache, "loaders", {})  # mergekit keeps each model+lora's fold for the process
    _, report = merge(cfg, tmp_path / "o", lora_merge_cache=str(tmp_path / "cache"), **options)
    scored = [r for r in report["layers"] if r["cosine"] is not None]
    assert scored and all(r["input_dtype"] == loaded for r in report["layers"])
    assert all(r["task_lora"] == (not checkpoint) for r in report["layers"])
    if checkpoint:  # bytes as the files store them (bf16 here), not as mergekit handed them over
        from safetensors.torch import load_file

        sizes = [{k: v.numel() * v.element_size() for f in Path(m).glob("*.safetensors") for k, v in load_file(f).items()}
                 for m in (aligned, task, pico.safety, pico_bf16 / "unaligned")]
        assert report["bytes_read"] == sum(s[r["tensor"]] for r in report["layers"] for s in sizes)
    warned = [w for w in report["warnings"] if "task weights" in w]
    if case == "lora-folded-in-fp32":
        assert all(r["rounding_dtype"] is None and r["rounding_band"] is None for r in scored) and not warned
        assert "near_threshold" not in report["counts"]
        return
    assert all(r["rounding_dtype"] == "bfloat16" and r["rounding_band"] > 0 for r in scored)
    near = sum(abs(r["cosine"] - r["threshold"]) <= r["rounding_band"] for r in scored)
    assert report["counts"]["near_threshold"] == near
    assert len(warned) == 1 and f"{near} of {len(report['layers'])} layers" in warned[0]
    assert "set dtype: float32" not in warned[0]  # the recipe has it already: it would not help
    if case == "lora-folded-in-bf16":
        assert "--lora-merge-dtype float32" in warned[0]
    else:
        assert "the task model is stored in bfloat16" in warned[0]


def test_value_precision_of_tensors():
    from safemerge_ext.mergekit_methods import _value_precision

    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 96, generator=g)
    assert _value_precision(x) is None and _value_precision(x.double()) is None
    assert _value_precision(x.bfloat16()) == torch.bfloat16 == _value_precision(x.bfloat16().float())
    assert _value_precision(x.half()) == torch.float16 == _value_precision(x.half().float())
    assert _value_precision(x.half().double()) == torch.float16
    assert _value_precision(x.bfloat16().float().t()) == torch.bfloat16  # not contiguous
    tail = x.bfloat16().float()
    tail[-1, -1] = 0.1  # only the last value is off bf16: the whole tensor is read, not its first rows
    assert _value_precision(tail) is None
    assert _value_precision(torch.tensor(0.5)) == torch.bfloat16 and _value_precision(torch.tensor(0.1)) is None
    assert _value_precision(x[0].bfloat16().float()) == torch.bfloat16  # 1-D


@pytest.mark.parametrize("where", ["safety-flagged", "safety-kept", "task-norm", "unaligned-scored"])
def test_nan_in_any_input_it_writes_from_is_refused(pico, tmp_path, where):
    """NaN/Inf never reaches the output silently: the safety model's weight of a scored layer
    (flagged or not), a tensor passed through (the task model's final norm) and the unaligned
    weight a score reads are refused, with the tensor and the model named, as one line for
    mergekit-yaml (not a traceback)."""
    from mergekit_fixtures import save_model

    from safemerge_ext.mergekit_run import refusal

    _, flags = reference(pico, "safemerge")
    flagged = sorted(m for m, f in flags.items() if f)
    kept = sorted(m for m, f in flags.items() if f is False)
    role, name = {"safety-flagged": ("safety", f"{flagged[0]}.weight"), "safety-kept": ("safety", f"{kept[0]}.weight"),
                  "task-norm": ("task", "model.norm.weight"),
                  "unaligned-scored": ("unaligned", f"{flagged[0]}.weight")}[where]
    sd = read_model(getattr(pico, role))
    sd[name].view(-1)[3] = float("nan")
    save_model(sd, tmp_path / role)
    cfg = recipe(pico, params={"threshold": TAU}, **{role: str(tmp_path / role)})
    with pytest.raises(Exception) as err:
        merge(cfg, tmp_path / "o")
    line = f"tensor {name}: NaN or Inf in the {role} model; check the input models"
    assert line in str(err.value) and refusal(err.value) == line



@pytest.mark.parametrize("method, role, name", [
    ("safelora", "task", "model.norm.weight"),       # passed through
    ("resta", "aligned", "model.norm.weight"),       # shifted: W_task + beta (W_aligned - W_unaligned)
    ("resta", "unaligned", "model.layers.0.self_attn.q_proj.weight"),
])
def test_nan_reaching_safelora_and_resta_outputs_is_refused(pico, tmp_path, method, role, name):
    from mergekit_fixtures import save_model

    sd = read_model(getattr(pico, role))
    sd[name].view(-1)[3] = float("inf")
    save_model(sd, tmp_path / role)
    models = {role: str(tmp_path / role)} if role != "aligned" else {}
    cfg = recipe(pico, method, params={"threshold": TAU} if method == "safelora" else {}, **models)
    if role == "aligned":
        cfg["base_model"] = str(tmp_path / role)
    with pytest.raises(Exception) as err:
        merge(cfg, tmp_path / "o")
    msg = str(err.value)
    assert f"tensor {name}: NaN or Inf in the {role} model; check the input models" in msg, msg


def _nan_task(pico, tmp_path: Path) -> Path:
    """The task model with a NaN in its final norm: refused when that tensor's turn comes, after
    every layer has been scored and recorded."""
    from mergekit_fixtures import save_model

    sd = read_model(pico.task)
    sd["model.norm.weight"].view(-1)[3] = float("nan")
    save_model(sd, tmp_path / "task-nan")
    return tmp_path / "task-nan"


@pytest.mark.parametrize("variant", ["bare-model", "no-prefix", "adapter-name", "default-name"])
def test_a_model_lora_whose_factors_peft_does_not_load_is_refused(pico, tmp_path, capsys, variant):
    """mergekit folds a model+lora input with PEFT, which loads a module's factors only as
    base_model.model.<its name in the model>.lora_A.weight (lora_A.default.weight too): an adapter
    saved from the bare LlamaModel, keys without the prefix or with another adapter name were
    checked loosely and passed, PEFT folded none of them (or its random initial factors), and the
    merge took that for the task update, exit 0 (review184). Refused in one line now, by
    safemerge-yaml and by the methods under run_merge; the default adapter name merges."""
    from safetensors.torch import load_file, save_file

    from safemerge_ext import yaml_cli

    lora = Path(shutil.copytree(pico.lora_task, tmp_path / "lora"))
    rename = {"bare-model": lambda k: k.replace("base_model.model.model.", "base_model.model."),
              "no-prefix": lambda k: k.removeprefix("base_model.model."),
              "adapter-name": lambda k: k.replace(".weight", ".sft.weight"),
              "default-name": lambda k: k.replace(".weight", ".default.weight")}[variant]
    factors = load_file(lora / "adapter_model.safetensors")
    save_file({rename(k): v for k, v in factors.items()}, str(lora / "adapter_model.safetensors"))
    cfg = recipe(pico, params={"threshold": TAU}, task=f"{pico.aligned}+{lora}")
    out = tmp_path / "out"
    if variant == "default-name":
        want, _ = merge(recipe(pico, params={"threshold": TAU}, task=f"{pico.aligned}+{pico.lora_task}"), tmp_path / "w",
                        lora_merge_cache=str(tmp_path / "c1"))
        got, _ = merge(cfg, tmp_path / "got", lora_merge_cache=str(tmp_path / "c2"))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
        return
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(_write(cfg, tmp_path / "r.yml")), str(out), "--no-copy-tokenizer"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("safemerge-yaml:")]
    assert done.value.code == 1 and len(err) == 1, err
    assert f"role task: LoRA adapter {lora}: PEFT loads a module's factors only as base_model.model.<the module's " \
           "name in the model>.lora_A.weight" in err[0] and "give it to the safemerge command" in err[0], err
    assert ("the model names that module model.layers." if variant == "bare-model" else "is not named") in err[0]
    assert not out.exists()
    # (the refused check's readers are closed, though the refusal's traceback, kept by `done`, holds them)
    held = [t for t in (os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd"))
            if t.startswith(str(pico.root)) and t.endswith(".safetensors")]
    assert held == [], held
    with pytest.raises(SafeMergeError, match="PEFT would fold that module at its initial values"):
        merge(cfg, out, lora_merge_cache=str(tmp_path / "c3"))


def test_a_failed_run_gives_no_report_and_leaves_nothing_for_the_next(pico, tmp_path):
    """A run that fails part way gives no report, and a run after it at the same report location (in
    the same process) reports its own layers only."""
    from safemerge_ext import mergekit_run as mr

    loc = tmp_path / "reports"
    bad = recipe(pico, params={"threshold": TAU}, task=str(_nan_task(pico, tmp_path)))
    with pytest.raises(Exception, match="NaN or Inf"):
        merge(bad, loc)
    assert finalize_report(loc) is None
    assert not list(loc.glob("*.jsonl")) and not (loc / "safemerge_report.json").exists()
    with pytest.raises(Exception, match="NaN or Inf"):
        merge(bad, loc)  # nobody finalizes this one: the next run's first record starts afresh
    one_layer = {**recipe(pico, params={"threshold": 0.9}), "models": None, "slices": [{"sources": [
        {"model": str(pico.aligned), "layer_range": [0, 1]},
        *({"model": str(getattr(pico, r)), "layer_range": [0, 1], "parameters": {"role": r}}
          for r in ("task", "safety", "unaligned"))]}]}
    _, rep = merge(one_layer, loc)
    _, clean = merge(one_layer, tmp_path / "clean")
    assert [r["module"] for r in rep["layers"]] == [r["module"] for r in clean["layers"]]
    assert all(".layers.0." in r["module"] for r in rep["layers"])
    assert rep["settings"]["threshold"] == 0.9 and rep["bytes_read"] == clean["bytes_read"]
    assert not mr.pending_reports() or all("reports" not in k for k in mr.pending_reports())


@pytest.mark.parametrize("earlier", ["report", "plot-only", "not-a-report", "refused-before-writing"])
def test_a_rerun_into_an_earlier_output_that_fails_leaves_no_earlier_report(pico, tmp_path, earlier):
    """mergekit writes OUT_PATH in place: a second run into the first one's folder, stopped part
    way, left its weights beside the first run's report (and a plot drawn for it), which read as
    the report of what was there (review182). A run that did not finish and wrote into the folder
    takes the earlier report with it (a .json there that is no report of ours stays); one refused
    before it wrote anything leaves the earlier output and its report as they were (review185: the
    report of a complete output was deleted as the refused run was planned)."""
    from safetensors.torch import load_file, save_file

    from safemerge_ext import mergekit_run as mr

    out = tmp_path / "out"
    merge(recipe(pico, params={"threshold": TAU}), out)
    assert (out / "safemerge_report.json").is_file() and (out / "safemerge_report.png").is_file()
    if earlier == "plot-only":
        (out / "safemerge_report.json").unlink()
    elif earlier == "not-a-report":
        (out / "safemerge_report.json").write_text('{"mine": 1}')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    if earlier == "refused-before-writing":  # (factors PEFT would not load: refused before a tensor is written)
        lora = Path(shutil.copytree(pico.lora_task, tmp_path / "lora"))
        factors = load_file(lora / "adapter_model.safetensors")
        save_file({k.replace("base_model.model.model.", "base_model.model."): v for k, v in factors.items()},
                  str(lora / "adapter_model.safetensors"))
        bad, why = recipe(pico, params={"threshold": 0.6}, task=f"{pico.aligned}+{lora}"), "initial values"
    else:
        bad, why = recipe(pico, params={"threshold": 0.6}, task=str(_nan_task(pico, tmp_path))), "NaN or Inf"
    with pytest.raises(Exception, match=why):
        merge(bad, out, lora_merge_cache=str(tmp_path / "cache"))
    mr._finalize_pending()  # (the exit hook's work: no report for the run that failed)
    if earlier == "refused-before-writing":
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        return
    assert not (out / "safemerge_report.png").exists()
    if earlier == "not-a-report":
        assert (out / "safemerge_report.json").read_text() == '{"mine": 1}'
    else:
        assert not (out / "safemerge_report.json").exists()


def test_exit_hook_writes_no_report_for_an_unfinished_mergekit_yaml(pico, tmp_path, monkeypatch):
    """Plain mergekit-yaml assembles the report at exit; it does not when the process is dying of an
    error, or when OUT got no config.json from this run (mergekit writes it after every tensor:
    an interrupted run never does)."""
    from safemerge_ext import mergekit_run as mr

    out = tmp_path / "out"
    monkeypatch.setattr(mr, "_cli_out", [str(out)])
    monkeypatch.setattr(mr, "_override", None)
    monkeypatch.delenv(mr.REPORT_DIR_ENV, raising=False)
    cfg = recipe(pico, params={"threshold": TAU})

    def run_then_exit(prepare=None) -> bool:
        register_methods()
        run_merge(MergeConfiguration.model_validate(cfg), str(out),
                  MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
        assert mr.pending_reports()
        if prepare:
            prepare()
        mr._finalize_pending()
        assert not mr.pending_reports() and not list(out.glob("*.jsonl"))
        done = (out / "safemerge_report.json").is_file()
        (out / "safemerge_report.json").unlink(missing_ok=True)
        return done

    assert run_then_exit()
    assert not run_then_exit(lambda: (out / "config.json").unlink())  # interrupted before the config
    stale = lambda: os.utime(out / "config.json", (1e9, 1e9))  # noqa: E731 (a config.json of an earlier run)
    assert not run_then_exit(stale)
    with monkeypatch.context() as m:
        m.setattr(sys, "last_value", RuntimeError("boom"), raising=False)
        assert not run_then_exit()
    assert run_then_exit()


def test_exit_hook_unties_a_head_the_output_stores(pico, tmp_path, monkeypatch, capsys):
    """Plain mergekit-yaml copies the base model's config: where it ties the head to the embeddings
    but the merge writes a head of its own (a task model PEFT untied), the exit hook unties the
    output's config, as safemerge-yaml does, and the report says so (also where mergekit writes .bin
    files, --no-safe-serialization: that head stayed tied, review199); an untied base is left as it
    was."""
    from safemerge_ext import mergekit_run as mr

    tied = tmp_path / "tied"
    for name in ("aligned", "unaligned", "task", "safety"):
        m = Path(shutil.copytree(getattr(pico, name), tied / name))
        cfg = json.loads((m / "config.json").read_text())
        (m / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    monkeypatch.setattr(mr, "_override", None)
    monkeypatch.delenv(mr.REPORT_DIR_ENV, raising=False)

    def run(models: Path, safe_serialization: bool = True) -> tuple[dict, dict]:
        out = tmp_path / f"out-{models.name}"
        shutil.rmtree(out, ignore_errors=True)
        monkeypatch.setattr(mr, "_cli_out", [str(out)])
        cfg = recipe(pico, params={"threshold": TAU}, task=str(models / "task"), safety=str(models / "safety"),
                     unaligned=str(models / "unaligned"))
        register_methods()
        run_merge(MergeConfiguration.model_validate({**cfg, "base_model": str(models / "aligned")}), str(out),
                  MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False,
                               safe_serialization=safe_serialization))
        if safe_serialization:
            assert "lm_head.weight" in read_model(out)
        else:
            assert "lm_head.weight" in torch.load(out / "pytorch_model.bin", weights_only=True, mmap=True)
        mr._finalize_pending()
        return (json.loads((out / "config.json").read_text()),
                json.loads((out / "safemerge_report.json").read_text()))

    for safe_serialization in (True, False):
        config, report = run(tied, safe_serialization)
        assert config["tie_word_embeddings"] is False
        assert any("lm_head.weight is written as its own tensor" in w for w in report["warnings"])
    # a config it cannot write is one error line; the report is still written
    from safemerge_ext.io import model_writer

    def unwritable(folder):
        raise PermissionError(13, "Permission denied", str(folder / "config.json"))

    with monkeypatch.context() as m:
        m.setattr(model_writer, "untie_stored_head", unwritable)
        config, report = run(tied)
    assert config["tie_word_embeddings"] is True and report["layers"]
    config, report = run(pico.root)
    assert config["tie_word_embeddings"] is False and not any("tie_word_embeddings" in w for w in report["warnings"])

    from safemerge_ext import yaml_cli  # the same through safemerge-yaml: config, report and stderr

    monkeypatch.setattr(mr, "_cli_out", [None])
    cfg = recipe(pico, params={"threshold": TAU}, task=str(tied / "task"), safety=str(tied / "safety"),
                 unaligned=str(tied / "unaligned"))
    out = tmp_path / "out-yaml"
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(_write({**cfg, "base_model": str(tied / "aligned")}, tmp_path / "r.yml")), str(out),
                       "--no-copy-tokenizer"])
    assert done.value.code in (0, None)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    report = json.loads((out / "safemerge_report.json").read_text())
    assert any("lm_head.weight is written as its own tensor" in w for w in report["warnings"])
    assert "warning: lm_head.weight is written as its own tensor" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists open files through /proc")
def test_header_reads_leave_no_input_file_open(pico, tmp_path):
    """Reading headers (safemerge-yaml's checks, the methods' byte counts) keeps no input shard
    open after it: a model of 191 shards (405B) in four roles would otherwise hold ~800 files."""
    def open_inputs() -> list[str]:
        held = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith(str(pico.root)) and target.endswith(".safetensors"):
                held.append(target)
        return held

    cfg = recipe(pico, params={"threshold": TAU})
    validate_recipe(cfg, "r.yml")
    assert open_inputs() == []
    merge(cfg, tmp_path / "out")
    assert open_inputs() == []


@pytest.mark.parametrize("where", ["in-a-method", "in-mergekit", "after-the-merge"])
def test_failed_safemerge_yaml_writes_no_report_at_its_report_path(pico, tmp_path, capsys, monkeypatch, where):
    """A safemerge-yaml run that fails writes no report to its report_path, now or at exit: when a
    method raised, and when the merge ran through and something after it failed (here OUT_PATH
    appearing while the run wrote)."""
    import mergekit.merge

    from safemerge_ext import mergekit_run as mr
    from safemerge_ext import yaml_cli

    own, out = tmp_path / "own", tmp_path / "out"
    task = _nan_task(pico, tmp_path) if where == "in-a-method" else pico.task
    cfg = recipe(pico, params={"threshold": TAU, "report_path": str(own)}, task=str(task))
    real = mergekit.merge.run_merge

    def then_out_appears(*a, **k):
        real(*a, **k)
        if where == "in-mergekit":  # every layer recorded, then mergekit fails (say, writing the config)
            raise OSError(28, "No space left on device")
        out.mkdir()

    monkeypatch.setattr(mergekit.merge, "run_merge", then_out_appears)
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(_write(cfg, tmp_path / "r.yml")), str(out)])
    mr._finalize_pending()  # what the exit hook does
    err = capsys.readouterr().err
    assert done.value.code == 1
    assert {"in-a-method": "NaN or Inf", "in-mergekit": "No space left on device",
            "after-the-merge": f"OUT_PATH {out} appeared while"}[where] in err, err
    assert sum("safemerge-yaml: error:" in ln for ln in err.splitlines()) == 1
    assert "cosine min / median / max" not in err  # no summary of the part that ran
    assert not own.exists() or not any(own.iterdir()), sorted(p.name for p in own.iterdir())


def test_safemerge_yaml_force_keeps_a_folder_that_appeared_at_out_path(pico, tmp_path, capsys, monkeypatch):
    """review186: safemerge-yaml --force with OUT_PATH absent as it started deleted a folder of
    other files that was made there while mergekit ran. It is kept, and the run says why."""
    import mergekit.merge

    from safemerge_ext import yaml_cli

    out = tmp_path / "out"
    real = mergekit.merge.run_merge

    def then_a_folder_appears(*a, **k):
        real(*a, **k)
        out.mkdir()
        (out / "thesis.txt").write_text("mine")

    monkeypatch.setattr(mergekit.merge, "run_merge", then_a_folder_appears)
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(_write(recipe(pico, params={"threshold": TAU}), tmp_path / "r.yml")), str(out), "--force"])
    assert done.value.code == 1
    err = capsys.readouterr().err
    assert (f"safemerge-yaml: error: OUT_PATH {out} appeared while this run was writing and is no earlier output "
            "(no safemerge_report.json in it): --force would delete all of it, so nothing was replaced") in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yml"]
    assert sorted(p.name for p in out.iterdir()) == ["thesis.txt"]


def test_safemerge_yaml_full_disk_and_a_killed_runs_lora_folds(pico, tmp_path, capsys, monkeypatch):
    """A full disk is named by OUT_PATH, with what to do, also where safetensors reports it as text
    only (its Rust I/O error); with LoRA inputs the line adds that the folded models need room
    beside OUT_PATH. The folds' hidden folder is named after OUT_PATH, so the next run for it
    names one that a killed run left."""
    import mergekit.merge
    from safetensors import SafetensorError

    from safemerge_ext import yaml_cli

    out = tmp_path / "out"
    cfg = recipe(pico, params={"threshold": TAU}, task=f"{pico.aligned}+{pico.lora_task}")
    folds = []

    def full(config, out_path, options=None, **k):
        folds.append(Path(options.lora_merge_cache))
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as m:
        m.setattr(mergekit.merge, "run_merge", full)
        with pytest.raises(SystemExit) as done:
            yaml_cli.main([str(_write(cfg, tmp_path / "r.yml")), str(out), "--no-copy-tokenizer"])
    err = capsys.readouterr().err.strip()
    assert done.value.code == 1 and err == (
        f"safemerge-yaml: error: OUT_PATH {out}: its file system is full (Error while serializing: I/O error: No space "
        "left on device (os error 28)); free space there or write elsewhere (with LoRA inputs, the folded models need "
        "room beside OUT_PATH too; --lora-merge-cache DIR puts them elsewhere)"), err
    assert folds[0].parent == tmp_path and folds[0].name.startswith(".out.lora-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yml"]
    left = tmp_path / ".out.lora-0123abcd"  # (what a SIGKILLed run leaves)
    left.mkdir()
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(_write(recipe(pico, params={"threshold": TAU}), tmp_path / "r.yml")), str(out),
                       "--no-copy-tokenizer"])
    assert done.value.code in (0, None)
    assert (f"safemerge-yaml: warning: {left} holds the LoRA inputs folded by mergekit (its --lora-merge-cache) of an "
            f"earlier run for OUT_PATH {out} that was killed") in capsys.readouterr().err


def test_safemerge_yaml_names_its_out_path_argument(pico, tmp_path, capsys):
    """safemerge-yaml takes OUT_PATH as an argument (no --out option): its errors say so."""
    from safemerge_ext import yaml_cli

    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(_write(recipe(pico), tmp_path / "r.yml")), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert done.value.code == 1 and f"OUT_PATH {tmp_path / 'out'} already exists" in err and "--out" not in err, err


_YAML_TERM_DRIVER = """
import os, signal, sys, time
from pathlib import Path
import mergekit.merge
from safemerge_ext import yaml_cli

SIG = signal.Signals[sys.argv.pop(1)]

def stopped(config, out, *a, **k):  # part of the model written, then the job is stopped
    (Path(out) / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    os.kill(os.getpid(), SIG)
    time.sleep(30)

mergekit.merge.run_merge = stopped
yaml_cli.main(sys.argv[1:])
"""


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_safemerge_yaml_sigterm_cleans_up(pico, tmp_path, sig, code):
    """SIGTERM mid-merge: one line, exit 143, nothing at OUT_PATH, no LoRA cache left beside it;
    SIGHUP (the terminal closed) alike, with 129 (it killed the run and left both folders)."""
    cfg = recipe(pico, params={"threshold": TAU}, task=f"{pico.aligned}+{pico.lora_task}")
    recipe_file = _write(cfg, tmp_path / "r.yml")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", _YAML_TERM_DRIVER, sig, str(recipe_file), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == code, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == (f"safemerge-yaml: terminated ({sig}); nothing was written to "
                                                   f"OUT_PATH {tmp_path / 'out'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yml"]


_YAML_TERM_AT_START_DRIVER = """
import os, signal, sys


class TermAtMergekit:  # SIGTERM as mergekit's import begins (a timer raced the start-up under load)
    def find_spec(self, name, path=None, target=None):
        if name == "mergekit":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGTERM)
        return None


sys.meta_path.insert(0, TermAtMergekit())
from safemerge_ext import cli
sys.argv = ["safemerge-yaml", *sys.argv[1:]]
cli.yaml_main()  # (as the console script calls it)
"""


def test_safemerge_yaml_sigterm_during_its_imports_ends_in_one_line(pico, tmp_path):
    """SIGTERM in the first seconds, while mergekit and torch are imported: handled from the start
    (it waits for the import under way), one line, exit 143, nothing at OUT_PATH."""
    recipe_file = _write(recipe(pico, params={"threshold": TAU}), tmp_path / "r.yml")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", _YAML_TERM_AT_START_DRIVER, str(recipe_file), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 143, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1].startswith("safemerge-yaml: terminated (SIGTERM); nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yml"]


_YAML_LORA_SIGNAL_DRIVER = r"""
import pathlib, shutil, signal, sys
where = sys.argv.pop(1)
real_mkdir, real_rmtree = pathlib.Path.mkdir, shutil.rmtree


def mkdir(self, *a, **k):
    real_mkdir(self, *a, **k)
    if where == "made" and ".lora-" in self.name:
        signal.raise_signal(signal.SIGINT)  # (Ctrl-C as the folds' folder is made)


def rmtree(path, *a, **k):
    if where == "deleting" and ".lora-" in str(path):
        real_rmtree(sorted(pathlib.Path(path).iterdir())[0])
        signal.raise_signal(signal.SIGINT)  # (Ctrl-C while the folds are deleted)
    return real_rmtree(path, *a, **k)


pathlib.Path.mkdir, shutil.rmtree = mkdir, rmtree
from safemerge_ext import cli
sys.argv = ["safemerge-yaml", *sys.argv[1:]]
cli.yaml_main()
"""


def test_safemerge_yaml_lets_go_of_its_folders(pico, tmp_path, capsys):
    """The hidden folders a run holds (its LoRA folds, its temporary) are let go once it is done:
    a later run in the process (a notebook, a sweep) is not refused, nor are descriptors kept."""
    from safemerge_ext.io import output
    from safemerge_ext.yaml_cli import main as yaml_main

    cfg = recipe(pico, params={"threshold": TAU}, task=f"{pico.aligned}+{pico.lora_task}")
    recipe_file = _write(cfg, tmp_path / "r.yml")
    for force in ([], ["--force"]):
        with pytest.raises(SystemExit) as done:
            yaml_main([str(recipe_file), str(tmp_path / "out"), "--no-copy-tokenizer", *force])
        assert done.value.code in (0, None), capsys.readouterr().err
        assert output._held == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yml"]


@pytest.mark.parametrize("where", ["made", "deleting"])
def test_safemerge_yaml_ctrl_c_at_its_lora_folder_leaves_nothing(pico, tmp_path, where):
    """A Ctrl-C as safemerge-yaml makes its hidden folder of LoRA folds, or while it deletes it,
    waits for that step: the run ends in its one line with nothing beside OUT_PATH (review130: a
    half-deleted, model-sized .OUT.lora-* was left, which the next run called a killed run's)."""
    cfg = recipe(pico, params={"threshold": TAU}, task=f"{pico.aligned}+{pico.lora_task}",
                 safety=f"{pico.aligned}+{pico.lora_safety}")
    recipe_file = _write(cfg, tmp_path / "r.yml")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", _YAML_LORA_SIGNAL_DRIVER, where, str(recipe_file),
                          str(tmp_path / "out"), "--no-copy-tokenizer"], capture_output=True, text=True, timeout=300,
                         env=env)
    assert res.returncode == 130, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == f"safemerge-yaml: interrupted; nothing was written to OUT_PATH " \
                                                  f"{tmp_path / 'out'}", res.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yml"]


_YAML_EXIT_DRIVER = """
import sys
from safemerge_ext import cli
sys.argv = ["safemerge-yaml", *sys.argv[1:]]
try:
    cli.yaml_main()  # (as the console script calls it)
finally:
    print("yaml_main returned", flush=True)
"""


def test_safemerge_yaml_process_ends_at_once_after_its_run(pico, tmp_path):
    """Once OUT_PATH and its report are written and the summary is out, the console script ends the
    process at once: no second of mergekit's and torch's teardown in which a signal would kill it
    without a word (nothing of the plugin's is left for the exit hook)."""
    recipe_file = _write(recipe(pico, params={"threshold": TAU}), tmp_path / "r.yml")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", _YAML_EXIT_DRIVER, str(recipe_file), str(tmp_path / "out"),
                          "--no-copy-tokenizer"], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "merged model and report written to" in res.stdout and "yaml_main returned" not in res.stdout
    assert (tmp_path / "out" / "safemerge_report.json").is_file()


_YAML_TERM_AFTER_DRIVER = """
import os, signal, sys, time
from safemerge_ext import yaml_cli

def stopped(report, path):  # the merge is in place; the copy at report_path is being written
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)

yaml_cli.plot_writer = stopped
yaml_cli.main(sys.argv[1:])
"""


def test_safemerge_yaml_sigterm_after_the_merge_says_it_is_complete(pico, tmp_path):
    """SIGTERM while the report is copied to report_path, after OUT_PATH is in place: exit 143, and the
    line says OUT_PATH is complete (not that nothing was written)."""
    _terminated_once_complete(_YAML_TERM_AFTER_DRIVER, recipe(pico, params={"threshold": TAU,
                                                                             "report_path": str(tmp_path / "rep")}),
                              tmp_path)


def _terminated_once_complete(driver: str, cfg: dict, tmp_path: Path) -> None:
    """Run safemerge-yaml through ``driver`` (which sends SIGTERM once OUT_PATH is in place): exit
    143, a last line that says OUT_PATH is complete, and OUT_PATH with its report and weights."""
    out = tmp_path / "out"
    recipe_file = _write(cfg, tmp_path / "r.yml")
    res = subprocess.run([sys.executable, "-c", driver, str(recipe_file), str(out), "--no-copy-tokenizer"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 143, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == (f"safemerge-yaml: terminated (SIGTERM) after the merge: {out} is "
                                                   "complete; the report_path copy or the summary was cut short")
    assert (out / "safemerge_report.json").is_file() and list(out.glob("*.safetensors"))


_YAML_TERM_AT_RENAME_DRIVER = """
import os, signal, sys
from pathlib import Path
from safemerge_ext import yaml_cli
from safemerge_ext.io import output

real, out = output._fsync, Path(sys.argv[2])
def fsync(path):  # the rename that puts OUT_PATH in place is being synced
    real(path)
    if Path(path) == out.parent and out.is_dir():
        os.kill(os.getpid(), signal.SIGTERM)

output._fsync = fsync
yaml_cli.main(sys.argv[1:])
"""


def test_safemerge_yaml_sigterm_as_out_path_is_put_in_place_says_it_is_complete(pico, tmp_path):
    """SIGTERM while the finished OUT_PATH is renamed into place (and the rename synced): it waits for
    the rename, and the line says OUT_PATH is complete, with its report (not that nothing was written)."""
    _terminated_once_complete(_YAML_TERM_AT_RENAME_DRIVER, recipe(pico, params={"threshold": TAU}), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yml"]  # (no hidden partial output)


@pytest.mark.parametrize("kind", ["under-a-file", "json-is-a-folder", "in-out-path", "out-path", "not-utf8", "out-holds-input",
                                  "replaces-input", "not-an-output"])
def test_safemerge_yaml_refuses_bad_paths_before_merging(pico, tmp_path, capsys, monkeypatch, kind):
    """report_path that cannot be written, or that lies in OUT_PATH, a recipe that is not UTF-8 text,
    and an OUT_PATH whose replacement would delete an input: one line, before mergekit runs."""
    import shutil

    import mergekit.merge

    from safemerge_ext import yaml_cli

    (tmp_path / "afile").write_text("x")
    (tmp_path / "r.json").mkdir()
    out = tmp_path / "out"
    report_path = {"under-a-file": tmp_path / "afile" / "sub", "json-is-a-folder": tmp_path / "r.json",
                   "in-out-path": out / "rep", "out-path": out}.get(kind)
    params = {"threshold": TAU} | ({"report_path": str(report_path)} if report_path else {})
    task, force = str(pico.task), []
    if kind == "out-holds-input":  # the task model inside OUT_PATH, which --force would replace
        out.mkdir()
        task = str(shutil.copytree(pico.task, out / "task"))
        force = ["--force"]
    if kind == "not-an-output":  # a folder of other files (a mistyped OUT_PATH): --force does not delete it
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        force = ["--force"]
    if kind == "replaces-input":  # report_path <task model>/config.json: the report would replace it
        task = str(shutil.copytree(pico.task, tmp_path / "task"))
        params["report_path"] = str(tmp_path / "task" / "config.json")
    rec = _write(recipe(pico, params=params, task=task), tmp_path / "r.yml")
    if kind == "not-utf8":
        rec.write_bytes(b"\xff\xfe not text")
    monkeypatch.setattr(mergekit.merge, "run_merge", lambda *a, **k: pytest.fail("merged despite a bad path"))
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(rec), str(out), *force])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 1 and len(err) == 1 and err[0].startswith("safemerge-yaml: error:"), err
    assert {"under-a-file": "is a file, not a folder", "json-is-a-folder": "is a folder",
            "in-out-path": "is OUT_PATH or inside it", "out-path": "is OUT_PATH or inside it",
            "not-utf8": "not a text file in UTF-8", "out-holds-input": "which the output would replace",
            "replaces-input": "config.json is a file of role task model",
            "not-an-output": "holds no safemerge_report.json, which every output of safemerge holds"}[kind] in err[0]
    assert (out.exists() and kind == "out-holds-input" and (out / "task" / "config.json").is_file()) \
        or (kind == "not-an-output" and (out / "notes.txt").read_text() == "mine") or not out.exists()


def test_safemerge_yaml_report_copy_that_fails_is_one_line_after_the_merge(pico, tmp_path, capsys, monkeypatch):
    """When the merge is in place but the copy of its report at report_path cannot be written, the
    run says where the merge and its report are, in one line."""
    from safemerge_ext import yaml_cli

    own, out = tmp_path / "own", tmp_path / "out"
    cfg = recipe(pico, params={"threshold": TAU, "report_path": str(own)})
    monkeypatch.setattr(yaml_cli, "write_files", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(_write(cfg, tmp_path / "r.yml")), str(out), "--no-copy-tokenizer"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("safemerge-yaml:")]  # (not mergekit's bars)
    assert done.value.code == 1 and len(err) == 1 and "the merge and its report are in" in err[0], err
    assert (out / "safemerge_report.json").is_file() and (out / "config.json").is_file()


def test_safemerge_yaml_report_path_copy_is_one_pair(pico, tmp_path, capsys, monkeypatch):
    """The report_path copy is its JSON and plot together, or neither: the JSON was written, then the
    plot rendered, so a run whose plot there failed (a full disk), or a second run sharing the
    report_path, left one run's JSON beside another's plot (review139)."""
    from safemerge_ext import yaml_cli

    own = tmp_path / "own"
    own.mkdir()
    (own / "safemerge_report.json").write_text('{"from": "the other run"}\n')
    (own / "safemerge_report.png").write_bytes(b"the other run's plot")
    real = yaml_cli.plot_writer

    def full_in_own(report, path):
        save = real(report, path)
        if Path(path).parent != own:
            return save

        def fails(tmp):
            raise OSError(28, "No space left on device")
        return fails

    monkeypatch.setattr(yaml_cli, "plot_writer", full_in_own)
    cfg = recipe(pico, params={"threshold": TAU, "report_path": str(own)})
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(_write(cfg, tmp_path / "r.yml")), str(tmp_path / "out"), "--no-copy-tokenizer"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("safemerge-yaml:")]
    assert done.value.code == 1 and len(err) == 1 and "No space left on device" in err[0], err
    assert (own / "safemerge_report.json").read_text() == '{"from": "the other run"}\n'
    assert (own / "safemerge_report.png").read_bytes() == b"the other run's plot"
    assert (tmp_path / "out" / "safemerge_report.json").is_file()


def test_safemerge_yaml_report_path_copy_names_what_a_killed_copy_left(pico, tmp_path, capsys):
    """A SIGKILL during the report_path copy leaves its hidden temporaries beside report_path, which
    the next run neither named nor removed (review182): the next copy names them."""
    from safemerge_ext import yaml_cli

    own = tmp_path / "rp" / "run.json"
    own.parent.mkdir()
    left = own.parent / ".run.json.tmp-0a1b2c3d.json"
    left.write_text("{")
    cfg = recipe(pico, params={"threshold": TAU, "report_path": str(own)})
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(_write(cfg, tmp_path / "r.yml")), str(tmp_path / "out"), "--no-copy-tokenizer"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("safemerge-yaml:")]
    assert done.value.code in (0, None) and own.is_file() and left.is_file()
    assert (tmp_path / "out" / "safemerge_report.json").is_file()
    assert err == [f"safemerge-yaml: warning: {left} holds a partial output of an earlier run for {own} that was "
                   "killed; delete it unless a run is writing there now"], err


def test_the_autoload_hook_never_breaks_mergekit_under_warnings_as_errors(monkeypatch, capsys):
    """A registration that fails is a warning; with warnings turned into errors (-W error, pytest's
    filterwarnings = error) it must still not become mergekit's import error."""
    import warnings

    from safemerge_ext import _autoload_hook

    monkeypatch.delenv(_autoload_hook.ENV, raising=False)
    monkeypatch.setitem(sys.modules, "safemerge_ext.mergekit_methods", None)  # (its import fails)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _autoload_hook._register()
    assert "could not register the mergekit methods" in capsys.readouterr().err


def test_safemerge_yaml_without_a_working_matplotlib_writes_the_json_report(pico, tmp_path, capsys, monkeypatch, caplog):
    """A recipe has no switch for the plot: when matplotlib does not import, the merge and the
    JSON report (and its copy at report_path) are still written, with a warning; an earlier run's
    plot at report_path (or in a plain mergekit-yaml's OUT_PATH) goes, not to be read beside this
    run's JSON (review147)."""
    from safemerge_ext import report, yaml_cli

    own, out = tmp_path / "own", tmp_path / "out"
    cfg = recipe(pico, params={"threshold": TAU, "report_path": str(own)})
    with pytest.raises(SystemExit) as done:  # (an earlier run, plotted)
        yaml_cli.main([str(_write(cfg, tmp_path / "r.yml")), str(tmp_path / "earlier"), "--no-copy-tokenizer"])
    assert done.value.code == 0 and (own / "safemerge_report.png").is_file()

    def broken():
        raise ImportError("numpy.core.multiarray failed to import")

    monkeypatch.setattr(report, "_import_agg", broken)
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(_write(cfg, tmp_path / "r.yml")), str(out), "--no-copy-tokenizer"])
    assert done.value.code == 0 and (out / "config.json").is_file()
    for folder in (out, own):
        assert sorted(p.name for p in folder.iterdir() if p.name.startswith("safemerge_report")) == [
            "safemerge_report.json"]
    assert any("could not be imported (ImportError: numpy.core.multiarray failed to import)" in r.getMessage()
               and "the report safemerge_report.json has no plot" in r.getMessage() for r in caplog.records)
    plain = tmp_path / "plain"  # (finalize_report, as plain mergekit-yaml's exit hook calls it)
    plain.mkdir()
    (plain / "safemerge_report.png").write_bytes(b"an earlier run's plot")
    merge(recipe(pico, params={"threshold": TAU}), plain)
    assert (plain / "safemerge_report.json").is_file() and not (plain / "safemerge_report.png").exists()


def test_safemerge_yaml_help_gives_its_own_lora_merge_dtype_default(capsys):
    from safemerge_ext import yaml_cli

    with pytest.raises(SystemExit) as done:
        yaml_cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0 and "--lora-merge-dtype TEXT Override dtype when applying LoRAs (default here: float32" in text


@pytest.mark.parametrize("state", ["bf16", "cut-short", "plain", "fp32", "retrained", "other-project", "model-resaved",
                                   "older-record"])
def test_safemerge_yaml_refuses_a_lora_cache_folded_otherwise(pico, tmp_path, capsys, monkeypatch, state):
    """mergekit reuses a --lora-merge-cache entry by the two paths alone (as written): one folded in
    bf16 by an earlier run, left incomplete, folded from the adapter before it was retrained in
    place, or from another project's ./lora (review147: the old adapter was merged, the report
    named the new one), or from the model's weights before they were saved again in place, within
    the second and with the same header (review160), would be scored as this run's task model.
    safemerge-yaml records in each entry it has mergekit fold what it was folded from, and refuses
    an entry that does not match (or has no record: plain mergekit-yaml's) before the merge; one
    that matches is reused, and so is one recorded before the model's times were kept to the
    nanosecond."""
    from safetensors.torch import load_file, save_file

    from safemerge_ext import yaml_cli

    cache, out = tmp_path / "cache", tmp_path / "out"
    for project in ("a", "b"):
        shutil.copytree(pico.lora_task, tmp_path / project / "lora")
    monkeypatch.chdir(tmp_path / "a")
    model = Path(shutil.copytree(pico.aligned, tmp_path / "model"))
    cfg = _write(recipe(pico, params={"threshold": TAU}, task=f"{model}+./lora"), tmp_path / "r.yml")

    def run(to: Path) -> int:
        with pytest.raises(SystemExit) as done:
            yaml_cli.main([str(cfg), str(to), "--no-copy-tokenizer", "--lora-merge-cache", str(cache)])
        return done.value.code

    entry = cache / _lora_entries(yaml.safe_load(cfg.read_text()))[0]
    if state == "cut-short":
        entry.mkdir(parents=True)  # (as a fold stopped after mergekit's mkdir)
    elif state in ("bf16", "plain"):  # (run_merge: what plain mergekit-yaml runs)
        merge(yaml.safe_load(cfg.read_text()), tmp_path / "earlier", lora_merge_cache=str(cache),
              lora_merge_dtype="bfloat16" if state == "bf16" else "float32")
    else:
        assert run(tmp_path / "earlier") == 0 and (entry / yaml_cli.FOLD_STAMP).is_file()
    if state == "retrained":  # (same size, same header: other weights)
        factors = load_file(tmp_path / "a" / "lora" / "adapter_model.safetensors")
        save_file({k: v * 1.5 for k, v in factors.items()}, str(tmp_path / "a" / "lora" / "adapter_model.safetensors"))
    elif state == "other-project":
        monkeypatch.chdir(tmp_path / "b")
    elif state == "model-resaved":  # (same size, same header, other weights; its time moved less than a second)
        shard = sorted(model.glob("*.safetensors"))[0]
        st = shard.stat()
        save_file({k: v * 1.5 for k, v in load_file(shard).items()}, str(shard), metadata={"format": "pt"})
        assert shard.stat().st_size == st.st_size
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns // 10**9 * 10**9 + (st.st_mtime_ns + 1) % 10**9))
    elif state == "older-record":
        stamp = entry / yaml_cli.FOLD_STAMP
        record = json.loads(stamp.read_text())
        assert all(f.pop("modified_ns") for f in record["model"]["files"].values())
        stamp.write_text(json.dumps(record))
    capsys.readouterr()
    code = run(out)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("safemerge-yaml:")]
    if state in ("fp32", "older-record"):
        assert code == 0 and (out / "safemerge_report.json").is_file(), err
        return
    why = {"bf16": "folded in bfloat16, not float32", "cut-short": "holds no complete model",
           "plain": "does not record what it was folded from (plain mergekit-yaml made it",
           "retrained": f"the adapter's adapter_model.safetensors has changed since (it is {tmp_path / 'a' / 'lora'})",
           "other-project": f"the adapter was {tmp_path / 'a' / 'lora'}, now {tmp_path / 'b' / 'lora'}",
           "model-resaved": f"the model's {sorted(model.glob('*.safetensors'))[0].name} has changed since (it is {model})",
           }[state]
    assert code == 1 and len(err) == 1 and why in err[0] and f"remove {entry} so that mergekit folds" in err[0], err
    assert not out.exists()
    shutil.rmtree(entry)  # (as the line says)
    assert run(out) == 0 and (entry / yaml_cli.FOLD_STAMP).is_file()
    assert run(tmp_path / "again") == 0  # (and then reused)


def _lora_entries(cfg: dict) -> list[str]:
    """The cache entries mergekit folds a recipe's model+lora inputs into."""
    refs = [MergeConfiguration.model_validate(cfg).models[i].model for i in range(len(cfg["models"]))]
    return [f"{r.model._unique_id()}_{r.lora._unique_id()}" for r in refs if r.lora is not None]


def test_plain_mergekit_refuses_a_lora_targeting_a_module_the_model_lacks(pico, tmp_path):
    """mergekit folds a model+lora input before the method sees a tensor and drops a module the
    model does not have without a word: the method checks each adapter against its model first,
    as safemerge-yaml does before the run, and mergekit-yaml prints the one line."""
    from safetensors.torch import load_file, save_file

    from safemerge_ext.mergekit_run import refusal

    adapter = Path(shutil.copytree(pico.lora_task, tmp_path / "lora"))
    factors = load_file(adapter / "adapter_model.safetensors")
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    factors[q.replace("q_proj", "foo_proj") + ".lora_A.weight"] = torch.randn_like(factors[q + ".lora_A.weight"])
    factors[q.replace("q_proj", "foo_proj") + ".lora_B.weight"] = torch.randn_like(factors[q + ".lora_B.weight"])
    save_file(factors, str(adapter / "adapter_model.safetensors"))
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    acfg["target_modules"] = sorted(set(acfg["target_modules"]) | {"foo_proj"})
    (adapter / "adapter_config.json").write_text(json.dumps(acfg))
    with pytest.raises(SafeMergeError) as err:
        merge(recipe(pico, params={"threshold": TAU}, task=f"{pico.aligned}+{adapter}"), tmp_path / "o",
              lora_merge_cache=str(tmp_path / "cache"))
    want = (f"role task: LoRA adapter {adapter} targets model.layers.0.self_attn.foo_proj, which {pico.aligned} "
            "does not have; give the model the adapter was trained on")
    assert str(err.value) == want and refusal(err.value) == want
    merge(recipe(pico, params={"threshold": TAU}, task=f"{pico.aligned}+{pico.lora_task}"), tmp_path / "fine",
          lora_merge_cache=str(tmp_path / "cache2"))
    # an adapter saved as adapter_model.bin (PEFT folds it; these readers refuse it) is left to mergekit
    legacy = Path(shutil.copytree(pico.lora_task, tmp_path / "legacy"))
    torch.save(load_file(legacy / "adapter_model.safetensors"), legacy / "adapter_model.bin")
    (legacy / "adapter_model.safetensors").unlink()
    got, _ = merge(recipe(pico, params={"threshold": TAU}, task=f"{pico.aligned}+{legacy}"), tmp_path / "legacy-out",
                   lora_merge_cache=str(tmp_path / "cache3"))
    assert all(torch.equal(got[k], v) for k, v in read_model(tmp_path / "fine").items())
    # a model+lora whose model is in pytorch_model.bin files merges, and is checked as one in safetensors is
    # (the check was skipped, and the fold dropped foo_proj without a word: review201)
    bin_model = Path(shutil.copytree(pico.aligned, tmp_path / "bin-model"))
    torch.save(read_model(bin_model), bin_model / "pytorch_model.bin")
    for f in [*bin_model.glob("*.safetensors"), *bin_model.glob("model.safetensors.index.json")]:
        f.unlink()
    got, _ = merge(recipe(pico, params={"threshold": TAU}, task=f"{bin_model}+{pico.lora_task}"), tmp_path / "bin-out",
                   lora_merge_cache=str(tmp_path / "cache4"))
    assert all(torch.equal(got[k], v) for k, v in read_model(tmp_path / "fine").items())
    with pytest.raises(SafeMergeError) as err:
        merge(recipe(pico, params={"threshold": TAU}, task=f"{bin_model}+{adapter}"), tmp_path / "bin-o",
              lora_merge_cache=str(tmp_path / "cache5"))
    assert str(err.value) == want.replace(str(pico.aligned), str(bin_model))


def test_safemerge_yaml_names_a_lora_on_a_tied_head(pico, tmp_path):
    """A model+lora whose adapter targets lm_head where the model ties it to the embeddings (no
    tensor of its own) is refused as that, not as a module the model lacks."""
    from safetensors.torch import load_file, save_file

    aligned = Path(shutil.copytree(pico.aligned, tmp_path / "tied"))
    cfg = json.loads((aligned / "config.json").read_text())
    (aligned / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    index_path = aligned / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    for shard in aligned.glob("*.safetensors"):
        sd = load_file(shard)
        if sd.pop("lm_head.weight", None) is not None:
            save_file(sd, str(shard), metadata={"format": "pt"})
    if index is not None:
        index["weight_map"].pop("lm_head.weight", None)
        index_path.write_text(json.dumps(index))
    adapter = Path(shutil.copytree(pico.lora_task, tmp_path / "lora"))
    factors = load_file(adapter / "adapter_model.safetensors")
    d_model = read_model(pico.aligned)["lm_head.weight"].shape
    factors["base_model.model.lm_head.lora_A.weight"] = torch.randn(4, d_model[1])
    factors["base_model.model.lm_head.lora_B.weight"] = torch.randn(d_model[0], 4)
    save_file(factors, str(adapter / "adapter_model.safetensors"))
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    acfg.setdefault("rank_pattern", {})["lm_head"] = 4
    (adapter / "adapter_config.json").write_text(json.dumps(acfg))
    with pytest.raises(SafeMergeError, match=r"targets lm_head, which .*tied ties to its input embeddings "
                                             r"\(tie_word_embeddings, no tensor of its own\)"):
        validate_recipe({**recipe(pico, task=f"{aligned}+{adapter}"), "base_model": str(aligned)})


@pytest.mark.parametrize("where", ["slice", "module", "top"])
def test_a_role_default_comes_from_where_mergekit_reads_it(where):
    """A source without its own role takes the one mergekit gives it: its slice's, else its
    module's, else the recipe's parameters; the nearest wins."""
    from mergekit.config import MergeConfiguration

    from safemerge_ext.yaml_cli import check_roles

    sources = [{"model": "./a", "layer_range": [0, 2]}, {"model": "./t", "layer_range": [0, 2]}] + [
        {"model": f"./{r[0]}", "layer_range": [0, 2], "parameters": {"role": r}} for r in ("safety", "unaligned")]
    module = {"slices": [{"sources": sources}]}
    cfg = {"merge_method": "safemerge", "base_model": "./a", "modules": {"text": module}}
    table = {"slice": module["slices"][0], "module": module, "top": cfg}[where]
    table["parameters"] = {"role": "task"}
    if where != "top":  # (a farther default loses to the nearer one)
        cfg["parameters"] = {"role": "unaligned"}
    assert check_roles("safemerge", MergeConfiguration.model_validate(cfg)) == {
        "task": "./t", "safety": "./s", "unaligned": "./u"}


def test_a_threshold_equal_to_a_score_flags_for_safelora_not_for_safemerge(pico, tmp_path):
    _, first = merge(recipe(pico, "safelora", params={"threshold": TAU}), tmp_path / "a")
    row = next(r for r in first["layers"] if r["cosine"] is not None and r["flagged"])
    tau = row["cosine"]  # (the run's own float, exact through JSON)
    _, lora = merge(recipe(pico, "safelora", params={"threshold": tau}), tmp_path / "b")
    _, smerge = merge(recipe(pico, "safemerge", params={"threshold": tau}), tmp_path / "c")
    lora_row = {r["module"]: r for r in lora["layers"]}[row["module"]]
    smerge_row = {r["module"]: r for r in smerge["layers"]}[row["module"]]
    assert lora_row["cosine"] == smerge_row["cosine"] == tau
    assert lora_row["flagged"] and not smerge_row["flagged"]


def test_safemerge_dare_uses_its_seed(pico, tmp_path):
    from test_pipeline import ref_sparse

    params = {"threshold": TAU, "merge": "dare_linear", "density": 0.5, "seed": 5}
    got, report = merge(recipe(pico, params=params), tmp_path / "o")
    A, T, S = read_model(pico.aligned), read_model(pico.task), read_model(pico.safety)
    flagged = [r["module"] for r in report["layers"] if r["flagged"]]
    assert flagged and report["settings"]["seed"] == 5
    for m in flagged:
        n = m + ".weight"
        wa = A[n].double()
        want = wa + ref_sparse("dare_linear", T[n].double() - wa, S[n].double() - wa, 0.8, 0.5, 5, m)
        assert_close(got[n], want, atol=1e-5, rtol=1e-5, what=n)


def _refused_recipe(cfg, culprit):
    with pytest.raises(SafeMergeError) as err:
        validate_recipe(cfg, "r.yml")
    assert culprit in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_the_base_model_listed_with_a_role_is_refused(pico):
    cfg = recipe(pico)
    cfg["models"].append({"model": str(pico.aligned), "parameters": {"role": "task"}})
    _refused_recipe(cfg, f"{pico.aligned} is the base_model (the aligned model) and must not have a role; got role 'task'")


def test_a_role_the_method_does_not_take_is_refused(pico):
    """A safety model left in a safelora recipe, or a role that is no role at all"""
    _refused_recipe(recipe(pico, "safelora", safety=str(pico.safety)), "has role 'safety'; safelora takes the roles task, unaligned")
    _refused_recipe(recipe(pico, "safemerge", bogus=str(pico.safety)), "has role 'bogus'; safemerge takes the roles")


def test_a_recipe_without_base_model_is_one_line(pico):
    cfg = recipe(pico)
    del cfg["base_model"]
    _refused_recipe(cfg, "base_model is missing; set it to the aligned model")


def test_a_model_path_that_is_a_file_is_no_folder(pico, tmp_path):
    """A file where a model folder belongs (its config.json, a shard) is called a file, with its
    folder to give; a path that does not exist is no such directory."""
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    cfg = recipe(pico)
    cfg["models"][0]["model"] = str(f)
    _refused_recipe(cfg, f"{f}: a file, not a folder; give the folder that holds it ({tmp_path}), a local Hugging "
                         "Face folder: safemerge-yaml reads those only")
    cfg["models"][0]["model"] = str(tmp_path / "nope")
    _refused_recipe(cfg, f"{tmp_path / 'nope'}: no such directory; give a local Hugging Face folder: safemerge-yaml "
                         "reads those only")


@pytest.mark.parametrize("method", ["safemerge", "safelora"])
@pytest.mark.usefixtures("matmul_precision_restored")
def test_a_programs_reduced_matmul_precision_does_not_reach_a_recipes_output(pico, tmp_path, monkeypatch, method):
    """A program calling run_merge after `torch.set_float32_matmul_precision("medium")` (bf16
    products on CPUs with AMX) got other scores and weights than the report's exact fp32 said
    (review132): each method computes exact, and the program's setting is put back."""
    monkeypatch.setenv("SAFEMERGE_BACKEND", "torch")  # (the C++ kernels use no torch product)
    exact, report = merge(recipe(pico, method, {"threshold": TAU}), tmp_path / "exact")
    torch.set_float32_matmul_precision("medium")
    medium, medium_report = merge(recipe(pico, method, {"threshold": TAU}), tmp_path / "medium")
    assert torch.get_float32_matmul_precision() == "medium"
    assert exact.keys() == medium.keys() and all(torch.equal(exact[k], medium[k]) for k in exact)
    assert [rec["cosine"] for rec in medium_report["layers"]] == [rec["cosine"] for rec in report["layers"]]


def test_a_second_merge_in_one_process_reads_its_inputs_as_they_are_now(pico, tmp_path):
    """mergekit keeps one loader per model for the life of the process: a program that merged,
    saved its task model again and merged again got the old lm_head (the shard left open) beside
    the new scores (review147). Each run_merge now reads its inputs afresh: each later run is the
    one a run on a copy of the new task model (another path, so no loader) gives; a third too
    (review151: the loader the second run made was kept whatever changed after), and after a run
    with another method, which made the loader."""
    from mergekit_fixtures import save_model

    task = tmp_path / "task"
    shutil.copytree(pico.task, task)
    first, _ = merge(recipe(pico, task=str(task), params={"threshold": TAU}), tmp_path / "o1")
    runs = []
    for seed in (5, 6, 7):
        if seed == 7:  # (a linear merge of the task model first: mergekit's loader, not made by these methods)
            cfg = {"merge_method": "linear", "models": [{"model": str(task), "parameters": {"weight": 1.0}}],
                   "dtype": "float32"}
            run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / f"lin{seed}"),
                      MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
        g = torch.Generator().manual_seed(seed)
        sd = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.dim() == 2 else v
              for k, v in read_model(task).items()}
        shutil.rmtree(task)
        save_model(sd, task)  # (retrained, saved in place)
        shutil.copytree(task, tmp_path / f"task_copy{seed}")
        runs.append(merge(recipe(pico, task=str(task), params={"threshold": TAU}), tmp_path / f"o2-{seed}"))
    for seed, (again, report) in zip((5, 6, 7), runs):  # (after: no run between the ones above)
        fresh, fresh_report = merge(recipe(pico, task=str(tmp_path / f"task_copy{seed}"), params={"threshold": TAU}),
                                    tmp_path / f"o3-{seed}")
        assert again.keys() == fresh.keys() and all(torch.equal(again[k], fresh[k]) for k in again), seed
        assert not torch.equal(again["lm_head.weight"], first["lm_head.weight"])
        assert [r["cosine"] for r in report["layers"]] == [r["cosine"] for r in fresh_report["layers"]]
        first = again


def test_a_second_merge_reads_files_rewritten_in_place_afresh(pico, tmp_path):
    """Files copied over (cp, shutil.copyfile) leave their folder's time as it was, which keyed what
    a run kept of its inputs for the next run of the process (review160): a task model's shards
    rewritten in bf16 were counted in bytes_read at their old fp32 size, and an adapter rewritten to
    target a module the model lacks was not checked again (mergekit dropped that module). Each run
    now reads them afresh, as a new process does."""
    from safetensors.torch import load_file, save_file

    def copy_over(files: dict[str, dict[str, torch.Tensor]], folder: Path, staging: Path) -> None:
        staging.mkdir()
        before = folder.stat().st_mtime_ns
        for name, tensors in files.items():
            save_file(tensors, str(staging / name), metadata={"format": "pt"})
            shutil.copyfile(staging / name, folder / name)
        assert folder.stat().st_mtime_ns == before

    task = Path(shutil.copytree(pico.task, tmp_path / "task"))
    cfg = recipe(pico, task=str(task), params={"threshold": TAU})
    _, fp32 = merge(cfg, tmp_path / "o1")
    copy_over({f.name: {k: v.to(torch.bfloat16) for k, v in load_file(f).items()} for f in task.glob("*.safetensors")},
              task, tmp_path / "bf16")
    _, again = merge(cfg, tmp_path / "o2")
    _, fresh = merge(recipe(pico, task=str(shutil.copytree(task, tmp_path / "task-copy")), params={"threshold": TAU}),
                     tmp_path / "o3")
    assert again["bytes_read"] == fresh["bytes_read"] < fp32["bytes_read"]

    lora = Path(shutil.copytree(pico.lora_task, tmp_path / "lora"))
    cfg = recipe(pico, params={"threshold": TAU}, task=f"{pico.aligned}+{lora}")
    merge(cfg, tmp_path / "o4", lora_merge_cache=str(tmp_path / "c4"))
    factors = load_file(lora / "adapter_model.safetensors")
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    for ab in ("lora_A", "lora_B"):
        factors[f"{q[:-len('q_proj')]}foo_proj.{ab}.weight"] = factors[f"{q}.{ab}.weight"].clone()
    copy_over({"adapter_model.safetensors": factors}, lora, tmp_path / "spoilt")
    with pytest.raises(SafeMergeError, match="foo_proj, which .* does not have; give the model the adapter was"):
        merge(cfg, tmp_path / "o5", lora_merge_cache=str(tmp_path / "c5"))


def test_two_runs_reporting_to_one_place_give_the_report_of_the_last(pico, tmp_path):
    """A program that merges twice into one report location and writes the report once (review160:
    it had the second run's layers, the first run's models and inputs, and both runs' bytes) gets
    the report of the second run alone, with a warning that the first run's records were dropped."""
    from mergekit_fixtures import save_model

    g = torch.Generator().manual_seed(3)
    task2 = tmp_path / "task2"
    save_model({k: v + 0.2 * torch.randn(v.shape, generator=g) if v.dim() == 2 else v
                for k, v in read_model(pico.task).items()}, task2)
    options = MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False)
    register_methods()
    with report_to(tmp_path / "both"):
        for i, task in enumerate((pico.task, task2)):
            run_merge(MergeConfiguration.model_validate(recipe(pico, task=str(task), params={"threshold": TAU})),
                      str(tmp_path / f"o{i}"), options)
    both = finalize_report(tmp_path / "both")
    _, alone = merge(recipe(pico, task=str(task2), params={"threshold": TAU}), tmp_path / "alone")
    assert both["settings"]["models"] == alone["settings"]["models"] and both["settings"]["models"]["task"] == str(task2)
    assert both["inputs"] == alone["inputs"] and both["bytes_read"] == alone["bytes_read"]
    assert [(r["module"], r["cosine"]) for r in both["layers"]] == [(r["module"], r["cosine"]) for r in alone["layers"]]
    dropped = [w for w in both["warnings"] if "an earlier run_merge of this process recorded there too" in w]
    assert len(dropped) == 1 and str(tmp_path / "both") in dropped[0], both["warnings"]
    assert not any("earlier run_merge" in w for w in alone["warnings"])
    # a run refused as mergekit plans it drops nothing (review161), and a slice's report_path, which
    # would send part of a run's records elsewhere, is refused as safemerge-yaml refuses it
    task = Path(shutil.copytree(pico.task, tmp_path / "task"))
    sliced = recipe(pico, task=str(task2), params={"threshold": TAU})
    sliced["slices"] = [{"sources": [{**m, "layer_range": [0, 2]} for m in sliced.pop("models")]
                         + [{"model": sliced["base_model"], "layer_range": [0, 2]}],
                         "parameters": {"report_path": str(tmp_path / "slice-report")}}]
    with report_to(tmp_path / "kept"):
        run_merge(MergeConfiguration.model_validate(recipe(pico, task=str(task2), params={"threshold": TAU})),
                  str(tmp_path / "o3"), options)
        with pytest.raises(SafeMergeError, match="is the folder of the recipe's input"):
            run_merge(MergeConfiguration.model_validate(recipe(pico, task=str(task), params={"threshold": TAU})),
                      str(task), options)
        with pytest.raises(SafeMergeError, match=r"slices\[0\]: parameters: report_path is a setting of the whole run"):
            run_merge(MergeConfiguration.model_validate(sliced), str(tmp_path / "o4"), options)
    kept = finalize_report(tmp_path / "kept")
    assert [(r["module"], r["cosine"]) for r in kept["layers"]] == [(r["module"], r["cosine"]) for r in alone["layers"]]
    assert kept["bytes_read"] == alone["bytes_read"] and not any("earlier run_merge" in w for w in kept["warnings"])


@pytest.mark.parametrize("method", ["safemerge", "safelora"])
def test_a_mamba_mixers_a_log_is_no_linear_layer(tmp_path, method):
    """A Mamba mixer's A_log (d_inner x d_state, the log of the state matrix: a parameter, no linear
    layer's weight) passes through as the task's, unscored (review162: it was scored, flagged and
    merged or projected); its linear layers are scored as before."""
    import transformers

    cfg = transformers.MambaConfig(vocab_size=64, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2,
                                   time_step_rank=4, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(cfg)
    for role, scale in (("unaligned", 0.0), ("aligned", 0.05), ("task", 0.05), ("safety", 0.03)):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn_like(p))
        model.save_pretrained(tmp_path / role)
    roles = ["task", "unaligned"] + (["safety"] if method == "safemerge" else [])
    got, report = merge({"merge_method": method, "base_model": str(tmp_path / "aligned"), "dtype": "float32",
                         "parameters": {"threshold": 1.0},  # (every scored layer flagged)
                         "models": [{"model": str(tmp_path / r), "parameters": {"role": r}} for r in roles]},
                        tmp_path / "out")
    task = read_model(tmp_path / "task")
    a_log = [k for k in task if k.endswith(".A_log")]
    assert len(a_log) == 2 and all(torch.equal(got[k], task[k]) for k in a_log)
    scored = {r["module"] for r in report["layers"]}
    assert not any("A_log" in m for m in scored)
    assert {f"backbone.layers.{i}.mixer.{p}" for i in (0, 1) for p in ("in_proj", "x_proj", "dt_proj", "out_proj")} <= scored
    assert all(r["flagged"] for r in report["layers"] if r["reason"] is None)


def test_dbrx_experts_stored_without_weight_in_their_name_are_scored(tmp_path):
    """DBRX stores each layer's experts as 2-D parameters ffn.experts.mlp.w1, v1, w2 (no ".weight"):
    they are linear maps and are scored (review163: the fix for Mamba's A_log passed them through)."""
    import transformers

    cfg = transformers.DbrxConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=64, max_seq_len=64,
                                  ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 2, "moe_top_k": 1},
                                  attn_config={"kv_n_heads": 2})
    cfg.attn_config.rope_theta = 10000.0  # (transformers' DbrxAttention reads it; this config lacks it)
    torch.manual_seed(0)
    model = transformers.DbrxForCausalLM(cfg)
    for role, scale in (("unaligned", 0.0), ("aligned", 0.05), ("task", 0.05)):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn_like(p))
        model.save_pretrained(tmp_path / role)
    _, report = merge({"merge_method": "safelora", "base_model": str(tmp_path / "aligned"), "dtype": "float32",
                       "parameters": {"threshold": 0.5},
                       "models": [{"model": str(tmp_path / r), "parameters": {"role": r}} for r in ("task", "unaligned")]},
                      tmp_path / "out")
    scored = {r["module"] for r in report["layers"]}
    assert {f"transformer.blocks.{i}.ffn.experts.mlp.{w}" for i in (0, 1) for w in ("w1", "v1", "w2")} <= scored, scored


def test_an_out_path_that_is_an_input_folder_is_refused_before_anything_is_written(pico, tmp_path):
    """mergekit writes in place: run_merge (plain mergekit-yaml alike) into the task model's folder
    wrote the merged model.safetensors beside the task's own shards and index, two models in one
    folder (review147); safemerge-yaml refused it, and now the methods do, while mergekit plans."""
    task = Path(shutil.copytree(pico.task, tmp_path / "task"))
    before = sorted(p.name for p in task.iterdir())
    with pytest.raises(SafeMergeError) as err:
        merge(recipe(pico, task=str(task), params={"threshold": TAU}), task)
    assert str(err.value) == (f"run_merge's out_path {task} is the folder of the recipe's input {task}, where mergekit "
                              "would write the merged model beside that model's own files; give a new folder")
    assert sorted(p.name for p in task.iterdir()) == before
    merge(recipe(pico, task=str(task), params={"threshold": TAU}), task / "merged")  # (a new folder inside it: fine)


@pytest.mark.parametrize("case", ["task-as-safety", "base-as-unaligned", "out-path-is-the-task"])
def test_one_folder_under_another_path_is_one_model_in_a_recipe(pico, tmp_path, alias, case):
    """A second path to one folder (macOS' case-insensitive disks: ./Task for ./task; here a bind
    mount) passed the recipe's same-model checks, which compared spellings: the task model given
    again as the safety model merged with no safety in it (review181). Told apart by device and
    inode now: two roles, a role on the base model, and an out_path mergekit would write into."""
    from mergekit.config import MergeConfiguration

    from safemerge_ext.yaml_cli import check_roles

    if case == "out-path-is-the-task":
        task = Path(shutil.copytree(pico.task, tmp_path / "task"))
        out = alias(task)
        with pytest.raises(SafeMergeError) as err:
            merge(recipe(pico, task=str(task), params={"threshold": TAU}), out)
        assert str(err.value) == (f"run_merge's out_path {out} is the folder of the recipe's input {task}, where "
                                  "mergekit would write the merged model beside that model's own files; give a new "
                                  "folder")
        assert sorted(p.name for p in task.iterdir()) == sorted(p.name for p in pico.task.iterdir())
        return
    role, src = ("safety", pico.task) if case == "task-as-safety" else ("unaligned", pico.aligned)
    other = alias(src)
    cfg = MergeConfiguration.model_validate(recipe(pico, **{role: str(other)}))
    with pytest.raises(SafeMergeError) as err:
        check_roles("safemerge", cfg, "r.yml")
    first = f"{pico.task} (role task)" if case == "task-as-safety" else f"{pico.aligned} (the base_model)"
    assert str(err.value).startswith(f"r.yml: models: models {first} and {other} (role {role}) are the same model"), \
        str(err.value)


@pytest.mark.parametrize("what", ["report_path", "--lora-merge-cache"])
def test_a_path_inside_an_out_path_yet_to_be_made_is_found_under_another_path(pico, tmp_path, alias, capsys,
                                                                              monkeypatch, what):
    """An OUT_PATH that does not exist yet has no inode: report_path or --lora-merge-cache inside it,
    spelt through another path to its folder (a bind mount here), merged in full and then failed,
    OUT_PATH "appeared while this run was writing", leaving the folder behind (review183). A path
    yet to be made is told by its nearest folder that exists, with the names below it."""
    import mergekit.merge

    from safemerge_ext import yaml_cli

    parent = tmp_path / "runs"
    parent.mkdir()
    out, inside = parent / "out", alias(parent) / "out" / "sub"
    params = {"threshold": TAU, **({"report_path": str(inside)} if what == "report_path" else {})}
    lora = {"task": f"{pico.aligned}+{pico.lora_task}"} if what == "--lora-merge-cache" else {}  # (a cache in use)
    argv = [str(_write(recipe(pico, params=params, **lora), tmp_path / "r.yml")), str(out)]
    argv += ["--lora-merge-cache", str(inside)] if what == "--lora-merge-cache" else []
    monkeypatch.setattr(mergekit.merge, "run_merge", lambda *a, **k: pytest.fail("merged despite a bad path"))
    with pytest.raises(SystemExit) as done:
        yaml_cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 1 and len(err) == 1 and err[0].startswith(
        f"safemerge-yaml: error: {what} {inside} is OUT_PATH or inside it"), err
    assert not out.exists()


def test_safemerge_yaml_folds_privately_and_checks_a_base_models_lora_too(pico, tmp_path, monkeypatch, capsys):
    """Two runs sharing a --lora-merge-cache: each folds into a private folder of it and moves the
    fold in, with its record, only once its merge succeeded (review150: a run beside another took
    that run's fold, made from the other folder's ./adapter, and stamped it as its own). A
    base_model given as model+lora is folded into the cache too: its entry is recorded and checked
    as the models' are (it was neither)."""
    import mergekit.merge
    from safetensors.torch import load_file, save_file

    from safemerge_ext import yaml_cli

    cache = tmp_path / "cache"
    base_lora = Path(shutil.copytree(pico.lora_safety, tmp_path / "base_lora"))
    cfg = recipe(pico, params={"threshold": TAU}, task=f"{pico.aligned}+{pico.lora_task}")
    cfg["base_model"] = f"{pico.aligned}+{base_lora}"
    base = MergeConfiguration.model_validate(cfg).base_model
    entries = [cache / e for e in _lora_entries(cfg)] + [cache / f"{base.model._unique_id()}_{base.lora._unique_id()}"]
    seen = []
    real = mergekit.merge.run_merge

    def spy(config, out, options, **kw):
        seen.append(Path(options.lora_merge_cache))
        assert not any(e.exists() for e in entries)  # (nothing in the shared cache while it folds)
        return real(config, out, options=options, **kw)

    monkeypatch.setattr(mergekit.merge, "run_merge", spy)
    recipe_file = _write(cfg, tmp_path / "r.yml")

    def run(to: str) -> int:
        with pytest.raises(SystemExit) as done:
            yaml_cli.main([str(recipe_file), str(tmp_path / to), "--no-copy-tokenizer", "--lora-merge-cache", str(cache)])
        return done.value.code

    assert run("o1") == 0
    assert seen[0].parent == cache and seen[0].name.startswith(".safemerge-folding-") and not seen[0].exists()
    assert all((e / yaml_cli.FOLD_STAMP).is_file() for e in entries) and len(set(entries)) == 2
    assert sorted(p.name for p in cache.iterdir()) == sorted(e.name for e in entries)
    # a run's private folder that a killed run of this host left (a whole fold) goes; another
    # host's, or a live run's, stays; a run that reuses every entry writes nothing to the cache
    # (which may be read only: review151)
    from safemerge_ext.mergekit_run import _run_id

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = {name: cache / f".safemerge-folding-{name}-x1" for name in (_run_id(int(dead.stdout)), _run_id(), "1-0-elsewhere")}
    for folder in left.values():
        (folder / "entry").mkdir(parents=True)
    monkeypatch.setattr(mergekit.merge, "run_merge", lambda config, out, options, **kw: seen.append(
        Path(options.lora_merge_cache)) or real(config, out, options=options, **kw))
    assert run("o1b") == 0 and seen[-1] == cache
    assert not left[_run_id(int(dead.stdout))].exists() and left[_run_id()].exists() and left["1-0-elsewhere"].exists()
    for folder in left.values():
        shutil.rmtree(folder, ignore_errors=True)
    monkeypatch.setattr(mergekit.merge, "run_merge", real)
    factors = load_file(base_lora / "adapter_model.safetensors")  # (the base's adapter retrained in place)
    save_file({k: v * 2 for k, v in factors.items()}, str(base_lora / "adapter_model.safetensors"))
    capsys.readouterr()
    assert run("o2") == 1
    err = capsys.readouterr().err
    assert f"was folded from another {pico.aligned}+{base_lora}" in err and "adapter_model.safetensors has changed" in err


def test_tensors_mergekit_has_no_place_for_are_refused_before_loading(tmp_path, capsys, monkeypatch):
    """A Llama checkpoint with attention_bias: mergekit's llama.json lists no biases, so its plan has no
    task for them and it wrote the merged model without them, with no word (review153; a LLaVA
    checkpoint's language model went the same way, review154). safemerge-yaml and run_merge refuse in
    one line, before any tensor loads; nothing is written."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from safemerge_ext import yaml_cli

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, attention_bias=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    for role in ("aligned", "unaligned", "task", "safety"):
        LlamaForCausalLM(cfg).save_pretrained(tmp_path / role)
    capsys.readouterr()
    models = {r: str(tmp_path / r) for r in ("task", "safety", "unaligned")}
    rcp = {"merge_method": "safemerge", "base_model": str(tmp_path / "aligned"), "dtype": "float32",
           "models": [{"model": ref, "parameters": {"role": role}} for role, ref in models.items()],
           "parameters": {"threshold": TAU}}
    want = ("mergekit's layout of LlamaForCausalLM has no place for 8 of the aligned model's 29 tensors (first: "
            "model.layers.0.self_attn.q_proj.bias), so it would write the merged model without them; mergekit "
            "cannot merge these files as they are (with LoRA adapters, `safemerge merge --output model` keeps every "
            "tensor)")
    import mergekit.io.tasks

    monkeypatch.setattr(mergekit.io.tasks.LoadTensor, "execute", lambda self: pytest.fail("a tensor loaded"))
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(_write(rcp, tmp_path / "r.yml")), str(tmp_path / "out"), "--no-copy-tokenizer"])
    assert done.value.code == 1
    assert capsys.readouterr().err == f"safemerge-yaml: error: {tmp_path / 'r.yml'}: {want}\n"
    with pytest.raises(SafeMergeError) as err:
        merge(rcp, tmp_path / "out")
    assert str(err.value) == f"merge_config: {want}"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.safetensors"))
    # the same models as PyTorch .bin files, which mergekit reads too: run_merge wrote 21 of the 29 tensors,
    # with no word (review199)
    from safetensors.torch import load_file

    for role in ("aligned", "unaligned", "task", "safety"):
        st = tmp_path / role / "model.safetensors"
        torch.save(load_file(st), tmp_path / role / "pytorch_model.bin")
        st.unlink()
    with pytest.raises(SafeMergeError) as err:
        merge(rcp, tmp_path / "out-bin")
    assert str(err.value) == f"merge_config: {want}"
    assert not (tmp_path / "out-bin").exists() or not any((tmp_path / "out-bin").glob("*.bin"))


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    """Pico Mixtral models (4 experts; hidden 32, intermediate 16, so a gate_up_proj slice is 32 x 32 and
    its layout cannot be told from its shape): transformers 5 holds the experts fused in memory, as
    mergekit reads them, and saves them one 2-D weight per expert, as checkpoints have them."""
    from transformers import MixtralConfig, MixtralForCausalLM

    root = tmp_path_factory.mktemp("moe")
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).float()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(7)

    def drift(x: torch.Tensor, scale: float, low_rank: bool) -> torch.Tensor:
        """Per 2-D slice: a rank-3 shift (the safety subspace), or one that mixes it with noise by a random share."""
        if x.dim() < 2:
            return torch.randn(x.shape, generator=g) * scale
        out = torch.empty_like(x)
        for idx in (range(x.shape[0]) if x.dim() == 3 else [...]):
            s = x[idx]
            U = torch.randn(s.shape[0], 3, generator=g)
            inside = U @ torch.randn(3, s.shape[1], generator=g)
            mix = 1.0 if low_rank else float(torch.rand((), generator=g))
            noise = torch.randn(s.shape, generator=g)
            out[idx] = (mix * inside / inside.norm() + (1 - mix) * noise / noise.norm()) * scale * s.numel() ** 0.5
        return out

    states = {"unaligned": base}
    states["aligned"] = {k: v + drift(v, 0.02, True) for k, v in base.items()}
    states["task"] = {k: v + drift(v, 0.02, False) for k, v in states["aligned"].items()}
    states["safety"] = {k: v + drift(v, 0.01, False) for k, v in states["aligned"].items()}
    for role, sd in states.items():
        model.load_state_dict(sd)
        model.save_pretrained(root / role)
    return root


@pytest.mark.parametrize("case", ["default", "same_alpha", "alpha_pattern", "new_name_pattern", "rank_pattern", "rslora"])
def test_a_transformers_4_moe_lora_is_taken_only_where_peft_folds_it_as_trained(moe_models, tmp_path, capsys, case):
    """mergekit folds a model+lora input with PEFT, which with transformers 5 folds a transformers-4
    MoE adapter's router and experts (block_sparse_moe.gate, experts.N.w1/w2/w3) under their new
    names (mlp.gate.weight, experts.gate_up_proj/down_proj), looking the patterns up by those, and
    fuses w1 and w3 by doubling r and lora_alpha: an alpha_pattern for w2 was lost, so its update was
    scaled wrong in the merge, with no word (review162), and one for down_proj, meant for another
    model, applied (review163); a rank_pattern made PEFT's fold fail; under rsLoRA the fusion scales
    w1 and w3 by sqrt(2). safemerge-yaml and the methods refuse those adapters in one line and take
    the others (an alpha_pattern that gives w2 the default alpha anyway)."""
    from safetensors.torch import save_file

    from safemerge_ext import yaml_cli

    aligned = read_model(moe_models / "aligned")
    r = 2 if case == "rank_pattern" else 4
    lora = tmp_path / "lora"
    lora.mkdir()
    g = torch.Generator().manual_seed(1)
    factors = {}
    for name, w in aligned.items():
        if re.search(r"\.(q_proj|gate|w1|w2|w3)\.weight$", name):
            m = name[:-len(".weight")]
            rank = 4 if case == "rank_pattern" and m.endswith(".w2") else r
            factors[f"base_model.model.{m}.lora_A.weight"] = 0.1 * torch.randn(rank, w.shape[1], generator=g)
            factors[f"base_model.model.{m}.lora_B.weight"] = 0.1 * torch.randn(w.shape[0], rank, generator=g)
    save_file(factors, str(lora / "adapter_model.safetensors"), metadata={"format": "pt"})
    (lora / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "bias": "none",
        "target_modules": ["q_proj", "gate", "w1", "w2", "w3"], "use_rslora": case == "rslora",
        "alpha_pattern": {"alpha_pattern": {"w2": 4 * r}, "same_alpha": {"w2": 2 * r},
                          "new_name_pattern": {"down_proj": 4 * r}}.get(case, {}),
        "rank_pattern": {"w2": 4} if case == "rank_pattern" else {}}))
    cfg = {"merge_method": "safelora", "base_model": str(moe_models / "aligned"), "dtype": "float32",
           "parameters": {"threshold": 0.5},
           "models": [{"model": f"{moe_models / 'aligned'}+{lora}", "parameters": {"role": "task"}},
                      {"model": str(moe_models / "unaligned"), "parameters": {"role": "unaligned"}}]}
    recipe_file = _write(cfg, tmp_path / "r.yml")
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(recipe_file), str(tmp_path / "yaml-out"), "--no-copy-tokenizer"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("safemerge-yaml:")]
    if case in ("default", "same_alpha"):
        assert done.value.code == 0 and not err, err
        merge(cfg, tmp_path / "out", lora_merge_cache=str(tmp_path / "cache"))
        return
    w1, w2 = (f"folds its model.layers.0.block_sparse_moe.experts.0.{w} (a transformers-4 MoE module) " for w in ("w1", "w2"))
    want = {"alpha_pattern": f"{w2}as model.layers.0.mlp.experts.down_proj at rank 4 and scaling 2, but the adapter "
                             "gives it scaling 4 (",
            "new_name_pattern": f"{w2}as model.layers.0.mlp.experts.down_proj at rank 4 and scaling 4, but the adapter "
                                "gives it scaling 2 (",
            "rank_pattern": f"{w2}as model.layers.0.mlp.experts.down_proj at rank 2 and scaling 2, but the adapter "
                            "gives it rank 4 and scaling 1 (",
            "rslora": f"{w1}as part of model.layers.0.mlp.experts.gate_up_proj at rank 8 and scaling 5.657, but the "
                      "adapter gives it scaling 4 ("}[case]
    assert done.value.code == 1 and len(err) == 1 and want in err[0], err
    assert "the safemerge command (merge or project, with --output model)" in err[0]
    # (run_merge: mergekit folds before the methods see the recipe; there PEFT's fold fails on the rank itself)
    with pytest.raises(RuntimeError if case == "rank_pattern" else SafeMergeError,
                       match="size mismatch" if case == "rank_pattern" else re.escape(want)):
        merge(cfg, tmp_path / "out", lora_merge_cache=str(tmp_path / "cache"))


def test_a_transformers_4_moe_lora_that_peft_does_not_convert_is_refused_as_a_model_lora_input(tmp_path, capsys):
    """Granite-MoE-Hybrid's router (block_sparse_moe.router.layer) is renamed on load by transformers 5
    (router.weight), and PEFT 0.21 converts no transformers-4 adapter for that model: it folds such an
    adapter without the router's LoRA, with no word, so mergekit merged a task model that lacked the
    update (review164). safemerge-yaml and the methods refuse it in one line."""
    import transformers
    from peft import PeftModel
    from weights import twins_and_v4_adapters

    from safemerge_ext import yaml_cli

    cfg = transformers.GraniteMoeHybridConfig(
        hidden_size=32, intermediate_size=48, shared_intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["attention", "attention"], mamba_n_heads=8, mamba_d_head=8)
    torch.manual_seed(0)
    twins_and_v4_adapters(transformers.GraniteMoeHybridForCausalLM(cfg), tmp_path, r"\.(q_proj|router\.layer)",
                          ["q_proj", "layer"])
    lora = tmp_path / "task"
    # what is refused: PEFT's fold leaves the routers as they were
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "aligned")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    folded = PeftModel.from_pretrained(base, lora).merge_and_unload().state_dict()
    changed = {k for k in folded if not torch.equal(folded[k], before[k])}
    assert changed and not any("router" in k for k in changed), changed

    recipe = {"merge_method": "safelora", "base_model": str(tmp_path / "aligned"), "dtype": "float32",
              "parameters": {"threshold": 0.5},
              "models": [{"model": f"{tmp_path / 'aligned'}+{lora}", "parameters": {"role": "task"}},
                         {"model": str(tmp_path / "unaligned"), "parameters": {"role": "unaligned"}}]}
    recipe_file = _write(recipe, tmp_path / "r.yml")
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(recipe_file), str(tmp_path / "yaml-out"), "--no-copy-tokenizer"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("safemerge-yaml:")]
    want = ("folds nothing of its transformers-4 MoE module model.layers.0.block_sparse_moe.router.layer (nor 1 "
            "more): transformers renames that module's weight on load (to "
            "model.layers.0.block_sparse_moe.router.weight) and PEFT converts no adapter for it in this model "
            "(granitemoehybrid)")
    assert done.value.code == 1 and len(err) == 1 and want in err[0], err
    assert not (tmp_path / "yaml-out").exists()
    with pytest.raises(SafeMergeError, match=re.escape(want)):
        merge(recipe, tmp_path / "out", lora_merge_cache=str(tmp_path / "cache"))


def _moe_pieces(root: Path) -> dict[str, tuple[str, int, slice]]:
    """Each expert projection's report name -> (fused tensor, expert, output rows), from the files' 2-D names."""
    stored = read_model(root / "aligned")
    pieces = {}
    for k, t in stored.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight", k)
        if m:
            layer, e, w = m.groups()
            fused = f"model.layers.{layer}.mlp.experts.{'down_proj' if w == 'w2' else 'gate_up_proj'}"
            rows = slice(0, t.shape[0]) if w != "w3" else slice(t.shape[0], 2 * t.shape[0])
            part = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}[w]
            pieces[f"model.layers.{layer}.mlp.experts.{e}.{part}"] = (k, fused, int(e), rows)
    return pieces


@pytest.mark.parametrize("method", ["safemerge", "safelora"])
def test_moe_experts_are_scored_and_merged_one_projection_at_a_time(moe_models, tmp_path, method):
    """mergekit reads a transformers 5 MoE checkpoint's experts as fused 3-D tensors; they were passed
    through as the task model's, unscored, with no word (review154). Each expert's gate, up and down
    projection is scored against its own 2-D weights in the files (float64), and the flagged ones are
    merged (safemerge) or projected (safelora) on their own."""
    root = moe_models
    disk = {role: read_model(root / role) for role in ("aligned", "unaligned", "task", "safety")}
    pieces = _moe_pieces(root)
    assert len(pieces) == 2 * 4 * 3
    cos = {m: ref_cos(disk["aligned"][k], disk["unaligned"][k], disk["task"][k].double() - disk["aligned"][k].double())
           for m, (k, *_) in pieces.items()}
    ordered = sorted(cos.values())
    tau = (ordered[len(cos) // 2 - 1] + ordered[len(cos) // 2]) / 2  # (between two pieces: no tie to round either way)
    params = {"threshold": tau} if method == "safelora" else {"threshold": tau, "alpha": 0.8}
    roles = {"task": str(root / "task"), "unaligned": str(root / "unaligned")}
    if method == "safemerge":
        roles["safety"] = str(root / "safety")
    cfg = {"merge_method": method, "base_model": str(root / "aligned"), "dtype": "float32", "parameters": params,
           "models": [{"model": ref, "parameters": {"role": role}} for role, ref in roles.items()]}
    out, report = merge(cfg, tmp_path / "out")
    records = {r["module"]: r for r in report["layers"]}
    for m, (k, fused, e, rows) in pieces.items():
        rec = records[m]
        assert rec["tensor"] == fused and rec["expert"] == e and rec["shape"] == list(disk["aligned"][k].shape)
        assert math.isclose(rec["cosine"], cos[m], rel_tol=1e-5, abs_tol=1e-6), (m, rec["cosine"], cos[m])
        flagged = cos[m] < tau if method == "safemerge" else cos[m] <= tau
        assert rec["flagged"] == flagged, m
        wa, wu, wt = (disk[r][k].double() for r in ("aligned", "unaligned", "task"))
        if not flagged:
            want = wt
        elif method == "safemerge":
            want = wa + 0.8 * (wt - wa) + 0.2 * (disk["safety"][k].double() - wa)
        else:
            V = wa - wu
            want = wa + V @ V.T / V.norm() @ (wt - wa)
        got = out[fused][e][rows].double()
        assert torch.allclose(got, want, rtol=0, atol=1e-6 * float(want.abs().max())), (m, float((got - want).abs().max()))
    assert 0 < sum(r["flagged"] for r in records.values() if "expert" in r) < len(pieces)


def test_expert_parts_read_the_layout_declared_or_from_the_hidden_size():
    """An experts weight (E, a, b): transposed where transformers declares it (gpt-oss) or where only the
    hidden size on the other axis tells it (Llama 4's undeclared experts); a fused gate_up_proj splits into
    its gate and up rows, halves or interleaved; undecidable is None (the method refuses it)."""
    from safemerge_ext.mergekit_methods import expert_parts

    assert expert_parts("gate_up_proj", (4, 96, 32), 32, None) == (False, [("gate_proj", slice(0, 48)),
                                                                          ("up_proj", slice(48, 96))])
    assert expert_parts("down_proj", (4, 32, 48), 32, None) == (False, [("down_proj", None)])
    assert expert_parts("gate_up_proj", (16, 32, 96), 32, None) == (True, [("gate_proj", slice(0, 48)),
                                                                           ("up_proj", slice(48, 96))])
    assert expert_parts("down_proj", (16, 48, 32), 32, None) == (True, [("down_proj", None)])
    gpt_oss = {"is_transposed": True, "has_gate": True, "is_concatenated": False}
    assert expert_parts("gate_up_proj", (4, 32, 32), 32, gpt_oss) == (True, [("gate_proj", slice(0, 32, 2)),
                                                                           ("up_proj", slice(1, 32, 2))])
    assert expert_parts("up_proj", (4, 32, 32), 32, {"is_transposed": False, "has_gate": False}) == (
        False, [("up_proj", None)])
    assert expert_parts("gate_up_proj", (4, 32, 32), 32, None) is None  # (2 I = H: either way round)
    assert expert_parts("down_proj", (4, 32, 48), None, None) is None


def test_an_moe_experts_weight_of_unknown_layout_is_refused(moe_models, tmp_path, monkeypatch):
    """Where neither transformers nor the shapes tell which axis is an expert's output, the experts are
    not scored the wrong way round, nor passed through: one line names the tensor."""
    from safemerge_ext import mergekit_methods

    monkeypatch.setattr(mergekit_methods, "_declared_experts", lambda cfg: {})
    mergekit_methods._experts_infos.clear()
    root = moe_models
    cfg = {"merge_method": "safemerge", "base_model": str(root / "aligned"), "dtype": "float32",
           "parameters": {"threshold": 0.5},
           "models": [{"model": str(root / r), "parameters": {"role": r}} for r in ("task", "safety", "unaligned")]}
    try:
        with pytest.raises(SafeMergeError, match=r"^tensor model\.layers\.\d\.mlp\.experts\.gate_up_proj: an MoE experts "
                                                 r"weight of shape \(4, 32, 32\) whose layout .* hidden size \(32\) tells"):
            merge(cfg, tmp_path / "out")
    finally:
        mergekit_methods._experts_infos.clear()


@pytest.mark.parametrize("case", ["gpt2_hub_buffers", "moe_dense_first_layer"])
def test_plan_coverage_keeps_what_transformers_ignores_and_sees_optional_experts(tmp_path, case):
    """GPT-2 checkpoints as the Hub has them carry h.N.attn.bias causal masks that transformers ignores on
    load and mergekit plans nowhere: merged without them, as before (review155). An MoE whose first layer
    is dense (mlp_only_layers; DeepSeek-V3's first_k_dense_replace): mergekit infers its fused experts as
    optional and plans them only under a name the files hold, which they do not (they hold one 2-D weight
    per expert): mergekit dropped them all, and this refuses it (review156)."""
    import transformers

    from safemerge_ext.io.models import ModelReader
    from safemerge_ext.yaml_cli import _architecture, check_plan_covers

    torch.manual_seed(0)
    if case == "gpt2_hub_buffers":
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                          num_experts_per_tok=2, moe_intermediate_size=24,
                                          shared_expert_intermediate_size=48, mlp_only_layers=[0],
                                          tie_word_embeddings=False)
        model = transformers.Qwen2MoeForCausalLM(cfg)
    for role in ("aligned", "task"):
        model.save_pretrained(tmp_path / role)
        if case == "gpt2_hub_buffers":  # (the Hub's files: the causal-mask buffers saved beside the weights)
            from safetensors.torch import load_file, save_file

            f = tmp_path / role / "model.safetensors"
            sd = load_file(f)
            sd.update({f"transformer.h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 16, 16)) for i in range(2)})
            # (and transformers 4's masked_bias, which transformers 5's GPT-2 no longer lists: review201)
            sd.update({f"transformer.h.{i}.attn.masked_bias": torch.tensor(-1e4) for i in range(2)})
            save_file(sd, f, metadata={"format": "pt"})
    config = MergeConfiguration.model_validate({
        "merge_method": "linear", "base_model": str(tmp_path / "aligned"),
        "models": [{"model": str(tmp_path / r), "parameters": {"weight": 1.0}} for r in ("aligned", "task")]})
    reader = ModelReader(tmp_path / "aligned")
    if case == "gpt2_hub_buffers":
        assert "transformer.h.0.attn.bias" in reader
        check_plan_covers(_architecture(config), reader.names, reader.path, "r.yml")
    else:
        with pytest.raises(SafeMergeError, match=r"^r\.yml: mergekit's layout of Qwen2MoeForCausalLM has no place for "
                                                 r"12 of the aligned model's \d+ tensors \(first: model\.layers\.1\.mlp"
                                                 r"\.experts\.0\."):
            check_plan_covers(_architecture(config), reader.names, reader.path, "r.yml")


def test_experts_named_as_the_files_store_them_are_scored_per_expert(tmp_path, monkeypatch):
    """Granite 4's mergekit definition names its experts as the files store them, fused 3-D
    (block_sparse_moe.input_linear.weight (E, 2I, H), output_linear.weight (E, H, I)); they passed
    through as the task model's, unscored (review156). Read through transformers' conversion names,
    they are experts modules: each expert's gate, up and down projection is scored and merged."""
    import transformers

    cfg = transformers.GraniteMoeHybridConfig(
        vocab_size=64, hidden_size=32, intermediate_size=24, shared_intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8,
        mamba_expand=2, mamba_chunk_size=16, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.GraniteMoeHybridForCausalLM(cfg)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for i, role in enumerate(("unaligned", "aligned", "task", "safety")):
        model.load_state_dict({k: v + 0.01 * (i + 1) * torch.randn_like(v) for k, v in base.items()})
        model.save_pretrained(tmp_path / role)
    disk = {r: read_model(tmp_path / r) for r in ("aligned", "unaligned", "task", "safety")}
    fused = [k for k, t in disk["aligned"].items() if t.dim() == 3 and "block_sparse_moe" in k]
    assert len(fused) == 4
    cfg = {"merge_method": "safemerge", "base_model": str(tmp_path / "aligned"), "dtype": "float32",
           "parameters": {"threshold": 1.0, "alpha": 0.8},
           "models": [{"model": str(tmp_path / r), "parameters": {"role": r}} for r in ("task", "safety", "unaligned")]}
    out, report = merge(cfg, tmp_path / "out")
    records = {r["module"]: r for r in report["layers"] if r["tensor"] in fused}
    assert len(records) == 2 * 4 * 3
    for k in fused:
        wa, wu, wt, ws = (disk[r][k].double() for r in ("aligned", "unaligned", "task", "safety"))
        want = wa + 0.8 * (wt - wa) + 0.2 * (ws - wa)  # (threshold 1: every projection flagged)
        assert torch.allclose(out[k].double(), want, rtol=0, atol=1e-6), k
        module = k.replace("input_linear.weight", "experts").replace("output_linear.weight", "experts")
        for e in range(4):
            parts = ({"gate_proj": slice(0, 24), "up_proj": slice(24, 48)} if "input_linear" in k
                     else {"down_proj": slice(None)})
            for part, rows in parts.items():
                rec = records[f"{module}.{e}.{part}"]
                want_cos = ref_cos(wa[e][rows], wu[e][rows], wt[e][rows] - wa[e][rows])
                assert math.isclose(rec["cosine"], want_cos, rel_tol=1e-5, abs_tol=1e-6) and rec["flagged"]

    # a 3-D weight over the model's experts that is no experts module (were the conversion to name none):
    # refused, not passed through
    from safemerge_ext import mergekit_methods

    monkeypatch.setattr(mergekit_methods._ExpertsInfo, "in_memory", lambda self, name: name)
    with pytest.raises(SafeMergeError, match=r"^tensor model\.layers\.0\.block_sparse_moe\.input_linear\.weight: a "
                                             r"3-D weight \(4, 48, 32\) over the model's 4 experts that is no experts "
                                             "module transformers defines"):
        merge(cfg, tmp_path / "out2")


def test_experts_stored_as_the_transpose_of_the_model_are_scored_as_stored():
    """A Qwen3-VL-MoE checkpoint from the Hub stores gate_up_proj (E, H, 2I), which transformers 5 turns
    to its model's (E, 2I, H) on load and mergekit hands over as stored: the slices are transposed
    relative to what the experts module declares (review156: every projection was scored the wrong way)."""
    from safemerge_ext.mergekit_methods import _ExpertsInfo, _expert_layout

    info = _ExpertsInfo("unused", hidden=32, experts=4, transforms=[], declared={
        "model.layers.0.mlp.experts": {"is_transposed": False, "has_gate": True, "is_concatenated": True,
                                       "shape:gate_up_proj": (4, 96, 32), "shape:down_proj": (4, 32, 48)}})
    as_stored = _expert_layout("x", "model.layers.0.mlp.experts.gate_up_proj", (4, 32, 96), info)
    assert as_stored == (True, [("gate_proj", slice(0, 48)), ("up_proj", slice(48, 96))])
    assert _expert_layout("x", "model.layers.0.mlp.experts.down_proj", (4, 48, 32), info) == (True, [("down_proj", None)])
    assert _expert_layout("x", "model.layers.0.mlp.experts.down_proj", (4, 32, 48), info) == (False, [("down_proj", None)])


def test_bytes_read_are_the_stored_sizes_of_converted_tensors_too(moe_models, tmp_path):
    """mergekit reads a Mixtral's experts and router under transformers' names, which the files do not
    hold: the report counted them at the size received in the recipe's dtype (review155, review157). The
    files' tensors that the conversion turns into them are counted as stored, whatever ``dtype`` says."""
    from safemerge_ext.io.models import ModelReader

    root = moe_models
    stored = 0
    for role in ("aligned", "task", "safety", "unaligned"):
        reader = ModelReader(root / role)
        stored += sum(reader.layout(n)[2] for n in reader.names
                      if re.search(r"(self_attn\.[qkvo]_proj|block_sparse_moe\.(experts\.\d+\.w[123]|gate))\.weight$", n))
    got = {}
    for dtype in ("float32", "bfloat16"):
        cfg = {"merge_method": "safemerge", "base_model": str(root / "aligned"), "dtype": dtype,
               "parameters": {"threshold": 0.5},
               "models": [{"model": str(root / r), "parameters": {"role": r}} for r in ("task", "safety", "unaligned")]}
        got[dtype] = merge(cfg, tmp_path / dtype)[1]["bytes_read"]
    assert got == {"float32": stored, "bfloat16": stored}


def test_a_safety_lora_without_a_module_the_task_lora_adapts_is_refused_by_every_face(pico, tmp_path, capsys):
    """review195: `safemerge merge` refuses a safety adapter that lacks a module the task adapter
    adapts; as model+lora inputs, safemerge-yaml and run_merge merged it, each flagged down_proj
    getting alpha * dW_task and no safety update, without a word. Now all three refuse it in one line."""
    from safetensors.torch import load_file, save_file

    from safemerge_ext import yaml_cli
    from safemerge_ext.mergekit_run import refusal

    qv = Path(shutil.copytree(pico.lora_safety, tmp_path / "safety-qv"))
    factors = load_file(qv / "adapter_model.safetensors")
    save_file({k: v for k, v in factors.items() if "down_proj" not in k}, str(qv / "adapter_model.safetensors"))
    acfg = json.loads((qv / "adapter_config.json").read_text())
    (qv / "adapter_config.json").write_text(json.dumps({**acfg, "target_modules": ["q_proj", "v_proj"]}))
    cfg = recipe(pico, params={"threshold": TAU}, task=f"{pico.aligned}+{pico.lora_task}", safety=f"{pico.aligned}+{qv}")
    want = (f"role safety: LoRA adapter {qv}: has no update for module model.layers.0.mlp.down_proj, which role task: "
            "LoRA adapter adapts; train the safety adapter on the same target modules")
    with pytest.raises(SafeMergeError) as err:
        merge(cfg, tmp_path / "o", lora_merge_cache=str(tmp_path / "cache"))
    assert str(err.value) == want and refusal(err.value) == want
    capsys.readouterr()  # (mergekit folded the LoRAs first: transformers' progress lines)
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(_write(cfg, tmp_path / "r.yml")), str(tmp_path / "out"), "--no-copy-tokenizer"])
    assert done.value.code == 1 and capsys.readouterr().err == f"safemerge-yaml: error: {want}\n"
    assert not (tmp_path / "out").exists()
    # the same on an aligned model in a pytorch_model.bin, which mergekit reads (run_merge merged it: review201)
    bin_model = Path(shutil.copytree(pico.aligned, tmp_path / "bin-aligned"))
    torch.save(read_model(bin_model), bin_model / "pytorch_model.bin")
    for f in [*bin_model.glob("*.safetensors"), *bin_model.glob("model.safetensors.index.json")]:
        f.unlink()
    on_bin = {**recipe(pico, params={"threshold": TAU}, task=f"{bin_model}+{pico.lora_task}",
                       safety=f"{bin_model}+{qv}"), "base_model": str(bin_model)}
    with pytest.raises(SafeMergeError) as err:
        merge(on_bin, tmp_path / "o-bin", lora_merge_cache=str(tmp_path / "cache-bin"))
    assert str(err.value) == want
    # fine (review197): the safety adapter adapting more modules than the task's; a task LoRA also on
    # lm_head, which the methods pass through unscored; a safety LoRA on a safety model of its own,
    # which changes the modules its LoRA lacks
    from mergekit_fixtures import _lora

    head = tmp_path / "task-head"
    _lora(pico.aligned, head, seed=1, r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj", "lm_head"])
    for i, (task, safety) in enumerate(((f"{pico.aligned}+{qv}", f"{pico.aligned}+{pico.lora_safety}"),
                                        (f"{pico.aligned}+{head}", f"{pico.aligned}+{pico.lora_safety}"),
                                        (f"{pico.aligned}+{pico.lora_task}", f"{pico.safety}+{qv}"))):
        fine = recipe(pico, params={"threshold": TAU}, task=task, safety=safety)
        _, rep = merge(fine, tmp_path / f"fine{i}", lora_merge_cache=str(tmp_path / f"cache-{i}"))
        assert rep["counts"]["flagged"] > 0 and not any("role safety does not change" in w for w in rep["warnings"])
        assert not any("lm_head" in r["module"] for r in rep["layers"])
        with pytest.raises(SystemExit) as done:
            yaml_cli.main([str(_write(fine, tmp_path / f"r{i}.yml")), str(tmp_path / f"out{i}"), "--no-copy-tokenizer"])
        assert done.value.code == 0, i


def test_flagged_layers_a_safety_model_leaves_as_aligned_are_named(pico, tmp_path):
    """review195: a full safety model that changes only some layers (its fine-tune left the others
    alone) gives the flagged layers it does not change alpha * dW_task alone: the report says which."""
    from safetensors.torch import load_file, save_file

    safety = Path(shutil.copytree(pico.aligned, tmp_path / "safety-q"))
    tuned = read_model(pico.safety)
    for shard in safety.glob("*.safetensors"):
        tensors = load_file(shard)
        save_file({k: (tuned[k] if "q_proj" in k else v) for k, v in tensors.items()}, str(shard),
                  metadata={"format": "pt"})
    got, rep = merge(recipe(pico, params={"threshold": 1.0, "alpha": 0.8}, safety=str(safety)), tmp_path / "o")
    aligned, task = read_model(pico.aligned), read_model(pico.task)
    flagged = [r for r in rep["layers"] if r["flagged"]]
    same = [r["module"] for r in flagged if "q_proj" not in r["module"]]
    assert same and len(same) < len(flagged)
    assert [r["module"] for r in rep["layers"] if r.get("safety_unchanged")] == same
    warning = next(w for w in rep["warnings"] if w.startswith("role safety does not change"))
    assert warning.startswith(f"role safety does not change {len(same)} of the {len(flagged)} flagged layers") \
        and same[0] in warning
    for module in same:
        w = module + ".weight"
        assert_close(got[w], aligned[w] + 0.8 * (task[w] - aligned[w]), atol=1e-6, rtol=1e-6, what=module)
    # a safety model that changes every layer: no such warning
    _, rep = merge(recipe(pico, params={"threshold": 1.0, "alpha": 0.8}), tmp_path / "o2")
    assert not any(w.startswith("role safety does not change") for w in rep["warnings"])
    assert not any("safety_unchanged" in r for r in rep["layers"])


def test_conv1d_factors_are_checked_by_the_module_not_the_configs_fan_in_fan_out(pico, tmp_path):
    """review197: PEFT sets fan_in_fan_out per module and saves the last module's value: a GPT-2 LoRA
    on c_attn and an untied lm_head says false, one on a Llama's Linear layers may say true (PEFT
    resets it for a Linear, with a warning); each module is checked against its own layout."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from safemerge_ext.io.adapters import check_fits, read_adapter
    from safemerge_ext.io.models import ModelReader

    torch.manual_seed(0)
    gpt2 = GPT2Config(vocab_size=64, n_positions=16, n_embd=48, n_layer=1, n_head=2, n_inner=80, tie_word_embeddings=False)
    GPT2LMHeadModel(gpt2).save_pretrained(tmp_path / "gpt2")
    get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"),
                   LoraConfig(r=2, target_modules=["c_attn", "lm_head"], init_lora_weights=False)).save_pretrained(
        tmp_path / "mixed")
    assert json.loads((tmp_path / "mixed" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    llama = Path(shutil.copytree(pico.lora_task, tmp_path / "llama"))
    acfg = json.loads((llama / "adapter_config.json").read_text())
    (llama / "adapter_config.json").write_text(json.dumps({**acfg, "fan_in_fan_out": True}))
    for model, lora in ((tmp_path / "gpt2", tmp_path / "mixed"), (pico.aligned, llama)):
        reader, adapter = ModelReader(model, flag="model"), read_adapter(lora, flag="lora", folded=True)
        try:
            check_fits(adapter, reader, "role task")
        finally:
            reader.close()
            adapter.close()


def test_safemerge_yaml_takes_gpt2_loras_that_peft_folds(tmp_path):
    """review195: PEFT saves every GPT-2 (Conv1D) LoRA with fan_in_fan_out: true and folds it rightly;
    plain mergekit-yaml merged such aligned+lora recipes, safemerge-yaml refused them with the advice
    to fold them with PEFT, which is what aligned+lora does. Both faces now give the same model, its
    scores those of the linear maps (W^T of the stored Conv1D weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from safemerge_ext import yaml_cli

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=48, n_layer=2, n_head=2, n_inner=80))
    model.save_pretrained(tmp_path / "aligned")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                p.sub_((torch.randn(p.shape[1], 3) @ torch.randn(3, p.shape[0]) * 0.05).T + 0.005 * torch.randn(p.shape))
    model.save_pretrained(tmp_path / "unaligned")
    for name, seed, r in (("task", 1, 4), ("safety", 2, 2)):
        torch.manual_seed(seed)
        peft = get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "aligned"),
                              LoraConfig(r=r, lora_alpha=2 * r, target_modules=["c_attn", "c_proj", "c_fc"],
                                         init_lora_weights=False))
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn_like(p) * 0.1)
        peft.save_pretrained(tmp_path / name)
    assert json.loads((tmp_path / "task" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    aligned = str(tmp_path / "aligned")
    cfg = {"merge_method": "safemerge", "base_model": aligned, "dtype": "float32", "parameters": {"threshold": 0.23},
           "models": [{"model": f"{aligned}+{tmp_path / 'task'}", "parameters": {"role": "task"}},
                      {"model": f"{aligned}+{tmp_path / 'safety'}", "parameters": {"role": "safety"}},
                      {"model": str(tmp_path / "unaligned"), "parameters": {"role": "unaligned"}}]}
    got, rep = merge(cfg, tmp_path / "plain", lora_merge_cache=str(tmp_path / "cache"), lora_merge_dtype="float32")
    with pytest.raises(SystemExit) as done:
        yaml_cli.main([str(_write(cfg, tmp_path / "r.yml")), str(tmp_path / "yaml"), "--no-copy-tokenizer"])
    assert done.value.code == 0
    assert got.keys() == read_model(tmp_path / "yaml").keys()
    assert all(torch.equal(v, read_model(tmp_path / "yaml")[k]) for k, v in got.items())
    from safetensors.torch import load_file

    a, u = read_model(tmp_path / "aligned"), read_model(tmp_path / "unaligned")
    factors = load_file(tmp_path / "task" / "adapter_model.safetensors")
    layers = {r["module"]: r for r in rep["layers"]}
    assert 0 < rep["counts"]["flagged"] < len(layers) == 2 * 4
    for module, r in layers.items():
        w, key = module + ".weight", f"base_model.model.{module}"
        dW = 2.0 * factors[key + ".lora_B.weight"].double() @ factors[key + ".lora_A.weight"].double()  # (alpha / r = 2)
        want = ref_cos(a[w].T, u[w].T, dW)  # (the linear map: the stored Conv1D weight's transpose)
        assert abs(r["cosine"] - want) < 1e-6, (module, r["cosine"], want)


def test_what_the_coverage_check_leaves_out_is_no_layer_that_has_the_vocabularys_size(tmp_path):
    """review198: a layer whose weight has vocab_size as a side by chance (intermediate_size ==
    vocab_size) was taken for a vocabulary table and left out of the safety-LoRA coverage check,
    so a safety LoRA without down_proj merged it as alpha * dW_task alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from safemerge_ext.io.models import ModelReader
    from safemerge_ext.mergekit_methods import passed_through

    LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "m")
    reader = ModelReader(tmp_path / "m", flag="model")
    try:
        left_alone = passed_through(reader)
        assert [m for m in ("lm_head", "model.embed_tokens", "model.layers.0.mlp.down_proj",
                            "model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj") if left_alone(m)] \
            == ["lm_head", "model.embed_tokens"]
    finally:
        reader.close()
