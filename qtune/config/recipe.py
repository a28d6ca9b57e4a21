"""The recipe: one pydantic schema, the only place for defaults and validation, and how it is read (YAML, --set
overrides, one-line errors with a suggestion).

Each stage reads its own section. The lists of choices come from their registries: dataset formats from qtune.data,
training methods (and their sections) from qtune.training.methods, export formats from qtune.export.formats. Loading
a recipe must stay cheap (`qtune validate` answers at once), so this module imports neither torch nor any Hugging
Face library, and neither do the registries it reads.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from qtune.core.errors import RecipeError
from qtune.core.schema import Section
from qtune.data import DATA_FORMATS
from qtune.export.formats import FORMAT_NAMES, PUSH_TARGETS
from qtune.export.formats.gptq import GROUP_SIZES
from qtune.training.methods import METHODS

COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


class ModelSection(Section):
    """The base model, and the adapter a run continues (model:)."""

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
    """How the frozen base is quantized (quant:)."""

    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type of the frozen base weights (bitsandbytes)."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.37 bits per parameter)."""
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Dtype of the matmuls. auto: bf16 on GPUs with compute capability >= 8.0, fp16 on older GPUs, fp32 on CPU."""


class LoraSection(Section):
    """The LoRA adapter trained on the base (lora:)."""

    r: int = Field(16, gt=0)
    """LoRA rank."""
    alpha: float = Field(32, gt=0)
    """LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    """'all-linear' (every linear layer but the output head; a mixture of experts' experts too, never its router) or a
    list of module names such as [q_proj, v_proj]; `experts` names every expert's projections alone."""
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


class DatasetSpec(Section):
    """One dataset: where it is and how its rows are laid out (an item of data.datasets)."""

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
    """What the run trains and validates on, and how it is tokenized (data:)."""

    datasets: list[DatasetSpec] = Field(min_length=1)
    """Training datasets; several are mixed into one run."""
    val_datasets: list[DatasetSpec] = []
    """Explicit validation datasets. When given, val_size stays unset (or 0)."""
    max_length: int = Field(1024, gt=0)
    """Longest tokenized sample; longer ones are truncated (a sample left with nothing to learn is dropped)."""
    val_size: float | None = Field(None, ge=0)
    """Samples held out of the training data for evaluation: a fraction below 1, or a count (200); 0: none. Unset: 2%
    of the samples, at most 1,000 (with streaming: the first 200 of the stream)."""
    train_on_inputs: bool = False
    """Also compute the loss on prompts / user turns (default: only on completions and assistant turns)."""
    chat_template: str | None = None
    """Jinja chat template for messages/sharegpt data, or 'chatml'. Default: the tokenizer's own."""
    system_prompt: str | None = None
    """prompt_answer data only: each text prompt becomes a conversation, this system turn then the prompt as the
    user's, rendered with the chat template (a chat model's GSM8K questions). Unset: text prompts are kept as written."""
    streaming: bool = False
    """Read the datasets as a stream (Hub or local, bigger than the disk or the memory): tokenized as training reads
    them, nothing cached; needs train.max_steps, and for validation val_datasets or val_size as a count."""

    @model_validator(mode="after")
    def _one_validation_source(self) -> DataSection:
        if self.val_datasets and self.val_size:
            raise ValueError("give either data.val_datasets or data.val_size > 0, not both (set val_size: 0)")
        if self.val_size is not None and self.val_size >= 1 and self.val_size != int(self.val_size):
            raise ValueError(f"data.val_size {self.val_size} is neither a fraction below 1 nor a count of samples")
        formats = {spec.format for spec in self.datasets + self.val_datasets}
        if self.system_prompt is not None and formats != {"prompt_answer"}:
            raise ValueError(
                f"data.system_prompt turns prompt_answer prompts into conversations; these datasets are "
                f"{sorted(formats - {'prompt_answer'})}: remove it, or put the system turn in their conversations"
            )
        if self.streaming and self.val_size is not None and 0 < self.val_size < 1:
            raise ValueError(
                "data.streaming has no total to take a fraction of: give val_size as a count of samples (e.g. 200), "
                "val_datasets, or val_size: 0"
            )
        return self


OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_torch")


class TrainSection(Section):
    """The training loop: steps, batch, optimizer, schedule, memory savers, checkpoints (train:)."""

    output_dir: str
    """Run folder: adapter/, checkpoints/, recipe.yaml, metrics.json, loss.png."""
    method: Literal[tuple(METHODS)] = "sft"
    """How the adapter is trained: sft (supervised fine-tuning), or another training method of the registry (the recipe
    reference lists them; docs/methods.md), such as dpo or orpo on preference data. A method's own settings are in the
    section of its name (dpo:, orpo:)."""
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


class LogSection(Section):
    """Where the losses are logged besides the run folder (log:)."""

    report_to: list[Literal["wandb", "tensorboard"]] = []
    """Trackers: wandb (WANDB_MODE=offline works without network) and/or tensorboard."""
    project: str = "qtune"
    """wandb project."""
    run_name: str | None = None
    """Run name in the trackers (default: the output folder's name)."""


MERGE_BASES = ("dequantized", "original")


class GptqSection(Section):
    """How the GPTQ formats (gptq_int4, gptq_int8: the bits) round the merged weights (export.gptq:)."""

    group_size: Literal[GROUP_SIZES] = 128
    """Input columns sharing one scale (the sizes vLLM's kernels run); -1: one scale per output row."""
    desc_act: bool = False
    """Round the columns in order of decreasing activation (act-order): a little more accurate, no slower to serve."""
    symmetric: bool = True
    """A grid symmetric around zero (no zero points), what most GPTQ checkpoints use; false adds zero points."""
    dampening: float = Field(0.01, gt=0, lt=1)
    """Fraction of the Hessian's mean diagonal added to its diagonal, so that it stays invertible."""
    calibration_samples: int = Field(128, gt=0)
    """Training samples the Hessians are measured on (drawn with train.seed)."""
    calibration_length: int = Field(512, ge=16)
    """Tokens per calibration sample, at most (longer ones are cut)."""


class ExportSection(Section):
    """Exports written right after training (export:), as `qtune export` writes them."""

    formats: list[Literal[FORMAT_NAMES]] = []
    """Exports written after training into <output_dir>/export (same as `qtune export RUN --format ...`)."""
    merge_base: Literal[MERGE_BASES] = "dequantized"
    """Merge into the dequantized NF4 weights the adapter was trained on (exact), or the original weights."""
    eval_samples: int = Field(32, gt=0)
    """Validation samples used to compare every export with the trained model."""
    gptq: GptqSection = GptqSection()
    """The GPTQ formats' settings."""


class HubSection(Section):
    """Pushing to the Hugging Face Hub after training (hub:)."""

    repo_id: str | None = None
    """Hub repo (user/name) to push to after training and export. The token comes from HF_TOKEN or `hf auth login`."""
    private: bool = True
    """Create the repo private (the default)."""
    push: list[Literal[PUSH_TARGETS]] = ["adapter"]
    """What to push after training: adapter, merged, nf4, gptq, gguf (exports must be in export.formats)."""
    push_checkpoints: bool = False
    """Push every saved checkpoint too, so `qtune train RECIPE --resume` can continue on a fresh machine (Colab)."""

    @field_validator("repo_id")
    @classmethod
    def _repo_shape(cls, value):
        if value is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", value):
            raise ValueError("hub.repo_id must look like user/name")
        return value


# --------------------------------------------------------------------------- checks and loading


class RecipeSections(Section):
    """A whole fine-tuning job: the sections every recipe has. Each stage reads only its own section. `Recipe` adds
    one section per training method that has settings (dpo:, orpo:, ...), from the methods' registry."""

    model: ModelSection
    quant: QuantSection = QuantSection()
    lora: LoraSection = LoraSection()
    data: DataSection
    train: TrainSection
    log: LogSection = LogSection()
    export: ExportSection = ExportSection()
    hub: HubSection = HubSection()

    @model_validator(mode="after")
    def _checkpoint_push_needs_a_repo(self) -> RecipeSections:
        if self.hub.push_checkpoints and not self.hub.repo_id:
            raise ValueError("hub.push_checkpoints needs hub.repo_id")
        return self

    @model_validator(mode="after")
    def _streaming_needs_max_steps(self) -> RecipeSections:
        if self.data.streaming and self.train.max_steps is None:
            raise ValueError("data.streaming has no length to count epochs in: set train.max_steps")
        return self

    @model_validator(mode="after")
    def _data_fits_the_method(self) -> RecipeSections:
        method = METHODS[self.train.method]
        for other in METHODS.values():
            # a saved recipe.yaml carries every section, so only settings that differ from the defaults count
            given = getattr(self, other.name, None)
            if other is not method and given is not None and given != type(given)():
                raise ValueError(
                    f"the {other.name} section is set but train.method is {method.name}: set train.method: {other.name}"
                )
        formats = {spec.format for spec in self.data.datasets + self.data.val_datasets}
        foreign = sorted(formats - set(method.data.formats))
        if foreign:
            takers = [m.name for m in METHODS.values() if foreign[0] in m.data.formats]
            if method.name == TrainSection.model_fields["method"].default and takers:
                # the default method and data of another kind: train.method was most likely forgotten
                raise ValueError(
                    f"{foreign[0]} data needs train.method: {' or '.join(takers)} ({method.name} trains on "
                    f"{method.data.name}: {', '.join(method.data.formats)})"
                )
            raise ValueError(
                f"train.method {method.name} trains on {method.data.name}, and data has format {', '.join(foreign)}: "
                f"give every dataset format: {' or '.join(method.data.formats)}"
            )
        problem = method.check_recipe(self)
        if problem:
            raise ValueError(problem)
        return self


# The methods' own sections, each under the method's name with its defaults
Recipe = create_model(
    "Recipe",
    __base__=RecipeSections,
    __module__=__name__,
    __doc__=RecipeSections.__doc__,
    **{method.name: (method.section, method.section()) for method in METHODS.values() if method.section is not None},
)


# --------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Reads a YAML recipe, applies `section.key=value` overrides and validates it."""
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}", fix="check the path") from None
    except IsADirectoryError:
        raise RecipeError(f"recipe path is a folder: {path}", fix="give the .yaml file") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe is not UTF-8 text (byte {e.start})", where=where, fix="save it as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{where}, line {mark.line + 1}" if mark is not None else where
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"recipe is not valid YAML: {problem}", where=at, fix="fix the YAML syntax") from None
    if raw is None:
        raise RecipeError("recipe is empty", where=where, fix="see recipes/demo.yaml for a complete example")
    if not isinstance(raw, dict):
        raise RecipeError(
            f"recipe must be a mapping of sections, got a {type(raw).__name__}",
            where=where,
            fix="start with 'model:', 'data:', 'train:' sections",
        )
    for override in overrides:
        apply_override(raw, override)
    return validate_recipe(raw, where=where)


def validate_recipe(raw: dict, *, where: str = "recipe") -> Recipe:
    """The recipe a dict describes, or the first problem as one error line (and how many more there are)."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        errors = e.errors()
        what, fix = describe_validation_error(errors[0])
        # a value checked against each type of a union fails once per type: one problem
        places = {tuple(plain_location(error["loc"])) for error in errors}
        if len(places) > 1:
            what += f" (and {len(places) - 1} more problem{'s' if len(places) > 2 else ''})"
        raise RecipeError(what, where=where, fix=fix) from None


def apply_override(raw: dict, override: str) -> None:
    """Applies one --set: `train.lr=1e-4` -> raw["train"]["lr"] = 1e-4 (the value parsed as YAML)."""
    key, sep, value_text = override.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"bad --set '{override}'", fix="write --set section.key=value, e.g. --set train.lr=1e-4")
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError:
        value = value_text
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part) if isinstance(node, dict) else None
        if child is None:
            child = {}
            node[part] = child
        if not isinstance(child, dict):
            raise RecipeError(
                f"--set {key}: '{'.'.join(parts[: depth + 1])}' is not a section", fix="check the key path"
            )
        node = child
    node[parts[-1]] = value


# The names users bring from transformers' TrainingArguments, trl, peft, bitsandbytes and axolotl, and qtune's name
# for the same setting: an unknown key that is one of them gets a did-you-mean to qtune's, in whatever section it is.
SYNONYMS = {
    "learning_rate": "train.lr",
    "per_device_train_batch_size": "train.micro_batch_size",
    "batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_accumulation": "train.grad_accum",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "lr_scheduler_type": "train.lr_scheduler",
    "optim": "train.optimizer",
    "max_seq_length": "data.max_length",
    "sequence_len": "data.max_length",
    "max_length": "data.max_length",
    "max_prompt_length": "data.max_length",  # trl's GRPO/DPO: qtune bounds prompt + completion
    "generation_batch_size": "train.micro_batch_size",  # trl's GRPO: a step generates micro_batch_size x grad_accum
    "lora_r": "lora.r",
    "rank": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "base_model": "model.name",
    "model_name_or_path": "model.name",
    "output_dir": "train.output_dir",
    "bnb_4bit_quant_type": "quant.type",
    "bnb_4bit_use_double_quant": "quant.double_quant",
    "bnb_4bit_compute_dtype": "quant.compute_dtype",
}


def describe_validation_error(error: dict) -> tuple[str, str | None]:
    """(what, how to fix) for one pydantic error."""
    loc = plain_location(error["loc"])
    dotted = ".".join(loc) or "recipe"
    kind = error["type"]
    if kind == "extra_forbidden" and SYNONYMS.get(loc[-1], dotted) != dotted:
        noun = "key" if len(loc) > 1 else "section"
        return f"unknown {noun} '{dotted}'", f"did you mean '{SYNONYMS[loc[-1]]}'? (qtune's name for {loc[-1]})"
    if kind == "extra_forbidden":
        known = known_keys(loc[:-1])
        guess = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
        noun = "key" if len(loc) > 1 else "section"
        fix = f"did you mean '{'.'.join(loc[:-1] + guess)}'?" if guess else f"known keys here: {', '.join(known)}"
        return f"unknown {noun} '{dotted}'", fix
    if kind == "missing":
        return f"missing required key '{dotted}'", None
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        choices = re.findall(r"'([^']*)'", expected)
        given = error.get("input")
        guess = difflib.get_close_matches(given, choices, n=1, cutoff=0.5) if choices and isinstance(given, str) else []
        return f"'{dotted}' is {given!r}, must be one of {expected}", (f"did you mean '{guess[0]}'?" if guess else None)
    if kind == "value_error":
        message = error["msg"].removeprefix("Value error, ")
        return (f"'{dotted}': {message}" if loc else message), None
    given = error.get("input")
    shown = "a mapping" if isinstance(given, dict) else repr(given)
    return f"'{dotted}' is {shown}: {error['msg'][0].lower() + error['msg'][1:]}", None


def plain_location(loc) -> list[str]:
    """The recipe keys of an error's location, without pydantic's union branch tags ("literal['a','b']", "list[...]")
    and the list index inside such a branch."""
    parts = [str(part) for part in loc]
    if any("[" in part for part in parts):
        cut = next(i for i, part in enumerate(parts) if "[" in part)
        return parts[:cut]
    return parts


def known_keys(section_loc: list[str]) -> list[str]:
    """Field names of the schema section at `section_loc` (list indices skipped)."""
    model: type[BaseModel] = Recipe
    for part in section_loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        inner = _section_type(field.annotation)
        if inner is None:
            return []
        model = inner
    return list(model.model_fields)


def _section_type(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML, every default filled in (the run folder's recipe.yaml). Other methods' sections
    are left out: noise in a saved recipe."""
    unused = {m.name for m in METHODS.values() if m.section is not None and m.name != recipe.train.method}
    return yaml.safe_dump(recipe.model_dump(mode="json", exclude=unused), sort_keys=False)
