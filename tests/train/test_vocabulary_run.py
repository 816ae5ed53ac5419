"""``tailored fit`` with ``pruning.vocabulary`` on a tiny model with a byte-level BPE tokenizer: the run masks the
removed ids in training, checkpoints the kept ids, and the end of fit and ``tailored export`` write one export
whose vocabulary is the domain's, loadable with plain ``from_pretrained``."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from helpers import SYLLABLES, byte_level_tokenizer, scalars, syllable_lines, write_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from tailored.cli import run
from tailored.core.vocabulary import renumbering

DOMAIN = syllable_lines(200, SYLLABLES[:6], seed=1)


@pytest.fixture(scope="module")
def trimmed_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocabulary")
    tokenizer = byte_level_tokenizer(syllable_lines(300, SYLLABLES, seed=0))
    model = tiny_model(num_layers=2, head_dim=8, intermediate_size=32, vocab_size=len(tokenizer), tied=True)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    text = folder / "domain.txt"
    text.write_text("\n".join(DOMAIN))
    pruning = {"target": 0.6, "round_to": 1, "vocabulary": {"keep_top": 0}}
    trainer = {"accelerator": "cpu", "max_steps": 12, "val_check_interval": 6, "log_every_n_steps": 2,
               "default_root_dir": str(folder / "run"), "enable_progress_bar": False}  # fmt: skip
    config = write_config(
        folder / "tiny.yaml", folder / "model", text, trainer=trainer,
        model={"model": str(folder / "model"), "pruning": pruning, "optimizer": {"lora_lr": 0.001}},
    )  # fmt: skip
    run(["fit", "-c", str(config)])
    return folder, tokenizer


def test_the_export_keeps_the_domains_tokens_and_counts_exactly(trimmed_run):
    folder, tokenizer = trimmed_run
    export = folder / "run" / "lightning_logs" / "version_0" / "export"
    report = json.loads((export / "pruning_report.json").read_text())
    model, trimmed = AutoModelForCausalLM.from_pretrained(export), AutoTokenizer.from_pretrained(export)
    kept = torch.load(folder / "run" / "checkpoints" / "last.ckpt", weights_only=False)["tailored_vocabulary"]
    assert report["vocabulary"]["after"] == len(kept) == model.config.vocab_size == len(trimmed) < len(tokenizer)
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]["after"]
    new_id = renumbering(kept)
    for row in DOMAIN[:50]:  # training rows (language modelling packs them; every one was in the stream)
        assert trimmed(row)["input_ids"] == [new_id[index] for index in tokenizer(row)["input_ids"]]
    summary = json.loads((export / "fit_summary.json").read_text())  # scored with the export's own tokenizer
    assert summary["parameters"]["export"] == report["parameters"]["after"]
    assert all(torch.isfinite(torch.tensor(scalars(export.parent, "train/lm_loss"))))


def test_export_subcommand_trims_a_checkpoint_alike(trimmed_run, tmp_path):
    folder, _ = trimmed_run
    run(["export", "--ckpt_path", str(folder / "run" / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "out")])
    fit_export = folder / "run" / "lightning_logs" / "version_0" / "export"
    again = json.loads((tmp_path / "out" / "pruning_report.json").read_text())
    assert again["vocabulary"] == json.loads((fit_export / "pruning_report.json").read_text())["vocabulary"]
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (fit_export / "tokenizer.json").read_text()
