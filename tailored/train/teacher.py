"""The teacher of distillation, and the loss the student learns from it.

Distillation from the dense model the run already holds (docs/method.md, "Distillation").

The teacher is the same network with the gates off (NutePrune's teacher is the model with LoRA zeroed; the tuned
variant keeps the current adapters, the cheap analogue of Minitron's teacher correction). The student is the
masked (or, after the "prune now" transition, the physically pruned) model. Loss on the positions that carry an
LM loss (``labels != -100``: the response tokens of instruction tasks), as in Hinton et al. (2015)::

    L_kd = T^2 * mean_{positions p}  KL( softmax(t_p / T) || softmax(s_p / T) )

``T^2`` keeps the gradient scale independent of the temperature. The run's loss is
``(1 - weight) * L_lm + weight * L_kd``; both come from the hidden states a chunk of positions at a time
(:func:`tailored.core.losses.head_losses`), so neither model's ``[B, T, V]`` logits are ever held.

Teacher correction inside the run: the dense teacher gets LoRA adapters of its own, tuned on the domain's LM loss.

Minitron (Sreenivas et al. 2024, "LLM Pruning and Distillation in Practice") fine-tunes the teacher on the target
data before distilling, because a teacher that has not seen that data distils the wrong distribution. Here the
correction happens in the same run, at the cost of one more dense forward and backward per step::

    teacher  = dense weights (gates off) + teacher adapters      trained on the LM loss
    student  = masked (or pruned) weights + student adapters     trained on (1 - w) LM + w KL(teacher || student)

The teacher adapters start as copies of the student's initial ones (``B = 0``: the teacher starts as the
pretrained model) and are swapped into the dense network for the teacher's forward only, so the two adapter sets
share one copy of the frozen weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from tailored.core.lora import adapter_key, lora_state
from tailored.core.losses import at_positions, final_hidden_states, head_losses, output_head


class CorrectedTeacher(nn.Module):
    """The teacher's own LoRA adapters for a peft model, ``{adapter name: tensor}`` shaped like the model's.

    Args:
        model: the dense peft model whose LoRA tensors are copied (names as ``model.named_parameters()`` gives them).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.adapters = nn.ParameterDict(
            {adapter_key(name): nn.Parameter(value) for name, value in lora_state(model).items()}
        )
        if not self.adapters:
            raise ValueError("distill.teacher corrected needs a model with LoRA adapters")

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """``model`` with the teacher adapters in place of its own, which are put back on exit.

        A forward inside builds its graph on the teacher adapters; the backward may run after the exit (the graph
        holds the tensors), but not a recomputing one: gradient checkpointing would replay the student's adapters.
        """
        swapped = []
        try:
            for key, teacher in self.adapters.items():
                module_name, _, attribute = key.replace("/", ".").rpartition(".")
                owner = model.get_submodule(module_name)
                swapped.append((owner, attribute, owner._parameters[attribute]))
                owner._parameters[attribute] = teacher
            yield model
        finally:
            for owner, attribute, original in swapped:
                owner._parameters[attribute] = original


@dataclass
class TeacherOutputs:
    """What the student's losses need of the teacher's forward (tailored.core.losses.head_losses)."""

    hidden: torch.Tensor
    """``[N, d_t]`` its final hidden states at the predicting positions, without gradient."""
    head: nn.Linear
    """Its ``lm_head``, weight ``[V, d_t]``."""
    loss: torch.Tensor | None
    """The corrected teacher's LM loss, with its graph (it trains the teacher's own adapters); None otherwise."""


def teacher_outputs(
    teacher: nn.Module,
    batch: dict[str, torch.Tensor],
    positions: torch.Tensor,
    targets: torch.Tensor,
    corrected: CorrectedTeacher | None,
    adapters_off: bool,
) -> TeacherOutputs:
    """The dense ``teacher``'s (gates off) hidden states at ``positions [N]`` (flat indices of the batch's
    ``[B * T]``, predicting ``targets [N]``), never its ``[B, T, V]`` logits; the KL is computed chunk by chunk from
    them (tailored.core.losses).

    With ``corrected`` the teacher runs with those adapters swapped in, and its LM loss keeps its graph; otherwise
    it runs without gradient with its current adapters (``tuned``) or, with ``adapters_off``, none (``base``, and
    plain LoRA runs, whose model is its own teacher). Evaluated without LoRA dropout.
    """
    training = teacher.training
    teacher.eval()
    try:
        head = output_head(teacher)
        if corrected is not None:
            with corrected.swapped_into(teacher):
                hidden = at_positions(final_hidden_states(teacher, batch), positions)
            loss, _ = head_losses(hidden, head, targets)
            return TeacherOutputs(hidden.detach(), head, loss)
        with torch.no_grad(), teacher.disable_adapter() if adapters_off else nullcontext():
            return TeacherOutputs(at_positions(final_hidden_states(teacher, batch), positions), head, None)
    finally:
        teacher.train(training)


def kept_teacher(dense: nn.Module, kind: str) -> nn.Module:
    """The dense peft model kept as the teacher once the student is pruned, frozen: without its adapters
    (``base``), with the current ones merged into the weights (``tuned``), or as it is (``corrected``, whose own
    adapters are swapped in for each forward).

    peft's ``disable_adapter()`` makes the adapters trainable again when it exits, so a teacher that kept them
    would have its frozen adapters show up as trainable state (and in checkpoints); none of these does.
    """
    teacher = dense.unload() if kind == "base" else dense.merge_and_unload() if kind == "tuned" else dense
    return teacher.requires_grad_(False)
