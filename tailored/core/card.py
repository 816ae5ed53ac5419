"""The model card of an export: ``README.md`` with Hugging Face front matter, written from the pruning report.

A card written by :func:`model_card`::

    ---
    base_model: HuggingFaceTB/SmolLM2-135M-Instruct      what the hub links the model to
    library_name: transformers
    pipeline_tag: text-generation
    tags: [tailored, pruned, structured-pruning, lora, <task names>]
    ---
    shape        per-layer kept KV groups / channels / layers / hidden size (one line when uniform)
    parameters   before and after
    results      dense vs pruned on the validation split, with standard errors (after ``fit`` only)
    training     the command and the config the run used

Pure: the report, the summary of ``fit`` (:mod:`tailored.train.summary`) and the config text in, markdown out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import yaml

CARD_NAME = "README.md"
"""File name of the card in the export folder (what the Hugging Face hub shows)."""


def format_estimate(metrics: dict[str, float], name: str) -> str:
    """``metrics[name]`` with its standard error (``<name>_stderr``) when there is one: ``71.23 ± 3.1``."""
    value = f"{metrics[name]:.4g}"
    stderr = metrics.get(f"{name}_stderr")
    return value if stderr is None else f"{value} ± {stderr:.2g}"


def export_label(report: dict) -> str:
    """What the export is next to the dense model: ``pruned``, or ``tuned`` when the run pruned nothing."""
    return "pruned" if "target" in report else "tuned"


def metric_rows(summary: dict) -> list[list[str]]:
    """The summary's metrics as table rows: a header, then per task its primary metric and its loss, each model's
    value with its standard error."""
    models = list(summary["models"])
    rows = [["task", "metric", *(summary["labels"][model] for model in models)]]
    for task, entry in summary["tasks"].items():
        for metric in dict.fromkeys([entry["metric"], "loss"]):
            rows.append([task, metric, *(format_estimate(entry[model], metric) for model in models)])
    return rows


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows (the first one the header) as a markdown table."""
    header, *body = rows
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def shape_lines(report: dict) -> list[str]:
    """The learned shape: one line when every kept layer has the same shape, else a per-layer table."""
    layers = report.get("layers")
    if not layers:
        return ["The source model's shape: nothing was pruned, the LoRA adapters are merged into the weights."]
    dense = report.get("dense_layer", {})

    def of(count: int, key: str) -> str:
        return f"{count:,} of {dense[key]:,}" if key in dense else f"{count:,}"

    lines = [
        f"Layers: {of_pair(report['num_layers'])}; hidden size: {of_pair(report['hidden_size'])}.",
        "",
    ]
    shapes = {(layer["kv_heads"], layer["query_heads"], layer["mlp_channels"]) for layer in layers}
    if len(shapes) == 1:
        kv, query, channels = shapes.pop()
        lines.append(
            f"Every layer (uniform): {of(kv, 'kv_heads')} KV groups ({of(query, 'query_heads')} query heads), "
            f"{of(channels, 'mlp_channels')} MLP channels."
        )
        return lines
    rows = [["layer", "source layer", "KV groups", "query heads", "MLP channels", "kept KV groups"]]
    for index, layer in enumerate(layers):
        rows.append([
            str(index), str(layer["source_layer"]), of(layer["kv_heads"], "kv_heads"),
            of(layer["query_heads"], "query_heads"), of(layer["mlp_channels"], "mlp_channels"),
            ", ".join(map(str, layer["kept_kv_groups"])),
        ])  # fmt: skip
    return [*lines, markdown_table(rows)]


def of_pair(sizes: dict) -> str:
    """``{"before": 30, "after": 24}`` -> ``24 of 30``."""
    return f"{sizes['after']:,} of {sizes['before']:,}"


def tag(name: str) -> str:
    """A hub tag from a task name: lower case, runs of other characters than letters and digits as ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def model_card(
    report: dict,
    base_model: str | None = None,
    tasks: Sequence[str] = (),
    summary: dict | None = None,
    config_text: str | None = None,
    command: str | None = None,
) -> str:
    """The ``README.md`` of an export.

    Args:
        report: the export's pruning report (:func:`tailored.core.export.pruning_report` plus what
            :func:`tailored.train.exporting.export_run` adds).
        base_model: the source model's hub name (default: the report's ``source_model``).
        tasks: the task names the run tuned for (tags); the summary's tasks when it is given.
        summary: the end-of-fit summary (``fit_summary.json``): metrics of the dense and the exported model on the
            validation split, their parameter counts and the measured prefill speed-up.
        config_text: the YAML config the run used.
        command: the command that trained the model.
    """
    base_model = base_model or report.get("source_model")
    label = export_label(report)
    tasks = list(summary["tasks"]) if summary else list(tasks)
    tags = ["tailored", *(["pruned", "structured-pruning"] if label == "pruned" else []), "lora"]
    tags += [name for name in map(tag, tasks) if name and name not in tags]
    front = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags}
    if base_model:
        front = {"base_model": base_model} | front
    parameters = report.get("parameters", {})
    measured = (summary or {}).get("parameters", {})
    before, after = parameters.get("before", measured.get("dense")), parameters.get("after", measured.get("export"))
    source = f"`{base_model}`" if base_model else "its source model"
    what = "structurally pruned and LoRA-tuned" if label == "pruned" else "LoRA-tuned (not pruned)"
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {(base_model or 'model').rstrip('/').split('/')[-1]}, {label} by tailored",
        "",
        f"{source}, {what} with tailored in one run"
        + (f" for {', '.join(f'`{name}`' for name in tasks)}." if tasks else "."),
        "",
        "## Shape",
        "",
        *shape_lines(report),
        "",
        "## Parameters",
        "",
        markdown_table(parameter_rows(label, before, after)),
    ]
    if summary and summary["tasks"]:
        lines += [
            "",
            f"## Results ({summary['split']} split)",
            "",
            markdown_table(metric_rows(summary)),
            "",
            "± is the bootstrap standard error over the split's rows; both models are scored on the same rows.",
        ]
    if summary and summary.get("prefill"):
        prefill = summary["prefill"]
        lines += ["", f"Prefill speed-up over the dense model: {prefill_line(prefill)}."]
    loader = (
        'AutoModelForCausalLM.from_pretrained("<this folder or hub id>")'
        if report.get("format", "stock") == "stock"
        else 'AutoModelForCausalLM.from_pretrained("<this folder or hub id>", trust_remote_code=True)'
    )
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM", "", loader, "```"]
    if command or config_text:
        lines += ["", "## Training", ""]
        if command:
            lines += ["```bash", command, "```", ""]
        if config_text:
            lines += ["The config of the run (with any command-line overrides):", "", "```yaml", config_text.rstrip()]
            lines += ["```"]
    return "\n".join(lines).rstrip() + "\n"


def parameter_rows(label: str, before: int | None, after: int | None) -> list[list[str]]:
    """The parameter counts of the dense and the exported model (and the kept share), as table rows."""
    rows = [["model", "parameters"]]
    if before is not None:
        rows.append(["dense", f"{before:,}"])
    if after is not None:
        rows.append([label, f"{after:,}" + (f" ({after / before:.1%})" if before else "")])
    return rows


def prefill_line(prefill: dict, machine: str = "the training machine's") -> str:
    """``1.27x (dense 1.21 ms, exported 0.95 ms per 4x32 batch of tokens, ..., measured on <machine> cpu (...))``."""
    batch = "x".join(map(str, prefill["batch"]))
    return (
        f"{prefill['speedup']:.2f}x (dense {duration(prefill['dense_seconds'])}, exported "
        f"{duration(prefill['export_seconds'])} per {batch} batch of tokens, median of {prefill['repeats']} "
        f"after a warm-up, measured on {machine} {prefill['device']})"
    )


def duration(seconds: float) -> str:
    """``12.7 ms``, ``4.38 s``."""
    return f"{seconds:.3g} s" if seconds >= 1 else f"{1000 * seconds:.3g} ms"
