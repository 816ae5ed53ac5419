"""The phases of a run over ``trainer.max_steps`` (docs/method.md, "Phases")::

    |── warm-up ──|──────── control ────────|──── recovery ────|
     target ramps   gates converge to it      gates frozen at the exact target; by default the model is
     1 -> t         (logits start from          pruned now (tailored.train.transition) and LoRA tunes the
                    importance scores)          smaller one

Recovery is the last ``pruning.recovery`` share of the steps; warm-up the first ``pruning.warmup`` share of the
steps before it. The two-stage baselines recover only: they prune at step 0.
"""

from __future__ import annotations

from dataclasses import dataclass

PHASES = ("warmup", "control", "recovery")


@dataclass(frozen=True)
class Schedule:
    """Where each phase begins."""

    control_start: int
    recovery_start: int

    @classmethod
    def of(cls, total_steps: int, warmup: float, recovery: float, two_stage: bool) -> Schedule:
        """The schedule of ``total_steps`` steps (two-stage: recovery from step 0)."""
        if two_stage:
            return cls(0, 0)
        recovery_start = round((1 - recovery) * total_steps)
        return cls(round(warmup * recovery_start), recovery_start)

    def phase(self, step: int) -> str:
        return "warmup" if step < self.control_start else "control" if step < self.recovery_start else "recovery"

    def ramp(self, step: int) -> float:
        """How far warm-up has taken the target from dense (0) to the user's (1) at ``step``."""
        return min(1.0, step / max(1, self.control_start))
