"""The structure map reads every supported layout and refuses the others; the parameter count is exact."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from tailored.gates import PruningGates
from tailored.structure import GateValues, UnsupportedModelError, describe, parameter_count

LAYOUTS = {
    "GQA 4:2": dict(num_kv_heads=2, n_rep=2),
    "MQA": dict(num_kv_heads=1, n_rep=4),
    "MHA": dict(num_kv_heads=4, n_rep=1),
    "tied": dict(tied=True),
    "llama biases": dict(bias=True),
    "qwen2": dict(family="qwen2"),
    "mistral": dict(family="mistral", num_layers=5),
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_describe_reads_the_layout(layout):
    model = tiny_model(**layout)
    structure = describe(model)
    config = model.config
    assert structure.num_layers == config.num_hidden_layers
    assert structure.num_kv_heads == config.num_key_value_heads
    assert structure.n_rep == config.num_attention_heads // config.num_key_value_heads
    assert structure.tied_embeddings == config.tie_word_embeddings
    assert structure.qkv_bias == (layout.get("family") == "qwen2" or layout.get("bias", False))
    assert structure.o_bias == layout.get("bias", False)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_count_of_all_ones_is_the_real_parameter_count(layout):
    model = tiny_model(**layout)
    structure = describe(model)
    assert int(parameter_count(structure, GateValues.ones(structure))) == sum(p.numel() for p in model.parameters())


def test_expected_count_is_the_mean_count_of_sampled_gates():
    """The differentiable count under keep probabilities equals the Monte-Carlo mean of exact 0/1 counts."""
    structure = describe(tiny_model(bias=True, num_layers=2))
    torch.manual_seed(0)
    probs = GateValues.ones(structure).map(lambda value: torch.rand_like(value) * 0.8 + 0.1)
    samples = 20000
    total = torch.zeros((), dtype=torch.float64)
    for _ in range(samples):
        total += parameter_count(structure, probs.map(lambda p: torch.bernoulli(p)))
    expected = parameter_count(structure, probs)
    assert abs(total / samples - expected) / expected < 0.01


def test_expected_count_has_gradients_for_every_pruned_unit_type():
    structure = describe(tiny_model())
    gates = PruningGates(structure, prune=("groups", "channels", "attn", "mlp", "layers", "hidden"))
    gates.expected_parameter_count().backward()
    for name, parameter in gates.log_alpha.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_unsupported_architecture_is_named():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=32))
    with pytest.raises(UnsupportedModelError, match=r"'gpt2'.*llama, mistral, qwen2"):
        describe(gpt2)


class CustomAttention(nn.Module):
    def forward(self, hidden_states, **kwargs):
        return hidden_states, None


def test_custom_attention_is_refused():
    model = tiny_model()
    model.model.layers[1].self_attn = CustomAttention()
    with pytest.raises(UnsupportedModelError, match="layer 1: self_attn is CustomAttention, expected .*LlamaAttention"):
        describe(model)


def test_already_pruned_layers_are_refused():
    model = tiny_model()
    model.model.layers[0].mlp.up_proj = nn.Linear(model.config.hidden_size, 3, bias=False)
    with pytest.raises(UnsupportedModelError, match=r"layer 0: mlp.up_proj.weight has shape \(3, 16\)"):
        describe(model)
