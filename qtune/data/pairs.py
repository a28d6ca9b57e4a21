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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qtune.core.errors import DataError, RecipeError
from qtune.data.prepared import DataKind, PreparedData, held_out, length_histogram, splits
from qtune.data.readers import place_of, read_rows
from qtune.data.sft import SHAREGPT_ROLES, check_messages
from qtune.data.templates import prompt_style, renderer

if TYPE_CHECKING:
    from qtune.config.recipe import DataSection, DatasetSpec

COLUMNS = ("prompt", "chosen", "rejected")


@dataclass
class PairSplit:
    """Token ids of each pair's prompt, chosen and rejected answer, before they become a datasets.Dataset."""

    prompt_ids: list[list[int]] = field(default_factory=list)
    chosen_ids: list[list[int]] = field(default_factory=list)
    rejected_ids: list[list[int]] = field(default_factory=list)

    def add(self, prompt, chosen, rejected) -> None:
        """Appends one tokenized pair."""
        self.prompt_ids.append(prompt)
        self.chosen_ids.append(chosen)
        self.rejected_ids.append(rejected)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def to_dataset(self):
        """The pairs as a datasets.Dataset of prompt_ids, chosen_ids and rejected_ids."""
        from datasets import Dataset

        return Dataset.from_dict(
            {"prompt_ids": self.prompt_ids, "chosen_ids": self.chosen_ids, "rejected_ids": self.rejected_ids}
        )


# --------------------------------------------------------------------------- rows -> pairs


def turns(value, at: str, column: str) -> list[dict]:
    """A conversation in either key style (role/content or sharegpt's from/value)."""
    first = value[0] if isinstance(value, list) and value else None
    if isinstance(first, dict) and "from" in first:
        return check_messages(value, f"{at} ({column})", "from", "value", SHAREGPT_ROLES)
    return check_messages(value, f"{at} ({column})", "role", "content", None)


def split_conversations(prompt, chosen: list[dict], rejected: list[dict], at: str):
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
            where=at,
            fix="fix or remove that row",
        )
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer or answer[0]["role"] != "assistant":
            raise DataError(
                f"'{name}' has no assistant answer after the prompt", where=at, fix="fix or remove that row"
            )
        if not any(turn["content"].strip() for turn in answer):
            raise DataError(f"'{name}' is empty", where=at, fix="fix or remove that row")
    return head, chosen, rejected


def normalize_pairs(rows: list[dict], spec: DatasetSpec) -> list[dict]:
    """Each row as {prompt, chosen, rejected}: three strings, or three lists of turns."""
    where = spec.path
    if not rows:
        raise DataError(f"dataset is empty: {where}", fix="add rows or remove it from data.datasets")
    unknown = set(spec.columns) - set(COLUMNS)
    if unknown:
        raise RecipeError(
            f"data.datasets columns maps unknown name(s) {sorted(unknown)} for format preference",
            fix=f"the preference format uses {list(COLUMNS)}",
        )
    source = {name: spec.columns.get(name, name) for name in COLUMNS}
    pairs = []
    for index, row in enumerate(rows):
        at = f"{where}, {place_of(rows, index)}"
        for name in ("chosen", "rejected"):
            if row.get(source[name]) is None:
                raise DataError(
                    f"'{source[name]}' is missing; the row has {sorted(row)}",
                    where=at,
                    fix=f"map yours with columns: {{{name}: <your column>}}",
                )
        prompt, chosen, rejected = (row.get(source[name]) for name in COLUMNS)
        if isinstance(chosen, str) and isinstance(rejected, str):
            if not isinstance(prompt, str):
                what = "missing" if prompt is None else f"{type(prompt).__name__}, expected text"
                raise DataError(f"'{source['prompt']}' is {what}", where=at, fix="text answers need a text prompt")
            for name, text in (("chosen", chosen), ("rejected", rejected)):
                if not text.strip():
                    raise DataError(f"'{source[name]}' is empty", where=at, fix="fix or remove that row")
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        elif isinstance(chosen, list) and isinstance(rejected, list):
            if isinstance(prompt, list):
                prompt = turns(prompt, at, source["prompt"])
            elif prompt is not None and not isinstance(prompt, str):
                raise DataError(f"'{source['prompt']}' is {type(prompt).__name__}", where=at, fix="give text or turns")
            head, chosen_turns, rejected_turns = split_conversations(
                prompt, turns(chosen, at, source["chosen"]), turns(rejected, at, source["rejected"]), at
            )
            pairs.append({"prompt": head, "chosen": chosen_turns, "rejected": rejected_turns})
        else:
            raise DataError(
                f"'chosen' and 'rejected' must both be text or both be conversations (got "
                f"{type(chosen).__name__} and {type(rejected).__name__})",
                where=at,
                fix="fix or remove that row",
            )
    return pairs


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


def build(data: DataSection, tokenizer, *, seed: int) -> PreparedData:
    """Read, check, tokenize and split every preference dataset of the recipe."""
    template, render = renderer(data, tokenizer)

    def tokenize_specs(specs: list[DatasetSpec], report_rows: list[dict]) -> PairSplit:
        split = PairSplit()
        for spec in specs:
            pairs = normalize_pairs(read_rows(spec), spec)
            if template is None and isinstance(pairs[0]["chosen"], list):
                raise RecipeError(
                    f"the tokenizer has no chat template for conversation pairs ({spec.path})",
                    fix="set data.chat_template: chatml (or a Jinja template)",
                )
            styles.update(prompt_style(pair["prompt"]) for pair in pairs)
            stats = {"path": spec.path, "format": "preference", "rows": len(pairs), "truncated": 0}
            stats.update(identical=0, no_room=0, dropped=0)
            for pair in pairs:
                prompt, chosen, rejected = tokenize_pair(pair, tokenizer, render)
                if chosen == rejected:
                    stats["identical"] += 1
                    continue
                if len(prompt) >= data.max_length:
                    stats["no_room"] += 1
                    continue
                room = data.max_length - len(prompt)
                if len(chosen) > room or len(rejected) > room:
                    stats["truncated"] += 1
                    chosen, rejected = chosen[:room], rejected[:room]
                    if chosen == rejected:  # they differed only past max_length
                        stats["identical"] += 1
                        continue
                split.add(prompt, chosen, rejected)
            stats["dropped"] = stats["identical"] + stats["no_room"]
            report_rows.append(stats)
        return split

    styles: set[str] = set()

    def nothing_to_learn(sources: list[dict], role: str) -> DataError:
        return DataError(
            f"no usable {role} preference pair: {sum(s['identical'] for s in sources)} have identical chosen and "
            f"rejected answers, {sum(s['no_room'] for s in sources)} a prompt that fills max_length={data.max_length}",
            where=", ".join(s["path"] for s in sources),
            fix="check that chosen and rejected differ, or raise data.max_length",
        )

    train, val, sources, val_sources = splits(data, tokenize_specs, split_off_validation, nothing_to_learn, seed=seed)
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(train.prompt_ids, train.chosen_ids, train.rejected_ids)]
    report = {
        "sources": sources + [dict(s, role="validation") for s in val_sources],
        "train_samples": len(train),
        "val_samples": len(val) if val is not None else 0,
        # every pair is two sequences: the prompt twice, each answer once
        "train_tokens": 2 * sum(map(len, train.prompt_ids)) + sum(map(len, train.chosen_ids + train.rejected_ids)),
        "train_supervised_tokens": sum(map(len, train.chosen_ids + train.rejected_ids)),
        "max_tokens": max(lengths),
        "mean_tokens": round(sum(lengths) / len(lengths), 1),
        "truncated": sum(s["truncated"] for s in sources),
        "dropped": sum(s["dropped"] for s in sources),
        "identical": sum(s["identical"] for s in sources),
        "no_room": sum(s["no_room"] for s in sources),
        "max_length": data.max_length,
        "length_histogram": length_histogram(lengths, data.max_length),
        # how `qtune chat` writes its prompts (a mix of styles: the chat template, if there is one)
        "prompt_style": styles.pop() if len(styles) == 1 else "chat",
    }
    return PreparedData(train.to_dataset(), val.to_dataset() if val is not None else None, report)


def split_off_validation(pairs: PairSplit, val_size: float, seed: int) -> tuple[PairSplit, PairSplit]:
    """(train, validation): the validation share of the pairs held out with the run's seed."""
    held = held_out(len(pairs), val_size, seed, what="pair")
    train, val = PairSplit(), PairSplit()
    for i in range(len(pairs)):
        (val if i in held else train).add(pairs.prompt_ids[i], pairs.chosen_ids[i], pairs.rejected_ids[i])
    return train, val


def as_lm_samples(dataset):
    """The pairs' prompt + chosen answer as language-model rows (input_ids, labels on the answer): what export
    fidelity, `qtune eval` and the run page's generations read."""
    from datasets import Dataset

    ids = [p + c for p, c in zip(dataset["prompt_ids"], dataset["chosen_ids"])]
    labels = [[-100] * len(p) + c for p, c in zip(dataset["prompt_ids"], dataset["chosen_ids"])]
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def describe(report: dict) -> str:
    """The data lines `qtune train` prints before the model loads: counts, lengths, truncated and dropped pairs."""
    lines = [
        f"data: {report['train_samples']} train / {report['val_samples']} validation preference pairs, "
        f"mean {report['mean_tokens']} / max {report['max_tokens']} tokens per prompt + longer answer"
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
