"""Task metrics (torchmetrics) and the recovery table.

| kind | metric | how |
|---|---|---|
| classification, multiple_choice | accuracy | the option with the highest summed log-likelihood after the prompt |
| classification, multiple_choice | accuracy_norm | the same with the mean log-likelihood per option token |
| classification, multiple_choice | balanced_accuracy | mean over the true labels of their rows' accuracy (no prior) |
| generation | ROUGE-1/2/L (F1) | greedy decoding up to ``max_new_tokens``, cut at ``stop`` |
| language_modeling | perplexity | exp of the token-weighted mean held-out loss |

Every task also reports its teacher-forced held-out ``loss`` (the signal of dynamic batch loading).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import CatMetric, MeanMetric, Metric
from torchmetrics.functional.text.rouge import rouge_score
from transformers import StoppingCriteria, StoppingCriteriaList

from tailored.tasks import IGNORE_INDEX, Task

PRIMARY_METRIC = {
    "classification": "accuracy",
    "multiple_choice": "accuracy",
    "generation": "rougeL",
    "language_modeling": "perplexity",
}
"""The metric of a task kind that the recovery table compares (perplexity: lower is better)."""
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


class TaskMetrics(nn.Module):
    """The metric states of one task (synchronised across processes by torchmetrics).

    Besides each aggregate, the per-row values are kept (``CatMetric``), so every figure comes with a bootstrap
    standard error over the rows (:func:`bootstrap_stderr`): two models compared on the same rows differ
    meaningfully only by more than a few of these.
    """

    def __init__(self, task: Task) -> None:
        super().__init__()
        self.kind = task.kind
        self.loss = MeanMetric()
        self.row_nll, self.row_tokens = CatMetric(), CatMetric()  # per row: summed loss, tokens
        if task.kind in ("classification", "multiple_choice"):
            self.correct, self.correct_norm = CatMetric(), CatMetric()  # per row: 1 when the right option wins
            self.label = CatMetric()  # per row: the right option's index (balanced accuracy)
        if task.kind == "generation":
            self.rouge = nn.ModuleDict({key: CatMetric() for key in ROUGE_KEYS})  # per row F1

    def compute(self) -> dict[str, float]:
        """Every metric, and ``<metric>_stderr`` where per-row values were recorded: each from its per-row columns
        by :func:`row_statistic`, the error a bootstrap over the rows (the loss itself is the running mean)."""
        loss = float(self.loss.compute())
        results = {"loss": loss}
        if self.kind == "language_modeling":
            results["perplexity"] = math.exp(loss)
        columns = self.columns()
        names = list(results) if "nll" in columns else []
        if "correct" in columns:
            names += ["accuracy", "accuracy_norm"] + (["balanced_accuracy"] if "label" in columns else [])
        names += [key for key in ROUGE_KEYS if key in columns]
        keys = list(columns)
        for name in names:
            results.setdefault(name, float(row_statistic(name, columns)))

            def statistic(*values: torch.Tensor, name: str = name) -> torch.Tensor:  # resampled columns in
                return row_statistic(name, dict(zip(keys, values, strict=True)))

            results[f"{name}_stderr"] = bootstrap_stderr(statistic, *columns.values())
        return results

    def columns(self) -> dict[str, torch.Tensor]:
        """The recorded per-row columns, ``[N]`` float64 each: ``nll``, ``tokens``; ``correct``, ``correct_norm``,
        ``label``; the ROUGE F1s."""
        metrics = {"nll": self.row_nll, "tokens": self.row_tokens}
        if hasattr(self, "correct"):
            metrics |= {"correct": self.correct, "correct_norm": self.correct_norm, "label": self.label}
        if hasattr(self, "rouge"):
            metrics |= dict(self.rouge.items())
        return {name: metric.compute().double().flatten() for name, metric in metrics.items() if metric.update_count}

    def row_values(self) -> dict[str, list[float]]:
        """:meth:`columns` as lists, so that two models tested on the same rows can be compared pair by pair
        (:func:`row_statistic` gives back every metric from them)."""
        return {name: column.tolist() for name, column in self.columns().items()}

    def update_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Teacher-forced loss of a batch: ``logits [B, K, V]`` predict ``targets [B, K]`` (aligned, not shifted;
        :data:`tailored.tasks.IGNORE_INDEX` where a position does not count; see :func:`loss_positions`)."""
        nll, tokens = row_losses(logits, targets)
        self.loss.update(nll.sum() / tokens.sum().clamp(min=1), weight=tokens.sum())
        self.row_nll.update(nll)
        self.row_tokens.update(tokens)

    def update_options(self, scores: torch.Tensor, option_lengths: torch.Tensor, labels: torch.Tensor) -> None:
        """Count the chosen options: ``scores [B, n]`` summed log-likelihoods, ``option_lengths [B * n]`` tokens,
        ``labels [B]``."""
        self.correct.update((scores.argmax(-1) == labels).float())
        self.label.update(labels.float())
        self.correct_norm.update(((scores / option_lengths.view_as(scores)).argmax(-1) == labels).float())

    def update_answers(self, answers: list[str], references: list[str]) -> None:
        """ROUGE F1 of each generated answer against its reference."""
        for answer, reference in zip(answers, references, strict=True):
            scores = rouge_score(answer, reference, rouge_keys=ROUGE_KEYS)
            for key in ROUGE_KEYS:
                self.rouge[key].update(scores[f"{key}_fmeasure"].reshape(1).float())

    def reset(self) -> None:
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.reset()


def balanced_accuracy(correct: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Mean over the true labels present of the share of their rows answered right (Brodersen et al. 2010).

    ``correct`` (1 = right) and ``label`` are ``[..., N]`` per-row values; returns ``[...]``. Unlike accuracy it does
    not reward the label prior: always answering the majority label scores ``1 / labels present``.
    """
    one_hot = F.one_hot(label, int(label.max()) + 1).to(correct.dtype)  # [..., N, C]
    rows = one_hot.sum(-2)  # [..., C]
    recall = (one_hot * correct.unsqueeze(-1)).sum(-2) / rows.clamp(min=1)
    return (recall * (rows > 0)).sum(-1) / (rows > 0).sum(-1)


def loss_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions whose next token carries a loss in any row, and those tokens.

    ``labels [B, T]`` as Hugging Face takes them (position ``p`` predicts ``labels[:, p + 1]``). Returns
    ``positions [K]`` (for ``logits_to_keep``: the logits ``[B, K, V]`` of only these positions, not ``[B, T, V]``;
    an instruction task's answers are a few tokens of a long prompt) and the aligned ``targets [B, K]``.
    """
    counted = (labels[:, 1:] != IGNORE_INDEX).any(0)  # [T-1]
    positions = counted.nonzero().flatten()
    return positions, labels[:, positions + 1]


def row_statistic(metric: str, columns: dict[str, torch.Tensor]) -> torch.Tensor:
    """``metric`` computed from per-row ``columns`` (as :meth:`TaskMetrics.row_values` names them), each
    ``[..., N]``; returns ``[...]``: resampled rows in, one value per resample out."""
    if metric in ("loss", "perplexity"):
        loss = columns["nll"].sum(-1) / columns["tokens"].sum(-1)
        return loss.exp() if metric == "perplexity" else loss
    if metric == "balanced_accuracy":
        return balanced_accuracy(columns["correct"], columns["label"].long())
    return columns[{"accuracy": "correct", "accuracy_norm": "correct_norm"}.get(metric, metric)].mean(-1)


def row_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: summed loss and the number of counted tokens, ``[B]`` each (float32), of ``logits [B, K, V]``
    predicting the aligned ``targets [B, K]``."""
    nll = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)
    return nll.sum(-1), (targets != IGNORE_INDEX).sum(-1).float()


def bootstrap_stderr(statistic, *columns: torch.Tensor, resamples: int = 1000, seed: int = 0) -> float:
    """Bootstrap standard error of ``statistic`` over rows (Efron & Tibshirani 1993, ch. 6).

    ``columns`` are ``[N]`` per-row values; ``statistic`` maps ``[R, N]`` resampled columns to ``[R]`` values.
    The resampling is seeded, so the same rows give the same error.
    """
    n = len(columns[0])
    if n < 2:
        return float("nan")
    index = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    return float(statistic(*(column[index] for column in columns)).std())


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


def recovery_table(
    results: dict[str, dict[str, dict[str, float]]],
    kinds: dict[str, str],
    dense: str,
    tuned: str | None = None,
    outside_average: Sequence[str] = (),
) -> dict:
    """Per task, each model's primary metric and its share of the dense model's ("% of dense", ATP's figure),
    and, when ``tuned`` is given, the pruned models' share of the tuned one's (what pruning costs at equal tuning).

    Args:
        results: model name -> task name -> metrics (as :meth:`TaskMetrics.compute` returns).
        kinds: task name -> task kind.
        dense: the model name that every other is compared to.
        tuned: the dense model LoRA-tuned; the remaining models are compared to it as well.
        outside_average: tasks shown but left out of the average (general text next to the domain's tasks).
    Returns:
        ``{"tasks": {task: {"metric", model: value, "<model> % of <reference>": share}}, "average": {"<model> % of
        <reference>": share}}``; perplexity's share is reference / model (lower is better), the others' model /
        reference. A share is undefined (NaN) where the reference scores 0; the average leaves such tasks out.
    """
    pairs = [(name, dense) for name in results if name != dense]
    if tuned is not None and tuned in results:
        pairs += [(name, tuned) for name in results if name not in (dense, tuned)]
    table, shares = {}, {f"{name} % of {reference}": [] for name, reference in pairs}
    for task, kind in kinds.items():
        metric = PRIMARY_METRIC[kind]
        row = {"metric": metric} | {name: results[name][task][metric] for name in results}
        for name, reference_name in pairs:
            value, reference = row[name], row[reference_name]
            share = reference / value if metric == "perplexity" else value / reference if reference else float("nan")
            row[f"{name} % of {reference_name}"] = 100 * share
            if task not in outside_average:
                shares[f"{name} % of {reference_name}"].append(100 * share)
        table[task] = row
    defined = {key: [value for value in values if not math.isnan(value)] for key, values in shares.items()}
    average = {key: sum(values) / len(values) if values else float("nan") for key, values in defined.items()}
    return {"tasks": table, "average": average, "outside_average": list(outside_average)}


def format_recovery(report: dict) -> str:
    """The recovery table as aligned text: one row per task and the average, one column per model and share."""
    tasks = report["tasks"]
    shares = list(report["average"])
    models = [key for key in next(iter(tasks.values())) if key != "metric" and key not in shares]
    header = ["task", "metric", *models, *shares]
    outside = report.get("outside_average", [])

    def line(task: str) -> list[str]:
        row = tasks[task]
        return [task, row["metric"], *(f"{row[m]:.4g}" for m in models), *(f"{row[key]:.1f}" for key in shares)]

    rows = [line(task) for task in tasks if task not in outside]
    rows.append(["average", "", *("" for _ in models), *(f"{report['average'][key]:.1f}" for key in shares)])
    rows += [line(task) for task in outside]  # after the average, which leaves them out
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)) for line in [header, *rows]
    )
