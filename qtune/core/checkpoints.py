"""Checkpoints that survive kills, full disks and bit rot.

The Trainer writes a checkpoint folder file by file, straight into place; a run killed halfway leaves a
folder that looks like a checkpoint and crashes the resume. qtune counts a checkpoint as complete only when
its manifest (step, every file with its size and sha256, library versions) exists, and writes the manifest
last and atomically (temp file, fsync, rename, fsync of the folder). Resume takes the newest checkpoint
whose files still match their manifest, says which damaged ones it skipped, and deletes half-written ones.
Rotation is qtune's too, and runs only after the new checkpoint's manifest is in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from qtune.core.errors import EXIT_INTEGRITY, QtuneError
from qtune.core.fs import write_text_atomically
from qtune.core.log import get_logger
from qtune.core.testhooks import fault_point

log = get_logger(__name__)

MANIFEST = "qtune-manifest.json"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


def sha256_file(path: Path) -> str:
    """The file's sha256, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict:
    """The installed versions of qtune and the libraries a checkpoint depends on."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("qtune", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def checkpoint_files(folder: Path) -> list[Path]:
    """Every file of a checkpoint the manifest vouches for (the manifest and qtune's own markers excluded)."""
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.startswith(".qtune")
    )


def write_manifest(folder: Path, step: int) -> None:
    """Makes a checkpoint count: every file synced, then the manifest of their sizes and hashes written atomically."""
    fault_point("manifest", step)
    for path in checkpoint_files(folder):  # the data first, then the manifest that vouches for it
        with path.open("rb") as f:
            os.fsync(f.fileno())
    files = {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in checkpoint_files(folder)
    }
    write_text_atomically(
        folder / MANIFEST,
        json.dumps(
            {
                "step": step,
                "files": files,
                "versions": library_versions(),
                "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            indent=2,
        ),
    )


def damage(folder: Path) -> str | None:
    """Why this checkpoint cannot be trusted, or None when every file matches its manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest (the save never finished)"
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable manifest"
    if CHECKPOINT_NAME.fullmatch(folder.name) and manifest.get("step") != int(folder.name.split("-")[1]):
        return "manifest of another step"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if sha256_file(path) != expected["sha256"]:
            return f"{name} does not match its sha256"
    return None


def numbered(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint-N folder, oldest first."""
    found = []
    for path in checkpoints_dir.glob("checkpoint-*"):
        match = CHECKPOINT_NAME.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def newest_valid(checkpoints_dir: Path) -> Path | None:
    """The newest checkpoint whose files match its manifest. Half-written folders (no manifest) are deleted;
    damaged ones are skipped with a warning and kept for a look. Raises when checkpoints exist but none is valid."""
    candidates = numbered(checkpoints_dir)
    damaged = []
    for _, folder in reversed(candidates):
        reason = damage(folder)
        if reason is None:
            for skipped, why in damaged:
                log.info(f"warning: {skipped.name} is damaged ({why}); resuming from {folder.name} instead")
            return folder
        if not (folder / MANIFEST).exists():
            log.info(f"resume: removing the half-written {folder.name}")
            shutil.rmtree(folder, ignore_errors=True)
        else:
            damaged.append((folder, reason))
    if damaged:
        listing = "; ".join(f"{f.name}: {why}" for f, why in damaged)
        raise QtuneError(
            f"no valid checkpoint to resume from ({listing})",
            where=str(checkpoints_dir),
            fix="restore the files from a copy, or start over with --overwrite",
            code=EXIT_INTEGRITY,
        )
    return None


def rotate(checkpoints_dir: Path, keep: int) -> None:
    """Keep the `keep` newest complete checkpoints; incomplete ones never count, the newest complete one stays."""
    complete = [folder for _, folder in numbered(checkpoints_dir) if (folder / MANIFEST).is_file()]
    for folder in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(folder, ignore_errors=True)
