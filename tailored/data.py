"""The DataModule: tasks mixed into one training stream, a held-out split per task.

Training draws from an endless stream whose example ``i`` is a pure function of ``(seed, i)``: a task is drawn
with the mixture weights, then one of its examples. So a resumed run continues exactly where the killed one
stopped (the stream starts at ``global_step * batch_size * accumulate_grad_batches``), with no data-loader state
to save, and mixture weights can change during training (dynamic batch loading) without breaking resumption.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers import AutoTokenizer

from tailored import sources
from tailored.models import check_model_name, resolve_model
from tailored.tasks import IGNORE_INDEX, Task, encode_example, pack_text


class MixtureStream(IterableDataset):
    """Endless examples from several tasks; example ``i`` depends only on ``(seed, i)`` and the current weights.

    Args:
        examples: per task, its tokenised training examples.
        weights: per task, its sampling weight (read at every draw, so it can be changed in place).
        seed: stream seed.
        start: index of the first example (examples consumed before a resume).
        stride, offset: this process draws examples ``offset, offset + stride, ...`` (data parallel ranks).
    """

    def __init__(
        self,
        examples: list[list[dict]],
        weights: list[float],
        seed: int,
        start: int = 0,
        stride: int = 1,
        offset: int = 0,
    ) -> None:
        self.examples, self.weights, self.seed = examples, weights, seed
        self.start, self.stride, self.offset = start, stride, offset

    def example(self, index: int) -> dict:
        rng = random.Random(self.seed * 1_000_003 + index)
        task = rng.choices(range(len(self.examples)), weights=self.weights)[0]
        return self.examples[task][rng.randrange(len(self.examples[task]))]

    def __iter__(self) -> Iterator[dict]:
        index = self.start
        while True:
            yield self.example(index * self.stride + self.offset)
            index += 1


class DomainData(L.LightningDataModule):
    """Training and held-out data for a domain made of one or more tasks.

    Args:
        tasks: the tasks (see :class:`tailored.tasks.Task`).
        tokenizer: model name or path whose tokenizer is used (linked to ``model.model`` by the CLI).
        seq_len: tokens per example (language modelling blocks; prompt + answer are cut to fit).
        batch_size: examples per batch and process.
        response_only: instruction tasks compute the loss on the answer tokens only.
        eval_rows: at most this many held-out rows per task.
        seed: seed of the training stream and of the held-out split.
        data_dir: folder that relative local task sources are read from (default: the working directory).
    """

    def __init__(
        self,
        tasks: list[Task],
        tokenizer: str = "",
        seq_len: int = 256,
        batch_size: int = 4,
        response_only: bool = True,
        eval_rows: int = 64,
        seed: int = 0,
        data_dir: str | None = None,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("data.tasks is empty; declare at least one task")
        if data_dir is not None:
            tasks = [sources.within(task, data_dir) for task in tasks]
        names = [task.name for task in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        self.tasks, self.tokenizer_name = tasks, tokenizer
        self.seq_len, self.batch_size, self.response_only = seq_len, batch_size, response_only
        self.eval_rows, self.seed = eval_rows, seed
        for task in tasks:  # fail on a missing file or column now, before any model weight is loaded
            for source in filter(None, (task.source, task.eval_source)):
                found = sources.columns(source)
                if found is not None:
                    task.check_columns(found, source)
        if tokenizer:
            check_model_name(tokenizer)
        self.tokenizer = None
        self.train_examples: list[list[dict]] = []
        self.eval_examples: list[list[dict]] = []
        self.weights = [task.weight for task in tasks]

    def setup(self, stage: str) -> None:
        if self.tokenizer is not None:
            return
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(self.tokenizer_name))
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        for task in self.tasks:
            train_rows, eval_rows = self._split(task)
            self.train_examples.append(self._encode(task, train_rows))
            self.eval_examples.append(self._encode(task, eval_rows))
            for split, examples in (("training", self.train_examples[-1]), ("held-out", self.eval_examples[-1])):
                if not examples:
                    raise ValueError(
                        f"task {task.name!r}: its {split} split is empty after tokenisation (seq_len {self.seq_len}); "
                        "give it more rows or a shorter seq_len"
                    )

    def _split(self, task: Task):
        """Training and held-out rows of a task (held-out: ``eval_source`` or the last ``eval_fraction``)."""
        rows = sources.load_rows(task.source)
        task.check_columns(rows.column_names, task.source)
        if task.eval_source:
            held_out = sources.load_rows(task.eval_source)
            task.check_columns(held_out.column_names, task.eval_source)
        else:
            cut = len(rows) - max(1, round(task.eval_fraction * len(rows)))
            rows, held_out = rows.select(range(cut)), rows.select(range(cut, len(rows)))
        if task.max_rows is not None:
            rows = rows.select(range(min(task.max_rows, len(rows))))
        if task.kind != "language_modeling":  # language modelling packs text: more rows give more blocks
            held_out = held_out.select(range(min(self.eval_rows, len(held_out))))
        return rows, held_out

    def _encode(self, task: Task, rows) -> list[dict]:
        if task.kind == "language_modeling":
            return pack_text(task, rows, self.tokenizer, self.seq_len)
        return [encode_example(task, row, self.tokenizer, self.seq_len, self.response_only) for row in rows]

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        consumed = trainer.global_step * trainer.accumulate_grad_batches * self.batch_size if trainer else 0
        stream = MixtureStream(
            self.train_examples,
            self.weights,
            self.seed,
            start=consumed,
            stride=trainer.world_size if trainer else 1,
            offset=trainer.global_rank if trainer else 0,
        )
        return DataLoader(stream, batch_size=self.batch_size, collate_fn=self.collate)

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per task, in task order (``dataloader_idx`` = task index)."""
        return [
            DataLoader(examples, batch_size=self.batch_size, collate_fn=self.collate) for examples in self.eval_examples
        ]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` ``[B, T]``; padding carries no loss."""
        length = max(len(example["input_ids"]) for example in examples)
        pad = self.tokenizer.pad_token_id
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for example in examples:
            missing = length - len(example["input_ids"])
            batch["input_ids"].append(example["input_ids"] + [pad] * missing)
            batch["attention_mask"].append([1] * len(example["input_ids"]) + [0] * missing)
            batch["labels"].append(example["labels"] + [IGNORE_INDEX] * missing)
        return {key: torch.tensor(value) for key, value in batch.items()}

    def state_dict(self) -> dict:
        """Mixture weights (they change under dynamic batch loading) for resumption."""
        return {"weights": list(self.weights)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.weights[:] = state_dict["weights"]
