"""Rows a task drops before it is split (tailored.cleaning), and the split report of the data set-up."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

from tailored.data import sources
from tailored.data.datamodule import DomainData
from tailored.data.tasks import Task

QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def quickstart_task() -> Task:
    (task,) = yaml.safe_load(QUICKSTART.read_text())["data"]["tasks"]
    return Task(**task)


def test_the_quickstart_splits_hold_the_novel_only():
    task = quickstart_task()
    lines = sources.load_rows(task.source)["text"]
    assert sum("Project Gutenberg" in line for line in lines) > 10  # the file has the header and the licence
    rows = DomainData([task]).split_rows(task)
    splits = {name: list(getattr(rows, name)["text"]) for name in ("training", "validation", "test")}
    for split, texts in splits.items():
        assert not [line for line in texts if "Gutenberg" in line or "GUTENBERG" in line], split
    assert splits["training"][0] == "BOTCHAN (MASTER DARLING)"  # the book's title page is kept
    assert splits["test"][-1] == "So Kiyo's grave is in the Yogen temple at Kobinata."  # the last line of the story
    assert sum(len(texts) for texts in splits.values()) == lines.index("--(THE END)--") - lines.index(
        "BOTCHAN (MASTER DARLING)"
    )
    assert any("wide[D])" in line for line in lines)  # the transcriber's note markers are gone from the lines
    assert not [line for texts in splits.values() for line in texts if re.search(r"\[[A-Z]\]", line)]


def write_text(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_markers_keep_the_rows_between_them_and_a_missing_marker_names_the_source(tmp_path, tiny_model_dir):
    lines = ["header w3", "TITLE w4", *(f"w{5 + i % 50} w9" for i in range(40)), "END w5", "licence w6"]
    source = write_text(tmp_path / "book.txt", lines)
    task = Task("book", source, start_at="TITLE", stop_at="END")
    rows = DomainData([task], tokenizer=str(tiny_model_dir)).split_rows(task)
    kept = [*rows.training["text"], *rows.validation["text"], *rows.test["text"]]
    assert kept == lines[1:-2]
    with pytest.raises(ValueError, match=rf"task 'book': no row of {source} begins with start_at 'CHAPTER'; fix"):
        DomainData([Task("book", source, start_at="CHAPTER")])
    with pytest.raises(ValueError, match="no row of .* after its start_at row begins with stop_at 'header'"):
        DomainData([Task("book", source, start_at="TITLE", stop_at="header")])


def test_remove_patterns_are_deleted_from_every_text_field(tmp_path, tiny_model_dir):
    notice = "This file is in the public domain. "
    rows = [{"q": f"{notice}w{3 + i % 40}", "a": " w60", "context": [f"{notice}w7", "w8"]} for i in range(30)]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = Task("qa", str(source), "generation", prompt="{q} {context}", answer="{a}", remove=[r"This file is .*?\. "])
    split = DomainData([task], tokenizer=str(tiny_model_dir)).split_rows(task)
    for part in (split.training, split.validation, split.test):
        assert all(notice not in row["q"] and notice not in "".join(row["context"]) for row in part)
    assert split.training[0]["q"].startswith("w") and split.training[0]["context"][1] == "w8"


def test_training_rows_that_repeat_a_held_out_prompt_are_left_out(tmp_path, tiny_model_dir):
    train = [{"q": f"w{3 + i} w{4 + i}", "a": " w60"} for i in range(40)]
    test = [{"q": "W3  w4>", "a": " w61"}, {"q": "w50 w51", "a": " w61"}]  # the first repeats training row 0
    for name, rows in (("train", train), ("test", test)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = Task("qa", str(tmp_path / "train.jsonl"), "generation", prompt="{q}", answer="{a}",
                test_source=str(tmp_path / "test.jsonl"))  # fmt: skip
    data = DomainData([task], tokenizer=str(tiny_model_dir), val_rows=5)
    split = data.split_rows(task)
    assert sum(split.repeats.values()) == 1 and len(split.test) == 2
    assert "w3 w4" not in [*split.training["q"], *split.validation["q"]]
    assert len(split.training) + len(split.validation) == len(train) - 1


def test_the_split_report_counts_the_rows_examples_and_tokens_that_are_used(tmp_path, tiny_model_dir, tiny_text):
    rows = [{"q": " ".join(f"w{3 + (i * j) % 50}" for j in range(1 + i % 7)), "a": " w60"} for i in range(50)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    tasks = [
        Task("words", str(tiny_text)),
        Task("qa", str(tmp_path / "rows.jsonl"), "generation", prompt="{q}", answer="{a}"),
    ]
    data = DomainData(tasks, tokenizer=str(tiny_model_dir), seq_len=16, batch_size=3, val_rows=6, eval_blocks=5)
    data.setup("fit")
    loaders = {"training": None, "validation": data.val_dataloader(), "test": data.test_dataloader()}
    for size in data.split_sizes:
        index = [task.name for task in tasks].index(size.task)
        split = data.split_rows(tasks[index])
        assert size.rows == len({"training": split.training, "validation": split.validation, "test": split.test}[
            size.split])  # fmt: skip
        if size.split == "training":
            examples = data.train_examples[index]
            assert (size.examples, size.tokens) == (len(examples), sum(len(e["input_ids"]) for e in examples))
            continue
        batches = list(loaders[size.split][index])
        assert size.examples == sum(len(batch["input_ids"]) for batch in batches)
        assert size.tokens == sum(int(batch["attention_mask"].sum()) for batch in batches)
    words_test = next(size for size in data.split_sizes if (size.task, size.split) == ("words", "test"))
    assert (words_test.rows, words_test.examples, words_test.tokens) == (20, 5, 80)  # 10% of 200 lines, 5 blocks
