"""Save a pruned model as a Hugging Face folder with its tokenizer and a JSON report; load it back.

A folder written by :func:`save_pruned`::

    config.json, model.safetensors, generation_config.json     what from_pretrained reads
    tokenizer files                                            when a tokenizer was given
    modeling_tailored.py                                       non-uniform models only (trust_remote_code)
    pruning_report.json                                        sizes before/after, per-layer kept units

A uniformly pruned model is a stock model: ``AutoModelForCausalLM.from_pretrained(path)``. A non-uniform one loads
with ``tailored.load_pruned(path)``, or with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from tailored.core import pruned_model
from tailored.core.prune import PruningPlan, is_stock_layout, plan_pruning
from tailored.core.shapes import uniform_shape_of
from tailored.core.structure import GateValues, ModelStructure, parameter_count

REPORT_NAME = "pruning_report.json"
REMOTE_CODE_NAME = "modeling_tailored.py"


def pruning_report(
    structure: ModelStructure, gates: GateValues, source: str | None = None, kept_tokens: int | None = None
) -> dict[str, Any]:
    """Sizes before and after pruning with deterministic ``gates``, and what every kept layer keeps.

    ``kept_tokens``: the vocabulary size after domain vocabulary trimming (:mod:`tailored.core.vocabulary`; None:
    untrimmed). The count after is then that of the structure with ``kept_tokens`` embedding and lm_head rows.
    """
    plan: PruningPlan = plan_pruning(structure, gates)
    before = int(parameter_count(structure, GateValues.ones(structure, device="cpu")))  # from the structure alone
    untrimmed = int(parameter_count(structure, gates.kept()))
    trimmed = structure if kept_tokens is None else replace(structure, vocab_size=kept_tokens)
    after = int(parameter_count(trimmed, gates.kept()))
    return {
        "source_model": source,
        "family": structure.family,
        "format": "stock" if is_stock_layout(structure, plan) else "tailored",
        "parameters": {"before": before, "after": after, "kept_fraction": after / before},
        "hidden_size": {"before": structure.hidden_size, "after": len(plan.hidden)},
        "num_layers": {"before": structure.num_layers, "after": len(plan.layers)},
        "vocabulary": {
            "before": structure.vocab_size,
            "after": trimmed.vocab_size,
            "parameters_removed": untrimmed - after,
        },
        "uniform_shape": uniform_shape_of(gates.kept()),  # kept counts when every kept layer has the same
        "dense_layer": {  # what every layer of the source has, for the kept counts below
            "kv_heads": structure.num_kv_heads,
            "query_heads": structure.num_heads,
            "mlp_channels": structure.intermediate_size,
        },
        "layers": [
            {
                "source_layer": layer.source,
                "kv_heads": len(layer.groups),
                "query_heads": len(layer.groups) * structure.n_rep,
                "mlp_channels": len(layer.channels),
                "kept_kv_groups": list(layer.groups),
            }
            for layer in plan.layers
        ],
    }


def save_pruned(
    model: PreTrainedModel,
    path: str | Path,
    tokenizer=None,
    report: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (from :func:`tailored.core.prune.prune_model`), ``tokenizer`` and ``report`` to ``path``.

    The folder is written next to ``path`` first and moved into place when complete, so an interrupted save
    leaves no half-written export. An existing non-empty ``path`` is an error unless ``overwrite=True``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is a file; choose a folder path for the export")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} already holds files; choose a new folder or pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        if model.config.model_type.startswith("tailored_"):
            family = model.config.model_type.removeprefix("tailored_")
            config_class, model_class = pruned_model.PRUNED_CLASSES[family]
            module = Path(REMOTE_CODE_NAME).stem
            model.config.auto_map = {
                "AutoConfig": f"{module}.{config_class.__name__}",
                "AutoModelForCausalLM": f"{module}.{model_class.__name__}",
            }
            shutil.copyfile(pruned_model.__file__, staging / REMOTE_CODE_NAME)
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if report is not None:
            (staging / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return path


def load_pruned(path: str | Path, dtype: torch.dtype | str = "auto", **kwargs) -> PreTrainedModel:
    """Load a folder written by :func:`save_pruned` (uniform or not) as a causal LM, in eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a saved model folder (no config.json); pass the export folder")
    pruned_model.register_auto_classes()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()
