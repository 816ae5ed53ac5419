"""Domain vocabulary trimming: the kept ids, the rebuilt tokenizer, the sliced embedding and lm_head, the export.

Tiny BPE tokenizers trained in-process (byte-level and byte-fallback) with tiny random models, then the real
SmolLM2 tokenizer and model on the medical rows of ../shared/data.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model, tiny_tokenizer
from helpers import ROOT, SYLLABLES, byte_level_tokenizer, syllable_lines, uniform_gates
from transformers import AutoModelForCausalLM, AutoTokenizer

from tailored.core.export import REPORT_NAME, pruning_report, save_pruned
from tailored.core.prune import prune_model
from tailored.core.structure import describe
from tailored.core.vocabulary import (
    config_token_ids,
    kept_token_ids,
    mask_removed_logits,
    renumbering,
    trim_model,
    trimmed_tokenizer,
)
from tailored.models import cache_dir

GENERAL = syllable_lines(300, SYLLABLES, seed=0)
"""What the tiny tokenizers are trained on: every syllable."""
DOMAIN = syllable_lines(60, SYLLABLES[:6], seed=1)
"""The domain's training rows: half of the syllables."""
HELD_OUT = syllable_lines(20, SYLLABLES[:8], seed=2)
"""Held-out rows, with syllables the domain never used."""
OUT_OF_DOMAIN = "Delgu anel ripo, ELPO? Ünïcödé 東京 🙂 tab\there\nnew line  two spaces"


@pytest.fixture(scope="module", params=[False, True], ids=["byte-level", "byte-fallback"])
def tokenizer(request):
    return byte_level_tokenizer(GENERAL, byte_fallback=request.param)


@pytest.fixture(scope="module")
def kept(tokenizer) -> list[int]:
    return kept_token_ids(tokenizer, [tokenizer(row)["input_ids"] for row in DOMAIN])


def test_training_rows_tokenize_to_the_renumbered_ids(tokenizer, kept):
    trimmed, new_id = trimmed_tokenizer(tokenizer, kept), renumbering(kept)
    assert len(trimmed) == len(kept) < len(tokenizer)
    for row in DOMAIN:
        assert trimmed(row)["input_ids"] == [new_id[index] for index in tokenizer(row)["input_ids"]]


def test_other_text_gets_kept_pieces_only_and_decodes_back(tokenizer, kept):
    trimmed = trimmed_tokenizer(tokenizer, kept)
    for text in [*HELD_OUT, OUT_OF_DOMAIN]:
        ids = trimmed(text)["input_ids"]
        assert max(ids) < len(kept)
        assert trimmed.decode(ids) == tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert len(trimmed(OUT_OF_DOMAIN)["input_ids"]) > len(tokenizer(OUT_OF_DOMAIN)["input_ids"])  # smaller pieces


def test_special_tokens_and_keep_top_are_kept(tokenizer, kept):
    trimmed = trimmed_tokenizer(tokenizer, kept)
    assert (trimmed.pad_token, trimmed.bos_token, trimmed.eos_token) == ("<pad>", "<s>", "</s>")
    assert (trimmed.pad_token_id, trimmed.bos_token_id, trimmed.eos_token_id) == (0, 1, 2)
    ids = trimmed("<s>kalo</s>")["input_ids"]
    assert (ids[0], ids[-1]) == (1, 2)
    wider = kept_token_ids(tokenizer, [tokenizer(row)["input_ids"] for row in DOMAIN], keep_top=300, always=[299])
    assert set(range(300)) <= set(wider) and set(kept) < set(wider)


def test_a_tokenizer_without_byte_pieces_is_refused_by_its_kind():
    with pytest.raises(ValueError, match=r"rebuilds BPE tokenizers .* model is WordLevel"):
        kept_token_ids(tiny_tokenizer(), [[3, 4]])


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_trimmed_logits_are_the_kept_columns_of_the_untrimmed_ones(tokenizer, kept, tied):
    model = tiny_model(vocab_size=len(tokenizer), tied=tied)
    rows = [tokenizer(row, return_tensors="pt")["input_ids"] for row in DOMAIN[:4]]
    with torch.no_grad():
        before = [model(ids).logits[..., kept] for ids in rows]  # [1, T, K]
        trim_model(model, kept)
        new_id = renumbering(kept)
        after = [model(ids.apply_(new_id.get)).logits for ids in rows]
    assert model.config.vocab_size == len(kept) and model.lm_head.weight.shape == (len(kept), model.config.hidden_size)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    for expected, found in zip(before, after, strict=True):
        torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5)


def test_the_training_mask_gives_the_trimmed_models_loss(tokenizer, kept):
    """In training mode the removed ids' logits are masked: the loss is the trimmed model's on renumbered ids."""
    model = tiny_model(vocab_size=len(tokenizer), tied=True).train()
    ids = tokenizer(DOMAIN[0], return_tensors="pt")["input_ids"]
    handle = mask_removed_logits(model, kept)
    masked = model(ids, labels=ids).loss
    model.eval()
    assert model(ids, labels=ids).loss > masked  # evaluation sees every logit
    handle.remove()
    trimmed = trim_model(model, kept).train()
    renumbered = ids.clone().apply_(renumbering(kept).get)
    torch.testing.assert_close(trimmed(renumbered, labels=renumbered).loss, masked)


def test_trimmed_export_counts_exactly_and_loads_with_from_pretrained(tokenizer, kept, tmp_path):
    model = tiny_model(vocab_size=len(tokenizer), tied=False)
    structure, gates = describe(model), uniform_gates(describe(model))
    always = config_token_ids(model.config, model.generation_config)
    kept = sorted(set(kept) | always)
    pruned = trim_model(prune_model(model, gates), kept)
    report = pruning_report(structure, gates, kept_tokens=len(kept))
    save_pruned(pruned, tmp_path / "export", tokenizer=trimmed_tokenizer(tokenizer, kept), report=report)
    script = (
        "import sys, json\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "ids = tokenizer(sys.argv[2], return_tensors='pt')['input_ids']\n"
        "out = model.generate(ids, attention_mask=ids * 0 + 1, max_new_tokens=4, do_sample=False)\n"
        "print(json.dumps({'count': sum(p.numel() for p in model.parameters()), 'vocab': model.config.vocab_size,\n"
        "                  'text': tokenizer.decode(out[0]), 'class': type(model).__name__}))\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "export"), DOMAIN[0]], capture_output=True,
                         text=True, check=True)  # fmt: skip
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    saved = json.loads((tmp_path / "export" / REPORT_NAME).read_text())
    assert loaded["count"] == saved["parameters"]["after"] == sum(p.numel() for p in pruned.parameters())
    assert loaded["vocab"] == len(kept) and loaded["class"] == "LlamaForCausalLM"
    assert loaded["text"].startswith(DOMAIN[0])
    removed = (len(tokenizer) - len(kept)) * structure.hidden_size * 2  # embedding and lm_head rows
    assert saved["vocabulary"] == {"before": len(tokenizer), "after": len(kept), "parameters_removed": removed}


def test_trimming_works_on_the_meta_device(tokenizer, kept):
    config = tiny_model(vocab_size=len(tokenizer)).config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    trim_model(model, kept)
    assert model.lm_head.weight.device.type == "meta" and model.lm_head.weight.shape[0] == len(kept)


DATA = ROOT.parent / "shared" / "data" / "medical"
SMOLLM2 = pytest.mark.skipif(
    not (cache_dir() / "SmolLM2-135M-Instruct").is_dir() or not DATA.is_dir(),
    reason="needs the converted SmolLM2 (tailored.models) and ../shared/data",
)


def medical_rows(name: str) -> list[str]:
    rows = [json.loads(line) for line in (DATA / name).read_text().split("\n") if line]  # rows hold U+2028
    if "CHQ" in rows[0]:
        return [f"Question: {row['CHQ']}\nSummary: {row['Summary']}" for row in rows]
    return [f"Context: {' '.join(row['CONTEXTS'])}\nQuestion: {row['QUESTION']}\nAnswer: {row['LONG_ANSWER']}"
            for row in rows]  # fmt: skip


@pytest.fixture(scope="module")
def smollm2():
    from tailored.models import load_tokenizer

    tokenizer = load_tokenizer("embedded:SmolLM2-135M-Instruct")
    training = medical_rows("hqs_train.jsonl") + medical_rows("pubmedqa_train.jsonl")
    encoded = [tokenizer(row)["input_ids"] for row in training]
    kept = kept_token_ids(tokenizer, encoded)
    return tokenizer, training, encoded, kept, trimmed_tokenizer(tokenizer, kept)


@SMOLLM2
def test_smollm2_medical_training_rows_tokenize_the_same_and_test_rows_decode_back(smollm2):
    tokenizer, training, encoded, kept, trimmed = smollm2
    new_id = renumbering(kept)
    assert 15_000 < len(kept) < 30_000  # of 49,152
    for row, ids in zip(training, encoded, strict=True):
        assert trimmed(row)["input_ids"] == [new_id[index] for index in ids]
    general = (ROOT / "README.md").read_text() + OUT_OF_DOMAIN
    for text in [*medical_rows("hqs_test.jsonl"), *medical_rows("pubmedqa_test.jsonl")[:100], general]:
        ids = trimmed(text)["input_ids"]
        assert max(ids) < len(kept) and trimmed.decode(ids) == text
    messages = [{"role": "user", "content": "What helps a migraine?"}]
    template = trimmed.apply_chat_template(messages, tokenize=False)
    assert template == tokenizer.apply_chat_template(messages, tokenize=False)
    chat = trimmed.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    original = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert chat == [new_id[index] for index in original]
    assert (trimmed.eos_token, trimmed.pad_token, trimmed.eos_token_id) == ("<|im_end|>", "<|im_end|>", new_id[2])


@SMOLLM2
def test_smollm2_trimmed_logits_equal_the_untrimmed_ones_at_the_kept_ids(smollm2, tmp_path):
    from tailored.models import load_model

    tokenizer, training, encoded, kept, trimmed = smollm2
    model = load_model("embedded:SmolLM2-135M-Instruct", dtype=torch.float32).eval()
    rows = [torch.tensor([ids[:96]]) for ids in encoded[:3]]
    with torch.no_grad():
        before = [model(ids).logits[..., kept] for ids in rows]
        trim_model(model, kept)
        new_id = renumbering(kept)
        after = [model(ids.apply_(new_id.get)).logits for ids in rows]
        for expected, found in zip(before, after, strict=True):
            torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-4)
            assert F.log_softmax(found, -1).exp().sum(-1).sub(1).abs().max() < 1e-4
    assert model.config.vocab_size == len(kept) and model.config.eos_token_id == new_id[2]
    model.save_pretrained(tmp_path / "export")
    trimmed.save_pretrained(tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    ids = loaded_tokenizer("Question: what is a migraine?\nSummary:", return_tensors="pt")
    text = loaded_tokenizer.decode(loaded.generate(**ids, max_new_tokens=8, do_sample=False)[0])
    assert text.startswith("Question: what is a migraine?\nSummary:") and len(text) > 40
