"""Every pruning gate of a model, in one module.

Keeping all gate logits in one ``nn.Module`` (as Sheared-LLaMA keeps its masks in one top-level module) keeps
optimiser groups, checkpointing, logging and distributed wrapping simple: the decoder is left untouched, and
:mod:`tailored.masking` applies the gate values to its activations.

Hierarchy (METHOD.md section 3): a KV group's effective gate is ``z_group * z_attn * z_layer``, an MLP channel's
``z_channel * z_mlp * z_layer``; :func:`tailored.structure.parameter_count` and the masking hooks apply the
products, so the container holds one independent gate per unit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from tailored import hard_concrete
from tailored.structure import GateValues, ModelStructure, parameter_count, unit_shapes

UNIT_TYPES = ("groups", "channels", "attn", "mlp", "layers", "hidden")
"""Names of the unit types, as in :class:`tailored.structure.GateValues`."""
BLOCK_TYPES = ("attn", "mlp")
"""Unit types that remove a block from some layers only: the result is never a stock Hugging Face layout."""


class PruningGates(nn.Module):
    """One hard-concrete gate per prunable unit of the chosen types; the other types are always kept.

    Args:
        structure: the model's prunable structure (:func:`tailored.structure.describe`).
        prune: unit types to learn gates for (a subset of :data:`UNIT_TYPES`).
        init_log_alpha: mean of the initial ``log_alpha`` (5: every unit kept with P ~ 0.999, Sheared-LLaMA).
        init_std: standard deviation of the initial ``log_alpha``.
    """

    def __init__(
        self,
        structure: ModelStructure,
        prune: Sequence[str] = ("groups", "channels", "hidden", "layers"),
        init_log_alpha: float = 5.0,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        unknown = sorted(set(prune) - set(UNIT_TYPES))
        if unknown or not prune:
            raise ValueError(f"prune must name one or more of {UNIT_TYPES}; got {list(prune)}")
        self.structure = structure
        self.prune = tuple(name for name in UNIT_TYPES if name in prune)
        shapes = unit_shapes(structure)
        self.log_alpha = nn.ParameterDict(
            {name: nn.Parameter(torch.randn(shapes[name]) * init_std + init_log_alpha) for name in self.prune}
        )

    def log_alphas(self) -> dict[str, torch.Tensor]:
        """The gate logits of each pruned unit type."""
        return dict(self.log_alpha.items())

    def _fill(self, learned: Mapping[str, torch.Tensor]) -> GateValues:
        """Gate values with ``learned`` for the pruned types and ones for the others."""
        reference = next(iter(learned.values()))
        shapes = unit_shapes(self.structure)
        return GateValues(
            **{name: learned[name] if name in learned else reference.new_ones(shapes[name]) for name in UNIT_TYPES}
        )

    def sample(self) -> GateValues:
        """Training gates: one hard-concrete sample per unit, differentiable in the logits."""
        return self._fill({name: hard_concrete.sample(value) for name, value in self.log_alphas().items()})

    def keep_probabilities(self) -> GateValues:
        """P(z > 0) per unit (1 for unit types that are not pruned)."""
        return self._fill({name: hard_concrete.keep_probability(v) for name, v in self.log_alphas().items()})

    def expected_parameter_count(self) -> torch.Tensor:
        """Expected parameters of the pruned model under the current gate distribution (float64, differentiable)."""
        return parameter_count(self.structure, self.keep_probabilities())

    def expected_kept(self) -> dict[str, torch.Tensor]:
        """Expected number of kept units: per layer ``[L]`` for groups and channels, a scalar for the others."""
        return {
            name: probs.sum(-1) if name in ("groups", "channels") else probs.sum()
            for name, probs in self.keep_probabilities().items()
            if name in self.prune
        }

    @torch.no_grad()
    def deterministic(self, kept: Mapping[str, torch.Tensor | int] | None = None) -> GateValues:
        """Evaluation gates: the highest-``log_alpha`` units kept, the others exactly 0.

        Args:
            kept: units to keep per type: an int, or ``[L]`` per layer for groups and channels. A missing type
                keeps the rounded expected count (:meth:`expected_kept`), as Sheared-LLaMA does.
        Returns:
            Kept KV groups, channels, blocks and layers hold their soft value ``sigmoid(log_alpha / beta * 0.8)``,
            which surgery folds into the weights; kept hidden dims hold exactly 1 (a tied ``lm_head`` reads the
            same embedding columns, so a soft hidden value could not be folded into both).
        """
        kept = dict(kept or {})
        expected = self.expected_kept()
        gates = {}
        for name, log_alpha in self.log_alphas().items():
            count = kept.get(name)
            count = torch.round(expected[name]).long() if count is None else count
            values = torch.ones_like(log_alpha) if name == "hidden" else hard_concrete.soft_value(log_alpha)
            gates[name] = hard_concrete.keep_top_k(log_alpha, values, count)
        return self._fill(gates)
