"""The share of the tuned model's skill above chance: 0 for a model that always gives one label, 100 for the tuned
model; a reference at chance makes a task unmeasurable (shown, left out of the average)."""

from __future__ import annotations

import math

import pytest
import torch

from tailored.data.metrics import PRIMARY_METRIC, balanced_accuracy, chance_level, row_statistic
from tailored.data.reports import comparison_table, format_comparison, measurable, share
from tailored.data.tasks import Task

LABELS = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)  # an unbalanced label set, like PubMedQA's yes / no / maybe


def test_a_model_that_always_answers_one_label_keeps_no_skill_and_the_tuned_model_all_of_it():
    task = Task("qa", "rows.jsonl", "classification", prompt="{q}", answer=" {a}", choices=[" yes", " no", " maybe"])
    chance = chance_level(task)
    assert chance == pytest.approx(1 / 3) and PRIMARY_METRIC["classification"] == "balanced_accuracy"
    tuned_correct = (torch.arange(100) % 4 != 0).double()  # 3 of 4 rows right, in every label
    for majority in range(3):  # whichever label it always gives
        always = torch.eq(LABELS, majority).double()
        constant, tuned = (balanced_accuracy(correct, LABELS) for correct in (always, tuned_correct))
        assert float(constant) == pytest.approx(chance)  # its plain accuracy would be that label's share
        assert share(float(constant), float(tuned), "balanced_accuracy", chance) == pytest.approx(0.0, abs=1e-9)
        assert share(float(tuned), float(tuned), "balanced_accuracy", chance) == pytest.approx(100.0)
    assert share(0.5, 0.75, "accuracy") == pytest.approx(200 / 3)  # without a chance level: the plain ratio
    assert share(20.0, 10.0, "perplexity", chance) == pytest.approx(50.0)  # perplexity inverted, no chance level


def test_the_share_of_resampled_rows_stays_zero_for_a_model_without_skill():
    """The paired bootstrap resamples the same rows for both models: a one-label model's share is 0 on each."""
    index = torch.randint(100, (200, 100), generator=torch.Generator().manual_seed(0))
    columns = {"label": LABELS.double()[index]}
    always = row_statistic("balanced_accuracy", columns | {"correct": (LABELS == 0).double()[index]})
    tuned = row_statistic("balanced_accuracy", columns | {"correct": (torch.arange(100) % 4 != 0).double()[index]})
    assert share(always, tuned, "balanced_accuracy", 1 / 3).abs().max() < 1e-9


def test_a_reference_within_two_standard_errors_of_chance_makes_its_task_unmeasurable():
    assert measurable(0.30, 0.02, 0.2) and not measurable(0.23, 0.02, 0.2) and not measurable(0.12, 0.02, 0.2)
    assert measurable(0.1, 0.5, None)  # no chance level (ROUGE, perplexity): always measurable
    results = {
        "dense": {"case": {"accuracy": 0.21, "accuracy_stderr": 0.02}, "text": {"perplexity": 20.0}},
        "tuned": {"case": {"accuracy": 0.22, "accuracy_stderr": 0.02}, "text": {"perplexity": 10.0}},
        "pruned": {"case": {"accuracy": 0.2, "accuracy_stderr": 0.02}, "text": {"perplexity": 12.5}},
    }
    kinds = {"case": "multiple_choice", "text": "language_modeling"}
    table = comparison_table(results, kinds, dense="dense", tuned="tuned", chance={"case": 0.2, "text": None})
    assert table["tasks"]["case"]["unmeasurable"] == ["dense", "tuned"] and not table["tasks"]["text"]["unmeasurable"]
    assert table["tasks"]["case"]["pruned % of tuned"] == pytest.approx(0.0)  # shown ...
    assert table["average"]["pruned % of tuned"] == pytest.approx(80.0)  # ... and left out of the average
    text = format_comparison(table)
    assert "0.0*" in text and "unmeasurable" in text.splitlines()[-1]
    at_chance = comparison_table(
        {name: {"case": {"accuracy": 0.2, "accuracy_stderr": 0.0}} for name in ("dense", "pruned")},
        {"case": "multiple_choice"},
        dense="dense",
        chance={"case": 0.2},
    )
    assert math.isnan(at_chance["tasks"]["case"]["pruned % of dense"])  # no skill to share: undefined, not a crash
