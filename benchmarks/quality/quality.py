"""Pruning methods side by side: the same model, data, LoRA and token budget; held-out test rows; standard errors.

Each cell is one ``tailored fit`` (method, total budget, token budget, seed) on a suite's config, then ``tailored
test`` and ``tailored validate`` of its export. Cells are written to
``<out>/seed-<n>/quality-<suite>/cells/<cell>.json`` as they finish and are not re-run (kill the script at any time;
run it again to continue; a failed cell is reported and retried by the next run; a killed fit resumes from its last
checkpoint, and a finished fit is not run again: :func:`earlier_attempt`). ``--jobs N`` runs N cells at once
(small models leave a GPU mostly idle). After every cell the seed's tables ``<out>/seed-<n>/quality-<suite>.md`` and
``.json`` are rewritten with what is done so far::

    python benchmarks/quality/quality.py --suite medical --seeds 0 1 2 3 4 --steps-multiplier 1 4
    python benchmarks/quality/quality.py --suite quickstart --total-kept 0.75 --methods lora one_stage taylor

Budgets (``--total-kept``) are fractions of the dense model's *total* parameters, so methods that prune different
unit types are compared at the same export size: each method's fraction of its own prunable parameters is
``(total * N - fixed) / (N - fixed)``, ``fixed`` being what its units cannot remove (:func:`prunable_target`).
Token budgets (``--steps-multiplier k``) train ``k`` times the config's ``trainer.max_steps``; each has its own
LoRA-tuned reference. A seed (``--seeds``) is each fit's ``seed_everything`` (LoRA initialisation, gate noise) and
its training stream's ``data.seed`` (which examples come in which order); the test rows and their k-shot examples
are the same for every seed.

Methods: ``dense`` (no tuning), ``lora`` (the dense model LoRA-tuned: the 100% reference), ``one_stage`` (gates
learned while tuning, the config's settings), and two-stage rivals (prune at step 0, then tune): ``taylor`` (the
config's units, every type pruned by the same share: the split a user would pick), ``taylor_learned_shape`` (Taylor
pruning to the shape the one-stage cell of the same seed and budgets learned: the same shape, another mask),
``taylor_grid`` (three cells, one per split of :data:`GRID`), ``magnitude``, ``random``; and ``taylor_after_tuning``
(tune, prune, tune: LoRA on the dense model for the steps before the one-stage schedule's transition, merged, then
``taylor`` on that tuned model for the rest, :func:`run_taylor_after_tuning`), which has the one-stage run's training
path without its gates. ``--distill one_stage ...`` also runs the named methods with distillation from the dense
teacher (for ``taylor_after_tuning``: the tuned dense model it prunes).

``--vocabulary`` trims every pruned cell's vocabulary to the tokens of the domain's training split
(``pruning.vocabulary``, docs/vocabulary.md) and gives the embedding rows it removes to the pruned units: the export
still has ``total_kept`` of the dense model's parameters (:func:`prunable_target` with the kept token count, which
:func:`domain_vocabulary_size` finds before the fit; the fit's own count is checked against it). Every test and
validation counts language-modelling loss per token of the config's tokenizer (``data.reference_tokenizer``), so a
trimmed export's perplexity is measured on the same text as the others' and compares with theirs.

``pct_of_tuned`` is each task's primary metric as a share of the LoRA-tuned model's (:func:`share`): perplexity
inverted, and the skill above chance for accuracies, ``(m - chance) / (m_tuned - chance)``. A task whose tuned model
is within two standard errors of chance is unmeasurable: shown, and left out of the average (the *skill average*).
Cells keep their per-row test values, so every error is a paired bootstrap: the same resampled rows for both models
(cells without rows fall back to combining the two errors as if independent, which overstates it). Each seed's
table ends with, at each budget, one-stage minus the two-stage cell that is best on the validation rows.

PubMedQA's primary metric is balanced accuracy (mean per-label accuracy): plain accuracy rewards the "yes" prior,
which a model without skill answers on every row (its accuracy stays in the cells as ``also``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import NamedTuple

import torch
import yaml

from tailored.data.metrics import CHANCE_METRICS, chance_level, row_statistic
from tailored.data.reports import MEASURABLE_STDERRS, measurable
from tailored.data.reports import share as share_of
from tailored.data.tasks import Task

ROOT = Path(__file__).resolve().parents[2]

SUITES = {
    "medical": {
        "config": "configs/medical.yaml",
        "tasks": {"pubmedqa": "balanced_accuracy", "hqs": "rougeL", "pubmed_abstracts": "perplexity"},
    },
    "legal": {
        "config": "configs/legal.yaml",
        "tasks": {"casehold": "accuracy", "billsum": "rougeL", "multilegalpile": "perplexity"},
    },
    "quickstart": {"config": "configs/quickstart.yaml", "tasks": {"botchan": "perplexity"}},
}
GRID = {
    "taylor_grid_channels": ["channels"],
    "taylor_grid_groups_channels": ["groups", "channels"],
    "taylor_grid_groups_channels_hidden": ["groups", "channels", "hidden"],
}
"""The splits of ``taylor_grid``: the unit types Taylor prunes, every type by the same share of its units."""
TWO_STAGE = ("taylor", "taylor_learned_shape", *GRID, "magnitude", "random", "taylor_after_tuning")
"""Cells that prune once, then tune (at step 0; ``taylor_after_tuning`` after tuning the dense model first); the
best of them on validation is one-stage's rival."""
STAGE_SEED_OFFSET = 10_000
"""``taylor_after_tuning``'s second fit draws its training stream with ``data.seed + this``: fresh examples, not a
replay of the first fit's (each fit's stream starts at example 0 of its ``data.seed``)."""
PRUNED_METHODS = ("one_stage", *TWO_STAGE)
METHOD_CHOICES = (
    "dense",
    "lora",
    "one_stage",
    "taylor",
    "taylor_learned_shape",
    "taylor_grid",
    "magnitude",
    "random",
    "taylor_after_tuning",
)
ALSO = {"balanced_accuracy": "accuracy"}  # a secondary metric kept in the cells next to the primary one
RESAMPLES = 1000


class Cell(NamedTuple):
    """One fit of the grid (per seed): a method at a total budget and a token budget."""

    method: str
    """``dense``, ``lora`` or one of :data:`PRUNED_METHODS`."""
    total_kept: float | None
    """Kept fraction of the dense model's total parameters; None for dense and lora."""
    multiplier: int = 1
    """Token budget: this many times the config's ``trainer.max_steps``."""
    distill: bool = False
    vocabulary: bool = False
    """The export keeps the domain's tokens only (``pruning.vocabulary``); what that frees goes to the structure."""

    @property
    def name(self) -> str:
        return cell_name(self.method, self.total_kept, self.multiplier, self.distill, self.vocabulary)


def cell_name(
    method: str, total_kept: float | None, multiplier: int = 1, distill: bool = False, vocabulary: bool = False
) -> str:
    """``<method>[-<total kept>][-x<multiplier>][-distill][-vocab]``, e.g. ``taylor-0.75-x4``."""
    name = method if total_kept is None else f"{method}-{total_kept:g}"
    name += (f"-x{multiplier}" if multiplier != 1 else "") + ("-distill" if distill else "")
    return name + ("-vocab" if vocabulary else "")


def row_name(row: dict) -> str:
    """A finished cell's name; older cells (budgets as kept fractions of prunable) keep theirs."""
    kept = row.get("total_kept", row.get("kept_fraction")) if row["method"] not in ("dense", "lora") else None
    vocabulary = row.get("kept_tokens") is not None
    return cell_name(row["method"], kept, row.get("steps_multiplier", 1), row["distill"], vocabulary)


def budget(row: dict) -> tuple:
    """What a cell is compared at: (total kept, token multiplier); older cells: ("prunable", kept fraction)."""
    if "total_kept" in row:
        return row["total_kept"], row.get("steps_multiplier", 1)
    return "prunable", row["kept_fraction"]


def budget_label(key: tuple) -> str:
    if key[0] == "prunable":
        return f"kept {key[1]:g} of prunable (older cells)"
    return f"total kept {key[0]:g}, {key[1]}x tokens"


def config_value(suite: dict, extra: list[str], key: str):
    """A setting of the suite's config (dotted ``key``), or its last override ``--key value`` in ``extra``."""
    for index in range(len(extra) - 1, -1, -1):
        if extra[index] == f"--{key}" and index + 1 < len(extra):
            return yaml.safe_load(extra[index + 1])
        if extra[index].startswith(f"--{key}="):
            return yaml.safe_load(extra[index].split("=", 1)[1])
    value = yaml.safe_load((ROOT / suite["config"]).read_text())
    for part in key.split("."):
        value = (value or {}).get(part)
    return value


def chance_levels(suite_name: str) -> dict[str, float | None]:
    """Per task of the suite: the chance level of its primary metric (from the config's task definitions), None
    for metrics without one."""
    suite = SUITES[suite_name]
    tasks = {task["name"]: Task(**task) for task in config_value(suite, [], "data.tasks")}
    return {
        name: chance_level(tasks[name]) if name in tasks and metric in CHANCE_METRICS else None
        for name, metric in suite["tasks"].items()
    }


def prunable_target(model: str, units: list[str], total_kept: float, kept_tokens: int | None = None) -> float:
    """The kept fraction of the prunable parameters of ``units`` that leaves ``total_kept`` of the model's total:
    ``(total_kept * N - fixed) / (N - fixed)``, ``fixed`` the parameters those units cannot remove. With
    ``kept_tokens`` (a trimmed vocabulary) the fraction is raised by the rows it removes
    (:func:`tailored.core.targets.reinvested_fraction`, what ``pruning.vocabulary.reinvest`` does in a run): the
    export still has ``total_kept * N`` parameters."""
    from tailored.core.structure import structure_from_config  # imported here: the tables need no model
    from tailored.core.targets import prunable_bounds, reinvested_fraction
    from tailored.models import load_config

    structure = structure_from_config(load_config(model))
    fixed, full = prunable_bounds(structure, tuple(units))
    fraction = (total_kept * full - fixed) / (full - fixed)
    if kept_tokens is not None:
        if "hidden" in units:  # the embedding rows shrink with the hidden dims: not a fixed count
            raise ValueError("a trimmed vocabulary's budget is counted with the hidden size unpruned; drop hidden")
        fraction = reinvested_fraction(structure, tuple(units), fraction, kept_tokens)
    if not 0 < fraction < 1:
        raise ValueError(
            f"total kept {total_kept:g} cannot be met by pruning {units}: they cannot remove {fixed / full:.1%} of "
            "the model; prune more unit types or keep more"
        )
    return fraction


def domain_vocabulary_size(suite: dict, extra: list[str]) -> int:
    """How many tokens ``pruning.vocabulary`` (keep_top 0) keeps for the suite's training split: the count the
    fit will find (:func:`tailored.train.vocabulary.training_split_token_ids`), known before it starts."""
    from tailored.data.datamodule import DomainData
    from tailored.train.vocabulary import training_split_token_ids

    model = config_value(suite, extra, "model.model")
    tasks = [Task(**task) for task in config_value(suite, extra, "data.tasks")]
    data_dir, seq_len = ROOT / config_value(suite, extra, "data.data_dir"), config_value(suite, extra, "data.seq_len")
    data = DomainData(tasks, tokenizer=model, seq_len=seq_len, data_dir=str(data_dir))
    data.setup("fit")
    return len(training_split_token_ids(data, model, keep_top=0))


def tailored(*args: str, log: Path) -> None:
    """Run the ``tailored`` command, appending its output to ``log``; raise if it fails."""
    with log.open("a") as stream:
        stream.write(f"\n$ tailored {' '.join(args)}\n")
        stream.flush()
        done = subprocess.run([sys.executable, "-m", "tailored.cli", *args], stdout=stream, stderr=stream, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"tailored {args[0]} failed (exit {done.returncode}); see {log}")


def pruning_options(suite: dict, cell: Cell, extra: list[str], learned: dict | None) -> tuple[list[str], dict]:
    """The ``tailored fit`` options of a pruned cell, and what the cell records of them (units, prunable fraction,
    target shape). ``learned``: the finished one-stage cell whose shape ``taylor_learned_shape`` prunes to."""
    if cell.method == "taylor_learned_shape":
        if learned is None or not learned.get("shape"):
            raise RuntimeError(f"{cell.name} needs the learned shape of its one-stage cell, which has none")
        units, shape = learned["units"], learned["shape"]
        options = ["--model.pruning.target", "null", "--model.pruning.target_shape", json.dumps(shape)]
        options += ["--model.pruning.units", json.dumps(units), "--model.pruning.method", "taylor"]
        kept_tokens = learned.get("kept_tokens")
        options += vocabulary_options(cell)
        return options, {"units": units, "target_shape": shape, "kept_fraction": None, "kept_tokens": kept_tokens}
    units = GRID.get(cell.method) or config_value(suite, extra, "model.pruning.units")
    kept_tokens = domain_vocabulary_size(suite, extra) if cell.vocabulary else None
    fraction = prunable_target(config_value(suite, extra, "model.model"), units, cell.total_kept, kept_tokens)
    method = "taylor" if cell.method in (*GRID, "taylor_after_tuning") else cell.method
    options = ["--model.pruning.target", f"{fraction:.6f}", "--model.pruning.units", json.dumps(units)]
    options += ["--model.pruning.method", method, *vocabulary_options(cell)]
    return options, {"units": units, "kept_fraction": fraction, "kept_tokens": kept_tokens}


def vocabulary_options(cell: Cell) -> list[str]:
    """Domain vocabulary trimming on (the domain's tokens only, ``keep_top`` 0) or off."""
    return ["--model.pruning.vocabulary.keep_top", "0"] if cell.vocabulary else []


def run_cell(suite: dict, cell: Cell, seed: int, folder: Path, extra: list[str], learned: dict | None = None) -> dict:
    """Fit (unless dense), test and validate one cell; return its row. What a killed attempt with the same fit
    command left is reused (:func:`earlier_attempt`); otherwise the folder is emptied and the cell starts from
    scratch. ``learned``: the one-stage cell of a ``taylor_learned_shape`` cell."""
    log = folder / "log.txt"
    config = ["-c", suite["config"], *extra, "--seed_everything", str(seed)]
    max_steps = config_value(suite, extra, "trainer.max_steps") * cell.multiplier
    seconds, model, report, recorded = 0.0, None, {}, {"units": None, "kept_fraction": 1.0}
    options = []
    if cell.method != "dense":
        options = fit_options(folder / "fit", max_steps, seed)
        if cell.method == "lora":
            options += ["--model.pruning", "null"]
        else:
            pruning, recorded = pruning_options(suite, cell, extra, learned)
            options += pruning
        if cell.distill:
            options += ["--model.distill.weight", str(ARGS.distill_weight)]
        else:
            options += ["--model.distill", "null"]
    command = [*config, *options]
    record = {"fit": command, "config_sha256": config_digest(suite)}
    earlier = earlier_attempt(folder, record, cell.method)
    if earlier is None:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        earlier = Attempt()
    for evaluation in ("test", "validation"):  # an earlier attempt's, if it got that far
        shutil.rmtree(folder / evaluation, ignore_errors=True)
    finished = dict(earlier.finished or {})
    if earlier.checkpoint is not None:
        options += ["--ckpt_path", earlier.checkpoint]
        finished["resumed"] = True  # recorded with the cell: its seconds are the last attempt's
    fit_needed = earlier.finished is None
    if fit_needed:
        (folder / ATTEMPT).write_text(json.dumps(record) + "\n")
    if cell.method != "dense":
        start = time.monotonic()
        if fit_needed and cell.method == "taylor_after_tuning":
            finished["dense_tuning_steps"] = run_taylor_after_tuning(
                suite, config, options, folder, extra, max_steps, log
            )
        elif fit_needed:
            tailored("fit", *config, *options, log=log)
        finished.setdefault("seconds", round(time.monotonic() - start, 1))
        (folder / ATTEMPT).write_text(json.dumps(record | {"finished": finished}) + "\n")
        seconds = finished["seconds"]
        recorded |= {key: value for key, value in finished.items() if key != "seconds"}
        export = max((folder / "fit" / "lightning_logs").glob("version_*/export"))
        model = str(export)
        report = json.loads((export / "pruning_report.json").read_text())
        kept_tokens = report.get("vocabulary", {}).get("after")
        if recorded.get("kept_tokens") not in (None, kept_tokens):
            raise RuntimeError(f"the export kept {kept_tokens} tokens, the budget counted {recorded['kept_tokens']}")
    test = ["--trainer.default_root_dir", str(folder / "test"), "--model.pruning", "null"]
    test += ["--data.reference_tokenizer", config_value(suite, extra, "model.model")]  # trimmed exports: same text
    if ARGS.test_batch_size:
        test += ["--data.batch_size", str(ARGS.test_batch_size)]
    if model is not None:
        test += ["--model.model", model]
    tailored("test", *config, *test, log=log)
    results_file = max((folder / "test").rglob("test_results.json"))
    per_row = json.loads((results_file.parent / "test_rows.json").read_text())
    validate = [*test, "--trainer.default_root_dir", str(folder / "validation")]
    tailored("validate", *config, *validate, log=log)
    validation_file = max((folder / "validation").rglob("val_results.json"))
    return {
        "method": cell.method,
        "total_kept": cell.total_kept if cell.total_kept is not None else 1.0,
        "steps_multiplier": cell.multiplier,
        "max_steps": max_steps if cell.method != "dense" else 0,
        "seed": seed,
        "data_seed": seed,
        "distill": cell.distill,
        **recorded,
        "shape": report.get("uniform_shape"),
        "tasks": primary_metrics(suite, json.loads(results_file.read_text())),
        "validation": primary_metrics(suite, json.loads(validation_file.read_text())),
        "rows": {task: per_row[task] for task in suite["tasks"]},
        "parameters": report.get("parameters", {}).get("after"),
        "seconds": round(seconds, 1),
    }


ATTEMPT = "attempt.json"
"""The file of a cell's run folder that records its fit command and the digest of the config file it reads (and the
fit's seconds once it finished), so that a later run can tell whether what it finds there is the fit it would
start: the same command on an edited config is another fit."""


def config_digest(suite: dict) -> str:
    """SHA-256 of the suite's config file as it is now."""
    return hashlib.sha256((ROOT / suite["config"]).read_bytes()).hexdigest()


class Attempt(NamedTuple):
    """What an earlier attempt at a cell, whose fit ran the same command on the same config file, left to reuse."""

    finished: dict | None = None
    """The finished fit's record (``{"seconds": s, ...}``): its export is kept, only the evaluations run again."""
    checkpoint: str | None = None
    """The last checkpoint of a fit killed before its end: the fit resumes from it and ends where an uninterrupted
    fit does (``tailored fit --ckpt_path``, tests/train)."""


def earlier_attempt(folder: Path, record: dict, method: str) -> Attempt | None:
    """What an earlier attempt at this cell (a killed script) whose fit was ``record`` (its command and config
    digest), exactly, left to reuse (an empty :class:`Attempt` when nothing of use); None when there was no such
    attempt. ``taylor_after_tuning`` (two fits) reuses a finished fit only."""
    path = folder / ATTEMPT
    attempt = json.loads(path.read_text()) if path.is_file() else {}
    if any(attempt.get(key) != value for key, value in record.items()):
        return None
    if "finished" in attempt and any((folder / "fit").glob("lightning_logs/version_*/export")):
        return Attempt(finished=attempt["finished"])
    last = folder / "fit" / "checkpoints" / "last.ckpt"
    if method not in ("dense", "taylor_after_tuning") and last.is_file():
        return Attempt(checkpoint=str(last))
    return Attempt()


def fit_options(root: Path, steps: int, data_seed: int) -> list[str]:
    """The ``tailored fit`` options every cell's fit shares: its folder, ``steps`` steps, the training stream of
    ``data_seed`` (the cell's seed: a seed varies the data order too, not only what ``seed_everything`` seeds),
    no validation while it trains (the cell validates its export afterwards). Tests and validations keep the
    config's ``data.seed``, so every seed is evaluated with the same k-shot examples."""
    options = ["--trainer.default_root_dir", str(root), "--trainer.limit_val_batches", "0"]
    return [*options, "--trainer.max_steps", str(steps), "--data.seed", str(data_seed)]


def run_taylor_after_tuning(
    suite: dict, config: list[str], options: list[str], folder: Path, extra: list[str], max_steps: int, log: Path
) -> int:
    """Tune, prune, tune in two ``tailored fit`` calls that share the cell's ``max_steps``: LoRA on the dense model
    for the steps the one-stage schedule spends before its scheduled transition (``(1 - pruning.recovery) *
    max_steps``; an early decision, ``pruning.settle_steps``, is not followed), exported merged (``<folder>/tune``,
    removed once the second fit is done), then ``options`` (Taylor pruning of that tuned model at step 0, a fresh
    LoRA) for the rest in ``<folder>/fit``, on a training stream of another data seed (:data:`STAGE_SEED_OFFSET`).
    Returns the dense steps.

    It has the one-stage run's training path (tune while dense, merge, prune, fresh LoRA) with Taylor's one-shot
    mask instead of learned gates, so against ``one_stage`` it separates what the gates add from what the path
    adds."""
    from tailored.train.settings import PruningSettings  # imported here: the tables need no training code

    recovery = config_value(suite, extra, "model.pruning.recovery")
    steps = round(max_steps * (1 - (PruningSettings.recovery if recovery is None else recovery)))
    if not 0 < steps < max_steps:
        raise ValueError(f"taylor_after_tuning needs 0 < pruning.recovery < 1 to split {max_steps} steps")
    data_seed = config_value(suite, options, "data.seed")  # the cell's stream: the first fit draws it
    first = [*fit_options(folder / "tune", steps, data_seed), "--model.pruning", "null", "--model.distill", "null"]
    tailored("fit", *config, *first, log=log)
    tuned = max((folder / "tune" / "lightning_logs").glob("version_*/export"))
    data_seed += STAGE_SEED_OFFSET
    second = [*options, "--trainer.max_steps", str(max_steps - steps), "--model.model", str(tuned)]
    tailored("fit", *config, *second, "--data.seed", str(data_seed), log=log)
    shutil.rmtree(folder / "tune")  # a merged dense model: the cell's model is the second fit's export
    return steps


def primary_metrics(suite: dict, results: dict) -> dict:
    """Per task of the suite: its primary metric's value and standard error (and the secondary one) in
    ``results`` (a ``test_results.json`` or ``val_results.json``)."""
    return {
        task: {"metric": metric, "value": results[task][metric], "stderr": results[task][f"{metric}_stderr"]}
        | ({"also": {ALSO[metric]: results[task][ALSO[metric]]}} if metric in ALSO else {})
        for task, metric in suite["tasks"].items()
    }


def share(row: dict, reference: dict, task: str, chance: float | None = None) -> tuple[float, float]:
    """(``row``'s % of the reference's on ``task``, its standard error) by :func:`tailored.data.reports.share`:
    perplexity inverted, the skill above ``chance`` where the metric has one. The error is the paired bootstrap of
    :func:`resampled_shares` where both cells kept their rows; NaN where the share is undefined."""
    mine, ref = row["tasks"][task], reference["tasks"][task]
    if row is reference:
        return 100.0, 0.0
    if mine["metric"] != ref["metric"]:  # cells tested before and after a change of the suite's metric
        return float("nan"), float("nan")
    perplexity = mine["metric"] == "perplexity"
    if perplexity and not mine["value"]:  # a broken cell is reported, not a crash
        return float("nan"), float("nan")
    value = float(share_of(mine["value"], ref["value"], mine["metric"], chance))
    if math.isnan(value):
        return value, float("nan")
    if paired(row, reference, task):
        return value, float(resampled_shares(row, reference, task, chance).std())
    if perplexity:  # errors combined as if independent (first order)
        return value, value * math.hypot(mine["stderr"] / mine["value"], ref["stderr"] / ref["value"])
    above = ref["value"] - (chance or 0.0)  # the reference's skill; the share is (m - chance) / above
    return value, 100 * math.hypot(mine["stderr"], value / 100 * ref["stderr"]) / above


def paired(row: dict, reference: dict, task: str) -> bool:
    """Both cells kept the per-row test values of ``task``, on the same rows."""
    mine, ref = row.get("rows", {}).get(task), reference.get("rows", {}).get(task)
    return bool(mine and ref) and len(mine["nll"]) == len(ref["nll"])


def resampled_shares(row: dict, reference: dict, task: str, chance: float | None = None, seed: int = 0):
    """``[RESAMPLES]`` values of the share (%) on bootstrap resamples of the rows, the same rows for both cells
    (Efron & Tibshirani 1993, ch. 6): the noise of the test rows that both models see cancels out. The resamples
    depend only on ``seed`` and the row count, so cells of other training seeds tested on the same rows are
    resampled alike."""
    metric = row["tasks"][task]["metric"]
    columns = [
        {name: torch.tensor(values, dtype=torch.float64) for name, values in cell["rows"][task].items()}
        for cell in (row, reference)
    ]
    count = len(columns[0]["nll"])
    index = torch.randint(count, (RESAMPLES, count), generator=torch.Generator().manual_seed(seed))
    mine, ref = (row_statistic(metric, {k: v[index] for k, v in c.items()}) for c in columns)
    return share_of(mine, ref, metric, chance)


def measurable_tasks(reference: dict, chances: dict[str, float | None], split: str = "tasks") -> list[str]:
    """The reference's tasks that measure skill: its score more than two standard errors above chance."""
    return [
        task
        for task, found in reference[split].items()
        if measurable(found["value"], found["stderr"], chances.get(task))
    ]


def resampled_average(row: dict, reference: dict, tasks: list[str], chances: dict[str, float | None]):
    """``[RESAMPLES]`` values of the skill average (mean % of tuned over ``tasks``); task ``i`` of the suite
    resamples its rows with seed ``i``, so the resamples of any two cells pair row for row."""
    order = list(reference["tasks"])
    resamples = [resampled_shares(row, reference, task, chances.get(task), order.index(task)) for task in tasks]
    return sum(resamples) / len(tasks)


def skill_average(row: dict, reference: dict, tasks: list[str], chances: dict, split: str = "tasks") -> float:
    """The mean % of the reference over ``tasks`` on the test rows (``split="validation"``: the validation
    figures); NaN where a task is missing or undefined."""
    if not tasks or any(task not in row.get(split, {}) for task in tasks):
        return float("nan")
    views = [{"tasks": row[split]}, {"tasks": reference[split]}]
    return sum(share(views[0], views[1], task, chances.get(task))[0] for task in tasks) / len(tasks)


def paired_difference(row: dict, other: dict, reference: dict, tasks: list[str], chances: dict):
    """``row``'s skill average minus ``other``'s and the paired bootstrap error of the difference (every task's
    rows resampled once for all three cells); None unless all three kept their rows."""
    if not all(paired(cell, reference, task) for cell in (row, other) for task in tasks):
        return None
    difference = resampled_average(row, reference, tasks, chances) - resampled_average(other, reference, tasks, chances)
    value = skill_average(row, reference, tasks, chances) - skill_average(other, reference, tasks, chances)
    return value, float(difference.std())


def reference_of(row: dict, rows: list[dict]) -> dict | None:
    """The LoRA-tuned cell with the same token budget (older cells have one budget)."""
    multiplier = row.get("steps_multiplier", 1)
    return next((r for r in rows if r["method"] == "lora" and r.get("steps_multiplier", 1) == multiplier), None)


def tables(rows: list[dict], suite_name: str, header: list[str]) -> tuple[dict, str]:
    """The JSON document and the Markdown table of one seed's finished rows."""
    chances = chance_levels(suite_name)
    for row in rows:
        reference = reference_of(row, rows)
        if reference is None:
            continue
        shares = {task: share(row, reference, task, chances.get(task)) for task in row["tasks"]}
        tasks = measurable_tasks(reference, chances)
        row["pct_of_tuned"] = {task: value for task, (value, _) in shares.items()}
        row["pct_of_tuned_stderr"] = {task: error for task, (_, error) in shares.items()}
        row["unmeasurable"] = [task for task in row["tasks"] if task not in tasks]
        values = [shares[task][0] for task in tasks]
        row["pct_of_tuned_avg"] = sum(values) / len(values) if values else float("nan")
        row["pct_of_tuned_avg_stderr"] = math.sqrt(sum(shares[t][1] ** 2 for t in tasks)) / max(len(tasks), 1)
        if tasks and all(paired(row, reference, task) for task in tasks) and row is not reference:
            row["pct_of_tuned_avg_stderr"] = float(resampled_average(row, reference, tasks, chances).std())
    tasks = list(SUITES[suite_name]["tasks"].items())
    if rows:  # the metric the cells were tested with (older cells of a suite may predate a change of metric)
        tasks = [(task, rows[0]["tasks"][task]["metric"]) for task, _ in tasks if task in rows[0]["tasks"]]
    validated = any("validation" in row for row in rows)  # cells made before validation was measured have none
    columns = ["method", "total kept", "tokens", "distill", *(f"{task} {metric}" for task, metric in tasks)]
    columns += [f"validation {task} {metric}" for task, metric in tasks] if validated else []
    columns += ["skill: % of tuned (avg)", "parameters", "fit s"]
    lines = [*header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in sorted(rows, key=table_order):
        kept = f"{row['total_kept']:g}" if "total_kept" in row else f"{row['kept_fraction']:g} of prunable"
        kept = "1" if row["method"] in ("dense", "lora") else kept
        cells = [row["method"], kept, f"{row.get('steps_multiplier', 1)}x", "yes" if row["distill"] else ""]
        cells += [f"{row['tasks'][t]['value']:.4g} ± {row['tasks'][t]['stderr']:.2g}" for t, _ in tasks]
        if validated:
            found = row.get("validation", {})
            cells += [f"{found[t]['value']:.4g} ± {found[t]['stderr']:.2g}" if t in found else "" for t, _ in tasks]
        average = row.get("pct_of_tuned_avg")
        cells.append("" if average is None else f"{average:.1f} ± {row['pct_of_tuned_avg_stderr']:.1f}")
        cells += [f"{row['parameters']:,}" if row["parameters"] else "", f"{row['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += unmeasurable_lines(rows, chances) + comparisons(rows, chances)
    return {"header": header, "rows": rows}, "\n".join(lines) + "\n"


def table_order(row: dict) -> tuple:
    """Dense and LoRA first, then the larger budgets, the shorter token budgets, by name."""
    size = row.get("total_kept", row.get("kept_fraction", 1.0))
    return row["method"] not in ("dense", "lora"), -size, row.get("steps_multiplier", 1), row_name(row)


def unmeasurable_lines(rows: list[dict], chances: dict[str, float | None]) -> list[str]:
    """Markdown lines naming, per LoRA-tuned reference, the tasks it cannot measure (within two standard errors of
    chance): their shares are in the cells and left out of the skill average."""
    lines = []
    for reference in (row for row in rows if row["method"] == "lora"):
        for task in (t for t in reference["tasks"] if t not in measurable_tasks(reference, chances)):
            found = reference["tasks"][task]
            lines.append(
                f"- unmeasurable with the {row_name(reference)} reference: {task} ({found['metric']} "
                f"{found['value']:.3g} ± {found['stderr']:.2g}, chance {chances[task]:.3g}): shown, left out of the "
                "skill average"
            )
    if not lines:
        return []
    return [
        "",
        f"Unmeasurable tasks (the tuned model within {MEASURABLE_STDERRS:g} standard errors of chance):",
        *lines,
    ]


def best_on_validation(cells: list[dict], reference: dict, tasks: list[str], chances: dict) -> tuple[dict, str]:
    """The cell with the highest skill average on the validation rows, and on which split it was chosen (the test
    rows when a cell has no validation figures: older cells)."""
    split = "validation" if all("validation" in cell for cell in cells) and "validation" in reference else "tasks"
    best = max(cells, key=lambda cell: nan_low(skill_average(cell, reference, tasks, chances, split)))
    return best, "validation" if split == "validation" else "test"


def nan_low(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def comparisons(rows: list[dict], chances: dict[str, float | None]) -> list[str]:
    """Markdown lines: at each budget, the one-stage cell minus the undistilled two-stage cell best on validation
    (skill averages), with the paired bootstrap error of that difference."""
    lines = []
    for key in sorted({budget(row) for row in rows if row["method"] in PRUNED_METHODS}, key=str, reverse=True):
        at_budget = [row for row in rows if row["method"] in PRUNED_METHODS and budget(row) == key]
        reference = reference_of(at_budget[0], rows)
        ours = [row for row in at_budget if row["method"] == "one_stage"]
        theirs = [row for row in at_budget if row["method"] in TWO_STAGE and not row["distill"]]
        if reference is None or not (ours and theirs):
            continue
        tasks = measurable_tasks(reference, chances)
        (best, _), (rival, chosen_on) = (
            best_on_validation(cells, reference, tasks, chances) for cells in (ours, theirs)
        )
        names = f"{row_name(best)} - {row_name(rival)}, rival chosen on {chosen_on}"
        difference = paired_difference(best, rival, reference, tasks, chances)
        if difference is None:  # cells without per-row values: the errors combined as if independent
            value = best["pct_of_tuned_avg"] - rival["pct_of_tuned_avg"]
            error = math.hypot(best["pct_of_tuned_avg_stderr"], rival["pct_of_tuned_avg_stderr"])
            names += ", unpaired"
        else:
            value, error = difference
        lines.append(f"- {budget_label(key)}, one-stage minus best two-stage ({names}): {value:+.1f} ± {error:.1f}")
    if not lines:
        return []
    return ["", "Paired differences (skill average, points; paired bootstrap over the test rows):", *lines]


def plan(args: argparse.Namespace) -> list[Cell]:
    """Every cell of one seed, the ``taylor_learned_shape`` cells last (they wait for their one-stage cell)."""
    methods = [m for method in args.methods for m in (GRID if method == "taylor_grid" else [method])]
    cells = [Cell("dense", None)] if "dense" in methods else []
    cells += [Cell("lora", None, k) for k in args.steps_multiplier if "lora" in methods]
    for total in args.total_kept:
        for k in args.steps_multiplier:
            for method in (m for m in methods if m in PRUNED_METHODS and m != "taylor_learned_shape"):
                if not (args.distilled_only and method in args.distill):
                    cells.append(Cell(method, total, k, vocabulary=args.vocabulary))
                if method in args.distill:
                    cells.append(Cell(method, total, k, True, args.vocabulary))
    if "taylor_learned_shape" in methods:
        cells += [
            Cell("taylor_learned_shape", t, k, vocabulary=args.vocabulary)
            for t in args.total_kept
            for k in args.steps_multiplier
        ]
    return cells


def main() -> None:
    suite = SUITES[ARGS.suite]
    header = [
        f"# Quality: {ARGS.suite} suite",
        "",
        f"Command: `python benchmarks/quality/quality.py {' '.join(sys.argv[1:])}`  ",
        f"Config: `{suite['config']}` {' '.join(ARGS.extra)}  ",
        f"Versions: tailored {version('tailored')}, torch {version('torch')}, transformers {version('transformers')}, "
        f"peft {version('peft')}, lightning {version('lightning')}  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
        f"Python {platform.python_version()}, accelerator: {accelerator()}  ",
        "Values: test-row metric ± bootstrap standard error (validation columns: the validation rows, on which "
        "settings are chosen); skill: share of the LoRA-tuned dense model's on the test rows, above chance for "
        "accuracies, averaged over the measurable tasks.",
    ]
    cells = plan(ARGS)
    todo = [
        (seed, cell)
        for seed in ARGS.seeds
        for cell in cells
        if not (cells_dir(seed) / f"{cell.name}.json").is_file() and not ARGS.report_only
    ]
    lock = threading.Lock()  # one table writer at a time
    finished = {(seed, cell.name): threading.Event() for seed, cell in todo}

    def finish(seed: int, cell: Cell) -> None:
        name = f"seed-{seed}/{cell.name}"
        print(f"running {name}", flush=True)
        try:
            learned = None
            if cell.method == "taylor_learned_shape":  # its one-stage cell was queued earlier: it has started
                one_stage = Cell("one_stage", cell.total_kept, cell.multiplier, vocabulary=cell.vocabulary)
                finished.get((seed, one_stage.name), DONE).wait()
                path = cells_dir(seed) / f"{one_stage.name}.json"
                if not path.is_file():
                    raise RuntimeError(f"its one-stage cell {one_stage.name} did not finish")
                learned = json.loads(path.read_text())
            row = run_cell(suite, cell, seed, ARGS.runs / ARGS.suite / f"seed-{seed}" / cell.name, ARGS.extra, learned)
            with lock:
                cells_dir(seed).mkdir(parents=True, exist_ok=True)
                (cells_dir(seed) / f"{cell.name}.json").write_text(json.dumps(row, indent=2) + "\n")
                write_tables(seed, header)
            print(f"done {name}", flush=True)
        except (RuntimeError, ValueError) as error:  # the other cells go on; running the script again retries it
            print(f"failed {name}: {error}", flush=True)
        finally:
            finished[seed, cell.name].set()  # after the cell's file is written: a waiting cell reads it

    order = sorted(todo, key=lambda item: item[1].method == "taylor_learned_shape")  # waiting cells last: no deadlock
    with ThreadPoolExecutor(ARGS.jobs) as pool:  # cells are subprocesses: threads only wait on them
        list(pool.map(lambda item: finish(*item), order))
    for seed in ARGS.seeds:
        if cells_dir(seed).is_dir():
            print(write_tables(seed, header))


DONE = threading.Event()
DONE.set()  # the event of a cell finished by an earlier run


def cells_dir(seed: int) -> Path:
    return ARGS.out / f"seed-{seed}" / f"quality-{ARGS.suite}" / "cells"


def accelerator() -> str:
    """The GPU the cells' ``tailored`` calls will use, or ``cpu``."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def write_tables(seed: int, header: list[str]) -> str:
    """Rewrite the seed's ``quality-<suite>.json`` and ``.md`` from its finished cells; return the Markdown. With
    ``--report-only`` the header of the run that made the cells is kept."""
    folder = cells_dir(seed).parent.parent
    existing = folder / f"quality-{ARGS.suite}.json"
    if ARGS.report_only and existing.is_file():
        header = json.loads(existing.read_text())["header"]
    rows = [json.loads(p.read_text()) for p in sorted(cells_dir(seed).glob("*.json"))]
    document, markdown = tables(rows, ARGS.suite, header)
    existing.write_text(json.dumps(document, indent=2) + "\n")
    (folder / f"quality-{ARGS.suite}.md").write_text(markdown)
    return markdown


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="medical")
    parser.add_argument(
        "--total-kept", type=float, nargs="+", default=[0.75, 0.5], help="kept fractions of the total parameters"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="per run of the cells: seed_everything and the fits' data.seed",
    )
    parser.add_argument(
        "--steps-multiplier", type=int, nargs="+", default=[1], help="token budgets: max_steps times each of these"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["dense", "lora", "one_stage", "taylor", "taylor_learned_shape", "taylor_grid", "taylor_after_tuning"],
        choices=METHOD_CHOICES,
    )
    parser.add_argument(
        "--distill", nargs="*", default=[], choices=PRUNED_METHODS, help="also run these methods with distillation"
    )
    parser.add_argument("--distill-weight", type=float, default=0.5)
    parser.add_argument("--distilled-only", action="store_true", help="run the --distill methods with it only")
    parser.add_argument(
        "--vocabulary",
        action="store_true",
        help="pruned cells trim the vocabulary to the domain's tokens; the freed rows go to the structure",
    )
    parser.add_argument(
        "--test-batch-size", type=int, help="rows per test batch (the results do not depend on it; a GPU takes more)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once (a GPU has room for several)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the tables from finished cells only")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "quality", help="where the runs are written")
    parser.add_argument("extra", nargs="*", help="options passed to every tailored call, after --")
    args = parser.parse_args(argv)
    if any(option == "--data.seed" or option.startswith("--data.seed=") for option in args.extra):
        parser.error("--data.seed is set per seed by --seeds (the fits' training stream): leave it out after --")
    args.out, args.runs = args.out.resolve(), args.runs.resolve()  # the tailored calls run in the repository root
    return args


if __name__ == "__main__":
    ARGS = parse_args()
    main()
