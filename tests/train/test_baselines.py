"""Importance scores, score-initialised gates, distillation, the prune-now transition and the two-stage baselines."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from helpers import ROOT, write_config
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tailored.core.gates import PruningGates
from tailored.core.importance import magnitude_scores, taylor_scores
from tailored.core.losses import at_positions, head_losses
from tailored.core.masking import GateHooks
from tailored.core.shapes import shape_parameter_count
from tailored.core.structure import GateValues, describe
from tailored.core.targets import resolve_target
from tailored.data.datamodule import DomainData
from tailored.data.packing import loss_positions
from tailored.data.tasks import IGNORE_INDEX, Task
from tailored.train.teacher import CorrectedTeacher
from tailored.train.transition import prune_now


def batches(seed: int = 0, count: int = 2) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, 64, (4, 12), generator=generator) for _ in range(count)]
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i} for i in ids]


def plant_dead_units(model) -> None:
    """Zero every weight of KV group 1 of layer 0 and of MLP channel 5 of layer 1."""
    with torch.no_grad():
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[1].mlp
        rows = attn.q_proj.weight.shape[0] // 2
        attn.q_proj.weight[rows:] = 0
        attn.k_proj.weight[attn.k_proj.weight.shape[0] // 2 :] = 0
        attn.v_proj.weight[attn.v_proj.weight.shape[0] // 2 :] = 0
        attn.o_proj.weight[:, rows:] = 0
        mlp.gate_proj.weight[5] = 0
        mlp.up_proj.weight[5] = 0
        mlp.down_proj.weight[:, 5] = 0


@pytest.mark.parametrize("criterion", ["taylor", "magnitude"])
@pytest.mark.parametrize("wrapped", [False, True])
def test_each_criterion_ranks_a_planted_dead_unit_last(criterion, wrapped):
    model = tiny_model(num_layers=2, num_kv_heads=2, n_rep=2, head_dim=4, intermediate_size=24, weight_std=0.1)
    plant_dead_units(model)
    if wrapped:  # scored through peft's wrappers, as inside a run
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "o_proj", "down_proj"]))
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    scores = taylor_scores(model, batches()) if criterion == "taylor" else magnitude_scores(model)
    assert scores["groups"][0].argmin() == 1 and scores["groups"][0, 1] == 0
    assert scores["channels"][1].argmin() == 5 and scores["channels"][1, 5] == 0
    assert (scores["groups"][1] > 0).all() and (scores["channels"][0] > 0).all()  # live units score above 0
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())  # no gradient is left behind


def test_score_initialised_gates_order_keep_probabilities_as_the_scores():
    model = tiny_model(num_layers=2, num_kv_heads=2, n_rep=2, head_dim=4, intermediate_size=24)
    structure = describe(model)
    target = resolve_target(structure, ("groups", "channels"), 0.6, None, True, 1)
    for logits in ("direct", "generator"):
        gates = PruningGates(structure, ("groups", "channels"), target, logits, init_log_alpha=5.0, init_std=0.0)
        scores = GateValues(**magnitude_scores(model))
        gates.init_from_scores(scores, spread=4.0)
        probs = gates.keep_probabilities()
        for name in ("groups", "channels"):
            for row_scores, row_probs in zip(getattr(scores, name), getattr(probs, name), strict=True):
                assert torch.equal(torch.argsort(row_scores), torch.argsort(row_probs)), (logits, name)
            assert float(getattr(probs, name).max()) == pytest.approx(1 / (1 + math.exp(-(5.0 + 1.599))), abs=1e-3)
        final = gates.target_gates()
        kept = final.channels > 0  # the exact top-k keeps the best-scored channels of every layer
        for layer in range(structure.num_layers):
            best = torch.topk(scores.channels[layer], int(kept[layer].sum())).indices
            assert kept[layer, best].all()


def test_ties_at_the_clamp_floor_are_broken_by_the_prior_not_the_index():
    model = tiny_model(num_layers=2, num_kv_heads=2, n_rep=2, head_dim=4, intermediate_size=24)
    structure = describe(model)
    target = resolve_target(structure, ("channels",), 0.5, None, True, 1)
    gates = PruningGates(structure, ("channels",), target)
    scores = GateValues(**magnitude_scores(model))
    gates.init_from_scores(scores)
    with torch.no_grad():
        gates.log_alpha["channels"].fill_(-4.6)  # every channel parked at the floor: logits say nothing
    kept = gates.target_gates().channels > 0
    for layer in range(structure.num_layers):
        best = torch.topk(scores.channels[layer], int(kept[layer].sum())).indices
        assert kept[layer, best].all()


def test_distillation_loss_is_zero_for_the_teacher_itself_and_positive_otherwise():
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(4, 10, bias=False)
    teacher = torch.randn(2, 6, 4, generator=generator)  # final hidden states [B, T, d]
    labels = torch.randint(0, 10, (2, 6), generator=generator)
    labels[:, :3] = IGNORE_INDEX  # a prompt without loss
    positions, targets = loss_positions(labels, IGNORE_INDEX)

    def kl(student: torch.Tensor) -> torch.Tensor:
        hidden = at_positions(student, positions)
        return head_losses(hidden, head, targets, at_positions(teacher, positions), head)[1]

    assert kl(teacher.clone()).abs() < 1e-6
    assert kl(teacher + 0.5 * torch.randn(2, 6, 4, generator=generator)) > 1e-3
    changed_on_the_prompt = teacher.clone()
    changed_on_the_prompt[:, :2] += torch.randn(2, 2, 4, generator=generator)  # positions 0, 1 predict prompt tokens
    assert kl(changed_on_the_prompt).abs() < 1e-6
    changed_on_the_answer = teacher.clone()
    changed_on_the_answer[:, 2] += torch.randn(2, 4, generator=generator)  # position 2 predicts token 3: counted
    assert kl(changed_on_the_answer) > 1e-3


def test_prune_now_computes_what_the_masked_model_computed(tokens):
    model = get_peft_model(tiny_model(tied=True), LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():  # trained adapters: LoRA B is not zero
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    structure = describe(model)
    gates = GateValues.ones(structure)
    gates.groups[0, 1] = 0
    gates.channels[:, ::3] = 0
    gates.channels[1, 1] = 0.4
    with GateHooks(model).applied(gates), torch.no_grad():
        masked = model(tokens).logits
    pruned = prune_now(model, gates, LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        torch.testing.assert_close(pruned(tokens).logits, masked, rtol=0, atol=1e-5)
    trainable = [name for name, p in pruned.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


def test_validation_rows_never_overlap_training_or_test_rows(tmp_path, tiny_model_dir):
    rows = [{"q": f"w{3 + i % 50} w{3 + i // 50}", "a": "w60"} for i in range(200)]
    source = tmp_path / "rows.jsonl"
    source.write_text("\n".join(json.dumps(row) for row in rows))
    task = Task("qa", str(source), "generation", prompt="{q}", answer=" {a}")
    data = DomainData([task], tokenizer=str(tiny_model_dir), val_rows=16)
    train, test = data._split(task)
    train, validation = data._carve_validation(task, train)
    keys = [{row["q"] for row in split} for split in (train, validation, test)]
    assert len(keys[1]) == 16 and len(keys[2]) == 20
    assert not keys[0] & keys[1] and not keys[0] & keys[2] and not keys[1] & keys[2]
    assert len(keys[0]) + len(keys[1]) + len(keys[2]) == len(rows)


def test_the_corrected_teacher_trains_its_own_adapters_and_puts_the_students_back(tiny_model_dir):
    """Inside the swap the forward runs on the teacher's adapters, which get the gradient; after it the model
    computes what it did before, and its own adapters got none."""
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora)
    teacher = CorrectedTeacher(model)
    ids = torch.randint(0, 60, (2, 8), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits.detach()
    with torch.no_grad():
        for parameter in teacher.parameters():  # a trained teacher: B no longer zero
            parameter.add_(0.1)
    with teacher.swapped_into(model):
        output = model(input_ids=ids, labels=ids)
    output.loss.backward()  # after the swap, as in a training step
    assert len(list(teacher.parameters())) == sum("lora_" in name for name, _ in model.named_parameters()) > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in teacher.parameters())
    assert all(p.grad is None for name, p in model.named_parameters() if "lora_" in name)
    assert (output.logits - before).abs().max() > 1e-3
    torch.testing.assert_close(model(input_ids=ids).logits, before)


def baseline_config(tmp_path: Path, model_dir: Path, text: Path, method: str, root: str, callbacks=()) -> Path:
    trainer = {
        "accelerator": "cpu",
        "max_steps": 30,
        "val_check_interval": 15,
        "default_root_dir": str(tmp_path / root),
        "enable_progress_bar": False,
        "callbacks": list(callbacks),
    }
    model = {
        "model": str(model_dir),
        "pruning": {"target": 0.6, "round_to": 1, "method": method},
        "optimizer": {"lora_lr": 0.001},
        "distill": {"weight": 0.5},
    }
    return write_config(tmp_path / f"{root}.yaml", model_dir, text, trainer=trainer, model=model)


def fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT / "tests")}
    command = [sys.executable, "-m", "tailored.cli", "fit", "-c", str(config), *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True)


@pytest.mark.parametrize(
    ("method", "recovery_weights"), [("taylor", "lora"), ("magnitude", "lora"), ("random", "lora"), ("taylor", "all")]
)
def test_every_baseline_exports_exactly_the_requested_size(
    tmp_path, tiny_model_dir, tiny_text, method, recovery_weights
):
    config = baseline_config(tmp_path, tiny_model_dir, tiny_text, method, "run")
    done = fit(config, "--model.pruning.recovery_weights", recovery_weights)
    assert done.returncode == 0, done.stderr[-2000:]
    export = next((tmp_path / "run").rglob("export"))
    report = json.loads((export / "pruning_report.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(export)
    structure = describe(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    shape = resolve_target(structure, ("groups", "channels"), 0.6, None, True, 1).shape
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]["after"]
    assert report["parameters"]["after"] == shape_parameter_count(structure, shape)
    assert report["method"] == method and report["trained_steps"] == 30


@pytest.mark.parametrize("teacher", ["tuned", "corrected"])
def test_resume_after_the_prune_now_transition_ends_where_an_uninterrupted_run_does(
    tmp_path, tiny_model_dir, tiny_text, teacher
):
    """A two-stage run prunes at step 0; killed at step 25, it resumes from step 20 (replaying the transition) and
    ends with the LoRA weights of a run that was never interrupted (with a corrected teacher: its adapters too)."""
    teacher_option = ("--model.distill.teacher", teacher)
    kill = {"class_path": "subprocess_callbacks.KillAfterStep", "init_args": {"step": 25}}
    killed = fit(baseline_config(tmp_path, tiny_model_dir, tiny_text, "taylor", "run", [kill]), *teacher_option)
    assert killed.returncode == -9, killed.stderr[-2000:]
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 20 and checkpoint["tailored_transition"]["step"] == 0
    end = {"class_path": "subprocess_callbacks.RecordEnd", "init_args": {"path": str(tmp_path / "resumed")}}
    config = baseline_config(tmp_path, tiny_model_dir, tiny_text, "taylor", "run", [end])
    resumed = fit(config, "--ckpt_path", "last", *teacher_option)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    end = {"class_path": "subprocess_callbacks.RecordEnd", "init_args": {"path": str(tmp_path / "whole")}}
    whole = fit(baseline_config(tmp_path, tiny_model_dir, tiny_text, "taylor", "whole", [end]), *teacher_option)
    assert whole.returncode == 0, whole.stderr[-2000:]
    first, second = torch.load(tmp_path / "resumed.rank0.pt"), torch.load(tmp_path / "whole.rank0.pt")
    assert first["state"].keys() == second["state"].keys()
    trained = [value for name, value in first["state"].items() if "lora_B" in name and "teacher" not in name]
    assert trained and all(value.abs().sum() > 0 for value in trained)  # the new adapters were trained
    corrected = [value for name, value in first["state"].items() if "corrected_teacher" in name and "lora_B" in name]
    assert len(corrected) == (len(trained) if teacher == "corrected" else 0)
    assert all(value.abs().sum() > 0 for value in corrected)  # the teacher's adapters were trained too
    for name, value in second["state"].items():
        torch.testing.assert_close(first["state"][name], value, rtol=1e-4, atol=1e-4, msg=name)


def test_a_non_uniform_run_pruned_at_recovery_exports_what_its_gates_predict(tmp_path, tiny_model_dir, tiny_text):
    """Layers that differ make a tailored_* model at the transition; the export merges its adapters and matches
    the report's parameter count."""
    from tailored.core.export import load_pruned

    config = baseline_config(tmp_path, tiny_model_dir, tiny_text, "one_stage", "run")
    done = fit(config, "--model.pruning.uniform", "false", "--model.distill", "null")
    assert done.returncode == 0, done.stderr[-2000:]
    export = next((tmp_path / "run").rglob("export"))
    report = json.loads((export / "pruning_report.json").read_text())
    model = load_pruned(export)
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]["after"]
    assert report["method"] == "one_stage"
