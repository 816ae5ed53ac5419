"""Helpers shared by tests in several folders: tiny-run configs, TensorBoard scalars, LoRA'd tiny models, bounds."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import yaml
from peft import LoraConfig, get_peft_model
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tailored.core.structure import GateValues

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.6


def write_config(path: Path, model_dir: Path, text: Path, **sections) -> Path:
    """A tiny-run config: 100 steps, target 0.6 of the prunable parameters; ``sections`` replace top-level keys."""
    config = {
        "seed_everything": 0,
        "model": {
            "model": str(model_dir),
            "pruning": {"target": TARGET, "round_to": 1},
            "optimizer": {"lora_lr": 0.001},
        },
        "data": {"tasks": [{"name": "words", "source": str(text)}], "seq_len": 32, "batch_size": 4},
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 100,
            "val_check_interval": 50,
            "log_every_n_steps": 5,
            "default_root_dir": str(path.parent / "run"),
            "enable_progress_bar": False,
        },
        "checkpoint": {"every_n_train_steps": 20},
    } | sections
    path.write_text(yaml.safe_dump(config))
    return path


def scalars(log_dir: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def with_lora(model):
    """peft LoRA on every projection, with random (non-zero) B so that merging matters."""
    config = LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False)
    return get_peft_model(model, config).eval()


BF16_ROUNDING_FACTOR = 4
"""Bound on max |pruned - masked| bf16 logits in units of :func:`rounding_sensitivity` (measured at most 0.81 on
twelve tiny models, Llama and Qwen3 with biases and LoRA; fp32's bound is 8, ``tests/test_prune.py``)."""


def uniform_gates(structure) -> GateValues:
    gates = GateValues.ones(structure)
    gates.groups[:, 0] = 0
    gates.channels[:, 1::2] = 0
    gates.channels *= 0.8
    gates.layers[1] = 0
    return gates


def non_uniform_gates(structure) -> GateValues:
    gates = uniform_gates(structure)
    gates.attn[0] = 0  # first layer without attention: the KV cache must still count tokens
    gates.groups[2, 1] = 0
    gates.hidden[::5] = 0
    return gates


EXACT_FP32 = 1e-5
"""Bound on max |pruned - masked| logits in float32 (issue 2), unless rounding alone moves the logits more."""


ROUNDING_FACTOR = 8
"""A difference above ``EXACT_FP32`` still counts as rounding up to this many times :func:`rounding_sensitivity`.

Masked and pruned models differ by float32 rounding amplified through the model (see :mod:`tailored.core.exactness`);
``python benchmarks/speed/exactness_scan.py`` measures the ratio over random cases of this file's test. A structural
error (a wrong slice, a gate folded twice, a bias left in an emptied block) is orders of magnitude above both."""


LOADERS = {
    "transformers": "from transformers import AutoModelForCausalLM\n"
    "model = AutoModelForCausalLM.from_pretrained(path).eval()",
    "remote code": "from transformers import AutoModelForCausalLM\n"
    "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()",
    "tailored": "import tailored\nmodel = tailored.load_pruned(path)",
}


def load_in_fresh_process(path: Path, loader: str, tokens: torch.Tensor, tmp_path: Path) -> dict:
    """Load ``path`` in a new Python process; return its logits, greedy generation and parameter count."""
    torch.save(tokens, tmp_path / "tokens.pt")
    template = textwrap.dedent(
        """
        import sys, torch
        path, work = sys.argv[1], sys.argv[2]
        {loader}
        tokens = torch.load(work + "/tokens.pt")
        with torch.no_grad():
            logits = model(tokens).logits
        generated = model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=5, do_sample=False)
        count = sum(p.numel() for p in model.parameters())
        torch.save({{"logits": logits, "generated": generated, "count": count, "class": type(model).__name__}},
                   work + "/out.pt")
        """
    )
    script = template.format(loader=LOADERS[loader])
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path)], check=True, env=env)
    return torch.load(tmp_path / "out.pt")


SYLLABLES = ["ka", "lo", "mi", "ne", "ta", "su", "ri", "po", "de", "gu", "an", "el"]


def syllable_lines(count: int, syllables: list[str], seed: int) -> list[str]:
    """``count`` lines of 8 made-up words of 1-3 ``syllables``, with some punctuation and capitals."""
    import random

    rng = random.Random(seed)
    words = ("".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(8 * count))
    lines = [" ".join(next(words) for _ in range(8)) for _ in range(count)]
    return [line.capitalize() + rng.choice([".", "?", ", and"]) for line in lines]


def byte_level_tokenizer(texts: list[str], vocab_size: int = 400, byte_fallback: bool = False):
    """A BPE tokenizer trained on ``texts`` (<pad>, <s>, </s> first): byte-level like SmolLM2 and Llama 3, or, with
    ``byte_fallback``, sentencepiece-style like Llama 2 (a metaspace pre-tokenizer, ``<0x00>`` .. ``<0xFF>`` for
    characters it has no token for)."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    backend = Tokenizer(models.BPE())
    if byte_fallback:
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials)
        backend.train_from_iterator(texts, trainer)
        trained = backend.get_vocab()
        pieces = specials + [f"<0x{byte:02X}>" for byte in range(256)]
        pieces += sorted((token for token in trained if token not in specials), key=trained.get)
        merges = [tuple(merge) for merge in json.loads(backend.to_str())["model"]["merges"]]
        backend = Tokenizer(models.BPE({token: i for i, token in enumerate(pieces)}, merges, byte_fallback=True))
        backend.add_special_tokens(specials)
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet)
        backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
