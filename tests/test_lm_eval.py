"""The lm-evaluation-harness task files in configs/lm_eval run on an exported model (slow; needs the lmeval extra)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TASKS = ["tailored_pubmedqa", "tailored_casehold", "tailored_multilegalpile"]


def test_local_task_files_evaluate_an_exported_model(tiny_model_dir, monkeypatch):
    evaluator = pytest.importorskip("lm_eval.evaluator", reason="pip install -e '.[lmeval]'")
    from lm_eval.tasks import TaskManager

    if not (ROOT.parent / "shared" / "data").is_dir():
        pytest.skip("needs ../shared/data")
    monkeypatch.chdir(ROOT)  # the task files name ../shared/data relative to the repository root
    results = evaluator.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tiny_model_dir},dtype=float32",
        tasks=TASKS,
        task_manager=TaskManager(include_path=str(ROOT / "configs" / "lm_eval")),
        limit=4,
        device="cpu",
        batch_size=4,
    )
    assert set(TASKS) <= set(results["results"])
    assert 0 <= results["results"]["tailored_pubmedqa"]["acc,none"] <= 1
    assert results["results"]["tailored_multilegalpile"]["word_perplexity,none"] > 1
