"""Files and paths: writing so that a crash, a kill or a full disk never leaves half of a file, and telling a local path
from a Hub id. One implementation of each:

- `write_text_atomically` / `write_json_atomically`: readers see the old file or the whole new one, also after a
  power cut (temp file, fsync, rename, fsync of the folder).
- `staged(target)`: a file or folder is written under a hidden name and renamed into place when whole; an earlier
  one is replaced only once the new one is complete, and a failed one is removed.
- `is_disk_full` / `disk_full`: ENOSPC, EDQUOT and EFBIG (`ulimit -f`), also as safetensors' Rust writer reports
  them, become one exit-4 line.
- `names_a_local_path`: the one rule for "this can only be a path on disk, never a Hub id".
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qtune.core.errors import EnvironmentProblem

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
DISK_FULL_MESSAGES = ("No space left on device", "File too large", "Disk quota exceeded")


def fsync_dir(folder: Path) -> None:
    """Flushes a folder's entries (a rename into it) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomically(path: Path, text: str) -> None:
    """Writes `text` to `path`: a reader sees the old file or the whole new one, also after a power cut."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomically(path: Path, payload: dict) -> None:
    """`payload` as indented JSON, written as write_text_atomically writes."""
    write_text_atomically(path, json.dumps(payload, indent=2))


def remove(path: Path) -> None:
    """Removes a file, a link or a folder (a link, never what it points to); nothing there is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def staging_path(target: Path) -> Path:
    """The hidden name a file or folder is written under before it is renamed to `target`."""
    return target.with_name(f".{target.name}.partial")


@contextmanager
def staged(target: Path, *, folder: bool = True) -> Iterator[Path]:
    """Yields a hidden path beside `target` to write into (an empty folder, or with folder=False a path for one file).
    When the block ends, what was written replaces `target`; when it raises, it is removed and `target` is untouched.
    A leftover of a killed earlier attempt is removed first."""
    staging = staging_path(target)
    remove(staging)
    if folder:
        staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        remove(staging)
        raise
    publish(staging, target)


def publish(staging: Path, target: Path) -> None:
    """Renames a finished folder (or file) into place; an earlier one is replaced only once the new one is whole."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            remove(old)
        os.replace(target, old)
        os.replace(staging, target)
        remove(old)
    else:
        os.replace(staging, target)


def is_disk_full(error: BaseException) -> bool:
    """An OSError with ENOSPC / EDQUOT / EFBIG, or the same from safetensors' Rust writer, which raises its own
    exception type with the OS message inside."""
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        return True
    return any(message in str(error) for message in DISK_FULL_MESSAGES)


def disk_full(what: str, folder: Path, fix: str) -> EnvironmentProblem:
    """The one-line error for a full disk (or a file-size limit) while writing `what` into `folder`."""
    return EnvironmentProblem(f"disk full while writing {what}", where=str(folder), fix=fix)


# Files a path can end in that no Hub id does (a Hub id is "name" or "owner/name", and may hold dots: Qwen2.5-7B)
LOCAL_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".yaml", ".yml", ".safetensors", ".gguf")


def names_a_local_path(name: str) -> bool:
    """True when `name` is meant as a path on this machine, not a Hub id: it starts with ".", "/" or "~", has more
    than one "/", ends in a file suffix, or is "folder/name" where that folder exists here (`runs/tiny-llama`).
    Models, adapters and datasets are told apart by this one rule."""
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or Path(name).suffix in LOCAL_FILE_SUFFIXES
        or ("/" in name and Path(name).parent.expanduser().is_dir())
    )


def similar_paths(name: str) -> list[str]:
    """Up to three entries beside a path that does not exist, closest first, written as `name` was written
    (`runs/tiny-lama` -> `runs/tiny-llama`): what a did-you-mean offers."""
    from difflib import get_close_matches

    path = Path(name).expanduser()
    if not path.parent.is_dir():
        return []
    siblings = [p.name for p in path.parent.iterdir() if not p.name.startswith(".")]
    prefix = name[: len(name) - len(path.name)]
    return [prefix + match for match in get_close_matches(path.name, siblings, n=3, cutoff=0.6)]


def no_such_path(name: str, option: str, kind: str = "folder") -> str:
    """The fix of a "no such folder" error: the closest paths beside it, else what the option accepts."""
    close = similar_paths(name)
    if close:
        return "did you mean " + " or ".join(close) + f"? (check {option})"
    parent = Path(name).expanduser().parent
    if not parent.is_dir():
        return f"check {option}: its folder {parent} does not exist either (relative paths start at the current folder)"
    folder = "the current folder" if parent == Path(".") else str(parent)
    return f"check {option}: {folder} holds no {kind} of a similar name"
