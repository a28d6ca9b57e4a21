"""qtune train against the plain Hugging Face QLoRA recipe (bench/hf_baseline.py), side by side.

Same model, data, LoRA shape, sequence cap, global batch (in samples), optimizer steps and schedule; each
run in a fresh process, alternating A (qtune) and B (baseline): one warm-up pair, then --pairs measured
pairs. Nothing is downloaded: the model is a Llama-shaped ~125M-parameter model with random weights and a
32k vocabulary, the data alpaca-like (short prompts, answers from a few words to past max_length).

    python bench/throughput.py [--pairs 3] [--steps 5] [--work DIR]

Per run: non-padding and supervised tokens/s over the optimizer steps only, peak memory (RSS on CPU,
torch.cuda.max_memory_allocated on a GPU), final eval loss on a fixed validation set, FLOPs per
non-padding token and the fraction of this machine's measured matmul rate that reaches. Prints medians
and B/A ratios; writes bench/results/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SHAPE = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
)
GPU_SHAPE = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
)  # Llama-2-7B
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}


# --------------------------------------------------------------------------- inputs, built once


def build_model(folder: Path, shape: dict) -> None:
    sys.path.insert(0, str(BENCH))
    from merge_memory import save_random_llama

    save_random_llama(folder, {**shape, "max_position_embeddings": 4096}, unit_norms=True)


def alpaca_like_rows(count: int, seed: int) -> list[dict]:
    """Short instructions; answers log-normally long: median ~35 words, a tail past 1,000 tokens."""
    from qtune.demo.tiny_models import WORDS

    rng = random.Random(seed)

    def words(n):
        return " ".join(rng.choice(WORDS) for _ in range(max(1, n)))

    rows = []
    for _ in range(count):
        answer = min(int(rng.lognormvariate(3.6, 1.0)), 1500)
        rows.append(
            {
                "instruction": words(rng.randrange(4, 20)),
                "input": words(rng.randrange(0, 30)) if rng.random() < 0.4 else "",
                "output": words(answer),
            }
        )
    return rows


def write_inputs(work: Path, max_length: int, shape: dict) -> dict:
    """Model, raw data for qtune, the same data tokenized by qtune's data stage for the baseline."""
    base = work / "base"
    if not (base / "config.json").exists():
        build_model(base, shape)
    for name, count, seed in (("train", 2000, 0), ("val", 32, 1)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca_like_rows(count, seed)))

    from transformers import AutoTokenizer

    from qtune.config.recipe import validate_recipe
    from qtune.data.sft import SFT_DATA

    recipe = validate_recipe(qtune_recipe(work, max_length, 4, 2, 5, work / "unused"))
    tokenizer = AutoTokenizer.from_pretrained(base)
    from qtune.modeling.load import choose_pad_token

    tokenizer.pad_token = choose_pad_token(tokenizer)
    prepared = SFT_DATA.build(recipe.data, tokenizer, seed=recipe.train.seed)
    stats = {}
    for name, split in (("train", prepared.train), ("val", prepared.val)):
        from datasets import Dataset

        masks = [[int(label != -100) for label in labels] for labels in split["labels"]]
        Dataset.from_dict({"input_ids": split["input_ids"], "completion_mask": masks}).save_to_disk(
            str(work / f"{name}-tokenized")
        )
        lengths = [len(ids) for ids in split["input_ids"]]
        supervised = sum(sum(m[1:]) for m in masks)
        stats[name] = {
            "samples": len(lengths),
            "tokens": sum(lengths),
            "supervised_tokens": supervised,
            "mean_length": sum(lengths) / len(lengths),
            "max_length": max(lengths),
            "mean_context": sum(n * (n + 1) / 2 for n in lengths) / sum(lengths),
        }
    return stats


def qtune_recipe(work: Path, max_length: int, micro_batch: int, grad_accum: int, steps: int, output_dir: Path) -> dict:
    return {
        "model": {"name": str(work / "base")},
        "lora": dict(LORA),
        "data": {
            "datasets": [{"path": str(work / "train.jsonl"), "format": "alpaca"}],
            "val_datasets": [{"path": str(work / "val.jsonl"), "format": "alpaca"}],
            "val_size": 0,
            "max_length": max_length,
        },
        "train": {
            "output_dir": str(output_dir),
            "max_steps": steps,
            "micro_batch_size": micro_batch,
            "grad_accum": grad_accum,
            "lr": 1e-3,
            "warmup_ratio": 0.1,
            "save_steps": 10_000,
            "logging_steps": 1,
        },
    }


# --------------------------------------------------------------------------- side A, in its own process


def run_qtune_side(settings: dict) -> None:
    import resource

    import torch

    sys.path.insert(0, str(BENCH))
    from hf_baseline import StepTimer

    from qtune.config.recipe import validate_recipe
    from qtune.core.folders import claimed_run
    from qtune.training.run import fit, prepare

    recipe = validate_recipe(settings["recipe"])
    with claimed_run(recipe.train.output_dir, resume=False, overwrite=True) as claim:
        prepared = prepare(recipe, claim.folder, resume=False)
        trainer = prepared.trainer
        timer = StepTimer()
        trainer.add_callback(timer)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        metrics = fit(recipe, claim.folder, prepared)
    print(
        json.dumps(
            {
                "step_seconds": timer.seconds,
                "non_padding_tokens": int(trainer.state.num_input_tokens_seen),
                "eval_loss": metrics["eval_loss"],
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
                "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
            }
        )
    )


# --------------------------------------------------------------------------- measuring


def matmul_rate(seconds: float = 3.0) -> float:
    """FLOP/s of a square fp32 (CPU) / bf16 (GPU) matmul on this machine, now."""
    import torch

    on_gpu = torch.cuda.is_available()
    n = 4096 if on_gpu else 2048
    a = torch.randn(n, n, device="cuda" if on_gpu else "cpu", dtype=torch.bfloat16 if on_gpu else torch.float32)
    b = torch.randn_like(a)
    a @ b
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
        if on_gpu:
            torch.cuda.synchronize()
    return 2 * n**3 * count / (time.perf_counter() - started)


def flops_per_token(shape: dict, mean_context: float, recompute: bool) -> float:
    """4N per token for the frozen base (forward + input-gradient backward), +2N when activations are recomputed,
    plus attention (scores and weighted sum: 4 * layers * hidden * context forward, x3 with the backward)."""
    h, i, layers, vocab = (
        shape["hidden_size"],
        shape["intermediate_size"],
        shape["num_hidden_layers"],
        shape["vocab_size"],
    )
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * i) + vocab * h
    attention = 4 * layers * h * mean_context
    return (4 + (2 if recompute else 0)) * linear + 3 * attention + (attention if recompute else 0)


def run_side(side: str, settings_file: Path) -> dict:
    command = [sys.executable, str(BENCH / ("hf_baseline.py" if side == "B" else "throughput.py"))]
    command += [str(settings_file)] if side == "B" else ["--side-a", str(settings_file)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"side {side} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["seconds_total_steps"] = sum(result["step_seconds"])
    result["non_padding_tokens_per_second"] = result["non_padding_tokens"] / result["seconds_total_steps"]
    result["peak_bytes"] = result["peak_cuda_bytes"] or result["peak_rss_bytes"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--llama-7b", action="store_true", help="the Llama-2-7B shape (for a GPU)")
    parser.add_argument("--side-a", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side_a:
        run_qtune_side(json.loads(args.side_a.read_text()))
        return

    shape = GPU_SHAPE if args.llama_7b else SHAPE
    work = args.work or Path(tempfile.mkdtemp(prefix="qtune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    stats = write_inputs(work, args.max_length, shape)
    print(
        f"data: {stats['train']['samples']} training samples, mean {stats['train']['mean_length']:.0f} tokens, "
        f"longest {stats['train']['max_length']}; {stats['val']['samples']} validation samples",
        flush=True,
    )
    rate = matmul_rate()
    print(f"matmul rate: {rate / 1e9:.0f} GFLOP/s", flush=True)

    def settings_for(side: str, steps: int) -> Path:
        out = work / f"run-{side}"
        if side == "A":
            payload = {"recipe": qtune_recipe(work, args.max_length, args.micro_batch, args.grad_accum, steps, out)}
        else:
            payload = {
                "model": str(work / "base"),
                "lora": LORA,
                "output_dir": str(out),
                "micro_batch_size": args.micro_batch,
                "grad_accum": args.grad_accum,
                "steps": steps,
                "lr": 1e-3,
                "warmup_ratio": 0.1,
                "max_length": args.max_length,
                "seed": 42,
                "train_tokenized": str(work / "train-tokenized"),
                "val_tokenized": str(work / "val-tokenized"),
            }
        path = work / f"settings-{side}.json"
        path.write_text(json.dumps(payload))
        return path

    runs = {"A": [], "B": []}
    order = ["A", "B"] * (args.pairs + 1)
    for n, side in enumerate(order):
        warm_up = n < 2
        result = run_side(side, settings_for(side, 2 if warm_up else args.steps))
        label = "qtune   " if side == "A" else "baseline"
        print(
            f"{'warm-up ' if warm_up else ''}{label} {result['non_padding_tokens_per_second']:7.0f} non-padding tok/s, "
            f"peak {result['peak_bytes'] / 2**20:6.0f} MiB, eval loss {result['eval_loss']:.4f}, "
            f"checkpointing {result['gradient_checkpointing']}",
            flush=True,
        )
        if not warm_up:
            runs[side].append(result)

    supervised_fraction = stats["train"]["supervised_tokens"] / stats["train"]["tokens"]
    summary = {}
    for side, results in runs.items():
        tokens_per_second = statistics.median(r["non_padding_tokens_per_second"] for r in results)
        flops = flops_per_token(shape, stats["train"]["mean_context"], results[0]["gradient_checkpointing"])
        summary[side] = {
            "non_padding_tokens_per_second": tokens_per_second,
            "supervised_tokens_per_second": tokens_per_second * supervised_fraction,
            "peak_bytes": statistics.median(r["peak_bytes"] for r in results),
            "eval_loss": statistics.median(r["eval_loss"] for r in results),
            "flops_per_non_padding_token": flops,
            "fraction_of_matmul_rate": flops * tokens_per_second / rate,
            "gradient_checkpointing": results[0]["gradient_checkpointing"],
        }
    ratios = {
        "speed_A_over_B": summary["A"]["non_padding_tokens_per_second"] / summary["B"]["non_padding_tokens_per_second"],
        "memory_A_over_B": summary["A"]["peak_bytes"] / summary["B"]["peak_bytes"],
        "eval_loss_A_over_B": summary["A"]["eval_loss"] / summary["B"]["eval_loss"],
    }
    print(
        f"\n{'':<10} {'tok/s':>8} {'sup tok/s':>10} {'peak MiB':>9} {'eval loss':>10} {'GFLOP/tok':>10} {'of matmul':>10}"
    )
    for side, label in (("A", "qtune"), ("B", "baseline")):
        s = summary[side]
        print(
            f"{label:<10} {s['non_padding_tokens_per_second']:8.0f} {s['supervised_tokens_per_second']:10.0f} "
            f"{s['peak_bytes'] / 2**20:9.0f} {s['eval_loss']:10.4f} {s['flops_per_non_padding_token'] / 1e9:10.2f} "
            f"{s['fraction_of_matmul_rate']:10.1%}"
        )
    print(
        f"qtune / baseline: speed {ratios['speed_A_over_B']:.2f}x, peak memory {ratios['memory_A_over_B']:.2f}x, "
        f"eval loss {ratios['eval_loss_A_over_B']:.4f}x"
    )
    results_dir = BENCH / "results"
    results_dir.mkdir(exist_ok=True)
    import torch

    machine = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
    (results_dir / ("throughput-gpu.json" if torch.cuda.is_available() else "throughput.json")).write_text(
        json.dumps(
            {
                "machine": machine,
                "matmul_flops_per_second": rate,
                "shape": shape,
                "data": stats,
                "args": {k: str(v) for k, v in vars(args).items()},
                "summary": summary,
                "ratios": ratios,
                "runs": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
