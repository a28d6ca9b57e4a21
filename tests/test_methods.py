"""The training methods' registry: every method says every field, its section is a recipe section of its name, and
nothing outside qtune/training/methods branches on a method's name."""

import ast
import dataclasses
import typing
from pathlib import Path

import pytest

from qtune.config.recipe import Recipe, TrainSection, validate_recipe
from qtune.data import DATA_KINDS
from qtune.training.methods import METHODS, TrainingMethod

PACKAGE = Path(__file__).resolve().parents[1] / "qtune"


def test_every_method_says_every_field():
    """No field has a default: a method that forgets one fails here (and at import), never silently."""
    assert all(field.default is dataclasses.MISSING for field in dataclasses.fields(TrainingMethod))
    with pytest.raises(TypeError, match="missing"):
        TrainingMethod(name="kto", summary="unpaired feedback")
    for name, method in METHODS.items():
        assert method.name == name
        for field in dataclasses.fields(TrainingMethod):
            value = getattr(method, field.name)
            assert value is not None or field.name == "section", (name, field.name)
        assert method.data in DATA_KINDS
        assert all(callable(getattr(method, f)) for f in ("check_recipe", "trainer_config", "trainer_settings"))


def test_the_recipe_is_made_of_the_methods():
    methods = typing.get_args(TrainSection.model_fields["method"].annotation)
    assert methods == tuple(METHODS)
    for method in METHODS.values():
        if method.section is not None:
            assert Recipe.model_fields[method.name].annotation is method.section


# what a method needs in its section besides its defaults
REQUIRED = {"grpo": {"rewards": [{"function": "exact_match"}], "num_generations": 4}}


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_builds_its_trainer_config_from_a_recipe(name):
    method = METHODS[name]
    fmt = method.data.formats[0]
    recipe = validate_recipe(
        {
            "model": {"name": "m"},
            "data": {"datasets": [{"path": "p.jsonl", "format": fmt}]},
            "train": {"output_dir": "o", "method": name, "micro_batch_size": 4},
            **({name: REQUIRED[name]} if name in REQUIRED else {}),
        }
    )
    config_class = method.trainer_config()
    settings = method.trainer_settings(recipe)
    assert set(settings) <= {field.name for field in dataclasses.fields(config_class)}
    assert method.sequences_in_flight(recipe) >= 1
    assert isinstance(method.card_description(recipe), str)
    assert all(len(row) == 2 for row in method.result_rows({}))


def test_no_module_outside_the_methods_branches_on_a_method_s_name():
    """`if recipe.train.method == "dpo"` outside qtune/training/methods is a new method's missing field."""
    names = set(METHODS)
    found = []
    for path in PACKAGE.rglob("*.py"):
        if "training/methods" in path.as_posix():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(
                isinstance(side, ast.Constant) and side.value in names for side in [node.left, *node.comparators]
            ):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert found == []
