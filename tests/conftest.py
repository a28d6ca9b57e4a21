"""Shared fixtures: small models and tokenizers built here, data written here, nothing downloaded."""

import os

# Before anything imports huggingface_hub / datasets: a test must never reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
from pathlib import Path

import pytest
import yaml

# Small enough for a 2-core CI machine; widths stay multiples of 64 (bitsandbytes' 4-bit block).
TINY_SHAPE = dict(hidden=64, intermediate=128, layers=2, heads=2, kv_heads=1)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from qtune.tiny_models import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from qtune.tiny_models import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama", **TINY_SHAPE)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    from qtune.tiny_models import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", "qwen2", **TINY_SHAPE)


@pytest.fixture(scope="session")
def pretrained_llama(tmp_path_factory) -> Path:
    """Not random: quantization and export errors only mean something on a model that knows something."""
    from qtune.tiny_models import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "pre-llama", "llama", pretrain_steps=60, **TINY_SHAPE)


@pytest.fixture(scope="session")
def pretrained_qwen2(tmp_path_factory) -> Path:
    from qtune.tiny_models import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "pre-qwen2", "qwen2", pretrain_steps=60, **TINY_SHAPE)


@pytest.fixture(scope="session")
def alpaca_file(tmp_path_factory) -> Path:
    from qtune.tiny_models import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("data") / "alpaca.jsonl", count=400)


@pytest.fixture(scope="session")
def messages_file(tmp_path_factory) -> Path:
    from qtune.tiny_models import demo_rows

    path = tmp_path_factory.mktemp("data") / "messages.jsonl"
    with path.open("w") as f:
        for row in demo_rows(300, seed=1):
            messages = [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": f"{row['instruction']} {row['input']}"},
                {"role": "assistant", "content": row["output"]},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def write_jsonl(path: Path, rows) -> Path:
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
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def train_run(tmp_path_factory, model_dir, alpaca_file, name):
    from qtune.cli import main

    folder = tmp_path_factory.mktemp(name)
    raw = recipe_dict(
        model_dir, alpaca_file, folder / "run", lora={"dropout": 0.05}, train={"max_steps": 10, "eval_steps": 10}
    )
    assert main(["train", str(write_recipe(folder / "r.yaml", raw))]) == 0
    return folder / "run"


@pytest.fixture(scope="session")
def llama_run(tmp_path_factory, pretrained_llama, alpaca_file):
    """A finished run on the pretrained tiny Llama (10 steps), shared by the export tests."""
    return train_run(tmp_path_factory, pretrained_llama, alpaca_file, "llama-run")


@pytest.fixture(scope="session")
def spm_llama_run(tmp_path_factory, alpaca_file):
    """A run on a Llama-2-style model: SentencePiece vocabulary with byte fallback, no pad token."""
    from qtune.tiny_models import write_tiny_model

    base = write_tiny_model(
        tmp_path_factory.mktemp("models") / "spm-llama", "llama", tokenizer_kind="spm", pretrain_steps=30, **TINY_SHAPE
    )
    return train_run(tmp_path_factory, base, alpaca_file, "spm-llama-run")


@pytest.fixture(scope="session")
def qwen2_run(tmp_path_factory, pretrained_qwen2, alpaca_file):
    return train_run(tmp_path_factory, pretrained_qwen2, alpaca_file, "qwen2-run")


@pytest.fixture
def run_cli(capsys):
    """Run `qtune ...` in this process; returns (exit code, stdout, stderr)."""
    from qtune.cli import main

    def run(*args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


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
    from qtune.tiny_models import write_tiny_model

    models = tmp_path_factory.mktemp("models")
    base = write_tiny_model(models / folder, family, pretrain_steps=pretrain_steps, **model_extra, **TINY_SHAPE)
    return train_run(tmp_path_factory, base, alpaca_file, f"{folder}-run")


@pytest.fixture(scope="session")
def llama3_run(tmp_path_factory, alpaca_file):
    """A run on a Llama-3-style model: llama3 rope scaling (original context 32 positions)."""
    return family_run(tmp_path_factory, alpaca_file, "llama", "llama3", pretrain_steps=30, config_extra=LLAMA3_ROPE)


@pytest.fixture(scope="session")
def pretrained_qwen3(tmp_path_factory) -> Path:
    from qtune.tiny_models import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "pre-qwen3", "qwen3", pretrain_steps=60, **TINY_SHAPE)


@pytest.fixture(scope="session")
def qwen3_run(tmp_path_factory, pretrained_qwen3, alpaca_file):
    """Qwen3: q/k norms, tied embeddings, head_dim 128 where hidden / heads is 32."""
    return train_run(tmp_path_factory, pretrained_qwen3, alpaca_file, "qwen3-run")


@pytest.fixture(scope="session")
def mistral_run(tmp_path_factory, alpaca_file):
    """Mistral: a sliding-window config, written to GGUF as llama (as llama.cpp's converter does)."""
    return family_run(tmp_path_factory, alpaca_file, "mistral", "mistral")


@pytest.fixture(scope="session")
def gemma3_run(tmp_path_factory, alpaca_file):
    """Gemma 3: norms that multiply by (1 + w), q/k norms, sliding layers, tied embeddings; bf16 on a GPU."""
    return family_run(tmp_path_factory, alpaca_file, "gemma3", "gemma3")


@pytest.fixture(scope="session")
def phi3_run(tmp_path_factory, alpaca_file):
    """Phi-3: fused qkv_proj and gate_up_proj, which LoRA all-linear trains and GGUF keeps fused."""
    return family_run(tmp_path_factory, alpaca_file, "phi3", "p3")


@pytest.fixture(scope="session")
def gemma2_run(tmp_path_factory, alpaca_file):
    """Gemma 2: logit soft-capping (eager attention), alternating sliding window, norms that multiply by (1 + w)."""
    return family_run(tmp_path_factory, alpaca_file, "gemma2", "gemma2", pretrain_steps=30)
