"""A base model's weights on disk, and which of them bitsandbytes quantizes: for the merge, the GGUF writer and the
memory plan (one answer for all three, from transformers' own rules)."""

from __future__ import annotations

from pathlib import Path

from qtune.errors import EnvironmentProblem


def base_checkpoint(model_name: str, revision: str) -> Path:
    """The folder holding the base model's own files: local, or the Hub cache (downloaded if missing)."""
    path = Path(model_name).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_name, revision=revision, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as e:  # offline, gated, missing: all mean the same to the user here
        raise EnvironmentProblem(
            f"cannot get the base weights of {model_name}: {type(e).__name__}",
            fix="make the base model available (network, `hf auth login`, or a local folder)",
        ) from None


def checkpoint_tensors(folder: Path) -> dict[str, Path]:
    """tensor name -> safetensors file, in file order."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise EnvironmentProblem(f"no safetensors weights in {folder}", fix="qtune reads safetensors only")
    location = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            location.update({key: file for key in handle.keys()})
    return location


def quantized_weight_names(config) -> set[str]:
    """Weights bitsandbytes turns into 4-bit on load, decided by transformers' own rules on an empty (meta) model."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.integrations import replace_with_bnb_linear
    from transformers.quantizers.base import HfQuantizer

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    skip = HfQuantizer.get_modules_to_not_convert(skeleton, None, skeleton._keep_in_fp32_modules)
    skeleton = replace_with_bnb_linear(
        skeleton,
        modules_to_not_convert=skip,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True),
        pre_quantized=False,
    )
    return {f"{name}.weight" for name, module in skeleton.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
