"""Callbacks: export the pruned model when training ends; dynamic batch loading; show the gates in TensorBoard as
they evolve; print progress as plain lines when the output is a log file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import matplotlib
import torch
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from tailored.data.scoring import mean_losses
from tailored.train.module import TailoredModule
from tailored.train.sharding import gathered_model, is_sharded
from tailored.train.summary import summarize_fit

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)


class ExportPruned(L.Callback):
    """When ``fit`` ends: prune with the final gates, merge LoRA, save model + tokenizer + report (FSDP: the full
    model gathered on rank 0).

    The export goes to ``<log dir>/<dirname>``; the report is also logged as TensorBoard text. Then the dense and
    the exported model are compared on the validation tasks (:func:`tailored.train.summary.summarize_fit`).

    Args:
        dirname: folder name inside the run's log directory.
        enabled: set false to skip the export (``tailored export`` can do it later from a checkpoint).
        summary: after the export, print the dense and the exported model's validation metrics, parameters and
            prefill speed-up, and write them to ``fit_summary.json`` and the model card ``README.md``.
    """

    def __init__(self, dirname: str = "export", enabled: bool = True, summary: bool = True) -> None:
        self.dirname, self.enabled, self.summary = dirname, enabled, summary

    def on_fit_end(self, trainer: L.Trainer, module: TailoredModule) -> None:
        if not self.enabled or trainer.interrupted:
            return
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # every rank: log_dir broadcasts
        path = log_dir / self.dirname
        full = gathered_model(module) if is_sharded(module) else None  # FSDP: every rank sends its shards to rank 0
        if not trainer.is_global_zero:
            return
        report = module.export(path, model=full)
        parameters = report["parameters"]
        kind = "pruned" if module.target is not None else "tuned (not pruned)"
        summary = (
            f"{kind} model saved to {path}: {parameters['after']:,} parameters "
            f"({parameters['kept_fraction']:.1%} of {parameters['before']:,})"
        )
        print(summary)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("export/report", f"{summary}\n\n```\n{json.dumps(report, indent=2)}\n```")
        if self.summary:
            del full  # FSDP: the gathered copy, before two more models load
            summarize_fit(trainer, module, path, report, log_dir)


class DynamicBatchLoading(L.Callback):
    """Sheared-LLaMA's dynamic batch loading when ``data.dynamic`` is on.

    The dense model's held-out losses are the reference when a fresh fit starts; after every validation the
    mixture weights move toward the tasks furthest above it (:func:`tailored.data.datamodule.dynamic_weights`).
    The weights and references are the DataModule's state (saved in checkpoints with it); they are logged as
    ``data/weight/<task>``.
    """

    def on_fit_start(self, trainer: L.Trainer, module: TailoredModule) -> None:
        data = trainer.datamodule
        if data.dynamic and data.reference_losses is None:  # before any pruning: the dense model's losses
            data.reference_losses = mean_losses(module.model, data.val_dataloader(), module.device)
            names = [task.name for task in data.tasks]
            print(
                "dynamic batch loading, dense reference losses:", dict(zip(names, data.reference_losses, strict=True))
            )

    def on_validation_end(self, trainer: L.Trainer, module: TailoredModule) -> None:
        data = trainer.datamodule
        if not data.dynamic or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        data.update_weights([module.results[task.name]["loss"] for task in data.tasks])
        weights = {f"data/weight/{task.name}": weight for task, weight in zip(data.tasks, data.weights, strict=True)}
        for logger in trainer.loggers:
            logger.log_metrics(weights, step=trainer.global_step)


class GateMonitor(L.Callback):
    """Every ``every_n_steps`` steps, log a heat map of the per-layer kept fraction of KV groups and channels.

    The image is the expected kept fraction (mean keep probability) per layer: TensorBoard's image slider then
    shows how the model's shape forms during the run.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = every_n_steps
        self._last_step = -1  # with gradient accumulation several batches end on one step

    def on_train_batch_end(self, trainer: L.Trainer, module: TailoredModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if module.target is None or step % self.every_n_steps or step == self._last_step or not trainer.is_global_zero:
            return
        self._last_step = step
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not loggers:
            return
        figure = kept_fraction_figure(module)
        for logger in loggers:
            logger.experiment.add_figure("gates/kept_fraction_per_layer", figure, trainer.global_step)
        plt.close(figure)


@torch.no_grad()
def kept_fraction_figure(module: TailoredModule):
    """Layers x {KV groups, channels} heat map of the expected kept fraction."""
    probs = module.gates.keep_probabilities()
    columns = torch.stack([probs.groups.mean(-1), probs.channels.mean(-1)], dim=1).float().cpu()  # [L, 2]
    figure, axis = plt.subplots(figsize=(3, 0.18 * len(columns) + 1.2))
    image = axis.imshow(columns.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    axis.set_xticks([0, 1], ["KV groups", "channels"])
    axis.set_ylabel("layer")
    axis.set_title(f"step {module.global_step}")
    figure.colorbar(image, ax=axis, label="kept fraction")
    figure.tight_layout()
    return figure


class ParameterSummary(ModelSummary):
    """The model summary as a plain table of the top modules' parameters, without Lightning's FLOPs column and
    total, which stay 0 unless a model declares an example input (benchmarks/speed measures the FLOPs)."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  **ignored) -> None:  # fmt: skip
        columns = [(name, values) for name, values in summary_data if name in ("Name", "Type", "Params", "Mode")]
        widths = [max(len(name), *(len(str(value)) for value in values)) for name, values in columns]
        rows = [[name for name, _ in columns], *zip(*(values for _, values in columns), strict=True)]
        lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
        frozen = total_parameters - trainable_parameters
        lines.append(f"parameters: {trainable_parameters:,} trainable, {frozen:,} frozen ({model_size:.1f} MB)")
        print("\n".join(lines))


class LineProgress(ProgressBar):
    """Progress as one printed line every ``every_n_steps`` steps (and every ``every_n_batches`` evaluation batches).

    For output that is not a terminal (batch jobs, ``nohup``, CI), where a live progress bar shows nothing until the
    run ends. A training line reads ``step 40/200 (20%) | 9.1 s/step, 24 min left | train/loss 4.30 | ...`` with the
    metrics logged with ``prog_bar=True``.
    """

    def __init__(self, every_n_steps: int = 10, every_n_batches: int = 10) -> None:
        super().__init__()
        self.every_n_steps, self.every_n_batches = every_n_steps, every_n_batches
        self.enabled = True
        self._start: tuple[float, int] | None = None
        self._last_printed_step = -1  # with gradient accumulation several batches end on one step

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._start = (time.monotonic(), trainer.global_step)  # a resumed run starts past step 0

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step, total = trainer.global_step, trainer.max_steps
        if not self.enabled or step == self._last_printed_step or (step % self.every_n_steps and step != total):
            return
        self._last_printed_step = step
        parts = [f"step {step}/{total} ({step / total:.0%})" if total > 0 else f"step {step}"]
        start_time, start_step = self._start or (time.monotonic(), step)
        if step > start_step:
            seconds = (time.monotonic() - start_time) / (step - start_step)
            left = f", {(total - step) * seconds / 60:.0f} min left" if total > 0 else ""
            parts.append(f"{seconds:.1f} s/step{left}")
        metrics = self.get_metrics(trainer, module)
        metrics.pop("v_num", None)
        parts += [f"{name} {format_value(value)}" for name, value in metrics.items()]
        print(" | ".join(parts), flush=True)

    def on_validation_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._print_evaluation("validation", trainer.num_val_batches, batch_idx, dataloader_idx)

    def on_test_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._print_evaluation("test", trainer.num_test_batches, batch_idx, dataloader_idx)

    def _print_evaluation(self, stage: str, batches: list[int | float], batch_idx: int, dataloader_idx: int) -> None:
        total = batches[dataloader_idx]
        done = batch_idx + 1
        if self.enabled and not self.trainer.sanity_checking and (done % self.every_n_batches == 0 or done == total):
            print(f"{stage}: loader {dataloader_idx + 1}/{len(batches)}, batch {done}/{total}", flush=True)


def format_value(value) -> str:
    """A metric for a progress line: 4 significant digits for floats."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
