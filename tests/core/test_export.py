"""Save -> load in a fresh process reproduces the pruned model: logits, generated tokens, parameter count."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from helpers import load_in_fresh_process, non_uniform_gates, uniform_gates

from tailored.core.exactness import masked_logits
from tailored.core.export import REMOTE_CODE_NAME, REPORT_NAME, load_pruned, pruning_report, save_pruned
from tailored.core.prune import prune_model
from tailored.core.structure import describe

FAMILY_LAYOUTS = {
    "llama": dict(family="llama"),
    "qwen3": dict(family="qwen3", hidden_size=20, sliding_window=4),  # q/k norms, H*dh 24 != hidden 20
}


@pytest.mark.parametrize("family", FAMILY_LAYOUTS)
@pytest.mark.parametrize(
    ("gates_for", "loaders"),
    [(uniform_gates, ["transformers", "tailored"]), (non_uniform_gates, ["tailored", "remote code"])],
    ids=["uniform", "non-uniform"],
)
def test_saved_model_reloads_exactly_in_a_fresh_process(gates_for, loaders, family, tokens, tmp_path):
    model = tiny_model(num_layers=4, num_kv_heads=3, n_rep=2, tied=True, **FAMILY_LAYOUTS[family])
    structure = describe(model)
    gates = gates_for(structure)
    pruned = prune_model(model, gates)
    report = pruning_report(structure, gates, source="tiny")
    path = save_pruned(pruned, tmp_path / "export", tokenizer=tiny_tokenizer(), report=report)
    with torch.no_grad():
        logits = pruned(tokens).logits
    torch.testing.assert_close(logits, masked_logits(model, gates, tokens), rtol=0, atol=1e-5)
    generated = pruned.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=5, do_sample=False)

    assert (REMOTE_CODE_NAME in os.listdir(path)) == (report["format"] == "tailored")
    for loader in loaders:
        loaded = load_in_fresh_process(path, loader, tokens, tmp_path)
        assert torch.equal(loaded["logits"], logits), loader
        assert torch.equal(loaded["generated"], generated), loader
        assert loaded["count"] == report["parameters"]["after"], loader
        assert loaded["class"] == type(pruned).__name__, loader
    assert (type(pruned) is type(model)) == (gates_for is uniform_gates), "uniform exports are stock models"


def test_report_describes_the_pruned_model(tmp_path):
    model = tiny_model(num_layers=4, num_kv_heads=3, n_rep=2)
    structure = describe(model)
    gates = non_uniform_gates(structure)
    pruned = prune_model(model, gates)
    path = save_pruned(pruned, tmp_path / "export", report=pruning_report(structure, gates))
    report = json.loads((path / REPORT_NAME).read_text())
    assert report["format"] == "tailored"
    assert report["parameters"]["before"] == sum(p.numel() for p in model.parameters())
    assert report["parameters"]["after"] == sum(p.numel() for p in pruned.parameters())
    assert report["hidden_size"] == {"before": 24, "after": 19}
    assert report["num_layers"] == {"before": 4, "after": 3}
    assert [layer["source_layer"] for layer in report["layers"]] == [0, 2, 3]
    assert [layer["kv_heads"] for layer in report["layers"]] == [0, 1, 2]
    assert [layer["query_heads"] for layer in report["layers"]] == [0, 2, 4]
    assert [layer["mlp_channels"] for layer in report["layers"]] == [12, 12, 12]


def test_tokenizer_is_saved_alongside(tmp_path):
    from transformers import AutoTokenizer

    model = tiny_model()
    pruned = prune_model(model, uniform_gates(describe(model)))
    path = save_pruned(pruned, tmp_path / "export", tokenizer=tiny_tokenizer())
    assert AutoTokenizer.from_pretrained(path)("w5 w7")["input_ids"] == [5, 7]


def test_existing_export_is_not_overwritten_silently(tmp_path):
    model = tiny_model()
    pruned = prune_model(model, uniform_gates(describe(model)))
    target = tmp_path / "export"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="already holds files"):
        save_pruned(pruned, target)
    assert (target / "mine.txt").read_text() == "keep me"
    save_pruned(pruned, target, overwrite=True)
    assert not (target / "mine.txt").exists() and (target / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging folder left behind


def test_loading_a_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pruned(tmp_path / "nowhere")
