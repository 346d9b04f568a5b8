"""GNS on periodic systems: the canonical basis of the lattice and the six cell features
(Noisy Nodes §5.1, "Additional Training Details").

The paper applies the model in the periodic basis, A(GNN(A⁻¹ν)), and appends
(αβᵀ, βγᵀ, αγᵀ, |α|, |β|, |γ|) to every edge, α, β, γ being the basis vectors. With basis rows
A (Å) a Cartesian row vector d has coordinates f = d A⁻¹ in that basis (d = f A), and a
vector v predicted in the basis maps back to Cartesian as Aᵀ v (column convention, the
`Latents.vector_frame`).

The paper's A is the cell as given (OC20's DFT cell); then f and the six features, hence the
outputs, change with the choice among equivalent unit cells. Here A is built from the
canonical reduced basis of the lattice of the periodic rows (`lattice_reduction`:
Minkowski-reduced, with fixed order and signs), computed inside the model for every batch as
an integer matrix N applied as N @ cell, so any cell, any positions (noised, relaxing) and
gradients through the cell work. What stays equal between equivalent cells, exactly and up to
the lattice's symmetries, is listed in `lattice_reduction`'s docstring.

Rotating the whole system (positions and cell: d → d Rᵀ, cell → cell Rᵀ, R orthogonal)
turns the basis with it (A → A Rᵀ): f, the six features and |d| are unchanged and Aᵀv turns
into R Aᵀv, so a periodic graph's scalar outputs are invariant and its vector outputs
equivariant, reflections included.

Rows of A by periodicity:
- bulk (3 periodic axes): the canonical basis (a, b, c);
- slab (2): (a, b, n), n the unit normal of the periodic rows (1 Å) oriented like the given
  vacuum row (like the periodic rows in their given cyclic order when that row is zero or lies
  in their plane): nothing depends on the vacuum thickness, and a zero vacuum row is fine;
- wire (1): (a, u, w), u the unit vector along the part of the first non-periodic row
  perpendicular to a (of the second row, then of a Cartesian axis, when that part vanishes),
  w = â × u oriented like the second non-periodic row;
- no periodicity: the identity, and six zeros as cell features.
"""

from __future__ import annotations

import torch
from torch import Tensor

from molden.data.batch import Batch
from molden.models.lattice_reduction import canonical_lattice_transform


def _unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


def _oriented_like(v: Tensor, reference: Tensor) -> Tensor:
    """`v` [B, 3], flipped where it points against `reference` [B, 3]."""
    return v * torch.where((v * reference).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(v.dtype)


def _slab_normal(cell: Tensor, pbc: Tensor) -> Tensor:
    """[B, 3] unit normal of a slab's two periodic rows, oriented like its vacuum row."""
    rows = [cell[:, 0], cell[:, 1], cell[:, 2]]
    normals = torch.stack([torch.linalg.cross(rows[(k + 1) % 3], rows[(k + 2) % 3]) for k in range(3)], dim=1)
    normals = _unit(normals)
    normals = normals * torch.where((normals * cell).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(cell.dtype)
    return (normals * (~pbc)[..., None].to(cell.dtype)).sum(dim=1)  # the normal in the vacuum row's slot


def _wire_axes(cell: Tensor, pbc: Tensor, axis: Tensor) -> tuple[Tensor, Tensor]:
    """([B, 3], [B, 3]) unit vectors u ⟂ `axis` and w = â × u of a wire (module docstring)."""
    order = torch.argsort((~pbc).to(torch.int8), dim=1, stable=True)  # periodic row first
    others = cell.gather(1, order[..., None].expand(-1, -1, 3))[:, 1:]  # the non-periodic rows, given order
    along = _unit(axis)[:, None]
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device).expand(len(cell), 3, 3)
    candidates = torch.cat([others, eye], dim=1)
    perpendicular = candidates - (candidates * along).sum(-1, keepdim=True) * along
    usable = perpendicular.norm(dim=-1) > 1e-3 * candidates.norm(dim=-1)
    first = usable.to(torch.long).argmax(dim=1)  # first usable candidate (a Cartesian axis always is)
    u = _unit(perpendicular.gather(1, first[:, None, None].expand(-1, 1, 3))[:, 0])
    w = _oriented_like(torch.linalg.cross(along[:, 0], u), others[:, 1])
    return u, w


def periodic_frames(batch: Batch, dtype: torch.dtype) -> Tensor:
    """[B, 3, 3] the basis A (rows, Å) of each graph with a periodic axis (identity for the
    others): the canonical reduced basis of its lattice, completed for slabs and wires as the
    module docstring says. Differentiable with respect to `batch.cell`."""
    cell = batch.cell.to(dtype)
    pbc = batch.pbc.to(torch.bool)
    basis = canonical_lattice_transform(cell, pbc) @ cell  # integer N: gradients flow through the cell
    n_periodic = pbc.sum(dim=1)[:, None]
    u, w = _wire_axes(cell, pbc, basis[:, 0])
    second = torch.where(n_periodic == 1, u, basis[:, 1])
    third = torch.where(n_periodic == 2, _slab_normal(cell, pbc), torch.where(n_periodic == 1, w, basis[:, 2]))
    frames = torch.stack([basis[:, 0], second, third], dim=1)
    eye = torch.eye(3, dtype=dtype, device=cell.device).expand(len(pbc), 3, 3)
    return torch.where(pbc.any(dim=1)[:, None, None], frames, eye)


def cell_features(frames: Tensor, pbc: Tensor, scale_angstrom: float) -> Tensor:
    """[B, 6] (α·β, β·γ, α·γ) / s² and (|α|, |β|, |γ|) / s of the basis rows α, β, γ of
    `frames` [B, 3, 3] (`periodic_frames`: a slab's third row is its unit normal, 1 Å),
    s = `scale_angstrom` (a fixed unit that keeps inputs of order one); zeros for graphs
    without periodicity (`pbc` [B, 3])."""
    a, b, c = frames[:, 0], frames[:, 1], frames[:, 2]
    dots = torch.stack([(a * b).sum(-1), (b * c).sum(-1), (a * c).sum(-1)], dim=1) / scale_angstrom**2
    lengths = frames.norm(dim=2) / scale_angstrom
    features = torch.cat([dots, lengths], dim=1)
    return features * pbc.any(dim=1, keepdim=True).to(frames.dtype)


def to_frame(vectors: Tensor, inverse_frames: Tensor, graph: Tensor) -> Tensor:
    """[K, 3] Cartesian row vectors (Å, or eV/Å for forces) expressed in their graph's basis,
    v A⁻¹ (dimensionless for a periodic graph; unchanged for the others). `graph` [K] gives
    each row's graph."""
    return torch.einsum("ki,kij->kj", vectors, inverse_frames[graph])
