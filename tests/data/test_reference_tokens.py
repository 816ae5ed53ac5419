"""Held-out perplexity per reference token (``data.reference_tokenizer``): a vocabulary-trimmed export reads the
same blocks of text as its base model, and its summed loss is divided by the base tokenizer's token count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from helpers import SYLLABLES, byte_level_tokenizer, syllable_lines

from tailored.core.vocabulary import kept_token_ids, mask_removed_logits, trim_model, trimmed_tokenizer
from tailored.data.datamodule import DomainData
from tailored.data.metrics import TaskMetrics
from tailored.data.scoring import score_batch
from tailored.data.tasks import Task

SEQ_LEN = 16
GENERAL = syllable_lines(300, SYLLABLES, seed=0)
DOMAIN = syllable_lines(60, SYLLABLES[:6], seed=1)
"""Training rows: half of the syllables, so the trimmed vocabulary lacks the tokens of the other half."""


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, str]:
    """Model folders of the base tokenizer and of its trim to the domain's tokens; the kept ids under ``kept``."""
    root = tmp_path_factory.mktemp("tokenizers")
    base = byte_level_tokenizer(GENERAL)
    kept = kept_token_ids(base, [base(row)["input_ids"] for row in DOMAIN])
    for name, tokenizer in (("base", base), ("trimmed", trimmed_tokenizer(base, kept))):
        tokenizer.save_pretrained(root / name)
        tiny_model(vocab_size=len(tokenizer)).config.save_pretrained(root / name)  # a model folder, as data takes
    (root / "kept.json").write_text(json.dumps(kept))
    return {"base": str(root / "base"), "trimmed": str(root / "trimmed"), "kept": str(root / "kept.json")}


def held_out_data(tmp_path, test_rows: list[str], tokenizer: str, reference: str | None) -> DomainData:
    """A language-modelling task trained on the domain rows and tested on ``test_rows``."""
    for name, rows in (("train", DOMAIN), ("test", test_rows)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
    task = Task("text", str(tmp_path / "train.jsonl"), test_source=str(tmp_path / "test.jsonl"), text="{text}")
    data = DomainData([task], tokenizer=tokenizer, seq_len=SEQ_LEN, reference_tokenizer=reference)
    data.setup("test")
    return data


def test_a_trimmed_tokenizer_reads_the_reference_blocks_and_counts_reference_tokens(tmp_path, tokenizers):
    """Other syllables than the domain's: the trimmed tokenizer spells them with more tokens, yet every block holds
    the reference block's text and counts its ``SEQ_LEN - 1`` predicted tokens."""
    other = syllable_lines(40, SYLLABLES, seed=3)
    base = held_out_data(tmp_path, other, tokenizers["base"], None)
    trimmed = held_out_data(tmp_path, other, tokenizers["trimmed"], tokenizers["base"])
    assert len(trimmed.eval_items[0]) == len(base.eval_items[0]) > 1
    for block, respelled in zip(base.eval_items[0], trimmed.eval_items[0], strict=True):
        assert trimmed.tokenizer.decode(respelled["input_ids"]) == base.tokenizer.decode(block["input_ids"])
        assert respelled["reference_tokens"] == SEQ_LEN - 1
    assert sum(len(item["input_ids"]) for item in trimmed.eval_items[0]) > len(base.eval_items[0]) * SEQ_LEN
    same = held_out_data(tmp_path, other, tokenizers["base"], tokenizers["base"])
    assert same.eval_items == base.eval_items  # its own tokenizer as the reference: today's blocks, unchanged


def test_the_trimmed_exports_loss_per_reference_token_is_the_masked_base_models(tmp_path, tokenizers):
    """On text the trimmed tokenizer spells as the base one does, the trimmed export's loss per reference token is
    the base model's with the removed tokens masked (exact trimming); on other text the count divided by is the
    reference's, not the longer respelling's."""
    kept = json.loads(Path(tokenizers["kept"]).read_text())
    base_model = tiny_model(vocab_size=len(byte_level_tokenizer(GENERAL)), tied=True, num_layers=2)
    trimmed_model = trim_model(tiny_model(vocab_size=base_model.config.vocab_size, tied=True, num_layers=2), kept)
    base_model.train()  # the mask applies in training mode; the tiny model has no dropout
    mask_removed_logits(base_model, kept)

    def scored(model, data: DomainData) -> dict[str, torch.Tensor]:
        metrics = TaskMetrics(data.tasks[0])
        for batch in data.test_dataloader()[0]:
            score_batch(model, batch, data.tasks[0], metrics, data.tokenizer)
        return {"loss": torch.tensor(metrics.compute()["loss"]), **metrics.columns()}

    in_domain = syllable_lines(30, SYLLABLES[:6], seed=4)
    with torch.no_grad():
        masked = scored(base_model, held_out_data(tmp_path, in_domain, tokenizers["base"], None))
        respelled = scored(trimmed_model, held_out_data(tmp_path, in_domain, tokenizers["trimmed"], tokenizers["base"]))
    torch.testing.assert_close(respelled["nll"], masked["nll"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(respelled["loss"], masked["loss"], rtol=1e-5, atol=1e-5)

    other = syllable_lines(40, SYLLABLES, seed=3)
    with torch.no_grad():
        found = scored(trimmed_model, held_out_data(tmp_path, other, tokenizers["trimmed"], tokenizers["base"]))
    assert torch.equal(found["tokens"], torch.full_like(found["tokens"], SEQ_LEN - 1))
    torch.testing.assert_close(found["loss"], (found["nll"].sum() / found["tokens"].sum()).float())
