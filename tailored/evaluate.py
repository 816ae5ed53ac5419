"""Task metrics (torchmetrics) and the recovery table.

| kind | metric | how |
|---|---|---|
| classification, multiple_choice | accuracy | the option with the highest summed log-likelihood after the prompt |
| classification, multiple_choice | accuracy_norm | the same with the mean log-likelihood per option token |
| generation | ROUGE-1/2/L (F1) | greedy decoding up to ``max_new_tokens``, cut at ``stop`` |
| language_modeling | perplexity | exp of the token-weighted mean held-out loss |

Every task also reports its teacher-forced held-out ``loss`` (the signal of dynamic batch loading).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import ROUGEScore

from tailored.tasks import Task

PRIMARY_METRIC = {
    "classification": "accuracy",
    "multiple_choice": "accuracy",
    "generation": "rougeL",
    "language_modeling": "perplexity",
}
"""The metric of a task kind that the recovery table compares (perplexity: lower is better)."""
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


class TaskMetrics(nn.Module):
    """The metric states of one task (synchronised across processes by torchmetrics)."""

    def __init__(self, task: Task) -> None:
        super().__init__()
        self.kind = task.kind
        self.loss = MeanMetric()
        if task.kind in ("classification", "multiple_choice"):
            self.accuracy = MulticlassAccuracy(num_classes=len(task.choices), average="micro")
            self.accuracy_norm = MulticlassAccuracy(num_classes=len(task.choices), average="micro")
        if task.kind == "generation":
            self.rouge = ROUGEScore(rouge_keys=ROUGE_KEYS)

    def compute(self) -> dict[str, float]:
        loss = float(self.loss.compute())
        results = {"loss": loss}
        if self.kind == "language_modeling":
            results["perplexity"] = math.exp(loss)
        if hasattr(self, "accuracy"):
            results["accuracy"] = float(self.accuracy.compute())
            results["accuracy_norm"] = float(self.accuracy_norm.compute())
        if hasattr(self, "rouge"):
            scores = self.rouge.compute()
            results |= {key: float(scores[f"{key}_fmeasure"]) for key in ROUGE_KEYS}
        return results

    def update_options(self, scores: torch.Tensor, option_lengths: torch.Tensor, labels: torch.Tensor) -> None:
        """Count the chosen options: ``scores [B, n]`` summed log-likelihoods, ``option_lengths [B * n]`` tokens,
        ``labels [B]``."""
        self.accuracy.update(scores.argmax(-1), labels)
        self.accuracy_norm.update((scores / option_lengths.view_as(scores)).argmax(-1), labels)

    def reset(self) -> None:
        for metric in self.children():
            metric.reset()


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each sequence's first real token (left padding), ``[B, T]``."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def option_log_likelihoods(model: nn.Module, batch: dict) -> torch.Tensor:
    """Summed log-probability of every option given its prompt, ``[B, n_options]``.

    Sequences are left-padded prompt + option, so the options end at the last position and only the logits of the
    last ``max option length + 1`` positions are computed (``logits_to_keep``): ``[B * n, K, V]``, not ``[.., T, V]``.
    """
    ids, mask, lengths = batch["option_input_ids"], batch["option_attention_mask"], batch["option_lengths"]
    keep = int(lengths.max()) + 1
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=keep).logits
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [N, K-1, V]: predicts the last K-1 tokens
    targets = ids[:, -(keep - 1) :]
    token_log_probs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N, K-1]
    in_option = torch.arange(keep - 1, device=ids.device) >= (keep - 1 - lengths).unsqueeze(-1)
    return (token_log_probs * in_option).sum(-1).view(len(batch["label"]), -1)


@torch.no_grad()
def greedy_answers(model: nn.Module, batch: dict, tokenizer, max_new_tokens: int, stop: str) -> list[str]:
    """Greedy continuations of the left-padded prompts, each cut at the first ``stop``."""
    prompts = batch["prompt_input_ids"]
    output = model.generate(
        input_ids=prompts,
        attention_mask=batch["prompt_attention_mask"],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    texts = tokenizer.batch_decode(output[:, prompts.shape[1] :], skip_special_tokens=True)
    return [text.lstrip().split(stop)[0].strip() if stop else text.strip() for text in texts]


def recovery_table(
    results: dict[str, dict[str, dict[str, float]]], kinds: dict[str, str], dense: str, tuned: str | None = None
) -> dict:
    """Per task, each model's primary metric and its share of the dense model's ("% of dense", ATP's figure),
    and, when ``tuned`` is given, the pruned models' share of the tuned one's (what pruning costs at equal tuning).

    Args:
        results: model name -> task name -> metrics (as :meth:`TaskMetrics.compute` returns).
        kinds: task name -> task kind.
        dense: the model name that every other is compared to.
        tuned: the dense model LoRA-tuned; the remaining models are compared to it as well.
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
            shares[f"{name} % of {reference_name}"].append(100 * share)
        table[task] = row
    defined = {key: [value for value in values if not math.isnan(value)] for key, values in shares.items()}
    average = {key: sum(values) / len(values) if values else float("nan") for key, values in defined.items()}
    return {"tasks": table, "average": average}


def format_recovery(report: dict) -> str:
    """The recovery table as aligned text: one row per task and the average, one column per model and share."""
    tasks = report["tasks"]
    shares = list(report["average"])
    models = [key for key in next(iter(tasks.values())) if key != "metric" and key not in shares]
    header = ["task", "metric", *models, *shares]
    rows = [
        [task, row["metric"], *(f"{row[m]:.4g}" for m in models), *(f"{row[key]:.1f}" for key in shares)]
        for task, row in tasks.items()
    ]
    rows.append(["average", "", *("" for _ in models), *(f"{report['average'][key]:.1f}" for key in shares)])
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)) for line in [header, *rows]
    )
