"""A checkpoint written by tailored 0.1 (before the package was reorganised) still exports and resumes.

``tests/fixtures/checkpoint-0.1.ckpt``: the ``tiny_model_dir`` model (saved elsewhere then: its hyper-parameters
say ``model='/tmp/fixture/model'``), pruning target 0.6 (round_to 1, recovery 0.5), distillation from the base
teacher, LoRA lr 0.001, one language-modelling task "words", seq_len 32, batch 4, 10 steps: the checkpoint of step
10, after the "prune now" transition at step 5. tailored 0.1 also wrote the kept teacher's adapters (``teacher.``).
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from helpers import ROOT, write_config
from transformers import AutoModelForCausalLM

from tailored.cli import main, run
from tailored.train.module import TailoredModule
from tailored.train.settings import PruningSettings

FIXTURE = ROOT / "tests" / "fixtures" / "checkpoint-0.1.ckpt"
SETTINGS = {
    "pruning": {"target": 0.6, "round_to": 1, "recovery": 0.5},  # before pruning.allocation: proportional then
    "distill": {"weight": 0.5, "teacher": "base"},
    "optimizer": {"lora_lr": 0.001},
}


def test_the_fixture_is_a_0_1_checkpoint_after_the_transition():
    checkpoint = torch.load(FIXTURE, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 10 and checkpoint["tailored_transition"]["step"] == 5
    assert any(key.startswith("teacher.") for key in checkpoint["state_dict"])  # what 0.1 wrote by mistake


def check_export(export, parameters: int) -> None:
    report = json.loads((export / "pruning_report.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(export)
    assert sum(parameter.numel() for parameter in model.parameters()) == report["parameters"]["after"] == parameters
    assert report["parameters"]["after"] < report["parameters"]["before"]


def test_the_python_api_exports_it_with_the_model_where_it_is_now(tmp_path, tiny_model_dir):
    module = TailoredModule.load_from_checkpoint(FIXTURE, model=str(tiny_model_dir), map_location="cpu")
    assert module.pruned_now and module.checkpoint_step == 10  # the transition was replayed
    report = module.export(tmp_path / "export")
    check_export(tmp_path / "export", report["parameters"]["after"])


def test_tailored_export_names_the_moved_model_and_takes_it(tmp_path, tiny_model_dir, monkeypatch):
    checkpoint = torch.load(FIXTURE, map_location="cpu", weights_only=False)
    checkpoint["hyper_parameters"]["model"] = str(tmp_path / "moved" / "model")  # surely missing here
    moved = tmp_path / "moved.ckpt"
    torch.save(checkpoint, moved)
    monkeypatch.delenv("TAILORED_TRACEBACK", raising=False)
    monkeypatch.setattr(sys, "argv", ["tailored", "export", "--ckpt_path", str(moved), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit) as refused:
        main()
    message = str(refused.value.code)
    assert "\n" not in message and "moved/model" in message and "--model <path>" in message, message
    assert not (tmp_path / "x").exists()

    out = tmp_path / "export"
    run(["export", "--ckpt_path", str(moved), "--model", str(tiny_model_dir), "--out", str(out)])
    expected = TailoredModule.load_from_checkpoint(FIXTURE, model=str(tiny_model_dir)).export(tmp_path / "api")
    check_export(out, expected["parameters"]["after"])


def test_a_fit_resumes_from_it_and_runs_to_the_end(tmp_path, tiny_model_dir, tiny_text):
    shutil.copy(FIXTURE, tmp_path / "old.ckpt")  # the run's own folder may hold a newer last.ckpt
    model = {"model": str(tiny_model_dir)} | SETTINGS
    trainer = {"accelerator": "cpu", "max_steps": 10, "val_check_interval": 5, "enable_progress_bar": False,
               "default_root_dir": str(tmp_path / "run")}  # fmt: skip
    config = write_config(tmp_path / "tiny.yaml", tiny_model_dir, tiny_text, model=model, trainer=trainer)
    run(["fit", "-c", str(config), "--ckpt_path", str(tmp_path / "old.ckpt"), "--trainer.max_steps", "12"])
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 12
    assert not any(key.startswith("teacher.") for key in last["state_dict"])  # the teacher's adapters are gone
    exports = list((tmp_path / "run").rglob("export/config.json"))
    assert len(exports) == 1
    report = json.loads((exports[0].parent / "pruning_report.json").read_text())
    check_export(exports[0].parent, report["parameters"]["after"])


def test_it_keeps_the_allocation_it_was_trained_with_and_another_is_named(tiny_model_dir):
    module = TailoredModule.load_from_checkpoint(FIXTURE, model=str(tiny_model_dir), map_location="cpu")
    assert module.pruning_settings.allocation == "proportional"  # 0.1 had no other
    learned = PruningSettings(target=0.6, round_to=1, recovery=0.5, allocation="learned")
    with pytest.raises(ValueError, match="written with another pruning.allocation .*tailored 0.1 used proportional"):
        TailoredModule.load_from_checkpoint(FIXTURE, model=str(tiny_model_dir), pruning=learned, map_location="cpu")
