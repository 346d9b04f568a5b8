"""The relaxation benchmark's peers, each driving the same molden model on the same systems:
ASE's optimisers one structure after another (through `molden.ase.MoldenCalculator`), and
torch-sim's batched FIRE and L-BFGS (its `ModelInterface` wrapping the model). Peers are
imported when they run, so a missing one costs nothing but a row that says how to install it.

Every runner takes unrelaxed `ase.Atoms` (FixAtoms on the bottom layers) and returns the
positions [N, 3] Å after exactly `steps` optimiser steps (fmax 0: no structure stops early),
with `steps + 1` force evaluations, as molden's `relax` and ASE's `Optimizer.run` count them.

torch-sim's releases differ in what they offer; `torch_sim_api` resolves that once, by feature:
- 0.3 (the last for Python 3.11): `optimizers.fire(model, ...)` returns (init, update); no
  L-BFGS, no constraints, one `pbc` flag per state. Fixed atoms get zero force from the
  adapter, which is what ASE's FixAtoms does to FIRE (zero velocity, zero step).
- 0.4+ (Python >= 3.12): `fire_init` / `fire_step` and `lbfgs_init` / `lbfgs_step`, called with
  the model each step. Where `torch_sim.constraints.FixAtoms` exists (0.6) it holds the fixed
  atoms, as ASE's does: zero force and never moved (forces set at init too). Where SimState
  takes `pbc` per axis, the slabs' own (x and y) is passed.
torch-sim's L-BFGS in ASE mode (`alpha` given: fixed inverse Hessian guess 1/α, no line search)
is ASE's `LBFGS` with two differences: a history pair with |y·s| <= 1e-12 gets ρ = 0 (ASE
stores 1/(y·s)), and `step_size` (ASE's damping) scales the step before the `max_step` cap
(ASE: after). With molden's settings (damping 1) neither changes a step of these systems.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import inspect
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

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


@dataclass(frozen=True)
class TorchSimAPI:
    """What the installed torch-sim offers: the one place its versions' differences live."""

    version: str
    methods: tuple[str, ...]
    """("fire",) on 0.3; ("lbfgs", "fire") from 0.4 on."""
    fix_atoms: type | None
    """`torch_sim.constraints.FixAtoms`, or None (0.3: the adapter zeroes fixed atoms' forces)."""
    pbc_per_axis: bool
    """SimState takes `pbc` per axis (one for the whole state, not per system); 0.3: one flag."""

    def optimizer(self, model, method: str, *, lbfgs: LBFGSSettings,
                  fire: FIRESettings) -> tuple[Callable, Callable]:
        """(init, step): `init(sim_state)` evaluates the forces, `step(opt_state)` takes one
        optimiser step with molden's settings (ASE's algorithms and defaults). The L-BFGS
        guess follows `lbfgs.initial_inverse_hessian`: 'fixed' is torch-sim's ASE mode (α
        given), 'scaled' its default (γ = s·y / y·y as molden's `scaled`, but another first
        step before any pair: 0.17 Å apart from molden's after one step on the quick systems)."""
        if method not in self.methods:
            raise ValueError(f"torch-sim {self.version} has no {method}")
        from torch_sim import optimizers

        if not hasattr(optimizers, "fire_init"):  # 0.3: a factory bound to the model
            return optimizers.fire(model=model, dt_max=fire.dtmax, dt_start=fire.dt, n_min=fire.n_min, f_inc=fire.finc,
                                   f_dec=fire.fdec, alpha_start=fire.astart, f_alpha=fire.fa,
                                   max_step=fire.maxstep_angstrom, md_flavor="ase_fire")
        if method == "lbfgs":
            alpha = lbfgs.alpha_ev_per_angstrom2 if lbfgs.initial_inverse_hessian == "fixed" else None
            return (lambda state: optimizers.lbfgs_init(state, model, step_size=lbfgs.damping, alpha=alpha),
                    lambda state: optimizers.lbfgs_step(state, model, max_history=lbfgs.memory,
                                                        max_step=lbfgs.maxstep_angstrom))
        flavor = {("fire_flavor" if "fire_flavor" in inspect.signature(optimizers.fire_init).parameters
                   else "md_flavor"): "ase_fire"}
        return (lambda state: optimizers.fire_init(state, model, dt_start=fire.dt, alpha_start=fire.a, **flavor),
                lambda state: optimizers.fire_step(state, model, dt_max=fire.dtmax, n_min=fire.n_min, f_inc=fire.finc,
                                                   f_dec=fire.fdec, alpha_start=fire.astart, f_alpha=fire.fa,
                                                   max_step=fire.maxstep_angstrom, **flavor))


def torch_sim_api() -> TorchSimAPI | None:
    """The installed torch-sim's `TorchSimAPI`, or None where it is not installed."""
    version = torch_sim_version()
    if version is None:
        return None
    from torch_sim import optimizers
    from torch_sim.state import SimState

    methods = ("lbfgs", "fire") if hasattr(optimizers, "lbfgs_init") else ("fire",)
    constraints = importlib.import_module("torch_sim.constraints") if _has_module("torch_sim.constraints") else None
    fix_atoms = getattr(constraints, "FixAtoms", None)
    pbc_type = {f.name: f.type for f in dataclasses.fields(SimState)}["pbc"]
    return TorchSimAPI(version, methods, fix_atoms, pbc_per_axis="bool" not in str(pbc_type))


def torch_sim_missing(method: str) -> str | None:
    """Why torch-sim cannot run `method` here (an install hint or a version note), or None."""
    version = torch_sim_version()
    if version is None:
        return TORCH_SIM_HINT.format(torch=torch.__version__.split("+")[0])
    if method not in torch_sim_api().methods:
        # L-BFGS arrived in torch-sim 0.4, which needs Python >= 3.12.
        return f"torch-sim {version} has no L-BFGS (0.4+ has; it needs Python >= 3.12)"
    return None


def _has_module(name: str) -> bool:
    try:  # find_spec raises when a parent is a module, not a package (torch-sim 0.3's optimizers)
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class PeerRelaxation:
    """A peer's relaxed positions [N_k, 3] Å and optimiser steps, per system."""

    positions: list[np.ndarray]
    steps: list[int]


def ase_relax_loop(systems: Sequence[Atoms], checkpoint: Path, method: str, steps: int, *,
                   lbfgs: LBFGSSettings, fire: FIRESettings, dtype: torch.dtype, device: str = "cpu") -> list[np.ndarray]:
    """ASE's `LBFGS` / `FIRE` with one `MoldenCalculator`, structure after structure, each
    `steps` steps (fmax 0); the settings are molden's (ASE's defaults)."""
    from molden.ase import MoldenCalculator

    # Searched at every call, as other tools' calculators do (molden's Verlet lists are molden's).
    calculator = MoldenCalculator(checkpoint, dtype=dtype, device=device, skin_angstrom=0.0)
    return ase_relax(systems, lambda: calculator, method, steps, lbfgs=lbfgs, fire=fire).positions


def ase_relax(systems: Sequence[Atoms], make_calculator: Callable[[], object], method: str, max_steps: int, *,
              lbfgs: LBFGSSettings, fire: FIRESettings, fmax_ev_per_angstrom: float = 0.0) -> PeerRelaxation:
    """ASE's `LBFGS` / `FIRE` with molden's settings (ASE's defaults), one structure after
    another, each with `make_calculator()`, to `fmax_ev_per_angstrom` or `max_steps` steps."""
    from ase.optimize import FIRE, LBFGS

    out = PeerRelaxation([], [])
    for original in systems:
        atoms = original.copy()
        atoms.calc = make_calculator()
        if method == "lbfgs":
            opt = LBFGS(atoms, logfile=None, maxstep=lbfgs.maxstep_angstrom, memory=lbfgs.memory,
                        damping=lbfgs.damping, alpha=lbfgs.alpha_ev_per_angstrom2)
        else:
            opt = FIRE(atoms, logfile=None, dt=fire.dt, maxstep=fire.maxstep_angstrom, dtmax=fire.dtmax,
                       Nmin=fire.n_min, finc=fire.finc, fdec=fire.fdec, astart=fire.astart, fa=fire.fa, a=fire.a)
        opt.run(fmax=fmax_ev_per_angstrom, steps=max_steps)
        out.positions.append(atoms.positions.copy())
        out.steps.append(opt.nsteps)
    return out


def _device_of(provider) -> torch.device:
    """Where a provider's model runs (an ASE calculator provider computes on the host)."""
    return torch.device(getattr(provider, "device", "cpu"))


def torch_sim_model(provider, systems: Sequence[Atoms], *, zero_fixed_forces: bool = True):
    """torch-sim's `ModelInterface` around a molden `ModelProvider`, for these systems.

    The adapter keeps the systems' own periodicity (slabs: x and y only) in its molden batch,
    whatever the state's `pbc`. `zero_fixed_forces` (for a torch-sim without constraints)
    returns zero force on the fixed atoms. Optimiser state is float64, as molden's and ASE's;
    the model runs in its own dtype.
    """
    from torch_sim.models.interface import ModelInterface

    class MoldenModel(ModelInterface):
        def __init__(self):
            super().__init__()
            self._device, self._dtype = _device_of(provider), torch.float64
            self._compute_stress, self._compute_forces = False, True
            structures = [structure_from_atoms(a, system_id=f"torch-sim:{k}") for k, a in enumerate(systems)]
            self.template = collate(structures, dtype=torch.float64).to(self._device)
            self.free = (~self.template.fixed)[:, None] if zero_fixed_forces else None

        def forward(self, state, **kwargs) -> dict[str, torch.Tensor]:
            batch = replace(self.template, positions=state.positions, cell=state.row_vector_cell)
            energy, forces = provider(batch)
            forces = forces.to(self._dtype)
            return {"energy": energy.to(self._dtype), "forces": forces if self.free is None else forces * self.free}

    return MoldenModel()


def torch_sim_state(systems: Sequence[Atoms], api: TorchSimAPI, device: str | torch.device = "cpu", *,
                    fixed: torch.Tensor | None = None):
    """A torch-sim `SimState` of `systems` in float64 (cell in its column convention), with the
    `fixed` [N] bool atoms as a FixAtoms constraint and the systems' periodicity where `api`
    supports them."""
    from torch_sim.state import SimState

    positions = torch.tensor(np.concatenate([a.positions for a in systems]), dtype=torch.float64, device=device)
    masses = torch.tensor(np.concatenate([a.get_masses() for a in systems]), dtype=torch.float64, device=device)
    cell = torch.tensor(np.stack([a.cell.array for a in systems]), dtype=torch.float64, device=device)
    numbers = torch.tensor(np.concatenate([a.numbers for a in systems]), dtype=torch.long, device=device)
    system_idx = torch.repeat_interleave(torch.arange(len(systems), device=device),
                                         torch.tensor([len(a) for a in systems], device=device))
    pbc_axes = {tuple(bool(p) for p in a.pbc) for a in systems}
    pbc = list(pbc_axes.pop()) if api.pbc_per_axis and len(pbc_axes) == 1 else True
    state = SimState(positions=positions, masses=masses, cell=cell.mT.contiguous(), pbc=pbc,
                     atomic_numbers=numbers, system_idx=system_idx)
    if api.fix_atoms is not None and fixed is not None and bool(fixed.any()):
        state.constraints = [api.fix_atoms(atom_idx=torch.nonzero(fixed).flatten().to(device))]
    return state


def torch_sim_relax(provider, systems: Sequence[Atoms], method: str, steps: int, *, lbfgs: LBFGSSettings,
                    fire: FIRESettings, batch_size: int, fmax_ev_per_angstrom: float = 0.0) -> PeerRelaxation:
    """torch-sim's batched L-BFGS (ASE mode for the fixed guess, its default for the scaled
    one) or FIRE (`ase_fire`, ASE's algorithm) with molden's settings, `batch_size` systems at
    a time (as molden's `relax`). A system is done at the first force evaluation whose largest
    free-atom force is below `fmax_ev_per_angstrom`, or after `steps` steps (fmax 0: exactly
    `steps` each); done systems keep stepping, as torch-sim's step functions leave them."""
    api = torch_sim_api()
    out = PeerRelaxation([], [])
    for start in range(0, len(systems), batch_size):
        chunk = systems[start : start + batch_size]
        model = torch_sim_model(provider, chunk, zero_fixed_forces=api.fix_atoms is None)
        init, step = api.optimizer(model, method, lbfgs=lbfgs, fire=fire)
        state = init(torch_sim_state(chunk, api, _device_of(provider), fixed=model.template.fixed))
        free = (~model.template.fixed)[:, None]
        done = _FirstConverged(chunk, model.template.batch, fmax_ev_per_angstrom, steps)
        for n in range(steps + 1):
            if done.record(n, state.positions, state.forces, free) or n == steps:
                break
            state = step(state)
        out.positions.extend(done.positions)
        out.steps.extend(done.steps)
    return out


class _FirstConverged:
    """Per system of a chunk, the positions and step count at the first force evaluation whose
    largest free-atom force is below `fmax`, or at `max_steps` (one host read per call; with
    fmax 0, none before the last)."""

    def __init__(self, chunk: Sequence[Atoms], system: torch.Tensor, fmax: float, max_steps: int):
        self.system, self.fmax, self.max_steps = system, fmax, max_steps
        self.bounds = np.cumsum([0] + [len(a) for a in chunk])
        self.steps = [-1] * len(chunk)
        self.positions: list[np.ndarray | None] = [None] * len(chunk)

    def record(self, step: int, positions: torch.Tensor, forces: torch.Tensor, free: torch.Tensor) -> bool:
        """Record the systems done at `step` (`free` [N, 1]: the atoms the test looks at); True
        once every system is."""
        if self.fmax <= 0 and step < self.max_steps:
            return False  # fixed steps: no device read until the last (the peer's own loop has none)
        largest = torch.zeros(len(self.steps), dtype=forces.dtype, device=forces.device).scatter_reduce_(
            0, self.system, (forces * free).norm(dim=1), "amax")
        now = (largest < self.fmax).cpu().numpy() | (step == self.max_steps)  # ASE's test: strictly below
        pending = [k for k in np.flatnonzero(now) if self.steps[k] < 0]
        if pending:
            host = positions.detach().cpu().numpy()
            for k in pending:
                self.steps[k], self.positions[k] = step, host[self.bounds[k] : self.bounds[k + 1]].copy()
        return min(self.steps) >= 0


NVALCHEMI_HINT = "not installed: pip install nvalchemi-toolkit-ops (brings warp-lang; in molden[bench])"


def nvalchemi_version() -> str | None:
    """The installed nvalchemi-toolkit-ops version, or None."""
    try:
        return importlib.metadata.version("nvalchemi-toolkit-ops")
    except importlib.metadata.PackageNotFoundError:
        return None


def nvalchemi_missing() -> str | None:
    """Why nvalchemi-toolkit-ops cannot run here (an install hint), or None."""
    return NVALCHEMI_HINT if nvalchemi_version() is None or not _has_module("nvalchemiops.torch.lbfgs") else None


def nvalchemi_relax(provider, systems: Sequence[Atoms], method: str, max_steps: int, *, lbfgs: LBFGSSettings,
                    fire: FIRESettings, batch_size: int, fmax_ev_per_angstrom: float = 0.0) -> PeerRelaxation:
    """nvalchemi-toolkit-ops' batched optimisers (Warp kernels) driven by molden's model,
    `batch_size` systems at a time: its own L-BFGS (trust-region step length, not ASE's fixed
    1/α) with molden's largest step and memory, or FIRE2 (Guénolé et al. 2020: ASE's FIRE
    with the half step back on an uphill step and a smallest time step) with molden's FIRE
    settings (ASE's) in place of its own. It has no constraints and no stopping rule (the
    caller owns the loop): fixed atoms get zero force, which neither optimiser moves, and a
    system is done, with its positions and step count kept, at the first force call whose
    largest free-atom force is below `fmax_ev_per_angstrom`. The loop ends when every
    system of the chunk is done or after `max_steps` steps (`max_steps + 1` force calls, as
    molden and ASE count them); done systems keep stepping, as the library leaves them."""
    import warp

    warp.config.quiet = True
    from nvalchemiops.torch.fire2 import fire2_step_coord
    from nvalchemiops.torch.lbfgs import lbfgs_prepare_state, lbfgs_step_coord

    if method not in ("lbfgs", "fire"):
        raise ValueError(f"no nvalchemi optimiser for {method!r}")
    out = PeerRelaxation([], [])
    for start in range(0, len(systems), batch_size):
        chunk = systems[start : start + batch_size]
        structures = [structure_from_atoms(a, system_id=f"nvalchemi:{k}") for k, a in enumerate(chunk)]
        template = collate(structures, dtype=torch.float64).to(_device_of(provider))
        free = (~template.fixed)[:, None]
        system = template.batch
        batch_idx = system.to(torch.int32)
        positions = template.positions.clone()
        n = len(chunk)
        if method == "lbfgs":
            state = lbfgs_prepare_state(len(positions), n, dtype=positions.dtype, device=positions.device,
                                        history_size=lbfgs.memory)
        else:
            velocities = torch.zeros_like(positions)
            alpha = torch.full((n,), fire.a, dtype=positions.dtype, device=positions.device)
            dt = torch.full((n,), fire.dt, dtype=positions.dtype, device=positions.device)
            nsteps_inc = torch.zeros(n, dtype=torch.int32, device=positions.device)
            # Its scratch buffers, allocated once (its documented tight loop).
            scratch = {name: torch.empty(n, dtype=positions.dtype, device=positions.device)
                       for name in ("vf", "v_sumsq", "f_sumsq", "max_norm")}
            settings = dict(delaystep=fire.n_min, dtgrow=fire.finc, dtshrink=fire.fdec, alphashrink=fire.fa,
                            alpha0=fire.astart, tmax=fire.dtmax, maxstep=fire.maxstep_angstrom)
        done = _FirstConverged(chunk, system, fmax_ev_per_angstrom, max_steps)
        for step in range(max_steps + 1):
            # A copy: the optimiser moves `positions` in place, and a provider may keep what it
            # is given (a Verlet list's reference positions).
            _, forces = provider(replace(template, positions=positions.clone()))
            forces = forces.to(positions.dtype) * free
            if done.record(step, positions, forces, free) or step == max_steps:
                break
            if method == "lbfgs":
                lbfgs_step_coord(positions, forces.contiguous(), state, batch_idx, maxstep=lbfgs.maxstep_angstrom)
            else:
                fire2_step_coord(positions, velocities, forces.contiguous(), batch_idx, alpha, dt, nsteps_inc,
                                 **scratch, **settings)
        out.positions.extend(done.positions)
        out.steps.extend(done.steps)
    return out
