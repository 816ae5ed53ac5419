"""The LightningModule: a Hugging Face LLaMA-family model + peft LoRA + pruning gates, trained in one run.

    loss = (1 - w) * LM loss + w * distillation loss     (masked model, sampled gates; tailored.train.teacher)
           + sparsity Lagrangian                          (tailored.core.gates; not in recovery)

over the phases of :mod:`tailored.train.schedule` (warm-up, control, recovery). The two-stage baselines
(``pruning.method``: taylor, magnitude, random) recover only: importance scores (tailored.core.importance) fix the
target shape's units before the first step, the model is pruned, and LoRA tunes it.

Only LoRA, gate (or generator) and multiplier parameters train; the base weights stay frozen and are not
written to checkpoints (tailored.train.checkpoints). ``pruning: null`` trains plain LoRA: the baseline the pruned
model is compared with. This class orchestrates; each concern lives in the module named in its method.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import get_peft_model

from tailored.core.compilation import CompiledLayers
from tailored.core.gates import PruningGates
from tailored.core.lora import lora_config, lora_state
from tailored.core.losses import at_positions, final_hidden_states, head_losses, output_head
from tailored.core.masking import GateHooks
from tailored.core.shapes import shape_gates, uniform_shape_of
from tailored.core.structure import GateValues, describe
from tailored.core.targets import prunable_fraction
from tailored.data.metrics import TaskMetrics
from tailored.models import load_model
from tailored.train import checkpoints
from tailored.train.decision import MaskSettling, agreement_with_importance, masked_base_loss
from tailored.train.evaluation import HeldOutEvaluation
from tailored.train.exporting import export_run
from tailored.train.optimization import build_optimizer, learning_rate_factor, scale_learning_rates
from tailored.train.schedule import PHASES, Schedule
from tailored.train.settings import (
    DistillSettings,
    LoraSettings,
    OptimizerSettings,
    PruningSettings,
    check_fit,
    check_settings,
    compile_backend,
    model_target,
)
from tailored.train.sharding import average_gradients, clip_gradients, is_sharded, shard
from tailored.train.teacher import CorrectedTeacher, kept_teacher, teacher_outputs
from tailored.train.transition import check_adapters, importance_scores, prune_now
from tailored.train.vocabulary import (
    CHECKPOINT_KEY,
    check_tokenizer,
    domain_token_ids,
    mask_training_logits,
    reinvest_rows,
    reinvests,
)


class TailoredModule(HeldOutEvaluation):
    """One-stage tuning and structural pruning of a LLaMA-family causal LM.

    Args:
        model: Hugging Face model folder, hub name, or ``embedded:SmolLM2-135M-Instruct``.
        dtype: dtype of the frozen base weights (float32, bfloat16, float16).
        lora: LoRA settings.
        pruning: pruning settings; null trains plain LoRA.
        optimizer: learning rates.
        distill: distillation from the dense model (gates off); null trains on the LM loss alone.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        compile: ``torch.compile`` every decoder layer for training, the gate hooks and LoRA inside its graph
            (tailored.core.compilation); the pruned model is compiled again after the transition. ``true`` uses
            inductor; a string names another backend (``aot_eager``, ``cudagraphs``).
    """

    def __init__(
        self,
        model: str = "embedded:SmolLM2-135M-Instruct",
        dtype: str = "float32",
        lora: LoraSettings | None = None,
        pruning: PruningSettings | None = None,
        optimizer: OptimizerSettings | None = None,
        distill: DistillSettings | None = None,
        gradient_checkpointing: bool = False,
        compile: bool | str = False,
    ) -> None:
        super().__init__()
        self.lora_settings, self.optimizer_settings = lora or LoraSettings(), optimizer or OptimizerSettings()
        self.pruning_settings, self.distill_settings = pruning, distill
        check_settings(self.lora_settings, pruning, self.optimizer_settings, distill, dtype, gradient_checkpointing)
        self.model_name, self.dtype_name, self.gradient_checkpointing = model, dtype, gradient_checkpointing
        self.compile_backend = compile_backend(compile)  # not self.compile: that is nn.Module's method
        self.compiled_layers: CompiledLayers | None = None  # model.compile: the training step's layer forwards
        # cheap checks before any weight is loaded: the name, the architecture, the target; no structure (None) for
        # a non-uniform export, which is tuned and evaluated as it is
        self.structure_hint, self.target = model_target(model, pruning)
        self.save_hyperparameters()
        self.strict_loading = False  # checkpoints hold only the trainable state (tailored.train.checkpoints)
        self.model = None
        self.task_metrics = torch.nn.ModuleList()
        self.results: dict[str, dict[str, float]] = {}
        self.row_values: dict[str, dict[str, list[float]]] = {}  # per task, the last test's per-row columns
        self.checkpoint_step = 0  # global step of the checkpoint this module was loaded from, if any
        self.resumed_random_state: dict | None = None  # torch RNG state of that checkpoint
        self.held_out_gates: GateValues | None = None  # gates of the current validation/test epoch
        self.transition: dict | None = None  # what went into the "prune now" transition, once it happened
        self.teacher = None  # after the transition, with distillation: the dense model the student came from
        self.corrected_teacher: CorrectedTeacher | None = None  # distill.teacher corrected: the teacher's adapters
        settle = None if pruning is None else pruning.settle_steps
        self.settling = None if settle is None else MaskSettling(settle)  # decide, then prune (train/decision)
        self.decision: dict | None = None  # when the gates froze, the shape, and how much was learned
        self.kept_tokens: list[int] | None = None  # pruning.vocabulary: the ids the export keeps (train/vocabulary)
        self.logit_mask = None  # the hook that masks the other ids' logits in training

    def setup(self, stage: str) -> None:
        """Check the trainer settings (before :meth:`configure_model` loads weights); one metric set per task."""
        if stage == "fit":
            trainer = self.trainer
            check_fit(
                trainer.max_steps,
                self.pruning_settings,
                self.distill_settings,
                trainer.world_size,
                is_sharded(self),
                self.optimizer_settings.warmup_steps,
            )
            check_tokenizer(self)
        if reinvests(self):  # the kept tokens set the target, before configure_model builds the gates
            self.kept_tokens = self.kept_tokens or domain_token_ids(self)
            reinvest_rows(self)
        self.tasks = self.trainer.datamodule.tasks
        self.task_metrics = torch.nn.ModuleList(TaskMetrics(task) for task in self.tasks).to(self.device)

    def configure_model(self) -> None:
        """Load the base model, attach LoRA, create the gates and their hooks (once)."""
        if self.model is not None:
            return
        base = load_model(self.model_name, dtype=getattr(torch, self.dtype_name))
        base.requires_grad_(False)
        base.train()  # from_pretrained returns eval mode; Lightning switches modes per stage itself
        if self.gradient_checkpointing:
            base.gradient_checkpointing_enable()
            base.enable_input_require_grads()
        self.model = get_peft_model(base, self.lora_config())
        if self.distill_settings is not None and self.distill_settings.teacher == "corrected":
            self.corrected_teacher = CorrectedTeacher(self.model)
        self.structure = None if self.structure_hint is None else describe(self.model)
        if self.target is not None:
            pruning = self.pruning_settings
            self.gates = PruningGates(
                self.structure, self.target.prune, self.target, pruning.logits, pruning.init_log_alpha,
                penalty_init=pruning.penalty_init,
            ).to(self.device)  # fmt: skip
            self.hooks = GateHooks(self.model)
        if is_sharded(self):  # FSDP2: after the hooks and the structure, which read whole modules
            shard(self.model, self.trainer.strategy)
        if self.compile_backend is not None:  # after sharding: each layer's graph then holds its unit's gathers
            self.compiled_layers = CompiledLayers(self.model, self.compile_backend)

    @property
    def tokenizer(self):
        return self.trainer.datamodule.tokenizer

    def lora_config(self):
        settings = self.lora_settings
        return lora_config(settings.rank, settings.alpha, settings.dropout, settings.targets)

    @property
    def pruned_now(self) -> bool:
        """The model is the physically pruned one (the transition happened)."""
        return self.transition is not None

    @property
    def schedule(self) -> Schedule:
        pruning = self.pruning_settings
        return Schedule.of(self.trainer.max_steps, pruning.warmup, pruning.recovery, pruning.two_stage)

    def phase(self) -> str:
        """The current step's phase: recovery once the gates are frozen (at the scheduled start, or earlier when
        the decision settled), otherwise the schedule's."""
        return "recovery" if self.gates.is_frozen else self.schedule.phase(self.global_step)

    def decide(self, step: int, gates: GateValues) -> None:
        """Freeze ``gates`` (deterministic) and record the decision: its step, the shape, the agreement with the
        importance scores and the masked base model's loss (tailored.train.decision), in TensorBoard and in
        ``self.decision`` (checkpointed; the export's pruning_report.json holds it)."""
        self.gates.freeze(gates)
        kept = gates.kept()
        self.decision = {
            "step": step,
            "shape": uniform_shape_of(kept),
            "agreement_with_importance": agreement_with_importance(self.gates, kept),
            "masked_base_loss": masked_base_loss(self, gates),
        }
        logs = {f"decision/kept_{name}": float(value) for name, value in (self.decision["shape"] or {}).items()}
        logs |= {f"decision/agreement_{k}": v for k, v in (self.decision["agreement_with_importance"] or {}).items()}
        logs |= {f"decision/masked_base_loss_{k}": v for k, v in self.decision["masked_base_loss"].items()}
        if self.logger is not None:
            self.logger.log_metrics(logs, step=step)

    def prune_now(self, step: int, adapters: dict | None = None) -> None:
        """Replace the masked model by the smaller model it computes under the frozen gates, with fresh LoRA
        (tailored.train.transition). ``adapters`` (a resumed run): the LoRA tensors the model had then. With
        distillation the dense model stays as the teacher; otherwise it is freed."""
        if adapters is not None:
            check_adapters(self.model, adapters)
            self.model.load_state_dict(adapters, strict=False)
        gates = self.gates.frozen()
        self.transition = {
            "step": step,
            "adapters": {name: value.cpu() for name, value in lora_state(self.model).items()},
            "gates": {name: value.detach().cpu().clone() for name, value in gates.items()},
        }
        fresh_lora = self.lora_config() if self.pruning_settings.recovery_weights == "lora" else None
        pruned = prune_now(self.model, gates, fresh_lora, self.gradient_checkpointing)
        self.hooks.remove()
        if self.compile_backend is not None:
            self.compiled_layers = CompiledLayers(pruned, self.compile_backend)
        dense, self.model = self.model, pruned
        mask_training_logits(self)
        self.teacher = None if self.distill_settings is None else kept_teacher(dense, self.distill_settings.teacher)
        del dense
        if self._trainer is not None and self.trainer.state.fn == "fit" and self.trainer.optimizers:
            self.trainer.strategy.setup_optimizers(self.trainer)  # the optimiser now tunes the new adapters

    def on_train_start(self) -> None:
        """A resumed run draws the gate noise the interrupted run would have drawn next."""
        if self.resumed_random_state is not None:
            checkpoints.set_random_state(self.resumed_random_state)
            self.resumed_random_state = None

    def on_fit_start(self) -> None:
        """With pruning.vocabulary, the domain's ids and the training logit mask; on a fresh run, importance scores:
        the gates' prior (one-stage) or the baseline's pruning."""
        settings = self.pruning_settings
        if settings is not None and settings.vocabulary is not None:  # a resumed run has them from its checkpoint
            self.kept_tokens = self.kept_tokens or domain_token_ids(self)
            mask_training_logits(self)
        if settings is None or self.checkpoint_step > 0 or self.pruned_now or self.gates.is_frozen:
            return
        if settings.two_stage:  # prune once, to the target shape, by the baseline's scores
            scores = importance_scores(self, settings.method)
            self.decide(0, shape_gates(self.structure, self.target.shape, scores))
            self.prune_now(step=0)
        elif settings.importance is not None:
            self.gates.init_from_scores(importance_scores(self, settings.importance), settings.importance_spread)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """On the first recovery step (scheduled, or the step after the decision settled): freeze the gates at the
        exact target, and maybe prune now."""
        if self.target is None:
            return
        settled = self.settling is not None and self.settling.settled
        if not self.gates.is_frozen and (settled or self.schedule.phase(self.global_step) == "recovery"):
            self.log("sparsity/ratio_before_topk", self.gates.kept_fraction(self.gates.deterministic()))
            self.decide(self.global_step, self.final_gates())
        if self.gates.is_frozen and self.pruning_settings.prune_at_recovery and not self.pruned_now:
            self.prune_now(step=self.global_step)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The loss from the hidden states at the batch's ``loss_positions`` (the datamodule finds them), logits a
        chunk at a time (tailored.core.losses): neither the student's nor the teacher's ``[B, T, V]`` logits are
        held."""
        distill = self.distill_settings
        positions, targets = batch["loss_positions"], batch["loss_targets"]
        teacher = None
        if distill is not None:
            dense = self.teacher if self.teacher is not None else self.model
            adapters_off = self.teacher is None and (distill.teacher == "base" or self.target is None)
            teacher = teacher_outputs(dense, batch, positions, targets, self.corrected_teacher, adapters_off)
        if self.target is not None and not self.pruned_now:  # gates on until on_after_backward (checkpointing)
            gates = self.gates.frozen() if self.gates.is_frozen else self.gates.sample()
            self.hooks.activate(gates, hidden_gated="hidden" in self.gates.prune)
        if self.compiled_layers is not None:  # on until on_after_backward too
            self.compiled_layers.activate()
        hidden = at_positions(final_hidden_states(self.model, batch), positions)  # [N, d]
        head = output_head(self.model)
        if teacher is None:
            lm_loss = loss = head_losses(hidden, head, targets)[0]
        else:
            lm_loss, kd = head_losses(hidden, head, targets, teacher.hidden, teacher.head, distill.temperature)
            loss = (1 - distill.weight) * lm_loss + distill.weight * kd
            self.log("train/distill_loss", kd)
            if teacher.loss is not None:  # the corrected teacher's adapters learn the domain next to the student
                loss = loss + teacher.loss
                self.log("train/teacher_loss", teacher.loss)
        if self.target is not None:
            loss = loss + self.sparsity_term()
            self.log("train/lm_loss", lm_loss, prog_bar=True)
        self.log("train/loss", loss, prog_bar=self.target is None)
        if self.target is not None and self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.log("sparsity/hard_ratio", self.gates.kept_fraction(self.evaluation_gates()), prog_bar=True)
            self.log_dict(self.gates.expected_sparsity())
        return loss

    def sparsity_term(self) -> torch.Tensor:
        """The Lagrangian of the expected kept fraction's gap to the ramped target (0 in recovery)."""
        schedule, step = self.schedule, self.global_step
        phase = self.phase()
        self.log("train/phase", float(PHASES.index(phase)))
        if phase == "recovery":  # DDP needs a gradient for every trainable parameter; on_after_backward drops it
            return 0.0 * sum(parameter.sum() for parameter in self.gates.parameters())
        regulariser, logs = self.gates.lagrangian(schedule.ramp(step))
        self.log_dict(logs)
        return regulariser

    def on_after_backward(self) -> None:
        if self.compiled_layers is not None:
            self.compiled_layers.deactivate()
        if self.target is None:
            return
        self.hooks.deactivate()
        if self.gates.is_frozen:  # the zero gradients of the recovery phase: the optimiser must not step on them
            for parameter in self.gates.parameters():
                parameter.grad = None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The tuned weights' learning rate of this step (``optimizer.schedule``, logged as ``optimizer/tuned_lr``;
        a cosine decays from the step the gates froze, where the final model's tuning starts, or from step 0).
        FSDP shards and reduces the model's gradients only; the replicated gates' are averaged here."""
        decay_start = 0 if self.target is None else None if self.decision is None else self.decision["step"]
        factor = learning_rate_factor(self.global_step, self.trainer.max_steps, self.optimizer_settings, decay_start)
        scale_learning_rates(optimizer, factor)
        self.log("optimizer/tuned_lr", optimizer.param_groups[0]["lr"])
        if self.target is not None and is_sharded(self):
            average_gradients(self.gates.parameters())

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Lightning's clipping (``trainer.gradient_clip_val``), with FSDP2's sharded gradients clipped as one
        device clips the whole model's (:func:`tailored.train.sharding.clip_gradients`)."""
        if not (is_sharded(self) and gradient_clip_val):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
        clip_gradients(parameters, float(gradient_clip_val), gradient_clip_algorithm or "norm")

    def optimizer_step(self, *args, **kwargs) -> None:
        """The step, then the logit clamp: before any callback (a checkpoint) sees the parameters."""
        super().optimizer_step(*args, **kwargs)
        if self.target is not None:
            self.gates.clamp_()
            if self.settling is not None and self.phase() == "control":  # the step's own phase (not yet counted)
                self.watch_decision()

    def watch_decision(self) -> None:
        """Decide, then prune: record this step's exact target mask and the budget gap (tailored.train.decision)."""
        expected = self.gates.expected_parameter_count()
        gap = float(prunable_fraction(self.structure, self.target.prune, expected)) - self.target.fraction
        if self.settling.update(self.final_gates(), gap):
            self.log("sparsity/settled_at", float(self.global_step))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self, self.optimizer_settings)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs) -> TailoredModule:
        """Lightning's, after completing the settings of a tailored 0.1 checkpoint (tailored.train.checkpoints)."""
        path = checkpoints.upgraded(checkpoint_path, kwargs.get("map_location"))
        return super().load_from_checkpoint(path, *args, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoints.slim(self, checkpoint)
        checkpoint[CHECKPOINT_KEY] = self.kept_tokens

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.kept_tokens = checkpoint.get(CHECKPOINT_KEY)  # before restore: a replayed "prune now" masks with them
        if reinvests(self) and self.kept_tokens is not None:  # tailored export: no data, the checkpoint's tokens
            reinvest_rows(self)
        checkpoints.restore(self, checkpoint)

    def export(self, path: str | Path, overwrite: bool = False, model: torch.nn.Module | None = None) -> dict:
        """Prune, merge and save the model to ``path`` (:func:`tailored.train.exporting.export_run`)."""
        return export_run(self, path, overwrite, model)
