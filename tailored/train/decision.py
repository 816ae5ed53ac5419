"""When the pruning decision is made, and what it says about how much the run learned.

Decide, then prune (``pruning.settle_steps``): in the control phase the exact mask the run would freeze (the
target gates' kept units) is compared after every optimiser step with the previous one. Once it has stayed the
same, up to :data:`SETTLED_CHANGE` of each unit type's kept units, for ``settle_steps`` steps while the expected
kept fraction is within :data:`FRACTION_TOLERANCE` of the budget, the next step freezes the gates and starts
recovery (and, by default, prunes the model): the remaining steps tune the smaller model. (Exactly the same mask
is too strict: on SmolLM2 a few of the ~40,000 channels trade places at the boundary of the top-k on most steps.)
The watcher's state is checkpointed, so a resumed run decides at the same step.

What was learned (written to ``pruning_report.json`` and TensorBoard when the gates freeze):

- ``agreement_with_importance``: per unit type, the share of kept units that the importance ranking the gates
  started from would also keep at the same counts (1: the run kept what the scores said; a one-stage mask close
  to 1 everywhere is the two-stage mask again);
- ``masked_base_loss``: per held-out task, the loss of the *untuned* base model (adapters off) under the 0/1 mask:
  the mask's quality as a pure structural decision, comparable between a one-stage and a two-stage mask.
"""

from __future__ import annotations

import torch

from tailored.core.gates import PruningGates
from tailored.core.hard_concrete import keep_top_k
from tailored.core.masking import GateHooks
from tailored.core.structure import GateValues
from tailored.core.targets import FRACTION_TOLERANCE
from tailored.data.scoring import mean_losses

SETTLED_CHANGE = 0.01
"""A mask counts as unchanged when, for every unit type, at most this share of its kept units differ."""


class MaskSettling:
    """Counts the optimiser steps for which the exact target mask has not changed.

    Args:
        patience: steps the mask must stay unchanged (``pruning.settle_steps``).
        tolerance: largest allowed gap between the expected kept fraction and the budget.
    """

    def __init__(self, patience: int, tolerance: float = FRACTION_TOLERANCE) -> None:
        self.patience, self.tolerance = patience, tolerance
        self.mask: dict[str, torch.Tensor] | None = None
        self.unchanged = 0
        self.settled = False

    def update(self, gates: GateValues, fraction_gap: float) -> bool:
        """Record the mask after one step (``gates``: deterministic target gates); True once it has settled."""
        mask = {name: (value > 0).cpu() for name, value in gates.items()}
        same = self.mask is not None and all(
            int((mask[name] != self.mask[name]).sum()) <= SETTLED_CHANGE * int(mask[name].sum()) for name in mask
        )
        self.unchanged = self.unchanged + 1 if same else 0
        self.mask = mask
        self.settled = self.settled or (self.unchanged >= self.patience and abs(fraction_gap) <= self.tolerance)
        return self.settled

    def state_dict(self) -> dict:
        return {"mask": self.mask, "unchanged": self.unchanged, "settled": self.settled}

    def load_state_dict(self, state: dict) -> None:
        self.mask, self.unchanged, self.settled = state["mask"], state["unchanged"], state["settled"]


def agreement_with_importance(gates: PruningGates, kept: GateValues) -> dict[str, float] | None:
    """Per pruned unit type, the share of ``kept``'s units that the importance prior also keeps at the same
    counts (per layer for groups and channels); None when the gates started without importance scores."""
    shares = {}
    for name in gates.prune:
        prior = getattr(gates, f"prior_{name}")
        if not bool(prior.any()):
            return None
        chosen = getattr(kept, name) > 0
        counts = chosen.sum(-1) if chosen.dim() > 1 else chosen.sum()
        by_prior = keep_top_k(prior, torch.ones_like(prior), counts) > 0
        shares[name] = float((chosen & by_prior).sum() / chosen.sum().clamp(min=1))
    return shares


@torch.no_grad()
def masked_base_loss(module, gates: GateValues) -> dict[str, float]:
    """Per held-out task, the mean loss of ``module``'s base model (adapters disabled) under ``gates``' 0/1 mask,
    on the validation rows (the masked model before any tuning: the quality of the mask alone)."""
    data, model = module.trainer.datamodule, module.model
    hooks: GateHooks = module.hooks
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            hooks.activate(gates.kept())
            try:
                losses = mean_losses(model, data.val_dataloader(), module.device)
            finally:
                hooks.deactivate()
    finally:
        model.train(was_training)
    return {task.name: loss for task, loss in zip(data.tasks, losses, strict=True)}
