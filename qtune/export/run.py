"""`qtune export`: every requested format written, then each reloaded and measured (qtune.evaluate).

Each artifact is written into a hidden staging folder beside its destination and renamed into place only when
complete, so a failed or interrupted export leaves nothing half-written and never damages an earlier one. The
export folder is qtune's own (marked) and held by one export at a time (qtune.run_dir).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

from qtune.errors import EXIT_ENVIRONMENT, EXIT_FIDELITY, EnvironmentProblem, QtuneError, RecipeError
from qtune.evaluate import fidelity_report, fidelity_samples
from qtune.export.gguf import ollama_modelfile, write_gguf
from qtune.export.merge import write_merged
from qtune.export.nf4 import write_nf4
from qtune.fsutil import disk_full, is_disk_full, publish, remove, staging_dir_for, write_json_atomically
from qtune.memory import inventory, load_config
from qtune.recipe import EXPORT_FORMATS, MERGE_BASES, export_formats_problem
from qtune.report_page import build_report
from qtune.run_dir import (
    ARTIFACTS,
    EXPORT_ENTRIES,
    EXPORT_REPORT,
    GGUF_FORMATS,
    MERGE_WORK,
    MODELFILE_SUFFIX,
    REJECTED_SUFFIX,
    claimed,
    open_run,
)

FORMATS = EXPORT_FORMATS
# bytes per parameter of each artifact, for the free-disk check
ARTIFACT_BYTES_PER_PARAMETER = {
    "merged_fp16": 2,
    "merged_bf16": 2,
    "nf4": 0.6,
    "gguf_f16": 2,
    "gguf_q8_0": 1.07,
    "gguf_q6_k": 0.83,
    "gguf_q5_k_m": 0.72,
    "gguf_q4_k_m": 0.62,
    "gguf_q4_0": 0.57,
}


def check_formats(formats: list[str], config: dict) -> list[str]:
    """Unknown formats and a GGUF export of an architecture the writer lacks are refused before anything is written."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        import difflib

        guess = difflib.get_close_matches(unknown[0], FORMATS, n=1)
        raise RecipeError(
            f"unknown export format '{unknown[0]}'",
            fix=f"did you mean '{guess[0]}'?" if guess else f"choose from {', '.join(FORMATS)}",
        )
    problem = export_formats_problem(formats, config)
    if problem:
        raise QtuneError(
            problem, fix="choose those formats, or convert merged_fp16 with llama.cpp", code=EXIT_ENVIRONMENT
        )
    return list(dict.fromkeys(formats))  # de-duplicated, in the order given


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


def estimate_bytes(parameters: int, formats: list[str], needs_merge: bool, keep_merged: bool) -> int:
    """Disk the export needs, from the plan's parameter inventory of the base."""
    total = sum(parameters * ARTIFACT_BYTES_PER_PARAMETER.get(f, 0) for f in formats)
    if needs_merge and not keep_merged:
        total += parameters * 2  # the working fp16 merge, removed at the end
    return int(total)


def export(
    run_dir: str | Path,
    formats: list[str],
    *,
    out_dir: str | Path | None = None,
    merge_base: str = "dequantized",
    eval_data: str | None = None,
    eval_format: str | None = None,
    eval_samples: int = 32,
    echo=print,
) -> dict:
    """Write every requested format, reload each, measure it against the adapter-on-NF4 model."""
    trained = open_run(run_dir)
    if merge_base not in MERGE_BASES:
        raise RecipeError(f"unknown merge base '{merge_base}'", fix=f"choose {' or '.join(MERGE_BASES)}")
    config = load_config(trained.recipe.model.name, trained.recipe.model.revision)
    formats = check_formats(formats, config.to_dict())
    if not formats:
        raise RecipeError("no export format given", fix=f"add --format, one of {', '.join(FORMATS)}")
    out = Path(out_dir) if out_dir else trained.export_dir
    needs_fp16 = any(f == "merged_fp16" or f == "nf4" or f in GGUF_FORMATS for f in formats)
    check_free_disk(out, estimate_bytes(inventory(config).total, formats, needs_fp16, "merged_fp16" in formats))
    samples = fidelity_samples(trained, eval_data, eval_format, eval_samples)
    # An export replaces artifacts only inside a folder qtune made for exports, and one export at a time.
    with claimed(
        out, kind="export", entries=EXPORT_ENTRIES, overwrite=False, keep=True, what="a qtune export", option="--out"
    ):
        names = {f: ARTIFACTS[f] for f in formats}
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
                written["merged_bf16"] = write_merged(
                    trained, out / names["merged_bf16"], dtype_name="bfloat16", merge_base=merge_base, echo=echo
                )
            if "nf4" in formats:
                written["nf4"] = write_nf4(fp16_dir, out / names["nf4"], trained, echo=echo)
            gguf_formats = [f for f in formats if f in GGUF_FORMATS]
            if gguf_formats:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(fp16_dir)
                trained_on_alpaca = all(d.format == "alpaca" for d in trained.recipe.data.datasets)
            for fmt in gguf_formats:
                written[fmt] = write_gguf(fp16_dir, out / names[fmt], GGUF_FORMATS[fmt], echo=echo)
                modelfile = ollama_modelfile(names[fmt], tokenizer, trained_on_alpaca=trained_on_alpaca)
                (out / (names[fmt] + MODELFILE_SUFFIX)).write_text(modelfile)
            seconds = time.perf_counter() - started
            report = fidelity_report(trained, written, samples, merge_base=merge_base, echo=echo)
        except Exception as e:
            if is_disk_full(e):  # each writer has already removed its own half-written staging folder
                raise disk_full(
                    "the export", out, fix="free disk space (finished exports are intact) and run the export again"
                ) from None
            raise
        finally:
            if work_dir is not None:
                shutil.rmtree(work_dir, ignore_errors=True)
        report.update(export_seconds=seconds, formats=formats, out_dir=str(out))
        rejected = fidelity_gate(report, written)
        write_json_atomically(out / EXPORT_REPORT, report)
    echo(f"export: report written to {out / EXPORT_REPORT}")
    if out.resolve() == trained.export_dir.resolve():  # the run's own exports: its page shows them
        echo(f"export: run page updated: {build_report(trained.run_dir)}")
    if rejected:
        raise QtuneError(
            "fidelity gate: " + "; ".join(rejected),
            where=str(out),
            fix="the other artifacts are fine; for this format try merged_bf16, another quantization, or "
            "quant.compute_dtype bf16 (models whose activations overflow fp16)",
            code=EXIT_FIDELITY,
        )
    return report


# Lowest top-1 agreement with the adapter-on-NF4 model (on positions with a clear margin) an artifact may have. An
# unquantized merge is the same model (measured 100%); 8-bit loses a near-tie now and then (99.8-100%); Q6_K about as
# often (99.5-100% raw); Q5_K_M and the 4-bit formats re-quantize what was already 4-bit (93-97% on the demo model).
# A broken artifact (Gemma's NF4 run in fp16: NaN, 22.6%) is far below these.
FIDELITY_FLOORS = {"merged_fp16": 0.99, "merged_bf16": 0.97, "gguf_f16": 0.99, "gguf_q8_0": 0.97, "gguf_q6_k": 0.97}
FOUR_BIT_FLOOR = 0.70


def fidelity_gate(report: dict, written: dict[str, Path]) -> list[str]:
    """Artifacts whose fidelity is NaN or under their floor are renamed `<name>.bad` (kept, never shipped by
    `qtune push`) and marked in the report; returns what failed, one phrase each."""
    failed = []
    for fmt, row in report["artifacts"].items():
        floor = FIDELITY_FLOORS.get(fmt, FOUR_BIT_FLOOR)
        if report.get("merge_base") == "original":
            # merged into the original weights, every artifact differs from the trained model by the NF4 rounding
            # the adapter was trained on (94% top-1 for an exact merge on the demo model): a 4-bit difference
            floor = min(floor, FOUR_BIT_FLOOR)
        figures = (row["perplexity"], row["mean_kl"], row["top1_agreement"])
        path = written[fmt]
        aside = path.with_name(path.name + REJECTED_SUFFIX)
        remove(aside)  # an earlier export's rejected copy of this format is stale either way
        if all(math.isfinite(x) for x in figures) and row["top1_agreement"] >= floor:
            continue
        os.replace(path, aside)
        row.update(rejected=True, floor=floor, path=str(aside))
        failed.append(
            f"{fmt} top-1 {100 * row['top1_agreement']:.1f}% (floor {100 * floor:.0f}%), perplexity "
            f"{row['perplexity']:.3g}: kept aside as {aside.name}"
        )
    return failed
