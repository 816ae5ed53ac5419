"""Callbacks that tests inject into ``tailored fit`` subprocesses (resume after a kill, several processes)."""

from __future__ import annotations

import os
import signal

import lightning as L
import torch


class KillAfterStep(L.Callback):
    """SIGKILL the process (no clean-up, as a crash or a pre-empted node would) once ``step`` steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordStart(L.Callback):
    """Save the step, the gates' state and the first training batch as the (resumed) run starts."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.recorded = False

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.recorded:
            return
        self.recorded = True
        gates = {name: value.detach().clone() for name, value in module.gates.state_dict().items()}
        torch.save({"global_step": trainer.global_step, "gates": gates, "input_ids": batch["input_ids"]}, self.path)


class RecordEnd(L.Callback):
    """Save each rank's trained gates, multipliers and LoRA weights to ``<path>.rank<N>.pt`` when fit ends."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer, module) -> None:
        state = {name: value.detach().clone() for name, value in module.state_dict().items() if "lora_" in name}
        state |= {f"gates.{name}": value.detach().clone() for name, value in module.gates.state_dict().items()}
        torch.save({"global_step": trainer.global_step, "state": state}, f"{self.path}.rank{trainer.global_rank}.pt")
