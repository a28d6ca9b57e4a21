"""From the recipe to the training arguments (trl's config class of the method: SFTConfig, DPOConfig, ...), and the
decisions the memory plan makes before the model loads: whether to recompute activations (`gradient_checkpointing:
auto`) or offload them, whether to warn of an out-of-memory, and the advice when one happens."""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path

import psutil
import torch

from qtune.config.recipe import LogSection, Recipe, TrainSection
from qtune.core.checkpoints import newest_valid
from qtune.core.errors import EXIT_ENVIRONMENT, QtuneError, RecipeError
from qtune.core.folders import CHECKPOINTS
from qtune.core.log import get_logger
from qtune.planning.plan import fit_advice, oom_warning, plan_training

log = get_logger(__name__)


def build_trainer_config(
    train: TrainSection,
    log_section: LogSection,
    *,
    config_class: type,
    method_settings: dict,
    run_dir: Path,
    compute_dtype,
    has_eval: bool,
    max_length: int,
    use_cpu: bool,
    eval_before: bool = False,
    routed_experts: bool = False,
):
    """The trainer's arguments (`config_class`, the method's trl config) from the train and log sections, the method's
    own settings, and train.extra passed through (checked against the config's fields). `routed_experts`: the model is
    a mixture of experts (an expert no token of a step reached has LoRA weights without a gradient that step)."""
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(train.extra) - known)
    if unknown:
        name = config_class.__name__
        guess = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"did you mean '{guess[0]}'?" if guess else f"see trl's {name} for the field names"
        raise RecipeError(f"train.extra has unknown {name} field '{unknown[0]}'", fix=hint)
    eval_every = train.eval_steps if has_eval and train.eval_steps else None
    settings = dict(
        output_dir=str(run_dir / CHECKPOINTS),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        per_device_train_batch_size=train.micro_batch_size,
        per_device_eval_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.lr,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=train.optimizer,
        seed=train.seed,
        data_seed=train.seed,
        # The loss before training comes from the Trainer's own eval at step 0. A trainer.evaluate() call before
        # train() marks the model as prepared for accelerate, which then never wraps it in DDP: every rank would
        # train alone (tests/test_distributed.py checks the adapters of both ranks are identical).
        eval_on_start=eval_before,
        eval_strategy="steps" if eval_every else "no",
        eval_steps=eval_every,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=None,  # qtune rotates, after the new checkpoint is complete (checkpoints.rotate)
        logging_steps=train.logging_steps,
        logging_first_step=True,
        report_to=[r for r in log_section.report_to if r != "tensorboard"] or "none",
        project=log_section.project,
        run_name=log_section.run_name or run_dir.name,
        # trl defaults to bf16 autocast, which crashes with 4-bit layers on CPU: the dtype is ours to choose.
        bf16=compute_dtype == torch.bfloat16 and not use_cpu,
        fp16=compute_dtype == torch.float16,
        use_cpu=use_cpu,
        gradient_checkpointing=train.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        # GRPO's config has none: its prompts and completions are bounded by the method's own settings
        **({"max_length": max_length} if "max_length" in known else {}),
        include_num_input_tokens_seen="non_padding",  # kept in trainer_state, so it survives a resume
        dataloader_pin_memory=not use_cpu,
        # every LoRA weight of a dense model gets a gradient (the search costs a pass per step); an unrouted expert's not
        ddp_find_unused_parameters=routed_experts,
        prediction_loss_only=True,  # evaluation needs the loss only, not every batch's logits kept
        disable_tqdm=False,
    )
    settings.update(method_settings)
    settings.update(train.extra)
    try:
        return config_class(**settings)
    except (ValueError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RecipeError(
            f"the trainer rejects these settings: {first}", fix="check train.extra and the train section"
        ) from None


def warn_if_plan_predicts_oom(recipe: Recipe) -> None:
    """Says what the memory plan predicts when it predicts an out-of-memory, before the slow model load: a warning
    only, as the plan is an estimate."""
    try:
        message = oom_warning(recipe, torch.cuda.get_device_properties(0).total_memory)
    except QtuneError:
        return  # the plan needs config.json; the load below reports a missing model properly
    if message:
        log.info(message)


AUTO_GPU_SHARE = 0.8


def resolve_memory_savers(recipe: Recipe, *, use_cpu: bool, compute_bytes: int) -> tuple[bool, bool]:
    """(gradient checkpointing, activation offloading), each `auto` decided by the memory plan: recomputing costs a
    third more compute per token and offloading a copy of each layer input both ways, so neither should be the
    price of every run (trl turns checkpointing on by default)."""
    train = recipe.train
    offload_asked = train.offload_activations is True and not use_cpu
    if train.gradient_checkpointing != "auto" and train.offload_activations != "auto":
        return bool(train.gradient_checkpointing), offload_asked
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if use_cpu:
        budget, where = psutil.virtual_memory().available // processes_here, "free RAM"
    else:
        # 80%: the plan measured 20% under a GPU's peak once (a short fp16 row without checkpointing, bench/README.md),
        # and until that is explained `auto` keeps that much headroom
        budget, where = int(torch.cuda.get_device_properties(0).total_memory * AUTO_GPU_SHARE), "GPU memory (80%)"
    try:
        plan = plan_training(
            recipe, device="cpu" if use_cpu else "cuda", compute_bytes=compute_bytes, budget_bytes=budget
        )
    except QtuneError:
        # no plan (the model load reports why): the safe choice
        return (True if train.gradient_checkpointing == "auto" else train.gradient_checkpointing), offload_asked
    gib = 2**30
    without = plan["training_bytes"] - plan["parts"]["activations"] + plan["activations_without_checkpointing"]
    with_it = plan["training_bytes"] - plan["parts"]["activations"] + plan["activations_with_checkpointing"]
    if train.gradient_checkpointing == "auto":
        log.info(
            f"train: gradient checkpointing {'on' if plan['gradient_checkpointing'] else 'off'} (auto: the plan "
            f"predicts {without / gib:.1f} GiB without it; {budget / gib:.1f} GiB {where})"
        )
    if train.offload_activations == "auto" and not use_cpu and plan["gradient_checkpointing"]:
        log.info(
            f"train: activation offloading {'on' if plan['offload_activations'] else 'off'} (auto: the plan predicts "
            f"{with_it / gib:.1f} GiB with checkpointing alone; {budget / gib:.1f} GiB {where})"
        )
    return plan["gradient_checkpointing"], bool(plan["offload_activations"])


def out_of_memory(recipe: Recipe, trainer, error: Exception, *, use_cpu: bool) -> QtuneError:
    """An out-of-memory error mid-run as one line: where, the plan's advice for this device, and the checkpoint that
    is intact (the step that failed saved nothing)."""
    step = trainer.state.global_step + 1
    try:
        if use_cpu:
            budget = psutil.virtual_memory().total
        else:
            budget = torch.cuda.get_device_properties(0).total_memory
        plan = plan_training(
            recipe, device="cpu" if use_cpu else "cuda", compute_bytes=4 if use_cpu else 2, budget_bytes=budget
        )
        if plan.get("largest_max_length", 0) >= recipe.data.max_length:
            # the plan thought this length fits: it was a few % short (allocator fragmentation, kernels' workspace)
            plan["largest_max_length"] = int(recipe.data.max_length * 0.9) // 256 * 256
        advice = fit_advice(plan) + " (qtune plan shows the breakdown)"
    except QtuneError:
        advice = "shorten data.max_length or turn on train.gradient_checkpointing"
    saved = newest_valid(Path(trainer.args.output_dir))
    kept = f"{saved.name} is intact: change the recipe, then --resume --force" if saved else "no checkpoint yet"
    device = "CPU" if use_cpu else "GPU"
    return QtuneError(
        f"out of {device} memory in step {step} ({str(error).splitlines()[0][:120]})",
        where=str(trainer.args.output_dir),
        fix=f"{advice}; {kept}",
        code=EXIT_ENVIRONMENT,
    )
