"""Preference tuning side by side with SFT on the same model, prompts and answers: step time, tokens/s and peak
memory of SFT (prompt + chosen answer), DPO (qtune: one pair at a time), DPO with trl's batched step, and ORPO; then
the offline demo's two stages (recipes/demo.yaml, then recipes/demo-dpo.yaml) and their exact answers.

    python bench/preference.py [--work DIR] [--steps 30]

Runs in a scratch folder (runs/ is not touched), one training at a time. Prints Markdown rows and writes
bench/results/preference.json. Run it on an idle machine whenever the code preference tuning goes through changes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from demo_figures import exact_match, qtune, run  # noqa: E402


def batched_dpo(recipe: str) -> int:
    """`qtune train` with trl's own DPO step (the whole micro-batch in one forward and backward), for comparison."""
    from qtune.cli import main
    from qtune.training.methods.base_trainer import QtuneTrainerMixin
    from qtune.training.methods.preference_trainer import QtunePreferenceTrainer

    QtunePreferenceTrainer.micro_batch_step = QtuneTrainerMixin.micro_batch_step
    return main(["train", recipe, "--overwrite"])


def recipe(work: Path, name: str, method: str, data: Path, fmt: str, steps: int) -> Path:
    raw = {
        "model": {"name": str(work / "runs" / "tiny-llama")},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"datasets": [{"path": str(data), "format": fmt}], "max_length": 256, "val_size": 0},
        "train": {
            "method": method,
            "output_dir": str(work / name),
            "max_steps": steps,
            "micro_batch_size": 8,
            "grad_accum": 1,
            "lr": 5e-4,
            "gradient_checkpointing": False,
            "save_steps": steps,
            "logging_steps": steps,
        },
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="qtune-preference-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}", flush=True)

    from qtune.demo.tiny_models import demo_rows, preference_rows

    qtune(
        "make-tiny-model",
        "runs/tiny-llama",
        "--demo-data",
        "runs/demo-data.jsonl",
        "--preference-data",
        "runs/demo-preference.jsonl",
        cwd=work,
    )
    pairs = preference_rows(400, seed=5)
    (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (work / "sft.jsonl").write_text(
        "".join(json.dumps({"prompt": p["prompt"], "completion": p["chosen"]}) + "\n" for p in pairs)
    )
    figures: dict = {"steps": args.steps, "micro_batch_size": 8, "side_by_side": {}}
    runs = {
        "sft (prompt + chosen)": ("sft", work / "sft.jsonl", "prompt_completion"),
        "dpo (qtune: pair by pair)": ("dpo", work / "pairs.jsonl", "preference"),
        "dpo (trl's batched step)": ("dpo", work / "pairs.jsonl", "preference"),
        "orpo": ("orpo", work / "pairs.jsonl", "preference"),
    }
    for n, (label, (method, data, fmt)) in enumerate(runs.items()):
        path = recipe(work, f"run{n}", method, data, fmt, args.steps)
        if "batched" in label:
            seconds, _ = run([sys.executable, __file__, "--batched", path], cwd=work)
        else:
            seconds, _ = qtune("train", path, "--overwrite", cwd=work)
        metrics = json.loads((work / f"run{n}" / "metrics.json").read_text())
        figures["side_by_side"][label] = {
            "seconds_per_step": metrics["train_seconds"] / metrics["global_step"],
            "tokens_per_second": metrics["tokens_per_second"],
            "peak_memory_mib": metrics["peak_memory_bytes"] / 2**20,
            "train_loss": metrics["train_loss"],
        }
        print(label, figures["side_by_side"][label], flush=True)

    # the demo's two stages, as the README runs them
    for stage in ("demo.yaml", "demo-dpo.yaml"):
        raw = yaml.safe_load((BENCH.parent / "recipes" / stage).read_text())
        (work / stage).write_text(yaml.safe_dump(raw, sort_keys=False))
        seconds, _ = qtune("train", stage, "--overwrite", cwd=work)
        figures[f"{stage} seconds"] = seconds
    # the same second stage with DPO's loss alone, without the recipe's language-model term on the chosen answers
    qtune(
        "train", "demo-dpo.yaml", "--overwrite", "--set", "dpo.loss_type=sigmoid",
        "--set", "train.output_dir=runs/demo-dpo-sigmoid", cwd=work,
    )  # fmt: skip
    for name in ("demo-dpo", "demo-dpo-sigmoid"):
        metrics = json.loads((work / "runs" / name / "metrics.json").read_text())
        figures[name] = {k: v for k, v in metrics.items() if k != "data"}
    fresh = demo_rows(400, seed=99)  # rows neither stage trained on
    for name in ("demo", "demo-dpo", "demo-dpo-sigmoid"):
        figures[f"exact_match {name}"] = exact_match(work / "runs" / name, fresh, work)["per_task"]

    sft = figures["side_by_side"]["sft (prompt + chosen)"]
    print("\n| run | s / step | tokens/s | peak memory | vs SFT (time, memory) |\n| --- | --- | --- | --- | --- |")
    for label, row in figures["side_by_side"].items():
        print(
            f"| {label} | {row['seconds_per_step']:.3f} | {row['tokens_per_second']:,.0f} | {row['peak_memory_mib']:.0f} MiB "
            f"| {row['seconds_per_step'] / sft['seconds_per_step']:.2f}x, {row['peak_memory_mib'] / sft['peak_memory_mib']:.2f}x |"
        )
    for name in ("demo-dpo", "demo-dpo-sigmoid"):
        d = figures[name]
        print(
            f"\n{name}: {d['train_seconds']:.0f} s of training; validation reward accuracy "
            f"{d['eval_reward_accuracy_before']:.2f} -> {d['eval_reward_accuracy']:.2f}, margin "
            f"{d['eval_reward_margin_before']:.3f} -> {d['eval_reward_margin']:.3f}, chosen log-prob "
            f"{d['eval_logps_chosen_before']:.2f} -> {d['eval_logps_chosen']:.2f}, rejected "
            f"{d['eval_logps_rejected_before']:.2f} -> {d['eval_logps_rejected']:.2f}; peak {d['peak_memory_bytes'] / 2**20:.0f} MiB"
        )
    print(
        "\n| task | exact answers after SFT | after DPO + SFT term (the recipe) | after DPO alone |\n| --- | --- | --- | --- |"
    )
    for task, share in figures["exact_match demo"].items():
        after = [figures[f"exact_match {n}"][task] for n in ("demo-dpo", "demo-dpo-sigmoid")]
        print(f"| {task} | {100 * share:.0f}% | {100 * after[0]:.0f}% | {100 * after[1]:.0f}% |")
    out = BENCH / "results" / "preference.json"
    out.write_text(json.dumps(figures, indent=1))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--batched":
        raise SystemExit(batched_dpo(sys.argv[2]))
    main()
