"""What each architecture needs in its GGUF beyond the shared layout: llama.cpp's hyperparameter keys, the tensors
llama.cpp computes with differently from transformers, and tensors it needs that the checkpoint lacks. Each rule
follows llama.cpp's own converter (convert_hf_to_gguf.py) for that model class.
"""

from __future__ import annotations

import numpy as np

# Gemma's RMSNorm multiplies by (1 + weight); llama.cpp's multiplies by the weight, so its converter adds 1
NORM_PLUS_ONE = ("gemma2", "gemma3")


def tensor_name_map(arch: str, layers: int):
    """gguf-py's map from checkpoint names to llama.cpp's tensor names for `arch` (llama.cpp's spelling, e.g. gpt-oss)."""
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper().replace("-", "_")], layers)


def head_size(config) -> int:
    """The attention head size (explicit head_dim, else hidden / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters(config) -> dict:
    """The global layers' rope parameters (Gemma 3 keeps one set per attention type)."""
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return parameters.get("full_attention", parameters)


def rope_theta(config) -> float:
    """The rotary base of the global layers."""
    return rope_parameters(config).get("rope_theta") or getattr(config, "rope_theta", 10000.0)


def add_hyperparameters(writer, arch: str, config) -> None:
    """Writes llama.cpp's hyperparameter keys for `arch` from the transformers config."""
    heads = config.num_attention_heads
    head_dim = head_size(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope_theta(config)))
    if head_dim != config.hidden_size // heads or arch in NORM_PLUS_ONE:
        # Qwen3, Gemma: llama.cpp reads the head size from these rather than hidden / heads
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    # Phi-4-mini rotates only part of each head
    writer.add_rope_dimension_count(int(head_dim * (getattr(config, "partial_rotary_factor", None) or 1.0)))
    if rope_parameters(config).get("rope_type") == "linear":  # Gemma 3 4B and larger: global layers, factor 8
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope_parameters(config)["factor"]))
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
    elif arch == "gemma3":
        if config.final_logit_softcapping:
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
        if "sliding_attention" in (getattr(config, "layer_types", None) or []):
            writer.add_sliding_window(config.sliding_window)
    elif arch == "gpt-oss":  # alternate sliding layers (llama.cpp's pattern for it), yarn rope as its converter writes
        import gguf

        writer.add_sliding_window(config.sliding_window)
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope_parameters(config)["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope_parameters(config).get("original_max_position_embeddings", 4096)))
    elif arch == "phi3":
        # llama.cpp takes 0 for "no sliding window" (Phi-4), as its converter writes it
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)
        if rope_parameters(config).get("rope_type") == "longrope":  # Phi-4-mini, Phi-3-128k
            original = longrope_original_context(config)
            writer.add_rope_scaling_orig_ctx_len(original)
            writer.add_rope_scaling_attn_factors(longrope_attention_factor(config))


def longrope_original_context(config) -> int:
    """The context length longrope's short factors are for."""
    return rope_parameters(config).get("original_max_position_embeddings") or config.original_max_position_embeddings


def longrope_attention_factor(config) -> float:
    """What transformers' longrope multiplies cos and sin by, and llama.cpp reads from the file."""
    import math

    given = rope_parameters(config).get("attention_factor")
    if given is not None:
        return float(given)
    scale = config.max_position_embeddings / longrope_original_context(config)
    return math.sqrt(1 + math.log(scale) / math.log(longrope_original_context(config))) if scale > 1 else 1.0


def as_llama_cpp_expects(arch: str, config, hf_name: str, data: np.ndarray) -> np.ndarray:
    """A checkpoint tensor as llama.cpp computes with it."""
    heads = config.num_attention_heads
    if arch == "llama" and hf_name.endswith("self_attn.q_proj.weight"):
        return permute_for_llama_rotary(data, heads, heads)
    if arch == "llama" and hf_name.endswith("self_attn.k_proj.weight"):
        return permute_for_llama_rotary(data, heads, config.num_key_value_heads or heads)
    if arch in NORM_PLUS_ONE and hf_name.endswith("norm.weight"):
        return data + 1
    return data


def permute_for_llama_rotary(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """HF stores q/k rows with the two rotary halves apart; llama.cpp wants them interleaved
    (the same permutation as llama.cpp's convert_hf_to_gguf.py)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def extra_tensors(config) -> dict[str, np.ndarray]:
    """Tensors llama.cpp needs that are not weights of the checkpoint: for llama3 rope scaling (Llama 3.1 and
    later), `rope_freqs`, the factor each rotary frequency is divided by; without it llama.cpp runs the model with
    plain rope, which drifts from the trained model as positions grow (tests/test_llama_cpp.py). The factors come from
    transformers' own llama3 rope, so they are what the merged model computes. For Phi-3's longrope, its long and
    short factors."""
    import gguf
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    text = config.get_text_config()
    if rope_parameters(text).get("rope_type") == "longrope":
        # Phi-3's long-context rope: llama.cpp divides each frequency by these, the long set when its context is
        # longer than the original one, as transformers does when the sequence is
        return {
            gguf.TENSOR_NAMES[kind] + ".weight": np.asarray(rope_parameters(text)[key], dtype=np.float32)
            for kind, key in (
                (gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, "long_factor"),
                (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, "short_factor"),
            )
        }
    if rope_parameters(text).get("rope_type") != "llama3":
        return {}
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](text, "cpu")
    dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    plain = 1.0 / (rope_theta(text) ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    factors = (plain / scaled).numpy().astype(np.float32)
    return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": factors}
