"""The LightningModule: a Hugging Face LLaMA-family model + peft LoRA + pruning gates, trained in one run.

    loss = (1 - w) * LM loss + w * distillation loss (masked model, sampled gates; tailored.distill)
           + sparsity Lagrangian (tailored.gates)

One run, three phases over ``trainer.max_steps`` (METHOD.md section 7)::

    |── warm-up ──|──────── control ────────|──── recovery ────|
     target ramps   gates converge to it      gates frozen at the exact target; by default the model is
     1 -> t         (logits start from          pruned now (tailored.transition) and LoRA tunes the smaller one
                    importance scores)

The two-stage baselines (``pruning.method``: taylor, magnitude, random) recover only: importance scores
(tailored.importance) fix the target shape's units before the first step, the model is pruned, and LoRA tunes it.

Only LoRA, gate (or generator) and multiplier parameters train; the base weights stay frozen and are not
written to checkpoints (they are reloaded from ``model`` on resume). ``pruning: null`` trains plain LoRA: the
baseline the pruned model is compared with.
"""

from __future__ import annotations

import copy
import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import torch
from peft import LoraConfig, get_peft_model

from tailored.distill import DistillSettings, distillation_loss
from tailored.evaluate import TaskMetrics, greedy_answers, loss_positions, option_log_likelihoods
from tailored.export import pruning_report, save_pruned
from tailored.gates import LOGIT_SOURCES, UNIT_TYPES, PruningGates
from tailored.importance import CRITERIA, unit_scores
from tailored.masking import GateHooks
from tailored.models import check_model_name, is_pruned_export, load_config, load_model, load_tokenizer
from tailored.prune import prune_model
from tailored.shapes import shape_gates
from tailored.sharding import average_gradients, is_sharded, shard
from tailored.structure import GateValues, ModelStructure, describe, parameter_count, structure_from_config
from tailored.targets import SparsityTarget, prunable_fraction, resolve_target
from tailored.tasks import IGNORE_INDEX
from tailored.teacher import CorrectedTeacher
from tailored.transition import lora_state, prune_now

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHASES = ("warmup", "control", "recovery")
METHODS = ("one_stage", *CRITERIA)
"""one_stage: gates learned while tuning; taylor/magnitude/random: two-stage baselines (score, prune, tune)."""


@dataclass
class LoraSettings:
    """peft LoRA on the projections of every decoder layer."""

    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA scaling numerator: the update is B A x * alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    targets: list[str] = field(default_factory=lambda: list(PROJECTIONS))
    """Projections that get adapters (a subset of q/k/v/o_proj, gate/up/down_proj)."""

    def check(self) -> None:
        """Raise a ``ValueError`` naming the first setting that cannot work."""
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout is a probability in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(PROJECTIONS))
        if unknown or not self.targets:
            raise ValueError(f"lora.targets {unknown or self.targets} are not projections; choose from {PROJECTIONS}")


@dataclass
class PruningSettings:
    """What to prune, how far, and on which schedule."""

    target: float | None = 0.7
    """Kept fraction of the prunable parameters, in (0, 1). Leave null when giving target_shape."""
    target_shape: dict[str, int] | None = None
    """Uniform target shape instead of a fraction: any of groups, channels, hidden, layers (kept counts)."""
    units: list[str] = field(default_factory=lambda: ["groups", "channels"])
    """Unit types to prune: groups (KV heads with their query heads), channels, hidden, layers, attn, mlp."""
    uniform: bool = True
    """Every layer ends with the same shape, so the export is a stock Hugging Face model."""
    logits: str = "direct"
    """Gate logits: direct (one per unit, clamped to Sheared-LLaMA's range after every step) or generator (ATP's
    pruning-decision network, trained at optimizer.generator_lr; its logits are not clamped)."""
    warmup: float = 0.3
    """Fraction of the pruning steps (warm-up + control) over which the target ramps from dense."""
    recovery: float = 0.2
    """Fraction of all steps, at the end, with gates frozen at the exact target while LoRA keeps tuning."""
    round_to: int = 8
    """Uniform mode: kept channels and hidden dims are multiples of this (fast kernels prefer 8 or 64)."""
    init_log_alpha: float = 5.0
    """Initial gate logit (5: every unit kept with probability ~0.999)."""
    penalty_init: float = 100.0
    """Initial quadratic multiplier lambda_2: damps the approach to the target in short runs (0 in CoFi/Sheared)."""
    method: str = "one_stage"
    """one_stage (learn the gates while tuning), or a two-stage baseline: taylor, magnitude or random scores
    prune the model once at step 0 to the target shape, then LoRA tunes the smaller model for every step."""
    importance: str | None = "taylor"
    """one_stage: initialise the gate logits from these scores (taylor, magnitude, random), null for a constant."""
    importance_spread: float = 4.0
    """one_stage with importance: logits start from init_log_alpha (best unit of a layer) down to
    init_log_alpha - spread (worst), in the order of the scores."""
    calibration_batches: int = 8
    """Training batches that taylor scores are computed on (drawn from the stream with another seed)."""
    recovery_weights: str = "lora"
    """After the model is pruned (prune_at_recovery, or a baseline's step 0), what trains: lora (fresh adapters on
    the smaller model) or all (every weight of the smaller model: recovers more per step, costs optimiser state
    for the whole model and full-size checkpoints)."""
    prune_at_recovery: bool = True
    """one_stage: when the gates freeze, physically prune and tune the smaller model for the recovery phase
    (faster, and it tunes the model that is exported); false keeps tuning the masked dense model."""

    def check(self) -> None:
        """Raise a ``ValueError`` naming the first setting that cannot work (called before any weight loads; not
        in ``__post_init__``, where the CLI would bury the message in its report on ``PruningSettings | None``)."""
        unknown = sorted(set(self.units) - set(UNIT_TYPES))
        if unknown or not self.units:
            raise ValueError(
                f"pruning.units: unknown or empty {unknown or self.units}; choose from {', '.join(UNIT_TYPES)}"
            )
        if self.uniform and {"attn", "mlp"} & set(self.units):
            raise ValueError("pruning.units attn/mlp remove blocks from some layers only; they need uniform: false")
        for name in ("warmup", "recovery"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"pruning.{name} is a fraction of steps in [0, 1), got {getattr(self, name)}")
        if self.method not in METHODS:
            raise ValueError(f"pruning.method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.method != "one_stage" and not self.uniform:
            raise ValueError(f"pruning.method {self.method} prunes to a uniform target shape; set uniform: true")
        if self.importance is not None and self.importance not in CRITERIA:
            raise ValueError(
                f"pruning.importance must be one of {', '.join(CRITERIA)} or null, got {self.importance!r}"
            )
        if self.recovery_weights not in ("lora", "all"):
            raise ValueError(f"pruning.recovery_weights must be lora or all, got {self.recovery_weights!r}")
        if self.calibration_batches < 1:
            raise ValueError(f"pruning.calibration_batches must be >= 1, got {self.calibration_batches}")
        if self.importance_spread < 0:
            raise ValueError(f"pruning.importance_spread must be >= 0, got {self.importance_spread}")
        if self.logits not in LOGIT_SOURCES:
            raise ValueError(f"pruning.logits must be one of {', '.join(LOGIT_SOURCES)}; got {self.logits!r}")
        if self.round_to < 1:
            raise ValueError(f"pruning.round_to must be >= 1 (1: no rounding), got {self.round_to}")

    @property
    def two_stage(self) -> bool:
        """A baseline that prunes at step 0 (no gates are learned)."""
        return self.method != "one_stage"


@dataclass
class OptimizerSettings:
    """AdamW learning rates of the three trainable groups."""

    lora_lr: float = 1e-4
    """LoRA adapters."""
    gates_lr: float = 0.5
    """Direct gate logits (one parameter per unit)."""
    generator_lr: float = 1e-3
    """The decision generator's weights (pruning.logits: generator; ATP trains its generator with 1e-3)."""
    multipliers_lr: float = 0.05
    """Lagrange multipliers (gradient ascent); keep it well below gates_lr so the gates can follow."""
    weights_lr: float = 1e-4
    """Every weight of the pruned model, when pruning.recovery_weights is all."""
    weight_decay: float = 0.0
    """Weight decay of the tuned weights (LoRA adapters, or all weights after pruning)."""

    def check(self) -> None:
        """Raise a ``ValueError`` naming the first learning rate or decay that cannot work."""
        for name in ("lora_lr", "gates_lr", "generator_lr", "weights_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"optimizer.{name} must be positive, got {getattr(self, name)}")
        for name in ("multipliers_lr", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"optimizer.{name} must be >= 0, got {getattr(self, name)}")


class TailoredModule(L.LightningModule):
    """One-stage tuning and structural pruning of a LLaMA-family causal LM.

    Args:
        model: Hugging Face model folder, hub name, or ``embedded:SmolLM2-135M-Instruct``.
        dtype: dtype of the frozen base weights (float32, bfloat16, float16).
        lora: LoRA settings.
        pruning: pruning settings; null trains plain LoRA.
        optimizer: learning rates.
        distill: distillation from the dense model (gates off); null trains on the LM loss alone.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
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
    ) -> None:
        super().__init__()
        self.lora_settings = lora or LoraSettings()
        self.pruning_settings = pruning
        self.optimizer_settings = optimizer or OptimizerSettings()
        self.distill_settings = distill
        for settings in (self.lora_settings, pruning, self.optimizer_settings, distill):
            if settings is not None:
                settings.check()
        if distill is not None and distill.teacher == "corrected" and gradient_checkpointing:
            raise ValueError(
                "distill.teacher corrected swaps the teacher's adapters in for its forward, which gradient "
                "checkpointing would replay with the student's; set gradient_checkpointing false or use teacher tuned"
            )
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
        self.model_name, self.dtype_name, self.gradient_checkpointing = model, dtype, gradient_checkpointing
        # cheap checks before any weight is loaded: the name, the architecture, the target
        check_model_name(model)
        config = load_config(model)
        if is_pruned_export(config) and pruning is not None:
            raise ValueError(
                f"{model} is a non-uniform tailored export ({config.model_type}): its layers differ in shape and "
                "cannot be pruned again; tune or evaluate it with --model.pruning null, or prune the original model"
            )
        # None for a non-uniform export, which is tuned and evaluated as it is
        self.structure_hint: ModelStructure | None = None if is_pruned_export(config) else structure_from_config(config)
        self.target: SparsityTarget | None = None
        if pruning is not None:
            units = tuple(pruning.units)
            self.target = resolve_target(
                self.structure_hint, units, pruning.target, pruning.target_shape, pruning.uniform, pruning.round_to
            )
        self.save_hyperparameters()
        self.strict_loading = False  # checkpoints hold only the trainable state; see on_load_checkpoint
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

    def setup(self, stage: str) -> None:
        """Check the trainer settings (before :meth:`configure_model` loads weights); the metrics of every task of
        the datamodule (validation and test)."""
        if stage == "fit":
            self.check_fit_settings()
        self.tasks = self.trainer.datamodule.tasks
        self.task_metrics = torch.nn.ModuleList(TaskMetrics(task) for task in self.tasks).to(self.device)

    def check_fit_settings(self) -> None:
        """Raise a ``ValueError`` for trainer settings a fit cannot run with."""
        if self.trainer.max_steps is None or self.trainer.max_steps <= 0:
            raise ValueError(
                f"trainer.max_steps must be a positive number of steps, got {self.trainer.max_steps}: the pruning "
                "phases are scheduled over a fixed number of steps"
            )
        settings = self.pruning_settings
        swaps_model = settings is not None and (settings.two_stage or settings.prune_at_recovery)
        if swaps_model and (self.trainer.world_size > 1 or is_sharded(self)):
            raise ValueError(
                "pruning.method baselines and pruning.prune_at_recovery swap in the pruned model mid-run, which works "
                "on one process only for now (not with several, nor with FSDP, where the model is sharded); train on "
                "one device, or set pruning.prune_at_recovery false (one_stage)"
            )
        if is_sharded(self) and self.distill_settings is not None and self.distill_settings.teacher == "corrected":
            raise ValueError(
                "distill.teacher corrected swaps whole adapter tensors, which FSDP shards; with FSDP use teacher "
                "tuned or base"
            )
        if is_sharded(self) and settings is not None and settings.importance == "taylor":
            raise ValueError(
                "pruning.importance taylor needs gradients of the frozen base weights next to the LoRA ones, which "
                "FSDP cannot reduce in one unit (bf16 base, fp32 LoRA); with FSDP use importance magnitude, random or "
                "null"
            )

    # ---- building --------------------------------------------------------------------------------------------

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
                self.structure,
                self.target.prune,
                self.target,
                pruning.logits,
                pruning.init_log_alpha,
                penalty_init=pruning.penalty_init,
            ).to(self.device)
            self.hooks = GateHooks(self.model)
        if is_sharded(self):  # FSDP2: after the hooks and the structure, which read whole modules
            shard(self.model, self.trainer.strategy)

    def lora_config(self) -> LoraConfig:
        settings = self.lora_settings
        return LoraConfig(
            r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=settings.targets
        )

    # ---- prune now (tailored.transition) ---------------------------------------------------------------------

    @property
    def pruned_now(self) -> bool:
        """The model is the physically pruned one (the transition happened)."""
        return self.transition is not None

    def prune_now(self, step: int, adapters: dict | None = None) -> None:
        """Replace the masked model by the smaller model it computes under the frozen gates, with fresh LoRA.

        ``adapters`` (a resumed run) are the LoRA tensors the model had when the transition happened. With
        distillation the dense model stays as the teacher; otherwise it is freed.
        """
        if adapters is not None:
            missing = {name for name, _ in self.model.named_parameters() if "lora_" in name} - set(adapters)
            unexpected = set(adapters) - {name for name, _ in self.model.named_parameters()}
            if missing or unexpected:
                raise ValueError(
                    f"the checkpoint's pre-transition adapters do not fit this model (missing {sorted(missing)[:3]}, "
                    f"unexpected {sorted(unexpected)[:3]}); resume with the config the checkpoint was written with"
                )
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
        dense, self.model = self.model, pruned
        if self.distill_settings is not None:
            self.teacher = dense.requires_grad_(False)
        else:
            del dense
        if self._trainer is not None and self.trainer.state.fn == "fit" and self.trainer.optimizers:
            self.trainer.strategy.setup_optimizers(self.trainer)  # the optimiser now tunes the new adapters

    def importance_scores(self, criterion: str) -> GateValues:
        """Scores of every unit under ``criterion`` (taylor: on ``calibration_batches`` training batches)."""
        batches = []
        if criterion == "taylor":
            loader = self.trainer.datamodule.calibration_loader(self.pruning_settings.calibration_batches)
            batches = [{k: v.to(self.device) for k, v in batch.items()} for batch in loader]
        scores = unit_scores(criterion, self.model, batches, seed=self.trainer.datamodule.seed)
        return GateValues(**{name: value.to(self.device) for name, value in scores.items()})

    # ---- schedule --------------------------------------------------------------------------------------------

    def phase_bounds(self) -> tuple[int, int]:
        """(first control step, first recovery step) for ``trainer.max_steps``; two-stage baselines recover only."""
        if self.pruning_settings.two_stage:
            return 0, 0
        total = self.trainer.max_steps
        recovery_start = round((1 - self.pruning_settings.recovery) * total)
        return round(self.pruning_settings.warmup * recovery_start), recovery_start

    def phase(self, step: int) -> str:
        control_start, recovery_start = self.phase_bounds()
        return "warmup" if step < control_start else "control" if step < recovery_start else "recovery"

    def on_train_start(self) -> None:
        """A resumed run draws the gate noise the interrupted run would have drawn next."""
        if self.resumed_random_state is not None:
            set_random_state(self.resumed_random_state)
            self.resumed_random_state = None

    def on_fit_start(self) -> None:
        """Dynamic batch loading's reference losses; then, on a fresh run, importance scores: the gates' prior
        (one-stage) or the baseline's pruning."""
        settings = self.pruning_settings
        data = self.trainer.datamodule
        if data.dynamic and data.reference_losses is None:
            data.reference_losses = self.dense_losses()
            print(
                "dynamic batch loading, dense reference losses:",
                dict(zip([t.name for t in self.tasks], data.reference_losses, strict=True)),
            )
        if settings is None or self.checkpoint_step > 0 or self.pruned_now or self.gates.is_frozen:
            return
        if settings.two_stage:  # prune once, to the target shape, by the baseline's scores
            scores = self.importance_scores(settings.method)
            self.gates.freeze(shape_gates(self.structure, self.target.shape, scores))
            self.prune_now(step=0)
        elif settings.importance is not None:
            self.gates.init_from_scores(self.importance_scores(settings.importance), settings.importance_spread)

    # ---- steps -----------------------------------------------------------------------------------------------

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """On the first recovery step: freeze the gates at the exact target, and maybe prune now."""
        if self.target is None or self.phase(self.global_step) != "recovery":
            return
        if not self.gates.is_frozen:
            self.log_ratios("sparsity/ratio_before_topk", self.gates.deterministic())
            self.gates.freeze(self.gates.target_gates())
        if self.pruning_settings.prune_at_recovery and not self.pruned_now:
            self.prune_now(step=self.global_step)

    def current_gates(self) -> GateValues:
        """Training gates: sampled while pruning, frozen during recovery."""
        return self.gates.frozen() if self.gates.is_frozen else self.gates.sample()

    def teacher_forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``[B, T, V]`` of the dense teacher (gates off), without gradient, and the ``corrected`` teacher's
        LM loss (with its graph: it trains the teacher's adapters; None for the other teachers).

        The teacher is the model itself before the transition, the dense model kept aside after it; its adapters
        are the current ones (``tuned``), none (``base``, and plain LoRA runs) or its own (``corrected``).
        """
        teacher = self.teacher if self.teacher is not None else self.model
        kind = self.distill_settings.teacher
        training = teacher.training
        teacher.eval()  # no LoRA dropout in the teacher
        try:
            if kind == "corrected":
                with self.corrected_teacher.swapped_into(teacher):
                    output = teacher(**batch)
                return output.logits.detach(), output.loss
            adapters_off = kind == "base" or self.target is None
            with torch.no_grad(), teacher.disable_adapter() if adapters_off else nullcontext():
                return teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, None
        finally:
            teacher.train(training)

    def evaluation_gates(self) -> GateValues:
        """Frozen gates once recovery began; before that, the rounded expected counts (no forcing)."""
        return self.gates.frozen() if self.gates.is_frozen else self.gates.deterministic()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        teacher_logits, teacher_loss = (None, None) if self.distill_settings is None else self.teacher_forward(batch)
        if self.target is not None and not self.pruned_now:
            self.hooks.activate(self.current_gates())  # until on_after_backward: checkpointing re-runs the forward
        output = self.model(**batch)
        lm_loss = loss = output.loss
        if teacher_logits is not None:
            settings = self.distill_settings
            distill = distillation_loss(output.logits, teacher_logits, batch["labels"], settings.temperature)
            loss = (1 - settings.weight) * lm_loss + settings.weight * distill
            self.log("train/distill_loss", distill)
        if teacher_loss is not None:  # the corrected teacher's adapters learn the domain next to the student
            loss = loss + teacher_loss
            self.log("train/teacher_loss", teacher_loss)
        if self.target is None:
            self.log("train/loss", loss, prog_bar=True)
            return loss
        phase = self.phase(self.global_step)
        if phase == "recovery":  # DDP needs a gradient for every trainable parameter; on_after_backward drops it
            loss = loss + 0.0 * sum(parameter.sum() for parameter in self.gates.parameters())
        else:
            control_start, _ = self.phase_bounds()
            warmup = min(1.0, self.global_step / max(1, control_start))
            regulariser, expected, target = self.gates.sparsity_loss(warmup)
            loss = loss + regulariser
            self.log("sparsity/regulariser", regulariser)
            self.log("sparsity/constraint_gap", (expected - target).abs().max())
            self.log("sparsity/target", 1 - warmup * (1 - self.target.fraction))
            self.log("lagrangian/lambda_1", self.gates.lambda_1.mean())
            self.log("lagrangian/lambda_2", self.gates.lambda_2.mean())
        self.log("train/lm_loss", lm_loss, prog_bar=True)
        self.log("train/loss", loss)
        self.log("train/phase", float(PHASES.index(phase)))
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.log_sparsity()
        return loss

    @torch.no_grad()
    def log_sparsity(self) -> None:
        """Expected and hard kept fractions of the prunable parameters, and per unit type."""
        probs = self.gates.keep_probabilities()
        expected = prunable_fraction(self.structure, self.target.prune, parameter_count(self.structure, probs))
        self.log("sparsity/expected_ratio", float(expected))
        self.log_ratios("sparsity/hard_ratio", self.evaluation_gates(), prog_bar=True)
        for name in self.target.prune:
            self.log(f"sparsity/kept_{name}", getattr(probs, name).mean())

    def log_ratios(self, name: str, gates: GateValues, prog_bar: bool = False) -> None:
        count = parameter_count(self.structure, gates.kept())
        self.log(name, float(prunable_fraction(self.structure, self.target.prune, count)), prog_bar=prog_bar)

    def on_after_backward(self) -> None:
        if self.target is None:
            return
        self.hooks.deactivate()
        if self.gates.is_frozen:  # the zero gradients of the recovery phase: the optimiser must not step on them
            for parameter in self.gates.parameters():
                parameter.grad = None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """FSDP shards and reduces the model's gradients only; the replicated gates' are averaged here."""
        if self.target is not None and is_sharded(self):
            average_gradients(self.gates.parameters())

    def optimizer_step(self, *args, **kwargs) -> None:
        """The step, then the logit clamp: before any callback (a checkpoint) sees the parameters."""
        super().optimizer_step(*args, **kwargs)
        if self.target is not None:
            self.gates.clamp_()

    def on_validation_epoch_start(self) -> None:
        self.held_out_gates = None if self.target is None or self.pruned_now else self.evaluation_gates()

    def on_test_epoch_start(self) -> None:
        """Test evaluates the model that export would save (:meth:`final_gates`)."""
        self.held_out_gates = None if self.target is None or self.pruned_now else self.final_gates()

    def _evaluation_step(self, batch: dict, dataloader_idx: int) -> None:
        """One held-out batch under :attr:`held_out_gates` (the dense model when None), set once per epoch."""
        task, metrics = self.tasks[dataloader_idx], self.task_metrics[dataloader_idx]
        with nullcontext() if self.held_out_gates is None else self.hooks.applied(self.held_out_gates):
            positions, targets = loss_positions(batch["labels"])
            logits = self.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=positions
            ).logits
            metrics.update_loss(logits, targets)
            if "option_input_ids" in batch:
                scores = option_log_likelihoods(self.model, batch)
                metrics.update_options(scores, batch["option_lengths"], batch["label"])
            if "references" in batch:
                tokenizer = self.trainer.datamodule.tokenizer
                answers = greedy_answers(
                    self.model, batch, tokenizer, task.max_new_tokens, task.stop, synced=is_sharded(self)
                )
                metrics.update_answers(answers, batch["references"])

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step(batch, dataloader_idx)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step(batch, dataloader_idx)

    def _log_evaluation(self, stage: str) -> None:
        """Log every task's metrics as ``<stage>/<task>/<metric>`` and keep them in :attr:`results`."""
        self.results, self.row_values = {}, {}
        for task, metrics in zip(self.tasks, self.task_metrics, strict=True):
            self.results[task.name] = metrics.compute()
            if stage == "test":
                self.row_values[task.name] = metrics.row_values()
            metrics.reset()
            for name, value in self.results[task.name].items():
                self.log(f"{stage}/{task.name}/{name}", value, prog_bar=stage == "val" and name == "loss")

    def on_validation_epoch_end(self) -> None:
        """Log the validation metrics (``tailored validate`` also writes them to ``val_results.json``); move the
        mixture weights (dynamic batch loading)."""
        self._log_evaluation("val")
        if self.trainer.state.fn == "validate":
            self._write_results("validation", {"val_results.json": self.results})
        data = self.trainer.datamodule
        if data.dynamic and not self.trainer.sanity_checking:
            data.update_weights([self.results[task.name]["loss"] for task in self.tasks])
            for task, weight in zip(self.tasks, data.weights, strict=True):
                self.log(f"data/weight/{task.name}", weight)

    def on_test_epoch_end(self) -> None:
        """Print the results; with a logger, also write them to ``<log dir>/test_results.json``, and the per-row
        values (paired comparisons of models tested on the same rows) to ``test_rows.json``."""
        self._log_evaluation("test")
        self._write_results("test", {"test_results.json": self.results, "test_rows.json": self.row_values})

    def _write_results(self, stage: str, files: dict[str, dict]) -> None:
        """Print :attr:`results` under ``stage``; with a logger, write ``files`` (name -> JSON) to the log dir."""
        log_dir = self.trainer.log_dir if self.trainer.loggers else None  # every rank: log_dir broadcasts
        if not self.trainer.is_global_zero:
            return
        print(format_results(self.results, stage))
        if log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            for name, values in files.items():
                (Path(log_dir) / name).write_text(
                    json.dumps(values, indent=2 if name.endswith("results.json") else None) + "\n"
                )

    @torch.no_grad()
    def dense_losses(self) -> list[float]:
        """Held-out loss of every task under the dense model (gates off): dynamic batch loading's reference."""
        losses = []
        for loader in self.trainer.datamodule.val_dataloader():
            total, tokens = 0.0, 0
            for batch in loader:
                batch = {
                    k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")
                }
                count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                total += float(self.model(**batch).loss) * count
                tokens += count
            losses.append(total / tokens)
        return losses

    # ---- optimisation ----------------------------------------------------------------------------------------

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW with one group per kind of trainable parameter; prints their sizes."""
        settings = self.optimizer_settings
        tuned = [p for p in self.model.parameters() if p.requires_grad]  # adapters, or every weight after pruning
        every_weight = self.pruned_now and self.pruning_settings.recovery_weights == "all"
        lr = settings.weights_lr if every_weight else settings.lora_lr
        groups = [{"name": "tuned", "params": tuned, "lr": lr, "weight_decay": settings.weight_decay}]
        if self.corrected_teacher is not None:
            teacher = list(self.corrected_teacher.parameters())
            groups.append({"name": "teacher", "params": teacher, "lr": settings.lora_lr, "weight_decay": 0.0})
        if self.target is not None:
            multipliers = [self.gates.lambda_1, self.gates.lambda_2]
            gate_params = [p for name, p in self.gates.named_parameters() if not name.startswith("lambda_")]
            gates_lr = settings.generator_lr if self.pruning_settings.logits == "generator" else settings.gates_lr
            groups.append({"name": "gates", "params": gate_params, "lr": gates_lr, "weight_decay": 0.0})
            groups.append(
                {"name": "multipliers", "params": multipliers, "lr": settings.multipliers_lr, "weight_decay": 0.0}
            )
        grouped = {id(p) for group in groups for p in group["params"]}
        stray = [name for name, p in self.named_parameters() if p.requires_grad and id(p) not in grouped]
        if stray:
            raise RuntimeError(f"trainable parameters outside the optimiser groups: {stray[:5]}")
        for group in groups:
            count = sum(p.numel() for p in group["params"])
            print(f"optimiser group {group['name']:<12} {len(group['params']):>5} tensors {count:>12,} parameters")
        return torch.optim.AdamW(groups)

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def trainable_state_keys(self) -> set[str]:
        """State-dict keys that a checkpoint holds: trainable parameters and the gates' buffers."""
        keys = {name for name, p in self.named_parameters() if p.requires_grad}
        return keys | {name for name, _ in self.named_buffers() if name.startswith("gates.")}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Drop the frozen base weights (reloaded from ``model`` on resume): checkpoints stay small."""
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["tailored_structure"] = None if self.structure is None else asdict(self.structure)
        checkpoint["tailored_rng"] = random_state()
        checkpoint["tailored_transition"] = self.transition

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Build the model first (load_from_checkpoint does not), then check the checkpoint fits it."""
        self.configure_model()
        self.checkpoint_step = checkpoint.get("global_step", 0)
        self.resumed_random_state = checkpoint.get("tailored_rng")
        saved = checkpoint.get("tailored_structure")
        if saved is not None and (self.structure is None or saved != asdict(self.structure)):
            raise ValueError(
                f"the checkpoint was written for a model of structure {saved}, but {self.model_name} has "
                f"{None if self.structure is None else asdict(self.structure)}; resume with the model the run started "
                "with"
            )
        transition = checkpoint.get("tailored_transition")
        if transition is not None and not self.pruned_now:  # replay the transition: the same pruned model again
            self.gates.freeze(GateValues(**transition["gates"]))
            self.prune_now(transition["step"], adapters=transition["adapters"])
        expected, found = self.trainable_state_keys(), set(checkpoint["state_dict"])
        if expected != found:
            missing, extra = sorted(expected - found)[:3], sorted(found - expected)[:3]
            raise ValueError(
                f"the checkpoint does not match this run's LoRA/pruning settings (missing {missing}, unexpected "
                f"{extra}); resume with the config the checkpoint was written with"
            )

    # ---- export ----------------------------------------------------------------------------------------------

    def final_gates(self) -> GateValues:
        """The gates the exported model realises: frozen ones, else those meeting the target exactly."""
        if self.target is None:
            return GateValues.ones(self.structure, device=self.device)
        return self.gates.frozen() if self.gates.is_frozen else self.gates.target_gates()

    @torch.no_grad()
    def export(self, path: str | Path, overwrite: bool = False, model: torch.nn.Module | None = None) -> dict:
        """Prune (merging LoRA), save model + tokenizer + report to ``path``; return the report.

        ``model``: an unsharded copy of :attr:`model` to export instead, merged or pruned without a further copy (FSDP:
        :func:`tailored.sharding.gathered_model`).
        """
        source, merge = (self.model, merged_copy) if model is None else (model, merged)
        if self.structure is None:  # a non-uniform export, tuned as it is: merge the adapters, nothing to prune
            pruned = merge(source)
            count = sum(parameter.numel() for parameter in pruned.parameters())
            report = {"source_model": self.model_name, "format": "tailored", "parameters": {"after": count}}
            report["trained_steps"] = max(self.global_step, self.checkpoint_step)
            save_pruned(pruned, path, tokenizer=load_tokenizer(self.model_name), report=report, overwrite=overwrite)
            return report
        gates = self.final_gates().map(lambda value: value.detach().float())
        # already pruned (maybe a tailored_* layout), or a gathered copy that keeps every unit: merge the adapters
        nothing_to_prune = self.pruned_now or (model is not None and self.target is None)
        pruned = merge(source) if nothing_to_prune else prune_model(source, gates)
        report = pruning_report(self.structure, gates, source=self.model_name)
        if self.target is not None:
            report["method"] = self.pruning_settings.method
            report["target"] = {
                "fraction_of_prunable": self.target.fraction,
                "shape": asdict(self.target.shape) if self.target.shape else None,
            }
            count = parameter_count(self.structure, gates.kept())
            report["kept_fraction_of_prunable"] = float(prunable_fraction(self.structure, self.target.prune, count))
        report["trained_steps"] = max(self.global_step, self.checkpoint_step)  # no trainer after load_from_checkpoint
        save_pruned(pruned, path, tokenizer=load_tokenizer(self.model_name), report=report, overwrite=overwrite)
        return report


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with its LoRA adapters merged into the weights, in eval mode (``model`` is unchanged)."""
    return merged(copy.deepcopy(model))


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its LoRA adapters merged into its weights in place, unwrapped, in eval mode."""
    return (model.merge_and_unload() if hasattr(model, "merge_and_unload") else model).eval()


def random_state() -> dict:
    """The torch random number generators' state (CPU, and every GPU's): the gate noise of the next steps."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_random_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def format_results(results: dict[str, dict[str, float]], stage: str = "test") -> str:
    """Per-task results as aligned text under ``<stage> results``, one line per task."""
    width = max(len(name) for name in results)
    lines = [
        f"{name.ljust(width)}  " + "  ".join(f"{metric} {value:.4g}" for metric, value in metrics.items())
        for name, metrics in results.items()
    ]
    return "\n".join([f"{stage} results", *lines])
