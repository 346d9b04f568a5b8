"""The `molden` command: parses options, builds a config, calls one library function.

Errors molden raises on purpose (`MoldenError`) and invalid options are printed as one line on
stderr with exit code 1; Ctrl-C exits 130 and leaves resumable work in place.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from molden.errors import MoldenError

app = typer.Typer(
    help="molden: denoising for molecular and materials graph neural networks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn molden's own errors into one line and a non-zero exit code."""
    try:
        yield
    except MoldenError as error:
        err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        err_console.print(f"[bold red]error:[/] invalid option {where}: {first['msg']}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("interrupted: run the same command again to resume", highlight=False)
        raise typer.Exit(130) from None


@contextmanager
def progress_bar(description: str) -> Iterator:
    """A rich progress bar; yields a hook(done, total) for the library."""
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task(description, total=None)

        def hook(done: int, total: int | None) -> None:
            progress.update(task, completed=done, total=total)

        yield hook


@app.command()
def preprocess(
    source: str = typer.Argument(..., help="qm9 | oc20 | pcqm4mv2 | ase | emt"),
    inputs: Optional[List[Path]] = typer.Argument(None, help="files or folders (none for emt; qm9 defaults to qm9pack)"),
    out: Path = typer.Option(..., "--out", "-o", help="the .h5 cache to write"),
    cutoff: Optional[float] = typer.Option(None, help="radius-graph cutoff, Å (default: 6 for oc20/emt, 5 otherwise)"),
    max_neighbors: Optional[int] = typer.Option(None, help="keep the k nearest neighbours per atom (ties kept)"),
    limit: Optional[int] = typer.Option(None, help="stop after this many structures"),
    workers: int = typer.Option(1, help="processes for EMT relaxations, torch threads for graphs"),
    seed: int = typer.Option(0, help="seed of the train/val/test split (and of EMT generation)"),
    val: Optional[float] = typer.Option(None, help="validation systems: a count (>=1) or a fraction"),
    test: Optional[float] = typer.Option(None, help="test systems: a count (>=1) or a fraction"),
    split_by: Optional[str] = typer.Option(None, help="system | structure (default: structure for ase, else system)"),
    emt_systems: Optional[int] = typer.Option(None, help="emt: number of adsorbate+slab systems to relax"),
    oc20_frames: str = typer.Option("all", help="oc20 .traj: all | initial | final frames"),
    pcqm4mv2_targets: Optional[Path] = typer.Option(None, help="pcqm4mv2: OGB data.csv(.gz) with homolumogap"),
    resume: bool = typer.Option(True, help="resume an interrupted run from OUT.h5.partial"),
) -> None:
    """Read a dataset, build radius graphs and write an HDF5 graph cache."""
    from molden.data.emt import EMTConfig
    from molden.data.preprocess import PreprocessConfig, default_split, run_preprocess
    from molden.data.splits import SplitConfig

    with user_errors():
        split = None
        if val is not None or test is not None or seed != 0 or split_by is not None:
            changes = {"val": val, "test": test, "seed": seed, "group_by": split_by}
            split = SplitConfig.model_validate(
                default_split(source).model_dump() | {k: v for k, v in changes.items() if v is not None}
            )
        emt_update = {"seed": seed} | ({"n_systems": emt_systems} if emt_systems is not None else {})
        config = PreprocessConfig(
            source=source, out=out, inputs=inputs or [], cutoff_angstrom=cutoff, max_num_neighbors=max_neighbors,
            limit=limit, workers=workers, split=split, resume=resume, oc20_frames=oc20_frames,
            pcqm4mv2_targets=pcqm4mv2_targets, emt=EMTConfig.model_validate(emt_update),
        )
        with progress_bar(f"preprocess {source}") as hook:
            summary = run_preprocess(config, progress=hook)
    _print_preprocess_summary(summary)


def _print_preprocess_summary(summary) -> None:
    table = Table(title=f"wrote {summary.path}", show_header=False)
    rows = [
        ("source", summary.source),
        ("structures", f"{summary.n_structures:,}"),
        ("atoms", f"{summary.n_atoms:,}"),
        ("edges", f"{summary.n_edges:,} ({summary.edges_per_atom:.1f} per atom, cutoff {summary.cutoff_angstrom} Å)"),
        ("splits", ", ".join(f"{k} {v:,}" for k, v in summary.splits.items())),
        ("time", f"{summary.seconds:.1f} s" + (f" (resumed after {summary.resumed_from:,})" if summary.resumed_from else "")),
    ]
    if summary.edges_dropped_by_max_neighbors:
        rows.append(("dropped by max-neighbours", f"{summary.edges_dropped_by_max_neighbors:,} edges"))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    if summary.isolated_atoms:
        examples = ", ".join(summary.structures_with_isolated_atoms[:5])
        err_console.print(
            f"[yellow]warning:[/] {summary.isolated_atoms} atoms have no neighbour within the cutoff (e.g. {examples})",
            highlight=False,
        )


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="a cache written by molden preprocess"),
    as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
) -> None:
    """Counts, element histogram, size, cutoff and edges per atom of a cache."""
    from molden.data.cache_summary import summarize_cache

    with user_errors():
        summary = summarize_cache(path)
    if as_json:
        print(summary.model_dump_json(indent=2))
        return
    table = Table(title=str(path), show_header=False)
    rows = [
        ("source", summary.source),
        ("size", f"{summary.size_bytes / 2**20:.2f} MiB"),
        ("structures / systems", f"{summary.n_structures:,} / {summary.n_systems:,}"),
        ("atoms", f"{summary.n_atoms:,}"),
        ("edges", f"{summary.n_edges:,}"),
        ("edges per atom", f"{summary.edges_per_atom:.2f}"),
        ("cutoff", f"{summary.cutoff_angstrom} Å" + (f", max {summary.max_num_neighbors} neighbours" if summary.max_num_neighbors else "")),
        ("fields", ", ".join(summary.fields)),
        ("splits", ", ".join(f"{k} {v:,}" for k, v in summary.splits.items())),
        ("elements", "  ".join(f"{k} {v:,}" for k, v in sorted(summary.element_histogram.items(), key=lambda kv: -kv[1]))),
        ("molden / schema", f"{summary.molden_version} / {summary.schema_version}, created {summary.created}"),
    ]
    if summary.energy_per_atom_mean_ev is not None:
        rows.append(("energy per atom", f"{summary.energy_per_atom_mean_ev:.4f} ± {summary.energy_per_atom_std_ev:.4f} eV"))
    if summary.forces_rms_ev_per_angstrom is not None:
        rows.append(("forces rms", f"{summary.forces_rms_ev_per_angstrom:.4f} eV/Å"))
    for name, s in summary.targets.items():
        rows.append((f"target {name}", f"{s['mean']:.6g} ± {s['std']:.6g}"))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


@app.command()
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


@app.command()
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


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
