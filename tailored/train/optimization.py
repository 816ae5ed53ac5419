"""The optimiser: AdamW with one group per kind of trainable parameter, sizes printed."""

from __future__ import annotations

import torch

from tailored.train.settings import OptimizerSettings


def optimizer_groups(module, settings: OptimizerSettings) -> list[dict]:
    """Parameter groups of ``module``: the tuned weights (adapters, or every weight after pruning with
    ``recovery_weights: all``), the corrected teacher's adapters, the gate logits (or generator) and the Lagrange
    multipliers (gradient ascent). Raises ``RuntimeError`` if a trainable parameter is in none."""
    tuned = [p for p in module.model.parameters() if p.requires_grad]
    every_weight = module.pruned_now and module.pruning_settings.recovery_weights == "all"
    lr = settings.weights_lr if every_weight else settings.lora_lr
    groups = [{"name": "tuned", "params": tuned, "lr": lr, "weight_decay": settings.weight_decay}]
    if module.corrected_teacher is not None:
        teacher = list(module.corrected_teacher.parameters())
        groups.append({"name": "teacher", "params": teacher, "lr": settings.lora_lr, "weight_decay": 0.0})
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
