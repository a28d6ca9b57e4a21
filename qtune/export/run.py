"""`qtune export`: every requested format written (qtune.export.formats), then each reloaded the way its users load it
and measured against the trained model, and gated (qtune.evaluation.fidelity).

Each artifact is written under a hidden name beside its destination and renamed into place only when complete, so a
failed or interrupted export leaves nothing half-written and never damages an earlier one. The export folder is
qtune's own (marked) and held by one export at a time (qtune.core.folders).
"""

from __future__ import annotations

import difflib
import shutil
import time
from pathlib import Path

from qtune.config.recipe import MERGE_BASES
from qtune.config.runs import open_run
from qtune.core.errors import EXIT_ENVIRONMENT, EXIT_FIDELITY, EnvironmentProblem, QtuneError, RecipeError
from qtune.core.folders import EXPORT_REPORT, claimed
from qtune.core.fs import disk_full, is_disk_full, remove, write_json_atomically
from qtune.core.log import get_logger
from qtune.evaluation.fidelity import fidelity_gate, fidelity_report, fidelity_samples
from qtune.export.formats import EXPORT_FOLDER_ENTRIES, FORMATS, REJECTED_SUFFIX, ExportJob, formats_problem
from qtune.modeling.config import load_config
from qtune.planning.memory import inventory
from qtune.publish.report_page import build_report

log = get_logger(__name__)


def check_formats(formats: list[str], config: dict, export_section=None) -> list[str]:
    """The formats to write, de-duplicated in the order given; an unknown one, or one the model's architecture (or
    the recipe's export section) cannot have, is refused before anything is written."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        guess = difflib.get_close_matches(unknown[0], FORMATS, n=1)
        raise RecipeError(
            f"unknown export format '{unknown[0]}'",
            fix=f"did you mean '{guess[0]}'?" if guess else f"choose from {', '.join(FORMATS)}",
        )
    problem = formats_problem(formats, config)
    if problem:
        raise QtuneError(
            problem, fix="choose those formats, or convert merged_fp16 with llama.cpp", code=EXIT_ENVIRONMENT
        )
    settings = formats_problem(formats, config, export_section) if export_section is not None else None
    if settings:
        raise RecipeError(settings, where="the run's recipe.yaml", fix="or change it for this export with --set")
    return list(dict.fromkeys(formats))


def estimate_bytes(parameters: int, formats: list[str]) -> int:
    """Disk the export needs, from the base's parameter count: each format's bytes per parameter, and the fp16 merge
    that NF4 and GGUF start from when it is not one of the formats (removed at the end)."""
    total = sum(parameters * FORMATS[f].bytes_per_parameter for f in formats)
    if any(FORMATS[f].from_fp16_merge for f in formats) and "merged_fp16" not in formats:
        total += parameters * FORMATS["merged_fp16"].bytes_per_parameter
    return int(total)


def check_free_disk(out_dir: Path, needed_bytes: int) -> None:
    """Refuses an export the free disk cannot hold (with 5% to spare), before anything is written."""
    probe = out_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes * 1.05:
        raise EnvironmentProblem(
            f"not enough free disk for the export: needs about {needed_bytes / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB free",
            where=str(probe),
            fix="free some space, choose fewer formats, or --out on a bigger disk",
        )


def read_report(path: Path) -> dict | None:
    """An earlier export_report.json, or None when there is none (or it does not read: it is replaced)."""
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def keep_earlier_rows(report: dict, earlier: dict | None, out: Path) -> list[str]:
    """Adds to `report` the rows of the earlier export into `out` whose artifact this export did not write and whose
    file is still there, each marked with when and against what it was measured; the rows of this export are marked
    as measured now. Returns the kept formats."""
    for row in report["artifacts"].values():
        row.setdefault("measured", {"at": report["exported_at"], "reference": report["reference"]})
    kept = []
    for fmt, row in (earlier or {}).get("artifacts", {}).items():
        if fmt in report["artifacts"] or fmt not in FORMATS:
            continue
        path = out / FORMATS[fmt].artifact
        if row.get("rejected"):
            path = path.with_name(path.name + REJECTED_SUFFIX)
        if not path.exists():  # deleted since: nothing to report
            continue
        measured = row.get("measured") or {"at": earlier.get("exported_at"), "reference": earlier.get("reference")}
        report["artifacts"][fmt] = {**row, "path": str(path), "measured": measured, "kept": True}
        kept.append(fmt)
    report["artifacts"] = {fmt: report["artifacts"][fmt] for fmt in FORMATS if fmt in report["artifacts"]}
    return kept


def export(
    run_dir: str | Path,
    formats: list[str],
    *,
    out_dir: str | Path | None = None,
    merge_base: str = "dequantized",
    eval_data: str | None = None,
    eval_format: str | None = None,
    eval_samples: int = 32,
    overrides: list[str] | None = None,
) -> dict:
    """Writes every requested format, reloads each, measures it against the adapter-on-NF4 model and gates it;
    returns the report also written to export_report.json. `overrides` (--set) change the export section only."""
    trained = open_run(run_dir, overrides)
    if merge_base not in MERGE_BASES:
        raise RecipeError(f"unknown merge base '{merge_base}'", fix=f"choose {' or '.join(MERGE_BASES)}")
    model = trained.recipe.model
    config = load_config(model.name, model.revision, trust_remote_code=model.trust_remote_code)
    formats = check_formats(formats, config.to_dict(), trained.recipe.export)
    if not formats:
        raise RecipeError("no export format given", fix=f"add --format, one of {', '.join(FORMATS)}")
    # written in the registry's order: merged_fp16 before the formats that start from it
    formats = [name for name in FORMATS if name in formats]
    out = Path(out_dir) if out_dir else trained.export_dir
    parameters = inventory(config).total
    check_free_disk(out, estimate_bytes(parameters, formats))
    samples = fidelity_samples(trained, eval_data, eval_format, eval_samples)
    # An export replaces artifacts only inside a folder qtune made for exports, and one export at a time.
    with claimed(
        out,
        kind="export",
        entries=EXPORT_FOLDER_ENTRIES,
        overwrite=False,
        keep=True,
        what="a qtune export",
        option="--out",
    ):
        job = ExportJob(trained, out, merge_base, parameters=parameters)
        started = time.perf_counter()
        written: dict[str, Path] = {}
        try:
            for name in formats:
                target = out / FORMATS[name].artifact
                FORMATS[name].write(job, target)
                written[name] = target
            seconds = time.perf_counter() - started
            report = fidelity_report(trained, written, samples, merge_base=merge_base)
        except Exception as e:
            if is_disk_full(e):  # each writer has already removed its own half-written file or folder
                raise disk_full(
                    "the export", out, fix="free disk space (finished exports are intact) and run the export again"
                ) from None
            raise
        finally:
            if job.work_dir is not None:
                remove(job.work_dir)
        report.update(
            export_seconds=seconds, formats=formats, out_dir=str(out), exported_at=time.strftime("%Y-%m-%d %H:%M")
        )
        rejected = fidelity_gate(report, written)
        kept = keep_earlier_rows(report, read_report(out / EXPORT_REPORT), out)
        if kept:
            log.info(f"export: kept the measurements of {', '.join(kept)} from the earlier export (files unchanged)")
        write_json_atomically(out / EXPORT_REPORT, report)
    log.info(f"export: report written to {out / EXPORT_REPORT}")
    if out.resolve() == trained.export_dir.resolve():  # the run's own exports: its page shows them
        log.info(f"export: run page updated: {build_report(trained.run_dir)}")
    if rejected:
        raise QtuneError(
            "fidelity gate: " + "; ".join(rejected),
            where=str(out),
            fix="the other artifacts are fine; for this format try merged_bf16, another quantization, or "
            "quant.compute_dtype bf16 (models whose activations overflow fp16)",
            code=EXIT_FIDELITY,
        )
    return report
