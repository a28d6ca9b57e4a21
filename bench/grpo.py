"""The offline demo's GRPO stage (recipes/demo-grpo.yaml, continuing runs/demo's SFT adapter with an exact-answer
reward): greedy exact answers per task on 200 freshly drawn rows (seed 1, not the training prompts' seed 3), the SFT
adapter against the GRPO one, with each share's standard error and the difference in standard errors of the
difference; and the run's mean reward curve.

  python bench/grpo.py [--out bench/results/grpo.json]      (run from the repository root, after the README's demo)

It runs `qtune make-tiny-model ... --grpo-data` and `qtune train recipes/demo-grpo.yaml --overwrite` itself when
runs/demo-grpo.jsonl is missing; runs/demo must exist (the README's first command).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from demo_figures import exact_match, qtune  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(BENCH / "results" / "grpo.json"))
    args = parser.parse_args()
    from qtune.core.environment import environment
    from qtune.demo.tiny_models import demo_rows

    if not (REPO / "runs/demo/adapter").is_dir():
        raise SystemExit("bench/grpo.py: run the README's demo first (runs/demo)")
    if not (REPO / "runs/demo-grpo.jsonl").is_file():
        qtune("make-tiny-model", "runs/tiny-llama", "--grpo-data", "runs/demo-grpo.jsonl", cwd=REPO)
    started = time.perf_counter()
    qtune("train", "recipes/demo-grpo.yaml", "--overwrite", cwd=REPO)
    seconds = time.perf_counter() - started
    rows = demo_rows(200, seed=1)
    before = exact_match(REPO / "runs/demo", rows, REPO)
    after = exact_match(REPO / "runs/demo-grpo", rows, REPO)
    metrics = json.loads((REPO / "runs/demo-grpo/metrics.json").read_text())
    table = {}
    print("| task | n | SFT adapter | after GRPO | difference / its SE |\n| --- | --- | --- | --- | --- |")
    for task, share in before["per_task"].items():
        n, new = before["counts"][task], after["per_task"][task]
        se = math.sqrt(share * (1 - share) / n + new * (1 - new) / n)
        z = (new - share) / se if se else float("inf") if new != share else 0.0
        table[task] = {"n": n, "sft": share, "grpo": new, "z": z}
        print(f"| {task} | {n} | {share:.3f} | {new:.3f} | {z:+.1f} |")
    curve = metrics["reward_curve"]
    print(
        f"\nmean reward, first -> last logged step: {metrics['train_reward_first']:.3f} -> {metrics['train_reward']:.3f}; "
        f"groups all equal {metrics['train_groups_all_equal_first']:.2f} -> {metrics['train_groups_all_equal']:.2f}; "
        f"`qtune train recipes/demo-grpo.yaml` {seconds:.0f} s"
    )
    results = {
        "machine": platform.processor() or platform.machine(),
        "environment": environment(),
        "train_seconds": seconds,
        "per_task": table,
        "reward_curve": curve,
        "metrics": {k: v for k, v in metrics.items() if k.startswith(("train_", "eval_"))},
        "examples_after": after["examples"],
    }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
