"""Writing files so that a crash, a kill or a full disk never leaves half of one: one implementation of each.

- `write_text_atomically` / `write_json_atomically`: readers see the old file or the whole new one, also after a
  power cut (temp file, fsync, rename, fsync of the folder).
- `staging_dir_for` + `publish`: a folder is built under a hidden name and renamed into place when whole; an
  earlier one is replaced only once the new one is complete.
- `is_disk_full` / `disk_full`: ENOSPC, EDQUOT and EFBIG (`ulimit -f`), also as safetensors' Rust writer reports
  them, become one exit-4 line.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from qtune.errors import EnvironmentProblem

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
DISK_FULL_MESSAGES = ("No space left on device", "File too large", "Disk quota exceeded")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomically(path: Path, payload: dict) -> None:
    write_text_atomically(path, json.dumps(payload, indent=2))


def remove(path: Path) -> None:
    """A file, a link or a folder; a link is removed, never what it points to."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def staging_dir_for(target: Path) -> Path:
    return target.with_name(f".{target.name}.partial")


def publish(staging: Path, target: Path) -> None:
    """Rename a finished folder (or file) into place; an earlier one is replaced only once the new one is whole."""
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
    return EnvironmentProblem(f"disk full while writing {what}", where=str(folder), fix=fix)
