"""Callbacks that tests inject into ``tailored fit`` subprocesses (resume after a kill, several processes)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import torch
from torch.distributed.tensor import DTensor


class KillAfterStep(L.Callback):
    """SIGKILL the process (no clean-up, as a crash or a pre-empted node would) once ``step`` steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordStart(L.Callback):
    """Save the step, the gates' state and the first training batch as the (resumed) run starts: rank 0's, so that
    several processes do not write one file at once (which left it corrupt when two ranks raced)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.recorded = False

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.recorded or not trainer.is_global_zero:
            return
        self.recorded = True
        gates = {name: value.detach().clone() for name, value in module.gates.state_dict().items()}
        torch.save({"global_step": trainer.global_step, "gates": gates, "input_ids": batch["input_ids"]}, self.path)


class RecordEnd(L.Callback):
    """Save each rank's trained gates, multipliers and LoRA weights to ``<path>.rank<N>.pt`` when fit ends (FSDP:
    the LoRA weights gathered whole on every rank)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer, module) -> None:
        state = {name: whole(value) for name, value in module.state_dict().items() if "lora_" in name}
        state |= {f"gates.{name}": whole(value) for name, value in module.gates.state_dict().items()}
        torch.save({"global_step": trainer.global_step, "state": state}, f"{self.path}.rank{trainer.global_rank}.pt")


class SignalRankAfterStep(L.Callback):
    """Send ``signal_name`` to one rank's own process once ``step`` steps are done: SIGKILL as a crash or a lost node
    would, SIGSTOP as a process that hangs (its heartbeat too). Its PID is written to ``pid_file`` first, so that a
    test can clean up a stopped process."""

    def __init__(self, rank: int, step: int, signal_name: str = "SIGKILL", pid_file: str | None = None) -> None:
        self.rank, self.step, self.signal_name, self.pid_file = rank, step, signal_name, pid_file

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank != self.rank or trainer.global_step < self.step:
            return
        if self.pid_file:
            Path(self.pid_file).write_text(str(os.getpid()))
        os.kill(os.getpid(), getattr(signal, self.signal_name))


def whole(value: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``value``, all-gathered when it is a shard (every rank must call it in the same order)."""
    return (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone()


class RecordDecisions(L.Callback):
    """Save, after every optimiser step, the exact target mask, the budget gap and whether the gates are frozen
    (the inputs of the decide-then-prune rule), to ``path`` when fit ends."""

    def __init__(self, path: str) -> None:
        self.path, self.steps = path, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if module.gates.is_frozen:
            self.steps.append({"step": trainer.global_step - 1, "frozen": True})
            return
        mask = {name: (value > 0) for name, value in module.gates.target_gates().items()}
        expected = float(module.gates.expected_sparsity()["sparsity/expected_ratio"])
        phase = module.schedule.phase(trainer.global_step - 1)
        record = {"step": trainer.global_step - 1, "frozen": False, "mask": mask, "phase": phase}
        self.steps.append(record | {"gap": expected - module.target.fraction})

    def on_fit_end(self, trainer, module) -> None:
        torch.save({"steps": self.steps, "decision": module.decision}, self.path)
