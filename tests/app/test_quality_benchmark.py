"""The quality benchmark's tables: shares of the LoRA-tuned model (perplexity inverted, accuracies above chance),
errors paired or combined, budgets as fractions of the total parameters, seeds pooled by the summary."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from helpers import ROOT


def script(name: str):
    """The module of ``benchmarks/quality/<name>.py`` (a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "quality" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


quality = script("quality")


def row(method: str, kept: float, value: float, stderr: float, metric: str = "perplexity") -> dict:
    task = {"metric": metric, "value": value, "stderr": stderr}
    return {"method": method, "total_kept": kept, "steps_multiplier": 1, "distill": False,
            "tasks": {"botchan": task}, "parameters": 10, "seconds": 1.0}  # fmt: skip


def test_shares_invert_perplexity_and_combine_the_errors():
    rows = [row("lora", 1.0, 50.0, 2.0), row("taylor", 0.7, 100.0, 5.0), row("one_stage", 0.7, 0.0, 0.0)]
    document, markdown = quality.tables(rows, "quickstart", ["# header"])
    lora, taylor, broken = document["rows"]
    assert lora["pct_of_tuned_avg"] == 100.0 and lora["pct_of_tuned_avg_stderr"] == 0.0  # the reference itself
    assert taylor["pct_of_tuned"]["botchan"] == pytest.approx(50.0)  # twice the perplexity: half the quality
    assert taylor["pct_of_tuned_stderr"]["botchan"] == pytest.approx(50.0 * math.hypot(5 / 100, 2 / 50))
    assert math.isnan(broken["pct_of_tuned_stderr"]["botchan"])  # a zero metric is reported, not a crash
    assert "| taylor | 0.7 | 1x |  | 100 ± 5 | 50.0 ± 3.2 |" in markdown
    other_metric = row("random", 0.7, 0.3, 0.01, metric="accuracy")  # a cell tested before a change of metric
    assert all(math.isnan(v) for v in quality.share(other_metric, lora, "botchan"))


GENERATOR = torch.Generator().manual_seed(0)
HARDNESS = torch.rand(200, generator=GENERATOR)  # per-row difficulty, shared by every model


def scored(method: str, kept: float, quality: float) -> dict:
    """A cell with per-row ROUGE-L values: ``quality`` times the shared row difficulty, plus a little own noise."""
    rouge = (quality * HARDNESS + 0.02 * torch.rand(200, generator=GENERATOR)).tolist()
    columns = {"nll": [1.0] * 200, "tokens": [1.0] * 200, "rougeL": rouge}
    task = {"metric": "rougeL", "value": sum(rouge) / 200, "stderr": float(torch.tensor(rouge).std() / 200**0.5)}
    return {"method": method, "total_kept": kept, "steps_multiplier": 1, "distill": False,
            "tasks": {"botchan": task}, "rows": {"botchan": columns}, "parameters": 10, "seconds": 1.0}  # fmt: skip


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
    line = next(line for line in markdown.splitlines() if line.startswith("- total kept 0.7, 1x tokens"))
    difference, error = (float(part.split()[0]) for part in line.split(": ")[1].split(" ± "))
    taylor = document["rows"][2]
    assert difference == pytest.approx(one_stage["pct_of_tuned_avg"] - taylor["pct_of_tuned_avg"], abs=0.05)
    assert 0 < error < 1 and "(one_stage-0.7 - taylor-0.7, rival chosen on test)" in line  # no validation here


def test_cells_run_at_once_and_a_failed_cell_leaves_the_others_recorded(tmp_path, monkeypatch):
    """--jobs 2 runs two cells together; a failing cell is reported, not written, and the run goes on."""
    running, most = set(), []
    release = threading.Barrier(2, timeout=10)  # two cells must be in flight together, or this times out

    def fake_cell(suite, cell, seed, folder, extra, learned=None):
        running.add(cell.method)
        most.append(len(running))
        if cell.method in ("dense", "lora"):
            release.wait()
        running.discard(cell.method)
        if cell.method == "taylor":
            raise RuntimeError("tailored fit failed (exit 1)")
        return row(cell.method, cell.total_kept or 1.0, 50.0, 2.0)

    monkeypatch.setattr(quality, "run_cell", fake_cell)
    argv = ["--suite", "quickstart", "--total-kept", "0.7", "--methods", "dense", "lora", "taylor", "random"]
    args = quality.parse_args([*argv, "--jobs", "2", "--out", str(tmp_path)])
    monkeypatch.setattr(quality, "ARGS", args, raising=False)  # the script sets it in __main__
    quality.main()
    cells = sorted(p.stem for p in (tmp_path / "seed-0" / "quality-quickstart" / "cells").glob("*.json"))
    assert cells == ["dense", "lora", "random-0.7"] and max(most) == 2
    assert "| random | 0.7 | 1x |" in (tmp_path / "seed-0" / "quality-quickstart.md").read_text()


def test_the_gpu_grid_script_calls_quality_py_with_arguments_it_accepts(tmp_path):
    """Every group of benchmarks/quality/quality_grid.sh is a valid quality.py call with distinct output and run
    folders."""
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "calls"
    calls.mkdir()  # one file per call: the groups start at once, and appends to one file could interleave
    (fake / "python3").write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" > {calls}/$$\n')
    (fake / "python3").chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "HOME": str(tmp_path)}
    grid = "benchmarks/quality/quality_grid.sh"
    command = ["bash", grid, str(tmp_path / "grid"), "2", "--", "--trainer.max_steps", "3"]
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    groups = [path.read_text().strip("\0").split("\0") for path in sorted(calls.iterdir())]
    assert len(groups) >= 5
    parsed = [quality.parse_args(argv[1:]) for argv in groups]  # argv[0] is the script
    assert len({args.out for args in parsed}) == len({args.runs for args in parsed}) == len(groups)
    assert all(args.extra[-2:] == ["--trainer.max_steps", "3"] for args in parsed)
    assert {args.suite for args in parsed} == {"medical", "legal", "quickstart"}
    main = next(args for args in parsed if args.out.name == "main")
    assert set(main.methods) == {
        "dense", "lora", "one_stage", "taylor", "taylor_learned_shape", "taylor_grid", "taylor_after_tuning"
    }  # fmt: skip
    assert main.seeds == [0, 1, 2, 3, 4] and main.steps_multiplier == [1, 4] and main.total_kept == [0.75, 0.5]


def test_budgets_are_fractions_of_the_total_parameters_whatever_units_a_method_prunes(tiny_model_dir):
    """Each method's prunable fraction leaves the same total: (total * N - fixed) / (N - fixed) for its units."""
    from tailored.core.structure import structure_from_config
    from tailored.core.targets import prunable_bounds
    from tailored.models import load_config

    structure = structure_from_config(load_config(str(tiny_model_dir)))
    fractions = {}
    for units in (["channels"], ["groups", "channels"], ["groups", "channels", "hidden"]):
        fixed, full = prunable_bounds(structure, tuple(units))
        fractions[tuple(units)] = quality.prunable_target(str(tiny_model_dir), units, 0.75)
        assert fixed + fractions[tuple(units)] * (full - fixed) == pytest.approx(0.75 * full)
    assert len(set(fractions.values())) == 3  # fewer prunable units: a larger share of them goes
    with pytest.raises(ValueError, match="cannot be met"):
        quality.prunable_target(str(tiny_model_dir), ["groups"], 0.2)  # attention alone cannot remove 80%


def test_a_trimmed_vocabulary_gives_its_rows_to_the_pruned_units_at_the_same_total(tiny_model_dir, monkeypatch):
    """With K kept tokens the export still has total * N parameters: fixed (counted with K rows) + fraction *
    prunable; the cells say so in their names and fit options."""
    import dataclasses

    from tailored.core.structure import structure_from_config
    from tailored.core.targets import prunable_bounds
    from tailored.models import load_config

    structure = structure_from_config(load_config(str(tiny_model_dir)))
    units, kept = ["groups", "channels"], structure.vocab_size // 2
    fixed, full = prunable_bounds(structure, tuple(units))
    trimmed_fixed = prunable_bounds(dataclasses.replace(structure, vocab_size=kept), tuple(units))[0]
    fraction = quality.prunable_target(str(tiny_model_dir), units, 0.75, kept)
    assert trimmed_fixed + fraction * (full - fixed) == pytest.approx(0.75 * full)
    assert fraction > quality.prunable_target(str(tiny_model_dir), units, 0.75)
    with pytest.raises(ValueError, match="hidden"):
        quality.prunable_target(str(tiny_model_dir), [*units, "hidden"], 0.75, kept)
    cells = quality.plan(quality.parse_args(["--methods", "lora", "one_stage", "--total-kept", "0.5", "--vocabulary"]))
    assert [cell.name for cell in cells] == ["lora", "one_stage-0.5-vocab"]
    monkeypatch.setattr(quality, "domain_vocabulary_size", lambda suite, extra: 40)
    options, recorded = quality.pruning_options(quality.SUITES["quickstart"], cells[1], [], None)
    assert options[-2:] == ["--model.pruning.vocabulary.keep_top", "0"] and recorded["kept_tokens"] == 40


def test_the_plan_runs_every_seed_and_token_budget_and_the_learned_shape_cells_last(monkeypatch):
    args = quality.parse_args(["--seeds", "0", "1", "--steps-multiplier", "1", "4", "--total-kept", "0.75"])
    cells = quality.plan(args)
    names = [cell.name for cell in cells]
    assert names[:3] == ["dense", "lora", "lora-x4"]
    assert {"taylor_grid_channels-0.75", "taylor_grid_groups_channels_hidden-0.75-x4", "one_stage-0.75-x4"} <= set(
        names
    )
    assert names[-2:] == ["taylor_learned_shape-0.75", "taylor_learned_shape-0.75-x4"]
    one_stage = {"units": ["groups", "channels"], "shape": {"groups": 2, "channels": 40, "hidden": 32, "layers": 3}}
    suite = quality.SUITES["quickstart"]
    options, recorded = quality.pruning_options(suite, quality.Cell("taylor_learned_shape", 0.75), [], one_stage)
    assert options[:4] == [
        "--model.pruning.target",
        "null",
        "--model.pruning.target_shape",
        json.dumps(one_stage["shape"]),
    ]
    assert options[-2:] == ["--model.pruning.method", "taylor"] and recorded["units"] == ["groups", "channels"]
    with pytest.raises(RuntimeError, match="learned shape"):
        quality.pruning_options(suite, quality.Cell("taylor_learned_shape", 0.75), [], {"units": [], "shape": None})
    monkeypatch.setattr(quality, "prunable_target", lambda model, units, total, kept_tokens=None: 0.5)
    options, recorded = quality.pruning_options(suite, quality.Cell("taylor_grid_channels", 0.75), [], None)
    assert options == ["--model.pruning.target", "0.500000", "--model.pruning.units", '["channels"]',
                       "--model.pruning.method", "taylor"]  # fmt: skip
    assert quality.config_value(suite, ["--trainer.max_steps", "7"], "trainer.max_steps") == 7
    for pinned in (["--", "--data.seed", "5"], ["--", "--data.seed=5"]):  # a seed's stream is its own
        with pytest.raises(SystemExit):
            quality.parse_args(pinned)


def test_tune_prune_tune_splits_the_token_budget_at_the_one_stage_transition(tmp_path, monkeypatch):
    """taylor_after_tuning: a dense LoRA fit for the steps before the schedule's transition, then Taylor pruning of
    its merged export for the rest, on a fresh stream; the two fits together train max_steps steps."""
    calls = []

    def fake_tailored(*args, log):
        calls.append(list(args))
        root = Path(args[args.index("--trainer.default_root_dir") + 1])
        (root / "lightning_logs" / "version_0" / "export").mkdir(parents=True)

    monkeypatch.setattr(quality, "tailored", fake_tailored)
    monkeypatch.setattr(quality, "prunable_target", lambda model, units, total, kept_tokens=None: 0.6)
    suite = quality.SUITES["medical"]  # pruning.recovery 0.6 of 200 steps: the transition at step 80
    cell = quality.Cell("taylor_after_tuning", 0.75)
    options, recorded = quality.pruning_options(suite, cell, [], None)
    assert options[-2:] == ["--model.pruning.method", "taylor"] and recorded["kept_fraction"] == 0.6
    config = ["-c", suite["config"], "--seed_everything", "3"]
    options = [*quality.fit_options(tmp_path / "fit", 200, 3), *options]
    steps = quality.run_taylor_after_tuning(suite, config, options, tmp_path, [], 200, tmp_path / "log.txt")

    def last(call, key):  # the value a repeated option ends with, as tailored reads it: the last one wins
        return quality.config_value(suite, call, key)

    tune, prune = calls
    assert steps == 80 and last(tune, "trainer.max_steps") == 80 and last(tune, "model.pruning") is None
    assert last(tune, "trainer.default_root_dir") == str(tmp_path / "tune")
    assert last(prune, "trainer.max_steps") == 120 and last(prune, "model.pruning.method") == "taylor"
    assert last(prune, "model.model") == str(tmp_path / "tune" / "lightning_logs" / "version_0" / "export")
    assert last(tune, "data.seed") == 3  # the cell's seed draws its stream: data order is part of a seed's noise
    assert last(prune, "seed_everything") == 3 and last(prune, "data.seed") == 3 + quality.STAGE_SEED_OFFSET
    assert not (tmp_path / "tune").exists()  # the merged dense model is not kept
    assert last(prune, "trainer.default_root_dir") == str(tmp_path / "fit")
    with pytest.raises(ValueError, match="recovery"):
        quality.run_taylor_after_tuning(suite, config, options, tmp_path, ["--model.pruning.recovery", "0"], 200, None)


class FakeTailored:
    """``tailored fit | test | validate`` as the quality script sees them: a fit writes a checkpoint and then, unless
    ``kill`` names it, its export; a test or validation writes its results. Records every call."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.kill: str | None = None

    def __call__(self, *args: str, log: Path) -> None:
        self.calls.append(list(args))
        root = Path(quality.config_value(quality.SUITES["quickstart"], list(args), "trainer.default_root_dir"))
        if args[0] == "fit":
            (root / "checkpoints").mkdir(parents=True, exist_ok=True)
            (root / "checkpoints" / "last.ckpt").write_text("step")
            if self.kill == "fit":
                raise RuntimeError("tailored fit failed (exit -9)")
            version = len(list(root.glob("lightning_logs/version_*")))
            export = root / "lightning_logs" / f"version_{version}" / "export"
            export.mkdir(parents=True)
            (export / "pruning_report.json").write_text(json.dumps({"parameters": {"after": 7}}))
            return
        root.mkdir(parents=True, exist_ok=True)
        results = {"botchan": {"perplexity": 50.0, "perplexity_stderr": 1.0}}
        (root / f"{'test' if args[0] == 'test' else 'val'}_results.json").write_text(json.dumps(results))
        (root / "test_rows.json").write_text(json.dumps({"botchan": {"nll": [1.0], "tokens": [1.0]}}))
        if self.kill == args[0]:
            raise RuntimeError(f"tailored {args[0]} failed (exit -9)")

    def fits(self) -> list[list[str]]:
        return [call for call in self.calls if call[0] == "fit"]


def test_a_killed_cell_resumes_its_fit_or_keeps_its_finished_one(tmp_path, monkeypatch):
    """Killed in its fit: the next run resumes from the checkpoint (same command, ``--ckpt_path`` added) and marks
    the cell resumed. Killed in its test: the fit is not run again and its seconds are kept. Another command, or the
    same one on an edited config: the earlier attempt's files go and the fit starts from scratch."""
    fake = FakeTailored()
    monkeypatch.setattr(quality, "tailored", fake)
    monkeypatch.setattr(quality, "ARGS", quality.parse_args(["--suite", "quickstart"]), raising=False)
    suite, cell, folder = quality.SUITES["quickstart"], quality.Cell("lora", None), tmp_path / "lora"
    fake.kill = "fit"
    with pytest.raises(RuntimeError):
        quality.run_cell(suite, cell, 0, folder, [])
    fake.kill = None
    row = quality.run_cell(suite, cell, 0, folder, [])
    first, resumed = fake.fits()
    assert resumed == [*first, "--ckpt_path", str(folder / "fit" / "checkpoints" / "last.ckpt")]
    assert row["resumed"] and row["tasks"]["botchan"]["value"] == 50.0

    fake.calls, fake.kill = [], "test"
    other = tmp_path / "other"
    with pytest.raises(RuntimeError):
        quality.run_cell(suite, cell, 0, other, [])
    seconds = json.loads((other / quality.ATTEMPT).read_text())["finished"]["seconds"]
    fake.kill = None
    row = quality.run_cell(suite, cell, 0, other, [])
    assert len(fake.fits()) == 1 and row["seconds"] == seconds and "resumed" not in row
    assert [call[0] for call in fake.calls] == ["fit", "test", "test", "validate"]

    fake.calls = []
    quality.run_cell(suite, cell, 0, other, ["--trainer.gradient_clip_val", "1.0"])
    (fit,) = fake.fits()
    assert "--ckpt_path" not in fit and len(list(other.glob("fit/lightning_logs/version_*"))) == 1

    fake.calls = []  # the same command again, on an edited config: another fit, from scratch
    edited = tmp_path / "root" / suite["config"]
    edited.parent.mkdir(parents=True)
    edited.write_text((quality.ROOT / suite["config"]).read_text() + "# edited\n")
    monkeypatch.setattr(quality, "ROOT", tmp_path / "root")
    quality.run_cell(suite, cell, 0, other, ["--trainer.gradient_clip_val", "1.0"])
    (fit,) = fake.fits()
    assert "--ckpt_path" not in fit and len(list(other.glob("fit/lightning_logs/version_*"))) == 1


LABELS = torch.tensor([0] * 60 + [1] * 40 + [2] * 20)  # 120 PubMedQA-like rows, unbalanced


def medical_cell(method: str, total: float | None, seed: int, skill: float, validation: float | None = None) -> dict:
    """A new-format medical cell: PubMedQA right on a ``skill`` share of the rows beyond chance (0: always "yes"),
    HQS ROUGE-L and abstract perplexity scaled by ``skill``; validation figures those of skill ``validation``."""
    generator = torch.Generator().manual_seed(1000 * seed + int(100 * skill))
    right = torch.rand(120, generator=generator) < skill
    correct = torch.where(right, torch.ones(120), torch.eq(LABELS, 0).float())
    rouge = (0.3 * skill * HARDNESS[:120] + 0.01 * torch.rand(120, generator=generator)).tolist()
    tokens = [50.0] * 120
    nll = (50 * (math.log(40.0) - skill * math.log(2.0)) * (0.5 + HARDNESS[:120])).tolist()
    rows = {
        "pubmedqa": {"nll": tokens, "tokens": tokens, "correct": correct.tolist(), "label": LABELS.tolist()},
        "hqs": {"nll": tokens, "tokens": tokens, "rougeL": rouge},
        "pubmed_abstracts": {"nll": nll, "tokens": tokens},
    }
    tasks = {}
    for task, metric in quality.SUITES["medical"]["tasks"].items():
        columns = {name: torch.tensor(values, dtype=torch.float64) for name, values in rows[task].items()}
        value = float(quality.row_statistic(metric, columns))
        tasks[task] = {"metric": metric, "value": value, "stderr": 0.02 * value}
    checked = tasks if validation is None else medical_cell(method, total, seed + 100, validation)["tasks"]
    return {"method": method, "total_kept": total or 1.0, "steps_multiplier": 1, "seed": seed, "data_seed": seed,
            "distill": False, "tasks": tasks, "validation": checked, "rows": rows, "parameters": 10,
            "seconds": 1.0}  # fmt: skip


def test_the_summary_pools_seeds_chooses_the_rival_on_validation_and_writes_the_headline(tmp_path):
    """Five seeds: one-stage's skill average and its seed-paired difference from the two-stage method that is best
    on validation (the grid split, though plain Taylor scores more on test); an older folder is reported, not used."""
    summary = script("quality_summary")
    differences = []
    for seed in range(5):
        ours = 0.6 + 0.02 * seed
        cells = [
            medical_cell("lora", None, seed, 1.0),
            medical_cell("one_stage", 0.75, seed, ours),
            medical_cell("taylor", 0.75, seed, 0.55, validation=0.1),
            medical_cell("taylor_grid_channels", 0.75, seed, 0.5, validation=0.9),
        ]
        folder = tmp_path / "grid" / "main" / f"seed-{seed}" / "quality-medical" / "cells"
        folder.mkdir(parents=True)
        for cell in cells:
            (folder / f"{quality.row_name(cell)}.json").write_text(json.dumps(cell))
        reference, tasks = cells[0], list(quality.SUITES["medical"]["tasks"])
        chances = quality.chance_levels("medical")
        differences.append(
            quality.skill_average(cells[1], reference, tasks, chances)
            - quality.skill_average(cells[3], reference, tasks, chances)
        )
    old = tmp_path / "old" / "seed-0" / "main" / "quality-medical" / "cells"
    old.mkdir(parents=True)
    legacy = medical_cell("one_stage", None, 0, 0.6) | {"kept_fraction": 0.7}
    del legacy["total_kept"], legacy["validation"]
    (old / "one_stage-0.7.json").write_text(json.dumps(legacy))
    same_stream = tmp_path / "old" / "seed-1" / "stream" / "quality-medical" / "cells"  # drew seed 0's stream
    same_stream.mkdir(parents=True)
    older = {key: value for key, value in medical_cell("one_stage", 0.75, 1, 0.6).items() if key != "data_seed"}
    (same_stream / "one_stage-0.75.json").write_text(json.dumps(older))
    target = tmp_path / "quality-summary.json"
    summary.main(
        [str(tmp_path / "grid"), str(tmp_path / "old"), "--json", str(target), "--out", str(tmp_path / "s.md")]
    )
    headline = json.loads(target.read_text())
    assert set(headline) == {"command", "suite", "budgets"} and headline["suite"] == "medical"
    (found,) = headline["budgets"]
    assert set(found) == {"total_kept", "steps_multiplier", "seeds", "one_stage", "best_two_stage",
                          "best_two_stage_method", "difference", "difference_ci95",
                          "pct_of_tuned_one_stage"}  # fmt: skip
    assert found["total_kept"] == 0.75 and found["seeds"] == [0, 1, 2, 3, 4]
    assert found["best_two_stage_method"] == "taylor_grid_channels"  # best on validation, not on test
    assert found["difference"] == pytest.approx(sum(differences) / 5)
    low, high = found["difference_ci95"]
    assert low < found["difference"] < high and high - low < 40
    assert found["pct_of_tuned_one_stage"]["pubmedqa"]["measurable"]
    text = (tmp_path / "s.md").read_text()
    assert "without a total budget" in text and "without validation figures" in text  # the older cell, reported
    (no_stream,) = [line for line in text.splitlines() if "without a data seed of their own" in line]
    assert no_stream.startswith("- medical/stream: 1 cell files")  # the grid's seeds drew their own streams


def test_the_summary_names_the_cells_it_leaves_out_for_want_of_a_reference(tmp_path):
    """4x cells next to a 1x reference only: left out of the table (no tuned model of their budget), and said so."""
    summary = script("quality_summary")
    folder = tmp_path / "seed-0" / "quality-medical" / "cells"
    folder.mkdir(parents=True)
    longer = [medical_cell(method, 0.5, 0, 0.6) | {"steps_multiplier": 4} for method in ("one_stage", "taylor")]
    for cell in (medical_cell("lora", None, 0, 1.0), medical_cell("one_stage", 0.5, 0, 0.5), *longer):
        (folder / f"{quality.row_name(cell)}.json").write_text(json.dumps(cell))
    summary.main([str(tmp_path), "--json", str(tmp_path / "s.json"), "--out", str(tmp_path / "s.md")])
    text = (tmp_path / "s.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| medical")]
    assert [line.split(" | ")[2] for line in table] == ["one_stage-0.5"]
    (line,) = [line for line in text.splitlines() if "without a LoRA-tuned reference" in line]
    assert line.startswith("- medical/main: 2 cell files") and line.endswith("one_stage-0.5-x4, taylor-0.5-x4")


def test_the_headline_json_is_standard_when_the_tuned_model_is_at_chance(tmp_path):
    """A tuned model at chance on PubMedQA: the task is unmeasurable and its share is null, not NaN."""
    summary = script("quality_summary")
    folder = tmp_path / "seed-0" / "quality-medical" / "cells"
    folder.mkdir(parents=True)
    for cell in (medical_cell("lora", None, 0, 0.0), medical_cell("one_stage", 0.5, 0, 0.0),
                 medical_cell("taylor", 0.5, 0, 0.0)):  # fmt: skip
        (folder / f"{quality.row_name(cell)}.json").write_text(json.dumps(cell))
    target = tmp_path / "quality-summary.json"
    summary.main([str(tmp_path), "--json", str(target)])

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} in the headline JSON")

    (found,) = json.loads(target.read_text(), parse_constant=refuse)["budgets"]
    assert found["pct_of_tuned_one_stage"]["pubmedqa"] == {"pct": None, "measurable": False}


def test_a_model_that_always_answers_one_label_has_zero_share_and_the_tuned_model_100():
    """On per-row cells (the paired bootstrap): the always-"yes" PubMedQA model keeps 0% of the tuned model's skill
    above chance on every resample, the tuned model 100%."""
    tuned, constant = medical_cell("lora", None, 0, 1.0), medical_cell("taylor", 0.5, 0, 0.0)
    chance = quality.chance_levels("medical")["pubmedqa"]
    assert chance == pytest.approx(1 / 3)
    assert quality.share(constant, tuned, "pubmedqa", chance) == (pytest.approx(0.0, abs=1e-9), pytest.approx(0.0))
    assert quality.share(tuned, tuned, "pubmedqa", chance) == (100.0, 0.0)
    document, markdown = quality.tables([tuned, constant], "medical", ["# header"])
    assert document["rows"][1]["pct_of_tuned"]["pubmedqa"] == pytest.approx(0.0, abs=1e-9)
    at_chance = medical_cell("lora", None, 0, 0.0)  # a tuned model without skill: PubMedQA is unmeasurable
    document, markdown = quality.tables([at_chance, constant], "medical", ["# header"])
    assert document["rows"][1]["unmeasurable"] == ["pubmedqa"] and "unmeasurable with the lora reference" in markdown


def test_the_quickstart_table_pools_an_aliased_rows_seeds_and_refuses_a_seed_twice(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("quickstart_table", ROOT / "benchmarks/quality/quickstart_table.py")
    table = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks" / "quality"))
    spec.loader.exec_module(table)
    for folder, seed, value in [("first", 0, 60.0), ("first", 1, 62.0), ("more", 2, 64.0)]:
        cells = tmp_path / folder / f"seed-{seed}" / "quality-quickstart" / "cells"
        cells.mkdir(parents=True)
        (cells / "taylor-0.7.json").write_text(json.dumps(row("taylor", 0.7, value, 1.0)))
    folders = [tmp_path / "first", tmp_path / "more"]
    markdown = table.table(folders, {"more/taylor-0.7": "first/taylor-0.7"})
    assert "| first/taylor-0.7 | 10 | 0, 1, 2 | 60.0 / 62.0 / 64.0 | 62.0 ± 0.6, spread 2.0 |" in markdown
    assert "more/" not in markdown
    with pytest.raises(SystemExit, match="seed 0 has two cells named first/taylor-0.7"):
        table.seed_cells([tmp_path / "first", tmp_path / "first"], {})


def test_the_quickstart_table_measures_differences_from_the_rival_it_is_given(tmp_path, monkeypatch):
    """Cells of one seed with per-row values: with ``rival`` named, its row is the baseline (perplexity 2x the
    tuned model's: 50%, against one-stage's 1.25x: 80%); the default rival absent, no difference is printed."""
    spec = importlib.util.spec_from_file_location("quickstart_table", ROOT / "benchmarks/quality/quickstart_table.py")
    table = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks" / "quality"))
    spec.loader.exec_module(table)
    cells = tmp_path / "clip" / "seed-0" / "quality-quickstart" / "cells"
    cells.mkdir(parents=True)
    for method, perplexity in [("lora", 40.0), ("one_stage", 50.0), ("taylor", 80.0)]:
        per_token = math.log(perplexity) + 0.1 * HARDNESS[:50] - 0.1 * HARDNESS[:50].mean()
        cell = row(method, 0.7, perplexity, 1.0) | {"rows": {"botchan": {"nll": (10 * per_token).tolist(),
                                                                          "tokens": [10.0] * 50}}}  # fmt: skip
        (cells / f"{method}.json").write_text(json.dumps(cell))
    (one_stage,) = [line for line in table.table([tmp_path / "clip"], rival="clip/taylor").splitlines()
                    if line.startswith("| clip/one_stage")]  # fmt: skip
    assert one_stage.endswith("| +30.0 [+30.0, +30.0, rows only] (1 seeds) |")
    default = table.table([tmp_path / "clip"]).splitlines()  # quickstart-clean/taylor-0.7 is not among the cells
    assert default[3].startswith("| clip/one_stage") and default[3].endswith("|  |")


def test_the_mask_overlap_counts_the_kept_units_two_runs_share(tmp_path):
    mask_overlap = script("mask_overlap")
    first = {"groups": torch.tensor([[1.0, 0.0]]), "channels": torch.tensor([[0.9, 0.8, 0.0, 0.0]]),
             "layers": torch.ones(1)}  # fmt: skip
    second = {"groups": torch.tensor([[1.0, 0.0]]), "channels": torch.tensor([[1.0, 0.0, 1.0, 0.0]]),
              "layers": torch.ones(1)}  # fmt: skip
    torch.save({"tailored_transition": {"gates": first}}, tmp_path / "a.ckpt")
    torch.save({"tailored_transition": {"gates": second}, "global_step": 5}, tmp_path / "b.ckpt")
    result = mask_overlap.overlap(mask_overlap.transition_gates(tmp_path / "a.ckpt"),
                                  mask_overlap.transition_gates(tmp_path / "b.ckpt"))  # fmt: skip
    expected = {
        "groups": {"kept": [1, 1], "shared_of_first": 1.0},
        "channels": {"kept": [2, 2], "shared_of_first": 0.5},
    }
    assert result == expected  # layers: kept whole by both runs, not listed
    torch.save({"tailored_transition": None}, tmp_path / "dense.ckpt")
    with pytest.raises(SystemExit, match="no transition recorded"):
        mask_overlap.transition_gates(tmp_path / "dense.ckpt")


def test_the_cell_difference_pairs_two_cells_from_any_folders_and_refuses_another_seed(monkeypatch):
    """A lever's cell against a config cell: the same value and error as the table's paired difference, the sign
    flipping with the order; a reference of another seed is refused."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks" / "quality"))
    difference = script("cell_difference")
    tuned, better, worse = (medical_cell(m, t, 0, s) for m, t, s in [("lora", None, 1.0), ("one_stage", 0.5, 0.8),
                                                                       ("taylor", 0.5, 0.5)])  # fmt: skip
    chances = quality.chance_levels("medical")
    value, error = quality.paired_difference(better, worse, tuned, quality.measurable_tasks(tuned, chances), chances)
    assert value > 10 and error > 0
    line = difference.difference_line(better, worse, tuned, "medical", ("a/one_stage", "b/taylor"))
    assert line.startswith(f"a/one_stage minus b/taylor: {value:+.1f} ± {error:.1f} points")
    assert difference.difference_line(worse, better, tuned, "medical", ("b", "a")).startswith(
        f"b minus a: {-value:+.1f}"
    )
    with pytest.raises(SystemExit, match="share a seed"):
        difference.difference_line(better, medical_cell("taylor", 0.5, 1, 0.5), tuned, "medical", ("a", "b"))
