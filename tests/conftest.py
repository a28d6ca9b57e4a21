"""Shared fixtures: small models and tokenizers built here, data written here, finished runs, the local stand-in of the
Hub; nothing downloaded. Plain helpers are in helpers.py."""

import os

# Before anything imports huggingface_hub / datasets: a test must never reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tokenized-data cache (qtune.data.tokenized) and datasets' own: a fresh one per test session, never the user's.
os.environ["HF_DATASETS_CACHE"] = __import__("tempfile").mkdtemp(prefix="qtune-test-datasets-")

import json
from pathlib import Path

import pytest
from helpers import CANARY, LLAMA3_ROPE, TINY_SHAPE, family_run, train_run


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from qtune.demo.tiny_models import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from qtune.demo.tiny_models import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama", **TINY_SHAPE)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    from qtune.demo.tiny_models import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", "qwen2", **TINY_SHAPE)


@pytest.fixture(scope="session")
def pretrained_llama(tmp_path_factory) -> Path:
    """Not random: quantization and export errors only mean something on a model that knows something."""
    from qtune.demo.tiny_models import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "pre-llama", "llama", pretrain_steps=60, **TINY_SHAPE)


@pytest.fixture(scope="session")
def pretrained_qwen2(tmp_path_factory) -> Path:
    from qtune.demo.tiny_models import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "pre-qwen2", "qwen2", pretrain_steps=60, **TINY_SHAPE)


@pytest.fixture(scope="session")
def alpaca_file(tmp_path_factory) -> Path:
    from qtune.demo.tiny_models import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("data") / "alpaca.jsonl", count=400)


@pytest.fixture(scope="session")
def messages_file(tmp_path_factory) -> Path:
    from qtune.demo.tiny_models import demo_rows

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


@pytest.fixture(scope="session")
def llama_run(tmp_path_factory, pretrained_llama, alpaca_file):
    """A finished run on the pretrained tiny Llama (10 steps), shared by the export tests."""
    return train_run(tmp_path_factory, pretrained_llama, alpaca_file, "llama-run")


@pytest.fixture(scope="session")
def spm_llama_run(tmp_path_factory, alpaca_file):
    """A run on a Llama-2-style model: SentencePiece vocabulary with byte fallback, no pad token."""
    from qtune.demo.tiny_models import write_tiny_model

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


@pytest.fixture(scope="session")
def llama3_run(tmp_path_factory, alpaca_file):
    """A run on a Llama-3-style model: llama3 rope scaling (original context 32 positions)."""
    return family_run(tmp_path_factory, alpaca_file, "llama", "llama3", pretrain_steps=30, config_extra=LLAMA3_ROPE)


@pytest.fixture(scope="session")
def pretrained_qwen3(tmp_path_factory) -> Path:
    from qtune.demo.tiny_models import write_tiny_model

    # head size 16: not hidden / heads (32), not Qwen3Config's default (128), which transformers' GGUF reader assumes
    folder = tmp_path_factory.mktemp("models") / "pre-qwen3"
    return write_tiny_model(folder, "qwen3", pretrain_steps=60, config_extra={"head_dim": 16}, **TINY_SHAPE)


@pytest.fixture(scope="session")
def qwen3_run(tmp_path_factory, pretrained_qwen3, alpaca_file):
    """Qwen3: q/k norms, tied embeddings, a head size (16) of its own."""
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


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A local stand-in of the Hugging Face Hub (hub_server.py) that huggingface_hub talks to, with a canary token."""
    import huggingface_hub.constants
    from hub_server import FakeHub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", CANARY)
        # The suite runs offline (above); these tests talk to 127.0.0.1 only.
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        yield server
