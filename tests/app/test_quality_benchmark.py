"""The quality benchmark's tables: shares of the LoRA-tuned model, perplexity inverted, errors combined."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import threading

import pytest
import torch
from helpers import ROOT

spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality" / "quality.py")
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
    other_metric = row("random", 0.7, 0.3, 0.01, metric="accuracy")  # a cell tested before a change of metric
    assert all(math.isnan(v) for v in quality.share(other_metric, lora, "botchan"))


GENERATOR = torch.Generator().manual_seed(0)
HARDNESS = torch.rand(200, generator=GENERATOR)  # per-row difficulty, shared by every model


def scored(method: str, kept: float, quality: float) -> dict:
    """A cell with per-row ROUGE-L values: ``quality`` times the shared row difficulty, plus a little own noise."""
    rouge = (quality * HARDNESS + 0.02 * torch.rand(200, generator=GENERATOR)).tolist()
    columns = {"nll": [1.0] * 200, "tokens": [1.0] * 200, "rougeL": rouge}
    task = {"metric": "rougeL", "value": sum(rouge) / 200, "stderr": float(torch.tensor(rouge).std() / 200**0.5)}
    return {"method": method, "kept_fraction": kept, "distill": False, "tasks": {"botchan": task},
            "rows": {"botchan": columns}, "parameters": 10, "seconds": 1.0}  # fmt: skip


def test_cells_with_per_row_values_get_paired_errors_and_a_paired_difference():
    """Models tested on the same rows: the row noise they share cancels in the share's error, and the table ends with
    the best one-stage cell minus the best two-stage one."""
    rows = [scored("lora", 1.0, 1.0), scored("one_stage", 0.7, 0.8), scored("taylor", 0.7, 0.7)]
    document, markdown = quality.tables(rows, "quickstart", ["# header"])
    one_stage = document["rows"][1]
    unpaired = one_stage["pct_of_tuned_avg"] * math.hypot(
        *(cell["tasks"]["botchan"]["stderr"] / cell["tasks"]["botchan"]["value"] for cell in rows[:2])
    )
    assert one_stage["pct_of_tuned_avg_stderr"] < unpaired / 3
    assert one_stage["pct_of_tuned_avg"] == pytest.approx(80.0, abs=1.5)
    line = next(line for line in markdown.splitlines() if line.startswith("- kept 0.7"))
    difference, error = (float(part.split()[0]) for part in line.split(": ")[1].split(" ± "))
    taylor = document["rows"][2]
    assert difference == pytest.approx(one_stage["pct_of_tuned_avg"] - taylor["pct_of_tuned_avg"], abs=0.05)
    assert 0 < error < 1 and "(one_stage-0.7 - taylor-0.7)" in line


def test_the_summary_pools_runs_and_compares_a_lever_group_with_the_main_groups_baseline(tmp_path):
    """A group without its own LoRA and two-stage cells (a lever) is compared with main's, row for row; the mean
    over runs is the mean of the runs' differences."""
    path = ROOT / "benchmarks" / "quality" / "quality_summary.py"
    spec = importlib.util.spec_from_file_location("quality_summary", path)
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    differences = []
    for run, (ours, theirs) in enumerate([(0.8, 0.7), (0.75, 0.7)]):
        groups = {
            "main": [scored("lora", 1.0, 1.0), scored("taylor", 0.7, theirs)],
            "lever": [scored("one_stage", 0.7, ours)],
        }
        for group, cells in groups.items():
            folder = tmp_path / f"seed-{run}" / group / "quality-quickstart" / "cells"
            folder.mkdir(parents=True)
            for cell in cells:
                (folder / f"{summary.name(cell)}.json").write_text(json.dumps(cell))
        differences.append(100 * (ours - theirs))
    text = summary.summary([tmp_path / "seed-0", tmp_path / "seed-1"])
    line = next(line for line in text.splitlines() if "| lever | one_stage-0.7 |" in line)
    mean = float(line.split("|")[-2].split(" ± ")[0])
    assert mean == pytest.approx(sum(differences) / 2, abs=0.5) and "(taylor-0.7)" in line


def test_cells_run_at_once_and_a_failed_cell_leaves_the_others_recorded(tmp_path, monkeypatch):
    """--jobs 2 runs two cells together; a failing cell is reported, not written, and the run goes on."""
    running, most = set(), []
    release = threading.Barrier(2, timeout=10)  # two cells must be in flight together, or this times out

    def fake_cell(suite, method, kept, distill, folder, extra):
        running.add(method)
        most.append(len(running))
        if method in ("dense", "lora"):
            release.wait()
        running.discard(method)
        if method == "taylor":
            raise RuntimeError("tailored fit failed (exit 1)")
        return row(method, kept or 1.0, 50.0, 2.0)

    monkeypatch.setattr(quality, "run_cell", fake_cell)
    argv = ["--suite", "quickstart", "--budgets", "0.7", "--methods", "dense", "lora", "taylor", "random"]
    args = quality.parse_args([*argv, "--jobs", "2", "--out", str(tmp_path)])
    monkeypatch.setattr(quality, "ARGS", args, raising=False)  # the script sets it in __main__
    quality.main()
    cells = sorted(p.stem for p in (tmp_path / "quality-quickstart" / "cells").glob("*.json"))
    assert cells == ["dense", "lora", "random-0.7"] and max(most) == 2
    assert "| random | 0.7 |" in (tmp_path / "quality-quickstart.md").read_text()


def test_the_gpu_grid_script_calls_quality_py_with_arguments_it_accepts(tmp_path):
    """Every group of benchmarks/quality/quality_grid.sh is a valid quality.py call with distinct output and run
    folders."""
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "calls"
    (fake / "python3").write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" >> {calls}\nprintf "\\n" >> {calls}\n')
    (fake / "python3").chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "HOME": str(tmp_path)}
    grid = "benchmarks/quality/quality_grid.sh"
    command = ["bash", grid, str(tmp_path / "grid"), "2", "--", "--trainer.max_steps", "3"]
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    groups = [line.strip("\0").split("\0") for line in calls.read_text().splitlines() if line]
    assert len(groups) >= 5
    parsed = [quality.parse_args(argv[1:]) for argv in groups]  # argv[0] is the script
    assert len({args.out for args in parsed}) == len({args.runs for args in parsed}) == len(groups)
    assert all(args.extra[-2:] == ["--trainer.max_steps", "3"] for args in parsed)
    assert {args.suite for args in parsed} == {"medical", "legal", "quickstart"}
    main = next(args for args in parsed if args.out.name == "main")
    assert main.distill == ["one_stage"] and set(main.methods) == {"dense", "lora", *quality.PRUNED_METHODS}
