"""The per-layer report every face writes: ``safemerge_report.json``, a PNG plot, a summary table.

Schema (SPEC section 2)::

    {"tool": "safemerge-ext", "version": ..., "command": "merge", "method": "safemerge",
     "settings": {...}, "backend": "cpp", "counts": {...}, "cosine": {"min", "median", "max"},
     "timings": {...}, "bytes_read": int, "warnings": [...],
     "layers": [{"module": "model.layers.0.self_attn.q_proj", "cosine": 0.41, "flagged": false,
                 "reason": null, "action": "kept", ...}, ...]}

Layers are in model order; an undefined cosine is ``null`` with the reason in ``reason``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safemerge_ext import __version__

REPORT_JSON = "safemerge_report.json"
REPORT_PNG = "safemerge_report.png"


@dataclass
class LayerRecord:
    """One scored layer (a linear module) and what was done to it."""

    module: str
    cosine: float
    flagged: bool = False
    reason: str | None = None
    action: str = "kept"  # kept | merged | projected | skipped
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
) -> dict[str, Any]:
    """Assemble the report dict (JSON-ready) from the layer records and the run's facts."""
    scores = [r.cosine for r in layers if math.isfinite(r.cosine)]
    return {
        "tool": "safemerge-ext",
        "version": __version__,
        "command": command,
        "method": method,
        "settings": settings,
        "backend": backend,
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


def write_json(report: dict[str, Any], path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")


def preload_plotting() -> threading.Thread:
    """Import matplotlib's Agg figure machinery in the background (about half a second) while
    the caller reads and scores layers, so that :func:`plot` at the end only renders."""
    t = threading.Thread(target=_import_agg, name="safemerge-matplotlib", daemon=True)
    t.start()
    return t


def _import_agg():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


def plot(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Cosine per layer in model order, the threshold line, flagged layers marked.

    Uses a bare Agg Figure (no pyplot state), so it is safe in any thread and needs no display.
    """
    Figure, FigureCanvasAgg = _import_agg()

    layers = report["layers"]
    xs = list(range(len(layers)))
    ys = [float("nan") if r["cosine"] is None else r["cosine"] for r in layers]
    fig = Figure(figsize=(max(6.0, min(24.0, 0.12 * len(layers) + 4)), 4.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(xs, ys, "-", color="0.75", lw=0.8, zorder=1)
    kept = [(x, y) for x, y, r in zip(xs, ys, layers) if not r["flagged"]]
    flagged = [(x, y) for x, y, r in zip(xs, ys, layers) if r["flagged"]]
    if kept:
        ax.scatter(*zip(*kept), s=14, color="tab:blue", label="kept", zorder=2)
    if flagged:
        ax.scatter(*zip(*flagged), s=30, color="tab:red", marker="x", label="flagged", zorder=3)
    degenerate = [x for x, r in zip(xs, layers) if r["cosine"] is None]
    for x in degenerate:
        ax.axvline(x, color="0.85", lw=0.6, zorder=0)
    threshold = report["settings"].get("threshold")
    if threshold is not None and report["settings"].get("selection") == "threshold":
        ax.axhline(threshold, color="tab:red", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("cos(C dW, dW)")
    title = f"{report['method']}: {report['counts']['flagged']} of {report['counts']['layers']} layers flagged"
    ax.set_title(title)
    if len(layers) <= 40:
        ax.set_xticks(xs, [_short(r["module"]) for r in layers], rotation=90, fontsize=6)
    ax.legend(loc="best", fontsize=8)
    # Fixed margins instead of tight_layout(), which renders the whole figure once more just to
    # measure the labels (a third of the plot's cost); the bottom margin holds the rotated ticks.
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.2 / width, top=1 - 0.35 / height,
                        bottom=(1.05 if len(layers) <= 40 else 0.5) / height)
    fig.savefig(path)


def _short(module: str) -> str:
    parts = module.split(".")
    nums = [p for p in parts if p.isdigit()]
    return f"{nums[0]}.{parts[-1]}" if nums else parts[-1]


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def summary_table(report: dict[str, Any]) -> str:
    """A compact, fixed-width summary of the run for the terminal."""
    c, cos, t = report["counts"], report["cosine"], report["timings"]

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    flagged = [r["module"] for r in report["layers"] if r["flagged"]]
    rows = [
        ("method", report["method"]),
        ("backend", report["backend"]),
        ("layers scored", f"{c['scored']} of {c['layers']}" + (f" ({c['degenerate']} degenerate)" if c["degenerate"] else "")),
        ("flagged", str(c["flagged"])),
        ("cosine min / median / max", f"{f(cos['min'])} / {f(cos['median'])} / {f(cos['max'])}"),
        ("time", f"{t.get('total_s', 0.0):.2f} s"),
        ("bytes read", _fmt_bytes(report["bytes_read"])),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    if flagged:
        shown = ", ".join(flagged[:8]) + (f", ... (+{len(flagged) - 8})" if len(flagged) > 8 else "")
        lines.append(f"{'flagged layers'.ljust(width)}  {shown}")
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)
