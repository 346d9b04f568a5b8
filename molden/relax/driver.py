"""Relax many structures at once: a queue of structures, a fixed number of slots, one batched
optimiser; converged structures leave and the next ones move in, so the device stays busy.

The energy/force provider is any callable `Batch -> (energy [B] eV, forces [N, 3] eV/Å)`: a
molden model or ASE's EMT (`molden.relax.providers`); the optimiser does not know which.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Literal, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from molden.data.batch import Batch, collate
from molden.data.structure import Structure
from molden.relax.optimizers import BatchedFIRE, BatchedLBFGS, FIRESettings, LBFGSSettings

Method = Literal["lbfgs", "fire"]


class ForceProvider(Protocol):
    def __call__(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Energies [B] eV and forces [N, 3] eV/Å of `batch` at its positions."""
        ...


@dataclass
class Relaxed:
    """One structure's relaxation."""

    positions: np.ndarray
    """[N, 3] final positions, Å (not wrapped into the cell)."""
    energy_ev: float
    fmax_ev_per_angstrom: float
    """Largest force norm over the free atoms at the final positions."""
    steps: int
    converged: bool


def relax(
    structures: Sequence[Structure],
    provider: ForceProvider,
    *,
    method: Method = "lbfgs",
    fmax_ev_per_angstrom: float = 0.05,
    max_steps: int = 300,
    batch_size: int = 64,
    lbfgs: LBFGSSettings | None = None,
    fire: FIRESettings | None = None,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    on_finished: Callable[[int, Relaxed], None] | None = None,
) -> list[Relaxed]:
    """Relax `structures` with `provider`'s forces until every free atom's force is below
    `fmax_ev_per_angstrom` or `max_steps` steps were taken (ASE's criterion and step count),
    `batch_size` structures at a time. Fixed atoms never move."""
    n = len(structures)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if n == 0:
        return []
    device = torch.device(device)
    n_slots = min(batch_size, n)
    n_atoms = max(len(s.numbers) for s in structures)
    optimizer = (BatchedLBFGS(n_slots, n_atoms, lbfgs or LBFGSSettings(), dtype=dtype, device=device) if method == "lbfgs"
                 else BatchedFIRE(n_slots, n_atoms, fire or FIRESettings(), dtype=dtype, device=device))
    positions = torch.zeros(n_slots, n_atoms, 3, dtype=dtype, device=device)
    free = torch.zeros(n_slots, n_atoms, dtype=torch.bool, device=device)
    occupant = [-1] * n_slots  # structure index in each slot
    steps = torch.zeros(n_slots, dtype=torch.long, device=device)
    results: list[Relaxed | None] = [None] * n
    queue = iter(range(n))
    # Each occupant as the provider sees it, prepared once when it moves in (not at every refill).
    members: dict[int, Structure] = {}

    def move_in(slots: list[int]) -> None:
        """The next queued structures into `slots` (emptied where the queue has run out), with
        one host-to-device copy for all of them: per-slot copies cost a device wait each."""
        host_positions = np.zeros((len(slots), n_atoms, 3))
        host_free = np.zeros((len(slots), n_atoms), dtype=bool)
        for row, slot in enumerate(slots):
            index = next(queue, None)
            occupant[slot] = -1 if index is None else index
            members.pop(slot, None)
            if index is not None:
                s = structures[index]
                # The queue position as system id: providers may keep per-structure state by it.
                members[slot] = replace(s, edge_index=None, unit_shifts=None, system_id=f"relax:{index}")
                k = len(s.numbers)
                host_positions[row, :k] = s.positions
                host_free[row, :k] = True if s.fixed is None else ~np.asarray(s.fixed, bool)
        chosen = torch.tensor(slots, dtype=torch.long, device=device)
        positions[chosen] = torch.from_numpy(host_positions).to(device=device, dtype=dtype)
        free[chosen] = torch.from_numpy(host_free).to(device)
        steps[chosen] = 0
        optimizer.reset(slots, chosen)

    def harvest(slots: list[int], energy_by_slot: Tensor, fmax: Tensor) -> None:
        """The finished structures in `slots`, read from the device in one copy per quantity."""
        chosen = torch.tensor(slots, dtype=torch.long, device=device)
        final = positions[chosen].cpu().numpy()
        energies, forces_max = energy_by_slot[chosen].cpu().tolist(), fmax[chosen].cpu().tolist()
        taken = steps[chosen].cpu().tolist()
        for row, slot in enumerate(slots):
            index = occupant[slot]
            k = len(structures[index].numbers)
            results[index] = Relaxed(positions=final[row, :k].copy(), energy_ev=energies[row],
                                     fmax_ev_per_angstrom=forces_max[row], steps=taken[row],
                                     converged=bool(forces_max[row] < fmax_ev_per_angstrom))  # False for NaN
            if on_finished is not None:
                on_finished(index, results[index])

    move_in(list(range(n_slots)))
    layout = _Layout.of(members, dtype, device)
    while layout.slots.numel():
        batch = replace(layout.batch, positions=positions[layout.slots_of_atoms, layout.atom_in_slot])
        energy, forces = provider(batch)
        padded = torch.zeros_like(positions)
        # Detached: a provider that returns forces with their graph (−∂E/∂x, create_graph) would
        # otherwise chain every step's graph into the history until memory runs out (torch-sim #559).
        padded[layout.slots_of_atoms, layout.atom_in_slot] = forces.detach().to(dtype)
        padded = padded * free[..., None]  # as FixAtoms: no force on fixed atoms
        fmax = padded.norm(dim=2).amax(dim=1)
        active = torch.zeros(n_slots, dtype=torch.bool, device=device)
        active[layout.slots] = True
        # A non-finite force (a learned model far outside its data) ends that structure's
        # relaxation, unconverged, before it can poison the positions and the graph.
        broken = ~torch.isfinite(fmax)
        done = active & ((fmax < fmax_ev_per_angstrom) | (steps >= max_steps) | broken)
        finished = torch.nonzero(done).flatten().tolist()  # the step's one wait for the device
        if finished:
            energy_by_slot = torch.zeros(n_slots, dtype=dtype, device=device)
            energy_by_slot[layout.slots] = energy.detach().to(dtype)
            harvest(finished, energy_by_slot, fmax)
        stepping = active & ~done
        new_positions = optimizer.step(positions, padded, stepping)
        positions.copy_(torch.where(free[..., None], new_positions, positions))
        steps += stepping.long()
        if finished:
            move_in(finished)
            layout = _Layout.of(members, dtype, device)
    return [r for r in results]  # every structure finished


@dataclass
class _Layout:
    """The occupied slots as one `Batch`, and where each of its atoms sits in the padding."""

    batch: Batch
    slots: Tensor
    slots_of_atoms: Tensor
    atom_in_slot: Tensor

    @classmethod
    def of(cls, members: dict[int, Structure], dtype, device) -> _Layout:
        """From the occupied slots' structures (slot → structure as the provider sees it)."""
        slots = sorted(members)
        if not slots:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return cls(batch=None, slots=empty, slots_of_atoms=empty, atom_in_slot=empty)  # type: ignore[arg-type]
        batch = collate([members[k] for k in slots], dtype=dtype).to(device)
        sizes = torch.tensor([len(members[k].numbers) for k in slots], device=device)
        slot_tensor = torch.tensor(slots, device=device)
        slots_of_atoms = torch.repeat_interleave(slot_tensor, sizes)
        starts = torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
        atom_in_slot = torch.arange(int(sizes.sum()), device=device) - starts
        return cls(batch=batch, slots=slot_tensor, slots_of_atoms=slots_of_atoms, atom_in_slot=atom_in_slot)
