"""The recipe's sections: one pydantic model per stage, each the only place for that stage's defaults and checks.
qtune.recipe puts them together (and re-exports them). No torch, no Hugging Face library: loading a recipe stays cheap."""

from __future__ import annotations

import re
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


class Section(BaseModel):
    # extra="forbid": a typo is an error, never a silently ignored key.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelSection(Section):
    name: str
    """Hub id (org/name) or a local folder with config.json, tokenizer and weights."""
    revision: str = "main"
    """Branch, tag or 40-hex commit of the Hub repo. Pin a commit to allow trust_remote_code."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the checkpoint. Only allowed with a pinned commit revision."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """Attention kernel passed to transformers. auto: SDPA, or eager for models whose attention soft-caps its
    logits (Gemma 2), which SDPA cannot do."""
    adapter: str | None = None
    """Continue training this LoRA adapter instead of a new one: a run folder (its adapter/), an adapter folder, or a
    Hub repo. Its base model must be model.name; its own LoRA shape is used (the lora section is not)."""

    @model_validator(mode="after")
    def _remote_code_needs_pinned_revision(self) -> ModelSection:
        if self.trust_remote_code and not COMMIT_HASH.fullmatch(self.revision):
            raise ValueError(
                "model.trust_remote_code needs model.revision pinned to a 40-hex commit hash "
                "(remote code on a branch can change under you)"
            )
        return self


class QuantSection(Section):
    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type of the frozen base weights (bitsandbytes)."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.37 bits per parameter)."""
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Dtype of the matmuls. auto: bf16 on GPUs with compute capability >= 8.0, fp16 on older GPUs, fp32 on CPU."""


class LoraSection(Section):
    r: int = Field(16, gt=0)
    """LoRA rank."""
    alpha: float = Field(32, gt=0)
    """LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    """'all-linear' (every linear layer but the output head) or a list of module names such as [q_proj, v_proj]."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha / sqrt(r)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA). Slower; often better at low rank."""

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("give at least one module name, or 'all-linear'")
        return value


DATA_FORMATS = ("alpaca", "prompt_completion", "messages", "sharegpt", "text", "preference")
SFT_FORMATS = DATA_FORMATS[:-1]


class DatasetSpec(Section):
    path: str
    """Local file (.json, .jsonl, .csv, .parquet), a folder of them, or a Hub dataset id."""
    format: Literal[DATA_FORMATS]
    """How rows are laid out: alpaca (instruction/input/output), prompt_completion, messages, sharegpt, text; for
    train.method dpo / orpo: preference (prompt, chosen, rejected as text, or chosen / rejected as conversations)."""
    split: str = "train"
    """Split of a Hub dataset (or of a local file loaded through datasets)."""
    name: str | None = None
    """Config name of a Hub dataset."""
    columns: dict[str, str] = {}
    """Map the format's column names to yours, e.g. {instruction: question, output: answer}."""


class DataSection(Section):
    datasets: list[DatasetSpec] = Field(min_length=1)
    """Training datasets; several are mixed into one run."""
    val_datasets: list[DatasetSpec] = []
    """Explicit validation datasets. When given, val_size must be 0."""
    max_length: int = Field(1024, gt=0)
    """Longest tokenized sample; longer ones are truncated (a sample left with nothing to learn is dropped)."""
    val_size: float = Field(0.02, ge=0, lt=1)
    """Fraction of the training rows held out for evaluation."""
    train_on_inputs: bool = False
    """Also compute the loss on prompts / user turns (default: only on completions and assistant turns)."""
    chat_template: str | None = None
    """Jinja chat template for messages/sharegpt data, or 'chatml'. Default: the tokenizer's own."""

    @model_validator(mode="after")
    def _one_validation_source(self) -> DataSection:
        if self.val_datasets and self.val_size > 0:
            raise ValueError("give either data.val_datasets or data.val_size > 0, not both (set val_size: 0)")
        return self


OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_torch")
TRAIN_METHODS = ("sft", "dpo", "orpo")


class TrainSection(Section):
    output_dir: str
    """Run folder: adapter/, checkpoints/, recipe.yaml, metrics.json, loss.png."""
    method: Literal[TRAIN_METHODS] = "sft"
    """sft: supervised fine-tuning. dpo: direct preference optimization against a reference (the base with the
    adapter off, or the model.adapter it starts from). orpo: odds-ratio preference optimization, one stage, no
    reference. dpo and orpo need preference data and train without dropout (the policy must score a sequence as
    the reference does)."""
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps to run. When set, it wins over epochs."""
    epochs: float = Field(3, gt=0)
    """Passes over the training data (used when max_steps is not set)."""
    micro_batch_size: int = Field(4, gt=0)
    """Samples per forward pass on each device."""
    grad_accum: int = Field(4, gt=0)
    """Micro-batches accumulated per optimizer step."""
    lr: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Fraction of the steps spent warming up linearly."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay on the LoRA weights."""
    max_grad_norm: float = Field(0.3, gt=0)
    """Gradient clipping (0.3 as in the QLoRA paper)."""
    optimizer: Literal[OPTIMIZERS] = "paged_adamw_8bit"
    """Optimizer; paged ones spill their state to CPU memory instead of running out of GPU memory."""
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    """Recompute activations in the backward pass: less memory, +50% of the frozen base's compute. auto: only when
    the memory plan says the run does not fit without it (in the GPU's memory, or on CPU in the free RAM)."""
    offload_activations: bool | Literal["auto"] = "auto"
    """Keep the checkpointed layer inputs in CPU memory between the forward and the backward pass (needs gradient
    checkpointing): long context on a small GPU, for a few % of speed. auto: only when the plan says the run does not
    fit with gradient checkpointing alone. Never on CPU, where there is nowhere to offload to."""
    max_nonfinite_steps: int = Field(3, gt=0)
    """Stop the run when the loss is NaN or infinite this many optimizer steps in a row (the last checkpoint is kept)."""
    seed: int = 42
    """Seed for LoRA init, data order and dropout."""
    eval_steps: int | None = Field(None, gt=0)
    """Evaluate every this many steps (default: once at the end)."""
    save_steps: int = Field(100, gt=0)
    """Save a checkpoint every this many steps."""
    keep_checkpoints: int = Field(3, gt=0)
    """Newest checkpoints kept; older ones are deleted."""
    logging_steps: int = Field(10, gt=0)
    """Log loss, lr and throughput every this many steps."""
    extra: dict[str, Any] = {}
    """Escape hatch: more trl SFTConfig / DPOConfig / transformers TrainingArguments fields, passed as they are."""

    @model_validator(mode="after")
    def _offloading_needs_checkpointing(self) -> TrainSection:
        if self.offload_activations is True and self.gradient_checkpointing is False:
            raise ValueError(
                "offload_activations: true moves the checkpointed layer inputs to CPU memory, and "
                "gradient_checkpointing is false: set gradient_checkpointing to true or auto"
            )
        return self


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "exo_pair", "apo_zero", "apo_down", "sft")


class DpoSection(Section):
    beta: float = Field(0.1, gt=0)
    """How far the policy may move from the reference: higher keeps it closer (IPO: its tau)."""
    loss_type: Union[Literal[DPO_LOSS_TYPES], list[Literal[DPO_LOSS_TYPES]]] = "sigmoid"
    """sigmoid: the DPO paper's loss; ipo, hinge, robust (noisy labels, with label_smoothing), sigmoid_norm
    (length-normalized), exo_pair, apo_zero, apo_down (trl's names); a list adds them up, e.g. [sigmoid, sft]: DPO
    plus the chosen answers' language-model loss (RPO), which keeps DPO from making the chosen answers unlikely too."""
    loss_weights: list[float] | None = None
    """Weights of a list of loss types (default: 1 each)."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """Assumed share of flipped preference labels (robust), or EXO's epsilon (exo_pair needs > 0)."""

    @property
    def loss_types(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @model_validator(mode="after")
    def _consistent(self) -> DpoSection:
        if not self.loss_types:
            raise ValueError("loss_type needs at least one loss")
        if "exo_pair" in self.loss_types and self.label_smoothing == 0:
            raise ValueError("loss_type exo_pair needs label_smoothing > 0 (the EXO paper uses 1e-3)")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_types):
            raise ValueError(
                f"{len(self.loss_weights)} loss_weights for {len(self.loss_types)} loss types: give one weight each"
            )
        return self


class OrpoSection(Section):
    beta: float = Field(0.1, gt=0)
    """Weight of the odds-ratio term against the chosen answers' language-model loss (lambda in the ORPO paper)."""


class LogSection(Section):
    report_to: list[Literal["wandb", "tensorboard"]] = []
    """Trackers: wandb (WANDB_MODE=offline works without network) and/or tensorboard."""
    project: str = "qtune"
    """wandb project."""
    run_name: str | None = None
    """Run name in the trackers (default: the output folder's name)."""


EXPORT_FORMATS = (
    "adapter",
    "merged_fp16",
    "merged_bf16",
    "nf4",
    "gguf_f16",
    "gguf_q8_0",
    "gguf_q6_k",
    "gguf_q5_k_m",
    "gguf_q4_k_m",
    "gguf_q4_0",
)


MERGE_BASES = ("dequantized", "original")
PUSH_TARGETS = ("adapter", "merged", "nf4", "gguf")


class ExportSection(Section):
    formats: list[Literal[EXPORT_FORMATS]] = []
    """Exports written after training into <output_dir>/export (same as `qtune export RUN --format ...`)."""
    merge_base: Literal[MERGE_BASES] = "dequantized"
    """Merge into the dequantized NF4 weights the adapter was trained on (exact), or the original weights."""
    eval_samples: int = Field(32, gt=0)
    """Validation samples used to compare every export with the trained model."""


class HubSection(Section):
    repo_id: str | None = None
    """Hub repo (user/name) to push to after training and export. The token comes from HF_TOKEN or `hf auth login`."""
    private: bool = True
    """Create the repo private (the default)."""
    push: list[Literal[PUSH_TARGETS]] = ["adapter"]
    """What to push after training: adapter, merged, nf4, gguf (exports must be in export.formats)."""
    push_checkpoints: bool = False
    """Push every saved checkpoint too, so `qtune train RECIPE --resume` can continue on a fresh machine (Colab)."""

    @field_validator("repo_id")
    @classmethod
    def _repo_shape(cls, value):
        if value is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", value):
            raise ValueError("hub.repo_id must look like user/name")
        return value
