"""DeNS: denoising non-equilibrium structures as an auxiliary task of S2EF (DeNS §3.2, App. F).

Per structure of a batch, with probability p_DeNS, a random fraction r of its free atoms is
displaced by Gaussian noise σ (partially corrupted structures, §3.2.3; fixed atoms never, App.
B.1), their original forces are given to the model as `batch.force_inputs` (force encoding,
§3.2.2; zero rows elsewhere), and the model predicts
  - the energy of the original structure from the corrupted one (Eq. 6, Algorithm 2 line 24:
    the energy term is kept for DeNS structures, same head as for the others),
  - the normalised noise ε/σ of the corrupted atoms (`keys.NOISE`, Eq. 4, line 25),
  - the original forces of every other atom (`keys.FORCES`, line 26).
The other structures get the plain S2EF loss (Eq. 1, lines 29–32). One batch mixes both, so a
single forward/backward pass sees both tasks (App. D.1).

Normalisation over atoms: Algorithm 2 divides each structure's noise and force sums by its atom
count and the total by B; here, as in fairchem's S2EF losses, sums run over the batch's atoms
and are divided by its (weighted) atom count: the same for structures of equal size. Both the
noise and force sums skip the atoms the other term covers but divide by every atom (lines
25–26), so with p_DeNS = 0 the loss is exactly the S2EF loss.

The model receives `encoded_forces`: dimensionless, m/(1 + m) times the force's direction with
m = |f|/σ_F. Algorithm 2 line 19 and Eq. 5 encode f/σ_F linearly; the bound departs from that
because PaiNN's multiplicative vector updates overflowed on the far larger forces of
non-equilibrium frames (see `encoded_forces`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from molden.data.batch import Batch
from molden.models import keys
from molden.objectives.noise import gaussian_noise, with_positions
from molden.objectives.objective import LOSS
from molden.objectives.supervised import (S2EFConfig, S2EFLoss, VectorLoss, atom_weights, require_field, s2ef_equiformer_v2_paper,
                                          vector_error, weighted_atom_mean)

DENS_ATOMS = "dens_atoms"
"""Target key: [N] bool, the atoms corrupted (and denoised) this step."""
DENS_STRUCTURES = "dens_structures"
"""Target key: [B] bool, the structures drawn for DeNS this step."""


class DeNSConfig(BaseModel):
    """DeNS hyper-parameters (DeNS §3.2.3) and the S2EF task it is added to."""

    model_config = ConfigDict(extra="forbid")

    probability: float = Field(0.5, ge=0, le=1, description="p_DeNS: probability that a structure is used for DeNS")
    corruption_ratio: float = Field(0.5, gt=0, le=1, description="r_DeNS: probability that a free atom of a DeNS structure is corrupted")
    coefficient: float = Field(10.0, ge=0, description="λ_DeNS: weight of the noise term (dimensionless)")
    coefficient_schedule: Literal["constant", "linear_decay"] = Field(
        "constant", description="'linear_decay': λ_DeNS falls linearly to 0 over the run (DeNS App. D.2, the MD17 setting)")
    sigma_angstrom: float = Field(0.1, gt=0, description="σ: standard deviation of the position noise, Å")
    noise_loss: VectorLoss = Field("l2mae", description="per-atom error of ε̂ against ε/σ")
    s2ef: S2EFConfig = Field(default_factory=S2EFConfig, description="the original task: energy and force terms")
    rebuild_graph: bool = Field(True, description="rebuild the radius graph from the noised positions (False keeps the clean graph)")
    cutoff_angstrom: float | None = Field(None, gt=0, description="radius of the rebuilt graph, Å (needed when rebuild_graph)")
    max_num_neighbors: int | None = Field(None, gt=0, description="keep the nearest neighbours of each atom in the rebuilt graph; None keeps all")


def dens_oc20_2m_paper() -> DeNSConfig:
    """DeNS App. B Table 7, EquiformerV2 (89M) on OC20 S2EF-2M, 12 epochs: p_DeNS 0.5,
    λ_DeNS 10, σ 0.1 Å, r 0.5; λ_E 2, λ_F 100; cutoff 12 Å, 20 neighbours; forces on free atoms;
    energies OC20's S2EF labels (`energy − reference_energy`) scaled by their spread (Eq. 1's
    σ_E): `s2ef_equiformer_v2_paper`."""
    return DeNSConfig(probability=0.5, corruption_ratio=0.5, coefficient=10.0, sigma_angstrom=0.1,
                      s2ef=s2ef_equiformer_v2_paper(), cutoff_angstrom=12.0, max_num_neighbors=20)


def dens_oc20_all_md_paper() -> DeNSConfig:
    """DeNS App. B Table 7, EquiformerV2 (160M) on OC20 S2EF-All+MD: p_DeNS 0.125, λ_DeNS 15,
    σ 0.1 Å, r 0.25; λ_E 4, λ_F 100."""
    return dens_oc20_2m_paper().model_copy(update={
        "probability": 0.125, "corruption_ratio": 0.25, "coefficient": 15.0,
        "s2ef": s2ef_equiformer_v2_paper().model_copy(update={"energy_coefficient": 4.0}),
    })


def dens_md17_paper() -> DeNSConfig:
    """DeNS App. D.2 Table 9, Equiformer on MD17 (small data sets): p_DeNS 0.25, λ_DeNS 5 decayed
    linearly to 0, σ 0.05 Å, r 0.25; the S2EF weights (λ_E 1, λ_F 80) of that table. On the EMT
    set the OC20 settings move untouched atoms' true forces by 4× a typical force label
    (docs/RESULTS.md, experiment 3); these are the ones to try on small data."""
    return DeNSConfig(probability=0.25, corruption_ratio=0.25, coefficient=5.0, coefficient_schedule="linear_decay",
                      sigma_angstrom=0.05, s2ef=S2EFConfig(energy_coefficient=1.0, force_coefficient=80.0, energy_loss="mae",
                                                           force_loss="l2mae", fixed_atom_weight=0.0, energy_scale="energy_std"))


def dens_cpu() -> DeNSConfig:
    """Small EMT/OC20-like runs on CPU: the S2EF-2M DeNS settings at a 5 Å cutoff, σ_E the
    spread of the energies as the paper's (Eq. 1), but total energies: EMT caches hold no OC20
    reference energies."""
    paper = dens_oc20_2m_paper()
    return paper.model_copy(update={"cutoff_angstrom": 5.0, "max_num_neighbors": None, "s2ef": paper.s2ef.model_copy(
        update={"energy_reference": None})})


def encoded_forces(forces: Tensor, scale_ev_per_angstrom: float) -> Tensor:
    """[N, 3] the force inputs a backbone encodes: m/(1 + m) times the force's direction,
    m = |f|/σ_F, so a typical force (1 σ_F) enters at 0.5 and none above 1, with the order of
    magnitudes kept (a rotation-equivariant map). Raw eV/Å inputs of tens of eV/Å made PaiNN's
    multiplicative vector updates overflow, and even 3 σ_F sends an untrained PaiNN's outputs
    to 1e5 (docs/RESULTS.md, experiment 3; tests/test_dens.py)."""
    scaled = forces / scale_ev_per_angstrom
    return scaled / (1.0 + scaled.norm(dim=1, keepdim=True))


@dataclass
class DeNS:
    """The DeNS objective (DeNS §3.2, Algorithm 2 of App. F)."""

    config: DeNSConfig
    s2ef: S2EFLoss = field(init=False)
    progress: float = field(default=0.0, init=False)
    """Fraction of the run's steps done (`set_progress`), for the λ_DeNS schedule."""

    def __post_init__(self) -> None:
        self.s2ef = S2EFLoss(self.config.s2ef)

    def set_progress(self, fraction: float) -> None:
        """The training loop's step / steps, before each step (`Objective.set_progress`)."""
        self.progress = min(max(float(fraction), 0.0), 1.0)

    @property
    def coefficient(self) -> float:
        """λ_DeNS at this point of the run."""
        c = self.config
        return c.coefficient * (1.0 - self.progress) if c.coefficient_schedule == "linear_decay" else c.coefficient

    @property
    def needs_all_blocks(self) -> bool:
        return False

    def corrupt(self, batch: Batch, generator: torch.Generator) -> tuple[Batch, dict[str, Tensor]]:
        """The partially corrupted batch with the corrupted atoms' forces as `force_inputs`
        (bounded, in units of σ_F: `encoded_forces`);
        targets: the S2EF targets of the original structures (energy eV, forces eV/Å),
        `keys.NOISE` ε/σ [N, 3] (zero on uncorrupted atoms), `DENS_ATOMS`, `DENS_STRUCTURES`.

        Draws, in this order, from `generator` on the CPU: the S2EF rotation (if any), one
        uniform per structure, one per atom, the Gaussian noise; the same seed gives the same
        corruption on any device.
        """
        c = self.config
        batch, targets = self.s2ef.corrupt(batch, generator)
        forces = require_field(batch.forces, "forces")
        device = batch.positions.device
        structures = (torch.rand(batch.num_graphs, generator=generator, dtype=torch.float64) < c.probability).to(device)
        chosen = (torch.rand(len(batch.positions), generator=generator, dtype=torch.float64) < c.corruption_ratio).to(device)
        corrupted = chosen & structures[batch.batch] & ~batch.fixed
        noise = gaussian_noise(batch, c.sigma_angstrom, generator, mask=corrupted)
        noisy = with_positions(batch, batch.positions + noise, rebuild_graph=c.rebuild_graph,
                               cutoff_angstrom=c.cutoff_angstrom, max_num_neighbors=c.max_num_neighbors)
        noisy = replace(noisy, force_inputs=encoded_forces(forces, c.s2ef.force_scale_ev_per_angstrom) * corrupted[:, None].to(forces.dtype))
        targets.update({keys.NOISE: noise / c.sigma_angstrom, DENS_ATOMS: corrupted, DENS_STRUCTURES: structures})
        return noisy, targets

    def loss(self, predictions: Mapping[str, Tensor], batch: Batch, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """λ_E·L_E + λ_F·L_F(uncorrupted atoms) + λ_DeNS·L_DeNS(corrupted atoms) (Eq. 6, Alg. 2)."""
        c = self.config
        corrupted = targets[DENS_ATOMS]
        out = self.s2ef.terms(predictions, batch, targets, force_mask=~corrupted)
        difference = predictions[keys.NOISE] - targets[keys.NOISE]
        weights = atom_weights(batch, c.s2ef.fixed_atom_weight, difference.dtype)
        per_atom = vector_error(difference, c.noise_loss) * corrupted.to(difference.dtype)
        dens = weighted_atom_mean(per_atom, weights)
        out[LOSS] = out[LOSS] + self.coefficient * dens
        out[f"dens_noise_{c.noise_loss}"] = dens.detach()
        out["dens_atom_fraction"] = corrupted.to(difference.dtype).mean()
        return out
