"""Mixtures of experts saved in 4 bits by qtune (an NF4 export, or a base saved after quantizing): each expert's
projections as bitsandbytes saves a 4-bit linear layer (the packed weight and its quantization state under
model.layers.L.mlp.experts.E.gate_proj.weight...), the layout of the original per-expert checkpoints.

transformers 5 cannot load those as they are: it fuses the per-expert keys of these families into 3-D parameters on
load (its conversion mapping, chosen by the config's model type), which packed 4-bit weights are not, and it would
allocate the fused 16-bit experts first. So the load goes through the streaming quantizer (qtune.modeling.moe.
streaming), which puts per-expert 4-bit layers where the fused experts were before any weight is read, with the
conversion mapping kept away; bitsandbytes' own deserialization then fills them like any other 4-bit layer."""

from __future__ import annotations

import copy

from qtune.modeling.moe.experts import QuantizedExperts, keep_packed_samples_apart
from qtune.modeling.moe.families import moe_family


def saved_moe_options(config) -> dict:
    """from_pretrained's arguments for a mixture of experts saved in 4 bits by qtune: a copy of its config whose
    quantization selects the streaming quantizer and whose model type keeps transformers' conversion mapping away
    (Mixtral's block renamed as the mapping would); none for any other model."""
    from transformers import BitsAndBytesConfig

    from qtune.modeling.moe.streaming import experts_quantizer_config

    family = moe_family(config)
    if family is None:
        return {}
    loading = copy.deepcopy(config)
    saved = config.quantization_config
    saved = saved if isinstance(saved, BitsAndBytesConfig) else BitsAndBytesConfig.from_dict(saved)
    spec = experts_quantizer_config(saved).to_dict()
    for key in ("load_in_4bit", "load_in_8bit"):  # with these, transformers reads any such dict as plain bitsandbytes
        spec.pop(key)
    loading.quantization_config = spec
    loading.model_type = f"qtune-{type(config).model_type}"  # no conversion mapping: the experts stay per expert
    options = {"config": loading}
    if family.checkpoint_block != "mlp":
        options["key_mapping"] = {rf"\.{family.checkpoint_block}\.": ".mlp."}
    return options


def finish_saved_moe(model, quantization) -> None:
    """After loading with saved_moe_options: the model's config says its own model type and bitsandbytes again, the
    router computes in the dtype of the hidden states, and packed samples stay apart."""
    from transformers import BitsAndBytesConfig

    from qtune.modeling.moe.streaming import as_bitsandbytes

    family = moe_family(model.config)
    if family is None:
        return
    model.config.__dict__.pop("model_type", None)
    as_bitsandbytes(
        model,
        quantization if isinstance(quantization, BitsAndBytesConfig) else BitsAndBytesConfig.from_dict(quantization),
    )
    dtype = model.get_input_embeddings().weight.dtype
    for module in model.modules():
        if isinstance(getattr(module, "experts", None), QuantizedExperts):  # an MoE block: its router beside them
            router = getattr(module, family.router)
            # transformers loads a pre-quantized checkpoint's other weights in its own choice of dtype, not the same
            # for all (gpt-oss's router stayed fp16 under an fp32 load, its embeddings did not)
            router.to(dtype)
    keep_packed_samples_apart(model)
