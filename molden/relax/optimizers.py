"""Batched L-BFGS and FIRE in torch: many structures at once, each with its own history, step
size and convergence, on any device.

Every structure sits in a slot of padded [B, N, 3] tensors (N the largest structure), so the
per-structure algebra is a masked reduction over one axis: no Python loop over structures or
atoms. A slot's state is its own; nothing is shared across the batch (a shared L-BFGS history
corrupts the curvature: kUPS #94), and a slot is reset when a new structure moves in.

Both follow ASE's algorithms step for step (`ase.optimize.LBFGS`, `ase.optimize.FIRE`, ASE
3.23+), so a structure takes the same path as under ASE, alone or in any batch, up to float
rounding: forces on fixed atoms are zero and fixed atoms never move, as under `FixAtoms`. The
one deliberate difference is L-BFGS's curvature guard (`LBFGSSettings.curvature_guard`, on by
default; off, the steps are ASE's). L-BFGS can also leave ASE's path on purpose: the scaled
initial inverse Hessian (`LBFGSSettings.initial_inverse_hessian`) needs about half the force
calls with ASE's settings (fewer gains under OC20's 0.04 Å step cap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """[B] Σ over atoms and components of a·b, for [B, N, 3] tensors."""
    return (a * b).sum(dim=(1, 2))


@dataclass
class LBFGSSettings:
    maxstep_angstrom: float = 0.2
    memory: int = 100
    damping: float = 1.0
    alpha_ev_per_angstrom2: float = 70.0
    curvature_guard: bool = True
    """Skip history pairs with y·s <= 0 (standard L-BFGS practice). ASE stores them; with the
    guard off the steps are ASE's exactly. On one of 20 EMT test systems ASE's L-BFGS, storing
    such pairs, is still unconverged after 300 steps where the guarded one converges in 55."""
    initial_inverse_hessian: Literal["fixed", "scaled"] = "fixed"
    """The two-loop recursion's starting guess H0 of the inverse Hessian. 'fixed': 1/α at every
    step, as ASE's `LBFGS` (steps follow ASE's). 'scaled': γ I with γ = s·y / y·y of the
    structure's newest stored pair (Nocedal & Wright, Numerical Optimization, 2nd ed., eq.
    7.20), 1/α until it has one or when γ is not positive: the curvature the structure has
    shown instead of one guess for every material. On 20 EMT slabs + adsorbates it reaches
    fmax 0.05 eV/Å in half of ASE's steps with ASE's settings, 10 % fewer than the fixed guess
    under OC20's 0.04 Å cap (BENCHMARKS.md); the minima it ends in are
    other points of the same basins, and now and then another basin."""


class BatchedLBFGS:
    """L-BFGS without line search (ASE's `LBFGS`): inverse Hessian guess 1/α (or the scaled
    guess, `LBFGSSettings.initial_inverse_hessian`), the step scaled
    so that no atom moves more than `maxstep`, then multiplied by `damping`.

    History is a ring buffer [B, M, N, 3] per slot with its own write position; entries a
    structure does not have yet are masked out of both loops of the two-loop recursion.
    """

    def __init__(self, n_slots: int, n_atoms: int, settings: LBFGSSettings, *, dtype=torch.float64, device=None):
        self.settings = settings
        shape = (n_slots, settings.memory, n_atoms, 3)
        self.s = torch.zeros(shape, dtype=dtype, device=device)
        self.y = torch.zeros(shape, dtype=dtype, device=device)
        self.rho = torch.zeros(n_slots, settings.memory, dtype=dtype, device=device)
        self.head = torch.zeros(n_slots, dtype=torch.long, device=device)  # next write position
        self.count = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.iteration = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.r0 = torch.zeros(n_slots, n_atoms, 3, dtype=dtype, device=device)
        self.f0 = torch.zeros_like(self.r0)

    def reset(self, slots: Tensor) -> None:
        """Forget everything about the structures in `slots` (a new structure moved in)."""
        for t in (self.rho, self.head, self.count, self.iteration, self.r0, self.f0):
            t[slots] = 0

    def _initial_inverse_hessian(self, s: Tensor, y: Tensor, depth: int) -> Tensor:
        """[B] H0 per slot (Å²/eV) from the history newest first (`s`, `y` [B, depth, N, 3])."""
        fixed = torch.full_like(self.rho[:, 0], 1.0 / self.settings.alpha_ev_per_angstrom2)
        if self.settings.initial_inverse_hessian == "fixed" or depth == 0:
            return fixed
        gamma = _dot(s[:, 0], y[:, 0]) / _dot(y[:, 0], y[:, 0]).clamp_min(1e-300)
        return torch.where((self.count > 0) & torch.isfinite(gamma) & (gamma > 0), gamma, fixed)

    def step(self, positions: Tensor, forces: Tensor, active: Tensor) -> Tensor:
        """New positions [B, N, 3] Å for the `active` [B] slots (others unchanged), from the
        forces [B, N, 3] eV/Å at `positions` (zero on fixed and padding atoms)."""
        cfg, m = self.settings, self.settings.memory
        update = torch.nonzero(active & (self.iteration > 0)).flatten()
        if update.numel():
            s0 = positions[update] - self.r0[update]
            y0 = self.f0[update] - forces[update]  # the gradient's change
            # A pair with y·s <= 0 (the surface is not convex along the step) makes the inverse-
            # Hessian estimate indefinite, or infinite at y·s = 0: with the guard it is not stored.
            if cfg.curvature_guard:
                curvature = _dot(y0, s0)
                keep = torch.isfinite(curvature) & (curvature > 1e-12)
                update, s0, y0 = update[keep], s0[keep], y0[keep]
        if update.numel():
            slot = self.head[update]
            self.s[update, slot] = s0
            self.y[update, slot] = y0
            self.rho[update, slot] = 1.0 / _dot(y0, s0)
            self.head[update] = (slot + 1) % m
            self.count[update] = (self.count[update] + 1).clamp(max=m)
        q = -forces
        depth = int(self.count.max()) if len(self.count) else 0
        # Each structure's history newest first, gathered once: the recursion's loops then take
        # a few launches per pair instead of re-gathering every pair twice (ASE's memory is 100).
        rows = torch.arange(len(self.head), device=self.head.device)[:, None]
        ages = torch.arange(depth, device=self.head.device)
        newest_first = (self.head[:, None] - 1 - ages) % m
        s, y = self.s[rows, newest_first], self.y[rows, newest_first]
        rho = torch.where(ages < self.count[:, None], self.rho[rows, newest_first], 0.0)
        a = forces.new_zeros(len(self.head), depth)
        for j in range(depth):  # newest to oldest
            a[:, j] = rho[:, j] * _dot(s[:, j], q)
            q = q - a[:, j, None, None] * y[:, j]
        z = q * self._initial_inverse_hessian(s, y, depth)[:, None, None]
        for j in reversed(range(depth)):  # oldest to newest
            b = rho[:, j] * _dot(y[:, j], z)
            z = z + s[:, j] * (a[:, j] - b)[:, None, None]
        step = -z
        longest = step.norm(dim=2).amax(dim=1)
        scale = torch.where(longest >= cfg.maxstep_angstrom, cfg.maxstep_angstrom / longest.clamp_min(1e-300), 1.0)
        dr = step * (scale * cfg.damping)[:, None, None]
        keep = active[:, None, None]
        self.r0 = torch.where(keep, positions, self.r0)
        self.f0 = torch.where(keep, forces, self.f0)
        self.iteration = self.iteration + active.long()
        return torch.where(keep, positions + dr, positions)


@dataclass
class FIRESettings:
    dt: float = 0.1
    maxstep_angstrom: float = 0.2
    dtmax: float = 1.0
    n_min: int = 5
    finc: float = 1.1
    fdec: float = 0.5
    astart: float = 0.1
    fa: float = 0.99
    a: float = 0.1


class BatchedFIRE:
    """FIRE (Bitzek et al. 2006) as ASE's `FIRE` (no downhill check): the whole structure's
    step is scaled to at most `maxstep` in norm (ASE normalises the full 3N vector)."""

    def __init__(self, n_slots: int, n_atoms: int, settings: FIRESettings, *, dtype=torch.float64, device=None):
        self.settings = settings
        self.v = torch.zeros(n_slots, n_atoms, 3, dtype=dtype, device=device)
        self.dt = torch.full((n_slots,), settings.dt, dtype=dtype, device=device)
        self.a = torch.full((n_slots,), settings.a, dtype=dtype, device=device)
        self.n_steps = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.started = torch.zeros(n_slots, dtype=torch.bool, device=device)

    def reset(self, slots: Tensor) -> None:
        cfg = self.settings
        self.v[slots] = 0
        self.dt[slots] = cfg.dt
        self.a[slots] = cfg.a
        self.n_steps[slots] = 0
        self.started[slots] = False

    def step(self, positions: Tensor, forces: Tensor, active: Tensor) -> Tensor:
        cfg = self.settings
        vf = _dot(forces, self.v)
        uphill_free = self.started & (vf > 0)
        reset = self.started & ~(vf > 0)
        f_norm = _dot(forces, forces).sqrt().clamp_min(1e-300)
        v_norm = _dot(self.v, self.v).sqrt()
        mixed = (1 - self.a)[:, None, None] * self.v + (self.a * v_norm / f_norm)[:, None, None] * forces
        grow = uphill_free & (self.n_steps > cfg.n_min)
        v = torch.where(uphill_free[:, None, None], mixed, torch.where(reset[:, None, None], 0.0, self.v))
        dt = torch.where(grow, (self.dt * cfg.finc).clamp(max=cfg.dtmax), torch.where(reset, self.dt * cfg.fdec, self.dt))
        a = torch.where(grow, self.a * cfg.fa, torch.where(reset, torch.full_like(self.a, cfg.astart), self.a))
        n_steps = torch.where(uphill_free, self.n_steps + 1, torch.where(reset, 0, self.n_steps))
        v = v + dt[:, None, None] * forces
        dr = dt[:, None, None] * v
        norm = _dot(dr, dr).sqrt()
        dr = dr * torch.where(norm > cfg.maxstep_angstrom, cfg.maxstep_angstrom / norm.clamp_min(1e-300), 1.0)[:, None, None]
        keep = active[:, None, None]
        self.v = torch.where(keep, v, self.v)
        self.dt = torch.where(active, dt, self.dt)
        self.a = torch.where(active, a, self.a)
        self.n_steps = torch.where(active, n_steps, self.n_steps)
        self.started = self.started | active
        return torch.where(keep, positions + dr, positions)
