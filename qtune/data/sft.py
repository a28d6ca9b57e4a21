"""Supervised fine-tuning data: datasets -> tokenized rows with labels, checked before any model is loaded.

Every format ends as `input_ids` + `labels` (-100 where no loss is taken), so trl's SFTTrainer gets pre-tokenized
data and the masking is ours to check: prompts and user turns masked unless `train_on_inputs`, EOS / end-of-turn
supervised so the model learns to stop, truncation counted, and rows left with nothing to learn dropped and reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qtune.core.errors import DataError, RecipeError
from qtune.data.prepared import DataKind, PreparedData, held_out, length_histogram, splits
from qtune.data.readers import place_of, read_rows
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


@dataclass
class TokenizedSplit:
    """Token ids and labels of each sample, before they become a datasets.Dataset."""

    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)

    def to_dataset(self):
        """The samples as a datasets.Dataset of input_ids and labels."""
        from datasets import Dataset

        return Dataset.from_dict({"input_ids": self.input_ids, "labels": self.labels})

    def __len__(self) -> int:
        return len(self.input_ids)


# --------------------------------------------------------------------------- rows -> samples


def normalize_rows(rows: list[dict], spec: DatasetSpec) -> list[dict]:
    """Rename the user's columns, check them, and turn each row into one of three shapes:
    {prompt, completion}, {messages} or {text}."""
    where = spec.path
    if not rows:
        raise DataError(f"dataset is empty: {where}", fix="add rows or remove it from data.datasets")
    required, optional = FORMAT_COLUMNS[spec.format]
    unknown_targets = set(spec.columns) - set(required) - set(optional)
    if unknown_targets:
        raise RecipeError(
            f"data.datasets columns maps unknown name(s) {sorted(unknown_targets)} for format {spec.format}",
            fix=f"the {spec.format} format uses {required + optional}",
        )
    source = {name: spec.columns.get(name, name) for name in required + optional}
    present = set(rows[0])
    for name in required:
        if source[name] not in present:
            raise DataError(
                f"column '{source[name]}' missing for format {spec.format}; the data has {sorted(present)}",
                where=where,
                fix=f"map yours with columns: {{{name}: <your column>}}"
                if source[name] == name
                else "check data.datasets columns",
            )
    samples = []
    for index, row in enumerate(rows):
        get = lambda name, row=row: row.get(source[name])  # noqa: E731
        at = f"{where}, {place_of(rows, index)}"
        if spec.format == "alpaca":
            instruction, output, extra = get("instruction"), get("output"), get("input") or ""
            check_text(instruction, "instruction", at)
            check_text(output, "output", at)
            check_text(extra, "input", at)
            samples.append({"prompt": alpaca_prompt(instruction, extra), "completion": output})
        elif spec.format == "prompt_completion":
            prompt, completion = get("prompt"), get("completion")
            check_text(prompt, "prompt", at)
            check_text(completion, "completion", at)
            samples.append({"prompt": prompt, "completion": completion})
        elif spec.format == "messages":
            samples.append({"messages": check_messages(get("messages"), at, "role", "content", None)})
        elif spec.format == "sharegpt":
            samples.append({"messages": check_messages(get("conversations"), at, "from", "value", SHAREGPT_ROLES)})
        else:
            text = get("text")
            check_text(text, "text", at)
            samples.append({"text": text})
    return samples


def check_text(value, column: str, at: str) -> None:
    """Refuses a value that is not text, naming its column and row."""
    if not isinstance(value, str):
        raise DataError(f"'{column}' is {type(value).__name__}, expected text", where=at, fix="fix or remove that row")


def check_messages(turns, at: str, role_key: str, content_key: str, role_map: dict | None) -> list[dict]:
    """A conversation as role/content turns with known roles (sharegpt's keys and roles mapped by `role_map`)."""
    if not isinstance(turns, list) or not turns:
        raise DataError("conversation is not a non-empty list of turns", where=at, fix="fix or remove that row")
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise DataError(f"turn {number} needs '{role_key}' and '{content_key}'", where=at)
        role = turn[role_key]
        role = role_map.get(role, role) if role_map else role
        if role not in CHAT_ROLES:
            raise DataError(
                f"turn {number} has unknown role {turn[role_key]!r}", where=at, fix=f"use one of {sorted(CHAT_ROLES)}"
            )
        check_text(turn[content_key], f"turn {number} {content_key}", at)
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


def build(data: DataSection, tokenizer, *, seed: int) -> PreparedData:
    """Read, check, tokenize, truncate and split every dataset of the recipe."""
    template, render = renderer(data, tokenizer)

    def tokenize_specs(specs: list[DatasetSpec], report_rows: list[dict]) -> TokenizedSplit:
        split = TokenizedSplit()
        for spec in specs:
            samples = normalize_rows(read_rows(spec), spec)
            if template is None and spec.format in ("messages", "sharegpt"):
                raise RecipeError(
                    f"the tokenizer has no chat template for {spec.format} data ({spec.path})",
                    fix="set data.chat_template: chatml (or a Jinja template)",
                )
            stats = {"path": spec.path, "format": spec.format, "rows": len(samples), "truncated": 0, "dropped": 0}
            for sample in samples:
                ids, labels = tokenize_sample(sample, tokenizer, train_on_inputs=data.train_on_inputs, render=render)
                if len(ids) > data.max_length:
                    stats["truncated"] += 1
                    ids, labels = ids[: data.max_length], labels[: data.max_length]
                if all(label == -100 for label in labels[1:]):  # the first label is never predicted
                    stats["dropped"] += 1
                    continue
                split.input_ids.append(ids)
                split.labels.append(labels)
            report_rows.append(stats)
        return split

    def nothing_to_learn(sources: list[dict], role: str) -> DataError:
        return DataError(
            f"no {role} sample has a supervised token after masking and truncation",
            where=", ".join(s["path"] for s in sources),
            fix="check completions/assistant turns are not empty, raise data.max_length, or set data.train_on_inputs: true",
        )

    train, val, sources, val_sources = splits(data, tokenize_specs, split_off_validation, nothing_to_learn, seed=seed)
    report = {
        "sources": sources + [dict(s, role="validation") for s in val_sources],
        "train_samples": len(train),
        "val_samples": len(val) if val is not None else 0,
        "train_tokens": sum(map(len, train.input_ids)),
        "train_supervised_tokens": sum(sum(1 for x in row[1:] if x != -100) for row in train.labels),
        "max_tokens": max(map(len, train.input_ids)),
        "mean_tokens": round(sum(map(len, train.input_ids)) / len(train), 1),
        "truncated": sum(s["truncated"] for s in sources),
        "dropped": sum(s["dropped"] for s in sources),
        "max_length": data.max_length,
        "length_histogram": length_histogram(list(map(len, train.input_ids)), data.max_length),
    }
    return PreparedData(train.to_dataset(), val.to_dataset() if val is not None else None, report)


def split_off_validation(rows: TokenizedSplit, val_size: float, seed: int) -> tuple[TokenizedSplit, TokenizedSplit]:
    """(train, validation): the validation share of the samples held out with the run's seed."""
    count = len(rows)
    held = held_out(count, val_size, seed)
    train, val = TokenizedSplit(), TokenizedSplit()
    for i in range(count):
        target = val if i in held else train
        target.input_ids.append(rows.input_ids[i])
        target.labels.append(rows.labels[i])
    return train, val


def describe(report: dict) -> str:
    """The data lines `qtune train` prints before the model loads: counts, tokens, truncated and dropped samples."""
    lines = [
        f"data: {report['train_samples']} train / {report['val_samples']} validation samples, "
        f"{report['train_tokens']} tokens ({report['train_supervised_tokens']} supervised), "
        f"mean {report['mean_tokens']} / max {report['max_tokens']} tokens per sample"
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
