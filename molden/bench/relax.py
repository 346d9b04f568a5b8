"""Relaxation speed benchmark (issues 15 and 16): molden's batched L-BFGS / FIRE against ASE's
per-structure loop and torch-sim's batched L-BFGS / FIRE (L-BFGS from torch-sim 0.4, which needs
Python >= 3.12), all driving the same molden model on the same OC20-sized adsorbate + slab
systems; and direct IS2RS prediction against L-BFGS.

`python -m molden.bench.relax [--sizes 64 256] [--steps 10] [--threads 2] [--json out.json]`

- Systems: fcc(111)/(100) 4×4×4 slabs (EMT lattice constants, bottom two layers fixed, pbc
  x and y) with one H/C/N/O adsorbate at a random site, 65–67 atoms, free atoms rattled by
  0.03 Å; system k draws from its own stream seeded by (seed, k).
- Model: without `--checkpoint`, `gns_oc20_cpu` (the Noisy Nodes OC20 backbone scaled for
  CPUs) with an energy head and a direct force head (Noisy Nodes' S2EF set-up), randomly
  initialised from the seed, run in float32; a checkpoint is used as trained. Every tool
  loads the same checkpoint file; the optimisers' own arithmetic is float64 in all of them.
- Equal work: an untrained model does not converge, so every tool takes exactly `steps`
  optimiser steps (fmax 0, `steps + 1` force evaluations) on every system, with molden's
  settings (ASE's defaults; molden's L-BFGS curvature guard off, so its steps are ASE's).
  molden relaxes `batch_size` systems at a time (`molden relax`'s default 64), torch-sim
  the same chunks (its L-BFGS in ASE mode: fixed 1/α, no line search; FIRE `ase_fire`; fixed
  atoms as its FixAtoms where it has constraints), ASE one system after another with one
  `MoldenCalculator`. `relax_peers` says how each torch-sim version is driven. molden's
  model provider keeps Verlet lists (`molden relax`'s default skin, the same pairs); the peers'
  model searches its radius graph at every call, as their own model wrappers and calculators do.
- Agreement before speed: each tool's positions after the `steps` steps are compared with
  ASE's on every system; `agree` is False when any atom differs by more than
  `AGREE_ANGSTROM`, and such a row is flagged, not ranked. `--no-ase` leaves ASE's loop out
  (for many steps on a GPU, where it would take most of the time) and compares with molden's
  path instead, which is ASE's (tests/test_relax_optimizers.py); rows say which
  (`path_reference`).
- Timing: after a one-step warm-up of every tool on two systems (the first call compiles
  kernels: CUDA's, and Warp's on any device), the tools take turns within each repeat
  (the order flips every repeat), medians of `repeats`. `ratio` = tool time / molden's time
  for the same method (> 1: molden is faster); structure-steps/s = systems × steps / time.
- Direct prediction (Noisy Nodes §5.1): one forward pass of an IS2RS model (the same backbone
  with a position head, random weights: timing only) on the same systems, against molden's
  L-BFGS over `steps` steps (`direct_speedup`); a relaxation to fmax takes tens to 300 steps.
- With a trained `--checkpoint`, also molden's and ASE's L-BFGS to fmax 0.05 eV/Å (at most
  300 steps, OC20's budget), one repeat, compared by final positions within 0.01 Å.

Peers that are not installed (torch-sim) give a row with `skipped` saying how to install them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from ase import Atoms

from molden.bench.tables import print_table
from molden.bench import relax_peers
from molden.data.adsorbates import EMT_STABLE_ADSORBATES, place_adsorbate
from molden.data.ase_convert import structure_from_atoms
from molden.data.emt import EMTConfig, build_slab
from molden.data.structure import Structure
from molden.models import keys
from molden.models.checkpoint import load_model, write_checkpoint
from molden.models.spec import HeadSpec, backbone_from_preset, build_model, model_spec, vector_head
from molden.relax.driver import relax
from molden.relax.optimizers import FIRESettings, LBFGSSettings
from molden.relax.providers import ModelProvider
from molden.relax.run import direct_prediction

PRESET = "gns_oc20_cpu"
QUICK_CHANGES = {"latent_dim": 16, "mlp_hidden_dim": 16, "n_bessel": 8, "cutoff_angstrom": 4.0, "block_iterations": 1}
"""The quick mode's model: the same backbone, small enough for a CI test."""
METALS = ("Cu", "Pt", "Ag", "Ni", "Au", "Pd")
FACETS = ("111", "100")
RATTLE_ANGSTROM = 0.03
AGREE_ANGSTROM = 1e-3
"""Largest position difference from ASE's (Å, any atom, after all steps) for a row to agree.
A float32 model rounds differently batched than on one structure, and L-BFGS's curvature
pairs amplify it: 4e-5 Å after 15 steps on the quick systems, 5e-7 Å after 3 on full ones;
torch-sim's L-BFGS (0.6.2) matches molden's batched path to the last digit shown (7e-7 Å after
5 steps, 3e-5 Å after 40 on 8 full systems). Its FIRE (0.3.0 and 0.6.2 alike) updates the mixing
factor before mixing once a structure has gone `n_min` steps downhill (ASE: after): 3e-5 Å after
15 steps and 6e-4 Å after 40 on 8 full systems, so a long FIRE run may fail the check; that is
the algorithm's difference, not rounding. Half FIRE's time step exceeds the tolerance after 3
steps (tests/test_bench_relax.py)."""
CONVERGED_AGREE_ANGSTROM = 0.01  # issue 15's parity tolerance for minima
FMAX_EV_PER_ANGSTROM = 0.05
MAX_STEPS = 300  # OC20's IS2RS budget
BATCH_SIZE = 64  # molden relax's default
QUICK_SYSTEMS, QUICK_STEPS = 3, 3
TOOLS = ("molden", "ase", "torch-sim", "nvalchemi")


def oc20_like_systems(n: int, seed: int = 0, *, small: bool = False) -> list[Atoms]:
    """`n` unrelaxed adsorbate + slab systems (65–67 atoms; `small`: 2×2×3 slabs, 13–15
    atoms), system k from its own random stream (seed, k)."""
    config = EMTConfig(slab_size=(2, 2) if small else (4, 4), n_layers=3 if small else 4, n_fixed_layers=2 if not small else 1)
    systems = []
    for k in range(n):
        rng = np.random.default_rng([seed, k])
        slab = build_slab(METALS[k % len(METALS)], FACETS[(k // len(METALS)) % len(FACETS)], config)
        atoms = place_adsorbate(slab, EMT_STABLE_ADSORBATES[int(rng.integers(len(EMT_STABLE_ADSORBATES)))], rng)
        free = ~np.isin(np.arange(len(atoms)), atoms.constraints[0].index)
        atoms.positions += rng.normal(scale=RATTLE_ANGSTROM, size=atoms.positions.shape) * free[:, None]
        systems.append(atoms)
    return systems


@dataclass(frozen=True)
class Models:
    """Checkpoint files every tool loads: energy + forces, and a direct IS2RS model."""

    s2ef: Path
    is2rs: Path
    description: str
    trained: bool


def random_checkpoints(folder: Path, *, quick: bool = False, seed: int = 0) -> Models:
    """Randomly initialised `gns_oc20_cpu` models (float32) written as checkpoints in `folder`:
    energy + direct forces, and a position head for direct prediction."""
    backbone = backbone_from_preset(PRESET, **(QUICK_CHANGES if quick else {}))
    specs = {
        "s2ef": model_spec(backbone, {keys.ENERGY: HeadSpec(kind="graph_scalar", readout="sum"),
                                      keys.FORCES: vector_head(backbone)}, preset_name=PRESET),
        "is2rs": model_spec(backbone, {keys.POSITION_DELTA: vector_head(backbone)}, preset_name=PRESET),
    }
    paths = {}
    for name, spec in specs.items():
        torch.manual_seed(seed)
        model = build_model(spec)
        paths[name] = write_checkpoint(folder / f"{name}.pt", {
            "model_spec": spec.model_dump_json(), "model": model.state_dict(), "dtype": "float32",
            "task": json.dumps({"kind": name})})
    size = "quick-mode " if quick else ""
    return Models(paths["s2ef"], paths["is2rs"],
                  f"{size}{PRESET}, energy + direct force head, random weights (seed {seed}), float32", trained=False)


def _interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Median seconds of each run, the runs taking turns within each repeat (order flipped every
    repeat), and each run's output from its first repeat."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    outputs: dict[str, object] = {}
    names = list(runs)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            out = runs[name]()
            times[name].append(time.perf_counter() - start)
            outputs.setdefault(name, out)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def _deviation(positions: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """Largest distance (Å) of any atom from its reference position, over all systems."""
    return float(max(np.linalg.norm(p - r, axis=1).max() for p, r in zip(positions, reference)))


def _molden_runner(structures: Sequence[Structure], provider: ModelProvider, method: str, steps: int, *,
                   lbfgs: LBFGSSettings, fire: FIRESettings, device: str, batch_size: int) -> Callable[[], list]:
    def run() -> list[np.ndarray]:
        relaxed = relax(structures, provider, method=method, fmax_ev_per_angstrom=0.0, max_steps=steps,
                        batch_size=batch_size, lbfgs=lbfgs, fire=fire, device=device)
        return [r.positions for r in relaxed]

    return run


def run_relax_benchmark(device: str = "cpu", quick: bool = False, sizes: Sequence[int] = (64, 256),
                        checkpoint: str | Path | None = None, steps: int = 10, repeats: int = 3,
                        seed: int = 0, ase: bool = True) -> list[dict]:
    """One row per (case, systems, tool, method): seconds for `steps` optimiser steps on every
    system, structure-steps/s, `ratio` (tool time / molden's time, > 1: molden is faster),
    `agree` (positions within `AGREE_ANGSTROM` of ASE's), or `skipped` with an install hint.
    `quick`: `QUICK_SYSTEMS` small systems, `QUICK_STEPS` steps, a tiny model, one repeat.
    `ase=False` leaves ASE's loop out (many steps on a GPU, where it would take most of the
    time): the batched tools are then compared with molden's path, which is ASE's (tested)."""
    if quick:
        sizes, steps, repeats = (QUICK_SYSTEMS,), min(steps, QUICK_STEPS), 1
    if steps < 1 or repeats < 1 or not sizes or min(sizes) < 1:
        raise ValueError("the relax benchmark needs steps >= 1, repeats >= 1 and systems >= 1")
    lbfgs, fire = LBFGSSettings(curvature_guard=False), FIRESettings()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="molden_bench_relax_") as folder:
        models = random_checkpoints(Path(folder), quick=quick, seed=seed)
        if checkpoint is not None:
            models = Models(Path(checkpoint), models.is2rs, f"checkpoint {checkpoint}", trained=True)
        loaded = load_model(models.s2ef, device=device)
        provider = ModelProvider(loaded)
        # torch-sim drives a model that searches its graph at every call, as its own model
        # wrappers do; molden's Verlet lists are molden's.
        peer_provider = ModelProvider(loaded, skin_angstrom=0.0)
        for n in sizes:
            systems = oc20_like_systems(n, seed, small=quick)
            structures = [structure_from_atoms(a, system_id=f"bench:{k}") for k, a in enumerate(systems)]
            base = {"n_systems": n, "n_atoms": sum(len(a) for a in systems), "steps": steps,
                    "model": models.description, "dtype": str(next(loaded.model.parameters()).dtype),
                    "molden_skin_angstrom": provider.graph.skin}
            lbfgs_seconds = None
            for method in ("lbfgs", "fire"):
                method_rows = _fixed_step_rows(systems, structures, provider, peer_provider, models, method, steps, repeats,
                                               warmup=True, lbfgs=lbfgs, fire=fire, device=device, base=base, ase=ase)
                rows += method_rows
                if method == "lbfgs":
                    lbfgs_seconds = method_rows[0]["time_s"]
            rows.append(_direct_row(structures, models, lbfgs_seconds, repeats, warmup=True, device=device, base=base))
            if models.trained and ase:
                rows += _converged_rows(systems, structures, provider, models, lbfgs=lbfgs, fire=fire, device=device,
                                        base=base)
    return rows


def _fixed_step_rows(systems, structures, provider, peer_provider, models: Models, method: str, steps: int, repeats: int, *,
                     warmup: bool, lbfgs, fire, device, base, ase: bool = True) -> list[dict]:
    """molden, ASE (unless not `ase`) and the batched peers' rows for `steps` steps of `method`
    on every system."""
    dtype = next(provider.model.parameters()).dtype
    batch_size = min(BATCH_SIZE, len(systems))

    def runners(chosen_systems, chosen_structures, chosen_steps) -> dict[str, Callable[[], list]]:
        runs = {
            "molden": _molden_runner(chosen_structures, provider, method, chosen_steps, lbfgs=lbfgs, fire=fire,
                                     device=device, batch_size=batch_size),
        }
        if ase:
            runs["ase"] = lambda: relax_peers.ase_relax_loop(chosen_systems, models.s2ef, method, chosen_steps,
                                                             lbfgs=lbfgs, fire=fire, dtype=dtype, device=device)
        if relax_peers.torch_sim_missing(method) is None:
            runs["torch-sim"] = lambda: relax_peers.torch_sim_relax(peer_provider, chosen_systems, method, chosen_steps,
                                                                    lbfgs=lbfgs, fire=fire, batch_size=batch_size).positions
        if relax_peers.nvalchemi_missing() is None:
            runs["nvalchemi"] = lambda: relax_peers.nvalchemi_relax(peer_provider, chosen_systems, method, chosen_steps,
                                                                    lbfgs=lbfgs, fire=fire, batch_size=batch_size).positions
        return runs

    if warmup:
        for warm in runners(systems[:2], structures[:2], 1).values():
            warm()
    seconds, outputs = _interleaved(runners(systems, structures, steps), repeats)
    reference = outputs["ase" if ase else "molden"]
    rows = []
    for tool in TOOLS:
        row = {"case": "fixed steps", **base, "tool": tool, "method": method, "time_s": None,
               "structure_steps_per_s": None, "ratio": None, "agree": None, "max_deviation_angstrom": None,
               "tolerance_angstrom": AGREE_ANGSTROM, "skipped": None, "path_reference": "ase" if ase else "molden"}
        if tool not in seconds:
            row["skipped"] = ("not run (--no-ase)" if tool == "ase" else relax_peers.torch_sim_missing(method)
                              if tool == "torch-sim" else relax_peers.nvalchemi_missing())
            rows.append(row)
            continue
        deviation = _deviation(outputs[tool], reference)
        row.update(time_s=seconds[tool], structure_steps_per_s=len(systems) * steps / seconds[tool],
                   ratio=seconds[tool] / seconds["molden"], max_deviation_angstrom=deviation,
                   agree=bool(deviation <= AGREE_ANGSTROM))
        if tool == "nvalchemi" and method == "lbfgs":
            # Another L-BFGS (trust-region step length): the same force calls, other steps.
            row.update(agree=None, note="its own L-BFGS, not ASE's: same force calls, positions not compared")
        if tool != "molden" and tool != "ase":
            row["version"] = (relax_peers.torch_sim_version() if tool == "torch-sim"
                              else relax_peers.nvalchemi_version())
        rows.append(row)
    return rows


def _direct_row(structures, models: Models, lbfgs_seconds: float | None, repeats: int, *, warmup: bool, device,
                base) -> dict:
    """Direct IS2RS prediction (one forward pass) on every system, against molden's L-BFGS."""
    run = lambda: direct_prediction(structures, models.is2rs, device=device, batch_size=BATCH_SIZE)  # noqa: E731
    if warmup:
        direct_prediction(structures[:2], models.is2rs, device=device)
    seconds, _ = _interleaved({"direct": run}, repeats)
    t = seconds["direct"]
    return {"case": "direct vs L-BFGS", **base, "tool": "molden", "method": "direct", "time_s": t,
            "structure_steps_per_s": None, "ratio": None, "agree": None, "max_deviation_angstrom": None,
            "tolerance_angstrom": None, "skipped": None,
            "direct_speedup": None if lbfgs_seconds is None else lbfgs_seconds / t,
            "note": f"molden L-BFGS time for {base['steps']} steps / direct prediction time (IS2RS model, random weights)"}


def _converged_rows(systems, structures, provider, models: Models, *, lbfgs, fire, device, base) -> list[dict]:
    """molden's and ASE's L-BFGS to fmax (a trained model only), one repeat each."""
    from molden.ase import MoldenCalculator

    dtype = next(provider.model.parameters()).dtype
    start = time.perf_counter()
    relaxed = relax(structures, provider, method="lbfgs", fmax_ev_per_angstrom=FMAX_EV_PER_ANGSTROM, max_steps=MAX_STEPS,
                    batch_size=min(BATCH_SIZE, len(structures)), lbfgs=lbfgs, device=device)
    molden_s = time.perf_counter() - start
    calculator = MoldenCalculator(models.s2ef, dtype=dtype, device=device)
    start = time.perf_counter()
    found = relax_peers.ase_relax(systems, lambda: calculator, "lbfgs", MAX_STEPS, lbfgs=lbfgs, fire=fire,
                                  fmax_ev_per_angstrom=FMAX_EV_PER_ANGSTROM)
    ase_positions, ase_steps = found.positions, found.steps
    ase_s = time.perf_counter() - start
    deviation = _deviation([r.positions for r in relaxed], ase_positions)
    same_steps = [r.steps for r in relaxed] == ase_steps
    rows = []
    for tool, seconds, steps in (("molden", molden_s, [r.steps for r in relaxed]), ("ase", ase_s, ase_steps)):
        rows.append({"case": f"to fmax {FMAX_EV_PER_ANGSTROM} eV/Å", **base, "steps": float(np.mean(steps)),
                     "tool": tool, "method": "lbfgs", "time_s": seconds, "structure_steps_per_s": sum(steps) / seconds,
                     "ratio": seconds / molden_s, "agree": bool(deviation <= CONVERGED_AGREE_ANGSTROM and same_steps),
                     "max_deviation_angstrom": deviation, "tolerance_angstrom": CONVERGED_AGREE_ANGSTROM, "skipped": None,
                     "converged_fraction": float(np.mean([s < MAX_STEPS for s in steps]))})
    return rows


def machine_description() -> dict:
    from molden.bench.model_step import machine

    described = machine()
    described["torch_sim"] = relax_peers.torch_sim_version()
    described["nvalchemi"] = relax_peers.nvalchemi_version()
    return described


def _print_table(rows: list[dict], machine: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"Relaxation: same systems, model and steps; {machine['cpu']}, {machine['torch_threads']} threads, "
                        f"torch {machine['torch']}; ratio = tool time / molden time (> 1: molden faster)")
    for column in ("case", "systems", "steps", "tool", "method", "time s", "structure-steps/s", "ratio", "agree",
                   "max dev Å"):
        table.add_column(column)
    for r in rows:
        def fmt(key: str, spec: str) -> str:
            return "-" if r.get(key) is None else format(r[key], spec)

        ratio = (escape(r["skipped"]) if r["skipped"] else
                 f"speed-up {r['direct_speedup']:.1f}" if r.get("direct_speedup") else fmt("ratio", ".2f"))
        table.add_row(r["case"], str(r["n_systems"]), format(r["steps"], "g"), r["tool"], r["method"], fmt("time_s", ".2f"),
                      fmt("structure_steps_per_s", ",.1f"), ratio,
                      "-" if r["agree"] is None else ("yes" if r["agree"] else "NO"), fmt("max_deviation_angstrom", ".1e"))
    print_table(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SYSTEMS} small systems, {QUICK_STEPS} steps, tiny model")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="numbers of systems")
    parser.add_argument("--checkpoint", type=Path, help="a trained molden checkpoint with energy and forces")
    parser.add_argument("--steps", type=int, default=10, help="optimiser steps every tool takes on every system")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (medians)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ase", action="store_true",
                        help="leave ASE's per-structure loop out (the batched tools are compared with molden's path)")
    parser.add_argument("--json", type=Path, help="write the machine and the rows as JSON here")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    machine = machine_description()
    rows = run_relax_benchmark(args.device, args.quick, tuple(args.sizes), args.checkpoint, args.steps, args.repeats,
                               args.seed, ase=not args.no_ase)
    machine["load_average_after"] = machine_description()["load_average"]
    _print_table(rows, machine)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
