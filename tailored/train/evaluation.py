"""Validation and test: every task's held-out rows scored under the gates the model will be exported with.

Validation (during ``fit`` and ``tailored validate``) uses the rounded expected gates until recovery freezes them;
test uses the final gates, so it measures the model that export saves. Results are logged as
``<stage>/<task>/<metric>``, kept in ``results``, and written to the log dir (``test_results.json`` with the
per-row values ``test_rows.json``; ``val_results.json`` for ``tailored validate``).
"""

from __future__ import annotations

from contextlib import nullcontext

import lightning as L

from tailored.core.structure import GateValues
from tailored.data.reports import write_results
from tailored.data.scoring import score_batch
from tailored.train.sharding import is_sharded


class HeldOutEvaluation(L.LightningModule):
    """The validation and test hooks of :class:`tailored.train.module.TailoredModule` (which provides ``model``,
    ``gates``, ``hooks``, ``target``, ``pruned_now``, ``tasks`` and ``task_metrics``)."""

    def evaluation_gates(self) -> GateValues:
        """Frozen gates once recovery began; before that, the rounded expected counts (no forcing)."""
        return self.gates.frozen() if self.gates.is_frozen else self.gates.deterministic()

    def final_gates(self) -> GateValues:
        """The gates the exported model realises: frozen ones, else those meeting the target exactly."""
        if self.target is None:
            return GateValues.ones(self.structure, device=self.device)
        importance = self.pruning_settings.final_units == "importance"  # what freezing would choose now
        return self.gates.frozen() if self.gates.is_frozen else self.gates.target_gates(by_importance=importance)

    def on_validation_epoch_start(self) -> None:
        self.held_out_gates = None if self.target is None or self.pruned_now else self.evaluation_gates()

    def on_test_epoch_start(self) -> None:
        """Test evaluates the model that export would save (:meth:`final_gates`)."""
        self.held_out_gates = None if self.target is None or self.pruned_now else self.final_gates()

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.score(batch, dataloader_idx)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.score(batch, dataloader_idx)

    def score(self, batch: dict, dataloader_idx: int) -> None:
        """One held-out batch under :attr:`held_out_gates` (the dense model when None), set once per epoch."""
        task, metrics, tokenizer = self.tasks[dataloader_idx], self.task_metrics[dataloader_idx], self.tokenizer
        with nullcontext() if self.held_out_gates is None else self.hooks.applied(self.held_out_gates):
            score_batch(self.model, batch, task, metrics, tokenizer, synced=is_sharded(self))

    def log_results(self, stage: str) -> None:
        """Compute every task's metrics into :attr:`results` (and the test's per-row values); log them as
        ``<stage>/<task>/<metric>``, the validation losses on the progress bar."""
        self.results, self.row_values = {}, {}
        for task, metrics in zip(self.tasks, self.task_metrics, strict=True):
            self.results[task.name] = metrics.compute()
            if stage == "test":
                self.row_values[task.name] = metrics.row_values()
            metrics.reset()
        logged = {
            f"{stage}/{task}/{key}": value for task, values in self.results.items() for key, value in values.items()
        }
        on_bar = {key: value for key, value in logged.items() if stage == "val" and key.endswith("/loss")}
        self.log_dict(on_bar, prog_bar=True)
        self.log_dict({key: value for key, value in logged.items() if key not in on_bar})

    def on_validation_epoch_end(self) -> None:
        """Log the validation metrics; ``tailored validate`` also writes them to ``val_results.json``."""
        self.log_results("val")
        if self.trainer.state.fn == "validate":
            write_results(self.trainer, "validation", self.results, {"val_results.json": self.results})

    def on_test_epoch_end(self) -> None:
        """Log and print the results; write ``test_results.json`` and the per-row values (paired comparisons of
        models tested on the same rows) ``test_rows.json`` to the log dir."""
        self.log_results("test")
        files = {"test_results.json": self.results, "test_rows.json": self.row_values}
        write_results(self.trainer, "test", self.results, files)
