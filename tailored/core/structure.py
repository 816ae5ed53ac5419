"""What is prunable in a LLaMA-family decoder, and how many parameters a gate pattern keeps.

Llama, Mistral, Qwen2 and Qwen3 share one decoder layout (docs/method.md#section-2)::

    embed_tokens [V, d]
      └─ layer l = 0 .. L-1 ─────────────────────────────────────────────────────────────┐
           input_layernorm [d]                                                           │
           q_proj [H*dh, d]   k_proj, v_proj [Hkv*dh, d]   (Qwen2: + biases)  ─ attention │
           q_norm, k_norm [dh]                             (Qwen3 only)                  │
           o_proj [d, H*dh]                                                              │
           post_attention_layernorm [d]                                                  │
           gate_proj, up_proj [f, d]   down_proj [d, f]                       ─ MLP      │
      ───────────────────────────────────────────────────────────────────────────────────┘
    norm [d] ─► lm_head [V, d]   (maybe the same tensor as embed_tokens)

    GQA: query heads come in Hkv groups of n_rep = H / Hkv heads that share one KV head
         MHA: n_rep = 1       GQA 4:2 → n_rep = 2       MQA: Hkv = 1, n_rep = H

The prunable units, each with one gate (:class:`GateValues`):

    groups   [L, Hkv]  a KV head with its n_rep query heads (rows of q/k/v, columns of o_proj)
    channels [L, f]    an MLP channel (rows of gate/up, column of down_proj)
    attn     [L]       the attention block of a layer (its residual branch outputs 0)
    mlp      [L]       the MLP block of a layer
    layers   [L]       a whole layer
    hidden   [d]       a hidden dim, model-wide (a column of every matrix that reads the residual stream,
                       a row of every matrix that writes it, an entry of every [d] RMSNorm)

Units never split ``head_dim``: q and k dims are paired by RoPE, so a head is kept or removed whole.

Qwen3's ``q_norm``/``k_norm`` normalise each head's query/key over its ``dh`` dims with one weight shared by every
head, so no unit prunes them: they stay as they are while their attention block is present. ``dh`` is read from
the config's ``head_dim`` and need not be ``d / H`` (Qwen3-0.6B: d = 1024, H = 16, dh = 128).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

SUPPORTED_FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
"""``config.model_type`` -> class-name prefix of the stock transformers modules of that family."""

QK_NORM_FAMILIES = frozenset({"qwen3"})
"""Families whose attention normalises queries and keys per head (``q_norm``, ``k_norm`` of weight ``[dh]``)."""


class UnsupportedModelError(ValueError):
    """The model is not a LLaMA-family decoder that `tailored` knows how to prune."""


@dataclass(frozen=True)
class ModelStructure:
    """The dimensions of a LLaMA-family decoder that pruning changes, read from a model (:func:`describe`)."""

    family: str
    """``config.model_type``: one of :data:`SUPPORTED_FAMILIES`."""
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    """``lm_head.weight`` is ``embed_tokens.weight`` (counted once)."""
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    lm_head_bias: bool
    qk_norm: bool
    """The attention has per-head ``q_norm`` and ``k_norm`` RMSNorms of weight ``[head_dim]`` (Qwen3)."""

    @property
    def n_rep(self) -> int:
        """Query heads per KV group."""
        return self.num_heads // self.num_kv_heads


@dataclass
class GateValues:
    """One value per prunable unit; shapes as in the module docstring.

    Three uses share this container: sampled hard-concrete gates in training, deterministic gates (0 = removed,
    otherwise the soft value folded into the weights at pruning), and keep probabilities P(z > 0).
    """

    groups: torch.Tensor
    channels: torch.Tensor
    attn: torch.Tensor
    mlp: torch.Tensor
    layers: torch.Tensor
    hidden: torch.Tensor

    @classmethod
    def ones(
        cls, structure: ModelStructure, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> GateValues:
        """Every unit kept with gate 1: the dense model, on ``device`` (None: torch's default device)."""
        return cls(
            **{name: torch.ones(shape, dtype=dtype, device=device) for name, shape in unit_shapes(structure).items()}
        )

    def kept(self) -> GateValues:
        """0/1 indicators of the units these gates keep (gate > 0)."""
        return self.map(lambda value: (value > 0).to(value.dtype))

    def map(self, fn) -> GateValues:
        """Apply ``fn`` to every tensor."""
        return GateValues(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self)]


def unit_shapes(structure: ModelStructure) -> dict[str, tuple[int, ...]]:
    """The shape of each unit type's gate tensor."""
    L = structure.num_layers
    return {
        "groups": (L, structure.num_kv_heads),
        "channels": (L, structure.intermediate_size),
        "attn": (L,),
        "mlp": (L,),
        "layers": (L,),
        "hidden": (structure.hidden_size,),
    }


def check_gate_shapes(structure: ModelStructure, gates: GateValues) -> None:
    """Raise a ``ValueError`` naming every gate tensor whose shape does not fit the model."""
    wrong = [
        f"{name}: got {tuple(getattr(gates, name).shape)}, expected {shape}"
        for name, shape in unit_shapes(structure).items()
        if tuple(getattr(gates, name).shape) != shape
    ]
    if wrong:
        raise ValueError(
            "gate shapes do not fit the model "
            f"({structure.num_layers} layers, {structure.num_kv_heads} KV groups, "
            f"{structure.intermediate_size} MLP channels, hidden {structure.hidden_size}): " + "; ".join(wrong)
        )


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside a peft wrapper (or the model itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def describe(model: nn.Module) -> ModelStructure:
    """Read the prunable structure of a Hugging Face LLaMA-family causal LM (peft-wrapped or not).

    Raises :class:`UnsupportedModelError` naming the problem when the model is not a stock Llama, Mistral, Qwen2
    or Qwen3 decoder with uniform layers (another architecture, a custom attention, an already-pruned model).
    """
    model = unwrap(model)
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    supported = ", ".join(sorted(SUPPORTED_FAMILIES))
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"model type {family!r} ({type(model).__name__}) is not supported; tailored prunes LLaMA-family "
            f"decoders: {supported}. Load one of those with AutoModelForCausalLM."
        )
    prefix = SUPPORTED_FAMILIES[family]
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        raise UnsupportedModelError(
            f"{type(model).__name__} does not have the causal-LM layout model.layers / lm_head; "
            f"load the model with AutoModelForCausalLM ({supported})."
        )
    structure = ModelStructure(
        family=family,
        num_layers=len(inner.layers),
        hidden_size=inner.embed_tokens.weight.shape[1],
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        vocab_size=inner.embed_tokens.weight.shape[0],
        tied_embeddings=model.lm_head.weight is inner.embed_tokens.weight,
        qkv_bias=inner.layers[0].self_attn.q_proj.bias is not None,
        o_bias=inner.layers[0].self_attn.o_proj.bias is not None,
        mlp_bias=inner.layers[0].mlp.down_proj.bias is not None,
        lm_head_bias=model.lm_head.bias is not None,
        qk_norm=family in QK_NORM_FAMILIES,
    )
    for index, layer in enumerate(inner.layers):
        _check_layer(layer, index, prefix, structure)
    return structure


def structure_from_config(config) -> ModelStructure:
    """The structure a stock model of this config has, read without loading weights (for early checks).

    :func:`describe` reads the real modules and is the authority once the model is loaded.
    """
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"model type {family!r} is not supported; tailored prunes LLaMA-family decoders: "
            f"{', '.join(sorted(SUPPORTED_FAMILIES))}. Choose a model of one of those families."
        )
    attention_bias = getattr(config, "attention_bias", False)
    return ModelStructure(
        family=family,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        tied_embeddings=bool(config.tie_word_embeddings),
        qkv_bias=family == "qwen2" or attention_bias,
        o_bias=attention_bias,
        mlp_bias=getattr(config, "mlp_bias", False),
        lm_head_bias=False,
        qk_norm=family in QK_NORM_FAMILIES,
    )


def _check_layer(layer: nn.Module, index: int, prefix: str, structure: ModelStructure) -> None:
    """Every layer must be the stock module of its family, with the shapes the config states."""
    expected_types = {
        "self_attn": f"{prefix}Attention",
        "mlp": f"{prefix}MLP",
        "input_layernorm": f"{prefix}RMSNorm",
        "post_attention_layernorm": f"{prefix}RMSNorm",
    }
    if structure.qk_norm:
        expected_types |= {"self_attn.q_norm": f"{prefix}RMSNorm", "self_attn.k_norm": f"{prefix}RMSNorm"}
    for name, type_name in expected_types.items():
        found = type(_submodule(layer, name)).__name__
        if found != type_name:
            raise UnsupportedModelError(
                f"layer {index}: {name} is {found}, expected the stock transformers {type_name}; tailored cannot "
                "prune custom attention/MLP modules. Use the model's stock transformers implementation."
            )
    d, dh = structure.hidden_size, structure.head_dim
    expected_shapes = {
        "self_attn.q_proj": (structure.num_heads * dh, d),
        "self_attn.k_proj": (structure.num_kv_heads * dh, d),
        "self_attn.v_proj": (structure.num_kv_heads * dh, d),
        "self_attn.o_proj": (d, structure.num_heads * dh),
        "mlp.gate_proj": (structure.intermediate_size, d),
        "mlp.up_proj": (structure.intermediate_size, d),
        "mlp.down_proj": (d, structure.intermediate_size),
    }
    if structure.qk_norm:
        expected_shapes |= {"self_attn.q_norm": (dh,), "self_attn.k_norm": (dh,)}
    for path, shape in expected_shapes.items():
        weight = layer.get_submodule(path).weight
        if tuple(weight.shape) != shape:
            raise UnsupportedModelError(
                f"layer {index}: {path}.weight has shape {tuple(weight.shape)}, the config implies {shape}. "
                "Layers of different shapes (an already-pruned model?) cannot be pruned again; load it with "
                "tailored.load_pruned and prune the original model instead."
            )


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    """The submodule at a dotted ``path``, or None where it is missing."""
    for name in path.split("."):
        module = getattr(module, name, None)
    return module


def parameter_count(structure: ModelStructure, kept: GateValues) -> torch.Tensor:
    """Parameters of the model that keeps the given units, as a float64 scalar.

    ``kept`` holds, per unit, either 0/1 indicators (the result is the exact ``sum(p.numel())`` of the pruned
    model) or independent keep probabilities P(z > 0) (the result is the expected count, differentiable in them:
    the count is multilinear in independent gates, so the formula is its own expectation). Per layer with d'
    kept hidden dims, g kept groups, f' kept channels (docs/method.md#section-2)::

        attention  d'*g*n_rep*dh + 2*d'*g*dh + g*n_rep*dh*d'   (+ q/k/v biases, o bias)  + input norm d'
                                                                 (+ q_norm, k_norm 2*dh)
        MLP        3*d'*f'                                       (+ biases)                + post-attn norm d'
        model      V*d' embedding + d' final norm (+ V*d' lm_head when untied)

    A block whose gate, layer gate or every unit is 0 is removed with its norm: "block present" is
    ``z_block * z_layer * (1 - prod(1 - z_unit))``, which is the 0/1 indicator for 0/1 inputs.
    """
    kept = kept.map(lambda value: value.to(torch.float64))
    s, dh = structure, structure.head_dim
    d = kept.hidden.sum()
    attn_alive = kept.attn * kept.layers  # [L]
    mlp_alive = kept.mlp * kept.layers
    groups = attn_alive * kept.groups.sum(-1)  # [L] kept KV groups
    channels = mlp_alive * kept.channels.sum(-1)
    attn_present = attn_alive * (1 - torch.prod(1 - kept.groups, dim=-1))
    mlp_present = mlp_alive * (1 - torch.prod(1 - kept.channels, dim=-1))

    q_width, kv_width = s.n_rep * dh, dh  # per kept group
    attention = d * groups * (2 * q_width + 2 * kv_width) + d * attn_present
    if s.qkv_bias:
        attention = attention + groups * (q_width + 2 * kv_width)
    if s.o_bias:
        attention = attention + d * attn_present
    if s.qk_norm:
        attention = attention + 2 * dh * attn_present
    mlp = 3 * d * channels + d * mlp_present
    if s.mlp_bias:
        mlp = mlp + 2 * channels + d * mlp_present

    embeddings = s.vocab_size * d + d
    if not s.tied_embeddings:
        embeddings = embeddings + s.vocab_size * d
    if s.lm_head_bias:
        embeddings = embeddings + s.vocab_size
    return embeddings + attention.sum() + mlp.sum()
