"""Batches capped by atoms, edges and graphs (Noisy Nodes App. 8.4, "dynamic batch sizes").

A fixed number of graphs per batch gives batches whose cost varies with the size of their
structures; Noisy Nodes instead fills each batch until one of a maximum node, edge or graph
count would be exceeded (QM9: 256 nodes, 4096 edges, 8 graphs; OC20: 1024, 12800, 10).
`DynamicBatchSampler` does this greedily in the order of any index sampler, from per-structure
atom and edge counts (`H5Dataset.atom_counts` / `edge_counts`), without reading structures.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
from torch.utils.data import Sampler

from molden.data.sampling import resolve_rank
from molden.errors import MoldenConfigError


def greedy_bounds(
    budgets: list[tuple[np.ndarray, int]], n: int, max_graphs: int | None = None
) -> np.ndarray:
    """[n_batches + 1] boundaries of consecutive batches filled greedily in order.

    Args:
        budgets: (counts [n] in batch order, the cap on their sum per batch) pairs; each
            single count must be within its cap.
        n: number of structures.
        max_graphs: cap on structures per batch, or None.
    Each batch grows until the next structure would exceed a cap. The end of a batch
    starting at every position is found at once (cumulative sums and binary search); only
    the walk from one batch to the next is a loop, over batches.
    """
    end = np.full(n, n, dtype=np.int64)
    if max_graphs is not None:
        end = np.minimum(end, np.arange(n) + max_graphs)
    for counts, cap in budgets:
        total = np.r_[0, np.cumsum(counts, dtype=np.int64)]
        end = np.minimum(end, np.searchsorted(total, total[:-1] + cap, side="right") - 1)
    following = end.tolist()
    bounds = [0]
    while bounds[-1] < n:
        bounds.append(following[bounds[-1]])
    return np.asarray(bounds, dtype=np.int64)


def split_to_multiple(bounds: np.ndarray, multiple: int) -> np.ndarray:
    """`bounds` with the largest batches halved until their number is a multiple of `multiple`.

    Halving never exceeds a budget; it stops early only when every batch holds one structure.
    """
    extra = -(len(bounds) - 1) % multiple
    while extra > 0:
        sizes = np.diff(bounds)
        candidates = np.flatnonzero(sizes >= 2)
        if len(candidates) == 0:
            break
        pick = candidates[np.argsort(-sizes[candidates], kind="stable")[:extra]]
        bounds = np.sort(np.r_[bounds, bounds[pick] + sizes[pick] // 2])
        extra -= len(pick)
    return bounds


class DynamicBatchSampler(Sampler[list[int]]):
    """Lists of dataset indices whose atoms, edges and graphs stay within budgets, per rank.

    Args:
        sampler: the order to batch in, over all ranks (e.g. `BlockShuffleSampler` with
            world_size 1, or `RandomOrderSampler`); its `set_epoch` is called by ours. A
            sampler already sharded across ranks is refused: this sampler shards batches.
        atom_counts: [len(dataset)] atoms of each structure, in dataset order.
        edge_counts: [len(dataset)] edges of each structure; needed with `max_edges`.
        max_atoms, max_edges, max_graphs: caps per batch (None: no cap; at least one).
        rank, world_size: this process's share under DDP; default torch.distributed's when
            it is initialised, else 0 and 1.

    The batches of an epoch are built over the whole order, the same on every rank, then cut
    into `world_size` contiguous shares of equal length, so each rank reads its own part of a
    block-shuffled order. To make the count a multiple of `world_size`, the largest batches
    are halved (fewer than `world_size` of them): every structure is in exactly one batch of
    one rank each epoch. Only when there are fewer structures than that are batches repeated.
    A structure that alone exceeds a budget is refused with `MoldenConfigError` when the
    sampler is built: budgets bound memory, so no batch ever exceeds them. Deterministic for
    the inner sampler's (seed, epoch).
    """

    def __init__(
        self,
        sampler: Iterable[int],
        atom_counts: np.ndarray,
        edge_counts: np.ndarray | None = None,
        *,
        max_atoms: int | None = None,
        max_edges: int | None = None,
        max_graphs: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        if max_atoms is None and max_edges is None and max_graphs is None:
            raise MoldenConfigError("dynamic batches need at least one of max_atoms, max_edges, max_graphs")
        for name, cap in (("max_atoms", max_atoms), ("max_edges", max_edges), ("max_graphs", max_graphs)):
            if cap is not None and int(cap) < 1:
                raise MoldenConfigError(f"{name} must be at least 1, got {cap}")
        if max(getattr(sampler, "world_size", 1), getattr(sampler, "num_replicas", 1)) > 1:
            raise MoldenConfigError(
                "DynamicBatchSampler shards batches itself: give it a sampler over all ranks (world_size=1)"
            )
        if max_edges is not None and edge_counts is None:
            raise MoldenConfigError("max_edges needs edge_counts")
        self.sampler = sampler
        self.max_graphs = None if max_graphs is None else int(max_graphs)
        self.budgets: list[tuple[str, np.ndarray, int]] = []
        for name, counts, cap in (("atoms", atom_counts, max_atoms), ("edges", edge_counts, max_edges)):
            if cap is None:
                continue
            counts = np.asarray(counts, dtype=np.int64).reshape(-1)
            if len(counts) and counts.max() > cap:
                over = int((counts > cap).sum())
                raise MoldenConfigError(
                    f"{over} of {len(counts)} structures have more {name} than max_{name}={cap} (--max-{name}), "
                    f"the largest {int(counts.max())}: raise it to at least {int(counts.max())}"
                )
            self.budgets.append((name, counts, int(cap)))
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.epoch = 0
        self._cached: tuple[tuple, list[np.ndarray]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def _order(self) -> np.ndarray:
        order = getattr(self.sampler, "order", None)
        if callable(order):
            return np.asarray(order(), dtype=np.int64)
        return np.fromiter(iter(self.sampler), dtype=np.int64)

    def global_batches(self) -> list[np.ndarray]:
        """Every rank's batches of this epoch, in order, their count a multiple of
        `world_size` (the same list on every rank)."""
        key = (self.epoch, getattr(self.sampler, "epoch", None))
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        order = self._order()
        budgets = [(counts[order], cap) for _, counts, cap in self.budgets]
        bounds = greedy_bounds(budgets, len(order), self.max_graphs)
        bounds = split_to_multiple(bounds, self.world_size)
        n_batches = len(bounds) - 1
        share = -(-n_batches // self.world_size)
        # Fewer structures than ranks × batches: repeat batches from the start to fill up.
        ids = np.resize(np.arange(n_batches), share * self.world_size) if n_batches else np.zeros(0, np.int64)
        out = [order[bounds[k] : bounds[k + 1]] for k in ids.tolist()]
        self._cached = (key, out)
        return out

    def batches(self) -> list[np.ndarray]:
        """This rank's batches of this epoch (a contiguous share of `global_batches`), as
        arrays of dataset indices."""
        every = self.global_batches()
        share = len(every) // self.world_size
        return every[self.rank * share : (self.rank + 1) * share]

    def __len__(self) -> int:
        return len(self.batches())

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches():
            yield batch.tolist()
