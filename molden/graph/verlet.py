"""Radius graphs of moving systems (relaxation, molecular dynamics) from a Verlet list: pairs
found once `skin` Å beyond the cutoff, then only filtered by their current length until an
atom has moved far enough that the list could miss a pair.

Why it is exact: a pair (i, j, S) closer than `cutoff` now was closer than
`cutoff + |Δi| + |Δj|` when its system's list was built, where Δ is each atom's displacement
since then (the cell is unchanged, or the system is rebuilt). While every atom of the system
has moved less than `skin / 2`, that is below `cutoff + skin`, so the list holds the pair, and
the length test (the radius graph's own exact test, `edge_lengths(...) < cutoff`) keeps
exactly the pairs a fresh search would find. A rounding margin, sized as the radius graph
sizes its band, makes "less than skin / 2" hold for the true displacement too. The same pairs
come out, in another order within a system for the systems not rebuilt (sums over edges may
then differ in the last bits). One limit, shared with molden's own backends: a pair within a
rounding error of the cutoff may be decided the other way when the image offset S @ cell was
summed in another order (numpy for vesin's search, torch here for several cells).

Systems are rebuilt one by one (the others keep their lists) and recognised across calls by
`Batch.system_ids`, so structures entering and leaving a relaxation batch cost only their own
search; the correctness test never relies on the ids (a reused id with other positions or
another cell is simply rebuilt).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from molden.data.batch import Batch
from molden.errors import MoldenConfigError
from molden.graph.edges import cartesian_shifts, edges_per_graph
from molden.graph.radius_graph import edge_lengths, nearest_neighbors_mask, neighbor_list, pair_lengths


DEFAULT_SKIN_ANGSTROM = 0.5
"""The skin `molden relax` and `MoldenCalculator` use. A relaxation step moves an atom at most
0.2 Å (ASE's L-BFGS maxstep; OC20's is 0.04 Å), so a system is searched again every few steps
at most, while the list holds only about 1.3 times the edges of a 6 Å graph to filter."""


@dataclass
class _SkinLists:
    """The lists of the last call's systems, `cutoff + skin` Å, and where they were built."""

    ids: tuple[str, ...]
    index_of: dict[str, int]
    """System id → its position in the last call's batch."""
    counts: np.ndarray
    """[B] atoms per system."""
    offsets: Tensor
    """[B + 1] long, on the device."""
    reference: Tensor
    """[N, 3] Å: each atom's position when its system's list was built."""
    cells: Tensor
    pbc: Tensor
    edge_index: Tensor
    unit_shifts: Tensor
    edge_shift: Tensor
    """[E, 3] Å: unit_shifts @ cell, kept (the cell does not change while a list lives)."""
    edge_graph: Tensor
    """[E] long: the system of each edge (systems one after another)."""
    edge_counts: np.ndarray
    """[B] edges per system, on the host."""
    margin: float
    """Å: rounding margin of the displacement test (see the module docstring)."""


class VerletGraph:
    """`graph(batch, positions)`: `batch` at `positions` with its radius graph at
    `cutoff_angstrom`, the same pairs as `molden.objectives.noise.with_positions` would find,
    from lists of `cutoff + skin_angstrom` kept between calls. `skin_angstrom = 0` searches at
    every call. `built` counts the systems searched, `calls` the calls.

    Where it pays: on a CPU, vesin's search of one OC20-sized slab (0.4 ms) is as fast as the
    filtering, so the skin saves little there (BENCHMARKS.md); on a GPU the search has a fixed
    cost of a few ms per call that the filtering does not."""

    def __init__(self, cutoff_angstrom: float, skin_angstrom: float = 0.0, *, max_num_neighbors: int | None = None):
        if not skin_angstrom >= 0:
            raise MoldenConfigError(f"the Verlet skin must be 0 or more Å, got {skin_angstrom}")
        self.cutoff = float(cutoff_angstrom)
        self.skin = float(skin_angstrom)
        self.max_num_neighbors = max_num_neighbors
        self.built = 0
        self.calls = 0
        self._lists: _SkinLists | None = None
        self._n_node_seen: Tensor | None = None
        self._n_node_host = np.zeros(0, dtype=np.int64)

    def __call__(self, batch: Batch, positions: Tensor) -> Batch:
        self.calls += 1
        if self.skin == 0:
            from molden.objectives.noise import with_positions

            self.built += batch.num_graphs
            return with_positions(batch, positions, cutoff_angstrom=self.cutoff, max_num_neighbors=self.max_num_neighbors)
        moving = positions.detach()
        device = moving.device
        counts = self._host_counts(batch.n_node)
        ids = batch.system_ids if len(batch.system_ids) == len(counts) else tuple(f"#{g}" for g in range(len(counts)))
        cells = batch.cell.to(device=device, dtype=moving.dtype).reshape(-1, 3, 3).expand(len(counts), 3, 3)
        pbc = batch.pbc.to(device).reshape(-1, 3).expand(len(counts), 3)
        system_of_atom = batch.batch.to(device)

        offsets = torch.from_numpy(np.r_[0, np.cumsum(counts)]).to(device)
        before, reference = self._previous_positions(ids, counts, system_of_atom, offsets, moving)
        keep = self._still_valid(before, reference, moving, cells, pbc, system_of_atom)
        last = self._lists
        if not (keep.all() and last is not None and last.ids == ids):  # else: the same lists as last call
            edge_index, unit_shifts, edge_shift, edge_graph, edge_counts = self._lists_for(keep, before, moving, counts,
                                                                                           cells, pbc)
            rebuilt_atom = torch.from_numpy(np.repeat(~keep, counts)).to(device)
            reference = moving if reference is None else torch.where(rebuilt_atom[:, None], moving, reference)
            margin = self._margin(moving, cells) if last is None or not keep.all() else last.margin
            last = self._lists = _SkinLists(ids=ids, index_of={k: g for g, k in enumerate(ids)}, counts=counts,
                                            offsets=offsets, reference=reference, cells=cells, pbc=pbc,
                                            edge_index=edge_index, unit_shifts=unit_shifts, edge_shift=edge_shift,
                                            edge_graph=edge_graph, edge_counts=edge_counts, margin=margin)

        lengths = pair_lengths(moving, last.edge_index[0], last.edge_index[1], last.edge_shift)
        inside = (lengths.to(torch.float64) < self.cutoff).nonzero().squeeze(1)  # the radius graph's exact test
        edge_index, lengths, edge_graph = last.edge_index[:, inside], lengths[inside], last.edge_graph[inside]
        unit_shifts = last.unit_shifts[inside]
        if self.max_num_neighbors is not None:  # on the pairs within the cutoff, as a fresh search does
            nearest = nearest_neighbors_mask(edge_index[0], lengths, self.max_num_neighbors, num_nodes=len(moving))
            edge_index, unit_shifts, edge_graph = edge_index[:, nearest], unit_shifts[nearest], edge_graph[nearest]
        n_edge = edges_per_graph(edge_graph, len(counts))
        return replace(batch, positions=positions, edge_index=edge_index, unit_shifts=unit_shifts, n_edge=n_edge,
                       graph_cutoff_angstrom=self.cutoff if self.max_num_neighbors is None else None)

    def _host_counts(self, n_node: Tensor) -> np.ndarray:
        """[B] atoms per system on the host. A relaxation passes the same `n_node` tensor step
        after step (batches are never changed in place), so it is copied from a device once."""
        if n_node is not self._n_node_seen:
            self._n_node_seen, self._n_node_host = n_node, n_node.cpu().numpy().astype(np.int64)
        return self._n_node_host

    def _previous_positions(self, ids, counts, system_of_atom, offsets, moving) -> tuple[np.ndarray, Tensor | None]:
        """[B] each system's index in the last call (-1: new, or another atom count), and [N, 3]
        its atoms' reference positions (None when no system was there before)."""
        last = self._lists
        if last is None or last.reference.dtype != moving.dtype or last.reference.device != moving.device:
            return np.full(len(counts), -1), None
        if last.ids == ids and np.array_equal(last.counts, counts):
            return np.arange(len(ids)), last.reference
        before = np.array([last.index_of.get(k, -1) for k in ids], dtype=np.int64)
        known = before >= 0
        known[known] &= last.counts[before[known]] == counts[known]
        before[~known] = -1
        if not known.any():
            return before, None
        before_t = torch.from_numpy(before).to(offsets.device)
        local = torch.arange(len(system_of_atom), device=offsets.device) - offsets[system_of_atom]
        atom_before = last.offsets[before_t.clamp(min=0)][system_of_atom] + local
        atom_before = torch.where(before_t[system_of_atom] >= 0, atom_before, 0)
        return before, last.reference[atom_before]

    def _still_valid(self, before, reference, moving, cells, pbc, system_of_atom) -> np.ndarray:
        """[B] bool on the host: the system's list still holds every pair (one device read)."""
        if reference is None:
            return np.zeros(len(before), dtype=bool)
        last = self._lists
        device = moving.device
        before_t = torch.from_numpy(before).to(device)
        at = before_t.clamp(min=0)
        moved = (moving - reference).norm(dim=1)
        farthest = torch.zeros(len(before), dtype=moved.dtype, device=device).scatter_reduce(
            0, system_of_atom, moved, reduce="amax", include_self=True)
        same_box = (cells == last.cells[at]).all(dim=(1, 2)) & (pbc == last.pbc[at]).all(dim=1)
        valid = (before_t >= 0) & same_box & (farthest < self.skin / 2 - last.margin)
        # Reassembling the lists costs about as much as filtering them, whatever the number of
        # systems searched, so when some must be searched, those past half-way go with them.
        early = farthest >= self.skin / 4
        valid, early = torch.stack([valid, early]).cpu().numpy()
        return valid & ~early if not valid.all() else valid

    def _lists_for(self, keep, before, moving, counts, cells, pbc) -> tuple:
        """(edge_index, unit_shifts, edge_shift, edge_graph, edge counts on the host): the
        `cutoff + skin` lists of this call's systems, system after system; kept ones from the
        last call's lists (their atoms renumbered), the others searched now, all in one call.
        Assembled by one gather over whole systems' runs of edges, not a sort."""
        device = moving.device
        last = self._lists
        offsets = np.r_[0, np.cumsum(counts)]
        source_start, edge_counts, atom_shift = (np.zeros(len(counts), dtype=np.int64) for _ in range(3))
        sources: list[tuple[Tensor, Tensor, Tensor]] = []
        if keep.any():
            kept, old = np.flatnonzero(keep), before[keep]
            old_starts = np.cumsum(last.edge_counts) - last.edge_counts
            old_offsets = np.r_[0, np.cumsum(last.counts)]
            source_start[kept], edge_counts[kept] = old_starts[old], last.edge_counts[old]
            atom_shift[kept] = offsets[kept] - old_offsets[old]
            sources.append((last.edge_index, last.unit_shifts, last.edge_shift))
        if not keep.all():
            systems = np.flatnonzero(~keep)
            atoms = torch.from_numpy(np.flatnonzero(np.repeat(~keep, counts))).to(device)
            sub_counts = counts[systems]
            edge_index, unit_shifts = neighbor_list(moving[atoms], self.cutoff + self.skin, cell=cells[systems],
                                                    pbc=pbc[systems], n_node=sub_counts)
            edge_index, unit_shifts = edge_index.to(device), unit_shifts.to(device)
            sub_offsets = np.r_[0, np.cumsum(sub_counts)]
            sub_graph = torch.searchsorted(torch.from_numpy(sub_offsets).to(device), edge_index[0], right=True) - 1
            found = torch.bincount(sub_graph, minlength=len(systems)).cpu().numpy()
            base = sources[0][0].shape[1] if sources else 0
            source_start[systems] = base + np.cumsum(found) - found
            edge_counts[systems] = found
            atom_shift[systems] = offsets[systems] - sub_offsets[:-1]
            # edge_lengths's own product (the same cells, the same per-edge systems), so that
            # the filtered lengths are the fresh search's to the bit
            edge_shift = cartesian_shifts(unit_shifts, cells, torch.from_numpy(systems).to(device)[sub_graph])
            sources.append((edge_index, unit_shifts, edge_shift))
            self.built += len(systems)
        total = int(edge_counts.sum())
        starts = np.cumsum(edge_counts) - edge_counts
        counts_t = torch.from_numpy(edge_counts).to(device)
        edge_graph = torch.repeat_interleave(torch.arange(len(counts), device=device), counts_t, output_size=total)
        per_edge_shift = torch.from_numpy(atom_shift).to(device)[edge_graph]
        if len(sources) == 1 and np.array_equal(source_start, starts):
            # Already in place (the last systems may have left: their edges come after `total`).
            edge_index, unit_shifts, edge_shift = sources[0]
            return (edge_index[:, :total] + per_edge_shift[None], unit_shifts[:total], edge_shift[:total], edge_graph,
                    edge_counts)
        index, shifts, cartesian = (torch.cat(parts, dim=1 if k == 0 else 0) if len(parts) > 1 else parts[0]
                                    for k, parts in enumerate(zip(*sources)))
        take = torch.from_numpy(source_start - starts).to(device)[edge_graph] + torch.arange(total, device=device)
        return index[:, take] + per_edge_shift[None], shifts[take], cartesian[take], edge_graph, edge_counts

    def _margin(self, moving: Tensor, cells: Tensor) -> float:
        return float(_rounding_margin(moving, cells, self.cutoff + self.skin))  # one device read


def _rounding_margin(positions: Tensor, cells: Tensor, reach: float) -> Tensor:
    """0-d, Å, on the device: how far rounding could put a computed displacement or length off
    the true one, as the radius graph sizes its band (256 ulps of the largest coordinate scale:
    `reach` plus the largest coordinate and cell)."""
    position_bound = positions.abs().amax() if positions.numel() else positions.new_zeros(())
    cell_bound = cells.abs().sum(dim=(1, 2)).amax() if len(cells) else positions.new_zeros(())
    return 256 * torch.finfo(positions.dtype).eps * (reach + position_bound + cell_bound)


def batch_edge_lengths(batch: Batch, positions: Tensor, *, periodic: bool = True) -> Tensor:
    """[E] lengths, Å, of the batch's edges at `positions`, by the radius graph's exact arithmetic
    (`edge_lengths`), the cells multiplied once per structure on a CPU. `periodic=False`
    promises that every unit shift is zero."""
    i, j = batch.edge_index
    return edge_lengths(positions, batch.cell.to(positions.dtype), batch.batch, i, j, batch.unit_shifts,
                        periodic=periodic, edge_counts=batch.n_edge)


def graph_from_wider(batch: Batch, positions: Tensor, cutoff_angstrom: float, *,
                     max_num_neighbors: int | None = None) -> Batch | None:
    """`batch` at `positions` with its radius graph at `cutoff_angstrom` filtered from the
    batch's own graph, or None when that graph cannot be trusted to hold every pair: it is not
    a whole radius graph (`Batch.graph_cutoff_angstrom` None) or not wider than the cutoff, or
    an atom moved `(wider − cutoff) / 2` Å or more from `batch.positions`.

    The graph after noise (Noisy Nodes, DeNS, denoising pre-training) from a cache stored
    beyond the model's cutoff: the proof of the module docstring with the cache's graph as the
    list and `wider − cutoff` as the skin. The same pairs as a search (`with_positions`), by
    the same exact length test, in the cache's order; one device read to test the moves and
    one to select the pairs, where a search on a GPU waits several times."""
    wider = batch.graph_cutoff_angstrom
    if wider is None or not batch.has_graph or not wider > cutoff_angstrom or len(positions) == 0:
        return None
    moving = positions.detach()
    farthest = (moving - batch.positions.to(moving.dtype)).norm(dim=1).amax()
    margin = _rounding_margin(moving, batch.cell.to(moving.dtype), wider)
    periodic = batch.unit_shifts.any().to(moving.dtype)
    farthest, margin, periodic = torch.stack([farthest, margin, periodic]).tolist()  # one device read
    if not farthest < (wider - cutoff_angstrom) / 2 - margin:
        return None
    lengths = batch_edge_lengths(batch, moving, periodic=bool(periodic))
    inside = (lengths.to(torch.float64) < cutoff_angstrom).nonzero().squeeze(1)  # the radius graph's exact test
    edge_index, unit_shifts, lengths = batch.edge_index[:, inside], batch.unit_shifts[inside], lengths[inside]
    if max_num_neighbors is not None:  # on the pairs within the cutoff, as a search does
        nearest = nearest_neighbors_mask(edge_index[0], lengths, max_num_neighbors, num_nodes=len(moving))
        edge_index, unit_shifts = edge_index[:, nearest], unit_shifts[nearest]
    n_edge = edges_per_graph(batch.batch[edge_index[0]], batch.num_graphs)
    return replace(batch, positions=positions, edge_index=edge_index, unit_shifts=unit_shifts, n_edge=n_edge,
                   graph_cutoff_angstrom=cutoff_angstrom if max_num_neighbors is None else None)
