"""Force calls to converge (issue 15): the steps each optimiser takes to relax the same systems
to fmax with the same forces, and where it ends against ASE's L-BFGS.

`python -m molden.bench.relax_steps [--systems 20] [--model emt|CHECKPOINT] [--preset ase|oc20]
[--json out.json]`

The relax benchmark (`molden.bench.relax`) times equal work: a fixed number of steps on the same
path. This one counts the work itself. A relaxation's cost is its force calls times the cost of
one, and the count does not depend on the device, so an optimiser that needs half the calls is
twice as fast on a laptop and on a GPU alike.

- Systems: the relax benchmark's OC20-sized slabs + adsorbates (`oc20_like_systems`, seed 0).
- Forces: ASE's EMT (the physics reference: real minima), or a molden checkpoint with energy and
  forces; every tool gets the same ones.
- Tools: ASE's `LBFGS` and `FIRE` one structure at a time (the reference); molden's batched
  L-BFGS with the fixed (ASE's) and the scaled initial inverse Hessian, and its FIRE;
  torch-sim's L-BFGS in its default mode (γ scaling too, but its first step before any pair
  is not ASE's F/α) and its FIRE (`ase_fire`), and
  nvalchemi-toolkit-ops' own L-BFGS and FIRE2 (`relax_peers.nvalchemi_relax`), where installed.
  `--preset` picks the L-BFGS settings (ASE's, or OC20's maxstep 0.04 Å and memory 50).
- Per row: systems converged (every free atom's force below fmax at the end), mean
  steps, force calls in all (steps + 1 per system), `calls_ratio` = ASE L-BFGS's calls / the
  row's (> 1: fewer calls than ASE), and the final energy against ASE L-BFGS's on the same
  system (median, range, how many systems end within 10 meV of it and how many more than
  10 meV above it, in a worse minimum; negative: lower). Seconds are reported but mean
  little here: with EMT they are mostly ASE's per-structure Python.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from ase import Atoms

from molden.bench import relax_peers
from molden.bench.relax import FMAX_EV_PER_ANGSTROM, MAX_STEPS, oc20_like_systems
from molden.bench.tables import print_table
from molden.data.ase_convert import structure_from_atoms
from molden.errors import MoldenError
from molden.relax.driver import relax
from molden.relax.optimizers import FIRESettings, LBFGSSettings
from molden.relax.providers import ASECalculatorProvider, provider_for
from molden.relax.run import oc20_lbfgs

QUICK_SYSTEMS = 3


def _calculator_factory(model: str) -> Callable[[], object]:
    if model == "emt":
        from ase.calculators.emt import EMT

        return EMT
    from molden.ase import MoldenCalculator

    calculator = MoldenCalculator(model, skin_angstrom=0.0)
    return lambda: calculator


def _ase_run(systems: Sequence[Atoms], make_calculator, method: str, lbfgs: LBFGSSettings,
             fire: FIRESettings) -> tuple[list[np.ndarray], list[int]]:
    found = relax_peers.ase_relax(systems, make_calculator, method, MAX_STEPS, lbfgs=lbfgs, fire=fire,
                                  fmax_ev_per_angstrom=FMAX_EV_PER_ANGSTROM)
    return found.positions, found.steps

def _energies_and_fmax(systems: Sequence[Atoms], positions: Sequence[np.ndarray], make_calculator) -> tuple[np.ndarray, np.ndarray]:
    """Energy (eV) and largest free-atom force (eV/Å) of every system at `positions`."""
    energies, fmax = [], []
    for original, p in zip(systems, positions):
        atoms = original.copy()
        atoms.positions = p
        atoms.calc = make_calculator()
        free = np.setdiff1d(np.arange(len(atoms)), atoms.constraints[0].index if atoms.constraints else [])
        energies.append(atoms.get_potential_energy())
        fmax.append(np.linalg.norm(atoms.get_forces()[free], axis=1).max())
    return np.array(energies), np.array(fmax)


def run_relax_steps_benchmark(model: str = "emt", n_systems: int = 20, preset: str = "ase", quick: bool = False,
                              seed: int = 0, batch_size: int = 64) -> list[dict]:
    """One row per (tool, method, settings): see the module docstring."""
    if n_systems < 1:
        raise ValueError("the steps benchmark needs at least one system")
    systems = oc20_like_systems(QUICK_SYSTEMS if quick else n_systems, seed, small=quick)
    structures = [structure_from_atoms(a, system_id=f"bench:{k}") for k, a in enumerate(systems)]
    lbfgs = oc20_lbfgs() if preset == "oc20" else LBFGSSettings()
    fire = FIRESettings()
    make_calculator = _calculator_factory(model)
    provider = ASECalculatorProvider() if model == "emt" else provider_for(model, skin_angstrom=0.0)

    def molden_run(method: str, settings: LBFGSSettings) -> Callable[[], tuple[list[np.ndarray], list[int]]]:
        def run():
            relaxed = relax(structures, provider, method=method, fmax_ev_per_angstrom=FMAX_EV_PER_ANGSTROM,
                            max_steps=MAX_STEPS, batch_size=batch_size, lbfgs=settings, fire=fire)
            return [r.positions for r in relaxed], [r.steps for r in relaxed]
        return run

    def nvalchemi_run(method: str) -> Callable[[], tuple[list[np.ndarray], list[int]]]:
        def run():
            found = relax_peers.nvalchemi_relax(provider, systems, method, MAX_STEPS, lbfgs=lbfgs, fire=fire,
                                                batch_size=batch_size, fmax_ev_per_angstrom=FMAX_EV_PER_ANGSTROM)
            return found.positions, found.steps
        return run

    def torch_sim_run(method: str, settings: LBFGSSettings) -> Callable[[], tuple[list[np.ndarray], list[int]]]:
        def run():
            found = relax_peers.torch_sim_relax(provider, systems, method, MAX_STEPS, lbfgs=settings, fire=fire,
                                                batch_size=batch_size, fmax_ev_per_angstrom=FMAX_EV_PER_ANGSTROM)
            return found.positions, found.steps
        return run

    scaled = replace(lbfgs, initial_inverse_hessian="scaled")
    runs: list[tuple[str, str, str, Callable | None]] = [
        ("ase", "lbfgs", "fixed 1/α", lambda: _ase_run(systems, make_calculator, "lbfgs", lbfgs, fire)),
        ("molden", "lbfgs", "fixed 1/α", molden_run("lbfgs", lbfgs)),
        ("molden", "lbfgs", "scaled", molden_run("lbfgs", scaled)),
        ("torch-sim", "lbfgs", "its default (γ)",
         torch_sim_run("lbfgs", scaled) if relax_peers.torch_sim_missing("lbfgs") is None else None),
        ("nvalchemi", "lbfgs", "its own", nvalchemi_run("lbfgs") if relax_peers.nvalchemi_missing() is None else None),
        ("ase", "fire", "FIRE", lambda: _ase_run(systems, make_calculator, "fire", lbfgs, fire)),
        ("molden", "fire", "FIRE", molden_run("fire", lbfgs)),
        ("torch-sim", "fire", "FIRE (ase_fire)",
         torch_sim_run("fire", lbfgs) if relax_peers.torch_sim_missing("fire") is None else None),
        ("nvalchemi", "fire", "FIRE2", nvalchemi_run("fire") if relax_peers.nvalchemi_missing() is None else None),
    ]
    rows: list[dict] = []
    reference_energy = reference_calls = None
    for tool, method, variant, run in runs:
        row = {"tool": tool, "method": method, "variant": variant, "model": model, "preset": preset,
               "n_systems": len(systems), "fmax_ev_per_angstrom": FMAX_EV_PER_ANGSTROM, "max_steps": MAX_STEPS}
        if run is None:
            rows.append({**row, "skipped": relax_peers.nvalchemi_missing() if tool == "nvalchemi"
                         else relax_peers.torch_sim_missing(method)})
            continue
        start = time.perf_counter()
        positions, steps = run()
        seconds = time.perf_counter() - start
        energies, fmax = _energies_and_fmax(systems, positions, make_calculator)
        calls = int(sum(steps)) + len(steps)
        if reference_energy is None:  # ASE's L-BFGS comes first
            reference_energy, reference_calls = energies, calls
        delta_mev = 1e3 * (energies - reference_energy)
        converged = fmax < FMAX_EV_PER_ANGSTROM  # ASE's test, at the final positions
        rows.append({**row, "skipped": None, "converged": int(converged.sum()), "mean_steps": float(np.mean(steps)),
                     "force_calls": calls, "calls_ratio": reference_calls / calls, "seconds": seconds,
                     "median_energy_difference_mev": float(np.median(delta_mev)),
                     "max_energy_difference_mev": float(delta_mev.max()),
                     "min_energy_difference_mev": float(delta_mev.min()),
                     "within_10_mev": int((np.abs(delta_mev) <= 10.0).sum()),
                     "higher_by_10_mev": int((delta_mev > 10.0).sum()),
                     "steps": [int(s) for s in steps], "energy_differences_mev": delta_mev.round(3).tolist()})
    return rows


def _print(rows: list[dict]) -> None:
    from rich.table import Table

    first = rows[0]
    table = Table(title=f"Force calls to fmax {first['fmax_ev_per_angstrom']} eV/Å ({first['model']}, "
                        f"{first['n_systems']} systems, preset {first['preset']}); ΔE against ASE's L-BFGS")
    for column in ("tool", "method", "variant", "converged", "mean steps", "force calls", "ASE L-BFGS calls / calls",
                   "median ΔE meV", "ΔE range meV", "|ΔE| ≤ 10 meV", "ΔE > +10 meV", "s"):
        table.add_column(column)
    for r in rows:
        if r["skipped"]:
            table.add_row(r["tool"], r["method"], r["variant"], r["skipped"], *["-"] * 8)
            continue
        table.add_row(r["tool"], r["method"], r["variant"], f"{r['converged']}/{r['n_systems']}", f"{r['mean_steps']:.1f}",
                      f"{r['force_calls']:,}", f"{r['calls_ratio']:.2f}", f"{r['median_energy_difference_mev']:+.2f}",
                      f"{r['min_energy_difference_mev']:+.1f} to {r['max_energy_difference_mev']:+.1f}",
                      f"{r['within_10_mev']}/{r['n_systems']}", f"{r['higher_by_10_mev']}/{r['n_systems']}",
                      f"{r['seconds']:.1f}")
    print_table(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="emt", help="emt, or a molden checkpoint with energy and forces")
    parser.add_argument("--systems", type=int, default=20)
    parser.add_argument("--preset", choices=("ase", "oc20"), default="ase")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SYSTEMS} small systems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here (refused if it exists)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = parser.parse_args(argv)
    if args.systems < 1:
        parser.error(f"--systems {args.systems}: at least one system")
    if args.model != "emt" and not Path(args.model).is_file():
        parser.error(f"--model {args.model}: no such checkpoint (or 'emt')")
    if args.json is not None and args.json.exists() and not args.overwrite:
        parser.error(f"--json {args.json} exists: pass --overwrite to replace it")
    torch.set_num_threads(args.threads)
    try:
        rows = run_relax_steps_benchmark(args.model, args.systems, args.preset, args.quick, args.seed)
    except MoldenError as error:  # a damaged checkpoint: one line, no traceback
        parser.error(str(error))
    except KeyboardInterrupt:  # nothing was written yet: the JSON comes only at the end
        raise SystemExit("interrupted: nothing written")
    _print(rows)
    if args.json:  # whole or not at all: an interrupted write leaves no half file
        partial = args.json.with_name(args.json.name + ".partial")
        partial.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
        partial.replace(args.json)

if __name__ == "__main__":
    main()
