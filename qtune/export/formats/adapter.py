"""The `adapter` format: a copy of the run's LoRA adapter (with its tokenizer) in the export folder."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from qtune.core.fs import staged

if TYPE_CHECKING:
    from qtune.export.formats import ExportJob


def write_adapter(job: ExportJob, target: Path) -> None:
    """Copies the trained adapter folder to `target`, whole or not at all."""
    with staged(target, folder=False) as staging:
        shutil.copytree(job.trained.adapter_dir, staging)
