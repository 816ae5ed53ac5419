"""The quality benchmark's tables: shares of the LoRA-tuned model, perplexity inverted, errors combined."""

from __future__ import annotations

import importlib.util
import math

import pytest
from test_training import ROOT

spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)


def row(method: str, kept: float, value: float, stderr: float, metric: str = "perplexity") -> dict:
    task = {"metric": metric, "value": value, "stderr": stderr}
    return {"method": method, "kept_fraction": kept, "distill": False, "tasks": {"botchan": task},
            "parameters": 10, "seconds": 1.0}  # fmt: skip


def test_shares_invert_perplexity_and_combine_the_errors():
    rows = [row("lora", 1.0, 50.0, 2.0), row("taylor", 0.7, 100.0, 5.0), row("one_stage", 0.7, 0.0, 0.0)]
    document, markdown = quality.tables(rows, "quickstart", ["# header"])
    lora, taylor, broken = document["rows"]
    assert lora["pct_of_tuned_avg"] == 100.0 and lora["pct_of_tuned_avg_stderr"] == 0.0  # the reference itself
    assert taylor["pct_of_tuned"]["botchan"] == pytest.approx(50.0)  # twice the perplexity: half the quality
    assert taylor["pct_of_tuned_stderr"]["botchan"] == pytest.approx(50.0 * math.hypot(5 / 100, 2 / 50))
    assert math.isnan(broken["pct_of_tuned_stderr"]["botchan"])  # a zero metric is reported, not a crash
    assert "| taylor | 0.7 |  | 100 ± 5 | 50.0 ± 3.2 |" in markdown
