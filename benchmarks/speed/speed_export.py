"""Export cost: seconds and peak memory of ``TailoredModule.export``, and how they grow with the model.

Two paths, both ``module.export(path)``, target 0.7 of the prunable parameters:

    prune_and_save   the masked model (gates, LoRA) -> prune_model (merge, fold, slice) -> save_pruned
                     (pruning.prune_at_recovery: false, and two-stage runs exported before their first step)
    merge_and_save   the model was already pruned when recovery began (the default): a copy of it with the LoRA
                     adapters merged -> save_pruned

``surgery`` times prune_model alone. Peak memory is the most tensor bytes alive at once above the level before the
export (speed_measure), compared with the model exported from (``source``) and the saved one (``output``): an export
that holds only its output peaks near ``output``; one more full copy of the model shows as another ``source``.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from functools import partial
from pathlib import Path

import torch
from speed_measure import MIB, alternated_medians, measured, random_llama, seconds, storage_bytes

from tailored.core.prune import prune_model
from tailored.core.structure import GateValues, parameter_count
from tailored.train.module import TailoredModule
from tailored.train.settings import PruningSettings


def export_module(model: str, dtype: str, device: torch.device, pruned_now: bool) -> TailoredModule:
    """A module with LoRA and gates at target 0.7, as a fit leaves it; ``pruned_now``: after the transition.
    Channels are not rounded (round_to 1), so that small widths meet the target too; the cost does not depend on it."""
    module = TailoredModule(model=model, dtype=dtype, pruning=PruningSettings(importance=None, round_to=1))
    module.configure_model()
    module.to(device)
    if pruned_now:
        module.gates.freeze(module.gates.target_gates())
        module.prune_now(step=0)
    return module


class Exporter:
    """Exports a module to a fresh folder per call and returns the seconds of the export alone."""

    def __init__(self, module: TailoredModule, folder: Path, device: torch.device) -> None:
        self.module, self.folder, self.device = module, folder, device

    def __call__(self) -> float:
        shutil.rmtree(self.folder, ignore_errors=True)  # the previous call's export, outside the clock
        return seconds(partial(self.module.export, self.folder), self.device)


def model_bytes(module: TailoredModule) -> int:
    return storage_bytes([*module.model.parameters(), *module.model.buffers()])


def export_peak(module: TailoredModule, folder: Path, device: torch.device) -> dict:
    """Peak MiB above the start of one export, and as a multiple of the source and of the output model."""
    shutil.rmtree(folder, ignore_errors=True)
    with measured(device) as measurement:
        report = module.export(folder)
    source = model_bytes(module)
    output = report["parameters"]["after"] * next(module.model.parameters()).element_size()
    return {
        "peak_above_start_mib": round(measurement.peak_bytes / MIB, 1),
        "source_mib": round(source / MIB, 1),
        "output_mib": round(output / MIB, 1),
        "peak_over_source": round(measurement.peak_bytes / source, 3),
        "peak_over_output": round(measurement.peak_bytes / output, 3),
    }


def measure_export(model: str, dtype: str, device: torch.device, repeats: int) -> dict:
    """Seconds (median of alternated repeats) and peak memory of both export paths and of the surgery alone."""
    masked = export_module(model, dtype, device, pruned_now=False)
    pruned = export_module(model, dtype, device, pruned_now=True)
    gates = masked.final_gates()
    with tempfile.TemporaryDirectory() as folder:
        runs = {
            "surgery": partial(seconds, partial(prune_model, masked.model, gates), device),
            "prune_and_save": Exporter(masked, Path(folder) / "masked", device),
            "merge_and_save": Exporter(pruned, Path(folder) / "pruned", device),
        }
        medians = alternated_medians(runs, repeats)
        result = {"model": model, "dtype": dtype, "seconds": {name: round(value, 3) for name, value in medians.items()}}
        result["memory"] = {
            "prune_and_save": export_peak(masked, Path(folder) / "masked", device),
            "merge_and_save": export_peak(pruned, Path(folder) / "pruned", device),
        }
    return result


def width_model(folder: Path, width: int, base: dict) -> Path:
    """A random Llama whose hidden size, heads and MLP width are ``width`` times ``base``'s (layers and vocabulary
    fixed, so the parameters grow ~width^2 above the embeddings)."""
    scaled = {name: base[name] * width for name in ("hidden", "heads", "kv_heads", "intermediate")}
    return random_llama(folder / f"width{width}", layers=base["layers"], vocab=base["vocab"], **scaled)


def measure_scaling(widths: tuple[int, ...], base: dict, dtype: str, device: torch.device, repeats: int) -> dict:
    """Surgery alone and prune_and_save on random Llamas of growing width: seconds and peak memory against the
    parameter count, and the log-log slopes of time over parameters (1: linear; fixed costs pull it below 1)."""
    with tempfile.TemporaryDirectory() as folder:
        modules = {width: export_module(str(width_model(Path(folder), width, base)), dtype, device, False)
                   for width in widths}  # fmt: skip
        runs = {}
        for width, module in modules.items():
            runs[f"surgery {width}"] = partial(
                seconds, partial(prune_model, module.model, module.final_gates()), device
            )
            runs[f"export {width}"] = Exporter(module, Path(folder) / f"export{width}", device)
        medians = alternated_medians(runs, repeats)
        rows = []
        for width, module in modules.items():
            parameters = int(parameter_count(module.structure, GateValues.ones(module.structure)))
            surgery, export = medians[f"surgery {width}"], medians[f"export {width}"]
            rows.append(
                {
                    "width": width,
                    "parameters": parameters,
                    "surgery_seconds": round(surgery, 4),
                    "seconds": round(export, 4),
                    "seconds_per_million_parameters": round(export / parameters * 1e6, 5),
                }
                | export_peak(module, Path(folder) / f"export{width}", device)
            )
    return {"base": base, "widths": rows, "log_log_slopes": slopes(rows)}


def slopes(rows: list[dict]) -> dict:
    """d log(seconds) / d log(parameters) of surgery and export, smallest to largest and between the two largest."""

    def slope(key: str, first: dict, last: dict) -> float:
        return round(math.log(last[key] / first[key]) / math.log(last["parameters"] / first["parameters"]), 3)

    return {
        f"{key}_{span}": slope(key, first, rows[-1])
        for key in ("surgery_seconds", "seconds")
        for span, first in (("all", rows[0]), ("largest_two", rows[-2]))
    }
