"""The lm-evaluation-harness task files in configs/lm_eval run on an exported model, uniform (a stock model) and
non-uniform (``trust_remote_code``) (slow; needs the lmeval extra)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_model, tiny_tokenizer
from helpers import ROOT, non_uniform_gates

from tailored.core.export import pruning_report, save_pruned
from tailored.core.prune import prune_model
from tailored.core.structure import describe

pytestmark = pytest.mark.slow
TASKS = ["tailored_pubmedqa", "tailored_casehold", "tailored_multilegalpile"]


@pytest.fixture(scope="module")
def non_uniform_export(tmp_path_factory) -> Path:
    """A tiny non-uniform export (a layer without attention, layers of different head counts)."""
    model = tiny_model(num_layers=3, num_kv_heads=2, n_rep=2, head_dim=8, intermediate_size=64, tied=True)
    structure = describe(model)
    gates = non_uniform_gates(structure)
    path = tmp_path_factory.mktemp("non-uniform") / "export"
    report = pruning_report(structure, gates)
    assert report["format"] == "tailored"
    save_pruned(prune_model(model, gates), path, tokenizer=tiny_tokenizer(), report=report)
    return path


@pytest.mark.parametrize("export", ["uniform", "non-uniform"])
def test_local_task_files_evaluate_an_exported_model(export, tiny_model_dir, non_uniform_export, monkeypatch):
    evaluator = pytest.importorskip("lm_eval.evaluator", reason="pip install -e '.[lmeval]'")
    from lm_eval.tasks import TaskManager

    if not (ROOT.parent / "shared" / "data").is_dir():
        pytest.skip("needs ../shared/data")
    monkeypatch.chdir(ROOT)  # the task files name ../shared/data relative to the repository root
    path = tiny_model_dir if export == "uniform" else non_uniform_export
    results = evaluator.simple_evaluate(
        model="hf",
        model_args=f"pretrained={path},dtype=float32,trust_remote_code={export == 'non-uniform'}",
        tasks=TASKS,
        task_manager=TaskManager(include_path=str(ROOT / "configs" / "lm_eval")),
        limit=4,
        device="cpu",
        batch_size=4,
    )
    assert set(TASKS) <= set(results["results"])
    assert 0 <= results["results"]["tailored_pubmedqa"]["acc,none"] <= 1
    assert results["results"]["tailored_multilegalpile"]["word_perplexity,none"] > 1
