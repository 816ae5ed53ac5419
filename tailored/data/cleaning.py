"""Rows a task should not learn from or be scored on: boilerplate around a text, repeated notices, leaked rows.

Applied to a task's rows before they are split (:meth:`tailored.data.DomainData.setup`)::

    rows of a file ──► trim (start_at / stop_at) ──► remove patterns ──► split ──► drop training rows that
                                                                                  repeat a held-out one

A Project Gutenberg book, for example, opens with a header and ends with the licence; a task keeps the book
alone with ``start_at: "BOTCHAN (MASTER DARLING)"`` and ``stop_at: "End of Project Gutenberg"``.
"""

from __future__ import annotations

import re

import datasets

from tailored.data.tasks import Task

BYTE_ORDER_MARK = "\ufeff"


def row_text(task: Task, row: dict) -> str:
    """The text a row's markers are matched against: its ``text`` template for language modelling, else its
    prompt template (a byte-order mark at the start is ignored)."""
    template = task.text if task.kind == "language_modeling" else task.prompt
    return task.render(template, row).lstrip(BYTE_ORDER_MARK)


def trimmed(task: Task, rows: datasets.Dataset, source: str) -> datasets.Dataset:
    """The rows from the first one that begins with ``task.start_at`` up to, not including, the first later one
    that begins with ``task.stop_at`` (either marker may be unset).

    Raises ``ValueError`` naming the task, the source and the marker when no row begins with it.
    """
    if task.start_at is None and task.stop_at is None:
        return rows
    texts = [row_text(task, row) for row in rows]
    start, stop = 0, len(texts)
    if task.start_at is not None:
        start = first_row_beginning(texts, task.start_at, 0, task, source, "start_at")
    if task.stop_at is not None:
        stop = first_row_beginning(texts, task.stop_at, start, task, source, "stop_at")
    return rows.select(range(start, stop))


def first_row_beginning(texts: list[str], marker: str, after: int, task: Task, source: str, option: str) -> int:
    """Index of the first text at or after ``after`` that begins with ``marker``."""
    for index in range(after, len(texts)):
        if texts[index].startswith(marker):
            return index
    where = "" if after == 0 else " after its start_at row"
    raise ValueError(
        f"task {task.name!r}: no row of {source}{where} begins with {option} {marker!r}; fix the marker (matched "
        f"at the start of a row, case-sensitive) or remove {option}"
    )


def without_patterns(task: Task, rows: datasets.Dataset) -> datasets.Dataset:
    """The rows with every match of ``task.remove`` (regular expressions) deleted from their text fields."""
    if not task.remove:
        return rows
    pattern = re.compile("|".join(f"(?:{expression})" for expression in task.remove))

    def clean(row: dict) -> dict:
        return {key: scrub(value, pattern) for key, value in row.items()}

    return rows.map(clean, load_from_cache_file=False)


def scrub(value, pattern: re.Pattern):
    """``value`` with ``pattern`` deleted from it, or from each string of a list; other values unchanged."""
    if isinstance(value, str):
        return pattern.sub("", value)
    if isinstance(value, list):
        return [pattern.sub("", item) if isinstance(item, str) else item for item in value]
    return value


def overlap_key(task: Task, row: dict) -> str:
    """What makes two rows the same question: the prompt, lower-cased, with punctuation and spacing collapsed (a
    copy that differs only in a trailing ``>`` or a line break is the same row)."""
    return re.sub(r"\W+", " ", row_text(task, row).lower()).strip()


def without_overlap(task: Task, rows: datasets.Dataset, held_out: list[datasets.Dataset]) -> datasets.Dataset:
    """The instruction rows whose prompt (:func:`overlap_key`) is not one of the ``held_out`` rows' prompts.

    Language-modelling rows are lines or documents of one text and stay as they are (a short line such as
    "CHAPTER II" recurs without leaking anything).
    """
    if task.kind == "language_modeling":
        return rows
    seen = {overlap_key(task, row) for split in held_out for row in split}
    keep = [index for index, row in enumerate(rows) if overlap_key(task, row) not in seen]
    return rows if len(keep) == len(rows) else rows.select(keep)
