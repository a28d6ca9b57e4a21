"""Dtypes and 4-bit quantization: the compute dtype a run uses, bitsandbytes' configuration (built here and nowhere
else), the 16-bit dtype a model family's artifacts are safe in, and the trap of bitsandbytes' CPU layout."""

from __future__ import annotations

import torch

from qtune.core.errors import RecipeError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Families whose activations overflow fp16 (Gemma: embeddings scaled by sqrt(hidden), large residuals); their
# artifacts compute in bf16 (a Gemma 3 NF4 export run in fp16 gives perplexity NaN)
FP16_OVERFLOW_FAMILIES = ("gemma", "gemma2", "gemma3", "gemma3_text")


def resolve_compute_dtype(
    name: str, *, cuda_available: bool | None = None, capability: tuple[int, int] | None = None
) -> torch.dtype:
    """The compute dtype for quant.compute_dtype `name`; `auto`: bf16 only on GPUs that really have it, fp16 on older
    GPUs, fp32 on CPU. `torch.cuda.is_bf16_supported()` says yes on a T4 (sm_75), which emulates bf16 slowly: the
    compute capability (>= 8.0: Ampere and newer) is the honest test."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if name != "auto":
        dtype = DTYPES[name]
        if not cuda_available and dtype == torch.float16:
            raise RecipeError("quant.compute_dtype fp16 needs a GPU", fix="use auto or fp32 on CPU")
        return dtype
    if not cuda_available:
        return torch.float32
    if capability is None:
        capability = torch.cuda.get_device_capability()
    return torch.bfloat16 if capability >= (8, 0) else torch.float16


def half_dtype(config) -> torch.dtype:
    """The 16-bit dtype this model's artifacts are stored and computed in: fp16 (every GPU has it), or bf16."""
    model_type = config.get_text_config().model_type
    return torch.bfloat16 if model_type in FP16_OVERFLOW_FAMILIES else torch.float16


def artifact_dtype(config, on_gpu: bool) -> torch.dtype:
    """The dtype exports are loaded in to be measured: fp32 on CPU (so only the file's own precision shows), the
    family's 16-bit dtype on a GPU."""
    return half_dtype(config) if on_gpu else torch.float32


def bnb_config(
    kind: str = "nf4",
    *,
    double_quant: bool = False,
    compute_dtype: torch.dtype | None = None,
    storage_dtype: torch.dtype | None = None,
):
    """bitsandbytes' configuration for `kind`: "nf4" or "fp4" (4-bit, double quantization optional), or "int8".
    storage_dtype: the dtype the packed 4-bit weights are stored in (FSDP needs the model's own dtype, not uint8)."""
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype or torch.float32,
        **({"bnb_4bit_quant_storage": storage_dtype} if storage_dtype is not None else {}),
    )


def keep_cpu_4bit_layout_trainable(model) -> int:
    """Stops bitsandbytes repacking 4-bit weights into its CPU inference layout; returns the layers changed.

    On CPUs with AVX512-BF16, bitsandbytes >= 0.49 rewrites each Linear4bit's weights in place on the first forward
    pass without gradients (an eval, a generate) into a layout whose op has no backward: training after that gets
    silently wrong LoRA gradients, and the repack crashes on layers whose input width is not a multiple of 64.
    tests/test_model.py::test_eval_before_train_keeps_gradients fails if this comes back.
    """
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count
