"""The DataModule: tasks mixed into one training stream, a held-out split per task, dynamic task weights.

Training draws from an endless stream whose example ``i`` is a pure function of ``(seed, i)``: a task is drawn
with the mixture weights, then one of its examples. So a resumed run continues exactly where the killed one
stopped (the stream starts at ``global_step * batch_size * accumulate_grad_batches``), with no data-loader state
to save, and mixture weights can change during training (dynamic batch loading) without breaking resumption.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import datasets
import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, IterableDataset
from transformers import AutoTokenizer

from tailored.data import cleaning, sources
from tailored.data.packing import loss_positions, packed_batch, padding_share
from tailored.data.tasks import (
    IGNORE_INDEX,
    Task,
    encode_eval_item,
    encode_example,
    pack_text,
    renamed_option,
    respelled_blocks,
)
from tailored.models import check_model_name, resolve_model

HELD_OUT_SEED = 0
"""Seed of the held-out row samples: fixed, so runs with different seeds are compared on the same rows."""
CALIBRATION_SEED_OFFSET = 7_919
"""Calibration batches (importance scores) come from the training stream of seed ``seed + this``."""
PADDING_SAMPLE_BATCHES = 200
"""Training batches whose padding share is reported when the data is set up."""


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


def dynamic_weights(
    weights: Sequence[float], losses: Sequence[float], references: Sequence[float], smoothing: float = 1e-4
) -> list[float]:
    """Sheared-LLaMA's dynamic batch loading (docs/method.md#section-8): weight moves to the tasks whose validation
    loss is furthest above its reference::

        w <- (1 - c) * softmax(log w + (loss - reference)) + c / K

    Unlike the paper, the excess is not clamped at 0: with the dense model's own loss as the reference, LoRA tuning
    pushes every task below it within a few steps, and a clamped excess of 0 everywhere froze the weights for the
    rest of the run. The signed excess keeps moving weight to the task that lags its reference most.
    """
    scores = [math.log(w) + (loss - ref) for w, loss, ref in zip(weights, losses, references, strict=True)]
    top = max(scores)
    exps = [math.exp(score - top) for score in scores]
    return [(1 - smoothing) * e / sum(exps) + smoothing / len(exps) for e in exps]


class DomainData(L.LightningDataModule):
    """Training, validation and test data for a domain made of one or more tasks.

    Three disjoint row sets per task, so that choosing settings on validation never touches the test figures::

        source file ──► training rows ──┬── training stream
                                        └── validation: val_rows rows carved out (never trained on);
                                            validation and dynamic batch loading read these
        test_source ──► test: every row (or test_rows of them); only ``test`` / ``compare`` read these
        (no test_source: test_fraction of the source is held out as the test rows first)

    Args:
        tasks: the tasks (see :class:`tailored.data.tasks.Task`).
        tokenizer: model name or path whose tokenizer is used (linked to ``model.model`` by the CLI).
        seq_len: tokens per training example (language modelling blocks; prompt + answer are cut to fit).
        eval_seq_len: most prompt tokens at evaluation (k-shot prompts are longer than training ones).
        batch_size: examples per batch and process.
        response_only: instruction tasks compute the loss on the answer tokens only.
        val_rows: validation rows per instruction task, carved at random from the training rows (at most a fifth
            of them); language-modelling tasks hold out the last tenth of their training text.
        test_rows: at most this many test rows per instruction task (default: all), sampled at random (files are
            often sorted, e.g. by label) with :data:`HELD_OUT_SEED`. Held-out rows are batched by length.
        eval_blocks: at most this many held-out blocks of ``seq_len`` tokens per language-modelling task, evenly
            spread over its held-out text (long documents would otherwise make validation the longest part).
        eval_rows: deprecated, the old name of ``test_rows`` (accepted with a warning; it goes in the next release).
        seed: seed of the training stream and of the k-shot examples (the held-out rows do not depend on it).
        data_dir: folder that relative local task sources are read from (default: the working directory).
        dynamic: reweight tasks after every validation by their held-out loss's excess over the reference loss.
        reference_losses: per task name, the reference loss of dynamic weighting; by default the dense model's
            own held-out loss, measured when training starts.
        packing: lay a training batch's examples end to end in rows of at most ``seq_len`` tokens, attention kept
            inside each example (tailored.data.packing): the same examples and loss, less padding. Exact with the
            attention implementations transformers masks per example (sdpa, the default, eager, flash, flex);
            false pads every example to the batch's longest. Held-out batches are always padded.
        reference_tokenizer: model name or path whose tokenizer cuts held-out language-modelling text into blocks
            and counts its tokens: the loss and perplexity are per token of this tokenizer. Give the base model
            when testing a vocabulary-trimmed export (docs/vocabulary.md), so its perplexity compares with the
            base's on the same text. Default: the model's own tokenizer.
    """

    def __init__(
        self,
        tasks: list[Task],
        tokenizer: str = "",
        seq_len: int = 256,
        eval_seq_len: int = 1024,
        batch_size: int = 4,
        response_only: bool = True,
        val_rows: int = 64,
        test_rows: int | None = None,
        eval_blocks: int = 256,
        seed: int = 0,
        data_dir: str | None = None,
        dynamic: bool = False,
        reference_losses: dict[str, float] | None = None,
        eval_rows: int | None = None,
        packing: bool = True,
        reference_tokenizer: str | None = None,
    ) -> None:
        super().__init__()
        if eval_rows is not None:
            renamed_option("data.eval_rows", "test_rows")
            test_rows = eval_rows
        if not tasks:
            raise ValueError("data.tasks is empty; declare at least one task")
        if data_dir is not None:
            tasks = [sources.within(task, data_dir) for task in tasks]
        names = [task.name for task in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        if reference_losses is not None and set(reference_losses) != set(names):
            raise ValueError(
                f"data.reference_losses must name exactly the tasks {names}, got {sorted(reference_losses)}"
            )
        self.tasks, self.tokenizer_name = tasks, tokenizer
        self.seq_len, self.eval_seq_len, self.batch_size = seq_len, eval_seq_len, batch_size
        check_sizes(seq_len=seq_len, eval_seq_len=eval_seq_len, batch_size=batch_size, val_rows=val_rows,
                    test_rows=test_rows, eval_blocks=eval_blocks)  # fmt: skip
        self.response_only, self.test_rows, self.eval_blocks, self.seed = response_only, test_rows, eval_blocks, seed
        self.val_rows = val_rows
        self.dynamic, self.packing = dynamic, packing
        self.reference_losses = [reference_losses[name] for name in names] if reference_losses else None
        for task in tasks:  # fail on a missing file or column now, before any model weight is loaded
            for source in filter(None, (task.source, task.test_source)):
                found = sources.columns(source)
                if found is not None:
                    task.check_columns(found, source)
                    if task.start_at is not None or task.stop_at is not None:
                        self._rows(task, source)  # a marker no row begins with
        for name in filter(None, (tokenizer, reference_tokenizer)):
            check_model_name(name)
        self.reference_tokenizer_name = reference_tokenizer
        self.tokenizer = self.reference_tokenizer = None
        self.train_examples: list[list[dict]] = []
        self.val_items: list[list[dict]] = []
        self.eval_items: list[list[dict]] = []  # test items
        self.weights = [task.weight for task in tasks]

    def setup(self, stage: str) -> None:
        if self.tokenizer is not None:
            return
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(self.tokenizer_name))
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.reference_tokenizer_name:
            self.reference_tokenizer = AutoTokenizer.from_pretrained(resolve_model(self.reference_tokenizer_name))
        self.split_sizes = []
        for index, task in enumerate(self.tasks):
            rows = self.split_rows(task)
            self.train_examples.append(self._encode(task, rows.training))
            self.val_items.append(self._encode_eval(index, task, rows.training, rows.validation))
            self.eval_items.append(self._encode_eval(index, task, rows.training, rows.test))
            splits = (
                ("training", rows.training, self.train_examples[-1]),
                ("validation", rows.validation, self.val_items[-1]),
                ("test", rows.test, self.eval_items[-1]),
            )
            for split, split_rows, examples in splits:
                if not examples:
                    raise ValueError(
                        f"task {task.name!r}: its {split} split is empty after tokenisation (seq_len {self.seq_len}); "
                        "give it more rows or a shorter seq_len"
                    )
                dropped = rows.repeats.get(split, 0)
                self.split_sizes.append(SplitSize.of(task.name, split, len(split_rows), examples, dropped))
        print_split_sizes(self.split_sizes)
        self.padding = self.padding_shares(PADDING_SAMPLE_BATCHES)
        print_padding(self.padding, self.packing)

    def padding_shares(self, batches: int) -> dict[str, float]:
        """Share of padding in the first ``batches`` training batches, ``{"padded": ..., "packed": ...}``."""
        stream = iter(MixtureStream(self.train_examples, list(self.weights), self.seed))
        lengths = [[len(next(stream)["input_ids"]) for _ in range(self.batch_size)] for _ in range(batches)]
        return {kind: padding_share(lengths, self.seq_len, kind == "packed") for kind in ("padded", "packed")}

    def split_rows(self, task: Task) -> SplitRows:
        """The task's training, validation and test rows (:meth:`_split`, :meth:`_carve_validation`), without the
        validation rows that repeat a test prompt and the training rows that repeat a held-out one."""
        training, test = self._split(task)
        training, validation = self._carve_validation(task, training)
        kept_validation = cleaning.without_overlap(task, validation, [test])
        kept_training = cleaning.without_overlap(task, training, [kept_validation, test])
        if len(training) and not len(kept_training):
            raise ValueError(
                f"task {task.name!r}: every training row repeats a validation or test prompt (is test_source the "
                "training file?); give the task training rows of its own"
            )
        repeats = {"training": len(training) - len(kept_training), "validation": len(validation) - len(kept_validation)}
        return SplitRows(kept_training, kept_validation, test, repeats)

    def _split(self, task: Task):
        """Training and held-out rows of a task.

        Held out: ``test_source``, or else ``test_fraction`` of the rows: the last ones for language modelling (text
        stays contiguous), a random sample for instruction tasks (whose files are often sorted).
        """
        rows = self._rows(task, task.source)
        language_modeling = task.kind == "language_modeling"
        size = max(1, round(task.test_fraction * len(rows)))  # held-out rows when there is no test_source
        if task.test_source:
            held_out = self._rows(task, task.test_source)
        elif language_modeling:
            cut = len(rows) - size
            rows, held_out = rows.select(range(cut)), rows.select(range(cut, len(rows)))
        elif size < len(rows):
            split = rows.train_test_split(test_size=size, seed=HELD_OUT_SEED)
            rows, held_out = split["train"], split["test"]
        else:  # too few rows to split: all held out, and the empty training split is reported by setup
            rows, held_out = rows.select([]), rows
        if task.max_rows is not None:
            rows = rows.select(range(min(task.max_rows, len(rows))))
        capped = self.test_rows is not None and len(held_out) > self.test_rows
        if not language_modeling and capped:  # text is capped in blocks (eval_blocks)
            held_out = held_out.shuffle(seed=HELD_OUT_SEED).select(range(self.test_rows))
        if task.shots > len(rows):
            raise ValueError(f"task {task.name!r}: {task.shots} shots but only {len(rows)} training rows")
        return rows, held_out

    @staticmethod
    def _rows(task: Task, source: str):
        """Every row of ``source``, trimmed to the task's markers and without its ``remove`` patterns."""
        rows = sources.load_rows(source)
        task.check_columns(rows.column_names, source)
        return cleaning.without_patterns(task, cleaning.trimmed(task, rows, source))

    def _carve_validation(self, task: Task, rows):
        """(training rows, validation rows): validation taken out of the training rows, never trained on."""
        size = min(self.val_rows, len(rows) // 5) if task.kind != "language_modeling" else len(rows) // 10
        if size == 0:  # too few rows to spare any: setup reports the empty validation split
            return rows, rows.select([])
        if task.kind == "language_modeling":  # contiguous text: the end of the training part
            cut = len(rows) - size
            return rows.select(range(cut)), rows.select(range(cut, len(rows)))
        split = rows.train_test_split(test_size=size, seed=HELD_OUT_SEED + 1)
        return split["train"], split["test"]

    def calibration_loader(self, batches: int) -> Iterable[dict[str, torch.Tensor]]:
        """``batches`` training batches from a stream of another seed (importance scores are computed on them),
        padded: they go to the model's own forward and loss (tailored.core.importance)."""
        stream = MixtureStream(self.train_examples, list(self.weights), self.seed + CALIBRATION_SEED_OFFSET)
        return itertools.islice(DataLoader(stream, batch_size=self.batch_size, collate_fn=self.collate), batches)

    def validation_encoded_by(self, tokenizer) -> DomainData:
        """A copy of this data whose validation items are encoded by ``tokenizer`` (a vocabulary-trimmed export's
        own, whose ids differ): the same rows, shots and sizes; language-modelling text in this data's blocks, its
        loss per token of this data's tokenizer (:func:`tailored.data.tasks.respelled_blocks`)."""
        data = copy.copy(self)
        data.tokenizer, data.reference_tokenizer = tokenizer, self.reference_tokenizer or self.tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        data.val_items = [
            data._encode_eval(index, task, rows.training, rows.validation)
            for index, (task, rows) in enumerate((task, data.split_rows(task)) for task in data.tasks)
        ]
        return data

    def _encode(self, task: Task, rows) -> list[dict]:
        if task.kind == "language_modeling":
            return pack_text(task, rows, self.tokenizer, self.seq_len)
        return [encode_example(task, row, self.tokenizer, self.seq_len, self.response_only) for row in rows]

    def _encode_eval(self, task_index: int, task: Task, train_rows, eval_rows) -> list[dict]:
        if task.kind == "language_modeling":
            return self._held_out_blocks(task, eval_rows)
        items = [
            encode_eval_item(
                task,
                row,
                self.tokenizer,
                self.eval_seq_len,
                self.response_only,
                shots=self.shots_for(task_index, row_index, train_rows),
            )
            for row_index, row in enumerate(eval_rows)
        ]
        return sorted(items, key=evaluation_length)  # batches of like lengths: little padding

    def _held_out_blocks(self, task: Task, rows) -> list[dict]:
        """At most ``eval_blocks`` blocks of ``seq_len`` reference tokens, evenly spread over the held-out text;
        respelled by the model's tokenizer where its vocabulary is not the reference's."""
        reference = self.reference_tokenizer or self.tokenizer
        blocks = pack_text(task, rows, reference, self.seq_len)
        if len(blocks) > self.eval_blocks:
            blocks = [blocks[i * len(blocks) // self.eval_blocks] for i in range(self.eval_blocks)]
        if reference is self.tokenizer or reference.get_vocab() == self.tokenizer.get_vocab():
            return blocks
        return respelled_blocks(blocks, reference, self.tokenizer)

    def shots_for(self, task_index: int, row_index: int, train_rows) -> list[dict]:
        """The k-shot examples of held-out row ``row_index``: training rows drawn by ``(seed, task, row)``."""
        task = self.tasks[task_index]
        if task.shots == 0:
            return []
        rng = random.Random((self.seed * 1_000_003 + task_index) * 1_000_003 + row_index)
        return [train_rows[i] for i in rng.sample(range(len(train_rows)), task.shots)]

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
        return DataLoader(stream, batch_size=self.batch_size, collate_fn=self.collate_train)

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per task over its validation rows, in task order (``dataloader_idx`` = task index)."""
        return self._loaders(self.val_items)

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per task over its test rows; see :meth:`collate_eval`."""
        return self._loaders(self.eval_items)

    def _loaders(self, items_per_task: list[list[dict]]) -> list[DataLoader]:
        return [DataLoader(items, batch_size=self.batch_size, collate_fn=self.collate_eval) for items in items_per_task]

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` ``[B, T]``; padding carries no loss."""
        ids, mask = pad([example["input_ids"] for example in examples], self.tokenizer.pad_token_id, left=False)
        labels, _ = pad([example["labels"] for example in examples], IGNORE_INDEX, left=False)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def collate_train(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """A training batch: packed (``input_ids``, ``position_ids``, ``labels`` ``[R, T]``,
        :func:`tailored.data.packing.packed_batch`) with ``packing``, else padded (:meth:`collate`)."""
        if not self.packing:
            return self.collate(examples)
        return packed_batch(examples, self.seq_len, self.tokenizer.pad_token_id, IGNORE_INDEX)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """A training batch gains ``loss_positions`` and ``loss_targets`` (:func:`tailored.data.packing.loss_positions`)
        here, on the host before it moves: the step's losses read them without a device read-back."""
        if self.trainer is not None and self.trainer.training:
            batch["loss_positions"], batch["loss_targets"] = loss_positions(batch["labels"], IGNORE_INDEX)
        return batch

    def collate_eval(self, items: list[dict]) -> dict:
        """The teacher-forced batch of :meth:`collate`, plus per task kind:

        - options (classification, multiple choice): ``option_input_ids``, ``option_attention_mask``
          ``[B * n_options, T]``, left-padded prompt + option, ``option_lengths`` ``[B * n_options]``, ``label`` [B];
        - generation: ``prompt_input_ids``, ``prompt_attention_mask`` ``[B, T]`` left-padded, ``references``;
        - respelled language-modelling blocks: ``reference_tokens`` ``[B]`` (what each row's loss is divided by).
        """
        batch = self.collate(items)
        if "reference_tokens" in items[0]:
            batch["reference_tokens"] = torch.tensor([item["reference_tokens"] for item in items], dtype=torch.float)
        pad_id = self.tokenizer.pad_token_id
        if "option_ids" in items[0]:
            sequences = [item["prompt_ids"] + option for item in items for option in item["option_ids"]]
            batch["option_input_ids"], batch["option_attention_mask"] = pad(sequences, pad_id, left=True)
            lengths = [len(option) for item in items for option in item["option_ids"]]
            batch["option_lengths"] = torch.tensor(lengths)
            batch["label"] = torch.tensor([item["label"] for item in items])
        elif "reference" in items[0]:
            batch["prompt_input_ids"], batch["prompt_attention_mask"] = pad(
                [item["prompt_ids"] for item in items], pad_id, left=True
            )
            batch["references"] = [item["reference"] for item in items]
        return batch

    def update_weights(self, losses: Sequence[float]) -> None:
        """Dynamic batch loading: move the mixture weights (in place: the training stream reads them)."""
        self.weights[:] = dynamic_weights(self.weights, losses, self.reference_losses)

    def state_dict(self) -> dict:
        """Mixture weights and reference losses (dynamic batch loading) for resumption."""
        return {"weights": list(self.weights), "reference_losses": self.reference_losses}

    def load_state_dict(self, state_dict: dict) -> None:
        self.weights[:] = state_dict["weights"]
        self.reference_losses = state_dict.get("reference_losses")


@dataclass
class SplitRows:
    """The rows of one task's three splits (``datasets.Dataset`` each)."""

    training: datasets.Dataset
    validation: datasets.Dataset
    test: datasets.Dataset
    repeats: dict[str, int] = field(default_factory=dict)
    """Per split, the rows left out because their prompt repeats a row of a later split (validation, test)."""


@dataclass
class SplitSize:
    """What one split of a task holds: rows of its file(s), examples made of them, and their tokens."""

    task: str
    split: str
    rows: int
    """Rows read (lines of a text file); language modelling packs them into blocks of ``seq_len`` tokens."""
    examples: int
    tokens: int
    dropped: int = 0
    """Rows left out because their prompt repeats a row of a later split (validation, test)."""

    @classmethod
    def of(cls, task: str, split: str, rows: int, examples: list[dict], dropped: int = 0) -> SplitSize:
        return cls(task, split, rows, len(examples), sum(len(example["input_ids"]) for example in examples), dropped)


@rank_zero_only
def print_split_sizes(sizes: list[SplitSize]) -> None:
    """The table of what every split holds, printed once when the data is set up."""
    width = max(len(size.task) for size in sizes)
    lines = [f"{'task'.ljust(width)}  split       {'rows':>7}  {'examples':>8}  {'tokens':>10}"]
    for size in sizes:
        note = f"  ({size.dropped} rows left out: they repeat a later split's prompt)" if size.dropped else ""
        counts = f"{size.rows:>7,}  {size.examples:>8,}  {size.tokens:>10,}"
        lines.append(f"{size.task.ljust(width)}  {size.split:<10}  {counts}{note}")
    print("\n".join(["data splits", *lines]))


@rank_zero_only
def print_padding(shares: dict[str, float], packing: bool) -> None:
    """One line: the padding share of training batches, padded and packed, and which one the run uses."""
    used = "packed" if packing else "padded"
    print(f"training batches: padding {shares['padded']:.1%} of tokens padded, {shares['packed']:.1%} packed ({used})")


MINIMUM_SIZES = {"seq_len": 2, "eval_seq_len": 2, "batch_size": 1, "val_rows": 1, "test_rows": 1, "eval_blocks": 1}
"""Smallest workable value of each size setting (a sequence needs two tokens for one next-token loss)."""


def check_sizes(**sizes: int | None) -> None:
    """Raise a ``ValueError`` naming the first ``data.<size>`` below its minimum (None: no cap, allowed)."""
    for name, value in sizes.items():
        if value is not None and value < MINIMUM_SIZES[name]:
            raise ValueError(f"data.{name} must be >= {MINIMUM_SIZES[name]}, got {value}")


def evaluation_length(item: dict) -> int:
    """Tokens of a held-out item's longest evaluation sequence: prompt (with its shots) + longest option."""
    return len(item["prompt_ids"]) + max((len(option) for option in item.get("option_ids", [])), default=0)


def pad(sequences: list[list[int]], value: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence: ``[B, T]`` values and the ``[B, T]`` attention mask (1 on real tokens).

    Generation and option scoring pad on the left, so every sequence ends at the last position.
    """
    length = max(len(sequence) for sequence in sequences)
    padded, mask = [], []
    for sequence in sequences:
        fill = [value] * (length - len(sequence))
        ones, zeros = [1] * len(sequence), [0] * len(fill)
        padded.append(fill + sequence if left else sequence + fill)
        mask.append(zeros + ones if left else ones + zeros)
    return torch.tensor(padded), torch.tensor(mask)
