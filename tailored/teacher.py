"""Teacher correction inside the run: the dense teacher gets LoRA adapters of its own, tuned on the domain's LM loss.

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
from contextlib import contextmanager

from torch import nn

from tailored.transition import lora_state


def adapter_key(name: str) -> str:
    """A parameter name as a ``ParameterDict`` key (no dots)."""
    return name.replace(".", "/")


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
