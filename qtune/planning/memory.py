"""Memory arithmetic from config.json alone: what the weights take in each precision, before any download.

The parameter inventory comes from an empty (meta-device) model built from the config, and the set of
layers bitsandbytes quantizes from transformers' own rules (the same function the merge uses), so the
figures follow the real loader instead of a hand-kept list of layer names.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from qtune.modeling.config import load_config

BLOCKSIZE = 64  # bitsandbytes' 4-bit block
NESTED_BLOCKSIZE = 256  # double quantization: absmax constants quantized in blocks of 256
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "fp4", "nf4", "nf4_dq")


@dataclass
class Inventory:
    """Parameter counts by kind; `quantized_shapes` are the (out, in) weights bitsandbytes turns to 4/8-bit."""

    quantized_shapes: list[tuple[int, int]] = field(default_factory=list)
    embeddings: int = 0
    lm_head: int = 0
    norms: int = 0
    other: int = 0  # biases, unquantized linears, anything else
    tied_embeddings: bool = False
    # a mixture of experts: the routed experts' parameters (counted in the kinds above too), how many experts each
    # layer has and how many a token goes through
    expert_parameters: int = 0
    experts: int = 0
    experts_per_token: int = 0

    @property
    def quantized(self) -> int:
        """Parameters in the layers bitsandbytes quantizes."""
        return sum(o * i for o, i in self.quantized_shapes)

    @property
    def unquantized(self) -> int:
        """Parameters that stay 16-bit: embeddings, lm_head, norms and the rest."""
        return self.embeddings + self.lm_head + self.norms + self.other

    @property
    def total(self) -> int:
        """Every parameter."""
        return self.quantized + self.unquantized

    @property
    def active(self) -> int:
        """The parameters one token's forward pass uses: all but the experts it is not routed to."""
        if not self.experts:
            return self.total
        return self.total - self.expert_parameters + self.expert_parameters * self.experts_per_token // self.experts


def inventory(config) -> Inventory:
    """The model's parameters by kind, from an empty (meta-device) model built from its config."""
    import torch
    from transformers import AutoModelForCausalLM

    from qtune.modeling.moe.families import moe_family
    from qtune.modeling.weights import quantized_weight_names

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    quantized = quantized_weight_names(config)
    result = Inventory(tied_embeddings=bool(config.get_text_config().tie_word_embeddings))
    family = moe_family(config)
    if family is not None:
        result.experts = family.expert_count(config.get_text_config())
        result.experts_per_token = config.get_text_config().num_experts_per_tok
    input_embedding = skeleton.get_input_embeddings().weight
    output_embedding = skeleton.get_output_embeddings()
    output_weight = output_embedding.weight if output_embedding is not None else None
    seen = set()
    for name, param in skeleton.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue  # tied weights are stored once
        seen.add(id(param))
        if name in quantized:
            result.quantized_shapes.append(tuple(param.shape))
        elif family is not None and name.rpartition(".")[0].endswith("mlp.experts"):
            # fused experts: qtune quantizes each expert's projections as a 4-bit linear layer (qtune.modeling.moe)
            result.expert_parameters += param.numel()
            if param.dim() == 3:
                result.quantized_shapes.extend(expert_shapes(name, tuple(param.shape), family.layout))
            else:  # gpt-oss's expert biases
                result.other += param.numel()
        elif param is input_embedding:
            result.embeddings += param.numel()
        elif param is output_weight:
            result.lm_head += param.numel()
        elif param.dim() == 1 and "norm" in name.lower():
            result.norms += param.numel()
        else:
            result.other += param.numel()
    return result


def expert_shapes(name: str, shape: tuple[int, int, int], layout: str) -> list[tuple[int, int]]:
    """The (out, in) shapes of the per-expert projections a fused expert parameter holds."""
    experts = shape[0]
    if name.endswith("gate_up_proj"):  # [E, 2I, H], or gpt-oss's [E, H, 2I]
        width, inputs = (shape[1] // 2, shape[2]) if layout == "concatenated" else (shape[2] // 2, shape[1])
        return [(width, inputs)] * (2 * experts)
    out, inputs = (shape[1], shape[2]) if layout == "concatenated" else (shape[2], shape[1])  # down_proj
    return [(out, inputs)] * experts


def quantization_constants_bytes(n: int, double_quant: bool) -> int:
    """bitsandbytes' 4-bit quant state of one n-value weight: absmax per 64 values (fp32; or uint8 plus an fp32
    absmax per 256 blocks, a 256-entry fp32 code and an offset with double quantization) and the 16-entry map."""
    blocks = math.ceil(n / BLOCKSIZE)
    code_map = 16 * 4
    if not double_quant:
        return blocks * 4 + code_map
    return blocks * 1 + math.ceil(blocks / NESTED_BLOCKSIZE) * 4 + 256 * 4 + 4 + code_map


@dataclass
class WeightMemory:
    """The weights' bytes in one precision: tensors, and the quantization constants beside them."""

    precision: str
    tensors_bytes: int  # what get_memory_footprint() counts: parameters and buffers
    constants_bytes: int  # quantization constants bitsandbytes keeps beside them (not parameters)

    @property
    def total_bytes(self) -> int:
        """Tensors and constants together."""
        return self.tensors_bytes + self.constants_bytes


def weight_memory(inv: Inventory, precision: str, unquantized_bytes_per_param: int = 2) -> WeightMemory:
    """Bytes of the weights in one precision. Quantized precisions keep the rest (embeddings, norms,
    lm_head) in fp16/bf16, as a 4/8-bit model loaded for a GPU does."""
    if precision == "fp32":
        return WeightMemory(precision, inv.total * 4, 0)
    if precision in ("bf16", "fp16"):
        return WeightMemory(precision, inv.total * 2, 0)
    rest = inv.unquantized * unquantized_bytes_per_param
    if precision == "int8":
        # LLM.int8: one byte per weight, plus an fp32 scale per output row (SCB)
        return WeightMemory(precision, inv.quantized + rest, sum(o * 4 for o, _ in inv.quantized_shapes))
    packed = sum(math.ceil(o * i / 2) for o, i in inv.quantized_shapes)
    double_quant = precision.endswith("_dq")
    constants = sum(quantization_constants_bytes(o * i, double_quant) for o, i in inv.quantized_shapes)
    return WeightMemory(precision, packed + rest, constants)


def describe_inventory(model_name: str, inv: Inventory) -> str:
    """`qtune memory`'s table: parameters by kind, then the weights' memory in each precision."""

    def count(n):
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"

    lines = [
        f"{model_name}: {count(inv.total)} parameters",
        f"  quantizable linear layers {count(inv.quantized):>10}  ({len(inv.quantized_shapes)} matrices)",
        f"  embeddings                {count(inv.embeddings):>10}",
        f"  lm_head                   {count(inv.lm_head):>10}"
        + ("  (tied to the embeddings)" if inv.tied_embeddings else ""),
        f"  norms                     {count(inv.norms):>10}",
        f"  other (biases, ...)       {count(inv.other):>10}",
        "",
        "",
    ]
    if inv.experts:
        lines[-2:-2] = [
            f"  of which routed experts   {count(inv.expert_parameters):>10}  ({inv.experts} per layer, "
            f"{inv.experts_per_token} per token: each a 4-bit layer per projection)",
            f"  active per token          {count(inv.active):>10}  "
            f"({count(inv.active - inv.embeddings)} without the embedding lookup)",
        ]
    unit, scale = ("GiB", 2**30) if inv.total * 4 >= 2**30 else ("MiB", 2**20)
    lines[-1] = (
        f"{'precision':<10} {'weights ' + unit:>12} {'+ quant consts':>15} {'total ' + unit:>10} {'bits/param':>11}"
    )
    for precision in PRECISIONS:
        memory = weight_memory(inv, precision)
        lines.append(
            f"{precision:<10} {memory.tensors_bytes / scale:>12.3f} {memory.constants_bytes / scale:>15.3f} "
            f"{memory.total_bytes / scale:>10.3f} {8 * memory.total_bytes / inv.total:>11.2f}"
        )
    lines.append("(int8/fp4/nf4: embeddings, lm_head and norms stay 16-bit, as bitsandbytes leaves them)")
    return "\n".join(lines)


def memory_report(model_name: str, revision: str = "main") -> dict:
    """`qtune memory`: parameter counts and weight memory per precision, from config.json alone."""
    config = load_config(model_name, revision, option="the MODEL argument")
    inv = inventory(config)
    return {
        "model": model_name,
        "parameters": {
            "total": inv.total,
            "quantizable_linear": inv.quantized,
            "embeddings": inv.embeddings,
            "lm_head": inv.lm_head,
            "norms": inv.norms,
            "other": inv.other,
            "experts": inv.expert_parameters,
            "active": inv.active,
        },
        "weights_bytes": {
            p: {"tensors": m.tensors_bytes, "quant_constants": m.constants_bytes, "total": m.total_bytes}
            for p in PRECISIONS
            for m in [weight_memory(inv, p)]
        },
        "text": describe_inventory(model_name, inv),
    }


def report_json(report: dict) -> str:
    """The memory report as JSON (`qtune memory --json`)."""
    return json.dumps({k: v for k, v in report.items() if k != "text"}, indent=2)
