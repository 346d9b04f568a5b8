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

Graphs without periodicity (`pbc` all False) get the identity as their basis and six zeros.
"""

from __future__ import annotations

import torch
from torch import Tensor

from molden.data.batch import Batch


def periodic_frames(batch: Batch, dtype: torch.dtype) -> Tensor:
    """[B, 3, 3] the cell rows A of each graph with any periodic axis, the identity for the
    others (so that inverting is always defined)."""
    periodic = batch.pbc.any(dim=1)
    eye = torch.eye(3, dtype=dtype, device=batch.cell.device).expand(len(periodic), 3, 3)
    return torch.where(periodic[:, None, None], batch.cell.to(dtype), eye)


def cell_features(batch: Batch, dtype: torch.dtype, scale_angstrom: float) -> Tensor:
    """[B, 6] (α·β, β·γ, α·γ) / s² and (|α|, |β|, |γ|) / s with s = `scale_angstrom` (a fixed unit
    that keeps inputs of order one), zeros for graphs without periodicity."""
    cell = batch.cell.to(dtype)
    a, b, c = cell[:, 0], cell[:, 1], cell[:, 2]
    dots = torch.stack([(a * b).sum(-1), (b * c).sum(-1), (a * c).sum(-1)], dim=1) / scale_angstrom**2
    lengths = cell.norm(dim=2) / scale_angstrom
    features = torch.cat([dots, lengths], dim=1)
    return features * batch.pbc.any(dim=1, keepdim=True).to(dtype)


def to_frame(vectors: Tensor, inverse_frames: Tensor, graph: Tensor) -> Tensor:
    """[K, 3] Cartesian row vectors (Å, or eV/Å for forces) expressed in their graph's basis,
    v A⁻¹ (dimensionless for a periodic graph; unchanged for the others). `graph` [K] gives
    each row's graph."""
    return torch.einsum("ki,kij->kj", vectors, inverse_frames[graph])
