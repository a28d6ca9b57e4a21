"""Ship a run to the Hugging Face Hub: a model card from the run's own figures, then one atomic commit.

Everything goes through huggingface_hub (HfApi). The token is never passed, read or written by
qtune: huggingface_hub takes it from HF_TOKEN or the `hf auth login` store itself, so it cannot end
up in a log, a recipe, a card, metrics or a tracker.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from qtune.errors import EXIT_ENVIRONMENT, QtuneError

WHAT = ("adapter", "merged", "nf4", "gguf")
CHECKPOINT_PREFIX = "checkpoints"


def hub_api():
    from huggingface_hub import HfApi

    # HF_ENDPOINT is read when huggingface_hub is imported; reading it again here lets a later setting count.
    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)


def require_token() -> None:
    from huggingface_hub import get_token

    if not get_token():
        raise QtuneError("no Hugging Face token found", fix="set HF_TOKEN or run `hf auth login`", code=EXIT_ENVIRONMENT)


def hub_failure(action: str, repo_id: str, error: Exception) -> QtuneError:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        what, fix = f"the token may not write to {repo_id} (HTTP {status})", "use a token with write access to that repo"
    elif status is not None:
        what, fix = f"the Hub answered HTTP {status}", "try again later"
    else:
        what, fix = f"cannot reach the Hub ({type(error).__name__})", "check the network; local files are untouched"
    return QtuneError(f"{action} {repo_id} failed: {what}", fix=fix, code=EXIT_ENVIRONMENT)


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
    """{path in the repo: local file}. The adapter sits at the root so PeftModel.from_pretrained(repo) works."""
    export_dir = run_dir / "export"
    chosen: dict[str, Path] = {}

    def add_folder(folder: Path, prefix: str) -> None:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                chosen[f"{prefix}{path.relative_to(folder).as_posix()}"] = path

    for item in what:
        if item == "adapter":
            add_folder(run_dir / "adapter", "")
        elif item == "merged":
            folders = [p for p in (export_dir / "merged-fp16", export_dir / "merged-bf16") if p.is_dir()]
            if not folders:
                raise missing_export(item, "merged_fp16")
            for folder in folders:
                add_folder(folder, f"{folder.name}/")
        elif item == "nf4":
            if not (export_dir / "nf4").is_dir():
                raise missing_export(item, "nf4")
            add_folder(export_dir / "nf4", "nf4/")
        elif item == "gguf":
            files = sorted(export_dir.glob("*.gguf")) + sorted(export_dir.glob("*.Modelfile"))
            if not files:
                raise missing_export(item, "gguf_q8_0")
            chosen.update({f.name: f for f in files})
    return chosen


def missing_export(item: str, fmt: str) -> QtuneError:
    return QtuneError(f"nothing to push for '{item}': the run has no such export",
                      fix=f"run `qtune export RUN_DIR --format {fmt}` first", code=EXIT_ENVIRONMENT)


def base_license(model_name: str) -> str | None:
    """The base model's licence from its local model card front matter, if it declares one."""
    card = Path(model_name).expanduser() / "README.md"
    if card.is_file():
        match = re.search(r"^license:\s*(\S+)", card.read_text(errors="replace"), re.MULTILINE)
        if match:
            return match.group(1)
    return None


def model_card(run_dir: Path, repo_id: str, what: list[str], chosen: dict[str, str | Path]) -> str:
    import yaml

    from qtune.export import open_run

    trained = open_run(run_dir)
    recipe = trained.recipe
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    report_path = run_dir / "export" / "export_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    hub_datasets = [d.path for d in recipe.data.datasets if not Path(d.path).expanduser().exists()]
    front = {
        "base_model": recipe.model.name,
        "library_name": "peft" if "adapter" in what else "transformers",
        "tags": ["qlora", "qtune", "lora", "sft", "generated_from_trainer"] + (["gguf"] if "gguf" in what else []),
        "pipeline_tag": "text-generation",
    }
    if hub_datasets:
        front["datasets"] = hub_datasets
    license_name = base_license(recipe.model.name)
    if license_name:
        front["license"] = license_name

    def fmt(value, spec=".4f"):
        return "n/a" if value is None else format(value, spec)

    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {repo_id.split('/')[-1]}", "",
             f"QLoRA fine-tune of [{recipe.model.name}](https://huggingface.co/{recipe.model.name}) made with qtune.", "",
             "## Training", "",
             "| setting | value |", "| --- | --- |",
             f"| quantization | {recipe.quant.type}, double quant {recipe.quant.double_quant}, compute {recipe.quant.compute_dtype} |",
             f"| LoRA | r={recipe.lora.r}, alpha={recipe.lora.alpha:g}, dropout={recipe.lora.dropout:g}, "
             f"targets={recipe.lora.target_modules}, rsLoRA={recipe.lora.use_rslora}, DoRA={recipe.lora.use_dora} |",
             f"| data | {', '.join(f'{d.path} ({d.format})' for d in recipe.data.datasets)}; max_length {recipe.data.max_length} |",
             f"| optimizer | {recipe.train.optimizer}, lr {recipe.train.lr:g} ({recipe.train.lr_scheduler}), "
             f"batch {recipe.train.micro_batch_size} x {recipe.train.grad_accum} accumulation |",
             f"| steps | {metrics.get('global_step', 'n/a')} |",
             f"| train loss | {fmt(metrics.get('train_loss'))} |",
             f"| eval loss before -> after | {fmt(metrics.get('eval_loss_before'))} -> {fmt(metrics.get('eval_loss'))} |",
             f"| eval perplexity | {fmt(metrics.get('eval_perplexity'), '.3f')} |", ""]
    if report:
        from qtune.evaluate import format_table

        lines += ["## Export fidelity", "",
                  f"Each export reloaded and compared with the adapter on the NF4 base ({report['reference']['samples']} "
                  f"validation samples, merge base: {report['merge_base']}):", "", "```",
                  format_table(report["artifacts"], report["reference"]["perplexity"]), "```", ""]
    lines += ["## Usage", ""]
    if "adapter" in what:
        lines += ["transformers + peft:", "", "```python", "import torch",
                  "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig", "",
                  'bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,',
                  "                         bnb_4bit_compute_dtype=torch.bfloat16)",
                  f'base = AutoModelForCausalLM.from_pretrained("{recipe.model.name}", quantization_config=bnb, device_map="auto")',
                  f'model = PeftModel.from_pretrained(base, "{repo_id}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "```", ""]
    if "merged" in what:
        folder = next((p.split("/")[0] for p in chosen if p.startswith("merged-")), "merged-fp16")
        lines += ["Merged weights:", "", "```python", "from transformers import AutoModelForCausalLM",
                  f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", subfolder="{folder}")', "```", ""]
    if "nf4" in what:
        lines += ["4-bit (NF4) weights:", "", "```python", "from transformers import AutoModelForCausalLM",
                  f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", subfolder="nf4")', "```", ""]
    if "gguf" in what:
        gguf_files = sorted(p for p in chosen if p.endswith(".gguf"))
        first = gguf_files[0] if gguf_files else "model-q8_0.gguf"
        lines += ["llama.cpp and Ollama:", "", "```bash",
                  f"llama-cli --hf-repo {repo_id} --hf-file {first} -p \"Hello\"",
                  f"huggingface-cli download {repo_id} {first} {first}.Modelfile --local-dir .",
                  f"ollama create {repo_id.split('/')[-1]} -f {first}.Modelfile", "```", ""]
    return "\n".join(lines)


def push(run_dir: str | Path, repo_id: str, what: list[str] | None = None, *, private: bool = True, echo=print) -> str:
    """Create the repo (private by default) and upload the chosen artifacts with a model card, in one commit."""
    from huggingface_hub import CommitOperationAdd

    run_dir = Path(run_dir)
    what = list(dict.fromkeys(what or ["adapter"]))
    unknown = [w for w in what if w not in WHAT]
    if unknown:
        raise QtuneError(f"unknown --what '{unknown[0]}'", fix=f"choose from {', '.join(WHAT)}", code=2)
    chosen = files_to_push(run_dir, what)
    card = model_card(run_dir, repo_id, what, chosen)
    require_token()
    operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f)) for p, f in chosen.items()]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    commit_to_repo(repo_id, operations, f"qtune: {', '.join(what)}", private=private, action="pushing to")
    echo(f"push: {len(chosen)} file(s) + model card to {repo_id} ({'private' if private else 'public'})")
    return repo_id


# --------------------------------------------------------------------------- checkpoints on the Hub


def push_checkpoint(repo_id: str, checkpoint: Path, run_dir: Path, *, private: bool = True) -> None:
    """One checkpoint (and what a resume needs: the recipe, the eval before training) under checkpoints/."""
    from huggingface_hub import CommitOperationAdd

    operations = [CommitOperationAdd(path_in_repo=f"{CHECKPOINT_PREFIX}/{checkpoint.name}/{p.relative_to(checkpoint).as_posix()}",
                                     path_or_fileobj=str(p))
                  for p in sorted(checkpoint.rglob("*")) if p.is_file()]
    for name in ("recipe.yaml", "eval_before.json"):
        if (run_dir / name).is_file():
            operations.append(CommitOperationAdd(path_in_repo=f"{CHECKPOINT_PREFIX}/{name}", path_or_fileobj=str(run_dir / name)))
    commit_to_repo(repo_id, operations, f"qtune: {checkpoint.name}", private=private, action="pushing a checkpoint to")


def pull_newest_checkpoint(repo_id: str, run_dir: Path) -> Path | None:
    """Download the newest checkpoint pushed to the Hub into run_dir/checkpoints; None if there is none."""
    from huggingface_hub import hf_hub_download

    api = hub_api()
    try:
        files = api.list_repo_files(repo_id)
    except Exception as e:
        raise hub_failure("reading checkpoints from", repo_id, e) from None
    steps = {}
    for path in files:
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}/checkpoint-(\d+)/.+", path)
        if match:
            steps.setdefault(int(match.group(1)), []).append(path)
    if not steps:
        return None
    newest = max(steps)
    target = run_dir / "checkpoints"
    try:
        for path in steps[newest] + [f for f in files if f in (f"{CHECKPOINT_PREFIX}/recipe.yaml", f"{CHECKPOINT_PREFIX}/eval_before.json")]:
            local = Path(hf_hub_download(repo_id, path, endpoint=os.environ.get("HF_ENDPOINT") or None))
            relative = Path(path).relative_to(CHECKPOINT_PREFIX)
            destination = (target / relative) if relative.parts[0].startswith("checkpoint-") else run_dir / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(local.read_bytes())
    except Exception as e:
        raise hub_failure("downloading a checkpoint from", repo_id, e) from None
    return target / f"checkpoint-{newest}"
