"""The folders qtune owns: a run folder and an export folder, how they are recognised, claimed and locked.

qtune deletes or replaces only what it wrote itself. A folder is qtune's when it holds qtune's marker file
(written when qtune creates the folder), never because it holds a file with a familiar name (`recipe.yaml`,
`adapter/`) that a user's own folder can have too. Even in a marked folder, `--overwrite` removes only the
entries qtune writes there and refuses when anything else is inside.

A process writing into a folder holds an exclusive `flock` on a lock file inside it for as long as it writes:
a second `qtune train` or `qtune export` into the same folder is refused with the first one's process id. The
kernel drops the lock when its holder dies, so a `kill -9` never leaves the folder stuck.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qtune.errors import EXIT_INTEGRITY, EnvironmentProblem, QtuneError, RecipeError
from qtune.fsutil import remove
from qtune.recipe import Recipe

MARKER = ".qtune"
LOCK = ".qtune.lock"

RECIPE_FILE = "recipe.yaml"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
METRICS = "metrics.json"
EVAL_BEFORE = "eval_before.json"
LOSS_PLOT = "loss.png"
EVAL_REPORT = "eval_report.json"
EXPORT = "export"
EXPORT_REPORT = "export_report.json"
HISTORY = "history.json"  # the Trainer's log history: every logged loss, learning rate and evaluation
GENERATIONS = "generations.json"  # a few validation prompts answered by the base and the fine-tuned model
REPORT_PAGE = "report.html"
SAMPLE_TRACE = "sample_trace"

# Export formats and the name each artifact gets in the export folder (one GGUF file per quantization): the one
# list of formats. Merged formats map to their torch dtype, GGUF formats to their llama.cpp quantization.
ARTIFACTS = {
    "adapter": "adapter",
    "merged_fp16": "merged-fp16",
    "merged_bf16": "merged-bf16",
    "nf4": "nf4",
    "gguf_f16": "model-f16.gguf",
    "gguf_q8_0": "model-q8_0.gguf",
    "gguf_q6_k": "model-q6_k.gguf",
    "gguf_q5_k_m": "model-q5_k_m.gguf",
    "gguf_q4_k_m": "model-q4_k_m.gguf",
    "gguf_q4_0": "model-q4_0.gguf",
}
MERGED_FORMATS = {"merged_fp16": "float16", "merged_bf16": "bfloat16"}
# GGUF formats map to the llama.cpp file type written (qtune.export.gguf_types: which tensor gets which type)
GGUF_FORMATS = {
    "gguf_f16": "F16",
    "gguf_q8_0": "Q8_0",
    "gguf_q6_k": "Q6_K",
    "gguf_q5_k_m": "Q5_K_M",
    "gguf_q4_k_m": "Q4_K_M",
    "gguf_q4_0": "Q4_0",
}
MODELFILE_SUFFIX = ".Modelfile"  # Ollama's recipe beside each GGUF file
MERGE_WORK = ".merged-fp16-work"  # the fp16 merge the GGUF and NF4 writers start from, when not kept
REJECTED_SUFFIX = ".bad"  # an artifact that failed the fidelity gate, kept aside (export/run.py)
EXPORT_ENTRIES = frozenset(
    {
        MARKER,
        LOCK,
        EXPORT_REPORT,
        MERGE_WORK,
        *ARTIFACTS.values(),
        *(name + MODELFILE_SUFFIX for name in ARTIFACTS.values() if name.endswith(".gguf")),
        *(name + REJECTED_SUFFIX for name in ARTIFACTS.values()),
    }
)

# Everything qtune writes into a run folder (wandb and tensorboard are told to write there too).
RUN_ENTRIES = frozenset(
    {
        MARKER,
        LOCK,
        RECIPE_FILE,
        CHECKPOINTS,
        ADAPTER,
        METRICS,
        EVAL_BEFORE,
        LOSS_PLOT,
        EVAL_REPORT,
        EXPORT,
        HISTORY,
        GENERATIONS,
        REPORT_PAGE,
        SAMPLE_TRACE,
        "tensorboard",
        "wandb",
    }
)
# Temporary names of the same entries while they are being written (`.adapter.tmp`, `.metrics.json.tmp`, ...).
STAGING = re.compile(r"\.(?P<name>.+)\.(tmp|old|partial)")


def wrote_by_qtune(name: str, entries: frozenset[str]) -> bool:
    staged = STAGING.fullmatch(name)
    return name in entries or (staged is not None and staged["name"] in entries)


def is_marked(folder: Path, kind: str) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()).get("kind") == kind
    except (OSError, ValueError, AttributeError):
        return False


def is_run(folder: Path) -> bool:
    return is_marked(folder, "run")


def foreign_entries(folder: Path, entries: frozenset[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not wrote_by_qtune(p.name, entries))


def installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qtune")
    except PackageNotFoundError:  # run from a source tree on PYTHONPATH, not pip-installed (bench/gpu_check.py does)
        return "source"


def write_marker(folder: Path, kind: str) -> None:
    (folder / MARKER).write_text(json.dumps({"kind": kind, "qtune": installed_version()}) + "\n")


def refuse_unowned(folder: Path, kind: str, option: str, *, files_only: bool = False) -> None:
    """A file where a folder should be, or (unless `files_only`) a non-empty folder without qtune's marker: refused,
    whatever the flags."""
    if folder.exists() and not folder.is_dir():
        raise RecipeError(f"{option} is a file: {folder}", fix="choose a folder path")
    if files_only:
        return
    if folder.is_dir() and not is_marked(folder, kind) and foreign_entries(folder, frozenset({LOCK})):
        raise RecipeError(
            f"{option} {folder} is a non-empty folder that qtune did not create; qtune never writes "
            "into or deletes such a folder, --overwrite included",
            fix=f"choose another {option} (a new or empty folder)",
        )


def in_use(folder: Path, what: str, holder: str) -> RecipeError:
    return RecipeError(
        f"{folder} is in use by {what} running as process {holder}",
        fix=f"wait for it to finish or stop it (kill {holder}), or choose another folder",
    )


def holder_of(folder: Path) -> str | None:
    """The process id holding `folder`'s lock, or None when no process holds it (nothing is locked or created)."""
    import fcntl

    path = folder / LOCK
    if not path.is_file():
        return None
    with path.open("r+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read(64).decode(errors="replace").strip() or "another process"
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return None


class FolderLock:
    """An exclusive flock on `<folder>/.qtune.lock`, with the holder's pid written in it for the refusal message."""

    def __init__(self, folder: Path, what: str):
        self.path = folder / LOCK
        self.what = what
        self.fd = None

    def acquire(self) -> FolderLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise in_use(self.path.parent, self.what, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays, empty of meaning
            self.fd = None


class Claim:
    """A folder this process holds the lock of. `abandon()` undoes the claim of a run that never started."""

    def __init__(self, folder: Path, *, created: bool, was_empty: bool):
        self.folder, self.created, self.was_empty = folder, created, was_empty

    def abandon(self) -> None:
        if self.created:
            shutil.rmtree(self.folder, ignore_errors=True)
        elif self.was_empty:  # the user's empty folder: leave it empty, as it was
            for entry in self.folder.iterdir():
                remove(entry)


@contextmanager
def claimed(folder: Path, *, kind: str, entries: frozenset[str], overwrite: bool, keep: bool, what: str, option: str):
    """Create or take over `folder` for writing and hold its lock for the block; yields a `Claim`.

    keep=True: an existing marked folder is written into as it is (resume; exports beside earlier ones).
    overwrite=True: qtune's own entries in a marked folder are deleted first (the lock file excepted).
    A non-empty folder without the marker, or a marked one holding anything qtune did not write, is refused
    whatever the flags, and nothing in it is touched.
    """
    refuse_unowned(folder, kind, option)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EnvironmentProblem(f"cannot create {option} {folder}: {e.strerror}", fix="check permissions") from None
    lock = FolderLock(folder, what).acquire()
    try:
        marked = is_marked(folder, kind)
        others = foreign_entries(folder, entries)
        if others:
            listed = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "")
            raise RecipeError(
                f"{option} {folder} holds files qtune did not write ({listed}); qtune never deletes them",
                fix=f"move them out, or choose another {option}",
            )
        if marked and not keep:
            if not overwrite:
                fix = (
                    f"add --resume to continue it, --overwrite to replace it, or choose another {option}"
                    if kind == "run"
                    else f"add --overwrite to replace it, or choose another {option}"
                )
                raise RecipeError(f"{option} {folder} holds a previous qtune {kind}", fix=fix)
            for entry in folder.iterdir():
                if entry.name != LOCK:
                    remove(entry)
        was_empty = not foreign_entries(folder, frozenset({LOCK}))
        if not is_marked(folder, kind):
            write_marker(folder, kind)
        yield Claim(folder, created=created, was_empty=was_empty)
    finally:
        lock.release()


def check_run_folder(output_dir: str | Path, *, resume: bool) -> None:
    """The refusals `claimed_run` would make, answered before anything heavy is imported (the CLI calls this first;
    `claimed_run` decides again under the lock)."""
    folder = Path(output_dir).expanduser()
    # resuming a folder that is not a run is claimed_run's "nothing to resume" (exit 5)
    refuse_unowned(folder, "run", "train.output_dir", files_only=resume)
    holder = holder_of(folder) if folder.is_dir() else None
    if holder is not None:
        raise in_use(folder, "a qtune run", holder)


@contextmanager
def claimed_run(output_dir: str | Path, *, resume: bool, overwrite: bool, hub_checkpoints: bool = False):
    """The run folder of `qtune train`, locked for the whole run; yields a `Claim`."""
    folder = Path(output_dir).expanduser()
    if resume and not is_run(folder):
        empty = not folder.exists() or (folder.is_dir() and not foreign_entries(folder, frozenset({LOCK})))
        if not (hub_checkpoints and empty):  # with checkpoints on the Hub, a fresh machine resumes into a new folder
            raise QtuneError(
                f"nothing to resume: {folder} is not a qtune run folder",
                fix="run without --resume to start a new run",
                code=EXIT_INTEGRITY,
            )
    with claimed(
        folder,
        kind="run",
        entries=RUN_ENTRIES,
        overwrite=overwrite,
        keep=resume,
        what="a qtune run",
        option="train.output_dir",
    ) as claim:
        yield claim


# --------------------------------------------------------------------------- reading a finished run


@dataclass(frozen=True)
class TrainedRun:
    run_dir: Path
    recipe: Recipe
    adapter_dir: Path

    @property
    def export_dir(self) -> Path:
        return self.run_dir / EXPORT

    def metrics(self) -> dict:
        path = self.run_dir / METRICS
        return json.loads(path.read_text()) if path.is_file() else {}

    def artifact(self, fmt: str, export_dir: Path | None = None) -> Path:
        return (export_dir or self.export_dir) / ARTIFACTS[fmt]


def open_run(run_dir: str | Path) -> TrainedRun:
    """A finished run: its recipe (validated again) and its adapter. Export, eval, chat and push start here."""
    import yaml

    from qtune.recipe import validate_recipe

    run_dir = Path(run_dir)
    recipe_file = run_dir / RECIPE_FILE
    if not recipe_file.is_file():
        raise QtuneError(
            f"not a qtune run folder: {run_dir}", fix="give the train.output_dir of a finished run", code=EXIT_INTEGRITY
        )
    recipe = validate_recipe(yaml.safe_load(recipe_file.read_text()), where=str(recipe_file))
    adapter_dir = run_dir / ADAPTER
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise QtuneError(
            f"the run has no trained adapter: {adapter_dir}",
            fix="finish (or --resume) the training first",
            code=EXIT_INTEGRITY,
        )
    return TrainedRun(run_dir, recipe, adapter_dir)
