"""Radius graphs on the CPU from vesin's C++ cell list, exact-tested as the torch backend.

What makes this faster than calling vesin system by system (BENCHMARKS.md):
- vesin computes a half list, mirrored here: half the distance tests and output writes;
- every run of consecutive non-periodic systems (a batch of molecules) is one vesin call,
  the molecules packed on a grid out of reach of each other;
- systems below 1,000 atoms run single-threaded vesin, which they use better than vesin's
  own threads (Python threads over the systems of a batch gained nothing: measured again
  2026-11-25 on 64 slabs, 0.8-0.9x of serial with other work on the cores);
- cells and bookkeeping stay in numpy: per-call torch overhead cost more than vesin's whole
  search on OC20-sized slabs.
vesin searches a rounding band beyond the cutoff; pairs within that band of the cutoff are
re-tested in ASE's order of operations on the given positions,
`|(pos[j] - pos[i]) + S @ cell| < cutoff`, as the torch backend does.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import threading

import numpy as np

from molden.graph.systems import SystemLayout

try:  # the fastest CPU cell list known (BENCHMARKS.md, peers); the torch backend is the fallback
    import vesin as _vesin
except ImportError:  # pragma: no cover - exercised only where vesin is missing
    _vesin = None

# Non-periodic systems searched in one vesin call are packed on a grid this far apart beyond
# the cutoff; pairs joining two of them are dropped all the same (rounding bands can be wide
# in float32 at large coordinates).
_MERGE_GAP_ANGSTROM = 1.0
# vesin 0.6 dies with SIGFPE on a non-periodic point set about 1e5 cutoffs long: sparser
# inputs, and cutoffs vesin refuses, go to the torch backend instead.
_MAX_SPAN_IN_CUTOFFS = 1e4
_MIN_CUTOFF_ANGSTROM = 1e-4
# A single system this large uses vesin's own threads; smaller ones run single-threaded.
_VESIN_THREADS_MIN_ATOMS = 1_000

_local = threading.local()
_EPS = {t: float(np.finfo(t).eps) for t in (np.float16, np.float32, np.float64)}


def vesin_available() -> bool:
    """True when the vesin CPU backend can be used."""
    return _vesin is not None


def vesin_neighbor_list(
    positions: np.ndarray, layout: SystemLayout, cutoff: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Edges of every system of the batch, as `neighbor_list` returns them.

    Args:
        positions: [N, 3] Å, float32 or float64 (the exact test runs in this dtype).
        layout: the batch's systems (`system_layout`).
        cutoff: Å, strict.
    Returns:
        (edge_index [2, E] int64, unit_shifts [E, 3] int32, edges per system [B] int64),
        systems in batch order; within a periodic system vesin's half list then its mirror,
        within a run of molecules sorted by centre atom. None when vesin cannot take the input (a non-periodic system spanning
        more than `_MAX_SPAN_IN_CUTOFFS` cutoffs, a cutoff below `_MIN_CUTOFF_ANGSTROM`):
        the caller uses the torch backend.
    """
    if cutoff < _MIN_CUTOFF_ANGSTROM:
        return None
    offsets, counts, flags = layout.offsets, layout.counts, layout.pbc
    if len(counts) == 1 and flags[0].any():  # one periodic system: no batch bookkeeping
        return _one_periodic_system(positions, layout, cutoff)
    periodic = flags.any(axis=1)
    pos64 = positions.astype(np.float64, copy=False)
    tasks = []
    for lo, hi in _system_runs(periodic):
        a, b = int(offsets[lo]), int(offsets[hi])
        if periodic[lo] or b - a < 2:
            tasks.append((lo, hi, None))
            continue
        points = pos64[a:b] if hi - lo == 1 else _packed(pos64, offsets, counts, lo, hi, cutoff)
        if float((points.max(axis=0) - points.min(axis=0)).max()) > _MAX_SPAN_IN_CUTOFFS * cutoff:
            return None
        tasks.append((lo, hi, points if hi - lo > 1 else None))
    # The band covers both roundings: the exact test's (in the positions' dtype) and vesin's
    # (float64, on the moved coordinates of packed molecules).
    scale = cutoff + layout.position_bound + layout.cell_bound
    moved = max((float(np.abs(x).max(initial=0.0)) for _, _, x in tasks if x is not None), default=0.0)
    band = 256 * (_EPS.get(positions.dtype.type, _EPS[np.float32]) * scale + _EPS[np.float64] * (scale + moved))
    # Rounded up to a 1e-6 Å grid so that repeated calls reuse one calculator: vesin keeps its
    # buffers between calls, and a fresh one costs about half a search on large systems.
    search = math.ceil((cutoff + band) * 1e6) / 1e6

    edge_counts = np.zeros(layout.n_systems, dtype=np.int64)
    parts = []
    for lo, hi, packed in tasks:
        part = _search(positions, pos64, layout, layout.boxes, lo, hi, packed, cutoff, band, search)
        if part is None:
            continue
        if len(tasks) > 1 and part[2] is not None:  # vesin reuses its buffers on the next call
            part = (part[0].copy(), part[1].copy(), part[2])
        parts.append(part)
        if hi - lo == 1:
            edge_counts[lo] = part[0].shape[1] if part[2] is None else 2 * len(part[0])
        else:  # a run of molecules comes sorted by centre atom
            edge_counts[lo:hi] = np.diff(np.searchsorted(part[0][0], offsets[lo : hi + 1]))
    return _assembled(parts, int(edge_counts.sum())) + (edge_counts,)


def _one_periodic_system(positions: np.ndarray, layout: SystemLayout, cutoff: float):
    """`vesin_neighbor_list` of a batch of one periodic system (a relaxation or MD step),
    with the same band and search radius: the batch bookkeeping skipped is a measurable
    part of an OC20-sized call (BENCHMARKS.md)."""
    scale = cutoff + layout.position_bound + layout.cell_bound
    band = 256 * (_EPS.get(positions.dtype.type, _EPS[np.float32]) * scale + _EPS[np.float64] * scale)
    search = math.ceil((cutoff + band) * 1e6) / 1e6
    threads = 0 if len(positions) >= _VESIN_THREADS_MIN_ATOMS else 1
    calculator = _calculator(search, threads)
    points = positions.astype(np.float64, copy=False)
    pairs, shifts, dist = calculator.compute(points, layout.boxes[0], layout.pbc[0], "PSd", copy=False)
    pairs, shifts = _exact_pairs(positions, layout.cells[0], pairs.view(np.int64), shifts, dist, cutoff, band)
    edges, unit_shifts = _assembled([(pairs, shifts, 0)], 2 * len(pairs))
    return edges, unit_shifts, np.array([edges.shape[1]], dtype=np.int64)


def _exact_pairs(positions, cell, pairs, shifts, dist, cutoff, band):
    """(pairs, shifts) of a half list less the pairs that ASE's order of operations puts at
    or beyond the cutoff; only pairs within `band` of it are re-tested. `positions` are the
    system's own (pair indices local), in the dtype of the exact test."""
    if not len(dist) or dist.max() < cutoff - band:  # usually no pair is that close to the cutoff
        return pairs, shifts
    unsure = np.flatnonzero(dist >= cutoff - band)
    if len(unsure):
        i, j = pairs[unsure, 0], pairs[unsure, 1]
        vectors = (positions[j] - positions[i]) + shifts[unsure].astype(positions.dtype) @ cell
        # Compared in float64, as the torch backend does: a float32 cutoff would round.
        outside = unsure[np.sqrt((vectors * vectors).sum(axis=1)).astype(np.float64) >= cutoff]
        if len(outside):
            keep = np.ones(len(pairs), dtype=bool)
            keep[outside] = False
            pairs, shifts = pairs[keep], shifts[keep]
    return pairs, shifts


def _assembled(parts: list, n_edges: int) -> tuple[np.ndarray, np.ndarray]:
    """(edge_index [2, E] int64, unit_shifts [E, 3] int32) written once from every part:
    half lists (pairs [h, 2], shifts [h, 3], atom offset) become (i, j, S) then (j, i, -S);
    full lists (edges, shifts, None) are copied as they are.

    The exact test is symmetric (the vector of (j, i, -S) is exactly the negated vector of
    (i, j, S) in floating point), so testing the half list decides both directions.
    """
    edges = reusable_array("edges", (2, n_edges), np.int64)
    unit_shifts = reusable_array("unit_shifts", (n_edges, 3), np.int32)
    at = 0
    for first, shifts, offset in parts:
        if offset is None:
            n = first.shape[1]
            edges[:, at : at + n] = first
            unit_shifts[at : at + n] = shifts
            at += n
            continue
        h = len(first)
        if h < _THREAD_MIN_ROWS:
            _mirror_rows(edges, unit_shifts, first, shifts, offset, at, 0, h)
        else:
            in_two_threads(functools.partial(_mirror_rows, edges, unit_shifts, first, shifts, offset, at), h)
        at += 2 * h
    return edges, unit_shifts


def _mirror_rows(edges, unit_shifts, first, shifts, offset: int, at: int, lo: int, hi: int) -> None:
    """Rows lo..hi-1 of one half list (pairs `first` [h, 2], `shifts` [h, 3]) written from
    column `at` as (i, j, S) and from `at + h` as (j, i, -S), atom indices plus `offset`."""
    h = len(first)
    pairs = first[lo:hi].T
    if offset:
        np.add(pairs, offset, out=edges[:, at + lo : at + hi])
        np.add(pairs[::-1], offset, out=edges[:, at + h + lo : at + h + hi])
    else:  # a plain copy is about twice as fast as adding zero
        edges[:, at + lo : at + hi] = pairs
        edges[:, at + h + lo : at + h + hi] = pairs[::-1]
    unit_shifts[at + lo : at + hi] = shifts[lo:hi]
    np.negative(shifts[lo:hi], out=unit_shifts[at + h + lo : at + h + hi])


# Below this many rows, copies run in the calling thread (a thread costs about 0.1 ms).
_THREAD_MIN_ROWS = 1 << 17
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def in_two_threads(work, n: int) -> None:
    """work(lo, hi) over rows 0..n-1, split between this thread and one more when n is large
    and there are two cores: the copies of a large result are memory-bound and numpy releases
    the GIL (a 2.5 M-edge crystal's mirror went from 9-10 ms to 5.5-7 ms)."""
    if n < _THREAD_MIN_ROWS or _CORES < 2:
        work(0, n)
        return
    middle = n // 2
    helper = threading.Thread(target=work, args=(0, middle))
    helper.start()
    try:
        work(middle, n)
    finally:
        helper.join()


def _search(positions, pos64, layout, boxes, lo, hi, packed, cutoff, band, search):
    """Edges of systems lo..hi-1 (one periodic system, or a run of non-periodic ones):
    a periodic system's half list (pairs [h, 2], shifts [h, 3], atom offset), possibly views
    of vesin's buffers; a run of molecules' full list (edges [2, E], shifts [E, 3], None)."""
    a, b = int(layout.offsets[lo]), int(layout.offsets[hi])
    flags = layout.pbc[lo]
    periodic = flags.any()
    if b - a < 2 and not periodic:
        return None
    if periodic:
        # Zeroed vacuum vectors: vesin would bin along a tilted one too.
        box, points = boxes[lo], pos64[a:b]
    else:
        box, points = np.zeros((3, 3)), pos64[a:b] if packed is None else packed
    threads = 0 if b - a >= _VESIN_THREADS_MIN_ATOMS else 1  # 0: vesin's default, all cores
    pairs, shifts, dist = _calculator(search, threads).compute(points, box, flags, "PSd", copy=False)
    if not len(pairs):
        return None
    pairs = pairs.view(np.int64)  # uint64 indices, far below 2**63
    if packed is not None:
        system = np.repeat(np.arange(hi - lo), layout.counts[lo:hi])
        joined = system[pairs[:, 0]] != system[pairs[:, 1]]
        if joined.any():
            pairs, shifts, dist = pairs[~joined], shifts[~joined], dist[~joined]
    pairs, shifts = _exact_pairs(positions[a:b], layout.cells[lo], pairs, shifts, dist, cutoff, band)
    if packed is None:
        return pairs, shifts, a
    # Molecules of a run come out interleaved: group them by centre.
    edges, unit_shifts = _assembled([(pairs, shifts, a)], 2 * len(pairs))
    order = np.argsort(edges[0], kind="stable")
    return edges[:, order], unit_shifts[order], None


def _system_runs(periodic: np.ndarray) -> list[tuple[int, int]]:
    """[(first, end)] system ranges: each periodic system alone, consecutive others together."""
    if len(periodic) == 1:
        return [(0, 1)]
    starts = np.flatnonzero(periodic | np.concatenate([[True], periodic[:-1]]))
    return list(zip(starts.tolist(), np.append(starts[1:], len(periodic)).tolist()))


def _packed(pos64: np.ndarray, offsets: np.ndarray, counts: np.ndarray, lo: int, hi: int, cutoff: float) -> np.ndarray:
    """[n, 3] positions (Å) of the atoms of systems lo..hi-1, each system translated onto its
    own site of a cubic grid whose pitch is the largest system extent plus
    `cutoff + _MERGE_GAP_ANGSTROM`: compact (vesin bins the bounding box) and out of reach."""
    a, b = int(offsets[lo]), int(offsets[hi])
    points = pos64[a:b]
    n = counts[lo:hi]
    filled = n > 0
    starts = (offsets[lo:hi] - a)[filled]
    low = np.minimum.reduceat(points, starts, axis=0)
    pitch = float((np.maximum.reduceat(points, starts, axis=0) - low).max()) + cutoff + _MERGE_GAP_ANGSTROM
    site = np.arange(len(starts))
    side = max(1, math.ceil(len(starts) ** (1 / 3)))
    grid = np.stack([site % side, (site // side) % side, site // (side * side)], axis=1) * pitch
    return points + np.repeat(grid - low, n[filled], axis=0)


def _calculator(search: float, threads: int):
    """One vesin calculator per search radius and thread count, per Python thread: vesin keeps
    its buffers between calls, and they must not be shared between threads."""
    cache = _local.__dict__.setdefault("calculators", {})
    key = (search, threads)
    if key not in cache:
        if len(cache) >= 8:
            cache.clear()
        cache[key] = _vesin.NeighborList(cutoff=search, full_list=False, n_threads=threads)
    return cache[key]


# Results at least this large (bytes) are written into buffers kept between calls.
_REUSE_MIN_BYTES = 1 << 22


def _references(pool: dict, key) -> int:
    return sys.getrefcount(pool[key])


# What `_references` counts for a buffer that only the pool holds, measured rather than
# assumed (interpreters differ in the references they count).
_FREE_REFERENCES = _references({0: np.empty(1)}, 0)


def reusable_array(name: str, shape: tuple, dtype) -> np.ndarray:
    """An uninitialised C-contiguous [rows, columns] array: a view of this thread's buffer
    `name` when nothing outside holds a view of it any more (the last call's result was
    dropped), else fresh memory, kept as the buffer for the next call.

    Large results are fresh memory otherwise: the kernel maps and zeroes them on every call,
    about 5 ms per 60 MB, a sixth of a 32,000-atom search (measured 2026-11-25). A buffer is
    handed out again only when its reference count shows that no array or tensor made from
    it is alive.
    """
    dtype = np.dtype(dtype)
    size = shape[0] * shape[1]
    if size * dtype.itemsize < _REUSE_MIN_BYTES:
        return np.empty(shape, dtype=dtype)
    pool = _local.__dict__.setdefault("buffers", {})
    key = (name, dtype.str)
    if key not in pool or len(pool[key]) < size or _references(pool, key) > _FREE_REFERENCES:
        pool[key] = np.empty(size, dtype=dtype)
    return pool[key][:size].reshape(shape)
