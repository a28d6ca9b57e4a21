"""What every kind of training data ends as (tokenized splits and a report), and the steps they share: the
validation split, and the length histogram the run's page draws."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qtune.core.errors import DataError, RecipeError

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


@dataclass(frozen=True)
class Tokenization:
    """How one kind of data becomes a tokenized table (qtune.data.tokenized): the columns a source needs, their
    check, the batch function, and the columns of the table (with `keep`, `length` and the kind's counts)."""

    kind: str
    columns: Callable  # (DatasetSpec) -> the user's column names the format reads
    check_columns: Callable  # (column names, row count, DatasetSpec) -> None, or a DataError / RecipeError
    check_rows: Callable  # (plain rows, DatasetSpec) -> normalized rows (a file a loader refused)
    batch_function: Callable  # (DatasetSpec) -> the Dataset.map batch function (batch, indices) -> columns
    features: Callable  # () -> datasets.Features of the tokenized table
    sample_columns: tuple[str, ...]  # what training reads: the rest is bookkeeping, dropped from the splits
    unit: str  # what one sample is called in messages: "sample", "pair"
    settings: dict  # what else the tokens depend on (max_length, train_on_inputs, chat template, tokenizer, ...)


def mapped_columns(spec, names: tuple[str, ...]) -> dict[str, str]:
    """The user's column for each of a format's `names` (data.datasets columns), refusing a mapping of another name."""
    unknown = set(spec.columns) - set(names)
    if unknown:
        raise RecipeError(
            f"data.datasets columns maps unknown name(s) {sorted(unknown)} for format {spec.format}",
            fix=f"the {spec.format} format uses {list(names)}",
        )
    return {name: spec.columns.get(name, name) for name in names}


def require_columns(present, count: int, spec, source: dict[str, str], required) -> None:
    """Refuses an empty source, and one without the user's column for each `required` name (naming the columns it
    has)."""
    if not count:
        raise DataError(f"dataset is empty: {spec.path}", fix="add rows or remove it from data.datasets")
    for name in required:
        if source[name] not in present:
            raise DataError(
                f"'{source[name]}' is missing; the data has {sorted(present)}",
                where=spec.path,
                fix=f"map yours with columns: {{{name}: <your column>}}",
            )


def tokenize_sources(specs: list, how: Tokenization) -> list[tuple]:
    """(spec, tokenized table, whether it came from the cache) per source (qtune.data.tokenized)."""
    from qtune.data.readers import load_source, local_files, local_fingerprint, place_in
    from qtune.data.tokenized import code_fingerprint, tokenized_source

    code = code_fingerprint()
    tables = []
    for spec in specs:
        files = local_files(spec)
        columns = how.columns(spec)
        settings = {
            **how.settings,
            "kind": how.kind,
            "format": spec.format,
            "columns": columns,
            "mapping": spec.columns,
            "code": code,
        }
        table, cached = tokenized_source(
            spec,
            load=lambda scratch, spec=spec, columns=columns: load_source(spec, columns, scratch, how.check_rows),
            source_fingerprint=local_fingerprint(files) if files is not None else None,
            settings=settings,
            tokenize_batch=how.batch_function(spec),
            features=how.features(),
            place=lambda index, files=files: place_in(files, index),
            on_loaded=lambda raw, spec=spec, columns=columns: checked_columns(raw, spec, columns, how),
        )
        tables.append((spec, table, cached))
    return tables


def checked_columns(raw, spec, columns: list[str], how: Tokenization):
    """The loaded source with only the format's columns, once the kind has checked the columns it has."""
    how.check_columns(set(raw.column_names), len(raw), spec)
    return raw.select_columns([c for c in raw.column_names if c in columns])


def highest_id(tables: list[tuple]) -> int:
    """The highest token id of the tables' samples, from their top_id column (dropped samples count 0)."""
    import numpy as np

    return max((int(np.max(column(table, "top_id"), initial=0)) for _, table, _ in tables), default=0)


def column(table, name: str):
    """One column of a tokenized table as a numpy array (read from the Arrow file, not as Python objects)."""
    return table.data.column(name).to_numpy()


@dataclass
class Splits:
    """The training and validation samples (datasets.Dataset, memory-mapped; no validation: None), and for the report
    the numpy columns of the samples each holds and the tables' per-source counts."""

    train: Any
    val: Any | None
    train_columns: dict  # name -> numpy array over the training samples (length, supervised, ...)
    sources: list  # (spec, tokenized table, cached) of the training sources
    val_sources: list  # the same for data.val_datasets
    top_id: int | None = None  # the highest token id of every sample (None: a stream, not read ahead)


def kept(tables: list[tuple], how: Tokenization, counts: tuple[str, ...]):
    """The samples of the tables with `keep` set, in order, as one dataset of the sample columns; and the `counts`
    columns over those samples (numpy)."""
    import numpy as np
    from datasets import concatenate_datasets

    parts, columns = [], {name: [] for name in counts}
    for _, table, _ in tables:
        keep = np.flatnonzero(column(table, "keep"))
        parts.append(table.select_columns(list(how.sample_columns)).select(keep))
        for name in counts:
            columns[name].append(column(table, name)[keep])
    dataset = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    return dataset, {name: np.concatenate(values) for name, values in columns.items()}


def splits(data: DataSection, how: Tokenization, nothing_left: Callable, *, seed: int, counts: tuple[str, ...]):
    """The datasets tokenized (or read from the cache), and the validation split from data.val_datasets, or held out
    of the training samples (val_size), or none. With data.streaming: streamed_splits."""
    if data.streaming:
        return streamed_splits(data, how, nothing_left, seed=seed, counts=counts)
    sources = tokenize_sources(data.datasets, how)
    train, columns = kept(sources, how, counts)
    if len(train) == 0:
        raise nothing_left(sources, "training")
    val_sources: list = []
    val = None
    if data.val_datasets:
        val_sources = tokenize_sources(data.val_datasets, how)
        val, _ = kept(val_sources, how, ())
        if len(val) == 0:
            raise nothing_left(val_sources, "validation")
    elif validation_count(data, len(train)) > 0:
        held = held_out(len(train), validation_count(data, len(train)), seed, what=how.unit, val_size=data.val_size)
        import numpy as np

        is_held = np.zeros(len(train), dtype=bool)
        is_held[sorted(held)] = True
        val = train.select(np.flatnonzero(is_held))
        train = train.select(np.flatnonzero(~is_held))
        columns = {name: values[~is_held] for name, values in columns.items()}
    return Splits(train, val, columns, sources, val_sources, top_id=highest_id(sources + val_sources))


STREAM_SHUFFLE_BUFFER = 1000  # samples a stream is shuffled within (datasets' IterableDataset.shuffle)


def stream_source(spec, how: Tokenization):
    """One source as a stream (datasets' IterableDataset): its columns checked on its first row, its rows tokenized
    by the kind's batch function as they are read, the samples with nothing to learn left out."""
    import datasets

    from qtune.data.readers import LOCAL_SUFFIXES, datasets_quiet, hub_unreachable_problem, local_files, place_in
    from qtune.data.tokenized import BATCH_ROWS, RowProblem

    files = local_files(spec)
    with datasets_quiet():
        if files is None:
            hub_unreachable_problem(spec)
            raw = datasets.load_dataset(spec.path, spec.name, split=spec.split, streaming=True)
        else:
            kinds = {LOCAL_SUFFIXES[f.suffix] for f in files}
            if len(kinds) > 1:
                raise DataError(
                    f"a streamed folder holds one kind of file; {spec.path} has {sorted(kinds)}",
                    fix="split the folder by file type, one dataset each",
                )
            kind = kinds.pop()
            raw = datasets.load_dataset(
                "json" if kind == "jsonl" else kind,
                data_files=[str(f) for f in files],
                split="train",
                streaming=True,
                **({"keep_default_na": False} if kind == "csv" else {}),
            )
    first = next(iter(raw.take(1)), None)
    how.check_columns(set(first or {}), 1 if first else 0, spec)
    present = [c for c in how.columns(spec) if c in first]
    tokenize_batch = how.batch_function(spec)

    def tokenize_stream(batch, indices):  # runs as training reads: a bad row stops the run with its place
        try:
            return tokenize_batch(batch, indices)
        except RowProblem as problem:
            raise DataError(
                problem.what, where=f"{spec.path}, {place_in(files, problem.index)}", fix=problem.fix
            ) from None

    stream = raw.select_columns(present).map(
        tokenize_stream,
        batched=True,
        batch_size=BATCH_ROWS,
        with_indices=True,
        remove_columns=present,
        features=how.features(),
    )
    return stream.filter(lambda keep: keep, input_columns=["keep"], batched=True, batch_size=BATCH_ROWS)


def streamed_splits(data: DataSection, how: Tokenization, nothing_left: Callable, *, seed: int, counts):
    """The training stream (sources one after another, shuffled within a buffer, the run's seed) and the validation
    set: data.val_datasets tokenized as usual, or the first validation_count samples of the stream, which training
    then skips."""
    import numpy as np
    from datasets import Dataset, concatenate_datasets

    streams = [stream_source(spec, how) for spec in data.datasets]
    stream = streams[0] if len(streams) == 1 else concatenate_datasets(streams)
    val, val_sources, columns = None, [], {}
    if data.val_datasets:
        val_sources = tokenize_sources(data.val_datasets, how)
        val, columns = kept(val_sources, how, counts)
        if len(val) == 0:
            raise nothing_left(val_sources, "validation")
    elif validation_count(data, None):
        head = list(stream.take(validation_count(data, None)))
        if not head:
            raise DataError(
                "no sample of the stream has anything to learn", where=", ".join(s.path for s in data.datasets)
            )
        val = Dataset.from_list([{c: row[c] for c in how.sample_columns} for row in head], features=None)
        columns = {name: np.array([row[name] for row in head]) for name in counts}
        stream = stream.skip(len(head))
    train = stream.select_columns(list(how.sample_columns)).shuffle(seed=seed, buffer_size=STREAM_SHUFFLE_BUFFER)
    return Splits(train, val, columns, [], val_sources)


def streamed_report(data: DataSection, split: Splits) -> dict:
    """The data report of a stream: what is known before training reads it (the sources, the validation samples and
    their lengths); the training samples are counted by the run itself (metrics.json's train_tokens)."""
    lengths = split.train_columns.get("length")
    return {
        "streaming": True,
        "sources": [{"path": spec.path, "format": spec.format, "streamed": True} for spec in data.datasets]
        + [dict(s, role="validation") for s in source_counts(split.val_sources, ())],
        "val_samples": len(split.val) if split.val is not None else 0,
        "val_from_stream": not data.val_datasets and split.val is not None,
        "max_length": data.max_length,
        **(
            {
                "mean_tokens": round(float(lengths.sum()) / len(lengths), 1),
                "max_tokens": int(lengths.max()),
                "length_histogram": length_histogram(lengths, data.max_length),
            }
            if lengths is not None and len(lengths)
            else {}
        ),
    }


def streamed_line(report: dict, unit: str) -> str:
    """The data line `qtune train` prints for a stream."""
    count = len([s for s in report["sources"] if s.get("streamed")])
    val = report["val_samples"]
    where = "the first of the stream, which training skips" if report.get("val_from_stream") else "val_datasets"
    validation = f"{val} validation {unit}s ({where})" if val else f"no validation {unit}s"
    lengths = f"; validation mean {report['mean_tokens']} / max {report['max_tokens']} tokens" if val else ""
    return (
        f"data: streaming {count} dataset(s), tokenized as training reads them (max_length {report['max_length']}); "
        f"{validation}{lengths}"
    )


def source_counts(tables: list[tuple], names: tuple[str, ...]) -> list[dict]:
    """Per source: path, format, rows, the sum of each boolean column in `names` (truncated, ...), and whether its
    tokens came from the cache."""
    return [
        {
            "path": spec.path,
            "format": spec.format,
            "rows": len(table),
            **{name: int(column(table, name).sum()) for name in names},
            "dropped": len(table) - int(column(table, "keep").sum()),
            "cached": cached,
        }
        for spec, table, cached in tables
    ]


def cache_note(report: dict) -> str:
    """What the data line adds when tokens came from the cache: "; tokens from the cache" (or how many sources)."""
    cached = [s.get("cached", False) for s in report["sources"]]
    if not any(cached):
        return ""
    if all(cached):
        return "; tokens from the cache"
    return f"; tokens of {sum(cached)} of {len(cached)} datasets from the cache"


DEFAULT_VAL_SHARE = 0.02
DEFAULT_VAL_MOST = 1000  # a held-out loss on more samples says no more, and each evaluation pass costs them all
DEFAULT_STREAM_VAL = 200


def validation_count(data: DataSection, count: int | None) -> int:
    """How many of `count` samples data.val_size holds out (count None: a stream, whose total is unknown)."""
    if data.val_datasets or data.val_size == 0:
        return 0
    if data.val_size is None:
        if count is None:
            return DEFAULT_STREAM_VAL
        return min(max(1, round(count * DEFAULT_VAL_SHARE)), DEFAULT_VAL_MOST)
    if data.val_size >= 1:
        return int(data.val_size)
    return max(1, round(count * data.val_size))


def held_out(count: int, val_count: int, seed: int, what: str = "sample", val_size=None) -> set[int]:
    """The indices of `val_count` validation samples of `count`, drawn with the run's seed."""
    if count - val_count < 1:
        raise DataError(
            f"{count} usable {what}(s) is too few to hold out "
            + (f"val_size={val_size}" if val_size is not None else f"{val_count} for validation"),
            fix="add data, or set data.val_size: 0",
        )
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return set(order[:val_count])


def length_histogram(lengths, max_length: int, bins: int = 16) -> dict:
    """Sample lengths counted in `bins` equal bins from 0 to max_length (for the report page)."""
    import numpy as np

    width = max(1, -(-max_length // bins))
    edges = list(range(0, width * bins + 1, width))
    counts = np.bincount(np.minimum(np.asarray(lengths, dtype=np.int64) // width, bins - 1), minlength=bins)
    return {"edges": edges, "counts": [int(c) for c in counts]}


def lm_rows(dataset, answer_column: str):
    """prompt_ids + the `answer_column` ids of each sample as language-model rows (input_ids, labels on the answer
    only): what export fidelity, `qtune eval` and the run page's generations read of a kind with separate answers."""

    def join(batch):
        rows = list(zip(batch["prompt_ids"], batch[answer_column]))
        return {"input_ids": [p + a for p, a in rows], "labels": [[-100] * len(p) + a for p, a in rows]}

    return dataset.map(
        join, batched=True, remove_columns=dataset.column_names, new_fingerprint="lm-" + dataset._fingerprint
    )
