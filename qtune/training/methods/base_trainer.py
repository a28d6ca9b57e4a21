"""What every qtune trainer adds to trl's, whatever the method: checkpoints that count only once complete, NaN/inf
counting, activation offloading, and the test hooks. trl and transformers own the loop."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from qtune.core import checkpoints, testhooks
from qtune.core.fs import disk_full, is_disk_full
from qtune.modeling.offload import ActivationsToCPU

RESUME_AFTER_DISK_FULL = "free disk space (earlier checkpoints are intact) and resume with --resume"


@contextlib.contextmanager
def exact_trainable_values(model, trainer_model: Callable):
    """Puts back the trainable weights' exact values after the block (a trl trainer's constructor). trl casts the
    trainable weights of a 4-bit model to bf16 (the QLoRA paper's choice): a continued adapter would lose its low bits,
    and then differ from its own frozen copy, the reference, before the first step. `trainer_model()` is the model
    after the block; model.keep_trainable_in_fp32 keeps the values fp32 from then on."""
    exact = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    yield
    for name, param in trainer_model().named_parameters():
        if name in exact:
            param.data = exact[name]


class QtuneTrainerMixin:
    """What every qtune trainer adds to trl's: injected faults for the tests, a trace of the micro-batches trained
    on, NaN/inf counting, activation offloading, and checkpoints that count only once their manifest is written
    (qtune/core/checkpoints.py). Put before the trl trainer in the bases."""

    def __init__(self, *args, keep_checkpoints: int = 3, offload_activations: bool = False, **kwargs):
        from qtune.modeling.load import peft_sees_per_expert_layers

        model = kwargs.get("model", args[0] if args else None)
        # trl's DPO adds a frozen copy of the adapter: on a mixture of experts, peft's rename must stay away from it
        with peft_sees_per_expert_layers(model.get_base_model() if hasattr(model, "get_base_model") else model):
            super().__init__(*args, **kwargs)
        self.keep_checkpoints = keep_checkpoints
        self.offload_activations = offload_activations
        self.step_trace = (
            None  # qtune.core.testhooks.traced() sets it: a record of each micro-batch as it is trained on
        )
        # micro-batches of the current optimizer step whose loss was NaN or inf, counted on the device (no sync per
        # micro-batch); callbacks.NonFiniteGuard reads and resets it once per step
        self.nonfinite_micro_batches = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The micro-batch's step (offloading activations when asked), counting a NaN or infinite loss."""
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
        """One micro-batch's forward and backward: trl's own step (a method's trainer may split it)."""
        return super().training_step(model, inputs, num_items_in_batch)

    def with_injected_nan(self, model, result, return_outputs: bool):
        """The loss made NaN from the step QTUNE_INJECT names on (the tests' stand-in for an fp16 overflow)."""
        if model.training and testhooks.injected("nan", self.state.global_step + 1):
            return (result[0] * float("nan"), result[1]) if return_outputs else result * float("nan")
        return result

    def _save_checkpoint(self, model, trial):
        """The Trainer's save, then the manifest that makes it count, then rotation (qtune/core/checkpoints.py)."""
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

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """The Trainer's resume, with peft's rename of a mixture of experts' LoRA keys kept away (on resume peft would
        rename the experts' keys for transformers' fused layout, and their LoRA weights would start over:
        qtune.modeling.load.peft_sees_per_expert_layers)."""
        from qtune.modeling.load import peft_sees_per_expert_layers

        with peft_sees_per_expert_layers(self.accelerator.unwrap_model(self.model).get_base_model()):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _save_optimizer_and_scheduler(self, output_dir):
        testhooks.fault_point("optimizer", self.state.global_step)
        super()._save_optimizer_and_scheduler(output_dir)
