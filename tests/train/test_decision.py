"""Decide, then prune: the gates freeze as soon as the exact mask has settled (and only then), a resumed run decides
at the same step, and every run reports how much its mask moved from the importance scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from conftest import tiny_model
from helpers import ROOT, write_config

from tailored.core.gates import PruningGates
from tailored.core.structure import GateValues, describe
from tailored.train.decision import MaskSettling, agreement_with_importance

PATIENCE = 4
PRUNING = {"target": 0.6, "round_to": 1, "settle_steps": PATIENCE, "recovery": 0.1}


def test_the_mask_settles_after_patience_unchanged_steps_within_the_budget():
    structure = describe(tiny_model())
    one, other = GateValues.ones(structure), GateValues.ones(structure)
    other.channels[0, 0] = 0  # 1 of the 72 kept channels: more than 1% of them
    settling = MaskSettling(patience=2, tolerance=0.01)
    assert not settling.update(one, 0.0)  # a first mask: nothing to compare with
    assert not settling.update(one, 0.0)
    assert not settling.update(other, 0.0)  # a change starts the count again
    assert not settling.update(other, 0.0)
    assert not settling.update(other, 0.05)  # unchanged twice, but the budget is missed
    restored = MaskSettling(patience=2, tolerance=0.01)
    restored.load_state_dict(settling.state_dict())
    assert restored.update(other, 0.005) and settling.update(other, 0.005)


def test_agreement_is_one_for_the_prior_s_own_choice_and_lower_for_another():
    structure = describe(tiny_model(intermediate_size=24))
    gates = PruningGates(structure, ("channels",))
    scores = GateValues.ones(structure)
    scores.channels = torch.arange(24.0).expand(structure.num_layers, 24).clone()
    gates.init_from_scores(scores)
    kept = GateValues.ones(structure)
    kept.channels[:, :12] = 0  # the 12 best scores kept
    assert agreement_with_importance(gates, kept) == {"channels": 1.0}
    kept.channels[:, :6], kept.channels[:, 18:] = 1, 0  # half of them swapped for worse ones
    assert agreement_with_importance(gates, kept) == {"channels": 0.5}
    assert agreement_with_importance(PruningGates(structure, ("channels",)), kept) is None  # no prior


def fit(tmp_path, tiny_model_dir, tiny_text, name: str, callbacks: list[dict], pruning: dict, *extra: str):
    trainer = {
        "accelerator": "cpu",
        "max_steps": 80,
        "val_check_interval": 40,
        "default_root_dir": str(tmp_path / name),
        "enable_progress_bar": False,
        "callbacks": callbacks,
    }
    model = {"model": str(tiny_model_dir), "pruning": pruning, "optimizer": {"lora_lr": 0.001}}
    config = write_config(
        tmp_path / f"{name}.yaml", tiny_model_dir, tiny_text, trainer=trainer, model=model,
        checkpoint={"every_n_train_steps": 10, "save_top_k": -1, "filename": "{step}"},
    )  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT / "tests")}
    command = [sys.executable, "-m", "tailored.cli", "fit", "-c", str(config), *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True)


def record(path) -> list[dict]:
    return [{"class_path": "subprocess_callbacks.RecordDecisions", "init_args": {"path": str(path)}}]


def first_settled_step(steps: list[dict]) -> int | None:
    """The first step after which the rule holds: the mask unchanged (up to 1% of each type's kept units) for
    PATIENCE steps of the control phase and the budget met (the same rule, recomputed from what the run recorded)."""
    unchanged = 0
    for previous, current in zip(steps, steps[1:], strict=False):
        if current["frozen"]:
            return None
        same = all(  # at most 1% of each type's kept units moved (tailored.train.decision.SETTLED_CHANGE)
            int((previous["mask"][name] != current["mask"][name]).sum()) <= 0.01 * int(current["mask"][name].sum())
            for name in current["mask"]
        )
        unchanged = unchanged + 1 if same else 0
        if current["phase"] == "control" and unchanged >= PATIENCE and abs(current["gap"]) <= 0.01:
            return current["step"]
    return None


def test_the_gates_freeze_the_step_after_the_mask_settles_and_a_resumed_run_decides_alike(
    tmp_path, tiny_model_dir, tiny_text
):
    whole = fit(tmp_path, tiny_model_dir, tiny_text, "whole", record(tmp_path / "whole.pt"), PRUNING)
    assert whole.returncode == 0, whole.stderr[-2000:]
    recorded = torch.load(tmp_path / "whole.pt", weights_only=False)
    decision = recorded["decision"]["step"]
    settled = first_settled_step(recorded["steps"])
    assert settled is not None and decision == settled + 1  # fired when, and only when, the rule held
    assert decision < 72  # before the scheduled recovery start (80 * 0.9)
    assert all(step["frozen"] for step in recorded["steps"] if step["step"] >= decision)
    export = next((tmp_path / "whole").glob("lightning_logs/version_*/export"))
    report = json.loads((export / "pruning_report.json").read_text())
    assert report["decision"]["step"] == decision and report["allocation"] == "learned"
    assert set(report["decision"]["agreement_with_importance"]) == {"groups", "channels"}
    assert report["decision"]["masked_base_loss"]["words"] > 0

    checkpoint_step = decision // 10 * 10  # the last checkpoint before the decision: resume must decide alike
    kill = [{"class_path": "subprocess_callbacks.KillAfterStep", "init_args": {"step": checkpoint_step + 3}}]
    killed = fit(tmp_path, tiny_model_dir, tiny_text, "resumed", kill, PRUNING)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = fit(
        tmp_path, tiny_model_dir, tiny_text, "resumed", record(tmp_path / "resumed.pt"), PRUNING,
        "--ckpt_path", str(tmp_path / "resumed" / "checkpoints" / f"step={checkpoint_step}.ckpt"),
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    again = torch.load(tmp_path / "resumed.pt", weights_only=False)
    assert again["decision"]["step"] == decision
    assert again["decision"]["shape"] == recorded["decision"]["shape"]


def test_without_a_settled_mask_the_gates_freeze_at_the_scheduled_start(tmp_path, tiny_model_dir, tiny_text):
    patient = PRUNING | {"settle_steps": 1000, "recovery": 0.5}
    done = fit(tmp_path, tiny_model_dir, tiny_text, "patient", record(tmp_path / "patient.pt"), patient)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.load(tmp_path / "patient.pt", weights_only=False)["decision"]["step"] == 40
