"""From a command's config to what the loop runs: the model (as a `ModelSpec`), the training
objective, the validation objective, and the metric that decides the best checkpoint.

Everything fitted on data (target standardisation, per-element references, IS2RE energy
scale, Noisy Nodes' relaxed-position statistics) is fitted on the train split only and saved
in the checkpoint's task description, so evaluation and inference reproduce it exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from molden.data import h5_schema as S
from molden.data.batch import collate
from molden.data.h5_dataset import H5Dataset, open_cache
from molden.errors import MoldenConfigError, MoldenInputError
from molden.graph.verlet import DEFAULT_SKIN_ANGSTROM
from molden.models import keys
from molden.models.gns import N_TAGS
from molden.models.spec import HeadSpec, ModelSpec, backbone_from_preset, graph_head, graph_readout, model_spec, vector_head
from molden.objectives.dens import DeNS
from molden.objectives.denoising import Denoising
from molden.objectives.noisy_nodes import EveryBlock, NoisyNodes, position_delta_statistics
from molden.objectives.objective import LOSS, Objective
from molden.objectives.supervised import GraphTargetLoss, IS2RELoss, IS2RSLoss, S2EFLoss, TargetNormalizer, target_columns
from molden.objectives.units import QM9_ENERGY_TARGETS, report_unit
from molden.train.config import PRETRAIN_PRESET, FinetuneConfig, ModelChoice, PretrainConfig, default_denoising

EXTENSIVE_TARGETS = (*QM9_ENERGY_TARGETS, "zpve", "Cv", "alpha", "r2")
"""QM9 targets that grow with molecule size: decoded by a sum over atoms, the others by a mean."""

DELTA_STATISTICS_STRUCTURES = 2000
"""Train structures the Noisy Nodes relaxed-position statistics are estimated from."""


@dataclass
class TrainingTask:
    spec: ModelSpec
    objective: Objective
    validation: Objective
    best_metric: str
    """The validation metric (lower is better) that decides best.pt and early stopping."""
    description: dict[str, Any] = field(default_factory=dict)
    """JSON-able: kind, targets, fitted normalisation; saved in every checkpoint."""
    modules: list[torch.nn.Module] = field(default_factory=list)
    """Modules the objectives hold (target normalisers): moved to the training device."""
    trim_cutoff_angstrom: float | None = None
    """The model's radius when it is below the cache's: cached graphs are cut to it."""


def _check_tags(dataset: H5Dataset) -> None:
    """Models embed OC20 tags (0 sub-surface, 1 surface, 2 adsorbate); ASE's slab builders
    tag layers 1, 2, 3, … instead, which no tag embedding can index."""
    with open_cache(dataset.path) as f:
        if S.TAGS not in f or f[S.TAGS].shape[0] == 0:
            return
        tags = f[S.TAGS][:]
    bad = np.setdiff1d(np.unique(tags), np.arange(N_TAGS))
    if len(bad):
        raise MoldenInputError(dataset.path, f"atom tags {bad.tolist()[:5]} are not OC20 tags (0 sub-surface, 1 surface, "
                                             "2 adsorbate): ASE layer tags? set atoms.set_tags(...) before preprocess")


def trim_cutoff(backbone, dataset: H5Dataset) -> float | None:
    """The model's cutoff (Å) when below the cache's, else None."""
    cutoff = getattr(backbone, "cutoff_angstrom", None)
    return cutoff if cutoff is not None and cutoff < dataset.cutoff_angstrom - 1e-9 else None


FILTER_SIGMAS = 5.0
"""A cached graph wider than the model's by 2 × 5σ is filtered after noise unless an atom moved
5σ: 1.5e-5 of atoms (the χ₃ tail), so about 3 % of 2,000-atom batches are searched instead."""
MAX_ADVISED_MARGIN_ANGSTROM = 1.0
"""Beyond this margin a wider cache costs more edges than the search it saves (noise of σ above
0.1 Å, such as Noisy Nodes' 0.3 Å on OC20): the hint stays silent there."""


def filter_margin_angstrom(sigma_angstrom: float) -> float:
    """Å beyond the model's cutoff a cache needs for the graph after noise of `sigma_angstrom`
    to be filtered from it nearly always: 2 × 5σ, at least 0.5 Å, rounded up to 0.1 Å."""
    return max(DEFAULT_SKIN_ANGSTROM, math.ceil(round(20 * FILTER_SIGMAS * sigma_angstrom, 6)) / 10)


def graph_search_note(objective, dataset: H5Dataset) -> str | None:
    """A one-line hint when `objective` searches the graph of (nearly) every noised batch
    although a cache stored further beyond its cutoff would let it filter the cached graph
    instead (README); None when it filters, or when its noise moves atoms too far for that."""
    config = getattr(objective, "config", None)
    cutoff, sigma = getattr(config, "cutoff_angstrom", None), getattr(config, "sigma_angstrom", None)
    if not getattr(config, "rebuild_graph", False) or cutoff is None or not sigma:
        return None
    if getattr(config, "trajectory_sampling", "frame") == "interpolate":
        return None  # moves the atoms along the whole relaxation: always searched
    needed = filter_margin_angstrom(sigma)
    wider = dataset.complete_graph_cutoff_angstrom
    if needed > MAX_ADVISED_MARGIN_ANGSTROM or (wider is not None and wider - cutoff >= needed - 1e-9):
        return None
    if wider is None:
        why, how_often = "its graphs are capped by --max-neighbors", "every step"
    elif wider > cutoff:
        why, how_often = f"its graphs stop {wider - cutoff:g} Å beyond the model's, below 10σ", "most steps"
    else:
        why, how_often = f"its graphs stop at {wider:g} Å", "every step"
    return (f"the graph after noise (σ {sigma:g} Å) is searched at {how_often} ({dataset.path.name}: {why}); "
            f"a cache preprocessed with --cutoff {cutoff + needed:g} and no --max-neighbors lets it be filtered "
            "from the cached graph instead (README)")


def _backbone(choice, dataset: H5Dataset, **forced):
    _check_tags(dataset)
    config = backbone_from_preset(choice.preset, **{**choice.changes, **forced})
    cutoff = getattr(config, "cutoff_angstrom", None)
    if cutoff is not None and cutoff > dataset.cutoff_angstrom + 1e-9:
        raise MoldenConfigError(
            f"model {choice.preset} has a {cutoff:g} Å cutoff but the cache's graphs stop at {dataset.cutoff_angstrom:g} Å: "
            f"preprocess with --cutoff {cutoff:g} or set the model's cutoff_angstrom"
        )
    return config


def pretrain_task(config: PretrainConfig, dataset: H5Dataset) -> TrainingTask:
    """Denoising pre-training: a noise head (and an atom-type head with masking)."""
    backbone = _backbone(config.model, dataset)
    heads = {keys.NOISE: vector_head(backbone, config.model.vector_decoder)}
    if config.denoising.mask_probability > 0:
        heads[keys.ATOM_LOGITS] = HeadSpec(kind="atom_type")
    objective = Denoising(config.denoising)
    return TrainingTask(
        spec=model_spec(backbone, heads, preset_name=config.model.preset),
        objective=objective, validation=objective, best_metric="position",
        description={"kind": "denoising", "sigma_angstrom": config.denoising.sigma_angstrom},
        trim_cutoff_angstrom=trim_cutoff(backbone, dataset),
    )


def _train_array(dataset: H5Dataset, name: str) -> np.ndarray:
    """A per-structure array of the cache restricted to the training structures."""
    with open_cache(dataset.path) as f:
        if name not in f:
            raise MoldenInputError(dataset.path, f"the cache has no {name}, which this task trains on")
        return f[name][:][dataset.indices]


def _energy_residual_std(path: Path) -> float:
    """The cache's `energy_residual_std_ev`, computed from the file as preprocessing now
    stores it (on the structures the references were fitted on)."""
    from molden.data.statistics import energy_residual_std, fitted_structures

    with open_cache(path) as f:
        if S.ENERGY not in f or "element_reference_energy_ev" not in f[S.STATS]:
            return float("nan")  # no energies to scale: S2EFConfig.with_statistics falls back to 1 eV
        fit, _ = fitted_structures(f)
        return energy_residual_std(f, f[S.STATS]["element_reference_energy_ev"][:], fit)


def energy_reference_offsets(f, column: str, structures: np.ndarray | None = None) -> np.ndarray:
    """[S] eV: the target `column` of the open cache `f`, which an S2EF model with
    `energy_reference` subtracts from every energy; refused in one line when the cache lacks
    energies or the column, or one of `structures` (default all) has an energy but no value."""
    path = f.filename
    names = json.loads(f.attrs["target_names"]) if S.TARGETS in f else []
    if S.ENERGY not in f:
        raise MoldenInputError(path, f"the cache has no energies to subtract energy_reference {column!r} from")
    if column not in names:
        raise MoldenInputError(path, f"energy_reference {column!r} is not a target of the cache (its targets: "
                                     f"{names}): OC20 S2EF caches hold reference_energy")
    offset = f[S.TARGETS][:, names.index(column)].astype(np.float64)
    checked = np.zeros(len(offset), dtype=bool)
    checked[slice(None) if structures is None else structures] = True
    has_energy = np.isfinite(f[S.ENERGY][:]) & checked
    missing = np.flatnonzero(has_energy & ~np.isfinite(offset))
    if len(missing):
        system = f[S.SYSTEM_ID].asstr()[missing[0]]
        raise MoldenInputError(path, f"no {column} to subtract (energy_reference) for {len(missing)} of the "
                                     f"{int(has_energy.sum())} structures with an energy",
                               f"structure {missing[0]} (system {system})")
    return offset


def _referenced_energy_statistics(path: Path, column: str) -> dict[str, Any]:
    """Per-element references and σ_E of the energies less the target `column` (every structure
    of the cache checked: training and validation both subtract it)."""
    from molden.data.statistics import referenced_energy_statistics

    with open_cache(path) as f:
        return referenced_energy_statistics(f, energy_reference_offsets(f, column))


def _delta_statistics(dataset: H5Dataset, sigma: float) -> tuple[tuple[float, float, float], float]:
    rng = np.random.default_rng(0)
    pick = np.sort(rng.permutation(len(dataset))[:DELTA_STATISTICS_STRUCTURES])
    batches = (collate([dataset[int(i)] for i in chunk], dtype=torch.float64) for chunk in np.array_split(pick, max(1, len(pick) // 64)))
    return position_delta_statistics(batches, sigma)


def _require_fields(config: FinetuneConfig, dataset: H5Dataset) -> None:
    """Refuse, before anything is written, a task whose labels the cache does not hold (QM9
    molecules have no forces or relaxed structures)."""
    needed = {"is2rs": ("relaxed_positions", "--task is2rs"), "s2ef": ("forces", "--task s2ef")}.get(config.task)
    if config.noisy_nodes is not None and config.noisy_nodes.node_target == "relaxed_positions":
        needed = ("relaxed_positions", "--noisy-nodes-target relaxed_positions")
    if needed is not None and needed[0] not in dataset.optional_fields:
        raise MoldenInputError(dataset.path, f"the cache has no {needed[0]}, which {needed[1]} trains on "
                               "(a cache of trajectories: molden preprocess emt / oc20 / ase)")


def finetune_task(config: FinetuneConfig, dataset: H5Dataset) -> TrainingTask:
    """Supervised task (qm9, is2re, is2rs, s2ef) with Noisy Nodes or DeNS when configured."""
    _require_fields(config, dataset)
    nn_config = config.noisy_nodes
    forced = {"force_encoding": True} if config.dens is not None else {}
    backbone = _backbone(config.model, dataset, **forced)
    heads: dict[str, HeadSpec] = {}
    description: dict[str, Any] = {"kind": config.task}
    modules: list[torch.nn.Module] = []
    conservative = False

    if config.task == "qm9":
        subset = dataset.indices if config.data.train_size is not None else None
        normalizer = TargetNormalizer.from_cache(dataset.path, config.targets, structures=subset)
        modules.append(normalizer)
        extensive = any(t in EXTENSIVE_TARGETS for t in config.targets)
        heads[keys.TARGETS] = graph_head(backbone, config.model.graph_decoder, readout=graph_readout(backbone, extensive),
                                         n_out=len(config.targets), squeeze=False)
        primary = GraphTargetLoss(normalizer)
        description.update(targets=list(config.targets), normalizer={
            "mean": normalizer.mean.tolist(), "std": normalizer.std.tolist(),
            "element_reference": normalizer.element_reference.tolist()})
        unit = report_unit(config.targets[0])
        best = f"mae_{config.targets[0]}_{unit.unit}" if len(config.targets) == 1 else "targets_mse"
    elif config.task == "is2re":
        name = S.RELAXED_ENERGY if config.is2re_target is None else S.TARGETS
        values = _train_array(dataset, name)
        if config.is2re_target is not None:
            values = values[:, target_columns(dataset.target_names, [config.is2re_target])[0]]
        mean, std = float(np.nanmean(values)), float(np.nanstd(values)) or 1.0
        heads[keys.TARGETS] = graph_head(backbone, config.model.graph_decoder, readout=graph_readout(backbone, True),
                                         squeeze=False)
        primary = IS2RELoss(mean_ev=mean, std_ev=std, target_name=config.is2re_target)
        description.update(energy_mean_ev=mean, energy_std_ev=std, target=config.is2re_target or "relaxed_energy")
        best = "energy_mae_mev"
    elif config.task == "is2rs":
        heads[keys.POSITION_DELTA] = vector_head(backbone, config.model.vector_decoder)
        primary = IS2RSLoss()
        best = "position_distance_mae_angstrom"
    else:  # s2ef
        conservative = config.model.conservative_forces
        s2ef = config.dens.s2ef if config.dens is not None else config.s2ef
        statistics = dataset.statistics()
        if s2ef.energy_reference is not None:
            statistics.update(_referenced_energy_statistics(dataset.path, s2ef.energy_reference))
        elif s2ef.energy_scale == "energy_std" and "energy_residual_std_ev" not in statistics:
            statistics["energy_residual_std_ev"] = _energy_residual_std(dataset.path)  # a cache from before it was stored
        reference = statistics.get("element_reference_energy_ev")
        heads[keys.ENERGY] = graph_head(backbone, config.model.graph_decoder, readout="sum", element_reference=(
            None if reference is None else np.nan_to_num(np.asarray(reference, dtype=np.float64)).tolist()))
        if not conservative:
            heads[keys.FORCES] = vector_head(backbone, config.model.vector_decoder)
        s2ef = s2ef.with_statistics(statistics)
        primary = S2EFLoss(s2ef)
        description.update(energy_scale_ev=s2ef.energy_scale_ev, force_scale_ev_per_angstrom=s2ef.force_scale_ev_per_angstrom,
                           energy_trained=s2ef.energy_coefficient > 0, energy_reference=s2ef.energy_reference)
        best = "forces_mae_mev_per_angstrom" if s2ef.force_coefficient > 0 else "energy_mae_mev"

    objective: Objective = primary
    if config.dens is not None:
        heads[keys.NOISE] = vector_head(backbone, config.model.vector_decoder)
        objective = DeNS(config.dens.model_copy(update={"s2ef": s2ef}))
        description["dens"] = config.dens.model_dump(mode="json")
    elif nn_config is not None:
        if nn_config.node_target == "relaxed_positions":
            if not np.isfinite(nn_config.position_delta_std_angstrom) or nn_config.position_delta_std_angstrom == 1.0:
                mean, std = _delta_statistics(dataset, nn_config.sigma_angstrom)
                nn_config = nn_config.model_copy(update={"position_delta_mean_angstrom": mean, "position_delta_std_angstrom": std})
            heads[keys.POSITION_DELTA] = vector_head(backbone, config.model.vector_decoder)
        else:
            heads[keys.NOISE] = vector_head(backbone, config.model.vector_decoder)
        objective = NoisyNodes(nn_config, primary)
        description["noisy_nodes"] = nn_config.model_dump(mode="json")
    elif getattr(config, "decode_every_block", False):
        objective = EveryBlock(primary)
    return TrainingTask(
        spec=model_spec(backbone, heads, conservative_forces=conservative, preset_name=config.model.preset),
        objective=objective, validation=primary, best_metric=best, description=description, modules=modules,
        trim_cutoff_angstrom=trim_cutoff(backbone, dataset),
    )


def fill_cutoffs(data: dict[str, Any], sections: tuple[str, ...]) -> dict[str, Any]:
    """A raw config mapping with the graph-rebuild cutoff of each objective section in
    `sections` (that exists, or "denoising", which always does) set, when the user gave none,
    to the model's cutoff or the cache's, whichever is smaller: the graph rebuilt after noise
    holds the edges the model reads from a clean (trimmed) cached graph."""
    path = (data.get("data") or {}).get("path")
    if path is None or not Path(path).is_file():
        return data  # validation reports the missing cache
    with open_cache(path) as f:
        cutoff = float(f.attrs["cutoff_angstrom"])
    model = data.get("model") or {}
    try:
        default = PRETRAIN_PRESET if "denoising" in sections else ModelChoice().preset
        backbone = backbone_from_preset(model.get("preset") or default, **(model.get("changes") or {}))
        cutoff = min(cutoff, float(getattr(backbone, "cutoff_angstrom", cutoff)))
    except (MoldenConfigError, ValueError, TypeError):
        pass  # validation reports a bad preset or change
    out = dict(data)
    for section in sections:
        if out.get(section) is not None or (section == "denoising" and section not in out):
            values = dict(out.get(section) or {})
            if section == "denoising":  # the paper's settings under what the user gave
                values = {**default_denoising(cutoff).model_dump(), **values}
            values.setdefault("cutoff_angstrom", cutoff)
            out[section] = values
    return out


def check_metric(name: str, metrics: dict[str, float]) -> None:
    if name not in metrics and name != LOSS:
        raise MoldenConfigError(f"the validation metrics have no {name!r}: {sorted(metrics)}")


def validation_objective(config: PretrainConfig | FinetuneConfig, description: dict[str, Any]) -> Objective:
    """The validation objective of a trained run, rebuilt from its config and the task
    description its checkpoint saved (the normalisation fitted at training time, not refitted
    on whatever cache is evaluated)."""
    if isinstance(config, PretrainConfig):
        return Denoising(config.denoising)
    kind = description.get("kind", config.task)
    if kind == "qm9":
        n = description["normalizer"]
        normalizer = TargetNormalizer(description["targets"], torch.tensor(n["mean"]), torch.tensor(n["std"]),
                                      torch.tensor(n["element_reference"]))
        return GraphTargetLoss(normalizer)
    if kind == "is2re":
        return IS2RELoss(mean_ev=description["energy_mean_ev"], std_ev=description["energy_std_ev"],
                         target_name=config.is2re_target)
    if kind == "is2rs":
        return IS2RSLoss()
    s2ef = config.dens.s2ef if config.dens is not None else config.s2ef
    return S2EFLoss(s2ef.model_copy(update={"energy_scale_ev": description["energy_scale_ev"],
                                           "force_scale_ev_per_angstrom": description["force_scale_ev_per_angstrom"]}))
