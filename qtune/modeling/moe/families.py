"""The mixture-of-experts families qtune trains in 4 bits, one entry per transformers model type: how its fused expert
parameters split into per-expert projections (and fuse back), its expert activation, its router, and how its
original checkpoint names the experts. The module stays light to import (no torch): `qtune validate` reads it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MoeFamily:
    """What qtune needs to know of one MoE family.

    layout: "concatenated" (gate_up_proj [E, 2I, H], the gate rows first; down_proj [E, H, I]: nn.Linear's
    orientation) or "interleaved" (gpt-oss: gate_up_proj [E, H, 2I] with gate and up in alternate columns, down_proj
    [E, I, H], biases beside them)."""

    model_type: str
    experts_key: str  # the config key of the number of routed experts
    layout: str
    router: str  # the router's attribute in the MoE block: frozen, in 16 bits, never a LoRA target
    activation: str  # "act_fn": the config's hidden_act on the gate, times up; "clamped_swiglu": gpt-oss's
    expert_width_key: str = "moe_intermediate_size"  # the config key of one expert's intermediate width
    shared_expert: str | None = None  # the block's dense shared expert, where the family has one
    # original checkpoint name of an expert projection -> the module qtune's model has ({layer}, {expert} filled in)
    checkpoint_experts: str = r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight"
    checkpoint_projections: dict = field(default_factory=dict)  # the checkpoint's projection names -> qtune's
    checkpoint_block: str = "mlp"  # the MoE block's name in checkpoints transformers saves
    # its decoder builds attention masks without the position ids, so packed samples would see each other
    masks_ignore_position_ids: bool = False

    def expert_count(self, config) -> int:
        """The number of routed experts per layer."""
        return int(getattr(config, self.experts_key))

    def expert_width(self, config) -> int:
        """One expert's intermediate width."""
        return int(getattr(config, self.expert_width_key))

    def expert_module(self, checkpoint_key: str) -> str | None:
        """The per-expert module (model.layers.L.mlp.experts.E.gate_proj) an original checkpoint key holds, or None."""
        match = re.fullmatch(self.checkpoint_experts, checkpoint_key)
        if match is None:
            return None
        layer, expert, projection = match.groups()
        projection = self.checkpoint_projections.get(projection, projection)
        return f"model.layers.{layer}.mlp.experts.{expert}.{projection}"

    def original_key(self, module: str) -> str:
        """The weight's key, in the family's original checkpoint layout, of a per-expert module (the inverse of
        expert_module): what from_pretrained reads back, e.g. Mixtral's block_sparse_moe.experts.E.w1.weight."""
        prefix, _, projection = module.rpartition(".")
        names = {qtune: original for original, qtune in self.checkpoint_projections.items()}
        prefix = prefix.replace(".mlp.", f".{self.checkpoint_block}.")
        return f"{prefix}.{names.get(projection, projection)}.weight"


MOE_FAMILIES: dict[str, MoeFamily] = {
    family.model_type: family
    for family in (
        MoeFamily("qwen3_moe", "num_experts", "concatenated", "gate", "act_fn"),
        MoeFamily("olmoe", "num_experts", "concatenated", "gate", "act_fn", "intermediate_size"),
        MoeFamily(
            "mixtral",
            "num_local_experts",
            "concatenated",
            "gate",
            "act_fn",
            "intermediate_size",
            # Mixtral's own names (w1, w3, w2), or qtune's in a base it saved in 4 bits
            checkpoint_experts=r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight",
            checkpoint_projections={"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"},
            checkpoint_block="block_sparse_moe",
        ),
        MoeFamily(
            "gpt_oss",
            "num_local_experts",
            "interleaved",
            "router",
            "clamped_swiglu",
            "intermediate_size",
            # its own checkpoints keep the experts fused; a base qtune saved in 4 bits has them per expert
            masks_ignore_position_ids=True,
        ),
    )
}

# Config keys that mark a model as a mixture of experts, whatever its family
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def moe_family(config) -> MoeFamily | None:
    """The registry's entry for this model's family, or None for a dense model (or an MoE family qtune lacks)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    # the class's model type: qtune masks the instance's while peft or transformers' loader must not see it
    return MOE_FAMILIES.get(getattr(type(text), "model_type", None) or getattr(text, "model_type", None))


def is_moe(config: dict) -> bool:
    """Whether a config.json (as a dict) describes a mixture of experts."""
    return any(int(config.get(key) or 0) > 1 for key in EXPERT_COUNT_KEYS)


def moe_problem(config: dict) -> tuple[str, str] | None:
    """(why qtune cannot train this model's experts in 4 bits, how to fix it), or None: an MoE family it has no
    entry for, or a checkpoint whose experts are stored in a format qtune does not read."""
    if not is_moe(config):
        return None
    model_type = config.get("model_type")
    if model_type not in MOE_FAMILIES:
        return (
            f"{model_type} is a mixture of experts qtune has no 4-bit experts for",
            f"qtune trains the experts of {', '.join(sorted(MOE_FAMILIES))}",
        )
    saved = (config.get("quantization_config") or {}).get("quant_method")
    if saved == "mxfp4":
        # transformers would dequantize every expert to 16 bits at once to load it (40 GB for gpt-oss-20b)
        return (
            "this checkpoint stores its experts in MXFP4, which qtune does not read",
            "use a 16-bit copy of the model (e.g. unsloth/gpt-oss-20b-BF16); qtune quantizes it to NF4 as it loads",
        )
    return None
