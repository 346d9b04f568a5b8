"""What a user sees while `molden pretrain` / `finetune` run: a rich live display (progress,
epoch, the loss terms, the last validation, structures/s, ETA) and a one-screen summary."""

from __future__ import annotations

import json
import time
from typing import Any, Mapping

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

SHOWN_TRAIN_TERMS = 6


def _table(title: str, values: Mapping[str, float], limit: int | None = None) -> Table:
    table = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
    table.add_column("name", style="cyan")
    table.add_column("value", justify="right")
    items = list(values.items())
    for name, value in items[:limit] if limit else items:
        table.add_row(name, f"{value:.5g}")
    return table


class LiveReporter:
    """The `Reporter` of `molden.train.loop` for a terminal (a plain line log when the output
    is not a terminal, so CI logs stay readable)."""

    def __init__(self, console: Console, err_console: Console):
        self.console = console
        self.err = err_console
        self.progress = Progress(TextColumn("[bold]step"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[epoch]}"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err_console)
        self.task = None
        self.train: dict[str, float] = {}
        self.val: dict[str, float] = {}
        self.best_line = ""
        self.live: Live | None = None

    def __enter__(self) -> LiveReporter:
        if self.err.is_terminal:
            self.live = Live(self._render(), console=self.err, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.update(self._render())
            self.live.__exit__(*exc)

    def _render(self) -> Group:
        parts: list[Any] = [self.progress]
        shown = {k: v for k, v in self.train.items() if k not in ("lr", "structures_per_s")}
        if self.train:
            parts.append(_table(f"train  (lr {self.train.get('lr', 0):.3g}, {self.train.get('structures_per_s', 0):.0f} structures/s)",
                                shown, SHOWN_TRAIN_TERMS))
        if self.val:
            parts.append(_table(f"validation  {self.best_line}", self.val))
        return Group(*parts)

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._render())

    # ---------------------------------------------------------------- Reporter
    def start(self, info: dict[str, Any]) -> None:
        c = info["config"]
        resumed = f", resumed at step {info['resumed_at']}" if info.get("resumed_at") is not None else ""
        self.err.print(f"[bold]molden[/] training on {info['device']} × {info['processes']} process(es), {info['dtype']}{resumed}")
        self.err.print(f"model {escape(c['model']['preset'])}: {info['parameters']:,} parameters ({info['trainable']:,} trained); "
                       f"train {info['train_structures']:,} / val {info['val_structures']:,} structures; "
                       f"best checkpoint by {info['best_metric']}")
        self.err.print(f"resolved config: {escape(json.dumps(c, separators=(',', ':')))}", soft_wrap=True, highlight=False)
        total = c["run"]["steps"]
        self.task = self.progress.add_task("train", total=total, completed=info.get("resumed_at") or 0, epoch="")
        self._last_plain = time.monotonic()
        self._refresh()

    def step(self, step: int, total: int, epoch: float, values: Mapping[str, float]) -> None:
        self.train = dict(values)
        if self.task is not None:
            self.progress.update(self.task, completed=step, epoch=f"epoch {epoch:.2f}")
        if self.live is None:
            terms = ", ".join(f"{k} {v:.4g}" for k, v in list(values.items())[:SHOWN_TRAIN_TERMS])
            self.err.print(f"step {step}/{total} epoch {epoch:.2f}: {terms}", highlight=False)
        self._refresh()

    def validated(self, step: int, values: Mapping[str, float], best: bool) -> None:
        self.val = dict(values)
        self.best_line = f"(step {step}{', new best' if best else ''})"
        if self.live is None:
            terms = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
            self.err.print(f"validation at step {step}{' (best)' if best else ''}: {terms}", highlight=False)
        self._refresh()

    def note(self, message: str) -> None:
        self.err.print(f"[yellow]note:[/] {escape(message)}", highlight=False)


def print_summary(console: Console, summary) -> None:
    """The one-screen summary at the end of a run."""
    table = Table(title=f"run {summary.out}: {summary.stopped}", show_header=False)
    rows = [
        ("steps / epochs", f"{summary.steps:,} / {summary.epochs:.2f}"),
        ("wall time", f"{summary.wall_s:.1f} s ({summary.structures_per_s:.0f} structures/s)"),
        ("parameters", f"{summary.parameters:,} ({summary.trainable_parameters:,} trained)"),
        (f"best {summary.best_metric}", f"{summary.best_value:.6g} at step {summary.best_step}" if summary.best_step >= 0 else "no validation"),
    ]
    if summary.skipped_steps:
        rows.append(("skipped steps (non-finite)", str(summary.skipped_steps)))
    for name, value in summary.final_validation.items():
        rows.append((f"val {name}", f"{value:.6g}"))
    rows.append(("files", "best.pt, last.pt, config.json, metrics.jsonl/.csv, learning_curves.png, summary.json"))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
