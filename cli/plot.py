"""`molden plot RUN_DIR`: a run's learning curves as a PNG, on demand (also during training)."""

from __future__ import annotations

from pathlib import Path

import typer

from molden.cli.console import console, user_errors


def plot(
    run_dir: Path = typer.Argument(..., help="run directory holding metrics.jsonl"),
    out: Path | None = typer.Option(
        None, "--out", help="PNG file or directory to write to (default RUN_DIR/learning_curves.png)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out file"),
) -> None:
    """Draw a run's learning curves: one panel per metric, train and validation against step."""
    from molden.train.plots import plot_learning_curves

    with user_errors():
        paths = plot_learning_curves(run_dir, out, overwrite=overwrite)
    for path in paths:
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)
