"""The training loop and its commands (issue 14): schedule and EMA rules, checkpoints refused
when damaged, config precedence, every command end to end on small real caches, and bad
options as one line."""

from __future__ import annotations

import json
import math

import pytest
import torch
import typer
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from molden.cli import train as train_cli
from molden.errors import MoldenInputError
from molden.models.checkpoint import load_model, read_checkpoint, write_checkpoint
from molden.train.config import OptimConfig
from molden.train.optim import EMA, lr_factor

runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(train_cli.pretrain)
    app.command()(train_cli.finetune)
    app.command()(train_cli.evaluate)
    return app


def _invoke(*args: str):
    return runner.invoke(_app(), [str(a) for a in args])


FAST = ("--steps", "6", "--log-every", "2", "--eval-every", "3", "--checkpoint-every", "3", "--warmup-steps", "2",
        "--max-graphs", "8", "--model", "gns_oc20_cpu", "--change", "latent_dim=16", "--change", "mlp_hidden_dim=16",
        "--change", "cutoff_angstrom=4.0")


# ----------------------------------------------------------------------------- rules
def test_warmup_is_linear_and_cosine_decays_to_the_final_fraction():
    config = OptimConfig(warmup_steps=10, final_lr_fraction=0.1)
    assert [lr_factor(s, 110, config) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, 110, config) == pytest.approx(1.0)
    assert lr_factor(60, 110, config) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, 110, config) == pytest.approx(0.1)
    assert lr_factor(50, 110, OptimConfig(warmup_steps=10, schedule="constant")) == 1.0


def test_warmup_starts_from_the_papers_start_rate():
    """Noisy Nodes Table 10: warm-up from 3e-7 to 1e-4, i.e. from 3e-3 of the peak."""
    config = OptimConfig(warmup_steps=10, warmup_start_fraction=0.003)
    assert [lr_factor(s, 110, config) for s in (0, 4, 9, 10)] == pytest.approx(
        [0.003 + 0.997 * 0.1, 0.003 + 0.997 * 0.5, 1.0, 1.0])


def test_a_cosine_cycle_longer_than_the_run_stops_part_way_down():
    """Pre-training via Denoising Table 3: a 5e5-step cycle (warm-up included) in a 3e5-step run
    ends at 0.5 (1 + cos(π · 2.9e5 / 4.9e5)) ≈ 36 % of the peak (floor 1e-3)."""
    config = OptimConfig(warmup_steps=10_000, final_lr_fraction=1e-3, cosine_cycle_steps=500_000)
    expected = 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * 290_000 / 490_000))
    assert lr_factor(300_000, 300_000, config) == pytest.approx(expected)
    assert 0.35 < expected < 0.37
    assert lr_factor(500_000, 300_000, config) == pytest.approx(1e-3)  # past the cycle: its floor
    assert lr_factor(600_000, 300_000, config) == pytest.approx(1e-3)
    # A cycle equal to the run is the default.
    default = OptimConfig(warmup_steps=10, final_lr_fraction=0.1)
    assert lr_factor(60, 110, config.model_copy(update={"warmup_steps": 10, "final_lr_fraction": 0.1,
                                                        "cosine_cycle_steps": 110})) == lr_factor(60, 110, default)


def test_multistep_halves_at_each_milestone():
    """ForceNet App. D: constant for the first 250K iterations, then halved every 50K."""
    config = OptimConfig(warmup_steps=0, schedule="multistep", lr_milestones=[250_000, 300_000, 350_000], lr_gamma=0.5)
    assert [lr_factor(s, 500_000, config) for s in (0, 249_999, 250_000, 299_999, 300_000, 350_000, 499_999)] == \
        pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.125, 0.125])


@pytest.mark.parametrize("fields, message", [
    ({"schedule": "multistep"}, "schedule multistep needs lr_milestones"),
    ({"lr_milestones": [10]}, "lr_milestones are for schedule multistep"),
    ({"schedule": "multistep", "lr_milestones": [20, 10]}, "increasing positive steps"),
    ({"schedule": "constant", "cosine_cycle_steps": 100}, "cosine_cycle_steps is for schedule cosine"),
    ({"warmup_steps": 100, "cosine_cycle_steps": 100}, "must be longer than warmup_steps"),
    ({"warmup_start_fraction": 2}, "less than or equal to 1"),
])
def test_inconsistent_schedule_fields_are_refused(fields, message):
    with pytest.raises(ValidationError, match=message):
        OptimConfig(**fields)


def test_ema_follows_the_noisy_nodes_decay_rule():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9)
    expected = 0.0
    for t in range(30):
        with torch.no_grad():
            model.weight.fill_(float(t + 1))
        decay = min(0.9, (1 + t) / (10 + t))
        expected = decay * expected + (1 - decay) * (t + 1)
        ema.update(model)
    assert float(ema.weights()["weight"]) == pytest.approx(expected)
    assert ema.current_decay() == pytest.approx(31 / 40)  # still below the 0.9 cap after 30 updates


# ----------------------------------------------------------------------------- checkpoints
def test_a_checkpoint_round_trips_and_a_damaged_one_is_refused_in_one_line(tmp_path):
    path = write_checkpoint(tmp_path / "c.pt", {"w": torch.arange(4.0), "note": "x"})
    assert torch.equal(read_checkpoint(path)["w"], torch.arange(4.0))
    data = path.read_bytes()
    (tmp_path / "short.pt").write_bytes(data[:-10])
    with pytest.raises(MoldenInputError, match="truncated checkpoint"):
        read_checkpoint(tmp_path / "short.pt")
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    (tmp_path / "flip.pt").write_bytes(bytes(flipped))
    with pytest.raises(MoldenInputError, match="checksum mismatch"):
        read_checkpoint(tmp_path / "flip.pt")
    (tmp_path / "other.pt").write_bytes(b"PK\x03\x04 a zip")
    with pytest.raises(MoldenInputError, match="not a molden checkpoint"):
        read_checkpoint(tmp_path / "other.pt")
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def s2ef_run(s2ef_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "s2ef"
    result = _invoke("finetune", "--data", s2ef_cache, "--out", out, "--task", "s2ef", "--dens", *FAST)
    assert result.exit_code == 0, result.output
    return out


def test_finetune_writes_checkpoints_metrics_curves_and_a_summary(s2ef_run):
    for name in ("best.pt", "last.pt", "config.json", "metrics.jsonl", "metrics.csv", "learning_curves.png", "summary.json"):
        assert (s2ef_run / name).is_file(), name
    records = [json.loads(line) for line in (s2ef_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6]
    assert [r["step"] for r in records if r["split"] == "val"] == [3, 6]
    assert all("dens_noise_l2mae" in r for r in records if r["split"] == "train")
    summary = json.loads((s2ef_run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["stopped"] == "completed"
    assert summary["best_metric"] == "forces_mae_mev_per_angstrom"


def test_evaluate_reproduces_the_last_validation_of_the_run(s2ef_run, s2ef_cache):
    summary = json.loads((s2ef_run / "summary.json").read_text())
    result = _invoke("evaluate", s2ef_run / "last.pt", "--data", s2ef_cache, "--split", "val", "--max-graphs", "8",
                     "--out", s2ef_run / "eval.json")
    assert result.exit_code == 0, result.output
    metrics = json.loads((s2ef_run / "eval.json").read_text())["metrics"]
    for name, value in summary["final_validation"].items():
        assert metrics[name] == pytest.approx(value, rel=1e-5), name


def test_a_checkpoint_loads_as_a_model_for_inference(s2ef_run):
    loaded = load_model(s2ef_run / "best.pt")
    assert not loaded.model.training
    assert set(loaded.model.heads) == {"energy", "forces", "noise"}
    assert loaded.task["kind"] == "s2ef"


def test_a_truncated_checkpoint_is_refused_by_evaluate_in_one_line(s2ef_run, s2ef_cache, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes((s2ef_run / "last.pt").read_bytes()[:1000])
    result = _invoke("evaluate", broken, "--data", s2ef_cache)
    assert result.exit_code == 1
    assert "truncated checkpoint" in result.output and "Traceback" not in result.output


def test_a_config_file_is_overridden_by_the_command_line(s2ef_cache, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"task": "s2ef", "optim": {"lr": 0.0005}, "run": {"steps": 50, "seed": 7},
                                      "data": {"max_graphs": 4}}))
    out = tmp_path / "run"
    result = _invoke("finetune", "--config", config, "--data", s2ef_cache, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["optim"]["lr"] == 0.0005 and saved["run"]["seed"] == 7  # from the file
    assert saved["run"]["steps"] == 6 and saved["data"]["max_graphs"] == 8  # the command line wins


def test_none_on_the_command_line_clears_a_config_files_init_and_val_split(s2ef_cache, tmp_path):
    """A from-scratch twin of a fine-tuning config needs no edited copy of the file."""
    config = tmp_path / "ft.yaml"
    config.write_text(yaml.safe_dump({"task": "s2ef", "init": str(tmp_path / "missing.pt"),
                                      "data": {"val_split": "val"}}))
    out = tmp_path / "run"
    result = _invoke("finetune", "--config", config, "--data", s2ef_cache, "--out", out, *FAST,
                     "--init", "none", "--val-split", "none")
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["init"] is None and saved["data"]["val_split"] is None


@pytest.mark.parametrize("args, message", [
    (("--task", "qm8"), "invalid --task"),
    (("--task", "qm9", "--dens"), "DeNS (--dens) is an s2ef option"),
    (("--freeze-backbone",), "--freeze-backbone needs --init"),
    (("--steps", "0"), "invalid --steps"),
    (("--task", "s2ef", "--is2re-target", "adsorption_energy"), "--is2re-target is an is2re option (the task is s2ef)"),
    (("--task", "is2re", "--is2re-target", "gap", "--change", "cutoff_angstrom=4"), "the cache has no structures/targets, which this task trains on"),
    (("--task", "is2re", "--val-frames", "first"), "invalid --val-frames first: input should be 'all', 'initial' or 'relaxed'"),
    (("--bf16", "--device", "cpu", "--task", "s2ef"), "--bf16 needs --device cuda"),
    (("--task", "s2ef", "--model", "nope"), "unknown model preset 'nope'"),
    (("--task", "s2ef", "--change", "latent_dims=3"), "has no field(s) ['latent_dims']"),
    (("--task", "s2ef", "--resume"), "has no last.pt to resume from"),
    (("--task", "qm9", "--target", "homo", "--change", "cutoff_angstrom=4"), "targets ['homo'] are not in the data"),
    (("--task", "s2ef"), "model gns_qm9_cpu has a 5 Å cutoff but the cache's graphs stop at 4 Å"),
    (("--task", "s2ef", "--energy-scale", "energy"), "invalid --energy-scale energy: input should be 'force_rms' or 'energy_std'"),
])
def test_bad_options_give_one_line_and_exit_1(s2ef_cache, tmp_path, args, message):
    base = ["finetune", "--data", s2ef_cache, "--out", tmp_path / "run", "--steps", "2"]
    result = _invoke(*base, *args)
    assert result.exit_code == 1, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output


def test_an_existing_run_is_never_overwritten_without_overwrite(s2ef_run, s2ef_cache):
    before = (s2ef_run / "last.pt").read_bytes()
    result = _invoke("finetune", "--data", s2ef_cache, "--out", s2ef_run, "--task", "s2ef", *FAST)
    assert result.exit_code == 1 and "--resume" in result.output and "--overwrite" in result.output
    assert (s2ef_run / "last.pt").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (("--task", "s2ef"), "the cache has no forces, which --task s2ef trains on"),
    (("--task", "is2rs"), "the cache has no relaxed_positions, which --task is2rs trains on"),
    (("--noisy-nodes-target", "relaxed_positions"), "the cache has no relaxed_positions, which --noisy-nodes-target"),
    (("--change", "block_iterations"), "invalid --change 'block_iterations': write FIELD=VALUE"),
    # The bad value of a --change is named as it was written, not as a backbone field with no option.
    (("--change", "block_iterations=-1"), "invalid change block_iterations=-1 to preset 'gns_qm9_cpu': input should be greater than 0"),
    (("--change", "block_iterations=x"), "invalid change block_iterations='x' to preset"),
    (("--dtype", "float16"), "invalid --dtype float16"),
    (("--dens-ratio", "2", "--task", "s2ef"), "invalid --dens-ratio 2.0"),
    (("--max-bad-steps", "0",), "invalid --max-bad-steps 0"),
    # a name that opens a message keeps its capitals
    (("--noisy-nodes-sigma", "0.02", "--task", "is2rs"), "Noisy Nodes (--noisy-nodes-*) is for --task qm9 and is2re"),
])
def test_a_task_the_cache_cannot_train_is_refused_before_anything_is_written(qm9_cache, tmp_path, args, message):
    out = tmp_path / "run"
    result = _invoke("finetune", "--data", qm9_cache, "--out", out, "--steps", "2", *args)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
    assert not out.exists()


@pytest.mark.parametrize("missing, message", [("--out", "--out is required"), ("--data", "--data is required")])
def test_a_missing_required_option_is_named(qm9_cache, tmp_path, missing, message):
    given = {"--out": tmp_path / "run", "--data": qm9_cache}
    del given[missing]
    result = _invoke("finetune", *[str(a) for kv in given.items() for a in kv])
    assert result.exit_code == 1 and message in result.output, result.output


def test_every_option_a_training_command_fills_has_its_name_for_messages(monkeypatch):
    """A bad value of any option is reported under the option's own name (`--dens-ratio`, not
    `dens.corruption_ratio`)."""
    import inspect

    seen: dict[str, object] = {}
    monkeypatch.setattr(train_cli, "_run", lambda kind, config_file, overrides, *a, **k: seen.update(overrides))
    for command in (train_cli.pretrain, train_cli.finetune):
        kwargs = {name: p.default.default if hasattr(p.default, "default") else p.default
                  for name, p in inspect.signature(command).parameters.items()}
        if command is train_cli.finetune:  # the Noisy Nodes and DeNS sections fill their fields only when on
            kwargs.update(noisy_nodes_sigma=0.1, dens=True)
        command(**kwargs)
    options = {o for command in (train_cli.pretrain, train_cli.finetune)
               for p in inspect.signature(command).parameters.values() for o in getattr(p.default, "param_decls", ())}
    assert set(seen) <= set(train_cli.OPTION_NAMES), sorted(set(seen) - set(train_cli.OPTION_NAMES))
    flags = {name for name in train_cli.OPTION_NAMES.values()}
    named = {f"--{name.replace('_', '-')}" for command in (train_cli.pretrain, train_cli.finetune)
             for name in inspect.signature(command).parameters} | options
    assert flags <= named, sorted(flags - named)


def test_overwrite_keeps_the_old_run_when_the_new_one_is_refused(s2ef_run, s2ef_cache, tmp_path):
    copy = tmp_path / "run"
    copy.mkdir()
    from molden.train.loop import RUN_FILES

    for path in s2ef_run.iterdir():
        if path.name in RUN_FILES:  # other tests add their files (eval.json) to the shared run
            (copy / path.name).write_bytes(path.read_bytes())
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    result = _invoke("finetune", "--data", s2ef_cache, "--out", copy, "--overwrite", "--task", "s2ef", "--model", "nope")
    assert result.exit_code == 1 and "unknown model preset 'nope'" in result.output, result.output
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before


def test_s2ef_coefficients_go_to_dens_when_a_config_file_turns_it_on(s2ef_cache, tmp_path):
    config = tmp_path / "dens.yaml"
    config.write_text(yaml.safe_dump({"task": "s2ef", "dens": {"probability": 0.5}}))
    out = tmp_path / "run"
    result = _invoke("finetune", "--config", config, "--data", s2ef_cache, "--out", out, *FAST[:2], *FAST[8:],
                     "--val-split", "none", "--energy-coefficient", "7", "--force-coefficient", "50",
                     "--energy-scale", "energy_std")
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    assert (saved["dens"]["s2ef"]["energy_coefficient"], saved["dens"]["s2ef"]["force_coefficient"]) == (7.0, 50.0)
    assert saved["dens"]["s2ef"]["energy_scale"] == "energy_std"
    assert saved["s2ef"]["energy_coefficient"] == 1.0  # the plain terms, unused with DeNS, keep their defaults
    assert saved["s2ef"]["energy_scale"] == "force_rms"


def test_is2re_noisy_nodes_defaults_are_the_same_from_a_config_file(emt_cache, tmp_path):
    config = tmp_path / "is2re.yaml"
    config.write_text(yaml.safe_dump({"task": "is2re", "noisy_nodes": {"sigma_angstrom": 0.3, "cutoff_angstrom": 6.0}}))
    from molden.train.config import FinetuneConfig, load_config

    loaded = load_config(FinetuneConfig, config, {"data": {"path": str(emt_cache)}, "run": {"out": str(tmp_path / "r")}})
    assert (loaded.noisy_nodes.node_target, loaded.noisy_nodes.node_loss_weight) == ("relaxed_positions", 1.0)


def test_pretraining_keeps_its_preset_when_only_changes_are_given(tmp_path):
    from molden.train.config import PRETRAIN_PRESET, PretrainConfig

    config = PretrainConfig.model_validate({"data": {"path": "x.h5"}, "run": {"out": str(tmp_path)},
                                            "model": {"changes": {"block_iterations": 2}}})
    assert config.model.preset == PRETRAIN_PRESET == "gns_tat_cpu"
    assert config.model.changes == {"block_iterations": 2}


def test_resume_refuses_an_option_the_saved_state_would_override(s2ef_cache, tmp_path):
    out = tmp_path / "run"
    common = ("finetune", "--data", s2ef_cache, "--out", out, "--task", "s2ef", *FAST)
    assert _invoke(*common).exit_code == 0
    last = (out / "last.pt").read_bytes()
    changed = _invoke(*common, "--resume", "--steps", "8", "--lr", "0.05")
    assert changed.exit_code == 1 and "optim.lr is 0.001 there and 0.05 now" in changed.output, changed.output
    finished = _invoke(*common, "--resume")
    assert finished.exit_code == 1 and "has finished (6 of 6 steps)" in finished.output, finished.output
    assert (out / "last.pt").read_bytes() == last
    longer = _invoke(*common, "--resume", "--steps", "8", "--time-limit", "30", "--log-every", "1")
    assert longer.exit_code == 0, longer.output  # how long and how often may change
    assert read_checkpoint(out / "last.pt")["progress"]["step"] == 8


def test_evaluate_refuses_an_out_it_cannot_or_must_not_write_before_evaluating(s2ef_run, s2ef_cache, tmp_path):
    for out, message in ((tmp_path / "no" / "such" / "m.json", "no folder"), (s2ef_run / "best.pt", "an input"),
                         (s2ef_run / "last.pt", "name a .json file"), (s2ef_run / "summary.json", "name a .json file")):
        result = _invoke("evaluate", s2ef_run / "best.pt", "--data", s2ef_cache, "--out", out, "--overwrite")
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
    assert load_model(s2ef_run / "best.pt")


def test_the_demo_continues_a_stopped_stage_instead_of_reusing_it(qm9_cache, tmp_path, keep_torch_threads):
    from molden.train.config import DataConfig, FinetuneConfig, RunConfig
    from molden.train.demo import run_or_reuse
    from molden.train.loop import train

    run = RunConfig(out=tmp_path / "run", steps=4, time_limit_minutes=1e-9, threads=1)
    config = FinetuneConfig(data=DataConfig(path=qm9_cache, max_graphs=8), run=run, optim={"warmup_steps": 1})
    first = train(config)
    assert (first.stopped, first.steps) == ("time limit", 1)  # every stop writes summary.json
    summary, reused = run_or_reuse(config)
    assert not reused and (summary.stopped, summary.steps) == ("time limit", 2)  # continued from last.pt


def test_a_resume_logs_the_same_records_as_the_run_without_the_stop(qm9_cache, tmp_path, keep_torch_threads):
    """The training terms since the last record travel in last.pt: a stop between two records
    (here at step 1 of a 3-step window) does not shorten the next one."""
    from molden.train.config import DataConfig, FinetuneConfig, RunConfig
    from molden.train.loop import train
    from molden.train.metrics_log import read_metrics

    def config(out, **run):
        return FinetuneConfig(data=DataConfig(path=qm9_cache, max_graphs=8), optim={"warmup_steps": 1},
                              run=RunConfig(out=tmp_path / out, **{"steps": 6, "log_every": 3, "eval_every": 6, "threads": 1, **run}))

    train(config("whole"))
    assert train(config("stopped", time_limit_minutes=1e-9)).steps == 1
    train(config("stopped"), resume=True)
    records = {out: [(r["step"], r["loss"]) for r in read_metrics(tmp_path / out) if r["split"] == "train"]
               for out in ("whole", "stopped")}
    assert [step for step, _ in records["stopped"]] == [step for step, _ in records["whole"]] == [3, 6]
    # flat lists: pytest 9.2's approx refuses nested (step, loss) pairs
    assert [loss for _, loss in records["stopped"]] == pytest.approx([loss for _, loss in records["whole"]], rel=1e-6)


def test_resume_refuses_a_run_that_stopped_early_and_says_when_the_schedule_changes(s2ef_cache, tmp_path):
    out = tmp_path / "run"
    common = ("finetune", "--data", s2ef_cache, "--out", out, "--task", "s2ef", *FAST)
    assert _invoke(*common, "--early-stopping", "5").exit_code == 0
    saved = read_checkpoint(out / "last.pt")

    def stopped_at(step: int, validations_since_best: int) -> None:
        write_checkpoint(out / "last.pt", {**saved, "progress": {**saved["progress"], "step": step,
                                                                 "validations_since_best": validations_since_best}})

    stopped_at(3, 5)  # as early stopping leaves a run with patience 5
    early = _invoke(*common, "--resume", "--early-stopping", "5")
    assert early.exit_code == 1 and "stopped early at step 3" in early.output, early.output
    more_patience = _invoke(*common, "--resume", "--early-stopping", "50", "--steps", "4")
    assert more_patience.exit_code == 0, more_patience.output
    stopped_at(3, 1)
    longer = _invoke(*common, "--resume", "--early-stopping", "5", "--steps", "8")
    assert longer.exit_code == 0 and "--steps 6 → 8: from step 3 the learning rate follows the 8-step schedule" in longer.output


def test_adding_early_stopping_on_resume_is_not_called_an_early_stop(s2ef_cache, tmp_path):
    out = tmp_path / "run"
    common = ("finetune", "--data", s2ef_cache, "--out", out, "--task", "s2ef", *FAST)
    assert _invoke(*common).exit_code == 0  # no early stopping: its counter still counts
    saved = read_checkpoint(out / "last.pt")
    write_checkpoint(out / "last.pt", {**saved, "progress": {**saved["progress"], "step": 3, "validations_since_best": 2}})
    result = _invoke(*common, "--resume", "--early-stopping", "2")
    assert result.exit_code == 0, result.output


def test_a_fine_tuning_resumes_when_its_pre_training_moved_or_is_named_otherwise(qm9_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = ("--data", qm9_cache, "--max-graphs", "8", "--model", "gns_qm9_cpu", "--change", "latent_dim=16",
           "--change", "mlp_hidden_dim=16", "--warmup-steps", "1", "--val-split", "none")
    assert _invoke("pretrain", *run, "--out", "pre", "--steps", "2").exit_code == 0
    fine = ("finetune", *run, "--out", "ft", "--steps", "6", "--checkpoint-every", "2")
    first = _invoke(*fine, "--init", "pre/best.pt", "--time-limit", "1e-9")
    assert first.exit_code == 0 and read_checkpoint(tmp_path / "ft" / "last.pt")["progress"]["step"] == 1, first.output
    absolute = _invoke(*fine, "--init", tmp_path / "pre" / "best.pt", "--resume", "--time-limit", "1e-9")
    assert absolute.exit_code == 0, absolute.output
    (tmp_path / "pre").rename(tmp_path / "moved")
    result = _invoke(*fine, "--resume", "--time-limit", "0")  # the pre-trained weights are in last.pt: init is not read again
    assert result.exit_code == 0, result.output
    assert read_checkpoint(tmp_path / "ft" / "last.pt")["progress"]["step"] == 6


def test_an_older_run_resumed_from_a_config_file_keeps_its_validation_frames(emt_cache, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "is2re.yaml"
    config.write_text(yaml.safe_dump({"task": "is2re", "data": {"val_split": "train", "max_graphs": 4},
                                      "model": {"preset": "painn_cpu"}, "run": {"eval_every": 2, "checkpoint_every": 2}}))
    common = ("finetune", "--config", config, "--data", emt_cache, "--out", out)
    assert _invoke(*common, "--steps", "2").exit_code == 0
    payload = read_checkpoint(out / "last.pt")
    saved = json.loads(payload["config"])
    del saved["data"]["val_frames"]  # as molden saved it before the field existed: it validated on every frame
    write_checkpoint(out / "last.pt", {**payload, "config": json.dumps(saved)})
    refused = _invoke(*common, "--steps", "4", "--resume")
    assert refused.exit_code == 1 and "data.val_frames is 'all' there and 'initial' now" in refused.output, refused.output
    assert _invoke(*common, "--steps", "4", "--resume", "--val-frames", "all").exit_code == 0


@pytest.mark.parametrize("section, field, value", [
    ("optim", "cosine_cycle_steps", 500_000), ("optim", "warmup_start_fraction", 0.1),
    ("optim", "lr_gamma", 0.25), ("s2ef", "energy_scale", "energy_std"), ("dens.s2ef", "energy_scale", "energy_std"),
    ("model", "vector_decoder", "nodes"), ("model", "graph_decoder", "two_mlps"),
    ("s2ef", "energy_reference", "reference_energy"), ("dens.s2ef", "energy_reference", "reference_energy"),
])
def test_a_run_saved_before_a_field_existed_refuses_a_new_value_of_it(tmp_path, section, field, value):
    """Fields added since (`FIELDS_ADDED`) compare as they behaved before: a run saved without
    them resumes unchanged and refuses, in one line, a value that would change how it trains."""
    from molden.errors import MoldenConfigError
    from molden.train.config import FinetuneConfig
    from molden.train.loop import _check_resume_config, _lookup

    now = FinetuneConfig(data={"path": "x.h5"}, run={"out": tmp_path}, task="s2ef", dens={}).model_dump(mode="json")
    saved = json.loads(json.dumps(now))
    del _lookup(saved, section)[field]  # as an older molden wrote it
    _check_resume_config(saved, now, tmp_path / "last.pt")  # the old behaviour: accepted
    _lookup(now, section)[field] = value
    with pytest.raises(MoldenConfigError, match=f"{section}.{field}"):
        _check_resume_config(saved, now, tmp_path / "last.pt")


def test_noisy_nodes_decodes_the_noise_from_each_atom_with_vector_decoder_nodes(qm9_cache, tmp_path):
    """`--vector-decoder nodes`: Noisy Nodes §3.2's node decoder (an MLP of each atom's latents)
    in place of GNS's edge readout; it trains, and its checkpoint loads with that head."""
    out = tmp_path / "run"
    result = _invoke("finetune", "--data", qm9_cache, "--out", out, "--noisy-nodes-sigma", "0.02", "--vector-decoder", "nodes",
                     "--change", "latent_dim=16", "--change", "mlp_hidden_dim=16", "--steps", "3", "--max-graphs", "8",
                     "--val-split", "none", "--threads", "1")
    assert result.exit_code == 0, result.output
    spec = json.loads(read_checkpoint(out / "last.pt")["model_spec"])
    assert spec["heads"]["noise"]["kind"] == "node_vector" and spec["family"] == "gns"
    assert type(load_model(out / "last.pt").model.heads["noise"]).__name__ == "NodeVectorHead"
    refused = _invoke("finetune", "--data", qm9_cache, "--out", tmp_path / "painn", "--model", "painn_cpu",
                      "--noisy-nodes-sigma", "0.02", "--vector-decoder", "edges")
    assert refused.exit_code == 1 and "vector_decoder 'edges' needs a GNS backbone" in refused.output, refused.output
    assert not (tmp_path / "painn").exists()


def test_a_config_file_field_without_an_option_is_named_as_in_the_file(tmp_path):
    from molden.cli.console import invalid_option_message
    from molden.train.config import FinetuneConfig

    with pytest.raises(ValidationError) as error:
        FinetuneConfig(data={"path": "x.h5"}, run={"out": tmp_path}, optim={"schedule": "multistep", "lr_milestones": [10, "x"]})
    assert invalid_option_message(error.value, train_cli.OPTION_NAMES).startswith("invalid optim.lr_milestones[1] x: ")


def test_graph_decoder_two_mlps_trains_the_papers_graph_decoder_and_loads(qm9_cache, tmp_path):
    """`--graph-decoder two_mlps`: Noisy Nodes §3.2's MLP of the processor's latents plus one of
    the encoder's; it trains, its checkpoint evaluates, and a backbone without encoder latents is
    refused in one line before anything is written."""
    out = tmp_path / "run"
    result = _invoke("finetune", "--data", qm9_cache, "--out", out, "--graph-decoder", "two_mlps",
                     "--change", "latent_dim=16", "--change", "mlp_hidden_dim=32", "--steps", "3", "--max-graphs", "8",
                     "--val-split", "none", "--threads", "1")
    assert result.exit_code == 0, result.output
    spec = json.loads(read_checkpoint(out / "last.pt")["model_spec"])
    assert spec["heads"]["targets"]["encoder_mlp"] and spec["heads"]["targets"]["hidden_dim"] == 32
    head = load_model(out / "last.pt").model.heads["targets"]
    assert head.encoder_mlp is not None and head.mlp[0].out_features == 32
    evaluated = _invoke("evaluate", out / "last.pt", "--data", qm9_cache, "--split", "test", "--out", tmp_path / "test.json")
    assert evaluated.exit_code == 0, evaluated.output
    refused = _invoke("finetune", "--data", qm9_cache, "--out", tmp_path / "painn", "--model", "painn_cpu",
                      "--graph-decoder", "two_mlps")
    assert refused.exit_code == 1 and "graph_decoder 'two_mlps' needs a GNS backbone" in refused.output, refused.output
    assert len(refused.output.strip().splitlines()) == 1 and not (tmp_path / "painn").exists()


def test_a_sections_own_check_is_reported_under_the_section_not_an_option(tmp_path):
    from molden.cli.console import invalid_option_message
    from molden.train.config import FinetuneConfig

    with pytest.raises(ValidationError) as error:
        FinetuneConfig(data={"path": "x.h5"}, run={"out": tmp_path}, optim={"warmup_steps": 600_000, "cosine_cycle_steps": 500_000})
    assert invalid_option_message(error.value, train_cli.OPTION_NAMES) == (
        "invalid optim options: cosine_cycle_steps 500000 must be longer than warmup_steps 600000")


def test_a_missing_cache_is_one_line(tmp_path):
    result = _invoke("finetune", "--data", tmp_path / "none.h5", "--out", tmp_path / "r", "--task", "s2ef")
    assert result.exit_code == 1 and "none.h5" in result.output and "Traceback" not in result.output


def test_evaluation_metrics_are_their_definitions_over_the_split_whatever_the_batching(s2ef_run, s2ef_cache):
    from molden.train.evaluate import evaluate_checkpoint

    one = evaluate_checkpoint(s2ef_run / "best.pt", s2ef_cache, split="val", max_graphs=1)["metrics"]
    all_at_once = evaluate_checkpoint(s2ef_run / "best.pt", s2ef_cache, split="val", max_graphs=1000)["metrics"]
    for name in ("forces_mae_mev_per_angstrom", "energy_mae_mev", "forces_l2mae"):
        assert one[name] == pytest.approx(all_at_once[name], rel=1e-5), name


# ----------------------------------------------------------------------------- pre-training
@pytest.fixture(scope="module")
def pretrain_run(s2ef_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "pre"
    result = _invoke("pretrain", "--data", s2ef_cache, "--out", out, "--frames", "relaxed", *FAST)
    assert result.exit_code == 0, result.output
    return out


def test_pretrain_denoises_with_masked_atom_types_by_default(pretrain_run):
    records = [json.loads(line) for line in (pretrain_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert {"position", "atom_type", "atom_type_accuracy"} <= set(train[-1])
    saved = json.loads((pretrain_run / "config.json").read_text())
    assert saved["denoising"]["mask_probability"] == 0.75 and saved["denoising"]["cutoff_angstrom"] == 4.0
    assert saved["data"]["frames"] == "relaxed"


def test_finetune_starts_from_the_pretrained_backbone_and_refuses_another_one(pretrain_run, s2ef_cache, tmp_path):
    from molden.train.loop import initialise_backbone
    from molden.models.spec import ModelSpec, build_model

    payload = read_checkpoint(pretrain_run / "best.pt")
    spec = ModelSpec.model_validate_json(payload["model_spec"])
    model = build_model(spec.model_copy(update={"heads": {}}))
    initialise_backbone(model, spec, pretrain_run / "best.pt")
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, payload["ema"][f"backbone.{name}"]), name  # the EMA weights, as validated
    result = _invoke("finetune", "--data", s2ef_cache, "--out", tmp_path / "ft", "--task", "s2ef", "--init",
                     pretrain_run / "best.pt", "--freeze-backbone", *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert 0 < summary["trainable_parameters"] < summary["parameters"]  # heads only
    other = _invoke("finetune", "--data", s2ef_cache, "--out", tmp_path / "ft2", "--task", "s2ef", "--init",
                    pretrain_run / "best.pt", *FAST[:-2], "--change", "cutoff_angstrom=3.5")
    assert other.exit_code == 1 and "backbone differs from this run's in ['cutoff_angstrom']" in other.output


# ----------------------------------------------------------------------------- robustness
class _SometimesNaN:
    """An objective whose loss is NaN when asked to be."""

    needs_all_blocks = False

    def __init__(self, poison: bool):
        self.poison = poison

    def corrupt(self, batch, generator):
        return batch, {}

    def loss(self, predictions, batch, targets):
        loss = predictions["energy"].sum() * 0 + (float("nan") if self.poison else 1.0) + predictions["energy"].square().mean()
        return {"loss": loss}


def test_a_non_finite_loss_skips_the_step_and_leaves_the_weights_alone(s2ef_cache):
    from molden.data import H5Dataset, collate
    from molden.models import GraphScalarHead, Model, build_backbone, preset
    from molden.train.loop import take_step

    batch = collate([H5Dataset(s2ef_cache, "train")[i] for i in range(4)])
    backbone = build_backbone(preset("painn_cpu"))
    model = Model(backbone, {"energy": GraphScalarHead(backbone.scalar_dim)})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    terms, ok = take_step(model, _SometimesNaN(True), [batch], [torch.Generator()], optimizer, device=torch.device("cpu"),
                          grad_clip_norm=1.0)
    assert not ok and math.isnan(float(terms["loss"]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    _, ok = take_step(model, _SometimesNaN(False), [batch], [torch.Generator()], optimizer, device=torch.device("cpu"),
                      grad_clip_norm=1.0)
    assert ok and any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dataloader_workers_give_the_same_run_as_reading_in_process(s2ef_cache, tmp_path):
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        result = _invoke("finetune", "--data", s2ef_cache, "--out", out, "--task", "s2ef", "--workers", workers, *FAST)
        assert result.exit_code == 0, result.output
        runs[workers] = read_checkpoint(out / "last.pt")["model"]
    for name, value in runs[0].items():
        assert torch.equal(value, runs[2][name]), name


def test_a_checkpoint_resumes_under_another_number_of_processes_from_the_next_epoch(s2ef_cache, tmp_path):
    out = tmp_path / "run"
    first = _invoke("finetune", "--data", s2ef_cache, "--out", out, "--task", "s2ef", "--accumulate", "2", *FAST)
    assert first.exit_code == 0, first.output
    more = _invoke("finetune", "--data", s2ef_cache, "--out", out, "--resume", "--steps", "9", "--accumulate", "1")
    assert more.exit_code == 0, more.output
    assert "resuming 2 processes × accumulation on 1" in more.output
    progress = read_checkpoint(out / "last.pt")["progress"]
    assert progress["step"] == 9 and progress["virtual_ranks"] == 1


def test_the_defaults_shown_in_help_are_the_configs_defaults():
    import inspect
    import re

    from molden.train.config import (STARTS_FROM_INITIAL, DataConfig, FinetuneConfig, ModelChoice, OptimConfig, PretrainConfig,
                                     RunConfig, default_denoising)
    from molden.objectives.dens import DeNSConfig
    from molden.objectives.noisy_nodes import NOISE_LOSS_WEIGHT, RELAXED_POSITIONS_LOSS_WEIGHT, NoisyNodesConfig
    from molden.objectives.supervised import S2EFConfig

    def default(model, name):
        return model.model_fields[name].get_default(call_default_factory=True)

    truth = {
        "steps": default(RunConfig, "steps"), "lr": default(OptimConfig, "lr"), "max_graphs": default(DataConfig, "max_graphs"),
        "workers": default(DataConfig, "workers"), "seed": default(RunConfig, "seed"), "device": default(RunConfig, "device"),
        "dtype": default(RunConfig, "dtype"), "log_every": default(RunConfig, "log_every"),
        "eval_every": default(RunConfig, "eval_every"), "checkpoint_every": default(RunConfig, "checkpoint_every"),
        "warmup_steps": default(OptimConfig, "warmup_steps"), "ema_decay": default(OptimConfig, "ema_decay"),
        "accumulate": default(OptimConfig, "accumulate"), "val_split": default(DataConfig, "val_split"),
        "frames": default(DataConfig, "frames"), "val_frames": f"as --frames; {', '.join(STARTS_FROM_INITIAL)}: initial",
        "noisy_nodes_target": f"{default(NoisyNodesConfig, 'node_target')}; is2re: relaxed_positions",
        "sigma": default_denoising(5.0).sigma_angstrom, "mask_prob": default_denoising(5.0).mask_probability,
        "atom_type_weight": default_denoising(5.0).atom_type_loss_weight, "task": default(FinetuneConfig, "task"),
        "target": default(FinetuneConfig, "targets")[0], "noisy_nodes_weight": f"{NOISE_LOSS_WEIGHT:g}; is2re: {RELAXED_POSITIONS_LOSS_WEIGHT:g}",
        "dens_probability": default(DeNSConfig, "probability"), "dens_sigma": default(DeNSConfig, "sigma_angstrom"),
        "dens_ratio": default(DeNSConfig, "corruption_ratio"), "dens_coefficient": default(DeNSConfig, "coefficient"),
        "dens_schedule": default(DeNSConfig, "coefficient_schedule"),
        "energy_coefficient": default(S2EFConfig, "energy_coefficient"), "force_coefficient": default(S2EFConfig, "force_coefficient"),
        "energy_scale": default(S2EFConfig, "energy_scale"), "vector_decoder": default(ModelChoice, "vector_decoder"),
        "graph_decoder": default(ModelChoice, "graph_decoder"),
        "energy_reference": str(default(S2EFConfig, "energy_reference")).lower(),  # None is shown as `none`
        "max_bad_steps": default(RunConfig, "max_bad_steps"),
    }
    assert default(PretrainConfig, "model").preset == "gns_tat_cpu"
    seen = 0
    for command in (train_cli.pretrain, train_cli.finetune):
        for name, parameter in inspect.signature(command).parameters.items():
            shown = re.search(r"\[default: ([^\]]+)\]", getattr(parameter.default, "help", "") or "")
            if shown is None:
                continue
            seen += 1
            assert name in truth, name
            value = truth[name]
            assert shown.group(1) == (str(value) if isinstance(value, str) else f"{value:g}"), (name, shown.group(1), value)
    assert seen >= len(truth)


def test_frames_select_each_trajectorys_first_or_last_frame(emt_cache):
    import numpy as np

    from molden.data import H5Dataset
    from molden.train.config import DataConfig
    from molden.train.data import open_split

    everything = H5Dataset(emt_cache, "train")
    systems = {everything[i].system_id for i in range(len(everything))}
    for which, pick in (("initial", min), ("relaxed", max)):
        chosen = open_split(DataConfig(path=emt_cache, frames=which), "train")
        frames = {chosen[i].system_id: chosen[i].frame for i in range(len(chosen))}
        assert len(chosen) == len(systems) == len(frames)
        expected = {s: pick(everything[i].frame for i in range(len(everything)) if everything[i].system_id == s) for s in systems}
        assert frames == expected
    assert np.array_equal(open_split(DataConfig(path=emt_cache), "train").indices, everything.indices)


def test_overwrite_replaces_a_run_but_never_a_folder_of_other_files(s2ef_cache, tmp_path):
    out = tmp_path / "run"
    first = _invoke("finetune", "--data", s2ef_cache, "--out", out, "--task", "s2ef", *FAST)
    assert first.exit_code == 0, first.output
    (out / ".last.pt.abc.tmp").write_bytes(b"left by a kill")  # molden's own leftovers: fine
    (out / "metrics.jsonl.partial").write_text("left by a kill")
    again = _invoke("finetune", "--data", s2ef_cache, "--out", out, "--task", "s2ef", "--overwrite", *FAST)
    assert again.exit_code == 0, again.output
    assert not (out / ".last.pt.abc.tmp").exists() and not (out / "metrics.jsonl.partial").exists()
    (out / "thesis.tex").write_text("the user's work")
    refused = _invoke("finetune", "--data", s2ef_cache, "--out", out, "--task", "s2ef", "--overwrite", *FAST)
    assert refused.exit_code == 1 and "thesis.tex" in refused.output
    assert (out / "thesis.tex").read_text() == "the user's work" and (out / "last.pt").is_file()


def test_train_size_fits_the_target_standardisation_on_the_subset_only(qm9_cache, tmp_path):
    """A data-efficiency run with 50 labels must not standardise with the other labels."""
    from molden.data.h5_dataset import open_cache
    from molden.train.config import FinetuneConfig, load_config
    from molden.train.data import open_split
    from molden.train.tasks import finetune_task

    def normaliser_mean(train_size):
        config = load_config(FinetuneConfig, None, {
            "data": {"path": str(qm9_cache), "train_size": train_size}, "run": {"out": str(tmp_path / "run")},
            "model": {"preset": "painn_cpu"}, "task": "qm9", "targets": ["homo"]})
        dataset = open_split(config.data, "train", subset=train_size, seed=3)
        return finetune_task(config, dataset).description["normalizer"]["mean"][0], dataset.indices

    with open_cache(qm9_cache) as f:
        homo = f["structures/targets"][:][:, json.loads(f.attrs["target_names"]).index("homo")]
    subset_mean, picked = normaliser_mean(50)
    whole_mean, everything = normaliser_mean(None)
    assert len(picked) == 50 and len(everything) == 300
    assert subset_mean == pytest.approx(homo[picked].mean(), rel=1e-9)
    assert whole_mean == pytest.approx(homo[everything].mean(), rel=1e-9)
    assert subset_mean != pytest.approx(whole_mean, rel=1e-6)


def test_a_spent_time_limit_stops_cleanly_with_a_checkpoint_and_resume_finishes(s2ef_cache, tmp_path):
    out = tmp_path / "run"
    # 1e-5 minutes is spent during the first step: the run stops after it, whatever the machine.
    first = _invoke("finetune", "--data", s2ef_cache, "--out", out, "--task", "s2ef", "--time-limit", "1e-5", *FAST)
    assert first.exit_code == 0, first.output
    assert "time limit of 1e-05 min reached at step 1 of 6" in " ".join(first.output.split())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "time limit" and summary["steps"] == 1
    assert read_checkpoint(out / "last.pt")["progress"]["step"] == 1
    # The saved config keeps the limit; a resume with 0 (no limit) runs to the end.
    assert json.loads((out / "config.json").read_text())["run"]["time_limit_minutes"] == 1e-5
    more = _invoke("finetune", "--data", s2ef_cache, "--out", out, "--resume", "--time-limit", "0")
    assert more.exit_code == 0, more.output
    assert read_checkpoint(out / "last.pt")["progress"]["step"] == 6
    assert json.loads((out / "summary.json").read_text())["stopped"] == "completed"


def test_a_negative_time_limit_is_one_line(s2ef_cache, tmp_path):
    result = _invoke("finetune", "--data", s2ef_cache, "--out", tmp_path / "run", "--task", "s2ef", "--time-limit", "-1", *FAST)
    assert result.exit_code == 1
    assert "--time-limit" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@CUDA
@pytest.mark.parametrize("extra", [(), ("--bf16",)], ids=["float32", "bf16"])
def test_training_on_cuda_follows_the_cpu_run(s2ef_cache, tmp_path, extra):
    """The same run on CUDA (float32, or bf16 autocast) and on the CPU: the validation force MAE
    after 6 steps agrees within what the precision allows (scatter order differs on a GPU)."""
    finals = {}
    for device, flags in (("cpu", ()), ("cuda", extra)):
        out = tmp_path / device
        result = _invoke("finetune", "--data", s2ef_cache, "--out", out, "--task", "s2ef", "--dens", "--device", device,
                         *flags, *FAST)
        assert result.exit_code == 0, result.output
        summary = json.loads((out / "summary.json").read_text())
        assert summary["stopped"] == "completed" and summary["skipped_steps"] == 0
        finals[device] = summary["final_validation"]["forces_mae_mev_per_angstrom"]
    assert math.isfinite(finals["cuda"])
    assert finals["cuda"] == pytest.approx(finals["cpu"], rel=0.05 if extra else 1e-3)


@CUDA
def test_evaluate_on_cuda_equals_evaluate_on_the_cpu(s2ef_run, s2ef_cache):
    metrics = {}
    for device in ("cpu", "cuda"):
        result = _invoke("evaluate", s2ef_run / "last.pt", "--data", s2ef_cache, "--split", "val", "--device", device,
                         "--out", s2ef_run.parent / f"eval_{device}.json")
        assert result.exit_code == 0, result.output
        metrics[device] = json.loads((s2ef_run.parent / f"eval_{device}.json").read_text())["metrics"]
    assert metrics["cuda"].keys() == metrics["cpu"].keys()
    for name, value in metrics["cpu"].items():
        assert metrics["cuda"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


@pytest.mark.parametrize(("extra", "weight"), [((), 1.0), (("--noisy-nodes-weight", "0.25"), 0.25)])
def test_is2re_noisy_nodes_takes_the_oc20_node_loss_weight_unless_given(emt_cache, tmp_path, extra, weight):
    out = tmp_path / "run"
    result = _invoke("finetune", "--data", emt_cache, "--out", out, "--task", "is2re", "--noisy-nodes-sigma", "0.3",
                     *extra, *FAST[:2], "--max-graphs", "4", "--model", "painn_cpu", "--val-split", "none")
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())["noisy_nodes"]
    assert (saved["node_target"], saved["node_loss_weight"]) == ("relaxed_positions", weight)


def test_is2re_validates_and_evaluates_from_the_initial_structures(emt_cache, tmp_path):
    """IS2RE trains on every trajectory frame but is the prediction from the initial structure:
    best.pt must be chosen, and `molden evaluate` score, on the initial frames unless told otherwise."""
    from molden.train.evaluate import evaluate_checkpoint

    out = tmp_path / "run"
    result = _invoke("finetune", "--data", emt_cache, "--out", out, "--task", "is2re", "--val-split", "train", *FAST)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["data"]["val_frames"] == "initial"
    logged = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("split") == "val"][-1]
    assert logged["step"] == 6
    default = evaluate_checkpoint(out / "last.pt", emt_cache, split="train")
    initial = evaluate_checkpoint(out / "last.pt", emt_cache, split="train", frames="initial")
    every = evaluate_checkpoint(out / "last.pt", emt_cache, split="train", frames="all")
    assert default["frames"] == "initial" and default["metrics"] == initial["metrics"]
    assert initial["structures"] < every["structures"]
    assert logged["energy_mae_mev"] == pytest.approx(initial["metrics"]["energy_mae_mev"], rel=1e-5)
    assert logged["energy_mae_mev"] != pytest.approx(every["metrics"]["energy_mae_mev"], rel=1e-3)
    # S2EF validates on what it trains on; an explicit --val-frames wins for IS2RE.
    for task, extra, expected in (("s2ef", (), None), ("is2re", ("--val-frames", "all"), "all")):
        again = _invoke("finetune", "--data", emt_cache, "--out", tmp_path / task, "--task", task, *extra, *FAST[:2],
                        "--val-split", "none", "--model", "painn_cpu", "--max-graphs", "4")
        assert again.exit_code == 0, again.output
        assert json.loads((tmp_path / task / "config.json").read_text())["data"]["val_frames"] == expected


def test_a_run_saved_before_val_frames_resumes_validating_as_it_did(emt_cache, tmp_path):
    out = tmp_path / "run"
    common = ("finetune", "--data", emt_cache, "--out", out, "--task", "is2re", "--val-split", "train", "--model", "painn_cpu",
              "--max-graphs", "4", "--eval-every", "2", "--checkpoint-every", "2")
    assert _invoke(*common, "--steps", "2").exit_code == 0
    from molden.models.checkpoint import read_checkpoint, write_checkpoint

    saved = json.loads((out / "config.json").read_text())
    del saved["data"]["val_frames"]  # as molden wrote it, and its checkpoint, before the field existed
    (out / "config.json").write_text(json.dumps(saved))
    payload = read_checkpoint(out / "last.pt")
    write_checkpoint(out / "last.pt", {**payload, "config": json.dumps(saved)})
    result = _invoke(*common, "--steps", "4", "--resume")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["data"]["val_frames"] == "all"


def test_is2re_trains_on_the_adsorption_energy_when_asked(emt_cache, tmp_path):
    from molden.models.checkpoint import load_model

    out = tmp_path / "run"
    result = _invoke("finetune", "--data", emt_cache, "--out", out, "--task", "is2re", "--is2re-target", "adsorption_energy",
                     *FAST[:2], "--val-split", "none", "--model", "painn_cpu", "--max-graphs", "4")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["is2re_target"] == "adsorption_energy"
    assert load_model(out / "last.pt").task["target"] == "adsorption_energy"


def test_the_loop_tells_the_objective_how_far_the_run_is(s2ef_cache, tmp_path, monkeypatch):
    from molden.objectives.dens import DeNS

    seen = []
    original = DeNS.set_progress
    monkeypatch.setattr(DeNS, "set_progress", lambda self, fraction: (seen.append(fraction), original(self, fraction)))
    result = _invoke("finetune", "--data", s2ef_cache, "--out", tmp_path / "run", "--task", "s2ef", "--dens",
                     "--dens-schedule", "linear_decay", *FAST)
    assert result.exit_code == 0, result.output
    assert seen == [step / 6 for step in range(6)]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["dens"]["coefficient_schedule"] == "linear_decay"


def test_decode_every_block_trains_on_every_block_iteration_without_noise(s2ef_cache, tmp_path):
    out = tmp_path / "run"
    result = _invoke("finetune", "--data", s2ef_cache, "--out", out, "--task", "s2ef", "--decode-every-block",
                     *FAST, "--change", "block_iterations=2")
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["decode_every_block"] is True and saved["noisy_nodes"] is None
    from molden.objectives.noisy_nodes import EveryBlock
    from molden.train.config import FinetuneConfig
    from molden.train.data import open_split
    from molden.train.tasks import finetune_task

    config = FinetuneConfig.model_validate(saved)
    assert isinstance(finetune_task(config, open_split(config.data, "train")).objective, EveryBlock)
