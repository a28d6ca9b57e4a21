"""A finished run as the later stages read it (`qtune export`, `eval`, `chat`, `push`, `report`): its recipe, read and
validated again from the run folder, and its trained adapter."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qtune.config.recipe import Recipe, apply_override, validate_recipe
from qtune.core.errors import EXIT_INTEGRITY, QtuneError, RecipeError
from qtune.core.folders import ADAPTER, EXPORT, METRICS, RECIPE_FILE
from qtune.export.formats import FORMATS


@dataclass(frozen=True)
class TrainedRun:
    """A run folder with a trained adapter, and the recipe it was trained with."""

    run_dir: Path
    recipe: Recipe
    adapter_dir: Path

    @property
    def export_dir(self) -> Path:
        """The run's own export folder."""
        return self.run_dir / EXPORT

    def metrics(self) -> dict:
        """metrics.json, or {} when the run has none."""
        path = self.run_dir / METRICS
        return json.loads(path.read_text()) if path.is_file() else {}

    def artifact(self, fmt: str, export_dir: Path | None = None) -> Path:
        """Where export format `fmt` is written in the run's export folder (or `export_dir`)."""
        return (export_dir or self.export_dir) / FORMATS[fmt].artifact


def open_run(run_dir: str | Path, export_overrides: list[str] | None = None) -> TrainedRun:
    """A finished run: its recipe (validated again, with --set overrides of its export section) and its adapter;
    refused with one line when it is not one. The run's recipe.yaml is never changed."""
    import yaml

    run_dir = Path(run_dir)
    recipe_file = run_dir / RECIPE_FILE
    if not recipe_file.is_file():
        raise QtuneError(
            f"not a qtune run folder: {run_dir}", fix="give the train.output_dir of a finished run", code=EXIT_INTEGRITY
        )
    raw = yaml.safe_load(recipe_file.read_text())
    for override in export_overrides or []:
        if not override.strip().startswith("export."):
            raise RecipeError(
                f"--set {override.partition('=')[0]}: only the export section can change after training",
                fix="write --set export.gptq.group_size=64 and the like",
            )
        apply_override(raw, override)
    recipe = validate_recipe(raw, where=str(recipe_file) + (" with --set" if export_overrides else ""))
    adapter_dir = run_dir / ADAPTER
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise QtuneError(
            f"the run has no trained adapter: {adapter_dir}",
            fix="finish (or --resume) the training first",
            code=EXIT_INTEGRITY,
        )
    return TrainedRun(run_dir, recipe, adapter_dir)
