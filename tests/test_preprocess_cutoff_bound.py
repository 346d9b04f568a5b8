"""A cutoff that cannot finish fails at once, saying what it would produce; progress shows from
the first small block (issue 12, item 9)."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk, fcc111, molecule, nanotube
from ase.neighborlist import neighbor_list
from typer.testing import CliRunner

from molden.cli.app import app
from molden.data.ase_convert import structure_from_atoms
from molden.errors import MoldenConfigError
from molden.pipeline import preprocess as pp
from molden.pipeline import structure_graphs as sg
from molden.pipeline.preprocess import PreprocessConfig, run_preprocess

runner = CliRunner()


def _systems() -> dict:
    cluster = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(4)
    cluster.pbc, cluster.cell = False, np.zeros((3, 3))
    wire = nanotube(6, 0, length=2)
    wire.pbc = [False, False, True]
    benzene = molecule("C6H6")
    benzene.pbc = False
    return {
        "bulk": bulk("Cu", "fcc", a=3.6, cubic=True).repeat(3),
        "skewed bulk": bulk("Cu", "fcc", a=3.6).repeat((4, 4, 4)),
        "slab": fcc111("Pt", (3, 3, 4), vacuum=7.0),
        "wire": wire,
        "molecule": benzene,
        "cluster": cluster,
    }


@pytest.mark.parametrize("cutoff", [5.0, 8.0])
@pytest.mark.parametrize("name", sorted(_systems()))
def test_edge_estimate_is_within_a_factor_two_of_the_true_count(name, cutoff):
    atoms = _systems()[name]
    true = len(neighbor_list("i", atoms, cutoff)) / len(atoms)
    estimate = sg.estimate_neighbors([structure_from_atoms(atoms)], cutoff)[0]
    assert true / 2 <= estimate <= 2 * true, (true, estimate)


def test_molecules_never_estimate_more_than_all_pairs():
    benzene = structure_from_atoms(_systems()["molecule"])
    assert sg.estimate_neighbors([benzene], 1e9)[0] <= benzene.n_atoms - 1
    sg.check_edge_budget([benzene] * 100, 1e9)  # all pairs of small molecules is a finite graph


def test_a_large_but_sane_cutoff_passes_the_bound():
    sg.check_edge_budget([structure_from_atoms(_systems()["bulk"])], 12.0)  # about 600 per atom in Cu


def test_an_absurd_cutoff_fails_before_any_graph_is_built(mixed_extxyz, tmp_path, monkeypatch):
    monkeypatch.setattr(sg, "neighbor_list", lambda *a, **k: pytest.fail("graph building started"))
    out = tmp_path / "x.h5"
    result = runner.invoke(app, ["preprocess", "ase", str(mixed_extxyz), "--out", str(out), "--cutoff", "1e9"])
    assert result.exit_code == 1, result.output
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in result.output, message
    assert "cutoff 1e+09" in message and "edges per atom" in message and "--cutoff" in message
    assert "mixed.extxyz" in message
    assert list(tmp_path.glob("x.h5*")) == []


def test_the_bound_is_a_config_error_in_the_library(mixed_extxyz, tmp_path):
    with pytest.raises(MoldenConfigError, match="limit is 1,000 per atom"):
        run_preprocess(PreprocessConfig(source="ase", inputs=[mixed_extxyz], out=tmp_path / "x.h5", cutoff_angstrom=200.0))


def test_progress_is_reported_after_the_first_small_block(mixed_extxyz, tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "FIRST_BLOCK_ATOMS", 40, raising=False)
    seen: list[int] = []
    run_preprocess(
        PreprocessConfig(source="ase", inputs=[mixed_extxyz], out=tmp_path / "x.h5", cutoff_angstrom=4.0),
        progress=lambda done, total: seen.append(done),
    )
    assert seen[0] == 0 and seen[-1] == 30
    # The mixed frames have 5 to 12 atoms: the first block holds a handful, not all 30.
    assert 0 < seen[1] < 10, seen
    # Blocks then grow (doubling), so a large source is not cut into many small writes.
    steps = np.diff(seen[1:-1])
    assert len(steps) and steps[-1] > seen[1], seen
