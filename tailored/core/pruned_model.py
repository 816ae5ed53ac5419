"""Hugging Face classes for pruned models whose layers differ in shape ("non-uniform" exports).

A uniformly pruned model (every layer with the same heads and channels) is a stock Llama/Mistral/Qwen2/Qwen3 model
and needs none of this. When layers differ, the config records one entry per layer in ``layer_shapes``::

    {"num_key_value_heads": g, "intermediate_size": f}      g = 0: attention block removed
                                                             f = 0: MLP block removed

and the model class resizes each layer's projections after building the stock layout (Qwen3's per-head
``q_norm``/``k_norm`` of weight ``[head_dim]`` fit any head count and are kept). A removed block becomes
:class:`EmptyAttention` / :class:`EmptyMLP` and its RMSNorm an ``nn.Identity``: no parameters remain.

This file imports only torch, transformers and huggingface_hub, so that an export can carry a copy of it as
``modeling_tailored.py`` for ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)


class EmptyAttention(nn.Module):
    """An attention block whose every head was pruned: it adds nothing to the residual stream.

    It still writes a zero-width placeholder ``[B, 1, T, 1]`` into the KV cache, because the cache answers
    "how many tokens were seen" from layer 0's keys; without it, generation after a removed first attention block
    would restart positions at 0.
    """

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(
        self, hidden_states: torch.Tensor, cache=None, past_key_values=None, **kwargs
    ) -> tuple[torch.Tensor, None]:
        """``hidden_states [B, T, d]`` -> zeros ``[B, T, d]``. The decoder layer passes its KV cache as ``cache``
        (transformers >= 5.24) or ``past_key_values`` (older 5.x)."""
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            batch, seq = hidden_states.shape[:2]
            placeholder = hidden_states.new_zeros(batch, 1, seq, 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class EmptyMLP(nn.Module):
    """An MLP block whose every channel was pruned: it adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def _resize_layer(layer: nn.Module, shape: dict, config) -> None:
    """Replace the projections of a stock decoder layer by ones of the recorded per-layer shape.

    Everything else of the layer stays, Qwen3's q_norm/k_norm included while its attention block is kept.
    """
    hidden, head_dim = config.hidden_size, config.head_dim
    n_rep = config.num_attention_heads // config.num_key_value_heads
    groups, channels = shape["num_key_value_heads"], shape["intermediate_size"]
    attn, mlp = layer.self_attn, layer.mlp
    if groups == 0:
        layer.self_attn = EmptyAttention(attn.layer_idx)
        layer.input_layernorm = nn.Identity()
    else:
        qkv_bias = attn.q_proj.bias is not None
        attn.q_proj = nn.Linear(hidden, groups * n_rep * head_dim, bias=qkv_bias)
        attn.k_proj = nn.Linear(hidden, groups * head_dim, bias=qkv_bias)
        attn.v_proj = nn.Linear(hidden, groups * head_dim, bias=qkv_bias)
        attn.o_proj = nn.Linear(groups * n_rep * head_dim, hidden, bias=attn.o_proj.bias is not None)
    if channels == 0:
        layer.mlp = EmptyMLP()
        layer.post_attention_layernorm = nn.Identity()
    else:
        mlp_bias = mlp.down_proj.bias is not None
        mlp.gate_proj = nn.Linear(hidden, channels, bias=mlp_bias)
        mlp.up_proj = nn.Linear(hidden, channels, bias=mlp_bias)
        mlp.down_proj = nn.Linear(channels, hidden, bias=mlp_bias)


def _pruned_classes(family: str, prefix: str, config_base: type, model_base: type) -> tuple[type, type]:
    """A config and a causal-LM class for one family, recording per-layer shapes."""

    @strict
    class PrunedConfig(config_base):
        model_type = f"tailored_{family}"
        layer_shapes: list | None = None

        def validate_architecture(self) -> None:
            """Per-layer head counts: hidden size need not be a multiple of the (largest) head count."""

    class PrunedForCausalLM(model_base):
        config_class = PrunedConfig

        def __init__(self, config: PrunedConfig) -> None:
            super().__init__(config)
            if len(config.layer_shapes) != len(self.model.layers):
                raise ValueError(
                    f"layer_shapes has {len(config.layer_shapes)} entries for {len(self.model.layers)} layers"
                )
            for layer, shape in zip(self.model.layers, config.layer_shapes, strict=True):
                _resize_layer(layer, shape, config)

    PrunedConfig.__name__ = PrunedConfig.__qualname__ = f"Tailored{prefix}Config"
    PrunedForCausalLM.__name__ = PrunedForCausalLM.__qualname__ = f"Tailored{prefix}ForCausalLM"
    return PrunedConfig, PrunedForCausalLM


TailoredLlamaConfig, TailoredLlamaForCausalLM = _pruned_classes("llama", "Llama", LlamaConfig, LlamaForCausalLM)
TailoredMistralConfig, TailoredMistralForCausalLM = _pruned_classes(
    "mistral", "Mistral", MistralConfig, MistralForCausalLM
)
TailoredQwen2Config, TailoredQwen2ForCausalLM = _pruned_classes("qwen2", "Qwen2", Qwen2Config, Qwen2ForCausalLM)
TailoredQwen3Config, TailoredQwen3ForCausalLM = _pruned_classes("qwen3", "Qwen3", Qwen3Config, Qwen3ForCausalLM)

PRUNED_CLASSES = {
    "llama": (TailoredLlamaConfig, TailoredLlamaForCausalLM),
    "mistral": (TailoredMistralConfig, TailoredMistralForCausalLM),
    "qwen2": (TailoredQwen2Config, TailoredQwen2ForCausalLM),
    "qwen3": (TailoredQwen3Config, TailoredQwen3ForCausalLM),
}
"""Base family -> (config class, causal-LM class) of its non-uniform pruned models."""


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know the ``tailored_*`` model types (idempotent)."""
    for config_class, model_class in PRUNED_CLASSES.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
