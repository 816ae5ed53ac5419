"""Prune SmolLM2-135M uniformly to a parameter fraction, check exactness, export, reload, and time the forward pass.

    python benchmarks/speed/pruned_speed.py                      # 50% of the parameters, exported to exports/
    python benchmarks/speed/pruned_speed.py --fraction 0.7 --hidden 576

The units kept are chosen at random (seeded): this measures size and speed, not quality. Times are medians of
interleaved repeats of the dense and the pruned model in the same process; only their ratio is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tailored.core.exactness import masked_logits, rounding_sensitivity
from tailored.core.export import pruning_report, save_pruned
from tailored.core.prune import prune_model
from tailored.core.shapes import UniformShape, fit_channels, shape_gates, shape_parameter_count
from tailored.core.structure import GateValues, describe
from tailored.models import EMBEDDED_SMOLLM2, load_model, load_tokenizer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_SMOLLM2, help="model folder, hub name or the embedded default")
    parser.add_argument("--fraction", type=float, default=0.5, help="kept fraction of all parameters")
    parser.add_argument("--groups", type=int, default=2, help="KV groups kept per layer")
    parser.add_argument("--hidden", type=int, default=384, help="hidden dims kept")
    parser.add_argument("--multiple-of", type=int, default=64, help="round MLP channels to a multiple of this")
    parser.add_argument("--out", default="exports/smollm2-uniform", help="export folder (must not exist)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    return parser.parse_args()


def median_seconds(model, tokens: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(tokens)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    structure = describe(model)
    dense_count = sum(p.numel() for p in model.parameters())

    base = UniformShape(groups=args.groups, channels=1, hidden=args.hidden, layers=structure.num_layers)
    shape = fit_channels(structure, base, round(args.fraction * dense_count), args.multiple_of)
    scores = GateValues.ones(structure).map(torch.rand_like)
    gates = shape_gates(structure, shape, scores)
    print(f"shape: {shape} -> {shape_parameter_count(structure, shape) / dense_count:.1%} of {dense_count:,}")

    tokens = tokenizer(["Structured pruning removes whole heads, channels and hidden dims."], return_tensors="pt")
    tokens = tokens["input_ids"]
    masked = masked_logits(model, gates, tokens)
    pruned = prune_model(model, gates)
    with torch.no_grad():
        logits = pruned(tokens).logits
    pruned_count = sum(p.numel() for p in pruned.parameters())
    report = pruning_report(structure, gates, source=args.model)
    difference = (logits - masked).abs().max().item()
    sensitivity = rounding_sensitivity(model, gates, tokens)
    print(f"masked vs pruned logits: max abs diff {difference:.2e}; one ulp of noise moves them {sensitivity:.2e}")
    print(f"parameters: predicted {report['parameters']['after']:,}, pruned model {pruned_count:,}")

    path = save_pruned(pruned, Path(args.out), tokenizer=tokenizer, report=report)
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        same = torch.equal(reloaded(tokens).logits, logits)
    print(f"exported to {path} ({report['format']} format); plain from_pretrained reproduces logits: {same}")

    for batch, length in [(1, 128), (8, 128), (1, 512)]:
        sample = torch.randint(0, structure.vocab_size, (batch, length))
        for candidate in (model, pruned):  # warm-up
            median_seconds(candidate, sample)
        dense, small = [], []
        for _ in range(args.repeats):
            dense.append(median_seconds(model, sample))
            small.append(median_seconds(pruned, sample))
        ratio = statistics.median(dense) / statistics.median(small)
        print(f"forward batch {batch} x {length} tokens: pruned is {ratio:.2f}x faster than dense")


if __name__ == "__main__":
    main()
