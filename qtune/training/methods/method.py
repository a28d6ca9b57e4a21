"""What a training method is to qtune: one TrainingMethod per module of this package, each field required (a new
method says every one of them; tests/test_methods.py checks). The module itself stays light to import (no torch, no
trl at module level): the recipe is made of the methods' sections, and `qtune validate` imports no torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qtune.core.schema import Section
from qtune.data.prepared import DataKind


@dataclass(frozen=True)
class TrainingMethod:
    """A way to train the adapter, from its recipe section to the figures the run reports.

    The callables take the recipe (and what else they say) and return plain values; the ones that build trl objects
    import trl when called."""

    name: str  # train.method
    summary: str  # one line: what it trains on and how (docs, `qtune validate`)
    section: type[Section] | None  # its own recipe section, under its name (dpo:), or None when it has no settings
    data: DataKind  # the kind of data it trains on: its dataset formats, their builder and report
    check_recipe: Callable  # (recipe) -> what else the recipe must change for this method, or None
    check_data: Callable  # (recipe, prepared data) -> None, or a DataError: what needs the data, before the model loads
    lora_dropout: bool  # whether LoRA dropout stays on (a method that compares the model with itself needs it off)
    trainer_config: Callable  # () -> trl's config class for its trainer (SFTConfig, DPOConfig, ...)
    trainer_settings: Callable  # (recipe) -> that config's own fields, from the method's section
    trainer: Callable  # () -> the trainer class (a qtune trainer: qtune.training.methods.base_trainer)
    trainer_options: Callable  # (recipe, tokenizer, continues_adapter) -> its constructor's other arguments
    describe_setup: Callable  # (recipe) -> the line said before training starts (its reference model), or None
    sequences_in_flight: Callable  # (recipe) -> sequences of up to max_length alive at once in a step (the plan)
    extra_memory: Callable  # (recipe, TrainingShape, compute bytes) -> {plan part: bytes} the method adds (GRPO's)
    plan_table: Callable  # (recipe, {GPU: its plan}) -> lines `qtune plan` adds per GPU (GRPO's limits), or []
    in_flight: str  # what those are, for `qtune plan` ({sequences}, {tokens}: max_length, {total}: both multiplied)
    language_model_loss: bool  # whether its eval_loss is a language-model loss (then perplexity means something)
    metrics: Callable  # (log history, eval before training, final eval) -> what it adds to metrics.json
    result_rows: Callable  # (metrics) -> [(label, value)]: its figures on the closing line, the page and the card
    card_description: Callable  # (recipe) -> the model card's "method" row


def says_nothing(*_args) -> None:
    """For a method with nothing to check or say at that point."""
    return None


def adds_no_memory(*_args) -> dict:
    """For a method whose memory is the plan's training step alone."""
    return {}


def no_plan_table(*_args) -> list:
    """For a method whose limits per GPU are the plan's data.max_length table alone."""
    return []
