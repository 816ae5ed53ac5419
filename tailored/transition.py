"""The "prune now" transition: from a masked model to the smaller model it computes, mid-run.

    dense model + LoRA + gates  ──merge LoRA, fold gates, slice (tailored.prune)──►  smaller model
                                ──attach fresh LoRA──►  keep training the smaller model

Two uses share it. The two-stage baselines (LLM-Pruner style) score units, prune once at step 0 and tune the
smaller model for the rest of the budget. The one-stage method prunes when its gates freeze (the start of its
recovery phase), so recovery tunes the model that will be exported, at the smaller model's speed.

It is deterministic: the same dense model, adapters and gates give the same smaller model. Resuming a run past the
transition therefore stores only what went into it (the adapters and the frozen gates) and replays it.
"""

from __future__ import annotations

from peft import LoraConfig, get_peft_model
from torch import nn

from tailored.prune import prune_model
from tailored.structure import GateValues


def lora_state(model: nn.Module) -> dict:
    """A copy of the LoRA adapter tensors of a peft model, keyed by parameter name."""
    return {name: value.detach().clone() for name, value in model.named_parameters() if "lora_" in name}


def prune_now(
    model: nn.Module,
    gates: GateValues,
    lora_config: LoraConfig | None,
    gradient_checkpointing: bool = False,
) -> nn.Module:
    """The smaller model that ``model`` computes under deterministic ``gates``, with fresh LoRA adapters.

    ``model`` (peft-wrapped, maybe with trained adapters) is left unchanged and can serve as a teacher. The new
    adapters start at zero (peft's ``B = 0``), so right after the transition the new model computes exactly what
    the masked one did; its base weights are frozen. With ``lora_config`` None every weight of the smaller model
    trains instead (no adapters).
    """
    pruned = prune_model(model, gates)
    pruned.requires_grad_(lora_config is None)
    pruned.train(model.training)
    if gradient_checkpointing:
        pruned.gradient_checkpointing_enable()
        pruned.enable_input_require_grads()
    return pruned if lora_config is None else get_peft_model(pruned, lora_config)
