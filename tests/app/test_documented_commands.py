"""Every command the README, docs/*.md and the config headers show, run as a user runs it, in a user's order.

Each walk takes a real config (configs/quickstart.yaml and its header's distillation override, configs/medical.yaml
with its instruction tasks), keeps every setting but the model, the data and the run length (a tiny model, tiny files,
8 steps), and runs each documented command in a fresh ``python -m tailored.cli`` process from the repository root.
A command fails the walk when it exits non-zero or prints a traceback. :func:`test_the_walks_cover_every_documented
_subcommand` fails when the docs gain a subcommand the walks do not run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT
from transformers import AutoModelForCausalLM

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIGS = [ROOT / "configs" / "quickstart.yaml", ROOT / "configs" / "medical.yaml"]
HEADERS = sorted((ROOT / "configs").glob("*.yaml"))
"""Configs whose header comments show commands (the walks run the first two)."""
WALKED = {"fit", "test", "validate", "export", "compare", "recovery"}
"""Subcommands the walks below run (``recovery``: the old name of ``compare``, still accepted)."""
TINY_RUN = {"max_steps": 8, "val_check_interval": 4, "accelerator": "cpu", "enable_progress_bar": False}
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}


def documented_commands() -> list[str]:
    """Every ``tailored ...`` command line of the docs: lines of fenced code blocks and of the config headers'
    comments that start with it (after a header's ``Run:``-style label), and inline code spans that do."""
    commands = []
    for path in DOCUMENTS + HEADERS:
        in_code = False
        for line in path.read_text().splitlines():
            text = line.strip()
            if path.suffix == ".md":
                in_code = in_code != text.startswith("```")  # a fence opens or closes a code block
                shown = in_code
            else:
                shown = text.startswith("#")
                text = re.sub(r"^#\s*([A-Z][a-z]+:\s+)?", "", text)
            if shown and text.startswith("tailored "):
                commands.append(text)
            commands += re.findall(r"`(tailored [^`]+)`", line)
    return commands


def test_the_walks_cover_every_documented_subcommand():
    subcommands = {command.split()[1] for command in documented_commands()}
    assert {"fit", "test", "export", "compare"} <= subcommands  # the parser still finds the commands
    assert subcommands <= WALKED, f"documented but not walked: {sorted(subcommands - WALKED)}"


def tailored(*args: str) -> subprocess.CompletedProcess:
    """``tailored <args>`` as a user runs it, from the repository root; fails on an error exit or a traceback."""
    command = [sys.executable, "-m", "tailored.cli", *map(str, args)]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"tailored {' '.join(map(str, args))} exited {done.returncode}:\n{output[-4000:]}"
    assert "Traceback" not in output, f"tailored {' '.join(map(str, args))} printed a traceback:\n{output[-4000:]}"
    return done


def tiny_version(config: Path, path: Path, model_dir: Path, root: Path, data: dict) -> Path:
    """``config`` with the tiny model (channels rounded to 1), ``data`` merged into its data section, 8 steps,
    checkpoints every 4, and its run in ``root``."""
    document = yaml.safe_load(config.read_text())
    document["model"]["model"] = str(model_dir)
    document["model"]["pruning"] |= {"round_to": 1}  # the tiny model's 64 channels: multiples of 8 miss the target
    document["data"] |= {"seq_len": 16, "batch_size": 2, "eval_seq_len": 48, "val_rows": 4, "eval_blocks": 8} | data
    document["trainer"] |= TINY_RUN | {"default_root_dir": str(root)}
    document["checkpoint"] = document.get("checkpoint", {}) | {"every_n_train_steps": 4}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def only_export(root: Path) -> Path:
    exports = sorted(root.glob("lightning_logs/version_*/export"))
    assert len(exports) == 1, exports
    return exports[0]


def check_export(export: Path) -> None:
    report = json.loads((export / "pruning_report.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(export)
    assert sum(parameter.numel() for parameter in model.parameters()) == report["parameters"]["after"]
    assert report["parameters"]["after"] < report["parameters"]["before"]


def header_override(config: Path, label: str) -> list[str]:
    """The options after ``-c <config>`` on the header line ``# <label>: tailored fit -c <config> ...``."""
    line = next(line for line in config.read_text().splitlines() if line.startswith(f"# {label}:"))
    return line.split(f"-c configs/{config.name}", 1)[1].split()


def test_quickstart_walk(tmp_path, tiny_model_dir):
    """configs/quickstart.yaml (groups and channels, recovery) on a tiny model: fit, resume the finished run, test,
    validate, export a checkpoint, compare, help; and its header's distillation override: fit, then test
    ``--ckpt_path last`` (a distilled run's checkpoint once held the teacher's adapters, which test refused)."""
    rng = random.Random(0)
    words = [" ".join(f"w{rng.randrange(3, 64)}" for _ in range(20)) for _ in range(120)]
    task = yaml.safe_load(CONFIGS[0].read_text())["data"]["tasks"][0]
    text = tmp_path / "book.txt"  # the config's markers and note pattern apply: header, notes, end
    text.write_text("\n".join(["header w3 w4", task["start_at"], *(w + " [D]" for w in words), task["stop_at"], "w5"]))
    root = tmp_path / "runs" / "quickstart"
    tasks = [task | {"source": str(text)}]
    config = tiny_version(CONFIGS[0], tmp_path / "quickstart.yaml", tiny_model_dir, root, {"tasks": tasks})

    distil = [*header_override(CONFIGS[0], "Distil"), "--trainer.default_root_dir", tmp_path / "runs" / "distilled"]
    assert "--model.distill.teacher" in distil
    fit = tailored("fit", "-c", config, *distil)
    assert "pruned model saved to" in fit.stdout + fit.stderr
    checkpoint = tmp_path / "runs" / "distilled" / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    leaked = [name for name in state if name.startswith("teacher.")]
    assert not leaked, f"the kept teacher's frozen weights went into the checkpoint: {leaked[:3]}"
    tailored("test", "-c", config, *distil, "--ckpt_path", "last")

    fit = tailored("fit", "-c", config)
    assert "pruned model saved to" in fit.stdout + fit.stderr
    check_export(only_export(root))

    tailored("fit", "-c", config, "--ckpt_path", "last")  # resuming a finished run: nothing left to do
    tailored("test", "-c", config, "--ckpt_path", "last")
    results = json.loads(next(root.rglob("test_results.json")).read_text())
    assert results["botchan"]["perplexity"] > 1
    tailored("validate", "-c", config, "--ckpt_path", "last")
    assert next(root.rglob("val_results.json")).is_file()

    export = tmp_path / "exports" / "step8"
    tailored("export", "--ckpt_path", root / "checkpoints" / "last.ckpt", "--out", export)
    check_export(export)
    compared = tailored("compare", "-c", config, "--pruned", export)
    assert "botchan" in compared.stdout and "% of dense" in compared.stdout

    helped = tailored("fit", "--help")
    assert "--model.pruning PRUNING" in helped.stdout and "--data.tasks" in helped.stdout


def instruction_rows(count: int, seed: int) -> dict[str, list[dict]]:
    """PubMedQA- and HQS-shaped rows (the medical config's fields) in the tiny tokenizer's words."""
    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(3, 64)}" for _ in range(n))

    pubmedqa = [
        {"QUESTION": words(4), "CONTEXTS": [words(5), words(3)], "final_decision": rng.choice(["yes", "no", "maybe"])}
        for _ in range(count)
    ]
    hqs = [{"CHQ": words(8), "Summary": words(3)} for _ in range(count)]
    return {"pubmedqa": pubmedqa, "hqs": hqs, "pubmed_abstracts": pubmedqa}  # the abstracts: PubMedQA's files


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def medical_walk(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """configs/medical.yaml (a classification and a generation task with test files) on a tiny model, as
    docs/evaluation.md runs it: fit, test, validate, the LoRA-only fit, compare (and its old name)."""
    tmp_path = tmp_path_factory.mktemp("medical")
    medical = yaml.safe_load(CONFIGS[1].read_text())
    train, test = instruction_rows(40, seed=0), instruction_rows(6, seed=1)
    for task in medical["data"]["tasks"]:  # the config's relative sources, under a tiny data_dir
        write_jsonl(tmp_path / "data" / task["source"], train[task["name"]])
        write_jsonl(tmp_path / "data" / task["test_source"], test[task["name"]])
    root, lora_root = tmp_path / "runs" / "medical", tmp_path / "runs" / "medical-lora"
    data = {"data_dir": str(tmp_path / "data")}
    config = tiny_version(CONFIGS[1], tmp_path / "medical.yaml", tiny_model_dir, root, data)

    tailored("fit", "-c", config)
    tailored("test", "-c", config, "--ckpt_path", "last")
    tailored("validate", "-c", config, "--ckpt_path", "last")
    tailored("fit", "-c", config, "--model.pruning", "null", "--trainer.default_root_dir", lora_root)
    pruned, tuned = only_export(root), only_export(lora_root)
    table = tmp_path / "compare.json"
    compared = tailored("compare", "-c", config, "--pruned", pruned, "--tuned", tuned, "--out", table)
    renamed = tailored("recovery", "-c", config, "--pruned", pruned, "--out", tmp_path / "recovery.json")
    return {"root": root, "pruned": pruned, "table": table, "compared": compared, "renamed": renamed}


def test_medical_walk(medical_walk):
    root = medical_walk["root"]
    check_export(medical_walk["pruned"])
    results = json.loads(next(root.rglob("test_results.json")).read_text())
    assert 0 <= results["pubmedqa"]["accuracy"] <= 1 and 0 <= results["hqs"]["rougeL"] <= 1
    assert next(root.rglob("val_results.json")).is_file()
    table = json.loads(medical_walk["table"].read_text())
    assert set(table["models"]) == {"dense", "tuned", "pruned"}
    assert "pubmedqa" in medical_walk["compared"].stdout and "% of tuned" in medical_walk["compared"].stdout
    notice = "tailored recovery is now tailored compare; the old name goes in the next release"
    assert notice in medical_walk["renamed"].stderr.splitlines()
    assert "pubmedqa" in medical_walk["renamed"].stdout


LM_EVAL = shutil.which("lm_eval") or (importlib.util.find_spec("lm_eval") and f"{sys.executable} -m lm_eval")


@pytest.mark.skipif(not LM_EVAL, reason="lm-evaluation-harness is not installed (pip install -e '.[lmeval]')")
@pytest.mark.skipif(not (ROOT.parent / "shared" / "data").is_dir(), reason="the lm_eval task files read ../shared/data")
def test_lm_eval_on_the_medical_export(medical_walk):
    """docs/evaluation.md's lm-evaluation-harness command on the walk's export (a few rows)."""
    export = medical_walk["pruned"]
    command = [*LM_EVAL.split(), "--model", "hf", "--model_args", f"pretrained={export},dtype=float32"]
    command += ["--include_path", "configs/lm_eval", "--tasks", "tailored_pubmedqa", "--limit", "4"]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "Traceback" not in done.stdout + done.stderr, done.stderr[-4000:]
    assert "tailored_pubmedqa" in done.stdout
