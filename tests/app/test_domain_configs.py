"""The domain suites end to end on SmolLM2 and ../shared/data, shortened to a few steps (slow).

Each config trains, validates on its held-out splits, exports, and ``tailored test`` reports every task's metric:
accuracy for classification and multiple choice, ROUGE for generation, perplexity for language modelling.
"""

from __future__ import annotations

import json

import pytest
from helpers import ROOT
from transformers import AutoModelForCausalLM

from tailored.cli import run

pytestmark = pytest.mark.slow
DATA = ROOT.parent / "shared" / "data"
SUITES = {
    "medical": {"pubmedqa": "accuracy", "hqs": "rougeL"},
    "legal": {"casehold": "accuracy", "billsum": "rougeL", "multilegalpile": "perplexity"},
}


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data")
@pytest.mark.parametrize("suite", sorted(SUITES))
def test_domain_config_trains_validates_exports_and_tests(suite, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # data_dir in the configs is relative to the repository root
    short = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--trainer.accelerator", "cpu"]
    short += [
        "--data.seq_len",
        "96",
        "--data.test_rows",
        "3",
        "--data.val_rows",
        "3",
        "--data.eval_blocks",
        "8",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    short += ["--trainer.enable_progress_bar", "false"]
    config = ["-c", str(ROOT / "configs" / f"{suite}.yaml")]
    run(["fit", *config, *short])
    capsys.readouterr()

    run(["test", *config, *short, "--ckpt_path", "last"])
    printed = capsys.readouterr().out
    results = json.loads(next(tmp_path.rglob("test_results.json")).read_text())
    for task, metric in SUITES[suite].items():
        assert f"{task}" in printed and metric in printed
        assert metric in results[task]
    for task in (name for name, metric in SUITES[suite].items() if metric == "accuracy"):
        assert 0 <= results[task]["accuracy"] <= 1
    assert all(results[task]["perplexity"] > 1 for task in SUITES[suite] if "perplexity" in results[task])

    export = next(tmp_path.rglob("export"))
    report = json.loads((export / "pruning_report.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(export)
    assert sum(parameter.numel() for parameter in model.parameters()) == report["parameters"]["after"]
