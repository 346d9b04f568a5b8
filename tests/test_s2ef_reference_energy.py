"""OC20 S2EF's energy target, `energy − reference_energy` (`S2EFConfig.energy_reference`,
`--energy-reference`): the loss subtracts the column, the per-element references and σ_E are
fitted to the referenced energies of the train split, the run records it, and a cache that
cannot give the column is refused in one line before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import ase.io
import h5py
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from typer.testing import CliRunner

from molden.data import h5_schema as S
from molden.data.batch import collate
from molden.data.h5_dataset import H5Dataset
from molden.models import keys
from molden.models.checkpoint import load_model, read_checkpoint
from molden.objectives.supervised import S2EFConfig, S2EFLoss

SYSTEMS = (("Cu", "O"), ("Pt", "C"), ("Cu", "C"), ("Pt", "O"))
FRAMES_PER_SYSTEM = 6
DFT_LIKE_EV_PER_ATOM = 3.5


def _system_frames(metal: str, adsorbate: str, rng: np.random.Generator) -> list[Atoms]:
    slab = fcc111(metal, size=(2, 2, 2), vacuum=6.0)
    layer = slab.get_tags()
    add_adsorbate(slab, adsorbate, 1.7, "fcc")
    slab.set_tags(np.concatenate([np.where(layer == 1, 1, 0), [2]]))
    slab.set_constraint(FixAtoms(mask=slab.get_tags() == 0))
    slab.pbc = True
    del slab.info["adsorbate_info"]
    frames = []
    for _ in range(FRAMES_PER_SYSTEM):
        atoms = slab.copy()
        atoms.positions += rng.normal(scale=0.04, size=atoms.positions.shape)
        atoms.calc = EMT()
        # DFT-like totals, a few eV per atom below zero (EMT's are near zero)
        energy = atoms.get_potential_energy() - DFT_LIKE_EV_PER_ATOM * len(atoms)
        forces = atoms.get_forces(apply_constraint=False)
        atoms.calc = SinglePointCalculator(atoms, energy=energy, free_energy=energy, forces=forces)
        frames.append(atoms)
    return frames


def _write_oc20_s2ef(folder: Path, nan_reference_of: int | None = None) -> np.ndarray:
    """`0.extxyz` + `0.txt` as OC20's S2EF download: one system id and one reference energy
    (eV) per system, as OC20's slab + gas-phase references. Returns the references per frame."""
    rng = np.random.default_rng(7)
    frames, lines, references = [], [], []
    for k, (metal, adsorbate) in enumerate(SYSTEMS):
        system = _system_frames(metal, adsorbate, rng)
        reference = float(system[0].get_potential_energy()) - 0.5 - 0.3 * k  # the energy less a small adsorption energy
        for j, atoms in enumerate(system):
            frame = len(frames)
            frames.append(atoms)
            references.append(reference)
            line = f"random{100 + k},frame{j}"
            lines.append(f"{line},nan" if frame == nan_reference_of else f"{line},{reference!r}")
    folder.mkdir(parents=True, exist_ok=True)
    ase.io.write(folder / "0.extxyz", frames, format="extxyz")
    (folder / "0.txt").write_text("\n".join(lines) + "\n")
    return np.asarray(references)


def _preprocess(folder: Path, out: Path) -> Path:
    from molden.data.splits import SplitConfig
    from molden.pipeline.preprocess import PreprocessConfig, run_preprocess

    run_preprocess(PreprocessConfig(source="oc20", inputs=[folder], out=out, cutoff_angstrom=4.0,
                                    split=SplitConfig(val=0.25, test=0.0, group_by="structure")))
    return out


@pytest.fixture(scope="module")
def oc20_s2ef_cache(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("oc20_s2ef")
    _write_oc20_s2ef(folder / "raw")
    return _preprocess(folder / "raw", folder / "s2ef.h5")


def _invoke(*args):
    from test_training import _app

    return CliRunner().invoke(_app(), [str(a) for a in args])


FAST = ("--task", "s2ef", "--steps", "3", "--max-graphs", "4", "--val-split", "none", "--threads", "1",
        "--model", "gns_oc20_cpu", "--change", "latent_dim=16", "--change", "mlp_hidden_dim=16",
        "--change", "cutoff_angstrom=4.0")


def _referenced_fit(path: Path) -> tuple[np.ndarray, float]:
    """Per-element references and residual spread of energy − reference_energy on the train
    split, by a plain least squares on the composition: the test's own reference."""
    with h5py.File(path, "r") as f:
        names = json.loads(f.attrs["target_names"])
        referenced = f[S.ENERGY][:] - f[S.TARGETS][:, names.index("reference_energy")]
        split_names = json.loads(f.attrs["split_names"])
        train = f[S.SPLIT_CODE][:] == split_names.index("train")
        offsets, numbers = f[S.ATOM_OFFSETS][:], f[S.NUMBERS][:]
    counts = np.zeros((len(offsets) - 1, 119))
    for k in range(len(offsets) - 1):
        np.add.at(counts[k], numbers[offsets[k]:offsets[k + 1]], 1)
    present = np.flatnonzero(counts[train].sum(axis=0))
    solution = np.linalg.lstsq(counts[train][:, present], referenced[train], rcond=None)[0]
    reference = np.zeros(119)
    reference[present] = solution
    return reference, float(np.std(referenced[train] - counts[train] @ reference))


def test_the_loss_learns_the_energy_less_the_named_column(oc20_s2ef_cache):
    dataset = H5Dataset(oc20_s2ef_cache)
    batch = collate([dataset[i] for i in range(5)], dtype=torch.float64)
    column = batch.target_names.index("reference_energy")
    _, targets = S2EFLoss(S2EFConfig(energy_reference="reference_energy")).corrupt(batch, torch.Generator())
    torch.testing.assert_close(targets[keys.ENERGY], batch.energy - batch.targets[:, column])
    _, total = S2EFLoss(S2EFConfig()).corrupt(batch, torch.Generator())
    torch.testing.assert_close(total[keys.ENERGY], batch.energy)


def test_finetune_fits_the_references_to_the_referenced_energies_and_records_it(oc20_s2ef_cache, tmp_path):
    out = tmp_path / "run"
    result = _invoke("finetune", "--data", oc20_s2ef_cache, "--out", out, *FAST, "--energy-reference", "reference_energy",
                     "--energy-scale", "energy_std")
    assert result.exit_code == 0, result.output
    payload = read_checkpoint(out / "last.pt")
    task = json.loads(payload["task"]) if isinstance(payload["task"], str) else payload["task"]
    reference, spread = _referenced_fit(oc20_s2ef_cache)
    assert task["energy_reference"] == "reference_energy"
    assert task["energy_scale_ev"] == pytest.approx(spread, rel=1e-6)
    head = load_model(out / "last.pt").model.heads[keys.ENERGY]
    np.testing.assert_allclose(head.element_reference[:, 0].double().numpy(), reference, atol=1e-4)
    config = json.loads((out / "config.json").read_text())
    assert config["s2ef"]["energy_reference"] == "reference_energy"
    # The total energies' references (the cache's) are another fit: eV apart per atom.
    with h5py.File(oc20_s2ef_cache, "r") as f:
        total = np.nan_to_num(f[S.STATS]["element_reference_energy_ev"][:])
    assert np.abs(total - reference).max() > 1.0

    evaluated = _invoke("evaluate", out / "last.pt", "--data", oc20_s2ef_cache, "--split", "val", "--out", tmp_path / "val.json")
    assert evaluated.exit_code == 0, evaluated.output
    # scored against the referenced energies (a few eV off after 3 steps), not the totals (~35 eV away)
    assert 0 < json.loads((tmp_path / "val.json").read_text())["metrics"]["energy_mae_mev"] < 15_000


@pytest.mark.parametrize("section", ["s2ef", "dens"])
def test_none_clears_a_config_files_energy_reference(oc20_s2ef_cache, tmp_path, section):
    """`--energy-reference none` clears the column a config file set, in the plain S2EF terms and
    in DeNS's; `none` in a file (YAML reads it as a string) is no column either."""
    nested = "s2ef:\n  energy_reference: reference_energy\n"
    config = tmp_path / "config.yaml"
    config.write_text(nested if section == "s2ef" else "dens:\n  " + nested.replace("\n  ", "\n    "))
    out = tmp_path / "run"
    result = _invoke("finetune", "--config", config, "--data", oc20_s2ef_cache, "--out", out, *FAST, "--energy-reference", "none")
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    assert (saved["s2ef"] if section == "s2ef" else saved["dens"]["s2ef"])["energy_reference"] is None
    config.write_text("s2ef:\n  energy_reference: none\n")
    result = _invoke("finetune", "--config", config, "--data", oc20_s2ef_cache, "--out", tmp_path / "file_none", *FAST)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "file_none" / "config.json").read_text())["s2ef"]["energy_reference"] is None


def test_a_cache_without_the_column_is_refused_in_one_line(s2ef_cache, tmp_path):
    out = tmp_path / "run"
    result = _invoke("finetune", "--data", s2ef_cache, "--out", out, *FAST, "--energy-reference", "reference_energy")
    assert result.exit_code == 1, result.output
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and str(s2ef_cache) in line, line
    assert "energy_reference 'reference_energy' is not a target of the cache" in line
    assert not out.exists()


def test_a_structure_without_a_reference_energy_is_named(oc20_s2ef_cache, tmp_path):
    """A metadata line whose reference reads `nan` (the reader refuses a line with none once
    earlier lines had one): training and evaluation refuse it in one line naming the structure."""
    _write_oc20_s2ef(tmp_path / "raw", nan_reference_of=4)
    cache = _preprocess(tmp_path / "raw", tmp_path / "s2ef.h5")
    out = tmp_path / "run"
    result = _invoke("finetune", "--data", cache, "--out", out, *FAST, "--energy-reference", "reference_energy")
    assert result.exit_code == 1, result.output
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and "no reference_energy to subtract (energy_reference) for 1 of the 24 structures" in line, line
    assert "structure 4 (system random100)" in line and str(cache) in line, line
    assert not out.exists()



@pytest.fixture(scope="module")
def referenced_run(oc20_s2ef_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("referenced") / "run"
    result = _invoke("finetune", "--data", oc20_s2ef_cache, "--out", out, *FAST, "--energy-reference", "reference_energy")
    assert result.exit_code == 0, result.output
    return out


def test_evaluate_refuses_a_cache_that_cannot_give_the_referenced_energies(referenced_run, s2ef_cache, tmp_path):
    """A model of energy − reference_energy is evaluated only where the split has the column
    and a value for every structure: one line naming the file (and the structure), no JSON."""
    _write_oc20_s2ef(tmp_path / "raw", nan_reference_of=4)
    with_nan = _preprocess(tmp_path / "raw", tmp_path / "s2ef.h5")
    with h5py.File(with_nan, "r") as f:
        split = json.loads(f.attrs["split_names"])[int(f[S.SPLIT_CODE][4])]
    for cache, split, message in ((with_nan, split, "structure 4 (system random100)"),
                                  (s2ef_cache, "val", "energy_reference 'reference_energy' is not a target of the cache")):
        result = _invoke("evaluate", referenced_run / "last.pt", "--data", cache, "--split", split, "--out", tmp_path / "e.json")
        assert result.exit_code == 1, result.output
        line = result.output.strip()
        assert len(line.splitlines()) == 1 and message in line and str(cache) in line, line
        assert not (tmp_path / "e.json").exists()


def test_relax_says_before_relaxing_which_structures_will_get_no_energy(referenced_run, s2ef_cache, tmp_path):
    """A referenced model relaxing structures without the reference (an OC20 .traj cache made
    without --oc20-references) still relaxes them, but says once, naming the input and a
    structure, that they get no energy, and its JSON holds no energy metrics."""
    from molden.cli.app import app

    def _invoke(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    out = tmp_path / "relaxed.extxyz"
    result = _invoke("relax", s2ef_cache, "--model", referenced_run / "last.pt", "--split", "test", "--steps", 3,
                     "--method", "lbfgs", "--method", "fire", "--forces-check", "none", "--out", out)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "have no target 'reference_energy'" in line]
    assert len(notes) == 1 and str(s2ef_cache) in notes[0], result.stderr
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["lbfgs", "fire"] and all("energy_mae_mev" not in r for r in rows)
    quiet = _invoke("relax", s2ef_cache, "--model", "emt", "--split", "test", "--steps", 3, "--forces-check", "none",
                    "--out", tmp_path / "emt.extxyz")
    assert quiet.exit_code == 0 and "have no target" not in quiet.stderr
