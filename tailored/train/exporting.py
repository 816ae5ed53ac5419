"""The end of a run: the model the gates describe, pruned and merged, saved with its report and model card.

Used by the export callback when ``fit`` ends and by ``tailored export`` on any checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from tailored.core.export import pruning_report, save_pruned
from tailored.core.lora import merged, merged_copy
from tailored.core.prune import prune_model
from tailored.core.structure import parameter_count
from tailored.core.targets import prunable_fraction
from tailored.core.vocabulary import trim_model, trimmed_tokenizer
from tailored.models import load_tokenizer
from tailored.train.summary import write_card


@torch.no_grad()
def export_run(module, path: str | Path, overwrite: bool = False, model: nn.Module | None = None) -> dict:
    """Prune ``module``'s model with its final gates (merging LoRA), trim its vocabulary to the run's kept tokens
    (``pruning.vocabulary``), save model + tokenizer + report + model card (without metrics) to ``path``; return
    the report.

    ``model``: an unsharded copy of the module's model to export instead, merged or pruned without a further copy
    (FSDP: :func:`tailored.train.sharding.gathered_model`).
    """
    source, merge = (module.model, merged_copy) if model is None else (model, merged)
    tokenizer = load_tokenizer(module.model_name)
    trained_steps = max(module.global_step, module.checkpoint_step)  # no trainer after load_from_checkpoint
    if module.structure is None:  # a non-uniform export, tuned as it is: merge the adapters, nothing to prune
        pruned = merge(source)
        count = sum(parameter.numel() for parameter in pruned.parameters())
        report = {"source_model": module.model_name, "format": "tailored", "parameters": {"after": count}}
        report["trained_steps"] = trained_steps
        save_pruned(pruned, path, tokenizer=tokenizer, report=report, overwrite=overwrite)
        write_card(path, report, task_names(module))
        return report
    gates = module.final_gates().map(lambda value: value.detach().float())
    # already pruned (maybe a tailored_* layout), or a gathered copy that keeps every unit: merge the adapters
    nothing_to_prune = module.pruned_now or (model is not None and module.target is None)
    pruned = merge(source) if nothing_to_prune else prune_model(source, gates)
    kept = module.kept_tokens
    if kept is not None:  # pruning.vocabulary: the same export keeps the domain's rows and a rebuilt tokenizer
        pruned, tokenizer = trim_model(pruned, kept), trimmed_tokenizer(tokenizer, kept)
    report = pruning_report(module.structure, gates, module.model_name, None if kept is None else len(kept))
    if module.target is not None:
        target = module.target
        report["method"] = module.pruning_settings.method
        report["target"] = {
            "fraction_of_prunable": target.fraction,
            "shape": asdict(target.shape) if target.shape else None,
        }
        count = parameter_count(module.structure, gates.kept())
        report["kept_fraction_of_prunable"] = float(prunable_fraction(module.structure, target.prune, count))
        report["allocation"] = "learned" if target.tied else "per layer" if target.shape is None else "fixed shape"
        report["decision"] = module.decision
    report["trained_steps"] = trained_steps
    save_pruned(pruned, path, tokenizer=tokenizer, report=report, overwrite=overwrite)
    write_card(path, report, task_names(module))  # no metrics here: the end of fit rewrites it with them
    return report


def task_names(module) -> list[str]:
    """The names of the tasks the module was set up with (none after ``load_from_checkpoint``)."""
    return [task.name for task in getattr(module, "tasks", [])]
