"""The base model in 4-bit, its tokenizer and the LoRA adapter: small builders from recipe sections to library
objects, and the adapter a run continues."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qtune.core.errors import EnvironmentProblem, QtuneError, RecipeError, hub_failure
from qtune.core.fs import names_a_local_path, no_such_path
from qtune.core.network import hub_unreachable
from qtune.modeling.config import load_config, model_source
from qtune.modeling.lean_ops import lean_lora_dropout, use_lean_ops
from qtune.modeling.moe.experts import quantize_experts
from qtune.modeling.moe.families import moe_family, moe_problem
from qtune.modeling.moe.saved import finish_saved_moe, saved_moe_options
from qtune.modeling.moe.streaming import as_bitsandbytes, experts_quantizer_config
from qtune.modeling.precision import bnb_config, keep_cpu_4bit_layout_trainable
from qtune.modeling.weights import check_prequantized, saved_quantization

if TYPE_CHECKING:
    from qtune.config.recipe import LoraSection, ModelSection, QuantSection

# Names tried, in order, when a tokenizer has no pad token: ones real tokenizers reserve for it.
PAD_CANDIDATES = (
    "<|finetune_right_pad_id|>",
    "<|pad|>",
    "<pad>",
    "[PAD]",
    "<|reserved_special_token_0|>",
    "<|endoftext|>",
)


def under_fsdp() -> bool:
    """Whether accelerate launched this process with FSDP."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1")


def base_quantization(quant: QuantSection, compute_dtype: torch.dtype):
    """bitsandbytes' configuration of the base as the quant section says. Under FSDP the packed 4-bit weights are
    stored in the compute dtype, not uint8: FSDP shards flat parameters of one dtype (FSDP-QLoRA)."""
    return bnb_config(
        quant.type,
        double_quant=quant.double_quant,
        compute_dtype=compute_dtype,
        storage_dtype=compute_dtype if under_fsdp() else None,
    )


def model_not_loadable(model: ModelSection, error: Exception) -> QtuneError:
    """A model or tokenizer that did not load from its folder or the Hub, as one exit-4 line."""
    return hub_failure(
        "loading model",
        f"'{model.name}' (revision {model.revision})",
        error,
        fix="check the id; offline machines need a local folder; gated models need `hf auth login` or HF_TOKEN",
    )


def load_tokenizer(model: ModelSection):
    """The model's tokenizer with a pad token that is not EOS, padding on the right."""
    from transformers import AutoTokenizer

    source, kwargs = model_source(model.name, model.revision)
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
    attention logits (Gemma 2) or has attention sinks (gpt-oss), which SDPA cannot do (transformers refuses to load
    them with it)."""
    softcapped = getattr(config.get_text_config(), "attn_logit_softcapping", None) is not None
    # gpt-oss's attention sinks (a learned logit per head in the softmax): transformers has no SDPA path for them
    sinks = config.get_text_config().model_type == "gpt_oss"
    if requested == "auto":
        return "eager" if softcapped or sinks else "sdpa"
    if (softcapped or sinks) and requested != "eager":
        what = "soft-cap attention logits" if softcapped else "add attention sinks"
        raise RecipeError(
            f"model.attn_implementation {requested} cannot {what} as {config.model_type} does",
            fix="use auto or eager",
        )
    return requested


def load_base(model: ModelSection, quant: QuantSection, compute_dtype: torch.dtype, config=None):
    """The base model with every linear layer in 4-bit, ready for LoRA training."""
    from transformers import AutoModelForCausalLM

    source, kwargs = model_source(model.name, model.revision)
    config = config or load_model_config(model)  # the caller's, when it has read it already
    experts = moe_problem(config.to_dict())  # a Hub model's config.json is read only now
    if experts:
        raise RecipeError(experts[0], where=model.name, fix=experts[1])
    attention = attention_implementation(config, model.attn_implementation)
    saved = saved_quantization(config)
    quantization = base_quantization(quant, compute_dtype)
    if saved is None:
        # a mixture of experts: its experts quantized as they load, one layer at a time (qtune.modeling.moe.streaming)
        streamed = moe_family(config) is not None
        kwargs["quantization_config"] = experts_quantizer_config(quantization) if streamed else quantization
    else:
        # a base saved in 4-bit loads as it is (weights.check_prequantized says when it can). Not even
        # quantization_config=None: transformers then loads the packed weights into plain Linear layers and fails
        check_prequantized(saved, quant.type, quant.double_quant, model.name)
        kwargs.update(saved_moe_options(config))  # a mixture of experts' 4-bit experts, as saved
    try:
        base = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=compute_dtype,
            device_map=device_map(),
            attn_implementation=attention,
            trust_remote_code=model.trust_remote_code,
            # transformers >= 5.25 kernelizes models by default when the `kernels` package is installed (a
            # dependency of it), and model.train() re-kernelizes: that resets every module's forward, qtune's lean
            # RMSNorm and SwiGLU included (tests/test_model.py::test_training_mode_keeps_qtune_s_ops)
            use_kernels=False,
            **kwargs,
        )
    except (OSError, ValueError) as e:
        raise model_not_loadable(model, e) from None
    if saved is None:
        if streamed:
            as_bitsandbytes(base, quantization)
        quantize_experts(base, quantization, compute_dtype)  # the per-expert layers from the 4-bit weights
    else:
        finish_saved_moe(base, config.quantization_config)  # as saved, like any base saved in 4-bit
    keep_cpu_4bit_layout_trainable(base)
    if saved is not None:  # its saved compute dtype is whatever the uploader's GPU had
        import bitsandbytes as bnb

        for module in base.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.compute_dtype, module.compute_type_is_set = compute_dtype, True
    return base


def load_model_config(model: ModelSection):
    """The base model's config, as the model section names it."""
    return load_config(model.name, model.revision, trust_remote_code=model.trust_remote_code)


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
    # the data report has the samples' highest id; a stream, not read ahead, is bounded by the tokenizer's size
    highest = max(tokenizer.pad_token_id, prepared.report.get("highest_token_id", len(tokenizer) - 1))
    if highest >= rows:
        raise EnvironmentProblem(
            f"the tokenizer produces token id {highest} but the model's embedding table has {rows} rows",
            fix="use the tokenizer saved with this model (tokenizer and model must match)",
        )


def linear_module_names(model) -> list[str]:
    """Short names of the linear layers LoRA can attach to (the output head excluded)."""
    import bitsandbytes as bnb

    names = set()
    output_head = model.get_output_embeddings()
    for full_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, bnb.nn.Linear4bit)) and module is not output_head:
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def has_experts(model) -> bool:
    """Whether the model holds qtune's 4-bit experts (a mixture of experts)."""
    from qtune.modeling.moe.experts import QuantizedExperts

    return any(isinstance(module, QuantizedExperts) for module in model.modules())


def lora_targets(names: list[str], model) -> list[str] | str:
    """peft's target_modules for a list of layer names. "experts" names every expert's three projections and only
    them (a regular expression, since the dense MLP of a mixed model has the same names); the others are layer names,
    which reach the experts too where the names are the experts' own (gate_proj, ...)."""
    import re

    if "experts" not in names:
        return list(names)
    others = [re.escape(name) for name in names if name != "experts"]
    return r".*\.(" + "|".join([*others, r"experts\.\d+\.(gate_proj|up_proj|down_proj)"]) + ")"


@contextlib.contextmanager
def peft_sees_per_expert_layers(base):
    """peft (>= 0.18) rewrites a LoRA config for the MoE families transformers 5 fused (by config.model_type): the
    experts' gate_proj / up_proj / down_proj become target_parameters on the fused 3-D weights, and the router
    `gate` becomes a target; loading an adapter, it renames the keys likewise. qtune's experts are per-expert 4-bit
    layers again, so neither applies: LoRA would land on the router (which must stay frozen) and on no expert. For
    the duration, the config's model type is one peft has no conversion for (tests/test_moe.py fails if peft's
    rewrite comes back)."""
    if not has_experts(base):
        yield
        return
    config = base.config
    before = config.__dict__.get("model_type")
    config.model_type = f"qtune-{type(config).model_type}"  # an instance attribute over the class's
    try:
        yield
    finally:
        if before is None:
            del config.model_type
        else:
            config.model_type = before


def build_lora_config(lora: LoraSection, model):
    """peft's LoraConfig from the lora section. all-linear is peft's own: every linear layer but the output head
    (the set qtune trains is the same, tests/test_model.py), the experts of a mixture of experts included (never its
    router, which is no linear layer); a list of names is checked against the model first."""
    from peft import LoraConfig

    if lora.target_modules != "all-linear":
        available = linear_module_names(model) + (["experts"] if has_experts(model) else [])
        missing = [name for name in lora.target_modules if name not in available]
        if missing:
            raise RecipeError(
                f"lora.target_modules {missing} match no layer of this model",
                fix=f"choose from {available} or use all-linear",
            )
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules
        if lora.target_modules == "all-linear"
        else lora_targets(lora.target_modules, model),
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
    """The base with a new LoRA adapter as the lora section says, or with the trained `adapter` (adapter_source's
    answer) to continue. dropout=False: none at all (a method that scores one sequence with and without the adapter
    needs the same numbers both times)."""
    from peft import PeftModel, get_peft_model

    config = build_lora_config(lora, base) if adapter is None else None
    base = prepare_for_kbit_training(base, gradient_checkpointing=gradient_checkpointing)
    with peft_sees_per_expert_layers(base):
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
    """The model as it was trained: the 4-bit base with the run's saved adapter on it."""
    from peft import PeftModel

    base = load_base(trained.recipe.model, trained.recipe.quant, compute_dtype)
    with peft_sees_per_expert_layers(base):
        return PeftModel.from_pretrained(base, trained.adapter_dir)


# --------------------------------------------------------------------------- a trained adapter to continue


def adapter_source(model: ModelSection) -> str | None:
    """Where model.adapter's weights are (a local folder; a Hub adapter's two files are fetched first), checked against
    model.name before any weight loads: an adapter trained on another base loads without complaint when the shapes
    agree, and trains on from nonsense."""
    if model.adapter is None:
        return None
    path = Path(model.adapter).expanduser()
    if (path / "adapter" / "adapter_config.json").is_file():  # a qtune run folder
        path = path / "adapter"
    if path.exists():
        folder = path
    elif names_a_local_path(model.adapter):
        raise EnvironmentProblem(f"no such folder: {model.adapter}", fix=no_such_path(model.adapter, "model.adapter"))
    else:
        from huggingface_hub import snapshot_download

        unreachable = hub_unreachable()
        try:  # the adapter's two files only (a few MB); the endpoint as set now, not when the library was imported
            folder = Path(
                snapshot_download(
                    model.adapter,
                    allow_patterns=["adapter_config.json", "adapter_model.safetensors"],
                    endpoint=os.environ.get("HF_ENDPOINT") or None,
                    local_files_only=unreachable is not None,
                )
            )
        except Exception as e:  # offline, missing, gated: huggingface_hub raises many types
            if unreachable is not None:
                raise EnvironmentProblem(
                    f"cannot reach the Hub ({unreachable}) and adapter '{model.adapter}' is not in the local cache",
                    fix="check model.adapter (a run folder, or a Hub id) and the network",
                ) from None
            raise hub_failure("reading adapter", model.adapter, e, fix="check model.adapter and your login") from None
    if not (folder / "adapter_config.json").is_file():
        raise EnvironmentProblem(
            f"model.adapter has no adapter_config.json: {model.adapter}",
            fix="give a qtune run folder, its adapter/ folder, or a Hub adapter repo",
        )
    if not (folder / "adapter_model.safetensors").is_file():
        raise EnvironmentProblem(
            f"model.adapter has no adapter_model.safetensors: {model.adapter}",
            fix="qtune loads safetensors adapters only",
        )
    from peft import PeftConfig

    try:
        config = PeftConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as e:
        raise EnvironmentProblem(
            f"model.adapter's adapter_config.json does not read as a peft config: {str(e).splitlines()[0]}",
            where=str(folder),
            fix="give a LoRA adapter saved by peft",
        ) from None
    trained_on = config.base_model_name_or_path
    if trained_on and not same_model(trained_on, model.name):
        raise RecipeError(
            f"model.adapter {model.adapter} was trained on {trained_on}, and model.name is {model.name}",
            fix=f"set model.name: {trained_on}, or start a new adapter (remove model.adapter)",
        )
    return str(folder)


def same_model(a: str, b: str) -> bool:
    """The same Hub id, or the same local folder however it is written."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
