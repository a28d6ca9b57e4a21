"""Base model in 4-bit, tokenizer, LoRA: small builders from recipe sections to library objects."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from qtune.errors import EnvironmentProblem, QtuneError, RecipeError, hub_failure
from qtune.lean_ops import lean_lora_dropout, use_lean_ops
from qtune.recipe import LoraSection, ModelSection, QuantSection
from qtune.weights import check_prequantized, saved_quantization

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Names tried, in order, when a tokenizer has no pad token: ones real tokenizers reserve for it.
PAD_CANDIDATES = (
    "<|finetune_right_pad_id|>",
    "<|pad|>",
    "<pad>",
    "[PAD]",
    "<|reserved_special_token_0|>",
    "<|endoftext|>",
)


# Families whose activations overflow fp16 (Gemma: embeddings scaled by sqrt(hidden), large residuals). Their
# artifacts compute in bf16: a Gemma 3 NF4 export run in fp16 gave perplexity NaN and 22.6% top-1 agreement.
FP16_OVERFLOW_FAMILIES = ("gemma", "gemma2", "gemma3", "gemma3_text")


def half_dtype(config) -> torch.dtype:
    """The 16-bit dtype this model's artifacts are stored and computed in: fp16 (every GPU has it), or bf16."""
    model_type = config.get_text_config().model_type
    return torch.bfloat16 if model_type in FP16_OVERFLOW_FAMILIES else torch.float16


def resolve_compute_dtype(
    name: str, *, cuda_available: bool | None = None, capability: tuple[int, int] | None = None
) -> torch.dtype:
    """`auto`: bf16 only on GPUs that really have it, fp16 on older GPUs, fp32 on CPU.

    `torch.cuda.is_bf16_supported()` says yes on a T4 (sm_75) because it emulates bf16, slowly;
    the compute capability (>= 8.0: Ampere and newer) is the honest test.
    """
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if name != "auto":
        dtype = DTYPES[name]
        if not cuda_available and dtype == torch.float16:
            raise RecipeError("quant.compute_dtype fp16 needs a GPU", fix="use auto or fp32 on CPU")
        return dtype
    if not cuda_available:
        return torch.float32
    if capability is None:
        capability = torch.cuda.get_device_capability()
    return torch.bfloat16 if capability >= (8, 0) else torch.float16


def under_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1")


def build_quantization_config(quant: QuantSection, compute_dtype: torch.dtype, *, fsdp: bool = False):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        # FSDP shards flat parameters of one dtype: the packed 4-bit weights must be stored in the same
        # dtype as the rest of the model (FSDP-QLoRA), not in the default uint8.
        **({"bnb_4bit_quant_storage": compute_dtype} if fsdp else {}),
    )


def model_source(model: ModelSection) -> tuple[str, dict]:
    """Where to load from, and the arguments that say how; refuses a missing local folder."""
    path = Path(model.name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise EnvironmentProblem(
                f"model folder has no config.json: {model.name}", fix="point model.name at a saved model"
            )
        return str(path), {}
    if model.name.startswith((".", "/", "~")) or model.name.count("/") > 1:
        raise EnvironmentProblem(
            f"model folder not found: {model.name}", fix="check model.name (a local folder or a Hub id)"
        )
    return model.name, {"revision": model.revision}


def model_not_loadable(model: ModelSection, error: Exception) -> QtuneError:
    return hub_failure(
        "loading model",
        f"'{model.name}' (revision {model.revision})",
        error,
        fix="check the id; offline machines need a local folder; gated models need `hf auth login` or HF_TOKEN",
    )


def load_tokenizer(model: ModelSection):
    from transformers import AutoTokenizer

    source, kwargs = model_source(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=model.trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise model_not_loadable(model, e) from None
    if tokenizer.eos_token_id is None:
        raise EnvironmentProblem(
            f"tokenizer of {model.name} has no EOS token", fix="use a tokenizer that defines eos_token"
        )
    choose_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    return tokenizer


def choose_pad_token(tokenizer) -> str:
    """A pad token distinct from EOS, without growing the vocabulary when the tokenizer has a spare one.

    Padding with EOS is the common shortcut, but a collator that masks pad ids then masks every EOS
    too and the model never learns to stop.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return tokenizer.pad_token
    vocab = tokenizer.get_vocab()
    if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
        return tokenizer.pad_token
    for candidate in PAD_CANDIDATES:
        if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
            return candidate
    raise EnvironmentProblem(
        "the tokenizer has no pad, unk or reserved token to pad with (only EOS)",
        fix="add a pad token to the tokenizer and resize the model's embeddings before fine-tuning",
    )


def device_map() -> dict | None:
    """Each process loads onto its own device; under DDP that is LOCAL_RANK's GPU; FSDP places the shards itself."""
    if under_fsdp():
        return None
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"": "cpu"}


def attention_implementation(config, requested: str) -> str:
    """The attention kernel for this model, chosen in one place: SDPA, or eager where the model soft-caps its
    attention logits (Gemma 2), which SDPA cannot do (transformers refuses to load Gemma 2 with it)."""
    softcapped = getattr(config.get_text_config(), "attn_logit_softcapping", None) is not None
    if requested == "auto":
        return "eager" if softcapped else "sdpa"
    if softcapped and requested != "eager":
        raise RecipeError(
            f"model.attn_implementation {requested} cannot soft-cap attention logits as {config.model_type} does",
            fix="use auto or eager",
        )
    return requested


def load_base(model: ModelSection, quant: QuantSection, compute_dtype: torch.dtype, config=None):
    """The base model with every linear layer in 4-bit, ready for LoRA training."""
    from transformers import AutoModelForCausalLM

    source, kwargs = model_source(model)
    config = config or load_model_config(model)  # the caller's, when it has read it already
    attention = attention_implementation(config, model.attn_implementation)
    saved = saved_quantization(config)
    if saved is None:
        kwargs["quantization_config"] = build_quantization_config(quant, compute_dtype, fsdp=under_fsdp())
    else:
        # a base saved in 4-bit loads as it is (weights.check_prequantized says when it can). Not even
        # quantization_config=None: transformers then loads the packed weights into plain Linear layers and fails
        check_prequantized(saved, quant.type, quant.double_quant, model.name)
    try:
        base = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=compute_dtype,
            device_map=device_map(),
            attn_implementation=attention,
            trust_remote_code=model.trust_remote_code,
            **kwargs,
        )
    except (OSError, ValueError) as e:
        raise model_not_loadable(model, e) from None
    keep_cpu_4bit_layout_trainable(base)
    if saved is not None:  # its saved compute dtype is whatever the uploader's GPU had
        import bitsandbytes as bnb

        for module in base.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.compute_dtype, module.compute_type_is_set = compute_dtype, True
    return base


def load_model_config(model: ModelSection):
    from transformers import AutoConfig

    source, kwargs = model_source(model)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=model.trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise model_not_loadable(model, e) from None


def align_special_tokens(base, tokenizer) -> None:
    """Give the model config and generation config the tokenizer's pad / bos / eos ids (qtune chose the pad token).

    The Trainer does the same on construction with transformers' own function, and logs a note about it that the
    user cannot act on; done here first, with that logger quiet, the Trainer finds nothing left to align.
    """
    from transformers.trainer_utils import align_special_tokens as align
    from transformers.utils import logging as transformers_logging

    logger = transformers_logging.get_logger("transformers.trainer_utils")
    level = logger.level
    logger.setLevel(transformers_logging.ERROR)
    try:
        align(base, tokenizer)
    finally:
        logger.setLevel(level)


def check_vocabulary_fits(base, tokenizer, prepared) -> None:
    """Token ids beyond the embedding table crash deep inside the first forward pass; say so up front."""
    rows = base.get_input_embeddings().num_embeddings
    splits = [prepared.train] + ([prepared.val] if prepared.val is not None else [])
    columns = [c for c in ("input_ids", "prompt_ids", "chosen_ids", "rejected_ids") if c in prepared.train.column_names]
    highest = max(
        [tokenizer.pad_token_id]
        + [max((max(ids) for ids in split[column] if ids), default=0) for split in splits for column in columns]
    )
    if highest >= rows:
        raise EnvironmentProblem(
            f"the tokenizer produces token id {highest} but the model's embedding table has {rows} rows",
            fix="use the tokenizer saved with this model (tokenizer and model must match)",
        )


def keep_cpu_4bit_layout_trainable(model) -> int:
    """Stop bitsandbytes repacking 4-bit weights into its CPU inference layout.

    On CPUs with AVX512-BF16, bitsandbytes >= 0.49 rewrites each Linear4bit's weights in place on the
    first forward pass without gradients (an eval, a generate) into a layout whose op has no backward.
    Training after that gets silently wrong LoRA gradients (cosine 0.34 to the true ones, measured);
    the repack also crashes on layers whose input width is not a multiple of 64.
    tests/test_model.py::test_eval_before_train_keeps_gradients fails if this comes back.
    """
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def linear_module_names(model) -> list[str]:
    """Short names of the linear layers LoRA can attach to (the output head excluded)."""
    import bitsandbytes as bnb

    names = set()
    output_head = model.get_output_embeddings()
    for full_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, bnb.nn.Linear4bit)) and module is not output_head:
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def build_lora_config(lora: LoraSection, model):
    from peft import LoraConfig

    available = linear_module_names(model)
    if lora.target_modules == "all-linear":
        targets = available
    else:
        missing = [name for name in lora.target_modules if name not in available]
        if missing:
            raise RecipeError(
                f"lora.target_modules {missing} match no layer of this model",
                fix=f"choose from {available} or use all-linear",
            )
        targets = list(lora.target_modules)
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def prepare_for_kbit_training(base, *, gradient_checkpointing: bool):
    """peft's prepare_model_for_kbit_training without its cast of every weight that is not 4-bit to fp32.

    That cast doubles the embeddings and the lm_head (Llama-3-8B: 2.1 -> 4.2 GB on a 16 GB card) and makes the
    embedding output fp32, so the whole residual stream, and every checkpointed layer input, is fp32 too: twice
    the activation memory the compute dtype needs. Here the frozen weights stay in the compute dtype (on CPU,
    fp32: nothing changes there); LoRA weights are fp32 (keep_trainable_in_fp32) and autocast does the rest.
    tests/test_model.py checks no frozen weight is upcast.
    """
    for param in base.parameters():
        param.requires_grad = False
    if gradient_checkpointing:
        # as peft does for non-reentrant checkpointing: the first layer's input takes part in the graph
        base.get_input_embeddings().register_forward_hook(lambda _module, _args, output: output.requires_grad_(True))
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return base


def attach_lora(
    base, lora: LoraSection, *, gradient_checkpointing: bool, adapter: str | None = None, dropout: bool = True
):
    """A new LoRA adapter as the lora section says, or the trained `adapter` (adapter_source's answer) to continue.
    dropout=False: none at all (preference tuning scores one sequence with and without the adapter)."""
    from peft import PeftModel, get_peft_model

    config = build_lora_config(lora, base) if adapter is None else None
    base = prepare_for_kbit_training(base, gradient_checkpointing=gradient_checkpointing)
    if adapter is None:
        model = get_peft_model(base, config)
    else:
        try:
            model = PeftModel.from_pretrained(base, adapter, is_trainable=True, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise hub_failure("loading adapter", adapter, e, fix="check model.adapter") from None
    if not dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    lean_lora_dropout(model)
    use_lean_ops(model)
    return model


def keep_trainable_in_fp32(model) -> None:
    """Undo trl's cast of LoRA weights to bf16 on quantized models.

    SFTTrainer casts every trainable parameter of a 4-bit model to bf16 (following the QLoRA paper).
    On CPU and on fp16 GPUs (T4, V100) that loses precision in the optimizer update for nothing;
    fp32 adapters with autocast compute are what peft does by default.
    tests/test_train.py checks that every trainable parameter is fp32 after the trainer is built.
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def load_adapter_model(trained, compute_dtype):
    """The model as it was trained: the 4-bit base with the saved adapter on it."""
    from peft import PeftModel

    return PeftModel.from_pretrained(
        load_base(trained.recipe.model, trained.recipe.quant, compute_dtype), trained.adapter_dir
    )
