"""`molden demo`: the pipeline that exists so far, on the embedded EMT data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from molden.cli.console import console
from molden.cli.inspect import inspect
from molden.cli.preprocess import preprocess


def demo(
    out_dir: Path = typer.Option(Path("molden-demo"), help="where the demo writes its files"),
    systems: Optional[int] = typer.Option(None, help="EMT systems to generate (default: the embedded default)"),
    workers: int = typer.Option(1, help="processes for the EMT relaxations"),
) -> None:
    """Run the whole pipeline that exists so far on the embedded EMT catalysis data."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir / "emt.h5"
    console.rule("1/2  molden preprocess emt")
    preprocess(
        source="emt", inputs=None, out=cache, cutoff=None, max_neighbors=None, limit=None, workers=workers,
        seed=0, val=None, test=None, split_by=None, emt_systems=systems, oc20_frames="all", pcqm4mv2_targets=None, resume=True,
    )
    console.rule("2/2  molden inspect")
    inspect(path=cache, as_json=False)
