"""How exactly a pruned model reproduces the masked model, measured against the rounding of the model's dtype.

Masked and pruned models compute the same function, but not with the same operations: the pruned model folds
soft gates into its weights, merges LoRA (``(W + BA) x`` instead of ``W x + B(A x)``) and sums fewer terms, so
its logits differ from the masked model's by rounding. How far rounding moves the logits depends on the model:
a 1-dim RMSNorm or a residual stream that nearly cancels amplifies one unit in the last place (ulp) 100-1000x.
:func:`rounding_sensitivity` measures that amplification on the masked model itself, which is the scale against
which ``|pruned - masked|`` is judged (the tests, ``benchmarks/speed/pruned_speed.py``,
``benchmarks/speed/exactness_scan.py``).
A bf16 model is judged the same way, with bf16's ulp (2**-7 instead of 2**-23; ``tests/test_bf16.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from tailored.core.masking import GateHooks
from tailored.core.prune import compute_dtype
from tailored.core.structure import GateValues, unwrap


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
    """How far rounding in the model's dtype alone moves the masked logits.

    The largest ``max |logits' - logits|`` over ``trials`` forwards in which the output of the embedding, every
    RMSNorm, every ``o_proj`` and every ``down_proj`` is multiplied by ``1 + u * eps`` with ``u ~ U(-1, 1)`` per
    element and ``eps`` the spacing of the output's dtype (2**-23 float32, 2**-7 bf16), computed in float32 and
    rounded once: about one ulp of relative noise where rounding happens, and pruned units (zeros) stay zero.
    """
    base = unwrap(model).model
    sites = [base.embed_tokens, base.norm]
    for layer in base.layers:
        sites += [layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn.o_proj, layer.mlp.down_proj]
    reference = masked_logits(model, gates, input_ids)
    generator = torch.Generator(device=reference.device).manual_seed(seed)

    def one_ulp_noise(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        wide = compute_dtype(output.dtype)
        noise = torch.rand(output.shape, generator=generator, device=output.device, dtype=wide)
        return (output.to(wide) * (1 + (noise * 2 - 1) * torch.finfo(output.dtype).eps)).to(output.dtype)

    largest = 0.0
    for _ in range(trials):
        handles = [site.register_forward_hook(one_ulp_noise) for site in sites]
        try:
            largest = max(largest, (masked_logits(model, gates, input_ids) - reference).abs().max().item())
        finally:
            for handle in handles:
                handle.remove()
    return largest
