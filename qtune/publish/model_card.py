"""The model card `qtune push` uploads: the run's own figures in publish/templates/model_card.md, rendered by
huggingface_hub's ModelCard.from_template, with the Hub's metadata (base model, library, tags, datasets, licence, and
the adapter's task scores as the model-index)."""

from __future__ import annotations

import json
from pathlib import Path

from qtune.config.runs import open_run
from qtune.core.environment import environment_summary
from qtune.core.folders import EVAL_REPORT, EXPORT_REPORT, REPORT_PAGE
from qtune.core.text import fmt
from qtune.evaluation.metrics import format_table
from qtune.evaluation.tasks.scores import describe_settings, markdown_task_table, score_rows
from qtune.training.methods import method_of

TEMPLATE = Path(__file__).with_name("templates") / "model_card.md"


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


def task_results(tasks: dict) -> list | None:
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


def training_rows(recipe, metrics: dict) -> list[tuple[str, str]]:
    """The card's training table: the settings that made the adapter, and what training measured."""
    quant, lora, train = recipe.quant, recipe.lora, recipe.train
    method = method_of(recipe)
    return [
        ("quantization", f"{quant.type}, double quant {quant.double_quant}, compute {quant.compute_dtype}"),
        (
            "LoRA",
            f"r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout:g}, targets={lora.target_modules}, "
            f"rsLoRA={lora.use_rslora}, DoRA={lora.use_dora}",
        ),
        (
            "data",
            f"{', '.join(f'{d.path} ({d.format})' for d in recipe.data.datasets)}; max_length {recipe.data.max_length}",
        ),
        (
            "optimizer",
            f"{train.optimizer}, lr {train.lr:g} ({train.lr_scheduler}), batch {train.micro_batch_size} x "
            f"{train.grad_accum} accumulation",
        ),
        ("method", method.card_description(recipe)),
        ("steps", str(metrics.get("global_step", "n/a"))),
        ("train loss", fmt(metrics.get("train_loss"))),
        ("eval loss before -> after", f"{fmt(metrics.get('eval_loss_before'))} -> {fmt(metrics.get('eval_loss'))}"),
        *method.result_rows(metrics),
        *([("environment", environment_summary(metrics["environment"]))] if metrics.get("environment") else []),
    ]


QUANTIZED_TARGETS = {"nf4", "gguf", "gptq"}


def gptq_sections(trained, report: dict | None) -> list[dict]:
    """Per GPTQ export of the run: its folder, its quantization config (as config.json holds it) and its fidelity."""
    sections = []
    for name in ("gptq_int4", "gptq_int8"):
        folder = trained.artifact(name)
        if not (folder / "config.json").is_file():
            continue
        quantization = json.loads((folder / "config.json").read_text())["quantization_config"]
        weights = quantization["config_groups"]["group_0"]["weights"]
        row = ((report or {}).get("artifacts") or {}).get(name)
        sections.append(
            {
                "folder": folder.name,
                "scheme": f"{weights['num_bits']}-bit integers, group size {weights.get('group_size') or 'per row'}, "
                f"{'symmetric' if weights['symmetric'] else 'with zero points'}, act-order "
                f"{'on' if weights.get('actorder') else 'off'}; {quantization['format']} "
                f"(compressed-tensors {quantization.get('version')}); 16-bit: {', '.join(quantization['ignore']) or 'none'}",
                "fidelity": f"top-1 {100 * row['top1_agreement']:.1f}%, mean KL {row['mean_kl']:.2e}, perplexity "
                f"{row['perplexity']:.4g} against the adapter on NF4"
                if row and "top1_agreement" in row
                else None,
            }
        )
    return sections


def model_card(run_dir: Path, repo_id: str, what: list[str], pushed: dict[str, Path]) -> str:
    """The model card of a run pushed to `repo_id`: what `what` uploads (`pushed`: path in the repo -> file)."""
    from huggingface_hub import ModelCard, ModelCardData

    trained = open_run(run_dir)
    recipe = trained.recipe
    report_path = trained.export_dir / EXPORT_REPORT
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    evaluation = run_dir / EVAL_REPORT
    tasks = (json.loads(evaluation.read_text()) if evaluation.is_file() else {}).get("tasks")
    hub_datasets = [d.path for d in recipe.data.datasets if not Path(d.path).expanduser().exists()]
    card_data = ModelCardData(
        model_name=repo_id.split("/")[-1] if tasks else None,
        eval_results=task_results(tasks) if tasks else None,
        base_model=recipe.model.name,
        library_name="peft" if "adapter" in what else "transformers",
        tags=["qlora", "qtune", "lora", recipe.train.method, "generated_from_trainer"]
        + (["gguf"] if "gguf" in what else [])
        + (["gptq", "compressed-tensors"] if "gptq" in what else []),
        # a repo of quantized weights only is the Hub's "quantized" relation to its base (the adapter's is "adapter")
        base_model_relation="quantized" if set(what) <= QUANTIZED_TARGETS else None,
        pipeline_tag="text-generation",
        datasets=hub_datasets or None,
        license=base_license(recipe.model.name),
    )
    gguf_files = sorted(path for path in pushed if path.endswith(".gguf"))
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        title=repo_id.split("/")[-1],
        repo_id=repo_id,
        report_page=REPORT_PAGE if (run_dir / REPORT_PAGE).is_file() else None,
        training_rows=training_rows(recipe, trained.metrics()),
        fidelity={
            "samples": report["reference"]["samples"],
            "merge_base": report["merge_base"],
            "table": format_table(report["artifacts"], report["reference"]["perplexity"]),
        }
        if report
        else None,
        tasks={"settings": describe_settings(tasks), "table": markdown_task_table(tasks)} if tasks else None,
        what=what,
        merged_folder=next((p.split("/")[0] for p in pushed if p.startswith("merged-")), "merged-fp16"),
        gguf_file=gguf_files[0] if gguf_files else "model-q8_0.gguf",
        gptq=gptq_sections(trained, report) if "gptq" in what else None,
    )
    return str(card) + "\n"
