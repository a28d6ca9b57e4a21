"""The trainer of a run: the method's trainer class with its own options, and what qtune adds to any of them: fp32
LoRA weights, the progress line, the NaN guard, the Hub checkpoint push, the trackers and the test trace."""

from __future__ import annotations

from pathlib import Path

from transformers.trainer_callback import ProgressCallback

from qtune.core import distributed, testhooks
from qtune.modeling.lean_ops import lora_inputs_stay_in_compute_dtype
from qtune.modeling.load import keep_trainable_in_fp32
from qtune.training.callbacks import AllEqualGroupsWarning, CheckpointPusher, LossProgress, NonFiniteGuard
from qtune.training.methods import method_of


def build_trainer(
    recipe, peft_model, tokenizer, config, data, run_dir: Path, *, offload_activations: bool, continues_adapter: bool
):
    """The recipe's method's trainer on `data`, with trl `config` (qtune.training.arguments), ready to train."""
    method = method_of(recipe)
    trainer = method.trainer()(
        model=peft_model,
        args=config,
        train_dataset=data.train,
        eval_dataset=data.val,
        processing_class=tokenizer,
        keep_checkpoints=recipe.train.keep_checkpoints,
        offload_activations=offload_activations,
        **method.trainer_options(recipe, tokenizer, continues_adapter),
    )
    keep_trainable_in_fp32(trainer.model)
    if config.bf16 or config.fp16:  # the Trainer runs every forward pass under autocast
        lora_inputs_stay_in_compute_dtype(trainer.model)
    distributed.check_world_size(trainer.args.world_size)
    testhooks.traced(trainer, run_dir)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossProgress())
    trainer.add_callback(AllEqualGroupsWarning())  # silent unless GRPO's groups keep teaching nothing
    trainer.add_callback(NonFiniteGuard(trainer, recipe.train.max_nonfinite_steps))
    if recipe.hub.push_checkpoints:
        trainer.add_callback(CheckpointPusher(recipe.hub.repo_id, recipe.hub.private, run_dir))
    if "tensorboard" in recipe.log.report_to:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        trainer.add_callback(TensorBoardCallback(SummaryWriter(log_dir=str(run_dir / "tensorboard"))))
    return trainer
