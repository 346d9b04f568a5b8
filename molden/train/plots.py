"""Learning-curve PNGs from a run's `metrics.jsonl`: one subplot per metric, train and
validation against the optimiser step; and validation error against wall-clock for comparing
runs (molden against a peer on the same budget).

matplotlib is imported inside the functions, so importing molden never loads it; figures are
drawn on an Agg canvas of their own (no pyplot, no global backend switch), which is safe in a
training process, a notebook or a thread.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from molden.errors import MoldenConfigError, MoldenInputError
from molden.train.metrics_log import JSONL_NAME, RECORD_KEYS, read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CURVES_NAME = "learning_curves.png"
SPLIT_STYLE = {  # colour-blind-safe tab10 pair; the test split is a few points, drawn as markers
    "train": dict(color="tab:blue", linewidth=1.0, alpha=0.8),
    "val": dict(color="tab:orange", linewidth=1.6, marker="o", markersize=3),
    "test": dict(color="tab:green", linestyle="none", marker="s", markersize=5),
}
MAX_COLUMNS = 3


def plot_learning_curves(run_dir: Path, out: Path | None = None, *, overwrite: bool = False) -> list[Path]:
    """Draw `run_dir`'s metrics as one PNG (default `run_dir/learning_curves.png`, redrawn at
    will; `out` may be a file or a directory) and return the path(s) written. Any other
    existing file is replaced only with `overwrite`, and never by anything but a PNG name."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    source = run_dir / JSONL_NAME if run_dir.is_dir() else run_dir
    if not any(key not in RECORD_KEYS for record in records for key in record):
        raise MoldenInputError(source, "no metrics recorded yet")
    name = run_dir.name if run_dir.is_dir() else run_dir.parent.name
    figure = learning_curves_figure(records, title=name)
    base = run_dir if run_dir.is_dir() else run_dir.parent
    target = base / CURVES_NAME if out is None else Path(out)
    if target.is_dir():
        target = target / CURVES_NAME
    if target.suffix.lower() != ".png":
        raise MoldenConfigError(f"--out {target}: name a .png file (or a folder)")
    if target.exists() and target.resolve() != (base / CURVES_NAME).resolve() and not overwrite:
        raise MoldenConfigError(f"--out {target} exists: pass --overwrite to replace it")
    save_png(figure, target)
    return [target]


def learning_curves_figure(records: list[dict], title: str) -> Figure:
    """The learning-curves figure of `records` (as `read_metrics` returns them): one subplot per
    metric name, in order of first appearance, x = global optimiser step, one line per split;
    log-y where every value is positive and they span more than a decade."""
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(key for record in records for key in record if key not in RECORD_KEYS))
    if not names:
        raise ValueError("the records hold no metric values")
    ncols = min(MAX_COLUMNS, len(names))
    nrows = math.ceil(len(names) / ncols)
    figure = Figure(figsize=(4.2 * ncols, 3.0 * nrows + 0.6), layout="constrained")
    grid = figure.subplots(nrows, ncols, sharex=True, squeeze=False)
    axes = grid.ravel()
    for ax in axes[len(names):]:
        ax.remove()
    for index, (ax, name) in enumerate(zip(axes, names)):
        finite = []
        for split, style in SPLIT_STYLE.items():
            points = [(r["step"], r[name]) for r in records if r["split"] == split and name in r]
            if not points:
                continue
            steps, values = zip(*points)
            ax.plot(steps, values, label=split, **style)
            finite += [v for v in values if math.isfinite(v)]
        if finite and min(finite) > 0 and max(finite) > 10 * min(finite):
            ax.set_yscale("log")
        if not finite:
            ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(name, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
        # The last axis of each column carries the step labels, also above a removed cell.
        if index + ncols >= len(names):
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("step")
    figure.suptitle(
        f"{title}: step {max(r['step'] for r in records)}, epoch {max(r['epoch'] for r in records):.3g}, "
        f"{_format_seconds(max(r['wall_s'] for r in records))}"
    )
    return figure


def plot_mae_vs_wallclock(runs: Mapping[str, list[dict]], metric: str, out: Path) -> Path:
    """One figure of `metric`'s validation curve of several runs (label → records) against
    wall-clock time, log-y: runs compared at equal time budget. Returns `out`."""
    from matplotlib.figure import Figure

    curves = {}
    for label, records in runs.items():
        points = [(r["wall_s"], r[metric]) for r in records if r["split"] == "val" and math.isfinite(r.get(metric, math.nan))]
        if not points:
            raise MoldenInputError(label, f"no validation values of {metric}")
        curves[label] = points
    if not curves:
        raise MoldenInputError(None, "no runs to compare")
    longest = max(t for points in curves.values() for t, _ in points)
    scale, unit = (60.0, "min") if longest > 600 else (1.0, "s")
    figure = Figure(figsize=(6.0, 4.2), layout="constrained")
    ax = figure.subplots()
    for label, points in curves.items():
        times, values = zip(*points)
        ax.plot([t / scale for t in times], values, marker="o", markersize=3, label=label)
    if all(v > 0 for points in curves.values() for _, v in points):
        ax.set_yscale("log")
    ax.set_xlabel(f"wall-clock ({unit})")
    ax.set_ylabel(metric)
    ax.set_title(f"validation {metric} against wall-clock", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(frameon=False)
    out = Path(out)
    save_png(figure, out)
    return out


def _format_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def save_png(figure: Figure, path: Path) -> None:
    """Render on an Agg canvas to a temporary file, then rename: a reader never sees half a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        figure.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
