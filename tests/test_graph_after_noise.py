"""The graph after noise filtered from a cache stored beyond the model's cutoff
(`molden.graph.verlet.graph_from_wider`, `with_positions`, `molden.train.data.for_model`):
every case is compared with a fresh search of the noised positions."""

from __future__ import annotations

import dataclasses

import ase.io
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import molden.objectives.noise as noise_module
from molden.data.h5_dataset import H5Dataset
from molden.graph.radius_graph import neighbor_list
from molden.graph.verlet import graph_from_wider
from molden.models.checkpoint import read_checkpoint
from molden.objectives.noise import with_positions
from molden.train.data import for_model, move, trim_graph

WIDER = 4.0  # the s2ef_cache fixture's cutoff


def _edges(edge_index: torch.Tensor, unit_shifts: torch.Tensor) -> set[tuple[int, ...]]:
    return set(map(tuple, torch.cat([edge_index.T, unit_shifts.long()], dim=1).tolist()))


def _searched(batch, positions, cutoff, k=None):
    edge_index, shifts = neighbor_list(positions, cutoff, cell=batch.cell, pbc=batch.pbc, batch=batch.batch,
                                       n_node=batch.n_node, max_num_neighbors=k)
    return edge_index, shifts


def _batch(cache, dtype, n=24, seed=0):
    data = H5Dataset(cache, "train")
    rng = np.random.default_rng(seed)
    return data.collated(rng.choice(len(data), size=min(n, len(data)), replace=False).tolist(), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cutoff, k", [(3.5, None), (3.0, None), (3.5, 6)])
def test_the_filtered_graph_is_the_searched_one(s2ef_cache, dtype, cutoff, k):
    batch = _batch(s2ef_cache, dtype)
    assert batch.graph_cutoff_angstrom == WIDER and bool(batch.pbc.any()) and not bool(batch.pbc.all())
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        positions = batch.positions + 0.05 * torch.randn(batch.positions.shape, generator=generator, dtype=dtype)
        out = graph_from_wider(batch, positions, cutoff, max_num_neighbors=k)
        assert out is not None and out.positions is positions
        edge_index, shifts = _searched(batch, positions, cutoff, k)
        assert _edges(out.edge_index, out.unit_shifts) == _edges(edge_index, shifts)
        assert torch.equal(out.n_edge, torch.bincount(batch.batch[edge_index[0]], minlength=batch.num_graphs))
        assert out.graph_cutoff_angstrom == (cutoff if k is None else None)


def test_atoms_pushed_across_a_cell_face_keep_their_neighbours(s2ef_cache):
    data = H5Dataset(s2ef_cache, "train")
    periodic = [k for k in range(len(data)) if data[k].pbc.all()]
    batch = data.collated(periodic[:4], dtype=torch.float64)
    fractional = torch.linalg.solve(batch.cell[batch.batch].transpose(1, 2), batch.positions[..., None])[..., 0]
    near_face = (fractional < 0.05) | (fractional > 0.95)
    assert near_face.any()
    # every atom near a face moves 0.2 Å outward through it (out of the cell)
    outward = torch.where(fractional > 0.5, 1.0, -1.0) * near_face
    direction = torch.nn.functional.normalize((outward[..., None] * batch.cell[batch.batch]).sum(1), dim=1)
    positions = batch.positions + 0.2 * direction * near_face.any(1, keepdim=True)
    moved_out = torch.linalg.solve(batch.cell[batch.batch].transpose(1, 2), positions[..., None])[..., 0]
    assert ((moved_out < 0) | (moved_out >= 1)).any()
    out = graph_from_wider(batch, positions, 3.5)
    assert out is not None
    assert _edges(out.edge_index, out.unit_shifts) == _edges(*_searched(batch, positions, 3.5))


def test_what_the_wider_graph_cannot_vouch_for_is_refused(s2ef_cache, mixed_extxyz, tmp_path):
    from molden.pipeline.preprocess import PreprocessConfig, run_preprocess

    batch = _batch(s2ef_cache, torch.float64)
    assert graph_from_wider(batch, batch.positions, WIDER) is None  # not wider than the cutoff
    assert graph_from_wider(dataclasses.replace(batch, graph_cutoff_angstrom=None), batch.positions, 3.5) is None
    moved = batch.positions.clone()
    moved[3, 0] += 0.25  # half the 0.5 Å difference: a pair could have come from beyond 4 Å
    assert graph_from_wider(batch, moved, 3.5) is None
    moved[3, 0] -= 0.01
    assert graph_from_wider(batch, moved, 3.5) is not None
    capped = tmp_path / "capped.h5"
    run_preprocess(PreprocessConfig(source="ase", inputs=[mixed_extxyz], out=capped, cutoff_angstrom=4.0,
                                    max_num_neighbors=4))
    data = H5Dataset(capped)
    assert data.complete_graph_cutoff_angstrom is None and data.collated([0, 1]).graph_cutoff_angstrom is None


def test_with_positions_filters_instead_of_searching_when_it_can(s2ef_cache, monkeypatch):
    batch = _batch(s2ef_cache, torch.float32)
    positions = batch.positions + 0.02 * torch.randn(batch.positions.shape, generator=torch.Generator().manual_seed(2))
    expected = _edges(*_searched(batch, positions, 3.5))

    def no_search(*args, **kwargs):
        raise AssertionError("searched")

    monkeypatch.setattr(noise_module, "neighbor_list", no_search)
    out = with_positions(batch, positions, cutoff_angstrom=3.5)
    assert _edges(out.edge_index, out.unit_shifts) == expected and out.graph_cutoff_angstrom == 3.5
    with pytest.raises(AssertionError, match="searched"):  # at the cache's own cutoff there is no skin
        with_positions(batch, positions, cutoff_angstrom=WIDER)
    kept = with_positions(batch, positions, rebuild_graph=False)
    assert kept.edge_index is batch.edge_index and kept.graph_cutoff_angstrom is None  # no longer its radius graph


def test_a_graph_kept_through_noise_is_cut_where_the_clean_positions_put_it(s2ef_cache):
    clean = move(_batch(s2ef_cache, torch.float64), torch.device("cpu"), 3.5)
    assert clean.graph_cutoff_angstrom == WIDER  # a whole graph stays wide until after the corruption
    positions = clean.positions + 0.1 * torch.randn(clean.positions.shape, generator=torch.Generator().manual_seed(3),
                                                    dtype=torch.float64)
    kept = for_model(clean, with_positions(clean, positions, rebuild_graph=False), 3.5)
    trimmed = trim_graph(clean, 3.5)  # what `move` cut before the corruption ran after it
    assert _edges(kept.edge_index, kept.unit_shifts) == _edges(trimmed.edge_index, trimmed.unit_shifts)
    assert kept.positions is positions and torch.equal(kept.n_edge, trimmed.n_edge)
    assert _edges(trimmed.edge_index, trimmed.unit_shifts) == _edges(*_searched(clean, clean.positions, 3.5))
    unchanged = for_model(clean, clean, 3.5)  # no corruption (validation): the clean graph at the cutoff
    assert _edges(unchanged.edge_index, unchanged.unit_shifts) == _edges(trimmed.edge_index, trimmed.unit_shifts)
    assert unchanged.graph_cutoff_angstrom == 3.5
    rebuilt = with_positions(clean, positions, cutoff_angstrom=3.5)
    assert for_model(clean, rebuilt, 3.5) is rebuilt


def test_training_with_the_filtered_graph_follows_the_searched_one(s2ef_cache, tmp_path, monkeypatch):
    """A DeNS run on a 4 Å cache with a 3.5 Å model, with the graph after noise filtered and with
    it searched: the same edges (in another order), so the same weights to rounding."""
    from tests.test_training import FAST, _invoke

    filtered_calls = []
    original = noise_module.graph_from_wider

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        filtered_calls.append(out is not None)
        return out

    args = ("finetune", "--data", s2ef_cache, "--task", "s2ef", "--dens", "--dens-sigma", "0.02", *FAST[:-2],
            "--change", "cutoff_angstrom=3.5", "--dtype", "float64", "--seed", "0", "--threads", "1")
    monkeypatch.setattr(noise_module, "graph_from_wider", counting)
    first = _invoke(*args, "--out", tmp_path / "filtered")
    assert first.exit_code == 0, first.output
    assert filtered_calls and all(filtered_calls)
    monkeypatch.setattr(noise_module, "graph_from_wider", lambda *a, **k: None)
    second = _invoke(*args, "--out", tmp_path / "searched")
    assert second.exit_code == 0, second.output
    a, b = (read_checkpoint(tmp_path / run / "last.pt")["model"] for run in ("filtered", "searched"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-9, atol=1e-11, msg=name)


def test_a_run_that_searches_after_noise_says_how_to_filter_instead(s2ef_cache, tmp_path):
    from tests.test_training import FAST, _invoke

    def note(cutoff: str, *extra: str) -> str:
        result = _invoke("finetune", "--data", s2ef_cache, "--task", "s2ef", "--dens", *FAST[:-2], "--steps", "1",
                         "--threads", "1", "--change", f"cutoff_angstrom={cutoff}", *extra, "--out", tmp_path / cutoff)
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    # DeNS's default σ 0.1 Å needs 2 × 5σ = 1 Å of margin; the 4 Å cache has none for a 4 Å model
    assert ("the graph after noise (σ 0.1 Å) is searched at every step (s2ef.h5: its graphs stop at 4 Å); a cache "
            "preprocessed with --cutoff 5 and no --max-neighbors") in note("4.0")
    assert ("is searched at most steps (s2ef.h5: its graphs stop 0.5 Å beyond the model's, below 10σ); a cache "
            "preprocessed with --cutoff 4.5 and no") in note("3.5")
    assert "searched at" not in note("3.0", "--dens-sigma", "0.02")
    assert "searched at" not in note("3.9", "--dens-sigma", "0.3")  # moves too far for any cache: no advice


def test_the_advised_margin_is_ten_sigma_at_least_half_an_angstrom():
    from molden.train.tasks import filter_margin_angstrom

    assert [filter_margin_angstrom(s) for s in (0.02, 0.05, 0.051, 0.08, 0.1, 0.3)] == [0.5, 0.5, 0.6, 0.8, 1.0, 3.0]


def test_a_capped_rebuild_at_a_wider_cutoff_than_the_models_is_cut_to_it(s2ef_cache):
    clean = move(_batch(s2ef_cache, torch.float64), torch.device("cpu"), 3.0)
    positions = clean.positions + 0.02 * torch.randn(clean.positions.shape, generator=torch.Generator().manual_seed(4),
                                                     dtype=torch.float64)
    rebuilt = with_positions(clean, positions, cutoff_angstrom=3.5, max_num_neighbors=12)  # the objective's own cutoff
    assert rebuilt.graph_cutoff_angstrom is None
    out = for_model(clean, rebuilt, 3.0)
    i, j = out.edge_index
    from molden.graph.radius_graph import edge_lengths

    assert len(i) < len(rebuilt.edge_index[0])
    assert bool((edge_lengths(positions, out.cell, out.batch, i, j, out.unit_shifts) < 3.0).all())
