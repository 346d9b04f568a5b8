"""What every command shares: the consoles, one-line user errors and the rich progress bar.

Errors molden raises on purpose (`MoldenError`) and invalid options are printed as one line on
stderr with exit code 1; Ctrl-C exits 130 and leaves resumable work in place.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from molden.errors import MoldenError

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
