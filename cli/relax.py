"""`molden relax`: options into a `RelaxConfig`, then `run_relax`, then the comparison table."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from molden.cli.console import console, err_console, note_line, user_errors

OPTION_NAMES = {"fmax_ev_per_angstrom": "--fmax", "max_steps": "--steps", "batch_size": "--batch-size",
                "methods": "--method", "input": "INPUT", "out": "--out",
                "skin_angstrom": "--skin", "lbfgs_guess": "--lbfgs-guess", "direct_passes": "--direct-passes",
                "forces_check": "--forces-check"}


def relax(
    input: Path = typer.Argument(..., help="structures: an ASE-readable file (every frame) or a molden .h5 cache"),
    out: Path = typer.Option(..., "--out", "-o", help="relaxed structures (.extxyz or .traj); results JSON beside it"),
    model: str = typer.Option("emt", help="force field for lbfgs/fire: a checkpoint with energy and forces, or emt"),
    direct_model: Optional[Path] = typer.Option(None, help="checkpoint with a position head, for --method direct"),
    direct_passes: int = typer.Option(1, help="direct: forward passes, each from the last one's positions"),
    forces_check: str = typer.Option("auto", help="FbT/AFbT from this calculator's forces at the relaxed structures: "
                                                  "emt | none | auto (emt for a 'preprocess emt' cache)"),
    method: List[str] = typer.Option(["lbfgs"], help="direct | lbfgs | fire | all (repeatable)"),
    split: Optional[str] = typer.Option(None, help="cache: the split whose systems are relaxed"),
    fmax: float = typer.Option(0.05, help="converged below this force on every free atom, eV/Å"),
    steps: int = typer.Option(300, help="optimiser steps at most per structure"),
    preset: str = typer.Option("ase", help="ase (ASE's defaults) | oc20 (L-BFGS maxstep 0.04 Å, memory 50)"),
    lbfgs_guess: str = typer.Option("fixed", help="L-BFGS's initial inverse Hessian: fixed (1/α, ASE's steps) | scaled "
                                                   "(from each structure's curvature: fewer force calls)"),
    batch_size: int = typer.Option(64, help="structures relaxed at once"),
    skin: Optional[float] = typer.Option(None, help="Verlet skin of a molden model's radius graph, Å (0: searched "
                                         "every step; the same pairs either way)", show_default="0.5"),
    limit: Optional[int] = typer.Option(None, help="relax only the first this many structures"),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace existing output files"),
) -> None:
    """Relax structures with batched L-BFGS/FIRE (a molden model or EMT), or predict relaxed
    structures directly, and compare with the reference relaxations when the input has them."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from molden.relax.run import RelaxConfig, run_relax

    methods = ["direct", "lbfgs", "fire"] if "all" in method else list(method)
    if "all" in method and direct_model is None:
        methods.remove("direct")
    with user_errors(OPTION_NAMES):
        config = RelaxConfig(input=input, out=out, model=model, direct_model=direct_model, methods=methods, split=split,
                             fmax_ev_per_angstrom=fmax, max_steps=steps, preset=preset, batch_size=batch_size,
                             lbfgs_guess=lbfgs_guess,
                             limit=limit, device=device, overwrite=overwrite, direct_passes=direct_passes,
                             forces_check=forces_check,
                             **({} if skin is None else {"skin_angstrom": skin}))
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err_console, transient=True) as progress:
            tasks: dict[str, int] = {}

            def hook(name: str, done: int, total: int) -> None:
                if name not in tasks:
                    tasks[name] = progress.add_task(f"{name}: converged or stopped", total=total)
                progress.update(tasks[name], completed=done)

            results = run_relax(config, on_progress=hook, notify=note_line)
    settings = f"preset {preset}" + (f", L-BFGS guess {lbfgs_guess}" if lbfgs_guess != "fixed" else "")
    table = Table(title=f"molden relax {input} ({model}, fmax {fmax} eV/Å, {settings})")
    rows = [r.row() for r in results]
    checked = any("fbt" in r for r in rows)
    for column in ("method", "structures", "ADwT", "energy MAE meV", "EwT", *(("FbT", "AFbT") if checked else ()),
                   "mean steps", "converged", "ms / structure"):
        table.add_column(column, justify="right" if column != "method" else "left")
    for r in rows:
        forces = (_fmt(r.get("fbt")), _fmt(r.get("afbt"))) if checked else ()
        table.add_row(r["method"], str(r["structures"]), _fmt(r.get("adwt")), _fmt(r.get("energy_mae_mev"), ".1f"),
                      _fmt(r.get("ewt")), *forces, f"{r['mean_steps']:.1f}", f"{r['converged_fraction']:.0%}",
                      f"{r['wall_ms_per_structure']:.1f}")
    console.print(table)
    by_method = {r["method"]: r for r in rows}
    if "direct" in by_method and "lbfgs" in by_method:
        console.print(f"direct prediction is {by_method['lbfgs']['wall_s'] / max(by_method['direct']['wall_s'], 1e-9):.0f}× "
                      "faster than L-BFGS relaxation")
    note_line(f"wrote {out} and {out.with_suffix('.json')}")


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)
