"""End-to-end fine-tuning on small local models: through the CLI and through the stage functions."""

import json
from pathlib import Path

import pytest
import torch
from helpers import interrupted_and_resumed, losses_after_step, recipe_dict, write_jsonl, write_recipe
from safetensors.torch import load_file

from qtune.config.recipe import validate_recipe
from qtune.core.folders import claimed_run
from qtune.training.run import fit, prepare


def lora_state(path):
    return load_file(str(path / "adapter_model.safetensors"))


def test_cli_train_end_to_end(tmp_path, tiny_llama, alpaca_file, run_cli):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_llama, alpaca_file, out, train={"max_steps": 8}))
    code, stdout, stderr = run_cli("train", recipe)
    assert code == 0, stderr
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "train_loss",
        "eval_loss_before",
        "eval_loss",
        "eval_perplexity",
        "global_step",
        "train_tokens",
        "tokens_per_second",
        "peak_memory_bytes",
    ):
        assert metrics[key] is not None, key
    assert metrics["global_step"] == 8
    assert metrics["compute_dtype"] == "fp32"  # CPU: auto must pick fp32
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item(), rel=1e-5)
    assert metrics["train_tokens"] > 0 and metrics["tokens_per_second"] > 0
    assert metrics["peak_memory_bytes"] > 10 * 2**20
    env = metrics["environment"]  # where it trained, for the page, the card and whoever compares figures
    assert env["versions"]["transformers"] and env["cpu"]["kind"] and env["gpu"] is None
    assert isinstance(env["differs_from_tested"], dict)
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= {
        p.name for p in (out / "adapter").iterdir()
    }
    assert (out / "loss.png").stat().st_size > 1000
    assert validate_recipe(__import__("yaml").safe_load((out / "recipe.yaml").read_text())).train.max_steps == 8
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-3",
        "checkpoint-6",
        "checkpoint-8",
    ]
    assert "eval loss" in stdout and "->" in stdout


def train_in_process(recipe_raw):
    """The CLI's path without argument parsing, keeping the trainer to inspect the trained model."""
    recipe = validate_recipe(recipe_raw)
    run_dir = Path(recipe.train.output_dir)
    with claimed_run(run_dir, resume=False, overwrite=False):
        pass
    return recipe, run_dir, prepare(recipe, run_dir, resume=False)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_training_changes_every_lora_weight_and_the_adapter_reloads(
    tmp_path, family, tiny_llama, tiny_qwen2, alpaca_file
):
    from peft import PeftModel

    from qtune.modeling.load import load_base

    model_dir = tiny_llama if family == "llama" else tiny_qwen2
    recipe, run_dir, prepared = train_in_process(
        recipe_dict(model_dir, alpaca_file, tmp_path / "run", lora={"dropout": 0.05})
    )
    model = prepared.trainer.model
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())  # trl's bf16 cast undone

    metrics = fit(recipe, run_dir, prepared)
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    unchanged = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p.detach(), trainable[n])]
    assert unchanged == []

    batch = torch.tensor(prepared.data.val[0]["input_ids"])[None]
    model.eval()
    with torch.no_grad():
        trained_logits = model(input_ids=batch).logits
    base = load_base(recipe.model, recipe.quant, torch.float32)
    reloaded = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    with torch.no_grad():
        reloaded_logits = reloaded(input_ids=batch).logits
    torch.testing.assert_close(reloaded_logits, trained_logits, rtol=0, atol=1e-5)


def test_resume_gives_the_same_losses_and_adapter(tmp_path, tiny_llama, alpaca_file, run_cli):
    """Stop after checkpoint-3 of 6, resume: steps 4-6 must match the uninterrupted run."""
    raw = recipe_dict(
        tiny_llama, alpaca_file, tmp_path / "full", lora={"dropout": 0.1}, train={"optimizer": "paged_adamw_8bit"}
    )
    full, cut = interrupted_and_resumed(run_cli, tmp_path, raw)
    assert len(losses_after_step(full, 3)) == 3
    assert losses_after_step(cut, 3) == losses_after_step(full, 3)
    resumed, uninterrupted = lora_state(cut / "adapter"), lora_state(full / "adapter")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert json.loads((cut / "metrics.json").read_text())["resumed_from"] == "checkpoint-3"


def test_messages_training_with_trackers(tmp_path, tiny_llama, messages_file, run_cli):
    out = tmp_path / "run"
    raw = recipe_dict(
        tiny_llama,
        messages_file,
        out,
        fmt="messages",
        log={"report_to": ["wandb", "tensorboard"], "project": "qtune-tests"},
        lora={"use_rslora": True},
    )
    code, _, err = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 0, err
    wandb_runs = list((out / "wandb").glob("offline-run-*"))
    assert wandb_runs and any(p.suffix == ".wandb" for p in wandb_runs[0].iterdir())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert "train/loss" in accumulator.Tags()["scalars"]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["use_rslora"] is True


def test_dora_trains(tmp_path, tiny_qwen2, alpaca_file, run_cli):
    out = tmp_path / "run"
    raw = recipe_dict(
        tiny_qwen2, alpaca_file, out, lora={"use_dora": True}, train={"max_steps": 3, "optimizer": "adamw_torch"}
    )
    code, _, err = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 0, err
    assert any("lora_magnitude_vector" in k for k in lora_state(out / "adapter"))


# --------------------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    "change, code, message",
    [
        (lambda r, d: r["data"]["datasets"][0].update(path=str(d / "missing.jsonl")), 3, "dataset file not found"),
        (lambda r, d: r["model"].update(name=str(d / "no-model")), 4, "no such folder"),
        (lambda r, d: r["lora"].update(target_modules=["qkv"]), 2, "match no layer"),
        (lambda r, d: r["train"].update(extra={"warmup_step": 3}), 2, "did you mean 'warmup_steps'"),
        (
            lambda r, d: r["data"]["datasets"][0].update(
                path=str(write_jsonl(d / "bad.jsonl", [{"instruction": "x"}]))
            ),
            3,
            "column 'output' missing",
        ),
    ],
)
def test_user_errors_leave_no_output_dir(tmp_path, tiny_llama, alpaca_file, run_cli, change, code, message):
    out = tmp_path / "run"
    raw = recipe_dict(tiny_llama, alpaca_file, out)
    change(raw, tmp_path)
    got, stdout, stderr = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert got == code
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qtune: error:") and message in lines[0]
    assert "Traceback" not in stderr
    assert not out.exists()


def test_existing_output_dir_is_protected(tmp_path, tiny_llama, alpaca_file, run_cli):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_llama, alpaca_file, out))
    code, _, err = run_cli("train", recipe)
    assert code == 2 and "did not create" in err
    code, _, err = run_cli("train", recipe, "--resume")
    assert code == 5 and "nothing to resume" in err
    assert (out / "notes.txt").read_text() == "mine"


def test_notebook_api(tmp_path, tiny_llama, alpaca_file):
    import qtune

    raw = recipe_dict(tiny_llama, alpaca_file, tmp_path / "run")
    metrics = qtune.train(raw, overrides=["train.max_steps=2", "lora.r=4"])
    assert metrics["global_step"] == 2
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4
    again = qtune.train(raw, overrides=["train.max_steps=1"], overwrite=True)
    assert again["global_step"] == 1


def test_the_peak_rss_is_the_process_own_not_its_parents():
    """A child's ru_maxrss starts at its parent's peak on Linux; qtune's CPU peak must not (it read 834-839 MiB for
    the demo run inside the test suite, 716-728 MiB alone)."""
    import subprocess
    import sys

    parent = bytearray(600 * 2**20)
    parent[::4096] = b"\x01" * len(parent[::4096])  # resident, not just reserved
    code = "from qtune.training.report import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < 400 * 2**20 < len(parent)  # the child imports torch (~300 MiB), never 600 MiB of its parent's
