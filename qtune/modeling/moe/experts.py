"""One NF4 layer per expert projection, routed: a family's fused 3-D expert parameters split per expert and quantized
as bitsandbytes quantizes a linear layer (block size 64, the recipe's double quantization, the compute dtype), and a
forward that runs only the experts a token was routed to, each through bitsandbytes' 4-bit matmul."""

from __future__ import annotations

import torch
from torch import nn

from qtune.modeling.moe.families import MoeFamily, moe_family


class ExpertMLP(nn.Module):
    """One expert: gate_proj, up_proj and down_proj, named as dense models name them (so LoRA's all-linear, and a
    target list of those names, reach every expert and the merge writes each back exactly)."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj


class QuantizedExperts(nn.ModuleList):
    """A layer's experts as 4-bit linear layers ("0", "1", ...: the names of the original per-expert checkpoints),
    called as transformers calls its fused experts: (hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])."""

    def __init__(self, experts: list[ExpertMLP], family: MoeFamily, config):
        super().__init__(experts)
        self.num_experts = len(experts)
        self.family = family.model_type
        if family.activation == "act_fn":  # by name: an activation module would be one more item of this list
            self.hidden_act = config.hidden_act
        else:  # gpt-oss's clamped SwiGLU
            self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit

    def activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The expert's gated activation, as the family's own experts compute it."""
        if self.family != "gpt_oss":
            from transformers.activations import ACT2FN

            return ACT2FN[self.hidden_act](gate) * up
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """Each token's output: its chosen experts' outputs weighted by the router, each expert run once, on the
        tokens routed to it (as transformers' eager experts loop, over per-expert 4-bit layers)."""
        output = torch.zeros_like(hidden_states)
        with torch.no_grad():  # which experts this batch reaches: the others never run, nor are dequantized
            routed = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            hit = torch.greater(routed.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        for index in hit:
            expert = self[index]
            slot, token = torch.where(routed[index])
            state = hidden_states[token]
            hidden = self.activation(expert.gate_proj(state), expert.up_proj(state))
            out = expert.down_proj(hidden) * top_k_weights[token, slot, None]
            output.index_add_(0, token, out.to(output.dtype))
        return output


def expert_slices(tensor: torch.Tensor, attribute: str, layout: str):
    """(projection, expert, weight [out, in]) for each expert projection a fused parameter (gate_up_proj or down_proj)
    holds, in the family's layout: views, not copies."""
    for e in range(tensor.shape[0]):
        if attribute == "down_proj":
            yield "down_proj", e, tensor[e] if layout == "concatenated" else tensor[e].t()
        elif layout == "concatenated":
            width = tensor.shape[1] // 2
            yield "gate_proj", e, tensor[e, :width]
            yield "up_proj", e, tensor[e, width:]
        else:  # gpt-oss: transposed, gate and up in alternate columns
            yield "gate_proj", e, tensor[e, :, ::2].t()
            yield "up_proj", e, tensor[e, :, 1::2].t()


def expert_biases(experts: nn.Module, e: int) -> dict:
    """gpt-oss's biases of expert `e` by projection (none for the other families)."""
    if not hasattr(experts, "gate_up_proj_bias"):
        return {}
    gate_up, down = experts.gate_up_proj_bias.data[e], experts.down_proj_bias.data[e]
    return {"gate_proj": gate_up[::2], "up_proj": gate_up[1::2], "down_proj": down}


def fuse_experts(weights: dict[str, torch.Tensor], family: MoeFamily, layer: int, count: int) -> dict:
    """The family's fused parameters of layer `layer` ({name: tensor}, transformers' names) from per-expert weights
    {"{expert}.gate_proj.weight": [out, in], ...}: the inverse of expert_slices."""
    prefix = f"model.layers.{layer}.mlp.experts."
    gate = torch.stack([weights[f"{e}.gate_proj.weight"] for e in range(count)])
    up = torch.stack([weights[f"{e}.up_proj.weight"] for e in range(count)])
    down = torch.stack([weights[f"{e}.down_proj.weight"] for e in range(count)])
    if family.layout == "concatenated":
        return {prefix + "gate_up_proj": torch.cat([gate, up], dim=1), prefix + "down_proj": down}
    gate_up = torch.stack([gate, up], dim=2).flatten(1, 2).transpose(1, 2)  # [E, H, 2I], gate in the even columns
    gate_bias = torch.stack([weights[f"{e}.gate_proj.bias"] for e in range(count)])
    up_bias = torch.stack([weights[f"{e}.up_proj.bias"] for e in range(count)])
    return {
        prefix + "gate_up_proj": gate_up.contiguous(),
        prefix + "gate_up_proj_bias": torch.stack([gate_bias, up_bias], dim=-1).flatten(-2),
        prefix + "down_proj": down.transpose(1, 2).contiguous(),
        prefix + "down_proj_bias": torch.stack([weights[f"{e}.down_proj.bias"] for e in range(count)]),
    }


def nf4_weight(weight: torch.Tensor, quantization):
    """`weight` ([out, in]) as a bitsandbytes 4-bit weight, quantized exactly as transformers quantizes a linear
    layer's weight on load (in the compute dtype, then Params4bit), so the merge's round trip of the same tensor gives
    the same numbers."""
    import bitsandbytes as bnb

    return bnb.nn.Params4bit(
        weight.to(quantization.bnb_4bit_compute_dtype).contiguous(),
        requires_grad=False,
        compress_statistics=quantization.bnb_4bit_use_double_quant,
        quant_type=quantization.bnb_4bit_quant_type,
        quant_storage=quantization.bnb_4bit_quant_storage,
    ).to(weight.device)


def nf4_weights(tensor: torch.Tensor, attribute: str, model, quantization) -> dict:
    """{(projection, expert): 4-bit weight} for one fused expert parameter as it loads (qtune.modeling.moe.streaming)."""
    layout = moe_family(model.config).layout
    return {
        (projection, e): nf4_weight(w, quantization) for projection, e, w in expert_slices(tensor, attribute, layout)
    }


def linear_4bit(weight, bias: torch.Tensor | None, compute_dtype) -> nn.Module:
    """A bitsandbytes 4-bit linear layer around a 4-bit weight (and a bias in the compute dtype)."""
    import bitsandbytes as bnb

    out_features, in_features = weight.quant_state.shape
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=weight.compress_statistics,
        quant_type=weight.quant_type,
        quant_storage=weight.quant_storage,
        device="meta",
    )
    layer.weight = weight
    weight.module = layer
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(device=weight.device, dtype=compute_dtype).clone(), requires_grad=False)
    return layer


def quantize_experts(model, quantization, compute_dtype) -> int:
    """Replaces each fused experts module of a loaded MoE model with QuantizedExperts; returns the experts replaced
    (0 for a dense model). The 4-bit weights are those quantized while loading (qtune.modeling.moe.streaming), or,
    for a model loaded in 16 bits, quantized here layer by layer."""
    family = moe_family(model.config)
    if family is None:
        return 0
    config = model.config.get_text_config()
    count = 0
    for name, module in list(model.named_modules()):
        if not (hasattr(module, "gate_up_proj") and isinstance(module.gate_up_proj, nn.Parameter)):
            continue
        weights = getattr(module, "nf4_weights", None) or {
            key: value
            for attribute in ("gate_up_proj", "down_proj")
            for key, value in nf4_weights(getattr(module, attribute).data, attribute, model, quantization).items()
        }
        experts = []
        for e in range(family.expert_count(config)):
            biases = expert_biases(module, e)
            experts.append(
                ExpertMLP(
                    *(
                        linear_4bit(weights[(projection, e)], biases.get(projection), compute_dtype)
                        for projection in ("gate_proj", "up_proj", "down_proj")
                    )
                )
            )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, QuantizedExperts(experts, family, config))
        count += len(experts)
    keep_packed_samples_apart(model)
    return count


def fused_expert_parameter(key: str) -> tuple[str, str] | None:
    """(the experts module, the parameter) for a fused expert weight's checkpoint key
    (model.layers.L.mlp.experts.gate_up_proj or .down_proj), None for any other key."""
    module, _, parameter = key.rpartition(".")
    if module.endswith(".experts") and parameter in ("gate_up_proj", "down_proj"):
        return module, parameter
    return None


def map_fused_experts(tensor: torch.Tensor, parameter: str, module: str, family: MoeFamily, change) -> torch.Tensor:
    """A fused expert weight (gate_up_proj or down_proj, in the family's layout) with `change(name, weight [out, in])`
    applied to each expert projection it holds (`name`: the per-expert module, e.g. ...experts.3.gate_proj), in place
    of the projection: how the merge reaches each expert of a checkpoint that stores them fused."""
    result = torch.empty_like(tensor, dtype=torch.float32)
    for e in range(tensor.shape[0]):
        if parameter == "down_proj":
            weight = tensor[e] if family.layout == "concatenated" else tensor[e].t()
            merged = change(f"{module}.{e}.down_proj", weight)
            result[e] = merged if family.layout == "concatenated" else merged.t()
        elif family.layout == "concatenated":
            width = tensor.shape[1] // 2
            result[e, :width] = change(f"{module}.{e}.gate_proj", tensor[e, :width])
            result[e, width:] = change(f"{module}.{e}.up_proj", tensor[e, width:])
        else:
            result[e, :, ::2] = change(f"{module}.{e}.gate_proj", tensor[e, :, ::2].t()).t()
            result[e, :, 1::2] = change(f"{module}.{e}.up_proj", tensor[e, :, 1::2].t()).t()
    return result


def packed_masks_from_position_ids(module, args, kwargs):
    """A forward pre-hook for decoders that build their attention masks without the position ids (gpt-oss in
    transformers 5.25): it builds them with the position ids, so the samples qtune packs into one row stay apart
    (block-diagonal, as every other family's masks are). Without it, gpt-oss's packed samples attend to each other
    (tests/test_moe.py). Only where there is no cache and no mask: a packed training or evaluation forward."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None or kwargs.get("attention_mask") is not None or kwargs.get("past_key_values") is not None:
        return None
    if kwargs.get("use_cache"):
        return None
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = module.embed_tokens(kwargs.pop("input_ids") if "input_ids" in kwargs else args[0])
        args = ()
    masks = {
        "config": module.config,
        "inputs_embeds": embeds,
        "attention_mask": None,
        "cache": None,
        "position_ids": position_ids,
    }
    kwargs.update(
        input_ids=None,
        inputs_embeds=embeds,
        attention_mask={
            "full_attention": create_causal_mask(**masks),
            "sliding_attention": create_sliding_window_causal_mask(**masks),
        },
    )
    return args, kwargs


def keep_packed_samples_apart(model) -> None:
    """Registers packed_masks_from_position_ids on the decoder of the families whose masks ignore position ids."""
    family = moe_family(model.config)
    if family is not None and family.masks_ignore_position_ids:
        decoder = model.get_decoder()
        decoder.register_forward_pre_hook(packed_masks_from_position_ids, with_kwargs=True)


def experts_skeleton(module, family, config) -> QuantizedExperts:
    """Empty (meta) per-expert 4-bit layers for a fused experts module, shaped as the fused weights say."""
    import bitsandbytes as bnb

    quantization = config.quantization_config
    compute_dtype = quantization.bnb_4bit_compute_dtype
    shapes = {}
    for attribute in ("gate_up_proj", "down_proj"):
        for projection, e, weight in expert_slices(getattr(module, attribute), attribute, family.layout):
            shapes[(projection, e)] = tuple(weight.shape)
    biased = hasattr(module, "gate_up_proj_bias")

    def layer(projection, e):
        out_features, in_features = shapes[(projection, e)]
        return bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=biased,
            compute_dtype=compute_dtype,
            compress_statistics=quantization.bnb_4bit_use_double_quant,
            quant_type=quantization.bnb_4bit_quant_type,
            quant_storage=quantization.bnb_4bit_quant_storage,
            device="meta",
        )

    count = family.expert_count(config.get_text_config())
    experts = [ExpertMLP(*(layer(p, e) for p in ("gate_proj", "up_proj", "down_proj"))) for e in range(count)]
    return QuantizedExperts(experts, family, config.get_text_config())


def place_experts_skeletons(model) -> None:
    """Replaces each fused experts module of an empty (meta) model by experts_skeleton."""
    family = moe_family(model.config)
    for name, module in list(model.named_modules()):
        if hasattr(module, "gate_up_proj") and getattr(module.gate_up_proj, "dim", lambda: 0)() == 3:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, experts_skeleton(module, family, model.config))
