"""A recipe end to end: train, then the exports it lists, then the Hub push it asks for."""

from __future__ import annotations

from pathlib import Path

from qtune import distributed, hub
from qtune.export.run import export
from qtune.recipe import Recipe
from qtune.training.run import train


def run(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, force: bool = False, echo=print) -> dict:
    """What `qtune train RECIPE` does; returns the run's metrics (with the export report when it exported)."""
    metrics = train(recipe, resume=resume, overwrite=overwrite, force=force, echo=echo)
    if distributed.rank() != 0:
        return metrics
    run_dir = Path(recipe.train.output_dir).expanduser()
    if recipe.export.formats:
        metrics["export"] = export(
            run_dir,
            list(recipe.export.formats),
            merge_base=recipe.export.merge_base,
            eval_samples=recipe.export.eval_samples,
            echo=echo,
        )
    if recipe.hub.repo_id:
        hub.push(run_dir, recipe.hub.repo_id, list(recipe.hub.push), private=recipe.hub.private, echo=echo)
    return metrics
