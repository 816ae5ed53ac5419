"""``tailored fit`` on a tiny random Qwen3: per-head q/k norms, ``H*dh != hidden``, sliding-window layers."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model, tiny_tokenizer
from helpers import write_config
from transformers import AutoModelForCausalLM

from tailored.cli import run


@pytest.fixture(scope="module")
def tiny_qwen3_dir(tmp_path_factory):
    """A saved tiny Qwen3 (GQA 4:2, head_dim 8, hidden 24, window 8 from layer 1 on) with the tiny tokenizer."""
    path = tmp_path_factory.mktemp("tiny-qwen3")
    model = tiny_model(
        "qwen3", num_layers=2, head_dim=8, hidden_size=24, intermediate_size=64, tied=True, sliding_window=8
    )
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_fit_prunes_a_tiny_qwen3_into_a_stock_qwen3(tmp_path, tiny_qwen3_dir, tiny_text):
    trainer = {
        "accelerator": "cpu",
        "max_steps": 20,
        "val_check_interval": 10,
        "default_root_dir": str(tmp_path / "run"),
        "enable_progress_bar": False,
    }
    run(["fit", "-c", str(write_config(tmp_path / "qwen3.yaml", tiny_qwen3_dir, tiny_text, trainer=trainer))])

    export = tmp_path / "run" / "lightning_logs" / "version_0" / "export"
    report = json.loads((export / "pruning_report.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(export)
    assert type(model).__name__ == "Qwen3ForCausalLM" and (report["family"], report["format"]) == ("qwen3", "stock")
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]["after"] < report["parameters"]["before"]
    source_types = ["full_attention", "sliding_attention"]
    assert model.config.layer_types == [source_types[layer["source_layer"]] for layer in report["layers"]]
    assert all(layer.self_attn.q_norm.weight.shape == (8,) for layer in model.model.layers)
