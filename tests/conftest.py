"""Tiny random LLaMA-family models built in-process; nothing is downloaded."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def tiny_model(
    family: str = "llama",
    num_layers: int = 3,
    num_kv_heads: int = 2,
    n_rep: int = 2,
    head_dim: int = 4,
    intermediate_size: int = 24,
    vocab_size: int = 64,
    tied: bool = False,
    bias: bool = False,
    seed: int = 0,
    weight_std: float = 0.3,
    hidden_size: int | None = None,
    sliding_window: int | None = None,
):
    """A random causal LM; every tensor (norms and biases too) is random so that any slicing error shows.

    Weights and biases are drawn from N(0, ``weight_std``), norm weights from U(0.5, 1.5).

    ``bias`` gives Llama q/k/v/o and MLP biases (``attention_bias``/``mlp_bias``) and Qwen3 q/k/v/o biases;
    Qwen2 always has q/k/v biases. ``hidden_size`` defaults to ``num_heads * head_dim`` (Llama's config insists on
    a multiple of the head count; the other families take any). ``sliding_window`` (not Llama): Mistral's window
    on every layer, Qwen2/Qwen3's on layers 1.. (layer 0 keeps full attention).
    """
    config_class, model_class = FAMILIES[family]
    num_heads = num_kv_heads * n_rep
    config = config_class(
        vocab_size=vocab_size,
        hidden_size=hidden_size or num_heads * head_dim,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        tie_word_embeddings=tied,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **family_options(family, bias, sliding_window),
    )
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
            else:
                parameter.normal_(0.0, weight_std)
    return model.eval()


def family_options(family: str, bias: bool, sliding_window: int | None) -> dict:
    """Config keys for :func:`tiny_model`'s ``bias`` and ``sliding_window`` in each family's spelling."""
    options = {"llama": {"attention_bias": bias, "mlp_bias": bias}, "qwen3": {"attention_bias": bias}}.get(family, {})
    if sliding_window is None:
        return options
    if family == "llama":
        raise ValueError("Llama has no sliding-window attention")
    if family == "mistral":
        return options | {"sliding_window": sliding_window}
    return options | {"use_sliding_window": True, "sliding_window": sliding_window, "max_window_layers": 1}


def tiny_tokenizer(vocab_size: int = 64) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``w3 .. w{vocab_size-1}`` with <pad>, <s>, </s> as ids 0, 1, 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tokens() -> torch.Tensor:
    """Two sequences of 9 token ids, ``[2, 9]``."""
    return torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama (GQA 4:2, tied) with its word-level tokenizer: a model folder ``tailored fit`` can use."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model(num_layers=3, num_kv_heads=2, n_rep=2, head_dim=8, intermediate_size=64, tied=True)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory):
    """200 lines of 20 random words of the tiny tokenizer's vocabulary."""
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "words.txt"
    lines = (" ".join(f"w{rng.randrange(3, 64)}" for _ in range(20)) for _ in range(200))
    path.write_text("\n".join(lines))
    return path
