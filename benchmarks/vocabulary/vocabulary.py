"""What domain vocabulary trimming buys and costs on the medical suite: one run, exported with and without it.

    python benchmarks/vocabulary/vocabulary.py                       # 40 steps, 100 test rows per task
    python benchmarks/vocabulary/vocabulary.py --max-steps 200 --test-rows 0 --work runs/vocabulary-full

One ``tailored fit -c configs/medical.yaml`` with ``pruning.vocabulary`` on (the removed ids masked in training),
shortened to ``--max-steps``; its last checkpoint is then exported twice, with the domain vocabulary and with every
token, so the two models differ in their vocabulary alone (same training, same structural pruning). Both are
scored with their own tokenizers on the test rows:

- the suite's metrics (PubMedQA balanced accuracy, HQS ROUGE-L), as ``tailored test`` scores them;
- bits per byte of the HQS reference summaries given their prompts, of the PubMed abstracts (the language-modelling
  task's test text, 100 rows each) and of general text (the novel of the quickstart): ``sum(-log2 p(token)) /
  UTF-8 bytes``, comparable across tokenizers, where perplexity per token is not; and the tokens per byte of that
  text (how much longer the trimmed tokenizer makes it);
- prefill (last position's logits, as generation needs; and every position's, as scoring needs) and greedy decode
  times, interleaved in one process, as ratios.

Every stage writes its result under ``--work`` and is skipped when it is there, so a killed run resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from tailored.core.export import load_pruned
from tailored.data.datamodule import DomainData
from tailored.data.scoring import evaluate
from tailored.data.tasks import Task
from tailored.train.module import TailoredModule
from tailored.train.summary import device_name, prefill_seconds
from tailored.train.vocabulary import mask_training_logits

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "medical.yaml"
GENERAL_TEXT = Path.home() / ".cache" / "tailored" / "data" / "sentencepiece==0.2.3" / "test" / "botchan.txt"
"""The quickstart's novel, as its first run fetched it (pypi:sentencepiece==0.2.3/test/botchan.txt)."""
EXPORTS = ("without", "with")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/vocabulary-medical", help="folder of the run and the exports")
    parser.add_argument("--max-steps", type=int, default=40, help="training steps of the medical run")
    parser.add_argument("--keep-top", type=int, default=0, help="pruning.vocabulary.keep_top")
    parser.add_argument("--test-rows", type=int, default=100, help="test rows per task (0: every row)")
    parser.add_argument("--general-bytes", type=int, default=60_000, help="bytes of general text scored")
    parser.add_argument("--repeats", type=int, default=10, help="timed passes per model")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vocabulary-medical.json"))
    return parser.parse_args(argv)


def fit(args: argparse.Namespace, work: Path) -> Path:
    """The shortened medical run with the domain vocabulary; its last checkpoint."""
    checkpoint = work / "run" / "checkpoints" / "last.ckpt"
    if checkpoint.is_file():
        return checkpoint
    command = [
        str(Path(sys.executable).parent / "tailored"), "fit", "-c", str(CONFIG),
        f"--model.pruning.vocabulary.keep_top={args.keep_top}",
        f"--trainer.max_steps={args.max_steps}", f"--trainer.val_check_interval={args.max_steps}",
        "--trainer.limit_val_batches=4", f"--trainer.default_root_dir={work / 'run'}",
        f"--checkpoint.every_n_train_steps={args.max_steps}",
        "--trainer.enable_progress_bar=false", "--export.summary=false",
    ]  # fmt: skip
    subprocess.run(command, check=True, cwd=ROOT)
    return checkpoint


def export_both(checkpoint: Path, work: Path) -> dict[str, Path]:
    """The checkpoint's model exported with the domain vocabulary and with every token."""
    paths = {name: work / f"export-{name}" for name in EXPORTS}
    if all((path / "pruning_report.json").is_file() for path in paths.values()):
        return paths
    module = TailoredModule.load_from_checkpoint(checkpoint, map_location="cpu")
    module.export(paths["with"], overwrite=True)
    module.kept_tokens = None
    mask_training_logits(module)
    module.export(paths["without"], overwrite=True)
    return paths


def domain_data(export: Path, test_rows: int | None) -> DomainData:
    """The medical config's tasks and test rows, encoded by the export's own tokenizer."""
    settings = yaml.safe_load(CONFIG.read_text())["data"]
    tasks = [Task(**task) for task in settings["tasks"]]
    sizes = {key: settings[key] for key in ("seq_len", "batch_size", "val_rows")}
    data = DomainData(tasks, str(export), test_rows=test_rows, data_dir=str(ROOT / settings["data_dir"]), **sizes)
    data.setup("test")
    return data


@torch.no_grad()
def bits_per_byte(model, tokenizer, pairs: list[tuple[str, str]]) -> dict[str, float]:
    """``sum(-log2 p)`` of each pair's second text given its first, over the second texts' UTF-8 bytes, and the
    tokens per byte of the second texts."""
    nats, tokens, size = 0.0, 0, 0
    for context, text in pairs:
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        ids = tokenizer(context + text, add_special_tokens=False)["input_ids"]
        if ids[: len(context_ids)] != context_ids:
            raise ValueError(f"the text does not start a new token after its context: {text[:40]!r}")
        input_ids = torch.tensor([ids])
        logits = model(input_ids=input_ids).logits[0, len(context_ids) - 1 : -1].float()  # [T_text, V]
        targets = input_ids[0, len(context_ids) :]
        nats += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        tokens, size = tokens + len(targets), size + len(text.encode())
    return {"bits_per_byte": nats / math.log(2) / size, "tokens_per_byte": tokens / size, "bytes": size}


def test_pairs(data: DomainData, tokenizer, rows: int) -> dict[str, list[tuple[str, str]]]:
    """Per task, (context, text) pairs of its first ``rows`` test rows: (prompt, reference answer) of a generation
    task, (end-of-text token, text) of a language-modelling one."""
    pairs = {}
    for task in data.tasks:
        test = data.split_rows(task).test
        test = test.select(range(min(rows, len(test))))
        if task.kind == "generation":
            pairs[task.name] = [(task.render(task.prompt, row), task.render(task.answer, row)) for row in test]
        elif task.kind == "language_modeling":
            pairs[task.name] = [(tokenizer.eos_token, task.render(task.text, row)) for row in test]
    return pairs


def general_pairs(tokenizer, size: int) -> list[tuple[str, str]]:
    """Paragraph-sized pieces of the novel, each after the end-of-text token (so every byte is predicted)."""
    text = GENERAL_TEXT.read_text().replace("\r\n", "\n")[20_000 : 20_000 + size]  # past the licence header
    lines = text.split("\n")
    pieces = ["\n".join(lines[i : i + 8]) for i in range(0, len(lines), 8)]
    return [(tokenizer.eos_token, piece) for piece in pieces if piece.strip()]


def score(path: Path, test_rows: int | None, general_bytes: int) -> dict:
    """The export's suite metrics, bits per byte (HQS references, general text) and parameter count."""
    model, data = load_pruned(path, dtype=torch.float32), domain_data(path, test_rows)
    tokenizer = data.tokenizer
    results = evaluate(model, data.test_dataloader(), data.tasks, tokenizer)
    general = bits_per_byte(model, tokenizer, general_pairs(tokenizer, general_bytes))
    return {
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "vocab_size": model.config.vocab_size,
        "tasks": results,
        "bits_per_byte": {
            name: bits_per_byte(model, tokenizer, pairs) for name, pairs in test_pairs(data, tokenizer, 100).items()
        },
        "general_text": general,
    }


@torch.no_grad()
def decode_seconds(models: dict, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict[str, float]:
    """Median seconds of a greedy decode of ``new_tokens`` after ``prompt`` [B, T], the models interleaved."""
    times = {name: [] for name in models}
    options = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    for model in models.values():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), **options)
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model.generate(prompt, attention_mask=torch.ones_like(prompt), **options)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


@torch.no_grad()
def full_logits_seconds(models: dict, input_ids: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of a forward pass with every position's logits (scoring, training), interleaved."""
    times = {name: [] for name in models}
    for model in models.values():
        model(input_ids=input_ids)
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(input_ids=input_ids)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def speed(paths: dict[str, Path], repeats: int) -> dict:
    """Prefill and decode times of the two exports on the same ids (ids both vocabularies have)."""
    models = {name: load_pruned(path, dtype=torch.float32) for name, path in paths.items()}
    vocab_size = min(model.config.vocab_size for model in models.values())
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(vocab_size, (1, 192), generator=generator)
    batch = torch.randint(vocab_size, (4, 192), generator=generator)
    prefill = prefill_seconds(models, batch, repeats)
    full = full_logits_seconds(models, batch, repeats)
    decode = decode_seconds(models, prompt, 64, max(3, repeats // 3))
    return {
        "prefill": {"speedup": prefill["without"] / prefill["with"], "seconds": prefill, "batch": [4, 192]},
        "full_logits": {"speedup": full["without"] / full["with"], "seconds": full, "batch": [4, 192]},
        "decode": {"speedup": decode["without"] / decode["with"], "seconds": decode, "prompt": 192, "new_tokens": 64},
        "device": device_name(batch.device),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = export_both(fit(args, work), work)
    test_rows = args.test_rows or None
    scores = {}
    for name, path in paths.items():
        cached = work / f"scores-{name}.json"
        if not cached.is_file():
            cached.write_text(json.dumps(score(path, test_rows, args.general_bytes), indent=2) + "\n")
        scores[name] = json.loads(cached.read_text())
    report = json.loads((paths["with"] / "pruning_report.json").read_text())
    without, with_ = scores["without"], scores["with"]
    growth = with_["general_text"]["tokens_per_byte"] / without["general_text"]["tokens_per_byte"]
    document = {
        "command": "python benchmarks/vocabulary/vocabulary.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "scale": {
            "config": "configs/medical.yaml",
            "max_steps": args.max_steps,
            "test_rows_per_task": test_rows or "all",
            "general_text": f"{args.general_bytes} bytes of {GENERAL_TEXT.name}",
            "note": "one shortened run exported twice: the two models differ in their vocabulary alone",
        },
        "kept_tokens": report["vocabulary"]["after"],
        "vocabulary": report["vocabulary"],
        "parameters_removed": report["vocabulary"]["parameters_removed"],
        "parameters": {"without": without["parameters"], "with": with_["parameters"]},
        "metrics": {name: {key: value for key, value in scores[name].items() if key != "parameters"}
                    for name in EXPORTS},
        "general_text_cost": {
            "sequence_length_growth": growth,
            "bits_per_byte": {name: scores[name]["general_text"]["bits_per_byte"] for name in EXPORTS},
        },
        "speedup": speed(paths, args.repeats),
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps({key: document[key] for key in ("kept_tokens", "parameters_removed", "general_text_cost")}))
    print(json.dumps({name: value["speedup"] for name, value in document["speedup"].items() if name != "device"}))
    return document


if __name__ == "__main__":
    main()
