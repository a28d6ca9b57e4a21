"""Task benchmark scores as `qtune eval --tasks` keeps them in eval_report.json ("tasks"), read back by the terminal
table, the run's page and the model card. Pure functions on plain dicts: nothing here needs lm-evaluation-harness.
"""

from __future__ import annotations

import math

# Result keys of lm-evaluation-harness that are not metrics
NOT_METRICS = {"alias", "name", "sample_len", "sample_count", "samples"}


def scores_from_results(results: dict) -> dict:
    """One task's lm-evaluation-harness results ({"acc,none": 0.6, "acc_stderr,none": 0.02, ...}) as
    {"acc": {"value": 0.6, "stderr": 0.02}}, in the harness's order (the first is the task's own metric). A metric
    under a filter other than "none" keeps it: "exact_match (strict-match)"."""
    scores = {}
    for key, value in results.items():
        metric, _, filter_name = key.partition(",")
        if metric in NOT_METRICS or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        stderr = results.get(f"{metric}_stderr,{filter_name}")
        name = metric if filter_name in ("", "none") else f"{metric} ({filter_name})"
        scores[name] = {
            "value": float(value),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None,
        }
    return scores


def score_rows(part: dict) -> list[dict]:
    """One row per artifact and task with its first metric, and the difference to the adapter's score; an
    artifact that was skipped is one row with the reason."""
    adapter = part["artifacts"].get("adapter", {}).get("scores", {})
    rows = []
    for name, entry in part["artifacts"].items():
        if "skipped" in entry:
            rows.append({"artifact": name, "skipped": entry["skipped"]})
            continue
        for task in part.get("shown") or entry["scores"]:
            metric, figure = next(iter(entry["scores"][task].items()))
            reference = adapter.get(task, {}).get(metric)
            rows.append(
                {
                    "artifact": name,
                    "task": task,
                    "metric": metric,
                    "value": figure["value"],
                    "stderr": figure["stderr"],
                    "vs_adapter": None
                    if reference is None or name == "adapter"
                    else figure["value"] - reference["value"],
                }
            )
    return rows


def format_stderr(stderr: float | None) -> str:
    """A standard error as the tables print it."""
    return "n/a" if stderr is None else f"{stderr:.4f}"


TABLE_HEADER = ["model", "task", "metric", "score", "± stderr", "vs adapter"]


def table_cells(part: dict) -> list[list[str]]:
    """The table's cells as text, one list per row of TABLE_HEADER (the terminal, the page and the model card);
    a skipped artifact's reason stands in the task column."""
    cells = []
    for row in score_rows(part):
        if "skipped" in row:
            cells.append([row["artifact"], f"skipped: {row['skipped']}", "", "", "", ""])
            continue
        diff = "" if row["vs_adapter"] is None else f"{row['vs_adapter']:+.4f}"
        cells.append(
            [row["artifact"], row["task"], row["metric"], f"{row['value']:.4f}", format_stderr(row["stderr"]), diff]
        )
    return cells


def format_task_table(part: dict) -> str:
    """The task table as the terminal prints it."""

    def line(cells: list[str]) -> str:
        if cells[1].startswith("skipped: "):
            return f"{cells[0]:<14} {cells[1]}"
        return f"{cells[0]:<14} {cells[1]:<18} {cells[2]:<10} {cells[3]:>7} {cells[4]:>9} {cells[5]:>11}"

    return "\n".join(line(cells) for cells in [TABLE_HEADER, *table_cells(part)])


def markdown_task_table(part: dict) -> list[str]:
    """The task table as Markdown lines (the model card)."""
    rows = [TABLE_HEADER, ["---"] * len(TABLE_HEADER), *table_cells(part)]
    return ["| " + " | ".join(cells) + " |" for cells in rows]


def describe_settings(part: dict) -> str:
    """The one line that says what the scores were measured on."""
    limit = f"at most {part['limit']} docs per task" if part.get("limit") else "all docs"
    shots = "the tasks' own few-shot counts" if part.get("num_fewshot") is None else f"{part['num_fewshot']}-shot"
    seeds = part["seeds"]
    return (
        f"{part['harness']}; {', '.join(part['tasks'])}; {limit}; {shots}; seeds random {seeds['random']}, "
        f"numpy {seeds['numpy']}, torch {seeds['torch']}, few-shot {seeds['fewshot']}"
    )
