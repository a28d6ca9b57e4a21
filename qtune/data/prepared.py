"""What every kind of training data ends as (tokenized splits and a report), and the steps they share: the
validation split, and the length histogram the run's page draws."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qtune.core.errors import DataError

if TYPE_CHECKING:
    from qtune.config.recipe import DataSection


@dataclass
class PreparedData:
    """Tokenized training and validation splits (datasets.Dataset; no validation: None) and the data report."""

    train: Any
    val: Any | None
    report: dict


@dataclass(frozen=True)
class DataKind:
    """One kind of training data: the dataset formats it is written in, how it is tokenized and checked, the line
    that reports it, and its samples as language-model rows (input_ids, labels) for evaluation and export checks."""

    name: str
    formats: tuple[str, ...]
    check_rows: Callable  # (rows, DatasetSpec) -> normalized rows: every check that needs no tokenizer (validate's)
    build: Callable  # (DataSection, tokenizer, *, seed) -> PreparedData
    describe: Callable  # (data report) -> the lines printed before the model loads
    as_lm_samples: Callable  # (tokenized split) -> datasets.Dataset of input_ids and labels


def splits(data: DataSection, tokenize_specs: Callable, split_off: Callable, nothing_left: Callable, *, seed: int):
    """(train, validation or None, train sources' reports, validation sources' reports): the datasets tokenized,
    and the validation split from data.val_datasets, or held out of the training rows (val_size), or none."""
    sources: list[dict] = []
    train = tokenize_specs(data.datasets, sources)
    if len(train) == 0:
        raise nothing_left(sources, "training")
    val_sources: list[dict] = []
    if data.val_datasets:
        val = tokenize_specs(data.val_datasets, val_sources)
        if len(val) == 0:
            raise nothing_left(val_sources, "validation")
    elif data.val_size > 0:
        train, val = split_off(train, data.val_size, seed)
    else:
        val = None
    return train, val, sources, val_sources


def held_out(count: int, val_size: float, seed: int, what: str = "sample") -> set[int]:
    """The indices of the validation share, drawn with the run's seed."""
    val_count = max(1, round(count * val_size))
    if count - val_count < 1:
        raise DataError(
            f"{count} usable {what}(s) is too few to hold out val_size={val_size}",
            fix="add data, or set data.val_size: 0",
        )
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return set(order[:val_count])


def length_histogram(lengths: list[int], max_length: int, bins: int = 16) -> dict:
    """Sample lengths counted in `bins` equal bins from 0 to max_length (for the report page)."""
    width = max(1, -(-max_length // bins))
    edges = list(range(0, width * bins + 1, width))
    counts = [0] * bins
    for length in lengths:
        counts[min(length // width, bins - 1)] += 1
    return {"edges": edges, "counts": counts}
