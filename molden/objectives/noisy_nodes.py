"""Noisy Nodes (Godwin et al. 2022, §3.3): a supervised graph loss plus an auxiliary node loss on
noise-corrupted inputs, decoded and averaged over every block iteration (§3.2, Fig. 1B).

Two node targets:

- "noise" (denoising autoencoder, QM9, §5.2): the input positions get i.i.d. Gaussian noise of
  standard deviation σ and the model predicts the noise divided by σ (`keys.NOISE`). Predicting
  ε/σ is the paper's relative target v − ṽ = −ε normalised by its standard deviation, up to the
  sign, which a linear head absorbs.
- "relaxed_positions" (OC20 / EMT IS2RE, §5.1): the input is a frame of the relaxation
  trajectory plus noise, and the model predicts the relative target v' − ṽ = Δ − σ from the noisy
  input to the relaxed structure (`keys.POSITION_DELTA`), taken as the minimum image across the
  periodic cell and normalised by its mean and standard deviation (§4: "mean squared error loss
  on mean and standard deviation normalised targets").

Fixed atoms are never noised and never enter the node loss. The primary (supervised) loss is
pluggable (`PrimaryLoss`), and is averaged over block decodings like the node loss.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal, Mapping, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from molden.data.batch import Batch
from molden.errors import MoldenConfigError, MoldenInputError
from molden.models import keys
from molden.objectives.displacement import minimum_image_displacement
from molden.objectives.noise import gaussian_noise, with_positions
from molden.objectives.objective import LOSS

NODE_TARGET = "noisy_nodes/node_target"
"""Key in `targets` of the normalised node target, [N, 3] (ε/σ, or (Δ − σ − mean)/std)."""

POSITION_DELTA_ANGSTROM = "noisy_nodes/position_delta_angstrom"
"""Key in `targets` of the relative target Δ − σ in Å, [N, 3] ("relaxed_positions" only)."""


@runtime_checkable
class PrimaryLoss(Protocol):
    """The supervised term of Noisy Nodes (QM9 targets, IS2RE energy, ...).

    `loss` returns {"loss": scalar, other term: scalar, ...} for one block's predictions (a
    mapping of the model's keys to that block's tensors). An object that also has
    `corrupt(batch, generator) -> (batch, targets)` (every `Objective` does) gets it called on
    the clean batch before Noisy Nodes adds noise (standardised targets, rotation augmentation).
    """

    def loss(self, predictions: Mapping[str, Tensor], batch: Batch, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        ...


NOISE_LOSS_WEIGHT = 0.1
"""Node loss coefficient with the noise as node target: Noisy Nodes Table 10 (QM9)."""
RELAXED_POSITIONS_LOSS_WEIGHT = 1.0
"""Node loss coefficient with the relaxed positions as node target: Noisy Nodes Table 9 (OC20
IS2RE). Until 2026-12-04 an IS2RE run without --noisy-nodes-weight got 0.1 (docs/RESULTS.md)."""


class NoisyNodesConfig(BaseModel):
    """Noisy Nodes options (Noisy Nodes §3.3; paper values in the presets below)."""

    model_config = ConfigDict(extra="forbid")

    sigma_angstrom: float = Field(0.02, ge=0, description="standard deviation of the position noise on free atoms, Å")
    node_target: Literal["noise", "relaxed_positions"] = Field(
        "noise", description="'noise': predict ε/σ (denoising autoencoder); 'relaxed_positions': predict the "
        "normalised relative target to the relaxed structure (IS2RE trajectories)")
    node_loss_weight: float = Field(
        NOISE_LOSS_WEIGHT, ge=0, description="coefficient of the node loss (dimensionless); when not given, the "
        f"paper's for the node target: {NOISE_LOSS_WEIGHT} for 'noise' (QM9, Table 10), "
        f"{RELAXED_POSITIONS_LOSS_WEIGHT} for 'relaxed_positions' (OC20 IS2RE, Table 9)")
    trajectory_sampling: Literal["frame", "interpolate"] = Field(
        "frame", description="'frame': the batch's positions are the frame the data loader sampled along the "
        "trajectory; 'interpolate': a uniform random point between them and the relaxed positions, per "
        "structure (Pre-training via Denoising §4.3, for data with initial and relaxed structures only)")
    position_delta_mean_angstrom: tuple[float, float, float] = Field(
        (0.0, 0.0, 0.0), description="mean of the relative target Δ − σ, Å (from the training data)")
    position_delta_std_angstrom: float = Field(
        1.0, gt=0, description="standard deviation of the relative target Δ − σ, Å (from the training data)")
    rebuild_graph: bool = Field(True, description="rebuild the radius graph from the noised positions")
    cutoff_angstrom: float | None = Field(None, gt=0, description="radius-graph cutoff for the rebuild, Å")
    max_num_neighbors: int | None = Field(None, ge=1, description="keep each atom's k nearest neighbours in the rebuild")

    @model_validator(mode="before")
    @classmethod
    def _weight_of_the_target(cls, data: Any) -> Any:
        """An unset (or None) node_loss_weight becomes the paper's for the node target."""
        if isinstance(data, dict) and data.get("node_loss_weight") is None:
            relaxed = data.get("node_target") == "relaxed_positions"
            data = {**data, "node_loss_weight": RELAXED_POSITIONS_LOSS_WEIGHT if relaxed else NOISE_LOSS_WEIGHT}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> NoisyNodesConfig:
        if self.node_target == "noise" and self.sigma_angstrom == 0:
            raise ValueError("node_target 'noise' needs sigma_angstrom > 0 (the target is noise / sigma)")
        if self.rebuild_graph and self.cutoff_angstrom is None:
            raise ValueError("rebuild_graph needs cutoff_angstrom (the cutoff the model was built for)")
        return self


# Presets. Noisy Nodes does not state its connectivity radius; the cutoffs are molden's cache
# defaults (QM9 5 Å, OC20/EMT 6 Å), so the rebuilt graph matches the cached one.
def noisy_nodes_qm9_paper() -> NoisyNodesConfig:
    """QM9 (Noisy Nodes §5.2, Table 10: σ = 0.02 Å, position loss coefficient 0.1)."""
    return NoisyNodesConfig(sigma_angstrom=0.02, node_target="noise", node_loss_weight=NOISE_LOSS_WEIGHT, cutoff_angstrom=5.0)


def noisy_nodes_qm9_finetune_paper() -> NoisyNodesConfig:
    """QM9 fine-tuning of a pre-trained GNS-TAT (Pre-training via Denoising App. H, Table 4:
    σ = 0.05 Å, position loss coefficient 0.01, at most 20 edges per vertex)."""
    return NoisyNodesConfig(sigma_angstrom=0.05, node_target="noise", node_loss_weight=0.01, cutoff_angstrom=5.0,
                            max_num_neighbors=20)


def noisy_nodes_oc20_paper() -> NoisyNodesConfig:
    """OC20 IS2RE (Noisy Nodes §5.1, Table 9: σ = 0.3 Å, position loss coefficient 1.0; the text
    writes σ² = 0.3, the table σ = 0.3, taken here). Set the delta statistics from the data."""
    return NoisyNodesConfig(sigma_angstrom=0.3, node_target="relaxed_positions", node_loss_weight=1.0,
                            cutoff_angstrom=6.0)


def noisy_nodes_qm9_cpu() -> NoisyNodesConfig:
    """QM9 on CPU: the paper's σ and weight (an objective has no size to scale)."""
    return noisy_nodes_qm9_paper()


def noisy_nodes_emt_cpu() -> NoisyNodesConfig:
    """EMT relaxation trajectories on CPU (every cached frame carries the relaxed positions): the
    OC20 σ and weight; the data loader samples the frames."""
    return NoisyNodesConfig(sigma_angstrom=0.3, node_target="relaxed_positions", node_loss_weight=1.0,
                            cutoff_angstrom=6.0, trajectory_sampling="frame")


def block_stack(predictions: Mapping[str, Tensor], name: str) -> Tensor:
    """[K, ...] the prediction `name` of every decoded block iteration (`keys.per_block(name)`),
    or [1, ...] the last block's when the model decoded only that one (evaluation)."""
    stacked = predictions.get(keys.per_block(name))
    if stacked is not None:
        return stacked
    if name in predictions:
        return predictions[name][None]
    raise MoldenConfigError(f"the model predicts no {name!r}: add a head named {name!r} for this objective")


def free_atom_mse(prediction: Tensor, target: Tensor, fixed: Tensor) -> Tensor:
    """[K] mean squared error over the free atoms and the 3 components of `prediction` [K, N, 3]
    against `target` [N, 3]; 0 when every atom is fixed."""
    free = (~fixed).to(prediction.dtype)
    squared = (prediction - target).square().sum(-1) * free  # [K, N]
    return squared.sum(-1) / (3 * free.sum()).clamp(min=1)


def _block_count(predictions: Mapping[str, Tensor]) -> int | None:
    """K of the per-block predictions (all must agree), or None when there are none."""
    counts = {v.shape[0] for k, v in predictions.items() if k.endswith(keys.per_block(""))}
    if len(counts) > 1:
        raise MoldenConfigError(f"per-block predictions disagree on the number of blocks: {sorted(counts)}")
    return counts.pop() if counts else None


def _block(predictions: Mapping[str, Tensor], k: int) -> dict[str, Tensor]:
    """The predictions of block iteration k: every per-block key replaced by its k-th slice."""
    out = {name: value for name, value in predictions.items() if not name.endswith(keys.per_block(""))}
    for name, value in predictions.items():
        if name.endswith(keys.per_block("")):
            out[name[: -len(keys.per_block(""))]] = value[k]
    return out


def per_block_losses(primary: PrimaryLoss, predictions: Mapping[str, Tensor], batch: Batch,
                     targets: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
    """`primary`'s loss terms on each decoded block iteration, first to last (one entry when the
    model decoded only the last block, as in evaluation)."""
    n_blocks = _block_count(predictions)
    if n_blocks is None:
        return [primary.loss(predictions, batch, targets)]
    return [primary.loss(_block(predictions, k), batch, targets) for k in range(n_blocks)]


class EveryBlock:
    """The primary loss averaged over every block iteration's decoding, without noise: the way a
    Noisy Nodes model is trained (Noisy Nodes Fig. 1B, "we decode the output of each block …
    We optimise the average of the losses") minus the noise, so that a comparison with Noisy
    Nodes isolates the noise (docs/RESULTS.md, problem 7)."""

    def __init__(self, primary: PrimaryLoss):
        self.primary = primary

    @property
    def needs_all_blocks(self) -> bool:
        return True

    def corrupt(self, batch: Batch, generator: torch.Generator) -> tuple[Batch, dict[str, Tensor]]:
        return self.primary.corrupt(batch, generator)

    def loss(self, predictions: Mapping[str, Tensor], batch: Batch, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """{"loss": mean over blocks of the primary loss, and the primary's other terms of the last block}."""
        per_block = per_block_losses(self.primary, predictions, batch, targets)
        out = {name: value for name, value in per_block[-1].items() if name != LOSS}
        out[LOSS] = torch.stack([terms[LOSS] for terms in per_block]).mean()
        return out


class NoisyNodes:
    """Noisy Nodes objective (Godwin et al. 2022 §3.3): `primary` loss + weight × node loss,
    both averaged over the decodings of every block iteration (§3.2, Fig. 1B)."""

    def __init__(self, config: NoisyNodesConfig, primary: PrimaryLoss):
        self.config = config
        self.primary = primary

    @property
    def needs_all_blocks(self) -> bool:
        return True

    @property
    def node_key(self) -> str:
        """The prediction the node loss reads: `keys.NOISE` or `keys.POSITION_DELTA`."""
        return keys.NOISE if self.config.node_target == "noise" else keys.POSITION_DELTA

    def corrupt(self, batch: Batch, generator: torch.Generator) -> tuple[Batch, dict[str, Tensor]]:
        """The noised batch (graph rebuilt unless `rebuild_graph` is off) and the targets: the
        primary's (when it has `corrupt`) plus `NODE_TARGET` [N, 3] (and, for relaxed positions,
        `POSITION_DELTA_ANGSTROM` [N, 3] Å). Fixed atoms are never moved."""
        cfg = self.config
        targets: dict[str, Tensor] = {}
        corrupt_primary = getattr(self.primary, "corrupt", None)
        if corrupt_primary is not None:
            batch, primary_targets = corrupt_primary(batch, generator)
            targets.update(primary_targets)
        frame = batch.positions
        if cfg.node_target == "relaxed_positions":
            if batch.relaxed_positions is None:
                raise MoldenInputError(None, "Noisy Nodes with node_target 'relaxed_positions' needs a batch with "
                                       "relaxed_positions (an IS2RE/IS2RS or EMT trajectory cache)")
            if cfg.trajectory_sampling == "interpolate":
                step = self._to_relaxed(batch, frame)
                t = torch.rand(batch.num_graphs, generator=generator, dtype=torch.float64)
                t = t.to(device=frame.device, dtype=frame.dtype)[batch.batch]
                frame = frame + t[:, None] * step * (~batch.fixed)[:, None].to(frame.dtype)
        noise = gaussian_noise(batch, cfg.sigma_angstrom, generator)
        noisy = with_positions(batch, frame + noise, rebuild_graph=cfg.rebuild_graph,
                               cutoff_angstrom=cfg.cutoff_angstrom, max_num_neighbors=cfg.max_num_neighbors)
        if cfg.node_target == "noise":
            targets[NODE_TARGET] = noise / cfg.sigma_angstrom
        else:
            delta = self._to_relaxed(batch, noisy.positions)  # Δ − σ of §3.3, Å
            mean = torch.tensor(cfg.position_delta_mean_angstrom, dtype=delta.dtype, device=delta.device)
            targets[POSITION_DELTA_ANGSTROM] = delta
            targets[NODE_TARGET] = (delta - mean) / cfg.position_delta_std_angstrom
        return noisy, targets

    def loss(self, predictions: Mapping[str, Tensor], batch: Batch, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """{"loss": mean over blocks of (primary + weight × node), "primary", "node" (block
        means), "node_last_block", and the primary's other terms of the last block}."""
        node = free_atom_mse(block_stack(predictions, self.node_key), targets[NODE_TARGET], batch.fixed)  # [K]
        per_block = per_block_losses(self.primary, predictions, batch, targets)
        primary = torch.stack([terms[LOSS] for terms in per_block]).mean()
        node_mean = node.mean()
        out = {name: value for name, value in per_block[-1].items() if name != LOSS}
        out.update({
            LOSS: primary + self.config.node_loss_weight * node_mean,
            "primary": primary,
            "node": node_mean,
            "node_last_block": node[-1],
        })
        return out

    def predicted_positions(self, predictions: Mapping[str, Tensor], batch: Batch) -> Tensor:
        """[N, 3] Å the relaxed positions the last block predicts from the input `batch`
        (direct IS2RS, Noisy Nodes §5.1): input + the denormalised `keys.POSITION_DELTA`;
        fixed atoms stay where they are."""
        cfg = self.config
        pred = predictions[keys.POSITION_DELTA]
        mean = torch.tensor(cfg.position_delta_mean_angstrom, dtype=pred.dtype, device=pred.device)
        step = (pred * cfg.position_delta_std_angstrom + mean) * (~batch.fixed)[:, None].to(pred.dtype)
        return batch.positions + step

    @staticmethod
    def _to_relaxed(batch: Batch, positions: Tensor) -> Tensor:
        """[N, 3] Å minimum-image displacement from `positions` to the relaxed positions."""
        return minimum_image_displacement(batch, positions, batch.relaxed_positions)


def position_delta_statistics(batches: Iterable[Batch], sigma_angstrom: float) -> tuple[tuple[float, float, float], float]:
    """(mean [3] Å, standard deviation Å) of the relative target Δ − σ over the free atoms of
    `batches` (an iterable of `Batch` with relaxed positions), for `NoisyNodesConfig`'s
    normalisation: the noise adds σ² to the variance per component and nothing to the mean."""
    total, total_sq, count = torch.zeros(3, dtype=torch.float64), torch.zeros((), dtype=torch.float64), 0
    for batch in batches:
        delta = NoisyNodes._to_relaxed(batch, batch.positions).to(torch.float64)[~batch.fixed]
        total += delta.sum(0)
        total_sq += delta.square().sum()
        count += delta.shape[0]
    if count == 0:
        raise MoldenInputError(None, "no free atoms with relaxed positions to compute the delta statistics from")
    mean = total / count
    variance = total_sq / (3 * count) - mean.square().mean() + sigma_angstrom**2
    return tuple(float(m) for m in mean), float(variance.clamp(min=1e-12).sqrt())
