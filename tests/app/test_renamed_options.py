"""Options renamed for the test split (``eval_source`` -> ``test_source``, ``eval_fraction`` -> ``test_fraction``,
``data.eval_rows`` -> ``data.test_rows``) still work under their old names, in Python and in YAML, with one line
saying so; the old names go in the next release."""

from __future__ import annotations

import json
import re
import sys
import warnings

import pytest
import yaml

from tailored.cli import main
from tailored.data.datamodule import DomainData
from tailored.data.tasks import RenamedOptionWarning, Task

NOTICES = {
    "eval_source": "data.tasks[].eval_source is now test_source; the old name goes in the next release",
    "eval_fraction": "data.tasks[].eval_fraction is now test_fraction; the old name goes in the next release",
    "eval_rows": "data.eval_rows is now test_rows; the old name goes in the next release",
}


def test_old_names_work_in_python_and_warn(tmp_path, tiny_model_dir, tiny_text):
    with pytest.warns(RenamedOptionWarning, match=re.escape(NOTICES["eval_source"])):
        task = Task("words", str(tiny_text), eval_source=str(tiny_text))
    assert task.test_source == str(tiny_text) and task.eval_source is None
    with pytest.warns(RenamedOptionWarning, match=re.escape(NOTICES["eval_fraction"])):
        task = Task("words", str(tiny_text), eval_fraction=0.25)
    assert task.test_fraction == 0.25 and task.eval_fraction is None
    with pytest.warns(RenamedOptionWarning, match=re.escape(NOTICES["eval_rows"])):
        data = DomainData([Task("words", str(tiny_text))], tokenizer=str(tiny_model_dir), eval_rows=3)
    assert data.test_rows == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new names say nothing
        Task("words", str(tiny_text), test_source=str(tiny_text), test_fraction=0.25)
        DomainData([Task("words", str(tiny_text))], tokenizer=str(tiny_model_dir), test_rows=3)


def test_old_names_work_in_yaml_with_one_line_each(tmp_path, tiny_model_dir, tiny_text, capsys, monkeypatch):
    """A config with the old names: the splits they ask for, and each notice once on stderr (the refused fit
    stops after the data are set up, before any weight loads)."""
    rows = [{"q": f"w{3 + i % 40} w{5 + i % 30}", "a": ("w60", "w61")[i % 2]} for i in range(60)]
    for name, part in (("train", rows[:50]), ("test", rows[50:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in part))
    classify = {"name": "classify", "source": str(tmp_path / "train.jsonl"), "kind": "classification",
                "prompt": "{q}", "answer": " {a}", "choices": [" w60", " w61"],
                "eval_source": str(tmp_path / "test.jsonl")}  # fmt: skip
    words = {"name": "words", "source": str(tiny_text), "eval_fraction": 0.5}
    config = {
        "model": {"model": str(tiny_model_dir), "pruning": {"target": 0.6, "round_to": 1}},
        "data": {"tasks": [classify, words], "seq_len": 16, "batch_size": 2, "eval_rows": 4},
        "trainer": {"accelerator": "cpu", "max_steps": 0, "default_root_dir": str(tmp_path / "run")},
    }
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(sys, "argv", ["tailored", "fit", "-c", str(path)])
    monkeypatch.delenv("TAILORED_TRACEBACK", raising=False)
    with pytest.raises(SystemExit, match="trainer.max_steps must be a positive number"):
        main()
    printed = capsys.readouterr()
    for notice in NOTICES.values():
        assert printed.err.splitlines().count(notice) == 1, printed.err
    splits = {tuple(line.split()[:3]) for line in printed.out.splitlines()}
    assert ("classify", "test", "4") in splits  # eval_rows capped the 10 rows of eval_source
    assert ("words", "test", "100") in splits  # eval_fraction held out half of the 200 lines
