"""What qtune adds to the Trainer's loop, as Trainer callbacks: the progress bar, stopping cleanly on SIGTERM or
Ctrl-C, pushing each checkpoint to the Hub, and following the free CPU cores."""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from qtune.core.cpu_threads import FreeCoreThreads
from qtune.core.errors import EXIT_DIVERGED, QtuneError
from qtune.core.log import get_logger
from qtune.publish import hub

log = get_logger(__name__)


class StepClock(TrainerCallback):
    """The wall time of the optimizer steps alone (no set-up, evaluation or checkpoint saving), and when the first
    one began: what tokens/s and the closing line's split between set-up and training are counted from."""

    def __init__(self):
        self.step_seconds = 0.0
        self.first_step_at: float | None = None  # time.perf_counter() when this session's first step began
        self.started: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        """Starts the step's clock (and notes the session's first step)."""
        self.started = time.perf_counter()
        if self.first_step_at is None:
            self.first_step_at = self.started

    def on_step_end(self, args, state, control, **kwargs):
        """Adds the step's wall time, its GPU work finished."""
        if self.started is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels are queued, not done, when the Trainer returns
        self.step_seconds += time.perf_counter() - self.started
        self.started = None


# GRPO: groups whose completions all got the same reward teach nothing; this share, this many logged steps in a row,
# is the silent failure worth a warning (a reward that never fires, a temperature too low, groups too small)
ALL_EQUAL_WARNING_SHARE = 0.9
ALL_EQUAL_WARNING_LOGS = 5


class AllEqualGroupsWarning(TrainerCallback):
    """Warns once when most of GRPO's groups keep getting all-equal rewards (trl's frac_reward_zero_std)."""

    def __init__(self):
        self.in_a_row = 0
        self.warned = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Counts the logged steps in a row whose share of all-equal groups is at least the warning share."""
        share = (logs or {}).get("frac_reward_zero_std")
        if share is None or self.warned or not state.is_world_process_zero:
            return
        self.in_a_row = self.in_a_row + 1 if share >= ALL_EQUAL_WARNING_SHARE else 0
        if self.in_a_row >= ALL_EQUAL_WARNING_LOGS:
            self.warned = True
            log.warning(
                f"grpo: {100 * share:.0f}% of the groups got all-equal rewards for {self.in_a_row} logged steps in a "
                f"row (step {state.global_step}): they teach nothing. Check that the rewards can fire on this model's "
                "answers (qtune generate), raise grpo.temperature or grpo.num_generations"
            )


class LossProgress(ProgressCallback):
    """The stock tqdm bar (steps, ETA) with loss, lr and tokens/s on it instead of printed dicts."""

    def __init__(self):
        super().__init__()
        self.last = None  # (time, num_tokens) at the previous log

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        """No bar per evaluation: its result is one line."""
        pass  # a second bar per evaluation is noise; the eval result is printed as one line

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Shows loss, lr, tokens/s (and reward accuracy) on the bar; an evaluation as one line."""
        if not state.is_world_process_zero or not logs:
            return
        bar = self.training_bar
        if "eval_loss" in logs:
            if "eval_rewards/accuracies" in logs:  # preference tuning: its loss is no language-model loss
                line = (
                    f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}, reward accuracy "
                    f"{logs['eval_rewards/accuracies']:.2f}, margin {logs['eval_rewards/margins']:.4f}"
                )
            elif "eval_reward" in logs:  # GRPO: the validation prompts' completions, scored by the rewards
                line = (
                    f"step {state.global_step}: eval reward {logs['eval_reward']:.4f} (std "
                    f"{logs.get('eval_reward_std', float('nan')):.4f}), loss {logs['eval_loss']:.4f}"
                )
            elif "eval_rewards/chosen" in logs:  # KTO: good and bad answers' rewards, and the KL estimate
                line = (
                    f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}, reward good "
                    f"{logs['eval_rewards/chosen']:.4f}, bad {logs.get('eval_rewards/rejected', float('nan')):.4f}, "
                    f"KL {logs.get('eval_kl', float('nan')):.4f}"
                )
            else:
                line = f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f} (perplexity {math.exp(min(logs['eval_loss'], 50)):.2f})"
            log.info(line)
            return
        if "train_runtime" in logs:
            return  # the Trainer's closing summary: the rate over the whole run is qtune's last line
        postfix = {}
        if "loss" in logs:
            postfix["loss"] = f"{logs['loss']:.4f}"
        if "rewards/accuracies" in logs:
            postfix["acc"] = f"{logs['rewards/accuracies']:.2f}"
            postfix["margin"] = f"{logs['rewards/margins']:.3f}"
        elif "reward" in logs:  # GRPO
            postfix["reward"] = f"{logs['reward']:.3f}"
            postfix["all-equal"] = f"{logs.get('frac_reward_zero_std', float('nan')):.2f}"
        elif "rewards/margins" in logs:  # KTO
            postfix["margin"] = f"{logs['rewards/margins']:.3f}"
        if "learning_rate" in logs:
            postfix["lr"] = f"{logs['learning_rate']:.2e}"
        if "num_input_tokens_seen" in logs:
            now = (time.perf_counter(), logs["num_input_tokens_seen"])
            if self.last is not None and now[0] > self.last[0] and now[1] > self.last[1]:
                postfix["tok/s"] = f"{(now[1] - self.last[1]) / (now[0] - self.last[0]):.0f}"
            self.last = now
        if bar is not None and postfix:
            bar.set_postfix(postfix, refresh=False)


def close_progress_bars(trainer) -> None:
    """Closes the Trainer's progress bar: after an exception it never does, and the error line would land on it."""
    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "training_bar", None)
        if bar is not None:
            bar.close()
            callback.training_bar = None


class StoppedDuringEvaluation(Exception):
    """A stop signal arrived while the Trainer evaluated: the evaluation is cut short."""


class GracefulStop(TrainerCallback):
    """SIGTERM (preemption) or Ctrl-C: finish the step, save a checkpoint, exit 75. A second signal exits at once."""

    def __init__(self):
        self.signal_name = None
        self.previous = {}

    def install(self) -> GracefulStop:
        """Handles SIGTERM and SIGINT from now on (the main thread only); returns self."""
        if threading.current_thread() is not threading.main_thread():
            return self  # signals only reach the main thread (a notebook's worker thread has none)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Puts the previous signal handlers back."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        if self.signal_name is not None:
            os._exit(128 + signum)  # asked twice: the user means now
        self.signal_name = signal.Signals(signum).name
        print(
            f"\nqtune: {self.signal_name}: saving a checkpoint at the end of this step, then stopping "
            f"(again to quit now)",
            file=sys.stderr,
            flush=True,
        )

    def on_step_end(self, args, state, control, **kwargs):
        """After a signal: save a checkpoint at this step and stop."""
        if self.agreed(args):
            control.should_save, control.should_training_stop = True, True
            control.should_evaluate = False

    def on_prediction_step(self, args, state, control, **kwargs):
        """After a signal: cut an evaluation short."""
        if self.signal_name is not None:
            raise StoppedDuringEvaluation()

    def agreed(self, args) -> bool:
        """Under DDP every rank must stop at the same step, or the others wait forever for the stopped one."""
        if args.world_size <= 1:
            return self.signal_name is not None
        flag = torch.tensor([1 if self.signal_name else 0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signal_name is None:
            self.signal_name = "SIGTERM"
        return bool(flag.item())


class CheckpointPusher(TrainerCallback):
    """Each checkpoint to the Hub as soon as it is saved, so a killed Colab run resumes elsewhere."""

    def __init__(self, repo_id: str, private: bool, run_dir: Path):
        self.repo_id, self.private, self.run_dir = repo_id, private, run_dir

    def on_save(self, args, state, control, **kwargs):
        """Pushes the checkpoint just saved (main process)."""
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            hub.push_checkpoint(self.repo_id, checkpoint, self.run_dir, private=self.private)


class FollowFreeCores(TrainerCallback):
    """Re-sizes the CPU thread pool when a neighbour process starts or stops (qtune.core.cpu_threads says why)."""

    def __init__(self, threads: FreeCoreThreads):
        self.threads = threads

    def on_step_end(self, args, state, control, **kwargs):
        """Re-checks the free cores (at most every few seconds)."""
        self.threads.recheck()


class NonFiniteGuard(TrainerCallback):
    """Stops a run whose loss is NaN or infinite `limit` optimizer steps in a row, before it saves a checkpoint of
    weights that may already be NaN (no checkpoint is saved at a step with a non-finite loss), and counts the steps
    fp16's gradient scaler skipped (an overflow: the update is dropped and the scale halved, which is normal in the
    first steps and a problem when it never stops)."""

    def __init__(self, trainer, limit: int):
        self.trainer, self.limit = trainer, limit
        self.streak_start, self.streak = None, 0
        self.skipped_steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        """Counts skipped and non-finite steps; stops the run after too many in a row."""
        if getattr(self.trainer.accelerator, "optimizer_step_was_skipped", False):
            self.skipped_steps += 1
        bad = self.trainer.nonfinite_micro_batches
        self.trainer.nonfinite_micro_batches = None
        if bad is not None and args.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        if bad is None or not bad.item():
            self.streak_start, self.streak = None, 0
            return
        control.should_save = False
        self.streak += 1
        self.streak_start = self.streak_start or state.global_step
        if self.streak >= self.limit:
            raise QtuneError(
                f"the loss was NaN or infinite for {self.streak} steps in a row (steps {self.streak_start}-"
                f"{state.global_step}); no checkpoint was saved after step {self.streak_start - 1}",
                where=args.output_dir,
                fix="resume the last checkpoint with a lower train.lr, or quant.compute_dtype bf16 or fp32 if fp16 "
                "overflows for this model (qtune train --resume --force)",
                code=EXIT_DIVERGED,
            )
