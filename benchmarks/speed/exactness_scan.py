"""Scan random cases of the exactness test: how far pruned logits are from masked ones, next to rounding.

    python benchmarks/speed/exactness_scan.py                         # 3000 draws at weights N(0, 0.1) and N(0, 0.3)
    python benchmarks/speed/exactness_scan.py --cases 200 --weight-std 0.1

Cases are drawn by the strategies of ``tests/test_prune.py`` (layouts, LoRA or not, gate patterns). For each:
``difference`` = max |pruned - masked| logits (float32) and ``sensitivity`` = how far one ulp of noise moves the
masked logits (:func:`tailored.core.exactness.rounding_sensitivity`). Printed per weight scale: the share of cases
above the test's 1e-5 bound, the share in which rounding alone could exceed 1e-5 / ROUNDING_FACTOR, the ratio
difference / sensitivity, and the cases the test would fail. Run from the repository root.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

TESTS = Path(__file__).resolve().parents[2] / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "core")]
from conftest import tiny_model  # noqa: E402
from helpers import EXACT_FP32, ROUNDING_FACTOR, with_lora  # noqa: E402
from test_prune import gate_patterns, layouts  # noqa: E402

from tailored.core.exactness import masked_logits, rounding_sensitivity  # noqa: E402
from tailored.core.prune import plan_pruning, prune_model  # noqa: E402
from tailored.core.structure import describe  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=3000, help="hypothesis examples drawn per weight scale")
    parser.add_argument("--weight-std", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def scan(cases: int, weight_std: float, run_seed: int) -> list[dict]:
    """One row per drawn case that surgery accepts: difference, sensitivity, the layout and the kept hidden dims."""
    tokens = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))  # the tests' `tokens`
    rows = []

    @seed(run_seed)
    @settings(
        max_examples=cases,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(layout=layouts, lora=st.booleans(), data=st.data())
    def draw(layout, lora, data):
        model = tiny_model(**layout, weight_std=weight_std)
        if lora:
            model = with_lora(model)
        structure = describe(model)
        gates = data.draw(gate_patterns(structure))
        try:
            plan_pruning(structure, gates)
        except ValueError:
            return
        with torch.no_grad():
            pruned_logits = prune_model(model, gates)(tokens).logits
        difference = (pruned_logits - masked_logits(model, gates, tokens)).abs().max().item()
        hidden = f"{int((gates.hidden > 0).sum())}/{structure.hidden_size}"
        rows.append(
            dict(
                difference=difference,
                sensitivity=rounding_sensitivity(model, gates, tokens),
                lora=lora,
                hidden=hidden,
                layout=layout,
            )
        )

    draw()
    return rows


def summarise(rows: list[dict], weight_std: float) -> None:
    count = len(rows)
    above = sum(row["difference"] > EXACT_FP32 for row in rows)
    noisy = sum(ROUNDING_FACTOR * row["sensitivity"] > EXACT_FP32 for row in rows)
    failed = [r for r in rows if r["difference"] > max(EXACT_FP32, ROUNDING_FACTOR * r["sensitivity"])]
    ratios = sorted(r["difference"] / r["sensitivity"] for r in rows if r["difference"] > 1e-6 and r["sensitivity"] > 0)
    print(f"\nweights N(0, {weight_std}): {count} cases, max difference {max(r['difference'] for r in rows):.2e}")
    print(f"  difference > {EXACT_FP32:g}: {above} ({above / count:.1%})")
    print(f"  rounding sensitivity > {EXACT_FP32:g} / {ROUNDING_FACTOR}: {noisy} ({noisy / count:.1%})")
    if ratios:
        quantile_99 = ratios[int(0.99 * (len(ratios) - 1))]
        print(
            f"  difference / sensitivity where difference > 1e-6 ({len(ratios)} cases): "
            f"median {statistics.median(ratios):.2f}, 99th percentile {quantile_99:.2f}, max {ratios[-1]:.2f}"
        )
    print(f"  cases the test would fail (difference > max(1e-5, {ROUNDING_FACTOR} x sensitivity)): {len(failed)}")
    for row in sorted(rows, key=lambda r: -r["difference"])[:5]:
        print(
            f"    difference {row['difference']:.2e}  sensitivity {row['sensitivity']:.2e}  "
            f"hidden kept {row['hidden']}  lora {row['lora']}  {row['layout']}"
        )


def main() -> None:
    args = parse_args()
    for weight_std in args.weight_std:
        summarise(scan(args.cases, weight_std, args.seed), weight_std)


if __name__ == "__main__":
    main()
