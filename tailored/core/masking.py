"""The masked forward: gate values applied to an unmodified transformers model through forward hooks.

Where each gate acts (layer l; ``*`` is a broadcast product over the last dim)::

    embed_tokens ──► out * z_hidden
    o_proj       ──► in * repeat(z_groups[l], n_rep*dh)    out * z_attn[l] * z_layer[l] * any(z_groups[l]) * z_hidden
    down_proj    ──► in * z_channels[l]                    out * z_mlp[l] * z_layer[l] * any(z_channels[l]) * z_hidden
    every [d] RMSNorm ─► normalises over the kept hidden dims only (below)

Why hooks: they touch activations, not weights, so nothing in transformers' source changes, no weight copy is
made per step (a parametrisation would rebuild every masked weight each forward), and they sit on whatever module
is at ``o_proj``/``down_proj``: with peft attached that is the LoRA wrapper, so the gate multiplies the whole
projection ``(W + BA) x`` (the first LoRA-aware variant of docs/method.md#section-6). Merging LoRA and then slicing is
therefore exact. Attach the hooks *after* peft wraps the model.

RMSNorm over kept dims: the pruned model normalises by ``mean`` over d' kept dims; the masked model's stream is 0
on the pruned dims, and the stock norm divides by d. Scaling the norm's input by ``c = sqrt(d / d')`` and its output
by ``1 / c`` gives ``w * x / sqrt(sum(x^2) / d' + eps)`` exactly, with the stock norm code.

Qwen3's per-head ``q_norm``/``k_norm`` need no hook: they read one head's ``q_proj``/``k_proj`` output, which is the
pruned model's exactly (pruned hidden dims are 0 at the projection's input), and a removed KV group's heads are
cut off at ``o_proj``'s input.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from tailored.core.structure import GateValues, ModelStructure, check_gate_shapes, describe, unwrap


class GateHooks:
    """Forward hooks that apply :class:`GateValues` to a LLaMA-family model while :meth:`applied` is active.

    Outside :meth:`applied` (or :meth:`activate` ... :meth:`deactivate`) the hooks pass activations through
    unchanged (the dense model).

    Example::

        hooks = GateHooks(peft_model)
        with hooks.applied(gates.sample()):
            loss = peft_model(**batch).loss
    """

    def __init__(self, model: nn.Module) -> None:
        self.structure: ModelStructure = describe(model)
        self._values: _ActiveGates | None = None
        base = unwrap(model)
        self._embedding = base.model.embed_tokens  # its weight's device is where the activations are
        self._handles = [base.model.embed_tokens.register_forward_hook(self._scale_embedding)]
        self._layers = [_LayerGates() for _ in base.model.layers]
        for layer, gates in zip(base.model.layers, self._layers, strict=True):
            attn_out, mlp_out = layer.self_attn.o_proj, layer.mlp.down_proj
            self._handles += [
                attn_out.register_forward_pre_hook(gates.gate_input("group_input")),
                attn_out.register_forward_hook(gates.gate_output("attn_output")),
                mlp_out.register_forward_pre_hook(gates.gate_input("channels")),
                mlp_out.register_forward_hook(gates.gate_output("mlp_output")),
            ]
        for norm in [base.model.norm] + [n for layer in base.model.layers for n in _layer_norms(layer)]:
            self._handles += [
                norm.register_forward_pre_hook(self._scale_norm_input),
                norm.register_forward_hook(self._scale_norm_output),
            ]

    @contextmanager
    def applied(self, gates: GateValues) -> Iterator[None]:
        """Apply ``gates`` to every forward pass inside the ``with`` block (gradients flow into them)."""
        self.activate(gates)
        try:
            yield
        finally:
            self.deactivate()

    def activate(self, gates: GateValues, hidden_gated: bool | None = None) -> None:
        """Apply ``gates`` until :meth:`deactivate`. Training keeps them active through ``backward()``: gradient
        checkpointing re-runs each layer's forward there, and it must re-run the masked one.

        Gates on another device than the model (CPU gates, a GPU model) are moved to the model's device.
        ``hidden_gated``: whether the hidden dims have gates of their own (false: ``gates.hidden`` is all ones), so
        that a training step need not read the hidden gates back from the device; None reads them.
        """
        check_gate_shapes(self.structure, gates)
        device = self._embedding.weight.device
        self._values = _ActiveGates(self.structure, gates.map(lambda value: value.to(device)), hidden_gated)
        for index, layer in enumerate(self._layers):
            layer.activate(self._values, index)

    def deactivate(self) -> None:
        """Back to the dense forward."""
        self._values = None
        for layer in self._layers:
            layer.deactivate()

    def remove(self) -> None:
        """Detach every hook from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # Hooks. Each reads the active gates; gate tensors are cast to the activation's dtype so that a bf16 model
    # stays bf16.

    def _scale_embedding(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self._values is None or self._values.hidden is None:
            return None
        return output * self._values.hidden.to(output.dtype)

    def _scale_norm_input(self, module: nn.Module, args: tuple) -> tuple | None:
        if self._values is None or self._values.norm_scale is None:
            return None
        return (args[0] * self._values.norm_scale, *args[1:])

    def _scale_norm_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self._values is None or self._values.norm_scale is None:
            return None
        return output / self._values.norm_scale


class _LayerGates:
    """One decoder layer's rows of the active :class:`_ActiveGates` (None while the hooks pass through), read by
    that layer's hooks. The hooks hold this object, not the layer's index: ``torch.compile`` treats an int it reads
    as a constant, so an index would compile every layer's code once per layer; tensors read from this object are
    graph inputs, and every layer shares one graph."""

    ROWS = ("group_input", "channels", "attn_output", "mlp_output")

    def __init__(self) -> None:
        self.deactivate()

    def activate(self, values: _ActiveGates, index: int) -> None:
        for name in self.ROWS:
            setattr(self, name, getattr(values, name)[index])

    def deactivate(self) -> None:
        self.group_input = self.channels = self.attn_output = self.mlp_output = None

    def gate_input(self, name: str):
        """A forward pre-hook multiplying the module's input by this layer's row ``name`` (``[H*dh]`` or ``[f]``)."""

        def hook(module: nn.Module, args: tuple) -> tuple | None:
            gate = getattr(self, name)
            if gate is None:
                return None
            return (args[0] * gate.to(args[0].dtype), *args[1:])

        return hook

    def gate_output(self, name: str):
        """A forward hook multiplying the module's output by this layer's row ``name`` (``[d]`` or ``[1]``)."""

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            scale = getattr(self, name)
            if scale is None:
                return None
            return output * scale.to(output.dtype)

        return hook


class _ActiveGates:
    """The per-forward products of the gates, computed once per :meth:`GateHooks.applied`.

    ``group_input [L, H*dh]``, ``channels [L, f]``, ``attn_output, mlp_output [L, d]`` (or ``[L, 1]`` when no
    hidden dim is gated), ``hidden [d]`` or None, ``norm_scale`` = sqrt(d / d') (a float, or a device scalar when
    the caller says the hidden dims are gated) or None when every dim is kept.
    """

    def __init__(self, structure: ModelStructure, gates: GateValues, hidden_gated: bool | None = None) -> None:
        per_head_dim = structure.n_rep * structure.head_dim
        self.group_input = gates.groups.repeat_interleave(per_head_dim, dim=-1)
        self.channels = gates.channels
        if hidden_gated is None:  # read the values (on a GPU: wait for them)
            hidden_kept = int((gates.hidden > 0).sum())
            if hidden_kept == 0:
                raise ValueError("every hidden dim is gated to 0: the model would output nothing")
            all_hidden = hidden_kept == structure.hidden_size and bool((gates.hidden == 1).all())
            self.hidden = None if all_hidden else gates.hidden
            all_dims = hidden_kept == structure.hidden_size
            self.norm_scale = None if all_dims else math.sqrt(structure.hidden_size / hidden_kept)
        else:  # told: the scale stays a device scalar (exactly 1 when every dim is kept)
            self.hidden = gates.hidden if hidden_gated else None
            kept = (gates.hidden > 0).sum()
            self.norm_scale = (structure.hidden_size / kept).sqrt() if hidden_gated else None
        hidden = gates.hidden if self.hidden is not None else gates.hidden.new_ones(1)
        # a block whose every unit is 0 is removed by surgery, bias included, so it must output 0 here too
        attn_present = (gates.groups > 0).any(-1).to(gates.attn.dtype)
        mlp_present = (gates.channels > 0).any(-1).to(gates.mlp.dtype)
        self.attn_output = (gates.attn * gates.layers * attn_present)[:, None] * hidden
        self.mlp_output = (gates.mlp * gates.layers * mlp_present)[:, None] * hidden


def _layer_norms(layer: nn.Module) -> list[nn.Module]:
    """The RMSNorms of a layer over the hidden dims (not Qwen3's per-head q_norm/k_norm)."""
    return [layer.input_layernorm, layer.post_attention_layernorm]
