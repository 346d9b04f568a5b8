"""Errors a user can act on: each names the file, the record and what is wrong.

The CLI catches `MoldenError` once and prints `str(error)` as a single line, so the message
must stand alone without a traceback.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class MoldenError(Exception):
    """Base of every error molden raises on purpose."""

    # True when the error follows from the command and its files alone, so that every process
    # of a torchrun job on one machine meets it alike (see `alike_on_every_process`).
    alike_on_every_process: bool = False


class MoldenInputError(MoldenError):
    """Bad input data: a missing file, a garbled record, a physically impossible structure.

    `where` names the file (or source); `record` the record inside it (frame index, molecule
    name, line number), so that `str(error)` reads `file, record 12: NaN in positions`.
    """

    def __init__(self, where: str | Path | None, message: str, record: str | int | None = None):
        self.where = None if where is None else str(where)
        self.record = record
        self.message = message
        super().__init__(self._format())

    def _format(self) -> str:
        parts = []
        if self.where:
            parts.append(self.where)
        if self.record is not None:
            parts.append(f"record {self.record}")
        prefix = ", ".join(parts)
        return f"{prefix}: {self.message}" if prefix else self.message


class MoldenConfigError(MoldenError):
    """An option or configuration that cannot work (bad cutoff, unknown source, ...)."""


class ReportedElsewhere(MoldenError):
    """An error another process of the same torchrun job has already reported (rank 0's
    refusal of the run folder): this process exits without repeating it."""


@contextmanager
def alike_on_every_process() -> Iterator[None]:
    """Mark molden's errors raised inside as following from the command and its files alone
    (checking options, data, model and checkpoint before training), so that under torchrun
    one process per machine reports them rather than every process."""
    try:
        yield
    except MoldenConfigError as error:
        # Input errors stay each process's own: a read that fails on one process (a network
        # file system's hiccup) must not go unreported because another process is first.
        error.alike_on_every_process = True
        raise
