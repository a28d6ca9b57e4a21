"""What the tests share besides fixtures (those are in conftest.py): the small model shape, recipes, data files, and
finished runs built for a test."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from qtune.data.packing import IGNORE, PackedCollator

REPO = Path(__file__).resolve().parents[1]

# Small enough for a 2-core CI machine; widths stay multiples of 64 (bitsandbytes' 4-bit block).
TINY_SHAPE = dict(hidden=64, intermediate=128, layers=2, heads=2, kv_heads=1)


def write_jsonl(path: Path, rows) -> Path:
    """`rows` as JSON lines at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe_dict(model_dir, data_file, output_dir, fmt="alpaca", **sections) -> dict:
    """A small, fast recipe; keyword sections are merged over the defaults."""
    recipe = {
        "model": {"name": str(model_dir)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"datasets": [{"path": str(data_file), "format": fmt}], "max_length": 128, "val_size": 0.1},
        "train": {
            "output_dir": str(output_dir),
            "max_steps": 6,
            "micro_batch_size": 4,
            "grad_accum": 1,
            "lr": 2e-3,
            "save_steps": 3,
            "eval_steps": 3,
            "logging_steps": 1,
            "gradient_checkpointing": False,
            "warmup_ratio": 0.0,
        },
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    """The recipe dict as YAML at `path`."""
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def interrupted_and_resumed(run_cli, tmp_path: Path, raw: dict) -> tuple[Path, Path]:
    """(the uninterrupted run, the resumed one): `raw` (6 steps, a checkpoint every 3) trained straight through in
    tmp_path/full; then a copy of what that folder held right after checkpoint-3 was written, resumed to step 6."""
    import shutil

    full = Path(raw["train"]["output_dir"])
    code, _, err = run_cli("train", write_recipe(tmp_path / "full.yaml", raw))
    assert code == 0, err
    cut = tmp_path / "cut"
    shutil.copytree(full, cut, ignore=shutil.ignore_patterns("checkpoint-6", "adapter", "metrics.json", "loss.png"))
    resumed = dict(raw, train={**raw["train"], "output_dir": str(cut)})
    code, _, err = run_cli("train", write_recipe(tmp_path / "cut.yaml", resumed), "--resume")
    assert code == 0, err
    return full, cut


def losses_after_step(run: Path, step: int) -> list[tuple[int, float]]:
    """(step, training loss) logged after `step`, as checkpoint-6's trainer state holds them."""
    state = json.loads((run / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    return [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h and h["step"] > step]


def train_run(tmp_path_factory, model_dir, alpaca_file, name):
    """A finished 10-step run of `qtune train` on `model_dir` (LoRA dropout on), in a new folder named `name`."""
    from qtune.cli import main

    folder = tmp_path_factory.mktemp(name)
    raw = recipe_dict(
        model_dir, alpaca_file, folder / "run", lora={"dropout": 0.05}, train={"max_steps": 10, "eval_steps": 10}
    )
    assert main(["train", str(write_recipe(folder / "r.yaml", raw))]) == 0
    return folder / "run"


# Mistral's sliding window cut to 48 positions, so the test rows cross it
SHORT_WINDOW = {"sliding_window": 48}

# Llama 3.1's rope scaling with its original context cut to 32 positions, so tests reach the scaled region
LLAMA3_ROPE = {
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "rope_theta": 500000.0,
}


def family_run(tmp_path_factory, alpaca_file, family: str, folder: str, pretrain_steps: int = 60, **model_extra):
    """A finished 10-step run on a pretrained tiny model of one family (TINY_SHAPE), built in `folder`."""
    from qtune.demo.tiny_models import write_tiny_model

    models = tmp_path_factory.mktemp("models")
    base = write_tiny_model(models / folder, family, pretrain_steps=pretrain_steps, **model_extra, **TINY_SHAPE)
    return train_run(tmp_path_factory, base, alpaca_file, f"{folder}-run")


def gguf_read_back(model_dir: Path, gguf_path: Path):
    """(the model in `model_dir`, the largest |Δlogit| of its GGUF file read back by qtune's loader) on 57 tokens."""
    from transformers import AutoModelForCausalLM

    from qtune.evaluation.fidelity import load_artifact
    from qtune.export.formats.merged import merged_config
    from qtune.modeling.config import load_config

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = merged_config(load_config(model_dir))
    read_back = load_artifact("gguf_f16", gguf_path, config=config, on_gpu=False).eval()
    ids = torch.tensor([list(range(3, 60))])
    with torch.no_grad():
        return model, (model(input_ids=ids).logits - read_back(input_ids=ids).logits).abs().max().item()


# The Hub token the tests give the local stand-in of the Hub: it must never appear in a file, a log or a request body
CANARY = "hf_CANARYtoken1234567890abcdefXYZ"


def assert_canary_absent(hub, folders):
    """The canary token traveled in the Authorization header only, and is in no file under `folders`."""
    for request in hub.requests:
        assert CANARY.encode() not in request["body"], request["path"]
        assert all(CANARY not in v for k, v in request["headers"].items() if k.lower() != "authorization")
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                assert CANARY.encode() not in path.read_bytes(), path
    assert any(
        {k.lower(): v for k, v in r["headers"].items()}.get("authorization") == f"Bearer {CANARY}" for r in hub.requests
    )


# --------------------------------------------------------------------------- the speed path against the plain computation


def lora_grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def per_sample_reference(model, samples):
    """Sum of token losses over samples, each run alone; divided by all supervised tokens."""
    model.zero_grad()
    total = sum(sum(1 for x in s["labels"][1:] if x != IGNORE) for s in samples)
    value = 0.0
    for s in samples:
        logits = model(input_ids=torch.tensor([s["input_ids"]])).logits[0, :-1].float()
        targets = torch.tensor(s["labels"][1:])
        loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum") / total
        loss.backward()
        value += loss.item()
    return value, lora_grads(model)


def assert_close(loss, grads, reference):
    ref_loss, ref_grads = reference
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    worst = max(
        (grads[n] - ref_grads[n]).abs().max().item() / (ref_grads[n].abs().max().item() + 1e-12) for n in ref_grads
    )
    assert worst < 1e-4, f"largest relative gradient difference {worst:.2e}"


def qtune_trainer(
    lora_model, samples, tokenizer, folder, *, row_tokens: int, gradient_checkpointing=False, offload_activations=False
):
    """The Trainer qtune trains with, over `samples` as one micro-batch packed into rows of `row_tokens`."""
    from datasets import Dataset
    from trl import SFTConfig

    from qtune.training.methods.sft_trainer import QtuneSFTTrainer

    dataset = Dataset.from_dict(
        {"input_ids": [s["input_ids"] for s in samples], "labels": [s["labels"] for s in samples]}
    )
    config = SFTConfig(
        output_dir=str(folder),
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_length=128,
        per_device_train_batch_size=len(samples),
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    collator = PackedCollator(tokenizer.pad_token_id or 0, row_tokens=row_tokens)
    return QtuneSFTTrainer(
        model=lora_model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=collator,
        offload_activations=offload_activations,
    )


# --------------------------------------------------------------------------- runs in their own process: started, killed, waited for, compared


STEPS = 24


def environment(**extra) -> dict:
    return {**os.environ, "QTUNE_SAMPLE_TRACE": "1", "CUDA_VISIBLE_DEVICES": "", **extra}


def start(recipe: Path, *args, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "qtune", "train", str(recipe), *args],
        env=environment(**env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(recipe: Path, *args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qtune", "train", str(recipe), *args],
        env=environment(**env),
        capture_output=True,
        text=True,
        timeout=600,
    )


def run_dir(recipe: Path) -> Path:
    return Path(yaml.safe_load(recipe.read_text())["train"]["output_dir"])


def steps_traced(folder: Path) -> int:
    trace = folder / "sample_trace" / "steps-rank-0.jsonl"
    if not trace.is_file():
        return -1
    lines = trace.read_text().splitlines()
    return json.loads(lines[-1])["step"] if lines else -1


def wait_for_step(process: subprocess.Popen, recipe: Path, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while steps_traced(run_dir(recipe)) < step:
        assert process.poll() is None, f"the run ended before step {step}: {process.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"step {step} not reached in {timeout} s"
        time.sleep(0.02)


def kill_at_step(recipe: Path, step: int, *args) -> int:
    """Start (or resume) the run and SIGKILL it once it is training step `step`; returns the exit status."""
    process = start(recipe, *args)
    deadline = time.time() + 300
    while process.poll() is None and steps_traced(run_dir(recipe)) < step and time.time() < deadline:
        time.sleep(0.02)
    process.kill()
    return process.wait()


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def trained_sequence(folder: Path) -> dict[int, list[str]]:
    """Step -> micro-batch digests, from the process that completed the step last. A step some earlier process
    also trained on (and then lost to a kill) must have started with the same batches."""
    by_process: dict[int, dict[int, list[str]]] = {}
    order = []
    for line in (folder / "sample_trace" / "steps-rank-0.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["pid"] not in by_process:
            by_process[record["pid"]] = {}
            order.append(record["pid"])
        by_process[record["pid"]].setdefault(record["step"], []).append(record["batch"])
    final: dict[int, list[str]] = {}
    for pid in order:
        for step, batches in by_process[pid].items():
            if step in final:
                shorter, longer = sorted((final[step], batches), key=len)
                assert longer[: len(shorter)] == shorter, f"step {step} trained on other batches after a resume"
            final[step] = batches
    return final


def assert_kill_9_then_resume_is_bit_identical(recipe_in, folder: Path, step: int, stop_at: int | None = None) -> None:
    """`recipe_in(folder)` writes a recipe of STEPS steps into `folder`: run it uninterrupted, then again killed at
    `step` and resumed (with `stop_at`: resumed, stopped by SIGTERM at that step, which exits 75 and says --resume,
    and resumed again), and compare adapters and the batches of every step."""
    import signal

    reference = recipe_in(folder / "reference")
    done = finish(reference)
    assert done.returncode == 0, done.stderr[-2000:]
    recipe = recipe_in(folder / "killed")
    assert kill_at_step(recipe, step) == -9
    if stop_at is not None:
        process = start(recipe, "--resume")
        wait_for_step(process, recipe, stop_at)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 75
        assert "--resume" in process.stderr.read().strip().splitlines()[-1]
    done = finish(recipe, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_as_reference(
        run_dir(recipe), (adapter_tensors(run_dir(reference)), trained_sequence(run_dir(reference)))
    )


def assert_same_as_reference(folder: Path, reference):
    import torch

    tensors, sequence = reference
    got = adapter_tensors(folder)
    assert got.keys() == tensors.keys()
    assert all(torch.equal(got[k], tensors[k]) for k in tensors), "the adapter differs from the uninterrupted run"
    assert trained_sequence(folder) == sequence
    assert len(sequence) == STEPS


# --------------------------------------------------------------------------- launches of several processes


def run_qtune(args, *, launcher=(), env_extra=None, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", QTUNE_SAMPLE_TRACE="1", **(env_extra or {}))
    return subprocess.run([*launcher, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def step_losses(run: Path, step: int):
    state = json.loads((run / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [(h["step"], h["loss"], h["grad_norm"]) for h in state["log_history"] if "loss" in h]
