"""Quality cells of several seeds pooled: each cell's skill average over the seeds, and its seed-paired difference
from the best two-stage cell at its budget, with 95% intervals that hold both the training and the test-row noise.

    python benchmarks/quality/quality_summary.py OUT --suite medical --out OUT/SUMMARY.md
    python benchmarks/quality/quality_summary.py benchmarks/results/quality-medical-h200/seed-0 \\
        benchmarks/results/quality-medical-h200/seed-1 --json /tmp/summary.json   # older cells

Folders are searched for ``quality-<suite>/cells``: the seed is the nearest ``seed-<n>`` folder on the way (else the
folder's position on the command line), the group (``benchmarks/quality/quality_grid.sh``'s ``main``, ``legal``,
...) the other folders between (``main`` when none). A cell is compared with the LoRA-tuned cell of the same token
budget and seed, and with the undistilled two-stage cells at its budget, of its own group or else of ``main``.

- **Skill average**: the mean over the measurable tasks of the share of the tuned model's score, above chance for
  accuracies (``benchmarks/quality/quality.py``). A task counts when every seed's tuned model is more than two
  standard errors above chance; the others are listed, not averaged.
- **Best two-stage**: at each budget, the two-stage method with the highest mean skill average over the seeds on the
  *validation* rows (the test rows only for older cells without validation figures, and then said so).
- **Differences** are seed-paired: per seed, the cell's skill average minus the rival's on the same test rows; the
  figure is their mean over seeds.
- **Intervals** (95%): ``mean ± t(n-1) * sqrt(s^2 / n + v_rows)``. ``s^2`` is the variance between seeds (training
  noise: LoRA initialisation, data order, gate noise); ``v_rows`` is the variance of the seed mean over paired
  bootstrap resamples of the test rows. The test rows are the same for every seed, so their noise does not shrink
  with more seeds: it is resampled once for every seed and both cells, and added rather than divided by ``n``. With
  one seed the interval holds the row noise alone (``t`` = 1.96), and says so.

Besides the Markdown summary, ``--json`` (default ``benchmarks/results/quality-summary.json``) receives the headline
of the ``main`` group of ``--suite``: per total budget and token budget, one-stage's skill average, the best
two-stage method's, their difference and its interval, and one-stage's share of the tuned model per task. Cells
made before budgets were fractions of the total parameters have no place in it and are reported as such.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

SEED_FOLDER = re.compile(r"seed-(\d+)")
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
         2.042)  # fmt: skip
"""Student's t 97.5% quantiles for 1..30 degrees of freedom (1.96 beyond: the normal's)."""

Groups = dict[tuple[str, str], dict[int, list[dict]]]
"""(suite, group) -> seed -> the finished cells."""


def finite_or_none(value: float) -> float | None:
    """``value``, or None where it is NaN (a share of a tuned model at chance): the JSON stays standard."""
    return None if math.isnan(value) else value


def load(folders: list[Path]) -> Groups:
    """Every ``quality-<suite>/cells`` folder under ``folders``, by suite, group and seed."""
    groups: Groups = {}
    for position, folder in enumerate(folders):
        for cells in sorted(folder.rglob("cells")):
            if not (cells.is_dir() and cells.parent.name.startswith("quality-")):
                continue
            parts = [folder.name, *cells.relative_to(folder).parts[:-2]]
            seeds = [int(match.group(1)) for part in parts if (match := SEED_FOLDER.fullmatch(part))]
            group = "/".join(part for part in parts[1:] if not SEED_FOLDER.fullmatch(part)) or "main"
            suite = cells.parent.name.removeprefix("quality-")
            rows = [json.loads(path.read_text()) for path in sorted(cells.glob("*.json"))]
            groups.setdefault((suite, group), {}).setdefault(seeds[-1] if seeds else position, []).extend(rows)
    return groups


def interval(values: list[float], resamples: list[torch.Tensor]) -> dict:
    """Mean of per-seed ``values`` and its 95% interval: seed variance / n plus the row variance of the seed mean
    (``resamples``: per seed, ``[RESAMPLES]`` values on the same resampled test rows)."""
    n = len(values)
    mean = sum(values) / n
    rows = float(torch.stack(resamples).mean(0).var())
    seeds = statistics.variance(values) / n if n > 1 else 0.0
    t = T_975[n - 2] if 2 <= n <= len(T_975) + 1 else 1.96
    half = t * math.sqrt(seeds + rows)
    return {"mean": mean, "ci95": [mean - half, mean + half], "seeds": n, "rows_only": n == 1}


def formatted(found: dict) -> str:
    low, high = found["ci95"]
    note = ", rows only" if found["rows_only"] else ""
    return f"{found['mean']:+.1f} [{low:+.1f}, {high:+.1f}{note}]"


class Pool:
    """The cells of one suite, with the references and rivals each cell is compared with."""

    def __init__(self, groups: Groups, suite: str) -> None:
        self.groups, self.suite = groups, suite
        self.chances = quality.chance_levels(suite) if suite in quality.SUITES else {}

    def cells(self, group: str, seed: int) -> list[dict]:
        return self.groups.get((self.suite, group), {}).get(seed, [])

    def reference(self, group: str, seed: int, cell: dict) -> dict | None:
        """The LoRA-tuned cell of ``cell``'s token budget: its group's, else main's, of the same seed."""
        return quality.reference_of(cell, self.cells(group, seed)) or quality.reference_of(
            cell, self.cells("main", seed)
        )

    def rivals(self, group: str, seed: int, key: tuple) -> list[dict]:
        """The undistilled two-stage cells at budget ``key``: its group's, else main's."""
        for source in (group, "main"):
            found = [
                cell
                for cell in self.cells(source, seed)
                if cell["method"] in quality.TWO_STAGE and not cell["distill"] and quality.budget(cell) == key
            ]
            if found:
                return found
        return []

    def pairable(self, cell: dict, reference: dict) -> bool:
        return all(quality.paired(cell, reference, task) for task in reference["tasks"])

    def tasks(self, references: list[dict]) -> list[str]:
        """The tasks every seed's reference measures (more than two standard errors above chance)."""
        measured = [set(quality.measurable_tasks(reference, self.chances)) for reference in references]
        return [task for task in references[0]["tasks"] if all(task in found for found in measured)]

    def compare(self, group: str, name: str) -> dict | None:
        """Cell ``name`` of ``group`` pooled over the seeds that have it with a pairable reference: its skill average
        and, for a cell that is not itself two-stage, the seed-paired difference from the best two-stage method."""
        seeds, cells, references = [], [], []
        for seed, rows in sorted(self.groups[self.suite, group].items()):
            cell = next((row for row in rows if quality.row_name(row) == name), None)
            reference = cell and self.reference(group, seed, cell)
            if cell and reference and cell is not reference and self.pairable(cell, reference):
                seeds, cells, references = [*seeds, seed], [*cells, cell], [*references, reference]
        if not seeds:
            return None
        tasks = self.tasks(references)
        if not tasks:
            return {"seeds": seeds, "tasks": [], "unmeasurable": list(references[0]["tasks"])}
        resamples = [
            quality.resampled_average(c, r, tasks, self.chances) for c, r in zip(cells, references, strict=True)
        ]
        values = [quality.skill_average(c, r, tasks, self.chances) for c, r in zip(cells, references, strict=True)]
        found = {
            "seeds": seeds,
            "tasks": tasks,
            "unmeasurable": [task for task in references[0]["tasks"] if task not in tasks],
            "per_seed": values,
            "skill": interval(values, resamples),
            "pct_of_tuned": {
                task: {
                    "pct": finite_or_none(
                        sum(
                            quality.share(c, r, task, self.chances.get(task))[0]
                            for c, r in zip(cells, references, strict=True)
                        )
                        / len(cells)
                    ),
                    "measurable": task in tasks,
                }
                for task in references[0]["tasks"]
            },
        }
        if cells[0]["method"] in quality.TWO_STAGE:
            return found
        rival = self.best_rival(group, seeds, cells, references, tasks)
        if rival is None:
            return found
        method, chosen_on, rivals = rival
        differences = [
            quality.skill_average(c, r, tasks, self.chances) - quality.skill_average(o, r, tasks, self.chances)
            for c, o, r in zip(cells, rivals, references, strict=True)
        ]
        resampled = [
            quality.resampled_average(c, r, tasks, self.chances) - quality.resampled_average(o, r, tasks, self.chances)
            for c, o, r in zip(cells, rivals, references, strict=True)
        ]
        rival_skill = interval(
            [quality.skill_average(o, r, tasks, self.chances) for o, r in zip(rivals, references, strict=True)],
            [quality.resampled_average(o, r, tasks, self.chances) for o, r in zip(rivals, references, strict=True)],
        )
        return found | {
            "rival": method,
            "rival_chosen_on": chosen_on,
            "rival_skill": rival_skill,
            "difference": interval(differences, resampled),
        }

    def best_rival(self, group: str, seeds: list[int], cells: list[dict], references: list[dict], tasks: list[str]):
        """(method, split it was chosen on, its cell per seed): the two-stage method present in every seed, pairable,
        with the highest mean skill average on the validation rows (the test rows where figures lack)."""
        per_seed = [
            {
                rival["method"]: rival
                for rival in self.rivals(group, seed, quality.budget(cell))
                if self.pairable(rival, reference)
            }
            for seed, cell, reference in zip(seeds, cells, references, strict=True)
        ]
        methods = sorted(set.intersection(*(set(found) for found in per_seed)))
        if not methods:
            return None
        everything = [found[m] for found in per_seed for m in methods] + references
        split = "validation" if all("validation" in cell for cell in everything) else "tasks"

        def score(method: str) -> float:
            values = [
                quality.skill_average(found[method], reference, tasks, self.chances, split)
                for found, reference in zip(per_seed, references, strict=True)
            ]
            return quality.nan_low(sum(values) / len(values))

        best = max(methods, key=score)
        return best, "validation" if split == "validation" else "test", [found[best] for found in per_seed]

    def notes(self) -> list[str]:
        """What cells lack, per group: a total budget, per-row values, validation figures, a reference of their
        token budget (a cell without one is not in the table), their own data seed."""
        lines = []
        for (suite, group), seeds in sorted(self.groups.items()):
            if suite != self.suite:
                continue
            rows = [row for cells in seeds.values() for row in cells if row["method"] != "dense"]
            lacking = {
                "a total budget (their budget is a kept fraction of prunable: not in the JSON headline)": [
                    row for row in rows if "total_kept" not in row and row["method"] != "lora"
                ],
                "per-row test values (not pairable: left out)": [row for row in rows if not row.get("rows")],
                "validation figures (their rival is chosen on the test rows)": [
                    row for row in rows if "validation" not in row
                ],
                "a LoRA-tuned reference of their seed and token budget (not in the table)": [
                    row
                    for seed, cells in seeds.items()
                    for row in cells
                    if row["method"] not in ("dense", "lora") and self.reference(group, seed, row) is None
                ],
                "a data seed of their own (made before the seeds varied the training stream, they drew seed 0's: "
                "their spread over seeds holds no data-order noise)": [
                    row
                    for seed, cells in seeds.items()
                    if seed != 0
                    for row in cells
                    if "data_seed" not in row and row["method"] != "dense"
                ],
            }
            for what, found in lacking.items():
                if found:
                    names = sorted({quality.row_name(row) for row in found})
                    files = f"{len(found)} cell files (all seeds)"
                    lines.append(f"- {suite}/{group}: {files} without {what}: {', '.join(names)}")
        return lines


def summary(groups: Groups, command: str) -> str:
    """The Markdown summary of every suite's cells."""
    lines = [
        f"Command: `{command}`",
        "",
        "Skill average: % of the LoRA-tuned model (same seed and token budget) above chance, over the measurable "
        "tasks; mean over seeds [95% interval: seed and test-row noise]. The difference is seed-paired, from the "
        "two-stage method best on validation at the same budget.",
        "",
        "| suite | group | cell | budget | seeds | skill per seed | skill average | best two-stage (chosen on) | "
        "difference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes, unmeasured = [], {}
    for suite in sorted({suite for suite, _ in groups}):
        pool = Pool(groups, suite)
        notes += pool.notes()
        for group in sorted({g for s, g in groups if s == suite}, key=lambda g: (g != "main", g)):
            seeds = groups[suite, group]
            names = {quality.row_name(row) for cells in seeds.values() for row in cells if row["method"] != "dense"}
            for name in sorted(names, key=lambda n: quality.table_order(named(seeds, n))):
                found = None if named(seeds, name)["method"] == "lora" else pool.compare(group, name)
                if found is None:
                    continue
                if found["unmeasurable"]:
                    unmeasured.setdefault((suite, tuple(found["unmeasurable"])), set()).add(group)
                if not found["tasks"]:
                    continue
                cell = named(seeds, name)
                used = ", ".join(map(str, found["seeds"]))
                per_seed = " / ".join(f"{value:.1f}" for value in found["per_seed"])
                rival, difference = "", ""
                if "difference" in found:
                    rival = (
                        f"{found['rival']} {formatted(found['rival_skill']).lstrip('+')} ({found['rival_chosen_on']})"
                    )
                    difference = formatted(found["difference"])
                budget = quality.budget_label(quality.budget(cell))
                skill = formatted(found["skill"]).lstrip("+")
                columns = [suite, group, name, budget, used, per_seed, skill, rival, difference]
                lines.append("| " + " | ".join(columns) + " |")
    for (suite, tasks), where in sorted(unmeasured.items()):
        notes.append(
            f"- {suite} ({', '.join(sorted(where))}): {', '.join(tasks)} unmeasurable (a tuned model within two "
            "standard errors of chance): shown in the seeds' tables, left out of the skill average"
        )
    return "\n".join([*lines, *(["", "Notes:", *notes] if notes else [])]) + "\n"


def named(seeds: dict[int, list[dict]], name: str) -> dict:
    """The first cell called ``name`` among the seeds' cells."""
    return next(row for cells in seeds.values() for row in cells if quality.row_name(row) == name)


def headline(groups: Groups, suite: str, command: str) -> dict:
    """The JSON headline: for the ``main`` group of ``suite``, per budget with a total kept fraction, one-stage
    against the best two-stage method (skill averages, points of % of tuned)."""
    pool = Pool(groups, suite)
    budgets = []
    cells = [row for rows in groups.get((suite, "main"), {}).values() for row in rows]
    ours = sorted(
        {quality.row_name(row) for row in cells if row["method"] == "one_stage" and not row["distill"]},
        key=lambda name: quality.table_order(next(row for row in cells if quality.row_name(row) == name)),
    )
    for name in ours:
        cell = next(row for row in cells if quality.row_name(row) == name)
        if "total_kept" not in cell:
            continue
        found = pool.compare("main", name)
        if not found or "difference" not in found:
            continue
        budgets.append(
            {
                "total_kept": cell["total_kept"],
                "steps_multiplier": cell.get("steps_multiplier", 1),
                "seeds": found["seeds"],
                "one_stage": found["skill"]["mean"],
                "best_two_stage": found["rival_skill"]["mean"],
                "best_two_stage_method": found["rival"],
                "difference": found["difference"]["mean"],
                "difference_ci95": found["difference"]["ci95"],
                "pct_of_tuned_one_stage": found["pct_of_tuned"],
            }
        )
    return {"command": command, "suite": suite, "budgets": budgets}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", type=Path, nargs="+", help="quality.py output folders (a grid's OUT, or seeds)")
    parser.add_argument("--suite", choices=sorted(quality.SUITES), default="medical", help="the JSON headline's")
    parser.add_argument("--out", type=Path, help="also write the Markdown summary here")
    parser.add_argument(
        "--json", type=Path, default=quality.ROOT / "benchmarks" / "results" / "quality-summary.json", help="headline"
    )
    args = parser.parse_args(argv)
    command = f"python benchmarks/quality/quality_summary.py {' '.join(sys.argv[1:] if argv is None else argv)}"
    groups = load(args.folders)
    text = summary(groups, command)
    print(text)
    if args.out:
        args.out.write_text(text)
    args.json.write_text(json.dumps(headline(groups, args.suite, command), indent=2) + "\n")


if __name__ == "__main__":
    main()
