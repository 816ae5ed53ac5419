"""Every setting of a run, as the dataclasses the CLI reads from YAML, with the checks that need no weights.

``TailoredModule(model, dtype, lora, pruning, optimizer, distill, gradient_checkpointing)`` takes these; each
``check()`` raises a ``ValueError`` that names the setting and the fix, before any weight loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tailored.core.gates import LOGIT_SOURCES, UNIT_TYPES
from tailored.core.importance import CRITERIA
from tailored.core.lora import PROJECTIONS
from tailored.core.losses import CHUNK_ELEMENTS
from tailored.core.structure import ModelStructure, structure_from_config
from tailored.core.targets import ALLOCATIONS, SparsityTarget, reinvested_fraction, resolve_target
from tailored.models import check_model_name, is_pruned_export, load_config

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
class VocabularySettings:
    """Domain vocabulary trimming (docs/vocabulary.md): the export keeps the tokens of the training split, the
    special and byte-level tokens and the merges that build them; the other rows of the embedding and lm_head go."""

    keep_top: int = 0
    """Also keep the base tokenizer's this many lowest ids (its most frequent pieces: general text stays short)."""
    reinvest: bool = False
    """Give the rows trimming removes to the pruned units: the export has the size ``pruning.target`` gives without
    trimming, with more KV groups and channels (the target's share of the prunable parameters is raised by the
    rows' count, :func:`tailored.core.targets.reinvested_fraction`, once the kept tokens are counted). false: the
    trimming comes on top of the target, a smaller export."""

    def check(self) -> None:
        """Raise a ``ValueError`` naming the setting that cannot work."""
        if self.keep_top < 0:
            raise ValueError(f"pruning.vocabulary.keep_top must be >= 0 (0: the domain's tokens), got {self.keep_top}")


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
    allocation: str = "learned"
    """Uniform mode with a target fraction: learned (one budget over every pruned unit; how many KV groups,
    channels, hidden dims and layers to keep is learned for the domain, the same counts in every layer) or
    proportional (every pruned type keeps the same share of its units: a shape fixed before training). The
    two-stage baselines prune to the proportional shape."""
    final_units: str = "gates"
    """one_stage, uniform: which units fill the final shape when the gates freeze: gates (the highest gate logits,
    at their soft values) or importance (the units the importance scores rank highest, at 1: the learned shape with
    the two-stage baseline's choice of units)."""
    settle_steps: int | None = None
    """one_stage: decide, then prune: freeze the gates (and prune, with prune_at_recovery) as soon as the exact
    mask has stayed the same for this many control-phase steps with the budget met within 0.01; the remaining
    steps are recovery. null: at the scheduled recovery start only."""
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
    vocabulary: VocabularySettings | None = None
    """Trim the vocabulary to the domain's tokens in the same export (embedding and lm_head rows, a rebuilt
    tokenizer); in training the removed tokens' logits are masked. null: keep every token."""

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
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"pruning.allocation must be one of {', '.join(ALLOCATIONS)}; got {self.allocation!r}")
        if self.final_units not in ("gates", "importance"):
            raise ValueError(f"pruning.final_units must be gates or importance; got {self.final_units!r}")
        if self.final_units == "importance" and (self.importance is None or not self.uniform):
            raise ValueError(
                "pruning.final_units importance fills a uniform shape by the importance scores: it needs "
                "uniform: true and pruning.importance (taylor, magnitude or random); or set final_units: gates"
            )
        if self.settle_steps is not None and self.settle_steps < 1:
            raise ValueError(f"pruning.settle_steps must be >= 1 (or null: no early decision), got {self.settle_steps}")
        if self.settle_steps is not None and self.method != "one_stage":
            raise ValueError(
                f"pruning.settle_steps decides when learned gates freeze; the {self.method} baseline prunes at step 0: "
                "set settle_steps null"
            )
        if self.importance is not None and self.importance not in CRITERIA:
            raise ValueError(
                f"pruning.importance must be one of {', '.join(CRITERIA)} or null, got {self.importance!r}"
            )
        if self.recovery_weights not in ("lora", "all"):
            raise ValueError(f"pruning.recovery_weights must be lora or all, got {self.recovery_weights!r}")
        if self.calibration_batches < 1:
            raise ValueError(f"pruning.calibration_batches must be >= 1, got {self.calibration_batches}")
        if self.vocabulary is not None:
            self.vocabulary.check()
            if self.vocabulary.reinvest and (self.target is None or "hidden" in self.units):
                raise ValueError(
                    "pruning.vocabulary.reinvest raises pruning.target (a fraction) by the trimmed rows, counted with "
                    "the hidden size unpruned: give pruning.target, not target_shape, and leave hidden out of "
                    "pruning.units; or set reinvest false"
                )
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


SCHEDULES = ("constant", "cosine")


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
    schedule: str = "constant"
    """The tuned weights' learning rate over the run (tailored.train.optimization.learning_rate_factor):
    ``constant``, or ``cosine``: constant until the final model's tuning starts (step 0 without pruning or with a
    two-stage baseline, the step the gates freeze in a one-stage run), then down to a tenth at
    ``trainer.max_steps``."""
    warmup_steps: int = 0
    """Steps over which the tuned weights' learning rate rises linearly from 0 to its rate (0: none)."""

    def check(self) -> None:
        """Raise a ``ValueError`` naming the first learning rate, decay or schedule that cannot work."""
        for name in ("lora_lr", "gates_lr", "generator_lr", "weights_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"optimizer.{name} must be positive, got {getattr(self, name)}")
        for name in ("multipliers_lr", "weight_decay", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"optimizer.{name} must be >= 0, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optimizer.schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")


TEACHERS = ("tuned", "base", "corrected")


@dataclass
class DistillSettings:
    """Distillation from the dense teacher (the gates off) on the positions that carry the LM loss."""

    weight: float = 0.5
    """Share of the distillation loss: loss = (1 - weight) * LM loss + weight * KL. 1 distils only."""
    temperature: float = 2.0
    """Softmax temperature of teacher and student (NutePrune uses 2)."""
    teacher: str = "tuned"
    """tuned: the dense weights with the current LoRA adapters; base: adapters off (the pretrained model);
    corrected: the dense weights with adapters of the teacher's own, trained on the LM loss in the same steps
    (tailored.train.teacher; one more forward and backward per step). Which one helps depends on whether the
    pretrained model can already do the domain's tasks: docs/quality.md has the measurements."""

    def check(self) -> None:
        """Raise a ``ValueError`` naming the first setting that cannot work."""
        if not 0 < self.weight <= 1:
            raise ValueError(f"distill.weight is the share of the distillation loss, in (0, 1]; got {self.weight}")
        if self.temperature <= 0:
            raise ValueError(f"distill.temperature must be positive, got {self.temperature}")
        if self.teacher not in TEACHERS:
            raise ValueError(f"distill.teacher must be one of {', '.join(TEACHERS)}; got {self.teacher!r}")


def check_settings(
    lora: LoraSettings,
    pruning: PruningSettings | None,
    optimizer: OptimizerSettings,
    distill: DistillSettings | None,
    dtype: str,
    gradient_checkpointing: bool,
) -> None:
    """Raise a ``ValueError`` for the first setting, or combination of settings, that cannot work."""
    for settings in (lora, pruning, optimizer, distill):
        if settings is not None:
            settings.check()
    if distill is not None and pruning is not None and pruning.vocabulary is not None:
        raise ValueError(
            "pruning.vocabulary masks the removed tokens in the student's training logits, which the distillation "
            "teacher's do not have; set --model.distill null or --model.pruning.vocabulary null"
        )
    if distill is not None and distill.teacher == "corrected" and gradient_checkpointing:
        raise ValueError(
            "distill.teacher corrected swaps the teacher's adapters in for its forward, which gradient "
            "checkpointing would replay with the student's; set gradient_checkpointing false or use teacher tuned"
        )
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16")


def compile_backend(compile: bool | str) -> str | None:
    """The ``torch.compile`` backend ``model.compile`` asks for (``true``: inductor), or None for no compiling;
    a one-line error for a backend torch does not have."""
    if compile is False:
        return None
    backend = "inductor" if compile is True else compile
    if backend not in torch._dynamo.list_backends(exclude_tags=()):  # the debugging ones (aot_eager) too
        raise ValueError(
            f"model.compile {compile!r} is not a torch.compile backend; use true (inductor), false, or one of "
            f"{', '.join(torch._dynamo.list_backends())}, aot_eager"
        )
    return backend


def check_fit(
    max_steps: int | None,
    pruning: PruningSettings | None,
    distill: DistillSettings | None,
    processes: int,
    sharded: bool,
    warmup_steps: int = 0,
) -> None:
    """Raise a ``ValueError`` for trainer settings a fit cannot run with (``processes``: the world size;
    ``sharded``: FSDP; ``warmup_steps``: the learning rate's, ``optimizer.warmup_steps``)."""
    if max_steps is None or max_steps <= 0:
        raise ValueError(
            f"trainer.max_steps must be a positive number of steps, got {max_steps}: the pruning phases are "
            "scheduled over a fixed number of steps"
        )
    if warmup_steps >= max_steps:
        raise ValueError(
            f"optimizer.warmup_steps ({warmup_steps}) must be below trainer.max_steps ({max_steps}); lower it"
        )
    swaps_model = pruning is not None and (pruning.two_stage or pruning.prune_at_recovery)
    if swaps_model and (processes > 1 or sharded):
        raise ValueError(
            "pruning.method baselines and pruning.prune_at_recovery swap in the pruned model mid-run, which works "
            "on one process only for now (not with several, nor with FSDP, where the model is sharded); train on "
            "one device, or set pruning.prune_at_recovery false (one_stage)"
        )
    if sharded and distill is not None and distill.teacher == "corrected":
        raise ValueError(
            "distill.teacher corrected swaps whole adapter tensors, which FSDP shards; with FSDP use teacher "
            "tuned or base"
        )
    if sharded and pruning is not None and pruning.importance == "taylor":
        raise ValueError(
            "pruning.importance taylor needs gradients of the frozen base weights next to the LoRA ones, which "
            "FSDP cannot reduce in one unit (bf16 base, fp32 LoRA); with FSDP use importance magnitude, random or "
            "null"
        )


def model_target(
    model: str, pruning: PruningSettings | None, kept_tokens: int | None = None
) -> tuple[ModelStructure | None, SparsityTarget | None]:
    """The structure of ``model`` read from its config (None for a non-uniform tailored export, which is tuned and
    evaluated as it is) and the sparsity target ``pruning`` resolves to; ``ValueError`` before any weight loads.
    ``kept_tokens``: the size of the trimmed vocabulary, once counted, which ``pruning.vocabulary.reinvest`` adds to
    the target (before that, and without reinvest, the target is ``pruning.target`` as given)."""
    check_model_name(model)
    config = load_config(model)
    if is_pruned_export(config):
        if pruning is not None:
            raise ValueError(
                f"{model} is a non-uniform tailored export ({config.model_type}): its layers differ in shape and "
                "cannot be pruned again; tune or evaluate it with --model.pruning null, or prune the original model"
            )
        return None, None
    structure = structure_from_config(config)
    if pruning is None:
        return structure, None
    units = tuple(pruning.units)
    allocation = "proportional" if pruning.two_stage else pruning.allocation  # a baseline prunes to a fixed shape
    fraction = pruning.target
    if kept_tokens is not None and pruning.vocabulary is not None and pruning.vocabulary.reinvest:
        fraction = reinvested_fraction(structure, units, pruning.target, kept_tokens)
        if fraction >= 1:
            raise ValueError(
                f"pruning.vocabulary.reinvest: the rows of the {structure.vocab_size - kept_tokens:,} trimmed tokens "
                f"would raise pruning.target {pruning.target:g} to {fraction:.3f} of the prunable parameters, more "
                "than there are; lower pruning.target or set reinvest false"
            )
    return structure, resolve_target(structure, units, fraction, pruning.target_shape, pruning.uniform,
                                     pruning.round_to, allocation)  # fmt: skip


def projection_widths(config) -> dict[str, tuple[int, int]]:
    """``{projection: (in_features, out_features)}`` of each decoder projection, read from a model config (the
    smallest layer's, for a non-uniform export whose ``layer_shapes`` differ; projections every layer lost are left
    out)::

        q_proj  hidden -> heads * head_dim        o_proj     heads * head_dim -> hidden
        k_proj  hidden -> kv_heads * head_dim     gate/up    hidden -> intermediate
        v_proj  hidden -> kv_heads * head_dim     down_proj  intermediate -> hidden
    """
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    groups, channels = [kv_heads], [config.intermediate_size]
    shapes = getattr(config, "layer_shapes", None)
    if shapes:  # a non-uniform export: 0 marks a removed block
        groups = [shape["num_key_value_heads"] for shape in shapes if shape["num_key_value_heads"]]
        channels = [shape["intermediate_size"] for shape in shapes if shape["intermediate_size"]]
    widths = {}
    if groups:
        kv, n_rep = min(groups), heads // kv_heads
        widths |= {"q_proj": (hidden, kv * n_rep * head_dim), "k_proj": (hidden, kv * head_dim),
                   "v_proj": (hidden, kv * head_dim), "o_proj": (kv * n_rep * head_dim, hidden)}  # fmt: skip
    if channels:
        inner = min(channels)
        widths |= {"gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden)}
    return widths


def check_lora_rank(lora: LoraSettings, config) -> None:
    """Refuse a ``lora.rank`` above the width (``min(in_features, out_features)``) of the narrowest projection in
    ``lora.targets``: an update ``B A`` of a higher rank spends memory and time on nothing it can express."""
    widths = {name: min(shape) for name, shape in projection_widths(config).items() if name in lora.targets}
    if not widths:
        return
    narrowest = min(widths, key=widths.get)
    if lora.rank > widths[narrowest]:
        inputs, outputs = projection_widths(config)[narrowest]
        raise ValueError(
            f"lora.rank {lora.rank} is larger than {narrowest}'s width {widths[narrowest]} (in {inputs}, out "
            f"{outputs} features), the highest rank its update can have; set --model.lora.rank "
            f"{widths[narrowest]} or less, or leave {narrowest} out of lora.targets"
        )


def parameter_count(config) -> int:
    """Parameters of a model of ``config`` (embeddings, projections, norms, lm_head; biases left out)."""
    hidden, vocab, heads = config.hidden_size, config.vocab_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    n_rep = heads // config.num_key_value_heads
    uniform = {"num_key_value_heads": config.num_key_value_heads, "intermediate_size": config.intermediate_size}
    shapes = getattr(config, "layer_shapes", None) or [uniform] * config.num_hidden_layers
    total = vocab * hidden * (1 if config.tie_word_embeddings else 2) + hidden
    for shape in shapes:
        kv, inner = shape["num_key_value_heads"], shape["intermediate_size"]
        total += 2 * hidden * kv * head_dim * (n_rep + 1) + 3 * hidden * inner + 2 * hidden
    return total


ACTIVATION_FACTOR = 8
"""Activation values kept per token, layer and hidden unit for the backward pass (norm inputs, q/k/v, attention
output, MLP inputs): a lower bound of what a LLaMA layer keeps (about 20 for SmolLM2 by the term-by-term count of
benchmarks/speed/memory_arithmetic.py), so that only clear overshoots are refused."""
CHECKPOINTED_ACTIVATION_FACTOR = 1
"""The same with gradient checkpointing: each layer keeps its input only."""
HEAD_TEMPORARIES = 4
"""``[C, V]`` float32 tensors the chunked LM loss holds at once (tailored.core.losses.HeadLosses: the logits, the
cross-entropy's log-softmax, the softmax that becomes their gradient, its cast); distillation about doubles them."""


def training_memory(
    config,
    batch_size: int,
    seq_len: int,
    dtype: str,
    lora: LoraSettings,
    distill: DistillSettings | None,
    gradient_checkpointing: bool,
    shards: int = 1,
) -> int:
    """Estimated peak bytes of one training step on one device (a lower bound: only clear overshoots are refused)::

        weights     = parameters * bytes(dtype) / shards              frozen base weights (FSDP: sharded)
        lora        = 4 * 4 bytes * rank * layers * sum(in + out)     fp32 adapters, gradients, two Adam moments
        head        = k * 4 bytes * min(B * T, C) * vocab             the chunked losses' fp32 [C, vocab] temporaries
                      + 8 bytes * B * T * hidden                      (k = 4, 8 with distill; C = CHUNK_ELEMENTS //
                                                                      vocab): the final norm's fp32 input, the hidden
                                                                      states the head reads and their gradient
        activations = c * bytes(dtype) * B * T * hidden * layers      kept for the backward; twice with the
                      * (2 if distill.teacher is corrected)           corrected teacher (a backward of its own)
        total       = weights + lora + head + activations

    ``c`` is :data:`ACTIVATION_FACTOR`, or :data:`CHECKPOINTED_ACTIVATION_FACTOR` with gradient checkpointing;
    ``lora`` sums over the projections in ``lora.targets``; ``B``, ``T``: ``data.batch_size``, ``data.seq_len``.
    """
    width = getattr(torch, dtype).itemsize
    tokens, layers = batch_size * seq_len, config.num_hidden_layers
    adapted = sum(inputs + outputs for name, (inputs, outputs) in projection_widths(config).items()
                  if name in lora.targets)  # fmt: skip
    weights = parameter_count(config) * width // shards
    adapters = 4 * 4 * lora.rank * adapted * layers
    head = head_bytes(tokens, config.hidden_size, config.vocab_size, distill is not None)
    factor = CHECKPOINTED_ACTIVATION_FACTOR if gradient_checkpointing else ACTIVATION_FACTOR
    corrected = distill is not None and distill.teacher == "corrected"
    activations = factor * width * tokens * config.hidden_size * layers * (2 if corrected else 1)
    return weights + adapters + head + activations


def head_bytes(tokens: int, hidden_size: int, vocab_size: int, distill: bool) -> int:
    """Bytes of the chunked losses' head for ``tokens`` tokens (tailored.core.losses): :data:`HEAD_TEMPORARIES`
    fp32 ``[C, V]`` temporaries of one chunk (twice with distillation; ``C = CHUNK_ELEMENTS // V``, or fewer
    tokens), and 8 bytes a token and hidden dim (the final norm's fp32 input, the hidden states the head reads and
    their gradient)."""
    temporaries = HEAD_TEMPORARIES * (2 if distill else 1)
    return temporaries * 4 * min(tokens, CHUNK_ELEMENTS // vocab_size) * vocab_size + 8 * tokens * hidden_size


def available_memory(device: torch.device) -> int | None:
    """Free bytes on ``device``: a GPU's free memory (``torch.cuda.mem_get_info``), or the machine's available
    memory for the CPU (psutil when installed, else ``MemAvailable`` of /proc/meminfo); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(needed: int, available: int | None, device: torch.device, processes: int = 1) -> None:
    """Refuse a training step that needs more than the device has (``processes`` runs on one CPU machine each
    need ``needed``); nothing is refused when the free memory is unknown."""
    total = needed * (processes if device.type == "cpu" else 1)
    if available is None or total <= available:
        return
    where = "the machine" if device.type == "cpu" else str(device)
    each = f" ({processes} processes of {gigabytes(needed)})" if total != needed else ""
    raise ValueError(
        f"a training step needs about {gigabytes(total)}{each} but {where} has {gigabytes(available)} free; use "
        "a smaller data.batch_size or data.seq_len, --model.gradient_checkpointing true, or --model.dtype bfloat16"
    )


def gigabytes(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**27 else f"{size / 2**20:.0f} MiB"
