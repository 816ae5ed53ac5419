"""The speed benchmark runs end to end in its smoke mode (tiny random Llama, CPU), so it never rots; its FLOP
counts match a hand count. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT
from transformers import LlamaConfig

spec = importlib.util.spec_from_file_location("speed_measure", ROOT / "benchmarks" / "speed" / "speed_measure.py")
speed_measure = importlib.util.module_from_spec(spec)
sys.modules["speed_measure"] = speed_measure  # its dataclasses look their module up there
spec.loader.exec_module(speed_measure)
HEADLINE = ("train_step_time_ratio", "train_peak_memory_ratio", "prefill_speedup_vs_ideal", "export_seconds_smollm2")


def test_flops_count_projections_attention_and_lm_head():
    config = LlamaConfig(hidden_size=8, num_attention_heads=4, num_key_value_heads=2, head_dim=2,
                         intermediate_size=16, num_hidden_layers=3, vocab_size=10)  # fmt: skip
    projections = 8 * 2 * (4 + 4 + 2 + 2) + 3 * 8 * 16  # q, o: 4 heads; k, v: 2 heads; gate, up, down
    attention = 2 * 4 * 2 * 5.0  # scores and values over 5 positions
    expected = 2 * 7 * (3 * (projections + attention) + 8 * 10)
    assert speed_measure.forward_flops(config, 7, 5.0) == pytest.approx(expected)
    assert speed_measure.prefill_flops(config, 1, 9) == pytest.approx(speed_measure.forward_flops(config, 9, 5.0))


def test_smoke_run_writes_every_section_and_the_headline(tmp_path):
    out = tmp_path / "speed.json"
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    script = ROOT / "benchmarks" / "speed" / "speed.py"
    command = [sys.executable, str(script), "--smoke", "--device", "cpu", "--compile", "aot_eager", "--out", str(out)]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(out.read_text())
    for key in HEADLINE:
        assert document[key] > 0
        assert "met" in document["targets"][key]
    assert document["machine"]["torch_threads"] == 1
    assert set(document["train"]["sides"]) == {"lora", "tailored", "tailored_distill", "tailored_compiled"}
    assert document["train"]["sides"]["tailored_compiled"]["backend"] == "aot_eager"
    assert document["compiled_step_time_ratio"] > 0  # compiled vs eager tailored, the same run
    assert document["packed_real_tokens_per_second_ratio"] > 0  # packed vs padded medical batches, same examples
    packing = document["train"]["packing"]
    assert packing["packed"]["tokens"] <= packing["padded"]["tokens"]
    assert {case["kind"] for case in document["pruned"]["cases"].values()} == {"prefill", "decode"}
    assert [row["width"] for row in document["export"]["scaling"]["widths"]] == [1, 2]
    assert set(document["throughput"]["sides"]) == {"lora", "tailored"}  # the GPU path's CPU fallback
    assert document["throughput"]["sides"]["tailored"]["mfu"] is None  # no peak FLOP/s known for a CPU


@pytest.mark.slow
def test_the_end_to_end_run_goes_through_every_phase_and_its_export_reloads_at_the_predicted_size(tmp_path):
    """The 8B config's path on a tiny random Llama on CPU: both fits, every phase timed, the export reloaded."""
    out = tmp_path / "end-to-end.json"
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    script = ROOT / "benchmarks" / "speed" / "end_to_end.py"
    tailored = ["--data.batch_size", "2", "--data.seq_len", "128", "--trainer.accelerator", "cpu",
                "--trainer.precision", "32"]  # fmt: skip
    command = [sys.executable, str(script), "--architecture", "tiny", "--steps", "10", "--device", "cpu",
               "--work", str(tmp_path / "work"), "--out", str(out), "--", *tailored]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    document = json.loads(out.read_text())
    assert set(document["sides"]["lora"]) == {"tuning"}
    assert set(document["sides"]["tailored"]) == {"warmup", "control", "recovery"}
    assert sum(phase["steps"] for phase in document["sides"]["tailored"].values()) == 10
    assert all(phase["step_time_ratio_vs_lora"] > 0 for phase in document["sides"]["tailored"].values())
    export = document["export"]
    assert export["equal"] and export["parameters"] < document["parameters"] and export["logits_finite"]
    assert document["memory_arithmetic_at_largest_step"] is None  # the tiny shape is not one of its models
