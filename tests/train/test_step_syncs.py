"""A training step reads nothing back from the device between logging steps: no ``.item()``, ``float()``, ``bool()``
or ``.tolist()`` of a tensor, counted on the CPU by wrapping those methods (on a GPU each would wait for the queued
kernels). Left out: the optimiser's reads of its step counts, which PyTorch keeps on the host (not capturable)."""

from __future__ import annotations

import collections
import traceback

import lightning as L
import pytest
import torch

from tailored.data.datamodule import DomainData
from tailored.data.tasks import Task
from tailored.train.module import TailoredModule
from tailored.train.settings import DistillSettings, OptimizerSettings, PruningSettings

READS = ("item", "tolist", "__bool__", "__float__", "__int__")
"""The tensor methods that return a host value: on a device tensor, each synchronises."""
STEPS = 6


class CountReads(L.Callback):
    """Per training batch, the host reads of tensor values between the batch's start and end hooks, with where each
    came from (the innermost frame of tailored, lightning, transformers or peft)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.per_batch: list[list[str]] = []
        self.counting = False
        for name in READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, original))

    def _counted(self, name: str, original):
        def read(tensor, *args, **kwargs):
            stack = traceback.extract_stack()[:-1]
            if self.counting and "torch/optim/" not in stack[-1].filename:  # AdamW's step counts live on the host
                frames = [frame for frame in stack if "site-packages/torch/" not in frame.filename]
                self.per_batch[-1].append(f"{name} at {frames[-1].filename}:{frames[-1].lineno}")
            return original(tensor, *args, **kwargs)

        return read

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        self.per_batch.append([])
        self.counting = True

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        self.counting = False


def host_reads_per_step(
    module: TailoredModule, data: DomainData, monkeypatch, **trainer_options
) -> collections.Counter:
    """Fit ``module`` for :data:`STEPS` steps; the host reads of the steps between the first and the last (the
    logging steps), counted by where they came from."""
    reads = CountReads(monkeypatch)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        log_every_n_steps=STEPS,  # step 0 logs the sparsity figures, the logger writes at step STEPS
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[reads],
        **trainer_options,
    )
    trainer.fit(module, datamodule=data)
    assert len(reads.per_batch) == STEPS
    reads.on_train_batch_start(trainer, module, None, STEPS)
    torch.ones(()).item()
    assert len(reads.per_batch[-1]) == 1  # the counter counts
    return collections.Counter(read for batch in reads.per_batch[1 : STEPS - 1] for read in batch)


@pytest.mark.parametrize("distill", [None, DistillSettings()], ids=["lm", "distill"])
def test_a_training_step_reads_no_device_value_between_logging_steps(tiny_model_dir, tiny_text, monkeypatch, distill):
    module = TailoredModule(
        model=str(tiny_model_dir),
        pruning=PruningSettings(target=0.6, round_to=1, importance=None, recovery=0.0),
        distill=distill,
    )
    data = DomainData([Task(name="words", source=str(tiny_text))], tokenizer=str(tiny_model_dir), seq_len=32)
    counts = host_reads_per_step(module, data, monkeypatch)
    assert not counts, f"host reads per step: {dict(counts)}"


def test_clipping_and_a_cosine_rate_read_no_device_value(tiny_model_dir, tiny_text, monkeypatch):
    """The gradient norm clipped (``trainer.gradient_clip_val``) and the rate scheduled (warm-up, then cosine from
    step 0 of a two-stage run, whose model is pruned before the first step): still no host read."""
    module = TailoredModule(
        model=str(tiny_model_dir),
        pruning=PruningSettings(target=0.6, round_to=1, method="taylor"),
        optimizer=OptimizerSettings(schedule="cosine", warmup_steps=2),
    )
    data = DomainData([Task(name="words", source=str(tiny_text))], tokenizer=str(tiny_model_dir), seq_len=32)
    counts = host_reads_per_step(module, data, monkeypatch, gradient_clip_val=1.0)
    assert not counts, f"host reads per step: {dict(counts)}"
