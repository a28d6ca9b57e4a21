"""Prompts with reference answers (GRPO's data): `{prompt, answer}` rows -> the prompt as the model will read it, and
the answer the rewards check completions against, checked before any model is loaded.

The prompt is text (kept as written) or turns (rendered with the chat template and the assistant's opening, as SFT
renders a conversation's prompt). The answer is text (GSM8K's `answer` column holds the reasoning then `#### 42`: a
reward's reference pattern takes the part after `####`). A prompt that fills max_length is counted and dropped.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from qtune.core.errors import DataError, RecipeError
from qtune.data.pairs import turns
from qtune.data.prepared import DataKind, PreparedData, lm_rows
from qtune.data.readers import normalized_rows, read_rows
from qtune.data.templates import prompt_style, renderer

if TYPE_CHECKING:
    from qtune.config.recipe import DataSection, DatasetSpec

COLUMNS = ("prompt", "answer")


def column_sources(spec: DatasetSpec) -> dict[str, str]:
    """The user's column for prompt and answer (data.datasets columns: GSM8K's question is `prompt: question`)."""
    unknown = set(spec.columns) - set(COLUMNS)
    if unknown:
        raise RecipeError(
            f"data.datasets columns maps unknown name(s) {sorted(unknown)} for format prompt_answer",
            fix=f"the prompt_answer format uses {list(COLUMNS)}",
        )
    return {name: spec.columns.get(name, name) for name in COLUMNS}


def normalize_prompt_answer(row: dict, source: dict[str, str]) -> dict:
    """One row as {prompt: text or turns, answer: text} (a DataError without a place)."""
    prompt, answer = row.get(source["prompt"]), row.get(source["answer"])
    if prompt is None:
        have = sorted(k for k, v in row.items() if v is not None)
        raise DataError(f"'{source['prompt']}' is missing; the row has {have}", fix="map yours with columns:")
    if isinstance(prompt, list):
        prompt = turns(prompt, source["prompt"])
        if not prompt or prompt[-1]["role"] == "assistant":
            raise DataError(f"'{source['prompt']}' must end with a user turn", fix="fix or remove that row")
    elif not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"'{source['prompt']}' is empty or not text", fix="give the prompt as text or turns")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        what = "missing" if answer is None else "empty" if isinstance(answer, str) else type(answer).__name__
        raise DataError(f"'{source['answer']}' is {what}", fix="give each prompt its reference answer as text")
    return {"prompt": prompt, "answer": answer}


def normalize_rows(rows: list[dict], spec: DatasetSpec) -> list[dict]:
    """Every row normalized, or the first bad one named by its row (and line): `qtune validate`'s check."""
    return normalized_rows(rows, spec, normalize_prompt_answer, column_sources(spec))


def rendered_rows(specs: list, data: DataSection, tokenizer) -> tuple[list[dict], dict]:
    """Every row of `specs` as {prompt: the text the model reads, answer, prompt_tokens}, and the counts."""
    template, render = renderer(data, tokenizer)
    rows, dropped, styles = [], 0, set()
    for spec in specs:
        for row in normalize_rows(read_rows(spec), spec):
            styles.add(prompt_style(row["prompt"]))
            if isinstance(row["prompt"], list):
                if template is None:
                    raise RecipeError(
                        f"the tokenizer has no chat template for conversation prompts ({spec.path})",
                        fix="set data.chat_template: chatml (or a Jinja template)",
                    )
                text = render(row["prompt"], True)
                ids = tokenizer(text, add_special_tokens=False).input_ids
            else:
                text = row["prompt"]
                ids = tokenizer(text).input_ids
            if len(ids) >= data.max_length:
                dropped += 1
                continue
            answer_ids = tokenizer(row["answer"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            rows.append({"prompt": text, "answer": row["answer"], "prompt_ids": ids, "answer_ids": answer_ids})
    return rows, {"dropped": dropped, "styles": styles}


def build(data: DataSection, tokenizer, *, seed: int) -> PreparedData:
    """Read, check and render every prompt_answer dataset; hold out data.val_size (or data.val_datasets)."""
    from datasets import Dataset

    rows, counts = rendered_rows(data.datasets, data, tokenizer)
    if not rows:
        raise DataError(
            f"no usable prompt: {counts['dropped']} fill max_length={data.max_length}",
            where=", ".join(spec.path for spec in data.datasets),
            fix="raise data.max_length",
        )
    if data.val_datasets:
        val_rows, _ = rendered_rows(data.val_datasets, data, tokenizer)
    else:
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        held = int(round(len(rows) * data.val_size)) if data.val_size < 1 else int(data.val_size)
        val_rows = [rows[i] for i in order[:held]]
        rows = [rows[i] for i in sorted(order[held:])]
    lengths = [len(row["prompt_ids"]) for row in rows]
    report = {
        "sources": [{"path": spec.path, "format": spec.format} for spec in data.datasets],
        "train_samples": len(rows),
        "val_samples": len(val_rows),
        "train_tokens": sum(lengths),
        "train_supervised_tokens": 0,
        "max_tokens": max(lengths),
        "mean_tokens": round(sum(lengths) / len(lengths), 1),
        "truncated": 0,
        "dropped": counts["dropped"],
        "max_length": data.max_length,
        "prompt_style": counts["styles"].pop() if len(counts["styles"]) == 1 else "chat",
        "highest_token_id": max(max(r["prompt_ids"] + r["answer_ids"]) for r in rows),
    }
    val = Dataset.from_list(val_rows) if val_rows else None
    return PreparedData(Dataset.from_list(rows), val, report)


def as_lm_samples(dataset):
    """The prompts with their reference answers as language-model rows (input_ids, labels on the answer): what
    export fidelity, `qtune eval` and the run page's generations read."""
    return lm_rows(dataset, "answer_ids")


def describe(report: dict) -> str:
    """The data line `qtune train` prints before the model loads."""
    line = (
        f"data: {report['train_samples']} train / {report['val_samples']} validation prompts with reference answers, "
        f"mean {report['mean_tokens']} / max {report['max_tokens']} prompt tokens"
    )
    if report["dropped"]:
        line += f"; dropped: {report['dropped']} whose prompt fills max_length={report['max_length']}"
    return line


PROMPT_DATA = DataKind(
    name="prompts with reference answers",
    formats=("prompt_answer",),
    check_rows=normalize_rows,
    build=build,
    describe=describe,
    as_lm_samples=as_lm_samples,
)
