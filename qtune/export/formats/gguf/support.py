"""Which models qtune can write as GGUF, decided from config.json alone (no torch, no weights), so that a recipe
asking for a GGUF the model cannot have is refused before training rather than after."""

from __future__ import annotations

# llama.cpp's architecture for each transformers model_type qtune's GGUF writer handles (Mistral is written as
# llama, as llama.cpp's converter does)
GGUF_ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    # mixtures of experts (qtune.export.formats.gguf.experts); Mixtral is llama with experts, as llama.cpp writes it
    "qwen3_moe": "qwen3moe",
    "olmoe": "olmoe",
    "mixtral": "llama",
    "gpt_oss": "gpt-oss",
}
# transformers' model_type for each architecture qtune writes: what a GGUF is read back as
READ_BACK_AS = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
    "qwen3moe": "qwen3_moe",
    "olmoe": "olmoe",
    "gpt-oss": "gpt_oss",
}


def gguf_problem(config: dict) -> str | None:
    """Why a model with this config.json cannot be written to a GGUF llama.cpp runs as transformers does, or None."""
    model_type = config.get("model_type", "")
    if model_type not in GGUF_ARCHITECTURES:
        return f"GGUF export does not support the '{model_type}' architecture (GGUF: {', '.join(sorted(GGUF_ARCHITECTURES))})"
    # llama.cpp always renormalizes the chosen experts' weights for Qwen3-MoE (and Mixtral), never for OLMoE
    renormalizes = {"qwen3_moe": True, "olmoe": False}.get(model_type)
    if renormalizes is not None and bool(config.get("norm_topk_prob")) != renormalizes:
        return f"llama.cpp computes {model_type} with norm_topk_prob {renormalizes}; this model has the other"
    layers = config.get("layer_types")
    if model_type == "gpt_oss" and layers and layers != ["sliding_attention", "full_attention"] * (len(layers) // 2):
        return "llama.cpp runs gpt-oss's layers as sliding, full, sliding, ...; this model's layer_types differ"
    heads = config.get("num_attention_heads")
    if model_type == "olmoe" and config.get("num_key_value_heads", heads) != heads:
        return "llama.cpp runs OLMoE without grouped KV heads (its k norm spans the hidden size); this model has them"
    if model_type == "qwen3_moe" and (config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1):
        return "llama.cpp runs every Qwen3-MoE layer as experts; this model has dense layers (mlp_only_layers)"
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // max(1, config.get("num_attention_heads", 1))
    scalar = config.get("query_pre_attn_scalar")
    if model_type.startswith("gemma") and scalar is not None and scalar != head_dim:
        # llama.cpp scales Gemma's queries by 1/sqrt(head size), and by the 27B's own rule only for that model
        return f"GGUF export needs query_pre_attn_scalar equal to the head size ({scalar} != {head_dim}) for llama.cpp"
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}

    # config.json files written before transformers 4.45 name the kind "type" (Qwen2.5's YaRN recipe, Phi-3's longrope)
    def kind(parameters: dict):
        return parameters.get("rope_type") or parameters.get("type")

    kinds = {kind(r) for r in rope.values() if isinstance(r, dict)} or {kind(rope)}
    # Phi-3's longrope and gpt-oss's yarn are written (their llama.cpp architectures read them)
    unsupported = kinds & {"su", "dynamic"} | (kinds & {"longrope"} if model_type != "phi3" else set())
    unsupported |= kinds & {"yarn"} if model_type != "gpt_oss" else set()
    if unsupported:
        return f"GGUF export does not write {'/'.join(sorted(unsupported))} rope scaling yet"
    sliding = (rope.get("sliding_attention") or {}).get("rope_theta")
    if model_type == "gemma3_text" and sliding not in (None, 10000.0):
        return f"llama.cpp runs Gemma 3's sliding layers with rope base 10000, this model uses {sliding}"
    return None
