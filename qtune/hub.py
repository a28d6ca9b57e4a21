"""Ship a run to the Hugging Face Hub: a model card from the run's own figures, then one atomic commit.

Everything goes through huggingface_hub (HfApi). The token is never passed, read or written by
qtune: huggingface_hub takes it from HF_TOKEN or the `hf auth login` store itself, so it cannot end
up in a log, a recipe, a card, metrics or a tracker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from qtune.errors import EXIT_ENVIRONMENT, QtuneError, hub_failure
from qtune.metrics import format_table
from qtune.recipe import PUSH_TARGETS
from qtune.run_dir import (
    ADAPTER,
    ARTIFACTS,
    CHECKPOINTS,
    EVAL_BEFORE,
    EVAL_REPORT,
    EXPORT,
    EXPORT_REPORT,
    RECIPE_FILE,
    REPORT_PAGE,
    open_run,
)
from qtune.task_scores import describe_settings, markdown_task_table, score_rows

CHECKPOINT_PREFIX = "checkpoints"


def hub_api():
    from huggingface_hub import HfApi

    # HF_ENDPOINT is read when huggingface_hub is imported; reading it again here lets a later setting count.
    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)


def require_token() -> None:
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
    """{path in the repo: local file}. The adapter sits at the root so PeftModel.from_pretrained(repo) works."""
    export_dir = run_dir / EXPORT
    chosen: dict[str, Path] = {}

    def add_folder(folder: Path, prefix: str) -> None:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                chosen[f"{prefix}{path.relative_to(folder).as_posix()}"] = path

    for item in what:
        if item == "adapter":
            add_folder(run_dir / ADAPTER, "")
        elif item == "merged":
            folders = [
                export_dir / ARTIFACTS[f]
                for f in ("merged_fp16", "merged_bf16")
                if (export_dir / ARTIFACTS[f]).is_dir()
            ]
            if not folders:
                raise missing_export(item, "merged_fp16")
            for folder in folders:
                add_folder(folder, f"{folder.name}/")
        elif item == "nf4":
            if not (export_dir / ARTIFACTS["nf4"]).is_dir():
                raise missing_export(item, "nf4")
            add_folder(export_dir / ARTIFACTS["nf4"], "nf4/")
        elif item == "gguf":
            files = sorted(export_dir.glob("*.gguf")) + sorted(export_dir.glob("*.Modelfile"))
            if not files:
                raise missing_export(item, "gguf_q8_0")
            chosen.update({f.name: f for f in files})
    if (run_dir / REPORT_PAGE).is_file():  # the run's page goes with whatever is pushed
        chosen[REPORT_PAGE] = run_dir / REPORT_PAGE
    return chosen


def missing_export(item: str, fmt: str) -> QtuneError:
    return QtuneError(
        f"nothing to push for '{item}': the run has no such export",
        fix=f"run `qtune export RUN_DIR --format {fmt}` first",
        code=EXIT_ENVIRONMENT,
    )


def base_license(model_name: str) -> str | None:
    """The licence the base model's local model card declares in its metadata (never a word from its body)."""
    from huggingface_hub import ModelCard

    card = Path(model_name).expanduser() / "README.md"
    if not card.is_file():
        return None
    try:
        return ModelCard.load(card).data.license
    except Exception:  # a card whose metadata block does not parse declares nothing we can rely on
        return None


def method_description(recipe) -> str:
    method = recipe.train.method
    start = f"; continues the adapter {recipe.model.adapter}" if recipe.model.adapter else ""
    if method == "dpo":
        reference = "that adapter" if recipe.model.adapter else "the base model (adapter off)"
        return (
            f"DPO on preference pairs (beta {recipe.dpo.beta:g}, loss {recipe.dpo.loss_type}); "
            f"reference: {reference}{start}"
        )
    if method == "orpo":
        return f"ORPO on preference pairs (beta {recipe.orpo.beta:g}), no reference model{start}"
    return f"supervised fine-tuning (SFT){start}"


def task_results(tasks: dict) -> list:
    """The adapter's task scores as the Hub's model-index, which it shows beside the card."""
    from huggingface_hub import EvalResult

    return [
        EvalResult(
            task_type="text-generation",
            dataset_type=row["task"],
            dataset_name=row["task"],
            metric_type=row["metric"],
            metric_value=round(row["value"], 4),
            verified=False,
        )
        for row in score_rows(tasks)
        if row["artifact"] == "adapter"
    ] or None


def model_card(run_dir: Path, repo_id: str, what: list[str], chosen: dict[str, str | Path]) -> str:
    from huggingface_hub import ModelCardData

    trained = open_run(run_dir)
    recipe = trained.recipe
    metrics = trained.metrics()
    report_path = trained.export_dir / EXPORT_REPORT
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    hub_datasets = [d.path for d in recipe.data.datasets if not Path(d.path).expanduser().exists()]
    evaluation = run_dir / EVAL_REPORT
    tasks = (json.loads(evaluation.read_text()) if evaluation.is_file() else {}).get("tasks")
    front = ModelCardData(
        model_name=repo_id.split("/")[-1] if tasks else None,
        eval_results=task_results(tasks) if tasks else None,
        base_model=recipe.model.name,
        library_name="peft" if "adapter" in what else "transformers",
        tags=["qlora", "qtune", "lora", recipe.train.method, "generated_from_trainer"]
        + (["gguf"] if "gguf" in what else []),
        pipeline_tag="text-generation",
        datasets=hub_datasets or None,
        license=base_license(recipe.model.name),
    )

    def fmt(value, spec=".4f"):
        return "n/a" if value is None else format(value, spec)

    lines = [
        "---",
        front.to_yaml(),
        "---",
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"QLoRA fine-tune of [{recipe.model.name}](https://huggingface.co/{recipe.model.name}) made with qtune.",
        "",
    ]
    if (run_dir / REPORT_PAGE).is_file():
        lines += [
            f"The run's page, [{REPORT_PAGE}]({REPORT_PAGE}) (one offline HTML file): the recipe, the data, the loss "
            "curves, answers before and after fine-tuning, and what each export saved and cost.",
            "",
        ]
    lines += [
        "## Training",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| quantization | {recipe.quant.type}, double quant {recipe.quant.double_quant}, compute {recipe.quant.compute_dtype} |",
        f"| LoRA | r={recipe.lora.r}, alpha={recipe.lora.alpha:g}, dropout={recipe.lora.dropout:g}, "
        f"targets={recipe.lora.target_modules}, rsLoRA={recipe.lora.use_rslora}, DoRA={recipe.lora.use_dora} |",
        f"| data | {', '.join(f'{d.path} ({d.format})' for d in recipe.data.datasets)}; max_length {recipe.data.max_length} |",
        f"| optimizer | {recipe.train.optimizer}, lr {recipe.train.lr:g} ({recipe.train.lr_scheduler}), "
        f"batch {recipe.train.micro_batch_size} x {recipe.train.grad_accum} accumulation |",
        f"| method | {method_description(recipe)} |",
        f"| steps | {metrics.get('global_step', 'n/a')} |",
        f"| train loss | {fmt(metrics.get('train_loss'))} |",
        f"| eval loss before -> after | {fmt(metrics.get('eval_loss_before'))} -> {fmt(metrics.get('eval_loss'))} |",
        f"| eval perplexity | {fmt(metrics.get('eval_perplexity'), '.3f')} |",
    ]
    if recipe.preference:
        lines += [
            f"| validation reward accuracy before -> after | {fmt(metrics.get('eval_reward_accuracy_before'), '.3f')} "
            f"-> {fmt(metrics.get('eval_reward_accuracy'), '.3f')} |",
            f"| validation reward margin before -> after | {fmt(metrics.get('eval_reward_margin_before'))} -> "
            f"{fmt(metrics.get('eval_reward_margin'))} |",
        ]
    lines.append("")
    if report:
        lines += [
            "## Export fidelity",
            "",
            f"Each export reloaded and compared with the adapter on the NF4 base ({report['reference']['samples']} "
            f"validation samples, merge base: {report['merge_base']}):",
            "",
            "```",
            format_table(report["artifacts"], report["reference"]["perplexity"]),
            "```",
            "",
        ]
    if tasks:
        lines += [
            "## Task benchmarks",
            "",
            f"lm-evaluation-harness, the same tasks, docs and seeds for every model ({describe_settings(tasks)}):",
            "",
            *markdown_task_table(tasks),
        ]
        lines.append("")
    lines += ["## Usage", ""]
    if "adapter" in what:
        lines += [
            "transformers + peft:",
            "",
            "```python",
            "import torch",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig",
            "",
            'bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,',
            "                         bnb_4bit_compute_dtype=torch.bfloat16)",
            f'base = AutoModelForCausalLM.from_pretrained("{recipe.model.name}", quantization_config=bnb, device_map="auto")',
            f'model = PeftModel.from_pretrained(base, "{repo_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
            "```",
            "",
        ]
    if "merged" in what:
        folder = next((p.split("/")[0] for p in chosen if p.startswith("merged-")), "merged-fp16")
        lines += [
            "Merged weights:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", subfolder="{folder}")',
            "```",
            "",
        ]
    if "nf4" in what:
        lines += [
            "4-bit (NF4) weights:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", subfolder="nf4")',
            "```",
            "",
        ]
    if "gguf" in what:
        gguf_files = sorted(p for p in chosen if p.endswith(".gguf"))
        first = gguf_files[0] if gguf_files else "model-q8_0.gguf"
        lines += [
            "llama.cpp and Ollama:",
            "",
            "```bash",
            f'llama-cli --hf-repo {repo_id} --hf-file {first} -p "Hello"',
            f"huggingface-cli download {repo_id} {first} {first}.Modelfile --local-dir .",
            f"ollama create {repo_id.split('/')[-1]} -f {first}.Modelfile",
            "```",
            "",
        ]
    return "\n".join(lines)


def push(run_dir: str | Path, repo_id: str, what: list[str] | None = None, *, private: bool = True, echo=print) -> str:
    """Create the repo (private by default) and upload the chosen artifacts with a model card, in one commit."""
    from huggingface_hub import CommitOperationAdd

    run_dir = Path(run_dir)
    what = list(dict.fromkeys(what or ["adapter"]))
    unknown = [w for w in what if w not in PUSH_TARGETS]
    if unknown:
        raise QtuneError(f"unknown --what '{unknown[0]}'", fix=f"choose from {', '.join(PUSH_TARGETS)}", code=2)
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
