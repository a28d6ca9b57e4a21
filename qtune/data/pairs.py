"""Preference data: pairs -> tokenized (prompt, chosen, rejected), checked before any model is loaded.

Rows are `{prompt, chosen, rejected}` with text answers, or `chosen` / `rejected` as conversations whose prompt is
either a separate field (messages or text) or the turns both conversations share (the explicit and implicit layouts
of the Hub's preference sets, e.g. ultrafeedback-binarized). trl's DPOTrainer receives the token ids as they are:
the prompt is never scored, the answers end with EOS (or the template's end of turn), and every pair that cannot
teach anything (identical answers, a prompt that fills max_length) is counted and dropped here, where the user sees
it, instead of silently inside the trainer.
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
from qtune.data.sft import SHAREGPT_ROLES, check_messages
from qtune.data.templates import prompt_style, renderer

if TYPE_CHECKING:
    from qtune.config.recipe import DataSection, DatasetSpec

COLUMNS = ("prompt", "chosen", "rejected")


# The columns of the tokenized table: the pairs, and what the split and the data report count
TOKEN_COLUMNS = (
    "prompt_ids",
    "chosen_ids",
    "rejected_ids",
    "keep",
    "truncated",
    "identical",
    "no_room",
    "length",
    "tokens",
    "supervised",
    "style",
    "top_id",
)
STYLES = ("raw", "alpaca", "chat")  # prompt_style's answers, as the style column's codes


def token_features():
    """The Arrow types of the tokenized table."""
    from datasets import Features, Sequence, Value

    ids = Sequence(Value("int32"))
    flag, count = Value("bool"), Value("int32")
    return Features(
        {
            "prompt_ids": ids,
            "chosen_ids": ids,
            "rejected_ids": ids,
            "keep": flag,
            "truncated": flag,
            "identical": flag,
            "no_room": flag,
            "length": count,  # prompt + the longer answer
            "tokens": count,  # both sequences: the prompt twice, each answer once
            "supervised": count,  # both answers
            "style": Value("int8"),
            "top_id": count,  # the pair's highest token id (the vocabulary check reads this, not the ids)
        }
    )


# --------------------------------------------------------------------------- rows -> pairs


def turns(value, column: str) -> list[dict]:
    """A conversation in either key style (role/content or sharegpt's from/value)."""
    first = value[0] if isinstance(value, list) and value else None
    try:
        if isinstance(first, dict) and first.get("from") is not None:
            return check_messages(value, "from", "value", SHAREGPT_ROLES)
        return check_messages(value, "role", "content", None)
    except DataError as e:
        raise DataError(f"{e.what} in '{column}'", fix=e.fix) from None


def split_conversations(prompt, chosen: list[dict], rejected: list[dict]):
    """(prompt turns, chosen turns, rejected turns): the turns both conversations start with (implicit layout), or
    else the row's own prompt (explicit layout). The answers start at an assistant turn, never inside the prompt."""
    shared = common_prefix(chosen, rejected)
    while shared > 0 and (shared >= len(chosen) or chosen[shared]["role"] != "assistant"):
        shared -= 1
    if shared:
        head, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    elif isinstance(prompt, list):
        head = prompt
    elif isinstance(prompt, str) and prompt.strip():
        head = [{"role": "user", "content": prompt}]
    else:
        raise DataError(
            "no prompt: give a 'prompt' field, or chosen and rejected conversations that start with the same turns",
            fix="fix or remove that row",
        )
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer or answer[0]["role"] != "assistant":
            raise DataError(f"'{name}' has no assistant answer after the prompt", fix="fix or remove that row")
        if not any(turn["content"].strip() for turn in answer):
            raise DataError(f"'{name}' is empty", fix="fix or remove that row")
    return head, chosen, rejected


def column_sources(spec: DatasetSpec) -> dict[str, str]:
    """The user's column for prompt, chosen and rejected (data.datasets columns), refusing a mapping to no name."""
    return mapped_columns(spec, COLUMNS)


def check_columns(present, count: int, spec: DatasetSpec) -> None:
    """Refuses an empty source, and one without a chosen or rejected column (naming the columns it has)."""
    require_columns(present, count, spec, column_sources(spec), ("chosen", "rejected"))


def normalize_pair(row: dict, source: dict[str, str]) -> dict:
    """One row as {prompt, chosen, rejected}: three strings, or three lists of turns (a DataError without a place)."""
    for name in ("chosen", "rejected"):
        if row.get(source[name]) is None:
            raise DataError(
                f"'{source[name]}' is missing; the row has {sorted(k for k, v in row.items() if v is not None)}",
                fix=f"map yours with columns: {{{name}: <your column>}}",
            )
    prompt, chosen, rejected = (row.get(source[name]) for name in COLUMNS)
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str):
            what = "missing" if prompt is None else f"{type(prompt).__name__}, expected text"
            raise DataError(f"'{source['prompt']}' is {what}", fix="text answers need a text prompt")
        for name, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise DataError(f"'{source[name]}' is empty", fix="fix or remove that row")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if isinstance(chosen, list) and isinstance(rejected, list):
        if isinstance(prompt, list):
            prompt = turns(prompt, source["prompt"])
        elif prompt is not None and not isinstance(prompt, str):
            raise DataError(f"'{source['prompt']}' is {type(prompt).__name__}", fix="give text or turns")
        head, chosen_turns, rejected_turns = split_conversations(
            prompt, turns(chosen, source["chosen"]), turns(rejected, source["rejected"])
        )
        return {"prompt": head, "chosen": chosen_turns, "rejected": rejected_turns}
    raise DataError(
        f"'chosen' and 'rejected' must both be text or both be conversations (got "
        f"{type(chosen).__name__} and {type(rejected).__name__})",
        fix="fix or remove that row",
    )


def normalize_pairs(rows: list[dict], spec: DatasetSpec) -> list[dict]:
    """Every row normalized (normalize_pair), or the first bad one named by its row (and line): `qtune validate`'s
    check, with no tokenizer."""
    return normalized_rows(rows, spec, normalize_pair, column_sources(spec))


# --------------------------------------------------------------------------- pairs -> tokens


def common_prefix(a: list, b: list) -> int:
    """How many leading items `a` and `b` share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_pair(pair: dict, tokenizer, render: Callable | None) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen ids, rejected ids) before truncation."""
    if isinstance(pair["prompt"], str):
        # as prompt_completion rows are tokenized for SFT: apart, so the boundary is exact; EOS ends each answer
        prompt = tokenizer(pair["prompt"]).input_ids
        answers = [
            tokenizer(pair[k], add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for k in COLUMNS[1:]
        ]
        return prompt, answers[0], answers[1]
    prompt_text = render(pair["prompt"], True)
    prompt = tokenizer(prompt_text, add_special_tokens=False).input_ids
    full = [tokenizer(render(pair["prompt"] + pair[k], False), add_special_tokens=False).input_ids for k in COLUMNS[1:]]
    # tokens may merge across the prompt's end: the prompt is what both full renderings share with it
    cut = min(common_prefix(prompt, full[0]), common_prefix(prompt, full[1]))
    return prompt[:cut], full[0][cut:], full[1][cut:]


def batch_function(spec: DatasetSpec, tokenizer, data: DataSection, render: Callable | None) -> Callable:
    """The Dataset.map function that makes a batch of `spec`'s rows into the tokenized table's columns: each pair
    checked and tokenized (tokenize_pair), then cut to max_length, with `keep` false for a pair that cannot teach
    (identical answers, a prompt that fills max_length), each counted by its reason."""
    source = column_sources(spec)
    max_length = data.max_length

    def tokenize_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        from qtune.data.tokenized import RowProblem

        out = {name: [] for name in TOKEN_COLUMNS}
        for position, index in enumerate(indices):
            row = {name: values[position] for name, values in batch.items()}
            try:
                pair = normalize_pair(row, source)
                if render is None and isinstance(pair["chosen"], list):
                    raise RecipeError(
                        f"the tokenizer has no chat template for conversation pairs ({spec.path})",
                        fix="set data.chat_template: chatml (or a Jinja template)",
                    )
                prompt, chosen, rejected = tokenize_pair(pair, tokenizer, render)
            except DataError as e:
                raise RowProblem(index, e.what, e.fix) from None
            truncated = identical = no_room = False
            if chosen == rejected:
                identical = True
            elif len(prompt) >= max_length:
                no_room = True
            else:
                room = max_length - len(prompt)
                if len(chosen) > room or len(rejected) > room:
                    truncated = True
                    chosen, rejected = chosen[:room], rejected[:room]
                    identical = chosen == rejected  # they differed only past max_length
            keep = not (identical or no_room)
            out["prompt_ids"].append(prompt if keep else [])
            out["chosen_ids"].append(chosen if keep else [])
            out["rejected_ids"].append(rejected if keep else [])
            out["keep"].append(keep)
            out["truncated"].append(truncated)
            out["identical"].append(identical)
            out["no_room"].append(no_room)
            out["length"].append(len(prompt) + max(len(chosen), len(rejected)))
            out["tokens"].append(2 * len(prompt) + len(chosen) + len(rejected))
            out["supervised"].append(len(chosen) + len(rejected))
            out["style"].append(STYLES.index(prompt_style(pair["prompt"])))
            out["top_id"].append(max(prompt + chosen + rejected) if keep else 0)
        return out

    return tokenize_batch


def tokenization(data: DataSection, tokenizer) -> Tokenization:
    """How preference pairs are tokenized with this tokenizer and data section (qtune.data.prepared.splits)."""
    from qtune.data.tokenized import tokenizer_fingerprint

    template, render = renderer(data, tokenizer)
    return Tokenization(
        kind="preference",
        columns=lambda spec: list(column_sources(spec).values()),
        check_columns=check_columns,
        check_rows=normalize_pairs,
        batch_function=lambda spec: batch_function(spec, tokenizer, data, render if template is not None else None),
        features=token_features,
        unit="pair",
        sample_columns=("prompt_ids", "chosen_ids", "rejected_ids"),
        settings={
            "max_length": data.max_length,
            "chat_template": template,
            "tokenizer": tokenizer_fingerprint(tokenizer),
        },
    )


def build(data: DataSection, tokenizer, *, seed: int) -> PreparedData:
    """Read, check, tokenize and split every preference dataset of the recipe (a second start reads the cache)."""
    import numpy as np

    def nothing_to_learn(sources: list, role: str) -> DataError:
        counts = source_counts(sources, ("identical", "no_room"))
        return DataError(
            f"no usable {role} preference pair: {sum(s['identical'] for s in counts)} have identical chosen and "
            f"rejected answers, {sum(s['no_room'] for s in counts)} a prompt that fills max_length={data.max_length}",
            where=", ".join(spec.path for spec, _, _ in sources),
            fix="check that chosen and rejected differ, or raise data.max_length",
        )

    how = tokenization(data, tokenizer)
    split = splits(data, how, nothing_to_learn, seed=seed, counts=("length", "tokens", "supervised"))
    if data.streaming:
        return PreparedData(split.train, split.val, streamed_report(data, split))
    counted = ("truncated", "identical", "no_room")
    sources = source_counts(split.sources, counted)
    val_sources = source_counts(split.val_sources, counted)
    styles = set()
    for _, table, _ in split.sources + split.val_sources:  # every pair's prompt style, dropped pairs included
        styles.update(STYLES[code] for code in np.unique(column(table, "style")))
    lengths = split.train_columns["length"]
    report = {
        "sources": sources + [dict(s, role="validation") for s in val_sources],
        "train_samples": len(split.train),
        "val_samples": len(split.val) if split.val is not None else 0,
        # every pair is two sequences: the prompt twice, each answer once
        "train_tokens": int(split.train_columns["tokens"].sum()),
        "train_supervised_tokens": int(split.train_columns["supervised"].sum()),
        "max_tokens": int(lengths.max()),
        "mean_tokens": round(float(lengths.sum()) / len(lengths), 1),
        "truncated": sum(s["truncated"] for s in sources),
        "dropped": sum(s["dropped"] for s in sources),
        "identical": sum(s["identical"] for s in sources),
        "no_room": sum(s["no_room"] for s in sources),
        "max_length": data.max_length,
        "length_histogram": length_histogram(lengths, data.max_length),
        # how `qtune chat` writes its prompts (a mix of styles: the chat template, if there is one)
        "prompt_style": styles.pop() if len(styles) == 1 else "chat",
        "highest_token_id": split.top_id,
    }
    return PreparedData(split.train, split.val, report)


def as_lm_samples(dataset):
    """The pairs' prompt + chosen answer as language-model rows (input_ids, labels on the answer): what export
    fidelity, `qtune eval` and the run page's generations read."""
    return lm_rows(dataset, "chosen_ids")


def describe(report: dict) -> str:
    """The data lines `qtune train` prints before the model loads: counts, lengths, truncated and dropped pairs."""
    if report.get("streaming"):
        return streamed_line(report, "preference pair")
    lines = [
        f"data: {report['train_samples']} train / {report['val_samples']} validation preference pairs, "
        f"mean {report['mean_tokens']} / max {report['max_tokens']} tokens per prompt + longer answer"
        f"{cache_note(report)}"
    ]
    if report["truncated"] or report["dropped"]:
        lines.append(
            f"data: {report['truncated']} pair(s) truncated to max_length={report['max_length']}; dropped: "
            f"{report['identical']} with identical chosen and rejected answers, {report['no_room']} whose prompt "
            "leaves no room for an answer"
        )
    return "\n".join(lines)


PAIR_DATA = DataKind(
    name="preference pairs",
    formats=("preference",),
    check_rows=normalize_pairs,
    build=build,
    describe=describe,
    as_lm_samples=as_lm_samples,
)
