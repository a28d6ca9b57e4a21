"""A base model's weights on disk, and which of them bitsandbytes quantizes: for the merge, the GGUF writer and the
memory plan (one answer for all three, from transformers' own rules); and bases saved already in 4-bit."""

from __future__ import annotations

from pathlib import Path

from qtune.core.errors import EnvironmentProblem, RecipeError
from qtune.core.network import hub_unreachable


def base_checkpoint(model_name: str, revision: str) -> Path:
    """The folder holding the base model's own files: local, or the Hub cache (downloaded if missing)."""
    path = Path(model_name).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    unreachable = hub_unreachable()
    try:
        return Path(
            snapshot_download(
                model_name,
                revision=revision,
                allow_patterns=["*.safetensors", "*.json"],
                local_files_only=unreachable is not None,
            )
        )
    except Exception as e:  # offline, gated, missing: all mean the same to the user here
        reason = (
            f"the Hub cannot be reached ({unreachable}) and they are not cached" if unreachable else type(e).__name__
        )
        raise EnvironmentProblem(
            f"cannot get the base weights of {model_name}: {reason}",
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
    from transformers import AutoModelForCausalLM
    from transformers.integrations import replace_with_bnb_linear
    from transformers.quantizers.base import HfQuantizer

    from qtune.modeling.precision import bnb_config

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    skip = HfQuantizer.get_modules_to_not_convert(skeleton, None, skeleton._keep_in_fp32_modules)
    skeleton = replace_with_bnb_linear(
        skeleton,
        modules_to_not_convert=skip,
        quantization_config=bnb_config("nf4"),
        pre_quantized=False,
    )
    return {f"{name}.weight" for name, module in skeleton.named_modules() if isinstance(module, bnb.nn.Linear4bit)}


# --------------------------------------------------------------------------- bases saved already in 4-bit

# What bitsandbytes saves beside each packed 4-bit weight ("<module>.weight.<part>"): its quantization state.
QUANT_STATE_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def saved_quantization(config) -> dict | None:
    """The quantization a checkpoint was saved with (the `*-bnb-4bit` repos), or None for plain weights."""
    saved = getattr(config, "quantization_config", None)
    if saved is None:
        return None
    return saved if isinstance(saved, dict) else saved.to_dict()


def check_prequantized(saved: dict, quant_type: str, double_quant: bool, model_name: str) -> None:
    """A saved 4-bit base loads as it is: the recipe must say what it is, not ask for another quantization."""
    if saved.get("quant_method") != "bitsandbytes" or not saved.get("load_in_4bit"):
        raise EnvironmentProblem(
            f"{model_name} is saved quantized with {saved.get('quant_method')} "
            f"{'8-bit' if saved.get('load_in_8bit') else ''}; qtune trains on bitsandbytes 4-bit bases",
            fix="use the model's unquantized weights or a bitsandbytes 4-bit (*-bnb-4bit) version",
        )
    if saved.get("bnb_4bit_quant_type") != quant_type or bool(saved.get("bnb_4bit_use_double_quant")) != double_quant:
        raise RecipeError(
            f"{model_name} is saved in 4-bit {saved.get('bnb_4bit_quant_type')} with double_quant "
            f"{bool(saved.get('bnb_4bit_use_double_quant'))}, the recipe asks for {quant_type} with double_quant "
            f"{double_quant}",
            fix=f"set quant.type: {saved.get('bnb_4bit_quant_type')} and quant.double_quant: "
            f"{str(bool(saved.get('bnb_4bit_use_double_quant'))).lower()} (a saved 4-bit base is not re-quantized)",
        )


def is_quant_state_part(key: str) -> bool:
    """Whether a checkpoint key is part of a 4-bit weight's saved quantization state (not a weight of its own)."""
    base, _, part = key.partition(".weight.")
    return bool(base) and (part in QUANT_STATE_PARTS or part.startswith("quant_state."))


def dequantize_saved(key: str, location: dict[str, Path], device):
    """The weight `key` of a checkpoint saved in 4-bit, as bitsandbytes dequantizes it: what training saw."""
    import bitsandbytes as bnb
    from safetensors import safe_open

    def read(name):
        with safe_open(str(location[name]), framework="pt") as handle:
            return handle.get_tensor(name).to(device)

    parts = {name.removeprefix(key + "."): read(name) for name in location if name.startswith(key + ".")}
    state = bnb.functional.QuantState.from_dict(parts, device)
    return bnb.functional.dequantize_4bit(read(key), state)
