"""Relaxation metrics, one definition each, with its source.

All take flat per-atom arrays of a batch of structures (`Batch`: `batch.batch` maps atoms to
structures) and reduce per structure without Python loops.

- ADwT, average distance within threshold (OC20, Chanussot et al. 2021 §4.2; fairchem's
  `average_distance_within_threshold`): for each structure the mean over its free atoms of
  |predicted − reference| position, taken as the minimum image across periodic boundaries;
  the fraction of structures whose mean is below β, averaged over β = 0.01, 0.011, …, 0.499 Å
  (`numpy.arange(0.01, 0.5, 0.001)`, strict "<").
- Energy MAE (eV → meV) and EwT, energy within threshold: the fraction of structures with
  |ΔE| < 0.02 eV (OC20).
- Force MAE: mean |ΔF| over the components of free atoms, eV/Å (OC20 S2EF); force cosine: the
  mean over free atoms of the cosine between predicted and reference force vectors.
- FbT / AFbT, forces below threshold (OC20 IS2RS): with reference forces computed at the
  predicted structure, the fraction of structures whose largest free-atom force norm is below
  0.05 eV/Å; AFbT averages that fraction over thresholds 0.01 … 0.399 eV/Å
  (`numpy.arange(0.01, 0.4, 0.001)`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from molden.data.batch import Batch
from molden.objectives.displacement import minimum_image_displacement

ADWT_THRESHOLDS_ANGSTROM = np.arange(0.01, 0.5, 0.001)
EWT_THRESHOLD_EV = 0.02
FBT_THRESHOLD_EV_PER_ANGSTROM = 0.05
AFBT_THRESHOLDS_EV_PER_ANGSTROM = np.arange(0.01, 0.4, 0.001)


def _per_structure_mean(values: Tensor, weights: Tensor, batch: Batch) -> Tensor:
    total = values.new_zeros(batch.num_graphs).index_add_(0, batch.batch, values * weights)
    count = values.new_zeros(batch.num_graphs).index_add_(0, batch.batch, weights)
    return total / count.clamp_min(1)


def mean_free_atom_distance(batch: Batch, predicted: Tensor, reference: Tensor) -> Tensor:
    """[B] Å: mean over each structure's free atoms of the minimum-image distance."""
    distance = minimum_image_displacement(batch, reference, predicted).norm(dim=1)
    return _per_structure_mean(distance, (~batch.fixed).to(distance.dtype), batch)


def adwt(mean_distances: Tensor | np.ndarray) -> float:
    """ADwT of per-structure mean distances (Å), in [0, 1]."""
    d = np.asarray(torch.as_tensor(mean_distances).detach().cpu(), dtype=np.float64)
    if d.size == 0:
        return float("nan")
    return float((d[None, :] < ADWT_THRESHOLDS_ANGSTROM[:, None]).mean())


def energy_metrics(predicted_ev: Tensor, reference_ev: Tensor) -> dict[str, float]:
    """{"energy_mae_mev", "ewt"} over structures."""
    error = (predicted_ev.double() - reference_ev.double()).abs()
    return {"energy_mae_mev": float(error.mean()) * 1000.0, "ewt": float((error < EWT_THRESHOLD_EV).double().mean())}


def force_metrics(batch: Batch, predicted: Tensor, reference: Tensor) -> dict[str, float]:
    """{"forces_mae_mev_per_angstrom", "forces_cosine"} over free atoms."""
    free = ~batch.fixed
    p, r = predicted[free].double(), reference[free].double()
    cosine = torch.nn.functional.cosine_similarity(p, r, dim=1, eps=1e-12)
    return {"forces_mae_mev_per_angstrom": float((p - r).abs().mean()) * 1000.0, "forces_cosine": float(cosine.mean())}


def forces_below_threshold(batch: Batch, reference_forces_at_prediction: Tensor) -> dict[str, float]:
    """{"fbt", "afbt"} from reference forces evaluated at the predicted structures."""
    norm = reference_forces_at_prediction.double().norm(dim=1) * (~batch.fixed).double()
    largest = torch.zeros(batch.num_graphs, dtype=torch.float64, device=norm.device).scatter_reduce(
        0, batch.batch, norm, reduce="amax", include_self=True)
    f = largest.cpu().numpy()
    return {"fbt": float((f < FBT_THRESHOLD_EV_PER_ANGSTROM).mean()),
            "afbt": float((f[None, :] < AFBT_THRESHOLDS_EV_PER_ANGSTROM[:, None]).mean())}
