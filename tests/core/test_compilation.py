"""Compiled decoder layers (model.compile): the same logits and gradients as eager, one graph shared by the layers,
no graph breaks, and the pruned model compiled anew still equal to the masked one."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from conftest import tiny_model
from helpers import EXACT_FP32, non_uniform_gates, uniform_gates, with_lora
from torch._dynamo.utils import counters

from tailored.core.compilation import CompiledLayers
from tailored.core.masking import GateHooks
from tailored.core.prune import prune_model
from tailored.core.structure import describe


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test counts its own graphs."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def gated_model(layers: int = 4):
    model = with_lora(tiny_model(num_layers=layers, head_dim=8, intermediate_size=32)).train()
    model.base_model.model.requires_grad_(False)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return model, GateHooks(model)


def training_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """The training forward's call (no KV cache)."""
    return model(input_ids=tokens, use_cache=False).logits


def step(model, hooks, gates, tokens, compiled: CompiledLayers | None = None):
    """Logits and the gradients of LoRA and of the gate values for one masked forward and backward."""
    gates = gates.map(lambda value: value.clone().requires_grad_(True))
    model.zero_grad()
    with hooks.applied(gates), nullcontext() if compiled is None else compiled.active():
        logits = training_logits(model, tokens)
        logits.square().mean().backward()
    lora = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), lora, {name: value.grad for name, value in gates.items()}


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_layers_match_eager_and_share_one_graph(tokens):
    model, hooks = gated_model()
    gates = non_uniform_gates(describe(model))
    eager = step(model, hooks, gates, tokens)
    layers = CompiledLayers(model, backend="aot_eager")
    compiled = step(model, hooks, gates, tokens, layers)
    torch.testing.assert_close(compiled[0], eager[0], rtol=0, atol=EXACT_FP32)
    for expected, found in zip(eager[1:], compiled[1:], strict=True):
        assert expected.keys() == found.keys() and expected
        for name in expected:
            torch.testing.assert_close(found[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs() == 1  # 4 layers, one graph
    step(model, hooks, non_uniform_gates(describe(model)), tokens, layers)  # new gate tensors: the same graph
    assert graphs() == 1
    # hidden dims ungated (as in a run that does not prune them): the output scales are [1] rather than [d], and the
    # first layer's input (the frozen embedding's output) needs no gradient: two graphs more, not one per layer
    step(model, hooks, uniform_gates(describe(model)), tokens, layers)
    assert graphs() == 3


def test_the_pruned_model_compiled_again_equals_the_masked_one(tokens):
    model, hooks = gated_model()
    gates = uniform_gates(describe(model))
    with torch.no_grad(), hooks.applied(gates), CompiledLayers(model, backend="aot_eager").active():
        masked = training_logits(model, tokens)
    hooks.remove()
    pruned = prune_model(model, gates)
    before = graphs()
    with torch.no_grad(), CompiledLayers(pruned, backend="aot_eager").active():
        found = training_logits(pruned, tokens)
    torch.testing.assert_close(found, masked, rtol=0, atol=EXACT_FP32)
    assert graphs() - before <= 2  # the new widths: a graph (or two) more, not one per layer


def test_outside_active_the_layers_run_their_eager_forward(tokens):
    model, hooks = gated_model()
    layers = CompiledLayers(model, backend="aot_eager")
    with torch.no_grad():
        model(input_ids=tokens)  # with a KV cache, as generation and evaluation run
    assert graphs() == 0
    with layers.active():
        pass
    assert all("forward" not in vars(layer) for layer in layers.layers)


@pytest.mark.slow
def test_inductor_compiled_pruned_model_equals_the_masked_one(tokens):
    """The default backend generates code (C++ on a CPU: a minute or two to compile)."""
    model, hooks = gated_model(layers=3)
    gates = non_uniform_gates(describe(model))
    with torch.no_grad(), hooks.applied(gates):
        eager_masked = training_logits(model, tokens)
    with torch.no_grad(), hooks.applied(gates), CompiledLayers(model).active():
        masked = training_logits(model, tokens)
    torch.testing.assert_close(masked, eager_masked, rtol=0, atol=EXACT_FP32)
    hooks.remove()
    pruned = prune_model(model, gates)
    with torch.no_grad(), CompiledLayers(pruned).active():
        torch.testing.assert_close(training_logits(pruned, tokens), masked, rtol=0, atol=EXACT_FP32)
    assert not counters["graph_break"], dict(counters["graph_break"])
