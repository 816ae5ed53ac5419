"""Hard-concrete gates: sampling, keep probabilities, deterministic gates."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from tailored.core import hard_concrete
from tailored.core.gates import PruningGates
from tailored.core.structure import describe


def test_samples_are_in_the_unit_interval_with_exact_zeros_and_ones():
    torch.manual_seed(0)
    z = hard_concrete.sample(torch.zeros(100_000))
    assert z.min() == 0 and z.max() == 1
    assert 0.05 < (z == 0).float().mean() < 0.5 and 0.05 < (z == 1).float().mean() < 0.5


@pytest.mark.parametrize("log_alpha", [-2.0, 0.0, 1.5])
def test_keep_probability_matches_sampled_frequency(log_alpha):
    torch.manual_seed(0)
    z = hard_concrete.sample(torch.full((200_000,), log_alpha))
    assert abs((z > 0).float().mean().item() - hard_concrete.keep_probability(torch.tensor(log_alpha)).item()) < 0.005


def test_samples_are_differentiable_in_log_alpha():
    log_alpha = torch.zeros(1000, requires_grad=True)
    hard_concrete.sample(log_alpha).sum().backward()
    assert log_alpha.grad.abs().sum() > 0


def test_keep_top_k_keeps_the_highest_scores_per_row():
    scores = torch.tensor([[0.1, 0.9, 0.5], [3.0, 1.0, 2.0]])
    values = torch.tensor([[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]])
    kept = hard_concrete.keep_top_k(scores, values, torch.tensor([2, 1]))
    assert torch.equal(kept, torch.tensor([[0.0, 20.0, 30.0], [40.0, 0.0, 0.0]]))


def test_fresh_gates_keep_everything_and_sample_mostly_ones():
    gates = PruningGates(describe(tiny_model()))
    deterministic = gates.deterministic()
    assert all(bool((value > 0).all()) for _, value in deterministic.items())
    assert bool((deterministic.hidden == 1).all())
    assert (gates.sample().channels == 1).float().mean() > 0.95


def test_deterministic_gates_keep_the_requested_counts_of_the_highest_logits():
    structure = describe(tiny_model(num_layers=3, num_kv_heads=3, intermediate_size=10))
    gates = PruningGates(structure, prune=("groups", "channels", "layers", "hidden"))
    with torch.no_grad():
        for parameter in gates.log_alpha.values():
            parameter.copy_(torch.randn_like(parameter) * 3)
    values = gates.deterministic({"groups": torch.tensor([1, 2, 3]), "channels": 4, "layers": 2, "hidden": 5})
    assert (values.groups > 0).sum(-1).tolist() == [1, 2, 3]
    assert (values.channels > 0).sum(-1).tolist() == [4, 4, 4]
    assert int((values.layers > 0).sum()) == 2 and int((values.hidden > 0).sum()) == 5
    assert set(values.hidden.unique().tolist()) == {0.0, 1.0}
    log_alpha = gates.log_alpha["channels"]
    kept = values.channels > 0
    assert (log_alpha[kept].reshape(3, 4).min(-1).values >= log_alpha[~kept].reshape(3, 6).max(-1).values).all()
    expected_soft = hard_concrete.soft_value(log_alpha)[kept]
    assert torch.allclose(values.channels[kept], expected_soft)
    assert bool((values.attn == 1).all())  # not pruned: always kept


def test_default_deterministic_counts_round_the_expected_counts():
    structure = describe(tiny_model(intermediate_size=10))
    gates = PruningGates(structure, prune=("channels",))
    with torch.no_grad():
        gates.log_alpha["channels"][:, :3] = -10.0  # P(keep) ~ 0
    values = gates.deterministic()
    assert (values.channels > 0).sum(-1).tolist() == [7, 7, 7]


def test_unknown_unit_type_is_refused():
    with pytest.raises(ValueError, match="prune must name one or more of"):
        PruningGates(describe(tiny_model()), prune=("heads",))


def test_fit_channels_reaches_the_target_within_one_channel_per_layer():
    from tailored.core.shapes import UniformShape, fit_channels, shape_parameter_count

    structure = describe(tiny_model(num_layers=3, num_kv_heads=3, intermediate_size=40))
    shape = fit_channels(structure, UniformShape(groups=2, channels=0, hidden=18, layers=3), target=8000)
    per_channel = 3 * 18 * 3
    assert abs(shape_parameter_count(structure, shape) - 8000) <= per_channel / 2
    for unreachable in (10_000_000, 100):
        with pytest.raises(ValueError, match=f"no MLP width reaches {unreachable:,} parameters"):
            fit_channels(structure, shape, target=unreachable)


def test_shape_gates_keep_the_same_units_count_in_every_layer():
    from tailored.core.shapes import UniformShape, shape_gates

    structure = describe(tiny_model(num_layers=4, num_kv_heads=3, intermediate_size=10))
    torch.manual_seed(0)
    scores = PruningGates(structure).keep_probabilities().map(torch.rand_like)
    gates = shape_gates(structure, UniformShape(groups=2, channels=6, hidden=20, layers=3), scores)
    kept = gates.kept()
    assert kept.groups.sum(-1).tolist() == [2, 2, 2, 2] and kept.channels.sum(-1).tolist() == [6] * 4
    assert int(kept.layers.sum()) == 3 and int(kept.hidden.sum()) == 20
    with pytest.raises(ValueError, match=r"impossible uniform shape: groups=4 \(allowed 1..3\)"):
        shape_gates(structure, UniformShape(groups=4, channels=6, hidden=20, layers=3), scores)
