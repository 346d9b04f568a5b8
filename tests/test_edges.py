"""Specifications of `molden.graph.cartesian_shifts`: every path (one cell, per-graph matmuls
from host edge counts, per-edge gather) gives `unit_shifts[e] @ cell[graph of e]` exactly and
the same gradient with respect to the cells."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from molden.graph import cartesian_shifts

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def reference(unit_shifts: torch.Tensor, cell: torch.Tensor, edge_graph: torch.Tensor) -> torch.Tensor:
    """unit_shifts[e] @ cell[edge_graph[e]] written out term by term."""
    s = unit_shifts.to(cell.dtype)
    c = cell[edge_graph]
    return s[:, 0:1] * c[:, 0] + s[:, 1:2] * c[:, 1] + s[:, 2:3] * c[:, 2]


def random_edges(counts: list[int], seed: int, device: str, zero_cells: tuple[int, ...] = ()):
    rng = np.random.default_rng(seed)
    cell = torch.tensor(rng.normal(scale=4.0, size=(len(counts), 3, 3)), device=device)
    cell[list(zero_cells)] = 0.0
    edge_graph = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))
    unit_shifts = torch.tensor(rng.integers(-3, 4, size=(sum(counts), 3)), dtype=torch.int32, device=device)
    return unit_shifts, cell, edge_graph


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("counts", "zero_cells"),
    [
        ([700], ()),  # one cell: one matmul
        ([20_000], ()),  # one cell, several host blocks
        ([600, 0, 900, 1200], ()),  # large graphs: one matmul per graph, one without edges
        ([600, 5, 900, 1200], (1, 3)),  # graphs without a cell cost nothing
        ([3] * 200, ()),  # many small graphs: one gather
        ([40, 0, 7], (0, 1, 2)),  # no cell at all: zeros
    ],
)
def test_cartesian_shifts_equal_unit_shifts_times_each_edge_cell_on_every_path(device, counts, zero_cells):
    unit_shifts, cell, edge_graph = random_edges(counts, len(counts), device, zero_cells)
    want = reference(unit_shifts, cell, edge_graph)
    by_graph = cartesian_shifts(unit_shifts, cell, edge_graph)
    for edge_counts in (counts, np.array(counts), torch.tensor(counts), torch.tensor(counts, device=device)):
        got = cartesian_shifts(unit_shifts, cell, edge_counts=edge_counts) if device == "cpu" else by_graph
        torch.testing.assert_close(got, want, rtol=1e-15, atol=1e-12)
    torch.testing.assert_close(by_graph, want, rtol=1e-15, atol=1e-12)
    if len(counts) == 1:
        torch.testing.assert_close(cartesian_shifts(unit_shifts, cell[0]), want, rtol=1e-15, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("counts", [[700], [600, 0, 900, 1200], [3] * 200])
def test_cartesian_shifts_give_the_gradient_of_the_per_edge_product_in_the_cells(device, counts):
    unit_shifts, cell, edge_graph = random_edges(counts, 3, device)
    cell.requires_grad_(True)
    weights = torch.randn(len(unit_shifts), 3, dtype=cell.dtype, device=device)
    (want,) = torch.autograd.grad((reference(unit_shifts, cell, edge_graph) * weights).sum(), cell)
    paths = [lambda: cartesian_shifts(unit_shifts, cell, edge_graph)]
    if device == "cpu":
        paths.append(lambda: cartesian_shifts(unit_shifts, cell, edge_counts=counts))
    for path in paths:
        (got,) = torch.autograd.grad((path() * weights).sum(), cell)
        torch.testing.assert_close(got, want)


def test_cartesian_shifts_pass_gradcheck_in_the_cells():
    unit_shifts, cell, edge_graph = random_edges([4, 0, 5], 3, "cpu")
    cell.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: cartesian_shifts(unit_shifts, c, edge_graph), (cell,))
    assert torch.autograd.gradcheck(lambda c: cartesian_shifts(unit_shifts, c[1]), (cell,))


def test_cartesian_shifts_need_the_graph_of_each_edge_for_several_cells():
    unit_shifts, cell, _ = random_edges([3, 4], 0, "cpu")
    with pytest.raises(ValueError, match="edge_graph"):
        cartesian_shifts(unit_shifts, cell)


def test_cartesian_shifts_of_consecutive_graphs_sharing_a_cell_equal_the_per_edge_product():
    # Graphs 0-1 and 3-4 share cells (one product per run), graph 2 has none, 5 has no edges.
    counts = [700, 900, 40, 20_000, 1_300, 0]
    unit_shifts, cell, edge_graph = random_edges(counts, 5, "cpu", zero_cells=(2,))
    cell[1], cell[4], cell[5] = cell[0], cell[3], cell[3]
    got = cartesian_shifts(unit_shifts, cell, edge_counts=counts)
    torch.testing.assert_close(got, reference(unit_shifts, cell, edge_graph), rtol=1e-15, atol=1e-12)
