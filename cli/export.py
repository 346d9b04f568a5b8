"""`molden export`: a cache back to a file ASE reads."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from molden.cli.console import console, progress_bar, user_errors

def export(
    path: Path = typer.Argument(..., help="a cache written by molden preprocess"),
    out: Path = typer.Option(..., "--out", "-o", help="output file; format from its extension (extxyz, traj, ...)"),
    split: Optional[str] = typer.Option(None, help="export one split only"),
) -> None:
    """Write a cache back to a file ASE reads (tags, fixed atoms, energies, forces kept)."""
    from molden.data.export import export_cache

    with user_errors(), progress_bar("export") as hook:
        n = export_cache(path, out, split=split, progress=hook)
    console.print(f"wrote {n:,} structures to {out}")
