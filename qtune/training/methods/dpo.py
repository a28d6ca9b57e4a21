"""DPO (Rafailov et al. 2023): the policy pushed to score the chosen answer above the rejected one by more than the
reference does. The reference is never a second copy of the base: the base with the adapter switched off, or the
adapter the run continues, kept frozen (qtune.training.methods.preference_trainer)."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field, model_validator

from qtune.core.schema import Section
from qtune.data.pairs import PAIR_DATA
from qtune.training.methods import preference
from qtune.training.methods.method import TrainingMethod, adds_no_memory, no_plan_table, says_nothing

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "exo_pair", "apo_zero", "apo_down", "sft")


class DpoSection(Section):
    """DPO's settings (train.method: dpo)."""

    beta: float = Field(0.1, gt=0)
    """How far the policy may move from the reference: higher keeps it closer (IPO: its tau)."""
    loss_type: Union[Literal[LOSS_TYPES], list[Literal[LOSS_TYPES]]] = "sigmoid"
    """sigmoid: the DPO paper's loss; ipo, hinge, robust (noisy labels, with label_smoothing), sigmoid_norm
    (length-normalized), exo_pair, apo_zero, apo_down (trl's names); a list adds them up, e.g. [sigmoid, sft]: DPO
    plus the chosen answers' language-model loss (RPO), which keeps DPO from making the chosen answers unlikely too."""
    loss_weights: list[float] | None = None
    """Weights of a list of loss types (default: 1 each)."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """Assumed share of flipped preference labels (robust), or EXO's epsilon (exo_pair needs > 0)."""

    @property
    def loss_types(self) -> list[str]:
        """loss_type as a list."""
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @model_validator(mode="after")
    def _consistent(self) -> DpoSection:
        if not self.loss_types:
            raise ValueError("loss_type needs at least one loss")
        if "exo_pair" in self.loss_types and self.label_smoothing == 0:
            raise ValueError("loss_type exo_pair needs label_smoothing > 0 (the EXO paper uses 1e-3)")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_types):
            raise ValueError(
                f"{len(self.loss_weights)} loss_weights for {len(self.loss_types)} loss types: give one weight each"
            )
        return self


def trainer_settings(recipe) -> dict:
    """DPOConfig's DPO fields from the dpo section."""
    section = recipe.dpo
    return {
        **preference.common_settings(),
        "beta": section.beta,
        "loss_type": section.loss_types,
        "loss_weights": section.loss_weights,
        "label_smoothing": section.label_smoothing,
    }


def sequences_in_flight(recipe) -> int:
    """A pair's chosen and rejected sequences at a time; with trl's "sft" term (a mean over the whole batch's answer
    tokens) trl's batched step runs as it is, every pair of the micro-batch at once. The reference pass runs without
    gradients, one layer's activations at a time: less than the backward pass counted."""
    return 2 if "sft" not in recipe.dpo.loss_types else 2 * recipe.train.micro_batch_size


def card_description(recipe) -> str:
    """DPO, its beta, loss and reference."""
    reference = "that adapter" if recipe.model.adapter else "the base model (adapter off)"
    return (
        f"DPO on preference pairs (beta {recipe.dpo.beta:g}, loss {recipe.dpo.loss_type}); reference: {reference}"
        f"{preference.continues(recipe)}"
    )


DPO = TrainingMethod(
    name="dpo",
    summary="direct preference optimization against a reference (the base with the adapter off, or the adapter the "
    "run continues); preference pairs",
    section=DpoSection,
    data=PAIR_DATA,
    check_recipe=preference.never_trains_on_prompts,
    check_data=says_nothing,
    lora_dropout=False,
    trainer_config=preference.trainer_config,
    trainer_settings=trainer_settings,
    trainer=preference.trainer,
    trainer_options=lambda recipe, tokenizer, continues_adapter: {
        "method": "dpo",
        "reference_is_adapter": continues_adapter,
    },
    describe_setup=preference.reference_setup,
    sequences_in_flight=sequences_in_flight,
    in_flight="preference pairs: {sequences} sequences, chosen and rejected, of up to {tokens} tokens at a time",
    extra_memory=adds_no_memory,
    plan_table=no_plan_table,
    language_model_loss=False,
    metrics=preference.metrics,
    result_rows=preference.result_rows,
    card_description=card_description,
)
