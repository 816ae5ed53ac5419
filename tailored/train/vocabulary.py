"""A run's domain vocabulary (``pruning.vocabulary``): the kept ids, counted on the training split when fit starts,
the removed ids' logits masked in the training loss, and the trimming at export (:mod:`tailored.core.vocabulary`).

The kept ids are written to checkpoints, so ``tailored export`` trims a checkpoint's model without the data. With
``pruning.vocabulary.reinvest`` they are counted when the run sets up, before any weight loads, and the target is
raised by the rows they free (:func:`reinvest_rows`), in every run that reads them (fit, test, a resumed fit, and
``tailored export`` of a checkpoint).
"""

from __future__ import annotations

from transformers import GenerationConfig

from tailored.core.vocabulary import backend_spec, base_pieces, config_token_ids, kept_token_ids, mask_removed_logits
from tailored.models import load_config, resolve_model
from tailored.train.settings import model_target

CHECKPOINT_KEY = "tailored_vocabulary"
"""Where a checkpoint holds the kept ids (a sorted list, or None without vocabulary trimming)."""


def check_tokenizer(module) -> None:
    """Refuse a tokenizer the export could not trim, before any weight loads (``ValueError`` naming its kind)."""
    settings = module.pruning_settings
    if settings is not None and settings.vocabulary is not None:
        base_pieces(backend_spec(module.tokenizer))


def domain_token_ids(module) -> list[int]:
    """The ids the run's export keeps (:func:`training_split_token_ids` of its data and base model)."""
    settings = module.pruning_settings.vocabulary
    return training_split_token_ids(module.trainer.datamodule, module.model_name, settings.keep_top)


def training_split_token_ids(data, model_name: str, keep_top: int) -> list[int]:
    """The ids a trimmed vocabulary keeps for set-up ``data`` (a :class:`tailored.data.datamodule.DomainData`):
    every token of its training split (the examples as the model trains on them), the tokenizer's special and base
    pieces, the bos/eos/pad of the model's config and generation config, ``keep_top`` and their merge ancestors.
    Read from the model's files: no weights need to be loaded."""
    sequences = (example["input_ids"] for examples in data.train_examples for example in examples)
    try:
        generation = GenerationConfig.from_pretrained(resolve_model(model_name))
    except OSError:  # no generation_config.json: the loaded model's is made from its config
        generation = None
    always = config_token_ids(load_config(model_name), generation)
    return kept_token_ids(data.tokenizer, sequences, keep_top, always)


def reinvests(module) -> bool:
    """Whether the run gives the trimmed vocabulary's rows to the pruned units (``pruning.vocabulary.reinvest``)."""
    settings = module.pruning_settings
    return settings is not None and settings.vocabulary is not None and settings.vocabulary.reinvest


def reinvest_rows(module) -> None:
    """Raise the module's target by the rows its kept tokens free (:func:`tailored.core.targets.reinvested_fraction`),
    on the gates too once they exist; the same target whenever it is called with the same kept tokens."""
    module.target = model_target(module.model_name, module.pruning_settings, len(module.kept_tokens))[1]
    if getattr(module, "gates", None) is not None:
        module.gates.target = module.target


def mask_training_logits(module) -> None:
    """(Re)attach the training-mode logit mask to the module's current model (a new one after "prune now")."""
    if module.logit_mask is not None:
        module.logit_mask.remove()
    module.logit_mask = None if module.kept_tokens is None else mask_removed_logits(module.model, module.kept_tokens)
