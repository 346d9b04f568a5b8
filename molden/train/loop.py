"""The training loop, for every objective: data → corruption → model → loss → step.

Plain functions, as MACE's train → train_one_epoch → take_step → evaluate:
`train(config)` sets up and resumes, `take_step` does one optimiser step over the accumulated
batches, `evaluate` validates with the EMA weights. Objectives differ only in the `Objective`
the task hands over (`molden.train.tasks`), so nothing here knows Noisy Nodes from DeNS.

Exact resume: every random draw comes either from a seed and a position (data order: seed and
epoch; corruption: seed, epoch and the batch's index in the epoch) or from a state the
checkpoint holds (model, optimiser, scheduler, EMA, RNGs), so a run killed and resumed from
`last.pt` computes the same steps as one that never stopped.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np
import torch
from torch import Tensor

from molden import __version__
from molden.data.batch import Batch
from molden.data.h5_dataset import H5Dataset
from molden.errors import MoldenConfigError, MoldenError, MoldenInputError, ReportedElsewhere, alike_on_every_process
from molden.models.checkpoint import read_checkpoint, write_checkpoint
from molden.models.freezing import freeze_backbone
from molden.models.model import Model
from molden.models.spec import ModelSpec, build_model
from molden.objectives.objective import LOSS, Objective, ProgressAware, term_weights
from molden.train import distributed as D
from molden.train.config import FinetuneConfig, PretrainConfig
from molden.train.data import (StepPlan, batch_sampler, epoch_plan, for_model, loader, move, open_split,
                               validation_batches)
from molden.train.metrics_log import MetricsLog
from molden.train.optim import EMA, build_optimizer, build_scheduler, lr_factor
from molden.train.tasks import TrainingTask, finetune_task, graph_search_note, pretrain_task

TrainConfig = PretrainConfig | FinetuneConfig

LAST = "last.pt"
BEST = "best.pt"
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
TIME_LIMIT = "time limit"
EARLY_STOPPING = "early stopping"


def finished(summary: Mapping[str, Any]) -> bool:
    """Whether a run's summary.json says it ran to its end, by its steps or its patience
    (every stop writes one: an interrupted or timed-out run is not finished)."""
    stopped = str(summary.get("stopped", ""))
    return stopped == "completed" or stopped.startswith(EARLY_STOPPING)
"""`RunSummary.stopped` of a run that spent its `--time-limit` (last.pt written, resumable)."""
RUN_FILES = frozenset({LAST, BEST, CONFIG_FILE, SUMMARY_FILE, "metrics.jsonl", "metrics.csv", "learning_curves.png"})
"""What a run folder holds: all `--overwrite` removes."""


class TrainingStopped(MoldenError):
    """The run stopped early on purpose (a signal, repeated non-finite losses)."""

    def __init__(self, message: str, *, interrupted: bool = False):
        super().__init__(message)
        self.interrupted = interrupted  # by a signal: last.pt holds the run, to be resumed


class Reporter(Protocol):
    """What a front end (the CLI's live display) is told while a run goes."""

    def start(self, info: dict[str, Any]) -> None: ...
    def step(self, step: int, total: int, epoch: float, values: Mapping[str, float]) -> None: ...
    def validated(self, step: int, values: Mapping[str, float], best: bool) -> None: ...
    def note(self, message: str) -> None: ...


class SilentReporter:
    def start(self, info):  # noqa: D102
        pass

    def step(self, step, total, epoch, values):  # noqa: D102
        pass

    def validated(self, step, values, best):  # noqa: D102
        pass

    def note(self, message):  # noqa: D102
        pass


@dataclass
class Progress:
    """Where the run is: what a checkpoint must hold besides the weights and optimiser."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    virtual_ranks: int = 1
    best_value: float = math.inf
    best_step: int = -1
    validations_since_best: int = 0
    bad_steps: int = 0
    skipped_steps: int = 0
    wall_s: float = 0.0
    structures_seen: int = 0

    def state(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RunSummary:
    out: Path
    steps: int
    epochs: float
    best_metric: str
    best_value: float
    best_step: int
    final_validation: dict[str, float] = field(default_factory=dict)
    last_train: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    structures_per_s: float = 0.0
    skipped_steps: int = 0
    stopped: str = "completed"
    parameters: int = 0
    trainable_parameters: int = 0

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["out"] = str(self.out)
        return out


# ----------------------------------------------------------------------------- randomness
VALIDATION_EPOCH = 1 << 30
"""The epoch number validation corruption draws from (no training epoch reaches it)."""


def corruption_generator(seed: int, epoch: int, batch_index: int) -> torch.Generator:
    """The generator of one batch's corruption: a function of (seed, epoch, index of the batch
    in the epoch), so it is the same on any number of processes and after a resume."""
    value = np.random.SeedSequence([seed, epoch, batch_index, 0x6D6F6C]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(value[0]) & ((1 << 63) - 1))


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(),
        "python": _python_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _python_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- run folder
def _leftover(name: str) -> bool:
    """A temporary file of molden's atomic writes that a killed run left behind: a checkpoint's
    `.NAME.XXXX.tmp`, or `NAME.partial` of the metrics and plots."""
    if name.endswith(".partial"):
        return name.removesuffix(".partial") in RUN_FILES
    return name.startswith(".") and name.endswith(".tmp")


def prepare_run_dir(out: Path, *, resume: bool, overwrite: bool, inputs: list[Path]) -> list[Path]:
    """Checks `out` before a run and returns the files an `overwrite` will replace (delete them
    with `clear_run_dir` once the new run is set up: a run refused for its data or options
    leaves the old one whole). Refuses a folder holding a run unless `resume` (continue it, from
    `out/last.pt`) or `overwrite` (start over), and an `out` that is an input."""
    out = Path(out)
    for path in inputs:
        if path is not None and Path(path).exists() and out.exists() and Path(path).resolve().is_relative_to(out.resolve()):
            raise MoldenConfigError(f"--out {out} holds an input ({path}): pick another run folder")
    if out.exists() and not out.is_dir():
        raise MoldenConfigError(f"--out {out} is a file, not a run folder")
    present = sorted(out.iterdir()) if out.is_dir() else []
    if resume:
        if not (out / LAST).is_file():
            raise MoldenConfigError(f"--resume: {out} has no {LAST} to resume from")
        return []
    if present:
        if not overwrite:
            raise MoldenConfigError(f"{out} already holds a run: pass --resume to continue it or --overwrite to start over")
        foreign = [p.name for p in present if p.name not in RUN_FILES and not _leftover(p.name)]
        if foreign:  # --overwrite replaces a run, never a folder of the user's other files
            raise MoldenConfigError(f"--overwrite: {out} holds files molden did not write ({', '.join(foreign[:3])}): "
                                    "pick an empty or new run folder")
    return present


def clear_run_dir(replaced: list[Path]) -> None:
    """Delete the old run's files that `prepare_run_dir` listed (--overwrite)."""
    for path in replaced:
        path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- model
def initialise_backbone(model: Model, spec: ModelSpec, path: Path) -> None:
    """Load a pre-trained backbone (the EMA weights when saved) from a checkpoint of the same
    backbone; the heads stay freshly initialised (fine-tuning, Pre-training via Denoising §4)."""
    payload = read_checkpoint(path)
    other = ModelSpec.model_validate_json(payload["model_spec"])
    if other.family != spec.family or other.backbone_config() != spec.backbone_config():
        mismatch = sorted(k for k in spec.backbone if other.backbone.get(k) != spec.backbone[k])
        raise MoldenConfigError(f"{path}: its {other.family} backbone differs from this run's in {mismatch or ['family']}: "
                                "fine-tune with the pre-training's --model and changes")
    state = payload.get("ema") or payload["model"]
    prefix = "backbone."
    backbone_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    model.backbone.load_state_dict(backbone_state, strict=True)


# ----------------------------------------------------------------------------- one step
def _autocast(device: torch.device, bf16: bool):
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def take_step(
    model: torch.nn.Module,
    objective: Objective,
    batches: list[Batch],
    generators: list[torch.Generator],
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    grad_clip_norm: float | None,
    bf16: bool = False,
    dist: D.Distributed | None = None,
    trim_cutoff_angstrom: float | None = None,
) -> tuple[dict[str, Tensor], bool]:
    """One optimiser step over accumulated `batches` (gradients averaged, as DDP averages over
    processes). Returns the loss terms (means over the batches, detached, on `device`) and
    whether the step was taken: a non-finite loss or gradient norm on any process skips it.
    `trim_cutoff_angstrom`: the one given to `move`, whose cut of a whole cached graph waits
    until after the corruption (`for_model`)."""
    optimizer.zero_grad(set_to_none=True)
    terms_sum: dict[str, Tensor] = {}
    finite = torch.ones((), device=device)
    n = len(batches)
    for a, (batch, generator) in enumerate(zip(batches, generators)):
        inputs, targets = objective.corrupt(batch, generator)
        inputs = for_model(batch, inputs, trim_cutoff_angstrom)
        sync = a == n - 1 or not hasattr(model, "no_sync")
        with (contextlib.nullcontext() if sync else model.no_sync()), _autocast(device, bf16):
            predictions = model(inputs, all_blocks=objective.needs_all_blocks)
            terms = objective.loss(predictions, inputs, targets)
        loss = terms[LOSS]
        finite = finite * torch.isfinite(loss.detach()).to(finite.dtype)
        with (contextlib.nullcontext() if sync else model.no_sync()):
            (torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) / n).backward()
        for name, value in terms.items():
            value = value.detach().to(torch.float64)
            terms_sum[name] = terms_sum[name] + value if name in terms_sum else value
    parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if grad_clip_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in parameters])) if parameters else torch.zeros(())
    finite = finite * torch.isfinite(norm).to(finite.dtype)
    if dist is not None:
        finite = D.all_reduce_min(finite.clone(), dist)
    ok = bool(finite.item())
    if ok:
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    terms_mean = {name: value / n for name, value in terms_sum.items()}
    terms_mean["grad_norm"] = norm.detach().to(torch.float64)
    return terms_mean, ok


# ----------------------------------------------------------------------------- validation
def evaluate(
    model: Model,
    objective: Objective,
    dataset: H5Dataset,
    batches: list[list[int]],
    *,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    data_config,
    dist: D.Distributed | None = None,
    bf16: bool = False,
    trim_cutoff_angstrom: float | None = None,
) -> dict[str, float]:
    """The objective's terms over `batches` of `dataset`, summed over processes: {term: mean}
    over every item the term averages (structures, or atoms: `objective.term_weights`), so a
    metric is its definition over the whole split, whatever the batching. Corruption (denoising validation) draws
    from a generator fixed by (seed, batch index), so validations are comparable."""
    model.eval()
    sums: dict[str, Tensor] = {}
    counts: dict[str, Tensor] = {}
    conservative = getattr(model, "conservative_forces", False)
    grad = torch.enable_grad() if conservative else torch.no_grad()
    with grad:
        for index, batch in enumerate(loader(dataset, batches, data_config, dtype, pin=device.type == "cuda")):
            batch = move(batch, device, trim_cutoff_angstrom)
            inputs, targets = objective.corrupt(batch, corruption_generator(seed, VALIDATION_EPOCH, index))
            inputs = for_model(batch, inputs, trim_cutoff_angstrom)
            with _autocast(device, bf16):
                predictions = model(inputs, all_blocks=False)
                terms = objective.loss(predictions, inputs, targets)
            weights = term_weights(objective, inputs, targets, terms)
            for name, value in terms.items():
                value = value.detach().to(torch.float64)
                sums[name] = sums.get(name, 0) + value * weights[name]
                counts[name] = counts.get(name, 0) + weights[name]
    names = sorted(sums)
    if dist is not None and dist.active:
        names = _agreed_names(names, dist)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    packed = torch.stack([sums.get(n, zero) for n in names] + [counts.get(n, zero) for n in names])
    if dist is not None:
        packed = D.all_reduce_sum(packed, dist)
    n = len(names)
    return {name: float(packed[i]) / max(float(packed[n + i]), 1e-300) for i, name in enumerate(names)}


def _agreed_names(names: list[str], dist: D.Distributed) -> list[str]:
    gathered: list[list[str]] = [None] * dist.world_size  # type: ignore[list-item]
    torch.distributed.all_gather_object(gathered, names)
    return sorted(set().union(*gathered))


# ----------------------------------------------------------------------------- signals
class StopRequest:
    """SIGINT / SIGTERM set a flag; the loop writes a checkpoint at the end of the step and
    stops (a second Ctrl-C is not needed, and nothing is cut mid-write)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- the run
def build_task(config: TrainConfig, dataset: H5Dataset) -> TrainingTask:
    return pretrain_task(config, dataset) if isinstance(config, PretrainConfig) else finetune_task(config, dataset)


def _stack_mean(history: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    names = history[0].keys()
    return {n: torch.stack([h[n] for h in history if n in h]).mean() for n in names}


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False,
          reporter: Reporter | None = None) -> RunSummary:
    """Run (or resume) the training `config` describes; returns the run's summary.

    Writes into `config.run.out`: config.json, last.pt (every `checkpoint_every` steps, at
    the end, on SIGINT/SIGTERM), best.pt (EMA weights with the best validation metric),
    metrics.jsonl/.csv, learning_curves.png and summary.json.
    """
    reporter = reporter or SilentReporter()
    run = config.run
    # The time limit counts from here: set-up (data, model, a resumed checkpoint) is part of
    # the invocation a cluster job's budget pays for.
    deadline = time.monotonic() + 60 * run.time_limit_minutes if run.time_limit_minutes else None
    if run.deterministic:
        # cuBLAS is bit-reproducible only with a fixed workspace, set before its first call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    dist = D.setup(run.device)
    try:
        return _train(config, dist, resume=resume, overwrite=overwrite, reporter=reporter, deadline=deadline)
    finally:
        D.teardown(dist)


def _train(config: TrainConfig, dist: D.Distributed, *, resume: bool, overwrite: bool, reporter: Reporter,
           deadline: float | None) -> RunSummary:
    run, optim_config = config.run, config.optim
    out = Path(run.out)
    if run.bf16 and dist.device.type != "cuda":
        with alike_on_every_process():
            raise MoldenConfigError("--bf16 needs --device cuda")
    init = getattr(config, "init", None)
    replaced, refusal = [], None
    if dist.is_main:
        try:
            replaced = prepare_run_dir(out, resume=resume, overwrite=overwrite, inputs=[config.data.path, init])
        except MoldenError as error:
            refusal = error
    (refused,) = D.any_rank(dist, refusal is not None)  # every process learns rank 0's verdict, none is left waiting
    if refused:
        raise refusal if refusal is not None else ReportedElsewhere(f"process 0 refused the run folder {out}")
    resuming = resume
    if run.threads is not None:
        torch.set_num_threads(run.threads)
    if run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    dtype = getattr(torch, run.dtype)
    device = dist.device

    # Every check of the data, budgets, task, model and checkpoint: each process meets their errors alike.
    with alike_on_every_process():
        train_set = open_split(config.data, config.data.train_split, subset=config.data.train_size, seed=run.seed)
        val_set = (open_split(config.data, config.data.val_split, frames=config.data.validation_frames)
                   if config.data.val_split else None)
        task = build_task(config, train_set)
        payload = read_checkpoint(out / LAST) if resuming else None
        if payload is not None:
            task.spec = _heads_as_saved(task.spec, payload)

        torch.manual_seed(run.seed)  # the same initial weights on every process
        model = build_model(task.spec)
        if init is not None and not resuming:  # a resumed run's weights, pre-trained ones included, come from last.pt
            initialise_backbone(model, task.spec, Path(init))
        if getattr(config, "freeze_backbone", False):
            trainable = freeze_backbone(model)
        else:
            trainable = list(model.parameters())
        model = model.to(device=device, dtype=dtype)
        for module in task.modules:
            module.to(device)
        ema = EMA(model, optim_config.ema_decay) if optim_config.ema_decay is not None else None
        eval_model = copy.deepcopy(model) if ema is not None else model

        train_model: torch.nn.Module = model
        if dist.active:
            # Parts of a model can sit out a whole run (the tag embedding on molecules without tags)
            # or a step (an atom-type head on a batch without masked atoms): let DDP find them.
            train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
        optimizer = build_optimizer([p for p in trainable if p.requires_grad], optim_config)
        scheduler = build_scheduler(optimizer, run.steps, optim_config)

        virtual = dist.world_size * optim_config.accumulate
        progress = Progress(virtual_ranks=virtual)
        window: list[dict[str, Tensor]] = []  # the training terms since the last logged record
        window_structures, window_elapsed = 0, 0.0
        if resuming:
            # The options first: a changed one is named, where the model check could only say "another model".
            _check_resume_config(json.loads(payload.get("config") or "{}"), config.model_dump(mode="json"), out / LAST)
            _check_resumable(payload, task.spec, out / LAST)
            model.load_state_dict(payload["model"], strict=True)
            optimizer.load_state_dict(payload["optimizer"])
            scheduler.load_state_dict(payload["scheduler"])
            if ema is not None and payload.get("ema_state") is not None:
                ema.load_state_dict(payload["ema_state"], payload["ema"])
            progress = Progress(**payload["progress"])
            set_rng_state(payload["rng"])
            if progress.step >= run.steps:
                raise MoldenConfigError(f"--resume: the run in {out} has finished ({progress.step} of {run.steps} steps): "
                                        "give a larger --steps to train on")
            saved_config = json.loads(payload.get("config") or "{}")
            saved_patience = saved_config.get("run", {}).get("early_stopping")
            if (saved_patience is not None and progress.validations_since_best >= saved_patience
                    and run.early_stopping is not None and progress.validations_since_best >= run.early_stopping):
                raise MoldenConfigError(f"--resume: the run in {out} stopped early at step {progress.step} (no better "
                                        f"{task.best_metric} in {run.early_stopping} validations): give a larger "
                                        "--early-stopping to train on")
            saved_steps = saved_config.get("run", {}).get("steps", run.steps)
            follows_steps = optim_config.schedule == "cosine" and optim_config.cosine_cycle_steps is None
            if saved_steps != run.steps and follows_steps:  # multistep, constant or a set cosine cycle: nothing moves
                before, after = (optim_config.lr * lr_factor(progress.step, n, optim_config) for n in (saved_steps, run.steps))
                reporter.note(f"--steps {saved_steps} → {run.steps}: from step {progress.step} the learning rate follows the "
                              f"{run.steps}-step schedule ({before:.3g} → {after:.3g})")
            saved_window = payload.get("log_window") or {}
            window = [{k: v.to(device) for k, v in terms.items()} for terms in saved_window.get("terms", [])]
            window_structures = int(saved_window.get("structures", 0))
            window_elapsed = float(saved_window.get("elapsed_s", 0.0))
            if progress.virtual_ranks != virtual:
                reporter.note(f"resuming {progress.virtual_ranks} processes × accumulation on {virtual}: "
                              "the interrupted epoch's remaining batches are skipped, the next epoch starts")
                if progress.step_in_epoch:
                    progress.epoch += 1
                    progress.step_in_epoch = 0
                progress.virtual_ranks = virtual

        sampler = batch_sampler(train_set, config.data, seed=run.seed, virtual_ranks=virtual)
        val_batches = validation_batches(val_set, config.data, rank=dist.rank, world_size=dist.world_size) if val_set else []
    if dist.is_main:
        clear_run_dir(replaced)  # only now: every check of the data, budgets, task, model and checkpoint has passed
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
    log = MetricsLog(out, resume_step=progress.step if resuming else None, enabled=dist.is_main)
    n_parameters = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    reporter.start({
        "config": config.model_dump(mode="json"), "parameters": n_parameters, "trainable": n_trainable,
        "train_structures": len(train_set), "val_structures": len(val_set) if val_set else 0,
        "device": str(device), "processes": dist.world_size, "resumed_at": progress.step if resuming else None,
        "best_metric": task.best_metric, "dtype": run.dtype,
    })
    hint = graph_search_note(task.objective, train_set)
    if hint is not None:
        reporter.note(hint)

    def checkpoint_payload() -> dict[str, Any]:
        return {
            "model_spec": task.spec.model_dump_json(),
            "task": json.dumps(task.description),
            "config": json.dumps(config.model_dump(mode="json")),
            "dtype": run.dtype,
            "model": model.state_dict(),
            "ema": ema.weights() if ema is not None else None,
            "progress": progress.state(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "ema_state": ema.state_dict() if ema is not None else None,
            "rng": rng_state(),
            # so that the first record after a resume averages the same steps as without the stop
            # (with several processes, rank 0's terms stand for every rank's)
            "log_window": {"terms": [{k: v.detach().cpu() for k, v in terms.items()} for terms in history],
                           "structures": window_structures, "elapsed_s": time.perf_counter() - window_start},
        }

    def save(name: str) -> None:
        if dist.is_main:
            write_checkpoint(out / name, checkpoint_payload())

    def validate() -> dict[str, float]:
        if not val_batches and not (dist.active and val_set):
            return {}
        if ema is not None:
            eval_model.load_state_dict(ema.weights())
        values = evaluate(eval_model, task.validation, val_set, val_batches, device=device, dtype=dtype, seed=run.seed,
                          data_config=config.data, dist=dist, bf16=run.bf16, trim_cutoff_angstrom=task.trim_cutoff_angstrom)
        model.train()
        return values

    history: list[dict[str, Tensor]] = window
    window_start = time.perf_counter() - window_elapsed
    segment_start = time.perf_counter() - progress.wall_s
    last_values: dict[str, float] = {}
    last_validation: dict[str, float] = {}
    stopped = "completed"
    step_seconds = 0.0  # the last step's duration: the time limit stops a step early rather than overrun
    model.train()
    with StopRequest() as stop:
        while progress.step < run.steps and stopped == "completed":
            plan: StepPlan = epoch_plan(sampler, progress.epoch, rank=dist.rank, world_size=dist.world_size,
                                        accumulate=optim_config.accumulate)
            if plan.steps == 0:
                raise MoldenConfigError(
                    f"the train split gives fewer batches than {virtual} (processes × accumulation) per step: "
                    "lower --max-graphs or the accumulation")
            flat = [b for step_batches in plan.batches[progress.step_in_epoch:] for b in step_batches]
            stream = iter(loader(train_set, flat, config.data, dtype, pin=device.type == "cuda"))
            for t in range(progress.step_in_epoch, plan.steps):
                batches = [move(next(stream), device, task.trim_cutoff_angstrom) for _ in range(optim_config.accumulate)]
                base = t * virtual + dist.rank * optim_config.accumulate
                generators = [corruption_generator(run.seed, progress.epoch, base + a) for a in range(len(batches))]
                step_start = time.monotonic()
                if isinstance(task.objective, ProgressAware):
                    task.objective.set_progress(progress.step / run.steps)
                terms, ok = take_step(train_model, task.objective, batches, generators, optimizer, device=device,
                                      grad_clip_norm=optim_config.grad_clip_norm, bf16=run.bf16, dist=dist,
                                      trim_cutoff_angstrom=task.trim_cutoff_angstrom)
                scheduler.step()
                progress.step += 1
                progress.step_in_epoch = t + 1
                n_structures = sum(b.num_graphs for b in batches) * dist.world_size
                progress.structures_seen += n_structures
                window_structures += n_structures
                if ok:
                    if ema is not None:
                        ema.update(model)
                    progress.bad_steps = 0
                    history.append(terms)
                else:
                    progress.bad_steps += 1
                    progress.skipped_steps += 1
                    reporter.note(f"step {progress.step}: non-finite loss or gradient, step skipped "
                                  f"({progress.bad_steps} in a row)")
                    if progress.bad_steps >= run.max_bad_steps:
                        stopped = f"{progress.bad_steps} consecutive steps with a non-finite loss"
                epoch_float = progress.epoch + progress.step_in_epoch / plan.steps
                progress.wall_s = time.perf_counter() - segment_start
                last_step = progress.step >= run.steps
                if (progress.step % run.log_every == 0 or last_step) and history:
                    means = _stack_mean(history)
                    names = sorted(means)
                    packed = torch.stack([means[n] for n in names])
                    packed = D.all_reduce_sum(packed, dist) / dist.world_size
                    elapsed = time.perf_counter() - window_start
                    last_values = {n: float(packed[i]) for i, n in enumerate(names)}
                    last_values["lr"] = scheduler.get_last_lr()[0]
                    last_values["structures_per_s"] = window_structures / max(elapsed, 1e-9)
                    log.write(progress.step, epoch_float, "train", last_values, progress.wall_s)
                    reporter.step(progress.step, run.steps, epoch_float, last_values)
                    history, window_start, window_structures = [], time.perf_counter(), 0
                if val_set is not None and (progress.step % run.eval_every == 0 or last_step):
                    last_validation = validate()
                    metric = last_validation.get(task.best_metric, last_validation.get(LOSS, math.inf))
                    better = metric < progress.best_value
                    if better:
                        progress.best_value, progress.best_step = metric, progress.step
                        progress.validations_since_best = 0
                    else:
                        progress.validations_since_best += 1
                    log.write(progress.step, epoch_float, "val", last_validation, progress.wall_s)
                    reporter.validated(progress.step, last_validation, better)
                    if better:
                        save(BEST)
                    if run.early_stopping is not None and progress.validations_since_best >= run.early_stopping:
                        stopped = f"{EARLY_STOPPING}: no better {task.best_metric} in {run.early_stopping} validations"
                step_seconds = time.monotonic() - step_start
                out_of_time = deadline is not None and time.monotonic() + step_seconds >= deadline
                signalled, out_of_time = D.any_rank(dist, stop.signal is not None, out_of_time)
                if signalled:
                    stopped = "interrupted"
                elif out_of_time and not last_step and stopped == "completed":
                    stopped = TIME_LIMIT
                if progress.step % run.checkpoint_every == 0 or last_step or stopped != "completed":
                    save(LAST)
                if last_step or stopped != "completed":
                    break
            else:
                progress.epoch += 1
                progress.step_in_epoch = 0
            del stream
    if val_set is None:
        save(BEST)  # no validation to choose by: the final weights
    log.close()
    summary = RunSummary(
        out=out, steps=progress.step, epochs=progress.epoch + progress.step_in_epoch / max(1, len(sampler) or 1),
        best_metric=task.best_metric, best_value=progress.best_value, best_step=progress.best_step,
        final_validation=last_validation, last_train=last_values, wall_s=progress.wall_s,
        structures_per_s=progress.structures_seen / max(progress.wall_s, 1e-9), skipped_steps=progress.skipped_steps,
        stopped=stopped, parameters=n_parameters, trainable_parameters=n_trainable,
    )
    if dist.is_main:
        (out / SUMMARY_FILE).write_text(json.dumps(summary.to_json(), indent=2) + "\n")
        try:
            from molden.train.plots import plot_learning_curves

            plot_learning_curves(out)
        except (MoldenInputError, ImportError):  # no records yet (a run stopped at once), or no matplotlib
            pass
    if stopped == TIME_LIMIT:
        reporter.note(f"time limit of {run.time_limit_minutes:g} min reached at step {progress.step} of {run.steps}: "
                      f"{out / LAST} written; rerun with --resume to continue")
    if stopped == "interrupted":
        raise TrainingStopped(f"interrupted at step {progress.step}: {out / LAST} written; rerun with --resume to continue",
                              interrupted=True)
    if stopped.startswith(f"{progress.bad_steps} consecutive"):
        raise TrainingStopped(f"stopped at step {progress.step} after {stopped}: lower --lr, check the data "
                              f"(molden inspect --verify), or raise --max-bad-steps; {out / LAST} holds the last good state")
    return summary


RESUME_MAY_CHANGE = frozenset({
    "data.path", "data.workers", "optim.accumulate", "run.out", "init", "run.steps", "run.log_every", "run.eval_every",
    "run.checkpoint_every", "run.early_stopping", "run.time_limit_minutes", "run.max_bad_steps", "run.threads",
    "run.device", "run.bf16", "run.deterministic",
})
"""Config fields a resumed run may change: where the data, the run and its (already loaded)
initial backbone live, how long it runs, how often it logs, and where and in what precision
it computes (a checkpoint of N processes resumes on M, of a GPU on the CPU). Every other
field shaped the saved state (weights, optimiser, schedule, EMA, sampler, noise), so a new
value would be overwritten by it or make the run a different one."""


def _flat(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


FIELDS_ADDED = {
    "optim": {"warmup_start_fraction": 0.0, "cosine_cycle_steps": None, "lr_milestones": [], "lr_gamma": 0.5},
    "model": {"vector_decoder": "auto", "graph_decoder": "auto"},
    "s2ef": {"energy_scale": "force_rms", "energy_reference": None},
    "dens.s2ef": {"energy_scale": "force_rms", "energy_reference": None},
}
"""Fields added since runs were first saved, with the value that reproduces how those runs
trained, so that resuming one compares them too (a new value is refused, not applied)."""


def _in_current_fields(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A config saved by an older molden, in today's fields: a run saved before `val_frames`
    existed validated on its training frames; `FIELDS_ADDED` as they behaved before."""
    saved = json.loads(json.dumps(saved))
    data = saved.get("data")
    if isinstance(data, dict) and "val_frames" not in data:
        data["val_frames"] = data.get("frames", "all")
    for section, fields in FIELDS_ADDED.items():
        node = _lookup(saved, section)
        if isinstance(node, dict):
            for name, value in fields.items():
                node.setdefault(name, value)
    return saved


def _lookup(mapping: Mapping[str, Any], key: str) -> Any:
    for part in key.split("."):
        mapping = mapping.get(part) if isinstance(mapping, Mapping) else None
    return mapping


def _check_resume_config(saved: Mapping[str, Any], now: Mapping[str, Any], path: Path) -> None:
    """Refuse a resume whose options differ from the saved run's where the saved state decides
    (a new --lr would be silently replaced by the optimiser's saved one). A field the saved
    config lacks (written by an older molden) is not compared; a section switched on or off
    (Noisy Nodes, a model change) is."""
    saved = _in_current_fields(saved)
    old, new = _flat(saved), _flat(now)
    changed: list[str] = []
    for key in dict.fromkeys([*old, *new]):
        parts = key.split(".")
        # the shortest leading part of `key` that is a value on either side
        leaf = next(p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if p in old or p in new)
        if leaf in old and leaf in new:
            differs = old[leaf] != new[leaf]
        else:  # a value on one side, a section (or nothing: a field added since) on the other
            other = new if leaf in old else old
            differs = any(k.startswith(leaf + ".") for k in other)
        if differs and leaf not in RESUME_MAY_CHANGE and leaf not in changed:
            changed.append(leaf)
    if changed:
        key = changed[0]
        before, after = (_lookup(side, key) for side in (saved, now))
        more = f" (and {len(changed) - 1} more: {', '.join(changed[1:4])})" if len(changed) > 1 else ""
        raise MoldenConfigError(
            f"--resume continues {path} as it was saved, but {key} is {before!r} there and {after!r} now{more}: "
            "resume with the saved value, or start a new run (another --out, or --overwrite)")


def _heads_as_saved(spec: ModelSpec, payload: Mapping[str, Any]) -> ModelSpec:
    """`spec` with the heads' widths of a run saved before heads had one of their own
    (`HeadSpec.hidden_dim`): those heads were as wide as their input, and the run resumes so."""
    try:
        saved_heads = json.loads(payload["model_spec"])["heads"]
    except (KeyError, TypeError, ValueError):
        return spec  # not resumable: `_check_resumable` says why
    heads = {name: head.model_copy(update={"hidden_dim": None})
             if isinstance(saved_heads.get(name), dict) and "hidden_dim" not in saved_heads[name] else head
             for name, head in spec.heads.items()}
    return spec.model_copy(update={"heads": heads})


def _check_resumable(payload: Mapping[str, Any], spec: ModelSpec, path: Path) -> None:
    for key in ("model", "optimizer", "scheduler", "progress", "rng", "model_spec"):
        if key not in payload or payload[key] is None:
            raise MoldenInputError(path, f"not a resumable checkpoint (no {key})")
    saved = ModelSpec.model_validate_json(payload["model_spec"])
    if saved != spec:
        raise MoldenConfigError(f"{path} was written for another model or task than this command builds: "
                                "resume with the run's own options (see config.json in the run folder)")

