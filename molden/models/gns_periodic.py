"""GNS on periodic systems: the cell's basis and the six cell features (Noisy Nodes §5.1,
"Additional Training Details").

The paper applies the model in the periodic basis, A(GNN(A⁻¹ν)), and appends
(αβᵀ, βγᵀ, αγᵀ, |α|, |β|, |γ|) to every edge, α, β, γ being the cell vectors. With cell rows
A (Å) a Cartesian row vector d has coordinates f = d A⁻¹ in that basis (d = f A), and a
vector v predicted in the basis maps back to Cartesian as Aᵀ v (column convention, the
`Latents.vector_frame`).

Rotating the whole system (positions and cell: d → d Rᵀ, A → A Rᵀ, R any orthogonal matrix)
leaves f, the six features and |d| unchanged, and Aᵀv turns into R Aᵀv: a periodic graph's
scalar outputs are invariant and its vector outputs equivariant, reflections included. What
they are not is independent of the choice of unit cell: an equivalent cell M A (M integer,
det ±1) changes both f = d A⁻¹ M⁻¹ and the six features. Reduce cells to a canonical form
(Niggli: `ase.build.niggli_reduce`) before the graph is built when this matters.

Graphs without periodicity (`pbc` all False) get the identity as their basis and six zeros;
a slab's non-periodic (vacuum) row is replaced by the unit normal of its periodic rows
(`periodic_frames`), so nothing depends on the vacuum thickness.
"""

from __future__ import annotations

import torch
from torch import Tensor

from molden.data.batch import Batch


def periodic_frames(batch: Batch, dtype: torch.dtype) -> Tensor:
    """[B, 3, 3] the basis A of each graph with a periodic axis (identity for the others).

    Noisy Nodes §5.1 uses the periodic axes. A non-periodic row of the cell (a slab's vacuum
    vector) is arbitrary — its length is the vacuum chosen, and it may be zero — so with two
    periodic axes it is replaced by the unit normal of the periodic rows, oriented like the
    given row (so the basis still turns with rotations and reflections of the system); with
    one periodic axis the other rows are scaled to unit length. The basis is then invertible
    for every valid periodic cell and independent of the vacuum thickness.
    """
    cell = batch.cell.to(dtype)
    pbc = batch.pbc
    rows = [cell[:, 0], cell[:, 1], cell[:, 2]]
    normals = torch.stack([torch.linalg.cross(rows[(k + 1) % 3], rows[(k + 2) % 3]) for k in range(3)], dim=1)
    normals = normals / normals.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    orientation = torch.where((normals * cell).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(dtype)
    normals = normals * orientation
    units = cell / cell.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    n_periodic = pbc.sum(dim=1, keepdim=True)
    slab_slot = (~pbc & (n_periodic == 2))[..., None]
    wire_slot = (~pbc & (n_periodic == 1))[..., None]
    frames = torch.where(slab_slot, normals, torch.where(wire_slot, units, cell))
    eye = torch.eye(3, dtype=dtype, device=cell.device).expand(len(pbc), 3, 3)
    return torch.where(pbc.any(dim=1)[:, None, None], frames, eye)


def cell_features(batch: Batch, dtype: torch.dtype, scale_angstrom: float) -> Tensor:
    """[B, 6] (α·β, β·γ, α·γ) / s² and (|α|, |β|, |γ|) / s of the basis rows (`periodic_frames`:
    a slab's vacuum row is its unit normal, 1 Å), s = `scale_angstrom` (a fixed unit that
    keeps inputs of order one); zeros for graphs without periodicity."""
    frames = periodic_frames(batch, dtype)
    a, b, c = frames[:, 0], frames[:, 1], frames[:, 2]
    dots = torch.stack([(a * b).sum(-1), (b * c).sum(-1), (a * c).sum(-1)], dim=1) / scale_angstrom**2
    lengths = frames.norm(dim=2) / scale_angstrom
    features = torch.cat([dots, lengths], dim=1)
    return features * batch.pbc.any(dim=1, keepdim=True).to(dtype)


def to_frame(vectors: Tensor, inverse_frames: Tensor, graph: Tensor) -> Tensor:
    """[K, 3] Cartesian row vectors (Å, or eV/Å for forces) expressed in their graph's basis,
    v A⁻¹ (dimensionless for a periodic graph; unchanged for the others). `graph` [K] gives
    each row's graph."""
    return torch.einsum("ki,kij->kj", vectors, inverse_frames[graph])
