"""Callbacks: export the pruned model when training ends; show the gates in TensorBoard as they evolve."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import matplotlib
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from tailored.module import TailoredModule

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)


class ExportPruned(L.Callback):
    """When ``fit`` ends: prune with the final gates, merge LoRA, save model + tokenizer + report.

    The export goes to ``<log dir>/<dirname>``; the report is also logged as TensorBoard text.

    Args:
        dirname: folder name inside the run's log directory.
        enabled: set false to skip the export (``tailored export`` can do it later from a checkpoint).
    """

    def __init__(self, dirname: str = "export", enabled: bool = True) -> None:
        self.dirname, self.enabled = dirname, enabled

    def on_fit_end(self, trainer: L.Trainer, module: TailoredModule) -> None:
        if not self.enabled or not trainer.is_global_zero or trainer.interrupted:
            return
        path = Path(trainer.log_dir or trainer.default_root_dir) / self.dirname
        report = module.export(path)
        parameters = report["parameters"]
        summary = (
            f"pruned model saved to {path}: {parameters['after']:,} parameters "
            f"({parameters['kept_fraction']:.1%} of {parameters['before']:,})"
        )
        print(summary)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("export/report", f"{summary}\n\n```\n{json.dumps(report, indent=2)}\n```")


class GateMonitor(L.Callback):
    """Every ``every_n_steps`` steps, log a heat map of the per-layer kept fraction of KV groups and channels.

    The image is the expected kept fraction (mean keep probability) per layer: TensorBoard's image slider then
    shows how the model's shape forms during the run.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, module: TailoredModule, outputs, batch, batch_idx: int) -> None:
        if module.target is None or trainer.global_step % self.every_n_steps != 0 or not trainer.is_global_zero:
            return
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
