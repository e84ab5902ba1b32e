"""The per-layer report every face writes: ``safemerge_report.json``, a PNG plot, a summary table.

Schema (SPEC section 2)::

    {"tool": "safemerge-ext", "version": ..., "command": "merge", "method": "safemerge",
     "settings": {...}, "backend": "cpp", "precision": "ieee", "counts": {...}, "cosine": {"min", "median", "max"},
     "timings": {...}, "bytes_read": int, "warnings": [...],
     "layers": [{"module": "model.layers.0.self_attn.q_proj", "cosine": 0.41, "flagged": false,
                 "reason": null, "action": "kept", ...}, ...]}

Layers are in model order; an undefined cosine is ``null`` with the reason in ``reason``.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import re
import statistics
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from safemerge_ext import __version__
from safemerge_ext.errors import SafeMergeError
from safemerge_ext.io.output import write_whole

REPORT_JSON = "safemerge_report.json"
REPORT_PNG = "safemerge_report.png"


@dataclass
class LayerRecord:
    """One scored layer (a linear module) and what was done to it."""

    module: str
    cosine: float
    flagged: bool = False
    reason: str | None = None
    action: str = "kept"  # kept | merged | projected | skipped (degenerate) | shifted (resta)
    shape: tuple[int, ...] = ()
    rank: int | None = None
    v_norm: float | None = None
    delta_norm: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        d["shape"] = list(self.shape)
        d.update(extra)
        return {k: _json_float(v) for k, v in d.items()}


def _json_float(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def build_report(
    *,
    command: str,
    method: str,
    layers: list[LayerRecord],
    settings: dict[str, Any],
    backend: str,
    timings: dict[str, float],
    bytes_read: int,
    warnings: list[str] | None = None,
    precision: str = "ieee",
    backend_detail: str | None = None,
    inputs: dict[str, str | os.PathLike] | None = None,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Assemble the report dict (JSON-ready) from the layer records and the run's facts;
    ``precision`` is the operand precision the backend computed with (``backends.PRECISIONS``),
    ``backend_detail`` what it ran with (the C++ kernels' instruction set: their bits differ; None for a
    backend with one build), ``inputs`` the input folders by role (recorded as they are on disk;
    ``headers``: the safetensors headers' digests the run has, see :func:`provenance.fingerprint`)."""
    from safemerge_ext import provenance

    scores = [r.cosine for r in layers if math.isfinite(r.cosine)]
    return {
        "tool": "safemerge-ext",
        "version": __version__,
        "schema_version": provenance.SCHEMA_VERSION,
        "environment": provenance.environment(),
        "inputs": {role: provenance.fingerprint(path, headers) for role, path in (inputs or {}).items()},
        "command": command,
        "method": method,
        "settings": settings,
        "backend": backend,
        "backend_detail": backend_detail or None,
        "precision": precision,
        "counts": {
            "layers": len(layers),
            "scored": len(scores),
            "degenerate": len(layers) - len(scores),
            "flagged": sum(r.flagged for r in layers),
        },
        "cosine": {
            "min": min(scores) if scores else None,
            "median": statistics.median(scores) if scores else None,
            "max": max(scores) if scores else None,
        },
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "bytes_read": int(bytes_read),
        "warnings": list(warnings or []),
        "layers": [r.to_json() for r in layers],
    }


# what a plot may be saved as: matplotlib's Agg and vector backends, no extra package
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".svgz", ".eps", ".ps", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")


def check_plot_path(path: str | os.PathLike, flag: str = "--plot") -> None:
    """Fail early on a plot path that is a folder or has no image suffix (matplotlib would add
    ``.png`` to it and write elsewhere). A SafeMergeError, as the pipeline's other output checks."""
    p = Path(path)
    if p.is_dir():
        raise SafeMergeError(f"{flag} {p} is a folder; give a file name such as {p / REPORT_PNG}")
    if p.suffix.lower() not in PLOT_SUFFIXES:
        raise SafeMergeError(f"{flag} {p}: the file name must end in one of {', '.join(PLOT_SUFFIXES)}")


def json_writer(report: dict[str, Any]) -> Callable[[Path], object]:
    """What writes the report as JSON to a given file (for :func:`io.output.write_files`)."""
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    return lambda tmp: tmp.write_text(text, encoding="utf-8")


def write_json(report: dict[str, Any], path: str | os.PathLike) -> None:
    """The report as JSON, all or nothing: written beside ``path`` and renamed over it."""
    write_whole(path, json_writer(report))


_preloads: list[threading.Thread] = []


def preload_plotting() -> threading.Thread:
    """Import matplotlib's Agg figure machinery in the background (about half a second) while
    the caller reads and scores layers, so that :func:`plot` at the end only renders."""
    try:  # (cheap: before the run, not after it)
        found = importlib.util.find_spec("matplotlib") is not None
    except Exception:  # (an import hook or a broken install; the import would fail the same way)
        found = False
    if not found:
        raise PlotUnavailable("the plot needs matplotlib, which is not installed")

    def load() -> None:
        try:
            _import_agg()
        except Exception:  # (plot() says what went wrong, as one line, when it needs the import)
            pass

    t = threading.Thread(target=load, name="safemerge-matplotlib", daemon=True)
    t.start()
    _preloads.append(t)
    return t


def finish_preloads(timeout: float = 30.0) -> None:
    """Wait for background imports still running: a run that fails early must not exit while a
    daemon thread is inside an extension module's initialization (that can abort the process)."""
    while _preloads:
        _preloads.pop().join(timeout)


def _import_agg():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


class PlotUnavailable(SafeMergeError):
    """matplotlib is missing or does not import; ``reason`` says so without a remedy (the mergekit
    methods, which have no switch for the plot, write the JSON report alone and warn)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{reason}; install it (pip install --force-reinstall matplotlib) or leave the plot out "
                         "(--no-plot; for score, drop --plot)")
        self.reason = reason


def plot(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Cosine per transformer layer, one line per module kind (q_proj, v_proj, ...), flagged
    modules marked, the threshold drawn; written whole to ``path`` (its suffix gives the format)."""
    write_whole(path, plot_writer(report, path))


_LINE_COLOURS = [f"C{i}" for i in range(10) if i != 3]  # C3 is tab:red, kept for the flags and the threshold


def plot_writer(report: dict[str, Any], path: str | os.PathLike) -> Callable[[Path], object]:
    """Render :func:`plot`'s figure; return what saves it to a given file in ``path``'s format.

    Modules are placed by the layer number in their names; when some name has none (``lm_head``),
    by model order instead. Uses a bare Agg Figure (no pyplot state), so it is safe in any thread
    and needs no display.
    """
    try:
        Figure, FigureCanvasAgg = _import_agg()
        from matplotlib.ticker import MaxNLocator
    except Exception as exc:  # (a broken install: ImportError, or whatever its own imports raise)
        first = (str(exc).strip().splitlines() or [""])[0]
        raise PlotUnavailable(f"the plot needs matplotlib, which could not be imported ({type(exc).__name__}: "
                              f"{first})") from None

    layers = report["layers"]
    xs, by_layer, kinds = plot_series(layers)
    ys = [float("nan") if r["cosine"] is None else r["cosine"] for r in layers]
    span = max(xs, default=0) - min(xs, default=0)
    fig = Figure(figsize=(max(7.0, min(17.0, 0.1 * span + 5)), 4.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for k, (kind, idx) in enumerate(kinds.items()):
        ax.plot([xs[i] for i in idx], [ys[i] for i in idx], "o-", ms=3.5, lw=0.9, color=_LINE_COLOURS[k % 9],
                label=kind, zorder=2)
    flagged = [i for i, r in enumerate(layers) if r["flagged"]]
    if flagged:
        ax.scatter([xs[i] for i in flagged], [ys[i] for i in flagged], s=36, color="tab:red", marker="x",
                   label="flagged", zorder=3)
    for i, r in enumerate(layers):
        if r["cosine"] is None:
            ax.axvline(xs[i], color="0.85", lw=0.6, zorder=0)
    threshold = report["settings"].get("threshold")
    if threshold is not None and report["settings"].get("selection") == "threshold":
        ax.axhline(threshold, color="tab:red", ls="--", lw=1, label=f"threshold {threshold:g}")
    if span == 0 and xs:  # (one x: the locator would tick fractions around it)
        ax.set_xticks([xs[0]])
        ax.set_xlim(xs[0] - 1, xs[0] + 1)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("transformer layer" if by_layer else "module (model order)")
    ax.set_ylabel("cos(C dW, dW)")
    # y given: the title sits above the axes as usual, without a layout pass to dodge the ticks
    ax.set_title(f"{report['method']}: {report['counts']['flagged']} of {report['counts']['layers']} modules flagged", y=1.0)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    # Fixed margins (the legend sits in the right one) instead of tight_layout(), which renders
    # the whole figure once more just to measure the labels.
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.8 / width, right=1 - 1.35 / width, top=1 - 0.35 / height, bottom=0.55 / height)
    # zlib level 1 instead of 6: 4-6 ms less of a 65-70 ms render, for a PNG about 8% larger
    fmt = Path(path).suffix.lower().lstrip(".") or "png"
    kw: dict[str, Any] = {"pil_kwargs": {"compress_level": 1}} if fmt == "png" else {}
    # the same run, the same bytes: no date (SVG's dc:date, PDF's CreationDate, PostScript's
    # %%CreationDate line, svgz's gzip header) and, for SVG, ids from a fixed salt (else a random
    # one each save); PostScript's title and svgz's header would name the temporary file, so both
    # are rendered to memory first
    kw.update({"svg": {"metadata": {"Date": None}}, "svgz": {"metadata": {"Date": None}},
               "pdf": {"metadata": {"CreationDate": None}}}.get(fmt, {}))
    if fmt in ("ps", "eps"):
        def save_ps(tmp: Path) -> None:
            buf = io.BytesIO()
            fig.savefig(buf, format=fmt, **kw)
            tmp.write_bytes(re.sub(rb"^%%CreationDate:[^\n]*\n", b"", buf.getvalue(), count=1, flags=re.M))
        return save_ps
    if fmt not in ("svg", "svgz"):
        return lambda tmp: fig.savefig(tmp, format=fmt, **kw)

    def save_svg(tmp: Path) -> None:
        import gzip

        import matplotlib

        buf = io.BytesIO()
        with matplotlib.rc_context({"svg.hashsalt": "safemerge-ext"}):
            fig.savefig(buf, format="svg", **kw)
        if fmt == "svg":
            tmp.write_bytes(buf.getvalue())
            return
        with open(tmp, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as z:
            z.write(buf.getvalue())
    return save_svg


def plot_series(layers: list[dict[str, Any]]) -> tuple[list[int], bool, dict[str, list[int]]]:
    """Where the plot puts each module: (x per module, whether x is the layer number, the indices
    of each line's modules by label). x is the first all-digit part of the name
    (``model.layers.12.mlp.up_proj`` -> 12) and each module kind is a line; when some name has no
    number (``lm_head``), x is the model order and all modules are one line."""
    numbers = [next((int(p) for p in r["module"].split(".") if p.isdigit()), None) for r in layers]
    if all(n is not None for n in numbers):
        kinds: dict[str, list[int]] = {}
        for i, r in enumerate(layers):
            kinds.setdefault(r["module"].rsplit(".", 1)[-1], []).append(i)
        return numbers, True, kinds
    return list(range(len(layers))), False, {"cosine": list(range(len(layers)))}


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def layer_table(report: dict[str, Any]) -> str:
    """The per-layer table, in model order: each scored module's shape, rank, cosine, whether it is
    flagged and, for a layer that could not be scored, why."""
    rule = _threshold_rule(report)

    def cos(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "n/a"
        if rule is None:
            return f"{v:.4f}"
        # near the threshold, the digits that show which side of it the cosine lies on (0.1425
        # would read as not below a threshold of 0.14248)
        tau, below = rule[0], rule[1]
        for digits in range(4, 17):
            text = f"{v:.{digits}f}"
            if below(float(text), tau) == below(v, tau):
                return text
        return repr(v)

    head = ("layer", "shape", "rank", "cosine", "flagged")
    rows = [(r["module"], "x".join(str(n) for n in r.get("shape") or ()) or "-",
             "-" if r.get("rank") is None else str(r["rank"]), cos(r["cosine"]),
             ("yes" if r["flagged"] else "no") + (f"  ({r['reason']})" if r.get("reason") else ""))
            for r in report["layers"]]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(4)]
    right = (False, True, True, True)

    def line(row: tuple[str, ...]) -> str:
        cells = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)]
        return "  ".join([*cells, row[4]]).rstrip()

    return "\n".join([line(head), *(line(row) for row in rows)])


def _threshold_rule(report: dict[str, Any]) -> tuple[float, Callable[[float, float], bool], str] | None:
    """(threshold, the test that flags, its sign) of a run that flagged by one threshold, else None."""
    settings = report.get("settings") or {}
    tau, sign = settings.get("threshold"), settings.get("comparison")
    if settings.get("selection") != "threshold" or isinstance(tau, bool) or not isinstance(tau, (int, float)) \
            or sign not in ("<", "<="):
        return None
    return float(tau), (lambda a, b: a <= b) if sign == "<=" else (lambda a, b: a < b), sign


def _rule_text(report: dict[str, Any]) -> str:
    """How the run chose its flagged layers, for the summary: "cosine < 0.35", "the 4 lowest", ..."""
    rule = _threshold_rule(report)
    if rule is not None:
        return f"cosine {rule[2]} {rule[0]!r}"
    settings = report.get("settings") or {}
    if settings.get("selection") == "num_layers":
        return f"the {settings.get('num_layers')} lowest"
    if settings.get("selection") == "fraction":
        return f"the lowest {settings.get('fraction')!r} of the scored"
    if isinstance(settings.get("selection"), str) and settings["selection"].startswith("threshold"):
        return f"cosine {settings.get('comparison')} each layer's threshold"
    return ""


def summary_table(report: dict[str, Any], *, name_flagged: bool = True) -> str:
    """A compact, fixed-width summary of the run for the terminal (``name_flagged``: with a line
    naming the first flagged layers, which the per-layer table already shows)."""
    c, cos, t = report["counts"], report["cosine"], report["timings"]

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    flagged = [r["module"] for r in report["layers"] if r["flagged"]]
    rows = [
        ("method", report["method"]),
        ("backend", report["backend"] + ("" if report.get("precision", "ieee") == "ieee"
                                         else f" ({report['precision']} operands)")),
        ("layers scored", f"{c['scored']} of {c['layers']}" + (f" ({c['degenerate']} degenerate)" if c["degenerate"] else "")),
        ("flagged", str(c["flagged"]) + (f"  ({rule})" if (rule := _rule_text(report)) else "")),
        ("cosine min / median / max", f"{f(cos['min'])} / {f(cos['median'])} / {f(cos['max'])}"),
        ("time", f"{t.get('total_s', 0.0):.2f} s"),
        ("bytes read", _fmt_bytes(report["bytes_read"])),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    if flagged and name_flagged:
        shown = ", ".join(flagged[:8]) + (f", ... (+{len(flagged) - 8})" if len(flagged) > 8 else "")
        lines.append(f"{'flagged layers'.ljust(width)}  {shown}")
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)
