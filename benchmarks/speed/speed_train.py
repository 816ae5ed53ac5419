"""Training cost of ``tailored`` against plain peft LoRA: one optimiser step, the same model and batch.

Every side is a :class:`tailored.train.module.TailoredModule` driven by a real Lightning ``Trainer``, so a step is
exactly what ``tailored fit`` runs (forward, backward, optimiser step, logit clamp, logging):

    lora               pruning: null (the plain-LoRA baseline: no gates, no hooks, no regulariser)
    tailored           gates sampled and applied by hooks, sparsity Lagrangian, LoRA
    tailored_distill   the same + distillation from the dense teacher (one more forward, the KL on the logits)
    tailored_compiled  tailored with model.compile (``--compile``): its decoder layers compiled, timed after the
                       warm-up fit that compiles them; its time is also a ratio against ``tailored``

Drift cancels by alternation: each round fits every side for one timed step, starting one side later each round.
Profiled fits then measure a step's peak memory above the static state (see speed_measure) and the operators it
spends time in.
"""

from __future__ import annotations

import contextlib
import io
import logging
import statistics
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import yaml
from speed_measure import (
    MIB,
    Measurement,
    extra_ops,
    forward_flops,
    measured,
    optimizer_tensors,
    parameter_count,
    random_llama,
    storage_bytes,
    synchronize,
)
from torch.utils.data import DataLoader
from transformers import AutoConfig

from tailored.data.datamodule import DomainData, MixtureStream
from tailored.data.packing import loss_positions, packed_batch
from tailored.data.tasks import IGNORE_INDEX, Task
from tailored.train.module import TailoredModule
from tailored.train.settings import DistillSettings, PruningSettings

ROOT = Path(__file__).resolve().parents[2]
SIDES = ("lora", "tailored", "tailored_distill")
LOG_EVERY = 10
"""Trainer.log_every_n_steps, as in configs/quickstart.yaml (the module logs sparsity on these steps)."""
PEAK_BF16_TFLOPS = {"H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "H200": 989, "B200": 2250, "A100": 312,
                    "L40S": 362, "L4": 121}  # fmt: skip
"""Dense bf16 tensor-core peaks from the vendors' data sheets, matched in this order against the device name."""
ONE_B = {"hidden": 2048, "layers": 22, "heads": 32, "kv_heads": 4, "intermediate": 5632, "vocab": 32000}
"""A ~1.1B Llama (TinyLlama's shape), for the GPU throughput figure."""


class FixedBatches(L.LightningDataModule):
    """The given batches, one per step; what TailoredModule reads of a datamodule (no tasks to evaluate), and the
    loss positions DomainData adds to a training batch."""

    tasks: list = []
    dynamic = False
    reference_losses = None
    seed = 0

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        positions, targets = loss_positions(batch["labels"], IGNORE_INDEX)
        return batch | {"loss_positions": positions, "loss_targets": targets}


class StepMeter(L.Callback):
    """Times the steps of a fit after the first ``skip``; with ``profile``, profiles the first of them instead
    (peak memory above the static state, per-op time) and ignores the rest."""

    def __init__(self, device: torch.device, skip: int = 0, profile: bool = False) -> None:
        self.device, self.skip, self.profile = device, skip, profile
        self.seconds: list[float] = []
        self.static_bytes = 0
        self.measurement = Measurement()
        self._stack = contextlib.ExitStack()

    def _measures(self, batch_idx: int) -> bool:
        return batch_idx == self.skip if self.profile else batch_idx >= self.skip

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        if not self._measures(batch_idx):
            return
        if self.profile:
            state = [*module.parameters(), *module.buffers(), *optimizer_tensors(trainer.optimizers[0])]
            self.static_bytes = storage_bytes(state)
            self.measurement = self._stack.enter_context(measured(self.device))
        synchronize(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if not self._measures(batch_idx):
            return
        synchronize(self.device)
        self.seconds.append(time.perf_counter() - self._start)
        self._stack.close()


def build_side(name: str, model: str, dtype: str, backend: str = "inductor") -> TailoredModule:
    """One side's module with its model loaded. The pruning sides skip the importance pass (a one-off cost before
    the first step) and the recovery phase (no transition to a smaller model: every step is a gated one).
    ``backend``: the compiled side's ``torch.compile`` backend."""
    pruning = None if name == "lora" else PruningSettings(importance=None, recovery=0.0)
    distill = DistillSettings() if name == "tailored_distill" else None
    compile = backend if name == "tailored_compiled" else False
    module = TailoredModule(model=model, dtype=dtype, pruning=pruning, distill=distill, compile=compile)
    module.configure_model()
    return module


def fit(module: TailoredModule, batches: list[dict], meter: StepMeter, device: torch.device) -> None:
    """One optimiser step of ``module`` per batch through a fresh Trainer, quietly."""
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=LOG_EVERY,
        callbacks=[meter],
    )
    with contextlib.redirect_stdout(io.StringIO()):  # the optimiser groups are printed at every fit
        trainer.fit(module, datamodule=FixedBatches(batches))


def random_batch(vocab: int, batch: int, length: int) -> dict[str, torch.Tensor]:
    """Random token ids ``[batch, length]``, every token attended and predicted."""
    ids = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def rotations(names: tuple[str, ...], rounds: int) -> list[str]:
    """``names`` once per round, each round starting one later: drift falls on every name alike."""
    return [name for r in range(rounds) for name in names[r % len(names) :] + names[: r % len(names)]]


def median_ops(profiles: list[dict[str, float]]) -> dict[str, float]:
    """Per operator, the median milliseconds over several profiled steps (0 where a step did not run it)."""
    names = {name for profile in profiles for name in profile}
    return {name: statistics.median(profile.get(name, 0.0) for profile in profiles) for name in names}


def measure_training(
    model: str,
    dtype: str,
    device: torch.device,
    shape: tuple[int, int],
    rounds: int,
    sides=SIDES,
    profiles: int = 2,
    backend: str = "inductor",
) -> dict:
    """Median step time, memory and a per-op profile of every side; ratios against the ``lora`` side (time: the
    median over rounds of the ratio within a round).

    After one untimed warm-up fit per side, each of ``rounds`` rounds fits every side for one timed step (CUDA:
    after an untimed one, which meets lazy initialisation and the step-0 sparsity log's syncs; on CPU those cost
    ~10 ms of a multi-second step). Then ``profiles`` alternated rounds profile a step of every side.
    """
    quiet()
    modules = {name: build_side(name, model, dtype, backend) for name in sides}
    batch = random_batch(modules["lora"].structure_hint.vocab_size, *shape)
    skip = 1 if device.type == "cuda" else 0
    for name in sides:
        fit(modules[name], [batch], StepMeter(device, skip=1), device)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for name in rotations(sides, rounds):
        meter = StepMeter(device, skip=skip)
        fit(modules[name], [batch] * (skip + 1), meter, device)
        times[name] += meter.seconds
    ops: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    memory: dict[str, tuple[int, int]] = {}
    for name in rotations(sides, profiles):
        meter = StepMeter(device, skip=1, profile=True)
        fit(modules[name], [batch] * 2, meter, device)
        ops[name].append(meter.measurement.op_ms)
        memory[name] = meter.static_bytes, max(meter.measurement.peak_bytes, memory.get(name, (0, 0))[1])
    result = {"model": model, "dtype": dtype, "batch": list(shape), "rounds": rounds, "sides": {}}
    for name in sides:
        step, (static, transient) = statistics.median(times[name]), memory[name]
        result["sides"][name] = {
            "step_seconds": round(step, 4),
            "step_seconds_all": [round(value, 4) for value in times[name]],
            "tokens_per_second": round(shape[0] * shape[1] / step, 1),
            "static_mib": round(static / MIB, 1),
            "step_peak_above_static_mib": round(transient / MIB, 1),
            "peak_mib": round((static + transient) / MIB, 1),
        }
    ops = {name: median_ops(values) for name, values in ops.items()}
    lora = result["sides"]["lora"]
    for name in sides[1:]:
        side = result["sides"][name]
        paired = [mine / baseline for mine, baseline in zip(times[name], times["lora"], strict=True)]
        side["step_time_ratio"] = round(statistics.median(paired), 3)
        side["peak_memory_ratio"] = round(side["peak_mib"] / lora["peak_mib"], 3)
        side["profiled_extra_ms_by_op_vs_lora"] = extra_ops(ops[name], ops["lora"])
    if "tailored_distill" in sides:
        extra = extra_ops(ops["tailored_distill"], ops["tailored"])
        result["sides"]["tailored_distill"]["profiled_extra_ms_by_op_vs_tailored"] = extra
    if "tailored_compiled" in sides:
        paired = [mine / eager for mine, eager in zip(times["tailored_compiled"], times["tailored"], strict=True)]
        result["sides"]["tailored_compiled"] |= {
            "backend": backend,
            "step_time_ratio_vs_tailored": round(statistics.median(paired), 3),
        }
    return result


def quiet() -> None:
    """Silence Lightning's per-fit banners and the warnings about a tiny dataloader."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """The device's dense bf16 peak (TFLOP/s): ``override``, else from :data:`PEAK_BF16_TFLOPS`, else None."""
    if override is not None or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), None)


def measure_throughput(
    folder: Path, sizes: dict, device: torch.device, dtype: str, shape: tuple[int, int], rounds: int, peak=None
) -> dict:
    """Training tokens/s and model FLOPs utilisation of LoRA and tailored on a random Llama of ``sizes`` (those of
    :func:`speed_measure.random_llama`); ``peak`` TFLOP/s overrides the device's entry in the table.

    Model FLOPs per token are twice the forward's: the backward pass computes activation gradients but no weight
    gradients of the frozen base (LoRA's are negligible), so LoRA training costs ~4N per token, not full
    fine-tuning's 6N. The gates' work is not counted: tailored's utilisation is the share of the same useful work.
    """
    peak = peak_tflops(device, peak)
    random_llama(folder, dtype=getattr(torch, dtype), device=device.type, **sizes)
    result = measure_training(str(folder), dtype, device, shape, rounds, sides=("lora", "tailored"))
    config = AutoConfig.from_pretrained(folder)
    per_token = 2 * forward_flops(config, 1, (shape[1] + 1) / 2)
    result.update(
        parameters=parameter_count(config),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        model_flops_per_token=per_token,
        peak_tflops=peak,
    )
    for side in result["sides"].values():
        achieved = side["tokens_per_second"] * per_token
        side["model_tflops_per_second"] = round(achieved / 1e12, 3)
        side["mfu"] = None if peak is None else round(achieved / (peak * 1e12), 4)
    return result


def medical_batches(config: Path, tokenizer: str, steps: int) -> dict:
    """The first ``steps`` training batches of ``config``'s data, each collated twice from the same examples:
    ``packed`` (data.packing true) and ``padded`` (false); and the data's padding shares over its first batches."""
    settings = yaml.safe_load(config.read_text())["data"]
    tasks = [Task(**task) for task in settings.pop("tasks")]
    settings["data_dir"] = str((ROOT / settings["data_dir"]).resolve())  # the config's path is the checkout's
    with contextlib.redirect_stdout(io.StringIO()):  # the data splits table
        data = DomainData(tasks, tokenizer=tokenizer, **settings)
        data.setup("fit")
    stream = iter(MixtureStream(data.train_examples, data.weights, data.seed))
    examples = [[next(stream) for _ in range(data.batch_size)] for _ in range(steps)]
    packed = [packed_batch(batch, data.seq_len, data.tokenizer.pad_token_id, IGNORE_INDEX) for batch in examples]
    return {"packed": packed, "padded": [data.collate(batch) for batch in examples], "padding": data.padding}


def measure_packing(model: str, dtype: str, device: torch.device, config: Path, steps: int, rounds: int) -> dict:
    """Tokens of real data (not padding) per second of a tailored step (gates + Lagrangian + LoRA) on the first
    ``steps`` training batches of ``config`` (the medical config), packed against padded: the same examples, the two
    sides alternated round by round after one untimed warm-up fit each; the ratio is the median over rounds of
    packed / padded real tokens per second."""
    quiet()
    module = build_side("tailored", model, dtype)
    batches = medical_batches(config, model, steps)
    real = sum(int(batch["attention_mask"].sum()) for batch in batches["padded"])
    sides = ("packed", "padded")
    for name in sides:
        fit(module, batches[name][:1], StepMeter(device), device)
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for name in rotations(sides, rounds):
        meter = StepMeter(device)
        fit(module, batches[name], meter, device)
        seconds[name].append(sum(meter.seconds))
    result = {"config": str(config.relative_to(ROOT)), "steps": steps, "rounds": rounds, "real_tokens": real}
    result["padding_share_first_batches"] = {name: round(share, 4) for name, share in batches["padding"].items()}
    for name in sides:
        median = statistics.median(seconds[name])
        result[name] = {
            "tokens": sum(batch["input_ids"].numel() for batch in batches[name]),
            "seconds": round(median, 3),
            "seconds_all": [round(value, 3) for value in seconds[name]],
            "real_tokens_per_second": round(real / median, 1),
        }
    paired = [padded / packed for packed, padded in zip(seconds["packed"], seconds["padded"], strict=True)]
    result["real_tokens_per_second_ratio"] = round(statistics.median(paired), 3)
    return result
