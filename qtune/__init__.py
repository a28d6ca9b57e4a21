"""qtune: QLoRA fine-tuning from one validated recipe.

The packages follow the data: config (the recipe) -> data and modeling -> training -> export -> evaluation and
publish, on top of core; cli turns arguments into those calls. docs/architecture.md has the map. Importing qtune
stays light (no torch) so that `qtune validate` answers at once.
"""

from __future__ import annotations

__version__ = "0.1.0"


def train(recipe, *, overrides=(), resume: bool = False, overwrite: bool = False) -> dict:
    """Fine-tune from a recipe (a path to YAML, a dict or a `Recipe`); returns the run's metrics.

    >>> import qtune
    >>> metrics = qtune.train("recipes/demo.yaml", overrides=["train.max_steps=20"])
    """
    from qtune.core.cuda_setup import use_expandable_segments

    use_expandable_segments()  # no effect if this notebook already started CUDA
    from qtune.config.recipe import Recipe, apply_override, load_recipe, validate_recipe
    from qtune.pipeline import run

    if isinstance(recipe, Recipe):
        if overrides:
            raw = recipe.model_dump()
            for override in overrides:
                apply_override(raw, override)
            recipe = validate_recipe(raw)
    elif isinstance(recipe, dict):
        raw = dict(recipe)
        for override in overrides:
            apply_override(raw, override)
        recipe = validate_recipe(raw)
    else:
        recipe = load_recipe(recipe, overrides)
    return run(recipe, resume=resume, overwrite=overwrite)
