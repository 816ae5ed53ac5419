"""Tables of results: per-task metrics, and the comparison table of `tailored compare` (shares of the dense model)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from tailored.data.metrics import PRIMARY_METRIC


def comparison_table(
    results: dict[str, dict[str, dict[str, float]]],
    kinds: dict[str, str],
    dense: str,
    tuned: str | None = None,
    outside_average: Sequence[str] = (),
) -> dict:
    """Per task, each model's primary metric and its share of the dense model's ("% of dense", ATP's figure),
    and, when ``tuned`` is given, the pruned models' share of the tuned one's (what pruning costs at equal tuning).

    Args:
        results: model name -> task name -> metrics (as :meth:`TaskMetrics.compute` returns).
        kinds: task name -> task kind.
        dense: the model name that every other is compared to.
        tuned: the dense model LoRA-tuned; the remaining models are compared to it as well.
        outside_average: tasks shown but left out of the average (general text next to the domain's tasks).
    Returns:
        ``{"tasks": {task: {"metric", model: value, "<model> % of <reference>": share}}, "average": {"<model> % of
        <reference>": share}}``; perplexity's share is reference / model (lower is better), the others' model /
        reference. A share is undefined (NaN) where the reference scores 0; the average leaves such tasks out.
    """
    pairs = [(name, dense) for name in results if name != dense]
    if tuned is not None and tuned in results:
        pairs += [(name, tuned) for name in results if name not in (dense, tuned)]
    table, shares = {}, {f"{name} % of {reference}": [] for name, reference in pairs}
    for task, kind in kinds.items():
        metric = PRIMARY_METRIC[kind]
        row = {"metric": metric} | {name: results[name][task][metric] for name in results}
        for name, reference_name in pairs:
            value, reference = row[name], row[reference_name]
            share = reference / value if metric == "perplexity" else value / reference if reference else float("nan")
            row[f"{name} % of {reference_name}"] = 100 * share
            if task not in outside_average:
                shares[f"{name} % of {reference_name}"].append(100 * share)
        table[task] = row
    defined = {key: [value for value in values if not math.isnan(value)] for key, values in shares.items()}
    average = {key: sum(values) / len(values) if values else float("nan") for key, values in defined.items()}
    return {"tasks": table, "average": average, "outside_average": list(outside_average)}


def format_comparison(report: dict) -> str:
    """The comparison table as aligned text: one row per task and the average, one column per model and share."""
    tasks = report["tasks"]
    shares = list(report["average"])
    models = [key for key in next(iter(tasks.values())) if key != "metric" and key not in shares]
    header = ["task", "metric", *models, *shares]
    outside = report.get("outside_average", [])

    def line(task: str) -> list[str]:
        row = tasks[task]
        return [task, row["metric"], *(f"{row[m]:.4g}" for m in models), *(f"{row[key]:.1f}" for key in shares)]

    rows = [line(task) for task in tasks if task not in outside]
    rows.append(["average", "", *("" for _ in models), *(f"{report['average'][key]:.1f}" for key in shares)])
    rows += [line(task) for task in outside]  # after the average, which leaves them out
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)) for line in [header, *rows]
    )


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
