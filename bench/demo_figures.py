"""The demo figures (bench/README.md), regenerated: the first command's steps timed, the losses, eval, export, the
task benchmark, the DPO stage and what the model answers, all from the commands a user runs, in a scratch folder
(runs/ is not touched), with the environment they ran in (the CPU kind decides the digits: qtune doctor).

    python bench/demo_figures.py [--work DIR]
    ATEN_CPU_CAPABILITY=avx2 python bench/demo_figures.py    # torch's AVX2 kernels on an AVX512 machine

Prints the figures as Markdown table rows and writes bench/results/demo_figures-<CPU kind>-<torch kernels>.json (one
file per kind: the digits depend on it). Run it on an idle machine whenever the code the demo goes through changes,
and paste the rows into bench/README.md; tests/test_docs.py checks the README's ranges hold every kind's file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
EXPORT_FORMATS = ("merged_fp16", "nf4", "gguf_f16", "gguf_q8_0", "gguf_q6_k", "gguf_q5_k_m", "gguf_q4_k_m", "gguf_q4_0")


def run(argv: list, cwd: Path) -> tuple[float, str]:
    """(seconds, output) of one command, in a fresh process on the CPU; a failure ends the benchmark."""
    started = time.perf_counter()
    done = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    )
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, argv[1:]))} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, done.stdout + done.stderr


def qtune(*args, cwd: Path) -> tuple[float, str]:
    return run([sys.executable, "-m", "qtune", *args], cwd)


def exact_match(run: Path, rows: list[dict], cwd: Path) -> dict:
    """Greedy answers of the fine-tuned demo model to held-out rows, per task: what it measurably learned."""
    from qtune.modeling.generation import generate
    from qtune.publish.chat import build_prompt, load_for_generation

    model, tokenizer, style = load_for_generation(run)
    by_task: dict[str, list[int]] = {}
    examples = []
    for row in rows:
        prompt = build_prompt(
            tokenizer, style, [{"role": "user", "content": row["instruction"]}], alpaca_input=row["input"]
        )
        answer = generate(model, tokenizer, prompt, max_new_tokens=16).text
        by_task.setdefault(row["instruction"], []).append(answer == row["output"])
        examples.append({**row, "answer": answer})
    return {
        "per_task": {task: sum(hits) / len(hits) for task, hits in by_task.items()},
        "counts": {task: len(hits) for task, hits in by_task.items()},
        "examples": examples[:12],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()
    work = (args.work or Path(tempfile.mkdtemp(prefix="qtune-demo-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    figures = {}
    figures["make_tiny_model_s"], _ = qtune(
        "make-tiny-model",
        work / "runs/tiny-llama",
        "--demo-data",
        work / "runs/demo-data.jsonl",
        "--preference-data",
        work / "runs/demo-preference.jsonl",
        "--demo-task",
        work / "runs/demo-task",
        cwd=work,
    )
    (work / "recipes").mkdir(exist_ok=True)
    (work / "recipes/demo.yaml").write_text((REPO / "recipes/demo.yaml").read_text())  # its paths are relative
    figures["train_s"], train_log = qtune("train", "recipes/demo.yaml", cwd=work)
    metrics = json.loads((work / "runs/demo/metrics.json").read_text())
    figures["train"] = {
        k: metrics[k]
        for k in (
            "eval_loss_before",
            "eval_loss",
            "eval_perplexity",
            "train_loss",
            "global_step",
            "train_seconds",
            "tokens_per_second",
            "peak_memory_bytes",
        )
    }
    figures["eval_s"], eval_log = qtune("eval", "runs/demo", cwd=work)
    figures["eval"] = json.loads((work / "runs/demo/eval_report.json").read_text())
    export_args = [x for f in EXPORT_FORMATS for x in ("--format", f)]
    figures["export_s"], export_log = qtune("export", "runs/demo", *export_args, cwd=work)
    figures["export"] = json.loads((work / "runs/demo/export/export_report.json").read_text())
    figures["tasks_s"], tasks_log = qtune("eval", "runs/demo", "--tasks", "runs/demo-task/demo_choice.yaml", cwd=work)
    figures["tasks"] = json.loads((work / "runs/demo/eval_report.json").read_text())["tasks"]
    (work / "recipes/demo-dpo.yaml").write_text((REPO / "recipes/demo-dpo.yaml").read_text())
    figures["dpo_s"], _ = qtune("train", "recipes/demo-dpo.yaml", cwd=work)
    dpo = json.loads((work / "runs/demo-dpo/metrics.json").read_text())
    figures["dpo"] = {
        k: dpo[k]
        for k in (
            "eval_reward_accuracy_before",
            "eval_reward_accuracy",
            "eval_reward_margin_before",
            "eval_reward_margin",
            "train_seconds",
            "tokens_per_second",
            "peak_memory_bytes",
        )
    }
    figures["environment"] = metrics["environment"]  # where the demo trained: versions, CPU kind, torch's kernels
    recipe = yaml.safe_load((work / "recipes/demo.yaml").read_text())
    sys.path.insert(0, str(REPO))
    from qtune.demo.tiny_models import demo_rows

    rows = demo_rows(200, seed=1)  # freshly drawn rows (the demo data is seed 0); the task space is small, so
    os.chdir(work)  # a word or a sum may also occur in training
    figures["exact_match"] = exact_match(Path(recipe["train"]["output_dir"]), rows, work)
    (BENCH / "results").mkdir(exist_ok=True)
    kind = f"{figures['environment']['cpu']['kind']} {figures['environment']['cpu']['torch_kernels']}"
    results = BENCH / "results" / f"demo_figures-{re.sub(r'[^a-z0-9]+', '-', kind.lower()).strip('-')}.json"
    results.write_text(json.dumps(figures, indent=2))
    env = figures["environment"]
    differs = ", ".join(f"{n} {d['installed']}" for n, d in env["differs_from_tested"].items()) or "none"
    print(
        f"environment: {env['cpu']['kind']} ({env['cpu']['model']}), torch kernels {env['cpu']['torch_kernels']}, "
        f"qtune {env['qtune']}, transformers {env['versions']['transformers']}, torch {env['versions']['torch']}; "
        f"packages not at the tested version: {differs}"
    )

    t = figures["train"]
    print(
        f"| `qtune make-tiny-model` (tokenizer + model + 200 pretraining steps) | {figures['make_tiny_model_s']:.0f} s |"
    )
    print(
        f"| `qtune train recipes/demo.yaml` (150 QLoRA steps, process start to end) | {figures['train_s']:.0f} s; "
        f"training {t['train_seconds']:.0f} s, {t['tokens_per_second']:,.0f} tokens/s, peak RSS "
        f"{t['peak_memory_bytes'] / 2**20:,.0f} MiB |"
    )
    print(
        f"| eval loss before -> after (metrics.json) | {t['eval_loss_before']:.2f} -> {t['eval_loss']:.2f} "
        f"(perplexity {2.718281828 ** t['eval_loss_before']:.0f} -> {t['eval_perplexity']:.2f}) |"
    )
    models = figures["eval"]["models"]
    print(
        f"| `qtune eval runs/demo` ({figures['eval']['samples']} validation samples) | base {models['base (4-bit)']['loss']:.2f}"
        f" -> adapter {models['adapter']['loss']:.2f} |"
    )
    print(f"| `qtune export` ({', '.join(EXPORT_FORMATS)}) | {figures['export_s']:.0f} s |")
    tasks = figures["tasks"]
    print(
        f"| `qtune eval runs/demo --tasks runs/demo-task/demo_choice.yaml` ({len(tasks['artifacts'])} models, "
        f"{tasks['requests']['demo_choice']['requests']:,} requests each) | {figures['tasks_s']:.0f} s |"
    )
    print("\n| model | demo_choice acc | ± stderr | vs adapter | seconds |\n| --- | --- | --- | --- | --- |")
    adapter = tasks["artifacts"]["adapter"]["scores"]["demo_choice"]["acc"]["value"]
    for name, entry in tasks["artifacts"].items():
        if "skipped" in entry:
            print(f"| {name} | skipped: {entry['skipped']} | | | |")
            continue
        acc = entry["scores"]["demo_choice"]["acc"]
        diff = "" if name == "adapter" else f"{acc['value'] - adapter:+.4f}"
        print(f"| {name} | {acc['value']:.4f} | {acc['stderr']:.4f} | {diff} | {entry['seconds']:.1f} |")
    d = figures["dpo"]
    print(
        f"\n| `qtune train recipes/demo-dpo.yaml` (process start to end) | {figures['dpo_s']:.0f} s; training "
        f"{d['train_seconds']:.0f} s; validation reward accuracy {d['eval_reward_accuracy_before']:.3f} -> "
        f"{d['eval_reward_accuracy']:.3f}, margin {d['eval_reward_margin_before']:.2f} -> {d['eval_reward_margin']:.2f} |"
    )
    reference = figures["export"]["reference"]["perplexity"]
    print(
        f"| export reference perplexity (adapter on NF4, {figures['export']['reference']['samples']} samples) | {reference:.4f} |"
    )
    print()
    for task, share in figures["exact_match"]["per_task"].items():
        print(
            f"| exact answers to fresh rows, '{task}' ({figures['exact_match']['counts'][task]} rows) | {100 * share:.0f}% |"
        )
    print(
        f"(first command on this machine, install excluded: {figures['make_tiny_model_s'] + figures['train_s']:.0f} s;"
        f" work folder {work})"
    )


if __name__ == "__main__":
    main()
