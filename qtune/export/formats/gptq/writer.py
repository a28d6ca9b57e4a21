"""The `gptq_int4` / `gptq_int8` writer: the fp16 merge rounded layer by layer with GPTQ on the run's own samples
and saved as compressed-tensors `pack-quantized`; and its loader, transformers with no extra arguments."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from qtune.core.errors import EnvironmentProblem
from qtune.core.fs import staged
from qtune.core.log import get_logger
from qtune.core.testhooks import fault_point
from qtune.export.formats.gptq import export_peak_bytes
from qtune.export.formats.gptq.calibration import (
    calibration_rows,
    decoder_layers,
    place_all_but_layers,
    record_layer_inputs,
)

if TYPE_CHECKING:
    from qtune.export.formats import ExportJob

log = get_logger(__name__)


def quantization_args(bits: int, settings):
    """compressed-tensors' QuantizationArgs for the recipe's export.gptq settings at `bits`."""
    from compressed_tensors.quantization import QuantizationArgs

    grouped = settings.group_size != -1
    return QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=settings.symmetric,
        strategy="group" if grouped else "channel",
        group_size=settings.group_size if grouped else None,
        actorder="weight" if settings.desc_act else None,
    )


def check_memory(peak: dict[str, int], on_gpu: bool) -> None:
    """Refuses, before any weight is read, a GPTQ export the GPU or the RAM cannot hold."""
    import psutil
    import torch

    fix = "lower export.gptq.calibration_samples or calibration_length"
    if on_gpu:
        free, _ = torch.cuda.mem_get_info()
        if free < peak["device"]:
            raise EnvironmentProblem(
                f"the GPTQ export needs about {peak['device'] / 2**30:.2f} GiB of GPU memory, "
                f"{free / 2**30:.2f} GiB free",
                fix=fix,
            )
    free = psutil.virtual_memory().available
    if free < peak["host"]:
        raise EnvironmentProblem(
            f"the GPTQ export needs about {peak['host'] / 2**30:.2f} GiB of RAM, {free / 2**30:.2f} GiB free",
            fix=fix + ", or export on a machine with more RAM",
        )


def hessian_hooks(linears: dict, device) -> tuple[dict, list]:
    """A Hessian (fp32, in x in) per linear layer, accumulated from its inputs by a forward hook on it; returns
    (the Hessians by name, the hooks' handles)."""
    import torch

    from qtune.export.formats.gptq.rounding import accumulate_hessian

    hessians = {
        name: torch.zeros(m.in_features, m.in_features, dtype=torch.float32, device=device)
        for name, m in linears.items()
    }
    seen = dict.fromkeys(linears, 0)

    def hook_for(name):
        def hook(module, inputs, output):
            seen[name] = accumulate_hessian(hessians[name], seen[name], inputs[0].detach())

        return hook

    return hessians, [m.register_forward_hook(hook_for(name)) for name, m in linears.items()]


def gptq_layers(model, rows: list[list[int]], args, settings, *, device, scale_dtype) -> dict[str, tuple]:
    """Rounds every linear layer of every decoder layer with GPTQ, one decoder layer at a time on `device`, each on
    the outputs of the layers already rounded (as the model will compute); returns {module name: (scale, zero
    point)}. The weights are replaced in place by their rounded values."""
    import torch

    from qtune.export.formats.gptq.rounding import gptq_round

    place_all_but_layers(model, device)
    hidden_states, arguments = record_layer_inputs(model, rows, device)
    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    qparams: dict[str, tuple] = {}
    for index, layer in enumerate(layers):
        started = time.perf_counter()
        layer.to(device)
        linears = {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        hessians, hooks = hessian_hooks(linears, device)
        with torch.no_grad():
            for hidden, (args_, kwargs) in zip(hidden_states, arguments[index]):
                layer(hidden, *args_, **kwargs)
        for hook in hooks:
            hook.remove()
        error = 0.0
        for name, module in linears.items():
            rounded, scale, zero_point, loss = gptq_round(
                module.weight,
                hessians.pop(name),
                args,
                desc_act=settings.desc_act,
                dampening=settings.dampening,
                scale_dtype=scale_dtype,
            )
            module.weight.data = rounded.to(module.weight.dtype)
            qparams[f"{prefix}.{index}.{name}"] = (scale.to(scale_dtype).cpu(), zero_point.cpu())
            error += loss
        with torch.no_grad():  # the next layer sees what the rounded layer computes
            for i, (hidden, (args_, kwargs)) in enumerate(zip(hidden_states, arguments[index])):
                output = layer(hidden, *args_, **kwargs)
                hidden_states[i] = output[0] if isinstance(output, tuple) else output
        layer.to("cpu", scale_dtype)  # done with: back in RAM in the 16 bits it is saved in
        log.info(
            f"gptq: layer {index + 1}/{len(layers)}: {len(linears)} linear layers rounded in "
            f"{time.perf_counter() - started:.1f} s (Hessian-weighted error {error:.3g})"
        )
    return qparams


def save_pack_quantized(model, qparams: dict[str, tuple], args, target: Path) -> None:
    """Attaches compressed-tensors' scheme to the rounded linear layers (lm_head stays 16-bit, as vLLM expects), fills
    in the scales and zero points GPTQ chose, packs the integers and saves with the quantization config."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config

    # llm-compressor's form: every Linear, less those left in 16 bits (normally lm_head)
    ignore = sorted(name for name, m in model.named_modules() if type(m).__name__ == "Linear" and name not in qparams)
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
        ignore=ignore,
        quantization_status="frozen",
    )
    apply_quantization_config(model, config)
    modules = dict(model.named_modules())
    for name, (scale, zero_point) in qparams.items():
        module = modules[name]
        module.weight_scale.data = scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data = zero_point.reshape(module.weight_zero_point.shape).to(
                module.weight_zero_point.dtype
            )
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(target)
    compressor.update_config(str(target))


def write_gptq(job: ExportJob, target: Path, bits: int) -> None:
    """The GPTQ format at `bits`, from the fp16 merge, calibrated on the run's training samples."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtune.modeling.config import load_config
    from qtune.modeling.precision import half_dtype

    settings = job.trained.recipe.export.gptq
    merged_dir = job.merged_fp16()
    config = load_config(merged_dir)
    on_gpu = torch.cuda.is_available()
    check_memory(export_peak_bytes(config, settings, on_gpu=on_gpu, parameters=job.parameters), on_gpu)
    rows = calibration_rows(job.trained, settings.calibration_samples, settings.calibration_length)
    half = half_dtype(config)
    started = time.perf_counter()
    # fp32 on a CPU (its 16-bit matmuls are slow or missing); on a GPU the model waits in RAM in 16 bits
    model = AutoModelForCausalLM.from_pretrained(
        merged_dir, dtype=half if on_gpu else torch.float32, device_map={"": "cpu"}
    )
    model.config.use_cache = False
    args = quantization_args(bits, settings)
    qparams = gptq_layers(model, rows, args, settings, device="cuda" if on_gpu else "cpu", scale_dtype=half)
    model.to("cpu", half)
    model.config.use_cache = True
    with staged(target) as staging:
        save_pack_quantized(model, qparams, args, staging)
        AutoTokenizer.from_pretrained(merged_dir).save_pretrained(staging)
        fault_point("gptq")
    size = sum(p.stat().st_size for p in target.glob("*.safetensors"))
    log.info(f"export: {target.name}: {size / 2**20:.1f} MiB, GPTQ in {time.perf_counter() - started:.1f} s")


def load_gptq(path: Path, *, config, dtype, on_gpu: bool):
    """A GPTQ export as transformers users load it: no extra arguments (config.json's quantization_config names
    compressed-tensors, which unpacks each layer on the first forward pass)."""
    from transformers import AutoModelForCausalLM

    from qtune.modeling.load import device_map

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map())
