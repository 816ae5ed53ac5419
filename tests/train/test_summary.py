"""The end of ``fit`` says what the run made: a table of the dense and the exported model on the validation tasks,
``fit_summary.json`` and a model card in the export, the numbers all measured on this run's models."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from helpers import write_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tailored.cli import TailoredCLI, run
from tailored.core.card import CARD_NAME, format_estimate, model_card
from tailored.core.export import load_pruned
from tailored.data.datamodule import DomainData
from tailored.data.scoring import evaluate
from tailored.models import EMBEDDED_SMOLLM2, load_model
from tailored.train.module import TailoredModule
from tailored.train.summary import SUMMARY_NAME, hub_name, write_card


@pytest.fixture(scope="module")
def summarized_run(tmp_path_factory, tiny_model_dir, tiny_text):
    """A short ``tailored fit`` of the tiny model; its printed output, config, export folder and summary."""
    folder = tmp_path_factory.mktemp("summary")
    trainer = {
        "accelerator": "cpu",
        "max_steps": 12,
        "val_check_interval": 6,
        "log_every_n_steps": 5,
        "default_root_dir": str(folder / "run"),
        "enable_progress_bar": False,
    }
    config = write_config(folder / "tiny.yaml", tiny_model_dir, tiny_text, trainer=trainer)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        run(["fit", "-c", str(config)])
    log_dir = folder / "run" / "lightning_logs" / "version_0"
    export = log_dir / "export"
    summary = json.loads((export / SUMMARY_NAME).read_text())
    return {"out": output.getvalue(), "config": config, "log_dir": log_dir, "export": export, "summary": summary}


def table_of(out: str) -> list[str]:
    """The printed end-of-fit table: from its title to the last ``next:`` command."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("fit summary: "))
    return lines[start:]


def test_fit_ends_with_a_table_of_the_dense_and_the_exported_model(summarized_run):
    table, summary = table_of(summarized_run["out"]), summarized_run["summary"]
    assert table[0] == "fit summary: dense vs pruned on the validation split (± bootstrap standard error)"
    assert table[1].split() == ["task", "metric", "dense", "pruned"]
    rows = {tuple(line.split()[:2]): line for line in table[2:]}
    for metric in ("perplexity", "loss"):  # the primary metric of a language-modelling task, and the loss
        line = rows["words", metric]
        for model in ("dense", "export"):
            assert format_estimate(summary["tasks"]["words"][model], metric) in line
    parameters = summary["parameters"]
    assert f"{parameters['dense']:,}" in rows["parameters", f"{parameters['dense']:,}"]
    assert f"{parameters['export']:,}" in rows["parameters", f"{parameters['dense']:,}"]
    speed = next(line for line in table if line.startswith("prefill speed-up: "))
    assert f"{summary['prefill']['speedup']:.2f}x" in speed and "measured on this machine's cpu" in speed
    printed = Path(next(line for line in table if line.startswith("export: ")).split()[1])
    assert printed == summarized_run["export"] and (printed / "config.json").is_file()
    config = summarized_run["config"]
    assert f"next:   tailored test -c {config} --ckpt_path last" in table
    assert any(line.strip().startswith(f"tailored compare -c {config} --pruned {printed}") for line in table)


def test_the_summary_holds_the_metrics_of_the_dense_and_the_exported_model(summarized_run, tiny_model_dir):
    """Evaluated again here on the same validation loaders, the dense model and the export give fit_summary.json's
    numbers; its parameter counts are the pruning report's; the speed-up is the ratio of the measured times."""
    summary, export = summarized_run["summary"], summarized_run["export"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        args = ["-c", str(summarized_run["config"]), "--trainer.logger", "false"]
        cli = TailoredCLI(TailoredModule, DomainData, run=False, args=args, save_config_callback=None)
    data = cli.datamodule
    data.setup("validate")
    models = {"dense": load_model(str(tiny_model_dir)), "export": load_pruned(export, dtype=torch.float32)}
    for name, model in models.items():
        results = evaluate(model, data.val_dataloader(), data.tasks, data.tokenizer)
        assert summary["tasks"]["words"][name] == results["words"], name
        assert {"perplexity", "perplexity_stderr", "loss", "loss_stderr"} <= set(results["words"])
    assert summary["tasks"]["words"]["metric"] == "perplexity"
    assert summary["tasks"]["words"]["export"] != summary["tasks"]["words"]["dense"]  # two different models
    report = json.loads((export / "pruning_report.json").read_text())
    assert summary["parameters"] == {"dense": report["parameters"]["before"], "export": report["parameters"]["after"]}
    assert summary["parameters"]["export"] == sum(p.numel() for p in models["export"].parameters())
    prefill = summary["prefill"]
    assert prefill["speedup"] == pytest.approx(prefill["dense_seconds"] / prefill["export_seconds"])
    assert prefill["batch"] == [4, 32] and prefill["device"].startswith("cpu")
    events = EventAccumulator(str(summarized_run["log_dir"]), size_guidance={"tensors": 0})
    events.Reload()
    assert "export/fit_summary/text_summary" in events.Tags()["tensors"]


def front_matter(card: str) -> tuple[dict, str]:
    """The card's YAML front matter (parsed) and its body."""
    assert card.startswith("---\n")
    front, body = card.removeprefix("---\n").split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_the_export_has_a_model_card_with_the_runs_numbers_and_config(summarized_run, tiny_model_dir):
    summary, export = summarized_run["summary"], summarized_run["export"]
    front, body = front_matter((export / CARD_NAME).read_text())
    assert front["base_model"] == str(tiny_model_dir) and front["library_name"] == "transformers"
    assert {"tailored", "pruned", "structured-pruning", "lora", "words"} <= set(front["tags"])
    for count in summary["parameters"].values():
        assert f"{count:,}" in body
    for model in ("dense", "export"):
        for metric in ("perplexity", "loss"):
            assert format_estimate(summary["tasks"]["words"][model], metric) in body
    assert "Every layer (uniform): " in body and "## Results (validation split)" in body
    config = yaml.safe_load(body.split("```yaml\n", 1)[1].split("\n```", 1)[0])
    assert config == yaml.safe_load((summarized_run["log_dir"] / "config.yaml").read_text())
    assert config["trainer"]["max_steps"] == 12
    assert f"tailored fit -c {summarized_run['config']}" in body


def test_the_export_subcommand_writes_a_card_without_metrics(summarized_run, tmp_path):
    out = tmp_path / "exported"
    run(["export", "--ckpt_path", str(summarized_run["config"].parent / "run" / "checkpoints" / "last.ckpt"),
         "--out", str(out)])  # fmt: skip
    front, body = front_matter((out / CARD_NAME).read_text())
    assert front["library_name"] == "transformers" and "pruned" in front["tags"]
    report = json.loads((out / "pruning_report.json").read_text())
    assert f"{report['parameters']['after']:,}" in body and "## Results" not in body


UNIFORM_REPORT = {
    "source_model": EMBEDDED_SMOLLM2,
    "format": "stock",
    "parameters": {"before": 134_515_008, "after": 100_000_000, "kept_fraction": 0.7434},
    "hidden_size": {"before": 576, "after": 576},
    "num_layers": {"before": 30, "after": 30},
    "dense_layer": {"kv_heads": 3, "query_heads": 9, "mlp_channels": 1536},
    "layers": [
        {"source_layer": i, "kv_heads": 2, "query_heads": 6, "mlp_channels": 1024, "kept_kv_groups": [0, 2]}
        for i in range(30)
    ],
    "target": {"fraction_of_prunable": 0.7, "shape": None},
}


def test_model_card_front_matter_shape_and_metrics():
    summary = {
        "split": "validation",
        "models": {"dense": EMBEDDED_SMOLLM2, "export": "export"},
        "labels": {"dense": "dense", "export": "pruned"},
        "parameters": {"dense": 134_515_008, "export": 100_000_000},
        "tasks": {
            "Med QA": {
                "kind": "multiple_choice",
                "metric": "accuracy",
                "dense": {"accuracy": 0.5, "accuracy_stderr": 0.05, "loss": 2.0, "loss_stderr": 0.1},
                "export": {"accuracy": 0.4375, "accuracy_stderr": 0.049, "loss": 2.5, "loss_stderr": 0.12},
            }
        },
        "prefill": {
            "dense_seconds": 0.02,
            "export_seconds": 0.016,
            "speedup": 1.25,
            "batch": [4, 64],
            "repeats": 5,
            "device": "cuda:0 (NVIDIA H200)",
        },  # fmt: skip
    }
    card = model_card(UNIFORM_REPORT, hub_name(EMBEDDED_SMOLLM2), summary=summary, config_text="seed_everything: 0\n",
                      command="tailored fit -c configs/quickstart.yaml")  # fmt: skip
    front, body = front_matter(card)
    assert front == {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["tailored", "pruned", "structured-pruning", "lora", "med-qa"],
    }
    assert "Every layer (uniform): 2 of 3 KV groups (6 of 9 query heads), 1,024 of 1,536 MLP channels." in body
    assert "Layers: 30 of 30; hidden size: 576 of 576." in body
    assert "| dense | 134,515,008 |" in body and "| pruned | 100,000,000 (74.3%) |" in body
    assert "| Med QA | accuracy | 0.5 ± 0.05 | 0.4375 ± 0.049 |" in body
    assert "| Med QA | loss | 2 ± 0.1 | 2.5 ± 0.12 |" in body
    assert "1.25x" in body and "cuda:0 (NVIDIA H200)" in body
    assert "```bash\ntailored fit -c configs/quickstart.yaml\n```" in body
    assert "```yaml\nseed_everything: 0\n```" in body


def test_model_card_of_a_non_uniform_export_without_metrics(tmp_path):
    report = UNIFORM_REPORT | {
        "format": "tailored",
        "num_layers": {"before": 30, "after": 2},
        "layers": [
            {"source_layer": 0, "kv_heads": 3, "query_heads": 9, "mlp_channels": 1536, "kept_kv_groups": [0, 1, 2]},
            {"source_layer": 4, "kv_heads": 1, "query_heads": 3, "mlp_channels": 100, "kept_kv_groups": [1]},
        ],
    }
    front, body = front_matter(write_card(tmp_path, report, tasks=["botchan"]).read_text())
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and front["tags"][-1] == "botchan"
    assert "| 1 | 4 | 1 of 3 | 3 of 9 | 100 of 1,536 | 1 |" in body and "Layers: 2 of 30" in body
    assert "## Results" not in body and "## Training" not in body and "trust_remote_code=True" in body
    tuned = {"source_model": "org/model", "format": "tailored", "parameters": {"after": 5_000}}
    front, body = front_matter(model_card(tuned))
    assert front["base_model"] == "org/model" and "pruned" not in front["tags"] and "| tuned | 5,000 |" in body
