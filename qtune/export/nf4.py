"""The merged weights re-quantized to NF4 with double quantization: a folder that loads with no extra arguments."""

from __future__ import annotations

import shutil
from pathlib import Path

from qtune.export.merge import copy_tokenizer
from qtune.fsutil import publish, staging_dir_for
from qtune.model import device_map, half_dtype, keep_cpu_4bit_layout_trainable
from qtune.run_dir import TrainedRun
from qtune.testhooks import fault_point


def write_nf4(merged_dir: Path, target: Path, run: TrainedRun, echo=print) -> Path:
    """The merged weights re-quantized to 4-bit with double quantization; loads with no extra arguments."""
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    # fp16, the compute dtype every GPU has, except for families whose activations overflow it (bf16 for those)
    half = half_dtype(AutoConfig.from_pretrained(merged_dir))
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=run.recipe.quant.type,
        bnb_4bit_use_double_quant=run.recipe.quant.double_quant,
        bnb_4bit_compute_dtype=half,
    )
    model = AutoModelForCausalLM.from_pretrained(
        merged_dir, quantization_config=config, dtype=half, device_map=device_map()
    )
    keep_cpu_4bit_layout_trainable(model)  # a saved file must hold the standard layout, never the CPU repack
    staging = staging_dir_for(target)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        copy_tokenizer(merged_dir, staging)
        fault_point("nf4")
        publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in target.glob("*.safetensors"))
    echo(f"export: {target.name}: {size / 2**20:.1f} MiB ({model.get_memory_footprint() / 2**20:.1f} MiB in memory)")
    return target
