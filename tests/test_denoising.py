"""Denoising pre-training (Pre-training via Denoising §3.2, App. H): noise targets, atom-type
masking, block-averaged loss, presets."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from molden.graph import neighbor_list
from molden.models import AtomTypeHead, Model, NodeVectorHead, keys
from molden.objectives import Objective
from molden.objectives.denoising import (
    ATOM_MASK,
    ATOM_TYPES,
    NOISE_TARGET,
    Denoising,
    DenoisingConfig,
    denoising_cpu,
    denoising_pcqm4mv2_paper,
)
from tiny_models import PairBackbone
from symmetry import example_batch


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _objective(**options) -> Denoising:
    return Denoising(DenoisingConfig(**{"cutoff_angstrom": 5.0, **options}))


def _masking(**options) -> Denoising:
    return _objective(**{"mask_probability": 0.5, "atom_type_loss_weight": 4.0, **options})


def _one_hot_logits(numbers: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """[K, N, 119] logits certain of `numbers` (1000 on the right type: cross-entropy exactly 0)."""
    logits = torch.nn.functional.one_hot(numbers, 119).to(torch.float64) * 1000.0
    return logits.expand(n_blocks, -1, -1).clone()


def _perfect(targets, n_blocks: int = 2) -> dict[str, torch.Tensor]:
    noise = targets[NOISE_TARGET].expand(n_blocks, -1, -1).clone()
    logits = _one_hot_logits(targets[ATOM_TYPES], n_blocks)
    return {keys.per_block(keys.NOISE): noise, keys.NOISE: noise[-1],
            keys.per_block(keys.ATOM_LOGITS): logits, keys.ATOM_LOGITS: logits[-1]}


def test_denoising_is_an_objective():
    assert isinstance(_objective(), Objective)
    assert _objective().needs_all_blocks and not _objective(decode_all_blocks=False).needs_all_blocks


def test_corruption_never_moves_fixed_atoms_and_targets_are_noise_over_sigma():
    batch = example_batch(("slab", "molecule"))
    noisy, targets = _objective(sigma_angstrom=0.02).corrupt(batch, _gen())
    assert torch.equal(noisy.positions[batch.fixed], batch.positions[batch.fixed])
    assert (noisy.positions[~batch.fixed] != batch.positions[~batch.fixed]).all()
    assert targets[NOISE_TARGET].shape == (len(batch.positions), 3)
    torch.testing.assert_close(targets[NOISE_TARGET], (noisy.positions - batch.positions) / 0.02, rtol=0, atol=1e-9)
    assert torch.equal(noisy.numbers, batch.numbers)  # no masking by default


def test_rebuilt_graph_equals_the_neighbor_list_of_the_noisy_positions():
    batch = example_batch()
    noisy, _ = _objective(sigma_angstrom=0.3).corrupt(batch, _gen())
    edge_index, unit_shifts = neighbor_list(noisy.positions, 5.0, cell=batch.cell, pbc=batch.pbc, batch=batch.batch)

    def rows(ei, us):
        return sorted(map(tuple, torch.cat([ei.T, us.long()], 1).tolist()))

    assert rows(noisy.edge_index, noisy.unit_shifts) == rows(edge_index, unit_shifts)


def test_masked_atoms_enter_as_type_zero_and_keep_their_type_as_target():
    batch = example_batch()
    noisy, targets = _masking().corrupt(batch, _gen())
    mask = targets[ATOM_MASK]
    assert mask.any() and (~mask).any()
    assert (noisy.numbers[mask] == 0).all()
    assert torch.equal(noisy.numbers[~mask], batch.numbers[~mask])
    assert torch.equal(targets[ATOM_TYPES], batch.numbers)


def test_masking_uses_the_configured_fraction_of_atoms_fixed_ones_included():
    """Bernoulli(p) per atom: over 200 draws of a 30-atom batch the fraction is within 5 standard
    errors of p, for free and for fixed atoms alike (masking moves nothing)."""
    batch = example_batch()
    p = 0.75
    objective = _objective(mask_probability=p, atom_type_loss_weight=4.0, rebuild_graph=False)
    masks = torch.stack([objective.corrupt(batch, _gen(seed))[1][ATOM_MASK] for seed in range(200)])
    for selection in (torch.ones_like(batch.fixed), batch.fixed, ~batch.fixed):
        drawn = masks[:, selection]
        tolerance = 5 * math.sqrt(p * (1 - p) / drawn.numel())
        assert abs(float(drawn.double().mean()) - p) < tolerance


def test_atoms_already_masked_in_the_data_are_never_targets():
    batch = example_batch()
    unknown = torch.arange(len(batch.numbers)) % 3 == 0
    from dataclasses import replace

    batch = replace(batch, numbers=torch.where(unknown, 0, batch.numbers))
    objective = _objective(mask_probability=0.9, atom_type_loss_weight=1.0, rebuild_graph=False)
    for seed in range(5):
        _, targets = objective.corrupt(batch, _gen(seed))
        assert not targets[ATOM_MASK][unknown].any()


def test_loss_is_zero_for_a_perfect_predictor_and_positive_otherwise():
    batch = example_batch()
    objective = _masking()
    noisy, targets = objective.corrupt(batch, _gen())
    predictions = _perfect(targets)
    result = objective.loss(predictions, noisy, targets)
    assert float(result["loss"]) == 0.0 and float(result["atom_type_accuracy"]) == 1.0
    for key in (keys.per_block(keys.NOISE), keys.per_block(keys.ATOM_LOGITS)):
        worse = dict(predictions)
        worse[key] = worse[key].roll(1, dims=1)  # each atom gets its neighbour's prediction
        assert float(objective.loss(worse, noisy, targets)["loss"]) > 0


def test_atom_type_loss_reads_masked_atoms_only_and_position_loss_free_atoms_only():
    batch = example_batch(("slab", "molecule"))
    objective = _masking()
    noisy, targets = objective.corrupt(batch, _gen())
    predictions = _perfect(targets)
    mask, fixed = targets[ATOM_MASK], batch.fixed
    predictions[keys.per_block(keys.ATOM_LOGITS)][:, ~mask] = 0.0  # wrong where nothing is masked
    predictions[keys.per_block(keys.NOISE)][:, fixed] += 5.0  # wrong where nothing is noised
    assert float(objective.loss(predictions, noisy, targets)["loss"]) == 0.0


def test_loss_averages_exactly_over_block_decodings():
    batch = example_batch()
    objective = _masking(position_loss_weight=0.5, atom_type_loss_weight=4.0)
    noisy, targets = objective.corrupt(batch, _gen())
    offsets = torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64)
    predictions = _perfect(targets, 3)
    predictions[keys.per_block(keys.NOISE)] += offsets[:, None, None]
    # Block k: logit 1000 on the right type and z_k on one wrong type: CE = log(1 + e^(z_k − 1000)).
    wrong = torch.tensor([999.0, 1000.0, 998.0], dtype=torch.float64)
    predictions[keys.per_block(keys.ATOM_LOGITS)][..., 0] = wrong[:, None]  # type 0 is never a label
    result = objective.loss(predictions, noisy, targets)
    position = offsets.square().mean()
    atom_type = torch.log1p(torch.exp(wrong - 1000.0)).mean()
    torch.testing.assert_close(result["position"], position, rtol=0, atol=1e-12)
    torch.testing.assert_close(result["atom_type"], atom_type, rtol=0, atol=1e-12)
    torch.testing.assert_close(result["loss"], 0.5 * position + 4.0 * atom_type, rtol=0, atol=1e-12)


def test_same_seed_gives_the_same_corruption_and_nothing_mutates_the_batch():
    batch = example_batch()
    snapshot = {name: value.clone() for name, value in vars(batch).items() if isinstance(value, torch.Tensor)}
    objective = _masking()
    (a, ta), (b, tb) = objective.corrupt(batch, _gen(4)), objective.corrupt(batch, _gen(4))
    assert torch.equal(a.positions, b.positions) and torch.equal(a.numbers, b.numbers)
    assert torch.equal(ta[ATOM_MASK], tb[ATOM_MASK])
    c, tc = objective.corrupt(batch, _gen(5))
    assert not torch.equal(a.positions, c.positions) and not torch.equal(ta[ATOM_MASK], tc[ATOM_MASK])
    objective.loss(_perfect(ta), a, ta)
    for name, value in snapshot.items():
        assert torch.equal(getattr(batch, name), value), name


def test_config_validation_and_paper_presets():
    with pytest.raises(ValidationError):
        DenoisingConfig(sigma_angstrom=0.0, cutoff_angstrom=5.0)
    with pytest.raises(ValidationError):
        DenoisingConfig(mask_probability=1.0, cutoff_angstrom=5.0)
    with pytest.raises(ValidationError):
        DenoisingConfig()  # rebuilding the graph needs the cutoff
    paper = denoising_pcqm4mv2_paper()  # Table 3
    assert (paper.sigma_angstrom, paper.position_loss_weight, paper.mask_probability, paper.atom_type_loss_weight,
            paper.max_num_neighbors) == (0.02, 1.0, 0.75, 4.0, 20)
    assert denoising_cpu().sigma_angstrom == 0.02


def test_end_to_end_with_a_model_masked_types_are_learned():
    """A few Adam steps on one batch lower the loss: the whole path (mask token, per-block logits,
    cross-entropy, noise head) is differentiable and learns."""
    torch.manual_seed(0)
    model = Model(PairBackbone(16), {keys.NOISE: NodeVectorHead(16), keys.ATOM_LOGITS: AtomTypeHead(16)}).double()
    objective = _masking(rebuild_graph=False)
    noisy, targets = objective.corrupt(example_batch(), _gen())
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        result = objective.loss(model(noisy, all_blocks=True), noisy, targets)
        optimiser.zero_grad()
        result["loss"].backward()
        optimiser.step()
        losses.append(float(result["loss"].detach()))
    assert losses[-1] < 0.5 * losses[0]
