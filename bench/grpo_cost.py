"""What a GRPO step costs beside an SFT step on the same model: the demo's model (runs/tiny-llama), `recipes/demo.yaml`
(SFT, 8 packed rows of 256 tokens a step) against `recipes/demo-grpo.yaml` (GRPO, 4 prompts x 8 completions of up
to 24 tokens a step, from a fresh adapter), each trained STEPS steps in its own `qtune train` process, one after the
other: seconds per step, generation's share of a GRPO step, peak memory (the process's own peak RSS, glibc's default
allocator as a user runs it) and what `qtune plan --cpu` predicted for each.

  python bench/grpo_cost.py [--steps 20] [--out bench/results/grpo_cost.json]   (from the repository root)

It builds runs/tiny-llama and the demo's data with `qtune make-tiny-model` when they are missing.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def train(recipe: str, overrides: list[str]) -> dict:
    """One `qtune train` in a fresh process: its metrics.json, and the plan's prediction for the same recipe."""
    from qtune.config.recipe import load_recipe
    from qtune.planning.plan import plan_training

    args = [x for o in overrides for x in ("--set", o)]
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "qtune", "train", recipe, "--overwrite", *args], cwd=REPO, capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"qtune train {recipe} failed:\n{done.stderr[-2000:]}")
    parsed = load_recipe(REPO / recipe, overrides)
    metrics = json.loads((Path(parsed.train.output_dir) / "metrics.json").read_text())
    plan = plan_training(parsed, device="cpu", compute_bytes=4)
    steps = metrics["global_step"]
    return {
        "wall_seconds": time.perf_counter() - started,
        "steps": steps,
        "seconds_per_step": metrics["train_seconds"] / steps,
        "tokens_per_second": metrics.get("tokens_per_second"),
        "peak_bytes": metrics["peak_memory_bytes"],
        "planned_bytes": plan["total_bytes"],
        "plan_error": plan["total_bytes"] / metrics["peak_memory_bytes"] - 1,
        "plan_parts": plan["parts"],
        "generation_seconds_per_step": metrics.get("generation_seconds"),
        "generation_tokens_per_second": metrics.get("generation_tokens_per_second"),
        "completion_length": metrics.get("train_completion_length"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(BENCH / "results" / "grpo_cost.json"))
    args = parser.parse_args()
    from qtune.core.environment import environment

    needed = {"runs/tiny-llama/config.json": "runs/tiny-llama", "runs/demo-data.jsonl": None}
    if not all((REPO / path).exists() for path in needed) or not (REPO / "runs/demo-grpo.jsonl").is_file():
        subprocess.run(
            [sys.executable, "-m", "qtune", "make-tiny-model", "runs/tiny-llama", "--demo-data", "runs/demo-data.jsonl",
             "--grpo-data", "runs/demo-grpo.jsonl"],
            cwd=REPO, check=True,
        )  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="qtune-grpo-cost-"))
    steps = [f"train.max_steps={args.steps}", f"train.eval_steps={args.steps}", f"train.save_steps={args.steps}"]
    runs = {
        "sft": train("recipes/demo.yaml", [f"train.output_dir={work / 'sft'}", *steps]),
        "grpo": train("recipes/demo-grpo.yaml", [f"train.output_dir={work / 'grpo'}", "model.adapter=null", *steps]),
    }
    sft, grpo = runs["sft"], runs["grpo"]
    print("| recipe | s / step | peak MiB | plan MiB | plan error |\n| --- | --- | --- | --- | --- |")
    for name, run in runs.items():
        print(
            f"| {name} | {run['seconds_per_step']:.3f} | {run['peak_bytes'] / 2**20:,.0f} | "
            f"{run['planned_bytes'] / 2**20:,.0f} | {run['plan_error']:+.1%} |"
        )
    share = grpo["generation_seconds_per_step"] / grpo["seconds_per_step"]
    ratios = {
        "step_time": grpo["seconds_per_step"] / sft["seconds_per_step"],
        "peak_memory": grpo["peak_bytes"] / sft["peak_bytes"],
        "generation_share_of_a_grpo_step": share,
    }
    print(
        f"\nGRPO / SFT: {ratios['step_time']:.2f}x the step time, {ratios['peak_memory']:.2f}x the peak memory; "
        f"generation is {share:.0%} of a GRPO step ({grpo['generation_tokens_per_second']:.0f} completion tokens/s, "
        f"mean completion {grpo['completion_length']:.1f} tokens)"
    )
    results = {
        "machine": platform.processor() or platform.machine(),
        "environment": environment(),
        "steps": args.steps,
        "runs": runs,
        "ratios": ratios,
    }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
