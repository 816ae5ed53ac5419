"""Gates, targets, parameter counts, masking and surgery create their tensors on the device of their inputs.

On a GPU, code that combines a tensor made on the default device (the CPU) with the model's tensors fails with
"Expected all tensors to be on the same device". The ``meta`` device (shapes, no data) shows the same bug on a
CPU-only machine: meta and CPU tensors cannot be combined either ("Tensor on device cpu is not on the expected
device meta!"). Two directions cover the code:

- meta inputs, CPU default: what needs no values (sampling, keep probabilities, the Lagrangian, deterministic and
  target gates, parameter counts) runs on gates moved to meta; a stray CPU tensor raises, or shows in an output,
  which must be on meta.
- CPU inputs, meta default (``with torch.device("meta")``): what reads values (the pruning plan, the non-uniform
  final gates, the masked forward and its rounding sensitivity, surgery, the report) runs on real CPU tensors while
  every tensor created without a device lands on meta and cannot be combined with them, or shows in an output,
  which must be on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from helpers import with_lora

from tailored.core.exactness import masked_logits, rounding_sensitivity
from tailored.core.export import pruning_report
from tailored.core.gates import UNIT_TYPES, PruningGates
from tailored.core.prune import plan_pruning, prune_model
from tailored.core.shapes import shape_gates
from tailored.core.structure import GateValues, describe, parameter_count
from tailored.core.targets import constraint_values, resolve_target, rounded_gates

UNIFORM_UNITS = ("groups", "channels", "hidden", "layers")


def named_tensors(name: str, value) -> list[tuple[str, torch.Tensor]]:
    """Every tensor in ``value`` (a tensor, GateValues, module, or a tuple/list/dict of them), with a path name."""
    if isinstance(value, torch.Tensor):
        return [(name, value)]
    if isinstance(value, GateValues):
        return [(f"{name}.{unit}", tensor) for unit, tensor in value.items()]
    if isinstance(value, torch.nn.Module):
        return [(f"{name}.{key}", tensor) for key, tensor in [*value.named_parameters(), *value.named_buffers()]]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, tuple | list) else []
    return [pair for key, item in items for pair in named_tensors(f"{name}[{key}]", item)]


def assert_on(device: str, **outputs) -> None:
    """Every tensor of every named output lives on ``device``; the message names the strays."""
    stray = [
        f"{path}: {tensor.device} {tuple(tensor.shape)}"
        for name, value in outputs.items()
        for path, tensor in named_tensors(name, value)
        if tensor.device.type != device
    ]
    assert not stray, f"tensors off {device}: {stray}"


def gates_for(uniform: bool, logits: str) -> PruningGates:
    """Gates of the tiny model with a 0.6 target over every unit type the mode allows."""
    structure = describe(tiny_model(num_layers=3, num_kv_heads=2, n_rep=2, head_dim=4, intermediate_size=24))
    units = UNIFORM_UNITS if uniform else UNIT_TYPES
    target = resolve_target(structure, units, 0.6, None, uniform, round_to=1)
    return PruningGates(structure, units, target, logits)


@pytest.mark.parametrize("logits", ["direct", "generator"])
@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "non_uniform"])
def test_gate_code_on_meta_inputs_creates_nothing_on_the_cpu(uniform, logits):
    gates = gates_for(uniform, logits).to("meta")
    structure = gates.structure
    assert_on("meta", gates=gates)
    sample, probs = gates.sample(), gates.keep_probabilities()
    loss, expected, target = gates.sparsity_loss(warmup=0.5)
    loss.backward()
    deterministic = gates.deterministic(kept={"groups": 1, "channels": torch.full((3,), 5, device="meta")})
    assert_on(
        "meta",
        sample=sample,
        probs=probs,
        expected_count=gates.expected_parameter_count(),
        sparsity=(loss, expected, target),
        gradients=[p.grad for p in gates.parameters() if p.grad is not None],
        deterministic=gates.deterministic(),
        deterministic_kept=deterministic,
        count=parameter_count(structure, deterministic.kept()),
        constraints=constraint_values(gates.target, structure, probs),
        rounded=rounded_gates(gates.log_alphas(), probs, gates.prune),
        ranking=gates.ranking_logits(),
    )
    if uniform:  # the non-uniform target reads values (a search over channel counts): see the CPU test below
        final = gates.target_gates()
        assert_on("meta", target_gates=final)
        assert_on("meta", final_count=parameter_count(structure, final.kept()))
        scores = probs.map(torch.rand_like)
        assert_on("meta", shape_gates=shape_gates(structure, gates.target.shape, scores))
    gates.init_from_scores(probs.map(torch.rand_like))
    gates.freeze(deterministic)
    gates.clamp_()
    assert_on("meta", frozen=gates.frozen(), after=gates)


def test_value_reading_code_on_cpu_inputs_creates_nothing_on_the_default_device(tokens):
    model = with_lora(tiny_model(num_layers=3, num_kv_heads=2, n_rep=2, head_dim=4, intermediate_size=24))
    gates = gates_for(uniform=False, logits="direct")
    structure = gates.structure
    with torch.no_grad():
        gates.log_alpha["channels"].normal_(0.0, 3.0)  # some channels below zero, so the final search has work
    with torch.device("meta"):
        final = gates.target_gates()
        plan = plan_pruning(structure, final)
        logits = masked_logits(model, final, tokens)
        sensitivity = rounding_sensitivity(model, final, tokens)
        pruned = prune_model(model, final)
        report = pruning_report(structure, final)
        target = resolve_target(structure, UNIFORM_UNITS, 0.6, None, True, round_to=1)
        scores = final.map(torch.rand_like)
        uniform = shape_gates(structure, target.shape, scores)
    assert_on("cpu", final=final, logits=logits, pruned=pruned, uniform=uniform)
    assert len(plan.layers) == len(report["layers"]) > 0 and sensitivity > 0
    assert sum(p.numel() for p in pruned.parameters()) == report["parameters"]["after"]


def test_gate_values_are_made_where_they_are_asked_for():
    structure = gates_for(uniform=True, logits="direct").structure
    ones = GateValues.ones(structure, device="meta")
    assert_on("meta", ones=ones)
    assert {tensor.dtype for _, tensor in ones.items()} == {torch.float32}
    with torch.device("meta"):
        assert_on("cpu", cpu=GateValues.ones(structure, device="cpu"))
