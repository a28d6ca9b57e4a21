"""Prompts with reference answers (GRPO's data): `{prompt, answer}` rows -> the prompt as the model will read it, and
the answer the rewards check completions against, checked before any model is loaded.

The prompt is text (kept as written) or turns (rendered with the chat template and the assistant's opening, as SFT
renders a conversation's prompt). The answer is text (GSM8K's `answer` column holds the reasoning then `#### 42`: a
reward's reference pattern takes the part after `####`). A prompt that fills max_length is counted and dropped. As
every kind, the rows become cached Arrow tables (or a stream, with data.streaming) that carry the prompt's text and its
tokens together: the rewards read the text, generation the tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from qtune.core.errors import DataError, RecipeError
from qtune.data.pairs import STYLES, turns
from qtune.data.prepared import (
    DataKind,
    PreparedData,
    Tokenization,
    cache_note,
    column,
    length_histogram,
    lm_rows,
    mapped_columns,
    require_columns,
    source_counts,
    splits,
    streamed_line,
    streamed_report,
)
from qtune.data.readers import normalized_rows
from qtune.data.templates import prompt_style, renderer

if TYPE_CHECKING:
    from qtune.config.recipe import DataSection, DatasetSpec

COLUMNS = ("prompt", "answer")
TOKEN_COLUMNS = ("prompt", "answer", "prompt_ids", "answer_ids", "keep", "no_room", "length", "style", "top_id")


def token_features():
    """The Arrow types of the tokenized table: the prompt as the model reads it and the reference answer as written
    (the rewards read them), their tokens, and the bookkeeping columns."""
    from datasets import Features, Sequence, Value

    ids, flag = Sequence(Value("int32")), Value("bool")
    return Features(
        {
            "prompt": Value("string"),
            "answer": Value("string"),
            "prompt_ids": ids,
            "answer_ids": ids,
            "keep": flag,
            "no_room": flag,
            "length": Value("int32"),
            "style": Value("int8"),
            "top_id": Value("int32"),
        }
    )


def column_sources(spec: DatasetSpec) -> dict[str, str]:
    """The user's column for prompt and answer (data.datasets columns: GSM8K's question is `prompt: question`)."""
    return mapped_columns(spec, COLUMNS)


def check_columns(present, count: int, spec: DatasetSpec) -> None:
    """Refuses an empty source, and one without a prompt or answer column (naming the columns it has)."""
    require_columns(present, count, spec, column_sources(spec), COLUMNS)


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


def as_conversation(prompt: str, system_prompt: str) -> list[dict]:
    """A text prompt as data.system_prompt makes it: the system turn, then the prompt as the user's."""
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}]


def tokenize_prompt(row: dict, tokenizer, render: Callable | None) -> tuple[str, list[int], list[int]]:
    """(the prompt as the model reads it, its ids, the reference answer's ids + EOS): text is kept as written, turns are
    rendered with the chat template and the assistant's opening."""
    if isinstance(row["prompt"], list):
        text = render(row["prompt"], True)
        ids = tokenizer(text, add_special_tokens=False).input_ids
    else:
        text = row["prompt"]
        ids = tokenizer(text).input_ids
    return text, ids, tokenizer(row["answer"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def batch_function(spec: DatasetSpec, tokenizer, data: DataSection, render: Callable | None) -> Callable:
    """The Dataset.map function from a batch of `spec`'s rows to the tokenized table's columns."""
    source = column_sources(spec)

    def tokenize_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        from qtune.data.tokenized import RowProblem

        out = {name: [] for name in TOKEN_COLUMNS}
        for position, index in enumerate(indices):
            row = {name: values[position] for name, values in batch.items()}
            try:
                checked = normalize_prompt_answer(row, source)
                if data.system_prompt is not None and isinstance(checked["prompt"], str):
                    checked["prompt"] = as_conversation(checked["prompt"], data.system_prompt)
                if render is None and isinstance(checked["prompt"], list):
                    raise RecipeError(
                        f"the tokenizer has no chat template for conversation prompts ({spec.path})",
                        fix="set data.chat_template: chatml (or a Jinja template)",
                    )
                text, prompt_ids, answer_ids = tokenize_prompt(checked, tokenizer, render)
            except DataError as e:
                raise RowProblem(index, e.what, e.fix) from None
            keep = len(prompt_ids) < data.max_length  # a prompt that fills max_length leaves no room to answer
            out["prompt"].append(text if keep else "")
            out["answer"].append(checked["answer"])
            out["prompt_ids"].append(prompt_ids if keep else [])
            out["answer_ids"].append(answer_ids if keep else [])
            out["keep"].append(keep)
            out["no_room"].append(not keep)
            out["length"].append(len(prompt_ids))
            out["style"].append(STYLES.index(prompt_style(checked["prompt"])))
            out["top_id"].append(max(prompt_ids + answer_ids) if keep else 0)
        return out

    return tokenize_batch


def tokenization(data: DataSection, tokenizer) -> Tokenization:
    """How prompts with reference answers are tokenized with this tokenizer and data section
    (qtune.data.prepared.splits)."""
    from qtune.data.tokenized import tokenizer_fingerprint

    template, render = renderer(data, tokenizer)
    return Tokenization(
        kind="prompt_answer",
        columns=lambda spec: list(column_sources(spec).values()),
        check_columns=check_columns,
        check_rows=normalize_rows,
        batch_function=lambda spec: batch_function(spec, tokenizer, data, render if template is not None else None),
        features=token_features,
        unit="prompt",
        # the texts travel with their tokens: trl hands the prompts to the rewards, qtune's trainer the ids to generate
        sample_columns=("prompt", "answer", "prompt_ids", "answer_ids"),
        settings={
            "max_length": data.max_length,
            "chat_template": template,
            "system_prompt": data.system_prompt,
            "tokenizer": tokenizer_fingerprint(tokenizer),
        },
    )


def build(data: DataSection, tokenizer, *, seed: int) -> PreparedData:
    """Read, check, tokenize and split every prompt_answer dataset of the recipe (a second start reads the cache; with
    data.streaming, training tokenizes as it reads)."""
    import numpy as np

    def nothing_to_learn(sources: list, role: str) -> DataError:
        counts = source_counts(sources, ("no_room",))
        return DataError(
            f"no usable {role} prompt: {sum(s['no_room'] for s in counts)} fill max_length={data.max_length}",
            where=", ".join(spec.path for spec, _, _ in sources),
            fix="raise data.max_length",
        )

    how = tokenization(data, tokenizer)
    split = splits(data, how, nothing_to_learn, seed=seed, counts=("length",))
    if data.streaming:
        return PreparedData(split.train, split.val, streamed_report(data, split))
    sources = source_counts(split.sources, ("no_room",))
    val_sources = source_counts(split.val_sources, ("no_room",))
    styles = set()
    for _, table, _ in split.sources + split.val_sources:
        styles.update(STYLES[code] for code in np.unique(column(table, "style")))
    lengths = split.train_columns["length"]
    report = {
        "sources": sources + [dict(s, role="validation") for s in val_sources],
        "train_samples": len(split.train),
        "val_samples": len(split.val) if split.val is not None else 0,
        "train_tokens": int(lengths.sum()),
        "train_supervised_tokens": 0,
        "max_tokens": int(lengths.max()),
        "mean_tokens": round(float(lengths.sum()) / len(lengths), 1),
        "truncated": 0,
        "dropped": sum(s["dropped"] for s in sources),
        "max_length": data.max_length,
        "length_histogram": length_histogram(lengths, data.max_length),
        "prompt_style": styles.pop() if len(styles) == 1 else "chat",
        "highest_token_id": split.top_id,
    }
    return PreparedData(split.train, split.val, report)


def as_lm_samples(dataset):
    """The prompts with their reference answers as language-model rows (input_ids, labels on the answer): what
    export fidelity, `qtune eval` and the run page's generations read."""
    return lm_rows(dataset, "answer_ids")


def describe(report: dict) -> str:
    """The data line `qtune train` prints before the model loads."""
    if report.get("streaming"):
        return streamed_line(report, "prompt")
    line = (
        f"data: {report['train_samples']} train / {report['val_samples']} validation prompts with reference answers, "
        f"mean {report['mean_tokens']} / max {report['max_tokens']} prompt tokens{cache_note(report)}"
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
