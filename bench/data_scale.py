"""Data at scale: `qtune train` against the plain Hugging Face recipe on N alpaca rows, from process start to the
first training step.

For each N (20k, 100k, 1M alpaca-like rows, a mean of ~180-195 tokens after truncation; a 57M-parameter Llama with a
32k vocabulary,
max_length 512, 2 optimizer steps) three runs, one at a time, each in a fresh process with an empty datasets cache:

- qtune: `qtune train RECIPE --overwrite` (validation off, as the baseline has none);
- qtune again: the same command once more, the second start (its tokenized data cached);
- baseline: the Hugging Face guide's recipe: load_dataset("json") -> the alpaca prompt as prompt/completion text ->
  BitsAndBytesConfig NF4 + get_peft_model -> trl's SFTTrainer, which tokenizes (max_length 512).

Measured per run, from outside the process: seconds to the first training step, seconds to the end of the data stage
(qtune's "data:" line), the peak RSS of the process, the peak PSS of the process and its children summed (the
tokenizing workers; PSS splits a shared page between the processes that map it), and both peaks up to the end of the
data stage; RSS sampled every 0.1 s, PSS every second (reading it costs CPU). qtune's own clock of its data stage
comes from its metrics.json.

    python bench/data_scale.py [--rows 20000 100000 1000000] [--work DIR] [--qtune-src TREE] [--out FILE]

--qtune-src runs qtune from another source tree (a checkout of an older commit: the "before" figures).
Writes bench/results/data_scale.json (or --out) with the machine's environment.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SHAPE = dict(  # ~57M parameters, 32k vocabulary (most of it in the embeddings and the LM head)
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
)
MAX_LENGTH = 512
STEPS = 2
FIRST_STEP = "DATA-SCALE-FIRST-STEP"
SAMPLE_SECONDS = 0.1  # the memory sampler's interval for RSS
PSS_EVERY = 10  # PSS once a second: reading it costs CPU itself (0.2 s for a 10 GB process)


# --------------------------------------------------------------------------- inputs


def write_inputs(work: Path, rows: int) -> tuple[Path, Path]:
    """The model (once) and the N-row data file (once per N)."""
    sys.path.insert(0, str(BENCH))
    model = work / "model"
    if not (model / "config.json").exists():
        from merge_memory import save_random_llama

        save_random_llama(model, {**SHAPE, "max_position_embeddings": 2048}, unit_norms=True)
    data = work / f"alpaca-{rows}.jsonl"
    if not data.exists():
        partial = data.with_suffix(".partial")
        with partial.open("w") as out:
            for start in range(0, rows, 50_000):  # seeded per block, so the first rows of every N are the same
                for row in alpaca_like_rows(min(50_000, rows - start), seed=start):
                    out.write(json.dumps(row) + "\n")
        partial.rename(data)
    return model, data


def alpaca_like_rows(count: int, seed: int) -> list[dict]:
    """Short instructions, an input in 40% of the rows, answers log-normally long (median ~60 words): a mean of ~230
    tokens per sample with qtune's tiny tokenizer, as the issue's data."""
    import random

    from qtune.demo.tiny_models import WORDS

    rng = random.Random(seed)

    def words(n):
        return " ".join(rng.choice(WORDS) for _ in range(max(1, n)))

    return [
        {
            "instruction": words(rng.randrange(4, 20)),
            "input": words(rng.randrange(0, 30)) if rng.random() < 0.4 else "",
            "output": words(min(int(rng.lognormvariate(4.1, 1.0)), 1500)),
        }
        for _ in range(count)
    ]


def qtune_recipe(model: Path, data: Path, run_dir: Path) -> dict:
    return {
        "model": {"name": str(model)},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "data": {"datasets": [{"path": str(data), "format": "alpaca"}], "val_size": 0, "max_length": MAX_LENGTH},
        "train": {
            "output_dir": str(run_dir),
            "max_steps": STEPS,
            "micro_batch_size": 4,
            "grad_accum": 1,
            "save_steps": 10_000,
            "logging_steps": 1,
        },
    }


# --------------------------------------------------------------------------- the two sides, each in its own process


class FirstStepSignal:
    """A TrainerCallback (duck-typed, so it fits either side) that prints one line when the first step begins."""

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            print(FIRST_STEP, flush=True)


def child_qtune(recipe_file: str) -> int:
    """`qtune train RECIPE --overwrite`, with the first-step signal added to its trainer."""
    import qtune
    from qtune.core.noise import quiet_library_noise

    quiet_library_noise()  # as `qtune train` does before anything imports bitsandbytes
    import qtune.training.run as run

    print(f"qtune from {Path(qtune.__file__).parent}", flush=True)
    build = run.build_trainer

    def build_with_signal(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(FirstStepSignal())
        return trainer

    run.build_trainer = build_with_signal
    from qtune.cli import main

    return main(["train", recipe_file, "--overwrite"])


def child_baseline(settings_file: str) -> int:
    """The Hugging Face guide's QLoRA recipe on the raw alpaca file: trl tokenizes."""
    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    sys.path.insert(0, str(BENCH))
    from hf_baseline import qlora_model

    settings = json.loads(Path(settings_file).read_text())
    tokenizer = AutoTokenizer.from_pretrained(settings["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = qlora_model(settings["model"], {"r": 16, "alpha": 32, "dropout": 0.05}, torch.float32, on_gpu=False)

    def alpaca(row):  # the Stanford prompt, as the guides write it
        if row["input"]:
            prompt = (
                "Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                f"### Instruction:\n{row['instruction']}\n\n### Input:\n{row['input']}\n\n### Response:\n"
            )
        else:
            prompt = (
                "Below is an instruction that describes a task. Write a response that appropriately completes the "
                f"request.\n\n### Instruction:\n{row['instruction']}\n\n### Response:\n"
            )
        return {"prompt": prompt, "completion": row["output"]}

    dataset = load_dataset("json", data_files=settings["data"], split="train")
    dataset = dataset.map(alpaca, remove_columns=dataset.column_names)
    config = SFTConfig(
        output_dir=settings["output_dir"],
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=STEPS,
        learning_rate=2e-4,
        optim="paged_adamw_8bit",
        max_length=MAX_LENGTH,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )

    class Signal(FirstStepSignal, TrainerCallback):
        pass

    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[Signal()]
    )
    trainer.train()
    return 0


# --------------------------------------------------------------------------- measuring from outside


def rollup(pid: int) -> dict:
    """/proc/PID/smaps_rollup as kB values (Rss, Pss, ...): one summary, far cheaper to read than smaps."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return fields


def tree_memory(process, *, with_pss: bool = True) -> tuple[int, int]:
    """(the process's RSS, the PSS of the process and all its descendants summed; 0 unless `with_pss`): PSS shares a
    page between the processes that map it, so forked workers do not count their parent's pages again. RSS is cheap
    to read; PSS walks the page tables (0.2 s for a 10 GB process), so it is read less often."""
    import psutil

    try:
        main_rss = process.memory_info().rss
    except psutil.Error:
        return 0, 0
    total = 0
    if with_pss:
        for p in [process, *process.children(recursive=True)]:
            try:
                total += rollup(p.pid).get("Pss", 0)
            except (OSError, psutil.Error):
                continue
    return main_rss, total


def measure(command: list[str], env: dict, log_file: Path) -> dict:
    """Runs `command`; seconds to the end of the data stage and to the first step, peak tree RSS (overall and up to
    the data stage's end), wall seconds."""
    import psutil

    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    process = psutil.Process(child.pid)
    marks: dict = {}
    peak = [0, 0]  # the main process's RSS, the tree's PSS
    done = threading.Event()

    def sample():
        count = 0
        while not done.is_set():
            rss, pss = tree_memory(process, with_pss=count % PSS_EVERY == 0)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            count += 1
            time.sleep(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with log_file.open("w") as log:
        for line in child.stdout:
            log.write(line)
            now = time.perf_counter() - started
            if re.match(r"data: \d", line) and "data_s" not in marks:  # the data report, not the bar
                rss, pss = tree_memory(process)
                marks["data_s"], marks["data_peak_rss"], marks["data_peak_pss"] = (
                    now,
                    max(peak[0], rss),
                    max(peak[1], pss),
                )
            if FIRST_STEP in line and "first_step_s" not in marks:
                marks["first_step_s"] = now
    code = child.wait()
    done.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"{' '.join(command)} exited {code}; see {log_file}")
    return {**marks, "wall_s": time.perf_counter() - started, "peak_rss": peak[0], "peak_pss": peak[1]}


def side_env(cache: Path, qtune_src: str | None) -> dict:
    env = dict(os.environ, HF_DATASETS_CACHE=str(cache), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if qtune_src:
        env["PYTHONPATH"] = qtune_src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["qtune", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 100_000, 1_000_000])
    parser.add_argument("--sides", nargs="+", default=["qtune", "baseline"], choices=["qtune", "baseline"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/qtune-data-scale"))
    parser.add_argument("--qtune-src", help="run qtune from this source tree (for the figures before a change)")
    parser.add_argument("--once", action="store_true", help="no second qtune start (code without a data cache)")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "data_scale.json")
    parser.add_argument("file", nargs="?")
    args = parser.parse_args()
    if args.child == "qtune":
        raise SystemExit(child_qtune(args.file))
    if args.child == "baseline":
        raise SystemExit(child_baseline(args.file))

    sys.path.insert(0, str(BENCH.parent))
    from qtune.core.environment import environment

    args.work.mkdir(parents=True, exist_ok=True)
    results = {"shape": SHAPE, "max_length": MAX_LENGTH, "steps": STEPS, "qtune_src": args.qtune_src, "runs": {}}
    me = [sys.executable, str(Path(__file__).resolve())]
    for rows in args.rows:
        model, data = write_inputs(args.work, rows)
        figures = {"file_mib": round(data.stat().st_size / 2**20, 1)}
        if "qtune" in args.sides:
            import yaml

            recipe = args.work / f"recipe-{rows}.yaml"
            recipe.write_text(yaml.safe_dump(qtune_recipe(model, data, args.work / f"run-{rows}")))
            cache = args.work / f"cache-qtune-{rows}"
            shutil.rmtree(cache, ignore_errors=True)
            env = side_env(cache, args.qtune_src)
            for name in ("qtune",) if args.once else ("qtune", "qtune_second"):
                log = args.work / f"{name}-{rows}.log"
                figures[name] = measure([*me, "--child", "qtune", str(recipe)], env, log)
                metrics = json.loads((args.work / f"run-{rows}" / "metrics.json").read_text())
                # qtune's own clock of the data stage (reading + tokenizing, or reading the cache); None before it had one
                figures[name]["data_stage_s"] = metrics.get("data_seconds")
                figures[name]["setup_s"] = metrics.get("setup_seconds")
                print(rows, name, figures[name], flush=True)
            shutil.rmtree(cache, ignore_errors=True)
        if "baseline" in args.sides:
            settings = args.work / f"baseline-{rows}.json"
            settings.write_text(
                json.dumps({"model": str(model), "data": str(data), "output_dir": str(args.work / "baseline-out")})
            )
            cache = args.work / f"cache-baseline-{rows}"
            shutil.rmtree(cache, ignore_errors=True)
            log = args.work / f"baseline-{rows}.log"
            figures["baseline"] = measure([*me, "--child", "baseline", str(settings)], side_env(cache, None), log)
            print(rows, "baseline", figures["baseline"], flush=True)
            shutil.rmtree(cache, ignore_errors=True)
        if "qtune" in figures and "baseline" in figures:
            q, b = figures["qtune"], figures["baseline"]
            figures["first_step_ratio"] = q["first_step_s"] / b["first_step_s"]
            figures["peak_rss_ratio"] = q["peak_rss"] / b["peak_rss"]
            figures["peak_pss_ratio"] = q["peak_pss"] / b["peak_pss"]
        results["runs"][str(rows)] = figures
    results["environment"] = environment()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print_table(results)


def print_table(results: dict) -> None:
    mib = 2**20
    print(
        "\n| rows | qtune: first step / peak RSS / tree PSS | qtune data stage: s / RSS / PSS "
        "| second start: first step / data stage | baseline: first step / peak RSS / tree PSS | ratio first step / RSS / PSS |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for rows, f in results["runs"].items():
        q, s, b = f.get("qtune", {}), f.get("qtune_second", {}), f.get("baseline", {})

        def cell(side, a, m1, m2):
            if not side or side.get(a) is None:
                return "-"
            return f"{side[a]:.1f} s / {side[m1] / mib:,.0f} / {side[m2] / mib:,.0f} MiB"

        second = f"{s['first_step_s']:.1f} s / {s['data_stage_s']:.1f} s" if s and s.get("data_stage_s") else "-"
        ratio = (
            f"{f['first_step_ratio']:.2f} / {f['peak_rss_ratio']:.2f} / {f['peak_pss_ratio']:.2f}"
            if "first_step_ratio" in f
            else "-"
        )
        print(
            f"| {int(rows):,} | {cell(q, 'first_step_s', 'peak_rss', 'peak_pss')} "
            f"| {cell(q, 'data_s', 'data_peak_rss', 'data_peak_pss')} | {second} "
            f"| {cell(b, 'first_step_s', 'peak_rss', 'peak_pss')} | {ratio} |"
        )


if __name__ == "__main__":
    main()
