"""Every config's tasks on the data they ship with: no boilerplate, no empty rows, no row in two splits."""

from __future__ import annotations

import pytest
import yaml
from helpers import ROOT

from tailored.data import cleaning
from tailored.data.datamodule import DomainData
from tailored.data.tasks import Task

SPLITS = ("training", "validation", "test")
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
BOILERPLATE = (
    "Project Gutenberg",
    "PROJECT GUTENBERG",
    "End of the Project",
    "Pursuant to Title 17 Section 105",  # the public-domain notice of US government documents
)


def config_tasks(path) -> tuple[list[Task], str | None]:
    data = yaml.safe_load(path.read_text())["data"]
    data_dir = data.get("data_dir")
    return [Task(**task) for task in data["tasks"]], None if data_dir is None else str(ROOT / data_dir)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.stem)
def test_no_split_holds_boilerplate_empty_rows_or_a_row_of_another_split(config):
    tasks, data_dir = config_tasks(config)
    if data_dir is not None and not (ROOT / data_dir).is_dir():
        pytest.skip(f"{data_dir} is not here")
    data = DomainData(tasks, data_dir=data_dir)
    for task in data.tasks:
        splits = vars(data.split_rows(task))
        texts = {name: [cleaning.row_text(task, row) for row in splits[name]] for name in SPLITS}
        for name, rows in texts.items():
            assert rows, f"{config.name}: task {task.name} has no {name} rows"
            assert all(text.strip() for text in rows), f"{config.name}: task {task.name} has empty {name} rows"
            found = [marker for marker in BOILERPLATE for text in rows if marker in text]
            assert not found, f"{config.name}: task {task.name}'s {name} rows hold {sorted(set(found))}"
        if task.kind == "language_modeling":  # lines of one text: a short line may recur without leaking
            continue
        keys = {name: {cleaning.overlap_key(task, row) for row in splits[name]} for name in texts}
        assert not keys["training"] & (keys["validation"] | keys["test"]), f"{config.name}: {task.name} leaks"
        assert not keys["validation"] & keys["test"], f"{config.name}: {task.name} validates on test rows"


def test_the_medical_training_file_repeats_two_test_questions_which_are_left_out():
    """Found when the shipped data was checked: two HQS test questions are in the training file with other line
    breaks (and a trailing '>'); without the guard the model would train on them."""
    tasks, data_dir = config_tasks(ROOT / "configs" / "medical.yaml")
    if not (ROOT / data_dir).is_dir():
        pytest.skip(f"{data_dir} is not here")
    data = DomainData(tasks, data_dir=data_dir)
    hqs = next(task for task in data.tasks if task.name == "hqs")
    assert sum(data.split_rows(hqs).repeats.values()) == 2
