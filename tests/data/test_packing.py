"""Packed training batches: rows within seq_len, positions restarting per example, the same counted tokens."""

from __future__ import annotations

from tailored.data.packing import pack, packed_batch, padding_share
from tailored.data.tasks import IGNORE_INDEX


def test_first_fit_decreasing_keeps_rows_within_the_capacity():
    lengths = [7, 3, 5, 2, 8, 1]
    rows = pack(lengths, 8)
    assert sorted(index for row in rows for index in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 8 for row in rows)
    assert rows == [[4], [0, 5], [2, 1], [3]]
    assert pack([9, 2], 8) == [[0], [1]]  # too long for any row: a row of its own


def test_packed_batch_restarts_positions_and_ignores_each_examples_first_label():
    examples = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8, 9], "labels": [8, 9]},  # language modelling: every token labelled
        {"input_ids": [10, 11, 12, 13], "labels": [IGNORE_INDEX, IGNORE_INDEX, 12, 13]},
    ]
    batch = packed_batch(examples, 5, pad_id=0, ignore_index=IGNORE_INDEX)
    assert set(batch) == {"input_ids", "position_ids", "labels"}
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 0], [5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    # token 8 is not predicted from token 7 of the example before it; padding carries no loss
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, 12, 13, IGNORE_INDEX],
        [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9],
    ]


def test_padding_share_counts_the_tokens_of_the_longest_example_or_row():
    batches = [[4, 1, 2], [3, 3]]
    assert padding_share(batches, 4, packed=False) == 1 - 13 / (3 * 4 + 2 * 3)
    assert padding_share(batches, 4, packed=True) == 1 - 13 / (2 * 4 + 2 * 3)  # rows [4], [2, 1]; [3], [3]
