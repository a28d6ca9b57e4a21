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
from pathlib import Path

from qtune.errors import EXIT_INTEGRITY, EnvironmentProblem, QtuneError, RecipeError

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
SAMPLE_TRACE = "sample_trace"

# Export formats and the name each artifact gets in the export folder (one GGUF file per quantization).
ARTIFACTS = {"adapter": "adapter", "merged_fp16": "merged-fp16", "merged_bf16": "merged-bf16", "nf4": "nf4",
             "gguf_f16": "model-f16.gguf", "gguf_q8_0": "model-q8_0.gguf", "gguf_q4_0": "model-q4_0.gguf"}
MODELFILE_SUFFIX = ".Modelfile"  # Ollama's recipe beside each GGUF file
MERGE_WORK = ".merged-fp16-work"  # the fp16 merge the GGUF and NF4 writers start from, when not kept
EXPORT_ENTRIES = frozenset({MARKER, LOCK, EXPORT_REPORT, MERGE_WORK, *ARTIFACTS.values(),
                            *(name + MODELFILE_SUFFIX for name in ARTIFACTS.values() if name.endswith(".gguf"))})

# Everything qtune writes into a run folder (wandb and tensorboard are told to write there too).
RUN_ENTRIES = frozenset({MARKER, LOCK, RECIPE_FILE, CHECKPOINTS, ADAPTER, METRICS, EVAL_BEFORE, LOSS_PLOT, EVAL_REPORT,
                         EXPORT, SAMPLE_TRACE, "tensorboard", "wandb"})
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


def write_marker(folder: Path, kind: str) -> None:
    from qtune import __version__

    (folder / MARKER).write_text(json.dumps({"kind": kind, "qtune": __version__}) + "\n")


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
            raise RecipeError(f"{self.path.parent} is in use by {self.what} running as process {holder}",
                              fix=f"wait for it to finish or stop it (kill {holder}), or choose another folder") from None
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
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


@contextmanager
def claimed(folder: Path, *, kind: str, entries: frozenset[str], overwrite: bool, keep: bool, what: str, option: str):
    """Create or take over `folder` for writing and hold its lock for the block; yields a `Claim`.

    keep=True: an existing marked folder is written into as it is (resume; exports beside earlier ones).
    overwrite=True: qtune's own entries in a marked folder are deleted first (the lock file excepted).
    A non-empty folder without the marker, or a marked one holding anything qtune did not write, is refused
    whatever the flags, and nothing in it is touched.
    """
    if folder.exists() and not folder.is_dir():
        raise RecipeError(f"{option} is a file: {folder}", fix="choose a folder path")
    if folder.is_dir() and not is_marked(folder, kind) and foreign_entries(folder, frozenset({LOCK})):
        raise RecipeError(f"{option} {folder} is a non-empty folder that qtune did not create; qtune never writes "
                          "into or deletes such a folder, --overwrite included",
                          fix=f"choose another {option} (a new or empty folder)")
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
            raise RecipeError(f"{option} {folder} holds files qtune did not write ({listed}); qtune never deletes them",
                              fix=f"move them out, or choose another {option}")
        if marked and not keep:
            if not overwrite:
                fix = (f"add --resume to continue it, --overwrite to replace it, or choose another {option}" if kind == "run"
                       else f"add --overwrite to replace it, or choose another {option}")
                raise RecipeError(f"{option} {folder} holds a previous qtune {kind}", fix=fix)
            for entry in folder.iterdir():
                if entry.name != LOCK:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        was_empty = not foreign_entries(folder, frozenset({LOCK}))
        if not is_marked(folder, kind):
            write_marker(folder, kind)
        yield Claim(folder, created=created, was_empty=was_empty)
    finally:
        lock.release()


@contextmanager
def claimed_run(output_dir: str | Path, *, resume: bool, overwrite: bool, hub_checkpoints: bool = False):
    """The run folder of `qtune train`, locked for the whole run; yields a `Claim`."""
    folder = Path(output_dir).expanduser()
    if resume and not is_run(folder):
        empty = not folder.exists() or (folder.is_dir() and not foreign_entries(folder, frozenset({LOCK})))
        if not (hub_checkpoints and empty):  # with checkpoints on the Hub, a fresh machine resumes into a new folder
            raise QtuneError(f"nothing to resume: {folder} is not a qtune run folder",
                             fix="run without --resume to start a new run", code=EXIT_INTEGRITY)
    with claimed(folder, kind="run", entries=RUN_ENTRIES, overwrite=overwrite, keep=resume,
                 what="a qtune run", option="train.output_dir") as claim:
        yield claim
