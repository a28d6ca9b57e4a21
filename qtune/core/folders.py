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

from qtune.core.errors import EXIT_INTEGRITY, EnvironmentProblem, QtuneError, RecipeError
from qtune.core.fs import remove

MARKER = ".qtune"
LOCK = ".qtune.lock"
# Where `--overwrite` moves the previous run's entries until the new run starts, so that a failed start restores them
PREVIOUS = ".qtune-previous"

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
COMPLETIONS = "completions.jsonl"  # GRPO: a few sampled completions with their rewards, every grpo.completions_every
SAMPLE_TRACE = "sample_trace"

# Everything qtune writes into a run folder (wandb and tensorboard are told to write there too).
RUN_ENTRIES = frozenset(
    {
        MARKER,
        LOCK,
        PREVIOUS,
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
        COMPLETIONS,
        REPORT_PAGE,
        SAMPLE_TRACE,
        "tensorboard",
        "wandb",
    }
)
# Temporary names of the same entries while they are being written (`.adapter.tmp`, `.metrics.json.tmp`, ...).
STAGING = re.compile(r"\.(?P<name>.+)\.(tmp|old|partial)")


def wrote_by_qtune(name: str, entries: frozenset[str]) -> bool:
    """Whether an entry of a folder is one of `entries` or the staged / old copy of one."""
    staged = STAGING.fullmatch(name)
    return name in entries or (staged is not None and staged["name"] in entries)


def is_marked(folder: Path, kind: str) -> bool:
    """Whether `folder` holds qtune's marker for a folder of this kind ("run" or "export"), itself or in the run it
    set aside for an --overwrite that was killed before it started."""
    for marker in (folder / MARKER, folder / PREVIOUS / MARKER):
        try:
            if json.loads(marker.read_text()).get("kind") == kind:
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def is_run(folder: Path) -> bool:
    """Whether `folder` is a run folder qtune made."""
    return is_marked(folder, "run")


def foreign_entries(folder: Path, entries: frozenset[str]) -> list[str]:
    """The names in `folder` that qtune did not write there, sorted."""
    return sorted(p.name for p in folder.iterdir() if not wrote_by_qtune(p.name, entries))


def installed_version() -> str:
    """qtune's installed version, or "source" when it runs from a source tree that pip did not install."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qtune")
    except PackageNotFoundError:  # run from a source tree on PYTHONPATH, not pip-installed (bench/gpu_check.py does)
        return "source"


def write_marker(folder: Path, kind: str) -> None:
    """Marks `folder` as qtune's own folder of this kind."""
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
    """The refusal for a folder another qtune process holds the lock of."""
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
        """Takes the lock, or refuses with the holder's process id; returns self."""
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
        """Drops the lock (closing the file drops the flock)."""
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays, empty of meaning
            self.fd = None


class Claim:
    """A folder this process holds the lock of. `abandon()` undoes the claim of a run that never started;
    `started()` says it did, which makes an `--overwrite`'s replacement of the previous run final."""

    def __init__(self, folder: Path, *, created: bool, was_empty: bool, replaced: bool = False):
        self.folder, self.created, self.was_empty, self.replaced = folder, created, was_empty, replaced

    def started(self) -> None:
        """The new run has started: the previous run's entries that `--overwrite` set aside are deleted."""
        if self.replaced:
            remove(self.folder / PREVIOUS)
            self.replaced = False

    def abandon(self) -> None:
        """Undoes the claim of a run that never started: a created folder removed, a user's empty one emptied, and a
        previous run that `--overwrite` set aside put back as it was."""
        if self.created:
            shutil.rmtree(self.folder, ignore_errors=True)
        elif self.replaced:
            put_back(self.folder)
            self.replaced = False
        elif self.was_empty:  # the user's empty folder: leave it empty, as it was
            for entry in self.folder.iterdir():
                remove(entry)


@contextmanager
def claimed(folder: Path, *, kind: str, entries: frozenset[str], overwrite: bool, keep: bool, what: str, option: str):
    """Create or take over `folder` for writing and hold its lock for the block; yields a `Claim`.

    keep=True: an existing marked folder is written into as it is (resume; exports beside earlier ones).
    overwrite=True: qtune's own entries in a marked folder are set aside (renamed into PREVIOUS, the lock file
    excepted); `Claim.started()` deletes them, `Claim.abandon()` puts them back.
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
        if (folder / PREVIOUS).is_dir():  # an --overwrite killed before its run started: the previous run comes back
            put_back(folder)
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
            set_aside(folder)
            replaced = True
        else:
            replaced = False
        was_empty = not foreign_entries(folder, frozenset({LOCK}))
        if replaced or not is_marked(folder, kind):
            write_marker(folder, kind)
        claim = Claim(folder, created=created, was_empty=was_empty, replaced=replaced)
        try:
            yield claim
        except BaseException:
            if claim.replaced:  # failed before the new run started: the previous one comes back
                claim.abandon()
            raise
        claim.started()
    finally:
        lock.release()


def set_aside(folder: Path) -> None:
    """Renames every entry of `folder` but the lock into `folder/PREVIOUS` (one rename each, no copy); what an
    earlier set-aside left there (a run killed before it started) is deleted first."""
    previous = folder / PREVIOUS
    remove(previous)
    previous.mkdir()
    for entry in folder.iterdir():
        if entry.name not in (LOCK, PREVIOUS):
            os.replace(entry, previous / entry.name)


def put_back(folder: Path) -> None:
    """Undoes `set_aside`: what was written since is deleted and the set-aside entries are renamed back."""
    previous = folder / PREVIOUS
    for entry in folder.iterdir():
        if entry.name not in (LOCK, PREVIOUS):
            remove(entry)
    for entry in previous.iterdir():
        os.replace(entry, folder / entry.name)
    previous.rmdir()


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
