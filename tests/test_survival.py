"""Kills, preemption, interrupted and corrupted checkpoints, full disks: a run that dies costs minutes, never the run.

Every scenario ends by comparing with one uninterrupted run of the same recipe: the final adapter must be
bit-identical and the micro-batches trained on, step by step, the same (QTUNE_SAMPLE_TRACE step digests).
The CI subset kills 5 times; the full campaign (20 kills, 50 interrupted saves) is marked slow:

    QTUNE_CAMPAIGN=full python -m pytest -m slow tests/test_survival.py
"""

import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import (
    STEPS,
    adapter_tensors,
    assert_same_as_reference,
    environment,
    finish,
    kill_at_step,
    recipe_dict,
    run_dir,
    start,
    steps_traced,
    trained_sequence,
    wait_for_step,
    write_recipe,
)

from qtune.core import checkpoints
from qtune.core.folders import LOCK, MARKER


def survival_recipe(tmp_path: Path, model, data, name: str, **train) -> Path:
    raw = recipe_dict(
        model,
        data,
        tmp_path / name,
        lora={"r": 8, "alpha": 16, "dropout": 0.1},
        train={
            "max_steps": STEPS,
            "save_steps": 1,
            "keep_checkpoints": 2,
            "eval_steps": None,
            "logging_steps": 1,
            **train,
        },
    )
    return write_recipe(tmp_path / f"{name}.yaml", raw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama, alpaca_file):
    """One uninterrupted run: its adapter and the batches of every step."""
    tmp_path = tmp_path_factory.mktemp("reference")
    recipe = survival_recipe(tmp_path, tiny_llama, alpaca_file, "run")
    done = finish(recipe)
    assert done.returncode == 0, done.stderr[-2000:]
    folder = run_dir(recipe)
    return adapter_tensors(folder), trained_sequence(folder)


def campaign_size(ci: int, full: int) -> int:
    return full if os.environ.get("QTUNE_CAMPAIGN") == "full" else ci


def kill_campaign(tmp_path, tiny_llama, alpaca_file, reference, kills: int, seed: int):
    recipe = survival_recipe(tmp_path, tiny_llama, alpaca_file, "run")
    rng = random.Random(seed)
    kill_steps = (
        sorted(rng.sample(range(1, STEPS - 1), kills))
        if kills < STEPS - 2
        else [rng.randrange(1, STEPS - 1) for _ in range(kills)]
    )
    statuses = []
    for n, step in enumerate(kill_steps):
        statuses.append(kill_at_step(recipe, step, *(["--resume"] if n else [])))
    assert all(status == -signal.SIGKILL for status in statuses), statuses
    done = finish(recipe, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_as_reference(run_dir(recipe), reference)
    return kill_steps


def test_kill_9_at_random_steps_then_resume_is_bit_identical(tmp_path, tiny_llama, alpaca_file, reference):
    kill_campaign(tmp_path, tiny_llama, alpaca_file, reference, kills=3, seed=7)  # 20 in the slow campaign


@pytest.mark.slow
def test_kill_9_campaign_full(tmp_path, tiny_llama, alpaca_file, reference):
    steps = kill_campaign(tmp_path, tiny_llama, alpaca_file, reference, kills=campaign_size(5, 20), seed=11)
    print(f"kill campaign: {len(steps)} SIGKILLs at steps {steps}, 0 lost")


@pytest.mark.parametrize("stage", [pytest.param("optimizer", marks=pytest.mark.slow), "manifest"])
def test_death_halfway_through_a_save_keeps_the_previous_checkpoint(
    tmp_path, tiny_llama, alpaca_file, reference, stage
):
    recipe = survival_recipe(tmp_path, tiny_llama, alpaca_file, "run")
    dead = finish(recipe, QTUNE_FAIL_CHECKPOINT_AT=f"{stage}:5")
    assert dead.returncode == 86  # the injected death, with checkpoint-5 half-written
    checkpoints_dir = run_dir(recipe) / "checkpoints"
    assert (checkpoints_dir / "checkpoint-5").is_dir() and not (
        checkpoints_dir / "checkpoint-5" / checkpoints.MANIFEST
    ).exists()
    assert checkpoints.damage(checkpoints_dir / "checkpoint-4") is None
    done = finish(recipe, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "removing the half-written checkpoint-5" in done.stdout
    assert_same_as_reference(run_dir(recipe), reference)


@pytest.mark.slow
def test_interrupted_saves_campaign(tmp_path, tiny_llama, alpaca_file, reference):
    """Saves cut short, by injected deaths at both stages and by SIGKILLs timed into the save, over and over;
    after each one the newest complete checkpoint must still be valid, and the run must end as if never cut."""
    trials = campaign_size(6, 50)
    recipe = survival_recipe(tmp_path, tiny_llama, alpaca_file, "run")
    folder = run_dir(recipe)
    rng = random.Random(3)
    cut_short = 0
    for trial in range(trials):
        newest = checkpoints.newest_valid(folder / "checkpoints") if folder.exists() else None
        base = int(newest.name.split("-")[1]) if newest else 0
        step = min(base + rng.randint(1, 3), STEPS - 1)
        args = ["--resume"] if newest else ["--overwrite"]
        if trial % 3 == 2:  # a real SIGKILL while the checkpoint's files are being written
            process = start(recipe, *args)
            while process.poll() is None and not (folder / "checkpoints" / f"checkpoint-{step}").exists():
                time.sleep(0.001)
            time.sleep(rng.uniform(0, 0.01))
            process.kill()
            process.wait()
            cut_short += not (folder / "checkpoints" / f"checkpoint-{step}" / checkpoints.MANIFEST).exists()
        else:
            stage = rng.choice(["optimizer", "manifest"])
            assert finish(recipe, *args, QTUNE_FAIL_CHECKPOINT_AT=f"{stage}:{step}").returncode == 86
            cut_short += 1
        if step > 1:
            assert checkpoints.newest_valid(folder / "checkpoints") is not None
    done = finish(recipe, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_as_reference(folder, reference)
    print(f"interrupted-save campaign: {trials} trials, {cut_short} saves cut short, 0 runs lost")


@pytest.mark.parametrize(
    "sig,code_after_second",
    [(signal.SIGTERM, None), pytest.param(signal.SIGINT, 128 + signal.SIGINT, marks=pytest.mark.slow)],
)
def test_sigterm_and_ctrl_c_save_exit_75_and_resume_identically(
    tmp_path, tiny_llama, alpaca_file, reference, sig, code_after_second
):
    recipe = survival_recipe(tmp_path, tiny_llama, alpaca_file, "run")
    process = start(recipe)
    wait_for_step(process, recipe, 6)
    training_at_signal = steps_traced(run_dir(recipe))
    process.send_signal(sig)
    status = process.wait(timeout=60)
    stderr = process.stderr.read()
    assert status == 75, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("qtune: error: stopped by") and "--resume" in last
    step = int(last.split("at step ")[1].split(";")[0])
    # "within seconds": the step in progress is finished and saved, and no further step is started
    # (one more step may have begun between reading the trace and the signal landing)
    last_started = steps_traced(run_dir(recipe))
    assert last_started <= training_at_signal + 1 and step == last_started + 1
    assert checkpoints.damage(run_dir(recipe) / "checkpoints" / f"checkpoint-{step}") is None
    assert "Traceback" not in stderr
    if code_after_second:  # a second Ctrl-C does not wait for the step to end
        again = start(recipe, "--resume")
        wait_for_step(again, recipe, step + 2)
        again.send_signal(sig)
        time.sleep(0.05)
        again.send_signal(sig)
        assert again.wait(timeout=30) in (code_after_second, 75)
    done = finish(recipe, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_as_reference(run_dir(recipe), reference)


def test_stop_requested_during_evaluation_saves_at_the_step_boundary():
    """The callback ends an evaluation in progress; fit() then saves the checkpoint (the state is between steps)."""
    from qtune.training.callbacks import GracefulStop, StoppedDuringEvaluation

    stop = GracefulStop()
    stop.on_prediction_step(None, None, None)  # nothing asked: no effect
    stop.signal_name = "SIGTERM"
    with pytest.raises(StoppedDuringEvaluation):
        stop.on_prediction_step(None, None, None)


# --------------------------------------------------------------------------- corrupted checkpoints


def make_checkpoint(folder: Path, step: int, payload: bytes = b"weights") -> Path:
    target = folder / f"checkpoint-{step}"
    target.mkdir(parents=True)
    (target / "adapter_model.safetensors").write_bytes(payload * 100)
    (target / "optimizer.pt").write_bytes(b"optimizer" * 50)
    (target / "trainer_state.json").write_text("{}")
    checkpoints.write_manifest(target, step)
    return target


@pytest.mark.parametrize("corruption", ["truncated", "flipped byte", "missing state file", "bad manifest"])
def test_corrupted_checkpoint_falls_back_to_the_previous_one(tmp_path, corruption, capsys):
    make_checkpoint(tmp_path, 2)
    newest = make_checkpoint(tmp_path, 4)
    weights = newest / "adapter_model.safetensors"
    if corruption == "truncated":
        weights.write_bytes(weights.read_bytes()[:-10])
    elif corruption == "flipped byte":
        data = bytearray(weights.read_bytes())
        data[17] ^= 0x01
        weights.write_bytes(bytes(data))
    elif corruption == "missing state file":
        (newest / "optimizer.pt").unlink()
    else:
        (newest / checkpoints.MANIFEST).write_text("{not json")
    capsys.readouterr()
    assert checkpoints.newest_valid(tmp_path) == tmp_path / "checkpoint-2"
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 1 and said[0].startswith("warning: checkpoint-4 is damaged") and "checkpoint-2" in said[0]
    assert newest.exists()  # kept for a look, never resumed from


def test_no_valid_checkpoint_is_exit_5(tmp_path):
    from qtune.core.errors import EXIT_INTEGRITY, QtuneError

    only = make_checkpoint(tmp_path, 3)
    (only / "optimizer.pt").write_bytes(b"tampered")
    with pytest.raises(QtuneError) as caught:
        checkpoints.newest_valid(tmp_path)
    assert caught.value.code == EXIT_INTEGRITY and "optimizer.pt" in str(caught.value.line())


def test_half_written_folders_are_removed_and_rotation_keeps_complete_ones(tmp_path):
    for step in (1, 2, 3):
        make_checkpoint(tmp_path, step)
    half = tmp_path / "checkpoint-4"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"half")
    checkpoints.rotate(tmp_path, keep=2)  # the half-written newest one does not count
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    assert checkpoints.newest_valid(tmp_path) == tmp_path / "checkpoint-3"
    assert not half.exists()


def test_resume_end_to_end_skips_a_corrupted_checkpoint(tmp_path, tiny_llama, alpaca_file, reference):
    recipe = survival_recipe(tmp_path, tiny_llama, alpaca_file, "run")
    assert kill_at_step(recipe, 8) == -signal.SIGKILL
    newest = checkpoints.newest_valid(run_dir(recipe) / "checkpoints")
    weights = newest / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    done = finish(recipe, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"warning: {newest.name} is damaged" in done.stdout
    assert_same_as_reference(run_dir(recipe), reference)


# --------------------------------------------------------------------------- changed recipe, full disk, pickles


def test_resume_with_a_changed_recipe_is_refused_unless_forced(tmp_path, tiny_llama, alpaca_file):
    recipe = survival_recipe(tmp_path, tiny_llama, alpaca_file, "run", max_steps=3)
    assert finish(recipe).returncode == 0
    raw = yaml.safe_load(recipe.read_text())
    raw["train"].update(lr=0.01, max_steps=5, logging_steps=2)  # logging is not a training change
    raw["lora"]["r"] = 4
    write_recipe(recipe, raw)
    refused = finish(recipe, "--resume")
    assert refused.returncode == 2
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("qtune: error: the recipe changed") and "train.lr" in line and "lora.r" in line
    assert "logging_steps" not in line and "--force" in line
    raw["lora"]["r"] = 8
    write_recipe(recipe, raw)
    forced = finish(recipe, "--resume", "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]


def limited_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_disk_full_during_a_checkpoint_save_is_exit_4_and_keeps_the_earlier_ones(tmp_path, tiny_llama, alpaca_file):
    recipe = survival_recipe(tmp_path, tiny_llama, alpaca_file, "run", max_steps=3)
    assert finish(recipe).returncode == 0
    raw = yaml.safe_load(recipe.read_text())
    raw["train"]["max_steps"] = 6
    write_recipe(recipe, raw)
    folder = run_dir(recipe) / "checkpoints"
    before = {p.name: checkpoints.damage(p) for p in folder.iterdir()}
    done = subprocess.run(
        [sys.executable, "-m", "qtune", "train", str(recipe), "--resume", "--force"],
        env=environment(),
        capture_output=True,
        text=True,
        preexec_fn=limited_file_size(20_000),
        timeout=600,
    )
    assert done.returncode == 4, done.stderr[-2000:]
    lines = [line for line in re.split(r"[\r\n]", done.stderr) if "qtune:" in line]
    assert len(lines) == 1 and lines[0].startswith("qtune: error: disk full while writing checkpoint-4")
    assert "Traceback" not in done.stderr
    assert {p.name: checkpoints.damage(p) for p in folder.iterdir()} == before  # intact, nothing half-written left


def test_disk_full_during_an_export_is_exit_4_with_nothing_partial(tmp_path, llama_run):
    out = tmp_path / "export"
    done = subprocess.run(
        [sys.executable, "-m", "qtune", "export", str(llama_run), "--format", "merged_fp16", "--out", str(out)],
        env=environment(),
        capture_output=True,
        text=True,
        preexec_fn=limited_file_size(50_000),
        timeout=600,
    )
    assert done.returncode == 4, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("qtune: error: disk full while writing the export")
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, LOCK])  # nothing partial, no staging folder


def test_resume_never_unpickles_code_from_a_checkpoint(tmp_path, tiny_llama, alpaca_file):
    """A checkpoint whose optimizer.pt carries a pickled callable (and a manifest that vouches for it, as an attacker
    would write): the Trainer loads state with weights_only=True, so the code never runs; the user gets exit 5."""
    import torch

    recipe = survival_recipe(tmp_path, tiny_llama, alpaca_file, "run", max_steps=2)
    assert finish(recipe).returncode == 0
    canary = tmp_path / "pwned"
    newest = checkpoints.newest_valid(run_dir(recipe) / "checkpoints")

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    torch.save({"state": Payload()}, newest / "optimizer.pt")
    checkpoints.write_manifest(newest, int(newest.name.split("-")[1]))
    raw = yaml.safe_load(recipe.read_text())
    raw["train"]["max_steps"] = 4
    write_recipe(recipe, raw)
    done = finish(recipe, "--resume", "--force")
    assert not canary.exists()
    assert done.returncode == 5, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("qtune: error: ")
    assert "Traceback" not in done.stderr
