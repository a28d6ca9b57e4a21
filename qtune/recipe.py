"""The recipe: one pydantic schema, the only place for defaults and validation.

Loading a recipe must stay cheap (`qtune validate` runs in well under 2 s), so this
module imports neither torch nor any Hugging Face library.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError, model_validator

from qtune.errors import RecipeError
from qtune.gguf_support import gguf_problem
from qtune.recipe_sections import (  # noqa: F401  (re-exported: qtune.recipe is where the schema is imported from)
    COMMIT_HASH,
    DATA_FORMATS,
    DPO_LOSS_TYPES,
    EXPORT_FORMATS,
    MERGE_BASES,
    OPTIMIZERS,
    PUSH_TARGETS,
    SFT_FORMATS,
    TRAIN_METHODS,
    DataSection,
    DatasetSpec,
    DpoSection,
    ExportSection,
    HubSection,
    LogSection,
    LoraSection,
    ModelSection,
    OrpoSection,
    QuantSection,
    Section,
    TrainSection,
)


def export_formats_problem(formats, config: dict) -> str | None:
    """Why some of `formats` cannot be written for a model with this config.json (no weights read), or None."""
    gguf = [f for f in formats if f.startswith("gguf_")]
    problem = gguf_problem(config) if gguf else None
    if problem:
        working = [f for f in EXPORT_FORMATS if not f.startswith("gguf_")]
        return f"{problem}, so not {', '.join(gguf)}; for this model: {', '.join(working)}"
    return None


def check_local_model(recipe: Recipe) -> None:
    """What a local model's config.json already says against the recipe (no torch, no download): exports its
    architecture cannot have. A Hub model is checked at the start of `qtune train`, before the model loads."""
    config = Path(recipe.model.name).expanduser() / "config.json"
    if config.is_file():
        problem = export_formats_problem(recipe.export.formats, json.loads(config.read_text()))
        if problem:
            raise RecipeError(problem, where=str(config), fix="change export.formats")


class Recipe(Section):
    """A whole fine-tuning job. Each stage reads only its own section."""

    model: ModelSection
    quant: QuantSection = QuantSection()
    lora: LoraSection = LoraSection()
    data: DataSection
    train: TrainSection
    dpo: DpoSection = DpoSection()
    orpo: OrpoSection = OrpoSection()
    log: LogSection = LogSection()
    export: ExportSection = ExportSection()
    hub: HubSection = HubSection()

    @model_validator(mode="after")
    def _checkpoint_push_needs_a_repo(self) -> Recipe:
        if self.hub.push_checkpoints and not self.hub.repo_id:
            raise ValueError("hub.push_checkpoints needs hub.repo_id")
        return self

    @model_validator(mode="after")
    def _data_fits_the_method(self) -> Recipe:
        method = self.train.method
        for section in ("dpo", "orpo"):
            # a saved recipe.yaml carries every section, so only settings that differ from the defaults count
            given = getattr(self, section)
            if method != section and given != type(given)():
                raise ValueError(
                    f"the {section} section is set but train.method is {method}: set train.method: {section}"
                )
        specs = self.data.datasets + self.data.val_datasets
        formats = {spec.format for spec in specs}
        if method == "sft" and "preference" in formats:
            raise ValueError("preference data needs train.method: dpo or orpo (sft trains on one answer per prompt)")
        if method != "sft" and formats != {"preference"}:
            others = sorted(formats - {"preference"})
            raise ValueError(
                f"train.method {method} trains on preference pairs, and data has format {', '.join(others)}: "
                "give every dataset format: preference (prompt, chosen, rejected)"
            )
        if method != "sft" and self.data.train_on_inputs:
            raise ValueError(f"train.method {method} never trains on prompts: remove data.train_on_inputs")
        return self

    @property
    def preference(self) -> bool:
        return self.train.method != "sft"


# --------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe, apply `section.key=value` overrides, validate."""
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}", fix="check the path") from None
    except IsADirectoryError:
        raise RecipeError(f"recipe path is a folder: {path}", fix="give the .yaml file") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe is not UTF-8 text (byte {e.start})", where=where, fix="save it as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{where}, line {mark.line + 1}" if mark is not None else where
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"recipe is not valid YAML: {problem}", where=at, fix="fix the YAML syntax") from None
    if raw is None:
        raise RecipeError("recipe is empty", where=where, fix="see recipes/demo.yaml for a complete example")
    if not isinstance(raw, dict):
        raise RecipeError(
            f"recipe must be a mapping of sections, got a {type(raw).__name__}",
            where=where,
            fix="start with 'model:', 'data:', 'train:' sections",
        )
    for override in overrides:
        apply_override(raw, override)
    return validate_recipe(raw, where=where)


def validate_recipe(raw: dict, *, where: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        errors = e.errors()
        what, fix = describe_validation_error(errors[0])
        # a value checked against each type of a union fails once per type: one problem
        places = {tuple(plain_location(error["loc"])) for error in errors}
        if len(places) > 1:
            what += f" (and {len(places) - 1} more problem{'s' if len(places) > 2 else ''})"
        raise RecipeError(what, where=where, fix=fix) from None


def apply_override(raw: dict, override: str) -> None:
    """`train.lr=1e-4` -> raw["train"]["lr"] = 1e-4 (value parsed as YAML)."""
    key, sep, value_text = override.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"bad --set '{override}'", fix="write --set section.key=value, e.g. --set train.lr=1e-4")
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError:
        value = value_text
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part) if isinstance(node, dict) else None
        if child is None:
            child = {}
            node[part] = child
        if not isinstance(child, dict):
            raise RecipeError(
                f"--set {key}: '{'.'.join(parts[: depth + 1])}' is not a section", fix="check the key path"
            )
        node = child
    node[parts[-1]] = value


def describe_validation_error(error: dict) -> tuple[str, str | None]:
    """(what, how to fix) for one pydantic error."""
    loc = plain_location(error["loc"])
    dotted = ".".join(loc) or "recipe"
    kind = error["type"]
    if kind == "extra_forbidden":
        known = known_keys(loc[:-1])
        guess = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
        noun = "key" if len(loc) > 1 else "section"
        fix = f"did you mean '{'.'.join(loc[:-1] + guess)}'?" if guess else f"known keys here: {', '.join(known)}"
        return f"unknown {noun} '{dotted}'", fix
    if kind == "missing":
        return f"missing required key '{dotted}'", None
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        choices = re.findall(r"'([^']*)'", expected)
        given = error.get("input")
        guess = difflib.get_close_matches(given, choices, n=1, cutoff=0.5) if choices and isinstance(given, str) else []
        return f"'{dotted}' is {given!r}, must be one of {expected}", (f"did you mean '{guess[0]}'?" if guess else None)
    if kind == "value_error":
        message = error["msg"].removeprefix("Value error, ")
        return (f"'{dotted}': {message}" if loc else message), None
    given = error.get("input")
    shown = "a mapping" if isinstance(given, dict) else repr(given)
    return f"'{dotted}' is {shown}: {error['msg'][0].lower() + error['msg'][1:]}", None


def plain_location(loc) -> list[str]:
    """The recipe keys of an error's location, without pydantic's union branch tags ("literal['a','b']", "list[...]")
    and the list index inside such a branch."""
    parts = [str(part) for part in loc]
    if any("[" in part for part in parts):
        cut = next(i for i, part in enumerate(parts) if "[" in part)
        return parts[:cut]
    return parts


def known_keys(section_loc: list[str]) -> list[str]:
    """Field names of the schema section at `section_loc` (list indices skipped)."""
    model: type[BaseModel] = Recipe
    for part in section_loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        inner = _section_type(field.annotation)
        if inner is None:
            return []
        model = inner
    return list(model.model_fields)


def _section_type(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def recipe_to_yaml(recipe: Recipe) -> str:
    unused = {"dpo", "orpo"} - {recipe.train.method}  # the other methods' settings: noise in a saved recipe
    return yaml.safe_dump(recipe.model_dump(mode="json", exclude=unused), sort_keys=False)
