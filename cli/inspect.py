"""`molden inspect`: a cache's summary as a table or JSON; `--verify` reads every byte."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from molden.cli.console import console, print_cache_summary, progress_bar, user_errors


def inspect(
    path: Path = typer.Argument(..., help="a cache written by molden preprocess"),
    as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
    verify: bool = typer.Option(
        False, "--verify", help="read every dataset fully and check its checksums; exit 1 at the first damage"
    ),
) -> None:
    """Counts, element histogram, size, cutoff and edges per atom of a cache."""
    from molden.data.cache_summary import summarize_cache
    from molden.data.cache_verify import raise_if_damaged, verify_cache

    with user_errors():
        summary = summarize_cache(path)
        report = None
        if verify:
            with progress_bar(f"verifying {path.name} (MiB)") as hook:
                report = verify_cache(path, progress=lambda done, total: hook(done >> 20, total >> 20))
            raise_if_damaged(report)
    if as_json:
        out = summary.model_dump(mode="json")
        if report is not None:
            out["verify"] = report.model_dump(mode="json")
        print(json.dumps(out, indent=2))
        return
    print_cache_summary(summary)
    if report is not None:
        unchecked = f"; no checksum on {', '.join(report.not_checksummed)}" if report.not_checksummed else ""
        console.print(f"verified: {report.datasets} datasets, {report.bytes_read / 2**20:,.1f} MiB read, "
                      f"no damage found{unchecked}", highlight=False, soft_wrap=True)
