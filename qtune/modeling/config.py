"""A model's config.json, read one way for every stage: the base for training and the plan, the base checkpoint for
the merge, a merged export for the writers. Only config.json is read (for a Hub id, only that file is fetched)."""

from __future__ import annotations

from pathlib import Path

from qtune.core.errors import EnvironmentProblem, hub_failure
from qtune.core.fs import names_a_local_path, no_such_path
from qtune.core.network import hub_unreachable


def model_source(name: str, revision: str = "main", *, option: str = "model.name") -> tuple[str, dict]:
    """(what to pass to from_pretrained, the keyword arguments that say which revision and whether to stay offline)
    for a local folder or a Hub id. Refused at once: a local path that is not a model folder, and a Hub id that is
    neither reachable nor in the local cache."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise EnvironmentProblem(f"model folder has no config.json: {name}", fix=f"point {option} at a saved model")
        return str(path), {}
    if names_a_local_path(name):
        raise EnvironmentProblem(f"no such folder: {name}", fix=no_such_path(name, option, "model"))
    unreachable = hub_unreachable()
    if unreachable is None:
        return name, {"revision": revision}
    if not hub_file_cached(name, "config.json", revision):
        raise EnvironmentProblem(
            f"cannot reach the Hub ({unreachable}) and '{name}' (revision {revision}) is not in the local cache",
            fix=f"check {option} (a local folder, or a Hub id) and the network",
        )
    return name, {"revision": revision, "local_files_only": True}


def hub_file_cached(repo_id: str, filename: str, revision: str = "main") -> bool:
    """Whether huggingface_hub's cache holds `filename` of that repo and revision (asks no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str)
    except ValueError:  # not a valid repo id ("a b", "x/y/z"): nothing of it can be cached
        return False


def load_config(
    name: str | Path, revision: str = "main", *, trust_remote_code: bool = False, option: str = "model.name"
):
    """The transformers config of a local model folder (or of a config.json file's folder), or of a Hub model;
    `option` is what the user wrote the name in, as errors name it."""
    from transformers import AutoConfig

    name = str(name)
    path = Path(name).expanduser()
    if path.suffix == ".json" and path.is_file():
        name = str(path.parent)
    source, kwargs = model_source(name, revision, option=option)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise hub_failure(
            "reading config.json of",
            f"'{name}' (revision {revision})",
            e,
            fix="check the id and the network (gated models need `hf auth login`), or give a local folder",
        ) from None
