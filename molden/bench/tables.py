"""Printing a benchmark's rich table from `python -m molden.bench.<module>`."""

from __future__ import annotations


def print_table(table) -> None:
    """Print `table` on stdout; piped to a file or a log, wide enough that its numbers are never
    cut or wrapped (rich takes 80 columns there)."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(table)
