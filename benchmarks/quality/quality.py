"""Pruning methods side by side: the same model, data, LoRA and token budget; held-out test rows; standard errors.

Each cell is one ``tailored fit`` (method, kept fraction, distillation) on a suite's config, then ``tailored test``
of its export on the suite's test rows. Cells are written to ``<out>/quality-<suite>/cells/<cell>.json`` as they
finish and are not re-run (kill the script at any time; run it again to continue; a failed cell is reported and
retried by the next run). ``--jobs N`` runs N cells at once (small models leave a GPU mostly idle). After every
cell the tables ``<out>/quality-<suite>.md`` and ``.json`` are rewritten with what is done so far::

    python benchmarks/quality/quality.py --suite medical --distill one_stage  # every method at kept 0.7 and 0.5
    python benchmarks/quality/quality.py --suite quickstart --budgets 0.7 --methods lora one_stage taylor

Methods: ``dense`` (no tuning), ``lora`` (the dense model LoRA-tuned: the 100% reference), ``one_stage`` (gates
learned while tuning, the config's settings), ``taylor``, ``magnitude``, ``random`` (two-stage: prune at step 0,
then tune). ``--distill one_stage ...`` also runs the named methods with distillation from the dense teacher.

``pct_of_tuned`` is each task's primary metric as a percentage of the LoRA-tuned model's (perplexity inverted:
lower is better). Cells keep their per-row test values, so its standard error is a paired bootstrap: the same
resampled rows for both models (cells without rows fall back to combining the two errors as if independent,
which overstates it). The tables end with paired differences: at each budget, the best one-stage cell against the
best two-stage one, in points of the average % of tuned.

PubMedQA's primary metric is balanced accuracy (mean per-label accuracy): plain accuracy rewards the "yes" prior,
which every pruned model answers on every row (its accuracy stays in the cells as ``also``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUITES = {
    "medical": {"config": "configs/medical.yaml", "tasks": {"pubmedqa": "balanced_accuracy", "hqs": "rougeL"}},
    "legal": {
        "config": "configs/legal.yaml",
        "tasks": {"casehold": "accuracy", "billsum": "rougeL", "multilegalpile": "perplexity"},
    },
    "quickstart": {"config": "configs/quickstart.yaml", "tasks": {"botchan": "perplexity"}},
}
PRUNED_METHODS = ("one_stage", "taylor", "magnitude", "random")
ALSO = {"balanced_accuracy": "accuracy"}  # a secondary metric kept in the cells next to the primary one
RESAMPLES = 1000


def cell_name(method: str, kept: float | None, distill: bool) -> str:
    return method if kept is None else f"{method}-{kept:g}" + ("-distill" if distill else "")


def tailored(*args: str, log: Path) -> None:
    """Run the ``tailored`` command, appending its output to ``log``; raise if it fails."""
    with log.open("a") as stream:
        stream.write(f"\n$ tailored {' '.join(args)}\n")
        stream.flush()
        done = subprocess.run([sys.executable, "-m", "tailored.cli", *args], stdout=stream, stderr=stream, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"tailored {args[0]} failed (exit {done.returncode}); see {log}")


def run_cell(suite: dict, method: str, kept: float | None, distill: bool, folder: Path, extra: list[str]) -> dict:
    """Fit (unless dense) and test one cell, from scratch (a killed attempt's files are removed); return its row."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    log = folder / "log.txt"
    config = ["-c", suite["config"], *extra]
    seconds, model, report = 0.0, None, {}
    if method != "dense":
        options = ["--trainer.default_root_dir", str(folder / "fit"), "--trainer.limit_val_batches", "0"]
        if method == "lora":
            options += ["--model.pruning", "null"]
        else:
            options += ["--model.pruning.target", str(kept), "--model.pruning.method", method]
        if distill:
            options += ["--model.distill.weight", str(ARGS.distill_weight)]
        else:
            options += ["--model.distill", "null"]
        start = time.monotonic()
        tailored("fit", *config, *options, log=log)
        seconds = time.monotonic() - start
        export = max((folder / "fit" / "lightning_logs").glob("version_*/export"))
        model = str(export)
        report = json.loads((export / "pruning_report.json").read_text())
    test = ["--trainer.default_root_dir", str(folder / "test"), "--model.pruning", "null"]
    if ARGS.test_batch_size:
        test += ["--data.batch_size", str(ARGS.test_batch_size)]
    if model is not None:
        test += ["--model.model", model]
    tailored("test", *config, *test, log=log)
    results_file = max((folder / "test").rglob("test_results.json"))
    per_row = json.loads((results_file.parent / "test_rows.json").read_text())
    validate = [*test, "--trainer.default_root_dir", str(folder / "validation")]
    tailored("validate", *config, *validate, log=log)
    validation_file = max((folder / "validation").rglob("val_results.json"))
    return {
        "method": method,
        "kept_fraction": kept if kept is not None else 1.0,
        "distill": distill,
        "tasks": primary_metrics(suite, json.loads(results_file.read_text())),
        "validation": primary_metrics(suite, json.loads(validation_file.read_text())),
        "rows": {task: per_row[task] for task in suite["tasks"]},
        "parameters": report.get("parameters", {}).get("after"),
        "seconds": round(seconds, 1),
    }


def primary_metrics(suite: dict, results: dict) -> dict:
    """Per task of the suite: its primary metric's value and standard error (and the secondary one) in
    ``results`` (a ``test_results.json`` or ``val_results.json``)."""
    return {
        task: {"metric": metric, "value": results[task][metric], "stderr": results[task][f"{metric}_stderr"]}
        | ({"also": {ALSO[metric]: results[task][ALSO[metric]]}} if metric in ALSO else {})
        for task, metric in suite["tasks"].items()
    }


def share(row: dict, reference: dict, task: str) -> tuple[float, float]:
    """(value as % of the reference's, its standard error); perplexity inverted; NaN where a value is 0. The error
    is the paired bootstrap of :func:`resampled_shares` where both cells kept their rows."""
    mine, ref = row["tasks"][task], reference["tasks"][task]
    if row is reference:
        return 100.0, 0.0
    if mine["metric"] != ref["metric"]:  # cells tested before and after a change of the suite's metric
        return float("nan"), float("nan")
    if not (mine["value"] and ref["value"]):
        return (0.0 if ref["value"] and mine["metric"] != "perplexity" else float("nan")), float("nan")
    perplexity = mine["metric"] == "perplexity"
    value = 100 * (ref["value"] / mine["value"] if perplexity else mine["value"] / ref["value"])
    if paired(row, reference, task):
        return value, float(resampled_shares(row, reference, task).std())
    relative = math.hypot(mine["stderr"] / mine["value"], ref["stderr"] / ref["value"])
    return value, value * relative


def paired(row: dict, reference: dict, task: str) -> bool:
    """Both cells kept the per-row test values of ``task``, on the same rows."""
    mine, ref = row.get("rows", {}).get(task), reference.get("rows", {}).get(task)
    return bool(mine and ref) and len(mine["nll"]) == len(ref["nll"])


def resampled_shares(row: dict, reference: dict, task: str, seed: int = 0):
    """``[RESAMPLES]`` values of the share (%) on bootstrap resamples of the rows, the same rows for both cells
    (Efron & Tibshirani 1993, ch. 6): the noise of the test rows that both models see cancels out."""
    import torch  # imported here: the tables of cells without rows need no torch

    from tailored.data.metrics import row_statistic

    metric = row["tasks"][task]["metric"]
    columns = [
        {name: torch.tensor(values, dtype=torch.float64) for name, values in cell["rows"][task].items()}
        for cell in (row, reference)
    ]
    count = len(columns[0]["nll"])
    index = torch.randint(count, (RESAMPLES, count), generator=torch.Generator().manual_seed(seed))
    mine, ref = (row_statistic(metric, {k: v[index] for k, v in c.items()}) for c in columns)
    return 100 * (ref / mine if metric == "perplexity" else mine / ref)


def resampled_average(row: dict, reference: dict):
    """``[RESAMPLES]`` values of the average % of tuned over the reference's tasks; task ``i`` resamples its rows
    with seed ``i``, so the resamples of two cells pair row for row."""
    tasks = list(reference["tasks"])
    return sum(resampled_shares(row, reference, task, seed) for seed, task in enumerate(tasks)) / len(tasks)


def paired_difference(row: dict, other: dict, reference: dict) -> tuple[float, float] | None:
    """``row``'s average % of tuned minus ``other``'s, and the paired bootstrap error of the difference (every
    task's rows resampled once for all three cells); None unless all three kept their rows."""
    tasks = list(reference["tasks"])
    if not all(paired(cell, reference, task) for cell in (row, other) for task in tasks):
        return None
    difference = resampled_average(row, reference) - resampled_average(other, reference)
    return row["pct_of_tuned_avg"] - other["pct_of_tuned_avg"], float(difference.std())


def tables(rows: list[dict], suite_name: str, header: list[str]) -> tuple[dict, str]:
    """The JSON document and the Markdown table of the finished rows."""
    reference = next((row for row in rows if row["method"] == "lora"), None)
    for row in rows:
        if reference is None:
            break
        shares = {task: share(row, reference, task) for task in row["tasks"]}
        row["pct_of_tuned"] = {task: value for task, (value, _) in shares.items()}
        row["pct_of_tuned_stderr"] = {task: error for task, (_, error) in shares.items()}
        values = [value for value, _ in shares.values()]
        row["pct_of_tuned_avg"] = sum(values) / len(values)
        row["pct_of_tuned_avg_stderr"] = math.sqrt(sum(e**2 for _, e in shares.values())) / len(values)
        if all(paired(row, reference, task) for task in row["tasks"]) and row is not reference:
            row["pct_of_tuned_avg_stderr"] = float(resampled_average(row, reference).std())
    tasks = list(SUITES[suite_name]["tasks"].items())
    if rows:  # the metric the cells were tested with (older cells of a suite may predate a change of metric)
        tasks = [(task, rows[0]["tasks"][task]["metric"]) for task, _ in tasks]
    validated = any("validation" in row for row in rows)  # cells made before validation was measured have none
    columns = ["method", "kept", "distill", *(f"{task} {metric}" for task, metric in tasks)]
    columns += [f"validation {task} {metric}" for task, metric in tasks] if validated else []
    columns += ["% of tuned (avg)", "parameters", "fit s"]
    lines = [*header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in sorted(rows, key=lambda r: (-r["kept_fraction"], r["method"], r["distill"])):
        cells = [row["method"], f"{row['kept_fraction']:g}", "yes" if row["distill"] else ""]
        cells += [f"{row['tasks'][t]['value']:.4g} ± {row['tasks'][t]['stderr']:.2g}" for t, _ in tasks]
        if validated:
            found = row.get("validation", {})
            cells += [f"{found[t]['value']:.4g} ± {found[t]['stderr']:.2g}" if t in found else "" for t, _ in tasks]
        average = row.get("pct_of_tuned_avg")
        cells.append("" if average is None else f"{average:.1f} ± {row['pct_of_tuned_avg_stderr']:.1f}")
        cells += [f"{row['parameters']:,}" if row["parameters"] else "", f"{row['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += comparisons(rows, reference)
    return {"header": header, "rows": rows}, "\n".join(lines) + "\n"


def comparisons(rows: list[dict], reference: dict | None) -> list[str]:
    """Markdown lines: at each budget, the best one-stage cell minus the best undistilled two-stage cell (average %
    of tuned), with the paired bootstrap error of that difference."""
    lines = []
    for kept in sorted({row["kept_fraction"] for row in rows if row["method"] in PRUNED_METHODS}, reverse=True):
        at_budget = [row for row in rows if row["kept_fraction"] == kept and "pct_of_tuned_avg" in row]
        ours = [row for row in at_budget if row["method"] == "one_stage"]
        theirs = [row for row in at_budget if row["method"] in PRUNED_METHODS[1:] and not row["distill"]]
        if not (ours and theirs):
            continue
        best, rival = (max(cells, key=lambda row: row["pct_of_tuned_avg"]) for cells in (ours, theirs))
        names = " - ".join(cell_name(cell["method"], kept, cell["distill"]) for cell in (best, rival))
        difference = paired_difference(best, rival, reference)
        if difference is None:  # cells without per-row values: the errors combined as if independent
            value = best["pct_of_tuned_avg"] - rival["pct_of_tuned_avg"]
            error = math.hypot(best["pct_of_tuned_avg_stderr"], rival["pct_of_tuned_avg_stderr"])
            names += ", unpaired"
        else:
            value, error = difference
        lines.append(f"- kept {kept:g}, best one-stage minus best two-stage ({names}): {value:+.1f} ± {error:.1f}")
    if not lines:
        return []
    return ["", "Paired differences (average % of tuned; paired bootstrap over the test rows):", *lines]


def main() -> None:
    out = ARGS.out / f"quality-{ARGS.suite}"
    cells_dir = out / "cells"
    suite = SUITES[ARGS.suite]
    plan = [(method, None, False) for method in ARGS.methods if method in ("dense", "lora")]
    for kept in ARGS.budgets:
        for method in ARGS.methods:
            if method in PRUNED_METHODS:
                if not (ARGS.distilled_only and method in ARGS.distill):
                    plan.append((method, kept, False))
                if method in ARGS.distill:
                    plan.append((method, kept, True))
    header = [
        f"# Quality: {ARGS.suite} suite",
        "",
        f"Command: `python benchmarks/quality/quality.py {' '.join(sys.argv[1:])}`  ",
        f"Config: `{suite['config']}` {' '.join(ARGS.extra)}  ",
        f"Versions: tailored {version('tailored')}, torch {version('torch')}, transformers {version('transformers')}, "
        f"peft {version('peft')}, lightning {version('lightning')}  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
        f"Python {platform.python_version()}, accelerator: {accelerator()}  ",
        "Values: test-row metric ± bootstrap standard error (validation columns: the validation rows, on which "
        "settings are chosen); % of tuned: share of the LoRA-tuned dense model's on the test rows.",
    ]
    existing = ARGS.out / f"quality-{ARGS.suite}.json"
    if ARGS.report_only and existing.is_file():  # keep the header of the run that made the cells
        header = json.loads(existing.read_text())["header"]
    todo = [cell for cell in plan if not (cells_dir / f"{cell_name(*cell)}.json").is_file()]
    if not ARGS.report_only:
        lock = threading.Lock()  # one table writer at a time

        def finish(cell: tuple) -> None:
            name = cell_name(*cell)
            print(f"running {name}", flush=True)
            try:
                row = run_cell(suite, *cell, ARGS.runs / ARGS.suite / name, ARGS.extra)
            except RuntimeError as error:  # the other cells go on; running the script again retries this one
                print(f"failed {name}: {error}", flush=True)
                return
            with lock:
                cells_dir.mkdir(parents=True, exist_ok=True)
                (cells_dir / f"{name}.json").write_text(json.dumps(row, indent=2) + "\n")
                write_tables(cells_dir, header)
            print(f"done {name}", flush=True)

        with ThreadPoolExecutor(ARGS.jobs) as pool:  # cells are subprocesses: threads only wait on them
            list(pool.map(finish, todo))
    print(write_tables(cells_dir, header))


def accelerator() -> str:
    """The GPU the cells' ``tailored`` calls will use, or ``cpu``."""
    import torch  # imported here: only the header needs it

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def write_tables(cells_dir: Path, header: list[str]) -> str:
    """Rewrite ``quality-<suite>.json`` and ``.md`` from the finished cells; return the Markdown."""
    rows = [json.loads(p.read_text()) for p in sorted(cells_dir.glob("*.json"))]
    document, markdown = tables(rows, ARGS.suite, header)
    ARGS.out.mkdir(parents=True, exist_ok=True)
    (ARGS.out / f"quality-{ARGS.suite}.json").write_text(json.dumps(document, indent=2) + "\n")
    (ARGS.out / f"quality-{ARGS.suite}.md").write_text(markdown)
    return markdown


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="medical")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5], help="kept fractions of prunable")
    parser.add_argument(
        "--methods", nargs="+", default=["dense", "lora", *PRUNED_METHODS], choices=["dense", "lora", *PRUNED_METHODS]
    )
    parser.add_argument(
        "--distill", nargs="*", default=[], choices=PRUNED_METHODS, help="also run these methods with distillation"
    )
    parser.add_argument("--distill-weight", type=float, default=0.5)
    parser.add_argument("--distilled-only", action="store_true", help="run the --distill methods with it only")
    parser.add_argument(
        "--test-batch-size", type=int, help="rows per test batch (the results do not depend on it; a GPU takes more)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once (a GPU has room for several)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the tables from finished cells only")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "quality", help="where the runs are written")
    parser.add_argument("extra", nargs="*", help="options passed to every tailored call, after --")
    args = parser.parse_args(argv)
    args.out, args.runs = args.out.resolve(), args.runs.resolve()  # the tailored calls run in the repository root
    return args


if __name__ == "__main__":
    ARGS = parse_args()
    main()
