"""Export fidelity: each artifact reloaded the way its users load it and compared with the model it came from, the
adapter on the NF4 base, on the run's validation samples; and the gate that keeps a broken artifact from shipping."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from qtune.config.recipe import DataSection
from qtune.config.runs import TrainedRun
from qtune.core.fs import remove
from qtune.core.log import get_logger
from qtune.data import kind_of
from qtune.evaluation import metrics
from qtune.export.formats import FORMATS, FOUR_BIT_FLOOR, REJECTED_SUFFIX
from qtune.export.formats.merged import merged_config
from qtune.modeling.config import load_config
from qtune.modeling.load import load_adapter_model
from qtune.modeling.precision import artifact_dtype, resolve_compute_dtype

log = get_logger(__name__)


def fidelity_samples(
    trained: TrainedRun, eval_data: str | None, eval_format: str | None, limit: int | None, max_tokens: int | None = 256
):
    """The run's validation samples (or --eval-data), tokenized exactly as in training, as language-model rows (a
    preference run is compared on its prompts with their chosen answers)."""
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
    kind = kind_of(section.datasets[0].format)
    prepared = kind.build(section, tokenizer, seed=trained.recipe.train.seed)
    dataset = prepared.val if prepared.val is not None and not eval_data else prepared.train
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return metrics.samples_from(kind.as_lm_samples(dataset), limit, max_tokens)


def artifact_config(trained: TrainedRun):
    """The config every export of the run is built on: the merged model's, from the base's config.json."""
    model = trained.recipe.model
    return merged_config(load_config(model.name, model.revision, trust_remote_code=model.trust_remote_code))


def load_artifact(fmt: str, path: Path, *, config, on_gpu: bool):
    """Export `fmt` at `path` loaded by its format's loader, in the dtype it is measured in."""
    return FORMATS[fmt].load(path, config=config, dtype=artifact_dtype(config, on_gpu), on_gpu=on_gpu)


def artifact_size(path: Path) -> int:
    """Bytes of a file, or of every file in a folder."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fidelity_report(trained: TrainedRun, written: dict[str, Path], samples, *, merge_base: str) -> dict:
    """Each written artifact reloaded the way its users load it and compared with the adapter-on-NF4 model it came
    from. An artifact that does not load is a row with the error, not a traceback: the gate then keeps it aside."""
    on_gpu = torch.cuda.is_available()
    compute_dtype = resolve_compute_dtype(trained.recipe.quant.compute_dtype) if on_gpu else torch.float32
    reference_model = load_adapter_model(trained, compute_dtype)
    reference = metrics.sample_logits(reference_model, samples)
    del reference_model
    config = artifact_config(trained)
    rows = {}
    for fmt, path in written.items():
        if FORMATS[fmt].load is None:
            continue
        try:
            model = load_artifact(fmt, path, config=config, on_gpu=on_gpu)
            row = metrics.compare(reference, metrics.sample_logits(model, samples), samples)
            del model
        except Exception as error:  # a file its own loader cannot read is a failed export, said in one line
            row = metrics.unloadable(f"{type(error).__name__}: {' '.join(str(error).split())[:300]}")
        row["size_bytes"] = artifact_size(path)
        row["path"] = str(path)
        rows[fmt] = row
    reference_ppl = metrics.perplexity(reference, samples)
    log.info(f"fidelity against the adapter on the NF4 base ({len(samples)} samples, merge base: {merge_base}):")
    log.info(metrics.format_table(rows, reference_ppl))
    return {
        "reference": {"perplexity": reference_ppl, "samples": len(samples)},
        "merge_base": merge_base,
        "artifacts": rows,
    }


def fidelity_gate(report: dict, written: dict[str, Path]) -> list[str]:
    """Artifacts that did not load, or whose fidelity is NaN or under their format's floor, are renamed
    `<name>.bad` (kept for a look, never shipped by `qtune push`) and marked in the report; returns what failed,
    one phrase each."""
    failed = []
    for fmt, row in report["artifacts"].items():
        floor = FORMATS[fmt].fidelity_floor
        if report.get("merge_base") == "original":
            # merged into the original weights, every artifact differs from the trained model by the NF4 rounding
            # the adapter was trained on: a 4-bit difference
            floor = min(floor, FOUR_BIT_FLOOR)
        figures = (row["perplexity"], row["mean_kl"], row["top1_agreement"])
        path = written[fmt]
        aside = path.with_name(path.name + REJECTED_SUFFIX)
        remove(aside)  # an earlier export's rejected copy of this format is stale either way
        if all(math.isfinite(x) for x in figures) and row["top1_agreement"] >= floor:
            continue
        os.replace(path, aside)
        row.update(rejected=True, floor=floor, path=str(aside))
        if "load_error" in row:
            failed.append(f"{fmt} did not load back ({row['load_error']}): kept aside as {aside.name}")
        else:
            failed.append(
                f"{fmt} top-1 {100 * row['top1_agreement']:.1f}% (floor {100 * floor:.0f}%), perplexity "
                f"{row['perplexity']:.3g}: kept aside as {aside.name}"
            )
    return failed
