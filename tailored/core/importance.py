"""Importance scores of prunable units: what two-stage pruning ranks by, and the prior of score-initialised gates.

Criteria (docs/method.md#section-9), each summed over every weight a unit owns (:mod:`tailored.core.structure`: a KV
group owns rows of q/k/v_proj and columns of o_proj; an MLP channel rows of gate/up_proj and a column of
down_proj; a hidden dim a column of every matrix reading the residual stream, a row of every matrix writing it,
and a column of the embedding)::

    taylor      sum |W * dL/dW|     first-order Taylor estimate of the loss change when the weight is removed
                                    (LLM-Pruner, Ma et al. 2023, eq. 3, element-wise variant), accumulated per batch
    magnitude   sqrt(sum W^2)       the group's L2 norm
    random      U(0, 1)             a control

Taylor scoring never holds the model's gradients at once: each projection weight gets a hook that runs right
after its gradient is accumulated, reduces ``|W * G|`` to per-unit sums and frees the gradient. Peak extra memory
is one weight's gradient (plus activations), not a copy of the model, so it scales to 8B models.

Block and layer scores are sums of their units' scores (attn: its groups, mlp: its channels, layers: both).
Biases and norms are left out: they are a negligible share of each unit's weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from tailored.core.prune import base_layer
from tailored.core.structure import ModelStructure, describe, unit_shapes, unwrap

CRITERIA = ("taylor", "magnitude", "random")


def _weights(model: nn.Module) -> list[tuple[str, int, torch.Tensor]]:
    """(projection name, layer index, weight ``[out, in]``) of every projection, plus the embedding and an untied
    ``lm_head`` (both ``[V, d]``, layer -1)."""
    base = unwrap(model)
    found = [("embed", -1, base.model.embed_tokens.weight)]
    lm_head = base_layer(base.lm_head).weight
    if lm_head is not base.model.embed_tokens.weight:
        found.append(("embed", -1, lm_head))
    for index, layer in enumerate(base.model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            found.append((name, index, base_layer(getattr(layer.self_attn, name)).weight))
        for name in ("gate_proj", "up_proj", "down_proj"):
            found.append((name, index, base_layer(getattr(layer.mlp, name)).weight))
    return found


class _UnitScores:
    """Per-unit score accumulators, filled from element-wise scores ``S`` (same shape as a weight)."""

    def __init__(self, structure: ModelStructure, device: torch.device) -> None:
        self.structure = structure
        shapes = unit_shapes(structure)
        self.groups = torch.zeros(shapes["groups"], dtype=torch.float64, device=device)
        self.channels = torch.zeros(shapes["channels"], dtype=torch.float64, device=device)
        self.hidden = torch.zeros(shapes["hidden"], dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, name: str, layer: int, scores: torch.Tensor) -> None:
        """Add the element-wise ``scores`` of projection ``name`` of ``layer`` to its units' sums (scores of an
        FSDP-sharded weight are gathered whole first: every rank adds the same sums)."""
        s = self.structure
        scores = (scores.full_tensor() if isinstance(scores, DTensor) else scores).double()
        if name == "embed":  # [V, d]: embedding or lm_head
            self.hidden += scores.sum(0)
        elif name in ("q_proj", "k_proj", "v_proj"):  # [Hkv * rows_per_group, d]
            self.groups[layer] += scores.sum(1).view(s.num_kv_heads, -1).sum(1)
            self.hidden += scores.sum(0)
        elif name == "o_proj":  # [d, Hkv * n_rep * dh]
            self.groups[layer] += scores.sum(0).view(s.num_kv_heads, -1).sum(1)
            self.hidden += scores.sum(1)
        elif name in ("gate_proj", "up_proj"):  # [f, d]
            self.channels[layer] += scores.sum(1)
            self.hidden += scores.sum(0)
        else:  # down_proj [d, f]
            self.channels[layer] += scores.sum(0)
            self.hidden += scores.sum(1)

    def result(self, criterion: str) -> dict[str, torch.Tensor]:
        """Scores per unit type (float32, shaped as :func:`tailored.core.structure.unit_shapes`)."""
        groups, channels, hidden = self.groups, self.channels, self.hidden
        if criterion == "magnitude":  # the accumulators hold sums of squares
            groups, channels, hidden = groups.sqrt(), channels.sqrt(), hidden.sqrt()
        attn, mlp = groups.sum(-1), channels.sum(-1)
        scores = {"groups": groups, "channels": channels, "hidden": hidden, "attn": attn, "mlp": mlp}
        scores["layers"] = attn + mlp
        return {name: value.float() for name, value in scores.items()}


def magnitude_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """L2 norm of every unit's weights (LoRA adapters left out: score before tuning)."""
    structure = describe(model)
    weights = _weights(model)
    scores = _UnitScores(structure, weights[0][2].device)
    for name, layer, weight in weights:
        scores.add(name, layer, weight.detach().float() ** 2)
    return scores.result("magnitude")


def random_scores(structure: ModelStructure, seed: int = 0) -> dict[str, torch.Tensor]:
    """Uniform random scores (a control: what any ranking should beat)."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(shape, generator=generator) for name, shape in unit_shapes(structure).items()}


def taylor_scores(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """First-order Taylor importance ``sum |W * dL/dW|`` per unit, summed over ``batches``.

    Args:
        model: a causal LM (peft-wrapped or not); its parameters' ``requires_grad`` flags are restored after.
        batches: dicts with ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]`` on the model's device.
    Returns:
        Scores per unit type, shaped as :func:`tailored.core.structure.unit_shapes`.
    """
    structure = describe(model)
    weights = _weights(model)
    scores = _UnitScores(structure, weights[0][2].device)
    flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
    handles = []
    try:
        model.requires_grad_(False)
        for name, layer, weight in weights:
            weight.requires_grad_(True)

            def accumulate(parameter: torch.Tensor, name: str = name, layer: int = layer) -> None:
                scores.add(name, layer, (parameter.detach() * parameter.grad).abs())
                parameter.grad = None  # free it now: only one weight's gradient exists at a time

            handles.append(weight.register_post_accumulate_grad_hook(accumulate))
        count = 0
        for batch in batches:
            model(**batch).loss.backward()
            count += 1
        if count == 0:
            raise ValueError("Taylor scores need at least one calibration batch")
    finally:
        for handle in handles:
            handle.remove()
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
            if not flag:
                parameter.grad = None
    return scores.result("taylor")


def unit_scores(
    criterion: str, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]] = (), seed: int = 0
) -> dict[str, torch.Tensor]:
    """Scores of every unit under ``criterion`` (one of :data:`CRITERIA`); ``batches`` are used by taylor only."""
    if criterion == "taylor":
        return taylor_scores(model, batches)
    if criterion == "magnitude":
        return magnitude_scores(model)
    if criterion == "random":
        return random_scores(describe(model), seed)
    raise ValueError(f"unknown importance criterion {criterion!r}; use one of {', '.join(CRITERIA)}")
