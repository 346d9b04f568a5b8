"""`molden benchmark`: every benchmark suite in one run, each figure beside its peers.

A suite is a function from the benchmark's config (and what earlier suites measured) to a
`SuiteResult`: rows of plain numbers, the columns a table shows, and notes (peers skipped with
the line that installs them, disagreements). `run_benchmark` runs the chosen suites in a fixed
order (radius, train, io, relax: io compares read rates with what the train suite's steps
consume) and `write_report` writes `benchmark.json` and one PNG chart per suite. The suites
themselves live in their own modules (`radius_graph`, `train_step`, `cache_read`, `relax`) and
stay runnable alone as `python -m molden.bench.<module>`.

`--quick` runs every suite on small inputs in seconds: CI runs it to check the structure and
sanity of the output (every row present, every peer agreeing with molden), never a timing.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from molden.errors import MoldenConfigError

SUITE_NAMES = ("radius", "train", "io", "relax")
"""Every suite, in the order they run (`SUITES` maps each to its function)."""

REPORT_FILE = "benchmark.json"
QUICK_QM9_MOLECULES = 400
FULL_QM9_MOLECULES = 2000
VERSIONED = ("torch", "numpy", "ase", "h5py", "vesin", "vesin-torch", "matscipy", "torch-cluster",
             "nvalchemi-toolkit-ops", "triton", "torch-sim-atomistic", "qm9pack")
"""Libraries whose versions the report records (installed ones only)."""


class BenchmarkConfig(BaseModel):
    """What `molden benchmark` runs and where it writes."""

    model_config = ConfigDict(extra="forbid")

    suites: list[str] = Field(default_factory=lambda: list(SUITE_NAMES), description="suites to run (all by default)")
    device: Literal["cpu", "cuda"] = Field("cpu", description="where molden (and GPU peers) run")
    quick: bool = Field(False, description="small inputs, seconds per suite: a check of the output, not figures")
    out: Path = Field(Path("benchmark"), description="folder for benchmark.json and the PNG charts")
    overwrite: bool = Field(False, description="replace the results of an earlier run in `out`")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's own)")
    cache: Path | None = Field(None, description="a QM9 cache for the io and train suites (default: build one)")
    seed: int = Field(0, description="seed of generated systems and training batches")

    @field_validator("suites")
    @classmethod
    def _known(cls, suites: list[str]) -> list[str]:
        if not suites:
            raise ValueError("name at least one suite")
        unknown = [name for name in suites if name not in SUITE_NAMES]
        if unknown:
            raise ValueError(f"unknown suite {unknown[0]!r}; suites: {', '.join(SUITE_NAMES)}")
        return suites

    @field_validator("device")
    @classmethod
    def _visible(cls, device: str) -> str:
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("no CUDA device is visible to torch")
        return device

    @field_validator("cache")
    @classmethod
    def _exists(cls, cache: Path | None) -> Path | None:
        if cache is not None and not cache.is_file():
            raise ValueError(f"{cache}: no such file (build one with `molden preprocess qm9 --out FILE`)")
        return cache


@dataclass(frozen=True)
class Column:
    """One table column: its header, the row key it shows and a format for numbers."""

    header: str
    key: str
    fmt: str = ""


@dataclass
class SuiteResult:
    """What one suite measured: rows of plain values, the columns shown, notes and run time."""

    name: str
    title: str
    rows: list[dict]
    columns: list[Column]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    setup: dict = field(default_factory=dict)


@dataclass
class BenchmarkReport:
    machine: dict
    config: dict
    suites: list[SuiteResult]

    def to_json(self) -> dict:
        return {"machine": self.machine, "config": self.config,
                "suites": {s.name: {"title": s.title, "seconds": s.seconds, "setup": s.setup, "notes": s.notes,
                                    "rows": s.rows} for s in self.suites}}


def describe_machine(device: str) -> dict:
    """CPU model, cores, torch threads, GPU name (on cuda), load average, date and the versions of
    the libraries compared."""
    from molden.bench.model_step import machine

    described = machine()
    described["device"] = device
    described["gpu"] = torch.cuda.get_device_name() if device == "cuda" else None
    described["utc"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    described["versions"] = {}
    for name in VERSIONED:
        try:
            described["versions"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return described


class _Shared:
    """What suites share within one run: the QM9 cache (built once, in a temporary folder,
    when none is given) and the train suite's rows."""

    def __init__(self, config: BenchmarkConfig, scratch: Path):
        self.config, self.scratch = config, scratch
        self.train_rows: list[dict] | None = None
        self._cache = config.cache

    def qm9_cache(self) -> Path | None:
        """The QM9 cache, or None when none was given and qm9pack is not installed."""
        if self._cache is None and importlib.util.find_spec("qm9pack") is not None:
            from molden.bench.train_step import build_qm9_cache

            limit = QUICK_QM9_MOLECULES if self.config.quick else FULL_QM9_MOLECULES
            self._cache = build_qm9_cache(self.scratch / "qm9.h5", limit)
        return self._cache


NO_QM9 = "skipped: needs a QM9 cache: pip install 'molden[qm9]' (or pass --cache QM9.h5)"


def _radius_suite(shared: _Shared) -> SuiteResult:
    from molden.bench.radius_graph import run_radius_graph_benchmark

    config = shared.config
    rows = run_radius_graph_benchmark(config.device, repeats=3 if config.quick else 7, quick=config.quick)
    notes = sorted({f"{r['peer']}: {r['note']}" for r in rows if r["peer_ms"] is None})
    notes += [f"DISAGREES: {r['peer']} finds other pairs than molden on {r['case']} at {r['cutoff_angstrom']:g} Å"
              for r in rows if r["agree"] is False]
    columns = [Column("case", "case"), Column("cutoff Å", "cutoff_angstrom", "g"), Column("edges", "n_edges", ","),
               Column("molden path", "molden_path"), Column("molden ms", "molden_ms", ".3f"), Column("peer", "peer"),
               Column("peer ms", "peer_ms", ".3f"), Column("peer / molden", "ratio", ".2f"), Column("same pairs", "agree")]
    timed = [r for r in rows if r["peer_ms"] is not None]
    return SuiteResult("radius", f"Radius graph ({config.device}): time of the same search, ratio > 1 means molden is faster",
                       timed, columns, notes, setup={"repeats": 3 if config.quick else 7})


def _train_suite(shared: _Shared) -> SuiteResult:
    from molden.bench.train_step import QM9_CPU_PRESETS, run_train_step_benchmark

    config = shared.config
    columns = [Column("preset", "preset"), Column("parameters", "parameters", ","), Column("ms/step", "step_ms", ".1f"),
               Column("ms data", "data_ms", ".2f"), Column("ms corrupt", "corrupt_ms", ".2f"),
               Column("structures/s", "structures_per_second", ",.0f"), Column("data+graph %", "data_graph_percent", ".1f"),
               Column("GFLOP/s", "achieved_gflops", ".1f"), Column("% of matmul peak", "peak_percent", ".1f")]
    title = f"Training step ({config.device}): QM9 HOMO + Noisy Nodes, every QM9 preset; goal data+graph < 5 %"
    cache = shared.qm9_cache()
    if cache is None:
        return SuiteResult("train", title, [], columns, [NO_QM9])
    quick = config.quick
    result = run_train_step_benchmark(cache, steps=2 if quick else 20, warmup=1 if quick else 3, presets=QM9_CPU_PRESETS,
                                      threads=config.threads, max_graphs=16 if quick else 128, seed=config.seed,
                                      peak_size=256 if quick else 2048, device=config.device)
    rows = []
    for r in result["rows"]:
        row = {k: v for k, v in r.items() if k not in ("times_s", "flops")}
        row["data_graph_percent"] = 100 * r["data_graph_share"]
        row["peak_percent"] = 100 * r["peak_fraction"]
        rows.append(row)
    shared.train_rows = rows
    notes = [f"graph after noise: {result['setup']['graph_after_noise']}"]
    notes += [f"{r['preset']}: data + graph {r['data_graph_percent']:.1f} % of the step, above the 5 % goal"
              for r in rows if r["data_graph_percent"] >= 5]
    return SuiteResult("train", title, rows, columns, notes, setup={**result["setup"], "peak": result["peak"]})


def _io_suite(shared: _Shared) -> SuiteResult:
    from molden.bench.cache_read import run_cache_read_benchmark

    config = shared.config
    columns = [Column("read mode", "mode"), Column("structures/s", "structures_per_second", ",.0f"),
               Column("× fastest training step", "headroom", ".1f")]
    title = "Reading the cache: structures/s against what the fastest training step consumes (> 1: reads keep up)"
    cache = shared.qm9_cache()
    if cache is None:
        return SuiteResult("io", title, [], columns, [NO_QM9])
    rows = run_cache_read_benchmark(cache, n_reads=500 if config.quick else 5000, seed=config.seed, workers=2)
    consumer = max(shared.train_rows or _fastest_preset_rows(shared, cache), key=lambda r: r["structures_per_second"])
    for row in rows:
        row["headroom"] = row["structures_per_second"] / consumer["structures_per_second"]
    notes = [f"training consumes {consumer['structures_per_second']:,.0f} structures/s ({consumer['preset']}, "
             f"batches of {consumer['structures_per_step']:g})"]
    notes += [f"{r['mode']}: slower than training consumes" for r in rows if r["headroom"] < 1]
    return SuiteResult("io", title, rows, columns, notes,
                       setup={"cache": str(cache), "consumer": consumer["preset"],
                              "consumer_structures_per_second": consumer["structures_per_second"]})


def _fastest_preset_rows(shared: _Shared, cache: Path) -> list[dict]:
    """The train suite's row for PaiNN (the fastest QM9 preset) alone, when that suite did not run."""
    from molden.bench.train_step import preset_rows

    quick = shared.config.quick
    return preset_rows(cache, ["painn_cpu"], steps=2 if quick else 10, warmup=1, max_graphs=16 if quick else 128,
                       workers=0, threads=shared.config.threads, seed=shared.config.seed, device=shared.config.device)


RELAX_SIZES = (64, 256)
RELAX_STEPS = 5


def _relax_suite(shared: _Shared) -> SuiteResult:
    from molden.bench.relax import run_relax_benchmark

    config = shared.config
    rows = run_relax_benchmark(config.device, quick=config.quick, sizes=RELAX_SIZES, steps=RELAX_STEPS, repeats=1,
                               seed=config.seed)
    notes = sorted({f"{r['tool']} {r['method']}: {r['skipped']}" for r in rows if r.get("skipped")})
    notes += [f"DISAGREES: {r['tool']} {r['method']} on {r['n_systems']} systems moved atoms "
              f"{r['max_deviation_angstrom']:.2g} Å away from ASE's path" for r in rows if r.get("agree") is False]
    notes += sorted({f"{r['tool']} {r['method']}: {r['note']}" for r in rows
                     if r.get("note") and r["case"] == "fixed steps"})
    notes += [f"direct prediction on {r['n_systems']} systems: {r['direct_speedup']:.1f}× faster than "
              f"{r['steps']} L-BFGS steps" for r in rows if r.get("direct_speedup")]
    steps = _steps_rows(shared)
    reference = next((r for r in steps if r["tool"] == "ase" and r["method"] == "lbfgs"), None)
    notes += [f"force calls to fmax {r['fmax_ev_per_angstrom']} eV/Å on {r['n_systems']} EMT systems: {r['tool']} "
              f"{r['method']} ({r['variant']}) {r['force_calls']:,} against ASE L-BFGS's {reference['force_calls']:,} "
              + (f"({r['calls_ratio']:.2f}× fewer)" if r["calls_ratio"] >= 1 else f"({1 / r['calls_ratio']:.2f}× more)")
              + f", {r['converged']}/{r['n_systems']} converged, {r['higher_by_10_mev']} ending > 10 meV above ASE's minima"
              for r in steps if not r.get("skipped") and r is not reference]
    per_step = _optimizer_step_rows(shared)
    notes += [f"{r['method']} alone ({r['window']}, free forces, {r['n_systems']} systems"
              + (f", history of {r['memory']} full" if r["method"] == "lbfgs" else "") + f"): {r['tool']} "
              + (f"{r['kernels_per_step']:.0f} kernels and {r['host_reads_per_step']:.1f} host reads per step, "
                 if r["kernels_per_step"] is not None else "")
              + f"{r['ratio']:.2f}× molden's time" for r in per_step
              if not r.get("skipped") and r["tool"] != "molden" and r["history_full"]]
    notes += [f"{r['method']} alone: molden {r['kernels_per_step']:.0f} kernels and {r['host_reads_per_step']:.1f} "
              f"host reads per step ({r['window']})" for r in per_step
              if not r.get("skipped") and r["tool"] == "molden" and r["history_full"]]
    verlet = _verlet_rows(shared)
    peers = {r["n_systems"]: r for r in verlet if r["tool"] != "molden" and r.get("ratio")}
    notes += [f"radius graph from Verlet lists (skin {r['skin_angstrom']} Å) on {r['n_systems']} systems along a "
              f"relaxation-like path: {r['speedup']:.2f}× a search at every call, "
              + ("the same pairs at every call" if r["agree"] else "DIFFERENT PAIRS from a fresh search")
              + (f"; ASE's NeighborList at the same skin takes {peers[r['n_systems']]['ratio']:.1f}× as long"
                 if r["n_systems"] in peers else "")
              for r in verlet if r["skin_angstrom"] > 0 and r["tool"] == "molden"]
    notes += [f"ASE's NeighborList gave DIFFERENT PAIRS on {r['n_systems']} systems" for r in verlet
              if r["tool"] != "molden" and not r["agree"]]
    columns = [Column("case", "case"), Column("systems", "n_systems", ","), Column("tool", "tool"),
               Column("method", "method"), Column("steps", "steps", "g"), Column("s", "time_s", ".2f"),
               Column("structure-steps/s", "structure_steps_per_s", ",.1f"),
               Column("tool / molden", "ratio", ".2f"), Column("same path as ASE", "agree"),
               Column("max Δ Å", "max_deviation_angstrom", ".1e")]
    shown = [r for r in rows if not r.get("skipped")]
    title = (f"Relaxation ({config.device}): the same molden model, systems and steps in every tool; "
             "tool / molden > 1 means molden is faster")
    return SuiteResult("relax", title, shown, columns, notes,
                       setup={"sizes": [3] if config.quick else list(RELAX_SIZES), "steps": RELAX_STEPS, "repeats": 1,
                              "verlet": verlet, "force_calls": steps, "optimizer_step": per_step})


def _steps_rows(shared: _Shared) -> list[dict]:
    """`molden.bench.relax_steps` with EMT: force calls to fmax of every optimiser (device-free)."""
    from molden.bench.relax_steps import run_relax_steps_benchmark

    return run_relax_steps_benchmark("emt", quick=shared.config.quick, seed=shared.config.seed)


def _optimizer_step_rows(shared: _Shared) -> list[dict]:
    """`molden.bench.optimizer_step`: the optimisers alone, around a force call that costs
    nothing (kernels and host reads per step, the GPU's concern)."""
    from molden.bench.optimizer_step import run_optimizer_step_benchmark

    config = shared.config
    size = dict(n_systems=2, memory=10, steps=30) if config.quick else dict(n_systems=RELAX_SIZES[0], memory=100, steps=120)
    return run_optimizer_step_benchmark(config.device, seed=config.seed, **size)


def _verlet_rows(shared: _Shared) -> list[dict]:
    """`molden.bench.verlet` at molden relax's default skin (`molden relax` and the ASE
    calculator use it), against a search at every call."""
    from molden.bench.verlet import run_verlet_benchmark
    from molden.graph.verlet import DEFAULT_SKIN_ANGSTROM

    config = shared.config
    return run_verlet_benchmark(sizes=(3,) if config.quick else (RELAX_SIZES[0],), calls=8 if config.quick else 60,
                                skins=(DEFAULT_SKIN_ANGSTROM,), device=config.device, seed=config.seed,
                                peer_skin=DEFAULT_SKIN_ANGSTROM)


SUITES: dict[str, Callable[[_Shared], SuiteResult]] = {
    "radius": _radius_suite, "train": _train_suite, "io": _io_suite, "relax": _relax_suite,
}


def check_output_folder(config: BenchmarkConfig) -> None:
    """Refuse to write over an earlier run's results unless `overwrite` (before any work)."""
    out = config.out
    if out.exists() and not out.is_dir():
        raise MoldenConfigError(f"{out}: exists and is not a folder")
    if (out / REPORT_FILE).exists() and not config.overwrite:
        raise MoldenConfigError(f"{out}: holds an earlier benchmark ({REPORT_FILE}); pass --overwrite to replace it")


def run_benchmark(config: BenchmarkConfig, on_suite: Callable[[str], None] | None = None) -> BenchmarkReport:
    """Run the chosen suites (in `SUITE_NAMES` order) and return their results; writes nothing."""
    check_output_folder(config)
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        machine = describe_machine(config.device)
        results = []
        with tempfile.TemporaryDirectory(prefix="molden_benchmark_") as scratch:
            shared = _Shared(config, Path(scratch))
            for name in SUITE_NAMES:
                if name not in config.suites:
                    continue
                if on_suite:
                    on_suite(name)
                start = time.perf_counter()
                result = SUITES[name](shared)
                result.seconds = time.perf_counter() - start
                results.append(result)
    finally:
        torch.set_num_threads(previous_threads)
    return BenchmarkReport(machine, json.loads(config.model_dump_json()), results)


def write_report(report: BenchmarkReport, config: BenchmarkConfig) -> list[Path]:
    """benchmark.json and `<suite>.png` per suite in `config.out`, each written to a temporary
    file and renamed, so an interrupted write leaves no half file. Returns the paths written."""
    from molden.bench.charts import suite_chart

    check_output_folder(config)
    config.out.mkdir(parents=True, exist_ok=True)
    written = []
    for suite in report.suites:
        if suite.rows:
            written.append(_atomic(config.out / f"{suite.name}.png", lambda tmp, s=suite: suite_chart(s, report.machine, tmp)))
    written.append(_atomic(config.out / REPORT_FILE,
                           lambda tmp: tmp.write_text(json.dumps(report.to_json(), indent=2, default=str))))
    return written


def _atomic(path: Path, write: Callable[[Path], object]) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def format_cell(value, fmt: str) -> str:
    """A table cell: numbers with `fmt`, None as a dash, booleans as yes/NO."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, (int, float)) and fmt:
        return format(value, fmt)
    return str(value)

