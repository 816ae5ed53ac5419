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
from tailored.core.structure import structure_from_config
from tailored.core.targets import prunable_bounds, reinvested_fraction
from tailored.core.vocabulary import renumbering
from tailored.models import load_config
from tailored.train.settings import PruningSettings, VocabularySettings, model_target

DOMAIN = syllable_lines(200, SYLLABLES[:6], seed=1)


def fit_tiny(folder, target: float, vocabulary: dict):
    """``tailored fit`` of a tiny tied model with ``pruning.vocabulary``; the folder and the base tokenizer."""
    tokenizer = byte_level_tokenizer(syllable_lines(300, SYLLABLES, seed=0))
    model = tiny_model(num_layers=2, head_dim=8, intermediate_size=32, vocab_size=len(tokenizer), tied=True)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    text = folder / "domain.txt"
    text.write_text("\n".join(DOMAIN))
    pruning = {"target": target, "round_to": 1, "vocabulary": vocabulary}
    trainer = {"accelerator": "cpu", "max_steps": 12, "val_check_interval": 6, "log_every_n_steps": 2,
               "default_root_dir": str(folder / "run"), "enable_progress_bar": False}  # fmt: skip
    config = write_config(
        folder / "tiny.yaml", folder / "model", text, trainer=trainer,
        model={"model": str(folder / "model"), "pruning": pruning, "optimizer": {"lora_lr": 0.001}},
    )  # fmt: skip
    run(["fit", "-c", str(config)])
    return folder, tokenizer


@pytest.fixture(scope="module")
def trimmed_run(tmp_path_factory):
    return fit_tiny(tmp_path_factory.mktemp("vocabulary"), 0.6, {"keep_top": 0})


@pytest.fixture(scope="module")
def reinvested_run(tmp_path_factory):
    return fit_tiny(tmp_path_factory.mktemp("reinvested"), REINVESTED_TARGET, {"keep_top": 0, "reinvest": True})


REINVESTED_TARGET = 0.3


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


def test_reinvested_rows_keep_the_untrimmed_size_with_more_structure(reinvested_run, tmp_path):
    """pruning.vocabulary.reinvest: the target is raised by the trimmed rows, so the export (trimmed) has about the
    size the target gives an untrimmed model; ``tailored export`` of the checkpoint raises it alike."""
    folder, _ = reinvested_run
    export = folder / "run" / "lightning_logs" / "version_0" / "export"
    report = json.loads((export / "pruning_report.json").read_text())
    structure, units = structure_from_config(load_config(str(folder / "model"))), ("groups", "channels")
    fixed, full = prunable_bounds(structure, units)
    raised = reinvested_fraction(structure, units, REINVESTED_TARGET, report["vocabulary"]["after"])
    assert report["target"]["fraction_of_prunable"] == pytest.approx(raised) and raised > REINVESTED_TARGET + 0.1
    assert report["kept_fraction_of_prunable"] == pytest.approx(raised, abs=0.05)
    untrimmed_size = fixed + REINVESTED_TARGET * (full - fixed)
    assert report["parameters"]["after"] == pytest.approx(untrimmed_size, abs=0.05 * (full - fixed))
    run(["export", "--ckpt_path", str(folder / "run" / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "out")])
    again = json.loads((tmp_path / "out" / "pruning_report.json").read_text())
    assert (again["target"], again["parameters"]) == (report["target"], report["parameters"])


def test_reinvest_refuses_a_target_it_would_raise_past_the_prunable_parameters(tmp_path):
    """Checked when the kept tokens are counted, before any weight loads; and target_shape is refused at once."""
    tokenizer = byte_level_tokenizer(syllable_lines(300, SYLLABLES, seed=0))
    tiny_model(num_layers=2, head_dim=8, intermediate_size=32, vocab_size=len(tokenizer), tied=True).save_pretrained(
        tmp_path
    )
    reinvest = VocabularySettings(reinvest=True)
    with pytest.raises(ValueError, match="lower pruning.target or set reinvest false"):
        model_target(str(tmp_path), PruningSettings(target=0.6, vocabulary=reinvest), kept_tokens=len(tokenizer) // 4)
    with pytest.raises(ValueError, match="give pruning.target, not target_shape"):
        PruningSettings(target=None, target_shape={"channels": 16}, vocabulary=reinvest).check()
