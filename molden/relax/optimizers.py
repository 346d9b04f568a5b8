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
from typing import Literal, Sequence

import numpy as np
import torch
from torch import Tensor


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """[B] Σ over atoms and components of a·b, for [B, N, 3] tensors."""
    return (a * b).sum(dim=(1, 2))


def _slots(slots: Sequence[int] | Tensor, index: Tensor | None, device: torch.device) -> tuple[Tensor, np.ndarray]:
    """The slots to reset as a device index and a host array. `slots`: host slot numbers, with
    `index` the same numbers already on the device (`relax` has both: no copy, no wait), or
    one copy to the device without it; or a tensor of slot numbers or a [B] bool mask (one read
    of a device tensor)."""
    if isinstance(slots, Tensor):
        chosen = torch.nonzero(slots).flatten() if slots.dtype == torch.bool else slots.long()
        return chosen.to(device), chosen.cpu().numpy()
    host = np.asarray(slots, dtype=np.int64)
    return (torch.as_tensor(host, device=device) if index is None else index), host


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
    """The L-BFGS update's starting guess H0 of the inverse Hessian. 'fixed': 1/α at every
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

    History is a ring buffer [B, M, N, 3] per slot with its own write position, beside the
    pairs' inner products s_i·y_j and y_i·y_j [B, M, M], updated by a row and a column when a
    pair is stored. The step is the compact form of the same inverse-Hessian update (Byrd,
    Nocedal & Schnabel, "Representations of quasi-Newton matrices", Math. Programming 63,
    1994, §2; it needs only s_i·y_i ≠ 0, so ASE's pairs of negative curvature are taken as ASE
    takes them): with S, Y a structure's pairs oldest first, R the upper triangle of SᵀY, D its
    diagonal and H0 = γ I,

        H g = γ g + S p − γ Y u,   u = R⁻¹ Sᵀg,   p = R⁻ᵀ ((D + γ YᵀY) u − γ Yᵀg).

    The two-loop recursion (ASE's, and molden's before) computes the same vector in two loops
    over the history: in torch about 12 kernels per stored pair, 1,283 per step with the relax
    driver's at ASE's memory of 100 (`molden.bench.optimizer_step`; on a GPU, launches that
    outlast the arithmetic). This is a fixed number at any depth (109 with the driver's), reads
    nothing back to the host, and passes over the history in memory as often as the two loops
    do. Its inner products are batched matrix products: in float32 on a GPU where the user has
    allowed TF32 matmuls they lose precision the elementwise recursion kept (relax runs the
    optimisers in float64 by default).

    Invariant: a pair a slot does not have is zero in `s`, `y`, `sy` and `yy` (reset zeroes
    them), so it adds nothing; only R's diagonal needs a 1 there.
    """

    def __init__(self, n_slots: int, n_atoms: int, settings: LBFGSSettings, *, dtype=torch.float64, device=None):
        self.settings = settings
        m = settings.memory
        self.s = torch.zeros(n_slots, m, n_atoms, 3, dtype=dtype, device=device)
        self.y = torch.zeros_like(self.s)
        self.sy = torch.zeros(n_slots, m, m, dtype=dtype, device=device)  # [b, i, j] = s_i·y_j, ring order
        self.yy = torch.zeros_like(self.sy)
        self.head = torch.zeros(n_slots, dtype=torch.long, device=device)  # next write position
        self.count = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.iteration = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.r0 = torch.zeros(n_slots, n_atoms, 3, dtype=dtype, device=device)
        self.f0 = torch.zeros_like(self.r0)
        self.calls_since_reset = np.zeros(n_slots, dtype=np.int64)
        """Per slot, steps since it was last reset, kept on the host: a bound on its writes (at
        most one a step, from ring position 0), so that until some ring is full the history is
        read only as far as any slot has written, without asking the device."""

    def reset(self, slots: Sequence[int] | Tensor, index: Tensor | None = None) -> None:
        """Forget everything about the structures in `slots` (a new structure moved in):
        `_slots` says what it accepts and what it costs."""
        index, host = _slots(slots, index, self.head.device)
        for t in (self.s, self.y, self.sy, self.yy, self.head, self.count, self.iteration, self.r0, self.f0):
            t[index] = 0
        self.calls_since_reset[host] = 0

    def initial_inverse_hessian(self) -> Tensor:
        """[B] H0 per slot (Å²/eV): 1/α, or γ = s·y / y·y of each slot's newest stored pair."""
        fixed = torch.full(self.head.shape, 1.0 / self.settings.alpha_ev_per_angstrom2, dtype=self.s.dtype,
                           device=self.s.device)
        if self.settings.initial_inverse_hessian == "fixed":
            return fixed
        rows = torch.arange(len(self.head), device=self.head.device)
        newest = (self.head - 1) % self.settings.memory
        gamma = self.sy[rows, newest, newest] / self.yy[rows, newest, newest].clamp_min(1e-300)
        return torch.where((self.count > 0) & torch.isfinite(gamma) & (gamma > 0), gamma, fixed)

    def _store_and_project(self, s0: Tensor, y0: Tensor, g: Tensor, store: Tensor, depth: int) -> tuple[Tensor, Tensor]:
        """Write the pair (s0, y0) [B, N, 3] into the ring of the `store` [B] slots, update the
        inner products, and return Sᵀg and Yᵀg [B, depth] in ring order (one pass over each of
        S and Y for all of it)."""
        rows = torch.arange(len(self.head), device=self.head.device)
        at = self.head
        for history, new in ((self.s, s0), (self.y, y0)):
            history[rows, at] = torch.where(store[:, None, None], new, history[rows, at])
        flat_s, flat_y = self.s[:, :depth].flatten(2), self.y[:, :depth].flatten(2)  # [B, depth, 3N]
        s_times = flat_s @ torch.stack([y0.flatten(1), g.flatten(1)], dim=2)  # s_i·y_new, s_i·g
        y_times = flat_y @ torch.stack([s0.flatten(1), y0.flatten(1), g.flatten(1)], dim=2)  # y_i·s_new, y_i·y_new, y_i·g
        keep = store[:, None]
        for table, row, column in ((self.sy, y_times[..., 0], s_times[..., 0]),  # row: s_new·y_j; column: s_i·y_new
                                   (self.yy, y_times[..., 1], y_times[..., 1])):
            table[rows, at, :depth] = torch.where(keep, row, table[rows, at, :depth])
            table[rows, :depth, at] = torch.where(keep, column, table[rows, :depth, at])
        self.head = torch.where(store, (at + 1) % self.settings.memory, at)
        self.count = torch.where(store, (self.count + 1).clamp(max=self.settings.memory), self.count)
        return s_times[..., 1], y_times[..., 2]

    def step(self, positions: Tensor, forces: Tensor, active: Tensor) -> Tensor:
        """New positions [B, N, 3] Å for the `active` [B] slots (others unchanged), from the
        forces [B, N, 3] eV/Å at `positions` (zero on fixed and padding atoms)."""
        cfg = self.settings
        self.calls_since_reset += 1
        # No slot has written past this (a host-side bound: no device read).
        depth = int(min(cfg.memory, self.calls_since_reset.max(initial=1)))
        s0, y0, g = positions - self.r0, self.f0 - forces, -forces  # y: the gradient's change
        store = active & (self.iteration > 0)
        if cfg.curvature_guard:
            # A pair with y·s <= 0 (the surface is not convex along the step) makes the inverse-
            # Hessian estimate indefinite, or infinite at y·s = 0: with the guard it is not stored.
            curvature = _dot(y0, s0)
            store = store & torch.isfinite(curvature) & (curvature > 1e-12)
        s_g, y_g = self._store_and_project(s0, y0, g, store, depth)
        # Oldest first: the k-th pair sits at ring position (head + k) % depth (a ring not yet
        # wrapped holds count = head pairs from 0; a full one has depth = M), and the first
        # depth − count of them are pairs the slot does not have (zero, decoupled).
        ages = torch.arange(depth, device=self.head.device)
        order = (self.head[:, None] + ages) % depth
        had = ages >= (depth - self.count)[:, None]
        # R, oldest first: one gather of the rows, one of the columns. YᵀY is used only times a
        # vector, which is taken in ring order instead (a gather of [B, depth], not [B, depth²]).
        sy = self.sy[:, :depth, :depth]
        sy = sy.gather(1, order[:, :, None].expand_as(sy)).gather(2, order[:, None, :].expand_as(sy))
        r = sy * torch.ones(depth, depth, dtype=sy.dtype, device=sy.device).triu()
        r.diagonal(dim1=1, dim2=2).add_(~had)  # 1 for the pairs not had: decoupled
        gamma = self.initial_inverse_hessian()[:, None]
        u = torch.linalg.solve_triangular(r, s_g.gather(1, order)[..., None], upper=True)[..., 0]
        u_ring = torch.zeros_like(u).scatter_(1, order, u)
        yy_u = (self.yy[:, :depth, :depth] @ u_ring[..., None])[..., 0].gather(1, order)
        w = sy.diagonal(dim1=1, dim2=2) * u + gamma * (yy_u - y_g.gather(1, order))
        p = torch.linalg.solve_triangular(r.mT, w[..., None], upper=False)[..., 0]
        p_ring = torch.zeros_like(p).scatter_(1, order, p)
        # H g = γ g + S p − γ Y u, one pass over each of S and Y.
        hg = (gamma * g.flatten(1) + (p_ring[:, None] @ self.s[:, :depth].flatten(2))[:, 0]
              - gamma * (u_ring[:, None] @ self.y[:, :depth].flatten(2))[:, 0])
        step = -hg.view_as(g)
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

    def reset(self, slots: Sequence[int] | Tensor, index: Tensor | None = None) -> None:
        cfg = self.settings
        index, _ = _slots(slots, index, self.v.device)
        self.v[index] = 0
        self.dt[index] = cfg.dt
        self.a[index] = cfg.a
        self.n_steps[index] = 0
        self.started[index] = False

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
