"""The metrics a training run logs: `metrics.jsonl` (one JSON object per record) and
`metrics.csv` (long format: one row per metric), both beside the run's checkpoints.

A record is `{"step": 120, "epoch": 0.5, "split": "val", "wall_s": 31.2, "energy_mae_mev": 41.7}`:
`step` is the global optimiser step, `epoch` the fractional number of epochs done, `wall_s`
the seconds since the run started, summed over resumed segments. Both files are appended and
flushed per record, so a run killed at any moment keeps everything it logged; resuming from a
checkpoint first drops the records the killed run wrote after that checkpoint, so the curves of
a resumed run read as one run. Non-finite values are written as JSON `null` / an empty CSV cell.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping

from molden.errors import MoldenInputError

JSONL_NAME = "metrics.jsonl"
CSV_NAME = "metrics.csv"
CSV_COLUMNS = ("step", "epoch", "split", "wall_s", "name", "value")
RECORD_KEYS = ("step", "epoch", "split", "wall_s")
SPLITS = ("train", "val", "test")


class MetricsLog:
    """Appends metric records to `run_dir/metrics.jsonl` and `run_dir/metrics.csv`.

    A fresh run (`resume_step=None`) starts both files empty. A resumed run keeps exactly the
    lines with `step <= resume_step` (rewritten atomically) and appends after them; `last_wall_s`
    is then the largest `wall_s` kept, for a loop that has no elapsed time of its own to continue
    from. With `enabled=False` (DDP ranks other than 0) nothing is read or written.
    """

    def __init__(self, run_dir: Path, *, resume_step: int | None = None, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.last_wall_s = 0.0
        self._jsonl = self._csv = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        jsonl_path, csv_path = self.run_dir / JSONL_NAME, self.run_dir / CSV_NAME
        if resume_step is None:
            jsonl_lines, csv_lines = [], []
        else:
            jsonl_lines, self.last_wall_s = _kept_jsonl_lines(jsonl_path, resume_step)
            csv_lines = _kept_csv_lines(csv_path, resume_step)
        header = _csv_line(CSV_COLUMNS)
        _replace_atomically(jsonl_path, "".join(jsonl_lines))
        _replace_atomically(csv_path, header + "".join(csv_lines))
        self._jsonl = open(jsonl_path, "a", encoding="utf-8", newline="")
        self._csv = open(csv_path, "a", encoding="utf-8", newline="")

    def write(self, step: int, epoch: float, split: str, values: Mapping[str, Any], wall_s: float) -> None:
        """Append one record: `values` maps metric names (units in the name, e.g.
        `forces_mae_mev_per_angstrom`) to floats or one-element tensors; `wall_s` in seconds."""
        if not self.enabled:
            return
        if self._jsonl is None:
            raise ValueError(f"{self.run_dir / JSONL_NAME}: metrics log is closed")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        for name in values:
            if name in RECORD_KEYS or not isinstance(name, str) or not name or "\n" in name:
                raise ValueError(f"invalid metric name {name!r}")
        floats = {name: _finite_or_none(value) for name, value in values.items()}
        step, epoch, wall_s = int(step), round(float(epoch), 6), round(float(wall_s), 3)
        record = {"step": step, "epoch": epoch, "split": split, "wall_s": wall_s, **floats}
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        rows = [(step, epoch, split, wall_s, name, "" if v is None else repr(v)) for name, v in floats.items()]
        self._csv.write("".join(_csv_line(row) for row in rows))
        # Flushed per record (not fsynced): a killed process loses nothing the kernel holds.
        self._jsonl.flush()
        self._csv.flush()
        self.last_wall_s = max(self.last_wall_s, wall_s)

    def close(self) -> None:
        """Close both files (idempotent)."""
        for handle in (self._jsonl, self._csv):
            if handle is not None:
                handle.close()
        self._jsonl = self._csv = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of `run_dir/metrics.jsonl` (or of that file given directly), in file order.

    Metric values written as `null` (non-finite) come back as `nan`. A last line cut short by a
    killed writer (no trailing newline, not JSON) is skipped; any other bad line raises
    `MoldenInputError` naming the file and the line.
    """
    path = Path(run_dir)
    if not path.is_file():
        if not path.is_dir():
            raise MoldenInputError(path, "no such run directory or metrics file")
        path = path / JSONL_NAME
        if not path.is_file():
            raise MoldenInputError(path, "not found: the run has logged no metrics yet")
    return [record for _, record, _ in _parse_jsonl(path)]


def _parse_jsonl(path: Path) -> list[tuple[str, dict, int]]:
    """(line text with its newline, record, line number) for every complete record of `path`."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines(keepends=True)
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        cut_short = number == len(lines) and not line.endswith("\n")
        try:
            raw = json.loads(line)
        except json.JSONDecodeError:
            if cut_short:
                break
            raise MoldenInputError(path, f"line {number} is not JSON (expected one metrics record per line)") from None
        try:
            record = _record(raw)
        except (KeyError, TypeError, ValueError):
            raise MoldenInputError(
                path, f"line {number} is not a metrics record (needs integer step, epoch, split, wall_s and numbers)"
            ) from None
        out.append((line if line.endswith("\n") else line + "\n", record, number))
    return out


def _record(raw: Any) -> dict:
    if not isinstance(raw, dict) or isinstance(raw["step"], bool) or not isinstance(raw["step"], int):
        raise TypeError("not a record")
    record = {"step": raw["step"], "epoch": float(raw["epoch"]), "split": str(raw["split"]), "wall_s": float(raw["wall_s"])}
    for name, value in raw.items():
        if name not in RECORD_KEYS:
            if isinstance(value, (str, bool)):
                raise TypeError(f"{name} is not a number")
            record[name] = math.nan if value is None else float(value)
    return record


def _kept_jsonl_lines(path: Path, resume_step: int) -> tuple[list[str], float]:
    if not path.is_file():
        return [], 0.0
    kept = [(line, record) for line, record, _ in _parse_jsonl(path) if record["step"] <= resume_step]
    return [line for line, _ in kept], max((float(r["wall_s"]) for _, r in kept), default=0.0)


def _kept_csv_lines(path: Path, resume_step: int) -> list[str]:
    """The complete data rows of `path` with step <= resume_step, as written (header dropped)."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
        if not line.endswith("\n"):
            continue  # cut short by a killed writer
        try:
            step = int(line.split(",", 1)[0])
        except ValueError:
            continue  # the header
        if step <= resume_step:
            kept.append(line)
    return kept


def _finite_or_none(value: Any) -> float | None:
    number = float(value.item() if hasattr(value, "item") else value)
    return number if math.isfinite(number) else None


def _csv_line(row) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(row)
    return buffer.getvalue()


def _replace_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: a kill never leaves half."""
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
