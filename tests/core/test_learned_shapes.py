"""Learned uniform shapes: one budget over every pruned unit, counts tied across layers, a stock export of exactly
the predicted size whatever split the gates learned."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from helpers import EXACT_FP32, ROUNDING_FACTOR, with_lora
from transformers import AutoModelForCausalLM

from tailored.core.exactness import masked_logits, rounding_sensitivity
from tailored.core.export import pruning_report, save_pruned
from tailored.core.gates import PruningGates
from tailored.core.prune import prune_model
from tailored.core.shapes import full_shape
from tailored.core.structure import GateValues, describe, parameter_count
from tailored.core.targets import FRACTION_TOLERANCE, constraint_values, prunable_fraction, resolve_target

UNITS = ("groups", "channels", "hidden", "layers")
FRACTION = 0.6


def model_and_gates(prune=UNITS, fraction=FRACTION):
    model = tiny_model(num_layers=4, num_kv_heads=4, n_rep=2, head_dim=8, intermediate_size=64, tied=True)
    structure = describe(model)
    target = resolve_target(structure, prune, fraction, None, uniform=True, round_to=1, allocation="learned")
    return model, structure, PruningGates(structure, prune, target)


def learn(gates: PruningGates, kept: dict[str, float], seed: int = 0) -> None:
    """Set the logits as if training had learned to keep these shares of each type: the first units of every
    layer (in a random order) confidently kept, the rest confidently dropped, with per-layer noise in the counts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in gates.log_alpha.items():
            size = parameter.shape[-1]
            order = torch.rand(parameter.shape, generator=generator).argsort(-1)
            count = round(kept.get(name, 1.0) * size)
            parameter.copy_(torch.where(order < count, 6.0, -6.0) + torch.randn(parameter.shape, generator=generator))


SPLITS = {
    "attention kept, MLP narrow": {"groups": 1.0, "channels": 0.35, "hidden": 0.9, "layers": 1.0},
    "attention halved, MLP wide": {"groups": 0.5, "channels": 0.8, "hidden": 0.9, "layers": 1.0},
    "a layer dropped": {"groups": 0.75, "channels": 0.7, "hidden": 1.0, "layers": 0.75},
}


@pytest.mark.parametrize("split", SPLITS)
def test_a_learned_split_exports_a_stock_model_of_exactly_the_predicted_size(split, tmp_path):
    model, structure, gates = model_and_gates()
    learn(gates, SPLITS[split])
    final = gates.target_gates()
    kept = final.kept()
    predicted = int(parameter_count(structure, kept))
    assert abs(float(prunable_fraction(structure, UNITS, predicted)) - FRACTION) <= FRACTION_TOLERANCE

    report = pruning_report(structure, final)
    assert report["format"] == "stock" and report["uniform_shape"] is not None
    shape, full = report["uniform_shape"], full_shape(structure)
    assert shape["hidden"] % (shape["groups"] * structure.n_rep) == 0  # a hidden size Llama's config accepts
    assert shape["layers"] == round(SPLITS[split]["layers"] * full.layers)

    lora = with_lora(model)
    pruned = prune_model(lora, final)
    save_pruned(pruned, tmp_path / "export", report=report)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()  # stock: no remote code
    assert sum(p.numel() for p in reloaded.parameters()) == predicted == report["parameters"]["after"]

    tokens = torch.randint(0, structure.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = masked_logits(lora, final, tokens)
    bound = max(EXACT_FP32, ROUNDING_FACTOR * rounding_sensitivity(lora, final, tokens))
    assert (reloaded(tokens).logits - reference).abs().max().item() <= bound


def test_the_shape_follows_what_the_gates_learned():
    shapes = {}
    for split, kept in SPLITS.items():
        _, _, gates = model_and_gates()
        learn(gates, kept)
        kept_gates = gates.target_gates().kept()
        shapes[split] = (int(kept_gates.groups[0].sum()), int(kept_gates.channels[0].sum()))
    groups = {split: shape[0] for split, shape in shapes.items()}
    channels = {split: shape[1] for split, shape in shapes.items()}
    assert groups["attention kept, MLP narrow"] == 4 > groups["attention halved, MLP wide"] == 2
    assert channels["attention kept, MLP narrow"] < channels["attention halved, MLP wide"]


def test_every_layer_keeps_its_own_best_units_at_the_shared_count():
    _, structure, gates = model_and_gates(prune=("groups", "channels"))
    learn(gates, {"channels": 0.6})
    final = gates.target_gates()
    counts = (final.channels > 0).sum(-1)
    assert bool((counts == counts[0]).all())
    logits = gates.ranking_logits()["channels"]
    for layer in range(structure.num_layers):
        kept = final.channels[layer] > 0
        assert logits[layer][kept].min() >= logits[layer][~kept].max()


def test_one_budget_constraint_and_one_tying_constraint_per_layer_and_tied_type():
    _, structure, gates = model_and_gates()
    learn(gates, SPLITS["attention halved, MLP wide"])
    probs = gates.keep_probabilities()
    expected, target = constraint_values(gates.target, structure, probs, ramp=0.0)
    layers = structure.num_layers
    assert expected.shape == target.shape == (1 + 2 * layers,)
    whole = prunable_fraction(structure, UNITS, parameter_count(structure, probs)).float()
    torch.testing.assert_close(expected[0], whole)  # the model's expected fraction, ...
    assert target[0] == 1  # ... whose target the warm-up starts at dense, ...
    torch.testing.assert_close(target[1 : 1 + layers], probs.groups.mean(-1).mean().expand(layers))  # ... not ties
    _, ramped = constraint_values(gates.target, structure, probs, ramp=1.0)
    assert ramped[0] == pytest.approx(FRACTION)
    gaps = expected - target
    torch.testing.assert_close(gaps[1 : 1 + layers].sum(), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_the_tying_constraints_pull_each_layer_towards_the_mean():
    _, _, gates = model_and_gates(prune=("channels",))
    with torch.no_grad():
        gates.log_alpha["channels"].copy_(torch.linspace(-2, 4, 4).unsqueeze(-1).expand(4, 64))
    gates.lambda_2.data.fill_(10.0)
    loss, _, _ = gates.sparsity_loss(1.0)
    loss.backward()
    grad = gates.log_alpha["channels"].grad.sum(-1)
    assert grad[0] < 0 < grad[-1]  # descent raises the emptiest layer's logits and lowers the fullest's


def test_a_proportional_allocation_is_the_fixed_shape_of_before():
    structure = describe(tiny_model(num_layers=4, num_kv_heads=4, n_rep=2, head_dim=8, intermediate_size=64))
    proportional = resolve_target(structure, UNITS, FRACTION, None, True, 1, "proportional")
    learned = resolve_target(structure, UNITS, FRACTION, None, True, 1, "learned")
    assert proportional.shape is not None and not proportional.tied
    assert learned.shape is None and learned.tied
    with pytest.raises(ValueError, match="pruning.allocation must be one of learned, proportional"):
        resolve_target(structure, UNITS, FRACTION, None, True, 1, "greedy")


def test_importance_fills_the_learned_shape_with_the_best_scored_units_at_one():
    _, structure, gates = model_and_gates(prune=("groups", "channels"))
    learn(gates, SPLITS["attention halved, MLP wide"])
    scores = GateValues.ones(structure)
    generator = torch.Generator().manual_seed(1)
    scores.groups = torch.rand(scores.groups.shape, generator=generator)
    scores.channels = torch.rand(scores.channels.shape, generator=generator)
    with torch.no_grad():  # the learned logits stay; only the importance ranks (the prior) are set
        logits = {name: value.clone() for name, value in gates.log_alpha.items()}
        gates.init_from_scores(scores)
        for name, value in logits.items():
            gates.log_alpha[name].copy_(value)
    by_gates, by_importance = gates.target_gates(), gates.target_gates(by_importance=True)
    for name in ("groups", "channels"):  # the same learned counts ...
        assert torch.equal((getattr(by_gates, name) > 0).sum(-1), (getattr(by_importance, name) > 0).sum(-1))
        kept = getattr(by_importance, name) > 0
        score = getattr(scores, name)
        for layer in range(structure.num_layers):  # ... filled by the best scores, at 1
            assert score[layer][kept[layer]].min() >= score[layer][~kept[layer]].max()
        assert set(getattr(by_importance, name).unique().tolist()) <= {0.0, 1.0}
