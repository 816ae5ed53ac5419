"""Pruned models against the dense one: prefill and decode tokens/s, next to the ideal speed-up from FLOPs.

Exports are made in-process the way ``tailored`` makes them: a uniform target shape for a kept fraction of the
prunable parameters (:func:`tailored.core.targets.resolve_target`), units chosen by seeded random scores (speed does
not depend on which units survive), then :func:`tailored.core.prune.prune_model`. Each shape is built with channels
(and hidden dims) rounded to ``round_to`` 8 and 64; where a target cannot be met within a point at 64, the
8-rounded shape's channels are rounded to the nearest multiple of 64 instead, so that alignment is what differs.

    prefill   one forward over [batch, length] tokens, logits for every position (scoring, training); the dense
              and each pruned model run back to back, in alternating order
    decode    ``new_tokens`` greedy single-token steps with the KV cache after a ``prompt``-token prefill (not
              timed); all models take turns at every step, so drift cancels within milliseconds

speed-up = the median over repeats of dense seconds / pruned seconds (paired as above);
ideal = dense FLOPs / pruned FLOPs of the same work (:mod:`speed_measure`, attention included);
speed-up / ideal = 1: the pruned model runs as fast as its FLOPs allow.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, replace
from functools import partial

import torch
from speed_measure import decode_flops, prefill_flops, seconds, synchronize
from torch import nn

from tailored.core.prune import prune_model
from tailored.core.shapes import UniformShape, shape_gates
from tailored.core.structure import GateValues, ModelStructure, describe, parameter_count
from tailored.core.targets import prunable_fraction, resolve_target

KEPT = (0.7, 0.5)
"""Kept fractions of the prunable parameters: 30% and 50% fewer."""
ROUND_TOS = (8, 64)
DEFAULT_ROUND_TO = 8
"""PruningSettings.round_to's default: the headline figure is measured with it."""
UNITS = ("groups", "channels")
"""What configs/quickstart.yaml prunes."""


def uniform_shape(structure: ModelStructure, fraction: float, round_to: int) -> tuple[UniformShape, str]:
    """The target shape ``tailored`` trains towards, and how it was found (see the module docstring)."""
    try:
        return resolve_target(structure, UNITS, fraction, None, True, round_to).shape, "resolve_target"
    except ValueError:
        shape = resolve_target(structure, UNITS, fraction, None, True, DEFAULT_ROUND_TO).shape
        multiple = min(round_to, structure.intermediate_size)
        channels = min(structure.intermediate_size, max(multiple, round(shape.channels / multiple) * multiple))
        return replace(shape, channels=channels), f"target missed by > 1 point at {round_to}: channels rounded"


def pruned_variants(model: nn.Module) -> dict[str, dict]:
    """``kept<fraction>-r<round_to>`` -> {"model", "shape", "kept_fraction_of_prunable", "shape_from"}."""
    structure = describe(model)
    generator = torch.Generator().manual_seed(0)
    scores = GateValues.ones(structure).map(lambda value: torch.rand(value.shape, generator=generator))
    variants = {}
    for fraction in KEPT:
        for round_to in ROUND_TOS:
            shape, found = uniform_shape(structure, fraction, round_to)
            gates = shape_gates(structure, shape, scores)
            kept = prunable_fraction(structure, UNITS, parameter_count(structure, gates.kept()))
            variants[f"kept{fraction:g}-r{round_to}"] = {
                "model": prune_model(model, gates.map(lambda value: value.to(model.device))),
                "shape": asdict(shape),
                "kept_fraction_of_prunable": round(float(kept), 4),
                "shape_from": found,
            }
    return variants


@torch.inference_mode()
def prefill(model: nn.Module, tokens: torch.Tensor) -> None:
    model(tokens, use_cache=False)


def prefill_samples(models: dict[str, nn.Module], tokens: torch.Tensor, repeats: int) -> dict[str, list[tuple]]:
    """Per pruned model, ``repeats`` pairs (dense seconds, its seconds) run back to back, the order swapped every
    repeat: slow drift falls on both halves of a pair."""
    runs = {name: partial(seconds, partial(prefill, model, tokens), tokens.device) for name, model in models.items()}
    for run in runs.values():  # warm-up
        run()
    samples: dict[str, list[tuple]] = {name: [] for name in models if name != "dense"}
    for repeat in range(repeats):
        for name in samples:
            if repeat % 2:
                mine, dense = runs[name](), runs["dense"]()
            else:
                dense, mine = runs["dense"](), runs[name]()
            samples[name].append((dense, mine))
    return samples


@torch.inference_mode()
def interleaved_decode(models: dict[str, nn.Module], prompt: torch.Tensor, new_tokens: int) -> dict[str, float]:
    """Seconds of every model's ``new_tokens`` greedy single-token steps with its KV cache, the models taking turns
    at every step (in an order rotated each step), after an untimed prefill of ``prompt`` each."""
    state = {}
    for name, model in models.items():
        output = model(prompt, use_cache=True, logits_to_keep=1)
        state[name] = (output.cache, output.logits[:, -1:].argmax(-1))
    totals = dict.fromkeys(models, 0.0)
    names = list(models)
    for step in range(new_tokens):
        for name in names[step % len(names) :] + names[: step % len(names)]:
            cache, token = state[name]
            synchronize(prompt.device)
            start = time.perf_counter()
            output = models[name](token, cache=cache, use_cache=True)
            state[name] = (cache, output.logits[:, -1:].argmax(-1))
            synchronize(prompt.device)
            totals[name] += time.perf_counter() - start
    return totals


def decode_samples(models: dict[str, nn.Module], prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """Per pruned model, ``repeats`` pairs (dense seconds, its seconds) from :func:`interleaved_decode` (one
    untimed run first)."""
    interleaved_decode(models, prompt, new_tokens)
    samples: dict[str, list[tuple]] = {name: [] for name in models if name != "dense"}
    for _ in range(repeats):
        totals = interleaved_decode(models, prompt, new_tokens)
        for name in samples:
            samples[name].append((totals["dense"], totals[name]))
    return samples


def case_samples(models: dict[str, nn.Module], case: dict, repeats: int, device: torch.device) -> dict:
    """(dense, pruned) second pairs of every pruned model for one case; the same random tokens for all models."""
    generator = torch.Generator().manual_seed(1)
    vocab = models["dense"].config.vocab_size
    if case["kind"] == "prefill":
        tokens = torch.randint(3, vocab, (case["batch"], case["length"]), generator=generator).to(device)
        return prefill_samples(models, tokens, repeats)
    prompt = torch.randint(3, vocab, (case["batch"], case["prompt"]), generator=generator).to(device)
    return decode_samples(models, prompt, case["new_tokens"], repeats)


def case_flops(config, case: dict) -> float:
    if case["kind"] == "prefill":
        return prefill_flops(config, case["batch"], case["length"])
    return decode_flops(config, case["batch"], case["prompt"], case["new_tokens"])


def measure_inference(dense: nn.Module, cases: dict[str, dict], repeats: int, device: torch.device) -> dict:
    """Tokens/s of the dense model and every pruned variant per case; speed-up = median over the pairs of dense
    seconds / pruned seconds; ideal and speed-up / ideal."""
    variants = pruned_variants(dense)
    models = {"dense": dense} | {name: variant.pop("model") for name, variant in variants.items()}
    result = {"variants": variants, "cases": {}}
    for case_name, case in cases.items():
        samples = case_samples(models, case, repeats, device)
        tokens = case["batch"] * (case["length"] if case["kind"] == "prefill" else case["new_tokens"])
        dense_seconds = statistics.median(pair[0] for pairs in samples.values() for pair in pairs)
        rows = {"dense": {"seconds": round(dense_seconds, 4), "tokens_per_second": round(tokens / dense_seconds, 1)}}
        for name, pairs in samples.items():
            mine = statistics.median(pair[1] for pair in pairs)
            speedup = statistics.median(dense / own for dense, own in pairs)
            ideal = case_flops(dense.config, case) / case_flops(models[name].config, case)
            rows[name] = {
                "seconds": round(mine, 4),
                "tokens_per_second": round(tokens / mine, 1),
                "speedup": round(speedup, 3),
                "speedup_each_pair": [round(dense / own, 3) for dense, own in pairs],
                "ideal_speedup": round(ideal, 3),
                "speedup_vs_ideal": round(speedup / ideal, 3),
            }
        result["cases"][case_name] = case | {"models": rows}
    return result


def worst_prefill_vs_ideal(result: dict, kept: float = KEPT[-1], round_to: int = DEFAULT_ROUND_TO) -> float:
    """The lowest speed-up / ideal over the prefill cases, for the variant the headline quotes."""
    name = f"kept{kept:g}-r{round_to}"
    return min(
        case["models"][name]["speedup_vs_ideal"] for case in result["cases"].values() if case["kind"] == "prefill"
    )
