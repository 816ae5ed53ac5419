"""A config's ``tailored fit`` end to end on random weights, against plain LoRA on the same data in the same run.

    python benchmarks/speed/end_to_end.py            # GPU: Llama-3-8B's shape, configs/llama3-8b-medical.yaml
    python benchmarks/speed/end_to_end.py --architecture tiny --steps 10 --out /tmp/e2e.json -- \
        --data.batch_size 2 --data.seq_len 128 --trainer.accelerator cpu --trainer.precision 32   # CPU, the test

What it runs, each a ``tailored fit`` subprocess (the command a user types, options after ``--`` appended):

1. A model folder with the architecture's published shape and random weights (:data:`ARCHITECTURES`; bf16 on a
   GPU), and the embedded SmolLM2 tokenizer (its ids fit Llama-3's larger vocabulary): nothing is downloaded.
2. ``tailored``: the config as it is, every phase in ``--steps`` steps (importance pass, warm-up, control, the
   physical transition, recovery) and the export at the end of fit.
3. ``lora``: the config with ``model.pruning null``: plain LoRA, the baseline (no export).
4. The export reloaded with :func:`tailored.models.load_model`: its parameter count against the one the gates
   predicted (``pruning_report.json``) and one forward pass.

A callback in each fit (:class:`PhaseMeter`) times every step with the device synchronised at both ends and
records, per phase, the device's peak allocated memory. The JSON has, per side and phase, the median step time,
tokens computed per second (rows x length of the step's batch: packing's tail counts) and the peak; the tailored
step-time ratio against LoRA's, per phase; MFU at 4N FLOPs a token of the decoder layers (LoRA's backward computes
no weight gradients of the frozen base, as in ``speed_train.measure_throughput``; attention scores and ``lm_head``,
which runs at predicted positions only, are not counted: a lower bound); and the README's memory arithmetic
(``memory_arithmetic.py``, one GPU, DDP) worked out at the largest batch the run saw, next to the measured peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import transformers
from memory_arithmetic import GIB, MODELS, model_sizes, per_gpu_bytes, training_settings
from speed_measure import forward_flops, parameter_count, synchronize
from speed_train import peak_tflops
from transformers import AutoModelForCausalLM, LlamaConfig

from tailored.models import EMBEDDED_SMOLLM2, load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURES = {
    "llama3-8b": MODELS["meta-llama/Meta-Llama-3-8B"],
    "tiny": {"vocab_size": 49152, "hidden_size": 128, "intermediate_size": 1024, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": False},
}  # fmt: skip
"""``transformers.LlamaConfig`` arguments: Llama-3-8B's published shape, and a tiny one for the CPU test (a shape
that meets the 8B config's target 0.6 with round_to 64)."""
SIDES = ("tailored", "lora")
"""Tailored first: a config the pruning cannot meet fails before the baseline's minutes are spent."""


class PhaseMeter(L.Callback):
    """Every training step's phase, seconds (the device synchronised at both ends) and tokens computed, and per
    phase the device's peak allocated bytes (None on CPU), written to ``path`` as JSON when fit ends. The
    synchronisation costs a little: the timed steps are a benchmark's, not a production run's."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.steps: list[dict] = []
        self.peaks: dict[str, int | None] = {}
        self.phase: str | None = None

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        phase = "tuning" if module.pruning_settings is None else module.phase()
        if phase != self.phase:
            self._close_phase(module.device)
            self.phase = phase
        synchronize(module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx) -> None:
        synchronize(module.device)
        seconds = time.perf_counter() - self._start
        step = {"step": trainer.global_step, "phase": self.phase, "seconds": seconds}
        self.steps.append(step | {"tokens": int(batch["input_ids"].numel())})

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._close_phase(module.device)
        record = {"steps": self.steps, "peak_bytes": self.peaks}
        Path(self.path).write_text(json.dumps(record, indent=1) + "\n")

    def _close_phase(self, device: torch.device) -> None:
        """Record the finished phase's peak and start the next phase's count from the memory in use."""
        if device.type != "cuda":
            self.peaks[self.phase or "start"] = None
            return
        self.peaks[self.phase or "start"] = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "llama3-8b-medical.yaml")
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="llama3-8b")
    parser.add_argument("--steps", type=int, default=40, help="trainer.max_steps of both fits (every phase fits)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the built-in table")
    parser.add_argument("--work", type=Path, help="model folder and runs (default: a temporary folder, removed)")
    parser.add_argument("--out", type=Path, help="JSON written here (default: benchmarks/results/end-to-end-<gpu>)")
    parser.add_argument("extra", nargs="*", help="options appended to both tailored fit calls, after --")
    return parser.parse_args()


def random_model(folder: Path, architecture: str, device: str) -> LlamaConfig:
    """Save a Llama of ``architecture``'s shape with random weights (bf16 on a GPU, float32 on CPU) and the
    embedded SmolLM2 tokenizer to ``folder``; return its config."""
    tokenizer = load_tokenizer(EMBEDDED_SMOLLM2)
    config = LlamaConfig(
        **ARCHITECTURES[architecture],
        max_position_embeddings=8192,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return config


def fit(side: str, args: argparse.Namespace, model: Path, work: Path) -> tuple[dict, Path | None, float]:
    """One side's ``tailored fit``; its PhaseMeter record, its export folder (None if it wrote none) and wall
    seconds."""
    record, root = work / f"{side}-steps.json", work / side
    meter = {"class_path": "end_to_end.PhaseMeter", "init_args": {"path": str(record)}}
    options = ["--model.model", str(model), "--trainer.max_steps", str(args.steps), "--trainer.limit_val_batches",
               "0", "--trainer.default_root_dir", str(root), "--trainer.callbacks+", json.dumps(meter)]  # fmt: skip
    if side == "lora":  # the baseline's merged dense model is not checked: saving it (16 GB at 8B) is skipped
        options += ["--model.pruning", "null", "--export.enabled", "false"]
    command = [sys.executable, "-m", "tailored.cli", "fit", "-c", str(args.config), *options, *args.extra]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    log = work / f"{side}.log"
    print(f"{side}: tailored fit, {args.steps} steps (log: {log})", flush=True)
    start = time.monotonic()
    with log.open("w") as output:
        done = subprocess.run(command, env=env, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        sys.exit(f"{side}: tailored fit failed (exit {done.returncode}); the last lines of {log}:\n"
                 + "\n".join(log.read_text().splitlines()[-20:]))  # fmt: skip
    exports = sorted(root.glob("lightning_logs/version_*/export"))
    return json.loads(record.read_text()), (exports[-1] if exports else None), seconds


def phases(record: dict, per_token: float, peak: float | None) -> dict:
    """Per phase: steps, median seconds a step, tokens computed per second, MFU and the peak allocated GiB. A
    phase's first step is left out of its median (compilation, the allocator's growth, the transition itself)."""
    result = {}
    for phase, peak_bytes in record["peak_bytes"].items():
        steps = [step for step in record["steps"] if step["phase"] == phase]
        if not steps:
            continue
        timed = steps[1:] or steps
        seconds = statistics.median(step["seconds"] for step in timed)
        tokens = statistics.median(step["tokens"] / step["seconds"] for step in timed)
        result[phase] = {
            "steps": len(steps),
            "median_step_seconds": round(seconds, 4),
            "tokens_per_second": round(tokens, 1),
            "mfu": None if peak is None else round(tokens * per_token / (peak * 1e12), 4),
            "peak_allocated_gib": None if peak_bytes is None else round(peak_bytes / GIB, 2),
        }
    return result


def reload_export(export: Path, device: str) -> dict:
    """Load the export as a user would, count its parameters against the report's prediction, run one forward."""
    report = json.loads((export / "pruning_report.json").read_text())
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    start = time.monotonic()
    model = load_model(str(export), dtype=dtype).to(device)
    seconds = time.monotonic() - start
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]], device=device)).logits
    counted = sum(p.numel() for p in model.parameters())
    return {
        "parameters": counted,
        "predicted": report["parameters"]["after"],
        "equal": counted == report["parameters"]["after"],
        "uniform_shape": report["uniform_shape"],
        "load_seconds": round(seconds, 1),
        "logits_finite": bool(torch.isfinite(logits).all()),
    }


def arithmetic(architecture: str, config_path: Path, tokens: int) -> dict | None:
    """The README memory table's terms for one GPU with DDP (``memory_arithmetic.py``) at ``tokens`` a step, with
    and without gradient checkpointing; None where the architecture is not one of its models."""
    names = [name for name, shape in MODELS.items() if shape == ARCHITECTURES[architecture]]
    if not names:
        return None
    sizes = model_sizes(MODELS[names[0]], training_settings(config_path))
    totals = {}
    for checkpointing in (False, True):
        terms = per_gpu_bytes(sizes, tokens, "ddp", 1, checkpointing)
        totals["checkpointing" if checkpointing else "no_checkpointing"] = round(sum(terms.values()) / GIB, 2)
    return {"model": names[0], "tokens_per_step": tokens, "total_gib": totals}


def memory_ratio(measured: dict[str, int | None]) -> float | None:
    """Tailored's peak over LoRA's; None without a device that counts allocations (CPU)."""
    return None if None in measured.values() else round(measured["tailored"] / measured["lora"], 3)


def main() -> None:
    args = parse_args()
    transformers.utils.logging.disable_progress_bar()  # a bar per save and per load
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        print(f"random {args.architecture} model: {work / 'model'}", flush=True)
        config = random_model(work / "model", args.architecture, args.device)
        records, seconds, exports = {}, {}, {}
        for side in SIDES:
            records[side], exports[side], seconds[side] = fit(side, args, work / "model", work)
        if exports["tailored"] is None:
            sys.exit("the tailored fit wrote no export (lightning_logs/version_*/export)")
        reloaded = reload_export(exports["tailored"], args.device)
    device = torch.device(args.device)
    peak = peak_tflops(device, args.peak_tflops)
    # 4N a token (forward + activation gradients) over the decoder layers: attention scores and lm_head (which the
    # chunked loss runs at predicted positions only) left out, so the MFU is a lower bound
    per_token = 2 * (forward_flops(config, 1, 0) - 2 * config.hidden_size * config.vocab_size)
    sides = {side: phases(records[side], per_token, peak) for side in SIDES}
    tuning = sides["lora"]["tuning"]["median_step_seconds"]
    for phase in sides["tailored"].values():
        phase["step_time_ratio_vs_lora"] = round(phase["median_step_seconds"] / tuning, 3)
    measured = {side: max((b for b in records[side]["peak_bytes"].values() if b is not None), default=None)
                for side in SIDES}  # fmt: skip
    largest = max(step["tokens"] for side in SIDES for step in records[side]["steps"])
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    document = {
        "command": "python benchmarks/speed/end_to_end.py " + " ".join(sys.argv[1:]),
        "config": str(args.config.resolve().relative_to(ROOT)),
        "architecture": args.architecture,
        "parameters": parameter_count(config),
        "steps": args.steps,
        "device": gpu or "cpu",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "model_flops_per_token": per_token,
        "peak_tflops": peak,
        "fit_seconds": {side: round(value, 1) for side, value in seconds.items()},
        "sides": sides,
        "peak_allocated_gib": {side: None if b is None else round(b / GIB, 2) for side, b in measured.items()},
        "peak_memory_ratio_vs_lora": memory_ratio(measured),
        "memory_arithmetic_at_largest_step": arithmetic(args.architecture, args.config, largest),
        "export": reloaded,
    }  # fmt: skip
    name = (gpu or "cpu").split()[-1].lower()
    out = args.out or ROOT / "benchmarks" / "results" / f"end-to-end-{args.architecture}-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps({key: document[key] for key in ("sides", "peak_allocated_gib", "export")}, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
