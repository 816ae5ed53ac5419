"""Checkpoints hold what cannot be reloaded: the trainable state, the structure, the random state, the transition.

The frozen base weights are not written (they are reloaded from ``model`` on resume), so a checkpoint of a
135M-parameter run is a few megabytes. A run resumed past the "prune now" transition replays it from what went
into it (:mod:`tailored.train.transition`), and continues with the gate noise the killed run would have drawn.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from tailored.core.structure import GateValues

LEGACY_TEACHER_PREFIX = "teacher."
"""Checkpoints of tailored 0.1 also hold the frozen teacher's adapters under this prefix (peft had made them
trainable again); they are ignored on load."""


def trainable_state_keys(module: nn.Module) -> set[str]:
    """State-dict keys that a checkpoint holds: trainable parameters and the gates' buffers."""
    keys = {name for name, p in module.named_parameters() if p.requires_grad}
    return keys | {name for name, _ in module.named_buffers() if name.startswith("gates.")}


def slim(module, checkpoint: dict) -> None:
    """Drop the frozen base weights from ``checkpoint`` and add what a resume needs beside the trainable state."""
    keep = trainable_state_keys(module)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
    checkpoint["tailored_structure"] = None if module.structure is None else asdict(module.structure)
    checkpoint["tailored_rng"] = random_state()
    checkpoint["tailored_transition"] = module.transition
    checkpoint["tailored_decision"] = {
        "decision": module.decision,
        "settling": None if module.settling is None else module.settling.state_dict(),
    }


def restore(module, checkpoint: dict) -> None:
    """Build ``module``'s model, replay its transition, and check that ``checkpoint`` fits it (``ValueError``)."""
    module.configure_model()
    module.checkpoint_step = checkpoint.get("global_step", 0)
    module.resumed_random_state = checkpoint.get("tailored_rng")
    saved = checkpoint.get("tailored_structure")
    if saved is not None and (module.structure is None or saved != asdict(module.structure)):
        raise ValueError(
            f"the checkpoint was written for a model of structure {saved}, but {module.model_name} has "
            f"{None if module.structure is None else asdict(module.structure)}; resume with the model the run "
            "started with"
        )
    decision = checkpoint.get("tailored_decision") or {}
    module.decision = decision.get("decision")
    if module.settling is not None and decision.get("settling") is not None:
        module.settling.load_state_dict(decision["settling"])
    transition = checkpoint.get("tailored_transition")
    if transition is not None and not module.pruned_now:  # replay the transition: the same pruned model again
        module.gates.freeze(GateValues(**transition["gates"]))
        module.prune_now(transition["step"], adapters=transition["adapters"])
    checkpoint["state_dict"] = {
        key: value for key, value in checkpoint["state_dict"].items() if not key.startswith(LEGACY_TEACHER_PREFIX)
    }
    multipliers = checkpoint["state_dict"].get("gates.lambda_1")
    if multipliers is not None and multipliers.shape != module.gates.lambda_1.shape:
        raise ValueError(
            f"the checkpoint's sparsity target has {multipliers.numel()} constraints, this run's "
            f"{module.gates.lambda_1.numel()}: it was written with another pruning.allocation (runs of tailored 0.1 "
            "used proportional); resume with the config the checkpoint was written with"
        )
    expected, found = trainable_state_keys(module), set(checkpoint["state_dict"])
    if expected != found:
        missing, extra = sorted(expected - found)[:3], sorted(found - expected)[:3]
        raise ValueError(
            f"the checkpoint does not match this run's LoRA/pruning settings (missing {missing}, unexpected "
            f"{extra}); resume with the config the checkpoint was written with"
        )


LEGACY_ALLOCATION = "proportional"
"""What runs of tailored 0.1, whose settings predate ``pruning.allocation``, pruned to."""


def predates_allocation(checkpoint: dict) -> bool:
    """The checkpoint's pruning settings were saved before ``pruning.allocation`` existed (tailored 0.1)."""
    pruning = checkpoint.get("hyper_parameters", {}).get("pruning")
    return isinstance(pruning, dict) and "allocation" not in pruning


def upgraded(path, map_location=None):
    """``path``, or, for a checkpoint of tailored 0.1, the checkpoint in memory with its allocation filled in
    (:data:`LEGACY_ALLOCATION`). A sharded folder, or a checkpoint already in memory (a file object), is returned
    as it is."""
    if not isinstance(path, str | os.PathLike) or Path(path).is_dir():
        return path
    checkpoint = torch.load(path, map_location=map_location or "cpu", weights_only=False)
    if not predates_allocation(checkpoint):
        return path
    checkpoint["hyper_parameters"]["pruning"]["allocation"] = LEGACY_ALLOCATION
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return buffer


def random_state() -> dict:
    """The torch random number generators' state (CPU, and every GPU's): the gate noise of the next steps."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_random_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
