"""Supervised QLoRA fine-tuning: recipe in, run folder out. trl's SFTTrainer owns the loop.

Order matters for the user: everything that can be wrong with the recipe, the output folder,
the tokenizer or the data is found before the (slow) model load, and a failure before training
starts leaves no output folder behind.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from qtune import checkpoints
from qtune import data as data_stage
from qtune.errors import EXIT_INTEGRITY, QtuneError, RecipeError
from qtune.recipe import LogSection, Recipe, TrainSection, recipe_to_yaml
from qtune.run_dir import ADAPTER, CHECKPOINTS, EVAL_BEFORE, METRICS, RECIPE_FILE, claimed_run


def write_json_atomically(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- trainer config


def build_sft_config(train: TrainSection, log: LogSection, *, run_dir: Path, compute_dtype, has_eval: bool,
                     max_length: int, use_cpu: bool, eval_before: bool = False):
    import dataclasses

    import torch
    from trl import SFTConfig

    known = {f.name for f in dataclasses.fields(SFTConfig)}
    unknown = sorted(set(train.extra) - known)
    if unknown:
        import difflib

        guess = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"did you mean '{guess[0]}'?" if guess else "see trl's SFTConfig for the field names"
        raise RecipeError(f"train.extra has unknown SFTConfig field '{unknown[0]}'", fix=hint)
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
        report_to=[r for r in log.report_to if r != "tensorboard"] or "none",
        project=log.project,
        run_name=log.run_name or run_dir.name,
        # trl defaults to bf16 autocast, which crashes with 4-bit layers on CPU: the dtype is ours to choose.
        bf16=compute_dtype == torch.bfloat16 and not use_cpu,
        fp16=compute_dtype == torch.float16,
        use_cpu=use_cpu,
        gradient_checkpointing=train.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=max_length,
        packing=False,
        include_num_input_tokens_seen="non_padding",  # kept in trainer_state, so it survives a resume
        dataloader_pin_memory=not use_cpu,
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient; the search costs a pass per step
        prediction_loss_only=True,  # evaluation needs the loss only, not every batch's logits kept
        disable_tqdm=False,
    )
    settings.update(train.extra)
    try:
        return SFTConfig(**settings)
    except (ValueError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RecipeError(f"the trainer rejects these settings: {first}", fix="check train.extra and the train section") from None


# --------------------------------------------------------------------------- callbacks


def torch_dataset_base():
    from torch.utils.data import Dataset

    return Dataset


def progress_callback_class():
    from transformers.trainer_callback import ProgressCallback

    class LossProgress(ProgressCallback):
        """The stock tqdm bar (steps, ETA) with loss, lr and tokens/s on it instead of printed dicts."""

        def __init__(self):
            super().__init__()
            self.last = None  # (time, num_tokens) at the previous log

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            pass  # a second bar per evaluation is noise; the eval result is printed as one line

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            bar = self.training_bar
            if "eval_loss" in logs:
                line = f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f} (perplexity {math.exp(min(logs['eval_loss'], 50)):.2f})"
                (bar.write if bar is not None else print)(line)
                return
            postfix = {}
            if "loss" in logs:
                postfix["loss"] = f"{logs['loss']:.4f}"
            if "learning_rate" in logs:
                postfix["lr"] = f"{logs['learning_rate']:.2e}"
            if "train_runtime" in logs:
                return  # the Trainer's closing summary: the rate over the whole run is qtune's last line
            if "num_input_tokens_seen" in logs:
                now = (time.perf_counter(), logs["num_input_tokens_seen"])
                if self.last is not None and now[0] > self.last[0] and now[1] > self.last[1]:
                    postfix["tok/s"] = f"{(now[1] - self.last[1]) / (now[0] - self.last[0]):.0f}"
                self.last = now
            if bar is not None and postfix:
                bar.set_postfix(postfix, refresh=False)

    return LossProgress


# --------------------------------------------------------------------------- resuming and stopping

# What may change between a run and its resume without changing the trajectory: where things are written,
# how often it logs, evaluates and saves, what happens after training, and recompute (same maths).
RESUMABLE_CHANGES = ("train.output_dir", "train.save_steps", "train.eval_steps", "train.logging_steps",
                     "train.keep_checkpoints", "train.gradient_checkpointing", "log.", "export.", "hub.")


def recipe_differences(old: Recipe, new: Recipe) -> list[str]:
    def flat(value, prefix=""):
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                out.update(flat(item, f"{prefix}{key}."))
            return out
        return {prefix.rstrip("."): value}

    before, after = flat(old.model_dump(mode="json")), flat(new.model_dump(mode="json"))
    changed = []
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key) and not any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE_CHANGES):
            changed.append(f"{key}: {before.get(key)!r} -> {after.get(key)!r}")
    return changed


def check_resumed_recipe(recipe: Recipe, run_dir: Path, *, force: bool) -> None:
    """A resume with another lr, batch, dataset or LoRA shape is another run stitched onto this one."""
    import yaml

    from qtune.recipe import validate_recipe

    saved = run_dir / RECIPE_FILE
    try:
        old = validate_recipe(yaml.safe_load(saved.read_text()))
    except (OSError, ValueError, yaml.YAMLError, QtuneError):
        return  # an old or hand-edited recipe.yaml: nothing reliable to compare with
    changed = recipe_differences(old, recipe)
    if changed and not force:
        raise RecipeError(f"the recipe changed since {saved} in what decides the training: {'; '.join(changed)}",
                          fix="restore those values, or add --force to resume with the new ones anyway")


class GracefulStop:
    """SIGTERM (preemption) or Ctrl-C: finish the step, save a checkpoint, exit 75. A second signal exits at once."""

    def __init__(self):
        self.signal_name = None
        self.previous = {}

    def install(self):
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self  # signals only reach the main thread (a notebook's worker thread has none)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self):
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        import signal
        import sys

        if self.signal_name is not None:
            os._exit(128 + signum)  # asked twice: the user means now
        self.signal_name = signal.Signals(signum).name
        print(f"\nqtune: {self.signal_name}: saving a checkpoint at the end of this step, then stopping "
              f"(again to quit now)", file=sys.stderr, flush=True)

    def callback(self):
        from transformers import TrainerCallback

        stop = self

        class StopAtStepEnd(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if stop.agreed(args):
                    control.should_save, control.should_training_stop = True, True
                    control.should_evaluate = False

            def on_prediction_step(self, args, state, control, **kwargs):
                if stop.signal_name is not None:
                    raise StoppedDuringEvaluation()

        return StopAtStepEnd()

    def agreed(self, args) -> bool:
        """Under DDP every rank must stop at the same step, or the others wait forever for the stopped one."""
        if args.world_size <= 1:
            return self.signal_name is not None
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if self.signal_name else 0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signal_name is None:
            self.signal_name = "SIGTERM"
        return bool(flag.item())


class StoppedDuringEvaluation(Exception):
    pass


# --------------------------------------------------------------------------- the run


@contextmanager
def env_defaults(**values: str):
    """Set environment variables the trackers read, only where the user has not, for this run only."""
    added = [key for key in values if key not in os.environ]
    for key in added:
        os.environ[key] = values[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def current_rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_memory_bytes(use_cpu: bool) -> int:
    import torch

    if not use_cpu and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def run(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, force: bool = False, echo=print) -> dict:
    """Fine-tune as the recipe says; returns the metrics also written to metrics.json."""
    from qtune import distributed

    if distributed.rank() != 0:
        echo = lambda *_: None  # noqa: E731  (one voice: the main process reports)
    with claimed_run_on_main(recipe, resume=resume, overwrite=overwrite) as claim:
        run_dir = Path(recipe.train.output_dir).expanduser()
        try:
            prepared = prepare(recipe, run_dir, resume=resume, echo=echo, force=force)
        except BaseException:
            if claim is not None:
                claim.abandon()
            raise
        metrics = fit(recipe, run_dir, *prepared, resume=resume, echo=echo)
        if prepared[0].is_world_process_zero():
            if recipe.export.formats:
                from qtune import export

                metrics["export"] = export.run(run_dir, list(recipe.export.formats), merge_base=recipe.export.merge_base,
                                               eval_samples=recipe.export.eval_samples, echo=echo)
            if recipe.hub.repo_id:
                from qtune import hub

                hub.push(run_dir, recipe.hub.repo_id, list(recipe.hub.push), private=recipe.hub.private, echo=echo)
    return metrics


@contextmanager
def claimed_run_on_main(recipe: Recipe, *, resume: bool, overwrite: bool):
    """The main process claims and locks the run folder (or refuses) before any rank reads or writes in it."""
    from qtune import distributed

    if distributed.rank() != 0:
        distributed.barrier()
        yield None
        return
    with claimed_run(recipe.train.output_dir, resume=resume, overwrite=overwrite,
                     hub_checkpoints=recipe.hub.push_checkpoints) as claim:
        distributed.barrier()
        yield claim


def warn_if_plan_predicts_oom(recipe: Recipe, echo) -> None:
    """The memory plan, before the slow model load: a warning only, as the plan is an estimate."""
    import torch

    from qtune.plan import oom_warning

    try:
        message = oom_warning(recipe, torch.cuda.get_device_properties(0).total_memory)
    except QtuneError:
        return  # the plan needs config.json; the load below reports a missing model properly
    if message:
        echo(message)


def resolve_gradient_checkpointing(recipe: Recipe, *, use_cpu: bool, compute_bytes: int, echo) -> bool:
    """`auto`: recompute only when the memory plan says the run needs it. Recomputing costs a third more compute
    per token, so it should not be the price of every run (trl turns it on by default)."""
    setting = recipe.train.gradient_checkpointing
    if setting != "auto":
        return setting
    import torch

    from qtune.plan import plan_training

    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if use_cpu:
        import psutil

        budget, where = psutil.virtual_memory().available // processes_here, "free RAM"
    else:
        budget, where = int(torch.cuda.get_device_properties(0).total_memory * 0.9), "GPU memory (90%)"
    try:
        plan = plan_training(recipe, device="cpu" if use_cpu else "cuda", compute_bytes=compute_bytes, budget_bytes=budget)
    except QtuneError:
        return True  # no plan (the model load reports why): the safe choice
    without = plan["training_bytes"] - plan["parts"]["activations"] + plan["activations_without_checkpointing"]
    echo(f"train: gradient checkpointing {'on' if plan['gradient_checkpointing'] else 'off'} (auto: the plan predicts "
         f"{without / 2**30:.1f} GiB without it; {budget / 2**30:.1f} GiB {where})")
    return plan["gradient_checkpointing"]


def prepare(recipe: Recipe, run_dir: Path, *, resume: bool, echo, force: bool = False):
    """Everything before the first step: tokenizer, data, checkpoint, model, trainer."""
    import torch

    from qtune import model as model_stage

    checkpoint = None
    if resume:
        check_resumed_recipe(recipe, run_dir, force=force)
        checkpoint = checkpoints.newest_valid(run_dir / CHECKPOINTS, echo=echo)
        if checkpoint is None and recipe.hub.push_checkpoints:
            from qtune import hub

            echo(f"resume: no local checkpoint, fetching the newest from {recipe.hub.repo_id}")
            if hub.pull_newest_checkpoint(recipe.hub.repo_id, run_dir) is not None:
                checkpoint = checkpoints.newest_valid(run_dir / CHECKPOINTS, echo=echo)
        if checkpoint is None:
            raise QtuneError(
                f"no complete checkpoint under {run_dir / CHECKPOINTS}",
                fix="run without --resume (and with --overwrite) to start over",
                code=EXIT_INTEGRITY,
            )
    if recipe.hub.repo_id:
        from qtune import hub

        hub.require_token()  # before hours of training, not after
    use_cpu = not torch.cuda.is_available()
    cpu_threads = None
    if use_cpu:
        from qtune.cpu_threads import FreeCoreThreads

        cpu_threads = FreeCoreThreads(echo)
        cpu_threads.start()
    compute_dtype = model_stage.resolve_compute_dtype(recipe.quant.compute_dtype)
    if not use_cpu:
        warn_if_plan_predicts_oom(recipe, echo)
    if use_cpu and recipe.train.optimizer.startswith("paged_"):
        echo(f"optimizer: {recipe.train.optimizer} pages its state only on a GPU; on CPU bitsandbytes runs it unpaged "
             "(the same update)")
    checkpointing = resolve_gradient_checkpointing(recipe, use_cpu=use_cpu, compute_bytes=compute_dtype.itemsize, echo=echo)
    tokenizer = model_stage.load_tokenizer(recipe.model)
    if recipe.data.chat_template:
        tokenizer.chat_template = data_stage.resolve_chat_template(recipe.data, tokenizer)
    prepared = data_stage.build(recipe.data, tokenizer, seed=recipe.train.seed)
    echo(data_stage.describe(prepared.report))

    config = build_sft_config(
        recipe.train.model_copy(update={"gradient_checkpointing": checkpointing}), recipe.log, run_dir=run_dir, compute_dtype=compute_dtype,
        has_eval=prepared.val is not None, max_length=recipe.data.max_length, use_cpu=use_cpu,
        eval_before=prepared.val is not None and not (run_dir / EVAL_BEFORE).is_file(),
    )
    if trainer_is_main():
        checkpoints.write_atomically(run_dir / RECIPE_FILE, recipe_to_yaml(recipe))
    echo(f"model: loading {recipe.model.name} in 4-bit {recipe.quant.type} (compute {str(compute_dtype).removeprefix('torch.')})")
    started = time.perf_counter()
    rss_before_model = current_rss_bytes()
    base = model_stage.load_base(recipe.model, recipe.quant, compute_dtype)
    model_stage.check_vocabulary_fits(base, tokenizer, prepared)
    model_stage.align_special_tokens(base, tokenizer)
    from transformers import set_seed

    # The LoRA init draws from the global RNG: seed it here, or it depends on whatever ran before (under
    # torchrun the process-group setup does), and two launches of one recipe start from different adapters.
    set_seed(recipe.train.seed)
    peft_model = model_stage.attach_lora(base, recipe.lora, gradient_checkpointing=checkpointing)
    load_seconds = time.perf_counter() - started
    trainable, total = peft_model.get_nb_trainable_parameters()
    echo(f"model: loaded in {load_seconds:.1f} s; LoRA trains {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")

    with env_defaults(WANDB_DIR=str(run_dir)):
        trainer = build_trainer(peft_model, tokenizer, config, prepared, recipe.log, run_dir, recipe.hub,
                                recipe.data.max_length)
    if cpu_threads is not None:
        trainer.add_callback(follow_free_cores_callback()(cpu_threads))
    trainer.qtune_rss_before_model = rss_before_model  # for metrics.json: the process before the model came in
    trainer.qtune_keep_checkpoints = recipe.train.keep_checkpoints
    return trainer, prepared, checkpoint, use_cpu


class SampleTracer(torch_dataset_base()):
    """QTUNE_SAMPLE_TRACE=1: the training sample indices each process fetches, batch by batch, in order.

    How the tests prove each DDP rank trained its own shard, and that a resumed run saw the same samples
    as an uninterrupted one. It wraps the training set only, so evaluation batches never show up.
    """

    def __init__(self, dataset, folder: Path, process_index: int):
        self.dataset = dataset
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"rank-{process_index}.jsonl"

    def __len__(self):
        return len(self.dataset)

    def _record(self, indices):
        with self.path.open("a") as f:
            f.write(json.dumps([int(i) for i in indices]) + "\n")

    def __getitem__(self, index):
        self._record([index])
        return self.dataset[index]

    def __getitems__(self, indices):
        self._record(indices)
        return [self.dataset[int(i)] for i in indices]


def step_tracer(path: Path):
    """Appends (process, step, digest of the micro-batch's tokens) as each micro-batch is trained on: how the kill
    tests show a resumed run trained on exactly the batches, in exactly the order, of an uninterrupted one."""
    import hashlib

    def record(step: int, input_ids) -> None:
        digest = hashlib.sha256(input_ids.detach().cpu().numpy().tobytes()).hexdigest()[:16]
        with path.open("a") as f:
            f.write(json.dumps({"pid": os.getpid(), "step": step, "batch": digest}) + "\n")

    return record


def lora_fingerprint(model) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def follow_free_cores_callback():
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class FollowFreeCores(TrainerCallback):
        """Re-sizes the CPU thread pool when a neighbour process starts or stops (qtune/cpu_threads.py says why)."""

        def __init__(self, threads):
            self.threads = threads
            threads.echo = tqdm.write  # a line above the progress bar, not through it

        def on_step_end(self, args, state, control, **kwargs):
            self.threads.recheck()

    return FollowFreeCores


def checkpoint_pusher_class():
    from transformers import TrainerCallback

    class CheckpointPusher(TrainerCallback):
        """Each checkpoint to the Hub as soon as it is saved, so a killed Colab run resumes elsewhere."""

        def __init__(self, repo_id: str, private: bool, run_dir: Path):
            self.repo_id, self.private, self.run_dir = repo_id, private, run_dir

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                from qtune import hub

                checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                hub.push_checkpoint(self.repo_id, checkpoint, self.run_dir, private=self.private)

    return CheckpointPusher


def trainer_is_main() -> bool:
    from qtune import distributed

    return distributed.rank() == 0


def sft_trainer_class():
    import contextlib

    from trl import SFTTrainer

    from qtune import loss as loss_stage

    class QtuneSFTTrainer(SFTTrainer):
        """SFTTrainer whose loss scores only the supervised positions (qtune/loss.py says why).

        trl's own fused LM head scores every position, padding and prompts included, on devices without
        Triton (the CPU), and recomputes each logits tile in the backward pass.
        """

        def training_step(self, model, inputs, num_items_in_batch=None):
            """One packed row at a time: the loss is a sum over tokens divided by a count fixed for the whole step,
            so backward per row gives the gradient of the whole micro-batch, with one row's activations alive (at
            most data.max_length tokens, whatever the micro-batch size). Under DDP only the last row syncs."""
            if self.qtune_step_trace is not None:
                self.qtune_step_trace(self.state.global_step, inputs["input_ids"])
            rows = inputs["input_ids"].shape[0]
            unwrapped = self.accelerator.unwrap_model(model)
            if rows == 1 or num_items_in_batch is None or loss_stage.fused_head_weight(unwrapped) is None:
                return super().training_step(model, inputs, num_items_in_batch)
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

        qtune_keep_checkpoints = 3
        qtune_step_trace = None  # QTUNE_SAMPLE_TRACE: a record of each micro-batch as it is trained on

        def _save_checkpoint(self, model, trial):
            """The Trainer's save, then the manifest that makes it count, then rotation (qtune/checkpoints.py)."""
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            try:
                super()._save_checkpoint(model, trial)
                self.accelerator.wait_for_everyone()  # every rank's RNG state is in before the manifest vouches for it
                if self.args.should_save:
                    checkpoints.write_manifest(folder, self.state.global_step)
                    checkpoints.rotate(folder.parent, self.qtune_keep_checkpoints)
            except Exception as e:
                if not checkpoints.is_disk_full(e):
                    raise
                if self.args.should_save:
                    shutil.rmtree(folder, ignore_errors=True)  # a half-written checkpoint is worth nothing
                raise checkpoints.disk_full(folder.name, folder.parent) from None

        def _save_optimizer_and_scheduler(self, output_dir):
            checkpoints.fault_point("optimizer", self.state.global_step)
            super()._save_optimizer_and_scheduler(output_dir)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            unwrapped = self.accelerator.unwrap_model(model)
            head_weight = loss_stage.fused_head_weight(unwrapped)
            if head_weight is None:
                self.loss_is_scaled_for_ga = None
                return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            # no KV cache: transformers only builds the packed (block-diagonal) mask without one
            with loss_stage.last_hidden_state(unwrapped) as captured:
                outputs = model(**forward_inputs, use_cache=False, logits_to_keep=1)
            loss_sum, count = loss_stage.supervised_loss_sum(captured["hidden"], inputs["labels"], head_weight)
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

    return QtuneSFTTrainer


def build_trainer(peft_model, tokenizer, config, prepared, log: LogSection, run_dir: Path, hub, max_length: int):
    from transformers.trainer_callback import ProgressCallback

    from qtune import model as model_stage
    from qtune.batching import PackedCollator

    trainer = sft_trainer_class()(
        model=peft_model,
        args=config,
        train_dataset=prepared.train,
        eval_dataset=prepared.val,
        processing_class=tokenizer,
        data_collator=PackedCollator(tokenizer.pad_token_id, row_tokens=max_length),
    )
    model_stage.keep_trainable_in_fp32(trainer.model)
    from qtune import distributed

    distributed.check_world_size(trainer.args.world_size)
    if os.environ.get("QTUNE_SAMPLE_TRACE"):
        trainer.train_dataset = SampleTracer(trainer.train_dataset, run_dir / "sample_trace", trainer.args.process_index)
        trainer.qtune_step_trace = step_tracer(run_dir / "sample_trace" / f"steps-rank-{trainer.args.process_index}.jsonl")
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(progress_callback_class()())
    if hub.push_checkpoints:
        trainer.add_callback(checkpoint_pusher_class()(hub.repo_id, hub.private, run_dir))
    if "tensorboard" in log.report_to:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        trainer.add_callback(TensorBoardCallback(SummaryWriter(log_dir=str(run_dir / "tensorboard"))))
    return trainer


def close_progress_bars(trainer) -> None:
    """After an exception the Trainer never closes its bar, and the error line would land at the end of it."""
    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "training_bar", None)
        if bar is not None:
            bar.close()
            callback.training_bar = None


def stopped(signal_name: str, trainer, run_dir: Path) -> QtuneError:
    from qtune.errors import EXIT_INTERRUPTED

    step = trainer.state.global_step
    saved = Path(trainer.args.output_dir) / f"checkpoint-{step}"
    if step == 0 or not (saved / checkpoints.MANIFEST).is_file():
        return QtuneError(f"stopped by {signal_name} before the first checkpoint", where=str(run_dir),
                          fix="start again with --overwrite", code=EXIT_INTERRUPTED)
    return QtuneError(f"stopped by {signal_name} at step {step}; {saved.name} is saved", where=str(run_dir),
                      fix="continue with the same command and --resume", code=EXIT_INTERRUPTED)


def fit(recipe: Recipe, run_dir: Path, trainer, prepared, checkpoint, use_cpu: bool, *, resume: bool, echo) -> dict:
    import torch

    main_process = trainer.is_world_process_zero()
    has_eval = prepared.val is not None
    before_path = run_dir / EVAL_BEFORE
    tokens_before = tokens_at_checkpoint(checkpoint)  # read now: rotation may delete that checkpoint during training
    stop = GracefulStop().install()
    trainer.add_callback(stop.callback())
    try:
        with env_defaults(WANDB_DIR=str(run_dir)):
            if checkpoint is not None:
                echo(f"resume: continuing from {checkpoint.name}")
            try:
                with warnings.catch_warnings():
                    # bitsandbytes' warning on the first step; qtune said it in its own words before the load
                    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
                    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            except StoppedDuringEvaluation:
                if trainer.state.global_step > 0:  # evaluation runs between steps: the state is a step boundary
                    trainer._save_checkpoint(trainer.model, trial=None)
            except pickle.UnpicklingError:
                # The Trainer reads optimizer, scheduler and RNG state with torch.load(weights_only=True): a pickle
                # that holds anything but tensors and plain containers is refused, never run.
                raise QtuneError(f"{checkpoint.name if checkpoint else 'the checkpoint'} holds pickled objects that "
                                 "are not plain tensors: refused", where=str(checkpoint),
                                 fix="resume from a checkpoint you trust, or start over with --overwrite",
                                 code=EXIT_INTEGRITY) from None
            if trainer.args.eval_on_start and main_process:
                first_eval = next((h for h in trainer.state.log_history if "eval_loss" in h), None)
                if first_eval is not None:  # kept, so a resumed run does not measure "before" again
                    write_json_atomically(before_path, {"eval_loss_before": first_eval["eval_loss"]})
            if stop.signal_name is not None:
                raise stopped(stop.signal_name, trainer, run_dir)
    finally:
        stop.restore()
        close_progress_bars(trainer)
    with env_defaults(WANDB_DIR=str(run_dir)):
        final_eval = final_evaluation(trainer) if has_eval else {}
        if "wandb" in recipe.log.report_to and main_process:
            import wandb

            if wandb.run is not None:
                wandb.finish()
            # wandb keeps the settings of its first run (WANDB_DIR included) for the life of the process: a second
            # qtune.train() in the same notebook would write into the first run's folder.
            wandb.teardown()
    eval_before = json.loads(before_path.read_text())["eval_loss_before"] if before_path.is_file() else None
    runtime = result.metrics.get("train_runtime") or float("nan")
    tokens = int(trainer.state.num_input_tokens_seen)
    session_tokens = tokens - tokens_before
    metrics = {
        "train_loss": result.training_loss,
        "eval_loss_before": eval_before,
        "eval_loss": final_eval.get("eval_loss"),
        "eval_perplexity": math.exp(final_eval["eval_loss"]) if "eval_loss" in final_eval else None,
        "global_step": trainer.state.global_step,
        "train_tokens": tokens,
        "train_seconds": runtime,
        "tokens_per_second": session_tokens / runtime if runtime and runtime > 0 else None,
        "peak_memory_bytes": peak_memory_bytes(use_cpu),
        "peak_memory_kind": "cpu_rss" if use_cpu or not torch.cuda.is_available() else "cuda_allocated",
        "rss_before_model_bytes": getattr(trainer, "qtune_rss_before_model", None),
        # The dtype the base was quantized in; export re-creates the same 4-bit weights from it.
        "compute_dtype": {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[compute_dtype_of(trainer)],
        "resumed_from": checkpoint.name if checkpoint is not None else None,
        "data": prepared.report,
    }
    metrics["world_size"] = trainer.args.world_size
    if os.environ.get("QTUNE_SAMPLE_TRACE"):
        trace = run_dir / "sample_trace" / f"final-rank-{trainer.args.process_index}.json"
        trace.write_text(json.dumps({"lora_sha256": lora_fingerprint(trainer.model)}))
    if main_process:
        save_adapter(trainer, run_dir / ADAPTER)
        write_json_atomically(run_dir / METRICS, metrics)
        plot_losses(trainer.state.log_history, run_dir / "loss.png", eval_before=eval_before)
        echo(summary(metrics, run_dir))
    return metrics


def compute_dtype_of(trainer):
    """The compute dtype the base was loaded (and so quantized) in, as its quantization config records it."""
    import torch

    config = trainer.model.get_base_model().config.quantization_config
    dtype = config.bnb_4bit_compute_dtype if not isinstance(config, dict) else config.get("bnb_4bit_compute_dtype")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype


def final_evaluation(trainer) -> dict:
    """The eval at the last step when the schedule already ran one there, else a fresh one."""
    for entry in reversed(trainer.state.log_history):
        if "eval_loss" in entry:
            if entry.get("step") == trainer.state.global_step:
                return entry
            break
    return trainer.evaluate()


def tokens_at_checkpoint(checkpoint: Path | None) -> int:
    if checkpoint is None:
        return 0
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return int(state.get("num_input_tokens_seen", 0))


def save_adapter(trainer, target: Path) -> None:
    """Adapter + tokenizer, written aside and renamed into place so a crash never leaves half of one."""
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    trainer.model.save_pretrained(staging, safe_serialization=True)
    trainer.processing_class.save_pretrained(staging)
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old)
    else:
        os.replace(staging, target)


def plot_losses(history: list[dict], path: Path, *, eval_before: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(0, eval_before)] if eval_before is not None else []
    evals += [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    figure, axis = plt.subplots(figsize=(7, 4))
    if train:
        axis.plot(*zip(*train), label="train loss")
    if evals:
        axis.plot(*zip(*evals), "o-", label="eval loss")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def summary(metrics: dict, run_dir: Path) -> str:
    def fmt(value, spec=".4f"):
        return "n/a" if value is None else format(value, spec)

    return (
        f"done: {metrics['global_step']} steps in {metrics['train_seconds']:.1f} s, "
        f"{fmt(metrics['tokens_per_second'], '.0f')} tokens/s, peak memory {metrics['peak_memory_bytes'] / 2**20:.0f} MiB\n"
        f"eval loss {fmt(metrics['eval_loss_before'])} -> {fmt(metrics['eval_loss'])} "
        f"(perplexity {fmt(metrics['eval_perplexity'], '.2f')}); train loss {fmt(metrics['train_loss'])}\n"
        f"adapter: {run_dir / ADAPTER}   metrics: {run_dir / METRICS}   curve: {run_dir / 'loss.png'}"
    )
