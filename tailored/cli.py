"""The ``tailored`` command: LightningCLI for ``fit`` / ``validate`` / ``test``, plus ``export``.

One node, one process (CPU or one GPU)::

    tailored fit -c configs/quickstart.yaml
    tailored fit -c configs/quickstart.yaml --ckpt_path last          # continue a killed run
    tailored test -c configs/quickstart.yaml --ckpt_path last
    tailored export --ckpt_path runs/quickstart/checkpoints/last.ckpt --out exports/quickstart
    tailored compare -c configs/quickstart.yaml --pruned <export> --tuned <export of a pruning: null run>

Several GPUs of one node (Lightning launches the processes): DDP when the model fits one GPU, FSDP2 to shard it
over every GPU (tailored.train.sharding)::

    tailored fit -c configs/llama3-8b-medical.yaml --trainer.devices 8 --model.pruning.prune_at_recovery false
    tailored fit -c configs/fsdp.yaml

Several nodes, the same config (docs/distributed.md has the SLURM script)::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint <node 0>:29500 \\
        -m tailored.cli fit -c configs/fsdp.yaml --trainer.num_nodes 2                      # on every node
    srun --kill-on-bad-exit=1 tailored fit -c configs/fsdp.yaml --trainer.num_nodes 2       # in an sbatch job

``tailored fit --help`` lists every option with its documentation; ``--print_config`` prints the full config.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path

import lightning as L
import torch
from jsonargparse import CLI
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from tailored.data.datamodule import DomainData
from tailored.data.metrics import chance_level
from tailored.data.reports import comparison_table, format_comparison
from tailored.data.tasks import RenamedOptionWarning, Task
from tailored.models import EMBEDDED_SMOLLM2, check_model_name, load_config
from tailored.train import checkpoints
from tailored.train.callbacks import DynamicBatchLoading, ExportPruned, GateMonitor, LineProgress, ParameterSummary
from tailored.train.module import TailoredModule
from tailored.train.settings import available_memory, check_lora_rank, check_memory, training_memory
from tailored.train.sharding import METADATA_NAME, is_sharded_checkpoint, one_process_checkpoint
from tailored.train.watchdog import RankFailure, RankWatchdog


def checkpoint_dir(root: str | None) -> str:
    """Checkpoints live in ``<trainer.default_root_dir>/checkpoints``, the same folder for every resumed run."""
    return os.path.join(root or ".", "checkpoints")


class TailoredCLI(LightningCLI):
    """LightningCLI with the data tokenizer linked to the model, a resumable checkpoint, export and gate plots."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model", "data.tokenizer")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 50})
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=checkpoint_dir)
        parser.add_lightning_class_args(ExportPruned, "export")
        parser.add_lightning_class_args(GateMonitor, "gate_monitor")
        parser.add_lightning_class_args(RankWatchdog, "watchdog")

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """The trainer, printing :class:`LineProgress` lines when the output is not a terminal (a log file), where
        Lightning's live progress bar would show nothing until the run ends."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = list(config.get("callbacks") or [])
        wants_progress = config.get("enable_progress_bar") is not False
        if wants_progress and not sys.stdout.isatty() and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, LineProgress()]
        return super().instantiate_trainer(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse, then check ``--ckpt_path`` (LightningCLI reads the checkpoint right after parsing)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            config = self.config[subcommand]
            root = config.trainer.default_root_dir
            if root and Path(root).exists() and not Path(root).is_dir():
                raise NotADirectoryError(f"trainer.default_root_dir {root} is a file; choose a folder for the run")
            check_checkpoint(config.get("ckpt_path"), root, subcommand)

    def _parse_ckpt_path(self) -> None:
        """Lightning's (the checkpoint's model settings replace the config's), except a base model folder that is
        no longer where the checkpoint says (the config's model is used: the model moved); then the allocation a
        tailored 0.1 checkpoint's settings lack, as that run had it (tailored.train.checkpoints.upgraded)."""
        subcommand = self.config.get("subcommand")
        given = self.config[subcommand].model.model if subcommand else None
        super()._parse_ckpt_path()
        config = self.config[subcommand] if subcommand else None
        if config is not None and config.model.model != given and moved(config.model.model):
            print(f"the checkpoint's model {config.model.model} is not there; using {given}")
            config.model.model = config.data.tokenizer = given  # data.tokenizer: linked to model.model
        path = config.get("ckpt_path") if config is not None else None
        legacy = path and Path(path).is_file() and checkpoints.predates_allocation(torch.load(path, weights_only=True))
        if legacy:
            self.config[subcommand].model.pruning.allocation = checkpoints.LEGACY_ALLOCATION

    def _run_subcommand(self, subcommand: str) -> None:
        """Check what needs the model's config but no weights (:func:`check_before_weights`), then run the
        subcommand; a run refused for bad input leaves no log folder behind (:func:`remove_unused_log_folders`)."""
        created = [folder for folder in log_folders(self.trainer) if not folder.exists()]
        try:
            check_before_weights(self.model, self.datamodule, self.trainer, subcommand)
            super()._run_subcommand(subcommand)
        except USER_ERRORS:
            if self.trainer.is_global_zero:
                remove_unused_log_folders(created)
            raise


def moved(model: str) -> bool:
    """``model`` (a checkpoint's base model) names a local folder that does not exist here."""
    try:
        check_model_name(model)
    except FileNotFoundError:
        return True
    return False


def check_before_weights(module: TailoredModule, data: DomainData, trainer: L.Trainer, subcommand: str) -> None:
    """Refuse, before any weight loads, a LoRA rank the model's projections cannot hold and (``fit``) a training
    step that cannot fit in the memory of the device it will run on (:mod:`tailored.train.settings`)."""
    config = load_config(module.model_name)
    check_lora_rank(module.lora_settings, config)
    if subcommand != "fit":
        return
    device = getattr(trainer.strategy, "root_device", torch.device("cpu"))
    forked = getattr(trainer.strategy.launcher, "_start_method", None) == "fork"
    if device.type == "cuda" and forked:  # querying the GPU now would break the forked processes' CUDA
        return
    sharded = isinstance(trainer.strategy, ModelParallelStrategy)
    needed = training_memory(
        config,
        data.batch_size,
        data.seq_len,
        module.dtype_name,
        module.lora_settings,
        module.distill_settings,
        module.gradient_checkpointing,
        shards=trainer.world_size if sharded else 1,
    )
    check_memory(needed, available_memory(device), device, processes=trainer.num_devices)


UNUSED_LOG_FILES = ("config.yaml", "hparams.yaml")
"""Files a run writes to its log folder before (or without) logging anything: the saved config, the logger's
hyper-parameters."""


def log_folders(trainer: L.Trainer) -> list[Path]:
    """The folders the run logs into (each logger's version folder, or the root without a logger) and their
    parents up to ``trainer.default_root_dir``, deepest first."""
    folders = [Path(logger.log_dir) for logger in trainer.loggers if getattr(logger, "log_dir", None)]
    root = Path(trainer.default_root_dir).absolute()
    chains = []
    for folder in folders or [root]:
        folder = folder.absolute()
        chains.append(folder)
        while folder != root and root in folder.parents:
            folder = folder.parent
            chains.append(folder)
    return sorted(set(chains), key=lambda folder: len(folder.parts), reverse=True)


def remove_unused_log_folders(created: list[Path]) -> None:
    """Remove the folders of ``created`` (made by this run: they did not exist when it started) that hold nothing
    but :data:`UNUSED_LOG_FILES`, TensorBoard event files without an event, and such folders, deepest first."""
    for folder in created:
        if not folder.is_dir():
            continue
        entries = list(folder.iterdir())
        if not all(entry.is_file() and unused_log_file(entry) for entry in entries):
            continue
        for entry in entries:
            entry.unlink()
        folder.rmdir()


def unused_log_file(path: Path) -> bool:
    """``path`` is a saved config or hyper-parameters, or a TensorBoard event file holding its header only."""
    if path.name in UNUSED_LOG_FILES:
        return True
    if not path.name.startswith("events.out.tfevents."):
        return False
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    try:
        return all(event.WhichOneof("what") == "file_version" for event in EventFileLoader(str(path)).Load())
    except Exception:  # unreadable: keep it
        return False


def check_checkpoint(ckpt_path: str | None, root: str, subcommand: str = "fit") -> None:
    """Fail clearly on a checkpoint that is missing or unreadable, before the model loads.

    ``last`` may find nothing when fitting (the run starts fresh), not when evaluating: that would silently
    evaluate the untrained model.
    """
    if ckpt_path == "last" and subcommand != "fit" and not Path(checkpoint_dir(root), "last.ckpt").exists():
        raise FileNotFoundError(
            f"--ckpt_path last: {checkpoint_dir(root)} has no last.ckpt; check trainer.default_root_dir "
            "(the fit run's), or pass a checkpoint file"
        )
    if ckpt_path in (None, "last", "best", "hpc"):
        return
    path = Path(ckpt_path)
    if path.is_dir() and not is_sharded_checkpoint(path):  # an FSDP checkpoint is a folder
        raise IsADirectoryError(f"checkpoint {path} is a folder; pass a checkpoint file in it, e.g. {path}/last.ckpt")
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; checkpoints of this run are in {checkpoint_dir(root)}"
        )
    try:
        torch.load(path / METADATA_NAME if path.is_dir() else path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # any unpickling failure means the same thing to the user
        raise ValueError(
            f"checkpoint {path} is corrupt or not a tailored checkpoint ({error}); use another one"
        ) from None


def export(ckpt_path: str, out: str, overwrite: bool = False, model: str | None = None) -> None:
    """Export the pruned model of a ``tailored fit`` checkpoint (any step), as the end of training would.

    Args:
        ckpt_path: a checkpoint written by ``tailored fit`` (e.g. ``runs/<run>/checkpoints/last.ckpt``; a folder for
            an FSDP run, read on this one process).
        out: folder to write the model, tokenizer and pruning_report.json to (must not exist unless overwrite).
        overwrite: replace an existing non-empty ``out``.
        model: the base model the run started from, when it has moved since (default: the path or name the
            checkpoint records; checkpoints hold no base weights).
    """
    check_checkpoint(ckpt_path, ".")
    if Path(out).exists() and not Path(out).is_dir():
        raise FileExistsError(f"--out {out} is a file; choose a folder path for the export")
    if Path(out).is_dir() and any(Path(out).iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already holds files; choose a new folder or pass --overwrite true")
    checkpoint = one_process_checkpoint(ckpt_path)
    if model is None:
        recorded = recorded_model(checkpoint)
        try:
            check_model_name(recorded)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"checkpoint {ckpt_path} was written for the base model {recorded!r}, which is not there any more; "
                "if it moved, pass where it is now: --model <path>"
            ) from None
    else:
        check_model_name(model)
    moved = {} if model is None else {"model": model}
    module = TailoredModule.load_from_checkpoint(checkpoint, map_location="cpu", **moved)
    report = module.export(out, overwrite=overwrite)
    parameters = report["parameters"]
    print(f"pruned model saved to {out}: {parameters['after']:,} parameters ({parameters['kept_fraction']:.1%})")


def recorded_model(checkpoint: str | io.BytesIO) -> str:
    """The base model (path or name) a ``tailored fit`` checkpoint was written for."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=isinstance(checkpoint, str))
    if isinstance(checkpoint, io.BytesIO):
        checkpoint.seek(0)
    return state.get("hyper_parameters", {}).get("model", EMBEDDED_SMOLLM2)  # TailoredModule's default


def compare(
    run_config: str,
    pruned: str,
    tuned: str | None = None,
    dense: str | None = None,
    general: str | None = None,
    out: str | None = None,
) -> dict:
    """Evaluate the dense model, the dense model LoRA-tuned and the pruned model on a config's tasks, and print
    each task's primary metric with the share of the dense model's that the others keep (ATP's "% of dense").

    Args:
        run_config: a ``tailored fit`` config (``-c``); its data section (tasks, held-out splits, shots) and
            model are used.
        pruned: the pruned model's export folder (``<log dir>/export`` of a ``tailored fit`` run).
        tuned: the export of the same run with ``--model.pruning null`` (plain LoRA, merged into the dense model).
        dense: the dense model (default: the config's ``model.model``).
        general: a general-text source (any task source: a text file, ``pypi:...``, a hub dataset) whose
            perplexity is shown under the domain tasks: what the domain models kept outside their domain. It is
            left out of the average.
        out: also write the table as JSON to this file.
    """
    if out and Path(out).is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; name a JSON file to write the table to")
    with warnings.catch_warnings():  # Lightning warns when args are given while sys.argv holds the user's
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        args = ["-c", run_config, "--trainer.logger", "false"]  # no logger: nothing is written but ``out``
        cli = TailoredCLI(TailoredModule, DomainData, run=False, args=args, save_config_callback=None)
    settings, domain = cli.model, cli.datamodule
    models = {"dense": dense or settings.model_name, "tuned": tuned, "pruned": pruned}
    for model in filter(None, models.values()):  # every model's name, before the first one is evaluated
        check_model_name(model)
    datamodules = [domain]
    if general:
        datamodules.append(general_text(general, domain))
    kinds = {task.name: task.kind for data in datamodules for task in data.tasks}
    results = {}
    for name, model in models.items():
        if model is None:
            continue
        module = TailoredModule(model=model, dtype=settings.dtype_name, lora=settings.lora_settings)
        print(f"evaluating {name}: {model}")
        results[name] = {}
        for data in datamodules:
            cli.trainer.test(module, datamodule=data, verbose=False)
            results[name] |= module.results
    outside = [GENERAL_TASK] if general else []
    chance = {task.name: chance_level(task) for data in datamodules for task in data.tasks}
    report = comparison_table(results, kinds, dense="dense", tuned="tuned", outside_average=outside, chance=chance)
    report |= {"models": models, "general_source": general, "results": results}
    print(format_comparison(report))
    if out:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return report


GENERAL_TASK = "general"
"""Name of the general-text task of ``tailored compare --general``."""


def general_text(source: str, domain: DomainData) -> DomainData:
    """The general-text perplexity task of ``compare --general``: every block of ``source`` (at most the domain
    data's ``eval_blocks``, evenly spread) at the domain data's ``seq_len``; checked before any model loads."""
    task = Task(GENERAL_TASK, source, "language_modeling", test_source=source)
    return DomainData(
        [task],
        tokenizer=domain.tokenizer_name,
        seq_len=domain.seq_len,
        batch_size=domain.batch_size,
        eval_blocks=domain.eval_blocks,
    )


THIRD_PARTY_NOISE = (
    r"`is_gradient_checkpointing` is deprecated and will be removed in v6",  # transformers, from Lightning's summary
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # torch, from Lightning's pytree helper
    # Lightning, loading a tailored checkpoint: it holds no frozen base weights by design (tailored.train.checkpoints
    # reloads them and checks the trainable state itself)
    r"Found keys that are in the model state dict but not in the checkpoint",
)
"""Exact warnings of dependencies that say nothing to a user of tailored (each names its source and cause)."""
ADVERTISEMENT = "💡 Tip:"
"""Lightning logs an advertisement for its cloud services whenever a run has no LitLogger."""


def quiet_third_party_output() -> None:
    """Silence :data:`THIRD_PARTY_NOISE` and Lightning's advertisement; every other warning still shows."""
    for message in THIRD_PARTY_NOISE:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not str(record.msg).startswith(ADVERTISEMENT)
    )


def renamed_options_in_one_line() -> None:
    """Print each :class:`RenamedOptionWarning` once, as its one-line message (no source line, no repeats when
    the config is read more than once); other warnings show as usual."""
    show, shown = warnings.showwarning, set()

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        if not issubclass(category, RenamedOptionWarning):
            show(message, category, filename, lineno, file, line)
        elif str(message) not in shown:
            shown.add(str(message))
            print(message, file=sys.stderr)

    warnings.showwarning = show_warning


USER_ERRORS = (ValueError, OSError, ModuleNotFoundError, MisconfigurationException)
"""Bad input (config, paths, data, checkpoints, trainer settings): reported as one message, not a traceback."""


def argument_problem(error: ArgumentError) -> str:
    """The option and the problem of a command-line parsing error, in one line.

    jsonargparse reports an option of a ``X | None`` type as a tree of every alternative's failure; the useful part
    is the innermost option's name (``Parser key`` lines, nested) and what was given against what was expected.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    keys, problem = [], ""
    for line in lines:
        key = re.match(r'Parser key "([^"]+)":\s*(.*)', line)
        if key:
            keys.append(key.group(1))
            problem = key.group(2) or problem
        elif not line.startswith(("Problem with given class_path", "Does not validate", "Subtypes", "Errors", "- ")):
            problem = line if not line.startswith("Given value") else problem
    last_key = max((i for i, line in enumerate(lines) if line.startswith("Parser key")), default=0)
    inner = lines[last_key:]
    given = next((line.removeprefix("Given value: ") for line in inner if line.startswith("Given value: ")), None)
    expected = dict.fromkeys(re.findall(r"Expected a <class '([^']+)'>", "\n".join(inner)))
    if given is not None:  # a dotted option of a nested class is given as NestedArg(key=..., val=...)
        given = re.sub(r"NestedArg\(key='[^']*', val='(.*)'\)", r"\1", given)
    if given is not None and expected:
        problem = f"got {given!r}, expected {' or '.join(name.replace('NoneType', 'null') for name in expected)}"
    option = ".".join(keys)
    return f"{option}: {problem}" if option else problem


RENAMED_COMMANDS = {"recovery": "compare"}
"""Old subcommand names still accepted for one release (with a one-line notice on stderr), and their new names."""


def run(args: list[str] | None = None):
    """Parse ``args`` (default: the command line) and run the subcommand (raises on bad input).

    Returns what ``export``/``compare`` return.
    """
    commands = {"export": export, "compare": compare}
    argv = sys.argv[1:] if args is None else args
    if argv[:1] and argv[0] in RENAMED_COMMANDS:
        old, new = argv[0], RENAMED_COMMANDS[argv[0]]
        print(f"tailored {old} is now tailored {new}; the old name goes in the next release", file=sys.stderr)
        argv = [new, *argv[1:]]
    if argv[:1] and argv[0] in commands:
        options = ["--run_config" if arg == "-c" else arg for arg in argv[1:]]  # -c as in fit/test
        return CLI(commands[argv[0]], args=options, as_positional=False, exit_on_error=False)
    TailoredCLI(
        TailoredModule,
        DomainData,
        trainer_defaults={
            "callbacks": [LearningRateMonitor(), DynamicBatchLoading(), ParameterSummary()],
            "check_val_every_n_epoch": None,
        },
        args=args,
        parser_kwargs={"exit_on_error": False},
    )


def main() -> None:
    """Entry point of the ``tailored`` console script. ``TAILORED_TRACEBACK=1`` shows tracebacks of input errors."""
    quiet_third_party_output()
    renamed_options_in_one_line()
    try:
        run()
    except ArgumentError as error:
        if os.environ.get("TAILORED_TRACEBACK"):
            raise
        command = " ".join(sys.argv[1:2])
        sys.exit(f"tailored: error: {argument_problem(error)} (tailored {command} --help lists the options)")
    except (*USER_ERRORS, RankFailure) as error:
        if os.environ.get("TAILORED_TRACEBACK"):
            raise
        sys.exit(f"tailored: error: {error}")


if __name__ == "__main__":
    main()
