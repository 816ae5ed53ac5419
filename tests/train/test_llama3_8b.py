"""Llama-3-8B without a GPU: ``configs/llama3-8b-medical.yaml`` on the meta device (the project's path from config
to target, LoRA, gates, optimiser groups and surgery at the real size, with shapes and no weights), and the memory
arithmetic of ``benchmarks/speed/memory_arithmetic.py`` behind the README's Memory table.

The config names ``meta-llama/Meta-Llama-3-8B``, whose ``config.json`` needs a login and a network. The test writes
that model's published shape (``benchmarks/speed/memory_arithmetic.py``'s ``MODELS``) to a folder, which
``TailoredModule`` reads as it would the hub's, and ``configure_model`` loads the model on the meta device instead
of reading weights. Everything after that is the project's own code.
"""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
import yaml
from helpers import ROOT
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

import tailored.train.module
from tailored.core.export import pruning_report
from tailored.core.prune import is_stock_layout, plan_pruning, prune_model
from tailored.core.shapes import UniformShape, shape_parameter_count
from tailored.core.structure import GateValues, parameter_count
from tailored.core.vocabulary import trim_model
from tailored.train.module import TailoredModule
from tailored.train.settings import LoraSettings, OptimizerSettings, PruningSettings

spec = importlib.util.spec_from_file_location(
    "memory_arithmetic", ROOT / "benchmarks" / "speed" / "memory_arithmetic.py"
)
memory_arithmetic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory_arithmetic)

CONFIG = ROOT / "configs" / "llama3-8b-medical.yaml"
LLAMA3_8B_PARAMETERS = 8_030_261_248
"""``sum(p.numel())`` of Llama-3-8B: 8.03B (untied embeddings, 32 layers of 218,112,000)."""
TARGET_SHAPE = UniformShape(groups=4, channels=8960, hidden=4096, layers=32)
"""The config's target (0.6 of the prunable parameters, KV groups and channels, channels a multiple of 64)."""
PRUNED_PARAMETERS = 5_245_243_392


def meta_model(name: str, dtype: torch.dtype):
    """``tailored.models.load_model`` without weights: the model ``name``'s config describes, on the meta device."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name), dtype=dtype).eval()


@pytest.fixture(scope="module")
def module(tmp_path_factory) -> TailoredModule:
    """The config's TailoredModule after ``configure_model``, its model on the meta device."""
    settings = yaml.safe_load(CONFIG.read_text())["model"]
    assert settings["model"] == "meta-llama/Meta-Llama-3-8B"
    folder = tmp_path_factory.mktemp("Meta-Llama-3-8B")
    LlamaConfig(**memory_arithmetic.MODELS[settings["model"]]).save_pretrained(folder)
    module = TailoredModule(
        model=str(folder),
        dtype=settings["dtype"],
        lora=LoraSettings(**settings["lora"]),
        pruning=PruningSettings(**settings["pruning"]),
        optimizer=OptimizerSettings(**settings["optimizer"]),
        gradient_checkpointing=settings["gradient_checkpointing"],
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tailored.train.module, "load_model", meta_model)
        module.configure_model()
    return module


def test_the_config_resolves_its_target_shape_before_any_weight(module):
    assert module.target.shape == TARGET_SHAPE
    assert shape_parameter_count(module.structure_hint, TARGET_SHAPE) == PRUNED_PARAMETERS
    assert module.structure == module.structure_hint  # the model built agrees with the config read before it


def test_the_meta_model_has_llama3_8b_size_in_bf16_with_float32_lora_and_gates(module):
    base = module.model.get_base_model()
    weights = [p for name, p in base.named_parameters() if "lora_" not in name]
    assert sum(p.numel() for p in weights) == LLAMA3_8B_PARAMETERS
    assert int(parameter_count(module.structure, GateValues.ones(module.structure))) == LLAMA3_8B_PARAMETERS
    assert {(p.device.type, p.dtype, p.requires_grad) for p in weights} == {("meta", torch.bfloat16, False)}
    lora = [p for name, p in module.model.named_parameters() if "lora_" in name]
    assert sum(p.numel() for p in lora) == 20_971_520  # rank 8 on 7 projections of 32 layers
    assert {(p.dtype, p.requires_grad) for p in lora} == {(torch.float32, True)}
    assert {value.dtype for value in module.gates.state_dict().values() if value.is_floating_point()} == {torch.float32}
    assert module.gates.log_alpha["groups"].shape == (32, 8)
    assert module.gates.log_alpha["channels"].shape == (32, 14336)


def test_the_optimiser_groups_hold_lora_gates_and_multipliers(module, capsys):
    groups = {group["name"]: group["params"] for group in module.configure_optimizers().param_groups}
    sizes = {name: sum(p.numel() for p in params) for name, params in groups.items()}
    assert sizes == {"tuned": 20_971_520, "gates": 32 * (8 + 14336), "multipliers": 2 * 64}  # 64 constraints
    assert "optimiser group tuned" in capsys.readouterr().out


def test_gates_on_meta_and_surgery_of_the_meta_model_give_the_target_shape(module):
    on_meta = copy.deepcopy(module.gates).to("meta").target_gates()
    assert {value.device.type for _, value in on_meta.items()} == {"meta"}
    gates = module.gates.target_gates()  # on the CPU: surgery plans on values, then slices the meta weights
    assert [int(count) for count in gates.kept().groups.sum(-1)] == [TARGET_SHAPE.groups] * 32
    assert int(parameter_count(module.structure, gates.kept())) == PRUNED_PARAMETERS
    pruned = prune_model(module.model, gates)
    assert sum(p.numel() for p in pruned.parameters()) == PRUNED_PARAMETERS
    assert {(p.device.type, p.dtype) for p in pruned.parameters()} == {("meta", torch.bfloat16)}
    assert [layer.self_attn.k_proj.out_features // 128 for layer in pruned.model.layers] == [4] * 32
    assert [layer.mlp.down_proj.in_features for layer in pruned.model.layers] == [8960] * 32
    # 4 KV groups are 16 query heads, a divisor of the hidden size (4096) as Llama's config needs (5 groups, the
    # unrounded share, would not be): the export is the stock LlamaForCausalLM the config's header promises
    plan = plan_pruning(module.structure, gates)
    assert plan.uniform and is_stock_layout(module.structure, plan)
    assert type(pruned).__name__ == "LlamaForCausalLM"


def test_memory_arithmetic_writes_the_table_the_readme_shows(tmp_path, capsys):
    document = memory_arithmetic.main(["--out", str(tmp_path / "memory.json")])
    assert json.loads((tmp_path / "memory.json").read_text()) == document and document["measured"] is False
    models = document["models"]
    assert models["meta-llama/Meta-Llama-3-8B"]["parameters"] == LLAMA3_8B_PARAMETERS
    assert models["meta-llama/Llama-3.2-1B"]["parameters"] == 1_235_814_400  # tied embeddings counted once
    assert models["meta-llama/Meta-Llama-3-8B"]["target_shape"] == vars(TARGET_SHAPE)
    total = {(r["model"], r["strategy"], r["gpus"], r["checkpointing"]): r["total_gib"] for r in document["rows"]}
    assert len(total) == 2 * 2 * 2 * 2
    for model in memory_arithmetic.MODELS:
        assert total[model, "fsdp", 8, True] < total[model, "ddp", 8, True] < total[model, "ddp", 8, False]
    eight_b = next(r for r in document["rows"] if r["model"].endswith("8B") and r["gpus"] == 1)
    assert eight_b["gib"]["weights"] == round(2 * LLAMA3_8B_PARAMETERS / 2**30, 3)  # bf16
    table = capsys.readouterr().out.strip()
    committed = json.loads((ROOT / "benchmarks" / "results" / "memory.json").read_text())
    assert committed["rows"] == document["rows"] and table in (ROOT / "docs" / "performance.md").read_text()


DOMAIN_VOCABULARY = 30_000
"""A domain vocabulary of 30k of Llama 3's 128,256 tokens (pruning.vocabulary; docs/vocabulary.md)."""


def test_a_30k_token_domain_vocabulary_is_counted_exactly_on_the_meta_model(module):
    gates = module.gates.target_gates()
    pruned = trim_model(prune_model(module.model, gates), list(range(DOMAIN_VOCABULARY)))
    report = pruning_report(module.structure, gates, kept_tokens=DOMAIN_VOCABULARY)
    removed = (128_256 - DOMAIN_VOCABULARY) * 4096 * 2  # untied: embedding and lm_head rows
    assert report["vocabulary"] == {"before": 128_256, "after": DOMAIN_VOCABULARY, "parameters_removed": removed}
    assert sum(p.numel() for p in pruned.parameters()) == report["parameters"]["after"] == 4_440_330_240
    assert report["parameters"]["after"] == PRUNED_PARAMETERS - removed
    assert pruned.config.vocab_size == DOMAIN_VOCABULARY and pruned.lm_head.weight.device.type == "meta"
