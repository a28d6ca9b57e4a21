"""Measuring models: the export fidelity report (each artifact against the adapter-on-NF4 model it came from),
`qtune eval` (loss of the base, the adapter and every export on the same samples) and `qtune quantize-report`
(one model in every precision). Exports call this module; it never calls them.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from qtune import data as data_stage
from qtune import metrics, preference
from qtune.memory import PRECISIONS, inventory, load_config, weight_memory
from qtune.model import (
    choose_pad_token,
    device_map,
    half_dtype,
    keep_cpu_4bit_layout_trainable,
    load_adapter_model,
    resolve_compute_dtype,
)
from qtune.plots import saved_figure
from qtune.recipe import DataSection
from qtune.report_page import build_report
from qtune.run_dir import ARTIFACTS, EVAL_REPORT, MERGED_FORMATS, TrainedRun, open_run
from qtune.task_scores import update_eval_report

# --------------------------------------------------------------------------- the samples and the artifacts


def fidelity_samples(
    trained: TrainedRun, eval_data: str | None, eval_format: str | None, limit: int | None, max_tokens: int | None = 256
):
    """The run's validation samples (or --eval-data), tokenized exactly as in training."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained.adapter_dir)
    section = trained.recipe.data
    if eval_data:
        fmt = eval_format or section.datasets[0].format
        section = DataSection(
            datasets=[{"path": eval_data, "format": fmt}],
            max_length=section.max_length,
            val_size=0,
            chat_template=section.chat_template,
            train_on_inputs=section.train_on_inputs,
        )
    prepared = preference.build_data(section, tokenizer, seed=trained.recipe.train.seed)
    dataset = prepared.val if prepared.val is not None and not eval_data else prepared.train
    if "chosen_ids" in dataset.column_names:  # a preference run is compared on its prompts and chosen answers
        dataset = preference.chosen_as_samples(dataset)
    return metrics.samples_from(dataset, limit, max_tokens)


def artifact_dtype(trained: TrainedRun, on_gpu: bool) -> torch.dtype:
    """fp32 on CPU (so only the file's own precision shows); on a GPU the 16-bit dtype the model family is safe in
    (bf16 for Gemma, whose activations overflow fp16), read once from the base's config."""
    if not on_gpu:
        return torch.float32
    return half_dtype(load_config(trained.recipe.model.name, trained.recipe.model.revision))


def load_artifact(fmt: str, path: Path, on_gpu: bool, dtype: torch.dtype):
    """Each artifact the way its users load it: transformers for merged and nf4, transformers' GGUF reader for
    GGUF, in `dtype` (artifact_dtype)."""
    from transformers import AutoModelForCausalLM

    placement = {"device_map": device_map()} if on_gpu else {}
    if fmt in MERGED_FORMATS:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placement)
    if fmt == "nf4":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map())
        keep_cpu_4bit_layout_trainable(model)
        return model
    config = gguf_config(path)
    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, config=config, dtype=dtype, **placement
    )


def gguf_config(path: Path):
    """The model config transformers reads from a GGUF file, corrected where its reader and llama.cpp disagree.

    transformers' GGUF reader leaves Gemma's query_pre_attn_scalar at its default, 256, while llama.cpp scales
    queries by the file's head size (key_length): for a Gemma whose head size is not 256 the reader builds another
    model than the file holds (max |Δlogit| 0.9 on a tiny Gemma 3, against 0.002 in llama.cpp). qtune writes Gemma
    GGUFs only when the two agree (qtune.gguf_support), so the head size is the value.
    tests/test_export.py::test_gemma_and_phi3_gguf_files_read_back_as_the_model checks it."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if hasattr(config, "query_pre_attn_scalar") and getattr(config, "head_dim", None):
        config.query_pre_attn_scalar = config.head_dim
    if config.model_type == "phi3":
        restore_longrope(config, path)
    if (config.pad_token_id or 0) >= config.vocab_size:
        # Phi-3's config class defaults the pad id to 32000, which the reader keeps when the file names no pad token
        config.pad_token_id = None
    return config


def restore_longrope(config, path: Path) -> None:
    """transformers' GGUF reader drops Phi-3's longrope factors (Phi-4-mini, Phi-3-128k), which the file carries as
    tensors, and builds plain rope: 0.027 off in the logits of a tiny model. Put them back from the file
    (tests/test_export.py::test_phi3_longrope_writes_its_factors_and_other_rope_scalings_are_refused)."""
    import gguf

    reader = gguf.GGUFReader(path)
    factors = {
        t.name.split(".")[0]: [float(x) for x in t.data] for t in reader.tensors if t.name.startswith("rope_factors_")
    }
    if not factors:
        return
    original = int(reader.fields["phi3.rope.scaling.original_context_length"].contents())
    config.original_max_position_embeddings = original
    config.rope_parameters = {
        **(config.rope_parameters or {}),
        "rope_type": "longrope",
        "long_factor": factors["rope_factors_long"],
        "short_factor": factors["rope_factors_short"],
        "original_max_position_embeddings": original,
    }


def artifact_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- export fidelity


def fidelity_report(trained: TrainedRun, written: dict[str, Path], samples, *, merge_base: str, echo=print) -> dict:
    """Each artifact reloaded the way its users load it and compared with the adapter-on-NF4 model it came from."""
    on_gpu = torch.cuda.is_available()
    compute_dtype = resolve_compute_dtype(trained.recipe.quant.compute_dtype) if on_gpu else torch.float32
    reference_model = load_adapter_model(trained, compute_dtype)
    reference = metrics.sample_logits(reference_model, samples)
    del reference_model
    rows = {}
    dtype = artifact_dtype(trained, on_gpu)
    for fmt, path in written.items():
        if fmt == "adapter":
            continue
        model = load_artifact(fmt, path, on_gpu, dtype)
        row = metrics.compare(reference, metrics.sample_logits(model, samples), samples)
        del model
        row["size_bytes"] = artifact_size(path)
        row["path"] = str(path)
        rows[fmt] = row
    reference_ppl = metrics.perplexity(reference, samples)
    echo(f"fidelity against the adapter on the NF4 base ({len(samples)} samples, merge base: {merge_base}):")
    echo(metrics.format_table(rows, reference_ppl))
    return {
        "reference": {"perplexity": reference_ppl, "samples": len(samples)},
        "merge_base": merge_base,
        "artifacts": rows,
    }


# --------------------------------------------------------------------------- qtune eval


def eval_run(
    run_dir, *, data: str | None = None, data_format: str | None = None, samples: int | None = None, echo=print
) -> dict:
    """Loss and perplexity of the 4-bit base, the adapter and every export in the run, on the same samples: by
    default the whole validation split the training evaluated on. The loss is the mean over supervised tokens."""
    trained = open_run(run_dir)
    chosen = fidelity_samples(trained, data, data_format, samples, max_tokens=None)  # whole, as trained
    on_gpu = torch.cuda.is_available()
    compute = torch.float32
    losses = {}
    adapted = load_adapter_model(trained, compute)
    with adapted.disable_adapter():
        losses["base (4-bit)"] = metrics.supervised_loss(adapted, chosen)
    losses["adapter"] = metrics.supervised_loss(adapted, chosen)
    del adapted
    dtype = artifact_dtype(trained, on_gpu)
    for fmt in ARTIFACTS:
        path = trained.artifact(fmt)
        if fmt != "adapter" and path.exists():
            model = load_artifact(fmt, path, on_gpu, dtype)
            losses[fmt] = metrics.supervised_loss(model, chosen)
            del model
    table = {name: {"loss": loss, "perplexity": math.exp(loss)} for name, loss in losses.items()}
    where = f"--data {data}" if data else "the run's validation split"
    echo(
        f"{'model':<14} {'loss':>8} {'perplexity':>11}   ({len(chosen)} samples of {where}; mean over supervised tokens)"
    )
    for name, row in table.items():
        echo(f"{name:<14} {row['loss']:>8.4f} {row['perplexity']:>11.4f}")
    trained_metrics = trained.metrics()
    if (
        not data
        and not trained.recipe.preference  # its eval_loss is the preference loss, not this one
        and trained_metrics.get("eval_loss") is not None
        and trained_metrics.get("eval_loss_before") is not None
    ):
        echo(
            f"(training's own eval_loss in metrics.json: {trained_metrics['eval_loss_before']:.4f} -> "
            f"{trained_metrics['eval_loss']:.4f}, on the same samples; the Trainer averages per-batch means instead of "
            "weighing every token the same, which moves the figure most where per-token losses spread widely, as on "
            "an untrained base)"
        )
    report = {"samples": len(chosen), "data": data or "validation split", "models": table}
    update_eval_report(trained.run_dir / EVAL_REPORT, report)  # the task scores, if any, stay
    echo(f"run page updated: {build_report(trained.run_dir)}")
    return report


# --------------------------------------------------------------------------- qtune quantize-report


def load_in_precision(model_dir: str, precision: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if precision in ("fp32", "bf16", "fp16"):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device_map())
    if precision == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4" if precision.startswith("nf4") else "fp4",
            bnb_4bit_use_double_quant=precision.endswith("_dq"),
            bnb_4bit_compute_dtype=torch.float32,
        )
    # Unquantized parts in fp16, as a GPU load would keep them (the footprint qtune memory predicts).
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float16, quantization_config=config, device_map=device_map()
    )
    keep_cpu_4bit_layout_trainable(model)
    return model


def quantize_report(
    model_dir: str,
    data: str,
    *,
    data_format: str = "text",
    samples: int = 64,
    max_length: int = 512,
    out_dir: str | None = None,
    echo=print,
) -> dict:
    """Each precision of one model side by side: memory, load time, perplexity on the user's data."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    choose_pad_token(tokenizer)
    section = DataSection(datasets=[{"path": data, "format": data_format}], max_length=max_length, val_size=0)
    chosen = metrics.samples_from(data_stage.build(section, tokenizer, seed=0).train, samples, max_length)
    predicted = inventory(load_config(model_dir))
    rows = {}
    reference = None
    for precision in PRECISIONS:
        started = time.perf_counter()
        model = load_in_precision(model_dir, precision)
        load_seconds = time.perf_counter() - started
        logits = metrics.sample_logits(model, chosen)
        if reference is None:
            reference = logits
        figures = metrics.compare(reference, logits, chosen)
        rows[precision] = {
            "footprint_bytes": model.get_memory_footprint(),
            "predicted_bytes": weight_memory(predicted, precision).tensors_bytes,
            "quant_constants_bytes": weight_memory(predicted, precision).constants_bytes,
            "load_seconds": load_seconds,
            "perplexity": figures["perplexity"],
            "mean_kl_vs_fp32": figures["mean_kl"],
            "top1_vs_fp32": figures["top1_agreement"],
        }
        del model
    out = Path(out_dir or ".") / "quantize_report"
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": model_dir, "data": data, "samples": len(chosen), "precisions": rows}
    (out / "quantize_report.json").write_text(json.dumps(report, indent=2))
    plot_quantize_report(rows, out / "quantize_report.png", model_dir)
    echo(
        f"{'precision':<9} {'memory MiB':>11} {'load s':>7} {'perplexity':>11} {'KL vs fp32':>11} {'top-1 vs fp32':>14}"
    )
    for precision, row in rows.items():
        echo(
            f"{precision:<9} {(row['footprint_bytes'] + row['quant_constants_bytes']) / 2**20:>11.2f} {row['load_seconds']:>7.2f} "
            f"{row['perplexity']:>11.4f} {row['mean_kl_vs_fp32']:>11.2e} {100 * row['top1_vs_fp32']:>13.2f}%"
        )
    echo(f"quantize-report: {out / 'quantize_report.json'}, {out / 'quantize_report.png'}")
    return report


def plot_quantize_report(rows: dict, path, title: str) -> None:
    names = list(rows)
    memory = [(rows[n]["footprint_bytes"] + rows[n]["quant_constants_bytes"]) / 2**20 for n in names]
    ppl = [rows[n]["perplexity"] for n in names]
    with saved_figure(path) as axis:
        axis.scatter(memory, ppl)
        for name, x, y in zip(names, memory, ppl):
            axis.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4))
        axis.set_xlabel("weight memory (MiB)")
        axis.set_ylabel("perplexity")
        axis.set_title(f"memory vs quality: {title}")
