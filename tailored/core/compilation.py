"""Compiled decoder layers (``model.compile``): each decoder layer's forward ``torch.compile``'d for training steps.

What a layer's graph holds: the layer's own code, peft's LoRA wrappers around its projections, and the gate hooks
of :class:`tailored.core.masking.GateHooks` on ``o_proj``, ``down_proj`` and the norms, which Dynamo traces as part
of the submodule calls. The hooks read their layer's gate rows from an object rather than indexing ``[L, ...]``
tensors by the layer's number (an int is a constant to Dynamo, so every layer would compile its own graph); the
rows are graph inputs, and the layers share one graph, two when the first layer's input needs no gradient (the
frozen embedding's output) and the others' does. Compiled per layer rather than as a whole model so that the
embedding, the final norm, the chunked losses (tailored.core.losses) and FSDP's per-layer units stay outside.

The compiled forwards run only between :meth:`CompiledLayers.activate` and :meth:`CompiledLayers.deactivate`,
which the training step and its backward pass do (tailored.train.module): the other
forwards of a run (the importance pass, validation and test, the decision's masked loss, the fit summary) keep the
eager code. Several of them run with a KV cache, which transformers indexes by the layer's number, so compiling
them would mean one graph per layer, for a small share of a run's time. After the mid-run transition
(tailored.train.transition) the pruned model gets a :class:`CompiledLayers` of its own: its layers are new modules
with other widths, one graph (or two) more.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from tailored.core.structure import unwrap


class CompiledLayers:
    """The decoder layers of ``model`` (a transformers causal LM, peft-wrapped or not), each with a
    ``torch.compile``'d forward used inside :meth:`active`.

    Args:
        model: its decoder layers at ``model.model.layers`` once peft is unwrapped.
        backend: ``torch.compile``'s backend (``inductor``; ``aot_eager`` traces the same graphs without code
            generation, which tests use).

    Example::

        compiled = CompiledLayers(peft_model)
        with compiled.active(), hooks.applied(gates):
            loss = loss_of(peft_model(**batch, use_cache=False))
    """

    def __init__(self, model: nn.Module, backend: str = "inductor") -> None:
        self.layers = list(unwrap(model).model.layers)
        self.forwards = [torch.compile(layer.forward, backend=backend) for layer in self.layers]

    def activate(self) -> None:
        """Every layer runs its compiled forward (an instance attribute over the class's) until
        :meth:`deactivate`. Training keeps them on through ``backward()``: gradient checkpointing re-runs each
        layer's forward there, and it must re-run the compiled one, whose saved tensors it checks."""
        for layer, forward in zip(self.layers, self.forwards, strict=True):
            layer.forward = forward

    def deactivate(self) -> None:
        """Back to the layers' eager forward."""
        for layer in self.layers:
            layer.__dict__.pop("forward", None)

    @contextmanager
    def active(self) -> Iterator[None]:
        """The compiled forwards inside the ``with`` block."""
        self.activate()
        try:
            yield
        finally:
            self.deactivate()
