"""A run's domain vocabulary (``pruning.vocabulary``): the kept ids, counted on the training split when fit starts,
the removed ids' logits masked in the training loss, and the trimming at export (:mod:`tailored.core.vocabulary`).

The kept ids are written to checkpoints, so ``tailored export`` trims a checkpoint's model without the data.
"""

from __future__ import annotations

from tailored.core.structure import unwrap
from tailored.core.vocabulary import backend_spec, base_pieces, config_token_ids, kept_token_ids, mask_removed_logits

CHECKPOINT_KEY = "tailored_vocabulary"
"""Where a checkpoint holds the kept ids (a sorted list, or None without vocabulary trimming)."""


def check_tokenizer(module) -> None:
    """Refuse a tokenizer the export could not trim, before any weight loads (``ValueError`` naming its kind)."""
    settings = module.pruning_settings
    if settings is not None and settings.vocabulary is not None:
        base_pieces(backend_spec(module.tokenizer))


def domain_token_ids(module) -> list[int]:
    """The ids the export keeps: every token of the training split (the examples as the model trains on them),
    the tokenizer's special and base pieces, the config's bos/eos/pad, ``keep_top`` and their merge ancestors."""
    data, model = module.trainer.datamodule, unwrap(module.model)
    sequences = (example["input_ids"] for examples in data.train_examples for example in examples)
    always = config_token_ids(model.config, getattr(model, "generation_config", None))
    return kept_token_ids(data.tokenizer, sequences, module.pruning_settings.vocabulary.keep_top, always)


def mask_training_logits(module) -> None:
    """(Re)attach the training-mode logit mask to the module's current model (a new one after "prune now")."""
    if module.logit_mask is not None:
        module.logit_mask.remove()
    module.logit_mask = None if module.kept_tokens is None else mask_removed_logits(module.model, module.kept_tokens)
