"""trl's SFTTrainer as qtune runs it: the loss on supervised positions only, in chunks (qtune.modeling.loss says why),
and backward one packed row at a time (qtune.data.packing packs the rows)."""

from __future__ import annotations

import contextlib

from trl import SFTTrainer

from qtune.modeling import loss as chunked_loss
from qtune.training.methods.base_trainer import QtuneTrainerMixin


class QtuneSFTTrainer(QtuneTrainerMixin, SFTTrainer):
    """SFTTrainer whose loss scores only the supervised positions (qtune.modeling.loss says why) and that trains one
    packed row at a time.

    trl's own fused LM head scores every position, padding and prompts included, on devices without
    Triton (the CPU), and recomputes each logits tile in the backward pass.
    """

    def micro_batch_step(self, model, inputs, num_items_in_batch=None):
        """One packed row at a time: the loss is a sum over tokens divided by a count fixed for the whole step,
        so backward per row gives the gradient of the whole micro-batch, with one row's activations alive (at
        most data.max_length tokens, whatever the micro-batch size). Under DDP only the last row syncs."""
        rows = inputs["input_ids"].shape[0]
        unwrapped = self.accelerator.unwrap_model(model)
        if rows == 1 or num_items_in_batch is None or chunked_loss.fused_head_weight(unwrapped) is None:
            return super().micro_batch_step(model, inputs, num_items_in_batch)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        total = None
        for r in range(rows):
            row = {key: value[r : r + 1] for key, value in inputs.items()}
            sync = contextlib.nullcontext() if r == rows - 1 else self.accelerator.no_sync(model)
            with sync, self.compute_loss_context_manager():
                loss = self.compute_loss(model, row, num_items_in_batch=num_items_in_batch)
                self.accelerator.backward(loss)
            total = loss.detach() if total is None else total + loss.detach()
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The supervised-only loss (a NaN injected when the tests ask)."""
        result = self.supervised_loss(model, inputs, return_outputs, num_items_in_batch)
        return self.with_injected_nan(model, result, return_outputs)

    def supervised_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The loss of the supervised positions through the fused head, reduced as Trainer.compute_loss reduces; the
        Trainer's own loss where the fused head would not compute what the model does."""
        unwrapped = self.accelerator.unwrap_model(model)
        head_weight = chunked_loss.fused_head_weight(unwrapped)
        if head_weight is None:
            self.loss_is_scaled_for_ga = None
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        if not hasattr(self, "aux_coef"):
            self.aux_coef = router_aux_loss_coef(unwrapped)
        aux_coef = self.aux_coef
        if aux_coef is not None:  # a mixture of experts: the router's load-balancing loss, as the model computes it
            forward_inputs["output_router_logits"] = True
        # no KV cache: transformers only builds the packed (block-diagonal) mask without one
        with chunked_loss.last_hidden_state(unwrapped) as captured:
            outputs = model(**forward_inputs, use_cache=False, logits_to_keep=1)
        loss_sum, count = chunked_loss.supervised_loss_sum(
            captured["hidden"], inputs["labels"], head_weight, chunked_loss.head_softcap(unwrapped)
        )
        # The same reduction as Trainer.compute_loss: a sum over the tokens of all accumulated micro-batches
        # (and all ranks: DDP then averages the gradients) when the trainer counted them, else a mean.
        if num_items_in_batch is not None:
            loss = loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        else:
            loss = loss_sum / max(count, 1)
        if aux_coef is not None and getattr(outputs, "aux_loss", None) is not None:
            # added as the model's own forward adds it to its mean loss (coef * aux), weighted by this row's share of
            # the step's tokens so the step's sum is coef times their token-weighted mean
            share = count / num_items_in_batch if num_items_in_batch is not None else 1.0
            loss = loss + aux_coef * outputs.aux_loss.to(loss.dtype) * share
            self.router_aux_losses = [*getattr(self, "router_aux_losses", []), outputs.aux_loss.item()]
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        """The Trainer's log, with a mixture of experts' mean load-balancing loss since the last one."""
        aux = getattr(self, "router_aux_losses", [])
        if aux and "loss" in logs:
            logs["router_aux_loss"] = round(sum(aux) / len(aux), 6)
            self.router_aux_losses = []
        super().log(logs, *args, **kwargs)


def router_aux_loss_coef(model) -> float | None:
    """The weight of a mixture of experts' load-balancing loss (config.router_aux_loss_coef), None for a dense model."""
    from qtune.modeling.load import has_experts

    if not has_experts(model):
        return None
    return float(getattr(model.config.get_text_config(), "router_aux_loss_coef", 0.0) or 0.0)
