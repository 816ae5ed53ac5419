"""FSDP2: the base model sharded over every process, LoRA sharded with it, the gates replicated.

What lives where (``N`` processes; every rank holds ``1/N`` of each sharded tensor)::

    TailoredModule
      model (peft)          fully_shard(root)     embeddings, final norm, lm_head          sharded, frozen
        layers[i]           fully_shard(layer)    q/k/v/o, gate/up/down + their LoRA      sharded: base frozen,
                                                                                          LoRA trained
      gates                 not sharded           gate logits (or generator), multipliers replicated: gradients
                                                                                          averaged before each step

A decoder layer is all-gathered just before its forward (and again for its backward, or for the recomputed forward
of activation checkpointing, ``model.gradient_checkpointing``) and freed after it, so one process holds a
``1/N`` shard of the model plus about one full layer.

Why FSDP2 (``torch.distributed.fsdp.fully_shard``, driven by Lightning's ``ModelParallelStrategy``) and not
FSDP1 (Lightning's ``FSDPStrategy``):

- Frozen base weights next to trainable LoRA. FSDP1 flattens each unit's parameters into one ``FlatParameter``;
  with frozen and trainable ones mixed it needs ``use_orig_params=True`` and then keeps a gradient for the whole
  flat parameter, frozen part included. FSDP2 shards every parameter on its own (a ``DTensor``): a frozen weight
  gets no gradient and no optimizer state.
- bf16 base weights next to fp32 LoRA in one unit. FSDP1's flat parameter has one dtype. FSDP2 all-gathers
  parameters of several dtypes in one collective (as bytes) and only asks the *trainable* parameters of a unit to
  share a dtype, here fp32 LoRA. No ``MixedPrecisionPolicy`` is set, so every tensor keeps its dtype: the sharded
  forward computes what the one-device forward computes (bf16 base, fp32 adapters, peft casting between them), and
  LoRA gradients are reduced in fp32.
- Gates stay out of every unit. They are a few thousand fp32 values that every forward needs whole, and the
  sampled gates must be the same on every rank (:func:`average_gradients` keeps them so). Sharding them would
  all-gather them for every layer.
- Checkpoints are sharded ``torch.distributed.checkpoint`` folders written by every rank in parallel, holding the
  trainable state only (as on one device); export gathers the full model on rank 0 (:func:`gathered_model`).

:class:`FSDP2Strategy` is ``ModelParallelStrategy`` with one data-parallel dimension over every process of every
node (the parent's default puts the processes of a node into a tensor-parallel group, which ``tailored`` does
not use), so one config runs on 1 or N nodes. The "prune now" transition (``pruning.prune_at_recovery``, the
two-stage baselines) swaps the model mid-run and is refused here (:meth:`TailoredModule.check_fit_settings`).
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from peft import get_peft_model
from torch import nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from tailored.core.structure import unwrap
from tailored.models import load_config

METADATA_NAME = _METADATA_FILENAME
"""The file of a sharded checkpoint folder that holds everything but the tensors (steps, loops, hyperparameters)."""
STATE_PREFIX = "state_dict."
"""Prefix of the module's tensors among the keys of a sharded checkpoint (the optimizer's are ``optimizer_0.``)."""


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every process of every node, with sharded checkpoints of the trainable state.

    Args:
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPUs (the default follows the accelerator).
        timeout: how long a collective may wait for the other ranks before it fails ("h:m:s"); a rank that died
            is reported sooner by :class:`tailored.train.watchdog.RankWatchdog`.
    """

    def __init__(
        self, process_group_backend: str | None = None, timeout: timedelta | None = default_pg_timeout
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=True,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        """One data-parallel dimension over every process (``num_nodes * devices``), none tensor-parallel."""
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The module's state without its frozen parameters (references to the local shards, not copies): the base
        weights are reloaded from ``model.model`` on resume, as on one device."""
        frozen = {name for name, parameter in self.model.named_parameters() if not parameter.requires_grad}
        return {name: value for name, value in get_model_state_dict(self.model).items() if name not in frozen}

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """Load the tensors a sharded checkpoint holds (the trainable ones) and the optimizer states in place.

        Returns the checkpoint's other contents with ``state_dict`` (the loaded tensors), which
        :meth:`TailoredModule.on_load_checkpoint` checks against the run's settings.
        """
        path = Path(self.broadcast(str(checkpoint_path)))
        if not is_sharded_checkpoint(path):
            raise ValueError(
                f"{path} is not a sharded checkpoint folder (an FSDP run writes folders with {METADATA_NAME}); "
                "resume an FSDP run from its own checkpoints"
            )
        saved, state = saved_tensor_names(path), get_model_state_dict(self.model)
        trained = {name for name, parameter in self.model.named_parameters() if parameter.requires_grad}
        missing, unexpected = sorted(trained - saved)[:3], sorted(saved - set(state))[:3]
        if missing or unexpected:
            raise ValueError(
                f"the checkpoint {path} does not match this run's LoRA/pruning settings (missing {missing}, "
                f"unexpected {unexpected}); resume with the config the checkpoint was written with"
            )
        state = {name: value for name, value in state.items() if name in saved}
        optimizers = {
            f"optimizer_{index}": get_optimizer_state_dict(self.model, optimizer)
            for index, optimizer in enumerate(self.optimizers)
        }
        dcp.load({"state_dict": state, **optimizers}, checkpoint_id=path)
        set_model_state_dict(self.model, state, options=StateDictOptions(strict=False))
        for optimizer, optimizer_state in zip(self.optimizers, optimizers.values(), strict=True):
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optimizer_state)
        metadata = torch.load(path / METADATA_NAME, weights_only=weights_only)
        return metadata | {"state_dict": state}


StrategyRegistry.register("fsdp2", FSDP2Strategy, description="FSDP2 over every process (tailored.train.sharding)")
"""``--trainer.strategy fsdp2`` names :class:`FSDP2Strategy` with its defaults."""


def is_sharded_checkpoint(path: str | Path) -> bool:
    """``path`` is a checkpoint folder written by :class:`FSDP2Strategy` (``torch.distributed.checkpoint``)."""
    return Path(path).is_dir() and (Path(path) / METADATA_NAME).is_file()


def one_process_checkpoint(path: str | Path) -> str | io.BytesIO:
    """A checkpoint that one process can load (``load_from_checkpoint``): ``path`` itself, or a sharded folder
    consolidated in memory (its metadata and whole tensors; the optimizer states are left out)."""
    if not is_sharded_checkpoint(path):
        return str(path)
    with tempfile.TemporaryDirectory() as folder:
        dcp_to_torch_save(path, Path(folder) / "whole.pt")
        state = torch.load(Path(folder) / "whole.pt", weights_only=True)["state_dict"]
    checkpoint = torch.load(Path(path) / METADATA_NAME, weights_only=False) | {"state_dict": state}
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return buffer


def saved_tensor_names(path: str | Path) -> set[str]:
    """Names of the module tensors (not optimizer states) that a sharded checkpoint holds."""
    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {key.removeprefix(STATE_PREFIX) for key in keys if key.startswith(STATE_PREFIX)}


def is_sharded(module: L.LightningModule) -> bool:
    """``module`` is trained or evaluated by a ``ModelParallelStrategy`` (FSDP2)."""
    trainer = module._trainer
    return trainer is not None and isinstance(trainer.strategy, ModelParallelStrategy)


def shard(model: nn.Module, strategy: ModelParallelStrategy) -> None:
    """``fully_shard`` every decoder layer of ``model`` (peft-wrapped), then the model itself (the root unit:
    embeddings, final norm, lm_head), over the strategy's data-parallel mesh.

    ``generate`` is registered as a forward method: it reaches the decoder without the root's ``forward``, which
    would leave the embeddings sharded.
    """
    if strategy.device_mesh["tensor_parallel"].size() != 1:
        raise ValueError(
            "tensor parallelism is not supported: use trainer.strategy tailored.train.sharding.FSDP2Strategy (FSDP "
            "over "
            "every process), or ModelParallelStrategy with tensor_parallel_size 1"
        )
    mesh = strategy.device_mesh["data_parallel"]
    for layer in unwrap(model).model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    register_fsdp_forward_method(model, "generate")


@torch.no_grad()
def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Replace the gradients of replicated parameters by their mean over the ranks, in one all-reduce (what DDP
    does for every parameter), so that every rank takes the same optimiser step."""
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    if not grads or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    flat = torch.cat([grad.flatten() for grad in grads])
    dist.all_reduce(flat)  # a sum: gloo has no average
    flat /= dist.get_world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


@torch.no_grad()
def clip_gradients(parameters: Iterable[nn.Parameter], value: float, algorithm: str = "norm") -> None:
    """Clip the gradients of a sharded model's parameters in place, as one device clips the whole model's.

    ``norm``: every gradient times ``min(1, value / (total_norm + 1e-6))``, the total 2-norm taken over all of
    them (``torch.nn.utils.clip_grad_norm_``'s rule): the sharded gradients' norm is the all-reduced norm of their
    shards, the replicated ones' (the gates', already averaged) is counted once. ``value``: every element clamped
    to ``[-value, value]``. torch's own functions refuse a mix of sharded (``DTensor``) and whole tensors, which
    the gates next to the FSDP2-sharded model are.
    """
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    local = [grad.to_local() if isinstance(grad, DTensor) else grad for grad in grads]
    if algorithm == "value":
        torch._foreach_clamp_min_(local, -value)
        torch._foreach_clamp_max_(local, value)
        return
    sharded = [grad for grad in grads if isinstance(grad, DTensor)]
    whole = [grad for grad in grads if not isinstance(grad, DTensor)]
    norms = [torch.nn.utils.get_total_norm(sharded).full_tensor()] if sharded else []
    norms += [torch.nn.utils.get_total_norm(whole)] if whole else []
    if not norms:
        return
    total = torch.linalg.vector_norm(torch.stack([norm.float().to(local[0].device) for norm in norms]))
    torch._foreach_mul_(local, torch.clamp(value / (total + 1e-6), max=1.0))


@torch.no_grad()
def gathered_model(module: L.LightningModule) -> nn.Module | None:
    """The full model of a sharded ``module`` on rank 0's CPU (peft-wrapped, adapters unmerged), None on the
    other ranks. Every rank must call it: the shards are all-gathered one tensor at a time.

    The copy is built on the ``meta`` device and filled with the gathered tensors (``assign``), so rank 0 holds one
    full copy of the weights, never two; the sharded model is left as it is.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(module.model, options=options)
    if not state:  # ranks other than 0 receive nothing
        return None
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(load_config(module.model_name), dtype=getattr(torch, module.dtype_name))
        copy = get_peft_model(base, module.lora_config())
    copy.load_state_dict(state, strict=True, assign=True)
    unwrap(copy).tie_weights()
    buffers = dict(module.model.named_buffers())
    for name, buffer in copy.named_buffers():
        if buffer.is_meta:  # not in a state dict (rotary frequencies): every rank holds them whole
            owner, _, leaf = name.rpartition(".")
            setattr(copy.get_submodule(owner), leaf, buffers[name].detach().cpu().clone())
    return copy.eval()
