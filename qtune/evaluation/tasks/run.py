"""`qtune eval RUN_DIR --tasks ...`: lm-evaluation-harness tasks on the 4-bit base, the adapter and every export in
the run, with the same tasks, limit and seeds for each, in one table of score, stderr and difference to the adapter.

lm-evaluation-harness owns the tasks (prompts, few-shot sampling, metrics, stderr); qtune loads each artifact the way
its users load it (their format's loader; GGUF files in llama.cpp, qtune.evaluation.tasks.models), says the cost before it
starts, and keeps the results in eval_report.json, the run's page and the model card.
"""

from __future__ import annotations

import difflib
import time
from importlib.metadata import version
from pathlib import Path

import torch

from qtune.config.runs import TrainedRun, open_run
from qtune.core.errors import EXIT_DATA, EXIT_ENVIRONMENT, EXIT_RECIPE, QtuneError
from qtune.core.folders import EVAL_REPORT
from qtune.core.log import get_logger
from qtune.evaluation.eval_report import update_eval_report
from qtune.evaluation.fidelity import artifact_config, load_artifact
from qtune.evaluation.tasks.scores import describe_settings, format_task_table, scores_from_results
from qtune.export.formats import FORMATS
from qtune.modeling.load import load_adapter_model

log = get_logger(__name__)

# lm-evaluation-harness's own defaults, passed explicitly so every artifact gets the same and the report says which
SEEDS = {"random": 0, "numpy": 1234, "torch": 1234, "fewshot": 1234}
BASE = "base (4-bit)"


def require_harness() -> None:
    """Refuses with one line (exit 4) when lm-evaluation-harness is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise QtuneError(
            "task benchmarks need lm-evaluation-harness, which is not installed",
            fix="pip install 'qtune[eval]' (or pip install lm-eval)",
            code=EXIT_ENVIRONMENT,
        ) from None


# --------------------------------------------------------------------------- the tasks


def local_task(path: Path) -> dict:
    """A task YAML of the user's, with relative data paths read against the YAML's folder (lm-evaluation-harness
    reads them against the working directory, so a task folder would only work from one place)."""
    # the harness's own loader: it resolves `!function` tags and `include:` the way its task files expect
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(path)
    if "task" not in config:
        raise QtuneError(
            f"{path} is not a task file: it has no 'task' key",
            fix="see lm-evaluation-harness's task guide (docs/new_task_guide.md)",
            code=EXIT_RECIPE,
        )

    def beside(value):
        if isinstance(value, str) and not Path(value).is_absolute() and (path.parent / value).exists():
            return str(path.parent / value)
        if isinstance(value, list):
            return [beside(v) for v in value]
        if isinstance(value, dict):
            return {k: beside(v) for k, v in value.items()}
        return value

    if options := config.get("dataset_kwargs"):
        config["dataset_kwargs"] = {k: beside(v) if k in ("data_files", "data_dir") else v for k, v in options.items()}
    config["dataset_path"] = beside(config.get("dataset_path"))
    return config


def load_tasks(names: list[str]):
    """The tasks, loaded once before any model: a typo, a missing file or data that cannot be fetched stops here,
    not after the first artifact. Returns (specs for simple_evaluate, task manager, loaded tasks)."""
    from lm_eval.tasks import TaskManager

    specs = []
    for name in names:
        if name.endswith((".yaml", ".yml")):
            path = Path(name).expanduser()
            if not path.is_file():
                raise QtuneError(f"task file {name} does not exist", fix="give a task YAML's path", code=EXIT_RECIPE)
            specs.append(local_task(path.resolve()))
        else:
            specs.append(name)
    # Indexing the harness's ~15,000 built-in tasks takes seconds: only when one is asked for by name
    manager = TaskManager(include_defaults=any(isinstance(spec, str) for spec in specs))
    for spec in specs:
        if isinstance(spec, str) and spec not in manager.all_tasks:
            close = difflib.get_close_matches(spec, manager.all_tasks, n=3)
            raise QtuneError(
                f"lm-evaluation-harness has no task, group or tag named '{spec}'",
                where="--tasks",
                fix=(f"did you mean {', '.join(repr(c) for c in close)}? " if close else "")
                + "'lm-eval ls tasks' lists them; a local task is given as its YAML's path",
                code=EXIT_RECIPE,
            )
    try:
        loaded = manager.load(specs)
    except (ConnectionError, OSError) as error:
        raise QtuneError(
            f"a task's data could not be loaded: {' '.join(str(error).split())[:300]}",
            where="--tasks",
            fix="the standard tasks download their data from the Hugging Face Hub: run once with network (they are "
            "cached), or use a local task YAML whose data are files",
            code=EXIT_ENVIRONMENT,
        ) from None
    except (KeyError, ValueError, TypeError) as error:
        raise QtuneError(
            f"a task could not be built: {' '.join(str(error).split())[:300]}", where="--tasks", code=EXIT_DATA
        ) from None
    return specs, manager, loaded


def count_requests(loaded: dict, limit: int | None, num_fewshot: int | None) -> dict[str, dict]:
    """Docs and model requests per task, built as the harness will build them (a multiple-choice doc is one request
    per choice; a generation or a whole-text perplexity doc, one). simple_evaluate loads the tasks afresh for each
    model, so these objects are only counted."""
    counts = {}
    for name, task in loaded["tasks"].items():
        if num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=SEEDS["fewshot"])
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        counts[name] = {
            "docs": len({instance.doc_id for instance in task.instances}),
            "requests": len(task.instances),
            "kind": task.OUTPUT_TYPE,
        }
    return counts


# --------------------------------------------------------------------------- the artifacts


def artifacts_in(trained: TrainedRun) -> list[str]:
    """The models scored: the 4-bit base, the adapter, and every export the run's folder holds."""
    exported = [fmt for fmt, entry in FORMATS.items() if entry.load is not None and trained.artifact(fmt).exists()]
    return [BASE, "adapter"] + exported


def runs_in_llama_cpp(trained: TrainedRun, name: str) -> bool:
    """Whether the model is a GGUF file, which is scored where its users run it: in llama.cpp."""
    return name not in (BASE, "adapter") and trained.artifact(name).suffix == ".gguf"


def skip_reason(trained: TrainedRun, name: str) -> str | None:
    """Why a model cannot be scored here (a GGUF file without llama-cpp-python), or None."""
    from qtune.evaluation.tasks.models import llama_cpp_missing

    return llama_cpp_missing() if runs_in_llama_cpp(trained, name) else None


def scored_models(trained: TrainedRun, names: list[str], batch_size):
    """(name, lm-evaluation-harness model) for each artifact, loaded one at a time: the base is the adapter model
    with its adapter switched off, so the two share one load."""
    from transformers import AutoTokenizer

    from qtune.evaluation.tasks.models import LlamaCppLM, transformers_lm

    on_gpu = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(trained.adapter_dir)
    adapted = load_adapter_model(trained, torch.float32)
    adapted.eval()
    with adapted.disable_adapter():
        yield BASE, transformers_lm(adapted, tokenizer, batch_size)
    yield "adapter", transformers_lm(adapted, tokenizer, batch_size)
    del adapted
    config = artifact_config(trained)
    for name in names[2:]:
        release()  # the previous model, before the next loads: a 7B's merged fp16 and its NF4 do not fit a T4 together
        path = trained.artifact(name)
        if runs_in_llama_cpp(trained, name):
            yield name, LlamaCppLM(path)
        else:
            model = load_artifact(name, path, config=config, on_gpu=on_gpu).eval()
            yield name, transformers_lm(model, AutoTokenizer.from_pretrained(path), batch_size)
            del model


def release() -> None:
    """Frees the previous model's memory before the next one loads."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- qtune eval --tasks


def eval_tasks(
    run_dir,
    tasks: list[str],
    *,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 8,
) -> dict:
    """Scores every artifact of the run on the tasks; writes eval_report.json's "tasks" and returns them."""
    require_harness()
    import lm_eval

    trained = open_run(run_dir)
    specs, manager, loaded = load_tasks(tasks)
    counts = count_requests(loaded, limit, num_fewshot)
    names = artifacts_in(trained)
    skipped = {name: reason for name in names if (reason := skip_reason(trained, name))}
    per_model = sum(c["requests"] for c in counts.values())
    scored = [n for n in names if n not in skipped]
    each = [f"{task}: {c['docs']:,} docs, {c['requests']:,} {c['kind']} requests" for task, c in counts.items()]
    if len(each) > 4:
        each = [f"{len(counts)} tasks, {sum(c['docs'] for c in counts.values()):,} docs"]
    log.info(
        f"cost: {'; '.join(each)} — {per_model:,} requests per model, {per_model * len(scored):,} for the "
        f"{len(scored)} models: {', '.join(scored)}"
    )
    for name, reason in skipped.items():
        log.info(f"{name}: skipped, {reason}")
    part = {
        "harness": f"lm-evaluation-harness {version('lm_eval')}",
        "tasks": [spec if isinstance(spec, str) else spec["task"] for spec in specs],
        "limit": limit,
        "num_fewshot": num_fewshot,
        "seeds": SEEDS,
        "requests": counts,
        "artifacts": {},
    }
    # not enumerate(): it keeps its last (position, (name, model)) tuple alive while the next model loads
    for name, lm in scored_models(trained, scored, batch_size):
        log.info(f"[{scored.index(name) + 1}/{len(scored)}] {name}: {per_model:,} requests")
        started = time.perf_counter()
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=specs,
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=False,
            random_seed=SEEDS["random"],
            numpy_random_seed=SEEDS["numpy"],
            torch_random_seed=SEEDS["torch"],
            fewshot_random_seed=SEEDS["fewshot"],
        )
        scores = {task: scores_from_results(figures) for task, figures in results["results"].items()}
        del lm, results  # dropped here, so that scored_models can free the model before it loads the next
        part["artifacts"][name] = {
            "scores": {task: figures for task, figures in scores.items() if figures},
            "seconds": round(time.perf_counter() - started, 2),
        }
    # the table shows what was asked for: a group's aggregate, not its 57 subjects; a tag's tasks one by one (every
    # model is scored on the same tasks, so the adapter's scores say which there are)
    shown = [task for task in part["tasks"] if task in part["artifacts"]["adapter"]["scores"]]
    if len(shown) < len(part["tasks"]):
        shown += [task for task in counts if task not in shown]
    part["shown"] = shown
    part["artifacts"].update({name: {"skipped": reason} for name, reason in skipped.items()})
    part["artifacts"] = {name: part["artifacts"][name] for name in names}  # in the run's order
    log.info(f"task benchmarks ({describe_settings(part)}):")
    log.info(format_task_table(part))
    update_eval_report(trained.run_dir / EVAL_REPORT, {"tasks": part})
    return part
