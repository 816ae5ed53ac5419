"""``tailored fit/test/export`` on a tiny random model: target met, export loadable, resume after a kill, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import ROOT, TARGET, scalars, write_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

import tailored.train.module
from tailored.cli import main, run
from tailored.core.structure import UnsupportedModelError
from tailored.data.datamodule import DomainData, MixtureStream
from tailored.data.tasks import Task
from tailored.train.optimization import FINAL_LR_RATIO, learning_rate_factor
from tailored.train.settings import OptimizerSettings


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, tiny_text):
    """One complete ``tailored fit`` of the tiny model (shared by the tests below)."""
    config = write_config(tmp_path_factory.mktemp("fit") / "tiny.yaml", tiny_model_dir, tiny_text)
    run(["fit", "-c", str(config)])
    return config, config.parent / "run"


def test_fit_reaches_the_target_within_one_point_before_the_exact_top_k(finished_run):
    """The default (a learned shape): the gates' expected size reaches the budget by the end of control. The
    deterministic gates before the top-k round each layer's own counts, which on this model's two KV groups per
    layer is a coarse step, so the hard ratio is asserted for the fixed shape below."""
    _, root = finished_run
    log_dir = root / "lightning_logs" / "version_0"
    expected = scalars(log_dir, "sparsity/expected_ratio")
    assert expected[0] > 0.95  # it started dense and got there by training
    assert abs(expected[-1] - TARGET) <= 0.01


def test_a_fixed_shape_reaches_the_target_within_one_point_before_the_exact_top_k(tmp_path, tiny_model_dir, tiny_text):
    pruning = {"target": TARGET, "round_to": 1, "allocation": "proportional"}
    model = {"model": str(tiny_model_dir), "pruning": pruning, "optimizer": {"lora_lr": 0.001}}
    config = write_config(tmp_path / "tiny.yaml", tiny_model_dir, tiny_text, model=model)
    run(["fit", "-c", str(config), "--export.enabled", "false"])
    log_dir = tmp_path / "run" / "lightning_logs" / "version_0"
    before_top_k = scalars(log_dir, "sparsity/ratio_before_topk")[0]
    assert abs(before_top_k - TARGET) <= 0.01


def test_fit_exports_a_stock_model_whose_size_matches_the_report(finished_run):
    _, root = finished_run
    export = root / "lightning_logs" / "version_0" / "export"
    report = json.loads((export / "pruning_report.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(export)
    assert type(model).__name__ == "LlamaForCausalLM" and report["format"] == "stock"
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]["after"]
    assert abs(report["kept_fraction_of_prunable"] - TARGET) <= 0.01
    shapes = {(layer["kv_heads"], layer["mlp_channels"]) for layer in report["layers"]}
    assert len(shapes) == 1  # uniform


def test_checkpoints_hold_the_trainable_state_only(finished_run):
    _, root = finished_run
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)
    keys = set(checkpoint["state_dict"])
    assert any("lora_A" in key for key in keys) and "gates.lambda_1" in keys and "gates.log_alpha.channels" in keys
    assert not any("base_layer" in key or "embed_tokens" in key for key in keys)


def test_test_subcommand_reports_held_out_perplexity(finished_run, capsys):
    config, root = finished_run
    run(["test", "-c", str(config), "--ckpt_path", str(root / "checkpoints" / "last.ckpt")])
    assert "test/words/perplexity" in capsys.readouterr().out


def test_export_subcommand_exports_from_a_checkpoint_and_keeps_existing_folders(finished_run, tmp_path):
    _, root = finished_run
    out = tmp_path / "from-checkpoint"
    run(["export", "--ckpt_path", str(root / "checkpoints" / "last.ckpt"), "--out", str(out)])
    report = json.loads((out / "pruning_report.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]["after"]
    assert report["trained_steps"] == torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    with pytest.raises(FileExistsError, match="already holds files"):
        run(["export", "--ckpt_path", str(root / "checkpoints" / "last.ckpt"), "--out", str(out)])


def test_progress_is_printed_as_lines_when_the_output_is_not_a_terminal(tmp_path, tiny_model_dir, tiny_text, capsys):
    trainer = {"accelerator": "cpu", "max_steps": 20, "val_check_interval": 10, "default_root_dir": str(tmp_path)}
    config = write_config(tmp_path / "tiny.yaml", tiny_model_dir, tiny_text, trainer=trainer, export={"enabled": False})
    run(["fit", "-c", str(config)])
    lines = capsys.readouterr().out.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in steps] == ["step 10/20 (50%)", "step 20/20 (100%)"]
    assert "s/step" in steps[0] and "min left" in steps[0] and "train/lm_loss" in steps[0]
    assert sum(line.startswith("validation: loader 1/1, batch") for line in lines) == 2  # after steps 10 and 20


def test_gradient_checkpointing_trains_the_same_masked_model(tmp_path, tiny_model_dir, tiny_text):
    """Checkpointing re-runs each layer's forward during backward: the gates must still be applied there."""
    trained = []
    for checkpointing in (False, True):
        root = tmp_path / str(checkpointing)
        pruning = {"target": TARGET, "round_to": 1}
        model = {"model": str(tiny_model_dir), "pruning": pruning, "gradient_checkpointing": checkpointing}
        trainer = {"accelerator": "cpu", "max_steps": 4, "limit_val_batches": 0, "default_root_dir": str(root)}
        root.mkdir()
        config = write_config(root / "tiny.yaml", tiny_model_dir, tiny_text, model=model, trainer=trainer)
        run(["fit", "-c", str(config), "--export.enabled", "false", "--trainer.enable_progress_bar", "false"])
        state = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        trained.append({name: value for name, value in state.items() if "gates." in name or "lora_" in name})
    assert trained[0].keys() == trained[1].keys() and any("lora_B" in name for name in trained[0])
    for name, value in trained[0].items():
        torch.testing.assert_close(trained[1][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_two_processes_train_the_same_gates_and_export_once(tmp_path, tiny_model_dir, tiny_text):
    """DDP on CPU (gloo), 2 processes, into the recovery phase: every rank ends with the same gates, multipliers
    and LoRA weights, and one export is written."""
    record = tmp_path / "end"
    trainer = {
        "accelerator": "cpu",
        "strategy": "ddp",
        "devices": 2,
        "max_steps": 20,
        "val_check_interval": 10,
        "default_root_dir": str(tmp_path / "run"),
        "enable_progress_bar": False,
        "callbacks": [{"class_path": "subprocess_callbacks.RecordEnd", "init_args": {"path": str(record)}}],
    }
    model = {  # the prune-now transition runs on one process only: keep tuning the masked model
        "model": str(tiny_model_dir),
        "pruning": {"target": TARGET, "round_to": 1, "prune_at_recovery": False},
        "optimizer": {"lora_lr": 0.001},
    }
    config = write_config(tmp_path / "ddp.yaml", tiny_model_dir, tiny_text, trainer=trainer, model=model)
    env = os.environ | {"PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tailored.cli", "fit", "-c", str(config)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(f"{record}.rank{rank}.pt") for rank in (0, 1)]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 20
    assert ranks[0]["state"]["gates.is_frozen"]  # the last steps were the recovery phase
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
    assert len(list((tmp_path / "run").rglob("export/config.json"))) == 1


def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path, tiny_model_dir, tiny_text):
    """SIGKILL after step 25 (checkpoint at 20), resume with ``--ckpt_path last``: gates, multipliers, data
    position and the learning rate schedule (warm-up, cosine) continue from the checkpoint, and the run finishes
    and exports what an uninterrupted run does."""
    record = tmp_path / "start.pt"
    trainer = {
        "accelerator": "cpu",
        "max_steps": 60,
        "val_check_interval": 30,
        "log_every_n_steps": 1,
        "default_root_dir": str(tmp_path / "run"),
        "enable_progress_bar": False,
    }
    optimizer = {"lora_lr": 0.001, "schedule": "cosine", "warmup_steps": 10}
    model = {"model": str(tiny_model_dir), "pruning": {"target": TARGET, "round_to": 1}, "optimizer": optimizer}

    def fit(callbacks: list[dict], *extra: str) -> subprocess.CompletedProcess:
        config = write_config(
            tmp_path / "tiny.yaml", tiny_model_dir, tiny_text, trainer=trainer | {"callbacks": callbacks}, model=model
        )
        env = os.environ | {"PYTHONPATH": str(ROOT / "tests")}
        command = [sys.executable, "-m", "tailored.cli", "fit", "-c", str(config), *extra]
        return subprocess.run(command, env=env, capture_output=True, text=True)

    killed = fit([{"class_path": "subprocess_callbacks.KillAfterStep", "init_args": {"step": 25}}])
    assert killed.returncode == -9, killed.stderr[-2000:]
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 20

    resumed = fit(
        [
            {"class_path": "subprocess_callbacks.RecordStart", "init_args": {"path": str(record)}},
            {"class_path": "subprocess_callbacks.RecordEnd", "init_args": {"path": str(tmp_path / "resumed")}},
        ],
        "--ckpt_path",
        "last",
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    start = torch.load(record)
    assert start["global_step"] == 20
    for name, value in start["gates"].items():
        assert torch.equal(value, checkpoint["state_dict"][f"gates.{name}"]), name
    assert start["gates"]["lambda_1"].abs().sum() > 0  # trained multipliers, not the initial zeros

    data = DomainData(
        [Task(name="words", source=str(tiny_text))], tokenizer=str(tiny_model_dir), seq_len=32, batch_size=4
    )
    data.setup("fit")
    stream = iter(MixtureStream(data.train_examples, data.weights, seed=0, start=20 * 4))
    expected = data.collate([next(stream) for _ in range(4)])["input_ids"]
    assert torch.equal(start["input_ids"], expected)  # the batch an uninterrupted run takes at step 20
    assert (tmp_path / "run" / "lightning_logs" / "version_1" / "export" / "config.json").is_file()

    trainer["default_root_dir"] = str(tmp_path / "uninterrupted")
    whole = fit([{"class_path": "subprocess_callbacks.RecordEnd", "init_args": {"path": str(tmp_path / "whole")}}])
    assert whole.returncode == 0, whole.stderr[-2000:]
    end, expected_end = torch.load(tmp_path / "resumed.rank0.pt"), torch.load(tmp_path / "whole.rank0.pt")
    for name, value in expected_end["state"].items():  # same data, gate noise, optimiser: the same result
        torch.testing.assert_close(end["state"][name], value, rtol=1e-4, atol=1e-4, msg=name)  # not bitwise: ~1e-6
    events = EventAccumulator(str(tmp_path / "uninterrupted" / "lightning_logs" / "version_0"))
    events.Reload()
    rates = {event.step: event.value for event in events.Scalars("optimizer/tuned_lr")}
    settings = OptimizerSettings(**optimizer)
    assert len(rates) == 60 and rates[0] == pytest.approx(0.001 / 10)  # the warm-up's first step
    assert rates[47] == pytest.approx(0.001)  # the peak until the gates freeze at step 48 (and the model is pruned)
    for step, rate in rates.items():  # then the cosine, through the rebuilt optimiser
        assert rate == pytest.approx(0.001 * learning_rate_factor(step, 60, settings, 48), rel=1e-6), step
    assert rates[59] == pytest.approx(0.001 * FINAL_LR_RATIO)


def test_the_cosine_schedule_warms_up_then_falls_to_a_tenth_from_its_start_and_constant_stays():
    settings = OptimizerSettings(schedule="cosine", warmup_steps=4)
    cosine = [learning_rate_factor(step, 25, settings, 0) for step in range(25)]
    assert cosine[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert cosine[14] == pytest.approx((1 + FINAL_LR_RATIO) / 2) and cosine[24] == pytest.approx(FINAL_LR_RATIO)
    assert all(later <= earlier for earlier, later in zip(cosine[4:], cosine[5:], strict=False))
    late = [learning_rate_factor(step, 25, settings, 14) for step in range(25)]  # the gates froze at step 14
    assert late[4:15] == [1.0] * 11 and late[19] == pytest.approx((1 + FINAL_LR_RATIO) / 2)
    assert [learning_rate_factor(step, 25, settings, None) for step in range(4, 25)] == [1.0] * 21  # not yet frozen
    constant = [learning_rate_factor(step, 25, OptimizerSettings(warmup_steps=2), 0) for step in range(25)]
    assert constant[:3] == [0.5, 1.0, 1.0] and set(constant[2:]) == {1.0}


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Make loading weights an error: input checks must fail before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the input was checked")

    monkeypatch.setattr(tailored.train.module, "load_model", refuse)


def test_bad_model_inputs_fail_before_weights_load(tmp_path, tiny_model_dir, tiny_text, no_weight_loading):
    config = str(write_config(tmp_path / "tiny.yaml", tiny_model_dir, tiny_text))
    with pytest.raises(FileNotFoundError, match="model path '/nowhere/model' does not exist"):
        run(["fit", "-c", config, "--model.model", "/nowhere/model"])
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2}))
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported.*llama, mistral, qwen2"):
        run(["fit", "-c", config, "--model.model", str(gpt2)])
    for target in ("1.5", "0"):
        with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
            run(["fit", "-c", config, "--model.pruning.target", target])


def test_bad_data_fails_before_weights_load(tmp_path, tiny_model_dir, tiny_text, no_weight_loading):
    missing = {"tasks": [{"name": "notes", "source": str(tmp_path / "missing.jsonl")}], "seq_len": 32}
    config = write_config(tmp_path / "a.yaml", tiny_model_dir, tiny_text, data=missing)
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        run(["fit", "-c", str(config)])
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"body": "w3 w4 w5"}\n')
    wrong_column = {"tasks": [{"name": "notes", "source": str(rows)}], "seq_len": 32}
    config = write_config(tmp_path / "b.yaml", tiny_model_dir, tiny_text, data=wrong_column)
    with pytest.raises(ValueError, match="task 'notes': .*rows.jsonl has no field text"):
        run(["fit", "-c", str(config)])


def test_corrupt_checkpoint_is_named(tmp_path, tiny_model_dir, tiny_text, no_weight_loading):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    config = write_config(tmp_path / "tiny.yaml", tiny_model_dir, tiny_text)
    with pytest.raises(ValueError, match="broken.ckpt is corrupt"):
        run(["fit", "-c", str(config), "--ckpt_path", str(broken)])
    with pytest.raises(FileNotFoundError, match="has no last.ckpt"):  # would evaluate the untrained model
        run(["test", "-c", str(config), "--ckpt_path", "last"])


def test_console_script_reports_input_errors_in_one_line(tmp_path, tiny_model_dir, tiny_text, monkeypatch):
    config = write_config(tmp_path / "tiny.yaml", tiny_model_dir, tiny_text)
    monkeypatch.setattr(sys, "argv", ["tailored", "fit", "-c", str(config), "--model.pruning.target", "2"])
    monkeypatch.delenv("TAILORED_TRACEBACK", raising=False)
    with pytest.raises(SystemExit, match=r"^tailored: error: pruning.target .* must be in \(0, 1\), got 2.0$"):
        main()


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda path: path.name)
def test_every_config_file_matches_the_code(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "-c", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["model"] and printed["data"]["tasks"]
    header = config.read_text().splitlines()[:12]
    assert any(line.startswith("# Run:") and f"configs/{config.name}" in line for line in header)
    assert any(line.startswith("# Override:") for line in header)


def test_a_non_uniform_export_is_evaluated_by_test_and_recovery_with_general_text(tmp_path, tiny_model_dir, tiny_text):
    pruning = {"target": 0.5, "units": ["groups", "channels", "attn", "mlp"], "uniform": False, "round_to": 1}
    config = write_config(tmp_path / "fit.yaml", tiny_model_dir, tiny_text)
    document = yaml.safe_load(config.read_text())
    document["model"]["pruning"] = pruning
    document["trainer"] |= {"max_steps": 30, "val_check_interval": 30}
    config.write_text(yaml.safe_dump(document))
    run(["fit", "-c", str(config)])
    export = tmp_path / "run" / "lightning_logs" / "version_0" / "export"
    report = json.loads((export / "pruning_report.json").read_text())
    assert report["format"] == "tailored" and len({(x["kv_heads"], x["mlp_channels"]) for x in report["layers"]}) > 1

    document["model"] = {"model": str(export), "pruning": None}  # the export is a model like any other
    document["trainer"]["default_root_dir"] = str(tmp_path / "evaluation")
    evaluation = tmp_path / "evaluate.yaml"
    evaluation.write_text(yaml.safe_dump(document))
    run(["test", "-c", str(evaluation)])
    tested = json.loads(next((tmp_path / "evaluation").rglob("test_results.json")).read_text())
    assert tested["words"]["perplexity"] > 1

    document["model"]["model"] = str(tiny_model_dir)
    recovery_config = tmp_path / "recovery.yaml"
    recovery_config.write_text(yaml.safe_dump(document))
    general = tmp_path / "general.txt"
    general.write_text("\n".join(" ".join(f"w{3 + (7 * i + j) % 60}" for j in range(20)) for i in range(100)))
    table = run(["compare", "-c", str(recovery_config), "--pruned", str(export), "--general", str(general)])
    assert table["tasks"]["words"]["pruned"] == pytest.approx(tested["words"]["perplexity"], rel=1e-5)
    general_row = table["tasks"]["general"]
    assert general_row["metric"] == "perplexity" and general_row["pruned"] > 1 and general_row["dense"] > 1
    assert table["outside_average"] == ["general"]
    assert table["average"]["pruned % of dense"] == pytest.approx(table["tasks"]["words"]["pruned % of dense"])

    with pytest.raises(ValueError, match="non-uniform tailored export .* cannot be pruned again"):
        run(["fit", "-c", str(evaluation), "--model.pruning.target", "0.5"])


@pytest.mark.slow
def test_compiled_layers_train_the_same_model_through_the_transition(tmp_path, tiny_model_dir, tiny_text):
    """model.compile (aot_eager here: the graphs inductor would generate code for, without the minutes of C++) on
    the dense masked model, then on the pruned one after the transition, packed batches (the default): the same
    trained state and export as eager."""
    trained, exports, graphs = [], [], []
    for backend in (False, "aot_eager"):
        torch._dynamo.reset()
        counters.clear()
        root = tmp_path / str(backend)
        model = {"model": str(tiny_model_dir), "pruning": {"target": TARGET, "round_to": 1}, "compile": backend}
        trainer = {"accelerator": "cpu", "max_steps": 10, "limit_val_batches": 0, "default_root_dir": str(root)}
        root.mkdir()
        config = write_config(root / "tiny.yaml", tiny_model_dir, tiny_text, model=model, trainer=trainer)
        run(["fit", "-c", str(config), "--trainer.enable_progress_bar", "false"])
        state = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        trained.append({name: value for name, value in state.items() if "gates." in name or "lora_" in name})
        exports.append(AutoModelForCausalLM.from_pretrained(next(root.rglob("export"))).state_dict())
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == 0 and 2 <= graphs[1] <= 4, graphs  # the masked and the pruned layers' graphs, not one per layer
    assert trained[0].keys() == trained[1].keys() and any("lora_B" in name for name in trained[0])
    for name, value in trained[0].items():
        torch.testing.assert_close(trained[1][name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert exports[0].keys() == exports[1].keys()
    for name, value in exports[0].items():
        torch.testing.assert_close(exports[1][name], value, rtol=1e-4, atol=1e-6, msg=name)
