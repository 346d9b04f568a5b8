"""Position noise and the graph of the noised structure, shared by every denoising objective.

The cached graph belongs to the clean structure. Once noise moves atoms, the graph is rebuilt
from the noised positions on the batch's device in one batched `neighbor_list` call (the
encoder of Noisy Nodes §3.2 connects atoms of the noised input), or filtered from the cached
graph when the cache was stored far enough beyond the model's cutoff (`graph_from_wider`).
`rebuild_graph=False` keeps the clean graph (cheaper; at σ = 0.1–0.3 Å a kept graph gains and
loses several per cent of its edges).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from molden.data.batch import Batch
from molden.graph.edges import edges_per_graph
from molden.graph.radius_graph import neighbor_list
from molden.graph.verlet import graph_from_wider


def gaussian_noise(
    batch: Batch, sigma_angstrom: float | Tensor, generator: torch.Generator, *, mask: Tensor | None = None
) -> Tensor:
    """[N, 3] Gaussian displacements, Å, with standard deviation `sigma_angstrom` (a number, or
    [N] per atom); zero on fixed atoms (never noised, OC20) and where `mask` [N] is False.

    Drawn on the CPU from `generator` and moved to the batch's device, so a run draws the same
    noise on any device and a resumed run (generator state restored) draws what it would have.
    """
    noise = torch.randn(batch.positions.shape, generator=generator, dtype=torch.float64)
    noise = noise.to(device=batch.positions.device, dtype=batch.positions.dtype)
    sigma = torch.as_tensor(sigma_angstrom, dtype=noise.dtype, device=noise.device)
    noise = noise * (sigma[:, None] if sigma.ndim == 1 else sigma)
    keep = ~batch.fixed if mask is None else (~batch.fixed & mask)
    return noise * keep[:, None].to(noise.dtype)


def with_positions(
    batch: Batch,
    positions: Tensor,
    *,
    rebuild_graph: bool = True,
    cutoff_angstrom: float | None = None,
    max_num_neighbors: int | None = None,
) -> Batch:
    """A copy of `batch` at `positions` [N, 3] Å; with `rebuild_graph`, its radius graph rebuilt
    at `cutoff_angstrom` from the new positions (periodic images included, so atoms that noise
    pushed across a cell face keep their neighbours). When the batch's graph is a whole radius
    graph wider than the cutoff by more than twice the largest move (a cache stored beyond the
    model's cutoff), the new graph is filtered from it instead of searched: the same pairs."""
    if not rebuild_graph:
        return replace(batch, positions=positions, graph_cutoff_angstrom=None)
    if cutoff_angstrom is None:
        raise ValueError("rebuilding the graph needs cutoff_angstrom")
    filtered = graph_from_wider(batch, positions, cutoff_angstrom, max_num_neighbors=max_num_neighbors)
    if filtered is not None:
        return filtered
    edge_index, unit_shifts = neighbor_list(
        positions.detach(), cutoff_angstrom, cell=batch.cell, pbc=batch.pbc, batch=batch.batch,
        n_node=batch.n_node, max_num_neighbors=max_num_neighbors,
    )
    edge_index = edge_index.to(positions.device)
    n_edge = edges_per_graph(batch.batch[edge_index[0]], batch.num_graphs)
    return replace(batch, positions=positions, edge_index=edge_index, unit_shifts=unit_shifts.to(positions.device),
                   n_edge=n_edge, graph_cutoff_angstrom=cutoff_angstrom if max_num_neighbors is None else None)
