"""Task metrics (torchmetrics), each with its bootstrap standard error, from the per-row values they keep.

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

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import CatMetric, MeanMetric, Metric
from torchmetrics.functional.text.rouge import rouge_score

from tailored.data.tasks import IGNORE_INDEX, Task

PRIMARY_METRIC = {
    "classification": "balanced_accuracy",
    "multiple_choice": "accuracy",
    "generation": "rougeL",
    "language_modeling": "perplexity",
}
"""The metric of a task kind that the comparison table (tailored compare) compares (perplexity: lower is better).
Classification compares balanced accuracy: plain accuracy rewards always giving the most frequent label."""
CHANCE_METRICS = ("accuracy", "accuracy_norm", "balanced_accuracy")
"""Metrics that a guessing model scores :func:`chance_level` on."""
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

    def update_loss(self, logits: torch.Tensor, targets: torch.Tensor, tokens: torch.Tensor | None = None) -> None:
        """Teacher-forced loss of a batch: ``logits [B, K, V]`` predict ``targets [B, K]`` (aligned, not shifted;
        :data:`tailored.data.tasks.IGNORE_INDEX` where a position does not count; see :func:`loss_positions`).
        ``tokens [B]``: what each row's summed loss is divided by, when not its counted targets (the reference
        tokenizer's count of a respelled block, :func:`tailored.data.tasks.respelled_blocks`)."""
        nll, counted = row_losses(logits, targets)
        tokens = counted if tokens is None else tokens.to(counted)
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


def chance_level(task: Task) -> float | None:
    """What a model without skill scores on a classification or multiple-choice task's :data:`CHANCE_METRICS`:
    1 / options, the expected accuracy of a uniform guess and the balanced accuracy of always giving one label
    (every label present in the rows); None for the other kinds (ROUGE and perplexity have no chance level)."""
    return 1 / len(task.choices) if task.kind in ("classification", "multiple_choice") else None


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
