"""How much two runs' pruning masks agree: per unit type, the share of the first run's kept units that the second
also keeps, read from the checkpoints that ``tailored fit`` wrote (the gates saved with the transition).

    python benchmarks/quality/mask_overlap.py RUN_A/checkpoints/last.ckpt RUN_B/checkpoints/last.ckpt

A one-stage run and a two-stage baseline that keep the same units at the same shape differ only in how they trained:
this is how a quality cell's difference is told apart from a different mask (``quality.py`` cells keep their runs
under ``--runs``; each cell's checkpoints are in ``<cell>/fit/checkpoints``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def transition_gates(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The gate values a run pruned with (``tailored_transition``); a ``SystemExit`` naming a run that never
    pruned."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    transition = state.get("tailored_transition")
    if transition is None:
        raise SystemExit(f"{checkpoint}: no transition recorded (a run without pruning, or stopped before it)")
    return transition["gates"]


def overlap(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per unit type that either run pruned: kept units of each, and the share of the first's kept units that the
    second also keeps (per layer for groups and channels, pooled over the layers)."""
    result = {}
    for name, values in first.items():
        kept_first, kept_second = values > 0, second[name] > 0
        if bool(kept_first.all()) and bool(kept_second.all()):
            continue
        result[name] = {
            "kept": [int(kept_first.sum()), int(kept_second.sum())],
            "shared_of_first": round(float((kept_first & kept_second).sum() / kept_first.sum().clamp(min=1)), 5),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", type=Path, help="a run's checkpoint (.ckpt)")
    parser.add_argument("second", type=Path, help="another run's checkpoint of the same model")
    args = parser.parse_args()
    print(json.dumps(overlap(transition_gates(args.first), transition_gates(args.second)), indent=1))


if __name__ == "__main__":
    main()
