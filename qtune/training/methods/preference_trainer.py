"""Preference tuning on the 4-bit base: trl's DPOTrainer for DPO, and the same trainer with ORPO's loss.

The reference model is never a second copy of the base. For a new adapter it is the base itself, with the adapter
switched off (peft's disable_adapter); for a run that continues an adapter (model.adapter), it is that adapter as it
was loaded, kept frozen beside the trained copy under the name "ref" (trl does the copy; both sit on the one 4-bit
base). ORPO has no reference at all.

ORPO runs on DPOTrainer's machinery rather than trl's experimental ORPOTrainer: one forward over chosen and rejected
with trl's fused LM head (no batch x sequence x vocabulary logits), the pre-tokenized pairs qtune checked, and the
odds-ratio term from trl's own ORPOTrainer.odds_ratio_loss. The one difference from that trainer is on purpose: its
language-model term scores the prompt too; here, as in the ORPO paper, it scores the chosen answer only.
"""

from __future__ import annotations

import contextlib

import torch
from trl import DPOTrainer
from trl.experimental.orpo import ORPOTrainer

from qtune.training.methods.base_trainer import QtuneTrainerMixin, exact_trainable_values

REFERENCE_ADAPTER = "ref"  # the name trl's DPOTrainer gives the frozen copy of a loaded adapter


class QtunePreferenceTrainer(QtuneTrainerMixin, DPOTrainer):
    """trl's DPOTrainer with DPO's loss or ORPO's, trained one pair at a time, on pairs qtune tokenized."""

    def __init__(self, *args, method: str = "dpo", reference_is_adapter: bool = False, **kwargs):
        with exact_trainable_values(kwargs["model"], lambda: self.model):
            super().__init__(*args, **kwargs)
        self.method = method
        # Pair by pair is exact when the loss is a mean of per-pair terms. trl's "sft" term is a mean over the
        # batch's answer tokens, which pairs alone cannot reproduce: with it, trl's batched step runs as it is.
        self.pair_by_pair = method == "orpo" or "sft" not in self.loss_types
        peft_config = getattr(self.model, "peft_config", {})
        if REFERENCE_ADAPTER in peft_config and (method == "orpo" or not reference_is_adapter):
            # trl copies every adapter it is given into a reference adapter. A new adapter's copy is the base with
            # extra matmuls, and ORPO needs no reference: with it gone, trl switches the adapter off instead.
            self.model.delete_adapter(REFERENCE_ADAPTER)

    loss_share = 1.0  # of a micro-batch's loss that the pair in flight carries (micro_batch_step)

    def micro_batch_step(self, model, inputs, num_items_in_batch=None):
        """One pair at a time: trl's loss is a mean over the micro-batch's pairs, so each pair's loss times
        1 / pairs, backward pair by pair, gives the micro-batch's gradient, with the activations of two sequences
        alive instead of 2 x micro_batch_size, and each pair padded to its own longer answer instead of the batch's
        longest (tests/test_preference.py checks the gradients equal the batched ones). Under DDP only the last pair
        syncs."""
        pairs = inputs["input_ids"].shape[0] // 2
        if pairs <= 1 or not self.pair_by_pair:
            return super().micro_batch_step(model, inputs, num_items_in_batch)
        total = None
        try:
            self.loss_share = 1.0 / pairs
            for i in range(pairs):
                sync = contextlib.nullcontext() if i == pairs - 1 else self.accelerator.no_sync(model)
                with sync:
                    loss = super().micro_batch_step(model, one_pair(inputs, i, pairs), num_items_in_batch)
                total = loss if total is None else total + loss
        finally:
            self.loss_share = 1.0
        return total

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # qtune.data.pairs tokenized and checked the pairs already (prompt_ids, chosen_ids, rejected_ids)
        return dataset

    def create_model_card(self, *args, **kwargs):
        """Nothing: trl writes one per save; qtune writes the card it pushes."""
        pass  # trl writes one into the checkpoints folder at every save; qtune writes the card it pushes

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """DPO's loss (trl's) or ORPO's, times the pair's share of the micro-batch."""
        if self.method == "orpo":
            result = self.orpo_loss(model, inputs, return_outputs)
        else:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.loss_share != 1.0:
            result = (result[0] * self.loss_share, result[1]) if return_outputs else result * self.loss_share
        return self.with_injected_nan(model, result, return_outputs)

    def orpo_loss(self, model, inputs, return_outputs=False):
        """ORPO (Hong et al. 2024): the chosen answer's language-model loss minus beta x log sigmoid(log odds ratio
        of the chosen over the rejected answer), with length-normalized log-probabilities; one forward, chosen and
        rejected in one batch."""
        mode = "train" if self.model.training else "eval"
        completion = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion == 0, -100)
        forward_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
        outputs = model(**forward_inputs, labels=labels, use_cache=False, fused_lm_head=True)
        mask = completion[:, 1:].to(outputs.log_probs.dtype)
        token_logps = outputs.log_probs[:, -mask.shape[1] :] * mask
        chosen_mean, rejected_mean = (token_logps.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).chunk(2)
        # the language-model term per pair, then the mean over pairs (the paper's expectation over examples), so a
        # micro-batch's loss is the mean of its pairs' and training pair by pair is exact
        nll = -chosen_mean.mean()
        ratio_losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(
            self, chosen_mean, rejected_mean
        )
        loss = nll - ratio_losses.mean()
        gather = self.accelerator.gather_for_metrics
        logged = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": chosen_mean.detach(),
            "logps/rejected": rejected_mean.detach(),
            "nll_loss": nll.detach(),
            "log_odds_ratio": log_odds_ratio.detach(),
            "log_odds_chosen": log_odds_chosen.detach(),
        }
        for key, value in logged.items():
            self._metrics[mode][key].append(gather(value).float().mean().item())
        return (loss, outputs) if return_outputs else loss


def one_pair(batch: dict, index: int, pairs: int) -> dict:
    """Pair `index` of a collated preference batch (chosen rows first, then rejected), cut to its own length: the
    padding is on the right, so the columns past the pair's longer sequence hold nothing the pair needs."""
    rows = [index, pairs + index]
    width = int(batch["attention_mask"][rows].sum(dim=1).max())
    out = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            out[key] = value
        elif value.shape[0] == 2 * pairs:
            out[key] = value[rows][:, :width] if value.dim() == 2 else value[rows]
        else:  # one value per pair (precomputed reference log-probs)
            out[key] = value[index : index + 1]
    return out


def adapter_weights(model, adapter: str) -> dict[str, torch.Tensor]:
    """The LoRA weights of one adapter, by their name without the adapter's (for comparing two adapters)."""
    return {
        name.replace(f".{adapter}.", "."): param.detach()
        for name, param in model.named_parameters()
        if f".{adapter}." in name
    }
