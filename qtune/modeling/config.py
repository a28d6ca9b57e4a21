"""A model's config.json, read one way for every stage: the base for training and the plan, the base checkpoint for
the merge, a merged export for the writers. Only config.json is read (for a Hub id, only that file is fetched)."""

from __future__ import annotations

from pathlib import Path

from qtune.core.errors import EnvironmentProblem, hub_failure
from qtune.core.fs import names_a_local_path


def model_source(name: str, revision: str = "main") -> tuple[str, dict]:
    """(what to pass to from_pretrained, the keyword arguments that say which revision) for a local folder or a Hub
    id; a local path that is not a model folder is refused at once."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise EnvironmentProblem(
                f"model folder has no config.json: {name}", fix="point model.name at a saved model"
            )
        return str(path), {}
    if names_a_local_path(name):
        raise EnvironmentProblem(f"model folder not found: {name}", fix="check model.name (a local folder or a Hub id)")
    return name, {"revision": revision}


def load_config(name: str | Path, revision: str = "main", *, trust_remote_code: bool = False):
    """The transformers config of a local model folder (or of a config.json file's folder), or of a Hub model."""
    from transformers import AutoConfig

    name = str(name)
    path = Path(name).expanduser()
    if path.suffix == ".json" and path.is_file():
        name = str(path.parent)
    source, kwargs = model_source(name, revision)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise hub_failure(
            "reading config.json of",
            f"'{name}' (revision {revision})",
            e,
            fix="check the id and the network (gated models need `hf auth login`), or give a local folder",
        ) from None
