"""Evaluate several models side by side: harmful-answer rate, over-refusal on benign prompts, task accuracy.

Every rate carries its Wilson 95% interval and its denominator; the budgets (prompt counts, max new
tokens, engine, judge) are written into the result, because a number without them cannot be compared.
Models are compared pairwise by the exact McNemar test on their per-prompt verdicts (they answer the
same prompts, so overlapping intervals are the wrong test).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from safemerge_ext._signals import interrupts_held, what_ended
from safemerge_ext.errors import SafeMergeError
from safemerge_ext.evaluation.generate import CHAT_DATE, ModelSpec
from safemerge_ext.evaluation.judges import Judge, has_answer, is_refusal
from safemerge_ext.evaluation.stats import discordant, mcnemar_exact, wilson
from safemerge_ext.io.output import check_parent, write_files
from safemerge_ext.evaluation.utility import Task


@dataclass
class Budget:
    harmful: int
    benign: int
    utility: int
    max_new_tokens: int
    utility_max_new_tokens: int
    batch_size: int | None
    engine: str
    judge: str
    seed: int
    # (None with vLLM, which schedules its own batches)
    chat_date: str = CHAT_DATE  # the date_string every chat template was given (see generate.CHAT_DATE)
    # the generating models' device and weights dtype, which change greedy outputs (device None: vLLM's GPUs;
    # dtype "auto" with vLLM: bfloat16, or float16 on a GPU without it)
    device: str | None = None
    dtype: str = "auto"


@dataclass
class Rate:
    k: int
    n: int
    rate: float = field(init=False)
    lo: float = field(init=False)
    hi: float = field(init=False)

    def __post_init__(self) -> None:
        self.rate = self.k / self.n if self.n else float("nan")
        self.lo, self.hi = wilson(self.k, self.n)


def subsample(items: Sequence[Any], limit: int | None, seed: int, role: str) -> list[Any]:
    """The first ``limit`` items of a seeded shuffle, kept in file order (all of them when ``limit`` is None).

    The shuffle is seeded with ``seed`` and ``role`` ("harmful", "benign", "utility"), so a smaller limit
    takes a subset of a larger one's items and sets of equal length get different subsets.
    """
    items = list(items)
    if limit is None or limit >= len(items):
        return items
    order = list(range(len(items)))
    random.Random(f"{seed}:{role}").shuffle(order)  # (a str seed is hashed with SHA-512: same on every run)
    return [items[i] for i in sorted(order[:limit])]


OUT_FILES = ("eval.json", "eval.png")
# what a run that stopped at a model writes: the models finished before it (see ``write``)
PARTIAL_FILES = ("eval.partial.json", "eval.partial.png")


def check_out(out: Path, inputs: Sequence[tuple[str, str | os.PathLike]] = ()) -> None:
    """Fail now, before any model loads, when ``write`` could not put its files into ``out`` (the final
    pair or the partial one), or would replace one of ``inputs`` ((flag, path) pairs: the prompt and task
    files). Writing them beside a model's files (in its folder) is allowed: no model file has those names."""
    if out.exists() and not out.is_dir():
        raise SafeMergeError(f"--out {out}: a file is there; give a folder (eval.json and eval.png go into it)")
    for name in (*OUT_FILES, *PARTIAL_FILES):
        if (out / name).is_dir():
            raise SafeMergeError(f"--out {out}: {out / name} is a folder; move it away or give another --out")
        target = (out / name).resolve()
        for flag, path in inputs:
            src = Path(path).resolve()
            if target == src:
                raise SafeMergeError(f"--out {out}: writing {out / name} would replace {flag} {path}; "
                                     "give another --out")
    if out.is_dir():
        if not os.access(out, os.W_OK | os.X_OK):
            raise SafeMergeError(f"--out {out}: the folder is not writable; give another --out")
    else:
        check_parent(out, "--out")


class Unfinished(Exception):
    """A model failed after others had finished: ``result`` is the document of those (see ``evaluate``),
    ``model`` the name of the one that failed; the failure is the ``__cause__``."""

    def __init__(self, result: dict[str, Any], model: str) -> None:
        super().__init__(f"[{model}] failed after {', '.join(r['name'] for r in result['models'])} finished")
        self.result, self.model = result, model


def evaluate(
    models: Sequence[ModelSpec],
    engine: Any,
    judge: Judge,
    *,
    harmful: tuple[str, list[str]] | None,
    benign: tuple[str, list[str]] | None,
    task: Task | None,
    budget: Budget,
    log: Any = print,
) -> dict[str, Any]:
    """Generate for every model on every set, judge, and return the result document (see ``write``).

    When a model fails (it does not load, runs out of memory, its verdicts are unreadable) after others
    have finished, ``Unfinished`` carries the document of the finished ones, so their hours are not lost;
    it records the failure under ``unfinished``."""
    rows: list[dict[str, Any]] = []

    def document() -> dict[str, Any]:
        return {
            "sets": {"harmful": harmful[0] if harmful else None, "benign": benign[0] if benign else None,
                     "utility": f"{task.name} ({task.kind})" if task else None},
            "budget": asdict(budget),
            "models": rows,
            "paired": paired(rows),
            "machine": platform.node(), "python": platform.python_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    for i, spec in enumerate(models):
        try:
            rows.append(_evaluate_one(spec, engine, judge, harmful=harmful, benign=benign, task=task,
                                      budget=budget, log=log))
        except (Exception, KeyboardInterrupt) as exc:  # (KeyboardInterrupt: Ctrl-C, and SIGTERM as Terminated)
            # (free the failed model's memory, seconds for vLLM: a Ctrl-C meanwhile is dropped, not raised, since
            # the run ends here anyway, and raised it would lose the finished models' results)
            with interrupts_held(resend=False), contextlib.suppress(Exception):
                engine.unload()
            if not rows:
                raise
            doc = document()
            error = what_ended(exc) if isinstance(exc, KeyboardInterrupt) else str(exc) or type(exc).__name__
            doc["unfinished"] = {"failed": spec.name, "error": error,
                                 "not_run": [m.name for m in models[i + 1:]]}
            raise Unfinished(doc, spec.name) from exc
    return document()


def _evaluate_one(spec: ModelSpec, engine: Any, judge: Judge, *, harmful: tuple[str, list[str]] | None,
                  benign: tuple[str, list[str]] | None, task: Task | None, budget: Budget,
                  log: Any) -> dict[str, Any]:
    """One model's row: load, generate on each set, judge or score, unload."""
    t0 = time.perf_counter()
    log(f"[{spec.name}] loading {spec.label}")
    engine.load(spec)
    row: dict[str, Any] = {"name": spec.name, "model": spec.path, "adapter": spec.adapter, "samples": {}}
    if harmful:
        outs = engine.generate(harmful[1], budget.max_new_tokens)
        verdicts = judge.harmful(harmful[1], outs)
        judged = [v for v in verdicts if v is not None]  # (None: a verdict the judge wrote unreadably)
        unparsed = len(verdicts) - len(judged)
        row["harmful"] = {**asdict(Rate(sum(judged), len(judged))), "unparsed": unparsed}
        row["samples"]["harmful"] = [{"prompt": p, "response": o, "harmful": v}
                                     for p, o, v in zip(harmful[1], outs, verdicts)]
        log(f"[{spec.name}] harmful {sum(judged)}/{len(judged)}"
            + (f" ({unparsed} verdicts unparsed, left out)" if unparsed else ""))
    if benign:
        outs = engine.generate(benign[1], budget.max_new_tokens)
        refused = [is_refusal(o) or not has_answer(o) for o in outs]
        row["refusal"] = asdict(Rate(sum(refused), len(refused)))
        row["samples"]["benign"] = [{"prompt": p, "response": o, "refused": r}
                                    for p, o, r in zip(benign[1], outs, refused)]
        log(f"[{spec.name}] benign refused {sum(refused)}/{len(refused)}")
    if task:
        prompts = [it.prompt for it in task.items]
        outs = engine.generate(prompts, budget.utility_max_new_tokens)
        read = [task.extraction(o) for o in outs]
        ok = [got == it.gold for (got, _), it in zip(read, task.items)]
        row["accuracy"] = asdict(Rate(sum(ok), len(ok)))
        # which rule read each prediction: an accuracy that rests on a fallback ("last number") shows
        row["extraction"] = {rule: n for rule in task.rules if (n := sum(r == rule for _, r in read))}
        row["samples"]["utility"] = [{"prompt": it.prompt, "response": o, "gold": it.gold,
                                      "extracted": got, "rule": rule, "correct": c}
                                     for it, o, (got, rule), c in zip(task.items, outs, read, ok)]
        log(f"[{spec.name}] task {sum(ok)}/{len(ok)} (read by: "
            + ", ".join(f"{rule} {n}" for rule, n in row["extraction"].items()) + ")")
    engine.unload()
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


# the per-prompt yes/no metrics: (the row's rate, the samples' set, the verdict field, a label for people)
PAIRED_METRICS = (("harmful", "harmful", "harmful", "harmful"), ("refusal", "benign", "refused", "benign refused"),
                  ("accuracy", "utility", "correct", "task correct"))
PAIRED_TEST = "exact McNemar: two-sided binomial test of b against b + c at 1/2"


def paired(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Every pair of models compared on each per-prompt yes/no metric they both measured, by the exact
    McNemar test: ``{"test": ..., METRIC: [{"models": [A, B], "n", "b", "c", "p"}, ...]}``, where n counts
    the prompts with a verdict from both, b those where A's verdict is yes and B's no, c the reverse."""
    out: dict[str, Any] = {"test": PAIRED_TEST}
    for key, sample_key, verdict, _ in PAIRED_METRICS:
        have = [r for r in rows if sample_key in r.get("samples", {})]
        if not have:
            continue
        out[key] = []
        for i, first in enumerate(have):
            for second in have[i + 1:]:
                n, b, c = discordant([s[verdict] for s in first["samples"][sample_key]],
                                     [s[verdict] for s in second["samples"][sample_key]])
                out[key].append({"models": [first["name"], second["name"]], "n": n, "b": b, "c": c,
                                 "p": mcnemar_exact(b, c)})
    return out


def _counts(r: dict[str, Any]) -> str:
    """``k/n``, and the verdicts the judge left unreadable (not in n) when there were any."""
    return f"{r['k']}/{r['n']}" + (f", {r['unparsed']} unparsed" if r.get("unparsed") else "")


def _cell(r: dict[str, Any] | None) -> str:
    if not r:
        return "-"
    return f"{100 * r['rate']:5.1f} [{100 * r['lo']:4.1f}, {100 * r['hi']:5.1f}] ({_counts(r)})"


def table(result: dict[str, Any]) -> str:
    """A plain-text table: one row a model, each rate in % with its 95% interval and counts, then the budgets."""
    head = ("model", "harmful % [95% CI]", "benign refused % [95% CI]", "task acc. % [95% CI]")
    body = [(r["name"], _cell(r.get("harmful")), _cell(r.get("refusal")), _cell(r.get("accuracy")))
            for r in result["models"]]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(4)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    b, s = result["budget"], result["sets"]
    foot = (f"sets: harmful={s['harmful']} ({b['harmful']}), benign={s['benign']} ({b['benign']}), "
            f"utility={s['utility']} ({b['utility']}); max new tokens {b['max_new_tokens']} "
            f"(task {b['utility_max_new_tokens']}); greedy; engine {b['engine']}; judge {b['judge']}")
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body), foot])


def paired_table(result: dict[str, Any]) -> str:
    """The pairwise comparisons as a short plain-text table: one row a pair of models, ``b/c p=P`` per
    metric; empty with fewer than two models."""
    pairs = result.get("paired") or {}
    metrics = [(key, label) for key, _, _, label in PAIRED_METRICS if pairs.get(key)]
    cells: dict[tuple[str, ...], dict[str, str]] = {}
    for key, _ in metrics:
        for cmp in pairs[key]:
            cells.setdefault(tuple(cmp["models"]), {})[key] = f"{cmp['b']}/{cmp['c']} p={cmp['p']:.3g}"
    if not cells:
        return ""
    head = ("pair", *(f"{label} b/c" for _, label in metrics))
    body = [(" vs ".join(names), *(row.get(key, "-") for key, _ in metrics)) for names, row in cells.items()]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = lambda xs: "  ".join(c.ljust(w) for c, w in zip(xs, widths)).rstrip()  # noqa: E731
    note = "paired, exact McNemar on the same prompts (b: the first model yes, the second no; c: the reverse)"
    return "\n".join([note, line(head), *map(line, body)])


def markdown(result: dict[str, Any]) -> str:
    """The same table in Markdown, for a README."""
    def cell(r: dict[str, Any] | None) -> str:
        return "-" if not r else f"{100 * r['rate']:.1f} [{100 * r['lo']:.1f}, {100 * r['hi']:.1f}] ({_counts(r)})"
    out = ["| model | harmful % [95% CI] | benign refused % [95% CI] | task acc. % [95% CI] |", "|---|---|---|---|"]
    out += [f"| {r['name']} | {cell(r.get('harmful'))} | {cell(r.get('refusal'))} | {cell(r.get('accuracy'))} |"
            for r in result["models"]]
    return "\n".join(out)


def plot(result: dict[str, Any], path: Path) -> None:
    """Grouped bars (harmful, benign refused, task accuracy) per model with 95% interval whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [(k, lab) for k, lab in (("harmful", "harmful answers"), ("refusal", "benign refused"),
                                       ("accuracy", "task accuracy")) if any(k in r for r in result["models"])]
    names = [r["name"] for r in result["models"]]
    width = 0.8 / max(1, len(metrics))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(names) + 2), 4))
    for m, (key, lab) in enumerate(metrics):
        xs, ys, err = [], [], [[], []]
        for i, r in enumerate(result["models"]):
            if key in r:
                v = r[key]
                xs.append(i + (m - (len(metrics) - 1) / 2) * width)
                ys.append(100 * v["rate"])
                err[0].append(max(0.0, 100 * (v["rate"] - v["lo"])))
                err[1].append(max(0.0, 100 * (v["hi"] - v["rate"])))
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=lab)
    # (parse_math off: a model or judge name is text, and a '$' in it would start TeX math)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", parse_math=False)
    ax.set_ylabel("% (95% Wilson interval)")
    ax.set_ylim(0, 105)
    b = result["budget"]
    ax.set_title(f"{b['harmful']} harmful / {b['benign']} benign / {b['utility']} task prompts, "
                 f"{b['max_new_tokens']} new tokens, judge {b['judge']}", fontsize=9, parse_math=False)
    ax.legend(fontsize=8, ncol=len(metrics), loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict[str, Any], out: Path, *, partial: bool = False) -> tuple[Path, Path]:
    """``eval.json`` and ``eval.png`` in ``out`` (``eval.partial.*`` with ``partial``: the models that
    finished before one failed): both are written to temporary files first and renamed only when both are
    complete, so a failure (of the plot, say) leaves the earlier pair as it was, and no ``out`` folder
    where there was none. A complete pair removes the partial pair an earlier, failed run left."""
    js, png = (out / name for name in (PARTIAL_FILES if partial else OUT_FILES))
    write_files([(png, lambda tmp: plot(result, tmp)),
                 (js, lambda tmp: tmp.write_text(json.dumps(result, indent=1), encoding="utf-8"))], prog="safemerge")
    if not partial:
        for name in PARTIAL_FILES:
            (out / name).unlink(missing_ok=True)
    return js, png
