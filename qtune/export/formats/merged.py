"""The merged formats (merged_fp16, merged_bf16): the LoRA adapter merged into its base, streamed tensor by tensor into
sharded safetensors; and the fp16 merge the NF4 and GGUF writers start from.

Written here rather than with peft's merge_and_unload, which needs the whole model in memory and, on a 4-bit model,
re-quantizes the merged weights: streaming from the base checkpoint holds one tensor and one output shard at a time,
and reproducing bitsandbytes' exact NF4 round trip merges into the weights the adapter was trained against. Each
module's LoRA scale comes from peft's own config handling (rank_pattern, alpha_pattern, rsLoRA), so it equals peft's
merge (tests/test_export.py).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from qtune.core.errors import EXIT_INTEGRITY, EXIT_RECIPE, QtuneError
from qtune.core.fs import staged
from qtune.core.log import get_logger
from qtune.core.testhooks import fault_point

if TYPE_CHECKING:
    from qtune.config.runs import TrainedRun
    from qtune.export.formats import ExportJob

log = get_logger(__name__)

SHARD_BYTES = 2**30  # output shard; the merge holds at most one in memory


def lora_scale(config, module: str) -> float:
    """The scale of module `module`'s LoRA delta, as peft computes it: its rank and alpha from rank_pattern and
    alpha_pattern (the global r and lora_alpha where no pattern matches), alpha / r, or alpha / sqrt(r) with rsLoRA."""
    from peft.utils.other import get_pattern_key

    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def lora_deltas(adapter_dir: Path):
    """{module name: (A, B, scale, magnitude or None)} from a saved peft LoRA adapter."""
    from peft import PeftConfig
    from safetensors.torch import load_file

    config = PeftConfig.from_pretrained(str(adapter_dir))
    if config.peft_type != "LORA":
        raise QtuneError(f"only LoRA adapters can be merged, this is {config.peft_type}", code=EXIT_INTEGRITY)
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
        deltas[module] = (
            parts[".lora_A.weight"],
            parts[".lora_B.weight"],
            lora_scale(config, module),
            parts.get(".lora_magnitude_vector"),
        )
    if not deltas:
        raise QtuneError("adapter holds no LoRA weights", where=str(adapter_dir), code=EXIT_INTEGRITY)
    return deltas


def merge_weight(base_weight, delta):
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
        """Adds a tensor, writing the pending shard first when the tensor would overflow it."""
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self.flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += size
        self.total += size

    def flush(self) -> None:
        """Writes the pending tensors as the next shard."""
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.folder / name), metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Writes the last shard and names the shards (and their index) as transformers does."""
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
    import torch

    from qtune.modeling.precision import DTYPES, resolve_compute_dtype

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


def merged_config(config):
    """The merged model's config, from the base's: its architecture as it is (head size, rope, tied embeddings),
    without the base's quantization. The merged export's config.json is written from it, and the GGUF loader builds
    its model from it rather than from what transformers' GGUF reader guesses from the file's keys."""
    merged = copy.deepcopy(config)
    if hasattr(merged, "quantization_config"):
        del merged.quantization_config
    return merged


def write_merged(
    run: TrainedRun,
    target: Path,
    dtype_name: str,
    merge_base: str,
    shard_bytes: int = SHARD_BYTES,
    label: str | None = None,
) -> Path:
    """Merges the adapter into the base, streaming tensor by tensor from the base checkpoint into sharded safetensors
    in `dtype_name` at `target`; returns `target`. `label` names it in the log line (default: its file name).

    The default base is the dequantized NF4 weights the adapter was trained against: merging there reproduces the
    adapter-on-NF4 model (the LoRA delta compensated for the quantization error), while merging into the original
    weights adds the delta to weights it never saw. Each tensor is read with its file opened only for that read, so
    memory holds one tensor and one output shard at a time.
    """
    import torch
    from safetensors import safe_open

    from qtune.modeling.config import load_config
    from qtune.modeling.moe.experts import fuse_experts, fused_expert_parameter, map_fused_experts
    from qtune.modeling.moe.families import moe_family
    from qtune.modeling.weights import (
        base_checkpoint,
        checkpoint_tensors,
        dequantize_saved,
        is_quant_state_part,
        quantized_weight_names,
        saved_quantization,
    )

    dtype = getattr(torch, dtype_name)
    deltas = lora_deltas(run.adapter_dir)
    folder = base_checkpoint(run.recipe.model.name, run.recipe.model.revision)
    location = checkpoint_tensors(folder)
    config = load_config(folder, trust_remote_code=run.recipe.model.trust_remote_code)
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
    family = moe_family(config)

    def merged(module: str, weight):
        """One 4-bit weight as training saw it (round-tripped through NF4 unless merging into the original), with
        its module's LoRA delta added."""
        weight = weight.to(compute)
        if merge_base == "dequantized" and not prequantized:
            weight = nf4_round_trip(weight.contiguous(), run.recipe.quant, device)
        if module in deltas:
            weight = merge_weight(
                weight.float(),
                [t.to(weight.device) if isinstance(t, torch.Tensor) else t for t in deltas.pop(module)],
            )
        return weight

    pending: dict[int, dict] = {}  # a layer's per-expert weights and biases, until the layer is whole

    def collect(name: str, tensor) -> None:
        """Keeps one per-expert tensor of gpt-oss; writes the layer's fused experts once all of them are in."""
        layer = int(re.match(r"model\.layers\.(\d+)\.", name).group(1))
        parts = pending.setdefault(layer, {})
        parts[name.split(".experts.", 1)[1]] = tensor
        count = family.expert_count(config)
        if len(parts) == 6 * count:  # three weights and three biases per expert
            for fused_key, value in fuse_experts(pending.pop(layer), family, layer, count).items():
                writer.add(fused_key, value.to(dtype))

    with staged(target) as staging:
        writer = ShardWriter(staging, shard_bytes)
        for key, file in location.items():
            if prequantized and is_quant_state_part(key):
                continue  # read with its weight by dequantize_saved
            with safe_open(str(file), framework="pt") as handle:
                tensor = handle.get_tensor(key)
            expert = family.expert_module(key) if family else None
            fused = fused_expert_parameter(key) if family else None
            if key in quantized:
                if prequantized:  # the 4-bit weights training saw, as they are
                    tensor = dequantize_saved(key, location, device)
                tensor = merged(key.removesuffix(".weight"), tensor)
            elif expert is not None:  # one expert's projection, as the original checkpoints store them
                if prequantized:  # a base qtune saved in 4 bits
                    tensor = dequantize_saved(key, location, device)
                tensor = merged(expert, tensor)
                if family.layout == "interleaved":  # gpt-oss saved per expert: fused back, as transformers reads it
                    collect(f"{expert}.weight", tensor)
                    continue
                key = family.original_key(expert)
            elif family and family.layout == "interleaved" and re.search(r"\.experts\.\d+\.\w+\.bias$", key):
                collect(key, tensor)
                continue
            elif fused is not None:  # a layer's experts fused (gpt-oss), each expert quantized on its own
                tensor = map_fused_experts(tensor, fused[1], fused[0], family, merged)
            writer.add(key, tensor.to(dtype) if tensor.dtype.is_floating_point else tensor)
            del tensor
        if deltas or pending:
            raise QtuneError(
                f"adapter layers not found in the base checkpoint: {sorted(deltas or pending)[:3]}",
                fix="was the adapter trained on this base?",
                code=EXIT_INTEGRITY,
            )
        writer.close()
        (staging / "config.json").write_text(
            json.dumps({**merged_config(config).to_dict(), "dtype": dtype_name}, indent=2)
        )
        if (folder / "generation_config.json").is_file():
            shutil.copy2(folder / "generation_config.json", staging / "generation_config.json")
        copy_tokenizer(run.adapter_dir, staging)
        fault_point("merged")
    log.info(f"export: {label or target.name}: {writer.total / 2**20:.1f} MiB in {len(writer.files)} shard(s)")
    return target


def write_fp16_artifact(job: ExportJob, target: Path) -> None:
    """The merged_fp16 format, which the NF4 and GGUF writers then start from."""
    job.fp16_merge = write_merged(job.trained, target, "float16", job.merge_base)


def load_merged(path: Path, *, config, dtype, on_gpu: bool):
    """A merged export as its users load it: transformers, in `dtype` (on the GPU when there is one)."""
    from transformers import AutoModelForCausalLM

    from qtune.modeling.load import device_map

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **({"device_map": device_map()} if on_gpu else {}))


def copy_tokenizer(source: Path, target: Path) -> None:
    """The tokenizer saved with the adapter, saved again into `target` by transformers itself (its files, whatever
    the tokenizer's kind)."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(source).save_pretrained(target)
