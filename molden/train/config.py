"""One pydantic config per training command, shared by the CLI and the library.

`molden pretrain` takes `PretrainConfig`, `molden finetune` `FinetuneConfig`; both hold the
same `DataConfig`, `OptimConfig` and `RunConfig`. A YAML or TOML file fills any of them
(`load_config`), and each command-line option overrides one field; the resolved config is
printed at start and saved beside every checkpoint (`config.json`).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from molden.errors import MoldenConfigError, MoldenInputError
from molden.objectives.dens import DeNSConfig
from molden.objectives.denoising import DenoisingConfig
from molden.objectives.noisy_nodes import NoisyNodesConfig
from molden.objectives.supervised import S2EFConfig

Task = Literal["qm9", "is2re", "is2rs", "s2ef"]
STARTS_FROM_INITIAL = ("is2re", "is2rs")
"""Tasks whose input is a trajectory's initial structure (OC20's IS2RE and IS2RS)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    """Which cache, which splits, and how structures are batched."""

    path: Path = Field(description="the .h5 cache written by `molden preprocess`")
    train_split: str = Field("train", description="split trained on")
    val_split: str | None = Field("val", description="split validated on (None: no validation)")
    train_size: int | None = Field(None, ge=1, description="train on a seeded random subset of this many structures of the train split")
    frames: Literal["all", "initial", "relaxed"] = Field("all", description="all structures, or only the first (initial) or last (relaxed, equilibrium) frame of each system's trajectory")
    val_frames: Literal["all", "initial", "relaxed"] | None = Field(
        None, description="the frames of val_split validated on (None: as frames; finetune sets 'initial' for is2re and "
        "is2rs, whose input is the initial structure)")
    max_graphs: int | None = Field(32, ge=1, description="structures per batch at most (per process; the global batch is this × processes × accumulation)")
    max_atoms: int | None = Field(None, ge=1, description="atoms per batch at most")
    max_edges: int | None = Field(None, ge=1, description="edges of the cached graphs per batch at most")
    workers: int = Field(0, ge=0, description="DataLoader worker processes (0: read in the training process)")

    @model_validator(mode="after")
    def _a_budget(self) -> DataConfig:
        if self.max_graphs is None and self.max_atoms is None and self.max_edges is None:
            raise ValueError("set at least one of max_graphs, max_atoms, max_edges")
        return self

    @property
    def validation_frames(self) -> str:
        return self.val_frames or self.frames


class OptimConfig(_Strict):
    """Optimiser, learning-rate schedule, clipping and EMA (Noisy Nodes App. Tables 9-10)."""

    optimizer: Literal["adam", "adamw"] = Field("adam", description="Adam (Noisy Nodes) or AdamW (decoupled weight decay)")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam β1")
    beta2: float = Field(0.95, ge=0, lt=1, description="Adam β2 (0.95 in Noisy Nodes and Pre-training via Denoising)")
    weight_decay: float = Field(0.0, ge=0, description="weight decay")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up from warmup_start_fraction × lr to lr over these steps")
    warmup_start_fraction: float = Field(
        0.0, ge=0, le=1, description="where the warm-up's line starts, as a fraction of lr: step k of warmup_steps W takes "
        "start + (1 − start)(k + 1)/W (Noisy Nodes Table 10: start 3e-7 of peak 1e-4, i.e. 0.003; 0: from zero)")
    schedule: Literal["cosine", "constant", "multistep"] = Field(
        "cosine", description="after warm-up: cosine decay to final_lr_fraction × lr, constant, or multistep (× lr_gamma at "
        "each of lr_milestones, as ForceNet's halving)")
    final_lr_fraction: float = Field(0.0, ge=0, le=1, description="cosine: learning rate at the cosine's end, as a fraction of lr")
    cosine_cycle_steps: int | None = Field(
        None, ge=1, description="cosine: the step at which it reaches final_lr_fraction, warm-up included (Pre-training via "
        "Denoising Table 3: a 5e5-step cycle in a 3e5-step run); later steps stay there (None: the run's steps)")
    lr_milestones: list[int] = Field(default_factory=list, description="multistep: steps at which the learning rate is multiplied by lr_gamma")
    lr_gamma: float = Field(0.5, gt=0, le=1, description="multistep: the factor at each milestone")

    @model_validator(mode="after")
    def _schedule_fields(self) -> OptimConfig:
        if self.schedule == "multistep" and not self.lr_milestones:
            raise ValueError("schedule multistep needs lr_milestones (steps at which the learning rate is multiplied by lr_gamma)")
        if self.lr_milestones and self.schedule != "multistep":
            raise ValueError(f"lr_milestones are for schedule multistep, not {self.schedule}")
        if self.lr_milestones != sorted(set(self.lr_milestones)) or any(m < 1 for m in self.lr_milestones):
            raise ValueError("lr_milestones must be increasing positive steps")
        if self.cosine_cycle_steps is not None and self.schedule != "cosine":
            raise ValueError(f"cosine_cycle_steps is for schedule cosine, not {self.schedule}")
        if self.cosine_cycle_steps is not None and self.cosine_cycle_steps <= self.warmup_steps:
            raise ValueError(f"cosine_cycle_steps {self.cosine_cycle_steps} must be longer than warmup_steps {self.warmup_steps}")
        return self
    grad_clip_norm: float | None = Field(1.0, gt=0, description="clip the global gradient norm to this (None: no clipping)")
    ema_decay: float | None = Field(0.9999, gt=0, lt=1, description="EMA decay (None: no EMA); the step rule min(decay, (1+t)/(10+t)) of Noisy Nodes")
    accumulate: int = Field(1, ge=1, description="batches whose gradients are averaged per optimiser step (per process)")


class RunConfig(_Strict):
    """Length, logging, checkpoints, device and precision of a run."""

    out: Path = Field(description="run folder: checkpoints, config.json, metrics.jsonl/.csv, plots")
    seed: int = Field(0, description="seed of the model's initialisation, the data order and the corruption")
    steps: int = Field(1000, ge=1, description="optimiser steps in the whole run")
    log_every: int = Field(20, ge=1, description="write training metrics every this many steps")
    eval_every: int = Field(200, ge=1, description="validate every this many steps (and at the end)")
    checkpoint_every: int = Field(200, ge=1, description="write last.pt every this many steps (and at the end)")
    early_stopping: int | None = Field(None, ge=1, description="stop after this many validations without a better best")
    device: Literal["cpu", "cuda", "auto"] = Field("auto", description="where to train (auto: cuda when available)")
    dtype: Literal["float32", "float64"] = Field("float32", description="parameter and input precision")
    bf16: bool = Field(False, description="bfloat16 autocast of the forward pass (CUDA only)")
    deterministic: bool = Field(False, description="torch deterministic algorithms (bit-reproducible, slower on GPU)")
    time_limit_minutes: float | None = Field(
        None, ge=0, description="stop cleanly with last.pt before this invocation has run this long (a cluster job's "
        "wall-clock budget); --resume continues; 0 or None: no limit")
    max_bad_steps: int = Field(10, ge=1, description="stop after this many consecutive steps with a non-finite loss (each is skipped)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")


class ModelChoice(_Strict):
    """The backbone preset and the fields changed from it."""

    preset: str = Field("gns_qm9_cpu", description="a preset name (`molden models` lists them)")
    changes: dict[str, Any] = Field(default_factory=dict, description="backbone fields changed from the preset, e.g. {block_iterations: 3}")
    conservative_forces: bool = Field(False, description="forces as −∂E/∂positions instead of a direct head (S2EF)")
    vector_decoder: Literal["auto", "edges", "nodes"] = Field(
        "auto", description="how per-atom vectors (noise, position targets, direct forces) are decoded: edges (GNS's edge "
        "readout), nodes (an MLP of each atom's latents, Noisy Nodes §3.2's node decoder), auto (edges for GNS, else nodes)")
    graph_decoder: Literal["auto", "one_mlp", "two_mlps", "readout_mlp"] = Field(
        "auto", description="how per-structure values (energies, QM9 targets) are decoded: one_mlp (one MLP of each atom's "
        "latents; for GNS the encoder's plus the processor's), two_mlps (Noisy Nodes §3.2: an MLP of the processor's "
        "latents plus one of the encoder's; GNS only), readout_mlp (Pre-training via Denoising App. B.1: an MLP of each "
        "atom's latents, summed or averaged, then another MLP), auto (one_mlp)")


def default_denoising(cutoff_angstrom: float) -> DenoisingConfig:
    """Pre-training via Denoising App. H (Table 3): σ = 0.02 Å, mask probability 0.75, atom-type
    loss weight 4; without its 20-neighbour cap, so the rebuilt graph keeps every edge the
    cache's graph has within the cutoff."""
    return DenoisingConfig(sigma_angstrom=0.02, position_loss_weight=1.0, mask_probability=0.75,
                           atom_type_loss_weight=4.0, cutoff_angstrom=cutoff_angstrom)


PRETRAIN_PRESET = "gns_tat_cpu"
"""Pre-training's backbone when none is named (GNS-TAT, Pre-training via Denoising §4)."""


class PretrainConfig(_Strict):
    """`molden pretrain`: denoising pre-training on equilibrium structures (Pre-training via
    Denoising §3.2)."""

    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig
    model: ModelChoice = Field(default_factory=lambda: ModelChoice(preset=PRETRAIN_PRESET))
    denoising: DenoisingConfig = Field(default_factory=lambda: default_denoising(5.0))

    @model_validator(mode="before")
    @classmethod
    def _pretraining_preset(cls, data: Any) -> Any:
        """A `model` given without a preset (only `changes`) changes pre-training's preset, not
        ModelChoice's generic default."""
        model = data.get("model") if isinstance(data, dict) else None
        if isinstance(model, dict) and model.get("preset") is None:
            data = {**data, "model": {**model, "preset": PRETRAIN_PRESET}}
        return data


class FinetuneConfig(_Strict):
    """`molden finetune`: a supervised task, optionally with Noisy Nodes or DeNS, optionally
    from a pre-trained backbone."""

    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig
    model: ModelChoice = Field(default_factory=ModelChoice)
    task: Task = Field("qm9", description="qm9 (graph targets), is2re, is2rs or s2ef (energy + forces)")
    targets: list[str] = Field(default_factory=lambda: ["homo"], description="qm9: the target names trained on")
    is2re_target: str | None = Field(None, description="is2re: a target column instead of relaxed_energy (e.g. adsorption_energy)")
    noisy_nodes: NoisyNodesConfig | None = Field(None, description="Noisy Nodes auxiliary loss (None: off)")
    decode_every_block: bool = Field(
        False, description="without Noisy Nodes: train on the average over every block iteration's decoding, as Noisy "
        "Nodes does (its clean control); with Noisy Nodes this is always so")
    dens: DeNSConfig | None = Field(None, description="s2ef: DeNS (None: off)")
    s2ef: S2EFConfig = Field(default_factory=S2EFConfig, description="s2ef: energy and force terms (DeNS carries its own)")
    init: Path | None = Field(None, description="initialise the backbone from this checkpoint (pre-training)")
    freeze_backbone: bool = Field(False, description="train the heads only (with init)")

    @model_validator(mode="before")
    @classmethod
    def _node_target_of_the_task(cls, data: Any) -> Any:
        """Noisy Nodes without a node target predicts, on IS2RE trajectories, the relaxed
        structure (Noisy Nodes §3.3, OC20), elsewhere the noise; from a config file as from
        the command line."""
        nn = data.get("noisy_nodes") if isinstance(data, dict) else None
        if isinstance(nn, dict) and nn.get("node_target") is None and data.get("task") == "is2re":
            data = {**data, "noisy_nodes": {**nn, "node_target": "relaxed_positions"}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneConfig:
        if self.dens is not None and self.task != "s2ef":
            raise ValueError("DeNS (--dens) is an s2ef option: add --task s2ef")
        if self.dens is not None and self.noisy_nodes is not None:
            raise ValueError("use Noisy Nodes (--noisy-nodes-*) or DeNS (--dens), not both")
        if self.noisy_nodes is not None and self.task in ("s2ef", "is2rs"):
            raise ValueError(f"Noisy Nodes (--noisy-nodes-*) is for --task qm9 and is2re, not {self.task} (s2ef: --dens)")
        if self.is2re_target is not None and self.task != "is2re":
            raise ValueError(f"--is2re-target is an is2re option (the task is {self.task})")
        if self.freeze_backbone and self.init is None:
            raise ValueError("--freeze-backbone needs --init (a pre-trained checkpoint)")
        if self.data.val_frames is None and self.task in STARTS_FROM_INITIAL:
            # The metric of IS2RE / IS2RS is the prediction from the initial structure: validating
            # on every trajectory frame (all that is trained on) would pick best.pt by another task.
            self.data.val_frames = "initial"
        return self


C = TypeVar("C", bound=BaseModel)


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML, TOML or JSON config file; one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise MoldenInputError(path, "no such config file")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as error:  # noqa: BLE001 - every parser's own error, as one line
        raise MoldenInputError(path, f"not valid {path.suffix.lstrip('.') or 'YAML'}: {str(error).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MoldenInputError(path, "a config file must hold a mapping of options")
    return data


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` applied, nested mappings merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls: type[C], path: Path | None = None, overrides: dict[str, Any] | None = None) -> C:
    """`cls` from the file at `path` (if any) with `overrides` on top (the command line wins)."""
    data = read_config_file(path) if path is not None else {}
    data = merge(data, overrides or {})
    try:
        return cls.model_validate(data)
    except ValidationError as error:
        if path is None:
            raise
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise MoldenConfigError(f"{path}: {where}: {first['msg']}") from None


def dotted(overrides: dict[str, Any]) -> dict[str, Any]:
    """{"run.steps": 5} → {"run": {"steps": 5}}; None values (options not given) are dropped."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out
