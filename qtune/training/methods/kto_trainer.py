"""KTO on the 4-bit base: trl's KTOTrainer on answers qtune tokenized, with the reference as in preference tuning
(qtune.training.methods.preference_trainer): the base with the adapter switched off, or the frozen copy of an adapter
the run continues."""

from __future__ import annotations

from trl import KTOTrainer

from qtune.core.log import get_logger
from qtune.data.prepared import column
from qtune.training.methods.base_trainer import QtuneTrainerMixin, exact_trainable_values
from qtune.training.methods.preference_trainer import REFERENCE_ADAPTER

log = get_logger(__name__)


def weights_advice(desirable: int, undesirable: int, desirable_weight: float, undesirable_weight: float) -> str | None:
    """trl's check for unbalanced data (Eq. 8 of the KTO paper): desirable_weight x good answers should be 1 to 4/3
    times undesirable_weight x bad answers; the line to say when neither weight is in its range, else None."""
    good, bad = max(desirable, 1), max(undesirable, 1)
    if good == bad:
        return None
    good_range = (round(bad * undesirable_weight / good, 2), round(bad * undesirable_weight / good * 1.33, 2))
    bad_range = (round(good * desirable_weight / bad / 1.33, 2), round(good * desirable_weight / bad, 2))
    if good_range[0] <= desirable_weight <= good_range[1] or bad_range[0] <= undesirable_weight <= bad_range[1]:
        return None
    return (
        f"kto: {desirable} good and {undesirable} bad answers, weighted {desirable_weight:g} and "
        f"{undesirable_weight:g}: the KTO paper's range for this balance is kto.desirable_weight in "
        f"[{good_range[0]:g}, {good_range[1]:g}] or kto.undesirable_weight in [{bad_range[0]:g}, {bad_range[1]:g}] "
        "(one of them, not both)"
    )


class QtuneKTOTrainer(QtuneTrainerMixin, KTOTrainer):
    """trl's KTOTrainer on labelled answers qtune tokenized."""

    def __init__(self, *args, reference_is_adapter: bool = False, weights: tuple[float, float] = (1.0, 1.0), **kwargs):
        self.weights = weights
        with exact_trainable_values(kwargs["model"], lambda: self.model):
            super().__init__(*args, **kwargs)
        if REFERENCE_ADAPTER in getattr(self.model, "peft_config", {}) and not reference_is_adapter:
            # trl copies the adapter it is given into a reference adapter; for a new adapter that is the base with
            # extra matmuls: with it gone, trl switches the adapter off instead
            self.model.delete_adapter(REFERENCE_ADAPTER)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """qtune.data.labelled tokenized and checked the answers already; what trl adds is each answer's KL mismatch:
        the answers rotated by one within each micro-batch, so that every prompt meets another prompt's answer."""
        if dataset_name == "train" and hasattr(dataset, "__len__"):
            good = int(column(dataset, "label").sum())  # the Arrow column, not a Python list of every row
            advice = weights_advice(good, len(dataset) - good, *self.weights)
            if advice:
                log.warning(advice)
        if not self.calculate_KL:
            return dataset

        def add_mismatched(batch):
            batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
            return batch

        return dataset.map(add_mismatched, batched=True, batch_size=args.per_device_train_batch_size)

    def create_model_card(self, *args, **kwargs):
        """Nothing: trl writes one per save; qtune writes the card it pushes."""
        pass

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """trl's KTO loss (the NaN injection of the tests on top)."""
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return self.with_injected_nan(model, result, return_outputs)
