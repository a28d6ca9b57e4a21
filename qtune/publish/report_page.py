"""report.html: one self-contained page per run, to see what the run did. Charts are inline SVG drawn by matplotlib,
tables are plain HTML; no script, no stylesheet or font from elsewhere, so it opens from a file:// URL, offline,
without JavaScript. It is rebuilt from what the run folder holds (recipe.yaml, metrics.json, history.json,
generations.json, the export and eval reports) by `qtune train`, `qtune export`, `qtune eval` and `qtune report`.
"""

from __future__ import annotations

import html
import json
import platform
from collections.abc import Callable
from pathlib import Path

import yaml

from qtune.config.recipe import Recipe, validate_recipe
from qtune.core.folders import (
    CHECKPOINTS,
    COMPLETIONS,
    EVAL_REPORT,
    EXPORT,
    EXPORT_REPORT,
    GENERATIONS,
    HISTORY,
    METRICS,
    RECIPE_FILE,
    REPORT_PAGE,
)
from qtune.core.fs import write_text_atomically
from qtune.core.plots import draw_losses, inline_svg
from qtune.core.text import fmt
from qtune.evaluation.tasks.scores import TABLE_HEADER, describe_settings, score_rows, table_cells
from qtune.training.methods import METHODS, method_of

STYLE = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#1d1d1f}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f5f5f7}td.num{text-align:right;font-variant-numeric:tabular-nums}tr.changed td{background:#fff6d6}
pre,td.text{white-space:pre-wrap;font:13px/1.35 ui-monospace,Menlo,Consolas,monospace}.muted{color:#6e6e73}
figure{margin:1em 0}figcaption{color:#6e6e73;font-size:.9em}svg{max-width:100%;height:auto}
"""


def build_report(run_dir: str | Path) -> Path:
    """Writes <run_dir>/report.html from what the run folder holds now; returns its path."""
    run_dir = Path(run_dir)
    recipe = validate_recipe(yaml.safe_load((run_dir / RECIPE_FILE).read_text()), where=str(run_dir / RECIPE_FILE))
    read = lambda name: read_json(run_dir / name)  # noqa: E731
    metrics, history = read(METRICS), read(HISTORY) or []
    sections = [
        ("Recipe", recipe_section(recipe)),
        ("Data", data_section(metrics.get("data") or {})),
        ("Training", training_section(recipe, metrics, history, run_dir)),
        ("Generations before and after", generations_section(read(GENERATIONS))),
        *(
            [("Completions during training", completions_section(read_json_lines(run_dir / COMPLETIONS)))]
            if (run_dir / COMPLETIONS).is_file()
            else []
        ),
        ("Exports", exports_section(read_json(run_dir / EXPORT / EXPORT_REPORT))),
        ("Evaluation", eval_section(read(EVAL_REPORT))),
        ("Environment", environment_section(metrics)),
    ]
    title = f"qtune run: {run_dir.name}"
    summary = (
        f"{recipe.train.method.upper()} of <b>{esc(recipe.model.name)}</b> in 4-bit {recipe.quant.type}, "
        f"{metrics.get('global_step', 'no')} steps"
        + (f", continuing the adapter {esc(recipe.model.adapter)}" if recipe.model.adapter else "")
    )
    body = "".join(f'<h2 id="{slug(name)}">{name}</h2>{content}' for name, content in sections)
    contents = " · ".join(f'<a href="#{slug(name)}">{name}</a>' for name, _ in sections)
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{STYLE}</style></head>'
        f"<body><h1>{esc(title)}</h1><p>{summary}</p><p class=muted>{contents}</p>{body}</body></html>"
    )
    path = run_dir / REPORT_PAGE
    write_text_atomically(path, page)
    return path


# --------------------------------------------------------------------------- the sections


def recipe_section(recipe: Recipe) -> str:
    """Every setting; the ones that differ from qtune's defaults are highlighted."""
    rows = []
    for section_name, section in recipe:
        if section_name in METHODS and section_name != recipe.train.method:
            continue  # another method's settings: not this run's
        for key, info in type(section).model_fields.items():
            value = getattr(section, key)
            default = None if info.is_required() else info.get_default(call_default_factory=True)
            changed = info.is_required() or value != default
            shown = json.dumps(value.model_dump(mode="json") if hasattr(value, "model_dump") else dump(value))
            rows.append(
                f'<tr class="{"changed" if changed else ""}"><td>{section_name}.{key}</td>'
                f'<td class="text">{esc(shown)}</td><td class="text muted">{"" if info.is_required() else esc(json.dumps(dump(default)))}</td></tr>'
            )
    return (
        "<p class=muted>Highlighted: set by the recipe (not qtune's default).</p>"
        "<table><tr><th>key</th><th>value</th><th>default</th></tr>" + "".join(rows) + "</table>"
    )


def dump(value):
    """A setting as plain JSON-able values (sections and lists of them included)."""
    if isinstance(value, list):
        return [dump(v) for v in value]
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def data_section(report: dict) -> str:
    """Counts, per-dataset rows, and the length histogram of the data report."""
    if not report:
        return "<p class=muted>No data report in metrics.json (the run has not finished).</p>"
    keys = [
        ("train samples", "train_samples"),
        ("validation samples", "val_samples"),
        ("train tokens", "train_tokens"),
        ("supervised tokens", "train_supervised_tokens"),
        ("mean / max tokens per sample", None),
        ("truncated to max_length", "truncated"),
        ("dropped", "dropped"),
    ]
    rows = []
    for label, key in keys:
        if key is None:
            value = f"{report.get('mean_tokens')} / {report.get('max_tokens')} (max_length {report.get('max_length')})"
        else:
            value = f"{report.get(key, 'n/a'):,}" if isinstance(report.get(key), int) else report.get(key, "n/a")
        rows.append(f"<tr><td>{label}</td><td class=num>{esc(str(value))}</td></tr>")
    if report.get("streaming"):
        rows.append("<tr><td>read as</td><td class=num>a stream, tokenized as training read it</td></tr>")
    if report.get("train_tokens"):
        share = report.get("train_supervised_tokens", 0) / report["train_tokens"]
        rows.append(f"<tr><td>supervised share</td><td class=num>{100 * share:.1f}%</td></tr>")
    sources = report.get("sources", [])
    per_source = "".join(
        f"<tr><td>{esc(s['path'])}</td><td>{esc(s['format'])}</td><td>{esc(s.get('role', 'train'))}</td>"
        f"<td class=num>{source_rows(s)}</td><td class=num>{s.get('truncated', 0)}</td><td class=num>{s.get('dropped', 0)}</td></tr>"
        for s in sources
    )
    out = "<table>" + "".join(rows) + "</table>"
    out += (
        "<table><tr><th>dataset</th><th>format</th><th>role</th><th>rows</th><th>truncated</th><th>dropped</th></tr>"
        + per_source
        + "</table>"
    )
    histogram = report.get("length_histogram")
    if histogram:
        which = "validation" if report.get("streaming") else "training"
        out += figure(
            lambda ax: histogram_chart(ax, histogram),
            f"Tokens per {which} sample (prompt + answer; pairs: prompt + the longer answer).",
        )
    return out


def source_rows(source: dict) -> str:
    """A dataset's row count as the page shows it ("streamed" for a stream, whose rows are not counted ahead)."""
    return f"{source['rows']:,}" if "rows" in source else "streamed"


def histogram_chart(ax, histogram: dict) -> None:
    """The sample-length histogram."""
    edges, counts = histogram["edges"], histogram["counts"]
    ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges, edges[1:])], align="edge", color="#4c78a8")
    ax.set_xlabel("tokens")
    ax.set_ylabel("samples")


def training_section(recipe: Recipe, metrics: dict, history: list[dict], run_dir: Path) -> str:
    """Time, speed, losses, the method's figures, memory against the plan, checkpoints, and the curves."""
    if not metrics:
        return "<p class=muted>The run has not finished: no metrics.json yet.</p>"
    rows = [
        ("steps", metrics.get("global_step")),
        ("time", f"{metrics.get('train_seconds', 0):.1f} s"),
        ("tokens/s", fmt(metrics.get("tokens_per_second"), ",.0f")),
        ("train loss", fmt(metrics.get("train_loss"), ".4f")),
        (
            "eval loss before -> after",
            f"{fmt(metrics.get('eval_loss_before'), '.4f')} -> {fmt(metrics.get('eval_loss'), '.4f')}",
        ),
    ]
    rows += method_of(recipe).result_rows(metrics)
    peak = metrics.get("peak_memory_bytes")
    planned = planned_bytes(recipe, metrics)
    memory = f"{peak / 2**20:,.0f} MiB ({metrics.get('peak_memory_kind')})" if peak else "n/a"
    if peak and planned:
        memory += f"; the plan predicted {planned / 2**20:,.0f} MiB ({100 * (planned / peak - 1):+.0f}%)"
    rows.append(("peak memory", memory))
    rows.append(("gradient checkpointing", metrics.get("gradient_checkpointing")))
    checkpoints = sorted(p.name for p in (run_dir / CHECKPOINTS).glob("checkpoint-*") if p.is_dir())
    rows.append(("checkpoints kept", ", ".join(checkpoints) or "none"))
    out = "<table>" + "".join(f"<tr><td>{k}</td><td>{esc(str(v))}</td></tr>" for k, v in rows) + "</table>"
    if history:
        out += figure(
            lambda ax: loss_chart(ax, history), "Train loss per logged step, eval loss (step 0: before training)."
        )
        if any("learning_rate" in h for h in history):
            out += figure(lambda ax: series_chart(ax, history, "learning_rate", "learning rate"), "Learning rate.")
        if any("eval_rewards/accuracies" in h for h in history):
            out += figure(
                lambda ax: series_chart(ax, history, "eval_rewards/accuracies", "eval reward accuracy"),
                "Validation reward accuracy (the chosen answer scored above the rejected one).",
            )
    else:
        out += "<p class=muted>No history.json: the loss curves are in loss.png.</p>"
    return out


def planned_bytes(recipe: Recipe, metrics: dict) -> int | None:
    """The memory plan's prediction for this run, where it can be made from config.json (None otherwise)."""
    from qtune.core.errors import QtuneError
    from qtune.planning.plan import plan_training

    on_cpu = metrics.get("peak_memory_kind") == "cpu_rss"
    settings = recipe.train.model_copy(update={"gradient_checkpointing": bool(metrics.get("gradient_checkpointing"))})
    try:
        plan = plan_training(
            recipe.model_copy(update={"train": settings}),
            device="cpu" if on_cpu else "cuda",
            compute_bytes={"fp32": 4}.get(metrics.get("compute_dtype"), 2),
        )
    except (QtuneError, OSError, ValueError):
        return None
    return plan["training_bytes"]


def loss_chart(ax, history: list[dict]) -> None:
    """Train and eval loss per step."""
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    draw_losses(ax, train, [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h])
    ax.legend()


def series_chart(ax, history: list[dict], key: str, label: str) -> None:
    """One logged series per step."""
    points = [(h["step"], h[key]) for h in history if key in h]
    ax.plot(*zip(*points), "o-" if len(points) < 30 else "-", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(label)


def generations_section(generations: dict | None) -> str:
    """The validation prompts answered before and after fine-tuning, beside the reference."""
    if not generations or not generations.get("samples"):
        return "<p class=muted>No generations.json (the run has no finished training, or no validation prompt).</p>"
    rows = "".join(
        f'<tr><td class="text">{esc(g["prompt"][-400:])}</td><td class="text">{esc(g["base"])}</td>'
        f'<td class="text">{esc(g["fine_tuned"])}</td><td class="text">{esc(g["reference"])}</td></tr>'
        for g in generations["samples"]
    )
    return (
        f"<p class=muted>Validation prompts, greedy, at most {generations.get('max_new_tokens')} new tokens: the 4-bit "
        "base (adapter off), the fine-tuned model and the reference answer.</p>"
        "<table><tr><th>prompt (its end)</th><th>base</th><th>fine-tuned</th><th>reference</th></tr>"
        + rows
        + "</table>"
    )


def completions_section(entries: list[dict]) -> str:
    """GRPO's sampled completions of one prompt, with their rewards and advantages, at the steps they were kept (a
    step kept twice, by a run resumed after it, shows its last)."""
    by_step = {entry["step"]: entry for entry in entries if isinstance(entry, dict) and "step" in entry}
    if not by_step:
        return "<p class=muted>No completions were kept.</p>"
    out = [
        "<p class=muted>A prompt of the step and completions sampled for it, with each reward function's score and the "
        "advantage it was trained with (reward against its group's).</p>"
    ]
    for step in sorted(by_step):
        entry = by_step[step]
        rows = "".join(
            f'<tr><td class="text">{esc(c["text"])}</td><td>'
            + esc(", ".join(f"{name} {fmt(value, '.3g')}" for name, value in c["rewards"].items()))
            + f"</td><td class=num>{fmt(c.get('advantage'), '+.3f')}</td></tr>"
            for c in entry["completions"]
        )
        reference = f"<p>reference answer: <code>{esc(entry['reference'])}</code></p>" if entry.get("reference") else ""
        out.append(
            f"<h3>step {step}</h3><pre>{esc(entry['prompt'][-400:])}</pre>{reference}"
            "<table><tr><th>completion</th><th>rewards</th><th>advantage</th></tr>" + rows + "</table>"
        )
    return "".join(out)


def exports_section(report: dict | None) -> str:
    """The exports' fidelity table and the size-against-KL chart."""
    if not report:
        return "<p class=muted>No exports yet: <code>qtune export RUN_DIR --format ...</code> writes them.</p>"
    artifacts = report["artifacts"]
    rows = "".join(
        f"<tr><td>{esc(name)}</td><td class=num>{row.get('size_bytes', 0) / 2**20:,.1f}</td>"
        f"<td class=num>{row['perplexity']:.4f}</td><td class=num>{row['mean_kl']:.2e}</td>"
        f"<td class=num>{100 * row['top1_agreement']:.2f}%</td><td class=num>{row['max_abs_logit_diff']:.4f}</td>"
        f"<td>{esc(measured_when(row))}</td></tr>"
        for name, row in artifacts.items()
    )
    reference = report.get("reference", {})
    out = (
        f"<p class=muted>Each export reloaded as its users load it and compared with the adapter on the NF4 base "
        f"({reference.get('samples')} validation samples, reference perplexity {fmt(reference.get('perplexity'), '.4f')}, "
        f"merge base {esc(str(report.get('merge_base')))}). Artifacts an earlier <code>qtune export</code> wrote into "
        "the folder keep the figures measured then.</p>"
        "<table><tr><th>artifact</th><th>size MiB</th><th>perplexity</th><th>mean KL</th><th>top-1 agreement</th>"
        "<th>max |Δlogit|</th><th>measured</th></tr>" + rows + "</table>"
    )
    if artifacts:
        out += figure(lambda ax: size_kl_chart(ax, artifacts), "What each export saved (size) and what it cost (KL).")
    return out


def measured_when(row: dict) -> str:
    """When an export row was measured: by the latest export, or kept from an earlier one (with its reference when
    that differs)."""
    measured = row.get("measured") or {}
    if not row.get("kept"):
        return f"this export ({measured['at']})" if measured.get("at") else "this export"
    reference = measured.get("reference") or {}
    against = f", {reference.get('samples')} samples" if reference else ""
    return f"earlier export ({measured.get('at') or 'date unknown'}{against})"


def size_kl_chart(ax, artifacts: dict) -> None:
    """Each export's size against its KL to the adapter."""
    for name, row in artifacts.items():
        kl = max(row["mean_kl"], 1e-9)  # an exact merge has KL ~0: drawn at the floor of the log axis
        ax.scatter(row.get("size_bytes", 0) / 2**20, kl, color="#4c78a8")
        ax.annotate(name, (row.get("size_bytes", 0) / 2**20, kl), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_yscale("log")
    ax.margins(0.15)  # room for the labels
    ax.set_xlabel("size (MiB)")
    ax.set_ylabel("mean KL to the adapter")


def eval_section(report: dict | None) -> str:
    """`qtune eval`'s loss table and `qtune eval --tasks`' scores."""
    report = report or {}
    out = ""
    if report.get("models"):
        rows = "".join(
            f"<tr><td>{esc(name)}</td><td class=num>{row['loss']:.4f}</td><td class=num>{row['perplexity']:.4f}</td></tr>"
            for name, row in report["models"].items()
        )
        out += (
            f"<p class=muted>Loss per supervised token on {report.get('samples')} samples of "
            f"{esc(str(report.get('data')))}.</p><table><tr><th>model</th><th>loss</th><th>perplexity</th></tr>"
            + rows
            + "</table>"
        )
    if report.get("tasks"):
        out += tasks_table(report["tasks"])
    return out or (
        "<p class=muted>No evaluation yet: <code>qtune eval RUN_DIR</code> measures the loss, "
        "<code>qtune eval RUN_DIR --tasks ...</code> benchmark scores.</p>"
    )


def tasks_table(part: dict) -> str:
    """The task scores as a chart and a table."""
    scored = [row for row in score_rows(part) if "skipped" not in row]
    cells = "".join(
        f"<tr><td>{esc(row[0])}</td><td colspan=5 class=muted>{esc(row[1])}</td></tr>"
        if row[1].startswith("skipped: ")
        else "<tr>"
        + "".join(f"<td>{esc(c)}</td>" for c in row[:3])
        + "".join(f"<td class=num>{c}</td>" for c in row[3:])
        + "</tr>"
        for row in table_cells(part)
    )
    chart = (
        figure(lambda ax: task_chart(ax, scored), "Task score ± stderr per model.", (7, 0.8 + 0.3 * len(scored)))
        if scored
        else ""
    )
    header = "".join(f"<th>{esc(name)}</th>" for name in TABLE_HEADER)
    return f"<p class=muted>Task benchmarks: {esc(describe_settings(part))}.</p>{chart}<table><tr>{header}</tr>{cells}</table>"


def task_chart(ax, rows: list[dict]) -> None:
    """Task score and stderr per model, as bars."""
    labels = [f"{row['artifact']} · {row['task']}" for row in rows][::-1]
    values = [row["value"] for row in rows][::-1]
    errors = [row["stderr"] or 0.0 for row in rows][::-1]
    colors = ["#4c78a8" if row["artifact"] != "adapter" else "#f58518" for row in rows][::-1]
    ax.barh(labels, values, xerr=errors, color=colors, capsize=3)
    ax.set_xlabel("score")


def environment_section(metrics: dict) -> str:
    """Where the run trained (the record metrics.json keeps: versions against the tested set, CPU kind, GPU), and
    the training's memory kind and dtype. A run from before the record: the versions the page is built with."""
    env = metrics.get("environment")
    if env:
        cpu, gpu, differs = env.get("cpu", {}), env.get("gpu"), env.get("differs_from_tested") or {}
        rows = [
            ("qtune", env.get("qtune")),
            ("python", f"{env.get('python')} ({env.get('platform')})"),
            ("CPU", f"{cpu.get('kind')}: {cpu.get('model')}, {cpu.get('cores')} cores"),
            ("torch's CPU kernels", cpu.get("torch_kernels", "n/a")),
            ("GPU", f"{gpu['name']} x{gpu['count']}, {gpu['memory_gib']} GiB, CUDA {gpu['cuda']}" if gpu else "none"),
        ]
        for package, version in env.get("versions", {}).items():
            if version is not None:
                rows.append(
                    (package, version + (f" (tested: {differs[package]['tested']})" if package in differs else ""))
                )
        note = (
            "Where the run trained. Every package at the version qtune is tested with (qtune doctor)."
            if not differs
            else f"Where the run trained. {len(differs)} package(s) not at the version qtune is tested with: its "
            "figures may differ from qtune's in the later digits."
        )
    else:
        from importlib.metadata import PackageNotFoundError, version

        rows = [("python", platform.python_version()), ("machine", platform.machine())]
        for package in ("qtune", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets"):
            try:
                rows.append((package, version(package)))
            except PackageNotFoundError:
                rows.append((package, "not installed"))
        note = "Where this page was built (the run kept no record of its own environment)."
    rows.append(("memory measured as", metrics.get("peak_memory_kind", "n/a")))
    rows.append(("compute dtype", metrics.get("compute_dtype", "n/a")))
    rows.append(("processes", metrics.get("world_size", "n/a")))
    return (
        f"<p class=muted>{esc(note)}</p>"
        "<table>" + "".join(f"<tr><td>{esc(str(k))}</td><td>{esc(str(v))}</td></tr>" for k, v in rows) + "</table>"
    )


# --------------------------------------------------------------------------- helpers


def figure(draw: Callable, caption: str, size: tuple[float, float] = (7, 3.2)) -> str:
    """A matplotlib chart as inline SVG, with its caption."""
    return f"<figure>{inline_svg(draw, size)}<figcaption>{esc(caption)}</figcaption></figure>"


def read_json(path: Path) -> dict | list | None:
    """A JSON file's contents, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_json_lines(path: Path) -> list:
    """A JSON-lines file's entries (a line cut short by a killed run is skipped), or [] when it is missing."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


def esc(text) -> str:
    """Text escaped for HTML."""
    return html.escape(str(text))


def slug(name: str) -> str:
    """A section name as an HTML id."""
    return name.lower().replace(" ", "-")
