"""The quickstart table: every quickstart cell of several seeds, test and validation perplexity side by side.

    python benchmarks/quality/quickstart_table.py benchmarks/results/quickstart-clean/seed-0 \
        benchmarks/results/quickstart-clean/seed-1 benchmarks/results/quickstart-clean/seed-2 \
        --out benchmarks/results/quickstart-clean/README.md

Each seed folder is the ``--out`` of one ``benchmarks/quality/quality.py --suite quickstart`` run (its cells in
``quality-quickstart/cells``). Per cell: the test perplexity of each seed, their mean with the pooled test-row error
sqrt(sum of squared errors) / seeds (the spread between seeds, training noise, is shown next to it), the same for the
validation rows, and the paired difference of "% of tuned" from two-stage Taylor with the same distillation setting
(the same test rows, so a paired bootstrap; pooled over seeds). Defaults are chosen on the validation columns.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_summary import average_share, pooled  # noqa: E402  (benchmarks/ is a folder of scripts)

TASK = "botchan"
ORDER = ["dense", "lora", "taylor-0.7", "taylor-0.7-distill", "one_stage-0.7", "one_stage-0.7-distill"]
LABELS = {
    "dense": "dense, untuned",
    "lora": "dense, LoRA-tuned",
    "taylor-0.7": "two-stage Taylor",
    "taylor-0.7-distill": "two-stage Taylor + distillation",
    "one_stage-0.7": "one-stage",
    "one_stage-0.7-distill": "one-stage + distillation",
}


def seed_cells(folder: Path) -> dict[str, dict]:
    """Cell name -> cell of one seed's quality.py output folder."""
    cells = sorted((folder / "quality-quickstart" / "cells").glob("*.json"))
    return {path.stem: json.loads(path.read_text()) for path in cells}


def mean_with_errors(rows: list[dict]) -> str:
    """Mean value over seeds ± the pooled test-row error sqrt(sum stderr^2) / seeds, and the seeds' spread."""
    values = [row["value"] for row in rows]
    error = math.sqrt(sum(row["stderr"] ** 2 for row in rows)) / len(rows)
    spread = f", spread {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{sum(values) / len(values):.1f} ± {error:.1f}{spread}"


def table(seeds: list[Path]) -> str:
    """The Markdown table of the cells found in every seed folder (dense: in any)."""
    runs = [seed_cells(folder) for folder in seeds]
    lines = [
        "| model | parameters | test perplexity per seed | test mean ± error | validation mean ± error | "
        "% of tuned minus Taylor's (paired, points) |",
        "|---|---|---|---|---|---|",
    ]
    for name in ORDER:
        cells = [run[name] for run in runs if name in run]
        if not cells:
            continue
        test = [cell["tasks"][TASK] for cell in cells]
        per_seed = " / ".join(f"{row['value']:.1f}" for row in test)
        validation = mean_with_errors([cell["validation"][TASK] for cell in cells])
        parameters = f"{cells[0]['parameters']:,}" if cells[0]["parameters"] else ""
        lines.append(
            f"| {LABELS[name]} | {parameters} | {per_seed} | {mean_with_errors(test)} | {validation} | "
            f"{difference_from_taylor(name, runs)} |"
        )
    return "\n".join(lines) + "\n"


def difference_from_taylor(name: str, runs: list[dict[str, dict]]) -> str:
    """Mean over seeds of (this cell's % of tuned) - (Taylor's with the same distillation), paired per seed."""
    if not name.startswith("one_stage"):
        return ""
    rival = name.replace("one_stage", "taylor")
    differences, errors = [], []
    for run in runs:
        if not {name, rival, "lora"} <= set(run):
            continue
        (ours, ours_resamples), (theirs, theirs_resamples) = (
            average_share(run[key], run["lora"]) for key in (name, rival)
        )
        differences.append(ours - theirs)
        errors.append(float((ours_resamples - theirs_resamples).std()))
    return pooled(differences, errors) if differences else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("seeds", type=Path, nargs="+", help="quality.py --out folders, one per seed")
    parser.add_argument("--out", type=Path, help="also write the table (with its command) to this Markdown file")
    args = parser.parse_args()
    markdown = table(args.seeds)
    print(markdown)
    if args.out:
        command = " ".join(["python", "benchmarks/quality/quickstart_table.py", *sys.argv[1:]])
        header = f"# Quickstart on the cleaned novel\n\nCommand: `{command}`\n\n"
        args.out.write_text(header + markdown)


if __name__ == "__main__":
    main()
