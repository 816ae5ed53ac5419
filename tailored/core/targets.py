"""What the sparsity regulariser aims at, and the deterministic gates that meet it exactly at the end.

A target is a kept fraction ``t`` of the *prunable* parameters (those the pruned unit types can remove; with
hidden dims pruned that includes the embeddings), or an explicit uniform shape.

- ``uniform`` (the default): every layer must end with the same shape, so the export is a stock Hugging Face
  model. A fraction is first turned into a target shape (:func:`uniform_shape_for_fraction`); the regulariser
  then constrains every layer's expected KV-group and channel fractions, the hidden fraction and the layer
  fraction to that shape (Sheared-LLaMA's per-structure targets, docs/method.md#section-5).
- non-uniform: one constraint on the expected kept fraction of prunable parameters; layers find their own shapes
  (ATP / CoFi style).

Constraint values are fractions in [0, 1]; the warm-up moves each target linearly from 1 (dense) to its value.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from tailored.core.hard_concrete import keep_top_k, soft_value
from tailored.core.shapes import UniformShape, fit_channels, full_shape, shape_gates, shape_parameter_count
from tailored.core.structure import GateValues, ModelStructure, parameter_count

FRACTION_TOLERANCE = 0.01
"""A fraction target must be reachable within this many prunable-parameter fractions (1 percentage point)."""


@dataclass(frozen=True)
class SparsityTarget:
    """The resolved target of a run (see :func:`resolve_target`)."""

    fraction: float
    """Kept fraction of the prunable parameters that the final model has."""
    shape: UniformShape | None
    """Uniform mode: the shape every layer ends with; None in non-uniform mode."""
    prune: tuple[str, ...]
    """Pruned unit types."""


def prunable_bounds(structure: ModelStructure, prune: tuple[str, ...]) -> tuple[float, float]:
    """(parameters no pruned unit can remove, all parameters): host arithmetic on the structure, on the CPU."""
    dense = GateValues.ones(structure, device="cpu")
    floor = dense.map(lambda value: value.clone())
    for name in prune:
        getattr(floor, name).zero_()
    return float(parameter_count(structure, floor)), float(parameter_count(structure, dense))


def prunable_fraction(structure: ModelStructure, prune: tuple[str, ...], count: torch.Tensor | float):
    """Kept fraction of the prunable parameters for a (possibly expected) parameter ``count``."""
    fixed, full = prunable_bounds(structure, prune)
    return (count - fixed) / (full - fixed)


def hidden_multiple(structure: ModelStructure, groups: int, round_to: int) -> int:
    """Hidden sizes must be multiples of this: ``round_to``, and for Llama also the query-head count."""
    heads = groups * structure.n_rep
    return math.lcm(round_to, heads) if structure.family == "llama" else round_to


def stock_group_count(structure: ModelStructure, groups: int) -> int:
    """The KV-group count nearest ``groups`` (the larger on a tie) whose query heads divide the full hidden size.

    Llama's config refuses a hidden size that is not a multiple of the query-head count, so with the hidden size
    kept whole a stock export needs such a count (Llama-3-8B, 8 groups of 4 heads, hidden 4096: 1, 2, 4 or 8);
    other families take any count.
    """
    if structure.family != "llama":
        return groups
    allowed = [g for g in range(1, structure.num_kv_heads + 1) if structure.hidden_size % (g * structure.n_rep) == 0]
    return min(allowed, key=lambda g: (abs(g - groups), -g))


def uniform_shape_for_fraction(
    structure: ModelStructure, prune: tuple[str, ...], fraction: float, round_to: int = 8
) -> UniformShape:
    """A uniform shape keeping ``fraction`` of the prunable parameters.

    Every pruned unit type keeps the same fraction ``r`` of its units (found by bisection), counts rounded (hidden
    to a multiple of :func:`hidden_multiple`, groups by :func:`stock_group_count` when the hidden size is kept,
    channels to ``round_to``), then the channel count is fitted to meet
    the target as closely as channels allow. Raises ``ValueError`` when the closest shape misses the target by more
    than :data:`FRACTION_TOLERANCE`.
    """
    full = full_shape(structure)
    fixed, total = prunable_bounds(structure, prune)
    target_count = fixed + fraction * (total - fixed)

    def shape_at(r: float) -> UniformShape:
        def kept(name: str, size: int, multiple: int = 1) -> int:
            if name not in prune:
                return size
            return min(size, max(multiple, round(r * size / multiple) * multiple))

        groups = kept("groups", full.groups)
        if "hidden" not in prune:  # a pruned hidden size is rounded to a multiple of the heads instead
            groups = stock_group_count(structure, groups)
        return UniformShape(
            groups=groups,
            channels=kept("channels", full.channels, min(round_to, full.channels)),
            hidden=kept("hidden", full.hidden, min(hidden_multiple(structure, groups, round_to), full.hidden)),
            layers=kept("layers", full.layers),
        )

    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (
            (middle, high) if shape_parameter_count(structure, shape_at(middle)) < target_count else (low, middle)
        )
    candidates = [shape_at(low), shape_at(high)]
    if "channels" in prune:
        for index, candidate in enumerate(candidates):
            with contextlib.suppress(ValueError):  # no width reaches the target from this shape: keep it as is
                multiple = min(round_to, full.channels)
                candidates[index] = fit_channels(structure, candidate, round(target_count), multiple)
    shape = min(candidates, key=lambda s: abs(shape_parameter_count(structure, s) - target_count))
    achieved = (shape_parameter_count(structure, shape) - fixed) / (total - fixed)
    if abs(achieved - fraction) > FRACTION_TOLERANCE:
        raise ValueError(
            f"target {fraction:.3f} of the prunable parameters cannot be met with units {list(prune)}: the closest "
            f"uniform shape {shape} keeps {achieved:.3f}. Prune more unit types (channels are the finest), round to a "
            "smaller multiple (pruning.round_to), or choose another target."
        )
    return shape


def resolve_target(
    structure: ModelStructure,
    prune: tuple[str, ...],
    fraction: float | None,
    shape: dict | None,
    uniform: bool,
    round_to: int = 8,
) -> SparsityTarget:
    """Check a user's target against the model (before training) and fill in the shape or the fraction."""
    if (fraction is None) == (shape is None):
        raise ValueError("give exactly one of pruning.target (a kept fraction) and pruning.target_shape")
    if shape is not None:
        if not uniform:
            raise ValueError("pruning.target_shape describes a uniform model; set pruning.uniform: true")
        full = full_shape(structure)
        unknown = sorted(set(shape) - set(full.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"pruning.target_shape: unknown {unknown}; give kept counts of {', '.join(full.__dataclass_fields__)}"
            )
        target_shape = UniformShape(
            **{name: shape.get(name, getattr(full, name)) for name in full.__dataclass_fields__}
        )
        target_shape.check(structure)
        changed = [
            name
            for name in ("groups", "channels", "hidden", "layers")
            if getattr(target_shape, name) != getattr(full, name)
        ]
        if not_pruned := sorted(set(changed) - set(prune)):
            raise ValueError(f"pruning.target_shape shrinks {not_pruned}, which are not in pruning.units {list(prune)}")
        count = shape_parameter_count(structure, target_shape)
        return SparsityTarget(float(prunable_fraction(structure, prune, count)), target_shape, prune)
    if not 0 < fraction < 1:
        raise ValueError(
            f"pruning.target is the kept fraction of prunable parameters and must be in (0, 1), got {fraction}"
        )
    if uniform:
        return SparsityTarget(fraction, uniform_shape_for_fraction(structure, prune, fraction, round_to), prune)
    return SparsityTarget(fraction, None, prune)


def constraint_values(
    target: SparsityTarget, structure: ModelStructure, probs: GateValues
) -> tuple[torch.Tensor, torch.Tensor]:
    """(expected, target) fractions of every constraint, ``[K]`` each, float32 on the probabilities' device,
    differentiable in the keep probabilities."""
    if target.shape is None:
        expected = prunable_fraction(structure, target.prune, parameter_count(structure, probs))
        wanted = torch.tensor([target.fraction], dtype=torch.float32, device=probs.hidden.device)
        return expected.reshape(1).float(), wanted
    full = full_shape(structure)
    expected, wanted = [], []
    for name, per_layer in (("groups", True), ("channels", True), ("hidden", False), ("layers", False)):
        if name not in target.prune:
            continue
        values = getattr(probs, name)
        fraction = values.mean(-1) if per_layer else values.mean().reshape(1)
        expected.append(fraction)
        wanted.append(torch.full_like(fraction, getattr(target.shape, name) / getattr(full, name)))
    return torch.cat(expected).float(), torch.cat(wanted).float()


def rounded_gates(log_alphas: dict[str, torch.Tensor], probs: GateValues, prune: tuple[str, ...]) -> GateValues:
    """Deterministic gates keeping the rounded expected count of every unit type (per layer for groups and
    channels): what the training dynamics reached on their own, before any forcing to the exact target."""
    gates = probs.map(torch.ones_like)
    for name in prune:
        log_alpha, expected = log_alphas[name], getattr(probs, name)
        count = torch.round(expected.sum(-1) if name in ("groups", "channels") else expected.sum()).long()
        values = torch.ones_like(log_alpha) if name == "hidden" else soft_value(log_alpha)
        setattr(gates, name, keep_top_k(log_alpha, values, count))
    return gates


def final_gates(
    target: SparsityTarget, structure: ModelStructure, log_alphas: dict[str, torch.Tensor], probs: GateValues
) -> GateValues:
    """Deterministic gates that meet the target: the target shape exactly (uniform), or the rounded counts with
    the globally most confident MLP channels chosen so the parameter count is closest to the target (non-uniform).
    """
    scores = probs.map(torch.ones_like)
    for name, log_alpha in log_alphas.items():
        setattr(scores, name, log_alpha)
    if target.shape is not None:
        gates = shape_gates(structure, target.shape, scores, soft=True)
        for name in ("groups", "channels", "hidden", "layers"):
            if name not in target.prune:
                setattr(gates, name, torch.ones_like(getattr(gates, name)))
        return gates
    gates = rounded_gates(log_alphas, probs, target.prune)
    if "channels" not in target.prune:
        return gates
    fixed, total = prunable_bounds(structure, target.prune)
    goal = fixed + target.fraction * (total - fixed)
    order = torch.argsort(log_alphas["channels"].flatten(), descending=True)
    soft = soft_value(log_alphas["channels"]).flatten()

    def with_top(count: int) -> GateValues:
        channels = torch.zeros_like(soft)
        channels[order[:count]] = soft[order[:count]]
        return GateValues(**{**dict(gates.items()), "channels": channels.reshape(log_alphas["channels"].shape)})

    low, high = 0, soft.numel()  # parameter count grows with the number of kept channels
    while low < high:
        middle = (low + high) // 2
        if parameter_count(structure, with_top(middle).kept()) < goal:
            low = middle + 1
        else:
            high = middle
    best = min((max(low - 1, 0), low), key=lambda n: abs(float(parameter_count(structure, with_top(n).kept())) - goal))
    return with_top(best)
