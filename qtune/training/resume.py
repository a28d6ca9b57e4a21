"""Resuming: which checkpoint, whether the recipe still describes the same training, and what was done before."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from qtune.config.recipe import Recipe, validate_recipe
from qtune.core import checkpoints
from qtune.core.errors import EXIT_INTEGRITY, QtuneError, RecipeError
from qtune.core.folders import CHECKPOINTS, RECIPE_FILE
from qtune.core.log import get_logger
from qtune.publish import hub

log = get_logger(__name__)

# What may change between a run and its resume without changing the trajectory: where things are written,
# how often it logs, evaluates and saves, what happens after training, and recompute (same maths).
RESUMABLE_CHANGES = (
    "train.output_dir",
    "train.save_steps",
    "train.eval_steps",
    "train.logging_steps",
    "train.keep_checkpoints",
    "train.gradient_checkpointing",
    "log.",
    "export.",
    "hub.",
)


def recipe_differences(old: Recipe, new: Recipe) -> list[str]:
    """Every setting that differs between two recipes and changes the training (key: old -> new)."""

    def flat(value, prefix=""):
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                out.update(flat(item, f"{prefix}{key}."))
            return out
        return {prefix.rstrip("."): value}

    before, after = flat(old.model_dump(mode="json")), flat(new.model_dump(mode="json"))
    changed = []
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key) and not any(
            key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE_CHANGES
        ):
            changed.append(f"{key}: {before.get(key)!r} -> {after.get(key)!r}")
    return changed


def check_resumed_recipe(recipe: Recipe, run_dir: Path, *, force: bool) -> None:
    """A resume with another lr, batch, dataset or LoRA shape is another run stitched onto this one."""
    saved = run_dir / RECIPE_FILE
    try:
        old = validate_recipe(yaml.safe_load(saved.read_text()))
    except (OSError, ValueError, yaml.YAMLError, QtuneError):
        return  # an old or hand-edited recipe.yaml: nothing reliable to compare with
    changed = recipe_differences(old, recipe)
    if changed and not force:
        raise RecipeError(
            f"the recipe changed since {saved} in what decides the training: {'; '.join(changed)}",
            fix="restore those values, or add --force to resume with the new ones anyway",
        )


def tokens_at_checkpoint(checkpoint: Path | None) -> int:
    """The input tokens the run had seen when the checkpoint was saved (0 for a fresh start)."""
    if checkpoint is None:
        return 0
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return int(state.get("num_input_tokens_seen", 0))


def checkpoint_to_resume(recipe: Recipe, run_dir: Path, *, force: bool) -> Path:
    """The newest complete checkpoint of the run (fetched from the Hub when the recipe pushes them and none is here),
    after checking that the recipe still describes the same training."""
    check_resumed_recipe(recipe, run_dir, force=force)
    checkpoint = checkpoints.newest_valid(run_dir / CHECKPOINTS)
    if checkpoint is None and recipe.hub.push_checkpoints:
        log.info(f"resume: no local checkpoint, fetching the newest from {recipe.hub.repo_id}")
        if hub.pull_newest_checkpoint(recipe.hub.repo_id, run_dir) is not None:
            checkpoint = checkpoints.newest_valid(run_dir / CHECKPOINTS)
    if checkpoint is None:
        raise QtuneError(
            f"no complete checkpoint under {run_dir / CHECKPOINTS}",
            fix="run without --resume (and with --overwrite) to start over",
            code=EXIT_INTEGRITY,
        )
    return checkpoint
