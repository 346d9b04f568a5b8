"""Candidate pairs of every system of a batch from one Triton cell-list kernel (CUDA).

Same contract as `cell_list.torch_cell_list_candidates`, for all systems at once: a superset of
the pairs closer than `search` among wrapped positions, as (i, j, wrapped unit shift S,
approximate distance); `radius_graph` applies the exact test. No ghost atoms are built: bins
are aligned with the lattice planes of each completed cell, and a centre visits the bins
within its reach, wrapping a periodic bin index into (bin, S). A periodic axis thinner than the
cutoff has one bin that is visited at several shifts (the image shells). A non-periodic axis is
hashed: bins one search radius wide, their index taken modulo M >= 3, so a sparse molecule in a
large box needs no grid of empty bins; atoms of far-apart regions that share a bin are
rejected by the distance test.

Memory is sized per system from host numbers (its atom count, cell and pbc, never another
system's): system b has O(N_b) bins, at most 2 N_b + 8 along its periodic axes times about
N_b / that (at least 3) per hashed axis (fairchem #795/#1204: buffers sized by the batch's
worst system). Outputs are sized by a first pass that
counts candidates per centre; a cumulative sum places them and a second pass writes them, so
no neighbour cap exists.

Host synchronisations: one, reading the total number of candidates to allocate the outputs
(the data decide it). Everything else is sized on the host from the layout.

On CPU tensors the kernel runs under Triton's interpreter (for tests: the same code, slowly),
which needs `TRITON_INTERPRET=1` set before Triton is imported; Triton then interprets every
kernel of the process, CUDA tensors included (copied to the host and back). The mode is
fixed per process, so the tests run the interpreter in a process of its own.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import triton.language as tl

from molden.errors import MoldenInputError
from molden.graph.systems import SystemLayout

# Centres per program and neighbour bins per step: a [16, 32] tile (27 bins of a bulk centre
# fit in one step).
_BLOCK_CENTRES = 16
_BLOCK_BINS = 32


def bin_grids(
    full_cell: np.ndarray, inverse: np.ndarray, pbc: np.ndarray, counts: np.ndarray, reach: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-system bin grids on the host, sized from that system's own numbers.

    Args:
        full_cell, inverse: [B, 3, 3] completed cells and their inverses (float64).
        pbc: [B, 3] bool; counts: [B] atoms per system.
        reach: Å, at least the search radius plus the rounding of wrapped positions.
    Returns:
        (bins [B, 3] int64 per axis, bin reach [B, 3] int64: how many bins a centre looks
        along each axis, inverse bin width [B, 3] float64 in bins per fractional unit).
    """
    spacing = 1.0 / np.linalg.norm(inverse, axis=-2)  # [B, 3] Å between lattice planes
    periodic_bins = np.where(pbc, np.maximum(1, np.floor(spacing / reach)), 1).astype(np.int64)
    # A few atoms in a large periodic cell would otherwise allocate mostly empty bins; wider
    # bins stay correct (the reach grows to match).
    cap = 2 * counts + 8
    while True:
        over = periodic_bins.prod(axis=1) > cap
        if not over.any():
            break
        periodic_bins[over] = np.maximum(1, periodic_bins[over] // 2)
    hashed_axes = (~pbc).sum(axis=1)
    per_axis = np.ceil((np.maximum(counts, 1) / periodic_bins.prod(axis=1)) ** (1.0 / np.maximum(hashed_axes, 1)))
    hashed_bins = np.maximum(3, per_axis).astype(np.int64)[:, None]  # >= 3: the 3 visited bins differ
    bins = np.where(pbc, periodic_bins, hashed_bins)
    # A periodic bin is 1 / bins wide in fractional units; a hashed bin is `reach` wide in Å.
    scale = np.where(pbc, bins.astype(np.float64), spacing / reach)
    # A neighbour within `reach` is at most reach * bins / spacing bins away; its bin index is
    # then at most the ceiling of that away (1 when the bins are at least `reach` wide).
    bin_reach = np.where(pbc, np.maximum(1, np.ceil(reach * bins / spacing)), 1).astype(np.int64)
    return bins, bin_reach, scale


def triton_cell_list_candidates(
    wrapped: torch.Tensor,
    batch: torch.Tensor,
    layout: SystemLayout,
    full_cell: np.ndarray,
    inverse: np.ndarray,
    search_cutoff: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(i, j, wrapped shift [E, 3] long, distance [E]) of every system, centres ascending.

    Args:
        wrapped: [N, 3] positions wrapped along periodic axes (`wrap_positions`), Å.
        batch: [N] long system of each atom; layout: the call's `SystemLayout`.
        full_cell, inverse: [B, 3, 3] float64 host arrays of completed cells and inverses.
        search_cutoff: Å; every pair closer than this among `wrapped` is returned.
    The order within a centre is the kernel's (deterministic), not sorted by (j, S).
    """
    device, dtype = wrapped.device, wrapped.dtype
    n_atoms = wrapped.shape[0]
    if device.type != "cuda" and not interpreted():
        raise MoldenInputError(
            "radius_graph", "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before Triton is imported"
        )
    work_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    if n_atoms == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty, torch.zeros(0, 3, dtype=torch.long, device=device), wrapped.new_zeros(0)
    # Wrapped positions may lie a rounding outside their cell (then their bin is clamped):
    # bins are sized for a slightly larger radius so that no neighbour falls outside the reach.
    eps = float(torch.finfo(work_dtype).eps)
    slack = 64 * eps * (search_cutoff + layout.position_bound + layout.cell_bound)
    if not math.isfinite(slack):  # NaN would size the bins and index past them
        raise MoldenInputError("radius_graph", "positions and cells must be finite (found NaN or inf)")
    bins, bin_reach, scale = bin_grids(full_cell, inverse, layout.pbc, layout.counts, search_cutoff + 2 * slack)
    n_bins = bins.prod(axis=1)
    first_bin = np.concatenate([[0], np.cumsum(n_bins)[:-1]])
    table = np.concatenate([bins, bin_reach, layout.pbc.astype(np.int64), first_bin[:, None]], axis=1)
    system_table = torch.from_numpy(table.astype(np.int32)).to(device)
    cells = torch.from_numpy(full_cell.reshape(-1, 9)).to(device=device, dtype=work_dtype)

    # Bin of every atom, computed in float64 on the device (no sync).
    per_atom = torch.from_numpy(np.concatenate([inverse.reshape(-1, 9), scale, bins], axis=1)).to(device)[batch]
    frac = torch.einsum("nk,nkl->nl", wrapped.to(torch.float64), per_atom[:, :9].reshape(-1, 3, 3))
    raw = torch.floor(frac * per_atom[:, 9:12])
    atom_bins = per_atom[:, 12:15].long()
    periodic = torch.from_numpy(layout.pbc).to(device)[batch]
    clamped = raw.clamp(min=0).long().minimum(atom_bins - 1)
    coords = torch.where(periodic, clamped, torch.remainder(raw.long(), atom_bins))
    linear = (coords[:, 0] * atom_bins[:, 1] + coords[:, 1]) * atom_bins[:, 2] + coords[:, 2]
    bin_id = torch.from_numpy(first_bin).to(device)[batch] + linear
    order = torch.argsort(bin_id, stable=True)
    bin_start = torch.searchsorted(bin_id[order], torch.arange(int(n_bins.sum()) + 1, device=device)).to(torch.int32)
    points = wrapped.to(work_dtype)
    sorted_points = points[order].T.contiguous()  # [3, N]: one coordinate of a bin is contiguous
    search2 = torch.tensor([search_cutoff**2], dtype=work_dtype, device=device)
    args = (
        order.to(torch.int32), sorted_points, points.contiguous(), batch.to(torch.int32),
        coords.to(torch.int32).contiguous(), bin_start, system_table, cells, search2,
    )

    kernel = _kernel()
    grid = ((n_atoms + _BLOCK_CENTRES - 1) // _BLOCK_CENTRES,)
    counts = torch.zeros(n_atoms, dtype=torch.int32, device=device)
    unused = torch.zeros(1, dtype=torch.int32, device=device)  # the outputs of the second pass
    kernel[grid](*args, counts, unused, unused, unused, search2, n_atoms,
                 WRITE=False, BLOCK_C=_BLOCK_CENTRES, BLOCK_J=_BLOCK_BINS)
    ends = torch.cumsum(counts, 0)
    total = int(ends[-1])  # the one data-dependent sync: the size of the outputs
    starts = ends - counts
    out_j = torch.empty(total, dtype=torch.int32, device=device)
    out_shift = torch.empty(total, 3, dtype=torch.int32, device=device)
    out_dist = torch.empty(total, dtype=work_dtype, device=device)
    if total:
        kernel[grid](*args, counts, starts, out_j, out_shift, out_dist, n_atoms,
                     WRITE=True, BLOCK_C=_BLOCK_CENTRES, BLOCK_J=_BLOCK_BINS)
    centres = torch.repeat_interleave(torch.arange(n_atoms, device=device), counts, output_size=total)
    return centres, out_j.long(), out_shift.long(), out_dist.to(dtype)


def interpreted() -> bool:
    """Whether Triton runs in its CPU interpreter in this process: `TRITON_INTERPRET=1` was set
    when Triton was imported (Triton's own kernels, `tl.zeros` and the like, were built then)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


@functools.cache
def _kernel():
    """The candidate kernel, in the mode Triton's own kernels were built in (interpreted or
    compiled): the two cannot call each other."""
    if interpreted():
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_candidates)
    from triton.runtime.jit import JITFunction

    return JITFunction(_candidates)


def _candidates(
    centre_order, sorted_points, points, atom_system, atom_bins, bin_start, systems, cells,
    search2_ptr, counts, starts, out_j, out_shift, out_dist, n_atoms,
    WRITE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
):
    # One program: BLOCK_C centres in bin order (neighbouring programs read the same bins) by
    # BLOCK_J of the bins each must visit; every step reads one more atom of each of those bins.
    # Lanes over bins rather than over a bin's atoms keep the tile full both for bulk (27
    # bins of ~10 atoms) and for cells thinner than the cutoff (hundreds of one-atom images).
    lanes = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    live = lanes < n_atoms
    centre = tl.load(centre_order + lanes, mask=live, other=0)
    system = tl.load(atom_system + centre, mask=live, other=0)
    row = systems + system * 10  # bins (3), bin reach (3), periodic (3), first bin
    n0, n1, n2 = tl.load(row + 0)[:, None], tl.load(row + 1)[:, None], tl.load(row + 2)[:, None]
    r0, r1, r2 = tl.load(row + 3)[:, None], tl.load(row + 4)[:, None], tl.load(row + 5)[:, None]
    p0, p1, p2 = tl.load(row + 6)[:, None], tl.load(row + 7)[:, None], tl.load(row + 8)[:, None]
    first = tl.load(row + 9)[:, None]
    c0 = tl.load(atom_bins + centre * 3 + 0)[:, None]
    c1 = tl.load(atom_bins + centre * 3 + 1)[:, None]
    c2 = tl.load(atom_bins + centre * 3 + 2)[:, None]
    x = tl.load(points + centre * 3 + 0)[:, None]
    y = tl.load(points + centre * 3 + 1)[:, None]
    z = tl.load(points + centre * 3 + 2)[:, None]
    cell = cells + system * 9
    a00, a01, a02 = tl.load(cell + 0)[:, None], tl.load(cell + 1)[:, None], tl.load(cell + 2)[:, None]
    a10, a11, a12 = tl.load(cell + 3)[:, None], tl.load(cell + 4)[:, None], tl.load(cell + 5)[:, None]
    a20, a21, a22 = tl.load(cell + 6)[:, None], tl.load(cell + 7)[:, None], tl.load(cell + 8)[:, None]
    search2 = tl.load(search2_ptr)
    w1, w2 = 2 * r1 + 1, 2 * r2 + 1
    n_offsets = tl.where(live[:, None], (2 * r0 + 1) * w1 * w2, 0)  # [C, 1] bins to visit
    if WRITE:
        base = tl.load(starts + centre, mask=live, other=0).to(tl.int64)
    found = tl.zeros([BLOCK_C], dtype=tl.int32)
    for k0 in range(0, tl.max(tl.max(n_offsets, axis=1), axis=0), BLOCK_J):
        k = k0 + tl.arange(0, BLOCK_J)[None, :]
        visit = k < n_offsets  # [C, J]
        # Unwrapped neighbour bin c + d, |d| <= reach, made non-negative and split into
        # (bin, periodic shift); a hashed (non-periodic) axis only wraps its bin index.
        t0 = c0 + (k // (w1 * w2) - r0) + (r0 + 1) * n0
        t1 = c1 + ((k // w2) % w1 - r1) + (r1 + 1) * n1
        t2 = c2 + (k % w2 - r2) + (r2 + 1) * n2
        s0 = tl.where(p0 != 0, t0 // n0 - (r0 + 1), 0)
        s1 = tl.where(p1 != 0, t1 // n1 - (r1 + 1), 0)
        s2 = tl.where(p2 != 0, t2 // n2 - (r2 + 1), 0)
        neighbour_bin = first + ((t0 % n0) * n1 + t1 % n1) * n2 + t2 % n2
        lo = tl.load(bin_start + neighbour_bin, mask=visit, other=0)
        hi = tl.load(bin_start + neighbour_bin + 1, mask=visit, other=0)
        # Image offset S @ cell, added to (p_j - p_i) as the torch backends do.
        f0, f1, f2 = s0.to(x.dtype), s1.to(x.dtype), s2.to(x.dtype)
        ix = f0 * a00 + f1 * a10 + f2 * a20
        iy = f0 * a01 + f1 * a11 + f2 * a21
        iz = f0 * a02 + f1 * a12 + f2 * a22
        zero_shift = (s0 == 0) & (s1 == 0) & (s2 == 0)
        for step in range(0, tl.max(tl.max(hi - lo, axis=1), axis=0)):
            slot = lo + step
            inside = slot < hi
            px = tl.load(sorted_points + slot, mask=inside, other=0.0)
            py = tl.load(sorted_points + n_atoms + slot, mask=inside, other=0.0)
            pz = tl.load(sorted_points + 2 * n_atoms + slot, mask=inside, other=0.0)
            j = tl.load(centre_order + slot, mask=inside, other=-1)
            dx = (px - x) + ix
            dy = (py - y) + iy
            dz = (pz - z) + iz
            dist2 = dx * dx + dy * dy + dz * dz
            hit = inside & (dist2 < search2) & ~((j == centre[:, None]) & zero_shift)
            if WRITE:
                at = base[:, None] + found[:, None] + tl.cumsum(hit.to(tl.int32), axis=1) - 1
                tl.store(out_j + at, j, mask=hit)
                tl.store(out_shift + at * 3 + 0, s0, mask=hit)
                tl.store(out_shift + at * 3 + 1, s1, mask=hit)
                tl.store(out_shift + at * 3 + 2, s2, mask=hit)
                tl.store(out_dist + at, tl.sqrt(dist2), mask=hit)
            found += tl.sum(hit.to(tl.int32), axis=1)
    if not WRITE:
        tl.store(counts + centre, found, mask=live)
