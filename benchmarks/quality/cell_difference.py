"""One quality cell minus another, paired over the test rows, wherever the two were written.

``quality.py`` ends each seed's table with one-stage minus the best two-stage cell of the same folder. A lever run
into its own folder (other settings passed after ``--``) is compared with the config's cells by this script: the
skill-average difference of the two cells (% of the shared LoRA-tuned reference, measurable tasks only) and its
paired bootstrap error (:func:`quality.paired_difference`)::

    python benchmarks/quality/cell_difference.py --suite medical \\
        --reference benchmarks/results/medical-cpu/importance-units/seed-0/quality-medical/cells/lora.json \\
        benchmarks/results/medical-cpu/all-weights/seed-0/quality-medical/cells/one_stage-0.5.json \\
        benchmarks/results/medical-cpu/importance-units/seed-0/quality-medical/cells/one_stage-0.5.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import SUITES, chance_levels, measurable_tasks, paired_difference  # noqa: E402  (a folder of scripts)


def difference_line(cell: dict, other: dict, reference: dict, suite: str, names: tuple[str, str]) -> str:
    """``<first> minus <second>: +d ± e points (...)``; a one-line error where the cells cannot be paired."""
    if {cell.get("seed"), other.get("seed")} != {reference.get("seed")}:
        raise SystemExit("the two cells and the reference must share a seed: pass the lora cell of the cells' seed")
    chances = chance_levels(suite)
    tasks = measurable_tasks(reference, chances)
    found = paired_difference(cell, other, reference, tasks, chances)
    if found is None:
        raise SystemExit("a cell has no per-row test values: rerun it with the current quality.py to pair it")
    value, error = found
    paired_over = f"paired over the test rows; {', '.join(tasks)}"
    return f"{names[0]} minus {names[1]}: {value:+.1f} ± {error:.1f} points ({paired_over})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cell", type=Path, help="a cell JSON of quality.py (<out>/seed-<n>/quality-<suite>/cells)")
    parser.add_argument("other", type=Path, help="the cell it is compared with")
    parser.add_argument("--reference", type=Path, required=True, help="the lora cell of the same seed")
    parser.add_argument("--suite", choices=sorted(SUITES), default="medical")
    args = parser.parse_args(argv)
    cell, other, reference = (json.loads(path.read_text()) for path in (args.cell, args.other, args.reference))
    names = tuple(f"{path.parents[3].name}/{path.stem}" for path in (args.cell, args.other))
    print(difference_line(cell, other, reference, args.suite, names))


if __name__ == "__main__":
    main()
