"""Supervised fine-tuning: the loss of the answers (completions, assistant turns, or all of a text) given the prompt,
with trl's SFTTrainer owning the loop (qtune.training.methods.sft_trainer: packed rows, one row at a time, the loss
on supervised positions only)."""

from __future__ import annotations

from qtune.core.text import fmt
from qtune.data.sft import SFT_DATA
from qtune.training.methods.method import TrainingMethod, adds_no_memory, no_plan_table, says_nothing


def trainer_config():
    """trl's SFTConfig."""
    from trl import SFTConfig

    return SFTConfig


def trainer():
    """qtune's SFT trainer."""
    from qtune.training.methods.sft_trainer import QtuneSFTTrainer

    return QtuneSFTTrainer


def trainer_options(recipe, tokenizer, continues_adapter: bool) -> dict:
    """The packing collator: each micro-batch's samples laid end to end in rows of at most max_length tokens."""
    from qtune.data.packing import PackedCollator

    return {"data_collator": PackedCollator(tokenizer.pad_token_id, row_tokens=recipe.data.max_length)}


def router_aux_loss(history: list[dict]) -> dict:
    """A mixture of experts' load-balancing loss as last logged (nothing for a dense model)."""
    logged = [entry["router_aux_loss"] for entry in history if "router_aux_loss" in entry]
    return {"router_aux_loss": logged[-1]} if logged else {}


def result_rows(metrics: dict) -> list[tuple[str, str]]:
    """The validation perplexity after training."""
    return [("eval perplexity", fmt(metrics.get("eval_perplexity"), ".3f"))]


def card_description(recipe) -> str:
    """ "supervised fine-tuning (SFT)", and the adapter it continues."""
    return "supervised fine-tuning (SFT)" + (
        f"; continues the adapter {recipe.model.adapter}" if recipe.model.adapter else ""
    )


SFT = TrainingMethod(
    name="sft",
    summary="supervised fine-tuning: the answers' language-model loss given the prompt (alpaca, prompt/completion, "
    "messages, sharegpt or text data)",
    section=None,
    data=SFT_DATA,
    check_recipe=says_nothing,
    check_data=says_nothing,
    lora_dropout=True,
    trainer_config=trainer_config,
    # trl's packing lets packed samples attend to each other without FlashAttention: qtune packs itself, exactly.
    # trl's dataset preparation would pass over the tokenized samples twice more (truncate, drop fully masked: both
    # done in qtune.data.sft), in one process, into memory: 46 s before the first step at 100k rows (issue 25).
    trainer_settings=lambda recipe: {"packing": False, "dataset_kwargs": {"skip_prepare_dataset": True}},
    trainer=trainer,
    trainer_options=trainer_options,
    describe_setup=says_nothing,
    sequences_in_flight=lambda recipe: 1,  # one packed row of at most max_length tokens at a time
    in_flight="activations of one packed row of {total} tokens at a time",
    extra_memory=adds_no_memory,
    plan_table=no_plan_table,
    language_model_loss=True,
    metrics=lambda history, before, final_eval: router_aux_loss(history),
    result_rows=result_rows,
    card_description=card_description,
)
