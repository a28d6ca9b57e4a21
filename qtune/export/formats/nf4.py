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
    from qtune.modeling.precision import bnb_config, half_dtype, keep_cpu_4bit_layout_trainable

    # fp16, the compute dtype every GPU has, except for families whose activations overflow it (bf16 for those)
    half = half_dtype(load_config(merged_dir))
    model = AutoModelForCausalLM.from_pretrained(
        merged_dir,
        quantization_config=bnb_config(quant.type, double_quant=quant.double_quant, compute_dtype=half),
        dtype=half,
        device_map=device_map(),
    )
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
    """An NF4 export as its users load it: transformers, no quantization arguments (its config.json carries them)."""
    from transformers import AutoModelForCausalLM

    from qtune.modeling.load import device_map
    from qtune.modeling.precision import keep_cpu_4bit_layout_trainable

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map())
    keep_cpu_4bit_layout_trainable(model)
    return model
