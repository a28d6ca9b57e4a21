"""What can be checked about a recipe before anything heavy loads: the local paths it names, the model's config.json,
the data files, and whether a Hub id can be fetched. `qtune validate` runs all of it and says what it checked and what
it skipped; `qtune train` runs the path and config checks before it claims the run folder (the data are read again
at the start of training, where they are tokenized)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from qtune.core.errors import DataError, EnvironmentProblem, RecipeError
from qtune.core.fs import names_a_local_path, no_such_path
from qtune.data import kind_of
from qtune.data.readers import read_rows
from qtune.export.formats import formats_problem
from qtune.modeling.moe.families import moe_problem

if TYPE_CHECKING:
    from qtune.config.recipe import Recipe


def check_local_paths(recipe: Recipe) -> None:
    """Refuses at once a model folder, adapter or data file that the recipe names as a path and that is not there,
    with the closest names beside it."""
    model = recipe.model
    path = Path(model.name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EnvironmentProblem(
                f"model folder has no config.json: {model.name}", fix="point model.name at a saved model"
            )
    elif path.exists():
        raise EnvironmentProblem(
            f"model.name is a file, not a model folder: {model.name}", fix="give the model's folder"
        )
    elif names_a_local_path(model.name):
        raise EnvironmentProblem(f"no such folder: {model.name}", fix=no_such_path(model.name, "model.name", "model"))
    if model.adapter and not Path(model.adapter).expanduser().exists() and names_a_local_path(model.adapter):
        raise EnvironmentProblem(f"no such folder: {model.adapter}", fix=no_such_path(model.adapter, "model.adapter"))
    for spec in recipe.data.datasets + recipe.data.val_datasets:
        if not Path(spec.path).expanduser().exists() and names_a_local_path(spec.path):
            raise DataError(
                f"dataset file not found: {spec.path}", fix=no_such_path(spec.path, "the dataset path", "file")
            )


def check_local_model(recipe: Recipe) -> str | None:
    """What a local model's config.json says against the recipe (no torch, no download): that it reads as JSON and
    that the export formats fit its architecture. Returns its model type, or None for a Hub id (checked at the start
    of `qtune train`, before the model loads)."""
    config_file = Path(recipe.model.name).expanduser() / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EnvironmentProblem(
            f"the model's config.json does not read as JSON: {str(e).splitlines()[0]}",
            where=str(config_file),
            fix="restore the model folder (save it again with save_pretrained)",
        ) from None
    if not isinstance(config, dict):
        raise EnvironmentProblem("the model's config.json is not a JSON object", where=str(config_file))
    problem = formats_problem(recipe.export.formats, config, recipe.export)
    if problem:
        raise RecipeError(problem, where=str(config_file), fix="change export.formats or export.gptq")
    experts = moe_problem(config)
    if experts:
        raise RecipeError(experts[0], where=str(config_file), fix=experts[1])
    return str(config.get("model_type", "unknown type"))


def check_adapter(recipe: Recipe) -> str | None:
    """A local model.adapter (a run folder or its adapter/ folder) holds a peft adapter: its folder, or None when the
    recipe continues no adapter or names one on the Hub."""
    if not recipe.model.adapter:
        return None
    path = Path(recipe.model.adapter).expanduser()
    if not path.exists():
        return None
    folder = path / "adapter" if (path / "adapter" / "adapter_config.json").is_file() else path
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / name).is_file():
            raise EnvironmentProblem(
                f"model.adapter has no {name}: {recipe.model.adapter}",
                fix="give a finished qtune run folder, its adapter/ folder, or a Hub adapter repo",
            )
    return str(folder)


def check_data_files(recipe: Recipe) -> tuple[list[str], list[str]]:
    """Every local dataset read and checked as training will check it, short of tokenizing (line numbers in the
    errors): (what was checked, what was skipped), one phrase each."""
    checked, skipped = [], []
    for spec in recipe.data.datasets + recipe.data.val_datasets:
        if not Path(spec.path).expanduser().exists():
            skipped.append(f"dataset {spec.path} is a Hub dataset: not downloaded")
            continue
        rows = kind_of(spec.format).check_rows(read_rows(spec), spec)
        checked.append(f"dataset {spec.path}: {len(rows)} rows in the {spec.format} format")
    return checked, skipped


def hub_model_status(name: str, revision: str, what: str) -> str:
    """What can be said about a Hub model id without fetching it: reachable, or cached, or neither."""
    from qtune.core.network import hub_unreachable, offline_by_choice
    from qtune.modeling.config import hub_file_cached

    cached = (
        "it is in the local cache" if hub_file_cached(name, "config.json", revision) else "it is NOT in the local cache"
    )
    if offline_by_choice():
        return f"{what} {name} is a Hub id and HF_HUB_OFFLINE is set: {cached}"
    unreachable = hub_unreachable()
    if unreachable is None:
        return f"{what} {name} is a Hub id: the Hub answers; its files are not fetched by validate"
    return f"{what} {name} is a Hub id and the Hub cannot be reached ({unreachable}): {cached}"


def preflight(recipe: Recipe) -> tuple[list[str], list[str]]:
    """Everything `qtune validate` checks beyond the recipe's own keys; raises on the first problem, else returns
    (what was checked, what was skipped and why), one phrase each."""
    check_local_paths(recipe)
    checked, skipped = [], []
    model_type = check_local_model(recipe)
    if model_type is None:
        skipped.append(hub_model_status(recipe.model.name, recipe.model.revision, "model"))
    else:
        checked.append(f"model folder {recipe.model.name} (config.json: {model_type})")
    adapter = check_adapter(recipe)
    if adapter:
        checked.append(f"adapter {adapter}")
    elif recipe.model.adapter:
        skipped.append(f"adapter {recipe.model.adapter} is a Hub id: not fetched")
    data_checked, data_skipped = check_data_files(recipe)
    return checked + data_checked, skipped + data_skipped
