"""Memory per GPU of ``tailored fit`` on Llama-3-8B and a 1B Llama, worked out by arithmetic: nothing is measured.

    python benchmarks/speed/memory_arithmetic.py   # configs/llama3-8b-medical.yaml -> benchmarks/results/memory.json
    python benchmarks/speed/memory_arithmetic.py --config configs/medical.yaml --out /tmp/memory.json

Every figure is a sum of tensor sizes per GPU, in GiB, for the config's training settings (LoRA rank and targets,
pruned units and target, ``data.batch_size`` x ``data.seq_len`` tokens per GPU and step) with bf16 base weights,
on DDP and FSDP with 1 and 8 GPUs, with and without activation checkpointing. Terms (N GPUs, P base parameters,
P_layer per decoder layer, P_root outside the layers, T tokens per GPU and step, L layers, V vocabulary)::

    weights       2 P               bf16, frozen                                      FSDP: / N
    trainable     16 per parameter  fp32 value, gradient and AdamW's two moments     FSDP: LoRA / N
                                    (LoRA, gate logits, multipliers; gates stay whole on every GPU)
    buffers       4 per entry       frozen gates, importance prior (fp32)
    ddp_buckets   4 per trainable   DDP's gradient buckets (N > 1; one GPU runs without DDP)
    fsdp_gather   2 (2 P_layer + P_root)   FSDP: a layer gathered in bf16 while the next is prefetched, and the
                                    root's embedding, final norm and lm_head (per-layer fully_shard, then the root)
    activations   T L A             without checkpointing
                  T (2 d L + A)     with it: every layer's bf16 input, and one layer recomputed in the backward
    head          8 d T + 16 C V    the chunked losses (tailored/core/losses.py): the final RMSNorm's fp32
                                    input (4 d), the bf16 hidden states the head reads and their gradient, computed
                                    in the forward (2 d + 2 d); four fp32 [C, V] temporaries of one chunk of
                                    C = CHUNK_ELEMENTS // V positions (logits, log-softmax, softmax, its cast)

A is what autograd keeps per token for one decoder layer in the masked training forward (bf16 activations; frozen
base weights, which keep no input; peft's fp32 adapters, fed an fp32 copy of their input; SDPA/flash attention,
which keeps q, k, v, its output and a log-sum-exp per head instead of the T x T scores; k and v at their H_kv
heads, as with SDPA's ``enable_gqa``)::

    attention  4 d   input RMSNorm's fp32 copy of its input
               2 (d_q + 2 d_kv) + 2 d_q + 4 H      q, k, v after RoPE; attention output; log-sum-exp
               2 d_q + 2 d   o_proj's input and output, kept by the KV-group and block gate products
    MLP        4 d + 2 (3 f)  post-attention RMSNorm; gate and up outputs, SiLU output
               2 f + 2 d     down_proj's input and output, kept by the channel and block gate products
    LoRA       4 in + 4 r    per adapted projection: its fp32 input, and A's output

(d hidden size, H query heads, d_q = H head_dim, d_kv = H_kv head_dim, f MLP width, r LoRA rank; the accounting of
Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models", 2022, section 4, redone for
this layer.) Not counted: the CUDA context and allocator slack (add 1 to 3 GiB), buffers inside kernels, the
backward's transient gradients, the evaluation's KV cache, and the prune-now transition (it runs between steps,
when activations are freed, and briefly holds the dense and the pruned weights).
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import sys
from dataclasses import asdict
from pathlib import Path

import yaml
from transformers import LlamaConfig

from tailored.core.gates import PruningGates
from tailored.core.structure import GateValues, ModelStructure, parameter_count, structure_from_config
from tailored.core.targets import resolve_target
from tailored.data.datamodule import DomainData
from tailored.train.settings import LoraSettings, PruningSettings, head_bytes

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30
MODELS = {
    "meta-llama/Meta-Llama-3-8B": {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
    },
    "meta-llama/Llama-3.2-1B": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": True,
    },
}
"""The published shapes (``config.json``) of the two models, as :class:`transformers.LlamaConfig` arguments."""
STRATEGIES = ("ddp", "fsdp")
GPU_COUNTS = (1, 8)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/llama3-8b-medical.yaml", help="tailored fit config to read")
    parser.add_argument("--out", default="benchmarks/results/memory.json", help="JSON written here")
    return parser.parse_args(argv)


def training_settings(config_path: Path) -> dict:
    """The settings memory depends on, read from a ``tailored fit`` config (the code's defaults where it is silent)."""
    config = yaml.safe_load(config_path.read_text())
    model, data = config.get("model", {}), config.get("data", {})
    lora = LoraSettings(**model.get("lora", {}))
    pruning = PruningSettings(**model.get("pruning", {}))
    data_defaults = inspect.signature(DomainData).parameters
    return {
        "seq_len": data.get("seq_len", data_defaults["seq_len"].default),
        "batch_size": data.get("batch_size", data_defaults["batch_size"].default),
        "lora_rank": lora.rank,
        "lora_targets": lora.targets,
        "pruning": {"units": pruning.units, "target": pruning.target, "round_to": pruning.round_to},
    }


def projection_shapes(structure: ModelStructure) -> dict[str, tuple[int, int]]:
    """``(in_features, out_features)`` of every projection of a decoder layer."""
    d, f = structure.hidden_size, structure.intermediate_size
    d_q, d_kv = structure.num_heads * structure.head_dim, structure.num_kv_heads * structure.head_dim
    return {
        "q_proj": (d, d_q),
        "k_proj": (d, d_kv),
        "v_proj": (d, d_kv),
        "o_proj": (d_q, d),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "down_proj": (f, d),
    }


def layer_activation_bytes(structure: ModelStructure, rank: int, targets: list[str]) -> int:
    """A: bytes autograd keeps per token for one decoder layer (module docstring)."""
    d, f, H = structure.hidden_size, structure.intermediate_size, structure.num_heads
    d_q, d_kv = H * structure.head_dim, structure.num_kv_heads * structure.head_dim
    attention = 4 * d + 2 * (d_q + 2 * d_kv) + 2 * d_q + 4 * H + 2 * d_q + 2 * d
    mlp = 4 * d + 2 * 3 * f + 2 * f + 2 * d
    lora = sum(4 * projection_shapes(structure)[name][0] + 4 * rank for name in targets)
    return attention + mlp + lora


def model_sizes(shape: dict, settings: dict) -> dict:
    """Parameter, trainable and activation sizes of one model (``shape``: LlamaConfig arguments, as in
    :data:`MODELS`) under ``settings``, from the project's own counts."""
    structure = structure_from_config(LlamaConfig(**shape))
    dense = GateValues.ones(structure, device="cpu")
    total = int(parameter_count(structure, dense))
    root = int(parameter_count(structure, GateValues(**{**dict(dense.items()), "layers": dense.layers * 0})))
    rank, targets = settings["lora_rank"], settings["lora_targets"]
    lora = structure.num_layers * sum(rank * sum(projection_shapes(structure)[t]) for t in targets)
    pruning = settings["pruning"]
    units = tuple(pruning["units"])
    target = resolve_target(structure, units, pruning["target"], None, True, pruning["round_to"])
    gates = PruningGates(structure, units, target)
    return {
        "structure": asdict(structure),
        "parameters": total,
        "parameters_per_layer": (total - root) // structure.num_layers,
        "parameters_outside_layers": root,
        "lora_parameters": lora,
        "gate_parameters": sum(p.numel() for p in gates.parameters()),
        "gate_buffer_entries": sum(b.numel() for b in gates.buffers() if b.is_floating_point()),
        "target_shape": asdict(target.shape),
        "activation_bytes_per_token_per_layer": layer_activation_bytes(structure, rank, targets),
    }


def per_gpu_bytes(sizes: dict, tokens: int, strategy: str, gpus: int, checkpointing: bool) -> dict[str, float]:
    """Each term of the module docstring, in bytes per GPU."""
    structure = sizes["structure"]
    shard = gpus if strategy == "fsdp" else 1
    layers, layer_bytes = structure["num_layers"], sizes["activation_bytes_per_token_per_layer"]
    kept_inputs = 2 * structure["hidden_size"] * layers + layer_bytes if checkpointing else layers * layer_bytes
    gather = 2 * (2 * sizes["parameters_per_layer"] + sizes["parameters_outside_layers"])
    trainable = sizes["lora_parameters"] + sizes["gate_parameters"]
    return {
        "weights": 2 * sizes["parameters"] / shard,
        "trainable": 16 * sizes["lora_parameters"] / shard + 16 * sizes["gate_parameters"],
        "buffers": 4 * sizes["gate_buffer_entries"],
        "ddp_buckets": 4 * trainable if strategy == "ddp" and gpus > 1 else 0,
        "fsdp_gather": gather if strategy == "fsdp" else 0,
        "activations": tokens * kept_inputs,
        "head": head_bytes(tokens, structure["hidden_size"], structure["vocab_size"], distill=False),
    }


def rows(models: dict[str, dict], tokens: int) -> list[dict]:
    """One row per model, strategy, GPU count and checkpointing setting, in GiB."""
    table = []
    for name, strategy, gpus, checkpointing in itertools.product(models, STRATEGIES, GPU_COUNTS, (False, True)):
        terms = per_gpu_bytes(models[name], tokens, strategy, gpus, checkpointing)
        table.append(
            {"model": name, "strategy": strategy, "gpus": gpus, "checkpointing": checkpointing}
            | {"gib": {term: round(value / GIB, 3) for term, value in terms.items()}}
            | {"total_gib": round(sum(terms.values()) / GIB, 2)}
        )
    return table


def markdown(table: list[dict]) -> str:
    """The README table: one line per model, strategy and GPU count; totals without and with checkpointing."""
    lines = [
        "| model | strategy | GPUs | weights (FSDP: shard + gathered) | LoRA + gates + AdamW "
        "| activations + logits, no checkpointing | with checkpointing | total, no checkpointing "
        "| total, checkpointing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for plain, checkpointed in zip(table[::2], table[1::2], strict=True):
        gib, ckpt = plain["gib"], checkpointed["gib"]
        lines.append(
            f"| {plain['model'].split('/')[-1]} | {plain['strategy'].upper()} | {plain['gpus']} "
            f"| {gib['weights'] + gib['fsdp_gather']:.1f} | {gib['trainable'] + gib['ddp_buckets']:.2f} "
            f"| {gib['activations'] + gib['head']:.1f} | {ckpt['activations'] + ckpt['head']:.1f} "
            f"| {plain['total_gib']:.1f} | {checkpointed['total_gib']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config = Path(args.config)
    settings = training_settings(config if config.is_absolute() else ROOT / config)
    tokens = settings["seq_len"] * settings["batch_size"]
    models = {name: model_sizes(shape, settings) for name, shape in MODELS.items()}
    command = "python benchmarks/speed/memory_arithmetic.py" + "".join(f" {arg}" for arg in (argv or []))
    document = {
        "measured": False,
        "note": "arithmetic, not measured: sums of tensor sizes per GPU (see the script's docstring)",
        "command": command,
        "config": args.config,
        "settings": settings | {"tokens_per_gpu_and_step": tokens},
        "models": models,
        "rows": rows(models, tokens),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(markdown(document["rows"]))
    return document


if __name__ == "__main__":
    main(sys.argv[1:])
