"""Speed and memory of tailored, each figure a ratio against a baseline measured in the same process.

    OMP_NUM_THREADS=1 python benchmarks/speed/speed.py         # CPU, SmolLM2-135M: writes benchmarks/results/speed.json
    python benchmarks/speed/speed.py --device cuda              # bf16, plus training tokens/s and MFU of a ~1B Llama
    python benchmarks/speed/speed.py --smoke --out /tmp/s.json  # seconds, tiny random Llama (what the CI test runs)
    python benchmarks/speed/speed.py --only train export        # some sections (the JSON then holds only those)
    python benchmarks/speed/speed.py --only train --compile --out benchmarks/results/speed-compile-cpu.json

Sections (each module's docstring says how it measures):

    train       one optimiser step of tailored (gates + Lagrangian + LoRA; and with distillation) against plain
                peft LoRA: time and peak-memory ratios, and where a profiled step spends the difference; and
                tailored's tokens of real data per second on the medical config's batches, packed against padded
                (speed_train.py)
    pruned      the dense model against its exports at 30% and 50% fewer prunable parameters, round_to 8 and 64:
                prefill and decode tokens/s next to the ideal speed-up from FLOPs (speed_inference.py)
    export      seconds and peak memory of surgery + save, and their growth with width (speed_export.py)
    throughput  training tokens/s and model FLOPs utilisation of a random ~1.1B Llama on the GPU; without one,
                only ``--smoke`` runs it (on CPU, tiny) so the path stays tested (speed_train.py)

Times are medians over repeats in which the compared runs alternate (drift and order cancel). Memory is the peak of
tensor bytes (speed_measure.py). The headline keys and the targets they are held to are at the top of the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch
import transformers
from speed_export import measure_export, measure_scaling
from speed_inference import measure_inference, worst_prefill_vs_ideal
from speed_measure import random_llama
from speed_train import ONE_B, SIDES, measure_packing, measure_throughput, measure_training

from tailored.models import EMBEDDED_SMOLLM2, load_model

ROOT = Path(__file__).resolve().parents[2]
MEDICAL = ROOT / "configs" / "medical.yaml"
"""Its tasks mix 192-token PubMedQA rows and abstract blocks with shorter HQS rows: the packing figure's data."""
SECTIONS = ("train", "pruned", "export", "throughput")
TARGETS = {
    "train_step_time_ratio": ("<=", 1.10),
    "train_peak_memory_ratio": ("<=", 1.15),
    "train_peak_memory_ratio_distill": ("<=", 1.2),
    "prefill_speedup_vs_ideal": (">=", 0.9),
    "export_seconds_smollm2": ("<=", 5.0),
}
FULL = {
    "train_shape": (2, 256),
    "train_rounds": 8,
    "profiles": 2,
    "packing_steps": 4,
    "packing_rounds": 3,
    "cases": {
        "prefill 1x512": {"kind": "prefill", "batch": 1, "length": 512},
        "prefill 8x128": {"kind": "prefill", "batch": 8, "length": 128},
        "decode 1x64": {"kind": "decode", "batch": 1, "prompt": 32, "new_tokens": 64},
        "decode 8x64": {"kind": "decode", "batch": 8, "prompt": 32, "new_tokens": 64},
    },
    "repeats": 4,
    "export_repeats": 3,
    "widths": (1, 2, 4, 8),
    "width_base": {"hidden": 128, "heads": 4, "kv_heads": 2, "intermediate": 384, "layers": 4, "vocab": 8192},
    "throughput_model": ONE_B,
    "throughput_shape": (8, 1024),
    "throughput_rounds": 6,
}
SMOKE = {
    "train_shape": (2, 16),
    "train_rounds": 1,
    "profiles": 1,
    "packing_steps": 2,
    "packing_rounds": 1,
    "cases": {
        "prefill 1x16": {"kind": "prefill", "batch": 1, "length": 16},
        "prefill 2x8": {"kind": "prefill", "batch": 2, "length": 8},
        "decode 1x4": {"kind": "decode", "batch": 1, "prompt": 4, "new_tokens": 4},
        "decode 2x4": {"kind": "decode", "batch": 2, "prompt": 4, "new_tokens": 4},
    },
    "repeats": 1,
    "export_repeats": 1,
    "widths": (1, 2),
    "width_base": {"hidden": 32, "heads": 2, "kv_heads": 2, "intermediate": 256, "layers": 2, "vocab": 128},
    "throughput_model": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": 256},
    "throughput_shape": (2, 16),
    "throughput_rounds": 1,
}
TINY = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": 256}
"""The model every section measures in ``--smoke`` mode."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", help="float32 on CPU, bfloat16 on CUDA unless given")
    parser.add_argument("--model", default=EMBEDDED_SMOLLM2, help="model of the train, pruned and export sections")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, one repeat: seconds, for CI")
    parser.add_argument(
        "--compile", nargs="?", const="inductor", help="also time tailored with model.compile (this backend)"
    )
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the built-in table")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speed.json")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return args


def machine(device: torch.device) -> dict:
    """What the figures were measured on."""
    cpu = platform.processor()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),  # other processes share the cores
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "versions": {name: version(name) for name in ("torch", "transformers", "peft", "lightning")},
    }


def run_sections(args: argparse.Namespace, settings: dict, model: str, work: Path) -> dict:
    """Every requested section's results, keyed by section."""
    device = torch.device(args.device)
    results = {}
    if "train" in args.only:
        print("train: one optimiser step, tailored vs plain LoRA", flush=True)
        rounds, shape = settings["train_rounds"], settings["train_shape"]
        sides = SIDES + (("tailored_compiled",) if args.compile else ())
        results["train"] = measure_training(
            model, args.dtype, device, shape, rounds, sides, settings["profiles"], args.compile or "inductor"
        )
        print("train: tokens of real data per second, packed vs padded medical batches", flush=True)
        steps, rounds = settings["packing_steps"], settings["packing_rounds"]
        results["train"]["packing"] = measure_packing(model, args.dtype, device, MEDICAL, steps, rounds)
    if "pruned" in args.only:
        print("pruned: dense vs pruned exports, prefill and decode", flush=True)
        dense = load_model(model, dtype=getattr(torch, args.dtype)).to(device)
        results["pruned"] = measure_inference(dense, settings["cases"], settings["repeats"], device)
        del dense
    if "export" in args.only:
        print("export: surgery + save, and its growth with width", flush=True)
        results["export"] = measure_export(model, args.dtype, device, settings["export_repeats"])
        base, repeats = settings["width_base"], settings["export_repeats"]
        results["export"]["scaling"] = measure_scaling(settings["widths"], base, args.dtype, device, repeats)
    if "throughput" in args.only:
        if device.type == "cuda" or args.smoke:
            print("throughput: training tokens/s and MFU", flush=True)
            folder, sizes, shape = work / "throughput", settings["throughput_model"], settings["throughput_shape"]
            rounds, peak = settings["throughput_rounds"], args.peak_tflops
            results["throughput"] = measure_throughput(folder, sizes, device, args.dtype, shape, rounds, peak)
        else:
            results["throughput"] = {"skipped": "needs --device cuda (its CPU fallback runs with --smoke)"}
    return results


def headline(results: dict) -> dict:
    """The figures the README quotes, each with its target and whether it is met."""
    figures = {}
    if "train" in results:
        sides = results["train"]["sides"]
        figures["train_step_time_ratio"] = sides["tailored"]["step_time_ratio"]
        figures["train_peak_memory_ratio"] = sides["tailored"]["peak_memory_ratio"]
        figures["train_step_time_ratio_distill"] = sides["tailored_distill"]["step_time_ratio"]
        figures["train_peak_memory_ratio_distill"] = sides["tailored_distill"]["peak_memory_ratio"]
        figures["packed_real_tokens_per_second_ratio"] = results["train"]["packing"]["real_tokens_per_second_ratio"]
        if "tailored_compiled" in sides:
            figures["compiled_step_time_ratio"] = sides["tailored_compiled"]["step_time_ratio_vs_tailored"]
    if "pruned" in results:
        figures["prefill_speedup_vs_ideal"] = worst_prefill_vs_ideal(results["pruned"])
    if "export" in results:
        figures["export_seconds_smollm2"] = results["export"]["seconds"]["prune_and_save"]
    figures["targets"] = {
        name: {"target": f"{sign} {bound}", "met": figures[name] <= bound if sign == "<=" else figures[name] >= bound}
        for name, (sign, bound) in TARGETS.items()
        if name in figures
    }
    return figures


def main() -> None:
    args = parse_args()
    transformers.utils.logging.disable_progress_bar()  # a bar per model load and per save
    settings = SMOKE if args.smoke else FULL
    with tempfile.TemporaryDirectory() as work:
        model = str(random_llama(Path(work) / "tiny", **TINY)) if args.smoke else args.model
        document = {
            "command": " ".join(["python benchmarks/speed/speed.py", *sys.argv[1:]]),
            "machine": machine(torch.device(args.device)),
            "device": args.device,
            "dtype": args.dtype,
            "model": "tiny random Llama" if args.smoke else model,
        }
        start = time.monotonic()
        results = run_sections(args, settings, model, Path(work))
    document["machine"]["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    document["minutes"] = round((time.monotonic() - start) / 60, 1)
    document = {**headline(results), **document, **results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps({key: value for key, value in document.items() if key not in SECTIONS}, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
