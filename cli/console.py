"""What every command shares: the consoles, one-line user errors and the rich progress bar.

Errors molden raises on purpose (`MoldenError`) and invalid options are printed as one line on
stderr with exit code 1; Ctrl-C exits 130 and leaves resumable work in place.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Mapping

import typer
from pydantic import ValidationError
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from molden.errors import MoldenError, ReportedElsewhere

PIPED_WIDTH = 160


class _WideWhenPiped(Console):
    """The terminal's width in a terminal; piped to a file or a log, at least `PIPED_WIDTH`
    columns, so tables of numbers are never cut short (rich would take 80)."""

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        if self.is_terminal or self._width is not None:
            return size
        return ConsoleDimensions(max(size.width, PIPED_WIDTH), size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


# Under torchrun every process runs the same command: rank 0 speaks for the run (one display,
# one summary), the others print only their own errors, as "process N: ...".
PROCESS = int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
# The process's place on its own machine: the first one there speaks for errors that every
# process of that machine meets alike (the same command on the same files), so a bad option
# gives one line per machine, not one per process, and no machine fails silently.
NODE_PROCESS = int(os.environ.get("LOCAL_RANK", "0")) if PROCESS else 0
console = _WideWhenPiped(quiet=PROCESS != 0)
err_console = Console(stderr=True, quiet=PROCESS != 0)
_error_console = Console(stderr=True)


def error_line(message: str, *, same_on_every_process: bool = False) -> None:
    """Print one `error:` line on stderr (from every process of a torchrun job: nothing fails
    silently), or, for an error every process of a machine meets alike, from its first process."""
    if same_on_every_process and NODE_PROCESS != 0:
        return
    where = f"process {PROCESS}: " if PROCESS else ""
    _error_console.print(f"[bold red]error:[/] {where}{escape(message)}", highlight=False, soft_wrap=True)


def note_line(message: str) -> None:
    """Print one `note:` line on stderr (what happened to existing files)."""
    err_console.print(f"[yellow]note:[/] {escape(message)}", highlight=False, soft_wrap=True)


def invalid_option_message(error: ValidationError, option_names: Mapping[str, str] | None = None) -> str:
    """`invalid --cutoff -1: must be greater than 0` from a config's validation error, naming
    the command-line option (`option_names` maps config fields such as `emt.n_systems` to it)."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    names = option_names or {}
    key = ".".join(str(part) for part in first["loc"] if not isinstance(part, int))  # a list option's item: the option
    if key in names:
        name = names[key]
    elif "." in key:  # a config-file field with no option of its own, named as in the file: optim.lr_milestones[1]
        name = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]).lstrip(".")
    else:
        name = f"--{key.replace('_', '-')}" if key else "options"
    if field and isinstance(first.get("input"), Mapping) and first.get("type") != "missing":
        name = f"{field} options"  # a section's own check of its fields together, which the message names
    if first.get("type") == "missing":
        return f"{name} is required" if name != "options" else "an option is missing"
    message = first["msg"].removeprefix("Value error, ")
    words = message.split(" ", 2)
    # keep acronyms (DeNS, QM9) and names (Noisy Nodes) as they are
    if not any(c.isupper() for c in words[0][1:]) and not (len(words) > 1 and words[1][:1].isupper()):
        message = message[:1].lower() + message[1:]
    value = first.get("input")
    shown = f" {value}" if field and isinstance(value, (int, float, str)) else ""
    return f"invalid {name}{shown}: {message}"


@contextmanager
def user_errors(option_names: Mapping[str, str] | None = None, *,
                interrupted: str = "interrupted: run the same command again to resume",
                same_on_every_process: bool = False) -> Iterator[None]:
    """Turn molden's own errors and invalid options into one line and exit code 1.

    `same_on_every_process`: the work inside reads only the command line and its files (options
    into a config), so under torchrun each machine's first process alone reports its errors."""
    try:
        yield
    except ReportedElsewhere:
        raise typer.Exit(1) from None
    except MoldenError as error:
        error_line(str(error), same_on_every_process=same_on_every_process or error.alike_on_every_process)
        raise typer.Exit(1) from None
    except ValidationError as error:
        error_line(invalid_option_message(error, option_names), same_on_every_process=same_on_every_process)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print(interrupted, highlight=False)
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


def print_cache_summary(summary) -> None:
    """The table `molden inspect` prints for a `CacheSummary` (the demo prints it too)."""
    from rich.table import Table

    table = Table(title=str(summary.path), show_header=False)
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
    if summary.energy_per_atom_mean_ev is not None or summary.targets:
        rows.append(("statistics fitted on", f"{summary.statistics_fitted_on} structures"))
    if summary.energy_per_atom_mean_ev is not None:
        rows.append(("energy per atom", f"{summary.energy_per_atom_mean_ev:.4f} ± {summary.energy_per_atom_std_ev:.4f} eV"))
    if summary.forces_rms_ev_per_angstrom is not None:
        rows.append(("forces rms", f"{summary.forces_rms_ev_per_angstrom:.4f} eV/Å"))
    for name, s in summary.targets.items():
        rows.append((f"target {name}", f"{s['mean']:.6g} ± {s['std']:.6g}"))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
