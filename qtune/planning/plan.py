"""`qtune plan`: the predicted peak memory of a training run, from config.json and the recipe alone, broken down
into the parts that make it (the weights' share comes from qtune.planning.memory), and whether it fits a GPU."""

from __future__ import annotations

from dataclasses import dataclass

from qtune.modeling.config import load_config
from qtune.planning.memory import Inventory, inventory, weight_memory
from qtune.training.methods import method_of

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
# Constants measured on CPU runs (bench/plan_accuracy.py; bench/README.md, "Memory plan"):
# the process before the model comes in: Python with torch, transformers, peft, trl, datasets and the data imported
CPU_FRAMEWORK_BYTES = 540 * 2**20
# the loaded tokenizer, per vocabulary entry (the Rust vocabulary and merges, and transformers' Python-side maps)
TOKENIZER_BYTES_PER_VOCAB_ENTRY = 1300
# what training adds besides tensors: the Trainer and optimizer, the code the first step pages in, heap growth
CPU_TRAINING_RUNTIME_BYTES = 60 * 2**20


def checkpoint_bytes_per_parameter(config) -> int:
    """Bytes per parameter of the base's checkpoint on disk (fp32 or 16-bit)."""
    dtype = str(getattr(config.get_text_config(), "dtype", None) or getattr(config, "dtype", None) or "float16")
    return 4 if "32" in dtype else 2


@dataclass
class TrainingShape:
    """The dimensions of a decoder the activation arithmetic needs."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts: int = 0  # a mixture of experts: routed experts per layer (0: a dense model)
    experts_per_token: int = 0


def training_shape(config) -> TrainingShape:
    """The decoder's dimensions, from its config. A mixture of experts' MLP width per token is that of the experts a
    token goes through (num_experts_per_tok times one expert's width)."""
    from qtune.modeling.moe.families import moe_family

    text = config.get_text_config()
    heads = text.num_attention_heads
    family = moe_family(config)
    experts = family.expert_count(text) if family else 0
    per_token = text.num_experts_per_tok if family else 0
    intermediate = per_token * family.expert_width(text) if family else getattr(text, "intermediate_size", None)
    return TrainingShape(
        text.hidden_size,
        intermediate or 4 * text.hidden_size,
        text.num_hidden_layers,
        heads,
        getattr(text, "num_key_value_heads", None) or heads,
        getattr(text, "head_dim", None) or text.hidden_size // heads,
        text.vocab_size,
        experts,
        per_token,
    )


def lora_parameter_count(inv: Inventory, r: int, targets: int | None = None) -> int:
    """LoRA parameters at rank r on every quantized layer (or the first `targets`)."""
    shapes = inv.quantized_shapes if targets is None else inv.quantized_shapes[:targets]
    return sum(r * (o + i) for o, i in shapes)


def activation_bytes_per_token_per_layer(
    shape: TrainingShape, act_bytes: int, lora_dropout: bool, lean: bool = True
) -> int:
    """What autograd keeps per token and decoder layer of a Llama-style block with LoRA on every linear layer,
    counted tensor by tensor with saved-tensor hooks (CPU, fp32 and bf16 autocast: tests/test_long_context.py).

    Frozen 4-bit matmuls keep no input for a weight gradient. The RMSNorms keep their input (qtune/modeling/lean_ops.py;
    transformers' keep an fp32 copy) and their output feeds the LoRA branches after them (one shared tensor for q/k/v
    and one for gate/up: peft's cast to fp32 is off, qtune.modeling.lean_ops.lora_inputs_stay_in_compute_dtype); attention
    (SDPA) keeps q, k, v, the output and the log-sum-exp, and o_proj's LoRA its input; the MLP keeps gate and up
    (and SiLU's output, without the lean ops) and their product, down's input. With dropout, each LoRA branch adds
    a 1-byte mask (qtune.modeling.lean_ops.lean_lora_dropout).
    """
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    q = shape.heads * shape.head_dim
    norms = 2 * (h * act_bytes + 4) if lean else 2 * h * 4
    normed = 2 * h
    attention = 2 * q + 2 * kv + q  # q, k, v, output; o_proj's input
    mlp = (3 if lean else 4) * i
    masks = (3 * h + q + 2 * h + i) if lora_dropout else 0
    # a mixture of experts: each chosen expert's gathered input (its LoRA branches keep it) and weighted output, and
    # the router's logits and probabilities in fp32 (the load-balancing loss keeps them)
    routing = act_bytes * 2 * shape.experts_per_token * h + 2 * 4 * shape.experts
    return norms + act_bytes * (normed + attention + mlp) + 4 * shape.heads + masks + routing


def backward_transient_bytes_per_token(shape: TrainingShape, act_bytes: int, lean: bool = True) -> int:
    """At the peak of one layer's backward pass (the MLP's), gradients alive beside what is still saved, once,
    whatever the number of layers: down's input gradient (the lean SwiGLU writes its own over its inputs), or
    without the lean ops two more intermediate-sized tensors."""
    return (1 if lean else 2) * shape.intermediate * act_bytes


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
    # qtune trains a packed row (SFT) or a pair (DPO, ORPO) at a time: the method says how many sequences of up to
    # max_length tokens are alive at once, whatever the micro-batch size
    sequences = method_of(recipe).sequences_in_flight(recipe)
    tokens = recipe.data.max_length * sequences
    weights = weight_memory(inv, recipe.quant.type + ("_dq" if recipe.quant.double_quant else ""))
    quantized_bytes = weights.total_bytes - inv.unquantized * 2
    # the unquantized parts (embeddings, lm_head, norms) stay in the compute dtype (modeling.load.prepare_for_kbit_training)
    unquantized_bytes = inv.unquantized * compute_bytes
    lora = lora_parameter_count(inv, recipe.lora.r)
    optimizer_bytes_per_param = {"paged_adamw_8bit": 2, "adamw_8bit": 2, "paged_adamw_32bit": 8, "adamw_torch": 8}
    lora_bytes = lora * (4 + 4 + optimizer_bytes_per_param[recipe.train.optimizer])
    from qtune.modeling.lean_ops import LEAN_MODEL_TYPES

    lean = config.get_text_config().model_type in LEAN_MODEL_TYPES
    per_layer = activation_bytes_per_token_per_layer(shape, compute_bytes, recipe.lora.dropout > 0, lean)
    # Eager attention materialises scores and probabilities per layer: b x heads x s^2. SDPA does not, on GPUs and on
    # CPU alike: its memory does not grow with the square of the row.
    from qtune.modeling.load import attention_implementation

    fused_attention = attention_implementation(config, recipe.model.attn_implementation) != "eager"
    score_bytes = 0 if fused_attention else sequences * shape.heads * recipe.data.max_length**2 * compute_bytes * 2
    # Per token of the row in flight, for each way of keeping activations. With checkpointing: the layer inputs
    # kept, one layer recomputed at a time. With offloading too (qtune/modeling/offload.py): the layer inputs wait in CPU
    # memory; the GPU holds one layer's recompute, the input being copied back and the gradient flowing down.
    layer_input = shape.hidden * compute_bytes
    transient = backward_transient_bytes_per_token(shape, compute_bytes, lean)
    per_token = {
        "none": shape.layers * per_layer + transient,
        "checkpointing": shape.layers * layer_input + per_layer + transient,
        "offload": 2 * layer_input + per_layer + transient,
    }
    scores = {"none": score_bytes * shape.layers, "checkpointing": score_bytes, "offload": score_bytes}
    activations_by_mode = {mode: tokens * per_token[mode] + scores[mode] for mode in per_token}
    # The loss scores supervised positions only, a chunk of 2^23 fp32 logits at a time (qtune/modeling/loss.py), plus the
    # gathered hidden states and their gradient.
    from qtune.modeling.loss import LOGIT_CHUNK_ELEMENTS

    loss_per_token = 2 * shape.hidden * compute_bytes
    logits = 2 * LOGIT_CHUNK_ELEMENTS * 4 + tokens * loss_per_token
    if framework_bytes is None:
        framework_bytes = CUDA_OVERHEAD_BYTES if device == "cuda" else CPU_FRAMEWORK_BYTES
    # host memory: on a GPU it is not part of the device's peak
    tokenizer_bytes = TOKENIZER_BYTES_PER_VOCAB_ENTRY * shape.vocab if device == "cpu" else 0
    runtime_bytes = CPU_TRAINING_RUNTIME_BYTES if device == "cpu" else 0
    method_parts = method_of(recipe).extra_memory(recipe, shape, compute_bytes)  # GRPO's generation
    fixed = (
        quantized_bytes
        + unquantized_bytes
        + lora_bytes
        + logits
        + framework_bytes
        + tokenizer_bytes
        + runtime_bytes
        + sum(method_parts.values())
    )
    checkpointing, offload = recipe.train.gradient_checkpointing, recipe.train.offload_activations
    if device == "cpu":
        offload = False  # nowhere to offload to
    if checkpointing == "auto":
        # off unless it is needed to fit (or offloading is asked for); without a budget to fit into, off
        over = budget_bytes is not None and fixed + activations_by_mode["none"] > budget_bytes
        checkpointing = offload is True or over
    if offload == "auto":
        offload = (
            checkpointing and budget_bytes is not None and fixed + activations_by_mode["checkpointing"] > budget_bytes
        )
    mode = "offload" if offload else "checkpointing" if checkpointing else "none"
    activations = activations_by_mode[mode]
    parts = {
        "quantized_base": quantized_bytes,
        "unquantized_parts": unquantized_bytes,
        "lora_weights_grads_optimizer": lora_bytes,
        "activations": activations,
        "logits_and_loss": logits,
        "framework_overhead": framework_bytes,
        "tokenizer": tokenizer_bytes,
        "training_runtime": runtime_bytes,
        **method_parts,
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
        "offload_activations": offload,
        # pinned CPU memory the offloaded layer inputs take (host RAM, not GPU memory)
        "offloaded_host_bytes": tokens * shape.layers * layer_input if offload else 0,
        "training_bytes": total,
        "loading_bytes": loading,
        "peak_phase": peak_phase,
        "total_bytes": max(total, loading or 0),
        "activations_with_checkpointing": activations_by_mode["checkpointing"],
        "activations_without_checkpointing": activations_by_mode["none"],
        "activations_with_offloading": activations_by_mode["offload"],
        "lora_parameters": lora,
    }
    # What does not grow with max_length, and what each token of the row in flight adds, for each way of keeping
    # activations: the largest max_length that fits any memory (qtune plan's table of GPUs).
    # what the method adds per token of max_length (GRPO's KV cache holds every completion's max_length tokens): the
    # slope to 16x the length, exact at this length and where the growing part has taken over
    longer = recipe.data.max_length * 16
    at_longer = recipe.model_copy(update={"data": recipe.data.model_copy(update={"max_length": longer})})
    method_at_longer = sum(method_of(recipe).extra_memory(at_longer, shape, compute_bytes).values())
    method_per_token = (method_at_longer - sum(method_parts.values())) / (longer - recipe.data.max_length)
    result["bytes_fixed"] = fixed - tokens * loss_per_token - method_per_token * recipe.data.max_length
    # per token of max_length: each of the sequences in flight holds that many
    result["bytes_per_token"] = {m: (per_token[m] + loss_per_token) * sequences + method_per_token for m in per_token}
    result["score_bytes_per_token_squared"] = {m: scores[m] / recipe.data.max_length**2 for m in scores}
    result["sequences_in_flight"] = sequences
    result["shape"] = shape  # the model's dimensions and the compute dtype's bytes, for a method's own limits
    result["compute_bytes"] = compute_bytes
    result["in_flight"] = method_of(recipe).in_flight.format(
        sequences=sequences, tokens=recipe.data.max_length, total=tokens
    )
    result["max_length"] = recipe.data.max_length
    result.update(model_context(config))
    if budget_bytes is not None:
        budget = budget_bytes
        result["gpu_bytes"] = budget
        result["fits"] = result["total_bytes"] <= budget
        result["largest_max_length"] = largest_max_length(result, budget, mode)
        if not checkpointing:
            result["with_gradient_checkpointing_bytes"] = total - activations + activations_by_mode["checkpointing"]
        if not offload and device == "cuda":
            result["with_offloading_bytes"] = total - activations + activations_by_mode["offload"]
    return result


def model_context(config) -> dict:
    """The longest row the model's positions cover, and how: max_position_embeddings, or a rope scaling's factor times
    its original context when that is larger (Qwen's yarn keeps max_position_embeddings at the original)."""
    text = config.get_text_config()
    positions = getattr(text, "max_position_embeddings", None)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    rope = rope.get("full_attention", rope)  # Gemma 3: one set per attention type
    rope_type = rope.get("rope_type") or rope.get("type")
    rope_type = None if rope_type in (None, "default") else rope_type
    scaled = None
    if rope_type and rope.get("factor") and rope.get("original_max_position_embeddings"):
        scaled = int(rope["factor"] * rope["original_max_position_embeddings"])
    lengths = [n for n in (positions, scaled) if n]
    return {"context_length": max(lengths) if lengths else None, "rope_scaling": rope_type}


def memory_max_length(plan: dict, budget_bytes: float, mode: str) -> int:
    """The longest row whose activations fit `budget_bytes` keeping them in `mode` (none, checkpointing, offload),
    whatever the model's context."""
    free = budget_bytes - plan["bytes_fixed"]
    if free <= 0:
        return 0
    linear, square = plan["bytes_per_token"][mode], plan["score_bytes_per_token_squared"][mode]
    if not square:
        return int(free / linear)
    return int((-linear + (linear**2 + 4 * square * free) ** 0.5) / (2 * square))


def largest_max_length(plan: dict, budget_bytes: float, mode: str) -> int:
    """The longest data.max_length worth setting: what fits `budget_bytes`, at most the model's context."""
    fits = memory_max_length(plan, budget_bytes, mode)
    return min(fits, plan["context_length"]) if plan.get("context_length") else fits


def context_note(plan: dict) -> str:
    """The model's context as the plan words it: its length and where it comes from."""
    length = plan.get("context_length")
    if plan.get("rope_scaling"):
        return f"the model's context, {length:,} positions with its {plan['rope_scaling']} rope scaling"
    return (
        f"the model's context, {length:,} positions (max_position_embeddings; longer rows need a rope scaling such "
        "as linear or yarn in its config.json)"
    )


def context_table(plan: dict) -> list[str]:
    """Largest data.max_length per GPU, with gradient checkpointing alone and with offloading too; `ctx` where the
    model's context, not memory, is the limit."""
    lines = [f"  {'GPU':<12}{'checkpointing':>15}{'+ offloading':>15}   (largest data.max_length that fits)"]
    capped = False
    for name, gib in GPUS_GIB.items():
        budget = gib * 2**30
        cells = []
        for mode in ("checkpointing", "offload"):
            length = largest_max_length(plan, budget, mode)
            at_context = length < memory_max_length(plan, budget, mode)
            capped |= at_context
            cells.append(f"{length:,}" + (" ctx" if at_context else ""))
        lines.append(f"  {name:<12}{cells[0]:>15}{cells[1]:>15}")
    if capped:
        lines.append(f"  ctx: {context_note(plan)}, is the limit; memory alone would allow more")
    return lines


def describe_plan(plan: dict, gpu: str | None) -> str:
    """`qtune plan`'s lines: the peak and its parts, and whether it fits."""
    gib = 2**30
    lines = [
        f"{plan['model']}: predicted peak training memory {plan['total_bytes'] / gib:.2f} GiB "
        + f"({plan['in_flight']})"
    ]
    if plan.get("context_length") and plan["max_length"] > plan["context_length"]:
        lines.append(
            f"  warning: data.max_length {plan['max_length']:,} is longer than {context_note(plan)}: positions "
            "past it were never trained"
        )
    for name, value in plan["parts"].items():
        lines.append(f"  {name.replace('_', ' '):<32} {value / gib:8.2f} GiB")
    planned = (
        "with checkpointing and offloading"
        if plan["offload_activations"]
        else "with checkpointing"
        if plan["gradient_checkpointing"]
        else "without checkpointing"
    )
    lines.append(
        f"  (activations: {plan['activations_without_checkpointing'] / gib:.2f} GiB without gradient checkpointing, "
        f"{plan['activations_with_checkpointing'] / gib:.2f} GiB with it, {plan['activations_with_offloading'] / gib:.2f} "
        f"GiB with offloading too; planned {planned})"
    )
    if plan["offload_activations"]:
        lines.append(f"  offloaded layer inputs in pinned CPU memory: {plan['offloaded_host_bytes'] / gib:.2f} GiB")
    if plan.get("loading_bytes") is not None:
        lines.append(
            f"  loading (CPU: the mapped checkpoint + the model being built) {plan['loading_bytes'] / gib:.2f} GiB; "
            f"training {plan['training_bytes'] / gib:.2f} GiB: the peak comes while {plan['peak_phase']}"
        )
    if "fits" in plan:
        verdict = "fits" if plan["fits"] else "does NOT fit"
        lines.append(f"{gpu}: {plan['gpu_bytes'] / gib:.0f} GiB -> {verdict}")
        if not plan["fits"]:
            at_context = plan["largest_max_length"] == plan.get("context_length")
            lines.append(
                f"  largest data.max_length that fits: {plan['largest_max_length']}"
                + (" (the model's context)" if at_context else "")
                + " (train.micro_batch_size does not change the peak: one packed row of <= max_length tokens is in "
                "flight at a time)"
            )
            if "with_gradient_checkpointing_bytes" in plan:
                lines.append(
                    f"  train.gradient_checkpointing: true would need "
                    f"{plan['with_gradient_checkpointing_bytes'] / gib:.2f} GiB (the biggest single saving)"
                )
            if "with_offloading_bytes" in plan:
                lines.append(
                    f"  train.offload_activations: true would need {plan['with_offloading_bytes'] / gib:.2f} GiB"
                )
    return "\n".join(lines)


def oom_warning(recipe, gpu_bytes: int, compute_bytes: int = 2) -> str | None:
    """A warning line when the plan predicts more than the GPU has (`qtune train` prints it, and goes on)."""
    plan = plan_training(recipe, gpu_gib=gpu_bytes / 2**30, compute_bytes=compute_bytes)
    if plan["fits"]:
        return None
    advice = fit_advice(plan)
    return (
        f"warning: qtune plan predicts {plan['total_bytes'] / 2**30:.1f} GiB at peak, the GPU has "
        f"{gpu_bytes / 2**30:.1f} GiB: this run may run out of memory ({advice}; `qtune plan` for the breakdown)"
    )


def fit_advice(plan: dict) -> str:
    """What to change so the run fits: the same words for the warning before training and an out-of-memory error."""
    advice = [f"data.max_length <= {plan['largest_max_length']}"]
    if "with_offloading_bytes" in plan:
        advice.insert(0, "train.offload_activations: true")
    if "with_gradient_checkpointing_bytes" in plan:
        advice.insert(0, "train.gradient_checkpointing: true")
    return "try " + ", or ".join(advice)
