"""The paper-experiment configs in examples/configs (issue 14): each validates into its command's
config as written (no cutoff filling), names presets that exist, carries the objective preset
it says it does, has a CPU twin of the same recipe, is listed in the README, and the QM9 twin
trains through `molden finetune --config`."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from molden.cli import train as train_cli
from molden.models.presets import PRESETS
from molden.models.spec import backbone_from_preset
from molden.objectives import dens, denoising, noisy_nodes, supervised
from molden.train.config import FinetuneConfig, PretrainConfig, load_config, read_config_file

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
FILES = sorted(CONFIGS.glob("*.yaml"))
PAPER = sorted(p for p in FILES if p.stem.endswith("_paper"))
OBJECTIVE_SECTIONS = ("noisy_nodes", "dens", "denoising")
"""Sections whose graph is rebuilt under noise: each must give its cutoff."""

# The objective preset each file's objective section equals (and says so in a comment).
OBJECTIVE_PRESETS = {
    "qm9_homo_noisy_nodes_paper": ("noisy_nodes", noisy_nodes.noisy_nodes_qm9_paper),
    "qm9_homo_noisy_nodes_cpu": ("noisy_nodes", noisy_nodes.noisy_nodes_qm9_cpu),
    "oc20_is2re_noisy_nodes_paper": ("noisy_nodes", noisy_nodes.noisy_nodes_oc20_paper),
    "oc20_is2re_noisy_nodes_cpu": ("noisy_nodes", noisy_nodes.noisy_nodes_emt_cpu),
    "pcqm4mv2_pretrain_paper": ("denoising", denoising.denoising_pcqm4mv2_paper),
    "pcqm4mv2_pretrain_cpu": ("denoising", denoising.denoising_cpu),
    "qm9_homo_from_pretrained_paper": ("noisy_nodes", noisy_nodes.noisy_nodes_qm9_finetune_paper),
    "qm9_homo_from_pretrained_cpu": ("noisy_nodes", noisy_nodes.noisy_nodes_qm9_finetune_paper),
    "s2ef_dens_paper": ("dens", dens.dens_oc20_2m_paper),
    "s2ef_dens_cpu": ("dens", dens.dens_cpu),
    "forcenet_s2ef_paper": ("s2ef", supervised.s2ef_forcenet_paper),
    "forcenet_s2ef_cpu": ("s2ef", supervised.s2ef_forcenet_paper),
}
OBJECTIVE_MODULES = (noisy_nodes, denoising, dens, supervised)


def _load(path: Path) -> PretrainConfig | FinetuneConfig:
    raw = read_config_file(path)
    return load_config(PretrainConfig if "denoising" in raw else FinetuneConfig, path)


def _ids(paths):
    return [p.stem for p in paths]


def test_there_is_a_config_pair_for_every_paper_experiment():
    assert {p.stem.removesuffix("_paper") for p in PAPER} == {
        "qm9_homo_noisy_nodes", "oc20_is2re_noisy_nodes", "pcqm4mv2_pretrain", "qm9_homo_from_pretrained",
        "s2ef_dens", "forcenet_s2ef"}
    assert set(_ids(FILES)) == set(OBJECTIVE_PRESETS)


@pytest.mark.parametrize("path", FILES, ids=_ids(FILES))
def test_each_config_validates_as_written_with_explicit_rebuild_cutoffs(path):
    raw = read_config_file(path)
    config = _load(path)  # no fill_cutoffs: the file must be complete
    assert isinstance(config, PretrainConfig) == ("denoising" in raw)
    for section in OBJECTIVE_SECTIONS:
        if section in raw:
            assert "cutoff_angstrom" in raw[section], f"{path.name}: {section} gives no cutoff_angstrom"
    # placeholders the user overrides with --data / --out, relative to where molden runs
    assert not config.data.path.is_absolute() and not config.run.out.is_absolute()
    assert config.data.path.suffix == ".h5"


@pytest.mark.parametrize("path", FILES, ids=_ids(FILES))
def test_each_config_names_an_existing_model_preset_of_its_size(path):
    config = _load(path)
    assert config.model.preset in PRESETS
    size = path.stem.rsplit("_", 1)[1]
    assert config.model.preset.endswith(f"_{size}"), f"{path.name} uses {config.model.preset}"
    backbone_from_preset(config.model.preset, **config.model.changes)  # the changes are fields of it


@pytest.mark.parametrize("path", FILES, ids=_ids(FILES))
def test_the_objective_section_equals_the_preset_its_comment_names(path):
    section, preset = OBJECTIVE_PRESETS[path.stem]
    config = _load(path)
    assert getattr(config, section) == preset(), f"{path.name}: {section} differs from {preset.__name__}()"
    assert f"{preset.__name__}()" in path.read_text()


@pytest.mark.parametrize("path", FILES, ids=_ids(FILES))
def test_every_preset_function_a_comment_names_exists(path):
    named = set(re.findall(r"\b(\w+_(?:paper|cpu))\(\)", path.read_text()))
    assert named, f"{path.name} names no preset"
    for name in named:
        assert any(callable(getattr(m, name, None)) for m in OBJECTIVE_MODULES) or name in PRESETS, name


@pytest.mark.parametrize("path", FILES, ids=_ids(FILES))
def test_the_graph_rebuilt_under_noise_has_the_model_radius(path):
    config = _load(path)
    cutoff = backbone_from_preset(config.model.preset, **config.model.changes).cutoff_angstrom
    for section in OBJECTIVE_SECTIONS:
        objective = getattr(config, section, None)
        if objective is not None:
            assert objective.cutoff_angstrom == pytest.approx(cutoff), f"{path.name}: {section}"


@pytest.mark.parametrize("paper", PAPER, ids=_ids(PAPER))
def test_each_paper_config_has_a_cpu_twin_of_the_same_recipe(paper):
    twin = paper.with_name(paper.name.replace("_paper.yaml", "_cpu.yaml"))
    assert twin.is_file(), f"{paper.name} has no {twin.name}"
    big, small = _load(paper), _load(twin)
    assert type(big) is type(small)
    assert small.run.device == "cpu" and big.run.device != "cpu"
    assert small.run.steps < big.run.steps
    if isinstance(big, FinetuneConfig):
        assert (small.task, small.targets, small.model.conservative_forces) == (big.task, big.targets, big.model.conservative_forces)
        assert (small.noisy_nodes is None, small.dens is None, small.init is None) == (big.noisy_nodes is None, big.dens is None, big.init is None)
        if big.noisy_nodes is not None:
            assert small.noisy_nodes.node_target == big.noisy_nodes.node_target
        if big.dens is None and big.noisy_nodes is None:
            assert small.s2ef == big.s2ef
    assert small.optim.optimizer == big.optim.optimizer
    # The same schedule, or the paper's first steps of it (ForceNet's halvings start at 250K).
    from molden.train.optim import lr_factor

    assert small.optim.schedule == big.optim.schedule or all(
        lr_factor(s, small.run.steps, small.optim) == lr_factor(s, big.run.steps, big.optim) for s in range(small.run.steps))


def test_every_cpu_config_has_a_paper_twin():
    for cpu in CONFIGS.glob("*_cpu.yaml"):
        assert cpu.with_name(cpu.name.replace("_cpu.yaml", "_paper.yaml")).is_file(), cpu.name


@pytest.mark.parametrize("size", ["paper", "cpu"])
def test_fine_tuning_starts_from_its_pretraining_run_with_the_same_backbone(size):
    pretrain = _load(CONFIGS / f"pcqm4mv2_pretrain_{size}.yaml")
    finetune = _load(CONFIGS / f"qm9_homo_from_pretrained_{size}.yaml")
    assert finetune.init == pretrain.run.out / "best.pt"
    assert (finetune.model.preset, finetune.model.changes) == (pretrain.model.preset, pretrain.model.changes)
    assert finetune.data.path == pretrain.data.path or size == "paper"


def test_the_readme_gives_every_config_and_its_command():
    readme = (CONFIGS / "README.md").read_text()
    for path in FILES:
        command = "pretrain" if "denoising" in read_config_file(path) else "finetune"
        assert f"molden {command} --config examples/configs/{path.name}" in readme, path.name


def test_the_qm9_cpu_config_trains_through_the_command_line(qm9_cache, tmp_path):
    app = typer.Typer()
    app.command()(train_cli.finetune)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["--config", str(CONFIGS / "qm9_homo_noisy_nodes_cpu.yaml"), "--steps", "2",
                                      "--data", str(qm9_cache), "--out", str(out), "--log-every", "1"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["run"]["steps"] == 2 and saved["data"]["path"] == str(qm9_cache)  # the command line wins
    assert saved["noisy_nodes"]["sigma_angstrom"] == 0.02 and saved["data"]["max_atoms"] == 256  # the file's values
    assert (out / "best.pt").is_file()


def _check_cpu():
    spec = importlib.util.spec_from_file_location("check_cpu", CONFIGS / "check_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_runs(folder: Path, seed: int, val: float, test: float) -> Path:
    """A reproduce_cpu.sh folder with one finished run and one evaluation."""
    run = folder / "qm9_homo_noisy_nodes"
    (folder / "eval").mkdir(parents=True)
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"run": {"seed": seed}}))
    (run / "summary.json").write_text(json.dumps({"best_metric": "mae_homo_meV", "best_value": val}))
    (folder / "eval" / "qm9_homo_noisy_nodes.test.json").write_text(json.dumps(
        {"split": "test", "metrics": {"mae_homo_meV": test, "targets_mse": 0.3, "loss": 0.3}}))
    return folder


def test_check_cpu_records_seeds_and_flags_a_metric_outside_their_range(tmp_path, capsys):
    """The expected metrics are the recorded seeds' range ± the tolerance; a run inside passes,
    one outside (either way) fails with exit 1 and names the metric; losses are not pinned."""
    check = _check_cpu()
    expected = tmp_path / "expected.json"
    s0, s1 = _fake_runs(tmp_path / "s0", 0, 100.0, 110.0), _fake_runs(tmp_path / "s1", 1, 104.0, 100.0)
    assert check.main([str(s0), str(s1), "--record", "--expected", str(expected)]) == 0
    recorded = json.loads(expected.read_text())["metrics"]
    assert recorded == {"qm9_homo_noisy_nodes/val/mae_homo_meV": {"0": 100.0, "1": 104.0},
                        "qm9_homo_noisy_nodes/test/mae_homo_meV": {"0": 110.0, "1": 100.0}}
    capsys.readouterr()
    # 10 %: test in [90, 121], val in [90, 114.4].
    assert check.main([str(_fake_runs(tmp_path / "in", 2, 114.0, 91.0)), "--expected", str(expected)]) == 0
    assert "2 of 2 metrics in range" in capsys.readouterr().out
    assert check.main([str(_fake_runs(tmp_path / "out", 3, 115.0, 89.0)), "--expected", str(expected)]) == 1
    out = capsys.readouterr().out
    assert "0 of 2 metrics in range" in out and "above" in out and "below" in out
    assert check.main([str(_fake_runs(tmp_path / "tight", 4, 114.0, 91.0)), "--expected", str(expected),
                       "--tolerance", "0"]) == 1
    (tmp_path / "partial" / "eval").mkdir(parents=True)
    assert check.main([str(tmp_path / "partial"), "--expected", str(expected)]) == 1
    assert "missing" in capsys.readouterr().out


def test_check_cpu_rerecords_one_run_and_keeps_the_others(tmp_path, capsys):
    """--only RUN replaces that run's metrics (both seeds) and says where and when; every other
    run's metrics and the file's original provenance stay as they were."""
    check = _check_cpu()
    expected = tmp_path / "expected.json"
    s0, s1 = _fake_runs(tmp_path / "s0", 0, 100.0, 110.0), _fake_runs(tmp_path / "s1", 1, 104.0, 100.0)
    assert check.main([str(s0), str(s1), "--record", "--expected", str(expected)]) == 0
    before = json.loads(expected.read_text())
    before["metrics"]["other_twin/val/forces_mae_mev_per_angstrom"] = {"0": 20.0, "1": 21.0}
    expected.write_text(json.dumps(before))
    again0, again1 = _fake_runs(tmp_path / "a0", 0, 90.0, 95.0), _fake_runs(tmp_path / "a1", 1, 92.0, 97.0)
    assert check.main([str(again0), str(again1), "--record", "--only", "qm9_homo_noisy_nodes",
                       "--expected", str(expected)]) == 0
    after = json.loads(expected.read_text())
    assert after["metrics"] == {"other_twin/val/forces_mae_mev_per_angstrom": {"0": 20.0, "1": 21.0},
                                "qm9_homo_noisy_nodes/test/mae_homo_meV": {"0": 95.0, "1": 97.0},
                                "qm9_homo_noisy_nodes/val/mae_homo_meV": {"0": 90.0, "1": 92.0}}
    assert after["recorded"] == before["recorded"] and after["machine"] == before["machine"]
    assert set(after["rerecorded"]) == {"qm9_homo_noisy_nodes"} and "machine" in after["rerecorded"]["qm9_homo_noisy_nodes"]
    capsys.readouterr()
    with pytest.raises(SystemExit, match="no metric of run 'forcenet_s2ef'"):
        check.main([str(again0), "--record", "--only", "forcenet_s2ef", "--expected", str(expected)])
    assert json.loads(expected.read_text()) == after  # nothing written
    # Neither fewer seeds nor fewer metrics than were pinned before.
    with pytest.raises(SystemExit, match=r"recorded with seeds \['0', '1'\], these folders are seeds \['0'\]"):
        check.main([str(again0), "--record", "--only", "qm9_homo_noisy_nodes", "--expected", str(expected)])
    for folder in (again0, again1):
        (folder / "eval" / "qm9_homo_noisy_nodes.test.json").unlink()
    with pytest.raises(SystemExit, match=r"1 metrics of run 'qm9_homo_noisy_nodes' recorded before are not in every folder"):
        check.main([str(again0), str(again1), "--record", "--only", "qm9_homo_noisy_nodes", "--expected", str(expected)])
    assert json.loads(expected.read_text()) == after
    assert check.main([str(again0), "--record", "--only", "x", "--expected", str(tmp_path / "none.json")]) == 2
    assert check.main([str(again0), "--only", "x", "--expected", str(expected)]) == 2
    no_metrics = tmp_path / "no_metrics.json"
    no_metrics.write_text('{"what": 1}')
    assert check.main([str(again0), "--record", "--only", "x", "--expected", str(no_metrics)]) == 2
    assert no_metrics.read_text() == '{"what": 1}'
    err = capsys.readouterr().err
    assert "--only goes with --record" in err and f'{no_metrics}: no "metrics" to update' in err


def test_check_cpu_refuses_bad_folders_in_one_line(tmp_path, capsys):
    check = _check_cpu()
    assert check.main([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nowhere'}: no such run folder"
    assert check.main([str(tmp_path), "--expected", str(tmp_path / "none.json")]) == 2
    assert "no such file of expected metrics" in capsys.readouterr().err
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "run.test.json").write_text('{"split": "te')  # cut short
    with pytest.raises(SystemExit, match=r"run\.test\.json: not a readable JSON file"):
        check.main([str(tmp_path), "--expected", str(CONFIGS / "expected_cpu.json")])
    (tmp_path / "eval" / "run.test.json").write_text('{"x": 1}')
    with pytest.raises(SystemExit, match=r"not a `molden evaluate --out` file"):
        check.main([str(tmp_path), "--expected", str(CONFIGS / "expected_cpu.json")])
    bad_expected = tmp_path / "expected.json"
    bad_expected.write_text("{}")
    assert check.main([str(tmp_path), "--expected", str(bad_expected)]) == 2
    assert 'no "metrics"' in capsys.readouterr().err
    # --record never replaces the expected metrics unless told to
    assert check.main([str(tmp_path), "--record", "--expected", str(bad_expected)]) == 2
    assert "exists: pass --overwrite" in capsys.readouterr().err and bad_expected.read_text() == "{}"


def test_the_expected_cpu_metrics_cover_every_cpu_twin():
    """expected_cpu.json pins a validation metric of every run reproduce_cpu.sh trains and a test
    metric of every fine-tuning, each with at least two seeds."""
    expected = json.loads((CONFIGS / "expected_cpu.json").read_text())
    script = (CONFIGS / "reproduce_cpu.sh").read_text()
    assert subprocess.run(["bash", "-n", str(CONFIGS / "reproduce_cpu.sh")]).returncode == 0
    runs = set(re.findall(r"^train (\w+)\s+\w+ (\w+)\.yaml", script, flags=re.M))
    assert {config for _, config in runs} == {p.stem for p in FILES if p.stem.endswith("_cpu")}
    keys = expected["metrics"]
    for name, _ in runs:
        assert any(k.startswith(f"{name}/val/") for k in keys), name
        if name != "pcqm4mv2_pretrain":
            assert any(k.startswith(f"{name}/test") for k in keys), name
    assert all(len(seeds) >= 2 for seeds in keys.values())


def test_reproduce_cpu_keeps_finished_runs_resumes_interrupted_ones_and_restarts_unstarted_ones(tmp_path):
    """reproduce_cpu.sh's rerun after a stop (the molden commands echoed, not run): a run with
    a finished summary is kept, one with last.pt resumed (summary.json too, when a stop wrote
    it), one stopped before its first checkpoint
    started over (molden refuses its folder otherwise), and the pre-training the fine-tuning
    starts from is the one in the same run folder."""
    runs = tmp_path / "runs"
    finished, interrupted = json.dumps({"stopped": "completed"}, indent=2), json.dumps({"stopped": "interrupted"}, indent=2)
    for name, files in (("qm9_homo_noisy_nodes", {"summary.json": finished, "last.pt": "{}"}),
                        ("pcqm4mv2_pretrain", {"last.pt": "{}"}), ("qm9_homo_from_pretrained", {"config.json": "{}"}),
                        ("forcenet_s2ef", {"summary.json": interrupted, "last.pt": "{}"})):
        (runs / name).mkdir(parents=True)
        for file, text in files.items():
            (runs / name / file).write_text(text)
    result = subprocess.run(["bash", str(CONFIGS / "reproduce_cpu.sh"), str(tmp_path / "data"), str(runs), "3"],
                            capture_output=True, text=True, env={**os.environ, "MOLDEN": "echo molden"}, timeout=120)
    lines = result.stdout.splitlines()

    def command(name: str) -> str:
        (found,) = [line for line in lines if f"--out {runs / name} " in line + " "]
        assert "--seed 3" in found
        return found

    assert "qm9_homo_noisy_nodes: finished before, kept" in lines
    assert "--resume" in command("pcqm4mv2_pretrain") and "--overwrite" not in command("pcqm4mv2_pretrain")
    assert "--overwrite" in command("qm9_homo_from_pretrained")
    assert f"--init {runs / 'pcqm4mv2_pretrain' / 'best.pt'}" in command("qm9_homo_from_pretrained")
    assert "--resume" in command("forcenet_s2ef")
    for fresh in ("oc20_is2re_noisy_nodes", "s2ef_dens"):
        assert "--resume" not in command(fresh) and "--overwrite" not in command(fresh)
    assert sum("molden preprocess" in line for line in lines) == 3
    assert sum("molden evaluate" in line for line in lines) == 2 + 3 * 4
    # Nothing was trained, so the check finds every expected metric missing and fails the script.
    assert result.returncode == 1 and "missing" in result.stdout


def test_the_forcenet_twin_runs_the_papers_first_iterations_at_a_constant_rate():
    """ForceNet's halvings start at 250K: the CPU twin's 2,000 steps are the paper's first
    ones, all at 5e-4, and the paper file ends at 5e-4 / 2^5."""
    from molden.train.optim import lr_factor

    twin, paper = _load(CONFIGS / "forcenet_s2ef_cpu.yaml"), _load(CONFIGS / "forcenet_s2ef_paper.yaml")
    assert {lr_factor(s, twin.run.steps, twin.optim) for s in range(twin.run.steps)} == {1.0}
    assert {lr_factor(s, paper.run.steps, paper.optim) for s in range(twin.run.steps)} == {1.0}
    assert lr_factor(paper.run.steps - 1, paper.run.steps, paper.optim) == 0.5 ** 5
