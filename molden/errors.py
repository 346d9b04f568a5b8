"""Errors a user can act on: each names the file, the record and what is wrong.

The CLI catches `MoldenError` once and prints `str(error)` as a single line, so the message
must stand alone without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class MoldenError(Exception):
    """Base of every error molden raises on purpose."""


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
