"""Model surgery: deterministic gates in, a physically smaller model out, computing what the masked model computes.

Three pure steps, each usable alone::

    plan_pruning(structure, gates)            which units survive            -> PruningPlan
    pruned_state_dict(model, gates, plan)     merged LoRA, soft gates folded,
                                              every tensor sliced, layers renumbered -> {name: tensor}
    pruned_config(config, structure, plan)    stock config when every layer has one shape, else a tailored_* one

:func:`prune_model` chains them and builds the new model; the input model is left as it was.

Folding (docs/method.md#section-7): a kept KV group's soft gate value scales its columns of ``o_proj``, a kept
channel's its column of ``down_proj``; the block and layer gates scale ``o_proj`` / ``down_proj`` (weight and
bias), since the masked forward multiplies their outputs. Hidden gates are 0/1 (see
:meth:`tailored.core.gates.PruningGates.deterministic`), so hidden dims are only sliced. LoRA is merged first
(``W + B A * alpha / r``), which is exact because the masked forward gates the whole LoRA-wrapped projection.

Precision: merging and folding run in float32 (float64 for a float64 model), and every tensor is rounded to the
model's dtype once, at the end. A bf16 model's ``o_proj`` is ``bf16((W + B A * alpha / r) * gates)``, not a bf16
sum rounded again by the fold.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.initialization import no_init_weights

from tailored.core.pruned_model import PRUNED_CLASSES
from tailored.core.structure import GateValues, ModelStructure, check_gate_shapes, describe, unwrap


@dataclass(frozen=True)
class LayerPlan:
    """What one layer of the pruned model keeps of its source layer."""

    source: int
    """Index of the layer in the original model."""
    groups: tuple[int, ...]
    """Kept KV groups (empty: attention block removed)."""
    channels: tuple[int, ...]
    """Kept MLP channels (empty: MLP block removed)."""


@dataclass(frozen=True)
class PruningPlan:
    """The units a set of deterministic gates keeps."""

    hidden: tuple[int, ...]
    layers: tuple[LayerPlan, ...]

    @property
    def uniform(self) -> bool:
        """Every kept layer has both blocks, with the same number of KV groups and of channels."""
        shapes = {(len(layer.groups), len(layer.channels)) for layer in self.layers}
        return len(shapes) == 1 and all(count > 0 for count in next(iter(shapes)))

    def layer_shapes(self) -> list[dict[str, int]]:
        """Per kept layer ``{"num_key_value_heads": g, "intermediate_size": f}`` (0 = block removed)."""
        return [
            {"num_key_value_heads": len(layer.groups), "intermediate_size": len(layer.channels)}
            for layer in self.layers
        ]


def plan_pruning(structure: ModelStructure, gates: GateValues) -> PruningPlan:
    """The units kept by deterministic ``gates`` (a unit survives when its gate and its parents' gates are > 0).

    Raises ``ValueError`` for gates of the wrong shape, soft hidden gates, and gates that remove every hidden dim
    or every layer. The plan is host data: gates on a GPU are copied to the CPU once, not read unit by unit.
    """
    check_gate_shapes(structure, gates)
    gates = gates.map(lambda value: value.detach().cpu())
    if not bool(((gates.hidden == 0) | (gates.hidden == 1)).all()):
        raise ValueError("hidden gates must be exactly 0 or 1 for surgery (use PruningGates.deterministic())")
    hidden = _indices(gates.hidden)
    if not hidden:
        raise ValueError("the gates remove every hidden dim, so nothing of the model would remain; keep more units")
    layers = []
    for index in range(structure.num_layers):
        attn_alive = bool(gates.attn[index] * gates.layers[index] > 0)
        mlp_alive = bool(gates.mlp[index] * gates.layers[index] > 0)
        groups = _indices(gates.groups[index]) if attn_alive else ()
        channels = _indices(gates.channels[index]) if mlp_alive else ()
        if groups or channels:
            layers.append(LayerPlan(index, groups, channels))
    if not layers:
        raise ValueError(
            "the gates remove every layer (no layer keeps an attention head or an MLP channel); keep more units"
        )
    return PruningPlan(hidden=hidden, layers=tuple(layers))


def _indices(gate: torch.Tensor) -> tuple[int, ...]:
    return tuple(torch.nonzero(gate > 0).flatten().tolist())


def is_stock_layout(structure: ModelStructure, plan: PruningPlan) -> bool:
    """The pruned model can be a stock transformers model of its family.

    Needs uniform layers; Llama's config also insists that hidden size be a multiple of the query-head count.
    """
    if not plan.uniform:
        return False
    query_heads = len(plan.layers[0].groups) * structure.n_rep
    return structure.family != "llama" or len(plan.hidden) % query_heads == 0


def pruned_config(config, structure: ModelStructure, plan: PruningPlan):
    """The config of the pruned model: its family's stock class when :func:`is_stock_layout`, else ``tailored_*``."""
    values = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "quantization_config"):
        values.pop(key, None)
    shapes = plan.layer_shapes()
    groups = max(1, max(shape["num_key_value_heads"] for shape in shapes))
    values.update(
        hidden_size=len(plan.hidden),
        num_hidden_layers=len(plan.layers),
        head_dim=structure.head_dim,
        num_key_value_heads=groups,
        num_attention_heads=groups * structure.n_rep,
        intermediate_size=max(1, max(shape["intermediate_size"] for shape in shapes)),
    )
    if values.get("layer_types") is not None:
        values["layer_types"] = [values["layer_types"][layer.source] for layer in plan.layers]
    if is_stock_layout(structure, plan):
        return type(config)(**values)
    config_class, _ = PRUNED_CLASSES[structure.family]
    return config_class(**values, layer_shapes=shapes)


def base_layer(module: nn.Module) -> nn.Module:
    """The linear layer inside a peft LoRA wrapper (or the layer itself): its weight is the frozen one."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def merged_linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight ``[out, in]`` and bias of a linear layer, with its active peft LoRA adapters merged in.

    A merged weight is returned in :func:`compute_dtype` (float32 for a bf16 layer), unrounded: the caller rounds
    it to the model's dtype once. Without adapters the stored weight is returned as it is.
    """
    base = base_layer(module)
    weight = base.weight
    if hasattr(module, "lora_A") and not module.merged and not module.disable_adapters:
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            if module.lora_bias.get(adapter, False):
                raise NotImplementedError("LoRA adapters with lora_bias=True cannot be merged for pruning yet")
            dtype = compute_dtype(weight.dtype)
            weight = weight.to(dtype) + module.get_delta_weight(adapter).to(dtype)
    return weight, base.bias


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype surgery computes in: float32, or ``dtype`` when it is wider (float64)."""
    return torch.promote_types(dtype, torch.float32)


@torch.no_grad()
def pruned_state_dict(model: nn.Module, gates: GateValues, plan: PruningPlan) -> dict[str, torch.Tensor]:
    """The state dict of the pruned model, keyed as the pruned Hugging Face model names its tensors.

    ``model`` may carry peft LoRA adapters (merged here). Merging and folding run in :func:`compute_dtype`; every
    tensor is then rounded to the model's dtype (its embedding's) once, layer by layer, so that no more than one
    layer is held in the wider dtype. Tensors are made on the model's device.
    """
    structure = describe(model)
    base = unwrap(model)
    device, dtype = base.model.embed_tokens.weight.device, base.model.embed_tokens.weight.dtype
    gates = gates.map(lambda value: value.to(device))
    hidden = torch.tensor(plan.hidden, device=device)
    state = {
        "model.embed_tokens.weight": base.model.embed_tokens.weight[:, hidden],
        "model.norm.weight": base.model.norm.weight[hidden],
    }
    lm_weight, lm_bias = merged_linear(base.lm_head)
    state["lm_head.weight"] = state["model.embed_tokens.weight"] if structure.tied_embeddings else lm_weight[:, hidden]
    if lm_bias is not None:
        state["lm_head.bias"] = lm_bias
    state = _rounded(state, dtype)
    for new_index, layer_plan in enumerate(plan.layers):
        layer = base.model.layers[layer_plan.source]
        prefix = f"model.layers.{new_index}."
        source = layer_plan.source
        if layer_plan.groups:
            scale = gates.attn[source] * gates.layers[source]
            attention = _attention_state(prefix, layer, structure, gates.groups[source], layer_plan, hidden, scale)
            state |= _rounded(attention, dtype)
        if layer_plan.channels:
            scale = gates.mlp[source] * gates.layers[source]
            state |= _rounded(_mlp_state(prefix, layer, gates.channels[source], layer_plan, hidden, scale), dtype)
    return state


def _rounded(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of ``state`` in ``dtype`` (rounded once from its merged and folded value), contiguous."""
    return {name: tensor.to(dtype).contiguous() for name, tensor in state.items()}


def _attention_state(prefix, layer, structure, group_gates, layer_plan, hidden, scale) -> dict[str, torch.Tensor]:
    """Sliced q/k/v/o (+ biases) and input norm of one layer; the group and block gates folded into o_proj.

    Qwen3's per-head q_norm/k_norm (weights ``[dh]``, shared by every head) are copied whole.
    """
    dh, n_rep = structure.head_dim, structure.n_rep
    kept = torch.tensor(layer_plan.groups, device=hidden.device)
    kv_rows = (kept[:, None] * dh + torch.arange(dh, device=hidden.device)).flatten()  # [g*dh]
    q_rows = (kept[:, None] * n_rep * dh + torch.arange(n_rep * dh, device=hidden.device)).flatten()  # [g*n_rep*dh]
    attn = layer.self_attn
    state = {f"{prefix}input_layernorm.weight": layer.input_layernorm.weight[hidden]}
    for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
        weight, bias = merged_linear(getattr(attn, name))
        state[f"{prefix}self_attn.{name}.weight"] = weight[rows][:, hidden]
        if bias is not None:
            state[f"{prefix}self_attn.{name}.bias"] = bias[rows]
    if structure.qk_norm:
        state[f"{prefix}self_attn.q_norm.weight"] = attn.q_norm.weight.clone()  # a copy: the input model is kept
        state[f"{prefix}self_attn.k_norm.weight"] = attn.k_norm.weight.clone()
    column_scale = group_gates[kept].repeat_interleave(n_rep * dh) * scale  # [g*n_rep*dh]
    weight, bias = merged_linear(attn.o_proj)
    state[f"{prefix}self_attn.o_proj.weight"] = _fold(weight[hidden][:, q_rows], column_scale[None, :])
    if bias is not None:
        state[f"{prefix}self_attn.o_proj.bias"] = _fold(bias[hidden], scale)
    return state


def _mlp_state(prefix, layer, channel_gates, layer_plan, hidden, scale) -> dict[str, torch.Tensor]:
    """Sliced gate/up/down (+ biases) and post-attention norm of one layer; channel and block gates folded."""
    kept = torch.tensor(layer_plan.channels, device=hidden.device)
    mlp = layer.mlp
    state = {f"{prefix}post_attention_layernorm.weight": layer.post_attention_layernorm.weight[hidden]}
    for name in ("gate_proj", "up_proj"):
        weight, bias = merged_linear(getattr(mlp, name))
        state[f"{prefix}mlp.{name}.weight"] = weight[kept][:, hidden]
        if bias is not None:
            state[f"{prefix}mlp.{name}.bias"] = bias[kept]
    weight, bias = merged_linear(mlp.down_proj)
    state[f"{prefix}mlp.down_proj.weight"] = _fold(weight[hidden][:, kept], (channel_gates[kept] * scale)[None, :])
    if bias is not None:
        state[f"{prefix}mlp.down_proj.bias"] = _fold(bias[hidden], scale)
    return state


def _fold(tensor: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``tensor * scale`` in :func:`compute_dtype`, unrounded (:func:`_rounded` rounds it once)."""
    dtype = compute_dtype(tensor.dtype)
    return tensor.to(dtype) * scale.to(dtype)


@torch.no_grad()
def prune_model(model: nn.Module, gates: GateValues) -> PreTrainedModel:
    """Model surgery: a new, smaller Hugging Face model equal to ``model`` masked by deterministic ``gates``.

    ``model`` (a LLaMA-family causal LM, optionally with peft LoRA) is not modified. The result has the kept
    heads, channels, hidden dims and layers only; LoRA merged; tied embeddings still tied; ``generate()`` and the
    KV cache work. It is a stock transformers class when :func:`is_stock_layout`, else a ``Tailored*ForCausalLM``
    of :mod:`tailored.core.pruned_model`.
    """
    structure = describe(model)
    base = unwrap(model)
    plan = plan_pruning(structure, gates)
    config = pruned_config(base.config, structure, plan)
    state = pruned_state_dict(model, gates, plan)
    weight = base.model.embed_tokens.weight
    config.dtype = weight.dtype
    model_class = type(base) if type(config) is type(base.config) else PRUNED_CLASSES[structure.family][1]
    with no_init_weights(), torch.device("meta"):  # no memory until the sliced tensors are assigned
        pruned = model_class(config)
    pruned.load_state_dict(state, strict=True, assign=True)
    _copy_unsaved_buffers(pruned, base)
    if structure.tied_embeddings:
        pruned.lm_head.weight = pruned.model.embed_tokens.weight
    pruned.config._attn_implementation = base.config._attn_implementation
    pruned.generation_config = copy.deepcopy(base.generation_config)
    return pruned.eval()


def _copy_unsaved_buffers(pruned: nn.Module, source: nn.Module) -> None:
    """Fill the buffers a state dict does not hold (RoPE's ``inv_freq``) from the same-named ones of ``source``:
    pruning keeps ``head_dim`` and the RoPE settings, so they are equal."""
    for name, buffer in list(pruned.named_buffers()):
        if buffer.is_meta:
            module_name, _, buffer_name = name.rpartition(".")
            module = pruned.get_submodule(module_name)
            persistent = buffer_name not in module._non_persistent_buffers_set
            module.register_buffer(buffer_name, source.get_buffer(name).clone(), persistent=persistent)
