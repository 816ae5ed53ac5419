"""The quickstart table: quickstart cells of several seeds, test and validation perplexity side by side.

    python benchmarks/quality/quickstart_table.py \
        benchmarks/results/quickstart-clean benchmarks/results/quickstart-learned/learned \
        benchmarks/results/quickstart-learned/settle --out benchmarks/results/quickstart-learned/README.md

Each folder holds ``seed-<n>`` folders, each the ``--out`` of one ``benchmarks/quality/quality.py --suite
quickstart`` run for that seed (older runs) or the ``seed-<n>`` folders of a multi-seed run (its cells in
``seed-<n>/quality-quickstart/cells``). A cell's row is named by its folder and cell (``learned/one_stage-0.764666``),
so the same method run with other settings (another folder) gets its own row. Per row: the test perplexity of each
seed, the mean with the pooled test-row error sqrt(sum of squared errors) / seeds (the spread between seeds, training
noise, next to it), the same for the validation rows, and the seed-paired difference of "% of tuned" from two-stage
Taylor (``--rival``, by default ``quickstart-clean/taylor-0.7``, the same parameter count) with its 95% interval over
seeds and test rows (``quality_summary.py``'s). The tuned reference of every seed is that seed's ``lora`` cell,
found in any folder. ``--alias`` pools the seeds of one cell definition made by several runs. Defaults are chosen on
the validation columns.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import paired, resampled_average, skill_average  # noqa: E402  (benchmarks/ is a folder of scripts)
from quality_summary import formatted, interval  # noqa: E402

TASK = "botchan"
RIVAL = "quickstart-clean/taylor-0.7"
SEED = re.compile(r"seed-(\d+)")


def seed_cells(folders: list[Path], aliases: dict[str, str] | None = None) -> dict[int, dict[str, dict]]:
    """Seed -> ``<folder>/<cell>`` -> cell, for every ``seed-<n>/quality-quickstart/cells/*.json`` under
    ``folders``. ``aliases`` renames a row to another (the same cell definition made by another run, e.g. more
    seeds): their seeds then pool in one row; a seed found under both names is an error."""
    found: dict[int, dict[str, dict]] = {}
    for folder in folders:
        for path in sorted(folder.glob("seed-*/quality-quickstart/cells/*.json")):
            seed = int(SEED.fullmatch(path.parents[2].name).group(1))
            name = f"{folder.name}/{path.stem}"
            name = (aliases or {}).get(name, name)
            if name in found.get(seed, {}):
                raise SystemExit(f"seed {seed} has two cells named {name} ({path}): drop an alias or a folder")
            found.setdefault(seed, {})[name] = json.loads(path.read_text())
    return found


def tuned(cells: dict[str, dict]) -> dict | None:
    """The seed's LoRA-tuned dense cell (the 100% reference), from whichever folder has it."""
    return next((cell for name, cell in cells.items() if name.endswith("/lora")), None)


def mean_with_errors(rows: list[dict]) -> str:
    """Mean value over seeds ± the pooled test-row error sqrt(sum stderr^2) / seeds, and the seeds' spread (empty
    without rows: cells made before validation figures)."""
    if not rows:
        return ""
    values = [row["value"] for row in rows]
    error = math.sqrt(sum(row["stderr"] ** 2 for row in rows)) / len(rows)
    spread = f", spread {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{sum(values) / len(values):.1f} ± {error:.1f}{spread}"


def difference_from_taylor(name: str, runs: dict[int, dict[str, dict]], rival_name: str = RIVAL) -> str:
    """Mean over seeds of (this row's % of tuned) - (Taylor's), paired per seed, with the 95% interval of
    ``benchmarks/quality/quality_summary.py`` (seed variance / n plus the row variance of the seed mean: the seeds
    share the test rows, so their row noise does not shrink with more seeds)."""
    if name == rival_name or name.endswith(("/lora", "/dense")):
        return ""
    differences, resampled = [], []
    for cells in runs.values():
        reference = tuned(cells)
        if name not in cells or rival_name not in cells or reference is None:
            continue
        mine, rival = cells[name], cells[rival_name]
        if not (paired(mine, reference, TASK) and paired(rival, reference, TASK)):
            continue
        shares = [
            (skill_average(c, reference, [TASK], {}), resampled_average(c, reference, [TASK], {}))
            for c in (mine, rival)
        ]
        differences.append(shares[0][0] - shares[1][0])
        resampled.append(shares[0][1] - shares[1][1])
    if not differences:
        return ""
    return f"{formatted(interval(differences, resampled))} ({len(differences)} seeds)"


def table(folders: list[Path], aliases: dict[str, str] | None = None, rival: str = RIVAL) -> str:
    """The Markdown table of every row found, in the order of first appearance; differences from row ``rival``."""
    runs = seed_cells(folders, aliases)
    names = list(dict.fromkeys(name for seed in sorted(runs) for name in runs[seed]))
    lines = [
        "| cell | parameters | seeds | test perplexity per seed | test mean ± error | validation mean ± error | "
        "% of tuned minus Taylor's (paired, points [95% interval]) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        cells = [runs[seed][name] for seed in sorted(runs) if name in runs[seed]]
        seeds = ", ".join(str(seed) for seed in sorted(runs) if name in runs[seed])
        test = [cell["tasks"][TASK] for cell in cells]
        per_seed = " / ".join(f"{row['value']:.1f}" for row in test)
        validation = mean_with_errors([cell["validation"][TASK] for cell in cells if "validation" in cell])
        parameters = f"{cells[0]['parameters']:,}" if cells[0].get("parameters") else ""
        lines.append(
            f"| {name} | {parameters} | {seeds} | {per_seed} | {mean_with_errors(test)} | {validation} | "
            f"{difference_from_taylor(name, runs, rival)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", type=Path, nargs="+", help="folders of seed-<n> quality.py outputs")
    parser.add_argument("--out", type=Path, help="also write the table (with its command) to this Markdown file")
    parser.add_argument(
        "--alias",
        nargs="*",
        default=[],
        metavar="ROW=AS",
        help="pool row ROW's seeds into row AS (the same cell definition, e.g. more-seeds/lora=quickstart-clean/lora)",
    )
    parser.add_argument("--rival", default=RIVAL, help=f"the row the differences are from (default {RIVAL})")
    args = parser.parse_args()
    aliases = dict(alias.split("=", 1) for alias in args.alias)
    markdown = table(args.folders, aliases, args.rival)
    print(markdown)
    if args.out:
        command = " ".join(["python", "benchmarks/quality/quickstart_table.py", *sys.argv[1:]])
        args.out.write_text(f"# Quickstart cells\n\nCommand: `{command}`\n\n" + markdown)


if __name__ == "__main__":
    main()
