"""Labelled answers (KTO's data): `{prompt, completion, label}` rows -> tokenized (prompt, completion, label), checked
before any model is loaded.

One answer per prompt, marked good (`label: true`) or bad (`false`): the thumbs-up / thumbs-down feedback people
collect. The prompt is text or turns; the completion is text, or the assistant turns that follow the prompt. As for
preference pairs (qtune.data.pairs), the trainer receives the token ids: the prompt is never scored, the answer ends
with EOS (or the template's end of turn), and a row whose prompt fills max_length is counted and dropped here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from qtune.core.errors import DataError, RecipeError
from qtune.data.pairs import STYLES, common_prefix, turns
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

COLUMNS = ("prompt", "completion", "label")
TOKEN_COLUMNS = ("prompt_ids", "completion_ids", "label", "keep", "truncated", "no_room", "length", "tokens")
TOKEN_COLUMNS += ("supervised", "style", "top_id")
# what a label may be written as in JSON, CSV or Parquet: true / false (1 / 0 are equal keys), or the words
LABELS = {True: True, False: False, "true": True, "false": False, "1": True, "0": False}


def token_features():
    """The Arrow types of the tokenized table."""
    from datasets import Features, Sequence, Value

    ids, flag, count = Sequence(Value("int32")), Value("bool"), Value("int32")
    return Features(
        {
            "prompt_ids": ids,
            "completion_ids": ids,
            "label": flag,
            "keep": flag,
            "truncated": flag,
            "no_room": flag,
            "length": count,
            "tokens": count,
            "supervised": count,
            "style": Value("int8"),
            "top_id": count,
        }
    )


def column_sources(spec: DatasetSpec) -> dict[str, str]:
    """The user's column for prompt, completion and label (data.datasets columns)."""
    return mapped_columns(spec, COLUMNS)


def check_columns(present, count: int, spec: DatasetSpec) -> None:
    """Refuses an empty source, and one without a prompt, completion or label column (naming the columns it has)."""
    require_columns(present, count, spec, column_sources(spec), COLUMNS)


def normalize_labelled(row: dict, source: dict[str, str]) -> dict:
    """One row as {prompt, completion, label}: text or turns, and a bool (a DataError without a place)."""
    label = row.get(source["label"])
    key = label.strip().lower() if isinstance(label, str) else label
    if isinstance(key, float) and key in (0.0, 1.0):
        key = bool(key)
    if isinstance(key, (list, dict)) or key is None or key not in LABELS:
        raise DataError(
            f"'{source['label']}' is {label!r}, not a label", fix="write true (a good answer) or false (a bad one)"
        )
    prompt, completion = row.get(source["prompt"]), row.get(source["completion"])
    if isinstance(completion, str):
        if not isinstance(prompt, str):
            what = "missing" if prompt is None else f"{type(prompt).__name__}, expected text"
            raise DataError(f"'{source['prompt']}' is {what}", fix="a text answer needs a text prompt")
        if not completion.strip():
            raise DataError(f"'{source['completion']}' is empty", fix="fix or remove that row")
        return {"prompt": prompt, "completion": completion, "label": LABELS[key]}
    if isinstance(completion, list):
        if isinstance(prompt, str) and prompt.strip():
            prompt = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and prompt:
            prompt = turns(prompt, source["prompt"])
        else:
            raise DataError(f"'{source['prompt']}' is missing or empty", fix="give the prompt as text or turns")
        answer = turns(completion, source["completion"])
        if not answer or answer[0]["role"] != "assistant" or not any(t["content"].strip() for t in answer):
            raise DataError(f"'{source['completion']}' has no assistant answer", fix="fix or remove that row")
        return {"prompt": prompt, "completion": answer, "label": LABELS[key]}
    what = "missing" if completion is None else type(completion).__name__
    raise DataError(f"'{source['completion']}' is {what}", fix="give the answer as text or assistant turns")


def normalize_rows(rows: list[dict], spec: DatasetSpec) -> list[dict]:
    """Every row normalized, or the first bad one named by its row (and line): `qtune validate`'s check."""
    return normalized_rows(rows, spec, normalize_labelled, column_sources(spec))


def tokenize_labelled(row: dict, tokenizer, render: Callable | None) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) before truncation, as preference pairs are tokenized."""
    if isinstance(row["prompt"], str):
        prompt = tokenizer(row["prompt"]).input_ids
        return prompt, tokenizer(row["completion"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    prompt = tokenizer(render(row["prompt"], True), add_special_tokens=False).input_ids
    full = tokenizer(render(row["prompt"] + row["completion"], False), add_special_tokens=False).input_ids
    cut = common_prefix(prompt, full)  # tokens may merge across the prompt's end
    return prompt[:cut], full[cut:]


def batch_function(spec: DatasetSpec, tokenizer, data: DataSection, render: Callable | None) -> Callable:
    """The Dataset.map function from a batch of `spec`'s rows to the tokenized table's columns."""
    source = column_sources(spec)
    max_length = data.max_length

    def tokenize_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        from qtune.data.tokenized import RowProblem

        out = {name: [] for name in TOKEN_COLUMNS}
        for position, index in enumerate(indices):
            row = {name: values[position] for name, values in batch.items()}
            try:
                labelled = normalize_labelled(row, source)
                if render is None and isinstance(labelled["completion"], list):
                    raise RecipeError(
                        f"the tokenizer has no chat template for conversations ({spec.path})",
                        fix="set data.chat_template: chatml (or a Jinja template)",
                    )
                prompt, completion = tokenize_labelled(labelled, tokenizer, render)
            except DataError as e:
                raise RowProblem(index, e.what, e.fix) from None
            no_room = len(prompt) >= max_length
            truncated = not no_room and len(prompt) + len(completion) > max_length
            completion = completion[: max(0, max_length - len(prompt))]
            keep = not no_room
            out["prompt_ids"].append(prompt if keep else [])
            out["completion_ids"].append(completion if keep else [])
            out["label"].append(labelled["label"])
            out["keep"].append(keep)
            out["truncated"].append(truncated)
            out["no_room"].append(no_room)
            out["length"].append(len(prompt) + len(completion))
            out["tokens"].append(len(prompt) + len(completion))
            out["supervised"].append(len(completion))
            out["style"].append(STYLES.index(prompt_style(labelled["prompt"])))
            out["top_id"].append(max(prompt + completion) if keep else 0)
        return out

    return tokenize_batch


def tokenization(data: DataSection, tokenizer) -> Tokenization:
    """How labelled answers are tokenized with this tokenizer and data section (qtune.data.prepared.splits)."""
    from qtune.data.tokenized import tokenizer_fingerprint

    template, render = renderer(data, tokenizer)
    return Tokenization(
        kind="kto",
        columns=lambda spec: list(column_sources(spec).values()),
        check_columns=check_columns,
        check_rows=normalize_rows,
        batch_function=lambda spec: batch_function(spec, tokenizer, data, render if template is not None else None),
        features=token_features,
        unit="labelled answer",
        sample_columns=("prompt_ids", "completion_ids", "label"),
        settings={
            "max_length": data.max_length,
            "chat_template": template,
            "tokenizer": tokenizer_fingerprint(tokenizer),
        },
    )


def build(data: DataSection, tokenizer, *, seed: int) -> PreparedData:
    """Read, check, tokenize and split every labelled dataset of the recipe (a second start reads the cache)."""
    import numpy as np

    def nothing_to_learn(sources: list, role: str) -> DataError:
        counts = source_counts(sources, ("no_room",))
        return DataError(
            f"no usable {role} labelled answer: {sum(s['no_room'] for s in counts)} have a prompt that fills "
            f"max_length={data.max_length}",
            where=", ".join(spec.path for spec, _, _ in sources),
            fix="raise data.max_length",
        )

    how = tokenization(data, tokenizer)
    split = splits(data, how, nothing_to_learn, seed=seed, counts=("length", "tokens", "supervised"))
    if data.streaming:
        return PreparedData(split.train, split.val, streamed_report(data, split))
    sources = source_counts(split.sources, ("truncated", "no_room"))
    val_sources = source_counts(split.val_sources, ("truncated", "no_room"))
    styles = set()
    for _, table, _ in split.sources + split.val_sources:
        styles.update(STYLES[code] for code in np.unique(column(table, "style")))
    lengths = split.train_columns["length"]
    desirable = int(column(split.train, "label").sum())  # read from the Arrow column, not as Python objects
    report = {
        "sources": sources + [dict(s, role="validation") for s in val_sources],
        "train_samples": len(split.train),
        "val_samples": len(split.val) if split.val is not None else 0,
        "desirable": desirable,
        "undesirable": len(split.train) - desirable,
        "train_tokens": int(split.train_columns["tokens"].sum()),
        "train_supervised_tokens": int(split.train_columns["supervised"].sum()),
        "max_tokens": int(lengths.max()),
        "mean_tokens": round(float(lengths.sum()) / len(lengths), 1),
        "truncated": sum(s["truncated"] for s in sources),
        "dropped": sum(s["dropped"] for s in sources),
        "no_room": sum(s["no_room"] for s in sources),
        "max_length": data.max_length,
        "length_histogram": length_histogram(lengths, data.max_length),
        "prompt_style": styles.pop() if len(styles) == 1 else "chat",
        "highest_token_id": split.top_id,
    }
    return PreparedData(split.train, split.val, report)


def as_lm_samples(dataset):
    """The good answers with their prompts as language-model rows (input_ids, labels on the answer): what export
    fidelity, `qtune eval` and the run page's generations read."""
    good = dataset.filter(lambda batch: batch["label"], batched=True) if len(dataset) else dataset
    return lm_rows(good if len(good) else dataset, "completion_ids")  # no good answer in a split: all its answers


def describe(report: dict) -> str:
    """The data lines `qtune train` prints before the model loads: counts, good and bad answers, lengths, drops."""
    if report.get("streaming"):
        return streamed_line(report, "labelled answer")
    lines = [
        f"data: {report['train_samples']} train / {report['val_samples']} validation labelled answers "
        f"({report['desirable']} good, {report['undesirable']} bad), mean {report['mean_tokens']} / max "
        f"{report['max_tokens']} tokens per prompt + answer{cache_note(report)}"
    ]
    if report["truncated"] or report["dropped"]:
        lines.append(
            f"data: {report['truncated']} answer(s) truncated to max_length={report['max_length']}; dropped: "
            f"{report['no_room']} whose prompt leaves no room for an answer"
        )
    return "\n".join(lines)


LABELLED_DATA = DataKind(
    name="labelled answers",
    formats=("kto",),
    check_rows=normalize_rows,
    build=build,
    describe=describe,
    as_lm_samples=as_lm_samples,
)
