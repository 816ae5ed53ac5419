"""tailored: one-stage structured pruning + LoRA for LLaMA-family models.

The pieces, each usable alone::

    core.structure.describe(model)        what is prunable (KV groups, MLP channels, blocks, layers, hidden dims)
    core.gates.PruningGates(structure)    every hard-concrete gate in one module
    masking.GateHooks(model)           the masked forward on an unmodified transformers model (+ peft LoRA)
    prune.prune_model(model, gates)    surgery: a smaller model that computes the same logits
    export.save_pruned / load_pruned   Hugging Face folders with a JSON report
"""

from tailored.core.export import load_pruned, pruning_report, save_pruned
from tailored.core.gates import PruningGates
from tailored.core.masking import GateHooks
from tailored.core.prune import prune_model
from tailored.core.structure import GateValues, UnsupportedModelError, describe

__all__ = [
    "GateHooks",
    "GateValues",
    "PruningGates",
    "UnsupportedModelError",
    "describe",
    "load_pruned",
    "prune_model",
    "pruning_report",
    "save_pruned",
]
