"""What a new user sees: no library noise, prompts that match training, pipes, threads on a shared machine."""

import os
import subprocess
import sys

import pytest
from helpers import recipe_dict, write_recipe

# Lines the libraries print that a user cannot act on (each one was seen in a `qtune train` of the demo).
LIBRARY_NOISE = (
    "Truncating train dataset",
    "Dropping fully masked",
    "PAD/BOS/EOS",
    "Paged optimizers are not supported",
    "site-packages",
    "kernels-community",
    "tok/s=0",
    "Warning",
    "Traceback",
)


def qtune(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qtune", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})},
        timeout=600,
        **kwargs,
    )


def test_a_training_run_prints_qtune_lines_and_no_library_noise(tmp_path, tiny_llama, alpaca_file):
    raw = recipe_dict(
        tiny_llama, alpaca_file, tmp_path / "run", train={"max_steps": 4, "optimizer": "paged_adamw_8bit"}
    )
    done = qtune("train", write_recipe(tmp_path / "r.yaml", raw))
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stdout + done.stderr
    assert [noise for noise in LIBRARY_NOISE if noise in said] == []
    assert "optimizer: paged_adamw_8bit pages its state only on a GPU" in said  # the warning, in qtune's words
    lines = done.stdout.strip().splitlines()
    assert any(line.startswith("data:") for line in lines)
    assert any(line.startswith("done: 4 steps") and "tokens/s" in line for line in lines)


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_a_preference_run_prints_qtune_lines_and_no_library_noise(tmp_path, tiny_llama, method):
    from qtune.demo.tiny_models import write_demo_data

    pairs = write_demo_data(tmp_path / "pairs.jsonl", count=40, preference=True)
    raw = recipe_dict(tiny_llama, pairs, tmp_path / "run", fmt="preference", train={"max_steps": 2, "method": method})
    done = qtune("train", write_recipe(tmp_path / "r.yaml", raw))
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert [noise for noise in LIBRARY_NOISE if noise in output] == [], output[-3000:]
    assert "reward accuracy" in done.stdout


def test_generate_builds_the_alpaca_prompt_with_its_input_exactly_as_training_did(tmp_path, tiny_llama, alpaca_file):
    from qtune.config.recipe import validate_recipe
    from qtune.data.sft import build
    from qtune.demo.tiny_models import demo_rows
    from qtune.modeling.load import load_tokenizer
    from qtune.publish.chat import build_prompt

    row = demo_rows(1, seed=3)[0]
    data = tmp_path / "one.jsonl"
    data.write_text(__import__("json").dumps(row) + "\n")
    recipe = validate_recipe(recipe_dict(tiny_llama, data, tmp_path / "run", data={"val_size": 0}))
    tokenizer = load_tokenizer(recipe.model)
    trained = build(recipe.data, tokenizer, seed=0).train[0]
    prompt_length = next(i for i, label in enumerate(trained["labels"]) if label != -100)
    with_input = build_prompt(
        tokenizer, "alpaca", [{"role": "user", "content": row["instruction"]}], alpaca_input=row["input"]
    )
    assert with_input == trained["input_ids"][:prompt_length]
    without = build_prompt(tokenizer, "alpaca", [{"role": "user", "content": row["instruction"]}])
    assert "### Input:" in tokenizer.decode(with_input) and "### Input:" not in tokenizer.decode(without)


def test_chat_input_command_feeds_the_next_instruction_only(monkeypatch, tiny_tokenizer):
    import io

    from qtune.modeling.generation import Reply
    from qtune.publish import chat

    prompts = []

    def generate_recording_the_prompt(model, tokenizer, prompt, **_):
        prompts.append(tokenizer.decode(prompt))
        return Reply(text="ok", finish_reason="stop", new_tokens=1)

    monkeypatch.setattr(chat, "generate", generate_recording_the_prompt)
    out = io.StringIO()
    chat.chat_loop(
        None,
        tiny_tokenizer,
        "alpaca",
        stdin=io.StringIO("/input cloud\nReverse the word.\nReverse the word.\n"),
        stdout=out,
    )
    assert "### Input:\ncloud" in prompts[0] and "### Input:" not in prompts[1]
    assert "[input for the next instruction: 'cloud']" in out.getvalue()


def test_output_piped_into_head_ends_quietly(tiny_llama):
    done = subprocess.run(
        f"{sys.executable} -m qtune memory {tiny_llama} --json | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.strip() == "{" and done.stderr == ""


def test_make_tiny_model_says_what_it_does(tmp_path):
    listed = next(line for line in qtune("--help").stdout.splitlines() if "make-tiny-model" in line and "build" in line)
    assert "pretrain" in listed and "random" not in listed
    done = qtune("make-tiny-model", tmp_path / "m", "--pretrain-steps", "3")
    assert done.returncode == 0 and done.stdout.startswith("make-tiny-model: building")
    assert "pretraining: 100%" in done.stderr  # the bar, on a step that takes a while on a busy machine


@pytest.mark.parametrize(
    ("cores", "busy", "threads"), [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.9, 1), (2, 5.0, 1), (16, 3.2, 13)]
)
def test_threads_follow_the_free_cores(cores, busy, threads):
    from qtune.core.cpu_threads import choose_threads

    assert choose_threads(cores, busy) == threads


def test_a_busy_machine_is_said_and_the_thread_pool_follows_it(monkeypatch, capsys):
    """Before training and while it runs: neighbours take cores, qtune trains on the rest; they leave, it takes all."""
    import torch

    from qtune.core import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(cpu_threads.SETTING, raising=False)
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 4)
    load = iter([0.0, 3.0, 0.0])  # the priming call, three cores busy elsewhere, then none
    monkeypatch.setattr(cpu_threads.FreeCoreThreads, "busy_elsewhere", lambda self: next(load, 0.0))
    before = torch.get_num_threads()

    def last_line() -> str:
        return capsys.readouterr().out.splitlines()[-1]

    try:
        threads = cpu_threads.FreeCoreThreads(recheck_seconds=0.0)
        assert threads.start(sample_seconds=0) == 1 and torch.get_num_threads() == 1
        assert last_line().startswith("cpu: other processes keep 3.0 of 4 cores busy; training on 1 thread")
        threads.recheck()
        assert torch.get_num_threads() == 4 and last_line().startswith("cpu: the other processes are gone")
        monkeypatch.setenv(cpu_threads.SETTING, "all")
        assert cpu_threads.FreeCoreThreads().start(sample_seconds=0) is None
        monkeypatch.setenv(cpu_threads.SETTING, "3")
        assert cpu_threads.FreeCoreThreads().start(sample_seconds=0) == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_hub_retries_stay_quiet_when_the_hub_is_first_imported_by_the_silencing_itself():
    """huggingface_hub logs "'...' thrown while requesting HEAD" and "Retrying in 8s" five times before the error
    qtune turns into one line (`qtune eval --tasks hellaswag` offline printed them). Its import resets its logger's
    level, so the level must be set after it is imported: in a fresh process, where quiet_library_noise imports it."""
    probe = (
        "import logging, sys; from qtune.core.noise import quiet_library_noise; "
        "assert 'huggingface_hub' not in sys.modules; quiet_library_noise(); "
        "print(logging.getLogger('huggingface_hub.utils._http').getEffectiveLevel())"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(40)  # logging.ERROR
