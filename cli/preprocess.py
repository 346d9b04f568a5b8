"""`molden preprocess`: options into a `PreprocessConfig`, then `run_preprocess`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from molden.cli.console import console, err_console, note_line, progress_bar, user_errors

# Shown in --help without importing the library (torch makes that take seconds); a test keeps
# them equal to `QM9_SPLIT`, `SplitConfig` and `EMTConfig`.
HELD_OUT_DEFAULT = "qm9 10,000; ase, oc20, pcqm4mv2 0.1; emt its own ID/OOD split"
EMT_SYSTEMS_DEFAULT = 100
EMT_MD_DEFAULTS = (900.0, 40)  # EMTMDConfig's temperature_kelvin and frames

# Config fields as the command line names them, for one-line messages about bad values.
OPTION_NAMES = {
    "source": "source",
    "cutoff_angstrom": "--cutoff",
    "max_num_neighbors": "--max-neighbors",
    "group_by": "--split-by",
    "emt.n_systems": "--emt-systems",
    "n_systems": "--emt-systems",
    "emt.seed": "--seed",
    "emt.md.temperature_kelvin": "--emt-md-temperature",
    "md.temperature_kelvin": "--emt-md-temperature",
    "emt.md.frames": "--emt-md-frames",
    "md.frames": "--emt-md-frames",
}


def preprocess(
    source: str = typer.Argument(..., help="qm9 | oc20 | pcqm4mv2 | ase | emt"),
    inputs: Optional[List[Path]] = typer.Argument(None, help="files or folders (none for emt; qm9 defaults to qm9pack)"),
    out: Path = typer.Option(..., "--out", "-o", help="the .h5 cache to write"),
    cutoff: Optional[float] = typer.Option(None, help="radius-graph cutoff, Å (default: 6 for oc20/emt, 5 otherwise)"),
    max_neighbors: Optional[int] = typer.Option(None, help="keep the k nearest neighbours per atom (ties kept)"),
    limit: Optional[int] = typer.Option(None, help="stop after this many structures"),
    workers: int = typer.Option(1, help="processes for EMT relaxations, torch threads for graphs"),
    seed: int = typer.Option(0, help="seed of the train/val/test split (and of EMT generation)"),
    val: Optional[float] = typer.Option(
        None, help="validation systems: a count (whole number) or a fraction (below 1)", show_default=HELD_OUT_DEFAULT
    ),
    test: Optional[float] = typer.Option(
        None, help="test systems: a count (whole number) or a fraction (below 1)", show_default=HELD_OUT_DEFAULT
    ),
    split_by: Optional[str] = typer.Option(None, help="system | structure (default: structure for ase, else system)"),
    emt_systems: Optional[int] = typer.Option(
        None, help="emt: number of adsorbate+slab systems to relax", show_default=str(EMT_SYSTEMS_DEFAULT)
    ),
    emt_md_temperature: Optional[float] = typer.Option(
        None, help="emt: instead of each relaxation, molecular dynamics (Langevin NVT) from the relaxed system at this "
        "thermostat temperature, K (the frames include the heating from the minimum): far-from-equilibrium S2EF "
        "frames, as OC20's MD data",
        show_default=f"{EMT_MD_DEFAULTS[0]:g} with --emt-md-frames"),
    emt_md_frames: Optional[int] = typer.Option(
        None, help="emt: MD frames per system (5 fs apart); implies MD", show_default=f"{EMT_MD_DEFAULTS[1]} with --emt-md-temperature"),
    oc20_frames: str = typer.Option("all", help="oc20 .traj: all | initial | final frames"),
    oc20_references: Optional[Path] = typer.Option(
        None, help="oc20 .traj: OC20's oc20_ref.pkl (or JSON / CSV of system id → eV): adds the targets reference_energy "
        "and adsorption_energy (relaxed energy − reference, OC20's IS2RE target: --is2re-target adsorption_energy)"),
    pcqm4mv2_targets: Optional[Path] = typer.Option(None, help="pcqm4mv2: OGB data.csv(.gz) with homolumogap"),
    resume: bool = typer.Option(True, help="resume an interrupted run from OUT.partial (--no-resume discards it)"),
    overwrite: bool = typer.Option(
        False, help="replace an existing cache of other settings, or a partial file of other settings"
    ),
) -> None:
    """Read a dataset, build radius graphs and write an HDF5 graph cache."""
    from molden.data.emt import EMTConfig
    from molden.data.splits import SplitConfig
    from molden.pipeline.preprocess import PreprocessConfig, default_split

    with user_errors(OPTION_NAMES):
        split = None
        if val is not None or test is not None or seed != 0 or split_by is not None:
            changes = {"val": val, "test": test, "seed": seed, "group_by": split_by}
            split = SplitConfig.model_validate(
                default_split(source).model_dump() | {k: v for k, v in changes.items() if v is not None}
            )
        emt_update = {"seed": seed} | ({"n_systems": emt_systems} if emt_systems is not None else {})
        md = {"temperature_kelvin": emt_md_temperature, "frames": emt_md_frames}
        if any(v is not None for v in md.values()):
            emt_update["md"] = {k: v for k, v in md.items() if v is not None}
        config = PreprocessConfig(
            source=source, out=out, inputs=inputs or [], cutoff_angstrom=cutoff, max_num_neighbors=max_neighbors,
            limit=limit, workers=workers, split=split, resume=resume, overwrite=overwrite, oc20_frames=oc20_frames,
            oc20_references=oc20_references, pcqm4mv2_targets=pcqm4mv2_targets, emt=EMTConfig.model_validate(emt_update),
        )
        summary = run_with_progress(config)
    print_preprocess_summary(summary)


def run_with_progress(config):
    """`run_preprocess` under a progress bar, printing notes about existing files as they come."""
    from molden.pipeline.preprocess import run_preprocess

    with progress_bar(f"preprocess {config.source}") as hook:
        return run_preprocess(config, progress=hook, notify=note_line)


def print_preprocess_summary(summary) -> None:
    """The table of what `run_preprocess` wrote (or found already complete)."""
    verb = "already complete" if summary.reused else "wrote"
    table = Table(title=f"{verb} {summary.path}", show_header=False)
    time_row = "reused, nothing redone" if summary.reused else f"{summary.seconds:.1f} s" + (
        f" (resumed after {summary.resumed_from:,})" if summary.resumed_from else ""
    )
    rows = [
        ("source", summary.source),
        ("structures", f"{summary.n_structures:,}"),
        ("atoms", f"{summary.n_atoms:,}"),
        ("edges", f"{summary.n_edges:,} ({summary.edges_per_atom:.1f} per atom, cutoff {summary.cutoff_angstrom} Å)"),
        ("splits", ", ".join(f"{k} {v:,}" for k, v in summary.splits.items())),
        ("time", time_row),
    ]
    if summary.edges_dropped_by_max_neighbors:
        rows.append(("dropped by max-neighbours", f"{summary.edges_dropped_by_max_neighbors:,} edges"))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    if summary.isolated_atoms:
        examples = ", ".join(summary.structures_with_isolated_atoms[:5])
        err_console.print(
            f"[yellow]warning:[/] {summary.isolated_atoms} atoms have no neighbour within the cutoff"
            + (f" (e.g. {examples})" if examples else ""),
            highlight=False,
        )
