"""Quality cells of several runs (seeds) side by side: % of the LoRA-tuned model per run, the mean over runs, and
every pruned cell's paired difference from the best two-stage baseline at its budget.

    python benchmarks/quality/quality_summary.py benchmarks/results/quality-medical-h200/seed-0 \
        benchmarks/results/quality-medical-h200/seed-1 --out benchmarks/results/quality-medical-h200/README.md

Each run folder holds groups as ``benchmarks/quality/quality_grid.sh`` writes them
(``<group>/quality-<suite>/cells``). A
cell is compared with the LoRA-tuned cell and the undistilled two-stage cells (taylor, magnitude, random) of its own
group, or of the group ``main`` of the same suite where its group has none: the same test rows, so each comparison
is a paired bootstrap over them (``benchmarks/quality/quality.py``). Runs are independent (other seeds), so a
mean over runs
has the error sqrt(sum of squared errors) / runs; that error holds the test rows' noise only, and the spread between
runs shows the training noise next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

TWO_STAGE = quality.PRUNED_METHODS[1:]


def load(run: Path) -> dict[tuple[str, str], list[dict]]:
    """(group, suite) -> the finished cells of one run folder."""
    groups = {}
    for cells in sorted(run.glob("*/quality-*/cells")):
        group, suite = cells.parent.parent.name, cells.parent.name.removeprefix("quality-")
        groups[group, suite] = [json.loads(path.read_text()) for path in sorted(cells.glob("*.json"))]
    return groups


def average_share(cell: dict, reference: dict):
    """(average % of tuned, its paired bootstrap resamples ``[RESAMPLES]``: :func:`quality.resampled_average`)."""
    tasks = list(reference["tasks"])
    value = sum(quality.share(cell, reference, task)[0] for task in tasks) / len(tasks)
    return value, quality.resampled_average(cell, reference)


def compare(groups: dict[tuple[str, str], list[dict]]) -> dict[tuple, dict]:
    """(suite, group, cell name) -> share, its error, and the difference from the best two-stage baseline (its
    own group's, else main's) at that budget with the error of the difference."""
    out = {}
    for (group, suite), cells in groups.items():
        own_or_main = cells if any(c["method"] == "lora" for c in cells) else groups.get(("main", suite), [])
        reference = next((c for c in own_or_main if c["method"] == "lora"), None)
        if reference is None:
            continue
        paired, main = pairable(cells, reference), pairable(groups.get(("main", suite), []), reference)
        for cell in paired:  # cells without per-row values (or tested on other rows) cannot be paired: left out
            if cell is reference or cell["method"] == "dense":
                continue
            value, resamples = average_share(cell, reference)
            row = {"share": value, "share_stderr": float(resamples.std())}
            at_budget = [c for c in two_stage(paired) if c["kept_fraction"] == cell["kept_fraction"]]
            at_budget = at_budget or [c for c in two_stage(main) if c["kept_fraction"] == cell["kept_fraction"]]
            rivals = [(average_share(c, reference), c) for c in at_budget]
            if rivals and cell["method"] not in TWO_STAGE:
                (rival_value, rival_resamples), rival = max(rivals, key=lambda pair: pair[0][0])
                row["rival"] = name(rival)
                row["difference"] = value - rival_value
                row["difference_stderr"] = float((resamples - rival_resamples).std())
            out[suite, group, name(cell)] = row
    return out


def pairable(cells: list[dict], reference: dict) -> list[dict]:
    """The cells that kept per-row values of the reference's test rows (older cells did not)."""
    return [cell for cell in cells if all(quality.paired(cell, reference, task) for task in reference["tasks"])]


def two_stage(cells: list[dict]) -> list[dict]:
    """The undistilled two-stage baseline cells."""
    return [cell for cell in cells if cell["method"] in TWO_STAGE and not cell["distill"]]


def name(cell: dict) -> str:
    return quality.cell_name(cell["method"], cell["kept_fraction"], cell["distill"])


def pooled(values: list[float], errors: list[float]) -> str:
    """Mean over independent runs ± the error of that mean."""
    mean = sum(values) / len(values)
    return f"{mean:+.1f} ± {math.sqrt(sum(e * e for e in errors)) / len(errors):.1f}"


def summary(runs: list[Path]) -> str:
    """The Markdown summary of the runs' cells."""
    compared = [compare(load(run)) for run in runs]
    keys = sorted(set().union(*compared), key=lambda k: (k[0], k[1] != "main", k[1], k[2]))
    runs_header = " | ".join(run.name for run in runs)
    lines = [
        f"Command: `python benchmarks/quality/quality_summary.py {' '.join(sys.argv[1:])}`  ",
        f"Runs: {', '.join(str(run) for run in runs)}",
        "",
        f"% of tuned (average over the suite's tasks) per run: {runs_header}; then the mean. The difference is from "
        "the best undistilled two-stage cell at the same budget (paired bootstrap over the test rows).",
        "",
        f"| suite | group | cell | {runs_header} | mean % of tuned | vs best two-stage, per run | mean difference |",
        "|---|---|---|" + "---|" * len(runs) + "---|---|---|",
    ]
    for key in keys:
        rows = [c.get(key) for c in compared]
        if any(row is None for row in rows):
            continue
        shares = " | ".join(f"{row['share']:.1f} ± {row['share_stderr']:.1f}" for row in rows)
        mean = pooled([r["share"] for r in rows], [r["share_stderr"] for r in rows]).lstrip("+")
        versus, difference = "", ""
        if all("difference" in row for row in rows):
            versus = ", ".join(f"{r['difference']:+.1f} ± {r['difference_stderr']:.1f} ({r['rival']})" for r in rows)
            difference = pooled([r["difference"] for r in rows], [r["difference_stderr"] for r in rows])
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {shares} | {mean} | {versus} | {difference} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run folders (one per seed) of quality_grid.sh groups")
    parser.add_argument("--out", type=Path, help="also write the summary here")
    args = parser.parse_args()
    text = summary(args.runs)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
