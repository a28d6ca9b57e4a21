"""GRPO's prompts at scale: qtune.data.prompts.build on N GSM8K-shaped rows (a question of ~45 words, an answer with
its reasoning and `#### <number>`), chat-rendered with data.system_prompt, in a fresh process each: seconds and the
process's peak RSS for the first start (read, tokenized by worker processes, written to the cache), the second start
(read from the cache) and a stream (data.streaming: the validation head only).

  python bench/prompts_scale.py [--rows 100000 1000000] [--work DIR] [--out bench/results/prompts_scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
WORDS = "apple river stone cloud seven forty pens sold each costs more than twice half total left".split()


def write_rows(path: Path, count: int) -> None:
    """GSM8K-shaped rows: a question and an answer ending in `#### <number>`."""
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(count):
            question = " ".join(rng.choice(WORDS) for _ in range(45)) + f" {i}?"
            answer = " ".join(rng.choice(WORDS) for _ in range(30)) + f"\n#### {rng.randint(1, 1000)}"
            f.write(json.dumps({"question": question, "answer": answer}) + "\n")


def child(data: str, model: str, streaming: bool) -> None:
    """One build in this process; prints seconds, peak RSS and the counts as JSON."""
    import resource

    from transformers import AutoTokenizer

    from qtune.config.recipe import validate_recipe
    from qtune.data.prompts import build

    raw = {
        "model": {"name": model},
        "data": {
            "datasets": [{"path": data, "format": "prompt_answer", "columns": {"prompt": "question"}}],
            "max_length": 512,
            "val_size": 200,
            "chat_template": "chatml",
            "system_prompt": "Solve the problem step by step. End with '#### <number>'.",
            "streaming": streaming,
        },
        "train": {"output_dir": "/tmp/unused", "method": "grpo", "micro_batch_size": 8, "max_steps": 10},
        "grpo": {"rewards": [{"function": "exact_match", "pattern": r"####\s*(.+)"}]},
    }
    recipe = validate_recipe(raw)
    tokenizer = AutoTokenizer.from_pretrained(model)
    started = time.perf_counter()
    prepared = build(recipe.data, tokenizer, seed=42)
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train = None if streaming else len(prepared.train)
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak_kib * 1024, "train": train}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/qtune-prompts-scale"))
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "prompts_scale.json")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.child[2] == "stream")
    from qtune.core.environment import environment
    from qtune.demo.tiny_models import write_tiny_model

    args.work.mkdir(parents=True, exist_ok=True)
    model = args.work / "tiny-llama"
    if not (model / "config.json").exists():
        write_tiny_model(model, "llama")
    env = {**os.environ, "QTUNE_DATA_CACHE": str(args.work / "cache")}
    results = []
    print("| rows | run | seconds | peak RSS MiB |\n| --- | --- | --- | --- |")
    for count in args.rows:
        data = args.work / f"gsm-{count}.jsonl"
        if not data.exists():
            write_rows(data, count)
        for run in ("first start", "second start (cache)", "stream"):
            mode = "stream" if run == "stream" else "table"
            command = [sys.executable, __file__, "--child", str(data), str(model), mode]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(done.stderr[-2000:])
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            results.append({"rows": count, "run": run, **measured})
            print(f"| {count:,} | {run} | {measured['seconds']:.1f} | {measured['peak_rss_bytes'] / 2**20:,.0f} |")
    out = {"machine": platform.processor() or platform.machine(), "environment": environment(), "results": results}
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
