"""`qtune plan`: the predicted peak memory of a training run, from config.json and the recipe alone, broken down
into the parts that make it (the weights' share comes from qtune.memory), and whether it fits a GPU."""

from __future__ import annotations

from dataclasses import dataclass

from qtune.memory import Inventory, inventory, load_config, weight_memory

GPUS_GIB = {
    "t4": 15.0,
    "l4": 22.0,
    "a10g": 22.0,
    "rtx3090": 24.0,
    "rtx4090": 24.0,
    "a100-40gb": 40.0,
    "a100-80gb": 80.0,
    "h100": 80.0,
    "h200": 141.0,
}
CUDA_OVERHEAD_BYTES = 600 * 2**20  # CUDA context + cuBLAS workspace + allocator slack, typical on a T4-class card
# The process before the model comes in on CPU: Python with torch, transformers, peft, trl, datasets and the
# tokenized data imported (metrics.json's rss_before_model_bytes: 520-560 MiB on the CPU machines here)
CPU_FRAMEWORK_BYTES = 540 * 2**20
# The loaded tokenizer, per vocabulary entry (the Rust vocabulary and merges, and transformers' Python-side maps):
# Gemma 3's 262k-entry tokenizer (a 33 MB tokenizer.json) took 330 MiB of RSS (bench/plan_accuracy.py --gemma).
TOKENIZER_BYTES_PER_VOCAB_ENTRY = 1300
# What training adds on CPU besides tensors: the Trainer and optimizer set up (+25 MiB measured on the demo), the
# library code the first step pages in and heap growth over the run (+35 to +70 MiB on the tiny models here).
CPU_TRAINING_RUNTIME_BYTES = 60 * 2**20


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
    return TrainingShape(
        text.hidden_size,
        getattr(text, "intermediate_size", 4 * text.hidden_size),
        text.num_hidden_layers,
        heads,
        getattr(text, "num_key_value_heads", None) or heads,
        getattr(text, "head_dim", None) or text.hidden_size // heads,
        text.vocab_size,
    )


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


def plan_training(
    recipe,
    *,
    gpu_gib: float | None = None,
    device: str = "cuda",
    compute_bytes: int = 2,
    framework_bytes: int | None = None,
    budget_bytes: int | None = None,
) -> dict:
    """Predicted peak training memory, broken down, for the recipe's model, LoRA, batch and sequence length.

    `budget_bytes` (or `gpu_gib`): the memory to fit in; it decides gradient_checkpointing: auto."""
    if budget_bytes is None and gpu_gib is not None:
        budget_bytes = int(gpu_gib * 2**30)
    config = load_config(recipe.model.name, recipe.model.revision)
    inv = inventory(config)
    shape = training_shape(config)
    # qtune packs each micro-batch into rows of at most max_length tokens and runs forward and backward one row at
    # a time (qtune.training.trainer.QtuneSFTTrainer.training_step): the activations of one row are alive, whatever the batch.
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
    score_bytes = 0 if fused_attention else shape.heads * recipe.data.max_length**2 * compute_bytes * 2
    # with checkpointing: the layer inputs kept, one layer recomputed at a time
    without_checkpointing = tokens * shape.layers * per_layer + score_bytes * shape.layers
    with_checkpointing = tokens * (shape.layers * shape.hidden * compute_bytes + per_layer) + score_bytes
    # The loss scores supervised positions only, a chunk of 2^23 fp32 logits at a time (qtune/loss.py), plus the
    # gathered hidden states and their gradient.
    from qtune.loss import LOGIT_CHUNK_ELEMENTS

    logits = 2 * LOGIT_CHUNK_ELEMENTS * 4 + 2 * tokens * shape.hidden * compute_bytes
    if framework_bytes is None:
        framework_bytes = CUDA_OVERHEAD_BYTES if device == "cuda" else CPU_FRAMEWORK_BYTES
    # host memory: on a GPU it is not part of the device's peak
    tokenizer_bytes = TOKENIZER_BYTES_PER_VOCAB_ENTRY * shape.vocab if device == "cpu" else 0
    runtime_bytes = CPU_TRAINING_RUNTIME_BYTES if device == "cpu" else 0
    fixed = (
        quantized_bytes + unquantized_bytes + lora_bytes + logits + framework_bytes + tokenizer_bytes + runtime_bytes
    )
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
        "tokenizer": tokenizer_bytes,
        "training_runtime": runtime_bytes,
    }
    total = sum(parts.values())
    loading = None
    if device == "cpu":
        # Loading on CPU peaks before training starts: safetensors maps the checkpoint file and every page read
        # stays resident in the process until the load ends, on top of the model being built. (On a GPU the
        # checkpoint passes through host RAM, not GPU memory.) Measured on a 1.1B model: the whole run's peak.
        checkpoint = inv.total * checkpoint_bytes_per_parameter(config)
        loading = framework_bytes + tokenizer_bytes + checkpoint + quantized_bytes + unquantized_bytes
    peak_phase = "loading" if loading is not None and loading > total else "training"
    result = {
        "model": recipe.model.name,
        "tokens_per_micro_batch": tokens,
        "parts": parts,
        "gradient_checkpointing": checkpointing,
        "training_bytes": total,
        "loading_bytes": loading,
        "peak_phase": peak_phase,
        "total_bytes": max(total, loading or 0),
        "activations_with_checkpointing": with_checkpointing,
        "activations_without_checkpointing": without_checkpointing,
        "lora_parameters": lora,
    }
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
    lines = [
        f"{plan['model']}: predicted peak training memory {plan['total_bytes'] / gib:.2f} GiB "
        f"(activations of one packed row of {plan['tokens_per_micro_batch']} tokens at a time)"
    ]
    for name, value in plan["parts"].items():
        lines.append(f"  {name.replace('_', ' '):<32} {value / gib:8.2f} GiB")
    lines.append(
        f"  (activations: {plan['activations_with_checkpointing'] / gib:.2f} GiB with gradient checkpointing, "
        f"{plan['activations_without_checkpointing'] / gib:.2f} GiB without; planned "
        f"{'with' if plan['gradient_checkpointing'] else 'without'})"
    )
    if plan.get("loading_bytes") is not None:
        lines.append(
            f"  loading (CPU: the mapped checkpoint + the model being built) {plan['loading_bytes'] / gib:.2f} GiB; "
            f"training {plan['training_bytes'] / gib:.2f} GiB: the peak comes while {plan['peak_phase']}"
        )
    if "fits" in plan:
        verdict = "fits" if plan["fits"] else "does NOT fit"
        lines.append(f"{gpu}: {plan['gpu_bytes'] / gib:.0f} GiB -> {verdict}")
        if not plan["fits"]:
            lines.append(
                f"  largest data.max_length that fits: {plan['largest_max_length']} (train.micro_batch_size "
                f"does not change the peak: one packed row of <= max_length tokens is in flight at a time)"
            )
            if "with_gradient_checkpointing_bytes" in plan:
                lines.append(
                    f"  train.gradient_checkpointing: true would need "
                    f"{plan['with_gradient_checkpointing_bytes'] / gib:.2f} GiB (the biggest single saving)"
                )
    return "\n".join(lines)


def oom_warning(recipe, gpu_bytes: int, compute_bytes: int = 2) -> str | None:
    """A warning line when the plan predicts more than the GPU has (`qtune train` prints it, and goes on)."""
    plan = plan_training(recipe, gpu_gib=gpu_bytes / 2**30, compute_bytes=compute_bytes)
    if plan["fits"]:
        return None
    advice = f"try data.max_length <= {plan['largest_max_length']}"
    if "with_gradient_checkpointing_bytes" in plan:
        advice = "train.gradient_checkpointing: true, or " + advice
    return (
        f"warning: qtune plan predicts {plan['total_bytes'] / 2**30:.1f} GiB at peak, the GPU has "
        f"{gpu_bytes / 2**30:.1f} GiB: this run may run out of memory ({advice}; `qtune plan` for the breakdown)"
    )
