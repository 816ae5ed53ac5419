"""The training step's forward and losses without the ``[B, T, V]`` logits.

The causal LM loss and the distillation KL (docs/method.md, "Distillation") need the vocabulary's logits only at the
positions that predict a counted token (``labels[p + 1] != -100``): the answer tokens of instruction tasks, every
position of a language-modelling block. So the step runs the model to its final norm, takes the hidden states of
those positions, and applies ``lm_head`` a chunk at a time::

    positions  flat indices p of [B * T] that predict a counted token     [N]      (tailored.data.packing, on the host)
    h          final hidden states at positions                           [N, d]
    logits     lm_head(h[chunk]), C rows at a time                        [C, V]   never [N, V], nor [B, T, V]

:class:`HeadLosses` computes the losses and their gradients with respect to ``h`` (and ``W`` when it trains) chunk by
chunk in the forward pass, so the backward pass holds no logits either and recomputes nothing: the head costs a few
``[C, V]`` float32 temporaries. The values are the Hugging Face loss's and the former full-logit KL's, to float
rounding:

    L_lm = mean_p  -log softmax(z_p)[y_p]                                 z = h W^T in the model's dtype, then float32
    L_kd = T^2 * mean_p  KL( softmax(t_p / T) || softmax(z_p / T) )       t: the teacher's logits, its own h and W

Packed rows (tailored.data.packing) hold several examples, their position ids restarting at each; their attention
stays inside each example through a block-diagonal causal mask built here on the device from the position ids
(:func:`packed_attention_mask`), for the attention implementations that take a 4D mask, so transformers need not
infer the blocks (which reads a device value back). Flash attention reads the position ids itself.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from tailored.core.structure import unwrap

CHUNK_ELEMENTS = 2**22
"""Logits per chunk (16 MiB in float32): ``C = CHUNK_ELEMENTS // V`` positions (85 for SmolLM2's 49,152 tokens, 32
for Llama 3's 128,256); distillation holds about seven such temporaries at once."""
MASKED_ATTENTION = ("sdpa", "eager")
"""Attention implementations given packed rows as a 4D block-diagonal mask (boolean for sdpa, additive for eager)."""
PACKED_ATTENTION = (*MASKED_ATTENTION, "flash_attention_2", "flash_attention_3", "flex_attention")
"""Attention implementations that keep packed examples apart: the masked ones, and those transformers gives the
per-example position ids (varlen flash attention, flex attention's block mask)."""
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
"""The keys of a training batch that the model reads (the others: labels, loss_positions, loss_targets)."""


def packed_attention_mask(position_ids: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The 4D attention mask of packed rows: a position sees the earlier positions of its own example only.

    Args:
        position_ids: ``[R, T]``, restarting at 0 with every example (and with a row's padding tail).
        implementation: ``sdpa`` (boolean mask, True = attend) or ``eager`` (additive: 0 or the dtype's minimum).
        dtype: the model's dtype (the eager mask's).
    Returns:
        ``[R, 1, T, T]``.
    """
    example = (position_ids == 0).cumsum(-1)  # [R, T]: which example of its row each position belongs to
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    mask = (example[:, :, None] == example[:, None, :]) & causal  # [R, T, T]
    if implementation == "eager":
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        return additive[:, None]
    return mask[:, None]


def final_hidden_states(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The final norm's output ``[B, T, d]`` for ``batch``, through the model's own forward (FSDP's root unit, peft
    and the gate hooks run as for the logits) with logits for no position (``logits_to_keep`` empty).

    A packed batch (``position_ids`` and no ``attention_mask``) gets :func:`packed_attention_mask` when the
    model's attention takes a 4D mask; other implementations (flash attention) read the position ids, which
    transformers does only without a cache (with one, the default, it would let the examples of a row attend to each
    other): the forward runs without, as training needs none.
    """
    inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
    base = unwrap(model)
    implementation = base.config._attn_implementation
    if "position_ids" in inputs and "attention_mask" not in inputs:
        if implementation not in PACKED_ATTENTION:
            kinds = ", ".join(PACKED_ATTENTION)
            raise ValueError(
                f"packed batches need an attention that keeps the examples of a row apart ({kinds}); this model "
                f"uses {implementation!r}: set data.packing false"
            )
        if implementation in MASKED_ATTENTION:
            inputs["attention_mask"] = packed_attention_mask(inputs["position_ids"], implementation, base.dtype)
    captured = []
    handle = base.model.norm.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        nothing = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
        model(**inputs, use_cache=False, logits_to_keep=nothing)
    finally:
        handle.remove()
    return captured[-1]


def output_head(model: nn.Module) -> nn.Linear:
    """The ``lm_head`` of ``model`` (peft-wrapped or not): weight ``[V, d]``, the embedding's when tied."""
    return unwrap(model).get_output_embeddings()


def at_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``hidden [B, T, d]`` at flat ``positions [N]``: ``[N, d]``."""
    return hidden.flatten(0, 1).index_select(0, positions)


class HeadLosses(torch.autograd.Function):
    """``(L_lm, L_kd)`` from the hidden states, chunk by chunk (module docstring); gradients computed in the forward.

    ``forward(hidden [N, d], weight [V, d], targets [N], head, teacher_hidden [N, d_t] | None, teacher_head | None,
    temperature, chunk)``; ``L_kd`` is 0 without a teacher, which is constant (no gradient). The logits come from the
    ``head`` modules (``weight`` is ``head``'s, an input so that it gets a gradient when it trains), so forward hooks
    on them act as in the model's own forward (e.g. a logit mask); a masked logit's gradient is then 0 here too.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, head, teacher_hidden, teacher_head, temperature, chunk):
        count, losses = hidden.shape[0], 1 if teacher_hidden is None else 2
        needed = ctx.needs_input_grad[:2]
        wanted = [tensor if need else None for tensor, need in zip((hidden, weight), needed, strict=True)]
        sums = hidden.new_zeros(2, dtype=torch.float32)  # the summed LM loss and KL
        grads = [[None if tensor is None else torch.zeros_like(tensor) for tensor in wanted] for _ in range(losses)]
        for start in range(0, count, chunk):
            rows = slice(start, start + chunk)
            h, y = hidden[rows], targets[rows]
            logits = head(h).float()  # [C, V]
            sums[0] += F.cross_entropy(logits, y, reduction="sum")
            d_lm = logits.softmax(-1)
            d_lm[torch.arange(len(y), device=y.device), y] -= 1  # d(sum of -log p_y)/d logits
            d_logits = [d_lm / count]
            if losses == 2:
                student = F.log_softmax(logits / temperature, -1)
                teacher = F.log_softmax(teacher_head(teacher_hidden[rows]).float() / temperature, -1)
                teacher_probabilities = teacher.exp()
                sums[1] += (teacher_probabilities * (teacher - student)).sum()
                d_logits.append((student.exp() - teacher_probabilities) * (temperature / count))  # of T^2 * mean KL
            for (d_hidden, d_weight), d in zip(grads, d_logits, strict=True):
                d = d.to(weight.dtype)
                if d_hidden is not None:
                    d_hidden[rows] = d @ weight
                if d_weight is not None:
                    d_weight += d.T @ h
        ctx.grads = grads
        lm = sums[0] / count  # nan without a counted position, as the Hugging Face loss
        kd = sums[1] * temperature**2 / max(count, 1)
        return lm, kd

    @staticmethod
    def backward(ctx, d_lm, d_kd):
        scales = (d_lm, d_kd)[: len(ctx.grads)]
        pairs = list(zip(ctx.grads, scales, strict=True))  # each loss's gradients and its incoming gradient
        d_hidden, d_weight = (
            None
            if ctx.grads[0][index] is None
            else sum(grads[index] * scale.to(grads[index].dtype) for grads, scale in pairs)
            for index in range(2)
        )
        return d_hidden, d_weight, None, None, None, None, None, None


def head_losses(
    hidden: torch.Tensor,
    head: nn.Linear,
    targets: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: nn.Linear | None = None,
    temperature: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM loss and the distillation KL (0 without a teacher) of :class:`HeadLosses`.

    Args:
        hidden: ``[N, d]`` the student's final hidden states at the predicting positions (:func:`at_positions`).
        head: its ``lm_head`` (:func:`output_head`), weight ``[V, d]``.
        targets: ``[N]`` the tokens those positions predict.
        teacher_hidden, teacher_head: ``[N, d_t]`` and the teacher's ``lm_head`` (``d_t`` may differ from ``d``: a
            pruned student's hidden size); no gradient reaches them.
        temperature: T of the KL.
    Returns:
        Two scalars: ``L_lm`` and ``L_kd``.
    """
    weight = head.weight
    chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
    teacher = None if teacher_hidden is None else teacher_hidden.detach()
    return HeadLosses.apply(hidden, weight, targets, head, teacher, teacher_head, temperature, chunk)
