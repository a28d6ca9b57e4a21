"""How far a model is from a reference on the same tokens: perplexity, KL, top-1 agreement, max |Δlogit|.

Used by the export fidelity report (each artifact against the adapter-on-NF4 model it came from).
Models are run one at a time, one sample at a time; only the reference's logits are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Top-1 agreement is counted where the reference's two best logits differ by more than this:
# closer than that, rounding alone flips the winner and says nothing about the export.
DECISIVE_MARGIN = 0.05


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]


def samples_from(dataset, limit: int | None, max_tokens: int | None = 256) -> list[Sample]:
    """At most `limit` (None: all) samples of at most `max_tokens` tokens. The fidelity report holds the reference
    logits in memory (limit x max_tokens x vocabulary x 4 bytes: 1 GiB for 32 x 256 x 32k)."""
    rows = dataset.select(range(len(dataset) if limit is None else min(limit, len(dataset))))
    return [Sample(r["input_ids"][:max_tokens], r["labels"][:max_tokens]) for r in rows]


@torch.no_grad()
def sample_logits(model, samples: list[Sample]) -> list[torch.Tensor]:
    model.eval()
    device = next(model.parameters()).device
    out = []
    for sample in samples:
        ids = torch.tensor([sample.input_ids], device=device)
        out.append(model(input_ids=ids).logits[0].float().cpu())
    return out


def perplexity(logits: list[torch.Tensor], samples: list[Sample]) -> float:
    total, count = 0.0, 0
    for row, sample in zip(logits, samples):
        labels = torch.tensor(sample.labels[1:])
        keep = labels != -100
        if keep.any():
            nll = torch.nn.functional.cross_entropy(row[:-1][keep], labels[keep], reduction="sum")
            total += nll.item()
            count += int(keep.sum())
    return math.exp(total / max(count, 1))


def compare(reference: list[torch.Tensor], candidate: list[torch.Tensor], samples: list[Sample]) -> dict:
    """Figures of `candidate` against `reference`, over every position of every sample."""
    kl_sum, positions = 0.0, 0
    agree, decisive, decisive_agree = 0, 0, 0
    max_delta = 0.0
    for ref, cand in zip(reference, candidate):
        ref_logp = torch.log_softmax(ref.double(), dim=-1)
        cand_logp = torch.log_softmax(cand.double(), dim=-1)
        kl_sum += (ref_logp.exp() * (ref_logp - cand_logp)).sum(dim=-1).clamp(min=0).sum().item()
        positions += ref.shape[0]
        ref_top = ref.topk(2, dim=-1)
        same = ref_top.indices[:, 0] == cand.argmax(dim=-1)
        agree += int(same.sum())
        clear = (ref_top.values[:, 0] - ref_top.values[:, 1]) > DECISIVE_MARGIN
        decisive += int(clear.sum())
        decisive_agree += int((same & clear).sum())
        max_delta = max(max_delta, (ref - cand).abs().max().item())
    return {
        "perplexity": perplexity(candidate, samples),
        "mean_kl": kl_sum / max(positions, 1),
        "top1_agreement": decisive_agree / max(decisive, 1),
        "top1_agreement_raw": agree / max(positions, 1),
        "max_abs_logit_diff": max_delta,
        "positions": positions,
        "decisive_positions": decisive,
    }


def format_table(rows: dict[str, dict], reference_perplexity: float) -> str:
    header = f"{'artifact':<14} {'size MiB':>9} {'ppl':>9} {'mean KL':>10} {'top-1':>8} {'top-1 raw':>9} {'max|Δlogit|':>12}"
    lines = [header, "-" * len(header), f"{'adapter+NF4':<14} {'':>9} {reference_perplexity:>9.4f} {'(reference)':>10}"]
    for name, row in rows.items():
        lines.append(
            f"{name:<14} {row.get('size_bytes', 0) / 2**20:>9.1f} {row['perplexity']:>9.4f} {row['mean_kl']:>10.2e} "
            f"{100 * row['top1_agreement']:>7.2f}% {100 * row['top1_agreement_raw']:>8.2f}% {row['max_abs_logit_diff']:>12.4f}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- qtune eval


def eval_run(run_dir, *, data: str | None = None, data_format: str | None = None, samples: int | None = None,
             echo=print) -> dict:
    """Loss and perplexity of the 4-bit base, the adapter and every export in the run, on the same samples: by
    default the whole validation split the training evaluated on. The loss is the mean over supervised tokens."""
    from pathlib import Path

    from qtune import export

    trained = export.open_run(run_dir)
    chosen = export.fidelity_samples(trained, data, data_format, samples, max_tokens=None)  # whole, as trained
    on_gpu = torch.cuda.is_available()
    compute = torch.float32
    losses = {}
    adapted = export.load_adapter_model(trained, compute)
    with adapted.disable_adapter():
        losses["base (4-bit)"] = supervised_loss(adapted, chosen)
    losses["adapter"] = supervised_loss(adapted, chosen)
    del adapted
    export_dir = Path(run_dir) / "export"
    found = {"merged_fp16": export_dir / "merged-fp16", "merged_bf16": export_dir / "merged-bf16", "nf4": export_dir / "nf4"}
    found.update({f: export_dir / f"model-{q.lower()}.gguf" for f, q in export.GGUF_FORMATS.items()})
    for fmt, path in found.items():
        if path.exists():
            model = export.load_artifact(fmt, path, on_gpu)
            losses[fmt] = supervised_loss(model, chosen)
            del model
    table = {name: {"loss": loss, "perplexity": math.exp(loss)} for name, loss in losses.items()}
    where = f"--data {data}" if data else "the run's validation split"
    echo(f"{'model':<14} {'loss':>8} {'perplexity':>11}   ({len(chosen)} samples of {where}; mean over supervised tokens)")
    for name, row in table.items():
        echo(f"{name:<14} {row['loss']:>8.4f} {row['perplexity']:>11.4f}")
    metrics_file = Path(run_dir) / "metrics.json"
    if not data and metrics_file.is_file():
        import json

        metrics = json.loads(metrics_file.read_text())
        if metrics.get("eval_loss") is not None and metrics.get("eval_loss_before") is not None:
            echo(f"(training's own eval_loss in metrics.json: {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss']:.4f}, "
                 f"on the same samples; the Trainer averages per-batch means, so it differs in the last digits)")
    report = {"samples": len(chosen), "data": data or "validation split", "models": table}
    from qtune.finetune import write_json_atomically

    write_json_atomically(Path(run_dir) / "eval_report.json", report)
    return report


@torch.no_grad()
def supervised_loss(model, samples: list[Sample]) -> float:
    """Mean negative log-likelihood over the supervised tokens of every sample (no logits kept)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for sample in samples:
        logits = model(input_ids=torch.tensor([sample.input_ids], device=device)).logits[0, :-1].float()
        labels = torch.tensor(sample.labels[1:], device=device)
        keep = labels != -100
        total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
        count += int(keep.sum())
    return total / max(count, 1)


# --------------------------------------------------------------------------- qtune quantize-report


QUANTIZE_REPORT_PRECISIONS = ("fp32", "bf16", "fp16", "int8", "fp4", "nf4", "nf4_dq")


def load_in_precision(model_dir: str, precision: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qtune.model import device_map, keep_cpu_4bit_layout_trainable

    if precision in ("fp32", "bf16", "fp16"):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device_map())
    if precision == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4" if precision.startswith("nf4") else "fp4",
                                    bnb_4bit_use_double_quant=precision.endswith("_dq"), bnb_4bit_compute_dtype=torch.float32)
    # Unquantized parts in fp16, as a GPU load would keep them (the footprint qtune memory predicts).
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16, quantization_config=config,
                                                 device_map=device_map())
    keep_cpu_4bit_layout_trainable(model)
    return model


def quantize_report(model_dir: str, data: str, *, data_format: str = "text", samples: int = 64, max_length: int = 512,
                    out_dir: str | None = None, echo=print) -> dict:
    """Each precision of one model side by side: memory, load time, perplexity on the user's data."""
    import json
    import time
    from pathlib import Path

    from transformers import AutoTokenizer

    from qtune import data as data_stage
    from qtune.model import choose_pad_token
    from qtune.plan import inventory, load_config, weight_memory
    from qtune.recipe import DataSection

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    choose_pad_token(tokenizer)
    section = DataSection(datasets=[{"path": data, "format": data_format}], max_length=max_length, val_size=0)
    chosen = samples_from(data_stage.build(section, tokenizer, seed=0).train, samples, max_length)
    predicted = inventory(load_config(model_dir))
    rows = {}
    reference = None
    for precision in QUANTIZE_REPORT_PRECISIONS:
        started = time.perf_counter()
        model = load_in_precision(model_dir, precision)
        load_seconds = time.perf_counter() - started
        logits = sample_logits(model, chosen)
        if reference is None:
            reference = logits
        figures = compare(reference, logits, chosen)
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
    echo(f"{'precision':<9} {'memory MiB':>11} {'load s':>7} {'perplexity':>11} {'KL vs fp32':>11} {'top-1 vs fp32':>14}")
    for precision, row in rows.items():
        echo(f"{precision:<9} {(row['footprint_bytes'] + row['quant_constants_bytes']) / 2**20:>11.2f} {row['load_seconds']:>7.2f} "
             f"{row['perplexity']:>11.4f} {row['mean_kl_vs_fp32']:>11.2e} {100 * row['top1_vs_fp32']:>13.2f}%")
    echo(f"quantize-report: {out / 'quantize_report.json'}, {out / 'quantize_report.png'}")
    return report


def plot_quantize_report(rows: dict, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    memory = [(rows[n]["footprint_bytes"] + rows[n]["quant_constants_bytes"]) / 2**20 for n in names]
    ppl = [rows[n]["perplexity"] for n in names]
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.scatter(memory, ppl)
    for name, x, y in zip(names, memory, ppl):
        axis.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4))
    axis.set_xlabel("weight memory (MiB)")
    axis.set_ylabel("perplexity")
    axis.set_title(f"memory vs quality: {title}")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
