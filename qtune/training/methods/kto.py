"""KTO (Ethayarajh et al. 2024): one answer per prompt, labelled good or bad, pushed up or down against a reference
by a prospect-theory loss, with the KL to the reference estimated from mismatched prompt / answer pairs of the same
batch. The reference is never a second copy of the base: the base with the adapter switched off, or the adapter the
run continues, kept frozen (qtune.training.methods.kto_trainer)."""

from __future__ import annotations

from pydantic import Field

from qtune.core.schema import Section
from qtune.core.text import fmt
from qtune.data.labelled import LABELLED_DATA
from qtune.training.methods import preference
from qtune.training.methods.method import TrainingMethod, adds_no_memory, no_plan_table, says_nothing

# trl's logged names -> metrics.json's
KTO_METRICS = {
    "rewards/chosen": "reward_good",
    "rewards/rejected": "reward_bad",
    "rewards/margins": "reward_margin",
    "logps/chosen": "logps_good",
    "logps/rejected": "logps_bad",
    "kl": "kl",
}


class KtoSection(Section):
    """KTO's settings (train.method: kto)."""

    beta: float = Field(0.1, gt=0)
    """How far the policy may move from the reference: higher keeps it closer."""
    desirable_weight: float = Field(1.0, gt=0)
    """Weight of the good answers' loss (raise it when good answers are rarer than bad ones)."""
    undesirable_weight: float = Field(1.0, gt=0)
    """Weight of the bad answers' loss (raise it when bad answers are rarer)."""


def check_recipe(recipe) -> str | None:
    """KTO scores answers only, and estimates its KL term from the other answers of a micro-batch."""
    problem = preference.never_trains_on_prompts(recipe)
    if problem:
        return problem
    if recipe.train.micro_batch_size < 2:
        return (
            "train.method kto estimates its KL term from the other answers of a micro-batch: set "
            "train.micro_batch_size to 2 or more"
        )
    return None


def trainer_config():
    """trl's KTOConfig."""
    from trl import KTOConfig

    return KTOConfig


def trainer_settings(recipe) -> dict:
    """KTOConfig's fields from the kto section: no dropout (the policy must score as the reference does), the
    answers arrive tokenized and cut to max_length by qtune.data.labelled, in the order the KL pairs were built."""
    section = recipe.kto
    return {
        "disable_dropout": True,
        "remove_unused_columns": False,
        "beta": section.beta,
        "desirable_weight": section.desirable_weight,
        "undesirable_weight": section.undesirable_weight,
        "train_sampling_strategy": "sequential",
    }


def trainer():
    """qtune's KTO trainer."""
    from qtune.training.methods.kto_trainer import QtuneKTOTrainer

    return QtuneKTOTrainer


def metrics(history: list[dict], before: dict, final_eval: dict) -> dict:
    """Rewards, log-probs and KL of good and bad answers (preference.renamed_metrics)."""
    return preference.renamed_metrics(KTO_METRICS, "rewards/chosen", history, before, final_eval)


def result_rows(metrics: dict) -> list[tuple[str, str]]:
    """The validation log-probs of good and bad answers before and after training."""
    return [
        (
            "validation log-prob of good answers before -> after",
            f"{fmt(metrics.get('eval_logps_good_before'))} -> {fmt(metrics.get('eval_logps_good'))}",
        ),
        (
            "validation log-prob of bad answers before -> after",
            f"{fmt(metrics.get('eval_logps_bad_before'))} -> {fmt(metrics.get('eval_logps_bad'))}",
        ),
    ]


def card_description(recipe) -> str:
    """KTO, its beta and weights, and its reference."""
    reference = "that adapter" if recipe.model.adapter else "the base model (adapter off)"
    section = recipe.kto
    return (
        f"KTO on labelled answers (beta {section.beta:g}, weights good {section.desirable_weight:g} / bad "
        f"{section.undesirable_weight:g}); reference: {reference}{preference.continues(recipe)}"
    )


KTO = TrainingMethod(
    name="kto",
    summary="Kahneman-Tversky optimization: one answer per prompt labelled good or bad, against a reference (the base "
    "with the adapter off, or the adapter the run continues); labelled answers",
    section=KtoSection,
    data=LABELLED_DATA,
    check_recipe=check_recipe,
    check_data=says_nothing,
    lora_dropout=False,
    trainer_config=trainer_config,
    trainer_settings=trainer_settings,
    trainer=trainer,
    trainer_options=lambda recipe, tokenizer, continues_adapter: {
        "reference_is_adapter": continues_adapter,
        "weights": (recipe.kto.desirable_weight, recipe.kto.undesirable_weight),
    },
    describe_setup=preference.reference_setup,
    # the micro-batch's answers at once (trl's batched step); the KL and reference passes keep no activations
    sequences_in_flight=lambda recipe: recipe.train.micro_batch_size,
    in_flight="labelled answers: the micro-batch's {sequences} sequences of up to {tokens} tokens at a time; the KL and reference passes keep no activations",
    extra_memory=adds_no_memory,
    plan_table=no_plan_table,
    language_model_loss=False,
    metrics=metrics,
    result_rows=result_rows,
    card_description=card_description,
)
