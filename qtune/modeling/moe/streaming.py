"""A mixture of experts quantized while it loads: each layer's experts go to 4 bits as soon as transformers has read
them from the checkpoint (and fused them), so no more than one layer's experts are ever in 16 bits in memory.

bitsandbytes' quantizer in transformers quantizes nn.Linear weights only, so it is extended here: the fused expert
parameters are quantized too, one 4-bit weight per expert projection (qtune.modeling.moe.experts.nf4_weights), and
quantize_experts later builds the per-expert layers from them without a 16-bit copy. transformers picks a quantizer by
the configuration's quant_method, so this one is registered under its own name (its registry is the library's own
extension point); after loading, the model says it is bitsandbytes-quantized again (what it saves and what peft and
the Trainer check)."""

from __future__ import annotations

import torch
from transformers import BitsAndBytesConfig
from transformers.integrations.bitsandbytes import Bnb4bitQuantize
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from qtune.modeling.moe.experts import nf4_weights, place_experts_skeletons

METHOD = "qtune_bnb_experts"


def is_fused_experts(module, name: str) -> bool:
    """Whether `name` is a fused 3-D expert weight of `module` (transformers' experts)."""
    parameter = getattr(module, name, None)
    return name in ("gate_up_proj", "down_proj") and isinstance(parameter, torch.nn.Parameter) and parameter.dim() == 3


class ExpertsBitsAndBytesConfig(BitsAndBytesConfig):
    """bitsandbytes' 4-bit configuration, selecting ExpertsQuantizer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.quant_method = METHOD

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        """The configuration from its dict (qtune.modeling.moe.saved writes it without load_in_4bit, which would make
        transformers read it as plain bitsandbytes)."""
        spec = {k: v for k, v in config_dict.items() if not k.startswith("_load_in") and k != "quant_method"}
        return super().from_dict({**spec, "load_in_4bit": True}, return_unused_kwargs=return_unused_kwargs, **kwargs)


class ExpertsQuantize(Bnb4bitQuantize):
    """bitsandbytes' quantization of a linear weight as it loads, and of a fused expert weight one expert at a time."""

    def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
        """The loaded tensors quantized: an expert weight's 4-bit weights kept on its module (its 16-bit tensor let
        go: an empty placeholder takes its place), a linear weight as bitsandbytes' own quantizer does."""
        result, linear = {}, {}
        for name, value in input_dict.items():
            module, attribute = get_module_from_name(model, name)
            if not is_fused_experts(module, attribute):
                linear[name] = value
                continue
            value = value[0] if isinstance(value, list) else value
            quantized = nf4_weights(value, attribute, model, self.hf_quantizer.quantization_config)
            module.nf4_weights = {**getattr(module, "nf4_weights", {}), **quantized}
            result[name] = torch.empty(0, device=value.device)
        if linear:
            result.update(super().convert(linear, full_layer_name=full_layer_name, model=model, **kwargs))
        return result


class ExpertsQuantizer(Bnb4BitHfQuantizer):
    """bitsandbytes' 4-bit quantizer, which also quantizes a mixture of experts' fused experts as they load."""

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        """A linear weight, as bitsandbytes says, or a fused expert weight."""
        module, attribute = get_module_from_name(model, param_name)
        return is_fused_experts(module, attribute) or super().param_needs_quantization(model, param_name, **kwargs)

    def get_quantize_ops(self):
        """The quantization applied to each loaded tensor that needs it."""
        return ExpertsQuantize(self)

    def _process_model_before_weight_loading(self, model, device_map, **kwargs):
        """bitsandbytes' 4-bit layers in place of the linear ones; for a checkpoint qtune saved in 4 bits, per-expert
        4-bit layers in place of the fused experts too (qtune.modeling.moe.saved), which its weights then fill."""
        super()._process_model_before_weight_loading(model, device_map, **kwargs)
        if self.pre_quantized:
            place_experts_skeletons(model)


def experts_quantizer_config(quantization):
    """`quantization` (a 4-bit BitsAndBytesConfig) as the configuration that selects ExpertsQuantizer, registered
    with transformers the first time (its registries refuse a name twice)."""
    if METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantization_config(METHOD)(ExpertsBitsAndBytesConfig)
        register_quantizer(METHOD)(ExpertsQuantizer)
    return ExpertsBitsAndBytesConfig.from_dict(quantization.to_dict())


def as_bitsandbytes(model, quantization) -> None:
    """The loaded model's configuration as plain bitsandbytes says it (what it saves, and what peft and the Trainer
    look for)."""
    from transformers.utils.quantization_config import QuantizationMethod

    model.config.quantization_config = quantization
    model.quantization_method = QuantizationMethod.BITS_AND_BYTES
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.quantization_config = quantization
