"""The `nf4` format: the merged weights re-quantized to 4-bit (the recipe's quant type and double quantization), a
folder that transformers loads with no extra arguments."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qtune.core.fs import staged
from qtune.core.log import get_logger
from qtune.core.testhooks import fault_point
from qtune.export.formats.merged import copy_tokenizer

if TYPE_CHECKING:
    from qtune.export.formats import ExportJob

log = get_logger(__name__)


def write_nf4(merged_dir: Path, target: Path, quant) -> Path:
    """Re-quantizes the merged weights in `merged_dir` as the quant section says and saves them at `target`."""
    from transformers import AutoModelForCausalLM

    from qtune.modeling.config import load_config
    from qtune.modeling.load import device_map
    from qtune.modeling.moe.experts import quantize_experts
    from qtune.modeling.moe.families import moe_family
    from qtune.modeling.moe.streaming import as_bitsandbytes, experts_quantizer_config
    from qtune.modeling.precision import bnb_config, half_dtype, keep_cpu_4bit_layout_trainable

    # fp16, the compute dtype every GPU has, except for families whose activations overflow it (bf16 for those)
    config = load_config(merged_dir)
    half = half_dtype(config)
    quantization = bnb_config(quant.type, double_quant=quant.double_quant, compute_dtype=half)
    streamed = moe_family(config) is not None  # a mixture of experts: its experts quantized as they load
    model = AutoModelForCausalLM.from_pretrained(
        merged_dir,
        quantization_config=experts_quantizer_config(quantization) if streamed else quantization,
        dtype=half,
        device_map=device_map(),
    )
    if streamed:
        as_bitsandbytes(model, quantization)
        quantize_experts(model, quantization, half)  # saved per expert (qtune.modeling.moe.saved)
    keep_cpu_4bit_layout_trainable(model)  # a saved file must hold the standard layout, never the CPU repack
    with staged(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        copy_tokenizer(merged_dir, staging)
        fault_point("nf4")
    size = sum(p.stat().st_size for p in target.glob("*.safetensors"))
    log.info(
        f"export: {target.name}: {size / 2**20:.1f} MiB ({model.get_memory_footprint() / 2**20:.1f} MiB in memory)"
    )
    return target


def write_nf4_artifact(job: ExportJob, target: Path) -> None:
    """The nf4 format, from the fp16 merge."""
    write_nf4(job.merged_fp16(), target, job.trained.recipe.quant)


def load_nf4(path: Path, *, config, dtype, on_gpu: bool):
    """An NF4 export as its users load it: transformers, no quantization arguments (its config.json carries them); a
    mixture of experts through qtune.modeling.moe.saved (transformers cannot read 4-bit experts)."""
    from transformers import AutoModelForCausalLM

    from qtune.modeling.config import load_config
    from qtune.modeling.load import device_map
    from qtune.modeling.moe.saved import finish_saved_moe, saved_moe_options
    from qtune.modeling.precision import keep_cpu_4bit_layout_trainable

    saved = load_config(path)  # with its quantization, which the merged model's `config` has not
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map(), **saved_moe_options(saved))
    finish_saved_moe(model, saved.quantization_config)  # a mixture of experts' 4-bit experts, as saved
    keep_cpu_4bit_layout_trainable(model)
    return model
