"""What a finished run leaves for the user: the adapter, metrics.json, loss.png and the closing summary."""

from __future__ import annotations

import resource
from pathlib import Path

import psutil
import torch

from qtune.core.folders import ADAPTER, LOSS_PLOT, METRICS
from qtune.core.fs import staged, write_json_atomically
from qtune.core.plots import draw_losses, saved_figure
from qtune.core.text import fmt
from qtune.training.methods.preference import ACCURACY


def current_rss_bytes() -> int:
    """This process's resident memory now."""
    return int(psutil.Process().memory_info().rss)


def peak_memory_bytes(use_cpu: bool) -> int:
    """Training's peak memory: the GPU's allocated peak, or on CPU the process's peak RSS."""
    if not use_cpu and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's own peak RSS. Not getrusage's ru_maxrss: Linux carries it over fork and exec, so a `qtune train`
    started by a big process (a notebook kernel, pytest after an in-process training) reported the parent's peak
    (tests/test_train.py). /proc's VmHWM belongs to the process alone."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # no /proc: Linux and BSD report KiB


def compute_dtype_of(trainer):
    """The compute dtype the base was loaded (and so quantized) in: its 4-bit layers' (a base saved in 4-bit keeps
    the uploader's in its config; qtune.modeling.load.load_base sets the recipe's on the layers), else the config's."""
    import bitsandbytes as bnb

    for module in trainer.model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.compute_dtype is not None:
            return module.compute_dtype
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


def save_adapter(trainer, target: Path) -> None:
    """Saves the adapter and the tokenizer at `target`, whole or not at all. Only the trained adapter: a DPO run that
    continued one also holds its frozen reference copy."""
    with staged(target) as staging:
        trainer.model.save_pretrained(staging, safe_serialization=True, selected_adapters=["default"])
        trainer.processing_class.save_pretrained(staging)


def plot_losses(history: list[dict], path: Path, *, before: dict | None = None) -> None:
    """Draws loss.png: train and eval loss by step, and the reward accuracy on a second axis when the run logged one."""
    before = before or {}

    def series(key: str, first: float | None) -> list[tuple[int, float]]:
        points = [(h["step"], h[key]) for h in history if key in h]
        if first is not None and not any(step == 0 for step, _ in points):
            points.insert(0, (0, first))
        return points

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = series("eval_loss", before.get("eval_loss_before"))
    accuracy = series(f"eval_{ACCURACY}", before.get(f"eval_{ACCURACY}_before"))
    with saved_figure(path) as axis:
        draw_losses(axis, train, evals)
        axis.legend(loc="upper left")
        if accuracy:
            right = axis.twinx()
            right.plot(*zip(*accuracy), "s--", color="tab:green", label="eval reward accuracy")
            right.set_ylim(-0.02, 1.02)
            right.set_ylabel("reward accuracy")
            right.legend(loc="upper right")


def summary(metrics: dict, run_dir: Path, method_rows: list[tuple[str, str]]) -> str:
    """The closing lines of `qtune train`: steps, time, speed and memory; the losses and the method's figures."""
    figures = "; ".join(
        [f"eval loss {fmt(metrics['eval_loss_before'])} -> {fmt(metrics['eval_loss'])}"]
        + [f"{label}: {value}" for label, value in method_rows]
        + [f"train loss {fmt(metrics['train_loss'])}"]
    )
    setup = metrics.get("setup_seconds")
    took = [
        f"set-up {setup:.1f} s (data {metrics['data_seconds']:.1f} s, model {metrics['load_seconds']:.1f} s)"
        if setup is not None
        else None,
        f"evaluation {metrics['evaluation_seconds']:.1f} s" if metrics.get("evaluation_seconds") else None,
    ]
    return (
        f"done: {metrics['global_step']} steps in {metrics['train_seconds']:.1f} s of training, "
        f"{fmt(metrics['tokens_per_second'], '.0f')} tokens/s, peak memory {metrics['peak_memory_bytes'] / 2**20:.0f} MiB"
        + "".join(f"; {part}" for part in took if part)
        + "\n"
        f"{figures}\n"
        f"adapter: {run_dir / ADAPTER}   metrics: {run_dir / METRICS}   curve: {run_dir / LOSS_PLOT}"
    )


def write_generations(trainer, data, path: Path, as_lm_samples, *, count: int = 3, max_new_tokens: int = 48) -> None:
    """Writes generations.json: a few validation prompts answered greedily by the 4-bit base (adapter off) and by the
    fine-tuned model, beside the reference answer (what the report page shows as "before and after"). The prompts go
    as one left-padded batch per model, two generate calls in all; `as_lm_samples` turns the split into prompt +
    answer rows."""
    from qtune.modeling.generation import generate_batch

    source = data.val if data.val is not None else data.train
    if hasattr(source, "select"):
        source = source.select(range(min(count, len(source))))
    else:  # a stream (data.streaming): its first samples
        from datasets import Dataset

        source = Dataset.from_list(list(source.take(count)))
    split = as_lm_samples(source)
    model, tokenizer = trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class
    model.eval()  # no dropout: greedy answers that the same run always gives
    prompts, references = [], []
    for row in split.select(range(min(count, len(split)))):
        ids, labels = row["input_ids"], row["labels"]
        first = next((i for i, label in enumerate(labels) if label != -100), len(ids))
        if first == 0:  # text rows are supervised throughout: their first half is the prompt
            first = len(ids) // 2
        prompts.append(ids[:first])
        references.append(tokenizer.decode([t for t in labels[first:] if t != -100], skip_special_tokens=True).strip())
    tuned = generate_batch(model, tokenizer, prompts, max_new_tokens=max_new_tokens) if prompts else []
    with model.disable_adapter():
        base = generate_batch(model, tokenizer, prompts, max_new_tokens=max_new_tokens) if prompts else []
    samples = [
        {
            "prompt": tokenizer.decode(prompt, skip_special_tokens=True),
            "base": b.text,
            "fine_tuned": t.text,
            "reference": r,
        }
        for prompt, b, t, r in zip(prompts, base, tuned, references)
    ]
    write_json_atomically(path, {"max_new_tokens": max_new_tokens, "greedy": True, "samples": samples})
