"""Noisy Nodes (Noisy Nodes §3.3): corruption, rebuilt graph, minimum-image relative targets,
block-averaged loss, presets."""

from __future__ import annotations

from dataclasses import replace
import pytest
import torch
from pydantic import ValidationError

from molden.graph import edge_vectors, neighbor_list
from molden.models import GraphScalarHead, Model, NodeVectorHead, keys
from molden.objectives import Objective
from molden.objectives.noisy_nodes import (
    NODE_TARGET,
    POSITION_DELTA_ANGSTROM,
    NoisyNodes,
    NoisyNodesConfig,
    PrimaryLoss,
    noisy_nodes_emt_cpu,
    noisy_nodes_oc20_paper,
    noisy_nodes_qm9_cpu,
    noisy_nodes_qm9_finetune_paper,
    noisy_nodes_qm9_paper,
    position_delta_statistics,
)
from tiny_models import PairBackbone
from symmetry import example_batch


class EnergyMSE:
    """The simplest graph-target primary loss: MSE of the energy, eV²."""

    def loss(self, predictions, batch, targets):
        error = predictions[keys.ENERGY] - batch.energy
        return {"loss": error.square().mean(), "energy_mae_ev": error.abs().mean()}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _with_relaxed(batch, seed: int = 1, scale: float = 0.2):
    """The batch with relaxed positions a small random step from its positions (fixed atoms stay)."""
    step = torch.randn(batch.positions.shape, generator=_gen(seed), dtype=batch.positions.dtype) * scale
    return replace(batch, relaxed_positions=batch.positions + step * (~batch.fixed)[:, None])


def _objective(**options) -> NoisyNodes:
    return NoisyNodes(NoisyNodesConfig(**{"cutoff_angstrom": 5.0, **options}), EnergyMSE())


def _relaxed_objective(**options) -> NoisyNodes:
    return _objective(**{"node_target": "relaxed_positions", "sigma_angstrom": 0.3, **options})


def _sorted_edges(edge_index, unit_shifts):
    rows = torch.cat([edge_index.T, unit_shifts.long()], dim=1)
    return sorted(map(tuple, rows.tolist()))


def test_noisy_nodes_is_an_objective_and_the_test_primary_a_primary_loss():
    assert isinstance(_objective(), Objective)
    assert isinstance(EnergyMSE(), PrimaryLoss)
    assert _objective().needs_all_blocks


@pytest.mark.parametrize("node_target", ["noise", "relaxed_positions"])
@pytest.mark.parametrize("sampling", ["frame", "interpolate"])
def test_corruption_never_moves_fixed_atoms(node_target, sampling):
    batch = _with_relaxed(example_batch(("slab", "bulk")))
    assert batch.fixed.any()
    noisy, _ = _objective(node_target=node_target, sigma_angstrom=0.3, trajectory_sampling=sampling).corrupt(batch, _gen())
    fixed = batch.fixed
    assert torch.equal(noisy.positions[fixed], batch.positions[fixed])
    assert (noisy.positions[~fixed] != batch.positions[~fixed]).all()


def test_rebuilt_graph_equals_the_neighbor_list_of_the_noisy_positions():
    batch = example_batch()
    noisy, _ = _objective(sigma_angstrom=0.3).corrupt(batch, _gen())
    edge_index, unit_shifts = neighbor_list(noisy.positions, 5.0, cell=batch.cell, pbc=batch.pbc, batch=batch.batch)
    assert _sorted_edges(noisy.edge_index, noisy.unit_shifts) == _sorted_edges(edge_index, unit_shifts)
    assert noisy.n_edge.tolist() == torch.bincount(batch.batch[edge_index[0]], minlength=3).tolist()
    assert _sorted_edges(noisy.edge_index, noisy.unit_shifts) != _sorted_edges(batch.edge_index, batch.unit_shifts)


def test_kept_graph_option_keeps_the_clean_graph():
    batch = example_batch()
    noisy, _ = _objective(sigma_angstrom=0.3, rebuild_graph=False).corrupt(batch, _gen())
    assert noisy.edge_index is batch.edge_index and noisy.unit_shifts is batch.unit_shifts
    assert not torch.equal(noisy.positions, batch.positions)


def test_atom_pushed_across_the_cell_face_keeps_its_images_and_gets_the_minimum_image_target():
    """The relaxed atom sits just inside face a = 1, the input frame (wrapped, as data often is)
    just past face a = 0: its relative target is the short step across the face, not a cell."""
    batch = example_batch(("bulk",))
    a = batch.cell[0, 0]
    frac = torch.linalg.solve(batch.cell[0].T, batch.positions.T).T
    relaxed = batch.positions.clone()
    relaxed[0] = (torch.tensor([0.99, frac[0, 1], frac[0, 2]], dtype=a.dtype)) @ batch.cell[0]
    frame = batch.positions.clone()
    frame[0] = relaxed[0] + 0.02 * a - a  # crossed the face and wrapped back into the cell
    batch = replace(batch, positions=frame, relaxed_positions=relaxed)
    objective = _relaxed_objective(sigma_angstrom=0.05)
    noisy, targets = objective.corrupt(batch, _gen())
    # Target: relaxed − noisy input of the unwrapped atom, a step of about 0.02 |a|, never a cell.
    expected = relaxed - noisy.positions
    expected[0] = relaxed[0] - (noisy.positions[0] + a)
    torch.testing.assert_close(targets[POSITION_DELTA_ANGSTROM], expected, rtol=0, atol=1e-12)
    assert targets[POSITION_DELTA_ANGSTROM][0].norm() < 0.5
    # Images: the graph of the wrapped input equals that of the same input unwrapped.
    unwrapped = replace(noisy, positions=noisy.positions + torch.nn.functional.one_hot(torch.tensor(0), len(frame))[:, None] * a)
    ei, us = neighbor_list(unwrapped.positions, 5.0, cell=batch.cell, pbc=batch.pbc, batch=batch.batch)
    lengths = edge_vectors(noisy).norm(dim=1).sort().values
    lengths_unwrapped = edge_vectors(replace(unwrapped, edge_index=ei, unit_shifts=us)).norm(dim=1).sort().values
    torch.testing.assert_close(lengths, lengths_unwrapped, rtol=0, atol=1e-10)
    assert torch.equal(torch.bincount(noisy.edge_index[0], minlength=len(frame)),
                       torch.bincount(ei[0], minlength=len(frame)))


def test_noise_target_is_the_noise_over_sigma():
    batch = example_batch()
    objective = _objective(sigma_angstrom=0.02)
    noisy, targets = objective.corrupt(batch, _gen())
    assert targets[NODE_TARGET].shape == (len(batch.positions), 3)
    torch.testing.assert_close(targets[NODE_TARGET], (noisy.positions - batch.positions) / 0.02, rtol=0, atol=1e-9)
    free = targets[NODE_TARGET][~batch.fixed]
    assert 0.5 < float(free.std()) < 1.5  # unit variance: σ divided out


def test_relaxed_target_is_the_normalised_step_from_noisy_input_to_relaxed_positions():
    batch = _with_relaxed(example_batch(("molecule", "slab")))
    objective = _relaxed_objective(position_delta_mean_angstrom=(0.1, -0.2, 0.3), position_delta_std_angstrom=0.5)
    noisy, targets = objective.corrupt(batch, _gen())
    delta = batch.relaxed_positions - noisy.positions  # no face crossed at these step sizes
    torch.testing.assert_close(targets[POSITION_DELTA_ANGSTROM], delta, rtol=0, atol=1e-12)
    mean = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    torch.testing.assert_close(targets[NODE_TARGET], (delta - mean) / 0.5, rtol=0, atol=1e-12)
    # Undoing the normalisation on a perfect prediction gives back the relaxed positions.
    predicted = objective.predicted_positions({keys.POSITION_DELTA: targets[NODE_TARGET]}, noisy)
    torch.testing.assert_close(predicted, batch.relaxed_positions, rtol=0, atol=1e-12)


def test_interpolated_frames_lie_between_the_frame_and_the_relaxed_positions():
    batch = _with_relaxed(example_batch(("molecule", "slab")))
    noisy, _ = _relaxed_objective(sigma_angstrom=0.0, trajectory_sampling="interpolate").corrupt(batch, _gen())
    step, moved = batch.relaxed_positions - batch.positions, noisy.positions - batch.positions
    free = ~batch.fixed
    t = (moved[free] * step[free]).sum(-1) / step[free].square().sum(-1)
    torch.testing.assert_close(moved[free], t[:, None] * step[free], rtol=0, atol=1e-12)
    per_graph = batch.batch[free]
    for g in per_graph.unique():  # one t per structure, in [0, 1]
        assert torch.allclose(t[per_graph == g], t[per_graph == g][0])
    assert ((t >= 0) & (t <= 1)).all()


def _perfect(batch, targets, n_blocks: int, node_key=keys.NOISE):
    energy = batch.energy.expand(n_blocks, -1).clone()
    node = targets[NODE_TARGET].expand(n_blocks, -1, -1).clone()
    return {keys.per_block(keys.ENERGY): energy, keys.ENERGY: energy[-1],
            keys.per_block(node_key): node, node_key: node[-1]}


@pytest.mark.parametrize("node_target", ["noise", "relaxed_positions"])
def test_loss_is_zero_for_a_perfect_predictor_and_positive_otherwise(node_target):
    batch = _with_relaxed(example_batch())
    objective = _objective(node_target=node_target, sigma_angstrom=0.3)
    noisy, targets = objective.corrupt(batch, _gen())
    predictions = _perfect(noisy, targets, 3, objective.node_key)
    result = objective.loss(predictions, noisy, targets)
    assert float(result["loss"]) == 0.0 and float(result["node"]) == 0.0 and float(result["primary"]) == 0.0
    for key in (keys.per_block(keys.ENERGY), keys.per_block(objective.node_key)):
        worse = dict(predictions)
        worse[key] = worse[key] + 0.01
        assert float(objective.loss(worse, noisy, targets)["loss"]) > 0


def test_loss_averages_exactly_over_block_decodings_and_ignores_fixed_atoms():
    batch = example_batch(("slab", "molecule"))
    weight = 0.3
    objective = _objective(node_loss_weight=weight)
    noisy, targets = objective.corrupt(batch, _gen())
    energy_offsets = torch.tensor([0.5, -0.25, 0.1], dtype=torch.float64)
    node_offsets = torch.tensor([2.0, 1.0, -0.5], dtype=torch.float64)
    energy = batch.energy + energy_offsets[:, None]
    node = targets[NODE_TARGET] + node_offsets[:, None, None]
    node[:, batch.fixed] += 100.0  # errors on fixed atoms must not count
    predictions = {keys.per_block(keys.ENERGY): energy, keys.ENERGY: energy[-1],
                   keys.per_block(keys.NOISE): node, keys.NOISE: node[-1]}
    result = objective.loss(predictions, noisy, targets)
    primary = energy_offsets.square().mean()  # each block's MSE is its offset squared
    node_loss = node_offsets.square().mean()
    torch.testing.assert_close(result["primary"], primary, rtol=0, atol=1e-12)
    torch.testing.assert_close(result["node"], node_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(result["loss"], primary + weight * node_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(result["node_last_block"], node_offsets[-1].square(), rtol=0, atol=1e-12)
    torch.testing.assert_close(result["energy_mae_ev"], energy_offsets[-1].abs(), rtol=0, atol=1e-12)
    # Evaluation: only the last block decoded.
    last = objective.loss({keys.ENERGY: energy[-1], keys.NOISE: node[-1]}, noisy, targets)
    torch.testing.assert_close(last["loss"], energy_offsets[-1] ** 2 + weight * node_offsets[-1] ** 2, rtol=0, atol=1e-12)


def test_same_seed_gives_the_same_corruption_and_another_seed_another():
    batch = _with_relaxed(example_batch())
    objective = _relaxed_objective(trajectory_sampling="interpolate")
    (a, ta), (b, tb) = objective.corrupt(batch, _gen(7)), objective.corrupt(batch, _gen(7))
    assert torch.equal(a.positions, b.positions) and torch.equal(ta[NODE_TARGET], tb[NODE_TARGET])
    assert torch.equal(a.edge_index, b.edge_index)
    c, _ = objective.corrupt(batch, _gen(8))
    assert not torch.equal(a.positions, c.positions)


def test_corrupt_and_loss_do_not_mutate_the_input_batch():
    batch = _with_relaxed(example_batch())
    snapshot = {name: value.clone() for name, value in vars(batch).items() if isinstance(value, torch.Tensor)}
    objective = _relaxed_objective(trajectory_sampling="interpolate")
    noisy, targets = objective.corrupt(batch, _gen())
    objective.loss(_perfect(noisy, targets, 2, keys.POSITION_DELTA), noisy, targets)
    for name, value in snapshot.items():
        assert torch.equal(getattr(batch, name), value), name


def test_primary_loss_with_corrupt_is_called_on_the_clean_batch():
    class Standardised(EnergyMSE):
        def corrupt(self, batch, generator):
            return batch, {"energy_standardised": batch.energy / 10.0}

    batch = example_batch()
    noisy, targets = NoisyNodes(noisy_nodes_qm9_paper(), Standardised()).corrupt(batch, _gen())
    torch.testing.assert_close(targets["energy_standardised"], batch.energy / 10.0)
    assert NODE_TARGET in targets


def test_relaxed_target_without_relaxed_positions_is_refused():
    from molden.errors import MoldenInputError

    with pytest.raises(MoldenInputError, match="relaxed_positions"):
        _relaxed_objective().corrupt(example_batch(), _gen())


def test_missing_node_head_is_a_config_error():
    from molden.errors import MoldenConfigError

    batch = example_batch()
    objective = _objective()
    noisy, targets = objective.corrupt(batch, _gen())
    with pytest.raises(MoldenConfigError, match="noise"):
        objective.loss({keys.ENERGY: batch.energy}, noisy, targets)


def test_config_refuses_noise_target_without_noise_and_rebuild_without_cutoff():
    with pytest.raises(ValidationError):
        NoisyNodesConfig(sigma_angstrom=0.0, node_target="noise", cutoff_angstrom=5.0)
    with pytest.raises(ValidationError):
        NoisyNodesConfig(sigma_angstrom=0.02)
    with pytest.raises(ValidationError):
        NoisyNodesConfig(sigma_angstrom=0.02, cutoff_angstrom=5.0, unknown=1)
    NoisyNodesConfig(sigma_angstrom=0.0, node_target="relaxed_positions", rebuild_graph=False)


def test_presets_carry_the_paper_values():
    qm9, oc20, finetune = noisy_nodes_qm9_paper(), noisy_nodes_oc20_paper(), noisy_nodes_qm9_finetune_paper()
    assert (qm9.sigma_angstrom, qm9.node_loss_weight, qm9.node_target) == (0.02, 0.1, "noise")  # Table 10
    assert (oc20.sigma_angstrom, oc20.node_loss_weight, oc20.node_target) == (0.3, 1.0, "relaxed_positions")  # Table 9
    assert (finetune.sigma_angstrom, finetune.node_loss_weight, finetune.max_num_neighbors) == (0.05, 0.01, 20)
    assert noisy_nodes_qm9_cpu().sigma_angstrom == 0.02 and noisy_nodes_emt_cpu().node_target == "relaxed_positions"


def test_position_delta_statistics_of_known_steps():
    batch = example_batch(("molecule",))
    step = torch.zeros_like(batch.positions)
    step[:, 0] = torch.where(torch.arange(len(step)) % 2 == 0, 1.0, -1.0).to(step.dtype) * 0.3
    step[:, 2] = 0.3
    batch = replace(batch, relaxed_positions=batch.positions + step)
    mean, std = position_delta_statistics([batch], sigma_angstrom=0.0)
    n = len(step)
    expected_mean = (float(step[:, 0].mean()), 0.0, 0.3)
    assert mean == pytest.approx(expected_mean, abs=1e-12)
    variance = float((step.square().sum() / (3 * n))) - sum(m * m for m in expected_mean) / 3
    assert std == pytest.approx(variance**0.5, abs=1e-12)
    _, noisy_std = position_delta_statistics([batch], sigma_angstrom=0.1)
    assert noisy_std == pytest.approx((variance + 0.01) ** 0.5, abs=1e-12)


def test_end_to_end_with_a_model_every_block_gets_a_gradient():
    torch.manual_seed(0)
    model = Model(PairBackbone(16), {keys.ENERGY: GraphScalarHead(16), keys.NOISE: NodeVectorHead(16)}).double()
    objective = _objective()
    batch = example_batch()
    noisy, targets = objective.corrupt(batch, _gen())
    predictions = model(noisy, all_blocks=objective.needs_all_blocks)
    assert predictions[keys.per_block(keys.NOISE)].shape == (2, len(batch.positions), 3)
    result = objective.loss(predictions, noisy, targets)
    result["loss"].backward()
    assert torch.isfinite(result["loss"].detach()) and float(result["node"].detach()) > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_an_unset_node_loss_weight_is_the_papers_for_the_node_target():
    noise = NoisyNodesConfig(sigma_angstrom=0.02, cutoff_angstrom=5.0)
    relaxed = NoisyNodesConfig(sigma_angstrom=0.3, node_target="relaxed_positions", cutoff_angstrom=6.0)
    assert noise.node_loss_weight == 0.1  # Table 10 (QM9)
    assert relaxed.node_loss_weight == 1.0  # Table 9 (OC20 IS2RE); it was 0.1 before 2026-12-04
    assert NoisyNodesConfig(sigma_angstrom=0.3, node_target="relaxed_positions", cutoff_angstrom=6.0,
                            node_loss_weight=0.5).node_loss_weight == 0.5


def test_every_block_averages_the_primary_loss_over_the_block_decodings_without_noise():
    from molden.objectives.noisy_nodes import EveryBlock

    class Squared:
        needs_all_blocks = False

        def corrupt(self, batch, generator):
            return batch, {"t": torch.zeros(2)}

        def loss(self, predictions, batch, targets):
            value = (predictions["y"] - targets["t"]).square().mean()
            return {"loss": value, "y_mse": value}

    objective = EveryBlock(Squared())
    assert objective.needs_all_blocks
    marker = object()
    assert objective.corrupt(marker, None)[0] is marker  # no noise: the primary's batch
    blocks = torch.tensor([[1.0, 1.0], [3.0, 3.0]])  # block 0: mse 1; block 1 (last): mse 9
    out = objective.loss({keys.per_block("y"): blocks, "y": blocks[-1]}, None, {"t": torch.zeros(2)})
    assert float(out["loss"]) == pytest.approx(5.0) and float(out["y_mse"]) == pytest.approx(9.0)
    evaluation = objective.loss({"y": blocks[-1]}, None, {"t": torch.zeros(2)})  # only the last block decoded
    assert float(evaluation["loss"]) == pytest.approx(9.0)
