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
