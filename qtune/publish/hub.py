"""Ship a run to the Hugging Face Hub: a model card from the run's own figures, then one atomic commit; and
checkpoints pushed as they are saved, fetched back to resume on a fresh machine.

Everything goes through huggingface_hub (HfApi). The token is never passed, read or written by
qtune: huggingface_hub takes it from HF_TOKEN or the `hf auth login` store itself, so it cannot end
up in a log, a recipe, a card, metrics or a tracker.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from qtune.core.errors import EXIT_ENVIRONMENT, EXIT_RECIPE, QtuneError, hub_failure
from qtune.core.folders import ADAPTER, CHECKPOINTS, EVAL_BEFORE, EXPORT, RECIPE_FILE, REPORT_PAGE
from qtune.core.log import get_logger
from qtune.export.formats import FORMATS, MODELFILE_SUFFIX, PUSH_TARGETS
from qtune.publish.model_card import model_card

log = get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoints"


def hub_api():
    """huggingface_hub's client, for the endpoint set now."""
    from huggingface_hub import HfApi

    # HF_ENDPOINT is read when huggingface_hub is imported; reading it again here lets a later setting count.
    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)


def require_token() -> None:
    """Refuses with one line when huggingface_hub finds no token (HF_TOKEN or the `hf auth login` store)."""
    from huggingface_hub import get_token

    if not get_token():
        raise QtuneError(
            "no Hugging Face token found", fix="set HF_TOKEN or run `hf auth login`", code=EXIT_ENVIRONMENT
        )


def commit_to_repo(repo_id: str, operations: list, message: str, *, private: bool, action: str) -> None:
    """Create the repo if needed and add the files in one commit; any Hub or network failure becomes one exit-4 line."""
    api = hub_api()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.create_commit(repo_id, operations=operations, commit_message=message)
    except Exception as e:  # huggingface_hub / httpx errors: all mean "the Hub said no" or "no network"
        raise hub_failure(action, repo_id, e) from None


# --------------------------------------------------------------------------- what goes up


def files_to_push(run_dir: Path, what: list[str]) -> dict[str, Path]:
    """{path in the repo: local file}. The adapter sits at the root so PeftModel.from_pretrained(repo) works; an
    exported folder goes under its own name, an exported file (GGUF) at the root with its Modelfile."""
    export_dir = run_dir / EXPORT
    chosen: dict[str, Path] = {}

    def add_folder(folder: Path, prefix: str) -> None:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                chosen[f"{prefix}{path.relative_to(folder).as_posix()}"] = path

    for target in what:
        if target == "adapter":
            add_folder(run_dir / ADAPTER, "")  # the run's own adapter, exported or not
            continue
        entries = [entry for entry in FORMATS.values() if entry.push_target == target]
        artifacts = [export_dir / entry.artifact for entry in entries if (export_dir / entry.artifact).exists()]
        if not artifacts:
            raise missing_export(target, entries[0].name)
        for artifact in artifacts:
            if artifact.is_dir():
                add_folder(artifact, f"{artifact.name}/")
            else:
                chosen[artifact.name] = artifact
                modelfile = artifact.with_name(artifact.name + MODELFILE_SUFFIX)
                if modelfile.is_file():
                    chosen[modelfile.name] = modelfile
    if (run_dir / REPORT_PAGE).is_file():  # the run's page goes with whatever is pushed
        chosen[REPORT_PAGE] = run_dir / REPORT_PAGE
    return chosen


def missing_export(item: str, fmt: str) -> QtuneError:
    """The refusal to push what the run has not exported."""
    return QtuneError(
        f"nothing to push for '{item}': the run has no such export",
        fix=f"run `qtune export RUN_DIR --format {fmt}` first",
        code=EXIT_ENVIRONMENT,
    )


def push(run_dir: str | Path, repo_id: str, what: list[str] | None = None, *, private: bool = True) -> str:
    """Creates the repo (private by default) and uploads the chosen artifacts with a model card, in one commit."""
    from huggingface_hub import CommitOperationAdd

    run_dir = Path(run_dir)
    what = list(dict.fromkeys(what or ["adapter"]))
    unknown = [w for w in what if w not in PUSH_TARGETS]
    if unknown:
        raise QtuneError(
            f"unknown --what '{unknown[0]}'", fix=f"choose from {', '.join(PUSH_TARGETS)}", code=EXIT_RECIPE
        )
    chosen = files_to_push(run_dir, what)
    card = model_card(run_dir, repo_id, what, chosen)
    require_token()
    operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f)) for p, f in chosen.items()]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    commit_to_repo(repo_id, operations, f"qtune: {', '.join(what)}", private=private, action="pushing to")
    log.info(f"push: {len(chosen)} file(s) + model card to {repo_id} ({'private' if private else 'public'})")
    return repo_id


# --------------------------------------------------------------------------- checkpoints on the Hub


def push_checkpoint(repo_id: str, checkpoint: Path, run_dir: Path, *, private: bool = True) -> None:
    """One checkpoint (and what a resume needs: the recipe, the eval before training) under checkpoints/."""
    from huggingface_hub import CommitOperationAdd

    operations = [
        CommitOperationAdd(
            path_in_repo=f"{CHECKPOINT_PREFIX}/{checkpoint.name}/{p.relative_to(checkpoint).as_posix()}",
            path_or_fileobj=str(p),
        )
        for p in sorted(checkpoint.rglob("*"))
        if p.is_file()
    ]
    for name in (RECIPE_FILE, EVAL_BEFORE):
        if (run_dir / name).is_file():
            operations.append(
                CommitOperationAdd(path_in_repo=f"{CHECKPOINT_PREFIX}/{name}", path_or_fileobj=str(run_dir / name))
            )
    commit_to_repo(repo_id, operations, f"qtune: {checkpoint.name}", private=private, action="pushing a checkpoint to")


def pull_newest_checkpoint(repo_id: str, run_dir: Path) -> Path | None:
    """Download the newest checkpoint pushed to the Hub into run_dir/checkpoints; None if there is none."""
    from huggingface_hub import snapshot_download

    api = hub_api()
    try:
        files = api.list_repo_files(repo_id)
    except Exception as e:
        raise hub_failure("reading checkpoints from", repo_id, e) from None
    steps = {int(m.group(1)) for f in files if (m := re.fullmatch(rf"{CHECKPOINT_PREFIX}/checkpoint-(\d+)/.+", f))}
    if not steps:
        return None
    newest = f"checkpoint-{max(steps)}"
    wanted = [
        f"{CHECKPOINT_PREFIX}/{newest}/*",
        f"{CHECKPOINT_PREFIX}/{RECIPE_FILE}",
        f"{CHECKPOINT_PREFIX}/{EVAL_BEFORE}",
    ]
    download = run_dir / f".{CHECKPOINTS}.partial"  # a name the run folder counts as qtune's own
    try:
        snapshot_download(
            repo_id, allow_patterns=wanted, local_dir=download, endpoint=os.environ.get("HF_ENDPOINT") or None
        )
    except Exception as e:
        shutil.rmtree(download, ignore_errors=True)
        raise hub_failure("downloading a checkpoint from", repo_id, e) from None
    fetched = download / CHECKPOINT_PREFIX
    (run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    local = run_dir / CHECKPOINTS / newest
    if local.exists():  # a damaged local copy of the same step: kept aside for a look, never deleted
        os.replace(local, local.with_name(f"{newest}.damaged-{os.getpid()}"))
    os.replace(fetched / newest, local)
    for name in (RECIPE_FILE, EVAL_BEFORE):
        if (fetched / name).is_file():
            os.replace(fetched / name, run_dir / name)
    shutil.rmtree(download, ignore_errors=True)
    return run_dir / CHECKPOINTS / newest
