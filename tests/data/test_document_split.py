"""Domain language modelling on JSON-lines documents: a field (a list of sections, joined) is the text, and no
document is in two splits, neither as a row nor inside a packed block."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import ROOT

from tailored.data import cleaning
from tailored.data.datamodule import DomainData
from tailored.data.tasks import Task

DOCUMENT_TASKS = {"medical": "pubmed_abstracts", "legal": "multilegalpile"}


def words(first: int, last: int, count: int, offset: int) -> str:
    """``count`` words of the tiny tokenizer's vocabulary, from w<first> to w<last>."""
    return " ".join(f"w{first + (offset + i) % (last - first + 1)}" for i in range(count))


def test_packed_blocks_hold_the_words_of_their_own_split_only(tmp_path, tiny_model_dir):
    """Training documents use w3..w30 (the last tenth, validation: w31..w39), test documents w40..w63: every block of
    every split holds its own split's words alone."""
    train = [{"CONTEXTS": [words(3, 30, 12, i), words(3, 30, 5, i + 7)]} for i in range(45)]
    train += [{"CONTEXTS": [words(31, 39, 12, i), words(31, 39, 5, i)]} for i in range(5)]
    test = [{"CONTEXTS": [words(40, 63, 12, i), words(40, 63, 5, i)]} for i in range(20)]
    for name, rows in (("train", train), ("test", test)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = Task("abstracts", str(tmp_path / "train.jsonl"), test_source=str(tmp_path / "test.jsonl"), text="{CONTEXTS}")
    data = DomainData([task], tokenizer=str(tiny_model_dir), seq_len=16)
    data.setup("fit")
    vocabulary = data.tokenizer.get_vocab()
    allowed = {
        "training": range(3, 31),
        "validation": range(31, 40),
        "test": range(40, 64),
    }
    blocks = {"training": data.train_examples[0], "validation": data.val_items[0], "test": data.eval_items[0]}
    for split, examples in blocks.items():
        ids = {vocabulary[f"w{i}"] for i in allowed[split]}
        assert examples and all(set(block["input_ids"]) <= ids for block in examples), split


@pytest.mark.parametrize("suite", sorted(DOCUMENT_TASKS))
def test_the_shipped_documents_are_never_in_two_splits(suite):
    """configs/medical.yaml's PubMed abstracts (the CONTEXTS of the PubMedQA rows) and configs/legal.yaml's
    MultiLegalPile documents: the three splits share no document."""
    data = yaml.safe_load((ROOT / "configs" / f"{suite}.yaml").read_text())["data"]
    if not (ROOT / data["data_dir"]).is_dir():
        pytest.skip(f"{data['data_dir']} is not here")
    spec = next(task for task in data["tasks"] if task["name"] == DOCUMENT_TASKS[suite])
    domain = DomainData([Task(**spec)], data_dir=str(ROOT / data["data_dir"]))
    task = domain.tasks[0]
    splits = vars(domain.split_rows(task))
    documents = {
        name: [cleaning.row_text(task, row) for row in splits[name]] for name in ("training", "validation", "test")
    }
    assert all(documents.values())
    assert all(len(set(texts)) == len(texts) for texts in documents.values())  # no document twice in a split
    training, validation, test = (set(texts) for texts in documents.values())
    assert not training & validation and not training & test and not validation & test
    if suite == "medical":  # sections joined by newlines: a whole abstract, not a list's repr
        assert "\n" in documents["test"][0] and not documents["test"][0].startswith("[")
