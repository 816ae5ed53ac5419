"""Measuring tools of ``benchmarks/speed/speed.py``: clocks, peak memory, per-op profiles, FLOP counts, random models.

Peak memory is the most bytes of tensors alive at once, above the level where measuring began:

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
- CPU: the caching-free CPU allocator reports every allocation and free to ``torch.profiler`` (``profile_memory``);
  their running sum in time order peaks where the tensors alive peak. ``tracemalloc`` would see none of it (tensor
  storage is not Python memory), and the RSS high-water mark counts the whole process (every model the benchmark
  holds, the allocator's reuse of freed pages), so neither isolates one step of one model.

A model's memory is then ``static`` (its unique parameter, buffer and optimiser-state storages) + the step's peak
above that: the same decomposition on CPU and CUDA, and independent of what else the process holds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

MIB = 2**20


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that a clock read after it covers them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(run: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call of ``run``, queued device work included."""
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def alternated_medians(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median of the seconds each run returns, over ``repeats`` rounds; every round calls each run once, starting one
    later in the order each round, so that drift (heat, other load) and order effects fall on every run alike. One
    untimed round first warms up caches and lazy initialisation."""
    names = list(runs)
    for name in names:
        runs[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(runs[name]())
    return {name: statistics.median(values) for name, values in times.items()}


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied and viewed tensors counted once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor of the optimiser's state (Adam's moments and steps)."""
    return [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]


@dataclass
class Measurement:
    """What :func:`measured` found: peak bytes above the start, and self time per operator (milliseconds)."""

    peak_bytes: int = 0
    op_ms: dict[str, float] = field(default_factory=dict)


@contextmanager
def measured(device: torch.device) -> Iterator[Measurement]:
    """Profile the ``with`` block: its peak tensor memory above the level at entry, and its time per operator
    (self CPU time; self device time on CUDA). Profiling slows the block: time it separately."""
    result = Measurement()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    with profile(activities=activities, profile_memory=device.type == "cpu") as profiler:
        yield result
        synchronize(device)
    if device.type == "cuda":
        result.peak_bytes = torch.cuda.max_memory_allocated(device) - start
    else:
        result.peak_bytes = _cpu_peak(profiler)
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    result.op_ms = {event.key: getattr(event, attribute) / 1e3 for event in profiler.key_averages()}


def _cpu_peak(profiler: profile) -> int:
    """Highest running sum of the CPU allocator's allocations and frees recorded by ``profiler``."""
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.device_type() == torch.autograd.DeviceType.CPU:
            running += event.nbytes()
            peak = max(peak, running)
    return peak


def extra_ops(mine: dict[str, float], reference: dict[str, float], top: int = 8) -> dict[str, float]:
    """The operators on which ``mine`` spends the most milliseconds more than ``reference``, largest first."""
    extra = {name: mine[name] - reference.get(name, 0.0) for name in mine}
    ranked = sorted(extra.items(), key=lambda item: -item[1])[:top]
    return {name: round(ms, 1) for name, ms in ranked if ms > 0}


def forward_flops(config, tokens: int, context: float) -> float:
    """FLOPs of ``tokens`` forward positions of a LLaMA-family model (``config``), each attending over ``context``
    positions on average.

    Per position and layer: q/o ``2 * d * H * dh``, k/v ``2 * d * Hkv * dh``, MLP ``3 * d * f`` multiply-adds, and
    attention ``2 * H * dh * context`` (scores and weighted values); plus ``lm_head``, ``d * V``. A multiply-add is
    2 FLOPs. Norms, RoPE, softmax and the embedding lookup are left out (under 1% here).
    """
    d, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    projections = d * head_dim * 2 * (heads + kv_heads) + 3 * d * config.intermediate_size
    attention = 2 * heads * head_dim * context
    return 2.0 * tokens * (config.num_hidden_layers * (projections + attention) + d * config.vocab_size)


def prefill_flops(config, batch: int, length: int) -> float:
    """FLOPs of a causal forward over ``batch`` sequences of ``length`` tokens (position p sees p + 1 positions)."""
    return forward_flops(config, batch * length, (length + 1) / 2)


def decode_flops(config, batch: int, prompt: int, new_tokens: int) -> float:
    """FLOPs of ``new_tokens`` single-token steps with a KV cache after a ``prompt``-token prefill."""
    return forward_flops(config, batch * new_tokens, prompt + (new_tokens + 1) / 2)


def parameter_count(config) -> int:
    """Parameters of a causal LM built from ``config`` (on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def random_llama(
    path: Path,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Path:
    """Save a randomly initialised Llama (head_dim = hidden / heads, untied) with a word-level tokenizer to
    ``path``: a model folder that ``tailored`` loads like any other. Nothing is downloaded."""
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path)
    word_tokenizer(vocab).save_pretrained(path)
    return path


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """Words ``w3 .. w{vocab-1}`` and <pad>, <s>, </s> as ids 0, 1, 2: enough for export to save a tokenizer."""
    words = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab)}
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
