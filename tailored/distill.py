"""Distillation from the dense model the run already holds (METHOD.md section 12).

The teacher is the same network with the gates off (NutePrune's teacher is the model with LoRA zeroed; the tuned
variant keeps the current adapters, the cheap analogue of Minitron's teacher correction). The student is the
masked (or, after the "prune now" transition, the physically pruned) model. Loss on the positions that carry an
LM loss (``labels != -100``: the response tokens of instruction tasks), as in Hinton et al. (2015)::

    L_kd = T^2 * mean_{positions p}  KL( softmax(t_p / T) || softmax(s_p / T) )

``T^2`` keeps the gradient scale independent of the temperature. The run's loss is
``(1 - weight) * L_lm + weight * L_kd``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tailored.tasks import IGNORE_INDEX

TEACHERS = ("tuned", "base", "corrected")


@dataclass
class DistillSettings:
    """Distillation from the dense teacher (the gates off) on the positions that carry the LM loss."""

    weight: float = 0.5
    """Share of the distillation loss: loss = (1 - weight) * LM loss + weight * KL. 1 distils only."""
    temperature: float = 2.0
    """Softmax temperature of teacher and student (NutePrune uses 2)."""
    teacher: str = "tuned"
    """tuned: the dense weights with the current LoRA adapters; base: adapters off (the pretrained model). Measured
    (README, Quality): base helps where the pretrained model already does the task (general text: quickstart
    perplexity 181 -> 151) and hurts where it cannot (medical suite: about -10 points of % of tuned); tuned was
    neutral on the medical suite and hurt on the quickstart. corrected: the dense weights with adapters of the
    teacher's own, trained on the LM loss in the same steps (tailored.teacher; one more forward and backward per
    step)."""

    def check(self) -> None:
        """Raise a ``ValueError`` naming the first setting that cannot work."""
        if not 0 < self.weight <= 1:
            raise ValueError(f"distill.weight is the share of the distillation loss, in (0, 1]; got {self.weight}")
        if self.temperature <= 0:
            raise ValueError(f"distill.temperature must be positive, got {self.temperature}")
        if self.teacher not in TEACHERS:
            raise ValueError(f"distill.teacher must be one of {', '.join(TEACHERS)}; got {self.teacher!r}")


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 2.0
) -> torch.Tensor:
    """Temperature-scaled KL(teacher || student) averaged over the predicting positions.

    Args:
        student_logits, teacher_logits: ``[B, T, V]``.
        labels: ``[B, T]``; position ``p`` predicts token ``p + 1`` and counts when ``labels[:, p + 1]`` is not
            :data:`tailored.tasks.IGNORE_INDEX` (the shift of Hugging Face's causal LM loss).
        temperature: T.
    Returns:
        A scalar: 0 when the student's distribution equals the teacher's, positive otherwise.
    """
    counted = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]
    student = student_logits[:, :-1][counted].float() / temperature  # [N, V]
    teacher = teacher_logits[:, :-1][counted].float() / temperature
    if student.numel() == 0:
        return student_logits.sum() * 0.0
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
    return kl * temperature**2
