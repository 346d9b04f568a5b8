"""Exact resume and one distributed path (issue 14 acceptance), with real processes: a run
killed with SIGKILL mid-epoch and resumed ends with the same parameters, optimiser state and
EMA as an uninterrupted run; SIGTERM writes a checkpoint before exiting; two gloo processes
under torchrun compute the same steps as one process accumulating the same two batches."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from molden.errors import MoldenInputError
from molden.models.checkpoint import read_checkpoint

STEPS = 48
RUN = ("--task", "qm9", "--target", "homo", "--noisy-nodes-sigma", "0.02", "--model", "gns_qm9_cpu",
       "--change", "latent_dim=32", "--change", "mlp_hidden_dim=32", "--max-graphs", "16", "--log-every", "4",
       "--eval-every", "24", "--warmup-steps", "4", "--threads", "1")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]
ENV = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
"""The tests' environment without a cuBLAS workspace setting: `--deterministic` sets its own."""


def _on(device: str) -> tuple[str, ...]:
    """RUN on `device`; on CUDA with torch's deterministic algorithms (atomics otherwise add in
    a different order every run, and exact resume is a bit-for-bit claim)."""
    return (*RUN, "--device", device, *(("--deterministic",) if device == "cuda" else ()))


def _command(*args) -> list[str]:
    return [sys.executable, "-m", "molden.cli.app", "finetune", *[str(a) for a in args]]


def _run(*args) -> subprocess.CompletedProcess:
    result = subprocess.run(_command(*args), capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _step_of(path) -> int:
    try:
        return int(read_checkpoint(path)["progress"]["step"])
    except MoldenInputError:
        return -1


def _wait_for_checkpoint(process: subprocess.Popen, path, at_least: int) -> int:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the run ended (code {process.returncode}) before it could be interrupted: "
                                 f"{process.stderr.read()[-2000:]}")
        if path.is_file() and (step := _step_of(path)) >= at_least:
            return step
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared in time")


def _assert_same_state(a, b) -> None:
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    for index in state_a:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state_a[index][name], state_b[index][name]), f"optimizer {index}.{name} differs"
    assert a["progress"]["step"] == b["progress"]["step"] == STEPS


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_a_run_killed_mid_epoch_and_resumed_ends_exactly_like_an_uninterrupted_run(qm9_cache, tmp_path, device):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    _run("--data", qm9_cache, "--out", reference, "--steps", STEPS, "--checkpoint-every", STEPS, *_on(device))

    process = subprocess.Popen(_command("--data", qm9_cache, "--out", killed, "--steps", STEPS, "--checkpoint-every", "4",
                                        *_on(device)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        step = _wait_for_checkpoint(process, killed / "last.pt", at_least=8)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert step < STEPS  # killed mid-run (one epoch is 20 steps: mid-epoch for most kills)
    _run("--data", qm9_cache, "--out", killed, "--resume")

    _assert_same_state(read_checkpoint(reference / "last.pt"), read_checkpoint(killed / "last.pt"))
    steps_logged = [line for line in (killed / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert len(steps_logged) == STEPS // 4  # records of the killed segment past its checkpoint were dropped


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_the_run_resumes_to_the_same_end(qm9_cache, tmp_path):
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    _run("--data", qm9_cache, "--out", reference, "--steps", STEPS, "--checkpoint-every", STEPS, *_on("cpu"))
    process = subprocess.Popen(_command("--data", qm9_cache, "--out", stopped, "--steps", STEPS, "--checkpoint-every", STEPS,
                                        *_on("cpu")),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    metrics = stopped / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()[-2000:]
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "interrupted at step" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert 0 < _step_of(stopped / "last.pt") < STEPS
    _run("--data", qm9_cache, "--out", stopped, "--resume")
    _assert_same_state(read_checkpoint(reference / "last.pt"), read_checkpoint(stopped / "last.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_two_processes_take_the_same_steps_as_one_process_accumulating_two_batches(qm9_cache, tmp_path, device):
    """Two DDP processes step as one process accumulating their two batches, and their
    checkpoint resumes in that one process as its own does (from N processes on M)."""
    steps = 3
    common = ("--data", qm9_cache, "--steps", steps, "--checkpoint-every", steps, "--dtype", "float64", *_on(device))
    _run("--out", tmp_path / "one", "--accumulate", "2", *common)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
                "-m", "molden.cli.app", "finetune", "--out", str(tmp_path / "two"), *[str(a) for a in common]]
    # nccl refuses two ranks on one GPU: with fewer GPUs than ranks, gloo (which reduces CUDA
    # tensors too) runs the same DDP path.
    backend = {"MOLDEN_DIST_BACKEND": "gloo"} if device == "cuda" and torch.cuda.device_count() < 2 else {}
    result = subprocess.run(launcher, capture_output=True, text=True, timeout=300,
                            env={**ENV, "OMP_NUM_THREADS": "1", **backend})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (result.stdout + result.stderr).count("molden training on") == 1  # rank 0 speaks for the run
    # A refusal seen by rank 0 alone (its run folder exists) stops every rank: one line, no traceback, no hang.
    refused = subprocess.run(launcher, capture_output=True, text=True, timeout=300,
                             env={**ENV, "OMP_NUM_THREADS": "1", **backend})
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0 and output.count("already holds a run") == 1, output[-3000:]
    # (torchrun itself prints a traceback of its own when a process fails; none comes from molden's processes)
    assert not [line for line in output.splitlines() if 'File "' in line and ("molden" in line or "gloo" in line)]
    assert "Connection reset" not in output
    # An error every process meets alike (a training subset larger than the split, found after
    # the process group is up) is one line from the machine, not one per process.
    bad = [a if a != str(tmp_path / "two") else str(tmp_path / "bad") for a in launcher] + ["--train-size", "1000000"]
    alike = subprocess.run(bad, capture_output=True, text=True, timeout=300, env={**ENV, "OMP_NUM_THREADS": "1", **backend})
    output = alike.stdout + alike.stderr
    assert alike.returncode != 0 and output.count("--train-size 1000000 is more than") == 1, output[-3000:]
    assert "error: process 1:" not in output and not (tmp_path / "bad").exists()  # (torchrun names pids "process N")
    one, two = read_checkpoint(tmp_path / "one" / "last.pt"), read_checkpoint(tmp_path / "two" / "last.pt")
    assert one["progress"]["structures_seen"] == two["progress"]["structures_seen"]
    # Same batches, same noise; only the order of the gradient sum differs (all-reduce against
    # accumulation), which float64 keeps below 1e-9 after these steps.
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, rtol=1e-9, atol=1e-10, msg=name)
    val_one = [line for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    val_two = [line for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert len(val_one) == len(val_two) == 1
    # Both checkpoints resumed in one process accumulating two batches (the same virtual ranks,
    # so the same batches follow), to twice the steps: the runs stay within the same tolerance.
    for run in ("one", "two"):
        resumed = _run("--out", tmp_path / run, "--resume", "--accumulate", "2", *common[:2], "--steps", 2 * steps,
                       *common[4:])
        assert f"resumed at step {steps}" in resumed.stdout + resumed.stderr
    one, two = read_checkpoint(tmp_path / "one" / "last.pt"), read_checkpoint(tmp_path / "two" / "last.pt")
    assert one["progress"]["step"] == two["progress"]["step"] == 2 * steps
    assert one["progress"]["structures_seen"] == two["progress"]["structures_seen"]
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, rtol=1e-9, atol=1e-10, msg=name)


def test_a_run_saved_before_heads_had_their_own_width_resumes_with_input_wide_heads():
    """Heads are `mlp_hidden_dim` wide now (`HeadSpec.hidden_dim`); a GNS run saved before, with
    `mlp_hidden_dim` ≠ `latent_dim`, trained input-wide heads: it resumes with those, and a run
    saved since keeps the width it recorded."""
    import json

    from molden.models import keys
    from molden.models.presets import preset
    from molden.models.spec import graph_head, model_spec, vector_head
    from molden.train.loop import _heads_as_saved

    config = preset("gns_qm9_cpu").model_copy(update={"mlp_hidden_dim": 128})
    spec = model_spec(config, {keys.TARGETS: graph_head(config, readout="mean"), keys.NOISE: vector_head(config)})
    assert {h.hidden_dim for h in spec.heads.values()} == {128}
    old = json.loads(spec.model_dump_json())
    for head in old["heads"].values():
        for field in ("hidden_dim", "encoder_mlp", "readout_mlp"):
            del head[field]
    resumed = _heads_as_saved(spec, {"model_spec": json.dumps(old)})
    assert {h.hidden_dim for h in resumed.heads.values()} == {None}
    assert resumed.model_dump() == {**spec.model_dump(), "heads": {k: {**h, "hidden_dim": None} for k, h in spec.model_dump()["heads"].items()}}
    assert _heads_as_saved(spec, {"model_spec": spec.model_dump_json()}) == spec
    assert _heads_as_saved(spec, {}) == spec  # not resumable: _check_resumable says why
