"""Tables of results: per-task metrics, and the comparison table of `tailored compare` (shares of the dense and the
tuned model, above chance where a metric has a chance level)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from tailored.data.metrics import PRIMARY_METRIC

MEASURABLE_STDERRS = 2.0
"""A task measures skill against a reference model only when the reference scores more than this many standard
errors above chance; within them, a share of the reference's skill is noise over noise."""


def share(value, reference, metric: str, chance: float | None = None):
    """``value``'s share of ``reference``'s in %, floats or tensors (bootstrap resamples) alike.

    Perplexity is inverted (reference / value: lower is better). A metric with a chance level counts the skill
    above it, ``(value - chance) / (reference - chance)``: a model that always gives one label keeps 0% of a tuned
    model's skill, not chance / tuned. Otherwise ``value / reference``. A float share is NaN where the reference
    is at chance (or 0).
    """
    if metric == "perplexity":
        return 100 * reference / value
    floor = 0.0 if chance is None else chance
    if not hasattr(reference, "shape") and reference == floor:
        return float("nan")
    return 100 * (value - floor) / (reference - floor)


def measurable(reference: float, stderr: float, chance: float | None) -> bool:
    """The reference model's score is more than :data:`MEASURABLE_STDERRS` standard errors above chance (always
    true without a chance level; an unknown error counts as 0)."""
    if chance is None:
        return True
    return reference - chance > MEASURABLE_STDERRS * (0.0 if math.isnan(stderr) else stderr)


def comparison_table(
    results: dict[str, dict[str, dict[str, float]]],
    kinds: dict[str, str],
    dense: str,
    tuned: str | None = None,
    outside_average: Sequence[str] = (),
    chance: dict[str, float | None] | None = None,
) -> dict:
    """Per task, each model's primary metric and its share of the dense model's ("% of dense", ATP's figure),
    and, when ``tuned`` is given, the pruned models' share of the tuned one's (what pruning costs at equal tuning).

    Args:
        results: model name -> task name -> metrics (as :meth:`TaskMetrics.compute` returns, with
            ``<metric>_stderr``).
        kinds: task name -> task kind.
        dense: the model name that every other is compared to.
        tuned: the dense model LoRA-tuned; the remaining models are compared to it as well.
        outside_average: tasks shown but left out of the average (general text next to the domain's tasks).
        chance: task name -> the chance level of its primary metric (:func:`tailored.data.metrics.chance_level`);
            those tasks' shares count the skill above chance (:func:`share`).
    Returns:
        ``{"tasks": {task: {"metric", model: value, "<model> % of <reference>": share, "unmeasurable":
        [references]}}, "average": {"<model> % of <reference>": share}, "outside_average": [...]}``. A task whose
        reference is within :data:`MEASURABLE_STDERRS` standard errors of chance is unmeasurable against it: its
        share is shown and left out of that reference's average, as are undefined (NaN) shares.
    """
    chance = chance or {}
    pairs = [(name, dense) for name in results if name != dense]
    if tuned is not None and tuned in results:
        pairs += [(name, tuned) for name in results if name not in (dense, tuned)]
    table, shares = {}, {f"{name} % of {reference}": [] for name, reference in pairs}
    for task, kind in kinds.items():
        metric, level = PRIMARY_METRIC[kind], chance.get(task)
        row = {"metric": metric} | {name: results[name][task][metric] for name in results}
        references = {reference for _, reference in pairs}
        row["unmeasurable"] = sorted(
            reference
            for reference in references
            if not measurable(row[reference], results[reference][task].get(f"{metric}_stderr", math.nan), level)
        )
        for name, reference in pairs:
            key = f"{name} % of {reference}"
            row[key] = share(row[name], row[reference], metric, level)
            if task not in outside_average and reference not in row["unmeasurable"]:
                shares[key].append(row[key])
        table[task] = row
    defined = {key: [value for value in values if not math.isnan(value)] for key, values in shares.items()}
    average = {key: sum(values) / len(values) if values else float("nan") for key, values in defined.items()}
    return {"tasks": table, "average": average, "outside_average": list(outside_average)}


def format_comparison(report: dict) -> str:
    """The comparison table as aligned text: one row per task and the average, one column per model and share;
    a share marked ``*`` is unmeasurable (its reference is at chance) and left out of the average."""
    tasks = report["tasks"]
    shares = list(report["average"])
    models = [key for key in next(iter(tasks.values())) if key not in ("metric", "unmeasurable", *shares)]
    header = ["task", "metric", *models, *shares]
    outside = report.get("outside_average", [])

    def line(task: str) -> list[str]:
        row = tasks[task]
        marks = {key: "*" if key.rsplit(" % of ", 1)[1] in row.get("unmeasurable", []) else "" for key in shares}
        return [task, row["metric"], *(f"{row[m]:.4g}" for m in models), *(f"{row[k]:.1f}{marks[k]}" for k in shares)]

    rows = [line(task) for task in tasks if task not in outside]
    rows.append(["average", "", *("" for _ in models), *(f"{report['average'][key]:.1f}" for key in shares)])
    rows += [line(task) for task in outside]  # after the average, which leaves them out
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)) for line in [header, *rows]
    ]
    if any(tasks[task].get("unmeasurable") for task in tasks):
        lines.append(
            f"* unmeasurable: the reference is within {MEASURABLE_STDERRS:g} standard errors of chance; left out of "
            "the average"
        )
    return "\n".join(lines)


def format_results(results: dict[str, dict[str, float]], stage: str = "test") -> str:
    """Per-task results as aligned text under ``<stage> results``, one line per task."""
    width = max(len(name) for name in results)
    lines = [
        f"{name.ljust(width)}  " + "  ".join(f"{metric} {value:.4g}" for metric, value in metrics.items())
        for name, metrics in results.items()
    ]
    return "\n".join([f"{stage} results", *lines])


def write_results(trainer, stage: str, results: dict[str, dict[str, float]], files: dict[str, dict]) -> None:
    """On rank zero: print ``results`` under ``<stage> results`` and, when the trainer has a logger, write
    ``files`` (name -> JSON; per-row files compact) to its log dir."""
    log_dir = trainer.log_dir if trainer.loggers else None  # every rank: log_dir broadcasts
    if not trainer.is_global_zero:
        return
    print(format_results(results, stage))
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        for name, values in files.items():
            indent = None if name.endswith("rows.json") else 2
            (Path(log_dir) / name).write_text(json.dumps(values, indent=indent) + "\n")
