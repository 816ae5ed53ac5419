"""The "prune now" transition: from a masked model to the smaller model it computes, mid-run.

    dense model + LoRA + gates  ──merge LoRA, fold gates, slice (tailored.core.prune)──►  smaller model
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

from tailored.core.importance import unit_scores
from tailored.core.prune import prune_model
from tailored.core.structure import GateValues


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


def check_adapters(model: nn.Module, adapters: dict) -> None:
    """Raise a ``ValueError`` unless ``adapters`` (a checkpoint's pre-transition LoRA tensors) fit ``model``."""
    names = {name for name, _ in model.named_parameters()}
    missing = {name for name in names if "lora_" in name} - set(adapters)
    unexpected = set(adapters) - names
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint's pre-transition adapters do not fit this model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); resume with the config the checkpoint was written with"
        )


def importance_scores(module, criterion: str) -> GateValues:
    """Scores of every unit of ``module``'s model under ``criterion`` (taylor: on ``pruning.calibration_batches``
    training batches of its datamodule), on the module's device: what a baseline prunes by, or the gates start from."""
    data, device = module.trainer.datamodule, module.device
    batches = []
    if criterion == "taylor":
        loader = data.calibration_loader(module.pruning_settings.calibration_batches)
        batches = [{key: value.to(device) for key, value in batch.items()} for batch in loader]
    scores = unit_scores(criterion, module.model, batches, seed=data.seed)
    return GateValues(**{name: value.to(device) for name, value in scores.items()})
