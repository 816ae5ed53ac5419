"""The chunked losses equal the full-logit ones, and packed rows compute what padded rows compute, per example, with
the same gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from helpers import with_lora

from tailored.core import losses
from tailored.core.losses import at_positions, final_hidden_states, head_losses, output_head
from tailored.data.packing import loss_positions, pack, packed_batch
from tailored.data.tasks import IGNORE_INDEX

TEMPERATURE = 2.0


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 5 positions on the 64-token vocabulary: every loss below spans several chunks and a partial one."""
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 5 * 64)


def full_logit_kl(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The distillation loss as it was computed on ``[B, T, V]`` logits: T^2 * batchmean KL over counted positions."""
    counted = labels[:, 1:] != IGNORE_INDEX
    s = F.log_softmax(student[:, :-1][counted].float() / TEMPERATURE, -1)
    t = F.log_softmax(teacher[:, :-1][counted].float() / TEMPERATURE, -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * TEMPERATURE**2


def padded_batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Three right-padded rows ``[3, 13]`` with response-only labels of different lengths, and the labels."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 64, (3, 13), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 9:], mask[2, 6:] = 0, 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :4] = IGNORE_INDEX  # the prompts
    return {"input_ids": ids, "attention_mask": mask}, labels


def trained_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_lm_loss_and_gradients_equal_the_hugging_face_loss(tied):
    model = with_lora(tiny_model(tied=tied)).train()
    batch, labels = padded_batch()
    expected = model(**batch, labels=labels).loss
    expected.backward()
    expected_grads = trained_gradients(model)
    positions, targets = loss_positions(labels, IGNORE_INDEX)
    hidden = at_positions(final_hidden_states(model, batch), positions)
    loss, kd = head_losses(hidden, output_head(model), targets)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert kd == 0
    grads = trained_gradients(model)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_trained_head_gets_the_gradient_of_the_full_logits():
    model = tiny_model().train()
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)  # recovery_weights all: lm_head trains
    batch, labels = padded_batch()
    model(**batch, labels=labels).loss.backward()
    expected = trained_gradients(model)["lm_head.weight"]
    positions, targets = loss_positions(labels, IGNORE_INDEX)
    hidden = at_positions(final_hidden_states(model, batch), positions)
    head_losses(hidden, output_head(model), targets)[0].backward()
    torch.testing.assert_close(trained_gradients(model)["lm_head.weight"], expected, rtol=1e-5, atol=1e-6)


def test_chunked_distillation_equals_the_full_logit_kl_in_value_and_gradient():
    student, teacher = with_lora(tiny_model(seed=0)).train(), tiny_model(seed=1, hidden_size=12)  # d differs: pruned
    batch, labels = padded_batch()
    with torch.no_grad():
        teacher_logits = teacher(**batch).logits
    lm = student(**batch, labels=labels)
    expected_kd = full_logit_kl(lm.logits, teacher_logits, labels)
    (0.5 * lm.loss + 0.5 * expected_kd).backward()
    expected_grads = trained_gradients(student)
    positions, targets = loss_positions(labels, IGNORE_INDEX)
    hidden = at_positions(final_hidden_states(student, batch), positions)
    with torch.no_grad():
        teacher_hidden = at_positions(final_hidden_states(teacher, batch), positions)
    loss, kd = head_losses(hidden, output_head(student), targets, teacher_hidden, output_head(teacher), TEMPERATURE)
    (0.5 * loss + 0.5 * kd).backward()
    torch.testing.assert_close(loss, lm.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kd, expected_kd, rtol=1e-5, atol=1e-6)
    assert kd > 1e-3
    for name, grad in trained_gradients(student).items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def examples_of_different_lengths() -> list[dict]:
    """Six prompt -> answer examples of 3 to 11 tokens, response-only labels (one without a prompt)."""
    generator = torch.Generator().manual_seed(5)
    examples = []
    for length, prompt in ((11, 6), (3, 1), (7, 4), (5, 0), (9, 5), (4, 2)):
        ids = torch.randint(3, 64, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return examples


def per_example_losses(model, batch, rows: list[list[int]], lengths: list[int]) -> list[torch.Tensor]:
    """Each example's mean LM loss; ``rows[r]`` lists the examples laid end to end in row ``r`` of ``batch``."""
    hidden = final_hidden_states(model, batch)  # [R, T, d]
    head, labels, found = output_head(model), batch["labels"], {}
    for r, row in enumerate(rows):
        start = 0
        for index in row:
            span = slice(start, start + lengths[index])
            positions, targets = loss_positions(labels[r : r + 1, span], IGNORE_INDEX)
            found[index] = head_losses(at_positions(hidden[r : r + 1, span], positions), head, targets)[0]
            start += lengths[index]
    return [found[index] for index in range(len(lengths))]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_give_every_example_its_padded_loss_and_the_same_gradients(attention):
    model = with_lora(tiny_model()).train()
    model.config._attn_implementation = attention
    examples = examples_of_different_lengths()
    lengths = [len(example["input_ids"]) for example in examples]
    width = max(lengths)
    padded = {
        "input_ids": torch.tensor([e["input_ids"] + [0] * (width - len(e["input_ids"])) for e in examples]),
        "attention_mask": torch.tensor([[1] * n + [0] * (width - n) for n in lengths]),
        "labels": torch.tensor([e["labels"] + [IGNORE_INDEX] * (width - len(e["labels"])) for e in examples]),
    }
    packed = packed_batch(examples, 16, pad_id=0, ignore_index=IGNORE_INDEX)
    rows = pack(lengths, 16)
    assert len(rows) < len(examples) and any(len(row) > 1 for row in rows)  # really packed
    assert packed["input_ids"].shape == (len(rows), 16)
    for side, batch, layout in (("padded", padded, [[i] for i in range(len(examples))]), ("packed", packed, rows)):
        each = per_example_losses(model, batch, layout, lengths)
        positions, targets = loss_positions(batch["labels"], IGNORE_INDEX)
        hidden = at_positions(final_hidden_states(model, batch), positions)
        head_losses(hidden, output_head(model), targets)[0].backward()
        if side == "padded":
            expected, expected_grads = each, trained_gradients(model)
            continue
        for index, (loss, reference) in enumerate(zip(each, expected, strict=True)):
            torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6, msg=f"example {index}")
        for name, grad in trained_gradients(model).items():  # other matmul shapes: float32 rounding, ~1e-6
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_packed_rows_without_a_mask_are_kept_apart_by_transformers_from_the_position_ids():
    """The path flash attention takes: no 4D mask, transformers finds the examples in the position ids (only
    without a cache: with one, as by default, it would let them attend to each other)."""
    model = tiny_model()
    packed = packed_batch(examples_of_different_lengths(), 16, pad_id=0, ignore_index=IGNORE_INDEX)
    mask = losses.packed_attention_mask(packed["position_ids"], model.config._attn_implementation, torch.float32)
    with torch.no_grad():
        ours = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], attention_mask=mask).logits
        inferred = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    torch.testing.assert_close(ours, inferred, rtol=1e-5, atol=1e-6)


def test_packed_batches_are_refused_by_an_attention_that_would_mix_the_examples():
    model = tiny_model()
    model.config._attn_implementation = "paged|sdpa"
    packed = packed_batch(examples_of_different_lengths(), 16, pad_id=0, ignore_index=IGNORE_INDEX)
    with pytest.raises(ValueError, match="data.packing false"):
        final_hidden_states(model, packed)
