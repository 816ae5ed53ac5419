"""Task data and metrics: each metric against a hand computation, k-shot prompts, response-only loss, dynamic
weights, bad task definitions, and ``tailored test`` / ``tailored recovery`` end to end on the tiny model."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from tailored.cli import run
from tailored.data.datamodule import DomainData, dynamic_weights
from tailored.data.metrics import TaskMetrics, balanced_accuracy, row_statistic
from tailored.data.reports import comparison_table, format_comparison
from tailored.data.scoring import greedy_answers, loss_positions, option_log_likelihoods
from tailored.data.tasks import IGNORE_INDEX, Task, encode_example, format_prompt


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> dict[str, str]:
    """Tiny classification, multiple-choice and generation data in the tiny tokenizer's words."""
    folder = tmp_path_factory.mktemp("tasks")
    words = [f"w{i}" for i in range(3, 64)]
    classify = [{"q": f"{words[i % 40]} {words[(3 * i) % 40]}", "a": ["w60", "w61", "w62"][i % 3]} for i in range(30)]
    choose = [
        {"ctx": f"{words[i % 30]} w5", "o0": "w40 w41", "o1": "w42", "o2": f"w43 {words[i % 20]} w44", "label": i % 3}
        for i in range(30)
    ]
    summarise = [{"doc": f"{words[i % 30]} {words[(i + 7) % 30]} w9", "sum": f"w{10 + i % 5} w50"} for i in range(30)]
    return {
        "classify": write_rows(folder / "classify.jsonl", classify),
        "choose": write_rows(folder / "choose.jsonl", choose),
        "summarise": write_rows(folder / "summarise.jsonl", summarise),
    }


def tasks(files: dict[str, str], shots: int = 0) -> list[Task]:
    return [
        Task("classify", files["classify"], "classification", prompt="{q} w10", answer=" {a}",
             choices=[" w60", " w61", " w62"], shots=shots),
        Task("choose", files["choose"], "multiple_choice", prompt="{ctx} w11", choices=[" {o0}", " {o1}", " {o2}"],
             label="label"),
        Task("summarise", files["summarise"], "generation", prompt="{doc} w12", answer=" {sum}", max_new_tokens=4,
             stop=""),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model, tokenizer


def data_module(files, tiny_model_dir, **kwargs) -> DomainData:
    data = DomainData(tasks(files, kwargs.pop("shots", 0)), tokenizer=str(tiny_model_dir), seq_len=32, **kwargs)
    data.setup("test")
    return data


def sequence_log_likelihood(model, prompt: list[int], continuation: list[int]) -> float:
    """Sum of log p(continuation | prompt), one unpadded sequence at a time: the hand computation."""
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    return sum(float(log_probs[len(prompt) - 1 + i, token]) for i, token in enumerate(continuation))


@pytest.mark.parametrize("task_index", [0, 1], ids=["classification", "multiple_choice"])
def test_option_scores_and_accuracy_match_a_hand_computation(task_files, tiny_model_dir, tiny, task_index):
    model, _ = tiny
    data = data_module(task_files, tiny_model_dir)
    items = data.eval_items[task_index]
    metrics = TaskMetrics(data.tasks[task_index])
    correct = correct_per_token = 0
    for start in range(0, len(items), 2):
        chunk = items[start : start + 2]
        batch = data.collate_eval(chunk)
        scores = option_log_likelihoods(model, batch)
        for row, item in enumerate(chunk):
            by_hand = [sequence_log_likelihood(model, item["prompt_ids"], option) for option in item["option_ids"]]
            torch.testing.assert_close(scores[row], torch.tensor(by_hand), atol=1e-4, rtol=1e-5)
            per_token = [score / len(option) for score, option in zip(by_hand, item["option_ids"], strict=True)]
            correct += int(max(range(len(by_hand)), key=by_hand.__getitem__) == item["label"])
            correct_per_token += int(max(range(len(per_token)), key=per_token.__getitem__) == item["label"])
        metrics.update_options(scores, batch["option_lengths"], batch["label"])
    results = metrics.compute()
    assert results["accuracy"] == pytest.approx(correct / len(items))
    assert results["accuracy_norm"] == pytest.approx(correct_per_token / len(items))


def test_batched_greedy_answers_equal_one_at_a_time_generation(task_files, tiny_model_dir, tiny):
    model, tokenizer = tiny
    data = data_module(task_files, tiny_model_dir)
    items = data.eval_items[2][:4]  # prompts of different lengths: left padding must not change the answers
    answers = greedy_answers(model, data.collate_eval(items), tokenizer, max_new_tokens=4, stop="")
    for item, answer in zip(items, answers, strict=True):
        ids = torch.tensor([item["prompt_ids"]])
        alone = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        assert answer == tokenizer.decode(alone[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_answers_stopped_early_equal_full_length_answers_cut_at_the_stop(task_files, tiny_model_dir, tiny):
    """Generation ends once every row's answer holds the stop string; the answers are the cut full-length ones."""
    model, tokenizer = tiny
    data = data_module(task_files, tiny_model_dir)
    batch = data.collate_eval(data.eval_items[2][:4])
    full = greedy_answers(model, batch, tokenizer, max_new_tokens=12, stop="")
    stop = full[0].split()[1]  # a word that every row's answer may or may not hold: both cases are covered
    steps = []
    original = model.forward
    model.forward = lambda *args, **kwargs: steps.append(1) or original(*args, **kwargs)
    try:
        stopped = greedy_answers(model, batch, tokenizer, max_new_tokens=12, stop=stop)
    finally:
        del model.forward
    assert stopped == [answer.split(stop)[0].strip() for answer in full]
    assert any(stop in answer for answer in full)
    assert len(steps) < 12 or not all(stop in answer for answer in full)


def test_the_loss_from_kept_positions_equals_the_full_logits_loss(task_files, tiny_model_dir, tiny):
    """Only the positions that predict an answer token get logits (``logits_to_keep``): the same per-row losses."""
    model, _ = tiny
    data = data_module(task_files, tiny_model_dir)
    batch = next(iter(data.val_dataloader()[2]))
    positions, targets = loss_positions(batch["labels"])
    assert len(positions) < batch["labels"].shape[1] - 1  # prompts are not scored
    with torch.no_grad():
        kept = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=positions)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    metrics = TaskMetrics(data.tasks[2])
    metrics.update_loss(kept.logits, targets)
    by_hand = torch.nn.functional.cross_entropy(
        full[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(len(full), -1)
    torch.testing.assert_close(metrics.row_nll.compute(), by_hand.sum(-1), rtol=1e-5, atol=1e-5)
    assert float(metrics.loss.compute()) == pytest.approx(float(by_hand.sum() / (batch["labels"][:, 1:] >= 0).sum()))


def test_metrics_recomputed_from_the_per_row_values_equal_the_reported_ones():
    """Paired comparisons resample :meth:`TaskMetrics.row_values`: they must give back every reported metric."""
    classify = TaskMetrics(Task("c", "x.jsonl", "classification", prompt="{q}", answer=" {a}", choices=[" a", " b"]))
    scores = torch.tensor([[0.0, -1.0], [0.0, -2.0], [-3.0, 0.0], [0.0, -1.0], [-1.0, 0.0]])
    classify.update_options(scores, torch.ones(10), torch.tensor([0, 0, 1, 1, 0]))
    classify.update_loss(torch.randn(5, 3, 7), torch.tensor([[1, 2, IGNORE_INDEX]] * 5))
    generate = TaskMetrics(Task("g", "x.jsonl", "generation", prompt="{a}", answer="{b}"))
    generate.update_answers(["the cat sat", "a dog"], ["the cat ran", "a dog barked"])
    generate.update_loss(torch.randn(2, 3, 7), torch.tensor([[1, 2, 3], [4, IGNORE_INDEX, 5]]))
    for metrics, names in [(classify, ["accuracy", "balanced_accuracy", "loss"]), (generate, ["rougeL", "rouge2"])]:
        results = metrics.compute()
        columns = {name: torch.tensor(values) for name, values in metrics.row_values().items()}
        for name in names:
            assert float(row_statistic(name, columns)) == pytest.approx(results[name], rel=1e-5), name
    assert classify.compute()["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_rouge_of_known_strings():
    metrics = TaskMetrics(Task("s", "x.jsonl", "generation", prompt="{a}", answer="{b}"))
    metrics.loss.update(torch.tensor(1.0))
    metrics.update_answers(["the cat sat"], ["the cat ran"])
    results = metrics.compute()
    # unigrams 2 of 3 shared; bigrams 1 of 2 ("the cat"); longest common subsequence "the cat" = 2 of 3
    assert results["rouge1"] == pytest.approx(2 / 3, abs=1e-4)
    assert results["rouge2"] == pytest.approx(1 / 2, abs=1e-4)
    assert results["rougeL"] == pytest.approx(2 / 3, abs=1e-4)


def test_perplexity_is_exp_of_the_token_mean_loss(tiny_model_dir, tiny_text, tiny):
    model, _ = tiny
    data = DomainData([Task("words", str(tiny_text))], tokenizer=str(tiny_model_dir), seq_len=16, batch_size=3)
    data.setup("test")
    metrics = TaskMetrics(data.tasks[0])
    total, tokens = 0.0, 0
    for batch in data.val_dataloader()[0]:
        with torch.no_grad():
            loss = model(**batch).loss
            logits = model(batch["input_ids"]).logits[:, :-1]
        metrics.loss.update(loss, weight=(batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        nll = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch["input_ids"][:, 1:].flatten(), reduction="sum"
        )
        total, tokens = total + float(nll), tokens + batch["input_ids"][:, 1:].numel()
    assert metrics.compute()["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)


def test_response_only_loss_ignores_prompt_tokens(task_files, tiny):
    model, tokenizer = tiny
    task = tasks(task_files)[2]
    row = {"doc": "w20 w21 w22 w9", "sum": "w30 w31"}
    example = encode_example(task, row, tokenizer, max_length=32, response_only=True)
    prompt_length = len(tokenizer(format_prompt(task, row, tokenizer))["input_ids"])
    assert example["labels"][:prompt_length] == [IGNORE_INDEX] * prompt_length
    assert example["labels"][prompt_length:] == example["input_ids"][prompt_length:]  # answer + eos
    ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss
        log_probs = torch.log_softmax(model(ids).logits[0], dim=-1)
    answer_positions = range(prompt_length, len(example["input_ids"]))
    by_hand = -sum(float(log_probs[i - 1, example["input_ids"][i]]) for i in answer_positions) / len(answer_positions)
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    full = encode_example(task, row, tokenizer, max_length=32, response_only=False)
    assert full["labels"] == full["input_ids"]


def test_k_shot_prompts_are_solved_training_rows_chosen_by_seed(task_files, tiny_model_dir, tiny):
    _, tokenizer = tiny
    first, second = (data_module(task_files, tiny_model_dir, shots=2) for _ in range(2))
    other_seed = data_module(task_files, tiny_model_dir, shots=2, seed=1)
    assert [item["prompt_ids"] for item in first.eval_items[0]] == [item["prompt_ids"] for item in second.eval_items[0]]
    assert [item["prompt_ids"] for item in first.eval_items[0]] != [i["prompt_ids"] for i in other_seed.eval_items[0]]
    task = first.tasks[0]
    train_rows, held_out = first._split(task)
    train_rows, _ = first._carve_validation(task, train_rows)  # shots come from the rows that are trained on
    shots = first.shots_for(0, 0, train_rows)
    assert len(shots) == 2 and all(shot in list(train_rows) for shot in shots)
    expected = f"{shots[0]['q']} w10 {shots[0]['a']}\n\n{shots[1]['q']} w10 {shots[1]['a']}\n\n{held_out[0]['q']} w10"
    assert format_prompt(task, held_out[0], tokenizer, shots) == expected
    assert first.eval_items[0][0]["prompt_ids"] == tokenizer(expected)["input_ids"]
    assert first.shots_for(0, 0, train_rows) != first.shots_for(0, 1, train_rows)


def test_chat_template_wraps_prompt_and_shots(task_files, tiny):
    _, tokenizer = tiny
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    task = Task("c", "x.jsonl", "generation", prompt="{doc}", answer=" {sum}", chat=True)
    prompt = format_prompt(task, {"doc": "w5", "sum": "w6"}, tokenizer, shots=[{"doc": "w7", "sum": "w8"}])
    assert prompt == "<user>w7<assistant>w8<user>w5<assistant>"


def test_dynamic_weights_move_toward_the_task_furthest_above_its_reference():
    weights = dynamic_weights([0.5, 0.3, 0.2], losses=[2.0, 3.5, 1.0], references=[2.0, 2.5, 1.5])
    assert sum(weights) == pytest.approx(1.0)
    assert weights[1] > 0.3 and weights[0] < 0.5 and weights[2] < 0.2  # only task 1 is above its reference
    # the excess is signed: task 2, 0.5 below its reference, loses weight against task 0, which sits at it
    assert weights[0] / weights[2] == pytest.approx(0.5 / 0.2 * math.exp(0.5), rel=1e-3)
    assert min(dynamic_weights([1.0, 1e-30], [0.0, 0.0], [0.0, 0.0])) >= 1e-4 / 2  # smoothing floor c / K


@pytest.mark.parametrize(
    ("definition", "message"),
    [
        (dict(kind="ranking"), "task 'bad': unknown kind 'ranking'"),
        (dict(kind="generation", prompt="{q}"), "task 'bad': a generation task needs an answer template"),
        (dict(kind="multiple_choice", prompt="{q}", choices=[" a", " b"]), "a multiple_choice task needs the label"),
        (dict(kind="classification", prompt="{q}", answer="{a}", choices=["x"]), "needs two or more choices"),
    ],
)  # fmt: skip
def test_bad_task_definitions_are_named(definition, message):
    with pytest.raises(ValueError, match=message):
        Task("bad", "x.jsonl", **definition)


def test_task_fields_missing_from_the_data_are_named(task_files, tiny_model_dir):
    task = Task("classify", task_files["classify"], "classification", prompt="{question}", answer=" {a}",
                choices=[" w60", " w61"])  # fmt: skip
    with pytest.raises(ValueError, match=r"task 'classify': .*classify.jsonl has no field question"):
        DomainData([task], tokenizer=str(tiny_model_dir))


def test_held_out_rows_are_a_fixed_random_sample_of_a_sorted_file(tmp_path, tiny_model_dir):
    rows = [{"q": f"w{3 + i % 40}", "a": answer} for answer in ("w60", "w61", "w62") for i in range(20)]  # by label
    source = write_rows(tmp_path / "sorted.jsonl", rows)
    task = Task("sorted", source, "classification", prompt="{q}", answer=" {a}", choices=[" w60", " w61", " w62"])

    def held_out(source_field: str, **kwargs) -> list[dict]:
        data = DomainData([replace(task, **{source_field: source})], tokenizer=str(tiny_model_dir), **kwargs)
        return list(data._split(data.tasks[0])[1])

    assert {row["a"] for row in held_out("source")} == {"w60", "w61", "w62"}  # 10% of 60 rows, not the last 6
    assert held_out("source") == held_out("source", seed=1)  # every run seed is compared on the same rows
    capped = held_out("test_source", test_rows=12)
    assert len(capped) == 12 and {row["a"] for row in capped} == {"w60", "w61", "w62"}  # not the first 12
    train_rows, held = DomainData([task], tokenizer=str(tiny_model_dir))._split(task)
    assert len(train_rows) + len(held) == len(rows) and not set(map(str, held)) & set(map(str, train_rows))


def test_held_out_rows_are_batched_by_length(tmp_path, tiny_model_dir):
    rows = [{"q": " ".join(["w7"] * (1 + (5 * i) % 9)), "a": "w60"} for i in range(18)]  # lengths 1..9, shuffled
    source = write_rows(tmp_path / "varied.jsonl", rows)
    shots = write_rows(
        tmp_path / "shots.jsonl", [{"q": " ".join(["w9"] * (1 + (3 * i) % 7)), "a": "w61"} for i in range(10)]
    )
    task = Task("varied", shots, "classification", prompt="{q}", answer=" {a}", choices=[" w60", " w61"])
    data = DomainData([replace(task, test_source=source, shots=1)], tokenizer=str(tiny_model_dir), batch_size=3)
    data.setup("test")
    lengths = [len(item["prompt_ids"]) + 1 for item in data.eval_items[0]]  # with its shot; options are 1 token
    assert len(lengths) == len(rows) and len(set(lengths)) > 9
    assert lengths == sorted(lengths)  # each batch pads to about its own length, not to the longest row's


def test_held_out_text_blocks_are_capped_and_evenly_spread(tiny_model_dir, tiny_text):
    def held_out(**kwargs) -> list[list[int]]:
        data = DomainData([Task("words", str(tiny_text))], tokenizer=str(tiny_model_dir), seq_len=8, **kwargs)
        data.setup("test")
        return [item["input_ids"] for item in data.eval_items[0]]

    every_block = held_out()
    assert len(every_block) > 5
    assert held_out(eval_blocks=len(every_block)) == every_block
    spread = held_out(eval_blocks=3)
    step = len(every_block) / 3
    assert spread == [every_block[int(i * step)] for i in range(3)]
    assert spread[-1] in every_block[len(every_block) // 2 :]  # the cap takes blocks from the whole text


def test_an_empty_split_is_named(tmp_path, tiny_model_dir):
    short = tmp_path / "short.txt"
    short.write_text("w3 w4\nw5 w6\n")
    data = DomainData([Task("short", str(short))], tokenizer=str(tiny_model_dir), seq_len=64)
    with pytest.raises(ValueError, match="task 'short': its training split is empty after tokenisation"):
        data.setup("fit")


def test_test_and_recovery_commands_report_every_task_kind(tmp_path, task_files, tiny_model_dir, tiny_text):
    config = {
        "model": {"model": str(tiny_model_dir), "pruning": None},
        "data": {
            "tasks": [
                {"name": "classify", "source": task_files["classify"], "kind": "classification", "prompt": "{q} w10",
                 "answer": " {a}", "choices": [" w60", " w61", " w62"]},
                {"name": "summarise", "source": task_files["summarise"], "kind": "generation", "prompt": "{doc} w12",
                 "answer": " {sum}", "max_new_tokens": 4},
                {"name": "words", "source": str(tiny_text)},
            ],
            "seq_len": 32,
        },
        "trainer": {"accelerator": "cpu", "default_root_dir": str(tmp_path / "run"), "enable_progress_bar": False},
    }  # fmt: skip
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    run(["test", "-c", str(path)])
    results = json.loads(next((tmp_path / "run").rglob("test_results.json")).read_text())
    metrics = {
        "classify": {"accuracy", "accuracy_norm", "balanced_accuracy"},
        "summarise": {"rouge1", "rouge2", "rougeL"},
    }
    metrics["words"] = {"perplexity"}
    for task, names in metrics.items():  # every figure with its bootstrap standard error
        assert set(results[task]) == {name + suffix for name in names | {"loss"} for suffix in ("", "_stderr")}
        assert results[task]["loss_stderr"] > 0  # row losses always differ; a metric may be equal on every row
        assert all(0 <= results[task][f"{name}_stderr"] < float("inf") for name in names)
    rows = json.loads(next((tmp_path / "run").rglob("test_rows.json")).read_text())
    for task, names in metrics.items():  # the per-row values give back every figure (paired comparisons use them)
        columns = {name: torch.tensor(values) for name, values in rows[task].items()}
        for name in names:
            assert float(row_statistic(name, columns)) == pytest.approx(results[task][name], rel=1e-4)

    written = sorted((tmp_path / "run").rglob("*"))
    for _ in range(2):  # a second compare on the same config works as well
        report = run(["compare", "-c", str(path), "--pruned", str(tiny_model_dir), "--out", str(tmp_path / "r.json")])
    assert sorted((tmp_path / "run").rglob("*")) == written  # compare writes nothing but --out
    rows = report["tasks"]  # the same model evaluated twice: equal metrics
    assert rows["classify"]["pruned"] == rows["classify"]["dense"] and rows["words"]["metric"] == "perplexity"
    assert rows["words"]["pruned % of dense"] == pytest.approx(100.0)
    assert json.loads((tmp_path / "r.json").read_text())["average"]["pruned % of dense"] == pytest.approx(100.0)


def test_comparison_table_inverts_perplexity_and_compares_to_dense_and_tuned():
    results = {
        "dense": {"qa": {"accuracy": 0.8}, "text": {"perplexity": 10.0}},
        "tuned": {"qa": {"accuracy": 0.9}, "text": {"perplexity": 8.0}},
        "pruned": {"qa": {"accuracy": 0.6}, "text": {"perplexity": 20.0}},
    }
    kinds = {"qa": "multiple_choice", "text": "language_modeling"}  # no chance levels given: plain shares
    table = comparison_table(results, kinds, dense="dense", tuned="tuned")
    assert table["tasks"]["qa"]["pruned % of dense"] == pytest.approx(75.0)
    assert table["tasks"]["text"]["pruned % of dense"] == pytest.approx(50.0)
    assert table["tasks"]["text"]["pruned % of tuned"] == pytest.approx(40.0)
    assert table["average"] == pytest.approx(
        {"tuned % of dense": (112.5 + 125.0) / 2, "pruned % of dense": 62.5, "pruned % of tuned": (60.0 / 0.9 + 40) / 2}
    )
    text = format_comparison(table).splitlines()
    assert text[0].split() == ["task", "metric", "dense", "tuned", "pruned", "tuned", "%", "of", "dense", "pruned",
                               "%", "of", "dense", "pruned", "%", "of", "tuned"]  # fmt: skip
    assert text[-1].split() == ["average", "118.8", "62.5", "53.3"]


def test_dynamic_batch_loading_reweights_tasks_during_fit(tmp_path, tiny_model_dir, tiny_text):
    """Weights follow the update rule applied to the logged validation losses, from the dense reference losses."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    repeated = tmp_path / "repeated.txt"
    repeated.write_text("\n".join(["w3 w4 w5 w6 w7 w8"] * 100))
    config = {
        "model": {"model": str(tiny_model_dir), "pruning": {"target": 0.5, "round_to": 1}},
        "data": {
            "tasks": [{"name": "words", "source": str(tiny_text)}, {"name": "repeated", "source": str(repeated)}],
            "seq_len": 16,
            "dynamic": True,
        },
        "trainer": {"accelerator": "cpu", "max_steps": 30, "val_check_interval": 10, "log_every_n_steps": 5,
                    "default_root_dir": str(tmp_path / "run"), "enable_progress_bar": False},
        "export": {"enabled": False},
    }  # fmt: skip
    path = tmp_path / "dynamic.yaml"
    path.write_text(yaml.safe_dump(config))
    run(["fit", "-c", str(path)])
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["DomainData"]
    events = EventAccumulator(str(next((tmp_path / "run").rglob("events.out.*")).parent), size_guidance={"scalars": 0})
    events.Reload()
    losses = [[event.value for event in events.Scalars(f"val/{name}/loss")] for name in ("words", "repeated")]
    assert len(losses[0]) == 3  # validations at steps 10, 20, 30
    weights = [1.0, 1.0]
    for step_losses in zip(*losses, strict=True):
        weights = dynamic_weights(weights, step_losses, state["reference_losses"])
    assert state["weights"] == pytest.approx(weights, rel=1e-4)
    assert abs(weights[0] - weights[1]) > 1e-3  # pruning raised the losses above the dense reference unevenly


def test_balanced_accuracy_does_not_reward_the_label_prior():
    """Always answering the majority label: accuracy is its share, balanced accuracy 1 / labels; bootstrap too."""
    label = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])
    always_zero = (label == 0).double()
    assert float(always_zero.mean()) == pytest.approx(0.6)
    assert float(balanced_accuracy(always_zero, label)) == pytest.approx(1 / 3)
    half_of_each = torch.tensor([1, 1, 1, 0, 0, 0, 1, 0, 1, 0]).double()
    assert float(balanced_accuracy(half_of_each, label)) == pytest.approx(0.5)
    resampled = torch.stack([label, torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 2, 2])])  # a resample without label 0
    correct = torch.stack([always_zero, torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 1]).double()])
    assert balanced_accuracy(correct, resampled).tolist() == pytest.approx([1 / 3, 0.5])
