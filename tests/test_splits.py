"""Specifications of train/val/test splits (`molden.data.splits`) and how preprocess uses them."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from molden.cli.app import app
from molden.data.splits import NoTrainSplitError, SplitConfig, assign_splits
from molden.errors import MoldenConfigError
from molden.pipeline import preprocess as pp
from molden.pipeline.preprocess import PreprocessConfig, run_preprocess


def _ids(n: int) -> np.ndarray:
    return np.array([f"s{k}" for k in range(n)])


def test_counts_that_take_every_system_are_an_error_saying_what_to_pass():
    with pytest.raises(NoTrainSplitError) as error:
        assign_splits(_ids(15_000), np.arange(15_000), SplitConfig(val=10_000, test=10_000))
    message = str(error.value)
    assert "--val 10000 and --test 10000 leave no systems for training out of 15,000" in message
    assert "--val 0.1" in message


def test_fractions_that_round_to_every_system_are_an_error_too():
    with pytest.raises(NoTrainSplitError):
        assign_splits(_ids(1), np.arange(1), SplitConfig(val=0.6, test=0.3))


def test_assigned_splits_always_keep_a_train_split():
    for n in range(1, 40):
        for val, test in ((0.1, 0.1), (0.3, 0.3), (3, 0.2), (1, 1)):
            config = SplitConfig(val=val, test=test, seed=n)
            try:
                names = assign_splits(_ids(n), np.arange(n), config)
            except NoTrainSplitError:
                continue
            assert "train" in set(names), (n, val, test)


@pytest.mark.parametrize("value", [1.5, 2.25, 10000.5])
def test_sizes_that_are_neither_a_count_nor_a_fraction_are_refused(value):
    with pytest.raises(ValidationError, match="neither a count"):
        SplitConfig(val=value)
    with pytest.raises(ValidationError, match="neither a count"):
        SplitConfig(test=value)
    assert SplitConfig(val=2.0, test=0.5).val == 2


def test_cli_refuses_val_1_5_in_one_line(mixed_extxyz, tmp_path):
    result = CliRunner().invoke(app, ["preprocess", "ase", str(mixed_extxyz), "--out", str(tmp_path / "c.h5"), "--val", "1.5"])
    assert result.exit_code != 0
    assert "neither a count" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "c.h5").exists()


def test_qm9_limit_below_the_held_out_counts_fails_before_reading(tmp_path, monkeypatch):
    from molden.data import readers

    monkeypatch.setattr(readers, "read_qm9", lambda *a, **k: pytest.fail("read although the split cannot work"))
    out = tmp_path / "qm9.h5"
    with pytest.raises(NoTrainSplitError, match=r"--val 10000 and --test 10000 leave no systems .* at most 15,000"):
        run_preprocess(PreprocessConfig(source="qm9", out=out, limit=15_000))
    assert not out.exists() and not out.with_name("qm9.h5.partial").exists()


def test_emt_refuses_val_and_test_it_would_ignore(tmp_path, monkeypatch):
    from molden.data import emt

    monkeypatch.setattr(emt, "generate_emt", lambda *a, **k: pytest.fail("generated although refused"))
    with pytest.raises(MoldenConfigError, match="--val, --test and --split-by do not apply"):
        run_preprocess(PreprocessConfig(source="emt", out=tmp_path / "e.h5", split=SplitConfig(val=5)))


def _datasets(path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: out.update({name: obj[()]}) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_counts_beyond_the_frames_read_fail_at_the_end_and_a_corrected_rerun_reads_nothing(
    mixed_extxyz, tmp_path, monkeypatch
):
    from molden.data import readers

    monkeypatch.setattr(pp, "BLOCK_STRUCTURES", 8)
    out = tmp_path / "c.h5"
    config = dict(source="ase", inputs=[mixed_extxyz])
    too_many = SplitConfig(val=20, test=10, group_by="structure")
    with pytest.raises(NoTrainSplitError, match=r"--val 20 and --test 10 leave no structures .* out of 30.*rerun"):
        run_preprocess(PreprocessConfig(**config, out=out, split=too_many))
    assert not out.exists() and out.with_name("c.h5.partial").exists()

    fixed = SplitConfig(val=5, test=5, group_by="structure")
    read_ase = readers.read_ase
    monkeypatch.setattr(readers, "read_ase", lambda *a, **k: pytest.fail("read again"))
    summary = run_preprocess(PreprocessConfig(**config, out=out, split=fixed))
    assert summary.splits == {"val": 5, "test": 5, "train": 20}
    assert not out.with_name("c.h5.partial").exists()

    monkeypatch.setattr(readers, "read_ase", read_ase)
    reference = run_preprocess(PreprocessConfig(**config, out=tmp_path / "ref.h5", split=fixed)).path
    got, want = _datasets(out), _datasets(reference)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    with h5py.File(out) as f, h5py.File(reference) as g:
        assert dict(f["stats"].attrs) == dict(g["stats"].attrs)
        assert set(f.attrs) == set(g.attrs)


def test_both_fractions_are_taken_of_every_system():
    names = assign_splits(_ids(1000), np.arange(1000), SplitConfig(val=0.2, test=0.2))
    assert (names == "val").sum() == 200 and (names == "test").sum() == 200


def test_a_seed_changes_the_split_of_an_ase_source_without_discarding_its_work(mixed_extxyz, tmp_path):
    out = tmp_path / "s.h5"
    too_many = [mixed_extxyz, "--val", 30, "--out", out]
    runner = CliRunner()
    assert runner.invoke(app, ["preprocess", "ase", *map(str, too_many)]).exit_code == 1
    assert out.with_name("s.h5.partial").exists()
    result = runner.invoke(app, ["preprocess", "ase", str(mixed_extxyz), "--val", "2", "--seed", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "emt" not in result.output
    with h5py.File(out) as f:
        assert len(f["splits/val"]) == 2
