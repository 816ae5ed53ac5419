"""Exact pruning on the real SmolLM2-135M-Instruct (the embedded default). Slow: run with ``pytest -m slow``."""

from __future__ import annotations

import pytest
import torch
from helpers import EXACT_FP32, ROUNDING_FACTOR, load_in_fresh_process

from tailored.core.exactness import rounding_sensitivity
from tailored.core.export import pruning_report, save_pruned
from tailored.core.masking import GateHooks
from tailored.core.prune import prune_model
from tailored.core.shapes import UniformShape, fit_channels, shape_gates
from tailored.core.structure import GateValues, describe
from tailored.models import EMBEDDED_SMOLLM2, load_model, load_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model(EMBEDDED_SMOLLM2), load_tokenizer(EMBEDDED_SMOLLM2)


@pytest.fixture(scope="module")
def prompt(smollm2) -> torch.Tensor:
    _, tokenizer = smollm2
    return tokenizer(
        ["The patient was given 5 mg of", "A bill to amend the Internal Revenue Code"],
        return_tensors="pt",
        padding=True,
    )["input_ids"][:, :8]


def random_gate_pattern(structure) -> GateValues:
    """A fixed non-uniform pattern: soft values, pruned groups/channels/hidden dims, a removed layer and blocks."""
    generator = torch.Generator().manual_seed(0)

    def soft_or_zero(shape, drop):
        value = torch.rand(shape, generator=generator)
        return torch.where(value < drop, 0.0, 0.5 + value / 2)

    gates = GateValues.ones(structure)
    gates.groups = soft_or_zero(gates.groups.shape, 0.3)
    gates.channels = soft_or_zero(gates.channels.shape, 0.4)
    gates.hidden[torch.randperm(structure.hidden_size, generator=generator)[:100]] = 0
    gates.layers[7] = 0
    gates.attn[0] = 0
    gates.mlp[12] = 0
    return gates


def test_pruned_smollm2_equals_masked_smollm2(smollm2, prompt):
    model, _ = smollm2
    structure = describe(model)
    gates = random_gate_pattern(structure)
    hooks = GateHooks(model)
    with torch.no_grad(), hooks.applied(gates):
        masked = model(prompt).logits
        masked_tokens = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False
        )
    hooks.remove()
    pruned = prune_model(model, gates)
    with torch.no_grad():
        logits = pruned(prompt).logits
    # 30 layers deep, logits up to ~30: one ulp of noise per block moves them by ~1e-4, and so does the pruning
    difference = (logits - masked).abs().max().item()
    assert difference <= max(EXACT_FP32, ROUNDING_FACTOR * rounding_sensitivity(model, gates, prompt))
    assert sum(p.numel() for p in pruned.parameters()) == pruning_report(structure, gates)["parameters"]["after"]
    tokens = pruned.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    assert torch.equal(tokens, masked_tokens)


def test_half_size_uniform_smollm2_reloads_with_plain_transformers(smollm2, prompt, tmp_path):
    model, tokenizer = smollm2
    structure = describe(model)
    dense = sum(p.numel() for p in model.parameters())
    shape = fit_channels(structure, UniformShape(groups=2, channels=1, hidden=384, layers=30), dense // 2, 64)
    scores = GateValues.ones(structure).map(
        lambda value: torch.rand(value.shape, generator=torch.Generator().manual_seed(1))
    )
    gates = shape_gates(structure, shape, scores)
    pruned = prune_model(model, gates)
    report = pruning_report(structure, gates, source=EMBEDDED_SMOLLM2)
    assert report["format"] == "stock" and 0.45 < report["parameters"]["kept_fraction"] < 0.55
    path = save_pruned(pruned, tmp_path / "smollm2-half", tokenizer=tokenizer, report=report)
    with torch.no_grad():
        logits = pruned(prompt).logits
    generated = pruned.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False)
    loaded = load_in_fresh_process(path, "transformers", prompt, tmp_path)
    assert loaded["class"] == "LlamaForCausalLM"
    assert torch.equal(loaded["logits"], logits)
    assert torch.equal(loaded["generated"], generated)
    assert loaded["count"] == report["parameters"]["after"]
