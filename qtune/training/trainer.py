"""The Trainers qtune runs: trl's SFTTrainer with the supervised-only chunked loss, backward one packed row at a time;
for preference tuning trl's DPOTrainer (qtune/training/preference.py); both with checkpoints that count only once
complete. trl and transformers own the loop."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch
from transformers.trainer_callback import ProgressCallback
from trl import SFTTrainer

from qtune import checkpoints, distributed, testhooks
from qtune import loss as loss_stage
from qtune import model as model_stage
from qtune.batching import PackedCollator
from qtune.fsutil import disk_full, is_disk_full
from qtune.lean_ops import lora_inputs_stay_in_compute_dtype
from qtune.offload import ActivationsToCPU
from qtune.recipe import HubSection, LogSection
from qtune.testhooks import fault_point
from qtune.training.callbacks import CheckpointPusher, LossProgress, NonFiniteGuard

RESUME_AFTER_DISK_FULL = "free disk space (earlier checkpoints are intact) and resume with --resume"


class QtuneTrainerMixin:
    """What every qtune trainer adds to trl's: injected faults for the tests, a trace of the micro-batches trained
    on, NaN/inf counting, activation offloading, and checkpoints that count only once their manifest is written
    (qtune/checkpoints.py). Put before the trl trainer in the bases."""

    def __init__(self, *args, keep_checkpoints: int = 3, offload_activations: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_checkpoints = keep_checkpoints
        self.offload_activations = offload_activations
        self.step_trace = None  # qtune.testhooks.traced() sets it: a record of each micro-batch as it is trained on
        # micro-batches of the current optimizer step whose loss was NaN or inf, counted on the device (no sync per
        # micro-batch); callbacks.NonFiniteGuard reads and resets it once per step
        self.nonfinite_micro_batches = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        if testhooks.injected("oom", self.state.global_step + 1):
            raise torch.OutOfMemoryError("CUDA out of memory. (injected by QTUNE_INJECT)")
        if self.step_trace is not None:
            self.step_trace(self.state.global_step, inputs["input_ids"])
        offload = ActivationsToCPU() if self.offload_activations else contextlib.nullcontext()
        with offload:
            loss = self.micro_batch_step(model, inputs, num_items_in_batch)
        bad = (~torch.isfinite(loss.detach())).to(torch.int32)
        self.nonfinite_micro_batches = (
            bad if self.nonfinite_micro_batches is None else self.nonfinite_micro_batches + bad
        )
        return loss

    def micro_batch_step(self, model, inputs, num_items_in_batch=None):
        return super().training_step(model, inputs, num_items_in_batch)

    def with_injected_nan(self, model, result, return_outputs: bool):
        if model.training and testhooks.injected("nan", self.state.global_step + 1):
            return (result[0] * float("nan"), result[1]) if return_outputs else result * float("nan")
        return result

    def _save_checkpoint(self, model, trial):
        """The Trainer's save, then the manifest that makes it count, then rotation (qtune/checkpoints.py)."""
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()  # every rank's RNG state is in before the manifest vouches for it
            if self.args.should_save:
                checkpoints.write_manifest(folder, self.state.global_step)
                checkpoints.rotate(folder.parent, self.keep_checkpoints)
        except Exception as e:
            if not is_disk_full(e):
                raise
            if self.args.should_save:
                shutil.rmtree(folder, ignore_errors=True)  # a half-written checkpoint is worth nothing
            raise disk_full(folder.name, folder.parent, fix=RESUME_AFTER_DISK_FULL) from None

    def _save_optimizer_and_scheduler(self, output_dir):
        fault_point("optimizer", self.state.global_step)
        super()._save_optimizer_and_scheduler(output_dir)


class QtuneSFTTrainer(QtuneTrainerMixin, SFTTrainer):
    """SFTTrainer whose loss scores only the supervised positions (qtune/loss.py says why) and that trains one packed
    row at a time.

    trl's own fused LM head scores every position, padding and prompts included, on devices without
    Triton (the CPU), and recomputes each logits tile in the backward pass.
    """

    def micro_batch_step(self, model, inputs, num_items_in_batch=None):
        """One packed row at a time: the loss is a sum over tokens divided by a count fixed for the whole step,
        so backward per row gives the gradient of the whole micro-batch, with one row's activations alive (at
        most data.max_length tokens, whatever the micro-batch size). Under DDP only the last row syncs."""
        rows = inputs["input_ids"].shape[0]
        unwrapped = self.accelerator.unwrap_model(model)
        if rows == 1 or num_items_in_batch is None or loss_stage.fused_head_weight(unwrapped) is None:
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
        result = self.supervised_loss(model, inputs, return_outputs, num_items_in_batch)
        return self.with_injected_nan(model, result, return_outputs)

    def supervised_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)
        head_weight = loss_stage.fused_head_weight(unwrapped)
        if head_weight is None:
            self.loss_is_scaled_for_ga = None
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        # no KV cache: transformers only builds the packed (block-diagonal) mask without one
        with loss_stage.last_hidden_state(unwrapped) as captured:
            outputs = model(**forward_inputs, use_cache=False, logits_to_keep=1)
        loss_sum, count = loss_stage.supervised_loss_sum(
            captured["hidden"], inputs["labels"], head_weight, loss_stage.head_softcap(unwrapped)
        )
        # The same reduction as Trainer.compute_loss: a sum over the tokens of all accumulated micro-batches
        # (and all ranks: DDP then averages the gradients) when the trainer counted them, else a mean.
        if num_items_in_batch is not None:
            loss = loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        else:
            loss = loss_sum / max(count, 1)
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        return (loss, outputs) if return_outputs else loss


def build_trainer(
    peft_model,
    tokenizer,
    config,
    data,
    log: LogSection,
    run_dir: Path,
    hub: HubSection,
    max_length: int,
    keep_checkpoints: int,
    *,
    offload_activations: bool = False,
    max_nonfinite_steps: int = 3,
    preference_trainer: type | None = None,
    **preference_options,
) -> QtuneTrainerMixin:
    """The SFT trainer, or `preference_trainer` (qtune.training.preference) with its options, and what qtune adds to
    either: fp32 LoRA weights, the progress line, the NaN guard, the trace, the trackers."""
    common = dict(
        model=peft_model,
        args=config,
        train_dataset=data.train,
        eval_dataset=data.val,
        processing_class=tokenizer,
        keep_checkpoints=keep_checkpoints,
        offload_activations=offload_activations,
    )
    if preference_trainer is None:
        collator = PackedCollator(tokenizer.pad_token_id, row_tokens=max_length)
        trainer = QtuneSFTTrainer(data_collator=collator, **common)
    else:  # trl's preference collator: chosen and rejected of each pair, in one padded batch
        trainer = preference_trainer(**common, **preference_options)
    model_stage.keep_trainable_in_fp32(trainer.model)
    if config.bf16 or config.fp16:  # the Trainer runs every forward pass under autocast
        lora_inputs_stay_in_compute_dtype(trainer.model)
    distributed.check_world_size(trainer.args.world_size)
    testhooks.traced(trainer, run_dir)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossProgress())
    trainer.add_callback(NonFiniteGuard(trainer, max_nonfinite_steps))
    if hub.push_checkpoints:
        trainer.add_callback(CheckpointPusher(hub.repo_id, hub.private, run_dir))
    if "tensorboard" in log.report_to:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        trainer.add_callback(TensorBoardCallback(SummaryWriter(log_dir=str(run_dir / "tensorboard"))))
    return trainer
