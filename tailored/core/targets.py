"""What the sparsity regulariser aims at, and the deterministic gates that meet it exactly at the end.

A target is a kept fraction ``t`` of the *prunable* parameters (those the pruned unit types can remove; with
hidden dims pruned that includes the embeddings), or an explicit uniform shape.

- ``uniform`` (the default): every layer must end with the same shape, so the export is a stock Hugging Face
  model. Two allocations of the budget between the unit types:

  - ``learned`` (the default): one constraint on the expected kept fraction of all prunable parameters, as in
    non-uniform mode, plus a tying constraint per layer and per-layer type (the layer's expected KV-group or
    channel fraction equals the mean over layers). How many groups, channels, hidden dims and layers to keep is
    learned; at the end :func:`learned_shape` rounds the layers' mean expected counts to the nearest legal stock
    shape that meets the budget (docs/method.md#section-5). The one constraint pulls each gate gently (its
    gradient is spread over every gate), so in short runs the expected fraction is still above the target when
    the gates freeze and the final top-k removes the rest; one budget per layer, which pulls as hard as the
    proportional shape's per-layer constraints, reached the target early and measured worse on the quickstart
    (docs/quality.md).
  - ``proportional``: the fraction is first turned into a fixed shape in which every pruned type keeps the same
    share of its units (:func:`uniform_shape_for_fraction`); the regulariser constrains every layer's expected
    KV-group and channel fractions, the hidden fraction and the layer fraction to that shape (Sheared-LLaMA's
    per-structure targets). The two-stage baselines prune to this shape.
- non-uniform: one constraint on the expected kept fraction of prunable parameters; layers find their own shapes
  (ATP / CoFi style).

Constraint values are fractions in [0, 1]; the warm-up moves each budget target linearly from 1 (dense) to its
value (the tying constraints need no warm-up: they hold at the start).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, replace

import torch

from tailored.core.hard_concrete import keep_top_k, soft_value
from tailored.core.shapes import UniformShape, fit_channels, full_shape, shape_gates, shape_parameter_count
from tailored.core.structure import GateValues, ModelStructure, parameter_count

ALLOCATIONS = ("learned", "proportional")
"""How uniform mode splits the budget between unit types (see the module docstring)."""
FRACTION_TOLERANCE = 0.01
"""A fraction target must be reachable within this many prunable-parameter fractions (1 percentage point)."""


@dataclass(frozen=True)
class SparsityTarget:
    """The resolved target of a run (see :func:`resolve_target`)."""

    fraction: float
    """Kept fraction of the prunable parameters that the final model has."""
    shape: UniformShape | None
    """Uniform mode with a proportional allocation (or a given shape): the shape every layer ends with; None
    otherwise."""
    prune: tuple[str, ...]
    """Pruned unit types."""
    tied: bool = False
    """Uniform mode with a learned allocation: the shape is learned, every layer keeps the same counts."""
    round_to: int = 8
    """Kept channels and hidden dims of a learned shape are multiples of this."""


@functools.cache
def prunable_bounds(structure: ModelStructure, prune: tuple[str, ...]) -> tuple[float, float]:
    """(parameters no pruned unit can remove, all parameters): host arithmetic on the structure, on the CPU, done
    once per structure (the Lagrangian of every step reads it)."""
    dense = GateValues.ones(structure, device="cpu")
    floor = dense.map(lambda value: value.clone())
    for name in prune:
        getattr(floor, name).zero_()
    return float(parameter_count(structure, floor)), float(parameter_count(structure, dense))


def prunable_fraction(structure: ModelStructure, prune: tuple[str, ...], count: torch.Tensor | float):
    """Kept fraction of the prunable parameters for a (possibly expected) parameter ``count``."""
    fixed, full = prunable_bounds(structure, prune)
    return (count - fixed) / (full - fixed)


def reinvested_fraction(structure: ModelStructure, prune: tuple[str, ...], fraction: float, vocab_size: int) -> float:
    """The kept fraction of the prunable parameters whose model, its vocabulary trimmed to ``vocab_size`` tokens, has
    as many parameters as ``fraction`` gives with every token: ``fraction + (fixed - fixed_K) / (N - fixed)``, with
    ``fixed`` and ``fixed_K`` the parameters ``prune`` cannot remove at the full and the trimmed vocabulary. The
    embedding (and untied ``lm_head``) rows trimming removes go to the pruned units. With hidden dims unpruned, the
    prunable parameters ``N - fixed`` do not depend on the vocabulary."""
    fixed, full = prunable_bounds(structure, prune)
    trimmed_fixed = prunable_bounds(replace(structure, vocab_size=vocab_size), prune)[0]
    return fraction + (fixed - trimmed_fixed) / (full - fixed)


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
    allocation: str = "proportional",
) -> SparsityTarget:
    """Check a user's target against the model (before training) and fill in the shape or the fraction.

    ``allocation`` (uniform mode, a fraction given): ``proportional`` fixes the shape now, ``learned`` leaves it to
    the gates (and meets the fraction as closely as the learned counts allow)."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"pruning.allocation must be one of {', '.join(ALLOCATIONS)}; got {allocation!r}")
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
    if uniform and allocation == "learned":  # the shape is found at the end (learned_shape)
        return SparsityTarget(fraction, None, prune, tied=True, round_to=round_to)
    if uniform:
        return SparsityTarget(fraction, uniform_shape_for_fraction(structure, prune, fraction, round_to), prune)
    return SparsityTarget(fraction, None, prune, round_to=round_to)


TIED_TYPES = ("groups", "channels")
"""Unit types counted per layer: a learned uniform shape ties their counts across layers."""


def constraint_values(
    target: SparsityTarget, structure: ModelStructure, probs: GateValues, ramp: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(expected, target) fractions of every constraint, ``[K]`` each, float32 on the probabilities' device,
    differentiable in the keep probabilities (the targets are not).

    ``ramp`` in [0, 1] moves the budget targets from 1 (dense) to their final values (warm-up). Constraints, in
    order: the prunable fraction (non-uniform and learned uniform), then for a learned uniform shape each layer's
    expected fraction of every pruned :data:`TIED_TYPES` type against the mean over layers (``[L]`` per type);
    for a fixed shape, each layer's group and channel fractions, the hidden and the layer fractions."""

    def ramped(final: torch.Tensor) -> torch.Tensor:
        return 1 - ramp * (1 - final)

    if target.shape is None:
        expected = [prunable_fraction(structure, target.prune, parameter_count(structure, probs)).reshape(1).float()]
        wanted = [ramped(torch.tensor([target.fraction], dtype=torch.float32, device=probs.hidden.device))]
        for name in TIED_TYPES if target.tied else ():
            if name in target.prune:
                per_layer = getattr(probs, name).mean(-1).float()  # [L]
                expected.append(per_layer)
                wanted.append(per_layer.detach().mean().expand_as(per_layer))
        return torch.cat(expected), torch.cat(wanted)
    full = full_shape(structure)
    expected, wanted = [], []
    for name, per_layer in (("groups", True), ("channels", True), ("hidden", False), ("layers", False)):
        if name not in target.prune:
            continue
        values = getattr(probs, name)
        fraction = values.mean(-1) if per_layer else values.mean().reshape(1)
        expected.append(fraction)
        wanted.append(ramped(torch.full_like(fraction, getattr(target.shape, name) / getattr(full, name))))
    return torch.cat(expected).float(), torch.cat(wanted).float()


def expected_counts(structure: ModelStructure, probs: GateValues) -> dict[str, float]:
    """Expected kept units of every uniform-shape count: per layer (the mean over layers) for groups and
    channels, model-wide for hidden dims and layers."""
    return {
        "groups": float(probs.groups.sum(-1).mean()),
        "channels": float(probs.channels.sum(-1).mean()),
        "hidden": float(probs.hidden.sum()),
        "layers": float(probs.layers.sum()),
    }


def learned_shape(target: SparsityTarget, structure: ModelStructure, probs: GateValues) -> UniformShape:
    """The stock uniform shape nearest the gates' expected counts that keeps the target fraction.

    Every pruned count is rounded down and up (hidden dims to multiples of :func:`hidden_multiple`, groups to a
    :func:`stock_group_count` when the hidden size is kept whole); for each combination the channel count is
    fitted to the budget (:func:`tailored.core.shapes.fit_channels`, multiples of ``round_to``). Of the shapes
    within :data:`FRACTION_TOLERANCE` of the target, the one with the smallest summed relative distance to the
    expected counts is returned; if none is (channels not pruned, or at their bounds), the one closest to the
    target fraction.
    """
    full = full_shape(structure)
    fixed, total = prunable_bounds(structure, target.prune)
    goal = fixed + target.fraction * (total - fixed)
    expected = expected_counts(structure, probs)
    channel_multiple = min(target.round_to, full.channels)

    def around(name: str, multiple: int = 1) -> list[int]:
        """Kept counts next to the expected one, multiples of ``multiple`` within 1 .. full (the full count if
        the type is not pruned; a hidden size stays a multiple even at the top, as Llama's config requires)."""
        size = getattr(full, name)
        if name not in target.prune:
            return [size]
        multiple = min(multiple, size)
        top = size // multiple * multiple if name == "hidden" else size
        low = max(multiple, int(expected[name] // multiple) * multiple)
        return sorted({min(top, low), min(top, low + multiple)})

    candidates = []
    for kept_groups in around("groups"):
        groups = kept_groups if "hidden" in target.prune else stock_group_count(structure, kept_groups)
        for hidden in around("hidden", hidden_multiple(structure, groups, target.round_to)):
            for layers in around("layers"):
                channels = around("channels", channel_multiple)[0]
                shape = UniformShape(groups, channels, hidden, layers)
                if "channels" in target.prune:
                    try:
                        shape = fit_channels(structure, shape, round(goal), channel_multiple)
                    except ValueError:  # no width meets the budget with these counts
                        continue
                candidates.append(shape)
    if not candidates:  # even the widest or narrowest MLP misses: keep the rounded counts
        candidates = [UniformShape(*(around(name)[0] for name in ("groups", "channels", "hidden", "layers")))]

    def achieved(shape: UniformShape) -> float:
        return (shape_parameter_count(structure, shape) - fixed) / (total - fixed)

    def distance(shape: UniformShape) -> float:
        return sum(abs(getattr(shape, name) - expected[name]) / getattr(full, name) for name in expected)

    meeting = [shape for shape in candidates if abs(achieved(shape) - target.fraction) <= FRACTION_TOLERANCE]
    if meeting:
        return min(meeting, key=distance)
    return min(candidates, key=lambda shape: abs(achieved(shape) - target.fraction))


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
    target: SparsityTarget,
    structure: ModelStructure,
    log_alphas: dict[str, torch.Tensor],
    probs: GateValues,
    soft: bool = True,
) -> GateValues:
    """Deterministic gates that meet the target: the target shape exactly (uniform; a learned one from
    :func:`learned_shape`), or the rounded counts with the globally most confident MLP channels chosen so the
    parameter count is closest to the target (non-uniform). ``log_alphas`` rank the units; uniform gates with
    ``soft`` False keep theirs at 1 instead of their soft value (ranking by other scores than the logits).
    """
    scores = probs.map(torch.ones_like)
    for name, log_alpha in log_alphas.items():
        setattr(scores, name, log_alpha)
    shape = learned_shape(target, structure, probs) if target.tied else target.shape
    if shape is not None:
        gates = shape_gates(structure, shape, scores, soft=soft)
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
