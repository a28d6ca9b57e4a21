"""`qtune quantize-report`: one model in every precision side by side (fp32 to NF4 with double quantization): memory,
load time, perplexity and agreement with fp32 on the user's data, as JSON and a chart."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from qtune.config.recipe import DataSection
from qtune.core.log import get_logger
from qtune.core.plots import saved_figure
from qtune.data.sft import SFT_DATA
from qtune.evaluation import metrics
from qtune.modeling.config import load_config
from qtune.modeling.load import choose_pad_token, device_map
from qtune.modeling.precision import bnb_config, keep_cpu_4bit_layout_trainable
from qtune.planning.memory import PRECISIONS, inventory, weight_memory

log = get_logger(__name__)


def load_in_precision(model_dir: str, precision: str):
    """The model loaded in one of qtune memory's precisions (fp32, bf16, fp16, int8, fp4, nf4, nf4_dq)."""
    from transformers import AutoModelForCausalLM

    if precision in ("fp32", "bf16", "fp16"):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device_map())
    config = bnb_config(precision.removesuffix("_dq"), double_quant=precision.endswith("_dq"))
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
) -> dict:
    """Each precision of one model side by side: memory, load time, perplexity on the user's data."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    choose_pad_token(tokenizer)
    section = DataSection(datasets=[{"path": data, "format": data_format}], max_length=max_length, val_size=0)
    chosen = metrics.samples_from(SFT_DATA.build(section, tokenizer, seed=0).train, samples, max_length)
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
    log.info(
        f"{'precision':<9} {'memory MiB':>11} {'load s':>7} {'perplexity':>11} {'KL vs fp32':>11} {'top-1 vs fp32':>14}"
    )
    for precision, row in rows.items():
        log.info(
            f"{precision:<9} {(row['footprint_bytes'] + row['quant_constants_bytes']) / 2**20:>11.2f} {row['load_seconds']:>7.2f} "
            f"{row['perplexity']:>11.4f} {row['mean_kl_vs_fp32']:>11.2e} {100 * row['top1_vs_fp32']:>13.2f}%"
        )
    log.info(f"quantize-report: {out / 'quantize_report.json'}, {out / 'quantize_report.png'}")
    return report


def plot_quantize_report(rows: dict, path, title: str) -> None:
    """Perplexity against weight memory, one point per precision."""
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
