"""The relaxation benchmark's peers, each driving the same molden model on the same systems:
ASE's optimisers one structure after another (through `molden.ase.MoldenCalculator`), and
torch-sim's batched FIRE (its `ModelInterface` wrapping the model). Peers are imported when
they run, so a missing one costs nothing but a row that says how to install it.

Every runner takes unrelaxed `ase.Atoms` (FixAtoms on the bottom layers) and returns the
positions [N, 3] Å after exactly `steps` optimiser steps (fmax 0: no structure stops early),
with `steps + 1` force evaluations, as molden's `relax` and ASE's `Optimizer.run` count them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from ase import Atoms

from molden.data.ase_convert import structure_from_atoms
from molden.data.batch import collate
from molden.relax.optimizers import FIRESettings, LBFGSSettings

TORCH_SIM_HINT = ("not installed: python -m venv --system-site-packages ../peers/torchsim-venv && "
                  "../peers/torchsim-venv/bin/pip install torch-sim-atomistic torch=={torch} "
                  "(then run this benchmark with that venv's python; examples/peers/README.md)")


def torch_sim_version() -> str | None:
    """The installed torch-sim-atomistic version, or None."""
    if importlib.util.find_spec("torch_sim") is None:
        return None
    try:
        return importlib.metadata.version("torch-sim-atomistic")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def torch_sim_missing(method: str) -> str | None:
    """Why torch-sim cannot run `method` here (an install hint or a version note), or None."""
    version = torch_sim_version()
    if version is None:
        return TORCH_SIM_HINT.format(torch=torch.__version__.split("+")[0])
    if method == "lbfgs" and not _has_module("torch_sim.optimizers.lbfgs"):
        # L-BFGS arrived in torch-sim 0.4, which needs Python >= 3.12.
        return f"torch-sim {version} has no L-BFGS (0.4+ has; it needs Python >= 3.12)"
    if method == "lbfgs":
        return f"torch-sim {version}: its L-BFGS is not driven by this benchmark yet"
    return None


def _has_module(name: str) -> bool:
    try:  # find_spec raises when a parent is a module, not a package (torch-sim 0.3's optimizers)
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def ase_relax_loop(systems: Sequence[Atoms], checkpoint: Path, method: str, steps: int, *,
                   lbfgs: LBFGSSettings, fire: FIRESettings, dtype: torch.dtype, device: str = "cpu") -> list[np.ndarray]:
    """ASE's `LBFGS` / `FIRE` with one `MoldenCalculator`, structure after structure, each
    `steps` steps (fmax 0); the settings are molden's (ASE's defaults)."""
    from ase.optimize import FIRE, LBFGS

    from molden.ase import MoldenCalculator

    calculator = MoldenCalculator(checkpoint, dtype=dtype, device=device)
    out = []
    for original in systems:
        atoms = original.copy()
        atoms.calc = calculator
        if method == "lbfgs":
            opt = LBFGS(atoms, logfile=None, maxstep=lbfgs.maxstep_angstrom, memory=lbfgs.memory,
                        damping=lbfgs.damping, alpha=lbfgs.alpha_ev_per_angstrom2)
        else:
            opt = FIRE(atoms, logfile=None, dt=fire.dt, maxstep=fire.maxstep_angstrom, dtmax=fire.dtmax,
                       Nmin=fire.n_min, finc=fire.finc, fdec=fire.fdec, astart=fire.astart, fa=fire.fa, a=fire.a)
        opt.run(fmax=0.0, steps=steps)
        out.append(atoms.positions.copy())
    return out


def torch_sim_model(provider, systems: Sequence[Atoms]):
    """torch-sim's `ModelInterface` around a molden `ModelProvider`, for these systems.

    torch-sim 0.3 has one `pbc` flag for the whole state and no fixed atoms: the adapter keeps
    the systems' own periodicity (slabs: x and y only) in its molden batch, and returns zero
    force on the fixed atoms, which is what ASE's FixAtoms does to FIRE (zero velocity, zero
    step). Optimiser state is float64, as molden's and ASE's; the model runs in its own dtype.
    """
    from torch_sim.models.interface import ModelInterface

    class MoldenModel(ModelInterface):
        def __init__(self):
            super().__init__()
            self._device, self._dtype = torch.device(provider.device), torch.float64
            self._compute_stress, self._compute_forces = False, True
            structures = [structure_from_atoms(a, system_id=f"torch-sim:{k}") for k, a in enumerate(systems)]
            self.template = collate(structures, dtype=torch.float64).to(self._device)
            self.free = (~self.template.fixed)[:, None]

        def forward(self, state, **kwargs) -> dict[str, torch.Tensor]:
            batch = replace(self.template, positions=state.positions, cell=state.row_vector_cell)
            energy, forces = provider(batch)
            return {"energy": energy.to(self._dtype), "forces": forces.to(self._dtype) * self.free}

    return MoldenModel()


def torch_sim_state(systems: Sequence[Atoms], device: str | torch.device = "cpu"):
    """A torch-sim `SimState` of `systems` in float64 (cell in its column convention)."""
    from torch_sim.state import SimState

    positions = torch.tensor(np.concatenate([a.positions for a in systems]), dtype=torch.float64, device=device)
    masses = torch.tensor(np.concatenate([a.get_masses() for a in systems]), dtype=torch.float64, device=device)
    cell = torch.tensor(np.stack([a.cell.array for a in systems]), dtype=torch.float64, device=device)
    numbers = torch.tensor(np.concatenate([a.numbers for a in systems]), dtype=torch.long, device=device)
    system_idx = torch.repeat_interleave(torch.arange(len(systems), device=device),
                                         torch.tensor([len(a) for a in systems], device=device))
    return SimState(positions=positions, masses=masses, cell=cell.mT.contiguous(), pbc=True,
                    atomic_numbers=numbers, system_idx=system_idx)


def torch_sim_fire(provider, systems: Sequence[Atoms], steps: int, *, fire: FIRESettings,
                   batch_size: int) -> list[np.ndarray]:
    """torch-sim's batched FIRE (`md_flavor="ase_fire"`, ASE's algorithm) with molden's
    settings, `batch_size` systems at a time (as molden's `relax`), `steps` steps each."""
    from torch_sim.optimizers import fire as ts_fire

    out: list[np.ndarray] = []
    for start in range(0, len(systems), batch_size):
        chunk = systems[start : start + batch_size]
        model = torch_sim_model(provider, chunk)
        init, update = ts_fire(model=model, dt_max=fire.dtmax, dt_start=fire.dt, n_min=fire.n_min, f_inc=fire.finc,
                               f_dec=fire.fdec, alpha_start=fire.astart, f_alpha=fire.fa, max_step=fire.maxstep_angstrom,
                               md_flavor="ase_fire")
        state = init(torch_sim_state(chunk, provider.device))
        for _ in range(steps):
            state = update(state)
        positions = state.positions.detach().cpu().numpy()
        bounds = np.cumsum([0] + [len(a) for a in chunk])
        out += [positions[bounds[k] : bounds[k + 1]].copy() for k in range(len(chunk))]
    return out
