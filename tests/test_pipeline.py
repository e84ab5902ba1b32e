"""End to end on tiny sharded GQA Llamas: every cosine, the flagged set, the merged adapter's
effective update (loaded with PEFT), the full-model output (loaded with transformers), Safe LoRA's
projected B, and the selection modes, all against float64 references computed here."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from numerics import assert_close, ref_cosine, ref_project
from safemerge_ext import backends, pipeline
from safemerge_ext.cli import main
from safemerge_ext.errors import SafeMergeError
from safemerge_ext.io.models import natural_key
from weights import load_adapter, load_model, qwen3_moe_v4, twins_and_v4_adapters

def _runs_on_cpu(name: str) -> bool:
    try:
        backends.resolve(name, "cpu")
        return True
    except ValueError:
        return False


BACKENDS = [n for n in backends.NAMES if _runs_on_cpu(n)]


def refs(fx) -> dict[str, float]:
    wa, wu = load_model(fx.aligned), load_model(fx.unaligned)
    return {
        m: ref_cosine(wa[f"{m}.weight"], wu[f"{m}.weight"], B.double() @ A.double() * s)
        for m, (A, B, s) in load_adapter(fx.task).items()
    }


def run_cli(argv: list[str]) -> int:
    return main([str(a) for a in argv] + ["--no-progress"])


def merge_args(fx, out: Path, *extra) -> list:
    return ["merge", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--task-adapter", fx.task,
            "--safety-adapter", fx.safety, "--out", out, *extra]


def report_of(out: Path) -> dict:
    return json.loads((out / "safemerge_report.json").read_text())


def test_the_report_says_how_its_inputs_were_on_disk(fx, tmp_path):
    """The report records its schema version, the libraries the run imported, and each input as it
    was: path, files with size and time, JSON files' and safetensors headers' SHA-256 (review143:
    an adapter retrained in place gave a report that could not be told apart)."""
    import hashlib

    out = tmp_path / "out"
    assert run_cli(merge_args(fx, out, "--no-plot")) == 0
    rep = report_of(out)
    assert rep["schema_version"] == 1 and rep["environment"]["libraries"]["torch"] == torch.__version__
    assert set(rep["inputs"]) == {"aligned", "unaligned", "task_adapter", "safety_adapter"}
    task = rep["inputs"]["task_adapter"]
    assert task["path"] == str(Path(fx.task).resolve())
    files = task["files"]
    assert files["adapter_config.json"]["sha256"] == hashlib.sha256(
        (Path(fx.task) / "adapter_config.json").read_bytes()).hexdigest()
    raw = (Path(fx.task) / "adapter_model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert files["adapter_model.safetensors"] == {
        "bytes": len(raw), "modified": files["adapter_model.safetensors"]["modified"],
        "header_sha256": hashlib.sha256(raw[8:8 + n]).hexdigest()}
    shards = [f for f in rep["inputs"]["aligned"]["files"] if f.endswith(".safetensors")]
    assert len(shards) == len(list(Path(fx.aligned).glob("*.safetensors"))) > 1


def peft_merged_weights(aligned: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """Load the adapter with PEFT onto the aligned model and fold it in: what a user would get."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(aligned, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    return {k: v.detach() for k, v in model.state_dict().items()}


def expected_update(fx, flagged: set[str], alpha: float) -> dict[str, torch.Tensor]:
    """float64 SafeMERGE linear update per module (SPEC section 1)."""
    task, safety = load_adapter(fx.task), load_adapter(fx.safety)
    out = {}
    for m, (A, B, s) in task.items():
        d = B.double() @ A.double() * s
        if m in flagged:
            As, Bs, ss = safety[m]
            d = alpha * d + (1 - alpha) * (Bs.double() @ As.double() * ss)
        out[m] = d
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_matches_float64(fx, tmp_path, backend):
    ref = refs(fx)
    rep_path = tmp_path / "r.json"
    assert run_cli(["score", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", fx.task,
                    "--report", rep_path, "--plot", tmp_path / "p.png", "--backend", backend]) == 0
    rep = json.loads(rep_path.read_text())
    assert rep["backend"] == backend
    if backend == "cpp":  # which kernels: the ISA builds' bits differ
        from safemerge_ext import _cpu

        assert rep["backend_detail"].startswith(f"{_cpu.isa()} kernels, ")
    elif backend == "torch":  # (its sums follow its thread count: named, so the report says what gave its bits)
        n = torch.get_num_threads()
        assert rep["backend_detail"] == f"torch {torch.__version__}, {n} CPU thread{'s' if n != 1 else ''}"
    else:
        assert rep["backend_detail"] is None
    got = {r["module"]: r["cosine"] for r in rep["layers"]}
    assert set(got) == set(ref) and len(got) == 21
    for m, want in ref.items():
        assert abs(got[m] - want) < 2e-6, (m, got[m], want)
    # model order: blocks in number order, and each block's modules as Llama defines them
    kinds = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    assert [r["module"] for r in rep["layers"]] == sorted(
        got, key=lambda m: (int(m.split(".")[2]), kinds.index(m.split(".", 3)[3])))
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert rep["bytes_read"] > 0 and rep["counts"]["scored"] == 21


def test_score_writes_into_pipes_and_through_links(fx, tmp_path):
    """--report into a pipe (a shell's `>(jq .)`, /dev/stdout) or a device gets the JSON written
    into it, never a file put in its place; --report and --plot through a link replace the linked
    file and keep the link."""
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    target, plot_target = tmp_path / "real" / "r.json", tmp_path / "real" / "p.png"
    target.parent.mkdir()
    target.write_text("old")
    plot_target.write_text("old")
    (tmp_path / "link.json").symlink_to(target)
    (tmp_path / "link.png").symlink_to(plot_target)
    (tmp_path / "to-fifo").symlink_to(fifo)
    common = ["score", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", fx.task, "--no-progress"]
    assert run_cli([*common, "--report", tmp_path / "to-fifo"]) == 0
    reader.join(30)
    assert fifo.is_fifo() and json.loads(got[0])["counts"]["scored"] == 21
    assert run_cli([*common, "--report", tmp_path / "link.json", "--plot", tmp_path / "link.png"]) == 0
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "link.png").is_symlink()
    assert json.loads(target.read_text())["counts"]["scored"] == 21 and plot_target.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link.json", "link.png", "real", "to-fifo"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["p.png", "r.json"]


@pytest.mark.parametrize("mode, spelling", [("wb", "/dev/stdout"), ("ab", "/dev/stdout"), ("wb", "//dev/stdout"),
                                            ("wb", "link"), ("ab", "-")],
                         ids=["redirected", "appended", "two-slashes", "link", "dash"])
def test_score_report_to_stdout_keeps_the_shells_redirection(fx, tmp_path, mode, spelling):
    """`safemerge score ... --report /dev/stdout > file` (or `>> file`, or a link to /dev/stdout):
    the JSON goes through the process's own stdout, so the file keeps what was there (>>); it is
    not replaced by a file holding the report alone. The table goes to stderr then, so that stdout
    holds the JSON alone (`| jq .`). `--report -` is stdout too (it wrote a file named "-"). The
    copy made in the temporary folder on the way is deleted (every run left one, review182)."""
    import subprocess

    temp = tmp_path.parent / f"{tmp_path.name}-tmpdir"
    temp.mkdir()
    log = tmp_path / "log.txt"
    log.write_text("before\n")
    if spelling == "link":
        (tmp_path / "link").symlink_to("/dev/stdout")
        spelling = str(tmp_path / "link")
    with open(log, mode) as out:
        done = subprocess.run([sys.executable, "-m", "safemerge_ext", "score", "--aligned", str(fx.aligned),
                               "--unaligned", str(fx.unaligned), "--adapter", str(fx.task), "--no-progress",
                               "--report", spelling], stdout=out, stderr=subprocess.PIPE, text=True, timeout=300,
                              cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                                                 "TMPDIR": str(temp)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(temp.iterdir()) == []
    head = "before\n" if mode == "ab" else ""
    text = log.read_text()
    assert text.startswith(head) and json.loads(text[len(head):])["counts"]["scored"] == 21, text[:200]
    assert done.stderr.split()[:5] == ["layer", "shape", "rank", "cosine", "flagged"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["log.txt", *(["link"] * (spelling.endswith("link")))])


def test_score_names_the_report_temporaries_a_killed_run_left(fx, tmp_path, capsys):
    """A SIGKILLed `score --report R --plot P` leaves hidden temporaries beside R and P; the next
    run names them (review130 left them unnamed)."""
    left = [tmp_path / ".p.png.tmp-0a1b2c3d.png", tmp_path / ".r.json.tmp-0a1b2c3d.json"]
    for p in left:
        p.write_bytes(b"partial")
    assert run_cli(["score", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", fx.task,
                    "--report", tmp_path / "r.json", "--plot", tmp_path / "p.png"]) == 0
    err = capsys.readouterr().err
    for p in left:
        assert f"safemerge: warning: {p} holds a partial output of an earlier run" in err
    assert json.loads((tmp_path / "r.json").read_text())["counts"]["scored"] == 21


def test_score_report_to_a_descriptor_that_cannot_take_it_is_one_line(fx, tmp_path):
    """A closed stdout, a /dev/fd/N that is not open (or open for reading), and standard input are
    refused before any work: one line, nothing written (the run's own files would otherwise take
    the number of a closed descriptor by the time the report is written)."""
    import subprocess

    argv = [sys.executable, "-m", "safemerge_ext", "score", "--aligned", str(fx.aligned), "--unaligned",
            str(fx.unaligned), "--adapter", str(fx.task), "--no-progress", "--report"]
    src = tmp_path / "in.txt"
    src.write_text("input")
    with open(src) as readable:
        for path, kw, want in (
                ("/dev/stdout", {"preexec_fn": lambda: os.close(1)}, "descriptor 1 is not open in this command"),
                ("/dev/fd/9", {}, "descriptor 9 is not open in this command"),
                (f"/dev/fd/{readable.fileno()}", {"pass_fds": (readable.fileno(),)}, "is open for reading only"),
                ("/dev/stdin", {}, "is standard input")):
            done = subprocess.run([*argv, path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  timeout=300, **kw)
            err = done.stderr.strip()
            assert done.returncode == 2 and "\n" not in err and want in err, (path, done.returncode, err)
    assert src.read_text() == "input"


def test_score_report_into_a_pipe_whose_reader_leaves_says_so(fx, tmp_path):
    """`--report /dev/stdout | head -c 100`: the reader goes away before the report is all sent
    (here before any of it: the read end is closed at once); the line says what it read is cut
    short, not that nothing was written."""
    import subprocess

    r, w = os.pipe()
    os.close(r)
    proc = subprocess.Popen([sys.executable, "-m", "safemerge_ext", "score", "--aligned", str(fx.aligned),
                             "--unaligned", str(fx.unaligned), "--adapter", str(fx.task), "--no-progress",
                             "--report", "/dev/stdout"], stdout=w, stderr=subprocess.PIPE, text=True)
    os.close(w)
    err = proc.communicate(timeout=300)[1].strip()
    assert proc.returncode == 2 and "\n" not in err, err
    assert re.search(r"^safemerge: error: /dev/stdout: its reader closed it after \d+ of \d+ bytes, so what it "
                     r"read is cut short$", err), err


def test_score_prints_the_per_layer_table(fx, tmp_path, capsys):
    """`safemerge score` prints one row per scored layer, in the report's order, with its shape,
    rank, cosine (4 decimals) and whether the threshold flags it; then the summary."""
    rep_path = tmp_path / "r.json"
    assert run_cli(["score", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", fx.task,
                    "--report", rep_path, "--threshold", 0.25]) == 0
    out = capsys.readouterr().out.splitlines()
    layers = json.loads(rep_path.read_text())["layers"]
    assert out[0].split() == ["layer", "shape", "rank", "cosine", "flagged"]
    rows = [line.split() for line in out[1:1 + len(layers)]]
    assert rows == [[r["module"], "x".join(map(str, r["shape"])), str(r["rank"]), f"{r['cosine']:.4f}",
                     "yes" if r["flagged"] else "no"] for r in layers]
    assert {r[4] for r in rows} == {"yes", "no"}  # (the threshold splits this fixture)
    assert all(r[4] == ("yes" if float(r[3]) < 0.25 else "no") for r in rows)
    assert out[1 + len(layers)] == "" and out[2 + len(layers)].split() == ["method", "score"]
    assert not any(line.startswith("flagged layers") for line in out)  # (the table names them)


def test_layer_table_says_why_a_layer_is_unscored():
    from safemerge_ext.report import layer_table

    rep = {"layers": [
        {"module": "m.layers.0.q_proj", "cosine": 0.123456, "flagged": True, "reason": None, "shape": [8, 4], "rank": 2},
        {"module": "m.layers.0.v_proj", "cosine": float("nan"), "flagged": False,
         "reason": "V = 0: the aligned and unaligned weights are equal", "shape": [4, 4], "rank": 1},
    ]}
    lines = layer_table(rep).splitlines()
    assert lines[1].split() == ["m.layers.0.q_proj", "8x4", "2", "0.1235", "yes"]
    assert lines[2].split()[:5] == ["m.layers.0.v_proj", "4x4", "1", "n/a", "no"]
    assert lines[2].endswith("no  (V = 0: the aligned and unaligned weights are equal)")
    end = lines[0].index("cosine") + len("cosine")  # (numbers right-aligned under their heading)
    assert [line[:end][-6:] for line in lines] == ["cosine", "0.1235", "   n/a"]


def test_the_table_and_summary_explain_a_selection():
    """Near the threshold the table prints the digits that show which side of it a cosine lies on
    (0.1425 read as not below 0.14248; review146), and the summary says how layers were flagged."""
    from safemerge_ext.report import layer_table, summary_table

    rows = [{"module": "a", "cosine": 0.1424765664, "flagged": True}, {"module": "b", "cosine": 0.3, "flagged": False},
            {"module": "c", "cosine": 0.14248000001, "flagged": False}]
    rep = {"method": "safemerge", "backend": "cpp", "counts": {"scored": 3, "layers": 3, "degenerate": 0, "flagged": 1},
           "cosine": {"min": 0.14, "median": 0.14, "max": 0.3}, "timings": {}, "bytes_read": 0, "warnings": [],
           "settings": {"selection": "threshold", "threshold": 0.14248, "comparison": "<"}, "layers": rows}
    cells = [line.split()[3] for line in layer_table(rep).splitlines()[1:]]
    assert cells == ["0.142477", "0.3000", "0.1425"]
    assert all((float(c) < 0.14248) == r["flagged"] for c, r in zip(cells, rows))
    assert "flagged                    1  (cosine < 0.14248)" in summary_table(rep)
    for settings, rule in (({"selection": "num_layers", "num_layers": 4, "comparison": None}, "the 4 lowest"),
                           ({"selection": "fraction", "fraction": 0.3, "comparison": None}, "the lowest 0.3 of the scored"),
                           ({"selection": "threshold", "threshold": 0.5, "comparison": "<="}, "cosine <= 0.5")):
        rep["settings"] = settings
        assert f"1  ({rule})" in summary_table(rep)
        if settings["selection"] != "threshold":  # (no threshold: 4 decimals)
            assert [line.split()[3] for line in layer_table(rep).splitlines()[1:]] == ["0.1425", "0.3000", "0.1425"]


def test_a_cut_between_equal_cosines_is_a_warning(fx, tmp_path):
    """--num-layers / --fraction: equal cosines go to the earlier layer; a cut that falls between
    them flagged one of two identical layers without a word (review146), and recorded a
    comparison that was never made."""
    from safetensors import safe_open

    root = Path(shutil.copytree(Path(fx.aligned).parent, tmp_path / "m"))
    a, b = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"

    def patch(f: Path, edit) -> None:
        with safe_open(f, "pt") as fh:
            t, meta = {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()
        save_file(edit(t), str(f), metadata=meta)

    for m in ("aligned", "unaligned"):
        where = json.loads((root / m / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(root / m / where[a + ".weight"], "pt") as fh:
            w = fh.get_tensor(a + ".weight")
        patch(root / m / where[b + ".weight"], lambda t: {**t, b + ".weight": w.clone()})
    patch(root / "task" / "adapter_model.safetensors",
          lambda t: {**t, **{k.replace(a, b): v.clone() for k, v in t.items() if a in k}})
    cos = {r["module"]: r["cosine"] for r in pipeline.score(root / "aligned", root / "unaligned", root / "task",
                                                            progress=False)["layers"]}
    assert cos[a] == cos[b]
    k = sorted(cos.values()).index(cos[a]) + 1  # (the cut right after the first of the two)
    out = tmp_path / "out"
    assert run_cli(["merge", "--aligned", root / "aligned", "--unaligned", root / "unaligned", "--task-adapter",
                    root / "task", "--safety-adapter", root / "safety", "--out", out, "--no-plot", "--num-layers", k]) == 0
    rep = report_of(out)
    flags = {r["module"]: r["flagged"] for r in rep["layers"]}
    assert flags[a] and not flags[b] and rep["settings"]["comparison"] is None
    assert f"--num-layers {k}: the cut falls between layers of equal cosine {cos[a]!r}: 1 later one(s) in model order " \
        "left unflagged (ties go to the earlier layer); to treat them alike, flag one layer more or fewer per tied " \
        "layer, or flag by --threshold" in rep["warnings"], rep["warnings"]


def test_project_keeps_only_the_projections_it_may_write(fx):
    """Safe LoRA kept C @ B of every layer until the end (1.7 GB for a 70B model at r = 64;
    review149): only those the selection may flag are kept, each as the full run computes it."""
    from safemerge_ext.io.adapters import read_adapter

    run = pipeline.open_run(fx.aligned, fx.unaligned, read_adapter(fx.task, "--adapter"))
    every = pipeline.score_layers(run, progress=False, with_projection=True)
    cos = [s.cosine for s in every]
    tau = sorted(cos)[7]
    for sel in (pipeline.Selection(threshold=tau, inclusive=True), pipeline.Selection(num_layers=5),
                pipeline.Selection(fraction=0.3), pipeline.Selection(num_layers=99)):
        kept = pipeline.score_layers(run, progress=False, with_projection=sel)
        held = [i for i, s in enumerate(kept) if s.projected_B is not None]
        flagged = [i for i, f in enumerate(sel.flag(cos)) if f]
        assert held == flagged, sel  # (these scores have no ties: the k lowest so far are the k lowest)
        assert all(torch.equal(kept[i].projected_B, every[i].projected_B) for i in held)
        assert [s.cosine for s in kept] == cos
    run.close()


def test_score_bf16_models(fx_bf16, tmp_path):
    """bf16 checkpoints are read as stored; differences are exact in fp32."""
    ref = refs(fx_bf16)
    rep_path = tmp_path / "r.json"
    assert run_cli(["score", "--aligned", fx_bf16.aligned, "--unaligned", fx_bf16.unaligned,
                    "--adapter", fx_bf16.task, "--report", rep_path]) == 0
    got = {r["module"]: r["cosine"] for r in json.loads(rep_path.read_text())["layers"]}
    for m, want in ref.items():
        assert abs(got[m] - want) < 1e-5, (m, got[m], want)


def threshold_between(values: list[float], k: int) -> float:
    """A threshold with exactly k scores below it, far from every score."""
    s = sorted(values)
    return (s[k - 1] + s[k]) / 2


def _with_adapters_in(fx, dtype: torch.dtype, root: Path):
    """``fx`` with its task and safety adapters saved in ``dtype`` (as PEFT saves a bf16 run's)."""
    import dataclasses
    import shutil

    from safetensors.torch import save_file

    paths = {}
    for role in ("task", "safety"):
        src, dst = getattr(fx, role), root / f"{role}-{str(dtype).split('.')[-1]}"
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
        sd = load_file(src / "adapter_model.safetensors")
        save_file({k: v.to(dtype) for k, v in sd.items()}, dst / "adapter_model.safetensors")
        paths[role] = dst
    return dataclasses.replace(fx, **paths)


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16], ids=["fp32-adapters", "bf16-adapters"])
def test_merge_linear_adapter_exact(fx, tmp_path, adapter_dtype):
    """The merged adapter, loaded with PEFT, is exactly aligned + alpha dW_task + (1 - alpha) dW_safety
    on the flagged layers, whatever the adapters' dtype: their factors are written in fp32 (bf16
    ones would round the folded scales alpha s B), the kept layers as they were."""
    if adapter_dtype != torch.float32:
        fx = _with_adapters_in(fx, adapter_dtype, tmp_path)
    ref = refs(fx)
    tau = threshold_between(list(ref.values()), 8)
    out = tmp_path / "out"
    assert run_cli(merge_args(fx, out, "--threshold", tau, "--alpha", 0.7)) == 0
    rep = report_of(out)
    flagged = {r["module"] for r in rep["layers"] if r["flagged"]}
    assert flagged == {m for m, c in ref.items() if c < tau} and len(flagged) == 8

    # every module at the largest rank r_f + r_s and one scaling (write_adapter); unflagged layers keep the
    # task adapter's factors, zero-padded: the same bits, B rescaled (in fp32) where its scaling was another
    out_sd = load_file(out / "adapter_model.safetensors")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 + 6 and cfg["rank_pattern"] == {} == cfg["alpha_pattern"]
    default = cfg["lora_alpha"] / cfg["r"]
    task_ad = load_adapter(fx.task)
    for m in ref:
        A, B = (out_sd[f"base_model.model.{m}.lora_{f}.weight"] for f in "AB")
        tA, tB, ts = task_ad[m]
        r = tA.shape[0] if m not in flagged else tA.shape[0] + 6  # r_f, or r_f + r_s
        assert A.shape[0] == B.shape[1] == 10 and not A[r:].any() and not B[:, r:].any(), m
        if m not in flagged:
            assert torch.equal(A[:r], tA), m
            if ts == default:
                assert torch.equal(B[:, :r], tB), m
            else:
                assert B.dtype == torch.float32 and m.endswith(("v_proj", "o_proj")), m  # (their patterns)
                assert_close(default * B[:, :r].double(), ts * tB.double(), atol=0.0, rtol=1e-7, what=m)
        else:
            assert A.dtype == B.dtype == torch.float32

    # the adapter, loaded by PEFT onto the aligned model, gives aligned + the SafeMERGE update
    merged = peft_merged_weights(fx.aligned, out)
    aligned = load_model(fx.aligned)
    want = expected_update(fx, flagged, 0.7)
    for m, d in want.items():
        w = f"{m}.weight"
        assert_close(merged[w], aligned[w].double() + d, atol=2e-6, rtol=1e-5, what=m)
    for k, v in aligned.items():  # everything else untouched
        if not any(k == f"{m}.weight" for m in want):
            assert torch.equal(merged[k], v), k


def test_safety_modules_without_a_task_update_are_ignored_with_a_warning(fx, tmp_path):
    """A safety adapter that also adapts a module the task adapter leaves alone: that module is not
    merged (there is no task update to repair), and the report says how many were ignored."""
    import shutil

    from safetensors.torch import save_file

    q0 = "model.layers.0.self_attn.q_proj"
    task = tmp_path / "task"
    shutil.copytree(fx.task, task)
    sd = load_file(task / "adapter_model.safetensors")
    for ab in "AB":
        sd.pop(f"base_model.model.{q0}.lora_{ab}.weight")
    save_file(sd, task / "adapter_model.safetensors")
    out = tmp_path / "out"
    assert run_cli(["merge", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--task-adapter", task,
                    "--safety-adapter", fx.safety, "--out", out, "--threshold", 1.0]) == 0
    rep = report_of(out)
    assert f"1 safety-adapter module(s) have no task update and are ignored (e.g. {q0})" in rep["warnings"]
    assert q0 not in {r["module"] for r in rep["layers"]} and rep["layers"]
    assert all(r["flagged"] for r in rep["layers"])  # (every other layer merged: the threshold flags all)
    written = load_file(out / "adapter_model.safetensors")
    assert not [k for k in written if f".{q0}." in k] and len(written) == len(sd)


def test_adapters_trained_on_different_base_models_are_warned_of(fx, tmp_path):
    """A safety adapter trained on another model of the same architecture (here: the unaligned
    base) has the same module names and shapes; only the adapters' configs can tell, and the run
    says so. A Hub id and a local copy of that model (the same last path part) are one model."""
    import shutil

    def with_base(name: str, base: str) -> Path:
        path = tmp_path / name
        shutil.copytree(fx.safety, path)
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = base
        (path / "adapter_config.json").write_text(json.dumps(cfg))
        return path

    task_base = json.loads((fx.task / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(task_base).name == "aligned"
    runs = {"unaligned": with_base("s1", str(fx.unaligned)), "hub copy": with_base("s2", "some-org/Aligned/"),
            "none": with_base("s3", ""), "here": with_base("s4", "."),
            "hub cache": with_base("s5", "/root/.cache/huggingface/hub/models--some-org--aligned/snapshots/08751db2a")}
    for what, safety in runs.items():
        out = tmp_path / f"out-{what}"
        assert run_cli(["merge", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--task-adapter", fx.task,
                        "--safety-adapter", safety, "--out", out]) == 0
        warned = [w for w in report_of(out)["warnings"] if "base_model_name_or_path" in w]
        if what == "unaligned":
            assert warned == [f"--task-adapter names base model {task_base!r} but --safety-adapter "
                              f"{str(fx.unaligned)!r} (base_model_name_or_path in their adapter_config.json): "
                              "SafeMERGE needs both trained on the aligned model (--aligned)"]
        else:
            assert warned == [], what


def _equal_rank_adapters(fx, root: Path, rslora: bool, ranks: dict[str, int], task_alpha: int = 8) -> tuple[Path, Path]:
    """A task and a safety adapter of one rank (and ``ranks`` as both one's rank_pattern) on fx's
    aligned model, as PEFT's linear combination needs (the task's rsLoRA as asked; different
    alphas, so the sqrt-weights differ)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from safemerge_ext.demo import TARGETS

    paths = []
    for i, (name, alpha, rs) in enumerate((("task", task_alpha, rslora), ("safety", 12, False))):
        torch.manual_seed(100 + i)
        base = LlamaForCausalLM.from_pretrained(fx.aligned, dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=alpha, use_rslora=rs, target_modules=TARGETS,
                                                rank_pattern=ranks, init_lora_weights=False))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn_like(p) * 0.1)
        model.save_pretrained(root / name)
        paths.append(root / name)
    return paths[0], paths[1]


@pytest.mark.parametrize("rslora, ranks, task_alpha", [(False, {}, 8), (True, {}, 8), (True, {"v_proj": 2}, 8),
                                                      (True, {"o_proj": 8}, 8), (False, {}, -8)],
                         ids=["lora", "rslora", "rslora-smaller-pattern", "rslora-larger-pattern", "negative-alpha"])
def test_peft_linear_reproduces_peft_add_weighted_adapter(fx, tmp_path, rslora, ranks, task_alpha):
    """--method peft-linear gives, in the flagged layers, what the reference code gets from PEFT's
    add_weighted_adapter([task, safety], [alpha, 1 - alpha], combination_type="linear") (cross
    terms and PEFT's new scaling included: with rsLoRA, r / sqrt(r) at the task adapter's largest
    rank, whatever a module's own), as a model and as an adapter that PEFT loads; the other layers
    keep the task update; and it differs from the exact linear merge. A negative lora_alpha: PEFT
    puts the sign on A's weight (it was "math domain error"; review145)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    task, safety = _equal_rank_adapters(fx, tmp_path, rslora, ranks, task_alpha)
    alpha = 0.7
    base = LlamaForCausalLM.from_pretrained(fx.aligned, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, task, adapter_name="task")
    model.load_adapter(safety, adapter_name="safety")
    model.add_weighted_adapter(["task", "safety"], [alpha, 1 - alpha], "mixed", combination_type="linear")
    model.set_adapter("mixed")
    peft_all = {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}
    aligned, task_w = load_model(fx.aligned), load_adapter(task)

    args = ["merge", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--task-adapter", task,
            "--safety-adapter", safety, "--method", "peft-linear", "--alpha", alpha, "--no-plot"]
    assert run_cli(args + ["--out", tmp_path / "probe", "--threshold", 1.0]) == 0
    cos = {r["module"]: r["cosine"] for r in report_of(tmp_path / "probe")["layers"]}
    tau = threshold_between(list(cos.values()), len(cos) // 2)
    flagged = {m for m, c in cos.items() if c < tau}
    assert 0 < len(flagged) < len(cos)
    assert run_cli(args + ["--out", tmp_path / "model", "--threshold", tau, "--output", "model"]) == 0
    assert run_cli(args + ["--out", tmp_path / "adapter", "--threshold", tau]) == 0
    rep = report_of(tmp_path / "adapter")
    assert rep["settings"]["merge"] == "peft-linear" and rep["settings"]["density"] is None
    assert {r["module"] for r in rep["layers"] if r["flagged"]} == flagged
    written = load_adapter(tmp_path / "adapter")
    for out, got in (("model", load_model(tmp_path / "model")),
                     ("adapter", peft_merged_weights(fx.aligned, tmp_path / "adapter"))):
        for m in cos:
            w = f"{m}.weight"
            if m in flagged:
                want = peft_all[w].double()
                exact = aligned[w].double() + expected_update(types.SimpleNamespace(task=task, safety=safety),
                                                              {m}, alpha)[m]
                assert (want - exact).abs().max() > 1e-3, m  # (the cross terms are there)
                A = written[m][0]  # (rank r, not r_task + r_safety: the rows past it are zero padding)
                assert int(A.abs().sum(1).gt(0).sum()) == task_w[m][0].shape[0], m
            else:
                A, B, s = task_w[m]
                want = aligned[w].double() + B.double() @ A.double() * s
            assert_close(got[w], want, atol=2e-6, rtol=1e-5, what=f"{out} {m}")


def test_peft_linear_needs_equal_ranks(fx, tmp_path, capsys):
    """fx's task adapter (r = 4, v_proj 2) and safety adapter (r = 6) cannot be combined PEFT's
    linear way: one line before anything is scored or written."""
    out = tmp_path / "out"
    assert run_cli(merge_args(fx, out, "--method", "peft-linear")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["safemerge: error: --method peft-linear: module model.layers.0.self_attn.q_proj has rank 4 in --task-adapter "
                   "but 6 in --safety-adapter; PEFT's linear combination needs equal ranks (--method linear, the exact "
                   "merge, takes any)"], err
    assert not out.exists()


@pytest.mark.parametrize("as_task", ["task", "safety"], ids=["patterned", "rslora"])
def test_merged_adapter_is_read_alike_by_peft_vllm_llamacpp_and_tgi(fx, tmp_path, as_task):
    """A merged adapter has flagged modules of rank r_task + r_safety among the task's: written each at
    its own rank and scaling (rank_pattern/alpha_pattern), llama.cpp (which scales each tensor by
    lora_alpha over its own rank) gave the kept ones (r_task + r_safety) / r_task times their update,
    and TGI/LoRAX (which stack a module's factors across layers) failed to load it (review169); vLLM
    reads neither pattern, so a task adapter's own patterns were lost there. Every module is now at
    the largest rank (zero-padded) and one scaling, which each loader's rule reads as PEFT does.
    The demo's task adapter sets v_proj's rank and o_proj's alpha by pattern; its safety adapter is rsLoRA."""
    task, safety = (fx.task, fx.safety) if as_task == "task" else (fx.safety, fx.task)
    out = tmp_path / "out"
    assert run_cli(["merge", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--task-adapter", task,
                    "--safety-adapter", safety, "--out", out, "--num-layers", 6, "--no-plot"]) == 0
    flagged = {r["module"] for r in report_of(out)["layers"] if r["flagged"]}
    assert len(flagged) == 6
    want = expected_update(types.SimpleNamespace(task=task, safety=safety), flagged, 0.8)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {} == cfg["alpha_pattern"] and cfg["r"] == 4 + 6
    rslora = cfg["use_rslora"]
    assert rslora == (as_task == "safety")
    sd = load_file(out / "adapter_model.safetensors")
    by_kind: dict[str, set[int]] = {}
    for m, update in want.items():
        A, B = sd[f"base_model.model.{m}.lora_A.weight"], sd[f"base_model.model.{m}.lora_B.weight"]
        by_kind.setdefault(m.rsplit(".", 1)[-1], set()).add(A.shape[0])
        vllm = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if rslora else cfg["r"])  # (one scaling for all)
        assert_close(vllm * B.double() @ A.double(), update, atol=1e-6, rtol=1e-6, what=f"vLLM {m}")
        if not rslora:  # (llama.cpp has no rsLoRA, for any adapter)
            assert math.isclose(cfg["lora_alpha"] / A.shape[0], vllm, rel_tol=1e-12), f"llama.cpp {m}"
    assert all(len(ranks) == 1 for ranks in by_kind.values()), by_kind  # (TGI stacks them)
    peft = peft_merged_weights(fx.aligned, out)
    aligned = load_model(fx.aligned)
    for m, update in want.items():
        assert_close(peft[f"{m}.weight"], aligned[f"{m}.weight"].double() + update, atol=2e-6, rtol=1e-5,
                     what=f"PEFT {m}")
    assert not [w for w in report_of(out)["warnings"] if "vLLM" in w]  # (the padding of r 4 to 10 is not said)


def test_an_adapter_padded_many_times_over_is_said(fx, tmp_path):
    """One rank for every module: a task adapter whose rank_pattern gives one module rank 32 (the
    rest 4 and 2) is written all at 32, about 6x its factors, and the report says so (review172)."""
    import shutil

    from safetensors.torch import save_file

    task = Path(shutil.copytree(fx.task, tmp_path / "task"))
    q0 = "model.layers.0.self_attn.q_proj"
    factors = load_file(task / "adapter_model.safetensors")
    d_out, d_in = (factors[f"base_model.model.{q0}.lora_{f}.weight"].shape[i] for f, i in (("B", 0), ("A", 1)))
    torch.manual_seed(5)
    factors[f"base_model.model.{q0}.lora_A.weight"] = 0.1 * torch.randn(32, d_in)
    factors[f"base_model.model.{q0}.lora_B.weight"] = 0.1 * torch.randn(d_out, 32)
    save_file(factors, str(task / "adapter_model.safetensors"))
    config = json.loads((task / "adapter_config.json").read_text())
    config["rank_pattern"] = {**config["rank_pattern"], rf"^{re.escape(q0)}$": 32}
    (task / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "p"
    assert run_cli(["project", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", task, "--out", out,
                    "--num-layers", 2, "--no-plot"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 32
    said = [w for w in report_of(out)["warnings"] if "own ranks need" in w]
    assert len(said) == 1 and re.fullmatch(
        r"the written adapter holds \d+\.\dx the factors its modules' own ranks need: every module is written at "
        rf"r = 32, the rank of {re.escape(q0)}, zero-padded, .*", said[0]), said
    assert float(said[0].split("holds ")[1].split("x")[0]) > 5


@pytest.mark.parametrize("as_task", ["task", "safety"], ids=["patterned", "rslora"])
def test_per_module_ranks_keep_each_modules_rank_and_peft_folds_the_same(fx, tmp_path, as_task):
    """--adapter-ranks per-module (SPEC section 1's form): every module at its own rank (flagged ones
    r_task + r_safety, the rest the task adapter's, v_proj's from its rank_pattern), the default r
    the most common, the others given by rank_pattern/alpha_pattern at the adapter's one scaling; PEFT
    folds it to the same model as the uniform adapter, from a smaller file. merge and project."""
    task, safety = (fx.task, fx.safety) if as_task == "task" else (fx.safety, fx.task)
    own = {m: A.shape[0] for m, (A, _, _) in load_adapter(task).items()}
    r_task, r_safety = (json.loads((a / "adapter_config.json").read_text())["r"] for a in (task, safety))
    assert len(set(own.values())) > 1 or as_task == "safety"
    for cmd in ("merge", "project"):
        args = (["merge", "--task-adapter", task, "--safety-adapter", safety] if cmd == "merge" else
                ["project", "--adapter", task])
        args += ["--aligned", fx.aligned, "--unaligned", fx.unaligned, "--num-layers", 6, "--no-plot"]
        for ranks in ("uniform", "per-module"):
            assert run_cli([*args, "--out", tmp_path / f"{cmd}-{ranks}", "--adapter-ranks", ranks]) == 0
        out, uniform = tmp_path / f"{cmd}-per-module", tmp_path / f"{cmd}-uniform"
        flagged = {r["module"] for r in report_of(out)["layers"] if r["flagged"]}
        assert len(flagged) == 6 and flagged == {r["module"] for r in report_of(uniform)["layers"] if r["flagged"]}
        assert report_of(out)["settings"]["adapter_ranks"] == "per-module"
        want = {m: own[m] + (r_safety if cmd == "merge" and m in flagged else 0) for m in own}
        got = {m: (A.shape[0], B.shape[1]) for m, (A, B, _) in load_adapter(out).items()}
        assert got == {m: (r, r) for m, r in want.items()}
        cfg = json.loads((out / "adapter_config.json").read_text())
        counts = [list(want.values()).count(r) for r in sorted(set(want.values()))]
        assert cfg["r"] == sorted(set(want.values()))[counts.index(max(counts))]
        assert len(cfg["rank_pattern"]) == sum(r != cfg["r"] for r in want.values()) == len(cfg["alpha_pattern"])
        rslora = cfg["use_rslora"]
        one = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if rslora else cfg["r"])
        assert all(math.isclose(cfg["alpha_pattern"][k] / (math.sqrt(r) if rslora else r), one, rel_tol=1e-12)
                   for k, r in cfg["rank_pattern"].items())
        size = {p: (p / "adapter_model.safetensors").stat().st_size for p in (out, uniform)}
        assert size[out] < size[uniform] if len(set(want.values())) > 1 else size[out] == size[uniform], size
        peft, peft_uniform = peft_merged_weights(fx.aligned, out), peft_merged_weights(fx.aligned, uniform)
        for m in own:
            assert_close(peft[f"{m}.weight"], peft_uniform[f"{m}.weight"].double(), atol=2e-6, rtol=1e-5,
                         what=f"{cmd} {m}")
        if cmd == "merge":
            aligned = load_model(fx.aligned)
            for m, update in expected_update(types.SimpleNamespace(task=task, safety=safety), flagged, 0.8).items():
                assert_close(peft[f"{m}.weight"], aligned[f"{m}.weight"].double() + update, atol=2e-6, rtol=1e-5,
                             what=f"PEFT {m}")
        assert not [w for w in report_of(out)["warnings"] if "own ranks need" in w]


def test_per_module_ranks_apply_to_an_adapter_output_only(fx, tmp_path, capsys):
    """--adapter-ranks with --output model would change nothing: refused in one line, before any
    work; so is a MergeSettings or project() call that asks for it."""
    out = tmp_path / "m"
    assert run_cli(merge_args(fx, out, "--output", "model", "--adapter-ranks", "per-module")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["safemerge: error: --adapter-ranks applies to --output adapter; --output model writes the model's "
                   "weights: leave --adapter-ranks out"], err
    assert not out.exists()
    with pytest.raises(ValueError, match="adapter_ranks applies to output adapter; output model"):
        pipeline.MergeSettings(pipeline.Selection(num_layers=2), output="model", adapter_ranks="per-module")
    with pytest.raises(ValueError, match="adapter_ranks must be one of uniform, per-module; got 'mixed'"):
        pipeline.project(fx.aligned, fx.unaligned, fx.task, out, pipeline.Selection(num_layers=2),
                         adapter_ranks="mixed")
    assert not out.exists()


def test_a_leading_tilde_in_a_command_line_path_is_the_home_folder(fx, tmp_path, monkeypatch):
    """The shell leaves ~ alone in `--out=~/x`, in quotes, and on Windows: the command made a folder
    named "~" in the working directory (review181). Paths starting with ~ are expanded, as a
    recipe's are."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    (home / "task").symlink_to(fx.task)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert run_cli(["project", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", "~/task",
                    "--out=~/out", "--num-layers", 2, "--no-plot"]) == 0
    assert (home / "out" / "adapter_model.safetensors").is_file() and list(work.iterdir()) == []
    assert report_of(home / "out")["settings"]["adapter"] == str(fx.task.resolve())
    assert run_cli(["score", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", "~/task",
                    "--report=~/r.json", "--plot=~/p.png"]) == 0
    assert (home / "r.json").is_file() and (home / "p.png").is_file() and list(work.iterdir()) == []


def test_merge_model_output(fx, tmp_path):
    from transformers import LlamaForCausalLM

    ref = refs(fx)
    out = tmp_path / "model"
    assert run_cli(merge_args(fx, out, "--num-layers", 5, "--output", "model")) == 0
    rep = report_of(out)
    flagged = {r["module"] for r in rep["layers"] if r["flagged"]}
    assert flagged == set(sorted(ref, key=ref.get)[:5])
    # same sharding and index, config copied
    src_index = json.loads((fx.aligned / "model.safetensors.index.json").read_text())["weight_map"]
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == src_index
    assert (out / "config.json").read_text() == (fx.aligned / "config.json").read_text()
    assert (out / "generation_config.json").is_file()
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    got = model.state_dict()
    aligned = load_model(fx.aligned)
    want = expected_update(fx, flagged, 0.8)
    for k, v in aligned.items():
        m = k[: -len(".weight")]
        if m in want:
            assert_close(got[k], v.double() + want[m], atol=2e-6, rtol=1e-5, what=k)
        else:
            assert torch.equal(got[k], v), k


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_masks_are_drawn_per_module_and_seed(method):
    """The same module and seed draw the same DARE mask; another module or another seed, another."""
    from safemerge_ext.merge import combine_full

    g = torch.Generator().manual_seed(32)
    f, s = (torch.randn(64, 80, generator=g) for _ in range(2))

    def mask(seed, module):
        return combine_full(f, s, alpha=1.0, method=method, density=0.5, seed=seed, module=module) != 0

    a = mask(5, "model.layers.0.mlp.up_proj")
    assert torch.equal(a, mask(5, "model.layers.0.mlp.up_proj"))
    assert not torch.equal(a, mask(5, "model.layers.1.mlp.up_proj"))
    assert not torch.equal(a, mask(6, "model.layers.0.mlp.up_proj"))


def test_report_norms_are_those_of_the_scaled_update(fx):
    """The report's delta_norm is ||s B A|| (the adapter's scaling applied), v_norm is ||V||."""
    rep = pipeline.score(fx.aligned, fx.unaligned, fx.task, progress=False)
    wa, wu, task = load_model(fx.aligned), load_model(fx.unaligned), load_adapter(fx.task)
    assert {s for (_, _, s) in task.values()} != {1.0}  # (a scaling that is not 1, or this checks nothing)
    assert len(rep["layers"]) == len(task)
    for r in rep["layers"]:
        A, B, s = task[r["module"]]
        w = f"{r['module']}.weight"
        assert math.isclose(r["delta_norm"], float((s * B.double() @ A.double()).norm()), rel_tol=1e-5), r
        assert math.isclose(r["v_norm"], float((wa[w].double() - wu[w].double()).norm()), rel_tol=1e-5), r


def test_dare_masks_do_not_depend_on_threads():
    """Modules merged in several threads at once (mergekit runs one per GPU) draw the same DARE
    masks as one after another: seeding and drawing from the global generator is one step."""
    from concurrent.futures import ThreadPoolExecutor

    from safemerge_ext.merge import combine_full

    g = torch.Generator().manual_seed(3)
    jobs = [(f"model.layers.{i}.mlp.up_proj", torch.randn(96, 64, generator=g), torch.randn(96, 64, generator=g))
            for i in range(24)]

    def run(job):
        name, a, b = job
        return combine_full(a, b, alpha=0.8, method="dare_ties", density=0.3, seed=11, module=name)

    alone = [run(j) for j in jobs]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            assert all(torch.equal(x, y) for x, y in zip(pool.map(run, jobs), alone))


def ref_sparse(method: str, d_f: torch.Tensor, d_s: torch.Tensor, alpha: float, density: float, seed: int,
               module: str) -> torch.Tensor:
    """float64 merge(alpha dW_f, (1 - alpha) dW_s) for ties / dare_*, as SPEC section 1 writes it:
    TIES keeps each weighted update's top ``density`` entries by magnitude; DARE keeps each entry
    with probability ``density`` (Bernoulli masks drawn in fp32 from the per-module seed, one per
    update in order, as PEFT draws them) and divides by ``density``; *ties elects each entry's sign
    on the sum and averages the entries that agree with it; dare_linear sums."""
    from safemerge_ext.merge import module_seed

    W = [d_f.double() * alpha, d_s.double() * (1 - alpha)]
    if method == "ties":
        def top(t: torch.Tensor) -> torch.Tensor:
            keep = torch.zeros(t.numel(), dtype=t.dtype)
            keep[t.abs().flatten().topk(int(density * t.numel())).indices] = 1
            return t * keep.view_as(t)

        W = [top(w) for w in W]
    else:
        torch.manual_seed(module_seed(seed, module))
        W = [w * torch.bernoulli(torch.full(w.shape, density)).double() / density for w in W]
    if method == "dare_linear":
        return W[0] + W[1]
    stacked = torch.stack(W)
    agree = stacked.sign() == torch.where(stacked.sum(0) >= 0, 1.0, -1.0).double()
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_merge_sparse_methods(fx, tmp_path, method):
    """ties/dare: model output equals a float64 reference written from the SPEC on the full
    updates; adapter output is its rank r_f + r_s truncated SVD with the relative error reported;
    DARE is seeded."""

    ref = refs(fx)
    tau = threshold_between(list(ref.values()), 4)
    args = ("--threshold", tau, "--method", method, "--density", 0.5, *(("--seed", 7) if method != "ties" else ()))
    assert run_cli(merge_args(fx, tmp_path / "m", *args, "--output", "model")) == 0
    assert run_cli(merge_args(fx, tmp_path / "a", *args)) == 0
    flagged = {r["module"] for r in report_of(tmp_path / "m")["layers"] if r["flagged"]}
    assert len(flagged) == 4
    settings = report_of(tmp_path / "m")["settings"]
    assert (settings["merge"], settings["density"], settings["seed"]) == (method, 0.5, 7 if method != "ties" else None)
    task, safety = load_adapter(fx.task), load_adapter(fx.safety)
    aligned, got = load_model(fx.aligned), load_model(tmp_path / "m")
    rep_a = {r["module"]: r for r in report_of(tmp_path / "a")["layers"]}
    out_ad = load_adapter(tmp_path / "a")
    for m in flagged:
        (A, B, s), (As, Bs, ss) = task[m], safety[m]
        dW = ref_sparse(method, (B.double() @ A.double()) * s, (Bs.double() @ As.double()) * ss, 0.8, 0.5, 7, m)
        assert_close(got[f"{m}.weight"], aligned[f"{m}.weight"].double() + dW, atol=1e-5, rtol=1e-5, what=m)
        # adapter: best rank-k approximation of dW, and its error as reported
        Ao, Bo, so = out_ad[m]
        assert so == 8 / 4 and Ao.shape[0] == A.shape[0] + As.shape[0]  # (the task adapter's lora_alpha / r)
        S = torch.linalg.svdvals(dW)
        k = Ao.shape[0]
        rel = float(S[k:].square().sum().sqrt() / S.square().sum().sqrt())
        assert abs(rep_a[m]["svd_rel_error"] - rel) < 1e-4
        err = float((so * Bo.double() @ Ao.double() - dW).norm() / dW.norm())
        assert abs(err - rel) < 1e-4
    # the loss is a warning of the report (and the printed summary), with the exact alternative
    worst = max(rep_a[m]["svd_rel_error"] for m in flagged)
    warned = [w for w in report_of(tmp_path / "a")["warnings"] if w.startswith(f"--method {method} as an adapter")]
    assert worst > 1e-3 and len(warned) == 1 and f"{worst:.2g}" in warned[0] and "--output model" in warned[0]
    assert not [w for w in report_of(tmp_path / "m")["warnings"] if "as an adapter" in w]
    if method.startswith("dare"):
        assert run_cli(merge_args(fx, tmp_path / "m2", *args, "--output", "model")) == 0
        again = load_model(tmp_path / "m2")
        assert all(torch.equal(again[k], got[k]) for k in got)
        assert run_cli(merge_args(fx, tmp_path / "m3", "--threshold", tau, "--method", method, "--density", 0.5,
                                  "--seed", 8, "--output", "model")) == 0
        other = load_model(tmp_path / "m3")
        assert any(not torch.equal(other[f"{m}.weight"], got[f"{m}.weight"]) for m in flagged)


def test_fraction_selection(fx, tmp_path):
    ref = refs(fx)
    out = tmp_path / "f"
    assert run_cli(merge_args(fx, out, "--fraction", 0.3)) == 0
    flagged = {r["module"] for r in report_of(out)["layers"] if r["flagged"]}
    assert flagged == set(sorted(ref, key=ref.get)[: math.ceil(0.3 * 21)])


@pytest.mark.parametrize("output", ["adapter", "model"])
def test_project_safe_lora(fx, tmp_path, output):
    ref = refs(fx)
    tau = threshold_between(list(ref.values()), 10)
    out = tmp_path / "p"
    assert run_cli(["project", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", fx.task,
                    "--out", out, "--threshold", tau, "--output", output]) == 0
    flagged = {r["module"] for r in report_of(out)["layers"] if r["flagged"]}
    assert flagged == {m for m, c in ref.items() if c <= tau} and len(flagged) == 10
    wa, wu = load_model(fx.aligned), load_model(fx.unaligned)
    task = load_adapter(fx.task)
    if output == "adapter":
        got = load_adapter(out)
        for m, (A, B, s) in task.items():
            Ao, Bo, so = got[m]  # (at the written adapter's one rank and scaling: A the same, zero-padded)
            r = A.shape[0]
            assert torch.equal(Ao[:r], A) and not Ao[r:].any() and not Bo[:, r:].any()
            want = ref_project(wa[f"{m}.weight"], wu[f"{m}.weight"], B) if m in flagged else B.double()
            if m in flagged or so != s:
                assert_close(so * Bo[:, :r], s * want, atol=1e-6, rtol=1e-5, what=m)
            else:
                assert torch.equal(Bo[:, :r], B)
    else:
        got = load_model(out)
        for m, (A, B, s) in task.items():
            Bp = ref_project(wa[f"{m}.weight"], wu[f"{m}.weight"], B) if m in flagged else B.double()
            assert_close(got[f"{m}.weight"], wa[f"{m}.weight"].double() + s * Bp @ A.double(), atol=2e-6, rtol=1e-5, what=m)


def test_project_model_output_rounds_once(fx_bf16, tmp_path):
    """A bf16 model and adapter, projected into the model: each flagged weight is W + s C B A
    rounded once to bf16 (C B is not rounded to lora_B's bf16 on the way)."""
    import shutil

    from safetensors.torch import save_file

    adapter = Path(shutil.copytree(fx_bf16.task, tmp_path / "task-bf16"))
    factors = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v.bfloat16() for k, v in factors.items()}, str(adapter / "adapter_model.safetensors"))
    out = tmp_path / "p"
    assert run_cli(["project", "--aligned", fx_bf16.aligned, "--unaligned", fx_bf16.unaligned, "--adapter",
                    adapter, "--out", out, "--num-layers", 6, "--output", "model"]) == 0
    flagged = [r["module"] for r in report_of(out)["layers"] if r["flagged"]]
    wa, wu, got = load_model(fx_bf16.aligned), load_model(fx_bf16.unaligned), load_model(out)
    task = load_adapter(adapter)
    assert len(flagged) == 6 and wa[f"{flagged[0]}.weight"].dtype == torch.bfloat16
    for m in flagged:
        A, B, s = task[m]
        exact = wa[f"{m}.weight"].double() + s * ref_project(wa[f"{m}.weight"], wu[f"{m}.weight"], B) @ A.double()
        w = got[f"{m}.weight"]
        ulp = (exact.abs().float().clamp_min(1e-30).log2().floor().exp2() * 2.0 ** -7).double()  # bf16 spacing
        assert float(((w.double() - exact).abs() / ulp).max()) <= 1.0, m


def test_factors_of_modules_the_config_does_not_target_are_merged_and_said(fx, tmp_path):
    """PEFT loads the modules that an adapter's target_modules names: where the config names fewer
    than the factors hold (edited by hand: q_proj only), every module is scored and merged as its
    factors say (the same as with the full config), and the report says which modules PEFT would
    leave out of the written adapter; a config that names them all (or by regex) warns nothing."""
    import shutil

    task = Path(shutil.copytree(fx.task, tmp_path / "task"))
    cfg = json.loads((task / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj"]
    (task / "adapter_config.json").write_text(json.dumps(cfg))
    runs = {}
    for name, adapter in (("edited", task), ("as-trained", fx.task)):
        out = tmp_path / name
        assert run_cli(["merge", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--task-adapter", adapter,
                        "--safety-adapter", fx.safety, "--out", out, "--num-layers", 3, "--no-plot"]) == 0
        runs[name] = (load_file(out / "adapter_model.safetensors"), report_of(out))
    (got, rep), (want, rep0) = runs["edited"], runs["as-trained"]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    n = len(load_adapter(fx.task))
    n_q = sum(m.endswith(".q_proj") for m in load_adapter(fx.task))
    said = [w for w in rep["warnings"] if "target_modules" in w]
    assert len(said) == 1 and (f"its config (target_modules ['q_proj']) leaves out {n - n_q} of the {n} modules whose "
                               "factors it holds (first: model.layers.0.self_attn.k_proj)") in said[0], said
    assert not [w for w in rep0["warnings"] if "target_modules" in w]
    cfg["target_modules"] = r".*\.(q|k|v|o|gate|up|down)_proj"
    (task / "adapter_config.json").write_text(json.dumps(cfg))
    assert run_cli(["score", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", task,
                    "--report", tmp_path / "r.json"]) == 0
    assert not [w for w in json.loads((tmp_path / "r.json").read_text())["warnings"] if "target_modules" in w]
    # layers_to_transform (with a listed target_modules) keeps only those layers' modules in PEFT
    cfg["target_modules"], cfg["layers_to_transform"] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                         "down_proj"], [1]
    (task / "adapter_config.json").write_text(json.dumps(cfg))
    assert run_cli(["score", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", task,
                    "--report", tmp_path / "r.json"]) == 0
    n_1 = sum(".layers.1." in m for m in load_adapter(fx.task))
    said = [w for w in json.loads((tmp_path / "r.json").read_text())["warnings"] if "leaves out" in w]
    assert len(said) == 1 and (f"its config (layers_to_transform [1]) leaves out {n - n_1} of the {n} modules whose "
                               "factors it holds (first: model.layers.0.self_attn.q_proj)") in said[0], said


def test_project_float8_adapter(fx, tmp_path, capsys):
    """An adapter saved in float8 (as score and merge take it) is projected too: C B comes back in
    float8, within float8's rounding of the float64 projection."""
    import shutil

    from safetensors.torch import save_file

    adapter = Path(shutil.copytree(fx.task, tmp_path / "task-f8"))
    factors = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in factors.items()}, str(adapter / "adapter_model.safetensors"))
    out = tmp_path / "p"
    assert run_cli(["project", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", adapter,
                    "--out", out, "--num-layers", 3, "--no-plot"]) == 0
    flagged = [r["module"] for r in report_of(out)["layers"] if r["flagged"]]
    wa, wu = load_model(fx.aligned), load_model(fx.unaligned)
    stored = load_file(out / "adapter_model.safetensors")
    task = load_adapter(adapter)
    # (the modules fx's patterns give another rank or scaling, v_proj and o_proj, are padded or rescaled to
    # the adapter's one rank and scaling, in fp32, which float8 cannot be padded or multiplied in)
    assert len(flagged) == 3 and all(v.dtype == (torch.float32 if k.split(".lora_")[0].endswith(("v_proj", "o_proj"))
                                                 else torch.float8_e4m3fn) for k, v in stored.items())
    for m in flagged:
        _, B, _ = task[m]
        Bo = load_adapter(out)[m][1]
        want = ref_project(wa[f"{m}.weight"], wu[f"{m}.weight"], B)
        assert_close(Bo, want, atol=2.0 ** -9, rtol=2.0 ** -4, what=m)  # (e4m3: 3 mantissa bits)
    # V 10^4 times larger: C B past float8_e4m3fn's 448, which a cast would saturate to without a
    # word: those modules' lora_B are written in float32 (as merge writes its merged factors), said once
    big = Path(shutil.copytree(fx.aligned, tmp_path / "aligned-far"))
    for shard in big.glob("*.safetensors"):
        t = load_file(shard)
        unal = {k: v for f in Path(fx.unaligned).glob("*.safetensors") for k, v in load_file(f).items() if k in t}
        save_file({k: unal[k] + 1e4 * (v - unal[k]) if k.endswith("proj.weight") else v for k, v in t.items()},
                  str(shard), metadata={"format": "pt"})
    capsys.readouterr()
    assert run_cli(["project", "--aligned", big, "--unaligned", fx.unaligned, "--adapter", adapter,
                    "--out", tmp_path / "p2", "--num-layers", 3, "--no-plot"]) == 0
    out = capsys.readouterr().out  # (the summary's warning lines)
    wb = load_model(big)
    flagged = [r["module"] for r in report_of(tmp_path / "p2")["layers"] if r["flagged"]]
    stored = load_file(tmp_path / "p2" / "adapter_model.safetensors")
    wide = []
    for m in task:
        Bo = stored[f"base_model.model.{m}.lora_B.weight"]
        if m.endswith(("v_proj", "o_proj")):  # (padded or rescaled, as above)
            assert Bo.dtype == torch.float32
            continue
        if m not in flagged:
            assert Bo.dtype == torch.float8_e4m3fn and torch.equal(Bo.view(torch.uint8), task[m][1].view(torch.uint8))
            continue
        want = ref_project(wb[f"{m}.weight"], wu[f"{m}.weight"], task[m][1])
        if float(want.abs().max()) > 448:
            wide.append(m)
            assert Bo.dtype == torch.float32
            assert_close(Bo, want, atol=1e-5 * float(want.abs().max()), rtol=1e-5, what=m)
        else:
            assert Bo.dtype == torch.float8_e4m3fn
            assert_close(Bo, want, atol=2.0 ** -9, rtol=2.0 ** -4, what=m)
    assert wide, "no projection past 448: the case is not tested"
    assert re.search(rf"warning: lora_B of {len(wide)} projected module\(s\) written in float32, not the adapter's "
                     rf"torch.float8_e4m3fn: C @ lora_B of {re.escape(wide[0])} (\(the first\) )?reaches [\d.e+]+, "
                     r"beyond what torch.float8_e4m3fn holds \(448\)", out), out
    assert any("written in float32" in w for w in report_of(tmp_path / "p2")["warnings"])


def test_project_fp16_adapter_keeps_projections_below_fp16s_normal_range(fx, tmp_path, capsys):
    """C B of an fp16 adapter whose B is small (1e-3 and less, as trained LoRA B often is) can lie
    below fp16's smallest normal, 6.1e-5, where a cast keeps a few bits (a 1% error, entries turned
    to 0): such modules' lora_B are written in float32, with a warning, and PEFT loads them as
    written; the other modules stay fp16, bit for bit."""
    import shutil

    from safetensors.torch import save_file

    wa, wu = load_model(fx.aligned), load_model(fx.unaligned)
    task = load_adapter(fx.task)
    top = max(float(ref_project(wa[f"{m}.weight"], wu[f"{m}.weight"], B).abs().max()) for m, (_, B, _) in task.items())
    adapter = Path(shutil.copytree(fx.task, tmp_path / "task-f16"))
    factors = load_file(adapter / "adapter_model.safetensors")
    k = 2e-5 / top  # (every C B below 2e-5; cosines do not depend on the scale)
    save_file({n: (v * k if ".lora_B." in n else v).half() for n, v in factors.items()},
              str(adapter / "adapter_model.safetensors"))
    task = load_adapter(adapter)
    out = tmp_path / "p"
    assert run_cli(["project", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", adapter,
                    "--out", out, "--num-layers", 3, "--no-plot"]) == 0
    err = capsys.readouterr().out  # (the summary's warning lines)
    assert re.search(r"warning: lora_B of 3 projected module\(s\) written in float32, not the adapter's torch.float16: C @ "
                     r"lora_B of \S+ \(the first\) lies below torch.float16's normal range \(6.1e-05\), where a cast "
                     r"errs by [\d.]+%", err), err
    flagged = [r["module"] for r in report_of(out)["layers"] if r["flagged"]]
    stored = load_file(out / "adapter_model.safetensors")
    default = load_adapter(out)[flagged[0]][2]  # (every module's scaling in the written adapter)
    for m, (A, B, s) in task.items():
        r = A.shape[0]
        Bo = stored[f"base_model.model.{m}.lora_B.weight"][:, :r]
        assert torch.equal(stored[f"base_model.model.{m}.lora_A.weight"][:r], A)
        if m in flagged:
            want = ref_project(wa[f"{m}.weight"], wu[f"{m}.weight"], B) * (s / default)
            assert Bo.dtype == torch.float32
            assert_close(Bo, want, atol=1e-6 * float(want.abs().max()), rtol=1e-5, what=m)
            lost = float((want.half().double() - want).norm() / want.norm())
            assert lost > torch.finfo(torch.float16).eps, (m, lost)  # (what fp16 would have kept)
        elif s == default:
            assert Bo.dtype == torch.float16 and torch.equal(Bo, B)
        else:  # (rescaled to the one scaling, in fp32: the patterned v_proj and o_proj)
            assert Bo.dtype == torch.float32 and m.endswith(("v_proj", "o_proj"))
            assert_close(Bo * default, B.double() * s, atol=0.0, rtol=1e-7, what=m)
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(fx.aligned, dtype=torch.float32), out)
    params = dict(model.named_parameters())
    for m in flagged:
        assert torch.equal(params[f"base_model.model.{m}.lora_B.default.weight"], stored[f"base_model.model.{m}.lora_B.weight"])


def test_project_num_layers(fx, tmp_path):
    ref = refs(fx)
    out = tmp_path / "p"
    assert run_cli(["project", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", fx.task,
                    "--out", out, "--num-layers", 3]) == 0
    assert {r["module"] for r in report_of(out)["layers"] if r["flagged"]} == set(sorted(ref, key=ref.get)[:3])


def test_report_schema(fx, tmp_path):
    out = tmp_path / "o"
    assert run_cli(merge_args(fx, out, "--threshold", 0.3)) == 0
    rep = report_of(out)
    for key in ("settings", "backend", "timings", "counts", "cosine", "bytes_read", "layers", "warnings"):
        assert key in rep
    assert rep["settings"]["threshold"] == 0.3 and rep["settings"]["alpha"] == 0.8 and rep["settings"]["merge"] == "linear"
    assert rep["settings"]["density"] is None and rep["settings"]["seed"] is None  # (linear uses neither)
    layer = rep["layers"][0]
    assert {"module", "cosine", "flagged", "reason", "action", "shape", "rank"} <= set(layer)
    assert rep["timings"]["total_s"] > 0
    assert (out / "safemerge_report.png").stat().st_size > 1000
    # only the target weights of the two models (and the adapters) were read
    wa = load_model(fx.aligned)
    target_bytes = sum(wa[f"{r['module']}.weight"].numel() * 4 for r in rep["layers"]) * 2
    adapter_bytes = sum(t.numel() * t.element_size() for d in (fx.task, fx.safety)
                        for t in load_file(d / "adapter_model.safetensors").values())
    assert rep["bytes_read"] == target_bytes + adapter_bytes
    # --no-plot: the same adapter and JSON report, no PNG
    quiet = tmp_path / "quiet"
    assert run_cli(merge_args(fx, quiet, "--threshold", 0.3, "--no-plot")) == 0
    assert not (quiet / "safemerge_report.png").exists()
    assert [r["cosine"] for r in report_of(quiet)["layers"]] == [r["cosine"] for r in rep["layers"]]
    assert load_file(quiet / "adapter_model.safetensors").keys() == load_file(out / "adapter_model.safetensors").keys()
    for k, v in load_file(out / "adapter_model.safetensors").items():
        assert torch.equal(v, load_file(quiet / "adapter_model.safetensors")[k]), k


def test_report_plot_lines(tmp_path):
    """The plot draws one line per module kind over the layer number; names without a number put
    every module on one line in model order. Both render, degenerate layers included."""
    from safemerge_ext.report import plot, plot_series

    names = [f"model.layers.{i}.self_attn.{k}" for i in range(3) for k in ("q_proj", "v_proj")]
    layers = [{"module": n, "cosine": None if i == 3 else 0.1 * i, "flagged": i == 2} for i, n in enumerate(names)]
    xs, by_layer, kinds = plot_series(layers)
    assert by_layer and xs == [0, 0, 1, 1, 2, 2] and kinds == {"q_proj": [0, 2, 4], "v_proj": [1, 3, 5]}
    xs, by_layer, kinds = plot_series(layers + [{"module": "lm_head", "cosine": 0.5, "flagged": False}])
    assert not by_layer and xs == list(range(7)) and kinds == {"cosine": list(range(7))}
    for i, rows in enumerate((layers, layers + [{"module": "lm_head", "cosine": 0.5, "flagged": False}])):
        report = {"layers": rows, "settings": {"threshold": 0.25, "selection": "threshold"}, "method": "safemerge",
                  "counts": {"flagged": 1, "layers": len(rows)}}
        plot(report, tmp_path / f"{i}.png")
        assert (tmp_path / f"{i}.png").read_bytes()[:4] == b"\x89PNG"


def test_report_plot_keeps_red_for_the_flags_and_ticks_whole_layers(tmp_path, monkeypatch):
    """No module line shares the flags' and the threshold's red (Llama's fourth kind, o_proj, drew
    in it); modules of one layer alone get one tick at that layer, not fractions around it."""
    import matplotlib.colors as mc
    from matplotlib.figure import Figure

    from safemerge_ext.report import plot

    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k)))
    kinds = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "a", "b", "c", "d")
    for layers in (range(2), [5]):
        rows = [{"module": f"model.layers.{i}.m.{k}", "cosine": 0.1 * j, "flagged": j == 0}
                for i in layers for j, k in enumerate(kinds)]
        plot({"layers": rows, "settings": {"threshold": 0.25, "selection": "threshold"}, "method": "safemerge",
              "counts": {"flagged": 1, "layers": len(rows)}}, tmp_path / "p.png")
        ax = figures[-1].axes[0]
        red = mc.to_hex("tab:red")
        assert mc.to_hex(ax.collections[0].get_facecolor()[0]) == red
        lines = {ln.get_label(): mc.to_hex(ln.get_color()) for ln in ax.get_lines()}
        assert lines.pop("threshold 0.25") == red and len(lines) == len(kinds) and red not in lines.values(), lines
        figures[-1].canvas.draw()
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        assert ticks == ["5"] if layers == [5] else all(t.lstrip("−-").isdigit() for t in ticks), ticks


def _bin_dir() -> Path:
    return Path(sys.executable).parent


@pytest.mark.skipif(not (_bin_dir() / "safemerge").exists(), reason="the safemerge console script is not installed")
def test_console_script(fx, tmp_path):
    """The real `safemerge` entry point, in a subprocess."""
    out = tmp_path / "cli"
    proc = subprocess.run([str(_bin_dir() / "safemerge"), *map(str, merge_args(fx, out, "--threshold", 0.25))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "layers scored" in proc.stdout and "flagged" in proc.stdout
    assert (out / "adapter_model.safetensors").is_file()


def test_help_imports_no_torch():
    code = ("import sys\nfrom safemerge_ext.cli import build_parser\n"
            "for c in ['score','merge','project']:\n"
            "    try: build_parser().parse_args([c, '--help'])\n"
            "    except SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\nprint('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr
    helped = subprocess.run([sys.executable, "-m", "safemerge_ext", "merge", "--help"], capture_output=True, text=True)
    for flag in ("--threshold", "--num-layers", "--fraction", "--alpha", "--method", "--density", "--seed",
                 "--output", "--backend", "--device", "--force"):
        assert flag in helped.stdout


def test_import_is_light():
    proc = subprocess.run([sys.executable, "-c", "import sys, safemerge_ext; "
                           "print(sorted(m for m in ('torch','triton','transformers','mergekit') if m in sys.modules))"],
                          capture_output=True, text=True)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_num_layers_beyond_scorable_warns(fx, tmp_path):
    out = tmp_path / "k"
    assert run_cli(["project", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", fx.task,
                    "--out", out, "--num-layers", 99]) == 0
    rep = report_of(out)
    assert rep["counts"]["flagged"] == 21
    assert any("--num-layers 99 exceeds the 21" in w for w in rep["warnings"])


@pytest.mark.parametrize("command, tau, warned", [("merge", 0.0, True), ("merge", -0.5, True), ("merge", 0.01, False),
                                                 ("project", 0.0, False), ("project", -0.01, True),
                                                 ("score", 0.0, True)])
def test_a_threshold_the_score_never_falls_below_warns(fx, tmp_path, command, tau, warned):
    """cos(C dW, dW) >= 0 (C is positive semi-definite): merge flags < tau, project <= tau, so a
    threshold below (or, for <, at) 0 flags nothing; the run goes on (a recipe may mean it), and
    the report says why nothing was flagged."""
    out = tmp_path / "o"
    args = {"merge": merge_args(fx, out, "--no-plot"),
            "project": ["project", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", fx.task,
                        "--out", out, "--no-plot"],
            "score": ["score", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", fx.task,
                      "--report", tmp_path / "s.json"]}[command]
    assert run_cli([*args, "--threshold", tau]) == 0
    rep = json.loads((tmp_path / "s.json").read_text()) if command == "score" else report_of(out)
    said = [w for w in rep["warnings"] if "flags no layer" in w]
    assert said == ([f"threshold {tau:g} flags no layer: the score, cos(C dW, dW), is never negative (flagged when "
                     f"it is {'<=' if command == 'project' else '<'} the threshold); give a threshold in (0, 1] to "
                     "flag layers"] if warned else []), rep["warnings"]
    cosines = [r["cosine"] for r in rep["layers"] if r["cosine"] is not None]
    assert cosines and min(cosines) >= 0  # (what makes the warning true)
    if warned:
        assert rep["counts"]["flagged"] == 0


def test_every_report_records_the_backend_asked_for_and_the_one_that_ran(fx, tmp_path):
    common = ["--aligned", fx.aligned, "--unaligned", fx.unaligned]
    runs = {"score": (["score", *common, "--adapter", fx.task, "--report", tmp_path / "s.json"], tmp_path / "s.json"),
            "merge": (merge_args(fx, tmp_path / "m", "--no-plot"), tmp_path / "m" / "safemerge_report.json"),
            "project": (["project", *common, "--adapter", fx.task, "--out", tmp_path / "p", "--no-plot"],
                        tmp_path / "p" / "safemerge_report.json")}
    for command, (args, report) in runs.items():
        for asked in ("torch", "auto"):
            assert run_cli(args + ["--backend", asked] + (["--force"] if command != "score" else [])) == 0, command
            rep = json.loads(report.read_text())
            assert rep["settings"]["backend_requested"] == asked, command
            assert rep["backend"] == ("torch" if asked == "torch" else backends.resolve("auto", "cpu")[0]), command


def test_precision_flag_and_env(fx, tmp_path, monkeypatch, capsys):
    """--precision is recorded; a backend that computes in exact fp32 says so in a warning; a bad
    value in the environment stops the run before anything is read or written."""
    monkeypatch.delenv("SAFEMERGE_PRECISION", raising=False)
    plain, fast = tmp_path / "plain", tmp_path / "fast"
    assert run_cli(merge_args(fx, plain, "--no-plot")) == 0
    assert run_cli(merge_args(fx, fast, "--no-plot", "--precision", "bf16")) == 0
    a, b = report_of(plain), report_of(fast)
    assert a["precision"] == b["precision"] == "ieee" and b["backend"] == a["backend"] != "triton"
    assert b["settings"]["precision_requested"] == "bf16" and a["settings"]["precision_requested"] == "ieee"
    assert not any("precision" in w for w in a["warnings"])
    assert [w for w in b["warnings"] if "precision" in w] == [
        f"precision bf16 applies to the triton backend on a GPU only; the {b['backend']} backend computes in exact fp32 (ieee)"]
    assert [r["cosine"] for r in a["layers"]] == [r["cosine"] for r in b["layers"]]
    monkeypatch.setenv("SAFEMERGE_PRECISION", "tf32")  # the environment's request is recorded as the flag's
    assert run_cli(merge_args(fx, tmp_path / "env", "--no-plot")) == 0
    env = report_of(tmp_path / "env")
    assert env["settings"]["precision_requested"] == "tf32" and env["precision"] == "ieee"
    assert any(w.startswith("precision tf32 applies to the triton backend on a GPU only") for w in env["warnings"])
    monkeypatch.setenv("SAFEMERGE_PRECISION", "fp8")
    capsys.readouterr()
    assert run_cli(merge_args(fx, tmp_path / "bad")) == 2
    err = capsys.readouterr().err.strip()
    assert err == "safemerge: error: SAFEMERGE_PRECISION must be one of ieee, tf32, tf32x3, bf16; got 'fp8'", err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        main([str(a) for a in merge_args(fx, tmp_path / "bad", "--precision", "fp8")])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
    if "triton" in BACKENDS:  # the interpreter: its dot products ignore the precision, and the report says so
        monkeypatch.delenv("SAFEMERGE_PRECISION")
        rep_path = tmp_path / "t.json"
        assert run_cli(["score", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", fx.task,
                        "--report", rep_path, "--backend", "triton", "--precision", "tf32x3"]) == 0
        rep = json.loads(rep_path.read_text())
        assert rep["backend"] == "triton" and rep["precision"] == "ieee"
        assert rep["warnings"] == ["precision tf32x3 applies to the triton backend on a GPU only; the triton backend "
                                   "(interpreted on the CPU) computes in exact fp32 (ieee)"]
        want = refs(fx)
        assert all(abs(r["cosine"] - want[r["module"]]) < 2e-6 for r in rep["layers"])
        capsys.readouterr()
        assert run_cli(["score", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", fx.task,
                        "--backend", "triton", "--precision", "bf16"]) == 2
        assert "--precision bf16 needs a GPU" in capsys.readouterr().err


def test_prefetch_holds_at_most_its_budget():
    """The read-ahead never holds more than its byte budget (at least one item), keeps order, and
    stops reading when the consumer leaves early."""
    import threading
    import time

    from safemerge_ext.io.read_ahead import prefetch

    sizes = [5, 1, 1, 7, 2, 2, 2, 9, 1, 3]
    held, peak, loaded = 0, 0, []
    lock = threading.Lock()

    def load(i):
        nonlocal held, peak
        with lock:
            held += sizes[i]
            peak = max(peak, held)
            loaded.append(i)
        return i * 10

    seen = []
    for i, v in prefetch(range(len(sizes)), load, size=lambda i: sizes[i], budget=6, depth=len(sizes)):
        time.sleep(0.005)  # a slow consumer: the reader runs as far ahead as allowed
        assert v == i * 10
        seen.append(i)
        with lock:
            held -= sizes[i]
    assert seen == list(range(len(sizes)))
    # at most 6 ahead, or one item alone when it is bigger; plus the one being consumed
    assert peak <= max(6, max(sizes)) + max(sizes), peak

    # and at most `depth` items ahead, whatever their size, plus the one being consumed (counted: a
    # bound in bytes let depth 3 pass for depth 2)
    def count(i):
        nonlocal held, peak
        with lock:
            held += 1
            peak = max(peak, held)

    for depth in (1, 2, 3):
        held = peak = 0
        for i, _ in prefetch(range(len(sizes)), count, size=lambda i: 0, depth=depth):
            time.sleep(0.005)
            with lock:
                held -= 1
        assert 2 <= peak <= depth + 1, (depth, peak)

    started = []
    gen = prefetch(range(100), lambda i: started.append(i), depth=2)
    next(gen)
    time.sleep(0.05)
    gen.close()
    assert len(started) <= 4, started
    with pytest.raises(ValueError, match="depth must be at least 1"):
        next(prefetch(range(3), load, depth=0))


def test_prefetch_left_early_without_close_stops_its_thread():
    """A consumer that leaves the loop early (break, an exception) and drops the iterator: its thread stops
    and what it loaded ahead is let go (the thread held the iterator, so nothing was ever collected)."""
    import gc
    import threading
    import time
    import weakref

    from safemerge_ext.io.read_ahead import prefetch

    class Item:
        pass

    loaded = []

    def load(i):
        item = Item()
        loaded.append(weakref.ref(item))
        return item

    for _, item in prefetch(range(100), load, depth=2):
        break
    del item
    deadline = time.time() + 5
    while time.time() < deadline and (any(t.name == "safemerge-prefetch" for t in threading.enumerate())
                                      or any(r() is not None for r in loaded)):
        gc.collect()
        time.sleep(0.02)
    assert not any(t.name == "safemerge-prefetch" for t in threading.enumerate())
    assert 2 <= len(loaded) <= 4 and all(r() is None for r in loaded), len(loaded)


def test_an_interrupted_run_does_not_wait_for_a_stalled_read(fx, monkeypatch):
    """A Ctrl-C (or SIGTERM) while the read-ahead thread is stuck in a read (a stalled network mount)
    ended the run only when that read returned: the read-ahead is let go, not waited for; any other
    way out of the loop still waits for it."""
    import signal
    import threading
    import time

    from safemerge_ext import pipeline
    from safemerge_ext.io.models import ModelReader
    from safemerge_ext.io.read_ahead import prefetch

    stalled, release = threading.Event(), threading.Event()
    real = ModelReader.will_need

    def will_need(self, name):
        if "layers.1." in name:
            stalled.set()
            release.wait(30)
        return real(self, name)

    def ctrl_c():  # (the main thread then waits for the stalled read: a Ctrl-C arrives)
        if stalled.wait(20):
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(ModelReader, "resident", lambda self, name: False)  # (the read-ahead path)
    monkeypatch.setattr(ModelReader, "will_need", will_need)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=ctrl_c, daemon=True).start()
    try:
        t0 = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            pipeline.score(fx.aligned, fx.unaligned, fx.task, backend="torch", progress=False)
        assert stalled.is_set() and time.perf_counter() - t0 < 5
    finally:
        release.set()
        signal.signal(signal.SIGINT, previous)

    # prefetch itself: abandon() returns at once, close() waits for the load in progress
    gate = threading.Event()
    for stop in ("abandon", "close"):
        gate.clear()
        it = prefetch(range(3), lambda i: gate.wait(30) if i == 1 else i, depth=1)
        assert next(it) == (0, 0)
        time.sleep(0.05)
        t0 = time.perf_counter()
        if stop == "close":
            threading.Timer(0.5, gate.set).start()
        getattr(it, stop)()
        took = time.perf_counter() - t0
        assert (took < 0.3) if stop == "abandon" else (0.4 < took < 10), (stop, took)
        gate.set()


def test_in_batches_loads_a_batch_ahead_in_the_callers_thread_and_lets_go():
    import gc
    import threading
    import weakref

    from safemerge_ext.io.read_ahead import in_batches

    class Item:
        pass

    sizes = [3, 1, 2, 5, 1, 1, 7]
    loaded, alive = [], []

    def load(i):
        assert threading.current_thread() is threading.main_thread()
        loaded.append(i)
        item = Item()
        alive.append(weakref.ref(item))
        return item

    batches = []
    for i, item in in_batches(range(len(sizes)), load, size=lambda i: sizes[i], budget=6):
        batches.append(list(loaded))
        del item
        gc.collect()
        # the generator keeps none it has handed out; only the rest of its batch
        assert sum(r() is not None for r in alive) == len(loaded) - (i + 1), (i, loaded)
    # batches of at most 6 units (3+1+2, then 5+1, then 1, then 7 alone: at least one item)
    assert batches == [[0, 1, 2]] * 3 + [[0, 1, 2, 3, 4]] * 2 + [[0, 1, 2, 3, 4, 5]] + [list(range(7))]
    # without a budget, everything at once; with no items, nothing
    loaded.clear()
    assert [i for i, _ in in_batches(range(4), load)] == [0, 1, 2, 3] and loaded == [0, 1, 2, 3]
    assert list(in_batches([], load)) == []
    # at most max_items a batch too (each mapping holds a file descriptor), whichever bound comes first
    loaded.clear()
    seen = [len(loaded) for _ in in_batches(range(7), load, size=lambda i: sizes[i], budget=6, max_items=2)]
    assert seen == [2, 2, 3, 5, 5, 6, 7]  # batches [0, 1], [2], [3, 4], [5], [6]
    loaded.clear()

    # a load that fails: the items loaded before it come first, then its error
    def failing(i):
        if i == 2:
            raise OSError("item 2 cannot be read")
        return load(i)

    got = []
    with pytest.raises(OSError, match="item 2"):
        for i, _ in in_batches(range(5), failing):
            got.append(i)
    assert got == [0, 1]


@pytest.mark.parametrize("cached", [True, False], ids=["all-cached", "one-not-cached"])
def test_a_failed_scoring_lets_go_of_what_was_read_ahead(fx, monkeypatch, cached):
    """When a layer fails, the pairs mapped or read ahead of it are let go at once and the read-ahead
    thread stops, even while the caller still holds the exception (and so the scorer's frame)."""
    import gc
    import threading

    from safemerge_ext import ops, pipeline
    from safemerge_ext.errors import SafeMergeError
    from safemerge_ext.io.adapters import read_adapter
    from safemerge_ext.io.models import ModelReader

    run = pipeline.open_run(fx.aligned, fx.unaligned, read_adapter(fx.task, "--task-adapter"))
    assert len(run.layers) >= 6
    monkeypatch.setattr(ModelReader, "resident", lambda self, name: cached)
    real, calls = ops.subspace_score, []

    def third_fails(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise FloatingPointError("the fp32 sums lost their precision")
        return real(*a, **k)

    monkeypatch.setattr(ops, "subspace_score", third_fails)
    threads = threading.active_count()
    with pytest.raises(SafeMergeError, match="lost its precision") as err:
        pipeline.score_layers(run, progress=False)
    gc.collect()
    # only the failing layer's own pair, which the traceback's frame holds
    assert len(run.aligned._maps) <= 1 and len(run.unaligned._maps) <= 1, (run.aligned._maps, run.unaligned._maps)
    assert threading.active_count() == threads
    del err
    gc.collect()
    assert not run.aligned._maps and not run.unaligned._maps


@pytest.mark.parametrize("cached", [True, False], ids=["all-cached", "one-not-cached"])
def test_scoring_reads_ahead_only_what_is_not_cached(fx, monkeypatch, cached):
    """With every weight pair in the page cache the scorer maps them in turn (no read-ahead
    thread); with one pair not cached it reads ahead. The scores are the same either way."""
    from safemerge_ext import pipeline
    from safemerge_ext.io.adapters import read_adapter
    from safemerge_ext.io.models import ModelReader

    run = pipeline.open_run(fx.aligned, fx.unaligned, read_adapter(fx.task, "--task-adapter"))
    last = run.layers[-1].weight
    monkeypatch.setattr(ModelReader, "resident", lambda self, name: cached or name != last)
    used = []
    real_prefetch, real_batches = pipeline.prefetch, pipeline.in_batches
    monkeypatch.setattr(pipeline, "prefetch", lambda *a, **k: used.append(("prefetch", k["depth"])) or real_prefetch(*a, **k))
    monkeypatch.setattr(pipeline, "in_batches", lambda *a, **k: used.append(("in_batches", k["budget"]))
                        or real_batches(*a, **k))
    scores = pipeline.score_layers(run, progress=False)
    assert used == [("in_batches", pipeline.MAP_BATCH_BYTES) if cached else ("prefetch", pipeline.READ_AHEAD_LAYERS)]
    ref = refs(fx)
    for layer, s in zip(run.layers, scores):
        assert abs(s.cosine - ref[layer.module]) <= 1e-5, layer.module


@pytest.mark.skipif(not _runs_on_cpu("cpp"), reason="needs the C++ extension")
def test_scoring_drops_mapped_pages_behind(fx, monkeypatch, tmp_path):
    """The scorer tells the C++ kernel that the weights it maps from the model files may drop
    their pages behind it (and only those); with row blocks small enough to split every layer,
    the scores keep their bits."""
    from safemerge_ext import cpp_backend, pipeline
    from safemerge_ext.io.adapters import read_adapter

    def scores(block_bytes: int) -> tuple[list[float], list[bool]]:
        monkeypatch.setattr(cpp_backend, "RELEASE_BLOCK_BYTES", block_bytes)
        flags = []
        real = cpp_backend.lowrank_passes

        def spy(wa, wu, B, **kw):
            flags.append(kw.get("release_behind", False))
            return real(wa, wu, B, **kw)

        monkeypatch.setattr(cpp_backend, "lowrank_passes", spy)
        run = pipeline.open_run(fx.aligned, fx.unaligned, read_adapter(fx.task, "--task-adapter"), backend="cpp")
        try:
            return [s.cosine for s in pipeline.score_layers(run, progress=False)], flags
        finally:
            monkeypatch.setattr(cpp_backend, "lowrank_passes", real)

    whole, flags = scores(1 << 30)
    split, split_flags = scores(1)  # blocks of one 32-row chunk
    assert flags and all(flags) and all(split_flags)
    assert split == whole
    # ops passes the flag on only for the caller's own mapped tensors, never for a copy that it made
    # (here: of a non-contiguous view of a mapping), and refuses it for memory that is no mapping
    # (dropping its pages would zero it); the spy does not forward it
    from safetensors.torch import save_file

    from safemerge_ext import ops
    from safemerge_ext.io.models import ModelReader

    save_file({"a": torch.randn(48, 64), "u": torch.randn(48, 64)}, str(tmp_path / "model.safetensors"))
    reader = ModelReader(tmp_path)
    ma, mu = reader.map("a"), reader.map("u")
    real, calls = cpp_backend.lowrank_passes, []
    monkeypatch.setattr(cpp_backend, "lowrank_passes", lambda a, u, B, **kw: calls.append(kw) or real(a, u, B))
    factors = {"lora_A": torch.randn(2, 48), "lora_B": torch.randn(64, 2)}
    ops.subspace_score(ma.t(), mu.t(), **factors, backend="cpp", file_backed=True)
    factors = {"lora_A": torch.randn(2, 64), "lora_B": torch.randn(48, 2)}
    ops.subspace_score(ma, mu, **factors, backend="cpp", file_backed=True)
    ops.subspace_score(ma, mu, **factors, backend="cpp")
    assert calls == [{}, {"release_behind": True}, {}]
    wa, wu = ma.clone(), mu.clone()
    with pytest.raises(ValueError, match="not views of live ModelReader.map mappings"):
        ops.subspace_score(wa, wu, **factors, backend="cpp", file_backed=True)
    assert torch.equal(wa, ma) and torch.equal(wu, mu) and len(calls) == 3


@pytest.mark.parametrize("progress", [True, False, None], ids=["progress", "no-progress", "auto"])
def test_progress_bar_only_when_asked_or_on_a_terminal(fx, capsys, progress):
    """--progress draws tqdm's bar on stderr; --no-progress, or the default on a stream that is
    not a terminal (pytest's capture), draws nothing and creates no bar at all."""
    import tqdm

    from safemerge_ext import pipeline
    from safemerge_ext.io.adapters import read_adapter

    run = pipeline.open_run(fx.aligned, fx.unaligned, read_adapter(fx.task, "--task-adapter"))
    before = len(tqdm.tqdm._instances)
    pipeline.score_layers(run, progress=progress)
    err = capsys.readouterr().err
    assert ("scoring" in err) == bool(progress), err
    assert len(tqdm.tqdm._instances) == before  # closed (or never made)


def test_prefetch_raises_reader_errors():
    from safemerge_ext.io.read_ahead import prefetch

    def load(i):
        if i == 2:
            raise OSError("disk gone")
        return i

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for i, _ in prefetch(range(5), load, depth=1):
            got.append(i)
    assert got == [0, 1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("command", ["merge", "project"])
def test_gpu_pipeline_matches_the_cpu(fx_bf16, tmp_path, command):
    """--device cuda (pinned staging, copies on a side stream, every GPU backend auto picks) gives
    the CPU run's scores, flags and written factors, to fp32 accumulation order."""
    ref = refs(fx_bf16)
    tau = threshold_between(list(ref.values()), 8)
    outs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        args = (merge_args(fx_bf16, out, "--threshold", tau) if command == "merge" else
                ["project", "--aligned", fx_bf16.aligned, "--unaligned", fx_bf16.unaligned, "--adapter",
                 fx_bf16.task, "--out", out, "--threshold", tau])
        assert run_cli([*args, "--device", device]) == 0
        outs[device] = (report_of(out), load_file(out / "adapter_model.safetensors"))
    (cpu_rep, cpu_sd), (gpu_rep, gpu_sd) = outs["cpu"], outs["cuda"]
    assert gpu_rep["backend"] in ("triton", "cuda") and gpu_rep["settings"]["device"].startswith("cuda")
    assert [r["module"] for r in gpu_rep["layers"]] == [r["module"] for r in cpu_rep["layers"]]
    for a, b in zip(cpu_rep["layers"], gpu_rep["layers"]):
        assert a["flagged"] == b["flagged"] and abs(a["cosine"] - b["cosine"]) <= 1e-5, a["module"]
    assert cpu_sd.keys() == gpu_sd.keys()
    for k, v in cpu_sd.items():
        assert gpu_sd[k].device.type == "cpu" and gpu_sd[k].dtype == v.dtype
        assert_close(gpu_sd[k].double(), v.double(), atol=1e-5 * float(v.abs().max()), rtol=1e-4, what=k)


def test_cuda_staging_orders_copies_before_kernels_on_fakes(fx_bf16, monkeypatch):
    """score_layers' --device cuda branch, run here with torch.cuda's streams, events and device
    guard replaced by fakes that log what is done: each pair is read into pinned memory and copied
    non-blocking on the side stream inside a guard of the run's device, by the read-ahead thread,
    which records an event after the copies; the scorer's stream waits on that event and records
    both tensors as used on it before their kernel runs; the projected factors come back on the
    CPU; torch's cache of pinned buffers is emptied at the end; the scores are the CPU run's."""
    import contextlib
    import threading

    from safemerge_ext import ops, pipeline
    from safemerge_ext.io.adapters import read_adapter
    from safemerge_ext.io.models import ModelReader

    log: list[tuple] = []
    local = threading.local()

    class FakeDevice:
        type, index = "cuda", 3

    class Stream:
        def __init__(self, device=None, name="side"):
            self.name = name

        def wait_event(self, event):
            log.append(("wait", self.name, event.id))

    class Event:
        count = 0

        def __init__(self):
            Event.count += 1
            self.id = Event.count

        def record(self, stream):
            log.append(("record", stream.name, self.id, threading.current_thread().name))

    current = Stream(name="current")

    @contextlib.contextmanager
    def entered(kind, value):
        previous = getattr(local, kind, None)
        setattr(local, kind, value)
        try:
            yield
        finally:
            setattr(local, kind, previous)

    class Staged(torch.Tensor):  # (a pinned host tensor, and its copy "on the device")
        def to(self, *args, **kwargs):
            if args and isinstance(args[0], FakeDevice):
                log.append(("copy", getattr(local, "stream", None), getattr(local, "device", None),
                            kwargs.get("non_blocking")))
                return self.detach().clone().as_subclass(Staged)
            return super().to(*args, **kwargs)

        def record_stream(self, stream):
            log.append(("record_stream", stream.name))

    plain_get = ModelReader.get

    def get(self, name, *, pin_memory=False):  # (the adapters' factors are read with it too, unpinned)
        if not pin_memory:
            return plain_get(self, name)
        log.append(("pinned-read",))
        return plain_get(self, name).as_subclass(Staged)

    class OnDevice(torch.Tensor):  # (a result the kernels left on the device)
        @property
        def device(self):
            return FakeDevice()

        def cpu(self):
            return self.as_subclass(torch.Tensor)

    def score(wa, wu, **kw):
        import dataclasses

        log.append(("kernel",))
        kw["lora_B"] = kw["lora_B"].as_subclass(torch.Tensor)
        s = plain_score(wa.as_subclass(torch.Tensor), wu.as_subclass(torch.Tensor), **kw)
        return dataclasses.replace(s, projected_B=s.projected_B.as_subclass(OnDevice))

    task = read_adapter(fx_bf16.task, "--task-adapter")
    want = pipeline.score_layers(pipeline.open_run(fx_bf16.aligned, fx_bf16.unaligned, task), progress=False,
                                 with_projection=True)
    plain_score = ops.subspace_score
    monkeypatch.setattr(ModelReader, "get", get)
    monkeypatch.setattr(ops, "subspace_score", score)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: entered("stream", stream.name))
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered("device", device.index))
    monkeypatch.setattr(torch.accelerator.memory, "empty_host_cache", lambda: log.append(("release-pinned",)))
    run = pipeline.open_run(fx_bf16.aligned, fx_bf16.unaligned, task)
    run.device = FakeDevice()
    got = pipeline.score_layers(run, progress=False, with_projection=True)

    assert [s.cosine for s in got] == [s.cosine for s in want]
    for g, w in zip(got, want):
        assert type(g.projected_B) is torch.Tensor and torch.equal(g.projected_B, w.projected_B)
    kinds = [e[0] for e in log]
    assert kinds[-1] == "release-pinned" and kinds.count("release-pinned") == 1  # (the staging buffers, once done)
    assert kinds.count("kernel") == len(want) and kinds.count("copy") == kinds.count("pinned-read") == 2 * len(want)
    assert all(e[1:] == ("side", 3, True) for e in log if e[0] == "copy"), [e for e in log if e[0] == "copy"]
    recorded = {e[2]: k for k, e in enumerate(log) if e[0] == "record"}
    assert all(e[1] == "side" and e[3] == "safemerge-prefetch" for e in log if e[0] == "record")
    for k, e in enumerate(log):
        if e[0] == "kernel":
            wait, *uses = log[k - 3:k]
            assert wait[:2] == ("wait", "current") and uses == [("record_stream", "current")] * 2, log[k - 4:k + 1]
            event = wait[2]
            copies = [j for j in range(recorded[event]) if log[j][0] == "copy"]
            assert len(copies) >= 2 and all(j < recorded[event] for j in copies)


def test_each_method_flags_by_its_own_comparison_through_the_api(fx, tmp_path):
    """A threshold equal to a layer's score: Safe LoRA (project) flags it, SafeMERGE (merge) does
    not, whatever the Selection passed says."""
    from safemerge_ext import pipeline

    ref = refs(fx)
    m = sorted(ref, key=ref.get)[3]
    tau = pipeline.score(fx.aligned, fx.unaligned, fx.task, progress=False)
    tau = next(r["cosine"] for r in tau["layers"] if r["module"] == m)  # (the run's own float: equal, not close)
    for inclusive in (False, True):
        sel = pipeline.Selection(threshold=tau, inclusive=inclusive)
        rep = pipeline.project(fx.aligned, fx.unaligned, fx.task, tmp_path / f"p{inclusive}", sel, plot=False,
                               progress=False)
        assert rep["settings"]["comparison"] == "<=" and {r["module"]: r["flagged"] for r in rep["layers"]}[m]
        rep = pipeline.merge(fx.aligned, fx.unaligned, fx.task, fx.safety, tmp_path / f"m{inclusive}",
                             pipeline.MergeSettings(sel), plot=False, progress=False)
        assert rep["settings"]["comparison"] == "<" and not {r["module"]: r["flagged"] for r in rep["layers"]}[m]


def test_numpy_settings_from_the_python_api_give_the_same_run(fx, tmp_path):
    """A threshold picked with NumPy (np.quantile of a score run), a count or a seed as NumPy scalars:
    the run is the one the equal Python numbers give, report written (review146: the report's JSON
    failed, TypeError on an int64, after every layer was scored and the output built)."""
    import numpy as np

    scores = [r["cosine"] for r in pipeline.score(fx.aligned, fx.unaligned, fx.task, progress=False)["layers"]]
    tau = np.quantile(scores, 0.3)
    rep = pipeline.score(fx.aligned, fx.unaligned, fx.task, threshold=tau, report_path=tmp_path / "s.json",
                         progress=False)
    assert json.loads((tmp_path / "s.json").read_text())["counts"] == rep["counts"]
    assert rep["counts"]["flagged"] == sum(s < float(tau) for s in scores) > 0
    for i, (given, plain) in enumerate((
            (pipeline.Selection(threshold=tau), pipeline.Selection(threshold=float(tau))),
            (pipeline.Selection(num_layers=np.int64(3)), pipeline.Selection(num_layers=3)))):
        kw = dict(method="dare_ties", density=0.5)
        runs = [pipeline.merge(fx.aligned, fx.unaligned, fx.task, fx.safety, tmp_path / f"{name}{i}",
                               pipeline.MergeSettings(sel, seed=seed, alpha=alpha, **kw), plot=False, progress=False)
                for name, sel, seed, alpha in (("np", given, np.int64(7), np.float32(0.75)), ("py", plain, 7, 0.75))]
        assert [r["flagged"] for r in runs[0]["layers"]] == [r["flagged"] for r in runs[1]["layers"]]
        assert sum(r["flagged"] for r in runs[0]["layers"]) > 0
        settings = [{k: v for k, v in report_of(tmp_path / f"{n}{i}")["settings"].items() if k != "out"} for n in ("np", "py")]
        assert settings[0] == settings[1] and settings[0]["seed"] == 7
        assert load_file(tmp_path / f"np{i}" / "adapter_model.safetensors").keys() == \
            load_file(tmp_path / f"py{i}" / "adapter_model.safetensors").keys()
        for k, v in load_file(tmp_path / f"np{i}" / "adapter_model.safetensors").items():
            assert torch.equal(v, load_file(tmp_path / f"py{i}" / "adapter_model.safetensors")[k]), k


def test_a_module_scaled_by_zero_is_degenerate(fx, tmp_path):
    """alpha_pattern 0 for a module: its update is zero, so it is never flagged, with the reason."""
    import shutil

    from safemerge_ext import pipeline

    task = tmp_path / "task"
    shutil.copytree(fx.task, task)
    cfg = json.loads((task / "adapter_config.json").read_text())
    m = "model.layers.0.self_attn.q_proj"
    cfg["alpha_pattern"] = {**(cfg.get("alpha_pattern") or {}), m: 0}
    (task / "adapter_config.json").write_text(json.dumps(cfg))
    rep = pipeline.project(fx.aligned, fx.unaligned, task, tmp_path / "p", pipeline.Selection(threshold=1.0),
                           plot=False, progress=False)
    row = {r["module"]: r for r in rep["layers"]}[m]
    assert row["cosine"] is None and not row["flagged"] and row["action"] == "skipped", row
    assert row["reason"] == "the update is zero (its scaling, lora_alpha, is 0)"
    assert all(r["flagged"] for r in rep["layers"] if r["module"] != m)


def test_no_scorable_layer_is_said_plainly(fx, tmp_path):
    """Copies of one model as --aligned and --unaligned: V is zero everywhere, every layer is
    degenerate, and the warning says nothing was flagged (not 'all of them were flagged')."""
    import shutil

    from safemerge_ext import pipeline

    twin = tmp_path / "twin"
    shutil.copytree(fx.aligned, twin)
    for sel in (pipeline.Selection(num_layers=3), pipeline.Selection(threshold=0.35)):
        rep = pipeline.merge(fx.aligned, twin, fx.task, fx.safety, tmp_path / f"m{sel.mode}", pipeline.MergeSettings(sel),
                             plot=False, progress=False)
        assert rep["counts"]["flagged"] == 0 and rep["counts"]["scored"] == 0
        assert [w for w in rep["warnings"] if "scorable" in w or "could be scored" in w] == [
            f"no layer could be scored (all {rep['counts']['layers']} are degenerate: see each one's reason); none was "
            "flagged, so the output keeps the adapter's updates unchanged"]


@pytest.fixture(scope="module")
def gemma3_vlm(tmp_path_factory):
    """A tiny Gemma 3 vision-language model saved by transformers (its text weights stored as
    language_model.model.layers..., the Hub's naming) and adapters PEFT trained on it (which name the
    modules model.language_model.layers..., as transformers does in memory)."""

    import transformers
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("gemma3")
    text = transformers.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=8, vocab_size=300, num_hidden_layers=2, max_position_embeddings=64,
                                         sliding_window=16)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                             num_hidden_layers=1, image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299,
                                    boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(cfg)
    model.save_pretrained(root / "aligned", max_shard_size="40KB")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(root / "unaligned", max_shard_size="40KB")
    for name, seed, r in (("task", 1, 4), ("safety", 2, 2)):
        torch.manual_seed(seed)
        base = transformers.Gemma3ForConditionalGeneration.from_pretrained(root / "aligned", dtype=torch.float32)
        get_peft_model(base, LoraConfig(r=r, lora_alpha=8, init_lora_weights=False,
                                        target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)")).save_pretrained(root / name)
    return types.SimpleNamespace(**{k: root / k for k in ("aligned", "unaligned", "task", "safety")})


def _stored(name: str) -> str:
    """The checkpoint's name of a module's weight (the test's own mapping, written out)."""
    return "language_model.model." + name.removeprefix("model.language_model.") + ".weight"


def test_vision_language_checkpoints_match_adapters_named_in_memory(gemma3_vlm, tmp_path):
    fx = gemma3_vlm
    wa, wu = load_model(fx.aligned), load_model(fx.unaligned)
    task = load_adapter(fx.task)
    assert all(m.startswith("model.language_model.") and _stored(m) in wa for m in task)
    ref = {m: ref_cosine(wa[_stored(m)], wu[_stored(m)], B.double() @ A.double() * s) for m, (A, B, s) in task.items()}
    tau = threshold_between(list(ref.values()), 3)
    rep_path = tmp_path / "r.json"
    assert run_cli(["score", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", fx.task,
                    "--report", rep_path]) == 0
    got = {r["module"]: r["cosine"] for r in json.loads(rep_path.read_text())["layers"]}
    assert set(got) == set(ref) and all(abs(got[m] - ref[m]) < 2e-6 for m in ref), (got, ref)
    out = tmp_path / "m"
    assert run_cli(merge_args(fx, out, "--threshold", tau, "--output", "model")) == 0
    flagged = {r["module"] for r in report_of(out)["layers"] if r["flagged"]}
    assert flagged == {m for m, c in ref.items() if c < tau} and len(flagged) == 3
    merged = load_model(out)
    assert set(merged) == set(wa)  # the checkpoint's own names, every tensor
    for m, d in expected_update(fx, flagged, 0.8).items():
        assert_close(merged[_stored(m)], wa[_stored(m)].double() + d, atol=2e-6, rtol=1e-5, what=m)
    assert all(torch.equal(merged[n], t) for n, t in wa.items() if not any(n == _stored(m) for m in task))
    adapter = tmp_path / "a"
    assert run_cli(merge_args(fx, adapter, "--threshold", tau)) == 0
    from peft import PeftModel
    from transformers import Gemma3ForConditionalGeneration

    base = Gemma3ForConditionalGeneration.from_pretrained(fx.aligned, dtype=torch.float32)
    folded = PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()
    for m, d in expected_update(fx, flagged, 0.8).items():  # (PEFT loads it onto the checkpoint it was scored on)
        assert_close(folded[f"{m}.weight"], wa[_stored(m)].double() + d, atol=2e-6, rtol=1e-5, what=m)
    projected = tmp_path / "p"
    assert run_cli(["project", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", fx.task,
                    "--out", projected, "--num-layers", 2]) == 0
    low2 = sorted(ref, key=ref.get)[:2]
    for m, (A, B, s) in load_adapter(projected).items():
        want = ref_project(wa[_stored(m)], wu[_stored(m)], task[m][1]) if m in low2 else task[m][1].double()
        assert_close(B, want, atol=1e-6, rtol=1e-5, what=m)


def in_older_vlm_naming(adapter: Path, dest: Path) -> Path:
    """A copy of a Gemma 3 adapter as PEFT saved it before transformers 4.52: text modules named
    language_model.model.layers... instead of model.language_model.layers..."""
    import shutil

    from safetensors.torch import save_file

    old = Path(shutil.copytree(adapter, dest))
    factors = load_file(old / "adapter_model.safetensors")
    save_file({k.replace("base_model.model.model.language_model.", "base_model.model.language_model.model."): v
               for k, v in factors.items()}, str(old / "adapter_model.safetensors"))
    assert all(m.startswith("language_model.model.") for m in load_adapter(old))
    return old


def test_an_adapter_in_the_older_vlm_naming_merges_to_one_peft_loads(gemma3_vlm, tmp_path):
    """A task adapter saved before transformers 4.52 names the text modules language_model.model...;
    PEFT now meets them as model.language_model...: the merged adapter (flagged modules of rank
    r_task + r_safety, the others r_task, zero-padded to it) has one rank and scaling, which no
    per-module pattern under either name need carry, so PEFT loads it onto the model to the
    SafeMERGE update."""
    from peft import PeftModel
    from transformers import Gemma3ForConditionalGeneration

    fx = gemma3_vlm
    old = in_older_vlm_naming(fx.task, tmp_path / "task-old")
    out = tmp_path / "a"
    assert run_cli(["merge", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--task-adapter", old,
                    "--safety-adapter", fx.safety, "--out", out, "--num-layers", 3, "--no-plot"]) == 0
    flagged = {r["module"] for r in report_of(out)["layers"] if r["flagged"]}
    ranks = {m: A.shape[0] for m, (A, _, _) in load_adapter(out).items()}
    assert len(flagged) == 3 and set(ranks.values()) == {6}  # (r_task + r_safety)
    assert json.loads((out / "adapter_config.json").read_text())["rank_pattern"] == {}
    base = Gemma3ForConditionalGeneration.from_pretrained(fx.aligned, dtype=torch.float32)
    folded = PeftModel.from_pretrained(base, out).merge_and_unload().state_dict()
    wa = load_model(fx.aligned)
    new_name = {m: "model.language_model." + m.removeprefix("language_model.model.") for m in flagged}
    for m, d in expected_update(fx, {new_name[m] for m in flagged}, 0.8).items():
        assert_close(folded[f"{m}.weight"], wa[_stored(m)].double() + d, atol=2e-6, rtol=1e-5, what=m)


@pytest.mark.parametrize("naming", ["in-memory", "older"])
def test_per_module_ranks_reach_a_vlm_adapters_modules_under_either_naming(gemma3_vlm, tmp_path, naming):
    """PEFT looks rank_pattern/alpha_pattern up by the names the loading transformers gives the
    modules (model.language_model... since 4.52): a per-module adapter from a task adapter in the
    older naming (language_model.model...) keys each module by both, so PEFT folds every flagged
    module at its own rank r_task + r_safety."""
    from peft import PeftModel
    from transformers import Gemma3ForConditionalGeneration

    fx = gemma3_vlm
    task = fx.task if naming == "in-memory" else in_older_vlm_naming(fx.task, tmp_path / "task-old")
    out = tmp_path / "a"
    assert run_cli(["merge", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--task-adapter", task,
                    "--safety-adapter", fx.safety, "--out", out, "--num-layers", 3, "--no-plot",
                    "--adapter-ranks", "per-module"]) == 0
    flagged = {r["module"] for r in report_of(out)["layers"] if r["flagged"]}
    ranks = {m: A.shape[0] for m, (A, _, _) in load_adapter(out).items()}
    assert len(flagged) == 3 and {m: r for m, r in ranks.items() if r == 6}.keys() == flagged
    assert set(ranks.values()) == {4, 6} and json.loads((out / "adapter_config.json").read_text())["r"] == 4
    base = Gemma3ForConditionalGeneration.from_pretrained(fx.aligned, dtype=torch.float32)
    folded = PeftModel.from_pretrained(base, out).merge_and_unload().state_dict()
    wa = load_model(fx.aligned)
    in_memory = {m.replace("language_model.model.", "model.language_model.", 1) for m in flagged}
    for m, d in expected_update(fx, in_memory, 0.8).items():
        assert_close(folded[f"{m}.weight"], wa[_stored(m)].double() + d, atol=2e-6, rtol=1e-5, what=m)


def test_safety_adapter_trained_on_the_bare_model_pairs_by_the_weight_it_adapts(fx, tmp_path):
    """A safety adapter PEFT trained on the bare LlamaModel names its modules layers.N... where the
    task adapter (trained on LlamaForCausalLM) has model.layers.N...: both adapt the same weights,
    so the merge is the one with matching names, under the task adapter's names; and the other
    way round."""
    import shutil

    from safetensors.torch import save_file

    bare = {}
    for name, src in (("safety", fx.safety), ("task", fx.task)):
        bare[name] = Path(shutil.copytree(src, tmp_path / f"{name}-bare"))
        factors = load_file(bare[name] / "adapter_model.safetensors")
        save_file({k.replace("base_model.model.model.", "base_model.model."): v for k, v in factors.items()},
                  str(bare[name] / "adapter_model.safetensors"))
        assert all(m.startswith("layers.") for m in load_adapter(bare[name]))
    runs = {}
    for case, task, safety in (("same", fx.task, fx.safety), ("bare-safety", fx.task, bare["safety"]),
                               ("bare-task", bare["task"], fx.safety)):
        out = tmp_path / case
        assert run_cli(["merge", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--task-adapter", task,
                        "--safety-adapter", safety, "--out", out, "--num-layers", 4, "--no-plot"]) == 0
        runs[case] = (load_file(out / "adapter_model.safetensors"), report_of(out)["layers"])
    want, want_layers = runs["same"]
    for case in ("bare-safety", "bare-task"):
        got, layers = runs[case]
        if case == "bare-task":
            got = {k.replace("base_model.model.layers.", "base_model.model.model.layers."): v for k, v in got.items()}
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), case
        assert [(r["cosine"], r["flagged"]) for r in layers] == [(r["cosine"], r["flagged"]) for r in want_layers]
        assert sum(r["flagged"] for r in layers) == 4
        assert not [w for w in report_of(tmp_path / case)["warnings"] if "no task update" in w], case  # (none left over)


def test_adapters_and_models_in_the_other_naming(gemma3_vlm, tmp_path, capsys):
    """A safety adapter trained where the text modules were named language_model.model... (older
    PEFT and transformers) pairs with a task adapter naming them model.language_model...: the same
    merge as with matching names; and an --unaligned that names its tensors the other way is read by
    its own names: the same projection and report."""
    import shutil

    from safetensors.torch import save_file

    fx = gemma3_vlm
    old = in_older_vlm_naming(fx.safety, tmp_path / "safety-old")
    runs = {}
    for name, safety in (("same", fx.safety), ("old", old)):
        out = tmp_path / name
        assert run_cli(["merge", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--task-adapter", fx.task,
                        "--safety-adapter", safety, "--out", out, "--num-layers", 3]) == 0
        runs[name] = load_file(out / "adapter_model.safetensors")
        assert not report_of(out)["warnings"] or "ignored" not in " ".join(report_of(out)["warnings"])
    assert runs["same"].keys() == runs["old"].keys() and all(torch.equal(runs["same"][k], runs["old"][k]) for k in runs["same"])
    renamed = Path(shutil.copytree(fx.unaligned, tmp_path / "unaligned-renamed"))
    for shard in renamed.glob("*.safetensors"):
        save_file({k.replace("language_model.model.", "model.language_model."): v for k, v in load_file(shard).items()},
                  str(shard), metadata={"format": "pt"})
    index = json.loads((renamed / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k.replace("language_model.model.", "model.language_model."): v for k, v in index["weight_map"].items()}
    (renamed / "model.safetensors.index.json").write_text(json.dumps(index))
    for name, unaligned in (("renamed", renamed), ("same-unaligned", fx.unaligned)):
        out = tmp_path / f"project-{name}"
        assert run_cli(["project", "--aligned", fx.aligned, "--unaligned", unaligned, "--adapter", fx.task,
                        "--out", out, "--threshold", 0.9]) == 0
        runs[name] = (load_file(out / "adapter_model.safetensors"), report_of(out)["layers"])
    (got, got_layers), (want, want_layers) = runs["renamed"], runs["same-unaligned"]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert got_layers == want_layers and any(r["flagged"] for r in got_layers), [r["cosine"] for r in got_layers]
    bad = "model.language_model.layers.0.self_attn.q_proj.weight"  # named as --unaligned stores it
    shard = renamed / index["weight_map"][bad]
    wu = load_file(shard)
    wu[bad][0, 0] = float("nan")
    save_file(wu, str(shard), metadata={"format": "pt"})
    capsys.readouterr()
    assert run_cli(["score", "--aligned", fx.aligned, "--unaligned", renamed, "--adapter", fx.task]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{shard}: tensor {bad} contains NaN" in err, err


def test_an_updated_head_of_a_tied_model_is_untied_in_the_output(fx, tmp_path):
    """A config that ties lm_head to the embeddings, in a checkpoint that stores lm_head anyway:
    --output model writes the updated head and unties it in the output's config (loaders that honour
    the tie would use the embeddings and drop the update), with a warning; a run that leaves the head
    alone leaves the config as it was."""
    import shutil

    from safetensors.torch import save_file

    models = {}
    for name in ("aligned", "unaligned"):
        m = Path(shutil.copytree(getattr(fx, name), tmp_path / name))
        cfg = json.loads((m / "config.json").read_text())
        (m / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
        models[name] = m
    adapters = {}
    for name, seed in (("task", 0), ("safety", 1)):
        a = Path(shutil.copytree(getattr(fx, name), tmp_path / name))
        g = torch.Generator().manual_seed(seed)
        factors = load_file(a / "adapter_model.safetensors")
        factors["base_model.model.lm_head.lora_A.weight"] = 0.1 * torch.randn(4, 64, generator=g)
        factors["base_model.model.lm_head.lora_B.weight"] = 0.1 * torch.randn(128, 4, generator=g)
        save_file(factors, str(a / "adapter_model.safetensors"))
        cfg = json.loads((a / "adapter_config.json").read_text())
        cfg.setdefault("rank_pattern", {})["lm_head"] = 4
        (a / "adapter_config.json").write_text(json.dumps(cfg))
        adapters[name] = a
    out = tmp_path / "out"
    assert run_cli(["merge", "--aligned", models["aligned"], "--unaligned", models["unaligned"], "--task-adapter",
                    adapters["task"], "--safety-adapter", adapters["safety"], "--out", out, "--num-layers", 3,
                    "--output", "model"]) == 0
    rep = report_of(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert any("lm_head.weight is written as its own tensor" in w and "tie_word_embeddings: false" in w
               for w in rep["warnings"])
    flagged = {r["module"] for r in rep["layers"] if r["flagged"]}
    wa, got = load_model(models["aligned"]), load_model(out)
    task, safety = load_adapter(adapters["task"]), load_adapter(adapters["safety"])
    A, B, s = task["lm_head"]
    d = B.double() @ A.double() * s
    if "lm_head" in flagged:
        As, Bs, ss = safety["lm_head"]
        d = 0.8 * d + 0.2 * (Bs.double() @ As.double() * ss)
    assert_close(got["lm_head.weight"], wa["lm_head.weight"].double() + d, atol=2e-6, rtol=1e-5, what="lm_head")
    assert torch.equal(got["model.embed_tokens.weight"], wa["model.embed_tokens.weight"])
    plain = tmp_path / "plain"  # (the fixture's adapters: no update to the head)
    assert run_cli(["merge", "--aligned", models["aligned"], "--unaligned", models["unaligned"], "--task-adapter",
                    fx.task, "--safety-adapter", fx.safety, "--out", plain, "--num-layers", 3, "--output", "model"]) == 0
    assert (plain / "config.json").read_bytes() == (models["aligned"] / "config.json").read_bytes()


@pytest.mark.parametrize("system", ["macos", "windows"])
def test_runs_without_linux_only_calls(fx, tmp_path, monkeypatch, system):
    """Off Linux the reads, copies and output checks fall back: macOS has no copy_file_range or
    posix_fadvise and its sendfile writes only to sockets (ENOTSOCK); Windows has none of these,
    no pread/preadv and no fcntl. The merged model, the adapter and the report's scores are
    the same bytes as a Linux run's."""
    import errno

    def linux_run(out: Path) -> None:
        assert run_cli(merge_args(fx, out, "--num-layers", 5, "--output", "model", "--no-plot")) == 0

    def sockets_only(*args):
        raise OSError(errno.ENOTSOCK, "Socket operation on non-socket")

    linux_run(tmp_path / "linux")
    assert run_cli(merge_args(fx, tmp_path / "linux-adapter", "--num-layers", 5, "--no-plot")) == 0
    for name in ("copy_file_range", "posix_fadvise"):
        monkeypatch.delattr(os, name, raising=False)
    if system == "macos":
        monkeypatch.setattr(os, "sendfile", sockets_only)
    else:
        for name in ("sendfile", "preadv", "pread"):
            monkeypatch.delattr(os, name, raising=False)
        monkeypatch.setitem(sys.modules, "fcntl", None)  # (import fcntl raises ImportError)
    linux_run(tmp_path / "here")
    assert run_cli(merge_args(fx, tmp_path / "here-adapter", "--num-layers", 5, "--no-plot")) == 0
    assert run_cli(["score", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", fx.task,
                    "--report", tmp_path / "score.json"]) == 0
    fd = os.open(tmp_path / "by-descriptor.json", os.O_WRONLY | os.O_CREAT)  # (a descriptor: no fcntl to ask)
    try:
        assert run_cli(["score", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", fx.task,
                        "--report", f"/dev/fd/{fd}"]) == 0
    finally:
        os.close(fd)
    assert json.loads((tmp_path / "by-descriptor.json").read_text())["layers"]
    for a, b in (("linux", "here"), ("linux-adapter", "here-adapter")):
        files = sorted(p.name for p in (tmp_path / a).iterdir() if p.suffix == ".safetensors")
        assert files and files == sorted(p.name for p in (tmp_path / b).iterdir() if p.suffix == ".safetensors")
        assert all((tmp_path / a / f).read_bytes() == (tmp_path / b / f).read_bytes() for f in files), (a, files)
    linux, here = report_of(tmp_path / "linux"), json.loads((tmp_path / "score.json").read_text())
    assert [(r["module"], r["cosine"]) for r in linux["layers"]] == [(r["module"], r["cosine"]) for r in here["layers"]]


def test_report_counts_and_cosine_summary(fx, tmp_path):
    task = tmp_path / "task"
    shutil.copytree(fx.task, task)
    cfg = json.loads((task / "adapter_config.json").read_text())
    m = "model.layers.0.self_attn.q_proj"  # the first layer: degenerate (scaling 0)
    cfg["alpha_pattern"] = {**(cfg.get("alpha_pattern") or {}), m: 0}
    (task / "adapter_config.json").write_text(json.dumps(cfg))
    rep = pipeline.project(fx.aligned, fx.unaligned, task, tmp_path / "p", pipeline.Selection(num_layers=4),
                           plot=False, progress=False)
    cos = [r["cosine"] for r in rep["layers"] if r["cosine"] is not None]
    flagged = [r for r in rep["layers"] if r["flagged"]]
    assert rep["counts"] == {"layers": 21, "scored": 20, "degenerate": 1, "flagged": len(flagged)} and len(flagged) == 4
    assert rep["cosine"] == {"min": min(cos), "median": statistics.median(cos), "max": max(cos)}
    assert len(cos) % 2 == 0 and statistics.median(cos) != statistics.mean(cos)  # (median tells from mean)


def test_report_flagged_count_with_the_first_layer_flagged(fx, tmp_path):
    rep = pipeline.project(fx.aligned, fx.unaligned, fx.task, tmp_path / "p", pipeline.Selection(threshold=1.0),
                           plot=False, progress=False)
    assert rep["layers"][0]["flagged"] and rep["counts"]["flagged"] == sum(r["flagged"] for r in rep["layers"]) == 21


@pytest.mark.parametrize("output", ["adapter", "model"])
def test_merge_report_records_the_output_kind(fx, tmp_path, output):
    rep = pipeline.merge(fx.aligned, fx.unaligned, fx.task, fx.safety, tmp_path / "m",
                         pipeline.MergeSettings(pipeline.Selection(num_layers=2), output=output), plot=False,
                         progress=False)
    assert rep["settings"]["output"] == output


@pytest.mark.parametrize("k, warned", [(21, False), (22, True)])
def test_num_layers_one_beyond_scorable_warns(fx, tmp_path, k, warned):
    rep = pipeline.project(fx.aligned, fx.unaligned, fx.task, tmp_path / "p", pipeline.Selection(num_layers=k),
                           plot=False, progress=False)
    said = [w for w in rep["warnings"] if "exceeds the 21 scorable layers" in w]
    assert said == ([f"--num-layers {k} exceeds the 21 scorable layers; all of them were flagged"] if warned else [])


def test_cli_default_thresholds(fx, tmp_path):
    assert run_cli(["merge", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--task-adapter", fx.task,
                    "--safety-adapter", fx.safety, "--out", tmp_path / "m", "--no-plot"]) == 0
    assert run_cli(["project", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", fx.task,
                    "--out", tmp_path / "p", "--no-plot"]) == 0
    m = json.loads((tmp_path / "m" / "safemerge_report.json").read_text())
    p = json.loads((tmp_path / "p" / "safemerge_report.json").read_text())
    assert (m["settings"]["threshold"], m["settings"]["comparison"]) == (0.35, "<")
    assert (p["settings"]["threshold"], p["settings"]["comparison"]) == (0.5, "<=")
    for rep, tau, cmp in ((m, 0.35, float.__lt__), (p, 0.5, float.__le__)):
        assert [r["flagged"] for r in rep["layers"]] == [r["cosine"] is not None and cmp(r["cosine"], tau)
                                                         for r in rep["layers"]]


def test_read_order_reads_each_shard_front_to_back(tmp_path):
    import types

    from safemerge_ext.pipeline import read_order

    w = {f"model.layers.{i}.self_attn.q_proj.weight": torch.full((2, 2), float(i)) for i in range(3)}
    # layers 0 and 2 in the second file, layer 1 in the first
    placement = {0: "model-00002-of-00002.safetensors", 1: "model-00001-of-00002.safetensors",
                 2: "model-00002-of-00002.safetensors"}
    for shard in set(placement.values()):
        save_file({f"model.layers.{i}.self_attn.q_proj.weight": w[f"model.layers.{i}.self_attn.q_proj.weight"]
                   for i, s in placement.items() if s == shard}, tmp_path / shard)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {f"model.layers.{i}.self_attn.q_proj.weight": s for i, s in placement.items()}}))
    from safemerge_ext.io.models import ModelReader

    run = types.SimpleNamespace(aligned=ModelReader(tmp_path),
                                layers=[types.SimpleNamespace(weight=f"model.layers.{i}.self_attn.q_proj.weight")
                                        for i in range(3)])
    assert read_order(run) == [1, 0, 2]


def test_merge_is_the_same_for_another_shard_layout_and_an_exact_reparametrisation(fx, tmp_path):
    """The same weights in one shard with the tensors in reverse order, and a task adapter stored as
    (4 B, A / 4) (exact in binary): the same cosines, flags and output tensors, bit for bit
    (review133's layout and reparametrisation relations)."""
    for name in ("aligned", "unaligned"):
        src, dst = getattr(fx, name), tmp_path / name
        dst.mkdir()
        shutil.copy(src / "config.json", dst / "config.json")
        weights = load_model(src)
        save_file({k: weights[k] for k in sorted(weights, reverse=True)}, dst / "model.safetensors", {"format": "pt"})
    (tmp_path / "task").mkdir()
    shutil.copy(fx.task / "adapter_config.json", tmp_path / "task" / "adapter_config.json")
    save_file({k: v * (4 if ".lora_B." in k else 0.25) for k, v in load_file(fx.task / "adapter_model.safetensors").items()},
              tmp_path / "task" / "adapter_model.safetensors")
    settings = pipeline.MergeSettings(pipeline.Selection(threshold=0.2), output="model")
    runs = [pipeline.merge(*inputs, fx.safety, tmp_path / f"out{i}", settings, backend="cpp", plot=False, progress=False)
            for i, inputs in enumerate([(fx.aligned, fx.unaligned, fx.task),
                                        (tmp_path / "aligned", tmp_path / "unaligned", tmp_path / "task")])]
    first, second = ([(rec["module"], rec["cosine"], rec["flagged"]) for rec in run["layers"]] for run in runs)
    assert first == second and 0 < sum(flag for _, _, flag in first) < len(first)
    a, b = load_model(tmp_path / "out0"), load_model(tmp_path / "out1")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.usefixtures("matmul_precision_restored")
def test_a_programs_reduced_matmul_precision_does_not_reach_the_merged_model(fx, tmp_path):
    """`torch.set_float32_matmul_precision("medium")` in the calling program (bf16 products on CPUs
    with AMX) changed the scores and the merged weights (B @ A) of a Python-API run whose report
    said exact fp32 (review132); the run is exact, and the setting is the program's again after."""
    settings = pipeline.MergeSettings(pipeline.Selection(threshold=0.2), output="model")
    exact = pipeline.merge(fx.aligned, fx.unaligned, fx.task, fx.safety, tmp_path / "exact", settings, backend="torch",
                           plot=False, progress=False)
    torch.set_float32_matmul_precision("medium")
    medium = pipeline.merge(fx.aligned, fx.unaligned, fx.task, fx.safety, tmp_path / "medium", settings,
                            backend="torch", plot=False, progress=False)
    assert torch.get_float32_matmul_precision() == "medium"
    assert [rec["cosine"] for rec in medium["layers"]] == [rec["cosine"] for rec in exact["layers"]]
    a, b = load_model(tmp_path / "exact"), load_model(tmp_path / "medium")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_rerun_refused_because_the_output_exists_names_a_killed_runs_leftovers(fx, tmp_path, capsys):
    """`safemerge merge --out X` onto an X that exists, beside which a killed --force run left the
    output it moved aside: the refusal came first and the leftover went unnamed (review130); it is
    named before the refusal now."""
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / ".out.old-0a1b2c3d").mkdir()
    assert run_cli(merge_args(fx, out, "--threshold", "0.3")) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith(f"safemerge: warning: {tmp_path / '.out.old-0a1b2c3d'} holds the "
                                               f"output an earlier run for --out {out} replaced"), err
    assert err[1] == f"safemerge: error: --out {out} already exists; choose a new path or pass --force to replace it"


def test_a_run_for_an_output_another_run_is_writing_is_refused_before_it_reads(fx, tmp_path, monkeypatch, capsys):
    """A second `safemerge merge` for an output that a first run is writing read and scored every
    layer and was refused only as it started writing: minutes of a 70B merge for one line. It is
    refused as it starts now, with or without --force, for an adapter and for a model output; the
    first run's temporary is left as it is, and once that run is done a rerun writes."""
    from safemerge_ext import ops
    from safemerge_ext.io.output import staged_dir

    scored: list[object] = []
    real = ops.subspace_score
    monkeypatch.setattr(ops, "subspace_score", lambda *a, **k: scored.append(a) or real(*a, **k))
    out = tmp_path / "out"
    with staged_dir(out, force=True) as first:
        (first / "safemerge_report.json").write_text("{}")  # (an output: --force may replace it later)
        for extra in ((), ("--force",), ("--output", "model", "--force")):
            assert run_cli(merge_args(fx, out, "--no-plot", *extra)) == 2
            assert capsys.readouterr().err.splitlines() == [
                f"safemerge: error: --out {out}: another run is writing it now (in {first}); wait for it to finish "
                "(then pass --force to replace its output), or choose another path"]
        assert scored == [] and sorted(p.name for p in tmp_path.iterdir()) == [first.name]
    assert run_cli(merge_args(fx, out, "--no-plot", "--force")) == 0 and scored
    assert (out / "safemerge_report.json").is_file()


def test_concurrent_runs_leave_the_programs_warning_filters_alone(fx, monkeypatch):
    """Two runs whose backend choice overlapped (pipeline calls are thread-safe) left an "ignore"
    filter in the program's warnings for good: warnings.catch_warnings() is process-wide, and the
    run that entered last put back, as it left last, the list it found (review136)."""
    import threading
    import time
    import warnings

    real, lock, arrived = pipeline.ops.backends.resolve, threading.Lock(), []
    both = threading.Barrier(2)

    def overlapping(*args, **kwargs):
        with lock:
            first_call = threading.current_thread() not in arrived  # (the run's own choice; ops ask again)
            if first_call:
                arrived.append(threading.current_thread())
            last = len(arrived) == 2
        if first_call:
            both.wait(20)  # (both runs inside their backend choice at once)
            if last:
                time.sleep(0.3)  # (the run that came last leaves last)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline.ops.backends, "resolve", overlapping)
    before, errors = list(warnings.filters), []

    def run():
        try:
            pipeline.score(fx.aligned, fx.unaligned, fx.task, progress=False)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(arrived) == 2
    assert list(warnings.filters) == before


def test_the_error_type_is_importable_from_the_package():
    """`from safemerge_ext import SafeMergeError`, where a caller looks for it (review136)."""
    import safemerge_ext
    from safemerge_ext.errors import SafeMergeError

    assert safemerge_ext.SafeMergeError is SafeMergeError and "SafeMergeError" in safemerge_ext.__all__


@pytest.mark.parametrize("settings, want", [
    (dict(seed="x"), "seed must be an integer; got 'x'"),
    (dict(seed=1.5), "seed must be an integer; got 1.5"),
    (dict(seed=True), "seed must be an integer; got True"),
    (dict(seed=None), "seed must be an integer; got None"),
    (dict(density="0.5"), "density must be a number; got '0.5'"),
    (dict(alpha="0.8"), "alpha must be a number; got '0.8'"),
])
def test_merge_settings_refuse_what_the_merge_would_fail_on_late(settings, want):
    """A seed that is no integer failed after every layer was scored (int('x')), or was recorded as
    1.5 while the masks came from int(1.5); a number given as text raised TypeError: refused when
    the settings are made (review136)."""
    with pytest.raises(ValueError, match=re.escape(want)):
        pipeline.MergeSettings(pipeline.Selection(num_layers=4), **{"method": "dare_ties", "density": 0.5, **settings})


def _held_files(root: Path) -> tuple[set[str], int]:
    """The files under ``root`` this process holds open, and how many of its mappings are of them."""
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    with open("/proc/self/maps") as maps:
        mapped = sum(str(root) in line for line in maps)
    return {f for f in fds if f.startswith(str(root))}, mapped


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc")
@pytest.mark.parametrize("failure", ["lost-precision", "ctrl-c"])
def test_a_failed_run_keeps_no_file_open_while_its_error_is_kept(fx, tmp_path, monkeypatch, failure):
    """A program that keeps the error of a failed run (a notebook keeps the last one) kept every
    shard and adapter open, and the pair it was scoring mapped, through the traceback's frames
    (review136): a run closes what it opened as it fails, and its error holds no pair."""
    import gc

    calls = []
    if failure == "lost-precision":  # (raised inside ops, whose frames hold the pair)
        real = pipeline.ops._cos

        def fails_at_the_third(*args):
            calls.append(1)
            if len(calls) == 3:
                raise FloatingPointError("lost")
            return real(*args)

        monkeypatch.setattr(pipeline.ops, "_cos", fails_at_the_third)
    else:  # (a Ctrl-C acted on at the top of a layer)
        def fails_at_the_third():
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt

        monkeypatch.setattr(pipeline, "raise_pending", fails_at_the_third)
    root = Path(fx.aligned).parent
    gc.collect()
    before = _held_files(root)
    with pytest.raises((SafeMergeError, KeyboardInterrupt)) as kept:
        pipeline.merge(fx.aligned, fx.unaligned, fx.task, fx.safety, tmp_path / "out",
                       pipeline.MergeSettings(pipeline.Selection(threshold=0.3)), plot=False, progress=False)
    assert kept.value is not None and len(calls) == 3
    held, mapped = _held_files(root)
    assert held <= before[0] and mapped <= before[1], (held - before[0], mapped, before[1])
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def mixtral_v4_adapters(tmp_path_factory):
    """A tiny Mixtral saved by transformers (the files keep the transformers-4 names:
    block_sparse_moe.gate, experts.N.w1/w2/w3) and adapters in that naming, as trained before
    transformers 5 (per-expert nn.Linear LoRAs, the router a Linear too): the task adapter gives
    the routers another scaling through alpha_pattern."""
    import transformers

    root = tmp_path_factory.mktemp("mixtral")
    cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=64, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    twins_and_v4_adapters(transformers.MixtralForCausalLM(cfg), root, r"\.(q_proj|v_proj|gate|w1|w2|w3)",
                          ["q_proj", "v_proj", "gate", "w1", "w2", "w3"], alpha_pattern={r".*\.gate": 2})
    assert any(".block_sparse_moe.experts.3.w2" in m for m in load_adapter(root / "task"))
    return types.SimpleNamespace(**{k: root / k for k in ("aligned", "unaligned", "task", "safety")})


@pytest.mark.parametrize("variant", ["as-trained", "lora_alpha-0", "float8"])
def test_an_moe_adapter_in_transformers_4_naming_gives_adapters_peft_loads(mixtral_v4_adapters, tmp_path, variant):
    """PEFT loads a transformers-4 Mixtral adapter on transformers 5 by converting it: the routers
    become parameter LoRAs on mlp.gate.weight and each layer's experts are stacked (w1 and w3 fused)
    into one LoRA on experts.gate_up_proj / down_proj, at the config's default r and lora_alpha.
    The adapters merge and project write (flagged modules of rank r_task + r_safety, the others
    r_task) have every module at the default rank and scaling (zero-padded, the scaling folded into
    B), so PEFT loads them to exactly what --output model writes (review158: the merged adapter
    failed to load, its routers and experts at ranks no pattern reached). Also from a task adapter
    whose default scaling is 0 (lora_alpha 0, its patterns giving the scalings: the defaults become
    scaling 1) and from float8 factors (those modules written in fp32: torch does not promote float8
    where PEFT stacks the experts) (review159)."""
    from peft import PeftModel
    from transformers import MixtralForCausalLM

    fx = mixtral_v4_adapters
    task = fx.task
    if variant != "as-trained":
        task = Path(shutil.copytree(fx.task, tmp_path / "task"))
        if variant == "lora_alpha-0":
            config = json.loads((task / "adapter_config.json").read_text())
            config.update(lora_alpha=0, alpha_pattern={r".*\.gate": 2, "q_proj": 8, "w2": 8, "w1": 4, "w3": 4})
            (task / "adapter_config.json").write_text(json.dumps(config))
        else:
            factors = load_file(task / "adapter_model.safetensors")
            save_file({k: v.to(torch.float8_e4m3fn) for k, v in factors.items()}, str(task / "adapter_model.safetensors"))

    def folded(adapter: Path) -> dict[str, torch.Tensor]:
        base = MixtralForCausalLM.from_pretrained(fx.aligned, dtype=torch.float32)
        return PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()

    for args in (["merge", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--task-adapter", task,
                  "--safety-adapter", fx.safety, "--num-layers", 6, "--no-plot"],
                 ["project", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", task,
                  "--num-layers", 6, "--no-plot"]):
        assert run_cli([*args, "--out", tmp_path / "model", "--output", "model", "--force"]) == 0
        flagged = [r["module"] for r in report_of(tmp_path / "model")["layers"] if r["flagged"]]
        assert len(flagged) == 6 and any(".experts." in m for m in flagged), flagged
        assert run_cli([*args, "--out", tmp_path / "adapter", "--force"]) == 0
        config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        ranks = {m: A.shape[0] for m, (A, _, _) in load_adapter(tmp_path / "adapter").items()}
        attention = {ranks[m] for m in ranks if ".self_attn." in m}
        assert ranks and set(ranks.values()) == {config["r"]} and config["rank_pattern"] == {}
        if args[0] == "merge":  # (the attention modules too: rank 4, padded to 6 with the others)
            assert attention == {6} and config["r"] == 6
        if variant == "lora_alpha-0":
            assert config["lora_alpha"] == config["r"]
        want = MixtralForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).state_dict()
        got = folded(tmp_path / "adapter")
        assert set(got) == set(want)
        for name, t in want.items():
            assert_close(got[name], t.double(), atol=2e-6, rtol=1e-5, what=f"{args[0]}: {name}")
        assert not any("loads nowhere" in w for w in report_of(tmp_path / "adapter")["warnings"])


def test_per_module_ranks_are_refused_for_an_moe_adapter_peft_stacks(mixtral_v4_adapters, tmp_path, capsys,
                                                                        monkeypatch):
    """PEFT loads a transformers-4 MoE adapter's routers and experts under other names, each layer's
    experts stacked into one LoRA of one rank: per-module patterns cannot reach them, so
    --adapter-ranks per-module is refused in one line, before any layer is scored."""
    fx = mixtral_v4_adapters
    scored = []
    monkeypatch.setattr(pipeline, "score_layers", lambda *a, **k: scored.append(1))
    out = tmp_path / "a"
    assert run_cli(["project", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", fx.task,
                    "--out", out, "--num-layers", 2, "--adapter-ranks", "per-module"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(
        r"safemerge: error: --adapter-ranks per-module: PEFT with transformers 5 loads this transformers-4 MoE "
        r"adapter's router and expert modules \(first: model\.layers\.0\.block_sparse_moe\.experts\.0\.w1\) under "
        r"other names, .*; nothing was written; use --adapter-ranks uniform \(the default\)", err[0]), err
    assert not out.exists() and not scored


def test_an_adapter_with_moe_modules_peft_does_not_convert_is_written_with_a_warning(tmp_path):
    """Qwen2-MoE's files keep one 2-D weight per expert (experts.N.gate_proj/up_proj/down_proj), which
    transformers 5 fuses on load; PEFT 0.21 converts transformers-4 adapters for Qwen3-MoE but not for
    Qwen2-MoE itself, so it loads an adapter with LoRAs on those experts without them, with no word
    (review164). The adapter merge writes is the right one, and the report says where PEFT will lose
    part of it; --output model applies every update."""
    import transformers
    from peft import PeftModel

    cfg = transformers.Qwen2MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                                      shared_expert_intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    twins_and_v4_adapters(transformers.Qwen2MoeForCausalLM(cfg), tmp_path,
                          r"(\.experts\.\d+\.(gate|up|down)_proj|\.q_proj)", ["q_proj", "gate_proj", "up_proj", "down_proj"])
    args = ["merge", "--aligned", tmp_path / "aligned", "--unaligned", tmp_path / "unaligned", "--task-adapter",
            tmp_path / "task", "--safety-adapter", tmp_path / "safety", "--num-layers", 4, "--no-plot", "--force"]
    assert run_cli([*args, "--out", tmp_path / "adapter"]) == 0
    assert run_cli([*args, "--out", tmp_path / "model", "--output", "model"]) == 0
    warned = [w for w in report_of(tmp_path / "adapter")["warnings"] if "PEFT converts no adapter" in w]
    experts = sorted((m for m in load_adapter(tmp_path / "task") if ".experts." in m), key=natural_key)
    assert len(warned) == 1 and warned[0].startswith(f"{len(experts)} transformers-4 MoE module(s) of the written "
                                                     f"adapter (first: {experts[0]}) that PEFT"), warned
    assert not any("PEFT converts no adapter" in w for w in report_of(tmp_path / "model")["warnings"])
    # what it warns of: PEFT's fold of the written adapter is --output model's but for the experts
    base = transformers.Qwen2MoeForCausalLM.from_pretrained(tmp_path / "aligned", dtype=torch.float32)
    got = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().state_dict()
    want = transformers.Qwen2MoeForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).state_dict()
    lost = {n for n in want if not torch.allclose(got[n], want[n], atol=2e-6, rtol=1e-5)}
    assert lost == {n for n in want if ".mlp.experts." in n}, sorted(lost)


def test_peft_loads_a_qwen3_moe_routers_lora_at_the_default_rank_and_scaling(tmp_path):
    """PEFT 0.21 converts a transformers-4 Qwen3-MoE adapter: its router (mlp.gate, a name that
    transformers keeps) becomes a parameter LoRA on mlp.gate.weight, at the config's default r and
    lora_alpha whatever a pattern keyed by mlp.gate says. The adapter merge wrote kept an unflagged
    router at the task's rank through rank_pattern, which PEFT could not load (size mismatch,
    review165); it is written at the default rank and scaling now, so PEFT's fold of it is --output
    model's. A model+lora input whose alpha_pattern gives the router another scaling is refused (PEFT
    folds it at the default: checked here against PEFT's own fold)."""
    import transformers
    from peft import PeftModel

    from safemerge_ext.io.adapters import check_fold_keeps_scalings, read_adapter

    root = qwen3_moe_v4(tmp_path, [])
    args = ["merge", "--aligned", root / "aligned", "--unaligned", root / "unaligned", "--task-adapter",
            root / "task", "--safety-adapter", root / "safety", "--num-layers", 6, "--no-plot", "--force"]
    assert run_cli([*args, "--out", tmp_path / "adapter"]) == 0
    assert run_cli([*args, "--out", tmp_path / "model", "--output", "model"]) == 0
    routers = [r for r in report_of(tmp_path / "model")["layers"] if r["module"].endswith(".mlp.gate")]
    assert len(routers) == 2 and not any(r["flagged"] for r in routers)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 6 and load_adapter(tmp_path / "adapter")["model.layers.0.mlp.gate"][0].shape[0] == 6

    def folded(adapter: Path) -> dict[str, torch.Tensor]:
        base = transformers.Qwen3MoeForCausalLM.from_pretrained(root / "aligned", dtype=torch.float32)
        return PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()

    want = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).state_dict()
    got = folded(tmp_path / "adapter")
    for name, t in want.items():
        assert_close(got[name], t.double(), atol=2e-6, rtol=1e-5, what=name)

    check_fold_keeps_scalings(read_adapter(root / "task"), root / "aligned", "role task")
    patterned = Path(shutil.copytree(root / "task", tmp_path / "patterned"))
    config = json.loads((patterned / "adapter_config.json").read_text())
    (patterned / "adapter_config.json").write_text(json.dumps({**config, "alpha_pattern": {"gate": 2}}))
    with pytest.raises(SafeMergeError, match=re.escape(
            "folds its model.layers.0.mlp.gate (a transformers-4 MoE module) as model.layers.0.mlp.gate.weight at "
            "rank 4 and scaling 2, but the adapter gives it scaling 0.5 (")):
        check_fold_keeps_scalings(read_adapter(patterned), root / "aligned", "role task")
    A, B, _ = load_adapter(patterned)["model.layers.0.mlp.gate"]
    router = "model.layers.0.mlp.gate.weight"
    assert_close(folded(patterned)[router], load_model(root / "aligned")[router].double() + 2.0 * (B @ A).double(),
                 atol=2e-6, rtol=1e-5, what="PEFT's fold of the router")


def test_a_qwen3_moe_adapter_with_dense_layers_is_one_peft_cannot_load(tmp_path):
    """PEFT 0.21 retargets every gate_proj/up_proj/down_proj LoRA of a transformers-4 Qwen3-MoE
    adapter to the experts' fused weights, so a dense layer's (mlp_only_layers; DeepSeek's first
    layers and shared experts alike) are lost, with no word. merge's adapter says so in its report,
    and the fold route refuses such an adapter (review165)."""
    import transformers
    from peft import PeftModel

    from safemerge_ext.io.adapters import check_fold_keeps_scalings, read_adapter

    root = qwen3_moe_v4(tmp_path, [0])
    args = ["merge", "--aligned", root / "aligned", "--unaligned", root / "unaligned", "--task-adapter",
            root / "task", "--safety-adapter", root / "safety", "--num-layers", 4, "--no-plot", "--force"]
    assert run_cli([*args, "--out", tmp_path / "adapter"]) == 0
    assert run_cli([*args, "--out", tmp_path / "model", "--output", "model"]) == 0
    warned = [w for w in report_of(tmp_path / "adapter")["warnings"] if "loads nowhere" in w]
    assert len(warned) == 1 and warned[0].startswith(
        "3 transformers-4 MoE module(s) of the written adapter (first: model.layers.0.mlp.gate_proj) that PEFT with "
        "transformers 5 loads nowhere (PEFT retargets every gate_proj LoRA to the experts' fused gate_up_proj"), warned
    with pytest.raises(SafeMergeError, match=re.escape(
            "folds nothing of its transformers-4 MoE module model.layers.0.mlp.gate_proj (nor 2 more): PEFT retargets")):
        check_fold_keeps_scalings(read_adapter(root / "task"), root / "aligned", "role task")
    # what it warns of: PEFT's fold of the written adapter leaves the dense layer as it was
    base = transformers.Qwen3MoeForCausalLM.from_pretrained(root / "aligned", dtype=torch.float32)
    got = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().state_dict()
    before = load_model(root / "aligned")
    want = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).state_dict()
    dense = "model.layers.0.mlp.gate_proj.weight"
    assert torch.equal(got[dense], before[dense]) and not torch.allclose(want[dense], before[dense])


def test_a_transformers_4_moe_adapter_that_peft_saved_again_is_refused_with_what_to_give(mixtral_v4_adapters,
                                                                                        tmp_path):
    """PEFT loads a transformers-4 Mixtral adapter converted and saves it so: target_parameters on the
    stacked experts and routers. That form is refused; the line no longer only says to train the
    adapter again with target_modules, which this one was (review166): the copy saved before the load
    is the one to give."""
    from peft import PeftModel
    from transformers import MixtralForCausalLM

    from safemerge_ext.io.adapters import read_adapter

    base = MixtralForCausalLM.from_pretrained(mixtral_v4_adapters.aligned, dtype=torch.float32)
    PeftModel.from_pretrained(base, mixtral_v4_adapters.task).save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())["target_parameters"]
    with pytest.raises(SafeMergeError, match="target_parameters is set.*it also saves an adapter trained on "
                                             "transformers 4 so once it has loaded it: give the copy saved before"):
        read_adapter(tmp_path / "resaved", "--task-adapter")


def test_an_rslora_moe_adapter_in_transformers_4_naming_is_written_with_a_warning(mixtral_v4_adapters, tmp_path):
    """PEFT fuses a Mixtral's w1 and w3 LoRAs into one of twice the rank and lora_alpha, which under
    rsLoRA (alpha / sqrt(r)) scales their update by sqrt(2): PEFT's fold of the adapter merge writes
    from an rsLoRA task adapter differs from --output model there, and only there; the report says so
    (review167: it said nothing)."""
    from peft import PeftModel
    from transformers import MixtralForCausalLM

    fx = mixtral_v4_adapters
    task = Path(shutil.copytree(fx.task, tmp_path / "task"))
    config = json.loads((task / "adapter_config.json").read_text())
    (task / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    args = ["merge", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--task-adapter", task,
            "--safety-adapter", fx.safety, "--num-layers", 6, "--no-plot", "--force"]
    assert run_cli([*args, "--out", tmp_path / "adapter"]) == 0
    assert run_cli([*args, "--out", tmp_path / "model", "--output", "model"]) == 0
    warned = [w for w in report_of(tmp_path / "adapter")["warnings"] if "scales their update by sqrt(2)" in w]
    assert len(warned) == 1 and warned[0].startswith(
        "16 transformers-4 MoE expert module(s) of the written adapter (first: "
        "model.layers.0.block_sparse_moe.experts.0.w1)"), warned
    assert not any("sqrt(2)" in w for w in report_of(tmp_path / "model")["warnings"])
    before = load_model(fx.aligned)
    base = MixtralForCausalLM.from_pretrained(fx.aligned, dtype=torch.float32)
    got = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().state_dict()
    want = MixtralForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).state_dict()
    off = {n for n in want if not torch.allclose(got[n], want[n], atol=2e-6, rtol=1e-5)}
    assert off == {n for n in want if n.endswith("experts.gate_up_proj")}, sorted(off)
    n = "model.layers.0.mlp.experts.gate_up_proj"
    stored = torch.cat([torch.stack([before[f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight"]
                                     for e in range(4)]) for w in ("w1", "w3")], dim=1)
    assert_close(got[n] - stored, (want[n] - stored).double() * math.sqrt(2), atol=2e-6, rtol=1e-5, what=n)


def test_an_moe_model_that_counts_its_experts_as_moe_num_experts_is_one(tmp_path):
    """Ernie-4.5-MoE's config counts its experts as moe_num_experts: it was taken for a dense model, so
    an adapter whose shared experts' LoRAs PEFT loses (it converts Ernie's transformers-4 adapters as
    Qwen2-MoE's) was accepted on the fold routes (review167)."""
    import transformers
    from peft import PeftModel

    from safemerge_ext.io.adapters import check_fold_keeps_scalings, read_adapter
    from safemerge_ext.io.models import experts_count

    cfg = transformers.Ernie4_5_MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                          vocab_size=64, moe_num_experts=4, moe_k=2, moe_layer_start_index=1,
                                          moe_num_shared_experts=1)
    torch.manual_seed(0)
    twins_and_v4_adapters(transformers.Ernie4_5_MoeForCausalLM(cfg), tmp_path,
                          r"\.(q_proj|shared_experts\.(gate|up|down)_proj)", ["q_proj", "gate_proj", "up_proj", "down_proj"])
    assert experts_count(tmp_path / "aligned") == 4
    with pytest.raises(SafeMergeError, match=re.escape(
            "folds nothing of its transformers-4 MoE module model.layers.1.mlp.shared_experts.gate_proj (nor 2 more): "
            "PEFT retargets every gate_proj LoRA")):
        check_fold_keeps_scalings(read_adapter(tmp_path / "task"), tmp_path / "aligned", "role task")
    base = transformers.Ernie4_5_MoeForCausalLM.from_pretrained(tmp_path / "aligned", dtype=torch.float32)
    folded = PeftModel.from_pretrained(base, tmp_path / "task").merge_and_unload().state_dict()
    shared = "model.layers.1.mlp.shared_experts.gate_proj.weight"
    assert torch.equal(folded[shared], load_model(tmp_path / "aligned")[shared])


def test_an_omni_model_counts_the_experts_its_thinker_config_gives(tmp_path):
    """Qwen3-Omni-MoE's config.json keeps its language model's experts count under
    thinker_config.text_config: the model was taken for a dense one, so an adapter whose dense
    layer's gate/up/down LoRAs PEFT loses (it retargets them to the experts) was accepted on the fold
    routes (review167 noted it)."""
    import transformers
    from peft import PeftModel

    from safemerge_ext.io.adapters import check_fold_keeps_scalings, read_adapter
    from safemerge_ext.io.models import experts_count

    text = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64, num_experts=4,
                num_experts_per_tok=2, mlp_only_layers=[0])
    audio = dict(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, num_mel_bins=16,
                 output_dim=32, n_window=4, downsample_hidden_size=8)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                  deepstack_visual_indexes=[0], patch_size=4, spatial_merge_size=1)
    cfg = transformers.Qwen3OmniMoeConfig(thinker_config=dict(text_config=text, audio_config=audio,
                                                              vision_config=vision), enable_audio_output=False)
    torch.manual_seed(0)
    twins_and_v4_adapters(transformers.Qwen3OmniMoeForConditionalGeneration(cfg), tmp_path,
                          r"thinker\.model\.layers\.\d+\.(self_attn\.q_proj|mlp\.(experts\.\d+\.)?(gate|up|down)_proj)",
                          ["q_proj", "gate_proj", "up_proj", "down_proj"])
    assert experts_count(tmp_path / "aligned") == 4
    with pytest.raises(SafeMergeError, match=re.escape(
            "folds nothing of its transformers-4 MoE module thinker.model.layers.0.mlp.gate_proj (nor 2 more): "
            "PEFT retargets every gate_proj LoRA")):
        check_fold_keeps_scalings(read_adapter(tmp_path / "task"), tmp_path / "aligned", "role task")
    base = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(tmp_path / "aligned", dtype=torch.float32)
    dense, experts = (f"thinker.model.language_model.layers.{n}" for n in ("0.mlp.gate_proj.weight",
                                                                        "1.mlp.experts.down_proj"))
    before = {k: base.state_dict()[k].clone() for k in (dense, experts)}
    folded = PeftModel.from_pretrained(base, tmp_path / "task").merge_and_unload().state_dict()
    assert torch.equal(folded[dense], before[dense])  # (lost: PEFT loaded it on the experts)
    assert not torch.equal(folded[experts], before[experts])


@pytest.mark.parametrize("regex, lost", [(r".*\.(q_proj|v_proj|gate|w1|w2|w3)", False),
                                         (r".*\.(q_proj|v_proj|block_sparse_moe\.gate|experts\.\d+\.w[123])", True)])
def test_a_regex_target_modules_is_read_as_peft_resolves_it_on_transformers_5(mixtral_v4_adapters, tmp_path, regex,
                                                                              lost):
    """PEFT resolves an adapter's regex target_modules against the transformers-5 names (mlp.gate,
    probing experts.w1 for the fused experts): one that spells the transformers-4 paths
    (block_sparse_moe.gate, experts.N.w1) reaches no router or expert there, and PEFT folds the
    adapter without them, with no word (review167). Such an adapter is refused as a model+lora input
    and its written adapter is warned of; one whose names PEFT resolves is taken, as PEFT folds it."""
    from peft import PeftModel
    from transformers import MixtralForCausalLM

    from safemerge_ext.io.adapters import check_fold_keeps_scalings, read_adapter

    fx = mixtral_v4_adapters
    task = Path(shutil.copytree(fx.task, tmp_path / "task"))
    config = json.loads((task / "adapter_config.json").read_text())
    (task / "adapter_config.json").write_text(json.dumps({**config, "target_modules": regex, "alpha_pattern": {}}))
    base = MixtralForCausalLM.from_pretrained(fx.aligned, dtype=torch.float32)
    folded = PeftModel.from_pretrained(base, task).merge_and_unload().state_dict()
    stored = load_model(fx.aligned)["model.layers.0.block_sparse_moe.gate.weight"]
    A, B, scaling = load_adapter(task)["model.layers.0.block_sparse_moe.gate"]
    router = folded["model.layers.0.mlp.gate.weight"]
    if not lost:
        check_fold_keeps_scalings(read_adapter(task), fx.aligned, "role task")
        assert_close(router, stored.double() + scaling * (B @ A).double(), atol=2e-6, rtol=1e-5, what="router")
        return
    assert torch.equal(router, stored)
    want = (f"folds nothing of its transformers-4 MoE module model.layers.0.block_sparse_moe.experts.0.w1 (nor 25 "
            f"more): the adapter's target_modules regex {regex!r}, which PEFT matches against the transformers-5 "
            "names (model.layers.0.mlp.experts.gate_up_proj), reaches no w1 there")
    with pytest.raises(SafeMergeError, match=re.escape(want)):
        check_fold_keeps_scalings(read_adapter(task), fx.aligned, "role task")
    assert run_cli(["project", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", task,
                    "--num-layers", 2, "--no-plot", "--out", tmp_path / "adapter"]) == 0
    warned = [w for w in report_of(tmp_path / "adapter")["warnings"] if "loads nowhere" in w]
    assert len(warned) == 1 and warned[0].startswith(
        "26 transformers-4 MoE module(s) of the written adapter (first: model.layers.0.block_sparse_moe.experts.0.w1)"
    ), warned


RUNS_ON_THE_CPU = [n for n in ("cpp", "torch") if backends.available_backends()[n] is None]


@pytest.mark.parametrize("backend", RUNS_ON_THE_CPU)
def test_a_default_device_the_program_set_does_not_reach_a_cpu_run(fx, tmp_path, backend):
    """review196: a program that called torch.set_default_device (GPU scripts and some model cards
    do) had the run's read buffers and the C++ backend's T and P made there (a raw TypeError, or the
    C++ kernel handed device addresses). The meta device stands in for cuda: every tensor made
    without a device lands there, holding nothing. The outputs' bytes equal a plain run's."""
    task, safety = _equal_rank_adapters(fx, tmp_path, False, {})  # (peft-linear needs one rank)
    runs = {
        "merge": merge_args(fx, Path("OUT"), "--no-plot", "--num-layers", 3),
        "peft-linear": ["merge", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--task-adapter", task,
                        "--safety-adapter", safety, "--out", Path("OUT"), "--no-plot", "--num-layers", 3,
                        "--method", "peft-linear"],
        "ties-model": merge_args(fx, Path("OUT"), "--no-plot", "--num-layers", 3, "--method", "ties",
                                 "--density", 0.5, "--output", "model"),
        "project": ["project", "--aligned", fx.aligned, "--unaligned", fx.unaligned, "--adapter", fx.task,
                    "--out", Path("OUT"), "--no-plot", "--num-layers", 3],
    }
    for name, argv in runs.items():
        outs = []
        for where in ("plain", "meta"):
            out = tmp_path / f"{name}-{where}"
            argv_here = [out if a == Path("OUT") else a for a in argv] + ["--backend", backend]
            if where == "meta":
                with torch.device("meta"):
                    assert run_cli(argv_here) == 0, name
            else:
                assert run_cli(argv_here) == 0, name
            outs.append(out)
        files = sorted(p.name for p in outs[0].glob("*.safetensors"))
        assert files and files == sorted(p.name for p in outs[1].glob("*.safetensors")), name
        for f in files:
            assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), (name, f)
        layers = [[(r["module"], r["cosine"], r["flagged"]) for r in report_of(o)["layers"]] for o in outs]
        assert layers[0] == layers[1] and sum(flag for _, _, flag in layers[0]) == 3, name


@pytest.mark.parametrize("command", ["score", "merge", "project"])
def test_a_path_that_is_no_path_is_a_type_error_naming_it(fx, tmp_path, command):
    """review196: None (or a number) for a path raised os.fspath's TypeError, which named none of the
    run's three or four paths."""
    given = {"score": dict(aligned=fx.aligned, unaligned=None, adapter=fx.task),
             "merge": dict(aligned=fx.aligned, unaligned=fx.unaligned, task_adapter=fx.task, safety_adapter=7,
                           out=tmp_path / "o", settings=pipeline.MergeSettings(pipeline.Selection(threshold=0.35))),
             "project": dict(aligned=fx.aligned, unaligned=fx.unaligned, adapter=fx.task, out=None,
                             selection=pipeline.Selection(threshold=0.5))}[command]
    name, kind = {"score": ("--unaligned", "NoneType"), "merge": ("--safety-adapter", "int"),
                  "project": ("--out", "NoneType")}[command]
    with pytest.raises(TypeError, match=rf"^{name} must be a path \(str or os.PathLike\); got {kind}$"):
        getattr(pipeline, command)(**given)
    assert not any(tmp_path.iterdir())
