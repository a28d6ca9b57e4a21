"""Memory arithmetic from config.json alone: what the weights take in each precision, before any download.

The parameter inventory comes from an empty (meta-device) model built from the config, and the set of
layers bitsandbytes quantizes from transformers' own rules (the same function the merge uses), so the
figures follow the real loader instead of a hand-kept list of layer names.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from qtune.errors import EnvironmentProblem

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

    @property
    def quantized(self) -> int:
        return sum(o * i for o, i in self.quantized_shapes)

    @property
    def unquantized(self) -> int:
        return self.embeddings + self.lm_head + self.norms + self.other

    @property
    def total(self) -> int:
        return self.quantized + self.unquantized


def load_config(model_name: str, revision: str = "main"):
    """config.json only: from a local folder, or that single file from the Hub."""
    from transformers import AutoConfig

    path = Path(model_name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EnvironmentProblem(f"no config.json in {model_name}", fix="give a model folder or a Hub id")
        return AutoConfig.from_pretrained(path)
    if path.suffix == ".json" and path.is_file():
        return AutoConfig.from_pretrained(path.parent)
    try:
        from huggingface_hub import hf_hub_download

        config_file = hf_hub_download(model_name, "config.json", revision=revision)
    except Exception as e:
        raise EnvironmentProblem(f"cannot read config.json of '{model_name}': {type(e).__name__}",
                                 fix="check the id and the network (gated models need `hf auth login`), "
                                     "or give a local folder") from None
    return AutoConfig.from_pretrained(Path(config_file).parent)


def inventory(config) -> Inventory:
    import torch
    from transformers import AutoModelForCausalLM

    from qtune.export import quantized_weight_names

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    quantized = quantized_weight_names(config)
    result = Inventory(tied_embeddings=bool(config.get_text_config().tie_word_embeddings))
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
        elif param is input_embedding:
            result.embeddings += param.numel()
        elif param is output_weight:
            result.lm_head += param.numel()
        elif param.dim() == 1 and "norm" in name.lower():
            result.norms += param.numel()
        else:
            result.other += param.numel()
    return result


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
    precision: str
    tensors_bytes: int  # what get_memory_footprint() counts: parameters and buffers
    constants_bytes: int  # quantization constants bitsandbytes keeps beside them (not parameters)

    @property
    def total_bytes(self) -> int:
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
    def count(n):
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"

    lines = [f"{model_name}: {count(inv.total)} parameters",
             f"  quantizable linear layers {count(inv.quantized):>10}  ({len(inv.quantized_shapes)} matrices)",
             f"  embeddings                {count(inv.embeddings):>10}",
             f"  lm_head                   {count(inv.lm_head):>10}" + ("  (tied to the embeddings)" if inv.tied_embeddings else ""),
             f"  norms                     {count(inv.norms):>10}",
             f"  other (biases, ...)       {count(inv.other):>10}", "",
             ""]
    unit, scale = ("GiB", 2**30) if inv.total * 4 >= 2**30 else ("MiB", 2**20)
    lines[-1] = f"{'precision':<10} {'weights ' + unit:>12} {'+ quant consts':>15} {'total ' + unit:>10} {'bits/param':>11}"
    for precision in PRECISIONS:
        memory = weight_memory(inv, precision)
        lines.append(f"{precision:<10} {memory.tensors_bytes / scale:>12.3f} {memory.constants_bytes / scale:>15.3f} "
                     f"{memory.total_bytes / scale:>10.3f} {8 * memory.total_bytes / inv.total:>11.2f}")
    lines.append("(int8/fp4/nf4: embeddings, lm_head and norms stay 16-bit, as bitsandbytes leaves them)")
    return "\n".join(lines)


def memory_report(model_name: str, revision: str = "main") -> dict:
    config = load_config(model_name, revision)
    inv = inventory(config)
    return {
        "model": model_name,
        "parameters": {"total": inv.total, "quantizable_linear": inv.quantized, "embeddings": inv.embeddings,
                       "lm_head": inv.lm_head, "norms": inv.norms, "other": inv.other},
        "weights_bytes": {p: {"tensors": m.tensors_bytes, "quant_constants": m.constants_bytes, "total": m.total_bytes}
                          for p in PRECISIONS for m in [weight_memory(inv, p)]},
        "text": describe_inventory(model_name, inv),
    }


def report_json(report: dict) -> str:
    return json.dumps({k: v for k, v in report.items() if k != "text"}, indent=2)


# --------------------------------------------------------------------------- training peak: qtune plan

GPUS_GIB = {"t4": 15.0, "l4": 22.0, "a10g": 22.0, "rtx3090": 24.0, "rtx4090": 24.0, "a100-40gb": 40.0,
            "a100-80gb": 80.0, "h100": 80.0, "h200": 141.0}
CUDA_OVERHEAD_BYTES = 600 * 2**20  # CUDA context + cuBLAS workspace + allocator slack, typical on a T4-class card
# The process before the model comes in on CPU: Python with torch, transformers, peft, trl, datasets and the
# tokenized data imported (metrics.json's rss_before_model_bytes: 520-560 MiB on the CPU machines here)
CPU_FRAMEWORK_BYTES = 540 * 2**20


def checkpoint_bytes_per_parameter(config) -> int:
    dtype = str(getattr(config.get_text_config(), "dtype", None) or getattr(config, "dtype", None) or "float16")
    return 4 if "32" in dtype else 2


@dataclass
class TrainingShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


def training_shape(config) -> TrainingShape:
    text = config.get_text_config()
    heads = text.num_attention_heads
    return TrainingShape(text.hidden_size, getattr(text, "intermediate_size", 4 * text.hidden_size), text.num_hidden_layers,
                         heads, getattr(text, "num_key_value_heads", None) or heads,
                         getattr(text, "head_dim", None) or text.hidden_size // heads, text.vocab_size)


def lora_parameter_count(inv: Inventory, r: int, targets: int | None = None) -> int:
    shapes = inv.quantized_shapes if targets is None else inv.quantized_shapes[:targets]
    return sum(r * (o + i) for o, i in shapes)


def activation_bytes_per_token_per_layer(shape: TrainingShape, act_bytes: int, lora_dropout: bool) -> int:
    """What autograd keeps per token and decoder layer of a Llama-style block with LoRA on every linear layer.

    Frozen 4-bit matmuls keep no input for a weight gradient; LoRA branches keep their input (one shared normed
    input for q/k/v and one for gate/up) and, with dropout, a 1-byte mask each (qtune.model.lean_lora_dropout);
    RMSNorm keeps fp32 copies; attention (SDPA) keeps q, k, v, the output and the log-sum-exp; the gated MLP
    keeps gate, up, the activation and their product.
    """
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    q = shape.heads * shape.head_dim
    norms = 2 * (2 * h * 4 + h * act_bytes)  # two RMSNorms: fp32 input and normalised copy, and the cast output
    lora_inputs = h + q + h + i
    masks = (3 * h + h + 2 * h + i) if lora_dropout else 0
    attention = (q + kv) + (q + 2 * kv + q)  # rotary q/k, then q, k, v and the output kept by SDPA
    mlp = 3 * i  # gate (SiLU input), SiLU output, up
    return norms + act_bytes * (lora_inputs + attention + mlp) + masks


def plan_training(recipe, *, gpu_gib: float | None = None, device: str = "cuda", compute_bytes: int = 2,
                  framework_bytes: int | None = None, budget_bytes: int | None = None) -> dict:
    """Predicted peak training memory, broken down, for the recipe's model, LoRA, batch and sequence length.

    `budget_bytes` (or `gpu_gib`): the memory to fit in; it decides gradient_checkpointing: auto."""
    if budget_bytes is None and gpu_gib is not None:
        budget_bytes = int(gpu_gib * 2**30)
    config = load_config(recipe.model.name, recipe.model.revision)
    inv = inventory(config)
    shape = training_shape(config)
    # qtune packs each micro-batch into rows of at most max_length tokens and runs forward and backward one row at
    # a time (finetune.QtuneSFTTrainer.training_step): the activations of one row are alive, whatever the batch.
    tokens = recipe.data.max_length
    weights = weight_memory(inv, recipe.quant.type + ("_dq" if recipe.quant.double_quant else ""))
    quantized_bytes = weights.total_bytes - inv.unquantized * 2
    # peft's prepare_model_for_kbit_training keeps the unquantized parts (embeddings, lm_head, norms) in fp32
    unquantized_bytes = inv.unquantized * 4
    lora = lora_parameter_count(inv, recipe.lora.r)
    optimizer_bytes_per_param = {"paged_adamw_8bit": 2, "adamw_8bit": 2, "paged_adamw_32bit": 8, "adamw_torch": 8}
    lora_bytes = lora * (4 + 4 + optimizer_bytes_per_param[recipe.train.optimizer])
    per_layer = activation_bytes_per_token_per_layer(shape, compute_bytes, recipe.lora.dropout > 0)
    # Eager attention materialises scores and probabilities per layer: b x heads x s^2. SDPA does not, on GPUs and on
    # CPU alike (measured on CPU: the same memory at 4,096 tokens as 16 x 256, 8 x 512 or 4 x 1024).
    fused_attention = recipe.model.attn_implementation != "eager"
    score_bytes = 0 if fused_attention else shape.heads * recipe.data.max_length ** 2 * compute_bytes * 2
    # with checkpointing: the layer inputs kept, one layer recomputed at a time
    without_checkpointing = tokens * shape.layers * per_layer + score_bytes * shape.layers
    with_checkpointing = tokens * (shape.layers * shape.hidden * compute_bytes + per_layer) + score_bytes
    # The loss scores supervised positions only, a chunk of 2^23 fp32 logits at a time (qtune/loss.py), plus the
    # gathered hidden states and their gradient.
    from qtune.loss import LOGIT_CHUNK_ELEMENTS

    logits = 2 * LOGIT_CHUNK_ELEMENTS * 4 + 2 * tokens * shape.hidden * compute_bytes
    if framework_bytes is None:
        framework_bytes = CUDA_OVERHEAD_BYTES if device == "cuda" else CPU_FRAMEWORK_BYTES
    fixed = quantized_bytes + unquantized_bytes + lora_bytes + logits + framework_bytes
    checkpointing = recipe.train.gradient_checkpointing
    if checkpointing == "auto":
        # off unless it is needed to fit; without a budget to fit into, off
        checkpointing = budget_bytes is not None and fixed + without_checkpointing > budget_bytes
    activations = with_checkpointing if checkpointing else without_checkpointing
    parts = {
        "quantized_base": quantized_bytes,
        "unquantized_parts_fp32": unquantized_bytes,
        "lora_weights_grads_optimizer": lora_bytes,
        "activations": activations,
        "logits_and_loss": logits,
        "framework_overhead": framework_bytes,
    }
    total = sum(parts.values())
    loading = None
    if device == "cpu":
        # Loading on CPU peaks before training starts: safetensors maps the checkpoint file and every page read
        # stays resident in the process until the load ends, on top of the model being built. (On a GPU the
        # checkpoint passes through host RAM, not GPU memory.) Measured on a 1.1B model: the whole run's peak.
        loading = (framework_bytes + inv.total * checkpoint_bytes_per_parameter(config)
                   + quantized_bytes + unquantized_bytes)
    peak_phase = "loading" if loading is not None and loading > total else "training"
    result = {"model": recipe.model.name, "tokens_per_micro_batch": tokens, "parts": parts,
              "gradient_checkpointing": checkpointing,
              "training_bytes": total, "loading_bytes": loading, "peak_phase": peak_phase,
              "total_bytes": max(total, loading or 0),
              "activations_with_checkpointing": with_checkpointing,
              "activations_without_checkpointing": without_checkpointing, "lora_parameters": lora}
    if budget_bytes is not None:
        budget = budget_bytes
        result["gpu_bytes"] = budget
        result["fits"] = result["total_bytes"] <= budget
        per_token = activations / tokens
        result["largest_max_length"] = int((budget - fixed) / per_token) if budget > fixed else 0
        if not checkpointing:
            result["with_gradient_checkpointing_bytes"] = total - activations + with_checkpointing
    return result


def describe_plan(plan: dict, gpu: str | None) -> str:
    gib = 2**30
    lines = [f"{plan['model']}: predicted peak training memory {plan['total_bytes'] / gib:.2f} GiB "
             f"(activations of one packed row of {plan['tokens_per_micro_batch']} tokens at a time)"]
    for name, value in plan["parts"].items():
        lines.append(f"  {name.replace('_', ' '):<32} {value / gib:8.2f} GiB")
    lines.append(f"  (activations: {plan['activations_with_checkpointing'] / gib:.2f} GiB with gradient checkpointing, "
                 f"{plan['activations_without_checkpointing'] / gib:.2f} GiB without; planned "
                 f"{'with' if plan['gradient_checkpointing'] else 'without'})")
    if plan.get("loading_bytes") is not None:
        lines.append(f"  loading (CPU: the mapped checkpoint + the model being built) {plan['loading_bytes'] / gib:.2f} GiB; "
                     f"training {plan['training_bytes'] / gib:.2f} GiB: the peak comes while {plan['peak_phase']}")
    if "fits" in plan:
        verdict = "fits" if plan["fits"] else "does NOT fit"
        lines.append(f"{gpu}: {plan['gpu_bytes'] / gib:.0f} GiB -> {verdict}")
        if not plan["fits"]:
            lines.append(f"  largest data.max_length that fits: {plan['largest_max_length']} (train.micro_batch_size "
                         f"does not change the peak: one packed row of <= max_length tokens is in flight at a time)")
            if "with_gradient_checkpointing_bytes" in plan:
                lines.append(f"  train.gradient_checkpointing: true would need "
                             f"{plan['with_gradient_checkpointing_bytes'] / gib:.2f} GiB (the biggest single saving)")
    return "\n".join(lines)


def oom_warning(recipe, gpu_bytes: int, compute_bytes: int = 2) -> str | None:
    """A warning line when the plan predicts more than the GPU has (`qtune train` prints it, and goes on)."""
    plan = plan_training(recipe, gpu_gib=gpu_bytes / 2**30, compute_bytes=compute_bytes)
    if plan["fits"]:
        return None
    advice = f"try data.max_length <= {plan['largest_max_length']}"
    if "with_gradient_checkpointing_bytes" in plan:
        advice = "train.gradient_checkpointing: true, or " + advice
    return (f"warning: qtune plan predicts {plan['total_bytes'] / 2**30:.1f} GiB at peak, the GPU has "
            f"{gpu_bytes / 2**30:.1f} GiB: this run may run out of memory ({advice}; `qtune plan` for the breakdown)")
