"""A mixture of experts in GGUF: llama.cpp keeps each layer's experts as three 3-D tensors (ffn_gate_exps,
ffn_up_exps, ffn_down_exps: [experts, out, in]) beside the router (ffn_gate_inp). This module gives the writer those
tensors from a merged checkpoint (per-expert keys stacked, or a fused layout split), and reads a GGUF file of a
mixture of experts back into transformers' model (transformers' own GGUF reader knows few of these families)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qtune.modeling.moe.families import moe_family

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
GGUF_EXPERTS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def gguf_sources(location: dict[str, Path], config, read: Callable, shape_of: Callable) -> dict:
    """{name gguf-py's tensor map knows: (shape, reader of the float32 array)} for a merged checkpoint: its tensors as
    they are for a dense model; a mixture of experts' per-expert projections stacked into
    model.layers.L.mlp.experts.<projection>.weight [E, out, in], and a fused layout (gpt-oss) split likewise."""
    family = moe_family(config)
    sources = {}
    groups: dict[tuple[int, str], dict[int, str]] = {}
    for key in location:
        module = family.expert_module(key) if family else None
        if module is not None:
            layer, expert, projection = re.fullmatch(
                r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)", module
            ).groups()
            groups.setdefault((int(layer), projection), {})[int(expert)] = key
        elif family and family.layout == "interleaved" and re.search(r"\.mlp\.experts\.\w+$", key):
            sources.update(split_fused(key, family, read, shape_of(key)))
        elif key.endswith("self_attn.sinks"):  # gpt-oss's attention sinks: llama.cpp's attn_sinks.weight
            sources[f"{key}.weight"] = (shape_of(key), lambda key=key: read(key))
        else:
            sources[key] = (shape_of(key), lambda key=key: read(key))
    for (layer, projection), experts in groups.items():
        keys = [experts[e] for e in sorted(experts)]
        shape = (len(keys), *shape_of(keys[0]))
        sources[f"model.layers.{layer}.mlp.experts.{projection}.weight"] = (
            shape,
            lambda keys=keys: np.stack([read(k) for k in keys]),
        )
    return sources


def split_fused(key: str, family, read: Callable, shape: tuple) -> dict:
    """gpt-oss's fused expert tensors as llama.cpp's: gate and up (alternate columns of gate_up_proj [E, H, 2I])
    apart and transposed to [E, I, H], down_proj [E, I, H] transposed to [E, H, I], their biases split alike."""
    prefix, _, name = key.rpartition(".")
    experts = shape[0]
    if name == "gate_up_proj":
        width = shape[2] // 2
        return {
            f"{prefix}.gate_proj.weight": ((experts, width, shape[1]), lambda: read(key)[:, :, ::2].transpose(0, 2, 1)),
            f"{prefix}.up_proj.weight": ((experts, width, shape[1]), lambda: read(key)[:, :, 1::2].transpose(0, 2, 1)),
        }
    if name == "gate_up_proj_bias":
        width = shape[1] // 2
        return {
            f"{prefix}.gate_proj.bias": ((experts, width), lambda: read(key)[:, ::2]),
            f"{prefix}.up_proj.bias": ((experts, width), lambda: read(key)[:, 1::2]),
        }
    if name == "down_proj":
        return {f"{prefix}.down_proj.weight": ((experts, shape[2], shape[1]), lambda: read(key).transpose(0, 2, 1))}
    return {f"{prefix}.down_proj.bias": (shape, lambda: read(key))}


def add_expert_hyperparameters(writer, config) -> None:
    """llama.cpp's expert keys: how many experts, how many per token, and one expert's width."""
    family = moe_family(config)
    if family is None:
        return
    writer.add_expert_count(family.expert_count(config))
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(family.expert_width(config))


def unpermute_for_llama_rotary(weights: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of families.permute_for_llama_rotary: llama.cpp's interleaved q/k rows back in HF's order."""
    return (
        weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def read_gguf_moe(path: Path, config, dtype):
    """A GGUF file of a mixture of experts loaded into transformers' model built from `config`: every tensor
    dequantized by gguf-py, the experts fused back into the family's layout, the llama-style q/k rows put back."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    from qtune.export.formats.gguf.families import tensor_name_map
    from qtune.export.formats.gguf.support import GGUF_ARCHITECTURES

    arch = GGUF_ARCHITECTURES[config.model_type]
    family = moe_family(config)
    reader = gguf.GGUFReader(str(path))
    stored = {
        t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32) for t in reader.tensors
    }
    names = tensor_name_map(arch, config.num_hidden_layers)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {}
    for key, parameter in model.state_dict().items():
        match = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_bias)?", key)
        if match:
            layer, fused, bias = match.groups()
            part = "bias" if bias else "weight"

            def experts(projection, layer=layer, part=part):
                return stored[f"blk.{layer}.{GGUF_EXPERTS[projection]}.{part}"]

            if fused == "down_proj":  # llama.cpp's [E, H, I]; gpt-oss keeps [E, I, H]
                value = experts("down_proj")
                value = value if family.layout == "concatenated" or bias else value.transpose(0, 2, 1)
            elif family.layout == "concatenated":
                value = np.concatenate([experts("gate_proj"), experts("up_proj")], axis=1)
            else:  # gpt-oss: gate and up in alternate columns of [E, H, 2I] (of [E, 2I] for the bias)
                gate, up = experts("gate_proj"), experts("up_proj")
                value = np.stack([gate, up], axis=2).reshape(gate.shape[0], -1, *gate.shape[2:])
                value = value if bias else value.transpose(0, 2, 1)
        elif key == "lm_head.weight" and "output.weight" not in stored:
            value = stored["token_embd.weight"]
        else:
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            value = stored[name if name in stored else f"{name}.weight"]  # gpt-oss's sinks: attn_sinks.weight
            if arch == "llama" and key.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
                heads = config.num_attention_heads if "q_proj" in key else config.num_key_value_heads
                value = unpermute_for_llama_rotary(value, heads)
        state[key] = torch.from_numpy(np.array(value, dtype=np.float32)).reshape(parameter.shape).to(dtype)
    model.load_state_dict(state, strict=True)
    return model
