"""How exactly a pruned model reproduces the masked model, measured against float32 rounding.

Masked and pruned models compute the same function, but not with the same operations: the pruned model folds
soft gates into its weights, merges LoRA (``(W + BA) x`` instead of ``W x + B(A x)``) and sums fewer terms, so
its logits differ from the masked model's by rounding. How far rounding moves the logits depends on the model:
a 1-dim RMSNorm or a residual stream that nearly cancels amplifies one unit in the last place (ulp) 100-1000x.
:func:`rounding_sensitivity` measures that amplification on the masked model itself, which is the scale against
which ``|pruned - masked|`` is judged (the tests, ``benchmarks/pruned_speed.py``, ``benchmarks/exactness_scan.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from tailored.masking import GateHooks
from tailored.structure import GateValues, unwrap

ONE_ULP = 2.0**-23
"""Relative spacing of float32 numbers: one unit in the last place of a number in [1, 2)."""


@torch.no_grad()
def masked_logits(model: nn.Module, gates: GateValues, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[batch, seq, vocab]`` of ``model`` (with or without peft LoRA) masked by ``gates``."""
    hooks = GateHooks(model)
    try:
        with hooks.applied(gates):
            return model(input_ids).logits
    finally:
        hooks.remove()


@torch.no_grad()
def rounding_sensitivity(
    model: nn.Module, gates: GateValues, input_ids: torch.Tensor, trials: int = 3, seed: int = 0
) -> float:
    """How far float32 rounding alone moves the masked logits.

    The largest ``max |logits' - logits|`` over ``trials`` forwards in which the output of the embedding, every
    RMSNorm, every ``o_proj`` and every ``down_proj`` is multiplied by ``1 + u * 2**-23`` with ``u ~ U(-1, 1)``
    per element: at most one ulp of relative noise where rounding happens, and pruned units (zeros) stay zero.
    """
    base = unwrap(model).model
    sites = [base.embed_tokens, base.norm]
    for layer in base.layers:
        sites += [layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn.o_proj, layer.mlp.down_proj]
    reference = masked_logits(model, gates, input_ids)
    generator = torch.Generator(device=reference.device).manual_seed(seed)

    def one_ulp_noise(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        noise = torch.rand(output.shape, generator=generator, device=output.device, dtype=output.dtype)
        return output * (1 + (noise * 2 - 1) * ONE_ULP)

    largest = 0.0
    for _ in range(trials):
        handles = [site.register_forward_hook(one_ulp_noise) for site in sites]
        try:
            largest = max(largest, (masked_logits(model, gates, input_ids) - reference).abs().max().item())
        finally:
            for handle in handles:
                handle.remove()
    return largest
