"""The batched optimisers' own cost per step (issue 15): what each tool spends around the force
call, with a force call that costs nothing.

`python -m molden.bench.optimizer_step [--device cpu|cuda] [--systems 64] [--memory 100]
[--steps 120] [--json out.json]`

The relax benchmark (`molden.bench.relax`) times whole steps with a GNN, whose forward pass is
nearly all of a step on a CPU. On a GPU a batch of 64 slabs costs the model a few ms, and what
the optimiser and its driver launch around it starts to count: ASE's two-loop L-BFGS recursion
is about ten kernels per stored pair, so its cost grows with the history (memory 100 in ASE, 50
in OC20's preset). This benchmark isolates that part.

- Systems: the relax benchmark's OC20-sized slabs (`oc20_like_systems`, seed 0), bottom two
  layers fixed.
- Forces: random (normal, 0.5 eV/Å per component, the same seeded sequence for every tool), so
  that no structure converges, the history fills, and the force call itself is one small
  kernel. Steps are capped at the tools' maxstep; where they go does not matter here (the relax
  benchmark checks the tools against ASE's path).
- Tools: molden's `relax` (L-BFGS with the curvature guard off, as ASE; and FIRE), torch-sim's
  batched L-BFGS (ASE mode) and FIRE, nvalchemi-toolkit-ops' L-BFGS and FIRE2 where installed,
  all `--systems` in one batch, ASE's L-BFGS settings with `--memory`.
- Per row and window of steps (the first 10, around half the memory, and past the memory, where
  L-BFGS's history is full): ms per step (the window's wall time with one device wait at each
  end, divided by its steps) and kernels per step: aten operators dispatched between two force
  calls, views aside (on a GPU each is a launch; Warp's kernels, nvalchemi's, are not aten
  operators and are not counted), and how many of them make the host wait (`_reads_back`: on a
  GPU, nonzero or item of a device tensor and copies to the host; on a CPU run, where nothing
  waits, nonzero and item by name, the waits they would be on a GPU, while copies to the host
  are not seen there, so a CPU run's count is a lower bound).
  `ratio` = the peer's ms per step / molden's in the same window (> 1: molden is faster).
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from molden.bench import relax_peers
from molden.bench.relax import oc20_like_systems
from molden.bench.tables import print_table
from molden.data.ase_convert import structure_from_atoms
from molden.relax.driver import relax
from molden.relax.optimizers import FIRESettings, LBFGSSettings

FORCE_SCALE_EV_PER_ANGSTROM = 0.5
WINDOW = 10
VIEWS = frozenset({"view", "_unsafe_view", "permute", "unsqueeze", "squeeze", "expand", "select", "slice",
                   "as_strided", "t", "transpose", "alias", "detach", "lift_fresh", "diagonal", "unbind", "split",
                   "reshape", "_reshape_alias", "unflatten", "flatten"})
"""Operators that make a view: no kernel."""
HOST_READS = frozenset({"nonzero", "_local_scalar_dense", "item", "masked_select", "is_nonzero", "equal",
                        "unique_consecutive", "_unique2"})
"""Operators whose output size or value the host must wait for."""
READ = "<host read>"
"""The counter's key for host reads (not an operator)."""


def _reads_back(name: str, args, out, device: torch.device) -> bool:
    """Whether this operator makes the host wait: on a GPU run, `HOST_READS` with a device input
    and copies from the device to the host; on a CPU run, `HOST_READS` by name (the waits they
    would be on a GPU; copies to the host are no-ops there and not seen)."""
    if device.type == "cpu":
        return name in HOST_READS
    on_device = any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args)
    if name in HOST_READS:
        return on_device
    return name in ("_to_copy", "copy_") and on_device and isinstance(out, torch.Tensor) and out.device.type == "cpu"


class _Recorder:
    """The force provider every tool calls: random forces from one seeded stream, and at each
    call the wall time (with a device wait every `WINDOW` calls) and the operators dispatched
    since the previous call."""

    def __init__(self, device: torch.device, seed: int, counter: _OperatorCounter | None = None):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.counter = counter
        self.calls = 0
        self.stamps: dict[int, float] = {}
        self.per_call: list[collections.Counter] = []

    def __call__(self, batch):
        with _disable_current_modes():  # the force call is not the optimiser's
            if self.counter is not None:
                self.per_call.append(self.counter.take())
            if self.calls % WINDOW == 0:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.stamps[self.calls] = time.perf_counter()
            self.calls += 1
            positions = batch.positions
            forces = torch.randn(positions.shape, generator=self.generator, device=self.device,
                                 dtype=positions.dtype) * FORCE_SCALE_EV_PER_ANGSTROM
            return torch.zeros(batch.num_graphs, dtype=positions.dtype, device=self.device), forces


class _OperatorCounter(TorchDispatchMode):
    """Operators dispatched, views aside, by name; and the host reads among them (`_reads_back`)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        out = func(*args, **(kwargs or {}))
        if name not in VIEWS:
            self.ops[name] += 1
            if _reads_back(name, args, out, self.device):
                self.ops[READ] += 1
        return out

    def take(self) -> collections.Counter:
        ops, self.ops = self.ops, collections.Counter()
        return ops


def _windows(steps: int, memory: int) -> list[tuple[str, int, bool]]:
    """(label, start, whether L-BFGS's history is full) of each timed window: steps start+1 ..
    start+`WINDOW`, start a multiple of `WINDOW` (the recorder waits for the device there).
    Step k stores the (k−1)-th pair, so the history is full from step memory + 1 on."""
    half = max(WINDOW, round(memory / 2 / WINDOW) * WINDOW)
    full = -(-memory // WINDOW) * WINDOW
    return [(f"steps {start + 1}–{start + WINDOW}", start, start >= memory)
            for start in sorted({0, half, full}) if start + WINDOW <= steps]


def _runners(systems, method: str, steps: int, lbfgs: LBFGSSettings, fire: FIRESettings,
             device: torch.device) -> dict[str, Callable]:
    """tool → run(provider), each taking `steps` steps of `method` on every system in one batch."""
    structures = [structure_from_atoms(a, system_id=f"bench:{k}") for k, a in enumerate(systems)]
    n = len(systems)
    runs: dict[str, Callable] = {
        "molden": lambda provider: relax(structures, provider, method=method, fmax_ev_per_angstrom=0.0,
                                         max_steps=steps, batch_size=n, lbfgs=lbfgs, fire=fire, device=device)}
    if relax_peers.torch_sim_missing(method) is None:
        runs["torch-sim"] = lambda provider: relax_peers.torch_sim_relax(provider, systems, method, steps, lbfgs=lbfgs,
                                                                         fire=fire, batch_size=n)
    if relax_peers.nvalchemi_missing() is None:
        runs["nvalchemi"] = lambda provider: relax_peers.nvalchemi_relax(provider, systems, method, steps, lbfgs=lbfgs,
                                                                         fire=fire, batch_size=n)
    return runs


def run_optimizer_step_benchmark(device: str = "cpu", n_systems: int = 64, memory: int = 100, steps: int = 120,
                                 seed: int = 0) -> list[dict]:
    """One row per (method, tool, window): ms per step, kernels and host reads per step, ratio."""
    if n_systems < 1 or memory < 1 or steps <= WINDOW:
        raise ValueError(f"needs systems >= 1, memory >= 1 and steps > {WINDOW}")
    device = torch.device(device)
    systems = oc20_like_systems(n_systems, seed)
    lbfgs, fire = LBFGSSettings(memory=memory, curvature_guard=False), FIRESettings()
    windows = _windows(steps, memory)
    rows = []
    for method in ("lbfgs", "fire"):
        runners = _runners(systems, method, steps, lbfgs, fire, device)
        for run in _runners(systems[:2], method, 2, lbfgs, fire, device).values():
            run(_Recorder(device, seed))  # warm-up: first calls compile (CUDA, Warp)
        timed = {}
        for tool, run in runners.items():
            recorder = _Recorder(device, seed)
            run(recorder)
            counter = _OperatorCounter(device)
            counted = _Recorder(device, seed, counter)
            with counter:
                run(counted)
            timed[tool] = (recorder, counted)
        for label, start, history_full in windows:
            reference = None
            for tool, (recorder, counted) in timed.items():
                # Force call k follows step k: the window's steps run between calls start and start + WINDOW.
                ms = 1000 * (recorder.stamps[start + WINDOW] - recorder.stamps[start]) / WINDOW
                ops = counted.per_call[start + 1 : start + 1 + WINDOW]
                kernels = sum(sum(v for k, v in c.items() if k != READ) for c in ops) / WINDOW
                reads = sum(c[READ] for c in ops) / WINDOW
                reference = ms if tool == "molden" else reference
                rows.append({"method": method, "tool": tool, "window": label, "history_full": history_full,
                             "n_systems": n_systems,
                             "n_atoms": sum(len(a) for a in systems), "memory": memory, "device": str(device),
                             "ms_per_step": ms,
                             "kernels_per_step": None if tool == "nvalchemi" else kernels,
                             "host_reads_per_step": None if tool == "nvalchemi" else reads,
                             "ratio": ms / reference,
                             "version": None if tool == "molden" else (relax_peers.torch_sim_version() if tool == "torch-sim"
                                                                      else relax_peers.nvalchemi_version())})
        missing = {"torch-sim": relax_peers.torch_sim_missing(method), "nvalchemi": relax_peers.nvalchemi_missing()}
        rows += [{"method": method, "tool": tool, "skipped": why} for tool, why in missing.items() if why]
    return rows


def _print(rows: list[dict], machine: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"Optimiser cost per step, free random forces; {machine['cpu']}, {machine['torch_threads']} "
                        f"threads, torch {machine['torch']}; ratio = peer ms / molden ms (> 1: molden faster)")
    for column in ("method", "tool", "window", "ms/step", "kernels/step", "host reads/step", "ratio"):
        table.add_column(column)
    for r in rows:
        if r.get("skipped"):
            table.add_row(r["method"], r["tool"], escape(r["skipped"]), "", "", "", "")
            continue

        def fmt(key: str, spec: str) -> str:
            return "-" if r[key] is None else format(r[key], spec)

        window = r["window"] + (" (history full)" if r["history_full"] and r["method"] == "lbfgs" else "")
        table.add_row(r["method"], r["tool"], window, fmt("ms_per_step", ".2f"), fmt("kernels_per_step", ".0f"),
                      fmt("host_reads_per_step", ".1f"), fmt("ratio", ".2f"))
    print_table(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--systems", type=int, default=64)
    parser.add_argument("--memory", type=int, default=100, help="L-BFGS history (ASE's 100; OC20's preset 50)")
    parser.add_argument("--steps", type=int, default=120, help=f"steps per tool (more than {WINDOW})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, help="write the machine and the rows as JSON here (refused if it exists)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = parser.parse_args(argv)
    if args.systems < 1 or args.memory < 1 or args.steps <= WINDOW:
        parser.error(f"--systems and --memory need at least 1 and --steps more than {WINDOW}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    if args.json is not None and args.json.exists() and not args.overwrite:
        parser.error(f"--json {args.json} exists: pass --overwrite to replace it")
    torch.set_num_threads(args.threads)
    from molden.bench.relax import machine_description

    machine = machine_description()
    try:
        rows = run_optimizer_step_benchmark(args.device, args.systems, args.memory, args.steps, args.seed)
    except KeyboardInterrupt:
        raise SystemExit("interrupted: nothing written")
    _print(rows, machine)
    if args.json:  # whole or not at all
        partial = args.json.with_name(args.json.name + ".partial")
        partial.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
        partial.replace(args.json)


if __name__ == "__main__":
    main()
