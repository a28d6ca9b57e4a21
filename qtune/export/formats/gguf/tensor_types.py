"""Which ggml type each tensor of a GGUF file gets, for each of qtune's GGUF formats: llama.cpp's own rules.

A GGUF "Q4_K_M" is not Q4_K everywhere: llama-quantize gives the output matrix (or the tied token embeddings, which
serve as it) Q6_K, and the value projections and FFN down projections of about a third of the layers Q6_K, the rest
Q4_K; a matrix whose rows do not split into whole blocks falls back to a type whose blocks fit. These are the rules of
`llama_tensor_get_type` in llama.cpp's src/llama-quant.cpp for the file types qtune writes, so a file from qtune has
the same type per tensor as llama-quantize makes of qtune's F16 file (tests/test_kquants.py checks it against
llama.cpp's quantizer). The rules count attn_v and ffn_down tensors in file order, so the writer lays tensors out
layer by layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qtune.export.formats.gguf.kquants import SUPER_BLOCK


@dataclass(frozen=True)
class Mix:
    """One GGUF format: its default tensor type and the llama.cpp file type it declares (names from gguf-py)."""

    default: str
    file_type: str


MIXES = {
    "F16": Mix("F16", "MOSTLY_F16"),
    "Q8_0": Mix("Q8_0", "MOSTLY_Q8_0"),
    "Q4_0": Mix("Q4_0", "MOSTLY_Q4_0"),
    "Q4_K_M": Mix("Q4_K", "MOSTLY_Q4_K_M"),
    "Q5_K_M": Mix("Q5_K", "MOSTLY_Q5_K_M"),
    "Q6_K": Mix("Q6_K", "MOSTLY_Q6_K"),
}
BLOCK_SIZE = {
    "Q8_0": 32,
    "Q4_0": 32,
    "Q5_0": 32,
    "Q5_1": 32,
    "Q4_K": SUPER_BLOCK,
    "Q5_K": SUPER_BLOCK,
    "Q6_K": SUPER_BLOCK,
}
# a k-quant whose rows do not split into 256-value super-blocks: llama.cpp's tensor_type_fallback
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def more_bits(index: int, count: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third layer between."""
    return index < count // 8 or index >= 7 * count // 8 or (index - count // 8) % 3 == 2


def layer_order(gguf_name: str) -> tuple[int, str]:
    """Sort key that lays the file out layer by layer (blk.2 before blk.10), global tensors first."""
    found = re.match(r"blk\.(\d+)\.", gguf_name)
    return (int(found.group(1)) if found else -1, gguf_name)


def tensor_types(tensors: list[tuple[str, tuple[int, ...]]], mix_name: str, *, experts: int = 0) -> list[str]:
    """The ggml type name of each (gguf name, HF shape) in file order, for the format `mix_name`; `experts`: the
    routed experts per layer of a mixture of experts (llama.cpp gives 8-expert models more bits in attention)."""
    mix = MIXES[mix_name]
    names = [name for name, _ in tensors]
    tied = "output.weight" not in names
    value_count = sum(_is_value_projection(name) for name in names)
    down_count = sum("ffn_down" in name for name in names)
    value_index = down_index = 0
    types = []
    for name, shape in tensors:
        if len(shape) < 2 or not name.endswith("weight") or name.endswith("_norm.weight") or "ffn_gate_inp" in name:
            # norms, biases and other vectors stay F32, as llama.cpp's converter keeps them; so does the router
            # (ffn_gate_inp), which llama-quantize never quantizes
            types.append("F32")
            continue
        if mix.default == "F16":
            types.append("F16")
            continue
        columns = shape[-1]
        chosen = mix.default
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            if columns % BLOCK_SIZE[mix.default]:
                chosen = "Q8_0"
            elif mix.default != "Q8_0":
                chosen = "Q6_K"
        elif _is_value_projection(name):
            if mix_name in ("Q4_K_M", "Q5_K_M") and more_bits(value_index, value_count):
                chosen = "Q6_K"
            if experts == 8:  # "for the 8-expert model, bumping this to Q8_0 trades just ~128MB" (llama.cpp)
                chosen = "Q8_0"
            value_index += 1
        elif "attn_k.weight" in name and experts == 8:
            chosen = "Q8_0"
        elif "attn_output.weight" in name and experts == 8 and mix_name == "Q4_K_M":
            chosen = "Q5_K"
        elif "ffn_down" in name:
            if mix_name in ("Q4_K_M", "Q5_K_M") and more_bits(down_index, down_count):
                chosen = "Q6_K"
            down_index += 1
        if columns % BLOCK_SIZE[chosen]:
            chosen = FALLBACK.get(chosen, "F16")
            if columns % BLOCK_SIZE.get(chosen, 1):
                chosen = "F16"
        types.append(chosen)
    return types


def _is_value_projection(name: str) -> bool:
    # llama.cpp treats the fused qkv projection (Phi-3) like attn_v
    return "attn_v.weight" in name or "attn_qkv.weight" in name
