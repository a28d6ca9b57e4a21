"""A recipe end to end: train, then the exports it lists, then the Hub push it asks for, all under the run folder's
lock (another `qtune train --overwrite` cannot remove the run while it is being exported or pushed)."""

from __future__ import annotations

from pathlib import Path

from qtune.config.recipe import Recipe
from qtune.export.run import export
from qtune.publish import hub
from qtune.training.run import train


def run(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, force: bool = False) -> dict:
    """What `qtune train RECIPE` does; returns the run's metrics (with the export report when it exported)."""

    def export_and_push(run_dir: Path, metrics: dict) -> None:
        if recipe.export.formats:
            metrics["export"] = export(
                run_dir,
                list(recipe.export.formats),
                merge_base=recipe.export.merge_base,
                eval_samples=recipe.export.eval_samples,
            )
        if recipe.hub.repo_id:
            hub.push(run_dir, recipe.hub.repo_id, list(recipe.hub.push), private=recipe.hub.private)

    return train(recipe, resume=resume, overwrite=overwrite, force=force, then=export_and_push)
