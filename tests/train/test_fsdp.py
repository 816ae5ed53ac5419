"""FSDP2 (``trainer.strategy: fsdp2``, tailored.train.sharding) on two CPU processes (gloo): train, write sharded
checkpoints, die, resume, export once; the ranks agree, and the export is the model the gates predict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import BF16_ROUNDING_FACTOR, ROOT, TARGET, write_config
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tailored.cli import run
from tailored.core.exactness import masked_logits, rounding_sensitivity
from tailored.core.gates import UNIT_TYPES
from tailored.core.prune import prune_model
from tailored.core.structure import GateValues, describe, parameter_count
from tailored.train.module import TailoredModule
from tailored.train.settings import LoraSettings, PruningSettings, check_fit
from tailored.train.sharding import (
    METADATA_NAME,
    FSDP2Strategy,
    clip_gradients,
    is_sharded,
    one_process_checkpoint,
    saved_tensor_names,
)

KILLED_AT, CHECKPOINT_EVERY, STEPS = 6, 4, 8
CLIP = 0.05
"""The runs' ``trainer.gradient_clip_val``: below their gradient norms, so that every step is clipped."""


def fsdp_config(tmp_path: Path, model_dir: Path, text: Path, callbacks: list[dict]) -> Path:
    """Two processes under FSDP2, 8 steps (recovery from step 6): bf16 base weights with fp32 LoRA in each unit,
    magnitude-initialised gates, checkpointed activations, clipped gradients, a checkpoint every 4 steps and one
    validation at the end;
    the data adds a generation task, so that validation runs ``generate`` through the sharded model."""
    trainer = {
        "accelerator": "cpu",
        "strategy": "fsdp2",
        "devices": 2,
        "max_steps": STEPS,
        "val_check_interval": STEPS,
        "limit_val_batches": 2,
        "num_sanity_val_steps": 0,
        "gradient_clip_val": CLIP,
        "default_root_dir": str(tmp_path / "run"),
        "enable_progress_bar": False,
        "callbacks": callbacks,
    }
    pruning = {"target": TARGET, "round_to": 1, "prune_at_recovery": False, "importance": "magnitude"}
    model = {"model": str(model_dir), "dtype": "bfloat16", "gradient_checkpointing": True, "pruning": pruning}
    summaries = tmp_path / "summaries.jsonl"
    rows = ({"doc": f"w{3 + i % 30} w{3 + (i + 7) % 30} w9", "summary": f"w{10 + i % 5} w50"} for i in range(40))
    summaries.write_text("\n".join(json.dumps(row) for row in rows))
    summarise = {"source": str(summaries), "kind": "generation", "prompt": "{doc} w12", "answer": " {summary}"}
    tasks = [{"name": "words", "source": str(text)}, {"name": "summarise", "max_new_tokens": 4, **summarise}]
    data = {"tasks": tasks, "seq_len": 32, "batch_size": 4}
    checkpoint = {"every_n_train_steps": CHECKPOINT_EVERY}
    return write_config(
        tmp_path / "fsdp.yaml", model_dir, text, trainer=trainer, model=model, data=data, checkpoint=checkpoint
    )


def fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tailored.cli", "fit", "-c", str(config), *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def callback(name: str, **init_args) -> dict:
    return {"class_path": f"subprocess_callbacks.{name}", "init_args": init_args}


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, tiny_model_dir, tiny_text) -> Path:
    """A run killed at step 6 (checkpoint at 4), then resumed with ``--ckpt_path last`` to the end and exported."""
    folder = tmp_path_factory.mktemp("fsdp")
    killed = fit(fsdp_config(folder, tiny_model_dir, tiny_text, [callback("KillAfterStep", step=KILLED_AT)]))
    assert killed.returncode != 0, killed.stderr[-3000:]
    checkpoint = folder / "run" / "checkpoints" / "last.ckpt"
    (folder / "killed_checkpoint.pt").write_bytes(one_process_checkpoint(checkpoint).getvalue())
    records = [callback("RecordStart", path=str(folder / "start.pt")), callback("RecordEnd", path=str(folder / "end"))]
    resumed = fit(fsdp_config(folder, tiny_model_dir, tiny_text, records), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return folder


def test_a_sharded_checkpoint_holds_the_trainable_state_and_resumes(resumed_run):
    checkpoint = resumed_run / "run" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir() and (checkpoint / METADATA_NAME).is_file()
    assert len(list(checkpoint.glob("*.distcp"))) == 2  # one file per rank
    names = saved_tensor_names(checkpoint)
    assert any("lora_A" in name for name in names) and "gates.lambda_1" in names
    assert not any("base_layer" in name or "embed_tokens" in name for name in names)
    killed = torch.load(resumed_run / "killed_checkpoint.pt", weights_only=False)
    start = torch.load(resumed_run / "start.pt")
    assert killed["global_step"] == start["global_step"] == CHECKPOINT_EVERY
    for name, value in start["gates"].items():
        assert torch.equal(value, killed["state_dict"][f"gates.{name}"]), name
    assert start["gates"]["lambda_1"].abs().sum() > 0  # trained multipliers, not the initial zeros


def test_every_rank_ends_with_the_same_gates_multipliers_and_adapters(resumed_run):
    ranks = [torch.load(resumed_run / f"end.rank{rank}.pt") for rank in (0, 1)]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == STEPS
    assert ranks[0]["state"]["gates.is_frozen"]  # the last steps were the recovery phase
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
    assert len(list((resumed_run / "run").rglob("export/config.json"))) == 1


def test_the_export_is_the_model_the_gates_predict(resumed_run, tiny_model_dir, tokens):
    """The (bf16) export against the masked model rebuilt on one process from the trained adapters and gates: the
    same tensors as its surgery gives (the gathered weights are the trained ones), the parameter count the gates
    predict, and the masked model's logits within bf16 rounding as ``tests/test_bf16.py`` judges it."""
    export = next((resumed_run / "run").rglob("export"))
    state = torch.load(resumed_run / "end.rank0.pt")["state"]
    gates = GateValues(**{name: state[f"gates.frozen_{name}"] for name in UNIT_TYPES})
    settings = LoraSettings()
    lora = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=settings.targets)
    masked = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16), lora)
    adapters = {name.removeprefix("model."): value for name, value in state.items() if "lora_" in name}
    assert not masked.load_state_dict(adapters, strict=False).unexpected_keys
    pruned = AutoModelForCausalLM.from_pretrained(export)
    reference = prune_model(masked, gates).state_dict()
    for name, value in pruned.state_dict().items():
        assert torch.equal(value, reference[name]), name
    count = sum(parameter.numel() for parameter in pruned.parameters())
    report = json.loads((export / "pruning_report.json").read_text())
    assert count == report["parameters"]["after"] == int(parameter_count(describe(masked), gates.kept()))
    with torch.no_grad():
        difference = (pruned(tokens).logits.float() - masked_logits(masked, gates, tokens).float()).abs().max().item()
    tolerance = BF16_ROUNDING_FACTOR * rounding_sensitivity(masked, gates, tokens)
    assert pruned.dtype == torch.bfloat16 and difference <= tolerance, f"{difference=:.3e}, {tolerance=:.3e}"


def test_tailored_export_reads_a_sharded_checkpoint_on_one_process(resumed_run, tmp_path):
    out = tmp_path / "from-checkpoint"
    run(["export", "--ckpt_path", str(resumed_run / "run" / "checkpoints" / "last.ckpt"), "--out", str(out)])
    exported = load_file(out / "model.safetensors")
    trained = load_file(next((resumed_run / "run").rglob("export/model.safetensors")))
    assert exported.keys() == trained.keys()
    for name, value in trained.items():
        assert torch.equal(exported[name], value), name


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"prune_at_recovery": True}, "prune_at_recovery swap in the pruned model mid-run.*nor with FSDP"),
        ({"importance": "taylor"}, "importance taylor needs gradients of the frozen base weights"),
    ],
    ids=["prune_at_recovery", "taylor"],
)
def test_fsdp_refuses_what_it_cannot_shard(tiny_model_dir, setting, message):
    """Checked in ``setup``, before weights load; even on one device, where FSDP2 still shards (over one rank)."""
    pruning = {"target": TARGET, "round_to": 1, "prune_at_recovery": False, "importance": "magnitude"} | setting
    module = TailoredModule(model=str(tiny_model_dir), pruning=PruningSettings(**pruning))
    module.trainer = L.Trainer(accelerator="cpu", devices=1, strategy=FSDP2Strategy(), max_steps=10, logger=False)
    with pytest.raises(ValueError, match=message):
        check_fit(10, module.pruning_settings, None, processes=1, sharded=is_sharded(module))


@pytest.mark.slow
def test_fsdp_trains_what_ddp_trains_and_resuming_changes_nothing(resumed_run, tmp_path, tiny_model_dir, tiny_text):
    """The same run without the kill, under FSDP and under DDP: the same adapters, gates and multipliers."""
    resumed = torch.load(resumed_run / "end.rank0.pt")["state"]
    for strategy in ("fsdp2", "ddp"):
        root = tmp_path / strategy
        root.mkdir()
        config = fsdp_config(root, tiny_model_dir, tiny_text, [callback("RecordEnd", path=str(root / "end"))])
        done = fit(config, "--trainer.strategy", strategy)
        assert done.returncode == 0, done.stderr[-3000:]
        whole = torch.load(root / "end.rank0.pt")["state"]
        for name, value in resumed.items():
            torch.testing.assert_close(whole[name], value, rtol=1e-5, atol=1e-6, msg=f"{strategy}: {name}")


def clip_on_two_ranks(rank: int, address: str, algorithm: str, grads: list[torch.Tensor], out: str) -> None:
    """One rank of :func:`test_sharded_clipping_is_one_devices_clipping`: shard the first gradients over the two
    ranks (the rest stay whole, as the gates do), clip, save the gathered result."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.distributed.init_process_group("gloo", init_method=address, rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    parameters = [torch.nn.Parameter(torch.zeros_like(grad)) for grad in grads]
    for index, (parameter, grad) in enumerate(zip(parameters, grads, strict=True)):
        parameter.grad = distribute_tensor(grad.clone(), mesh, [Shard(0)]) if index < 2 else grad.clone()
    clip_gradients(parameters, CLIP, algorithm)
    gathered = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in parameters]
    if rank == 0:
        torch.save(gathered, out)
    torch.distributed.barrier()  # neither rank tears gloo down while the other still talks (CI saw SIGABRT)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_sharded_clipping_is_one_devices_clipping(tmp_path, algorithm):
    """Sharded gradients next to whole ones, clipped on two processes: what ``torch.nn.utils`` gives the whole
    gradients on one (torch's own functions refuse the mix)."""
    grads = [torch.randn(6, 3), torch.randn(4), torch.randn(5), torch.randn(2, 2)]
    address = f"file://{tmp_path / 'store'}"
    torch.multiprocessing.spawn(clip_on_two_ranks, (address, algorithm, grads, str(tmp_path / "out.pt")), nprocs=2)
    parameters = [torch.nn.Parameter(torch.zeros_like(grad)) for grad in grads]
    for parameter, grad in zip(parameters, grads, strict=True):
        parameter.grad = grad.clone()
    if algorithm == "norm":
        assert torch.nn.utils.clip_grad_norm_(parameters, CLIP) > CLIP  # the case under test: clipping scales
    else:
        torch.nn.utils.clip_grad_value_(parameters, CLIP)
    for clipped, parameter in zip(torch.load(tmp_path / "out.pt"), parameters, strict=True):
        torch.testing.assert_close(clipped, parameter.grad)
