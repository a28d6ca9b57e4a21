"""Export a trained run: merged fp16/bf16 weights, a re-quantized NF4 checkpoint, GGUF files.

Each artifact is written into a hidden staging folder beside its destination and renamed into
place only when complete, so a failed or interrupted export leaves nothing half-written and never
damages an earlier one. Every artifact is then reloaded the way a user would load it and compared
with the model it came from (qtune.evaluate).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from qtune.errors import EXIT_ENVIRONMENT, EXIT_INTEGRITY, EnvironmentProblem, QtuneError, RecipeError
from qtune.recipe import Recipe, validate_recipe
from qtune.run_dir import ARTIFACTS, EXPORT_ENTRIES, EXPORT_REPORT, MERGE_WORK, MODELFILE_SUFFIX, claimed

MERGED_FORMATS = {"merged_fp16": "float16", "merged_bf16": "bfloat16"}
GGUF_FORMATS = {"gguf_f16": "F16", "gguf_q8_0": "Q8_0", "gguf_q4_0": "Q4_0"}
FORMATS = tuple(ARTIFACTS)
# llama.cpp architecture per transformers model_type; Mistral is written as llama, as llama.cpp's converter does.
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
SHARD_BYTES = 2**30  # output shard; the merge holds at most one in memory
MERGE_BASES = ("dequantized", "original")


@dataclass(frozen=True)
class TrainedRun:
    run_dir: Path
    recipe: Recipe
    adapter_dir: Path


def open_run(run_dir: str | Path) -> TrainedRun:
    import yaml

    run_dir = Path(run_dir)
    recipe_file = run_dir / "recipe.yaml"
    if not recipe_file.is_file():
        raise QtuneError(f"not a qtune run folder: {run_dir}", fix="give the train.output_dir of a finished run",
                         code=EXIT_INTEGRITY)
    recipe = validate_recipe(yaml.safe_load(recipe_file.read_text()), where=str(recipe_file))
    adapter_dir = run_dir / "adapter"
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise QtuneError(f"the run has no trained adapter: {adapter_dir}", fix="finish (or --resume) the training first",
                         code=EXIT_INTEGRITY)
    return TrainedRun(run_dir, recipe, adapter_dir)


def check_formats(formats: list[str], model_type: str) -> list[str]:
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        import difflib

        guess = difflib.get_close_matches(unknown[0], FORMATS, n=1)
        raise RecipeError(f"unknown export format '{unknown[0]}'",
                          fix=f"did you mean '{guess[0]}'?" if guess else f"choose from {', '.join(FORMATS)}")
    if any(f in GGUF_FORMATS for f in formats) and model_type not in GGUF_ARCHITECTURES:
        raise QtuneError(
            f"GGUF export does not support the '{model_type}' architecture",
            fix=f"supported: {', '.join(sorted(GGUF_ARCHITECTURES))}; export merged_fp16 and convert with llama.cpp",
            code=EXIT_ENVIRONMENT,
        )
    return list(dict.fromkeys(formats))  # de-duplicated, in the order given


# --------------------------------------------------------------------------- atomic writing


def staging_dir_for(target: Path) -> Path:
    return target.with_name(f".{target.name}.partial")


def publish(staging: Path, target: Path) -> None:
    """Rename a finished artifact into place; an earlier one is replaced only once the new one is whole."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.replace(staging, target)


def check_free_disk(out_dir: Path, needed_bytes: int) -> None:
    probe = out_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    margin = 1.05
    if free < needed_bytes * margin:
        raise EnvironmentProblem(
            f"not enough free disk for the export: needs about {needed_bytes / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB free",
            where=str(probe),
            fix="free some space, choose fewer formats, or --out on a bigger disk",
        )


# --------------------------------------------------------------------------- the merge


def lora_deltas(adapter_dir: Path):
    """{module name: (A, B, scale, magnitude or None)} from a saved peft LoRA adapter."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise QtuneError(f"only LoRA adapters can be merged, this is {config.get('peft_type')}", code=EXIT_INTEGRITY)
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    modules: dict[str, dict] = {}
    for key, value in tensors.items():
        name = key.removeprefix("base_model.model.")
        part = next((p for p in (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector") if name.endswith(p)), None)
        if part is None:  # e.g. modules_to_save or trainable tokens: merging without them would be silently wrong
            raise QtuneError(f"adapter holds weights qtune cannot merge: {key}", where=str(adapter_dir), code=EXIT_INTEGRITY)
        modules.setdefault(name[: -len(part)], {})[part] = value
    deltas = {}
    for module, parts in modules.items():
        if ".lora_A.weight" not in parts or ".lora_B.weight" not in parts:
            raise QtuneError(f"adapter is missing lora_A/lora_B for {module}", where=str(adapter_dir), code=EXIT_INTEGRITY)
        deltas[module] = (parts[".lora_A.weight"], parts[".lora_B.weight"], scale, parts.get(".lora_magnitude_vector"))
    if not deltas:
        raise QtuneError("adapter holds no LoRA weights", where=str(adapter_dir), code=EXIT_INTEGRITY)
    return deltas


def merge_weight(base_weight, delta) -> "torch.Tensor":
    """W + scale * B @ A in fp32; with DoRA, rescaled per output row to the learned magnitude (as peft merges)."""
    import torch

    lora_a, lora_b, scale, magnitude = delta
    weight = base_weight.float()
    merged = weight + scale * (lora_b.float() @ lora_a.float())
    if magnitude is not None:
        # peft normalises W + scale*BA (the delta detached during training, same value here).
        merged = merged * (magnitude.float() / merged.norm(p=2, dim=1)).unsqueeze(1)
    return merged


class ShardWriter:
    """Safetensors shards of at most `shard_bytes`, named and indexed the way transformers saves them."""

    def __init__(self, folder: Path, shard_bytes: int = SHARD_BYTES):
        self.folder = folder
        self.shard_bytes = shard_bytes
        self.pending: dict = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self.flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += size
        self.total += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.folder / name), metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        if len(self.files) == 1:
            os.replace(self.folder / self.files[0][0], self.folder / "model.safetensors")
            return
        weight_map = {}
        count = len(self.files)
        for index, (temporary, names) in enumerate(self.files, start=1):
            final = f"model-{index:05d}-of-{count:05d}.safetensors"
            os.replace(self.folder / temporary, self.folder / final)
            weight_map.update({n: final for n in names})
        index_file = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))


def base_checkpoint(model_name: str, revision: str) -> Path:
    """The folder holding the base model's own files: local, or the Hub cache (downloaded if missing)."""
    path = Path(model_name).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_name, revision=revision, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as e:  # offline, gated, missing: all mean the same to the user here
        raise EnvironmentProblem(f"cannot get the base weights of {model_name}: {type(e).__name__}",
                                 fix="make the base model available (network, `hf auth login`, or a local folder)") from None


def checkpoint_tensors(folder: Path) -> dict[str, Path]:
    """tensor name -> safetensors file, in file order."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise EnvironmentProblem(f"no safetensors weights in {folder}", fix="qtune reads safetensors only")
    location = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            location.update({key: file for key in handle.keys()})
    return location


def quantized_weight_names(config) -> set[str]:
    """Weights bitsandbytes turns into 4-bit on load, decided by transformers' own rules on an empty (meta) model."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.integrations import replace_with_bnb_linear
    from transformers.quantizers.base import HfQuantizer

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    skip = HfQuantizer.get_modules_to_not_convert(skeleton, None, skeleton._keep_in_fp32_modules)
    skeleton = replace_with_bnb_linear(skeleton, modules_to_not_convert=skip,
                                       quantization_config=BitsAndBytesConfig(load_in_4bit=True), pre_quantized=False)
    return {f"{name}.weight" for name, module in skeleton.named_modules() if isinstance(module, bnb.nn.Linear4bit)}


def training_compute_dtype(trained: TrainedRun):
    """The dtype the run quantized its base in (recorded at training time), so the merge sees the same NF4 weights."""
    import torch

    from qtune.model import DTYPES, resolve_compute_dtype

    metrics_file = trained.run_dir / "metrics.json"
    if metrics_file.is_file():
        recorded = json.loads(metrics_file.read_text()).get("compute_dtype")
        if recorded in DTYPES:
            return DTYPES[recorded]
    return resolve_compute_dtype(trained.recipe.quant.compute_dtype) if torch.cuda.is_available() else torch.float32


def nf4_round_trip(weight, quant, device):
    """The weight as the 4-bit base holds it: quantized and dequantized exactly as bitsandbytes does on load."""
    import bitsandbytes as bnb

    packed, state = bnb.functional.quantize_4bit(weight.to(device), blocksize=64, compress_statistics=quant.double_quant,
                                                 quant_type=quant.type)
    return bnb.functional.dequantize_4bit(packed, state)


def write_merged(run: TrainedRun, target: Path, *, dtype_name: str, merge_base: str, shard_bytes: int = SHARD_BYTES,
                 echo=print) -> Path:
    """Merge the adapter into the base, streaming tensor by tensor from the base checkpoint into sharded safetensors.

    The default base is the dequantized NF4 weights the adapter was trained against: merging there
    reproduces the adapter-on-NF4 model (the LoRA delta compensated for the quantization error), while
    merging into the original weights adds the delta to weights it never saw. Each tensor is read with
    its file opened only for that read, so memory holds one tensor and one output shard at a time.
    """
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig

    dtype = getattr(torch, dtype_name)
    deltas = lora_deltas(run.adapter_dir)
    folder = base_checkpoint(run.recipe.model.name, run.recipe.model.revision)
    location = checkpoint_tensors(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=run.recipe.model.trust_remote_code)
    quantized = quantized_weight_names(config)
    compute = training_compute_dtype(run)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    staging = staging_dir_for(target)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        writer = ShardWriter(staging, shard_bytes)
        for key, file in location.items():
            with safe_open(str(file), framework="pt") as handle:
                tensor = handle.get_tensor(key)
            if key in quantized:
                weight = tensor.to(compute)
                if merge_base == "dequantized":
                    weight = nf4_round_trip(weight, run.recipe.quant, device)
                module = key.removesuffix(".weight")
                if module in deltas:
                    weight = merge_weight(weight.float(), [t.to(weight.device) if isinstance(t, torch.Tensor) else t
                                                           for t in deltas.pop(module)])
                tensor = weight
            writer.add(key, tensor.to(dtype) if tensor.dtype.is_floating_point else tensor)
            del tensor
        if deltas:
            raise QtuneError(f"adapter layers not found in the base checkpoint: {sorted(deltas)[:3]}",
                             fix="was the adapter trained on this base?", code=EXIT_INTEGRITY)
        writer.close()
        merged_config = config.to_dict()
        merged_config.pop("quantization_config", None)
        merged_config["dtype"] = dtype_name
        (staging / "config.json").write_text(json.dumps(merged_config, indent=2))
        if (folder / "generation_config.json").is_file():
            shutil.copy2(folder / "generation_config.json", staging / "generation_config.json")
        copy_tokenizer(run.adapter_dir, staging)
        fault_point("merged")
        publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    echo(f"export: {target.name}: {writer.total / 2**20:.1f} MiB in {len(writer.files)} shard(s)")
    return target


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def copy_tokenizer(source: Path, target: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def fault_point(stage: str) -> None:
    """Fault injection for the tests: QTUNE_FAIL_EXPORT_AT=<stage> fails the export there, mid-write."""
    if os.environ.get("QTUNE_FAIL_EXPORT_AT") == stage:
        raise RuntimeError(f"injected export failure at {stage}")


# --------------------------------------------------------------------------- NF4


def write_nf4(merged_dir: Path, target: Path, run: TrainedRun, echo=print) -> Path:
    """The merged weights re-quantized to 4-bit with double quantization; loads with no extra arguments."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qtune.model import device_map, keep_cpu_4bit_layout_trainable

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=run.recipe.quant.type,
        bnb_4bit_use_double_quant=run.recipe.quant.double_quant,
        # fp16 is the compute dtype every GPU has; on CPU bitsandbytes follows the input dtype anyway.
        bnb_4bit_compute_dtype=torch.float16,
    )
    model = AutoModelForCausalLM.from_pretrained(merged_dir, quantization_config=config, dtype=torch.float16,
                                                 device_map=device_map())
    keep_cpu_4bit_layout_trainable(model)  # a saved file must hold the standard layout, never the CPU repack
    staging = staging_dir_for(target)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        copy_tokenizer(merged_dir, staging)
        fault_point("nf4")
        publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in target.glob("*.safetensors"))
    echo(f"export: {target.name}: {size / 2**20:.1f} MiB ({model.get_memory_footprint() / 2**20:.1f} MiB in memory)")
    return target


# --------------------------------------------------------------------------- sizes


def estimate_bytes(run: TrainedRun, formats: list[str], needs_merge: bool, keep_merged: bool) -> int:
    from transformers import AutoConfig

    from qtune.model import model_source

    source, kwargs = model_source(run.recipe.model)
    config = AutoConfig.from_pretrained(source, **kwargs)
    text = config.get_text_config()
    hidden, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    intermediate = getattr(text, "intermediate_size", 4 * hidden)
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", heads) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    per_layer = hidden * head_dim * (2 * heads + 2 * kv) + 3 * hidden * intermediate
    embeddings = vocab * hidden * (1 if text.tie_word_embeddings else 2)
    params = layers * per_layer + embeddings
    bytes_per_param = {"merged_fp16": 2, "merged_bf16": 2, "nf4": 0.6, "gguf_f16": 2, "gguf_q8_0": 1.07, "gguf_q4_0": 0.57}
    total = sum(params * bytes_per_param[f] for f in formats if f in bytes_per_param)
    if needs_merge and not keep_merged:
        total += params * 2  # the working merged copy, removed at the end
    return int(total)


# --------------------------------------------------------------------------- the export as a whole


def artifact_names(formats: list[str]) -> dict[str, str]:
    return {f: ARTIFACTS[f] for f in formats}


def run(run_dir: str | Path, formats: list[str], *, out_dir: str | Path | None = None, merge_base: str = "dequantized",
        eval_data: str | None = None, eval_format: str | None = None, eval_samples: int = 32, echo=print) -> dict:
    """Write every requested format, reload each, measure it against the adapter-on-NF4 model."""
    from transformers import AutoConfig

    from qtune.model import model_source

    trained = open_run(run_dir)
    if merge_base not in MERGE_BASES:
        raise RecipeError(f"unknown merge base '{merge_base}'", fix=f"choose {' or '.join(MERGE_BASES)}")
    source, kwargs = model_source(trained.recipe.model)
    model_type = AutoConfig.from_pretrained(source, **kwargs).model_type
    formats = check_formats(formats, model_type)
    if not formats:
        raise RecipeError("no export format given", fix=f"add --format, one of {', '.join(FORMATS)}")
    out = Path(out_dir) if out_dir else trained.run_dir / "export"
    needs_fp16 = any(f == "merged_fp16" or f == "nf4" or f in GGUF_FORMATS for f in formats)
    check_free_disk(out, estimate_bytes(trained, formats, needs_fp16, "merged_fp16" in formats))
    samples = fidelity_samples(trained, eval_data, eval_format, eval_samples)
    # An export replaces artifacts only inside a folder qtune made for exports, and one export at a time.
    with claimed(out, kind="export", entries=EXPORT_ENTRIES, overwrite=False, keep=True, what="a qtune export",
                 option="--out"):
        names = artifact_names(formats)
        started = time.perf_counter()
        written: dict[str, Path] = {}
        work_dir = None
        try:
            if "adapter" in formats:
                staging = staging_dir_for(out / "adapter")
                shutil.rmtree(staging, ignore_errors=True)
                shutil.copytree(trained.adapter_dir, staging)
                publish(staging, out / "adapter")
                written["adapter"] = out / "adapter"
            if needs_fp16:
                fp16_dir = out / names["merged_fp16"] if "merged_fp16" in formats else out / MERGE_WORK
                work_dir = None if "merged_fp16" in formats else fp16_dir
                write_merged(trained, fp16_dir, dtype_name="float16", merge_base=merge_base, echo=echo)
                if "merged_fp16" in formats:
                    written["merged_fp16"] = fp16_dir
            if "merged_bf16" in formats:
                written["merged_bf16"] = write_merged(trained, out / names["merged_bf16"], dtype_name="bfloat16",
                                                      merge_base=merge_base, echo=echo)
            if "nf4" in formats:
                written["nf4"] = write_nf4(fp16_dir, out / names["nf4"], trained, echo=echo)
            gguf_formats = [f for f in formats if f in GGUF_FORMATS]
            if gguf_formats:
                from transformers import AutoTokenizer

                from qtune.gguf_file import ollama_modelfile, write_gguf

                tokenizer = AutoTokenizer.from_pretrained(fp16_dir)
                trained_on_alpaca = all(d.format == "alpaca" for d in trained.recipe.data.datasets)
            for fmt in gguf_formats:
                written[fmt] = write_gguf(fp16_dir, out / names[fmt], GGUF_FORMATS[fmt], echo=echo)
                modelfile = ollama_modelfile(names[fmt], tokenizer, trained_on_alpaca=trained_on_alpaca)
                (out / (names[fmt] + MODELFILE_SUFFIX)).write_text(modelfile)
            seconds = time.perf_counter() - started
            report = fidelity_report(trained, written, samples, merge_base=merge_base, echo=echo)
        except Exception as e:
            from qtune.checkpoints import disk_full, is_disk_full

            if is_disk_full(e):  # each writer has already removed its own half-written staging folder
                raise disk_full("the export", out, fix="free disk space (finished exports are intact) and run the export again") from None
            raise
        finally:
            if work_dir is not None:
                shutil.rmtree(work_dir, ignore_errors=True)
        report.update(export_seconds=seconds, formats=formats, out_dir=str(out))
        from qtune.finetune import write_json_atomically

        write_json_atomically(out / EXPORT_REPORT, report)
    echo(f"export: report written to {out / EXPORT_REPORT}")
    return report


def fidelity_samples(trained: TrainedRun, eval_data: str | None, eval_format: str | None, limit: int | None,
                     max_tokens: int | None = 256):
    """The run's validation samples (or --eval-data), tokenized exactly as in training."""
    from transformers import AutoTokenizer

    from qtune import data as data_stage
    from qtune.evaluate import samples_from
    from qtune.recipe import DataSection

    tokenizer = AutoTokenizer.from_pretrained(trained.adapter_dir)
    section = trained.recipe.data
    if eval_data:
        fmt = eval_format or section.datasets[0].format
        section = DataSection(datasets=[{"path": eval_data, "format": fmt}], max_length=section.max_length,
                              val_size=0, chat_template=section.chat_template, train_on_inputs=section.train_on_inputs)
    prepared = data_stage.build(section, tokenizer, seed=trained.recipe.train.seed)
    dataset = prepared.val if prepared.val is not None and not eval_data else prepared.train
    return samples_from(dataset, limit, max_tokens)


def load_artifact(fmt: str, path: Path, on_gpu: bool):
    """Each artifact the way its users load it: transformers for merged and nf4, transformers' GGUF reader for
    GGUF. Evaluated in fp32 on CPU (so only the file's own precision shows), in fp16 on a GPU (memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    from qtune.model import device_map, keep_cpu_4bit_layout_trainable

    placement = {"device_map": device_map()} if on_gpu else {}
    dtype = torch.float16 if on_gpu else torch.float32
    if fmt in MERGED_FORMATS:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placement)
    if fmt == "nf4":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map())
        keep_cpu_4bit_layout_trainable(model)
        return model
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, **placement)


def artifact_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def load_adapter_model(trained: TrainedRun, compute_dtype):
    """The model as it was trained: the 4-bit base with the saved adapter on it."""
    from peft import PeftModel

    from qtune.model import load_base

    return PeftModel.from_pretrained(load_base(trained.recipe.model, trained.recipe.quant, compute_dtype), trained.adapter_dir)


def fidelity_report(trained: TrainedRun, written: dict[str, Path], samples, *, merge_base: str, echo=print) -> dict:
    import torch

    from qtune import evaluate
    from qtune.model import resolve_compute_dtype

    on_gpu = torch.cuda.is_available()
    compute_dtype = resolve_compute_dtype(trained.recipe.quant.compute_dtype) if on_gpu else torch.float32
    reference_model = load_adapter_model(trained, compute_dtype)
    reference = evaluate.sample_logits(reference_model, samples)
    del reference_model
    rows = {}
    for fmt, path in written.items():
        if fmt == "adapter":
            continue
        model = load_artifact(fmt, path, on_gpu)
        row = evaluate.compare(reference, evaluate.sample_logits(model, samples), samples)
        del model
        row["size_bytes"] = artifact_size(path)
        row["path"] = str(path)
        rows[fmt] = row
    reference_ppl = evaluate.perplexity(reference, samples)
    echo(f"fidelity against the adapter on the NF4 base ({len(samples)} samples, merge base: {merge_base}):")
    echo(evaluate.format_table(rows, reference_ppl))
    return {"reference": {"perplexity": reference_ppl, "samples": len(samples)}, "merge_base": merge_base,
            "artifacts": rows}
