"""`molden inspect`: a cache's summary as a table or JSON."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from molden.cli.console import console, user_errors

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
