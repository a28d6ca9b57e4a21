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
}
# transformers' model_type for each architecture qtune writes: what a GGUF is read back as
READ_BACK_AS = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
}


def gguf_problem(config: dict) -> str | None:
    """Why a model with this config.json cannot be written to a GGUF llama.cpp runs as transformers does, or None."""
    model_type = config.get("model_type", "")
    if model_type not in GGUF_ARCHITECTURES:
        return f"GGUF export does not support the '{model_type}' architecture (GGUF: {', '.join(sorted(GGUF_ARCHITECTURES))})"
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
    unsupported = kinds & {"su", "yarn", "dynamic"} | (kinds & {"longrope"} if model_type != "phi3" else set())
    if unsupported:
        return f"GGUF export does not write {'/'.join(sorted(unsupported))} rope scaling yet"
    sliding = (rope.get("sliding_attention") or {}).get("rope_theta")
    if model_type == "gemma3_text" and sliding not in (None, 10000.0):
        return f"llama.cpp runs Gemma 3's sliding layers with rope base 10000, this model uses {sliding}"
    return None
