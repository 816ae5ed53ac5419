"""Packed training batches: the batch's examples laid end to end in rows of at most ``seq_len`` tokens.

A padded batch is as long as its longest example: on the medical tasks a 110-token HQS row shares a batch with
192-token PubMedQA rows and abstract blocks, and the step computes the padding too. Packing puts the same examples
into fewer rows, first-fit by decreasing length::

    padded  [B, T]     A A A A A A .        packed  [R, T']   A A A A A A
                       B B B . . . .                          B B B C C .
                       C C . . . . .
    position_ids                            0 1 2 3 4 5 / 0 1 2 0 1 0      (restart per example; the tail: padding)

Each example keeps its own positions, and attention stays inside it (tailored.core.losses builds the
block-diagonal mask from the position ids; flash attention reads them directly), so every example's logits are the
padded batch's. The first label of each example is ignored: the last token of the example before it must not
predict it (in a padded row nothing precedes it), so the loss is the padded batch's too: the same examples, the same
counted tokens, the same mean. The step keeps its examples, so the stream, resumption and ``batch_size`` keep their
meaning; a step costs fewer tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Example indices per row: first fit by decreasing length, each row's lengths summing to at most ``capacity``
    (an example longer than it gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if lengths[index] <= free), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


def packed_batch(examples: list[dict], capacity: int, pad_id: int, ignore_index: int) -> dict[str, torch.Tensor]:
    """The examples (``input_ids``, ``labels`` lists) packed by :func:`pack`: ``input_ids``, ``position_ids`` and
    ``labels`` ``[R, T]`` (T the longest row), no ``attention_mask``; a row's padding tail has its own positions
    and no loss."""
    rows = pack([len(example["input_ids"]) for example in examples], capacity)
    length = max(sum(len(examples[i]["input_ids"]) for i in row) for row in rows)
    ids, positions, labels = [], [], []
    for row in rows:
        row_ids, row_positions, row_labels = [], [], []
        for index in row:
            example = examples[index]
            row_ids += example["input_ids"]
            row_positions += range(len(example["input_ids"]))
            row_labels += [ignore_index, *example["labels"][1:]]
        fill = length - len(row_ids)
        ids.append(row_ids + [pad_id] * fill)
        positions.append(row_positions + list(range(fill)))
        labels.append(row_labels + [ignore_index] * fill)
    return {"input_ids": torch.tensor(ids), "position_ids": torch.tensor(positions), "labels": torch.tensor(labels)}


def loss_positions(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions that predict a counted token, and the tokens they predict (what the training losses read,
    tailored.core.losses).

    Args:
        labels: ``[B, T]``; position ``p`` predicts ``labels[:, p + 1]`` (the shift of Hugging Face's causal LM loss).
    Returns:
        ``positions [N]``, flat indices into ``[B * T]``, and ``targets [N]``, in row-major order. Computed where
        ``labels`` lives: on the host before the batch moves, so a GPU step reads nothing back to find them.
    """
    rows, columns = (labels[:, 1:] != ignore_index).nonzero(as_tuple=True)
    return rows * labels.shape[1] + columns, labels[rows, columns + 1]


def padding_share(batches: Iterable[Sequence[int]], capacity: int, packed: bool) -> float:
    """Share of the tokens of ``batches`` (each a list of example lengths) that are padding: padded to the longest
    example, or packed by :func:`pack` and padded to the longest row."""
    real = total = 0
    for lengths in batches:
        rows = [sum(lengths[i] for i in row) for row in pack(lengths, capacity)] if packed else list(lengths)
        real += sum(lengths)
        total += len(rows) * max(rows)
    return 1 - real / total
