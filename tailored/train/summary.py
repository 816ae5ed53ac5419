"""What a run made, said when ``fit`` ends: the dense and the exported model side by side.

After the export is written (rank zero, :class:`tailored.train.callbacks.ExportPruned`), :func:`summarize_fit`
loads the untuned base model and the export back from its folder (which proves the export loads), scores both on
the validation tasks (:func:`tailored.data.scoring.evaluate`, the code validation uses), counts their parameters,
times their prefill on this machine, and

- prints a short table with the export's path and the next commands,
- writes ``<export>/fit_summary.json`` and the model card ``<export>/README.md`` (:mod:`tailored.core.card`),
- logs the table as TensorBoard text (``export/fit_summary``).

Example (a 12-step run of the tests' tiny model)::

    fit summary: dense vs pruned on the validation split (± bootstrap standard error)
    task        metric      dense          pruned
    words       perplexity  265.2 ± 27     231.5 ± 26
    words       loss        5.581 ± 0.099  5.444 ± 0.11
    parameters              29,920         18,688 (62.5%)
    prefill speed-up: 1.08x (dense 14.6 ms, exported 13.6 ms per 4x32 batch of tokens, median of 18 after a
    warm-up, measured on this machine's cpu (AMD EPYC, 2 threads))
    export: runs/tiny/lightning_logs/version_0/export  (fit_summary.json, README.md)
    next:   tailored test -c tiny.yaml --ckpt_path last
            tailored compare -c tiny.yaml --pruned runs/tiny/lightning_logs/version_0/export
            (compare --tuned <export of the same run with --model.pruning null> adds the LoRA-tuned dense model)
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from collections.abc import Sequence
from itertools import islice
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from transformers.utils import logging as hf_logging

from tailored.core.card import CARD_NAME, export_label, markdown_table, metric_rows, model_card, prefill_line
from tailored.core.export import load_pruned
from tailored.data.metrics import PRIMARY_METRIC
from tailored.data.scoring import evaluate
from tailored.models import EMBEDDED_SMOLLM2, load_model, load_tokenizer

SUMMARY_NAME = "fit_summary.json"
HUB_NAMES = {EMBEDDED_SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""The hub name of a model name that is not one itself (the embedded default is a copy of the hub's model)."""
PREFILL_REPEATS = (5, 100)
"""Fewest and most timed prefill passes per model: as many as fit in :data:`PREFILL_SECONDS` of the dense model."""
PREFILL_SECONDS = 0.5
THIS_MACHINE = "this machine's"


def hub_name(name: str) -> str:
    """The name a model card gives as ``base_model``."""
    return HUB_NAMES.get(name, name)


def parameter_total(model: nn.Module) -> int:
    """Parameters of ``model``, a tied tensor counted once (as the pruning report counts them)."""
    return sum(parameter.numel() for parameter in model.parameters())


@torch.no_grad()
def prefill_seconds(models: dict[str, nn.Module], input_ids: torch.Tensor, repeats: int) -> dict[str, float]:
    """Per model, the median wall time of one forward pass over ``input_ids [B, T]`` (the prefill of generation:
    the last position's logits only) over ``repeats`` passes, after one warm-up pass.

    The models' passes alternate, so that a load that comes and goes on the machine slows them alike.
    """
    for model in models.values():
        model(input_ids=input_ids, logits_to_keep=1)
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(timed_prefill(model, input_ids))
    return {name: statistics.median(values) for name, values in times.items()}


@torch.no_grad()
def timed_prefill(model: nn.Module, input_ids: torch.Tensor) -> float:
    """Seconds of one prefill pass (the device synchronised before and after)."""
    synchronize(input_ids.device)
    start = time.perf_counter()
    model(input_ids=input_ids, logits_to_keep=1)
    synchronize(input_ids.device)
    return time.perf_counter() - start


@torch.no_grad()
def prefill_repeats(model: nn.Module, input_ids: torch.Tensor, budget: float = PREFILL_SECONDS) -> int:
    """How many timed passes fit in ``budget`` seconds, within :data:`PREFILL_REPEATS` (a short pass is timed
    more often: its median is otherwise at the mercy of whatever else the machine runs)."""
    model(input_ids=input_ids, logits_to_keep=1)
    fewest, most = PREFILL_REPEATS
    return max(fewest, min(most, math.ceil(budget / max(timed_prefill(model, input_ids), 1e-9))))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """Where the speed was measured: ``cuda:0 (NVIDIA H200)``, ``cpu (AMD EPYC 7B13, 2 threads)``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({cpu_model()}, {torch.get_num_threads()} threads)"


def cpu_model() -> str:
    """The processor's model name (Linux), else its architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def limited_batches(loaders: Sequence, limit: int | float | None) -> list[list[dict]]:
    """Each loader's batches as validation reads them under ``trainer.limit_val_batches`` (a count or a share)."""
    batches = []
    for loader in loaders:
        count = len(loader)
        if limit is not None:
            count = min(count, int(limit)) if isinstance(limit, int) else int(count * limit)
        batches.append(list(islice(loader, count)))
    return batches


def run_config(trainer: L.Trainer, log_dir: Path) -> tuple[list[str], Path | None]:
    """The config files the run was given (``-c``) and the full config LightningCLI saved in ``log_dir``."""
    for callback in trainer.callbacks:
        if isinstance(callback, SaveConfigCallback):
            given = [str(path) for path in callback.config.get("config") or []]
            saved = log_dir / callback.config_filename
            return given, saved if saved.is_file() else None
    return [], None


def config_arguments(given: list[str], saved: Path | None) -> str:
    """``-c <config>`` for the next commands: the files given, else the saved config, else a placeholder."""
    files = given or ([str(saved)] if saved else ["<your config>"])
    return " ".join(f"-c {file}" for file in files)


def next_commands(config: str, export: Path) -> list[str]:
    """What to run after ``fit``: the test split of this run's model, then the comparison table against the dense
    model."""
    return [f"tailored test {config} --ckpt_path last", f"tailored compare {config} --pruned {export}"]


TUNED_HINT = "(compare --tuned <export of the same run with --model.pruning null> adds the LoRA-tuned dense model)"


def summarize_fit(trainer: L.Trainer, module, path: Path, report: dict, log_dir: Path) -> dict:
    """Score, count and time the dense and the exported model at ``path``; print, write and log what the run made.

    On rank zero alone: nothing here is a collective (``log_dir`` is the run's ``trainer.log_dir``, which
    broadcasts, read on every rank before). Both models load on the module's device in its dtype, next to the
    trained one (``export.summary false`` skips this where they do not fit). Returns the summary written to
    ``fit_summary.json``.
    """
    data, device = trainer.datamodule, module.device
    dtype = getattr(torch, module.dtype_name)
    trimmed = report.get("vocabulary", {}).get("after") != report.get("vocabulary", {}).get("before")
    datas = {"dense": data, "export": data.validation_encoded_by(load_tokenizer(path)) if trimmed else data}
    batches = {name: limited_batches(each.val_dataloader(), trainer.limit_val_batches) for name, each in datas.items()}
    tasks = {  # a vocabulary-trimmed export reads the validation rows as its own tokenizer encodes them
        name: [(task, rows) for task, rows in zip(data.tasks, batches[name], strict=True) if rows] for name in datas
    }
    generator = torch.Generator().manual_seed(0)
    label = export_label(report)
    loads = {
        "dense": lambda: load_model(module.model_name, dtype=dtype),
        "export": lambda: load_pruned(path, dtype=dtype),  # AutoModelForCausalLM.from_pretrained(path)
    }
    results, parameters, models = {}, {}, {}
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bars between the export's line and the table
    try:
        for name, load in loads.items():
            models[name] = load().to(device)
            scored = [rows for _, rows in tasks[name]], [task for task, _ in tasks[name]]
            results[name] = evaluate(models[name], *scored, datas[name].tokenizer)
            parameters[name] = parameter_total(models[name])
        shape = (data.batch_size, data.seq_len)  # one fixed batch of the training shape for both models
        vocab_size = min(model.config.vocab_size for model in models.values())  # ids every model has
        input_ids = torch.randint(vocab_size, shape, generator=generator).to(device)
        repeats = prefill_repeats(models["dense"], input_ids)
        seconds = prefill_seconds(models, input_ids, repeats)
    finally:
        models.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if bars:
            hf_logging.enable_progress_bar()
    given, saved = run_config(trainer, log_dir)
    config = config_arguments(given, saved)
    summary = {
        "split": "validation",
        "export": str(path),
        "models": {"dense": module.model_name, "export": str(path)},
        "labels": {"dense": "dense", "export": label},
        "parameters": parameters,
        "tasks": {
            task.name: {"kind": task.kind, "metric": PRIMARY_METRIC[task.kind]}
            | {name: values[task.name] for name, values in results.items()}
            for task, _ in tasks["dense"]
        },
        "prefill": {
            "dense_seconds": seconds["dense"],
            "export_seconds": seconds["export"],
            "speedup": seconds["dense"] / seconds["export"],
            "batch": list(input_ids.shape),
            "repeats": repeats,
            "device": device_name(device),
        },
        "config": given or ([str(saved)] if saved else []),
        "next_commands": next_commands(config, path),
    }
    (path / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    command = f"tailored fit {config}"
    config_text = saved.read_text() if saved else None
    write_card(path, report, summary=summary, config_text=config_text, command=command)
    text = format_summary(summary)
    print(text, flush=True)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text("export/fit_summary", markdown_summary(summary))
    return summary


def write_card(
    path: Path,
    report: dict,
    tasks: Sequence[str] = (),
    summary: dict | None = None,
    config_text: str | None = None,
    command: str | None = None,
) -> Path:
    """Write the model card ``<path>/README.md`` (:func:`tailored.core.card.model_card`)."""
    base = hub_name(report["source_model"]) if report.get("source_model") else None
    card = model_card(report, base, tasks, summary=summary, config_text=config_text, command=command)
    (Path(path) / CARD_NAME).write_text(card)
    return Path(path) / CARD_NAME


def summary_rows(summary: dict) -> list[list[str]]:
    """The metric rows, then the parameter counts."""
    dense, export = summary["parameters"]["dense"], summary["parameters"]["export"]
    return [*metric_rows(summary), ["parameters", "", f"{dense:,}", f"{export:,} ({export / dense:.1%})"]]


def format_summary(summary: dict) -> str:
    """The end-of-fit table as aligned text, with the speed-up, the export's path and the next commands."""
    rows = summary_rows(summary)
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    label = summary["labels"]["export"]
    lines = [f"fit summary: dense vs {label} on the {summary['split']} split (± bootstrap standard error)"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append(f"prefill speed-up: {prefill_line(summary['prefill'], THIS_MACHINE)}")
    lines.append(f"export: {summary['export']}  ({SUMMARY_NAME}, {CARD_NAME})")
    first, *rest = summary["next_commands"]
    lines += [f"next:   {first}", *(f"        {command}" for command in rest)]
    if label == "pruned":
        lines.append(f"        {TUNED_HINT}")
    return "\n".join(lines)


def markdown_summary(summary: dict) -> str:
    """The table for TensorBoard's text tab."""
    speed = prefill_line(summary["prefill"], THIS_MACHINE)
    lines = [markdown_table(summary_rows(summary)), "", f"prefill speed-up: {speed}"]
    lines += ["", f"export: `{summary['export']}`", "", *(f"    {command}" for command in summary["next_commands"])]
    return "\n".join(lines)
