"""A `reproduce_cpu.sh` run folder against the expected metrics of the CPU twins.

    python examples/configs/check_cpu.py RUNS_DIR                   # compare, exit 1 when a metric is off
    python examples/configs/check_cpu.py --record --overwrite RUNS_S0 RUNS_S1   # expected_cpu.json from seed runs
    python examples/configs/check_cpu.py --record --only s2ef_dens RUNS_S0 RUNS_S1   # re-record one twin's metrics

Each run's validation metric (the one its best checkpoint was chosen by, from `summary.json`)
and every test metric `molden evaluate` wrote (`eval/RUN.SPLIT.json`) in a named unit or a
score (not the losses in normalised units) is compared with the range the recorded seeds gave,
widened by `--tolerance` (a fraction of each end). The recorded seeds ran on one machine;
another CPU, thread count or torch version rounds differently and lands elsewhere inside the
seeds' spread, which is what the tolerance is for.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

EXPECTED = Path(__file__).with_name("expected_cpu.json")
DEFAULT_TOLERANCE = 0.10


UNITS = ("_mev", "_meV", "_mev_per_angstrom", "_ev", "_angstrom")
SCORES = ("cosine", "ewt", "adwt", "accuracy")


def reported(metric: str) -> bool:
    """The test metrics worth pinning: errors in named units and scores (cosines, within-threshold
    fractions, accuracies), not the losses in normalised units they come from."""
    return metric.endswith(UNITS) or any(score in metric for score in SCORES)


def _read(path: Path) -> dict:
    """A JSON file the runs wrote, or one line saying which file is unreadable."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {path}: not a readable JSON file ({error})") from None
    if not isinstance(content, dict):
        raise SystemExit(f"error: {path}: not a JSON object")
    return content


def observed(runs: Path) -> dict[str, float]:
    """`run/split/metric` → value for every finished run and evaluation in `runs`."""
    found: dict[str, float] = {}
    for summary in sorted(runs.glob("*/summary.json")):
        s = _read(summary)
        if s.get("best_metric") is not None and s.get("best_value") is not None:
            found[f"{summary.parent.name}/val/{s['best_metric']}"] = float(s["best_value"])
    for evaluation in sorted((runs / "eval").glob("*.json")):
        e = _read(evaluation)
        if not isinstance(e.get("split"), str) or not isinstance(e.get("metrics"), dict):
            raise SystemExit(f"error: {evaluation}: not a `molden evaluate --out` file (no split or metrics)")
        run = evaluation.name.removesuffix(f".{e['split']}.json")
        for metric, value in e["metrics"].items():
            if reported(metric) and value is not None:
                found[f"{run}/{e['split']}/{metric}"] = float(value)
    return found


def compare(found: dict[str, float], expected: dict, tolerance: float) -> list[dict]:
    """One row per expected metric: the value found (or None) and whether it lies in the range."""
    rows = []
    for key, seeds in expected["metrics"].items():
        low, high = min(seeds.values()), max(seeds.values())
        low, high = low - tolerance * abs(low), high + tolerance * abs(high)
        value = found.get(key)
        status = ("missing" if value is None else "below" if value < low else "above" if value > high else "ok")
        rows.append({"metric": key, "value": value, "seeds": seeds, "low": low, "high": high, "status": status})
    return rows


def record(folders: list[Path]) -> dict:
    """expected_cpu.json's content from run folders of several seeds (`seed` read from each
    run's config.json)."""
    by_seed: dict[str, dict[str, float]] = {}
    for folder in folders:
        configs = sorted(folder.glob("*/config.json"))
        if not configs:
            raise SystemExit(f"error: {folder}: no run with a config.json (not a reproduce_cpu.sh folder)")
        seed = str(_read(configs[0])["run"]["seed"])
        by_seed[seed] = observed(folder)
    keys = sorted(set.intersection(*(set(v) for v in by_seed.values())))
    from molden.bench.model_step import machine

    described = machine()
    return {
        "what": "metrics of examples/configs/reproduce_cpu.sh, one value per seed",
        "recorded": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {**{k: described[k] for k in ("cpu", "cores", "python", "torch")}, "molden": _commit(),
                    "threads": 1},
        "command": "bash examples/configs/reproduce_cpu.sh data RUNS SEED",
        "metrics": {key: {seed: by_seed[seed][key] for seed in by_seed} for key in keys},
    }


def rerecord(previous: dict, new: dict, only: list[str], folders: list[Path]) -> dict:
    """`previous` with the metrics of the runs `only` taken from `new` (a `record`), and where
    and when they were recorded in its `"rerecorded"` entry for each run. Refuses a re-record
    that would weaken the check: other seeds, or fewer metrics than were pinned before."""
    run_of = lambda key: key.split("/", 1)[0]  # noqa: E731
    fresh = {key: seeds for key, seeds in new["metrics"].items() if run_of(key) in only}
    new_seeds = {seed for seeds in new["metrics"].values() for seed in seeds}
    for run in only:
        if not any(run_of(key) == run for key in fresh):
            raise SystemExit(f"error: no metric of run {run!r} in every folder ({', '.join(map(str, folders))})")
        old = {key: seeds for key, seeds in previous["metrics"].items() if run_of(key) == run}
        old_seeds = {seed for seeds in old.values() for seed in seeds}
        if old and old_seeds != new_seeds:
            raise SystemExit(f"error: run {run!r} was recorded with seeds {sorted(old_seeds)}, these folders are seeds "
                             f"{sorted(new_seeds)}: re-record the same seeds")
        lost = sorted(set(old) - set(fresh))
        if lost:
            raise SystemExit(f"error: {len(lost)} metrics of run {run!r} recorded before are not in every folder "
                             f"(first {lost[0]}): evaluate them, then re-record")
    kept = {key: seeds for key, seeds in previous["metrics"].items() if run_of(key) not in only}
    done = {run: {"recorded": new["recorded"], "machine": new["machine"]} for run in only}
    return {**previous, "metrics": dict(sorted({**kept, **fresh}.items())),
            "rerecorded": {**previous.get("rerecorded", {}), **done}}


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _print(rows: list[dict], tolerance: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"CPU twins against {EXPECTED.name} (range of the recorded seeds ± {tolerance:.0%})")
    for column in ("run", "split", "metric", "found", "expected range", "status"):
        table.add_column(column)
    for r in rows:
        found = "-" if r["value"] is None else f"{r['value']:.4g}"
        table.add_row(*r["metric"].split("/", 2), found, f"{r['low']:.4g} – {r['high']:.4g}",
                      r["status"] if r["status"] == "ok" else f"[bold red]{r['status']}[/]")
    # Piped output (a log) gets the whole table, not an 80-column fold.
    Console(width=None if sys.stdout.isatty() else 140).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="reproduce_cpu.sh run folder(s)")
    parser.add_argument("--record", action="store_true", help=f"write {EXPECTED.name} from these folders (one per seed)")
    parser.add_argument("--expected", type=Path, default=EXPECTED)
    parser.add_argument("--overwrite", action="store_true", help="with --record: replace an existing file")
    parser.add_argument("--only", action="append", metavar="RUN",
                        help="with --record: replace only this run's metrics in the existing file (repeatable)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="fraction each end of the seeds' range is widened by")
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.runs if not f.is_dir()]
    if missing:
        print(f"error: {', '.join(missing)}: no such run folder", file=sys.stderr)
        return 2
    if args.only and not args.record:
        print("error: --only goes with --record", file=sys.stderr)
        return 2
    if args.record:
        previous = None
        if args.only:
            if not args.expected.is_file():
                print(f"error: {args.expected}: no such file to update (--only replaces runs in it)", file=sys.stderr)
                return 2
            previous = _read(args.expected)
            if not isinstance(previous.get("metrics"), dict):
                print(f"error: {args.expected}: no \"metrics\" to update", file=sys.stderr)
                return 2
        elif args.expected.exists() and not args.overwrite:
            print(f"error: {args.expected} exists: pass --overwrite to replace it", file=sys.stderr)
            return 2
        content = record(args.runs)
        if args.only:
            content = rerecord(previous, content, args.only, args.runs)
        tmp = args.expected.with_name(args.expected.name + ".tmp")
        tmp.write_text(json.dumps(content, indent=2) + "\n")
        os.replace(tmp, args.expected)
        print(f"wrote {args.expected}")
        return 0
    if len(args.runs) != 1:
        print("error: compare one run folder at a time (several only with --record)", file=sys.stderr)
        return 2
    if not args.expected.is_file():
        print(f"error: {args.expected}: no such file of expected metrics", file=sys.stderr)
        return 2
    expected = _read(args.expected)
    if not isinstance(expected.get("metrics"), dict) or not all(
            isinstance(seeds, dict) and seeds for seeds in expected["metrics"].values()):
        print(f"error: {args.expected}: no \"metrics\" of run/split/metric → {{seed: value}}", file=sys.stderr)
        return 2
    rows = compare(observed(args.runs[0]), expected, args.tolerance)
    _print(rows, args.tolerance)
    off = [r for r in rows if r["status"] != "ok"]
    print(f"{len(rows) - len(off)} of {len(rows)} metrics in range" + (f"; off: {', '.join(r['metric'] for r in off)}"
                                                                        if off else ""))
    return 1 if off else 0


if __name__ == "__main__":
    sys.exit(main())
