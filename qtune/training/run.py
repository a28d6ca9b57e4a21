"""`qtune train`: recipe in, run folder out. trl's trainer of the recipe's method owns the loop.

Order matters for the user: everything that can be wrong with the recipe, the output folder, the tokenizer or the
data is found before the (slow) model load, and a failure before training starts leaves no output folder behind.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import set_seed

from qtune.config.recipe import Recipe, recipe_to_yaml
from qtune.core import distributed, testhooks
from qtune.core.checkpoints import MANIFEST
from qtune.core.cpu_threads import FreeCoreThreads
from qtune.core.environment import environment, version_differences
from qtune.core.errors import EXIT_INTEGRITY, EXIT_INTERRUPTED, EnvironmentProblem, QtuneError, RecipeError
from qtune.core.folders import ADAPTER, EVAL_BEFORE, GENERATIONS, HISTORY, LOSS_PLOT, METRICS, RECIPE_FILE, claimed_run
from qtune.core.fs import write_json_atomically, write_text_atomically
from qtune.core.log import get_logger
from qtune.data.prepared import PreparedData
from qtune.data.templates import resolve_chat_template
from qtune.export.formats import formats_problem
from qtune.modeling import load as model_loading
from qtune.modeling.moe.families import moe_family
from qtune.modeling.precision import resolve_compute_dtype
from qtune.publish import hub
from qtune.publish.report_page import build_report
from qtune.training.arguments import (
    build_trainer_config,
    out_of_memory,
    resolve_memory_savers,
    warn_if_plan_predicts_oom,
)
from qtune.training.callbacks import (
    FollowFreeCores,
    GracefulStop,
    NonFiniteGuard,
    StepClock,
    StoppedDuringEvaluation,
    close_progress_bars,
)
from qtune.training.methods import method_of
from qtune.training.report import (
    compute_dtype_of,
    current_rss_bytes,
    final_evaluation,
    peak_memory_bytes,
    plot_losses,
    save_adapter,
    summary,
    write_generations,
)
from qtune.training.resume import checkpoint_to_resume, tokens_at_checkpoint
from qtune.training.trainer import build_trainer

log = get_logger(__name__)


@dataclass
class Prepared:
    """Everything `prepare` sets up for `fit`."""

    trainer: object  # the method's trainer (qtune.training.methods)
    data: PreparedData  # the tokenized train / validation splits and their report
    checkpoint: Path | None  # the checkpoint a resume starts from
    use_cpu: bool
    rss_before_model_bytes: int  # the process before the model came in (metrics.json; the memory plan's baseline)
    # GPU memory allocated at most while loading (None on CPU); training's peak is then counted from zero again,
    # so metrics.json tells the two apart (the plan predicts training's)
    loading_peak_bytes: int | None = None
    started_at: float = 0.0  # time.perf_counter() when prepare began: set-up is counted from there
    data_seconds: float = 0.0  # reading and tokenizing (or reading the cached tokens)
    load_seconds: float = 0.0  # the model load and the adapter


def train(
    recipe: Recipe,
    *,
    resume: bool = False,
    overwrite: bool = False,
    force: bool = False,
    then: Callable[[Path, dict], None] | None = None,
) -> dict:
    """Fine-tunes as the recipe says, in its locked run folder; returns the metrics also written to metrics.json.
    `then(run_dir, metrics)` runs on the main process while the run folder is still locked (exports, a Hub push)."""
    with claimed_run_on_main(recipe, resume=resume, overwrite=overwrite) as claim:
        run_dir = Path(recipe.train.output_dir).expanduser()
        try:
            prepared = prepare(recipe, run_dir, resume=resume, force=force)
        except BaseException:
            if claim is not None:
                claim.abandon()  # a run that never started leaves no folder behind
            raise
        if claim is not None:
            claim.started()  # only now is an --overwrite's previous run gone
        metrics = fit(recipe, run_dir, prepared)
        if then is not None and claim is not None:
            then(run_dir, metrics)
        return metrics


@contextmanager
def claimed_run_on_main(recipe: Recipe, *, resume: bool, overwrite: bool):
    """The main process claims and locks the run folder (or refuses) before any rank reads or writes in it."""
    if distributed.rank() != 0:
        distributed.barrier()
        yield None
        return
    with claimed_run(
        recipe.train.output_dir, resume=resume, overwrite=overwrite, hub_checkpoints=recipe.hub.push_checkpoints
    ) as claim:
        distributed.barrier()
        yield claim


@contextmanager
def env_defaults(**values: str):
    """Sets environment variables the trackers read, only where the user has not, for this run only."""
    added = [key for key in values if key not in os.environ]
    for key in added:
        os.environ[key] = values[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def prepare(recipe: Recipe, run_dir: Path, *, resume: bool, force: bool = False) -> Prepared:
    """Everything before the first step: checkpoint, tokenizer, data, model, trainer. Whatever can be wrong with the
    recipe, the folder, the tokenizer or the data is found before the (slow) model load."""
    started_at = time.perf_counter()
    method = method_of(recipe)
    checkpoint = checkpoint_to_resume(recipe, run_dir, force=force) if resume else None
    if recipe.hub.repo_id:
        hub.require_token()  # before hours of training, not after
    use_cpu = not torch.cuda.is_available()
    if use_cpu and model_loading.under_fsdp():
        # accelerate's FSDP plugin refuses a machine without an accelerator, with a traceback from deep inside
        # the Trainer ("There are currently no available devices found"), after the model load
        raise EnvironmentProblem(
            "FSDP needs GPUs: accelerate's FSDP plugin does not run on a CPU",
            fix="on a CPU use DDP: torchrun --standalone --nproc_per_node N -m qtune train RECIPE",
        )
    if recipe.data.streaming and distributed.launched_world_size() > 1:
        # each rank would read the whole stream; accelerate's batch dispatch cannot join packed rows of other shapes
        raise RecipeError(
            "data.streaming runs in one process",
            fix="train on several GPUs with data.streaming: false (the tokens are cached)",
        )
    cpu_threads = None
    if use_cpu:
        cpu_threads = FreeCoreThreads()
        cpu_threads.start()
    compute_dtype = resolve_compute_dtype(recipe.quant.compute_dtype)
    if not use_cpu:
        warn_if_plan_predicts_oom(recipe)
    differs = version_differences()
    if differs:  # the run works; its digits may not match the figures qtune states
        listed = ", ".join(f"{name} {d['installed']} (tested {d['tested']})" for name, d in differs.items())
        log.info(f"environment: {listed}: not the tested versions (qtune doctor; kept in metrics.json)")
    if use_cpu and recipe.train.optimizer.startswith("paged_"):
        log.info(
            f"optimizer: {recipe.train.optimizer} pages its state only on a GPU; on CPU bitsandbytes runs it unpaged "
            "(the same update)"
        )
    checkpointing, offload = resolve_memory_savers(recipe, use_cpu=use_cpu, compute_bytes=compute_dtype.itemsize)
    model_config = model_loading.load_model_config(recipe.model)
    problem = formats_problem(recipe.export.formats, model_config.to_dict(), recipe.export)
    if problem:  # found now, not after hours of training
        raise RecipeError(problem, fix="change export.formats or export.gptq")
    adapter = model_loading.adapter_source(recipe.model)  # its base checked before any weight loads
    tokenizer = model_loading.load_tokenizer(recipe.model)
    if recipe.data.chat_template:
        tokenizer.chat_template = resolve_chat_template(recipe.data, tokenizer)
    data_started = time.perf_counter()
    data = method.data.build(recipe.data, tokenizer, seed=recipe.train.seed)
    data_seconds = time.perf_counter() - data_started
    log.info(method.data.describe(data.report))
    method.check_data(recipe, data)  # e.g. GRPO's rewards called on real rows: before the model loads

    config = build_trainer_config(
        recipe.train.model_copy(update={"gradient_checkpointing": checkpointing}),
        recipe.log,
        config_class=method.trainer_config(),
        method_settings=method.trainer_settings(recipe),
        run_dir=run_dir,
        compute_dtype=compute_dtype,
        has_eval=data.val is not None,
        max_length=recipe.data.max_length,
        use_cpu=use_cpu,
        eval_before=data.val is not None and not (run_dir / EVAL_BEFORE).is_file(),
        routed_experts=moe_family(model_config) is not None,
    )
    if distributed.rank() == 0:
        write_text_atomically(run_dir / RECIPE_FILE, recipe_to_yaml(recipe))
    log.info(
        f"model: loading {recipe.model.name} in 4-bit {recipe.quant.type} (compute {str(compute_dtype).removeprefix('torch.')})"
    )
    started = time.perf_counter()
    rss_before_model = current_rss_bytes()
    base = model_loading.load_base(recipe.model, recipe.quant, compute_dtype, model_config)
    model_loading.check_vocabulary_fits(base, tokenizer, data)
    model_loading.align_special_tokens(base, tokenizer)

    # The LoRA init draws from the global RNG: seed it here, or it depends on whatever ran before (under
    # torchrun the process-group setup does), and two launches of one recipe start from different adapters.
    set_seed(recipe.train.seed)
    peft_model = model_loading.attach_lora(
        base, recipe.lora, gradient_checkpointing=checkpointing, adapter=adapter, dropout=method.lora_dropout
    )
    load_seconds = time.perf_counter() - started
    trainable, total = peft_model.get_nb_trainable_parameters()
    start = f"continues {recipe.model.adapter}: " if adapter else ""
    log.info(
        f"model: loaded in {load_seconds:.1f} s; LoRA {start}trains {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)"
    )
    setup = method.describe_setup(recipe)
    if setup:
        log.info(setup)

    with env_defaults(WANDB_DIR=str(run_dir)):
        trainer = build_trainer(
            recipe,
            peft_model,
            tokenizer,
            config,
            data,
            run_dir,
            offload_activations=offload,
            continues_adapter=adapter is not None,
        )
    if cpu_threads is not None:
        trainer.add_callback(FollowFreeCores(cpu_threads))
    loading_peak = None
    if not use_cpu:
        loading_peak = int(torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
    return Prepared(
        trainer,
        data,
        checkpoint,
        use_cpu,
        rss_before_model,
        loading_peak,
        started_at=started_at,
        data_seconds=data_seconds,
        load_seconds=load_seconds,
    )


def stopped(signal_name: str, trainer, run_dir: Path) -> QtuneError:
    """The one-line error of a run stopped by a signal: the checkpoint it saved, and how to continue."""
    step = trainer.state.global_step
    saved = Path(trainer.args.output_dir) / f"checkpoint-{step}"
    if step == 0 or not (saved / MANIFEST).is_file():
        return QtuneError(
            f"stopped by {signal_name} before the first checkpoint",
            where=str(run_dir),
            fix="start again with --overwrite",
            code=EXIT_INTERRUPTED,
        )
    return QtuneError(
        f"stopped by {signal_name} at step {step}; {saved.name} is saved",
        where=str(run_dir),
        fix="continue with the same command and --resume",
        code=EXIT_INTERRUPTED,
    )


def fit(recipe: Recipe, run_dir: Path, prepared: Prepared) -> dict:
    """Trains, evaluates, and leaves the adapter, metrics.json, loss.png and the run's page in the run folder."""
    method = method_of(recipe)
    trainer, data, checkpoint = prepared.trainer, prepared.data, prepared.checkpoint
    main_process = trainer.is_world_process_zero()
    has_eval = data.val is not None
    before_path = run_dir / EVAL_BEFORE
    tokens_before = tokens_at_checkpoint(checkpoint)  # read now: rotation may delete that checkpoint during training
    stop = GracefulStop().install()
    trainer.add_callback(stop)
    clock = StepClock()
    trainer.add_callback(clock)
    try:
        with env_defaults(WANDB_DIR=str(run_dir)):
            if checkpoint is not None:
                log.info(f"resume: continuing from {checkpoint.name}")
            if trainer.args.eval_on_start and main_process:  # it runs before the first step: said, not silent
                log.info(f"eval: the loss before training, on {len(data.val):,} validation samples")
            try:
                with warnings.catch_warnings():
                    # bitsandbytes' warning on the first step; qtune said it in its own words before the load
                    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
                    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            except StoppedDuringEvaluation:
                if trainer.state.global_step > 0:  # evaluation runs between steps: the state is a step boundary
                    trainer._save_checkpoint(trainer.model, trial=None)
            except torch.OutOfMemoryError as e:
                raise out_of_memory(recipe, trainer, e, use_cpu=prepared.use_cpu) from None
            except pickle.UnpicklingError:
                # The Trainer reads optimizer, scheduler and RNG state with torch.load(weights_only=True): a pickle
                # that holds anything but tensors and plain containers is refused, never run.
                raise QtuneError(
                    f"{checkpoint.name if checkpoint else 'the checkpoint'} holds pickled objects that "
                    "are not plain tensors: refused",
                    where=str(checkpoint),
                    fix="resume from a checkpoint you trust, or start over with --overwrite",
                    code=EXIT_INTEGRITY,
                ) from None
            if trainer.args.eval_on_start and main_process:
                first_eval = next((h for h in trainer.state.log_history if "eval_loss" in h), None)
                if first_eval is not None:  # kept, so a resumed run does not measure "before" again
                    before = {f"{k}_before": v for k, v in first_eval.items() if k.startswith("eval_")}
                    write_json_atomically(before_path, before)
            if stop.signal_name is not None:
                raise stopped(stop.signal_name, trainer, run_dir)
    finally:
        stop.restore()
        close_progress_bars(trainer)
    with env_defaults(WANDB_DIR=str(run_dir)):
        final_eval = final_evaluation(trainer) if has_eval else {}
        if "wandb" in recipe.log.report_to and main_process:
            import wandb  # only when asked for: it is slow to import

            if wandb.run is not None:
                wandb.finish()
            # wandb keeps the settings of its first run (WANDB_DIR included) for the life of the process: a second
            # qtune.train() in the same notebook would write into the first run's folder.
            wandb.teardown()
    before = json.loads(before_path.read_text()) if before_path.is_file() else {}
    eval_before = before.get("eval_loss_before")
    runtime = clock.step_seconds
    evaluation_seconds = sum(h.get("eval_runtime", 0.0) for h in trainer.state.log_history)
    tokens = int(trainer.state.num_input_tokens_seen)
    session_tokens = tokens - tokens_before
    metrics = {
        "train_loss": result.training_loss,
        "eval_loss_before": eval_before,
        "eval_loss": final_eval.get("eval_loss"),
        # another method's loss is no language-model loss: no perplexity
        "eval_perplexity": math.exp(final_eval["eval_loss"])
        if "eval_loss" in final_eval and method.language_model_loss
        else None,
        "method": recipe.train.method,
        "global_step": trainer.state.global_step,
        "train_tokens": tokens,
        # the optimizer steps alone; set-up (to this session's first step) and evaluation apart
        "train_seconds": runtime,
        "setup_seconds": clock.first_step_at - prepared.started_at if clock.first_step_at is not None else None,
        "data_seconds": prepared.data_seconds,
        "load_seconds": prepared.load_seconds,
        "evaluation_seconds": evaluation_seconds,
        "tokens_per_second": session_tokens / runtime if runtime > 0 else None,
        "peak_memory_bytes": peak_memory_bytes(prepared.use_cpu),
        "peak_memory_loading_bytes": prepared.loading_peak_bytes,
        "peak_memory_kind": "cpu_rss" if prepared.use_cpu or not torch.cuda.is_available() else "cuda_allocated",
        "rss_before_model_bytes": prepared.rss_before_model_bytes,
        # The dtype the base was quantized in; export re-creates the same 4-bit weights from it.
        "compute_dtype": {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[
            compute_dtype_of(trainer)
        ],
        "resumed_from": checkpoint.name if checkpoint is not None else None,
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "offload_activations": trainer.offload_activations,
        # optimizer steps fp16's gradient scaler dropped after an overflow (this session)
        "skipped_steps": next(
            c for c in trainer.callback_handler.callbacks if isinstance(c, NonFiniteGuard)
        ).skipped_steps,
        "data": data.report,
    }
    metrics["world_size"] = trainer.args.world_size
    metrics["environment"] = environment()
    metrics.update(method.metrics(trainer.state.log_history, before, final_eval))
    testhooks.record_final_weights(trainer.model, run_dir, trainer.args.process_index)
    if main_process:
        save_adapter(trainer, run_dir / ADAPTER)
        write_json_atomically(run_dir / METRICS, metrics)
        write_json_atomically(run_dir / HISTORY, trainer.state.log_history)
        plot_losses(trainer.state.log_history, run_dir / LOSS_PLOT, before=before)
        if not model_loading.under_fsdp():  # a sharded model answers only with every rank taking part
            write_generations(trainer, data, run_dir / GENERATIONS, method.data.as_lm_samples)
        page = build_report(run_dir)
        log.info(summary(metrics, run_dir, method.result_rows(metrics)) + f"   report: {page}")
    return metrics
