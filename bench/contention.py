"""A CPU training run beside other CPU-heavy processes: seconds per step alone, with one and with two neighbours,
with torch's and OpenMP's defaults ("before"), with OpenMP's passive wait ("passive": OMP_WAIT_POLICY=PASSIVE, the
cure qtune measured and did not take) and with qtune's thread policy ("after", qtune/core/cpu_threads.py).

Each neighbour is another `qtune train` of the same recipe, started first and killed once the measured run ends;
neighbours and measured run use the same policy, as two users of one machine would. The measured run's seconds per
step come from its metrics.json (train_seconds / steps, evaluation off).

    python bench/contention.py [--steps 8] [--work DIR]

Prints a table and writes bench/results/contention.json. Run it on an otherwise idle machine.
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
POLICIES = {
    "before": {"QTUNE_CPU_THREADS": "all"},
    "passive": {"QTUNE_CPU_THREADS": "all", "OMP_WAIT_POLICY": "PASSIVE"},
    "after": {},
}


def recipe(model: Path, data: Path, out: Path, steps: int) -> dict:
    return {
        "model": {"name": str(model)},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "data": {"datasets": [{"path": str(data), "format": "alpaca"}], "max_length": 256, "val_size": 0},
        "train": {
            "output_dir": str(out),
            "max_steps": steps,
            "micro_batch_size": 8,
            "grad_accum": 2,
            "lr": 1e-3,
            "gradient_checkpointing": False,
            "save_steps": 10_000,
            "logging_steps": 1,
        },
    }


def environment(policy: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "QTUNE_CPU_THREADS")}
    return {**env, "CUDA_VISIBLE_DEVICES": "", **POLICIES[policy]}


def train(work: Path, name: str, model: Path, data: Path, steps: int, policy: str, **popen) -> subprocess.Popen:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe(model, data, work / name, steps)))
    return subprocess.Popen(
        [sys.executable, "-m", "qtune", "train", str(path), "--overwrite"],
        env=environment(policy),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def measure(work: Path, model: Path, data: Path, steps: int, policy: str, neighbours: int) -> dict:
    others = [train(work, f"neighbour-{i}", model, data, 100_000, policy) for i in range(neighbours)]
    try:
        time.sleep(20 if neighbours else 0)  # the neighbours are past their start-up and training
        measured = train(work, "measured", model, data, steps, policy)
        output, _ = measured.communicate(timeout=3600)
        if measured.returncode != 0:
            raise SystemExit(f"measured run failed:\n{output[-3000:]}")
    finally:
        for process in others:
            process.kill()
            process.wait()
    metrics = json.loads((work / "measured" / "metrics.json").read_text())
    said = [line for line in output.splitlines() if line.startswith("cpu:")]
    return {
        "policy": policy,
        "neighbours": neighbours,
        "seconds_per_step": metrics["train_seconds"] / metrics["global_step"],
        "qtune_said": said[0] if said else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="qtune-contention-"))
    work.mkdir(parents=True, exist_ok=True)
    model, data = work / "tiny-llama", work / "demo.jsonl"
    if not (model / "config.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "qtune",
                "make-tiny-model",
                str(model),
                "--pretrain-steps",
                "0",
                "--demo-data",
                str(data),
            ],
            check=True,
            capture_output=True,
        )
    rows = []
    for neighbours in (0, 1, 2):
        for policy in POLICIES:
            row = measure(work, model, data, args.steps, policy, neighbours)
            rows.append(row)
            print(
                f"{policy:<7} {neighbours} neighbour(s): {row['seconds_per_step']:6.2f} s/step  {row['qtune_said'] or ''}",
                flush=True,
            )
    alone = {r["policy"]: r["seconds_per_step"] for r in rows if r["neighbours"] == 0}
    print("\ns/step (x the 'before' run alone)")
    print(f"{'neighbours':<11}" + "".join(f"{policy:>18}" for policy in POLICIES) + f"{'after/before':>14}")
    for neighbours in (0, 1, 2):
        seconds = {r["policy"]: r["seconds_per_step"] for r in rows if r["neighbours"] == neighbours}
        print(
            f"{neighbours:<11}"
            + "".join(f"{seconds[p]:>10.2f} ({seconds[p] / alone['before']:>4.1f}x)" for p in POLICIES)
            + f"{seconds['after'] / seconds['before']:>13.2f}x"
        )
    (BENCH / "results").mkdir(exist_ok=True)
    (BENCH / "results" / "contention.json").write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
