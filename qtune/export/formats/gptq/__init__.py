"""GPTQ checkpoints for GPU servers (vLLM, SGLang, TGI) and transformers: the merged weights rounded to 4- or 8-bit
integers per group, column by column with each layer's Hessian from calibration data so that the rounding error of a
column is compensated in the columns not yet rounded (Frantar et al. 2022).

- rounding.py: the GPTQ rounding of one weight matrix (pure: a weight and a Hessian in, integers and scales out)
- calibration.py: the run's own training samples as calibration data, and each decoder layer's inputs
- writer.py: the layer-by-layer pass, the compressed-tensors file, and the loader

The file is compressed-tensors' `pack-quantized` layout (what llm-compressor writes): vLLM and SGLang run it with their
Marlin kernels and transformers loads it with no extra arguments. Why this layout and not gptqmodel's: docs/export.md.
This module is imported when a recipe is read: it imports no torch.
"""

from __future__ import annotations

from qtune.modeling.moe.families import is_moe

# the group sizes vLLM's GPTQ kernels (Marlin) run; -1: one scale per output row
GROUP_SIZES = (-1, 32, 64, 128)
# the exporting process itself: Python, torch, transformers, compressed-tensors, the tokenizer (bench/gptq.py: about
# 340 MiB before the model loads, on the real Gemma 3 270M)
PROCESS_BYTES = 350 * 2**20


def gptq_problem(config: dict) -> str | None:
    """Why a model with this config.json cannot have a GPTQ export, or None."""
    if is_moe(config):
        return (
            f"GPTQ export of mixtures of experts ('{config.get('model_type')}') is not written yet: their experts are "
            "not linear layers qtune can round one by one"
        )
    return None


def in_features(config: dict) -> dict[str, int]:
    """The input widths of a decoder layer's linear layers, by what feeds them (from config.json alone)."""
    heads = config.get("num_attention_heads", 1)
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // max(1, heads)
    return {
        "hidden_size": config.get("hidden_size", 0),
        "attention heads x head_dim": heads * head_dim,
        "intermediate_size": config.get("intermediate_size", 0),
    }


def group_size_problem(config: dict, group_size: int) -> str | None:
    """Why `group_size` cannot quantize this model (a group must tile every input width of every layer), or None."""
    if group_size == -1:
        return None
    for what, width in in_features(config).items():
        if width and width % group_size:
            fits = [str(g) for g in GROUP_SIZES if g == -1 or width % g == 0]
            return (
                f"export.gptq.group_size {group_size} does not divide the model's {what} ({width}): choose "
                f"{' or '.join(fits)}"
            )
    return None


def gptq_settings_problem(config: dict, export) -> str | None:
    """Why the recipe's export.gptq settings cannot quantize a model with this config.json, or None."""
    return group_size_problem(config.get("text_config") or config, export.gptq.group_size)


def export_peak_bytes(config, settings, *, on_gpu: bool, parameters: int) -> dict[str, int]:
    """What a GPTQ export holds at its peak: {"device": bytes on the GPU (0 on a CPU), "host": bytes of RAM}.

    On the device: one decoder layer's weights, its linear layers' Hessians (in x in, fp32), the calibration
    activations (every sample's hidden states, twice while a layer's outputs replace its inputs), one sample's pass
    through the layer, and GPTQ's fp32 copies of the largest weight and Hessian. On the host: the process and the
    merged model (fp32 on a CPU, where it is also the device, each layer back to 16 bits once rounded; 16-bit beside a
    GPU; on a CPU the embedding's 16-bit copy beside its fp32 one when the model is cast at the end)."""
    text = config.get_text_config()
    hidden, inter = text.hidden_size, text.intermediate_size
    widths = in_features(text.to_dict())
    attention = widths["attention heads x head_dim"]
    kv = getattr(text, "num_key_value_heads", text.num_attention_heads) * (attention // text.num_attention_heads)
    layer_parameters = hidden * (attention * 2 + kv * 2) + 3 * hidden * inter
    compute_bytes = 2 if on_gpu else 4
    hessians = 4 * (3 * hidden**2 + 2 * hidden**2 + attention**2 + inter**2)  # q k v gate up read hidden
    tokens = settings.calibration_samples * settings.calibration_length
    activations = 2 * tokens * hidden * compute_bytes
    length = settings.calibration_length
    one_pass = 4 * length * (3 * inter + 4 * hidden) + 4 * text.num_attention_heads * length**2
    largest_in = max(hidden, inter, attention)
    rounding = 4 * 3 * max(hidden, inter) * largest_in + 4 * 2 * largest_in**2
    device = layer_parameters * compute_bytes + hessians + activations + one_pass + rounding
    if on_gpu:
        return {"device": device, "host": PROCESS_BYTES + parameters * 2}
    embedding_copy = 2 * getattr(text, "vocab_size", 0) * hidden  # its 16-bit copy, made beside the fp32 one at the end
    return {"device": 0, "host": PROCESS_BYTES + parameters * 4 + device + embedding_copy}


def describe_export_peak(config, settings, parameters: int) -> str:
    """`qtune plan`'s line for a GPTQ export: its peak on a GPU and on this kind of CPU machine."""
    gpu = export_peak_bytes(config, settings, on_gpu=True, parameters=parameters)
    cpu = export_peak_bytes(config, settings, on_gpu=False, parameters=parameters)
    return (
        f"GPTQ export ({settings.calibration_samples} samples x {settings.calibration_length} tokens): peak "
        f"{gpu['device'] / 2**30:.2f} GiB on the GPU with {gpu['host'] / 2**30:.2f} GiB of RAM, or "
        f"{cpu['host'] / 2**30:.2f} GiB of RAM on a CPU"
    )
