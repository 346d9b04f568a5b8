"""`molden export`: a cache back to extxyz or an ASE trajectory (docs/EXPORT.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from molden.cli.console import console, err_console, progress_bar, user_errors


def export(
    path: Path = typer.Argument(..., help="a cache written by molden preprocess"),
    out: Path = typer.Option(
        ..., "--out", "-o", help="output file; format from its ending: .extxyz/.xyz (optionally .gz/.bz2/.xz) or .traj"
    ),
    split: Optional[str] = typer.Option(None, help="export one split only"),
    energy_key: str = typer.Option(
        "energy", help="'energy': ASE calculator result; any other name (e.g. REF_energy) is written raw to atoms.info"
    ),
    forces_key: str = typer.Option(
        "forces", help="'forces': ASE calculator result (zero on fixed atoms when read with get_forces()); "
        "any other name (e.g. REF_forces, for MACE) is written raw to atoms.arrays"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out file"),
) -> None:
    """Write a cache back to a file ASE reads; every field is kept (docs/EXPORT.md)."""
    from molden.data.export import export_cache

    with user_errors(), progress_bar("export") as hook:
        summary = export_cache(
            path, out, split=split, energy_key=energy_key, forces_key=forces_key, overwrite=overwrite, progress=hook
        )
    console.print(f"wrote {summary.n_structures:,} structures to {summary.path} ({summary.format})")
    if summary.fixed_atoms_with_forces and summary.forces_key == "forces":
        err_console.print(
            f"[yellow]note:[/] {summary.fixed_atoms_with_forces:,} fixed atoms carry forces; tools that call "
            "atoms.get_forces() (MACE with --forces_key=forces) read them as zero. For training, export with "
            "--energy-key REF_energy --forces-key REF_forces (docs/EXPORT.md).",
            highlight=False, soft_wrap=True,
        )
