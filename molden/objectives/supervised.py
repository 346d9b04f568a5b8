"""Supervised losses: QM9 graph targets, IS2RE relaxed energy, IS2RS relaxed positions and S2EF
energy + forces (with ForceNet's fixed-atom weight and rotation augmentation).

Each loss is a full `Objective` by itself (`corrupt` leaves the batch as it is, or rotates it
for ForceNet's augmentation) and the primary term of Noisy Nodes and DeNS, through the same
`loss(predictions, batch, targets) -> dict` ("loss" the weighted total, other keys the terms
and metrics, their units in their names).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from molden.data import h5_schema as S
from molden.data.batch import Batch
from molden.data.statistics import N_ELEMENTS, composition_blocks, fitted_structures
from molden.errors import MoldenConfigError, MoldenInputError
from molden.models import keys
from molden.objectives.displacement import minimum_image_displacement
from molden.objectives.objective import LOSS
from molden.objectives.rotation import random_rotations, rotated_batch
from molden.objectives.units import EV_TO_MEV, QM9_ENERGY_TARGETS, report_unit

VectorLoss = Literal["l2mae", "mae", "mse"]
ScalarLoss = Literal["mae", "mse"]
Rotation = Literal["none", "vertical", "any"]


# ----------------------------------------------------------------- per-atom and per-graph errors
def vector_error(difference: Tensor, kind: VectorLoss) -> Tensor:
    """[N] per-atom error of [N, 3] differences: "l2mae" the Euclidean norm (fairchem's S2EF
    force loss), "mae" the mean absolute component, "mse" the squared norm."""
    if kind == "l2mae":
        return torch.linalg.vector_norm(difference, dim=-1)
    if kind == "mae":
        return difference.abs().mean(dim=-1)
    return difference.square().sum(dim=-1)


def scalar_error(difference: Tensor, kind: ScalarLoss) -> Tensor:
    return difference.abs() if kind == "mae" else difference.square()


def weighted_atom_mean(values: Tensor, weights: Tensor) -> Tensor:
    """Σ w·v / Σ w over atoms (0 when every weight is 0, never NaN)."""
    return (values * weights).sum() / weights.sum().clamp_min(torch.finfo(values.dtype).tiny)


def atom_weights(batch: Batch, fixed_atom_weight: float, dtype: torch.dtype) -> Tensor:
    """[N] loss weight of each atom: 1 for free atoms, `fixed_atom_weight` for fixed ones."""
    return torch.where(batch.fixed, fixed_atom_weight, 1.0).to(dtype)


def require_field(value: Tensor | None, what: str) -> Tensor:
    if value is None:
        raise MoldenInputError(None, f"the batch has no {what}, which this objective trains on")
    return value


# ----------------------------------------------------------------- QM9 (graph) targets
def target_columns(available: Sequence[str], names: Sequence[str]) -> list[int]:
    missing = [n for n in names if n not in available]
    if missing:
        raise MoldenConfigError(f"targets {missing} are not in the data, which has {list(available)}")
    return [list(available).index(n) for n in names]


class TargetNormalizer(nn.Module):
    """Maps graph targets in source units ↔ normalised: y' = (y − Σ_atoms ref[t, Z] − mean[t]) / std[t].

    `element_reference` [T, 119] holds per-element reference values (zero rows for targets
    without one), so energy-like targets are standardised after removing the per-atom energy
    fitted by linear regression (Noisy Nodes §5.2). Buffers follow the module's device.
    """

    def __init__(self, names: Sequence[str], mean: Tensor, std: Tensor, element_reference: Tensor | None = None):
        super().__init__()
        self.names = tuple(names)
        mean = torch.as_tensor(mean, dtype=torch.float64)
        std = torch.as_tensor(std, dtype=torch.float64)
        self.register_buffer("mean", mean)
        self.register_buffer("std", torch.where(std > 0, std, torch.ones_like(std)))  # constant target
        if element_reference is None:
            element_reference = torch.zeros(len(self.names), N_ELEMENTS, dtype=torch.float64)
        self.register_buffer("element_reference", torch.nan_to_num(torch.as_tensor(element_reference, dtype=torch.float64)))

    def offset(self, batch: Batch, like: Tensor) -> Tensor:
        """[B, T] Σ over each graph's atoms of the element references, source units."""
        per_atom = self.element_reference.to(like)[:, batch.numbers].T  # [N, T]
        return torch.zeros(batch.num_graphs, len(self.names), dtype=like.dtype, device=like.device).index_add_(0, batch.batch, per_atom)

    def normalize(self, values: Tensor, batch: Batch) -> Tensor:
        """[B, T] source units → normalised (dimensionless)."""
        return (values - self.offset(batch, values) - self.mean.to(values)) / self.std.to(values)

    def denormalize(self, normalized: Tensor, batch: Batch) -> Tensor:
        """[B, T] normalised → source units."""
        return normalized * self.std.to(normalized) + self.mean.to(normalized) + self.offset(batch, normalized)

    @classmethod
    def from_statistics(cls, statistics: Mapping, dataset_target_names: Sequence[str], names: Sequence[str] | None = None) -> TargetNormalizer:
        """Plain standardisation with the cache's `targets_mean`/`targets_std` (fitted on the
        train split; `H5Dataset.statistics()`), for `names` (default all) of the dataset's
        `target_names`. No element references: the cache fits those to `energy` only."""
        names = list(dataset_target_names if names is None else names)
        columns = target_columns(dataset_target_names, names)
        return cls(names, torch.as_tensor(np.asarray(statistics["targets_mean"])[columns]),
                   torch.as_tensor(np.asarray(statistics["targets_std"])[columns]))

    @classmethod
    def from_cache(cls, path: str | Path, names: Sequence[str] | None = None, *,
                   reference_targets: Sequence[str] = QM9_ENERGY_TARGETS,
                   structures: np.ndarray | None = None) -> TargetNormalizer:
        """Standardisation fitted on the cache's train split (all structures without one, as
        `/stats`), or on the cache indices `structures` when given (a `--train-size` subset:
        labels outside it are not the user's to use), with per-element references fitted by
        least squares on composition for the targets in `reference_targets` (QM9 U0, U, H, G)
        and mean/std of what remains."""
        from molden.data.h5_dataset import open_cache  # the cache reader, not needed otherwise

        with open_cache(path) as f:
            available = json.loads(f.attrs["target_names"])
            names = list(available if names is None else names)
            columns = target_columns(available, names)
            fit, _ = fitted_structures(f)
            if structures is not None:
                fit = np.zeros_like(fit)
                fit[np.asarray(structures)] = True
            values = f[S.TARGETS][:][:, columns]
            present = np.flatnonzero(f[f"{S.STATS}/element_counts"][:])
            composition = np.concatenate([c[:, present] for _, c in composition_blocks(f)]).astype(np.float64)
        reference = np.zeros((len(names), N_ELEMENTS))
        for t, name in enumerate(names):
            ok = fit & np.isfinite(values[:, t])
            if name in reference_targets and ok.any():
                # minimum-norm least squares, as molden.data.statistics fits energies
                reference[t, present] = np.linalg.lstsq(composition[ok], values[ok, t], rcond=None)[0]
        residual = values - composition @ reference[:, present].T
        return cls(names, torch.as_tensor(np.nanmean(residual[fit], axis=0)), torch.as_tensor(np.nanstd(residual[fit], axis=0)),
                   torch.as_tensor(reference))


@dataclass
class GraphTargetLoss:
    """QM9-style graph targets (Noisy Nodes §5 "Loss": mean squared error on mean/std-normalised
    targets). The model predicts `keys.TARGETS` [B, T] normalised; MAE metrics are reported per
    target in the paper's units (`units.report_unit`: meV for QM9 energies)."""

    normalizer: TargetNormalizer
    loss_kind: ScalarLoss = "mse"

    @property
    def needs_all_blocks(self) -> bool:
        return False

    def corrupt(self, batch: Batch, generator: torch.Generator) -> tuple[Batch, dict[str, Tensor]]:
        """The batch unchanged; targets {"targets": [B, T] source units, "targets_normalized"}."""
        values = require_field(batch.targets, "targets")[:, target_columns(batch.target_names, self.normalizer.names)]
        return batch, {keys.TARGETS: values, "targets_normalized": self.normalizer.normalize(values, batch)}

    def loss(self, predictions: Mapping[str, Tensor], batch: Batch, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        predicted = predictions[keys.TARGETS].reshape(batch.num_graphs, -1)
        total = scalar_error(predicted - targets["targets_normalized"], self.loss_kind).mean()
        out = {LOSS: total, f"targets_{self.loss_kind}": total.detach()}
        with torch.no_grad():
            error = (self.normalizer.denormalize(predicted.detach(), batch) - targets[keys.TARGETS]).abs().mean(dim=0)
            for t, name in enumerate(self.normalizer.names):
                unit = report_unit(name)
                out[f"mae_{name}_{unit.unit}"] = error[t] * unit.factor
        return out


# ----------------------------------------------------------------- OC20 IS2RE / IS2RS
@dataclass
class IS2RELoss:
    """Relaxed energy from the initial structure (OC20 IS2RE): `keys.TARGETS` [B, 1] predicts
    (E − mean_ev) / std_ev of `batch.relaxed_energy`, or of the target column `target_name`
    (e.g. "reference_energy", "adsorption_energy"), in eV."""

    mean_ev: float = 0.0
    std_ev: float = 1.0
    target_name: str | None = None
    loss_kind: ScalarLoss = "mse"

    @property
    def needs_all_blocks(self) -> bool:
        return False

    def corrupt(self, batch: Batch, generator: torch.Generator) -> tuple[Batch, dict[str, Tensor]]:
        if self.target_name is None:
            energy = require_field(batch.relaxed_energy, "relaxed_energy")
        else:
            energy = require_field(batch.targets, "targets")[:, target_columns(batch.target_names, [self.target_name])[0]]
        return batch, {"relaxed_energy": energy}

    def loss(self, predictions: Mapping[str, Tensor], batch: Batch, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        predicted = predictions[keys.TARGETS].reshape(batch.num_graphs)
        target = (targets["relaxed_energy"] - self.mean_ev) / self.std_ev
        total = scalar_error(predicted - target, self.loss_kind).mean()
        mae_ev = ((predicted.detach() - target) * self.std_ev).abs().mean()
        return {LOSS: total, f"energy_{self.loss_kind}": total.detach(), "energy_mae_mev": mae_ev * EV_TO_MEV}


@dataclass
class IS2RSLoss:
    """Relaxed positions from the initial structure (OC20 IS2RS) as relative targets (Noisy
    Nodes §3.3): `keys.POSITION_DELTA` [N, 3] predicts Δ / delta_std_angstrom, Δ the minimum-
    image displacement to the relaxed position; the loss and metric cover free atoms only."""

    delta_std_angstrom: float = 1.0
    loss_kind: VectorLoss = "mse"

    @property
    def needs_all_blocks(self) -> bool:
        return False

    def corrupt(self, batch: Batch, generator: torch.Generator) -> tuple[Batch, dict[str, Tensor]]:
        relaxed = require_field(batch.relaxed_positions, "relaxed_positions")
        return batch, {keys.POSITION_DELTA: minimum_image_displacement(batch, batch.positions, relaxed)}

    def loss(self, predictions: Mapping[str, Tensor], batch: Batch, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        predicted = predictions[keys.POSITION_DELTA]
        free = (~batch.fixed).to(predicted.dtype)
        difference = predicted - targets[keys.POSITION_DELTA] / self.delta_std_angstrom
        total = weighted_atom_mean(vector_error(difference, self.loss_kind), free)
        distance = weighted_atom_mean(vector_error(difference.detach() * self.delta_std_angstrom, "l2mae"), free)
        return {LOSS: total, f"position_delta_{self.loss_kind}": total.detach(), "position_distance_mae_angstrom": distance}

    def term_weights(self, batch: Batch, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Every term is a mean over free atoms."""
        free = (~batch.fixed).sum().to(torch.float64)
        return {LOSS: free, f"position_delta_{self.loss_kind}": free, "position_distance_mae_angstrom": free}


# ----------------------------------------------------------------- S2EF
MIN_ENERGY_SCALE_EV = 1e-6
"""A spread of energies below a µeV is the rounding left by references that fit them exactly,
not a scale to divide by."""

class S2EFConfig(BaseModel):
    """Energy + forces of a structure (OC20 S2EF)."""

    model_config = ConfigDict(extra="forbid")

    energy_coefficient: float = Field(1.0, ge=0, description="λ_E, weight of the energy term (dimensionless)")
    force_coefficient: float = Field(100.0, ge=0, description="λ_F, weight of the force term (dimensionless)")
    energy_loss: ScalarLoss = Field("mae", description="error on the scaled energy per structure")
    force_loss: VectorLoss = Field("l2mae", description="per-atom error on the scaled forces")
    fixed_atom_weight: float = Field(0.05, ge=0, description="loss weight of fixed atoms' forces relative to free ones (ForceNet: 0.05; 0 = free atoms only)")
    energy_scale_ev: float = Field(1.0, gt=0, description="σ_E: energy errors are divided by it, eV")
    force_scale_ev_per_angstrom: float = Field(1.0, gt=0, description="σ_F: force errors are divided by it, eV/Å")
    energy_scale: Literal["force_rms", "energy_std"] = Field(
        "force_rms", description="σ_E from the cache: the force RMS (in eV, one scale with σ_F, molden's CPU runs) or the "
        "standard deviation of the training energies less their per-element references (DeNS Eq. 1: \"the standard "
        "deviation of energy labels\"); σ_F is the force RMS either way")
    energy_reference: str | None = Field(
        None, description="a target column of the cache (eV) subtracted from each structure's energy: the energy head "
        "learns energy − that column, its per-element references and σ_E fitted to it (OC20 S2EF: reference_energy, "
        "OC20's S2EF target); None (`none` on the command line or in a file): the total energy")
    rotation: Rotation = Field("none", description="random-rotation augmentation of each structure: none, about the vertical z axis (ForceNet), or any rotation (changes nothing for GNS with periodic_basis on periodic graphs, whose inputs do not see a rotation of positions and cell together)")

    @field_validator("energy_reference", mode="before")
    @classmethod
    def _none_is_no_column(cls, value: Any) -> Any:
        # YAML reads `none` as a string, and the command line's value is one: neither names a column.
        return None if isinstance(value, str) and value.strip().lower() == "none" else value

    def with_statistics(self, statistics: Mapping) -> S2EFConfig:
        """A copy with σ_F the cache's force RMS (eV/Å) and σ_E as `energy_scale` says: that
        same number (one scale for both) or the spread of the training energies left after the
        per-element references (`energy_residual_std_ev`, eV)."""
        force = float(statistics["forces_rms_ev_per_angstrom"])
        energy = force if self.energy_scale == "force_rms" else float(statistics["energy_residual_std_ev"])
        if not math.isfinite(energy) or energy < MIN_ENERGY_SCALE_EV:
            energy = 1.0  # no energies, or as few compositions as elements: the references fit them exactly
        return self.model_copy(update={"energy_scale_ev": energy, "force_scale_ev_per_angstrom": force})


def s2ef_forcenet_paper() -> S2EFConfig:
    """ForceNet §3/App. D: forces only ("MAE over forces is used as the training loss"), fixed
    atoms weighted 0.05 (Table 7), rotation about the surface normal."""
    return S2EFConfig(energy_coefficient=0.0, force_coefficient=1.0, force_loss="mae", fixed_atom_weight=0.05, rotation="vertical")


def s2ef_equiformer_v2_paper() -> S2EFConfig:
    """DeNS App. B Table 7 (EquiformerV2, OC20 S2EF-2M): λ_E = 2, λ_F = 100, energy MAE,
    forces L2MAE on free atoms only (`train_on_free_atoms`), no rotation augmentation; energies
    scaled by the spread of the energy labels (Eq. 1's σ_E), and those labels OC20's S2EF
    energy, `energy − reference_energy`."""
    return S2EFConfig(energy_coefficient=2.0, force_coefficient=100.0, energy_loss="mae", force_loss="l2mae",
                      fixed_atom_weight=0.0, energy_scale="energy_std", energy_reference="reference_energy")


def s2ef_cpu() -> S2EFConfig:
    """Small-data CPU runs: energy and forces both trained, ForceNet's 0.05 on fixed atoms."""
    return S2EFConfig(energy_coefficient=1.0, force_coefficient=10.0, force_loss="l2mae", fixed_atom_weight=0.05)


@dataclass
class S2EFLoss:
    """Energy (`keys.ENERGY` [B], eV) and forces (`keys.FORCES` [N, 3], eV/Å) with fixed atoms
    weighted `fixed_atom_weight` (ForceNet §3); errors scaled by σ_E, σ_F (DeNS Eq. 1)."""

    config: S2EFConfig

    @property
    def needs_all_blocks(self) -> bool:
        return False

    def corrupt(self, batch: Batch, generator: torch.Generator) -> tuple[Batch, dict[str, Tensor]]:
        """The batch, turned by a random rotation per structure when `rotation` is set
        (ForceNet §2); targets {"energy": [B] eV, "forces": [N, 3] eV/Å} of that batch."""
        if self.config.rotation != "none":
            batch = rotated_batch(batch, random_rotations(batch.num_graphs, generator, self.config.rotation))
        targets = {}
        if self.config.energy_coefficient > 0 or batch.energy is not None:
            energy = require_field(batch.energy, "energy")
            if self.config.energy_reference is not None:
                column = target_columns(batch.target_names, [self.config.energy_reference])[0]
                energy = energy - require_field(batch.targets, "targets")[:, column].to(energy.dtype)
            targets[keys.ENERGY] = energy
        if self.config.force_coefficient > 0 or batch.forces is not None:
            targets[keys.FORCES] = require_field(batch.forces, "forces")
        return batch, targets

    def terms(self, predictions: Mapping[str, Tensor], batch: Batch, targets: Mapping[str, Tensor],
              force_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Energy and force terms and metrics; forces only where `force_mask` [N] is True, the
        mean still over every (weighted) atom (DeNS App. F, Algorithm 2 line 26)."""
        c = self.config
        out: dict[str, Tensor] = {}
        total = None
        # An energy head trained with λ_E = 0 (ForceNet: forces only) learned nothing: its error
        # would read as a result. Forces stay reported when predicted: −∂E/∂x of an energy
        # trained alone is a prediction (a direct force head with λ_F = 0 would not be; no
        # preset trains one).
        if keys.ENERGY in targets and c.energy_coefficient > 0:
            difference = predictions[keys.ENERGY].reshape(-1) - targets[keys.ENERGY]
            energy = scalar_error(difference / c.energy_scale_ev, c.energy_loss).mean()
            out[f"energy_{c.energy_loss}"] = energy.detach()
            out["energy_mae_mev"] = difference.detach().abs().mean() * EV_TO_MEV
            total = c.energy_coefficient * energy
        if keys.FORCES in targets and (c.force_coefficient > 0 or keys.FORCES in predictions):
            difference = predictions[keys.FORCES] - targets[keys.FORCES]
            weights = atom_weights(batch, c.fixed_atom_weight, difference.dtype)
            per_atom = vector_error(difference / c.force_scale_ev_per_angstrom, c.force_loss)
            if force_mask is not None:
                per_atom = per_atom * force_mask.to(per_atom.dtype)
            forces = weighted_atom_mean(per_atom, weights)
            free = (~batch.fixed).to(difference.dtype) if force_mask is None else (~batch.fixed & force_mask).to(difference.dtype)
            out[f"forces_{c.force_loss}"] = forces.detach()
            out["forces_mae_mev_per_angstrom"] = weighted_atom_mean(difference.detach().abs().mean(dim=-1), free) * EV_TO_MEV
            total = c.force_coefficient * forces if total is None else total + c.force_coefficient * forces
        out[LOSS] = total
        return out

    def loss(self, predictions: Mapping[str, Tensor], batch: Batch, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """λ_E·err(E)/σ_E + λ_F·Σ w·err(F)/σ_F / Σ w; metrics in meV and meV/Å (free atoms)."""
        return self.terms(predictions, batch, targets)

    def term_weights(self, batch: Batch, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Force terms average over (weighted) atoms, the force MAE over free atoms; energy
        terms over structures."""
        c = self.config
        return {f"forces_{c.force_loss}": atom_weights(batch, c.fixed_atom_weight, torch.float64).sum(),
                "forces_mae_mev_per_angstrom": (~batch.fixed).sum().to(torch.float64)}
