"""Uniform target shapes: every kept layer with the same KV groups and channels, so the export is a stock model.

A shape fixes the kept counts; scores (gate logits, weight magnitudes, random numbers) decide *which* units fill
it. :func:`fit_channels` picks the channel count that brings the parameter count closest to a target: channels
are the finest unit (3 * d' parameters each per layer), so the target is met to within one channel per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tailored.core import hard_concrete
from tailored.core.structure import GateValues, ModelStructure, parameter_count


@dataclass(frozen=True)
class UniformShape:
    """Kept units of a uniformly pruned model."""

    groups: int
    """KV groups per layer (query heads = groups * n_rep)."""
    channels: int
    """MLP channels per layer."""
    hidden: int
    """Hidden dims, model-wide."""
    layers: int
    """Layers."""

    def check(self, structure: ModelStructure) -> None:
        """Raise ``ValueError`` naming any count outside 1 .. its full size."""
        full = full_shape(structure)
        wrong = [
            f"{name}={getattr(self, name)} (allowed 1..{getattr(full, name)})"
            for name in ("groups", "channels", "hidden", "layers")
            if not 1 <= getattr(self, name) <= getattr(full, name)
        ]
        if wrong:
            raise ValueError(
                "impossible uniform shape: " + ", ".join(wrong) + "; give pruning.target_shape counts within those"
            )


def full_shape(structure: ModelStructure) -> UniformShape:
    """The dense model's shape."""
    return UniformShape(
        groups=structure.num_kv_heads,
        channels=structure.intermediate_size,
        hidden=structure.hidden_size,
        layers=structure.num_layers,
    )


def uniform_shape_of(kept: GateValues) -> dict[str, int] | None:
    """The kept counts of 0/1 gates as a uniform shape (``{"groups", "channels", "hidden", "layers"}``), or None
    when the kept layers differ in shape."""
    layers = kept.layers > 0
    groups, channels = kept.groups[layers].sum(-1), kept.channels[layers].sum(-1)
    if groups.numel() == 0 or bool((groups != groups[0]).any() or (channels != channels[0]).any()):
        return None
    return {
        "groups": int(groups[0]),
        "channels": int(channels[0]),
        "hidden": int(kept.hidden.sum()),
        "layers": int(layers.sum()),
    }


def shape_parameter_count(structure: ModelStructure, shape: UniformShape) -> int:
    """Exact parameters of a model of this shape (host arithmetic on the structure: the count is made on the CPU)."""
    kept = GateValues.ones(structure, device="cpu")
    kept.groups[:, shape.groups :] = 0
    kept.channels[:, shape.channels :] = 0
    kept.hidden[shape.hidden :] = 0
    kept.layers[shape.layers :] = 0
    return int(parameter_count(structure, kept))


def fit_channels(structure: ModelStructure, shape: UniformShape, target: int, multiple_of: int = 1) -> UniformShape:
    """``shape`` with the channel count whose parameter count is closest to ``target`` parameters.

    The count is affine in the channels, so two evaluations solve it. ``multiple_of`` rounds the channels to a
    multiple (fast matrix kernels prefer widths divisible by 8 or 64). Raises ``ValueError`` if no channel count
    within 1 .. intermediate_size reaches the target.
    """
    one = shape_parameter_count(structure, UniformShape(shape.groups, 1, shape.hidden, shape.layers))
    two = shape_parameter_count(structure, UniformShape(shape.groups, 2, shape.hidden, shape.layers))
    exact = 1 + (target - one) / (two - one)
    channels = round(exact / multiple_of) * multiple_of
    if not 1 <= channels <= structure.intermediate_size:
        raise ValueError(
            f"no MLP width reaches {target:,} parameters with {shape.groups} KV groups, hidden {shape.hidden} and "
            f"{shape.layers} layers (it would need {channels} channels of {structure.intermediate_size}); "
            "change the target or the other counts"
        )
    return UniformShape(shape.groups, channels, shape.hidden, shape.layers)


def shape_gates(structure: ModelStructure, shape: UniformShape, scores: GateValues, soft: bool = False) -> GateValues:
    """Deterministic gates of a uniform shape: in every layer the highest-scoring units, model-wide the best layers
    and hidden dims.

    With ``soft`` the scores are gate logits and kept units carry their soft value
    ``sigmoid(log_alpha / beta * 0.8)`` (hidden dims stay 1); otherwise kept units are 1. The gates are made on the
    scores' device, in their dtype.
    """
    shape.check(structure)

    def keep(name: str, count: int, hard: bool = False) -> torch.Tensor:
        score = getattr(scores, name)
        values = hard_concrete.soft_value(score) if soft and not hard else torch.ones_like(score)
        return hard_concrete.keep_top_k(score, values, count)

    groups = keep("groups", shape.groups)
    return GateValues(
        groups=groups,
        channels=keep("channels", shape.channels),
        attn=groups.new_ones(structure.num_layers),  # every kept layer keeps both blocks
        mlp=groups.new_ones(structure.num_layers),
        layers=keep("layers", shape.layers),
        hidden=keep("hidden", shape.hidden, hard=True),
    )
