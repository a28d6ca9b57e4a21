"""Supervised fine-tuning data: datasets -> tokenized rows with labels, checked before any model is loaded.

Every format ends as `input_ids` + `labels` (-100 where no loss is taken), so trl's SFTTrainer gets pre-tokenized
data and the masking is ours to check: prompts and user turns masked unless `train_on_inputs`, EOS / end-of-turn
supervised so the model learns to stop, truncation counted, and rows left with nothing to learn dropped and reported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from qtune.core.errors import DataError, RecipeError
from qtune.data.prepared import (
    DataKind,
    PreparedData,
    Tokenization,
    cache_note,
    length_histogram,
    source_counts,
    splits,
    streamed_line,
    streamed_report,
)
from qtune.data.readers import place_of
from qtune.data.templates import alpaca_prompt, renderer

if TYPE_CHECKING:
    from qtune.config.recipe import DataSection, DatasetSpec

# The columns (required, optional) of each format of supervised data
FORMAT_COLUMNS = {
    "alpaca": (["instruction", "output"], ["input"]),
    "prompt_completion": (["prompt", "completion"], []),
    "messages": (["messages"], []),
    "sharegpt": (["conversations"], []),
    "text": (["text"], []),
}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
}
CHAT_ROLES = {"system", "user", "assistant", "tool"}


# The columns of the tokenized table: the samples, and what the split and the data report count
TOKEN_COLUMNS = ("input_ids", "labels", "keep", "truncated", "length", "supervised", "top_id")


def token_features():
    """The Arrow types of the tokenized table (int32 ids: half of datasets' default int64)."""
    from datasets import Features, Sequence, Value

    return Features(
        {
            "input_ids": Sequence(Value("int32")),
            "labels": Sequence(Value("int32")),
            "keep": Value("bool"),
            "truncated": Value("bool"),
            "length": Value("int32"),
            "supervised": Value("int32"),
            "top_id": Value("int32"),  # the sample's highest token id (the vocabulary check reads this, not the ids)
        }
    )


# --------------------------------------------------------------------------- rows -> samples


def column_sources(spec: DatasetSpec) -> dict[str, str]:
    """The user's column for each of the format's names (data.datasets columns), refusing a mapping to no name."""
    required, optional = FORMAT_COLUMNS[spec.format]
    unknown_targets = set(spec.columns) - set(required) - set(optional)
    if unknown_targets:
        raise RecipeError(
            f"data.datasets columns maps unknown name(s) {sorted(unknown_targets)} for format {spec.format}",
            fix=f"the {spec.format} format uses {required + optional}",
        )
    return {name: spec.columns.get(name, name) for name in required + optional}


def check_columns(present, count: int, spec: DatasetSpec) -> None:
    """Refuses an empty source, and one without a column its format needs (naming the columns it has)."""
    if not count:
        raise DataError(f"dataset is empty: {spec.path}", fix="add rows or remove it from data.datasets")
    source = column_sources(spec)
    for name in FORMAT_COLUMNS[spec.format][0]:
        if source[name] not in present:
            raise DataError(
                f"column '{source[name]}' missing for format {spec.format}; the data has {sorted(present)}",
                where=spec.path,
                fix=f"map yours with columns: {{{name}: <your column>}}"
                if source[name] == name
                else "check data.datasets columns",
            )


def normalize_row(row: dict, spec: DatasetSpec, source: dict[str, str]) -> dict:
    """One row as {prompt, completion}, {messages} or {text}, its values checked (a DataError without a place)."""

    def get(name):
        return row.get(source[name])

    if spec.format == "alpaca":
        instruction, output, extra = get("instruction"), get("output"), get("input") or ""
        check_text(instruction, "instruction")
        check_text(output, "output")
        check_text(extra, "input")
        return {"prompt": alpaca_prompt(instruction, extra), "completion": output}
    if spec.format == "prompt_completion":
        prompt, completion = get("prompt"), get("completion")
        check_text(prompt, "prompt")
        check_text(completion, "completion")
        return {"prompt": prompt, "completion": completion}
    if spec.format == "messages":
        return {"messages": check_messages(get("messages"), "role", "content", None)}
    if spec.format == "sharegpt":
        return {"messages": check_messages(get("conversations"), "from", "value", SHAREGPT_ROLES)}
    text = get("text")
    check_text(text, "text")
    return {"text": text}


def normalize_rows(rows: list[dict], spec: DatasetSpec) -> list[dict]:
    """Every row normalized (normalize_row), or the first bad one named by its row (and line): `qtune validate`'s
    check, with no tokenizer."""
    check_columns(set(rows[0]) if rows else set(), len(rows), spec)
    source = column_sources(spec)
    samples = []
    for index, row in enumerate(rows):
        try:
            samples.append(normalize_row(row, spec, source))
        except DataError as e:
            raise DataError(e.what, where=f"{spec.path}, {place_of(rows, index)}", fix=e.fix) from None
    return samples


def check_text(value, column: str) -> None:
    """Refuses a value that is not text, naming its column (the caller names the row)."""
    if not isinstance(value, str):
        raise DataError(f"'{column}' is {type(value).__name__}, expected text", fix="fix or remove that row")


def check_messages(turns, role_key: str, content_key: str, role_map: dict | None) -> list[dict]:
    """A conversation as role/content turns with known roles (sharegpt's keys and roles mapped by `role_map`). A key
    that is null counts as missing: Arrow gives every turn of a column every key any turn has."""
    if not isinstance(turns, list) or not turns:
        raise DataError("conversation is not a non-empty list of turns", fix="fix or remove that row")
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or turn.get(role_key) is None or turn.get(content_key) is None:
            raise DataError(f"turn {number} needs '{role_key}' and '{content_key}'", fix="fix or remove that row")
        role = turn[role_key]
        role = role_map.get(role, role) if role_map else role
        if role not in CHAT_ROLES:
            raise DataError(
                f"turn {number} has unknown role {turn[role_key]!r}", fix=f"use one of {sorted(CHAT_ROLES)}"
            )
        check_text(turn[content_key], f"turn {number} {content_key}")
        messages.append({"role": role, "content": turn[content_key]})
    return messages


# --------------------------------------------------------------------------- samples -> tokens


def tokenize_sample(
    sample: dict, tokenizer, *, train_on_inputs: bool, render: Callable | None
) -> tuple[list[int], list[int]]:
    """One sample -> (input_ids, labels) before truncation."""
    eos = tokenizer.eos_token_id
    if "text" in sample:
        ids = tokenizer(sample["text"]).input_ids
        if not ids or ids[-1] != eos:
            ids = ids + [eos]
        return ids, list(ids)
    if "prompt" in sample:
        # Tokenized apart so the boundary is exact; EOS ends the completion so the model learns to stop.
        prompt_ids = tokenizer(sample["prompt"]).input_ids
        completion_ids = tokenizer(sample["completion"], add_special_tokens=False).input_ids + [eos]
        ids = prompt_ids + completion_ids
        labels = list(ids) if train_on_inputs else [-100] * len(prompt_ids) + completion_ids
        return ids, labels
    messages = sample["messages"]
    text = render(messages, False)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding.input_ids
    if train_on_inputs:
        return ids, list(ids)
    spans = assistant_spans(messages, render, text)
    labels = [
        token if any(start <= begin < end for start, end in spans) else -100
        for token, (begin, _) in zip(ids, encoding.offset_mapping)
    ]
    return ids, labels


def assistant_spans(messages: list[dict], render: Callable, full_text: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns (with their end-of-turn marker) in the rendered text.

    Found by rendering the conversation up to each assistant turn with and without it, which works
    for any template whose rendering of a prefix is a prefix of the whole; no `{% generation %}`
    markers needed (most published templates lack them).
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        through = render(messages[: i + 1], False)
        if not (through.startswith(before) and full_text.startswith(through)):
            raise DataError(
                "the chat template renders earlier turns differently once later turns follow, "
                "so assistant turns cannot be located for masking",
                fix="set data.chat_template: chatml, or data.train_on_inputs: true",
            )
        spans.append((len(before), len(through)))
    return spans


def batch_function(spec: DatasetSpec, tokenizer, data: DataSection, render: Callable | None) -> Callable:
    """The Dataset.map function that makes a batch of `spec`'s rows into the tokenized table's columns: the rows
    checked, prompts and completions (or texts) tokenized as batches, the messages formats row by row (their masks come
    from the rendered text), then truncation to max_length and `keep` false for a sample left with nothing to learn.
    The tokens are tokenize_sample's, row for row (tests/test_data_scale.py checks the parity)."""
    source = column_sources(spec)
    eos = tokenizer.eos_token_id
    max_length, train_on_inputs = data.max_length, data.train_on_inputs

    def tokenize_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        from qtune.data.tokenized import RowProblem

        size = len(indices)
        rows = [{name: values[i] for name, values in batch.items()} for i in range(size)]
        samples = []
        for index, row in zip(indices, rows):
            try:
                samples.append(normalize_row(row, spec, source))
            except DataError as e:
                raise RowProblem(index, e.what, e.fix) from None
        if "prompt" in samples[0]:
            # tokenized apart, so the boundary is exact; EOS ends the completion so the model learns to stop
            prompts = tokenizer([s["prompt"] for s in samples]).input_ids
            completions = tokenizer([s["completion"] for s in samples], add_special_tokens=False).input_ids
            pairs = []
            for prompt_ids, completion_ids in zip(prompts, completions):
                completion_ids = completion_ids + [eos]
                ids = prompt_ids + completion_ids
                pairs.append((ids, list(ids) if train_on_inputs else [-100] * len(prompt_ids) + completion_ids))
        elif "text" in samples[0]:
            pairs = []
            for ids in tokenizer([s["text"] for s in samples]).input_ids:
                if not ids or ids[-1] != eos:
                    ids = ids + [eos]
                pairs.append((ids, list(ids)))
        else:
            pairs = []
            for index, sample in zip(indices, samples):
                try:
                    pairs.append(tokenize_sample(sample, tokenizer, train_on_inputs=train_on_inputs, render=render))
                except DataError as e:
                    raise RowProblem(index, e.what, e.fix) from None
        out = {name: [] for name in TOKEN_COLUMNS}
        for ids, labels in pairs:
            truncated = len(ids) > max_length
            if truncated:
                ids, labels = ids[:max_length], labels[:max_length]
            supervised = sum(1 for label in labels[1:] if label != -100)  # the first label is never predicted
            keep = supervised > 0
            out["input_ids"].append(ids if keep else [])
            out["labels"].append(labels if keep else [])
            out["keep"].append(keep)
            out["truncated"].append(truncated)
            out["length"].append(len(ids))
            out["supervised"].append(supervised)
            out["top_id"].append(max(ids) if keep and ids else 0)
        return out

    return tokenize_batch


def tokenization(data: DataSection, tokenizer) -> Tokenization:
    """How supervised data are tokenized with this tokenizer and data section (qtune.data.prepared.splits)."""
    from qtune.data.tokenized import tokenizer_fingerprint

    template, render = renderer(data, tokenizer)

    def batch_for(spec: DatasetSpec) -> Callable:
        if template is None and spec.format in ("messages", "sharegpt"):
            raise RecipeError(
                f"the tokenizer has no chat template for {spec.format} data ({spec.path})",
                fix="set data.chat_template: chatml (or a Jinja template)",
            )
        return batch_function(spec, tokenizer, data, render)

    return Tokenization(
        kind="sft",
        columns=lambda spec: list(column_sources(spec).values()),
        check_columns=check_columns,
        check_rows=normalize_rows,
        batch_function=batch_for,
        features=token_features,
        unit="sample",
        sample_columns=("input_ids", "labels"),
        settings={
            "max_length": data.max_length,
            "train_on_inputs": data.train_on_inputs,
            "chat_template": template,
            "tokenizer": tokenizer_fingerprint(tokenizer),
        },
    )


def build(data: DataSection, tokenizer, *, seed: int) -> PreparedData:
    """Read, check, tokenize, truncate and split every dataset of the recipe (a second start reads the cache)."""

    def nothing_to_learn(sources: list, role: str) -> DataError:
        return DataError(
            f"no {role} sample has a supervised token after masking and truncation",
            where=", ".join(spec.path for spec, _, _ in sources),
            fix="check completions/assistant turns are not empty, raise data.max_length, or set data.train_on_inputs: true",
        )

    how = tokenization(data, tokenizer)
    split = splits(data, how, nothing_to_learn, seed=seed, counts=("length", "supervised"))
    if data.streaming:
        return PreparedData(split.train, split.val, streamed_report(data, split))
    sources = source_counts(split.sources, ("truncated",))
    val_sources = source_counts(split.val_sources, ("truncated",))
    lengths, supervised = split.train_columns["length"], split.train_columns["supervised"]
    report = {
        "sources": sources + [dict(s, role="validation") for s in val_sources],
        "train_samples": len(split.train),
        "val_samples": len(split.val) if split.val is not None else 0,
        "train_tokens": int(lengths.sum()),
        "train_supervised_tokens": int(supervised.sum()),
        "max_tokens": int(lengths.max()),
        "mean_tokens": round(float(lengths.sum()) / len(lengths), 1),
        "truncated": sum(s["truncated"] for s in sources),
        "dropped": sum(s["dropped"] for s in sources),
        "max_length": data.max_length,
        "length_histogram": length_histogram(lengths, data.max_length),
        "highest_token_id": split.top_id,
    }
    return PreparedData(split.train, split.val, report)


def describe(report: dict) -> str:
    """The data lines `qtune train` prints before the model loads: counts, tokens, truncated and dropped samples."""
    if report.get("streaming"):
        return streamed_line(report, "sample")
    lines = [
        f"data: {report['train_samples']} train / {report['val_samples']} validation samples, "
        f"{report['train_tokens']} tokens ({report['train_supervised_tokens']} supervised), "
        f"mean {report['mean_tokens']} / max {report['max_tokens']} tokens per sample{cache_note(report)}"
    ]
    if report["truncated"] or report["dropped"]:
        lines.append(
            f"data: {report['truncated']} sample(s) truncated to max_length={report['max_length']}, "
            f"{report['dropped']} dropped (nothing left to learn after masking/truncation)"
        )
    return "\n".join(lines)


def as_lm_samples(dataset):
    """Supervised samples are language-model rows already."""
    return dataset


SFT_DATA = DataKind(
    name="supervised samples",
    formats=tuple(FORMAT_COLUMNS),
    check_rows=normalize_rows,
    build=build,
    describe=describe,
    as_lm_samples=as_lm_samples,
)
