"""Merging a LoRA adapter into its base, streamed tensor by tensor into sharded safetensors.

Hand-written for a measured reason: peft's merge_and_unload needs the whole model in memory and, on a 4-bit model,
re-quantizes the merged weights (0.56 max |Δlogit| measured). Streaming from the base checkpoint holds one tensor and
one output shard at a time (1.19x the output size at peak on a 1.1B model, bench/merge_memory.py), and reproducing
bitsandbytes' exact NF4 round trip merges into the weights the adapter was trained against.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from qtune.errors import EXIT_INTEGRITY, EXIT_RECIPE, QtuneError
from qtune.fsutil import publish, staging_dir_for
from qtune.model import DTYPES, resolve_compute_dtype
from qtune.run_dir import TrainedRun
from qtune.testhooks import fault_point
from qtune.weights import (
    base_checkpoint,
    checkpoint_tensors,
    dequantize_saved,
    is_quant_state_part,
    quantized_weight_names,
    saved_quantization,
)

SHARD_BYTES = 2**30  # output shard; the merge holds at most one in memory


def lora_deltas(adapter_dir: Path):
    """{module name: (A, B, scale, magnitude or None)} from a saved peft LoRA adapter."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise QtuneError(f"only LoRA adapters can be merged, this is {config.get('peft_type')}", code=EXIT_INTEGRITY)
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    modules: dict[str, dict] = {}
    for key, value in tensors.items():
        name = key.removeprefix("base_model.model.")
        part = next(
            (p for p in (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector") if name.endswith(p)), None
        )
        if part is None:  # e.g. modules_to_save or trainable tokens: merging without them would be silently wrong
            raise QtuneError(
                f"adapter holds weights qtune cannot merge: {key}", where=str(adapter_dir), code=EXIT_INTEGRITY
            )
        modules.setdefault(name[: -len(part)], {})[part] = value
    deltas = {}
    for module, parts in modules.items():
        if ".lora_A.weight" not in parts or ".lora_B.weight" not in parts:
            raise QtuneError(
                f"adapter is missing lora_A/lora_B for {module}", where=str(adapter_dir), code=EXIT_INTEGRITY
            )
        deltas[module] = (parts[".lora_A.weight"], parts[".lora_B.weight"], scale, parts.get(".lora_magnitude_vector"))
    if not deltas:
        raise QtuneError("adapter holds no LoRA weights", where=str(adapter_dir), code=EXIT_INTEGRITY)
    return deltas


def merge_weight(base_weight, delta) -> torch.Tensor:
    """W + scale * B @ A in fp32; with DoRA, rescaled per output row to the learned magnitude (as peft merges)."""
    lora_a, lora_b, scale, magnitude = delta
    weight = base_weight.float()
    merged = weight + scale * (lora_b.float() @ lora_a.float())
    if magnitude is not None:
        # peft normalises W + scale*BA (the delta detached during training, same value here).
        merged = merged * (magnitude.float() / merged.norm(p=2, dim=1)).unsqueeze(1)
    return merged


class ShardWriter:
    """Safetensors shards of at most `shard_bytes`, named and indexed the way transformers saves them."""

    def __init__(self, folder: Path, shard_bytes: int = SHARD_BYTES):
        self.folder = folder
        self.shard_bytes = shard_bytes
        self.pending: dict = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self.flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += size
        self.total += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.folder / name), metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        if len(self.files) == 1:
            os.replace(self.folder / self.files[0][0], self.folder / "model.safetensors")
            return
        weight_map = {}
        count = len(self.files)
        for index, (temporary, names) in enumerate(self.files, start=1):
            final = f"model-{index:05d}-of-{count:05d}.safetensors"
            os.replace(self.folder / temporary, self.folder / final)
            weight_map.update({n: final for n in names})
        index_file = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))


def training_compute_dtype(trained: TrainedRun):
    """The dtype the run quantized its base in (recorded at training time), so the merge sees the same NF4 weights."""
    recorded = trained.metrics().get("compute_dtype")
    if recorded in DTYPES:
        return DTYPES[recorded]
    return resolve_compute_dtype(trained.recipe.quant.compute_dtype) if torch.cuda.is_available() else torch.float32


def nf4_round_trip(weight, quant, device):
    """The weight as the 4-bit base holds it: quantized and dequantized exactly as bitsandbytes does on load."""
    import bitsandbytes as bnb

    packed, state = bnb.functional.quantize_4bit(
        weight.to(device), blocksize=64, compress_statistics=quant.double_quant, quant_type=quant.type
    )
    return bnb.functional.dequantize_4bit(packed, state)


def write_merged(
    run: TrainedRun, target: Path, *, dtype_name: str, merge_base: str, shard_bytes: int = SHARD_BYTES, echo=print
) -> Path:
    """Merge the adapter into the base, streaming tensor by tensor from the base checkpoint into sharded safetensors.

    The default base is the dequantized NF4 weights the adapter was trained against: merging there
    reproduces the adapter-on-NF4 model (the LoRA delta compensated for the quantization error), while
    merging into the original weights adds the delta to weights it never saw. Each tensor is read with
    its file opened only for that read, so memory holds one tensor and one output shard at a time.
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    dtype = getattr(torch, dtype_name)
    deltas = lora_deltas(run.adapter_dir)
    folder = base_checkpoint(run.recipe.model.name, run.recipe.model.revision)
    location = checkpoint_tensors(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=run.recipe.model.trust_remote_code)
    quantized = quantized_weight_names(config)
    prequantized = saved_quantization(config) is not None
    if prequantized and merge_base == "original":
        raise QtuneError(
            f"{run.recipe.model.name} is saved in 4-bit: there are no original weights to merge into",
            fix="merge into the dequantized weights (the default --merge-base)",
            code=EXIT_RECIPE,
        )
    compute = training_compute_dtype(run)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    staging = staging_dir_for(target)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        writer = ShardWriter(staging, shard_bytes)
        for key, file in location.items():
            if prequantized and is_quant_state_part(key):
                continue  # read with its weight by dequantize_saved
            with safe_open(str(file), framework="pt") as handle:
                tensor = handle.get_tensor(key)
            if key in quantized:
                if prequantized:  # the 4-bit weights training saw, as they are
                    weight = dequantize_saved(key, location, device).to(compute)
                else:
                    weight = tensor.to(compute)
                    if merge_base == "dequantized":
                        weight = nf4_round_trip(weight, run.recipe.quant, device)
                module = key.removesuffix(".weight")
                if module in deltas:
                    weight = merge_weight(
                        weight.float(),
                        [t.to(weight.device) if isinstance(t, torch.Tensor) else t for t in deltas.pop(module)],
                    )
                tensor = weight
            writer.add(key, tensor.to(dtype) if tensor.dtype.is_floating_point else tensor)
            del tensor
        if deltas:
            raise QtuneError(
                f"adapter layers not found in the base checkpoint: {sorted(deltas)[:3]}",
                fix="was the adapter trained on this base?",
                code=EXIT_INTEGRITY,
            )
        writer.close()
        merged_config = config.to_dict()
        merged_config.pop("quantization_config", None)
        merged_config["dtype"] = dtype_name
        (staging / "config.json").write_text(json.dumps(merged_config, indent=2))
        if (folder / "generation_config.json").is_file():
            shutil.copy2(folder / "generation_config.json", staging / "generation_config.json")
        copy_tokenizer(run.adapter_dir, staging)
        fault_point("merged")
        publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    echo(f"export: {target.name}: {writer.total / 2**20:.1f} MiB in {len(writer.files)} shard(s)")
    return target


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def copy_tokenizer(source: Path, target: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
