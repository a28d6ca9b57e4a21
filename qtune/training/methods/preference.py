"""What DPO and ORPO share: preference pairs, trl's DPOConfig and qtune's preference trainer (one pair at a time),
no LoRA dropout, and the reward figures they report. Each method's own settings are in dpo.py and orpo.py."""

from __future__ import annotations

from qtune.core.text import fmt

ACCURACY = "rewards/accuracies"
# trl's logged names -> metrics.json's
PREFERENCE_METRICS = {
    ACCURACY: "reward_accuracy",
    "rewards/margins": "reward_margin",
    "rewards/chosen": "reward_chosen",
    "rewards/rejected": "reward_rejected",
    "logps/chosen": "logps_chosen",
    "logps/rejected": "logps_rejected",
}


def never_trains_on_prompts(recipe) -> str | None:
    """A preference method scores answers only: data.train_on_inputs has no meaning for it."""
    if recipe.data.train_on_inputs:
        return f"train.method {recipe.train.method} never trains on prompts: remove data.train_on_inputs"
    return None


def trainer_config():
    """trl's DPOConfig (ORPO runs on the DPO trainer's machinery)."""
    from trl import DPOConfig

    return DPOConfig


def common_settings() -> dict:
    """DPOConfig fields both methods set: the policy must score a sequence exactly as the reference does, so no
    dropout (trl's default too); the pairs arrive tokenized and cut to max_length by qtune.data.pairs."""
    return {"disable_dropout": True, "remove_unused_columns": False}


def trainer():
    """qtune's preference trainer (DPO's loss, or ORPO's)."""
    from qtune.training.methods.preference_trainer import QtunePreferenceTrainer

    return QtunePreferenceTrainer


def renamed_metrics(names: dict[str, str], marker: str, history: list[dict], before: dict, final_eval: dict) -> dict:
    """trl's logged figures under metrics.json's `names`: on validation before training (step 0) and after, and on
    the training batches of the last logged step that has `marker`."""
    last_train = next((h for h in reversed(history) if marker in h and "loss" in h), {})
    out = {}
    for logged, name in names.items():
        out[f"eval_{name}_before"] = before.get(f"eval_{logged}_before")
        out[f"eval_{name}"] = final_eval.get(f"eval_{logged}")
        out[f"train_{name}"] = last_train.get(logged)
    return out


def metrics(history: list[dict], before: dict, final_eval: dict) -> dict:
    """Reward accuracy, margin, rewards and log-probs (renamed_metrics)."""
    return renamed_metrics(PREFERENCE_METRICS, ACCURACY, history, before, final_eval)


def reference_setup(recipe) -> str:
    """The line said before training of a method with a reference: which model that is."""
    if recipe.model.adapter:
        reference = f"the loaded adapter {recipe.model.adapter}, frozen (a second LoRA copy on the same 4-bit base)"
    else:
        reference = "the same 4-bit base with the adapter switched off (no second copy)"
    return f"train: {recipe.train.method}, reference: {reference}"


def result_rows(metrics: dict) -> list[tuple[str, str]]:
    """The validation reward accuracy and margin before and after training."""
    return [
        (
            "validation reward accuracy before -> after",
            f"{fmt(metrics.get('eval_reward_accuracy_before'), '.3f')} -> {fmt(metrics.get('eval_reward_accuracy'), '.3f')}",
        ),
        (
            "validation reward margin before -> after",
            f"{fmt(metrics.get('eval_reward_margin_before'))} -> {fmt(metrics.get('eval_reward_margin'))}",
        ),
    ]


def continues(recipe) -> str:
    """ "; continues the adapter X" when the run starts from a trained adapter."""
    return f"; continues the adapter {recipe.model.adapter}" if recipe.model.adapter else ""
