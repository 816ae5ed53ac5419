"""Domain vocabulary trimming: keep the tokens a domain uses, remove the other rows of the embedding and lm_head.

A small model spends a large share of its parameters on the vocabulary (SmolLM2-135M: 49,152 x 576, 21% of the
model), and a domain model reads and writes a fraction of those tokens (docs/vocabulary.md)::

    ids of the training split ───┐
    special and added tokens     ├─► kept ids ─► + merge ancestors ─► trimmed tokenizer: vocab and merges of the
    base pieces (256 bytes)      │   (every kept token stays         kept tokens, renumbered densely 0 .. K-1
    keep_top lowest ids          ┘    reachable by merges)        └► embedding, lm_head [V, d] -> [K, d] rows

Why training rows tokenize the same: byte-level BPE starts a word from its bytes and applies, again and again, the
lowest-ranked merge among adjacent pairs. Every merge that fires on a training word produces an ancestor of one of
its final tokens, so it is kept (its parts and its result are). The trimmed merges are the original ones in the
same order, minus merges that never fire on training text: at every step the merge the original tokenizer applies
is still the lowest-ranked one available, and the result is the same tokens, renumbered. Other text falls back
to smaller kept pieces, down to the bytes, so the trimmed tokenizer can encode any text and emits kept ids only.
Sentencepiece-style BPE tokenizers (Llama 2, Mistral) work the same with their byte-fallback tokens
``<0x00>`` .. ``<0xFF>`` as the base pieces.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers.pre_tokenizers import ByteLevel
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import AutoTokenizer, PreTrainedModel

from tailored.core.structure import unwrap

BYTE_FALLBACK_TOKENS = tuple(f"<0x{byte:02X}>" for byte in range(256))
"""The pieces a sentencepiece-style BPE tokenizer falls back to for a character it has no token for."""
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "decoder_start_token_id")
"""Keys of a model config or generation config that hold token ids (an int, a list of ints, or None)."""


def backend_spec(tokenizer) -> dict:
    """The fast tokenizer's ``tokenizer.json`` as a dict; ``ValueError`` for tokenizers trimming cannot rebuild."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"vocabulary trimming needs a fast (tokenizers) tokenizer; {type(tokenizer).__name__} is not one"
        )
    spec = json.loads(backend.to_str())
    kind = spec["model"]["type"]
    if kind != "BPE":
        raise ValueError(
            f"vocabulary trimming rebuilds BPE tokenizers (byte-level or byte-fallback); this tokenizer's model is "
            f"{kind} ({type(tokenizer).__name__}): set pruning.vocabulary null"
        )
    return spec


def base_pieces(spec: dict) -> set[str]:
    """The tokens any text can be spelled with: the byte-level alphabet or the byte-fallback tokens in the vocab."""
    vocab = spec["model"]["vocab"]
    if spec["model"].get("byte_fallback"):
        return {token for token in BYTE_FALLBACK_TOKENS if token in vocab}
    if "ByteLevel" in json.dumps(spec.get("pre_tokenizer")):
        return {token for token in ByteLevel.alphabet() if token in vocab}
    raise ValueError(
        "vocabulary trimming needs a byte-level BPE tokenizer (SmolLM2, Llama 3, Qwen) or a BPE tokenizer with "
        "byte fallback (Llama 2, Mistral), so that removed tokens can be spelled with kept ones; this BPE "
        "tokenizer has neither: set pruning.vocabulary null"
    )


def merge_pair(merge: str | list[str]) -> tuple[str, str]:
    """The two parts of a merge, stored as ``"a b"`` (older files) or ``["a", "b"]``."""
    first, second = merge.split(" ", 1) if isinstance(merge, str) else merge
    return first, second


def kept_token_ids(
    tokenizer, sequences: Iterable[Sequence[int]], keep_top: int = 0, always: Iterable[int] = ()
) -> list[int]:
    """The sorted ids a trimmed vocabulary keeps: every id of ``sequences`` (the training split's token ids), the
    added and special tokens, the tokens of the chat template's own text (a default system prompt), the base
    pieces, the ``keep_top`` lowest ids and ``always`` (a config's bos/eos/pad), closed under merge ancestry (both
    parts of the merge that makes a kept token are kept).

    ``keep_top``: in a BPE vocabulary ids follow the merge order, so the lowest ids are the pieces most frequent in
    the text the tokenizer was trained on (general text).
    """
    spec = backend_spec(tokenizer)
    vocab = spec["model"]["vocab"]
    tokens = {index: token for token, index in vocab.items()}
    kept = set(always) | {added["id"] for added in spec["added_tokens"]} | set(range(min(keep_top, len(vocab))))
    if getattr(tokenizer, "chat_template", None):
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": ""}], add_generation_prompt=True, tokenize=False
        )
        kept.update(tokenizer(chat, add_special_tokens=False)["input_ids"])
    for sequence in sequences:
        kept.update(int(index) for index in sequence)
    kept |= {vocab[token] for token in base_pieces(spec)}
    makers: dict[str, list[str]] = {}  # token -> the parts of every merge that makes it
    for first, second in map(merge_pair, spec["model"]["merges"]):
        makers.setdefault(first + second, []).extend((first, second))
    pending = [tokens[index] for index in kept if index in tokens]
    while pending:  # merge-ancestor closure
        for part in makers.get(pending.pop(), ()):
            if vocab[part] not in kept:
                kept.add(vocab[part])
                pending.append(part)
    return sorted(kept)


def renumbering(kept: Sequence[int]) -> dict[int, int]:
    """Old id -> new id: kept ids in their old order, numbered densely from 0."""
    return {old: new for new, old in enumerate(kept)}


def trimmed_spec(spec: dict, kept: Sequence[int]) -> dict:
    """``tokenizer.json`` restricted to ``kept`` ids: vocab, merges (parts and result kept), added tokens and the
    post-processor's special-token ids, renumbered."""
    new_id = renumbering(kept)
    spec = copy.deepcopy(spec)
    model = spec["model"]
    model["vocab"] = {token: new_id[index] for token, index in model["vocab"].items() if index in new_id}
    model["merges"] = [
        merge
        for merge in model["merges"]
        if all(token in model["vocab"] for token in (*merge_pair(merge), "".join(merge_pair(merge))))
    ]
    missing = [added["content"] for added in spec["added_tokens"] if added["id"] not in new_id]
    if missing:
        raise ValueError(f"the kept ids leave out the added tokens {missing[:3]}; keep every added token")
    for added in spec["added_tokens"]:
        added["id"] = new_id[added["id"]]
    for processor in post_processors(spec.get("post_processor")):
        for special in processor.get("special_tokens", {}).values():
            special["ids"] = [new_id[index] for index in special["ids"]]
    return spec


def post_processors(processor: dict | None) -> list[dict]:
    """The post-processor and, for a ``Sequence``, the processors inside it."""
    if processor is None:
        return []
    return [processor, *(inner for child in processor.get("processors", []) for inner in post_processors(child))]


def trimmed_tokenizer(tokenizer, kept: Sequence[int]):
    """A tokenizer of the ``kept`` ids only, renumbered densely (:func:`renumbering`): the same class, special
    tokens and chat template, saved and loaded back with ``AutoTokenizer`` as an export's tokenizer is."""
    spec = trimmed_spec(backend_spec(tokenizer), kept)
    new_id = renumbering(kept)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        (Path(folder) / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
        config_path = Path(folder) / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        if "added_tokens_decoder" in config:
            decoder = config["added_tokens_decoder"]
            config["added_tokens_decoder"] = {str(new_id[int(index)]): token for index, token in decoder.items()}
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
        return AutoTokenizer.from_pretrained(folder)


def config_token_ids(*configs) -> set[int]:
    """The token ids a model config and generation config name (bos, eos, pad, ...): a trimmed vocabulary keeps
    them."""
    ids = set()
    for config in filter(None, configs):
        for key in TOKEN_ID_KEYS:
            value = getattr(config, key, None)
            ids.update([value] if isinstance(value, int) else value or [])
    return ids


@torch.no_grad()
def trim_model(model: PreTrainedModel, kept: Sequence[int]) -> PreTrainedModel:
    """Keep only the ``kept`` rows of ``model``'s embedding and lm_head (tied or untied, with its bias), in place;
    ``config.vocab_size`` and the configs' token ids follow the renumbering. Works on the meta device.

    Row ``i`` of the new ``[K, d]`` matrices is row ``kept[i]`` of the old ``[V, d]`` ones, so the trimmed model's
    logits are the old logits at the kept ids.
    """
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is embedding.weight
    new_id = renumbering(kept)

    def rows(weight: torch.Tensor) -> nn.Parameter:
        selected = weight.index_select(0, torch.tensor(kept, device=weight.device))
        return nn.Parameter(selected, requires_grad=weight.requires_grad)

    new_embedding = nn.Embedding(len(kept), embedding.embedding_dim, device="meta")
    new_embedding.weight = rows(embedding.weight)
    new_embedding.padding_idx = new_id.get(embedding.padding_idx)
    model.set_input_embeddings(new_embedding)
    new_head = nn.Linear(head.in_features, len(kept), bias=head.bias is not None, device="meta")
    new_head.weight = new_embedding.weight if tied else rows(head.weight)
    if head.bias is not None:
        new_head.bias = rows(head.bias)
    model.set_output_embeddings(new_head)
    model.config.vocab_size = len(kept)
    for config in filter(None, (model.config, getattr(model, "generation_config", None))):
        for key in TOKEN_ID_KEYS:
            value = getattr(config, key, None)
            if value is not None:
                setattr(config, key, new_id[value] if isinstance(value, int) else [new_id[index] for index in value])
    return model


def mask_removed_logits(model: nn.Module, kept: Sequence[int]) -> RemovableHandle:
    """A forward hook on ``model``'s lm_head that, in training mode, sets the logits ``[B, T, V]`` of removed ids to
    the dtype's lowest value: the LM loss is then normalised over the kept ids, as the trimmed export's is.
    Evaluation (eval mode) sees every logit, since held-out rows encoded by the full tokenizer hold removed ids."""
    head = unwrap(model).get_output_embeddings()
    removed = torch.ones(head.out_features, dtype=torch.bool)
    removed[list(kept)] = False

    def hook(module: nn.Module, inputs, logits: torch.Tensor) -> torch.Tensor | None:
        if not module.training:
            return None
        return logits.masked_fill(removed.to(logits.device), torch.finfo(logits.dtype).min)

    return head.register_forward_hook(hook)
