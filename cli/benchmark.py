"""`molden benchmark`: options into a `BenchmarkConfig`, the suites run, one table per suite."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from molden.cli.console import console, err_console, user_errors

OPTION_NAMES = {"suites": "--suite", "out": "--out", "threads": "--threads", "cache": "--cache", "device": "--device"}


def benchmark(
    suite: str = typer.Option("all", help="comma-separated suites: radius, train, io, relax (all: every one)"),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    quick: bool = typer.Option(False, "--quick", help="small inputs, seconds per suite: checks the output, not figures"),
    out: Path = typer.Option(Path("benchmark"), "--out", "-o", help="folder for benchmark.json and one PNG per suite"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier run's results in --out"),
    threads: Optional[int] = typer.Option(None, help="torch intra-op threads (default: torch's own)"),
    cache: Optional[Path] = typer.Option(None, help="QM9 cache for the io and train suites (default: build one)"),
    seed: int = typer.Option(0, help="seed of generated systems and training batches"),
) -> None:
    """Time every stage against the peers a user could pick instead, in the same run, on the
    same inputs, after checking that they compute the same thing."""
    from rich.markup import escape
    from rich.table import Table

    from molden.bench.suites import SUITE_NAMES, BenchmarkConfig, format_cell, run_benchmark, write_report

    # Nothing is written before every suite has run, so an interrupted benchmark leaves no file.
    with user_errors(OPTION_NAMES, interrupted="interrupted: nothing was written; run the command again to measure"):
        names = list(SUITE_NAMES) if suite.strip() == "all" else [s.strip() for s in suite.split(",") if s.strip()]
        config = BenchmarkConfig(suites=names, device=device,
                                 quick=quick, out=out, overwrite=overwrite, threads=threads, cache=cache, seed=seed)
        with err_console.status("") as status:
            report = run_benchmark(config, on_suite=lambda name: status.update(f"running the {name} suite…"))
        written = write_report(report, config)
    m = report.machine
    console.print(f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads"
                  + (f", {m['gpu']}" if m["gpu"] else "") + f"; torch {m['torch']}; {m['utc']}", highlight=False)
    for result in report.suites:
        table = Table(title=f"{result.title} ({result.seconds:.0f} s)", title_justify="left")
        for column in result.columns:
            table.add_column(column.header, justify="left" if column.fmt == "" else "right")
        for row in result.rows:
            table.add_row(*(escape(format_cell(row.get(c.key), c.fmt)) for c in result.columns))
        console.print(table)
        for note in result.notes:
            console.print(f"  {escape(note)}", highlight=False)
    console.print("wrote " + ", ".join(str(p) for p in written), highlight=False, soft_wrap=True)
