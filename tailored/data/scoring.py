"""Scoring held-out rows with a model: the loss positions, option log-likelihoods and greedy answers.

These are the model calls behind :class:`tailored.data.metrics.TaskMetrics`; they compute logits only where a
metric needs them (``logits_to_keep``), never the full ``[B, T, V]`` of a long prompt. :func:`evaluate` scores a
plain model on held-out loaders outside any trainer, with the code paths validation and test use.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import Metric
from transformers import StoppingCriteria, StoppingCriteriaList

from tailored.data.metrics import TaskMetrics, row_losses
from tailored.data.tasks import IGNORE_INDEX


def loss_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions whose next token carries a loss in any row, and those tokens.

    ``labels [B, T]`` as Hugging Face takes them (position ``p`` predicts ``labels[:, p + 1]``). Returns
    ``positions [K]`` (for ``logits_to_keep``: the logits ``[B, K, V]`` of only these positions, not ``[B, T, V]``;
    an instruction task's answers are a few tokens of a long prompt) and the aligned ``targets [B, K]``.
    """
    counted = (labels[:, 1:] != IGNORE_INDEX).any(0)  # [T-1]
    positions = counted.nonzero().flatten()
    return positions, labels[:, positions + 1]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each sequence's first real token (left padding), ``[B, T]``."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def option_log_likelihoods(model: nn.Module, batch: dict) -> torch.Tensor:
    """Summed log-probability of every option given its prompt, ``[B, n_options]``.

    Sequences are left-padded prompt + option, so the options end at the last position and only the logits of the
    last ``max option length + 1`` positions are computed (``logits_to_keep``): ``[B * n, K, V]``, not ``[.., T, V]``.
    When every option is one token, each prompt runs once and its last position scores all options (n times less).
    """
    ids, mask, lengths = batch["option_input_ids"], batch["option_attention_mask"], batch["option_lengths"]
    keep = int(lengths.max()) + 1
    options = ids.shape[0] // len(batch["label"])
    if keep == 2:  # one-token options (yes/no/maybe): an item's sequences differ in the last token only
        prompts, prompt_mask = ids[::options, :-1], mask[::options, :-1]  # [B, T-1]: each prompt once
        positions = position_ids(prompt_mask)
        logits = model(input_ids=prompts, attention_mask=prompt_mask, position_ids=positions, logits_to_keep=1).logits
        log_probs = torch.log_softmax(logits[:, -1].float(), dim=-1)  # [B, V]
        return log_probs.gather(-1, ids[:, -1].view(-1, options))
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=keep).logits
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [N, K-1, V]: predicts the last K-1 tokens
    targets = ids[:, -(keep - 1) :]
    token_log_probs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N, K-1]
    in_option = torch.arange(keep - 1, device=ids.device) >= (keep - 1 - lengths).unsqueeze(-1)
    return (token_log_probs * in_option).sum(-1).view(len(batch["label"]), -1)


@torch.no_grad()
def greedy_answers(
    model: nn.Module, batch: dict, tokenizer, max_new_tokens: int, stop: str, synced: bool = False
) -> list[str]:
    """Greedy continuations of the left-padded prompts, each cut at the first ``stop``.

    Generation ends once every row's answer holds ``stop`` (:class:`AnswerStopped`), not after ``max_new_tokens``
    whatever the answers: the same answers, far fewer decoding steps for short ones.
    ``synced``: every rank keeps stepping until all are done (a sharded model's forward is a collective).
    """
    prompts = batch["prompt_input_ids"]
    output = model.generate(
        input_ids=prompts,
        attention_mask=batch["prompt_attention_mask"],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        synced_gpus=synced,
        stopping_criteria=StoppingCriteriaList([AnswerStopped(tokenizer, prompts.shape[1], stop)] if stop else []),
    )
    texts = tokenizer.batch_decode(output[:, prompts.shape[1] :], skip_special_tokens=True)
    return [text.lstrip().split(stop)[0].strip() if stop else text.strip() for text in texts]


class AnswerStopped(StoppingCriteria):
    """Per row: done once the answer so far, leading whitespace stripped, contains ``stop`` (the cut that
    :func:`greedy_answers` makes; Hugging Face's ``stop_strings`` would also stop at a leading newline)."""

    def __init__(self, tokenizer, prompt_length: int, stop: str) -> None:
        self.tokenizer, self.prompt_length, self.stop = tokenizer, prompt_length, stop

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        """``input_ids [B, prompt + new]`` -> ``[B]`` bool."""
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor([self.stop in text.lstrip() for text in texts], device=input_ids.device)


def score_batch(model: nn.Module, batch: dict, task, metrics, tokenizer, synced: bool = False) -> None:
    """Update a task's ``metrics`` (:class:`tailored.data.metrics.TaskMetrics`) with one held-out batch: the
    teacher-forced loss, then the options' log-likelihoods or the greedy answers its kind is scored by."""
    positions, targets = loss_positions(batch["labels"])
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=positions
    ).logits
    metrics.update_loss(logits, targets, batch.get("reference_tokens"))
    if "option_input_ids" in batch:
        scores = option_log_likelihoods(model, batch)
        metrics.update_options(scores, batch["option_lengths"], batch["label"])
    if "references" in batch:
        answers = greedy_answers(model, batch, tokenizer, task.max_new_tokens, task.stop, synced=synced)
        metrics.update_answers(answers, batch["references"])


@torch.no_grad()
def mean_losses(model: nn.Module, loaders, device: torch.device) -> list[float]:
    """Per loader (one per task), the token-weighted mean teacher-forced loss of ``model`` over its batches."""
    losses = []
    for loader in loaders:
        total, tokens = 0.0, 0.0
        for batch in loader:
            positions, targets = loss_positions(batch["labels"].to(device))
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=positions).logits
            nll, counted = row_losses(logits, targets)
            total, tokens = total + float(nll.sum()), tokens + float(counted.sum())
        losses.append(total / tokens)
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, loaders, tasks, tokenizer) -> dict[str, dict[str, float]]:
    """Every task's metrics (:meth:`TaskMetrics.compute`, with ``<metric>_stderr``) of ``model`` on its loader's
    batches, scored by :func:`score_batch` as validation and test score them; ``loaders`` and ``tasks`` pair up in
    order (one loader per task, as :meth:`DomainData.val_dataloader` gives them).

    Runs in this process alone: the metrics are not synchronised with other ranks, batches move to the model's
    device.
    """
    device = next(model.parameters()).device
    results = {}
    for task, loader in zip(tasks, loaders, strict=True):
        metrics = TaskMetrics(task).to(device)
        for metric in metrics.modules():
            if isinstance(metric, Metric):
                metric.sync_on_compute = metric._to_sync = False  # compute must not wait for idle ranks
        for batch in loader:
            score_batch(model, to_device(batch, device), task, metrics, tokenizer)
        results[task.name] = metrics.compute()
    return results


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device`` (the generation references stay strings)."""
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
