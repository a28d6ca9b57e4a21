"""ORPO (Hong et al. 2024): one stage, no reference model: the chosen answer's language-model loss minus beta x log
sigmoid of the log odds ratio of the chosen over the rejected answer. Runs on the DPO trainer's machinery with ORPO's
loss (qtune.training.methods.preference_trainer)."""

from __future__ import annotations

from pydantic import Field

from qtune.core.schema import Section
from qtune.data.pairs import PAIR_DATA
from qtune.training.methods import preference
from qtune.training.methods.method import TrainingMethod, adds_no_memory, no_plan_table, says_nothing


class OrpoSection(Section):
    """ORPO's settings (train.method: orpo)."""

    beta: float = Field(0.1, gt=0)
    """Weight of the odds-ratio term against the chosen answers' language-model loss (lambda in the ORPO paper)."""


def card_description(recipe) -> str:
    """ORPO and its beta."""
    return f"ORPO on preference pairs (beta {recipe.orpo.beta:g}), no reference model{preference.continues(recipe)}"


ORPO = TrainingMethod(
    name="orpo",
    summary="odds-ratio preference optimization: one stage, no reference model; preference pairs",
    section=OrpoSection,
    data=PAIR_DATA,
    check_recipe=preference.never_trains_on_prompts,
    check_data=says_nothing,
    lora_dropout=False,
    trainer_config=preference.trainer_config,
    trainer_settings=lambda recipe: {**preference.common_settings(), "beta": recipe.orpo.beta},
    trainer=preference.trainer,
    trainer_options=lambda recipe, tokenizer, continues_adapter: {"method": "orpo"},
    describe_setup=lambda recipe: "train: orpo, ORPO: no reference model",
    sequences_in_flight=lambda recipe: 2,  # a pair's chosen and rejected sequences at a time
    in_flight="preference pairs: {sequences} sequences, chosen and rejected, of up to {tokens} tokens at a time",
    extra_memory=adds_no_memory,
    plan_table=no_plan_table,
    language_model_loss=False,
    metrics=preference.metrics,
    result_rows=preference.result_rows,
    card_description=card_description,
)
