"""The optimiser: AdamW with one group per kind of trainable parameter, sizes printed; the tuned weights' learning
rate schedule."""

from __future__ import annotations

import math

import torch

from tailored.train.settings import OptimizerSettings


def optimizer_groups(module, settings: OptimizerSettings) -> list[dict]:
    """Parameter groups of ``module``: the tuned weights (adapters, or every weight after pruning with
    ``recovery_weights: all``), the corrected teacher's adapters, the gate logits (or generator) and the Lagrange
    multipliers (gradient ascent). Raises ``RuntimeError`` if a trainable parameter is in none."""
    tuned = [p for p in module.model.parameters() if p.requires_grad]
    every_weight = module.pruned_now and module.pruning_settings.recovery_weights == "all"
    lr = settings.weights_lr if every_weight else settings.lora_lr
    groups = [{"name": "tuned", "params": tuned, "lr": lr, "peak_lr": lr, "weight_decay": settings.weight_decay}]
    if module.corrected_teacher is not None:
        teacher = list(module.corrected_teacher.parameters())
        lr = settings.lora_lr
        groups.append({"name": "teacher", "params": teacher, "lr": lr, "peak_lr": lr, "weight_decay": 0.0})
    if module.target is not None:
        gates = module.gates
        multipliers = [gates.lambda_1, gates.lambda_2]
        gate_params = [p for name, p in gates.named_parameters() if not name.startswith("lambda_")]
        gates_lr = settings.generator_lr if module.pruning_settings.logits == "generator" else settings.gates_lr
        groups.append({"name": "gates", "params": gate_params, "lr": gates_lr, "weight_decay": 0.0})
        groups.append(
            {"name": "multipliers", "params": multipliers, "lr": settings.multipliers_lr, "weight_decay": 0.0}
        )
    grouped = {id(p) for group in groups for p in group["params"]}
    stray = [name for name, p in module.named_parameters() if p.requires_grad and id(p) not in grouped]
    if stray:
        raise RuntimeError(f"trainable parameters outside the optimiser groups: {stray[:5]}")
    return groups


def build_optimizer(module, settings: OptimizerSettings) -> torch.optim.Optimizer:
    """AdamW over :func:`optimizer_groups`; prints each group's size."""
    groups = optimizer_groups(module, settings)
    for group in groups:
        count = sum(p.numel() for p in group["params"])
        print(f"optimiser group {group['name']:<12} {len(group['params']):>5} tensors {count:>12,} parameters")
    return torch.optim.AdamW(groups)


FINAL_LR_RATIO = 0.1
"""Where ``cosine`` ends, as a share of the peak rate (Llama 2's pretraining schedule ends at 10%:
Touvron et al. 2023, "Llama 2", section 2.2)."""


def learning_rate_factor(step: int, max_steps: int, settings: OptimizerSettings, decay_start: int | None) -> float:
    """The share of its peak rate that the tuned weights train with at ``step`` (0-based) of ``max_steps``: a
    linear warm-up ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then 1 (``constant``, and
    ``cosine`` before ``decay_start``), or from ``decay_start`` on ``r + (1 - r) * (1 + cos(pi * t)) / 2``
    (``cosine``, ``r`` = :data:`FINAL_LR_RATIO`, ``t`` the share of the steps from ``decay_start`` that are done;
    Loshchilov & Hutter 2017, "SGDR", one cycle). ``decay_start``: the step from which the final model is tuned
    (None: not known yet). A function of the step and of that step alone: a resumed run, and the optimiser rebuilt
    at the "prune now" transition, follow the same curve."""
    warmup = settings.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if settings.schedule == "constant" or decay_start is None or step < decay_start:
        return 1.0
    start = max(decay_start, warmup)
    done = (step - start) / max(max_steps - 1 - start, 1)
    return FINAL_LR_RATIO + (1 - FINAL_LR_RATIO) * (1 + math.cos(math.pi * min(done, 1.0))) / 2


def scale_learning_rates(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set each scheduled group's rate (those with a ``peak_lr``: the tuned weights, a corrected teacher's
    adapters) to ``factor`` times its peak; the gates and multipliers keep theirs."""
    for group in optimizer.param_groups:
        if "peak_lr" in group:
            group["lr"] = group["peak_lr"] * factor
