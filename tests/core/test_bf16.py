"""bf16 base weights: gates, generator and multipliers stay float32, surgery rounds once, a fit trains.

The exactness bound follows :mod:`tailored.core.exactness`: the masked and pruned bf16 models differ by rounding, and
:func:`rounding_sensitivity` measures (with bf16's ulp, 2**-7) how far one ulp of noise at every block output moves
the masked logits. ``BF16_ROUNDING_FACTOR`` of that is the tolerance; a wrong slice is far above it.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from helpers import BF16_ROUNDING_FACTOR, with_lora, write_config
from transformers import AutoModelForCausalLM

from tailored.cli import run
from tailored.core.exactness import masked_logits, rounding_sensitivity
from tailored.core.gates import PruningGates
from tailored.core.generator import DecisionGenerator
from tailored.core.prune import base_layer, prune_model
from tailored.core.structure import GateValues, describe
from tailored.core.targets import resolve_target


def bf16_model(seed: int = 0, family: str = "llama"):
    """A tiny random model in bf16 with fp32 LoRA adapters (peft's default for a bf16 base), random B."""
    model = tiny_model(family, num_layers=3, head_dim=8, intermediate_size=32, seed=seed, weight_std=0.1, bias=True)
    return with_lora(model.to(torch.bfloat16))


def soft_gates(model, seed: int = 0) -> GateValues:
    """Soft values in (0.1, 1] for every unit, KV group 0 and every third channel removed, a quarter of the hidden
    dims removed."""
    structure = describe(model)
    generator = torch.Generator().manual_seed(seed)
    gates = GateValues.ones(structure).map(lambda value: torch.rand(value.shape, generator=generator) * 0.9 + 0.1)
    gates.groups[:, 0] = 0
    gates.channels[:, ::3] = 0
    gates.hidden = (torch.rand(structure.hidden_size, generator=generator) > 0.25).float()
    return gates


def float32_state(gates: torch.nn.Module) -> dict[str, torch.dtype]:
    """The dtype of every floating tensor of ``gates`` that is not float32 (empty when all are)."""
    state = gates.state_dict()
    return {
        name: value.dtype for name, value in state.items() if value.is_floating_point() and value.dtype != torch.float32
    }


@pytest.mark.parametrize("logits", ["direct", "generator"])
def test_gates_stay_float32_under_a_bf16_default_dtype_and_casts(logits):
    structure = describe(tiny_model())
    target = resolve_target(structure, ("groups", "channels"), 0.6, None, True, round_to=1)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # what Lightning's bf16-true does while configure_model builds them
    try:
        gates = PruningGates(structure, ("groups", "channels"), target, logits)
    finally:
        torch.set_default_dtype(default)
    before = {name: value.clone() for name, value in gates.state_dict().items()}
    assert float32_state(gates) == {}
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double(), lambda m: m.bfloat16()):
        cast(gates)
        assert float32_state(gates) == {}
    for name, value in gates.state_dict().items():  # dropped casts, not round trips: nothing was rounded
        assert torch.equal(value, before[name]), name
    assert gates.to("meta").lambda_1.device.type == "meta"  # moves still apply


def test_generator_logits_are_float32_under_autocast():
    structure = describe(tiny_model())
    generator = DecisionGenerator(structure, ("groups", "channels"), 5.0, 0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = generator()
    assert {value.dtype for value in logits.values()} == {torch.float32}
    torch.testing.assert_close(logits, generator(), rtol=0, atol=0)


def test_bf16_surgery_merges_and_folds_in_float32_and_rounds_once():
    model = bf16_model()
    structure = describe(model)
    gates = soft_gates(model).map(torch.ones_like)
    gates.groups = torch.tensor([[0.3, 0.7]] * structure.num_layers)
    gates.attn = torch.full((structure.num_layers,), 0.9)
    pruned = prune_model(model, gates)
    attention = model.get_base_model().model.layers[0].self_attn
    columns = gates.groups[0].repeat_interleave(structure.n_rep * structure.head_dim) * 0.9
    for name, scale in (("q_proj", torch.ones_like(columns[:1])), ("o_proj", columns)):
        module = getattr(attention, name)
        weight = base_layer(module).weight.float() + module.get_delta_weight("default").float()
        once = (weight * scale[None, :]).to(torch.bfloat16)
        twice = (weight.to(torch.bfloat16).float() * scale[None, :]).to(torch.bfloat16)  # merged in bf16, then folded
        result = getattr(pruned.model.layers[0].self_attn, name).weight
        assert result.dtype == torch.bfloat16 and torch.equal(result, once), name
    assert not torch.equal(once, twice)  # the check above can tell the two roundings apart


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruned_bf16_model_equals_masked_bf16_model_within_bf16_rounding(family, seed, tokens):
    model = bf16_model(seed, family)
    gates = soft_gates(model, seed)
    masked = masked_logits(model, gates, tokens).float()
    tolerance = BF16_ROUNDING_FACTOR * rounding_sensitivity(model, gates, tokens)
    with torch.no_grad():
        pruned = prune_model(model, gates)
        difference = (pruned(tokens).logits.float() - masked).abs().max().item()
        assert pruned.dtype == torch.bfloat16
        assert difference <= tolerance, f"{difference=:.3e}, {tolerance=:.3e}"
        wrong = gates.map(torch.clone)
        wrong.groups[:, :2] = wrong.groups[:, :2].flip(-1)  # keeps KV group 0 instead of group 1: a wrong slice
        wrong_difference = (prune_model(model, wrong)(tokens).logits.float() - masked).abs().max().item()
    assert wrong_difference > tolerance, f"{wrong_difference=:.3e}, {tolerance=:.3e}"


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_fit_with_bf16_weights_trains_float32_gates(precision, tmp_path, tiny_model_dir, tiny_text):
    """``--model.dtype bfloat16``: weights bf16, gates, generator inputs and multipliers float32 (also under
    Lightning's bf16-true, which casts the whole module), through the prune-now transition to a bf16 export."""
    trainer = {"accelerator": "cpu", "precision": precision, "max_steps": 10, "limit_val_batches": 0}
    trainer |= {"default_root_dir": str(tmp_path / "run"), "enable_progress_bar": False}
    config = write_config(tmp_path / "bf16.yaml", tiny_model_dir, tiny_text, trainer=trainer)
    run(["fit", "-c", str(config), "--model.dtype", "bfloat16", "--checkpoint.every_n_train_steps", "5"])
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    state = checkpoint["state_dict"]
    gates = {name: value for name, value in state.items() if name.startswith("gates.") and value.is_floating_point()}
    assert gates and {value.dtype for value in gates.values()} == {torch.float32}
    assert not torch.equal(state["gates.lambda_1"], torch.zeros_like(state["gates.lambda_1"]))  # they trained
    export = next((tmp_path / "run").rglob("export/config.json")).parent
    assert AutoModelForCausalLM.from_pretrained(export).dtype == torch.bfloat16
