"""The export formats, one entry each: THE registry. Everything else reads it: the recipe's and the command line's
choices, the names in the export folder, the free-disk estimate, the fidelity gate's floors, the loaders `qtune export`
and `qtune eval` measure with, what `qtune push` uploads, which models can have a format, and the docs.

Adding a format is one entry in FORMATS and its writer (a module beside this one). This module is imported whenever a
recipe is read, so it imports nothing heavy: a writer module imports torch and transformers inside its functions, or
(as the GGUF modules, which need numpy) the entry's write and load import it when called. tests/test_formats.py checks
every entry; tests/test_layout.py that reading a recipe imports no torch or numpy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtune.core.folders import EXPORT_REPORT, LOCK, MARKER
from qtune.export.formats import adapter, merged, nf4
from qtune.export.formats.gguf.support import gguf_problem
from qtune.export.formats.gptq import gptq_problem, gptq_settings_problem

if TYPE_CHECKING:
    from qtune.config.runs import TrainedRun

MODELFILE_SUFFIX = ".Modelfile"  # Ollama's recipe beside each GGUF file
MERGE_WORK = ".merged-fp16-work"  # the fp16 merge the NF4 and GGUF writers start from, when it is not exported
REJECTED_SUFFIX = ".bad"  # an artifact that failed the fidelity gate, kept aside
# An artifact that re-quantizes to 4 bits what the adapter was trained on in 4 bits rounds twice: the lowest top-1
# agreement a working one gives (bench/README.md, "Export of the demo run"), far above a broken one's
FOUR_BIT_FLOOR = 0.70


@dataclass
class ExportJob:
    """What the writers of one `qtune export` share: the run, the export folder, the merge base, and the fp16 merge
    that NF4 and GGUF are written from (written once, on first need)."""

    trained: TrainedRun
    out: Path
    merge_base: str
    parameters: int = 0  # the base's parameter count (qtune.planning.memory), for the writers' memory checks
    fp16_merge: Path | None = None
    work_dir: Path | None = None  # the fp16 merge when it is only a step: removed when the export ends

    def merged_fp16(self) -> Path:
        """The fp16 merge: the merged_fp16 artifact when it was written before, else a work folder, written now."""
        if self.fp16_merge is None:
            self.work_dir = merged.write_merged(
                self.trained,
                self.out / MERGE_WORK,
                "float16",
                self.merge_base,
                label="fp16 merge (the step the 4-bit and GGUF files start from; not kept)",
            )
            self.fp16_merge = self.work_dir
        return self.fp16_merge


def supports_every_model(config: dict) -> str | None:
    """No model is refused: the format holds whatever the base holds."""
    return None


def has_no_settings(config: dict, export) -> str | None:
    """Nothing in the export section changes this format."""
    return None


@dataclass(frozen=True)
class ExportFormat:
    """One export format. Every field is required: a new format says each of them."""

    name: str  # the recipe's and the command line's name
    artifact: str  # its file or folder name in the export folder
    summary: str  # what you get (the docs)
    load_with: str  # how its users load it (docs)
    bytes_per_parameter: float  # disk per parameter of the base, for the free-disk check before writing
    from_fp16_merge: bool  # written from the fp16 merge (counted in the disk estimate when not itself exported)
    fidelity_floor: float | None  # lowest top-1 agreement with the trained model; None: not measured (the adapter)
    push_target: str  # the `qtune push --what` that uploads it
    problem: Callable[[dict], str | None]  # why a model (its config.json) cannot have this format, or None
    settings_problem: Callable[[dict, Any], str | None]  # why the recipe's export section cannot write it, or None
    write: Callable[[ExportJob, Path], None]  # writes the artifact at the path (staged: whole or not at all)
    load: Callable | None  # (path, *, config, dtype, on_gpu) -> the model as its users load it; None: not loaded


def write_gguf(quant: str) -> Callable[[ExportJob, Path], None]:
    """The writer of GGUF quantization `quant`: the file and its Modelfile. (The GGUF modules import numpy: imported
    when an export writes one, so that reading a recipe stays fast.)"""

    def write(job: ExportJob, target: Path) -> None:
        from qtune.export.formats.gguf.writer import write_gguf_artifact

        write_gguf_artifact(job, target, quant, MODELFILE_SUFFIX)

    return write


def load_gguf(path: Path, **how):
    """A GGUF file as transformers reads it, into the merged model's architecture (gguf/writer.py: load_gguf)."""
    from qtune.export.formats.gguf.writer import load_gguf as load

    return load(path, **how)


def write_gptq(bits: int) -> Callable[[ExportJob, Path], None]:
    """The writer of GPTQ at `bits` (torch and compressed-tensors imported when it runs)."""

    def write(job: ExportJob, target: Path) -> None:
        from qtune.export.formats.gptq.writer import write_gptq as write_at

        write_at(job, target, bits)

    return write


def load_gptq(path: Path, **how):
    """A GPTQ export as transformers loads it (gptq/writer.py: load_gptq)."""
    from qtune.export.formats.gptq.writer import load_gptq as load

    return load(path, **how)


def gptq_format(bits: int, *, bytes_per_parameter: float, fidelity_floor: float) -> ExportFormat:
    """A GPTQ format: a folder of `bits`-bit integer weights in compressed-tensors' pack-quantized layout."""
    return ExportFormat(
        name=f"gptq_int{bits}",
        artifact=f"gptq-int{bits}",
        summary=f"the merged weights rounded to {bits}-bit integers per group with GPTQ, calibrated on the run's "
        "training samples (compressed-tensors pack-quantized)",
        load_with="vLLM / SGLang (Marlin kernels), `AutoModelForCausalLM.from_pretrained(dir)` (no extra arguments)",
        bytes_per_parameter=bytes_per_parameter,
        from_fp16_merge=True,
        fidelity_floor=fidelity_floor,
        push_target="gptq",
        problem=gptq_problem,
        settings_problem=gptq_settings_problem,
        write=write_gptq(bits),
        load=load_gptq,
    )


def gguf_format(name: str, quant: str, *, bytes_per_parameter: float, fidelity_floor: float) -> ExportFormat:
    """A GGUF format: one file of llama.cpp quantization `quant`, with an Ollama Modelfile beside it."""
    return ExportFormat(
        name=name,
        artifact=f"model-{quant.lower()}.gguf",
        summary=f"one GGUF file ({quant}) and an Ollama Modelfile beside it",
        load_with=f"llama.cpp, `ollama create NAME -f model-{quant.lower()}.gguf{MODELFILE_SUFFIX}`",
        bytes_per_parameter=bytes_per_parameter,
        from_fp16_merge=True,
        fidelity_floor=fidelity_floor,
        push_target="gguf",
        problem=gguf_problem,
        settings_problem=has_no_settings,
        write=write_gguf(quant),
        load=load_gguf,
    )


# In the order they are written: merged_fp16 before nf4 and GGUF, which start from it. Floors: an unquantized merge
# is the same model; 8 bits and Q6_K lose a near-tie now and then; Q5_K_M and the 4-bit formats round twice.
FORMATS: dict[str, ExportFormat] = {
    entry.name: entry
    for entry in (
        ExportFormat(
            name="adapter",
            artifact="adapter",
            summary="a copy of the LoRA adapter",
            load_with="`PeftModel.from_pretrained(base, dir)`",
            bytes_per_parameter=0.0,  # a few MB whatever the base
            from_fp16_merge=False,
            fidelity_floor=None,
            push_target="adapter",
            problem=supports_every_model,
            settings_problem=has_no_settings,
            write=adapter.write_adapter,
            load=None,
        ),
        ExportFormat(
            name="merged_fp16",
            artifact="merged-fp16",
            summary="full weights merged in fp16, sharded safetensors + index",
            load_with="`AutoModelForCausalLM.from_pretrained(dir)`, vLLM",
            bytes_per_parameter=2.0,
            from_fp16_merge=False,
            fidelity_floor=0.99,
            push_target="merged",
            problem=supports_every_model,
            settings_problem=has_no_settings,
            write=merged.write_fp16_artifact,
            load=merged.load_merged,
        ),
        ExportFormat(
            name="merged_bf16",
            artifact="merged-bf16",
            summary="full weights merged in bf16, sharded safetensors + index",
            load_with="`AutoModelForCausalLM.from_pretrained(dir)`, vLLM",
            bytes_per_parameter=2.0,
            from_fp16_merge=False,
            fidelity_floor=0.97,
            push_target="merged",
            problem=supports_every_model,
            settings_problem=has_no_settings,
            write=lambda job, target: merged.write_merged(job.trained, target, "bfloat16", job.merge_base),
            load=merged.load_merged,
        ),
        ExportFormat(
            name="nf4",
            artifact="nf4",
            summary="the merged weights re-quantized to NF4 with double quantization",
            load_with="`AutoModelForCausalLM.from_pretrained(dir)` (no extra arguments)",
            bytes_per_parameter=0.6,
            from_fp16_merge=True,
            fidelity_floor=FOUR_BIT_FLOOR,
            push_target="nf4",
            problem=supports_every_model,
            settings_problem=has_no_settings,
            write=nf4.write_nf4_artifact,
            load=nf4.load_nf4,
        ),
        gptq_format(8, bytes_per_parameter=1.07, fidelity_floor=0.97),
        gptq_format(4, bytes_per_parameter=0.6, fidelity_floor=FOUR_BIT_FLOOR),
        gguf_format("gguf_f16", "F16", bytes_per_parameter=2.0, fidelity_floor=0.99),
        gguf_format("gguf_q8_0", "Q8_0", bytes_per_parameter=1.07, fidelity_floor=0.97),
        gguf_format("gguf_q6_k", "Q6_K", bytes_per_parameter=0.83, fidelity_floor=0.97),
        gguf_format("gguf_q5_k_m", "Q5_K_M", bytes_per_parameter=0.72, fidelity_floor=FOUR_BIT_FLOOR),
        gguf_format("gguf_q4_k_m", "Q4_K_M", bytes_per_parameter=0.62, fidelity_floor=FOUR_BIT_FLOOR),
        gguf_format("gguf_q4_0", "Q4_0", bytes_per_parameter=0.57, fidelity_floor=FOUR_BIT_FLOOR),
    )
}
FORMAT_NAMES: tuple[str, ...] = tuple(FORMATS)
PUSH_TARGETS: tuple[str, ...] = tuple(dict.fromkeys(entry.push_target for entry in FORMATS.values()))

# Everything qtune writes into an export folder: the artifacts, their Modelfiles and rejected copies, the report.
EXPORT_FOLDER_ENTRIES = frozenset(
    {
        MARKER,
        LOCK,
        EXPORT_REPORT,
        MERGE_WORK,
        *(entry.artifact for entry in FORMATS.values()),
        *(entry.artifact + MODELFILE_SUFFIX for entry in FORMATS.values() if entry.push_target == "gguf"),
        *(entry.artifact + REJECTED_SUFFIX for entry in FORMATS.values()),
    }
)


def formats_problem(names, config: dict, export=None) -> str | None:
    """Why some of the formats `names` cannot be written for a model with this config.json (no weights read), or
    with the recipe's `export` section (when given), or None. Said before training, not after."""
    refused = {name: FORMATS[name].problem(config) for name in names if name in FORMATS}
    refused = {name: why for name, why in refused.items() if why}
    if not refused and export is not None:
        settings = (FORMATS[name].settings_problem(config, export) for name in names if name in FORMATS)
        return next((why for why in settings if why), None)
    if not refused:
        return None
    working = [name for name, entry in FORMATS.items() if not entry.problem(config)]
    return f"{next(iter(refused.values()))}, so not {', '.join(refused)}; for this model: {', '.join(working)}"


def format_of_artifact(path: Path) -> ExportFormat:
    """The export format a file or folder holds: by its name in an export folder, else by its kind (a .gguf file,
    else a model folder that transformers loads: merged or NF4 alike)."""
    loadable = [entry for entry in FORMATS.values() if entry.load is not None]
    named = next((entry for entry in loadable if entry.artifact == path.name), None)
    if named is not None:
        return named
    return next(entry for entry in loadable if entry.artifact.endswith(".gguf") == (path.suffix == ".gguf"))
