"""`molden models`: every backbone preset with its parameter count and source."""

from __future__ import annotations

import typer
from rich.table import Table

from molden.cli.console import console


def models(as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON")) -> None:
    """List the model presets (paper sizes and CPU twins) with their parameter counts."""
    from molden.models.presets import describe_presets

    rows = describe_presets()
    if as_json:
        import json

        print(json.dumps([r.model_dump() for r in rows], indent=2))
        return
    table = Table(title="model presets (backbone parameters)")
    for column in ("preset", "family", "parameters", "equivariant", "source"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(r.name, r.family, f"{r.parameters:,}", "yes" if r.equivariant else "no", r.description)
    console.print(table)
