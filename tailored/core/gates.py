"""Every pruning gate of a model and the Lagrange multipliers of the sparsity constraint, in one module.

Keeping all gate logits and multipliers in one ``nn.Module`` (as Sheared-LLaMA keeps its masks in one top-level
module) keeps optimiser groups, checkpointing, logging and distributed wrapping simple: the decoder is left
untouched, and :mod:`tailored.core.masking` applies the gate values to its activations.

Hierarchy (docs/method.md#section-3): a KV group's effective gate is ``z_group * z_attn * z_layer``, an MLP channel's
``z_channel * z_mlp * z_layer``; :func:`tailored.core.structure.parameter_count` and the masking hooks apply the
products, so the container holds one independent gate per unit.

Sparsity regulariser (CoFi / Sheared-LLaMA, docs/method.md#section-5), per constraint k with expected fraction s_k and
target t_k (warmed up from 1)::

    L_sparse = sum_k  lambda1_k * (s_k - t_k) + lambda2_k * (s_k - t_k)^2

minimised over the gates and maximised over the multipliers: they enter through :func:`_ascent`, which reverses
their gradient, so one ordinary optimiser step does gradient ascent on them.

Why the multipliers need care in short runs: Adam moves every gate logit at about its learning rate whatever the
multiplier's size, so gates that start saturated (``log_alpha`` = 5) lag the target, ``lambda_1`` integrates the
gap meanwhile, and the ratio overshoots far below the target before swinging back. A multiplier learning rate well
below the gates' and a positive initial ``lambda_2`` (a proportional term) keep the approach damped; measured on
the tiny test model: 100 steps, target 0.6, ``penalty_init`` 0 -> lowest ratio 0.47, 100 -> 0.59.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from tailored.core import hard_concrete
from tailored.core.generator import DecisionGenerator
from tailored.core.structure import GateValues, ModelStructure, parameter_count, unit_shapes
from tailored.core.targets import SparsityTarget, constraint_values, final_gates, prunable_fraction, rounded_gates

UNIT_TYPES = ("groups", "channels", "attn", "mlp", "layers", "hidden")
TIE_BREAK = 1e-3
"""Weight of the importance prior in the final ranking: it only orders units whose logits are (nearly) equal, such
as units parked at the clamp floor, which would otherwise be chosen by index."""
"""Names of the unit types, as in :class:`tailored.core.structure.GateValues`."""
LOGIT_SOURCES = ("direct", "generator")


def _ascent(multiplier: torch.Tensor) -> torch.Tensor:
    """The multiplier's value with its gradient negated: descending the loss ascends in the multiplier."""
    return 2 * multiplier.detach() - multiplier


class PruningGates(nn.Module):
    """One hard-concrete gate per prunable unit of the chosen types (the other types are always kept), the
    multipliers of the sparsity constraints, and the gates frozen for the recovery phase.

    Args:
        structure: the model's prunable structure (:func:`tailored.core.structure.describe`).
        prune: unit types to learn gates for (a subset of :data:`UNIT_TYPES`).
        target: the sparsity target (:func:`tailored.core.targets.resolve_target`); None: no regulariser.
        logits: ``direct`` (one learnable ``log_alpha`` per unit) or ``generator`` (ATP's decision network).
        init_log_alpha: initial logit (5: every unit kept with P ~ 0.999, Sheared-LLaMA).
        init_std: spread of the initial logits (direct) or of the generator heads' weights.
        penalty_init: initial ``lambda_2``. CoFi and Sheared-LLaMA start both multipliers at 0; a positive value
            makes the quadratic term an augmented-Lagrangian penalty from the first step, which damps the
            overshoot of short runs (``lambda_2`` still rises by gradient ascent).
    """

    def __init__(
        self,
        structure: ModelStructure,
        prune: Sequence[str] = ("groups", "channels"),
        target: SparsityTarget | None = None,
        logits: str = "direct",
        init_log_alpha: float = 5.0,
        init_std: float = 0.01,
        penalty_init: float = 0.0,
    ) -> None:
        super().__init__()
        unknown = sorted(set(prune) - set(UNIT_TYPES))
        if unknown or not prune:
            raise ValueError(f"prune must name one or more of {UNIT_TYPES}; got {list(prune)}")
        if logits not in LOGIT_SOURCES:
            raise ValueError(f"logits must be one of {LOGIT_SOURCES}, got {logits!r}")
        self.structure, self.target = structure, target
        self.prune = tuple(name for name in UNIT_TYPES if name in prune)
        shapes = unit_shapes(structure)
        fp32 = torch.float32  # explicit: Lightning builds the module under its precision's default dtype
        if logits == "direct":
            self.log_alpha = nn.ParameterDict(
                {
                    name: nn.Parameter(torch.randn(shapes[name], dtype=fp32) * init_std + init_log_alpha)
                    for name in self.prune
                }
            )
        else:
            self.generator = DecisionGenerator(structure, self.prune, init_log_alpha, init_std)
        constraints = 0 if target is None else len(constraint_values(target, structure, self._ones())[0])
        self.lambda_1 = nn.Parameter(torch.zeros(constraints, dtype=fp32))
        self.lambda_2 = nn.Parameter(torch.full((constraints,), float(penalty_init), dtype=fp32))
        for name, shape in shapes.items():
            self.register_buffer(f"frozen_{name}", torch.ones(shape, dtype=fp32))
        for name in self.prune:  # importance ranks in [0, 1] (1: most important); 0 without a prior
            self.register_buffer(f"prior_{name}", torch.zeros(shapes[name], dtype=fp32))
        self._buffers["is_frozen"] = torch.tensor(False)  # checkpoints carry the flag; steps read the property
        self._frozen = False
        self.init_log_alpha = init_log_alpha

    @property
    def is_frozen(self) -> bool:
        """The gates are fixed for the recovery phase (:meth:`freeze`). A host value: the hooks read it every step,
        and a device flag would make each read wait for the device; the buffer of this name holds it in checkpoints."""
        return self._frozen

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._frozen = bool(self._buffers["is_frozen"])  # read once, when a checkpoint is loaded

    def _apply(self, fn, recurse: bool = True):
        """Move, never cast: ``.to(device)``/``.cuda()`` move the gates, a dtype change is dropped (all float32).

        Lightning's ``trainer.precision: bf16-true`` (and ``16-true``) runs ``module.to(bfloat16)`` on the whole
        LightningModule. In bf16 a logit near 5 moves in steps of 1/32, so the gates' small updates, the 1e-3
        importance tie-break and the multipliers' slow ascent would be rounded away, and the final top-k would rank
        ties. These tensors hold at most a few million numbers: keeping them float32 costs nothing, and keeps
        bf16-true usable (LoRA then trains in bf16, as the user asked) rather than refused. The cast is dropped,
        not undone: the tensor is moved from its float32 value, so nothing is rounded on the way.
        """

        def move_only(tensor: torch.Tensor) -> torch.Tensor:
            converted = fn(tensor)
            if converted.dtype == tensor.dtype or not tensor.is_floating_point():
                return converted
            return tensor.to(device=converted.device)

        return super()._apply(move_only, recurse)

    def _ones(self) -> GateValues:
        """Dense gates on the CPU: only counted, at construction."""
        return GateValues.ones(self.structure, device="cpu")

    def log_alphas(self) -> dict[str, torch.Tensor]:
        """The gate logits of each pruned unit type."""
        if hasattr(self, "log_alpha"):
            return dict(self.log_alpha.items())
        return self.generator()

    @torch.no_grad()
    def init_from_scores(self, scores: GateValues, spread: float = 4.0) -> None:
        """Start every pruned unit's logit from its importance rank (docs/method.md#section-13).

        Per layer for groups and channels, model-wide for the other types, units are ranked by ``scores``; the rank
        fraction ``r`` (1 = highest score) sets ``log_alpha = init_log_alpha - spread * (1 - r)``, so the keep
        probabilities are ordered as the scores while the best units start where a constant init would. The ranks
        are kept as the prior that breaks ties in the final top-k. With the generator, its output biases take these
        values.
        """
        for name in self.prune:
            rank = rank_fraction(getattr(scores, name).to(getattr(self, f"prior_{name}").device))
            getattr(self, f"prior_{name}").copy_(rank)
            logits = self.init_log_alpha - spread * (1 - rank)
            target = self.log_alpha[name] if hasattr(self, "log_alpha") else self.generator.biases[name]
            target.copy_(logits)

    def ranking_logits(self) -> dict[str, torch.Tensor]:
        """The gate logits with the importance prior added at weight :data:`TIE_BREAK`: what the top-k ranks by
        (float64, so that the prior still orders thousands of units at equal logits)."""
        return {
            name: value.double() + TIE_BREAK * getattr(self, f"prior_{name}").double()
            for name, value in self.log_alphas().items()
        }

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep direct logits within Sheared-LLaMA's range (call after each optimiser step)."""
        if hasattr(self, "log_alpha"):
            for parameter in self.log_alpha.values():
                parameter.clamp_(*hard_concrete.LOG_ALPHA_RANGE)

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

    def kept_fraction(self, gates: GateValues) -> torch.Tensor:
        """Share of the prunable parameters that ``gates`` keep (a unit counts with its gate value): a scalar on the
        gates' device, for ``self.log`` (which reads it back only when it logs)."""
        count = parameter_count(self.structure, gates.kept())
        return prunable_fraction(self.structure, self.prune, count).detach().float()

    @torch.no_grad()
    def expected_sparsity(self) -> dict[str, torch.Tensor]:
        """For logging: the expected kept share of the prunable parameters (``sparsity/expected_ratio``) and the
        mean keep probability of each pruned unit type (``sparsity/kept_<type>``), scalars on the gates' device."""
        probs = self.keep_probabilities()
        count = parameter_count(self.structure, probs)
        logs = {"sparsity/expected_ratio": prunable_fraction(self.structure, self.prune, count).float()}
        return logs | {f"sparsity/kept_{name}": getattr(probs, name).mean() for name in self.prune}

    def keep_probabilities(self) -> GateValues:
        """P(z > 0) per unit (1 for unit types that are not pruned)."""
        return self._fill({name: hard_concrete.keep_probability(v) for name, v in self.log_alphas().items()})

    def expected_parameter_count(self) -> torch.Tensor:
        """Expected parameters of the pruned model under the current gate distribution (float64, differentiable)."""
        return parameter_count(self.structure, self.keep_probabilities())

    def sparsity_loss(self, warmup: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The Lagrangian and the (expected, target) constraint fractions ``[K]``.

        ``warmup`` in [0, 1] moves every budget target from 1 (dense) to its final value.
        """
        if self.target is None:
            raise RuntimeError("these gates have no sparsity target")
        expected, target = constraint_values(self.target, self.structure, self.keep_probabilities(), warmup)
        gap = expected - target
        loss = (_ascent(self.lambda_1) * gap + _ascent(self.lambda_2) * gap**2).sum()
        return loss, expected.detach(), target

    def lagrangian(self, ramp: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`sparsity_loss` at ``ramp`` and, for logging, the regulariser, the largest constraint gap, the
        ramped overall target and the mean multipliers."""
        regulariser, expected, target = self.sparsity_loss(ramp)
        logs = {
            "sparsity/regulariser": regulariser.detach(),
            "sparsity/constraint_gap": (expected - target).abs().max(),
            "sparsity/target": torch.tensor(1 - ramp * (1 - self.target.fraction)),
            "lagrangian/lambda_1": self.lambda_1.detach().mean(),
            "lagrangian/lambda_2": self.lambda_2.detach().mean(),
        }
        return regulariser, logs

    @torch.no_grad()
    def deterministic(self, kept: Mapping[str, torch.Tensor | int] | None = None) -> GateValues:
        """Evaluation gates: the highest-``log_alpha`` units kept, the others exactly 0.

        Args:
            kept: units to keep per type: an int, or ``[L]`` per layer for groups and channels. A missing type
                keeps the rounded expected count, as Sheared-LLaMA does.
        Returns:
            Kept KV groups, channels, blocks and layers hold their soft value ``sigmoid(log_alpha / beta * 0.8)``,
            which surgery folds into the weights; kept hidden dims hold exactly 1 (a tied ``lm_head`` reads the
            same embedding columns, so a soft hidden value could not be folded into both).
        """
        log_alphas = self.ranking_logits()
        gates = rounded_gates(log_alphas, self.keep_probabilities(), self.prune)
        for name, count in (kept or {}).items():
            values = (
                torch.ones_like(log_alphas[name]) if name == "hidden" else hard_concrete.soft_value(log_alphas[name])
            )
            setattr(gates, name, hard_concrete.keep_top_k(log_alphas[name], values, count))
        return gates.map(lambda value: value.float())  # ranked in float64, returned as the gates' float32

    @torch.no_grad()
    def target_gates(self, by_importance: bool = False) -> GateValues:
        """Deterministic gates that meet the target exactly (:func:`tailored.core.targets.final_gates`).

        ``by_importance`` (uniform targets): the counts the gates reached (a learned shape) or the target shape, but
        in every layer the units the importance scores rank highest, kept at 1; the logits only break ties."""
        if self.target is None:
            raise RuntimeError("these gates have no sparsity target")
        ranking = self.importance_ranking() if by_importance else self.ranking_logits()
        probs = self.keep_probabilities()
        gates = final_gates(self.target, self.structure, ranking, probs, soft=not by_importance)
        return gates.map(lambda value: value.float())

    def importance_ranking(self) -> dict[str, torch.Tensor]:
        """The importance ranks (:meth:`init_from_scores`) with the logits added at weight :data:`TIE_BREAK`."""
        return {
            name: getattr(self, f"prior_{name}").double() + TIE_BREAK * value.double()
            for name, value in self.log_alphas().items()
        }

    @torch.no_grad()
    def freeze(self, gates: GateValues) -> None:
        """Fix the gates for the recovery phase; they are saved with the module's state (checkpoints)."""
        for name, value in gates.items():
            getattr(self, f"frozen_{name}").copy_(value)
        self._buffers["is_frozen"].fill_(True)
        self._frozen = True

    def frozen(self) -> GateValues:
        """The gates fixed by :meth:`freeze`."""
        return GateValues(**{name: getattr(self, f"frozen_{name}") for name in UNIT_TYPES})


def rank_fraction(scores: torch.Tensor) -> torch.Tensor:
    """Each entry's rank within its row (the last dim) scaled to [0, 1]: 0 for the lowest score, 1 for the highest."""
    n = scores.shape[-1]
    if n == 1:  # a single unit is its row's best
        return torch.ones_like(scores, dtype=torch.float32)
    return hard_concrete.ranks(scores).float() / (n - 1)
