"""The structure map reads every supported layout and refuses the others; the parameter count is exact."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from torch import nn
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from tailored.core.gates import PruningGates
from tailored.core.structure import GateValues, UnsupportedModelError, describe, parameter_count, structure_from_config

LAYOUTS = {
    "GQA 4:2": dict(num_kv_heads=2, n_rep=2),
    "MQA": dict(num_kv_heads=1, n_rep=4),
    "MHA": dict(num_kv_heads=4, n_rep=1),
    "tied": dict(tied=True),
    "llama biases": dict(bias=True),
    "qwen2": dict(family="qwen2"),
    "mistral": dict(family="mistral", num_layers=5),
    "qwen3, H*dh 16 != hidden 10": dict(family="qwen3", hidden_size=10),
    "qwen3 biases, sliding window, MQA": dict(family="qwen3", bias=True, sliding_window=3, num_kv_heads=1, n_rep=4),
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
    assert structure.qk_norm == (layout.get("family") == "qwen3")
    assert structure_from_config(config) == structure


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


def test_qwen3_qk_norms_are_counted_with_their_attention_block():
    model = tiny_model("qwen3", hidden_size=10)
    structure = describe(model)
    dense = GateValues.ones(structure)
    no_attention = GateValues.ones(structure)
    no_attention.attn[1] = 0
    layer = model.model.layers[1]
    removed = sum(p.numel() for p in [*layer.self_attn.parameters(), *layer.input_layernorm.parameters()])
    assert {name for name, _ in layer.self_attn.named_parameters()} >= {"q_norm.weight", "k_norm.weight"}
    assert int(parameter_count(structure, dense) - parameter_count(structure, no_attention)) == removed


TINY_DECODER = dict(
    vocab_size=32,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
"""Config keys shared by the tiny decoders below."""

UNSUPPORTED = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=32)),
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(**TINY_DECODER, head_dim=4)),
    "phi3": lambda: Phi3ForCausalLM(Phi3Config(**TINY_DECODER)),
    "qwen3_moe": lambda: Qwen3MoeForCausalLM(Qwen3MoeConfig(**TINY_DECODER, num_experts=2, moe_intermediate_size=4)),
}
"""Architectures tailored refuses, each built tiny: a message must name the model type and the supported ones."""


@pytest.mark.parametrize("model_type", UNSUPPORTED)
def test_unsupported_architecture_is_named(model_type):
    model = UNSUPPORTED[model_type]()
    assert model.config.model_type == model_type
    message = rf"model type '{model_type}' .*is not supported; .*llama, mistral, qwen2, qwen3"
    with pytest.raises(UnsupportedModelError, match=message):
        describe(model)
    with pytest.raises(UnsupportedModelError, match=message):
        structure_from_config(model.config)


class CustomAttention(nn.Module):
    def forward(self, hidden_states, **kwargs):
        return hidden_states, None


def test_custom_attention_is_refused():
    model = tiny_model()
    model.model.layers[1].self_attn = CustomAttention()
    with pytest.raises(UnsupportedModelError, match="layer 1: self_attn is CustomAttention, expected .*LlamaAttention"):
        describe(model)


@pytest.mark.parametrize("norm", ["q_norm", "k_norm"])
def test_qwen3_qk_norms_must_be_stock_and_of_head_dim(norm):
    model = tiny_model("qwen3", head_dim=4)
    norm_class = type(model.model.layers[2].self_attn.q_norm)
    setattr(model.model.layers[2].self_attn, norm, norm_class(3))
    with pytest.raises(UnsupportedModelError, match=rf"layer 2: self_attn.{norm}.weight has shape \(3,\), .* \(4,\)"):
        describe(model)
    setattr(model.model.layers[0].self_attn, norm, nn.Identity())
    with pytest.raises(UnsupportedModelError, match=rf"layer 0: self_attn.{norm} is Identity, expected .*Qwen3RMSNorm"):
        describe(model)


def test_already_pruned_layers_are_refused():
    model = tiny_model()
    model.model.layers[0].mlp.up_proj = nn.Linear(model.config.hidden_size, 3, bias=False)
    with pytest.raises(UnsupportedModelError, match=r"layer 0: mlp.up_proj.weight has shape \(3, 16\)"):
        describe(model)
