"""Every LoRA helper in one place: the projections adapted, the adapter tensors, merging them into the weights.

Adapters are peft's (``lora_A`` / ``lora_B`` on the projections of every decoder layer); the base weights stay
frozen and the update of a projection is ``B A x * alpha / r`` (Hu et al. 2021).
"""

from __future__ import annotations

import copy

from peft import LoraConfig
from torch import nn

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""The projections of a LLaMA-family decoder layer that can carry adapters."""


def lora_config(rank: int, alpha: float, dropout: float, targets: list[str]) -> LoraConfig:
    """peft's configuration of adapters of rank ``rank`` on the ``targets`` projections."""
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)


def lora_state(model: nn.Module) -> dict:
    """A copy of the LoRA adapter tensors of a peft model, keyed by parameter name."""
    return {name: value.detach().clone() for name, value in model.named_parameters() if "lora_" in name}


def adapter_key(name: str) -> str:
    """A parameter name as a ``ParameterDict`` key (no dots)."""
    return name.replace(".", "/")


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its LoRA adapters merged into the weights, in eval mode (``model`` is unchanged)."""
    return merged(copy.deepcopy(model))


def merged(model: nn.Module) -> nn.Module:
    """``model`` with its LoRA adapters merged into its weights in place, unwrapped, in eval mode."""
    return (model.merge_and_unload() if hasattr(model, "merge_and_unload") else model).eval()
