"""Reading a dataset source: local .json / .jsonl / .csv / .parquet files or folders of them, or a Hub dataset.

Training reads a source as an Arrow table with datasets' own loaders (load_source), written to disk and
memory-mapped, never as a Python list of every row. When a loader refuses a file (a broken line, bytes that are not
UTF-8, a value whose type changes between rows), the file is read line by line as plain rows (read_local_file), which
names the line and the problem; `qtune validate` reads that way too. A bad line is reported by its number, before
anything is tokenized."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from qtune.core.errors import DataError, EnvironmentProblem
from qtune.core.fs import names_a_local_path, no_such_path
from qtune.core.network import hub_unreachable

if TYPE_CHECKING:
    from qtune.config.recipe import DatasetSpec

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}


class Rows(list):
    """A source's rows, and for a JSONL file the line each came from (blank lines are skipped, so the Nth row need
    not be on line N): error messages name both."""

    def __init__(self, rows, lines: list[int] | None = None):
        super().__init__(rows)
        self.lines = lines

    def place(self, index: int) -> str:
        """Where row `index` is, as an error message names it: "row 3 (line 5)"."""
        return f"row {index + 1}" + (f" (line {self.lines[index]})" if self.lines else "")


def place_of(rows: list, index: int) -> str:
    """Where row `index` of `rows` is: with its line number when the rows came from a JSONL file."""
    return rows.place(index) if isinstance(rows, Rows) else f"row {index + 1}"


def local_files(spec: DatasetSpec) -> list[Path] | None:
    """The data files of a local source (a file, or a folder's .json/.jsonl/.csv/.parquet files, sorted); None for a
    Hub dataset id."""
    path = Path(spec.path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise DataError(f"folder has no .json/.jsonl/.csv/.parquet files: {spec.path}", fix="point at a data file")
        return files
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise DataError(
                f"unsupported data file type '{path.suffix}': {path}", fix="use .json, .jsonl, .csv or .parquet"
            )
        return [path]
    if names_a_local_path(spec.path):
        raise DataError(f"dataset file not found: {spec.path}", fix=no_such_path(spec.path, "the dataset path", "file"))
    return None


def read_rows(spec: DatasetSpec) -> list[dict]:
    """Rows of one dataset source as plain dicts (`qtune validate`'s reading; training uses load_source)."""
    files = local_files(spec)
    if files is None:
        return read_hub_dataset(spec).to_list()
    if len(files) == 1:
        return read_local_file(files[0])
    return [row for f in files for row in read_local_file(f)]


def local_fingerprint(files: list[Path]) -> str:
    """A hash of the files' names and bytes: what a local source's tokens depend on."""
    from qtune.data.tokenized import file_digest

    return json.dumps([[f.name, f.stat().st_size, file_digest(f)] for f in files])


def load_source(spec: DatasetSpec, columns: list[str], scratch: Path, check_rows):
    """(the source as a datasets.Dataset of the format's `columns`, a Hub dataset's fingerprint or None for local files,
    whose fingerprint the caller took from their bytes before: local_fingerprint): local files through datasets'
    json / csv / parquet loaders into `scratch`; a Hub dataset through load_dataset (its own cache). A file a loader
    refuses is read as plain rows and checked by `check_rows(rows, spec)`, which names the bad line or row."""
    import datasets

    files = local_files(spec)
    if files is None:
        dataset = read_hub_dataset(spec)
        return dataset, json.dumps([spec.path, spec.name, spec.split, dataset._fingerprint])
    parts = []
    for path in files:
        kind = LOCAL_SUFFIXES[path.suffix]
        # an empty cell is "" as pandas reads it in read_local_file, not None
        options = {"keep_default_na": False} if kind == "csv" else {}
        if kind != "parquet" and not is_utf8(path):  # pyarrow's JSON reader takes any bytes; the rows name the line
            parts = None
            break
        try:
            with datasets_quiet():
                part = datasets.load_dataset(
                    "json" if kind == "jsonl" else kind,
                    data_files=str(path),
                    split="train",
                    cache_dir=str(scratch),
                    **options,
                )
        except Exception:  # the loaders raise many types for a file they refuse: its rows say which one and why
            part = None
        if part is None or (len(part) and not set(columns) & set(part.column_names)) or has_temporal(part, columns):
            parts = None
            break
        parts.append(part)
    if parts is not None:
        try:
            if len(parts) > 1:  # the files' other columns may differ: only the format's are read
                parts = [p.select_columns([c for c in p.column_names if c in columns]) for p in parts]
            return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts), None
        except ValueError:  # the files' column types differ: as rows
            pass
    rows = read_rows(spec)
    check_rows(rows, spec)
    names = [c for c in columns if any(c in row for row in rows)]
    return datasets.Dataset.from_dict({c: [row.get(c) for row in rows] for c in names}), None


def has_temporal(dataset, columns: list[str]) -> bool:
    """Whether pyarrow read a format column as dates or times (it infers them from ISO-8601 text): that text is read
    as plain rows instead, where it stays text."""
    return any(
        getattr(dataset.features.get(c), "dtype", "").startswith(("timestamp", "date", "time"))
        for c in columns
        if c in dataset.column_names
    )


def is_utf8(path: Path) -> bool:
    """Whether a file's bytes are UTF-8 text, read in chunks (never the whole file in memory)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as f:
            while chunk := f.read(16 * 2**20):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


@contextmanager
def datasets_quiet():
    """datasets' loaders without their "Generating train split" bar and logs for a file qtune reads."""
    import datasets

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def line_of_row(path: Path, index: int) -> int | None:
    """The line of a JSONL file's row `index` (blank lines are not rows)."""
    with path.open("rb") as f:
        row = -1
        for number, line in enumerate(f, start=1):
            if line.strip():
                row += 1
                if row == index:
                    return number
    return None


def place_in(files: list[Path] | None, index: int) -> str:
    """Where row `index` of a source is, as an error message names it: "row 3 (line 5)" in a JSONL file."""
    if files and len(files) == 1 and files[0].suffix == ".jsonl":
        line = line_of_row(files[0], index)
        if line is not None:
            return f"row {index + 1} (line {line})"
    return f"row {index + 1}"


def read_local_file(path: Path) -> list[dict]:
    """The rows of one .json / .jsonl / .csv / .parquet file; a bad line is reported by its number."""
    kind = LOCAL_SUFFIXES.get(path.suffix)
    if kind is None:
        raise DataError(
            f"unsupported data file type '{path.suffix}': {path}", fix="use .json, .jsonl, .csv or .parquet"
        )
    if kind in ("csv", "parquet"):
        import pandas as pd

        try:
            frame = pd.read_csv(path, keep_default_na=False) if kind == "csv" else pd.read_parquet(path)
        except UnicodeDecodeError as e:
            raise DataError(
                f"file is not UTF-8 text (byte {e.start})", where=str(path), fix="re-save it as UTF-8"
            ) from None
        except Exception as e:  # pandas raises many types for a broken file
            raise DataError(f"cannot read {kind} file: {str(e).splitlines()[0]}", where=str(path)) from None
        return frame.to_dict(orient="records")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"file is not UTF-8 text (line {line}, byte {e.start})", where=str(path), fix="re-save it as UTF-8"
        ) from None
    if kind == "json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON at line {e.lineno}: {e.msg}", where=str(path), fix="fix that line") from None
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
        if bad is not None:
            raise DataError(f"item {bad} of the JSON list is not an object", where=str(path))
        return rows
    rows, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"invalid JSON on line {number}: {e.msg}", where=str(path), fix="fix or remove that line"
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"line {number} is not a JSON object", where=str(path), fix="one object per line")
        rows.append(row)
        lines.append(number)
    return Rows(rows, lines)


def hub_unreachable_problem(spec: DatasetSpec) -> None:
    """Refuses a Hub dataset at once when the Hub cannot be reached: datasets would retry for most of a minute, and
    offline mode (HF_HUB_OFFLINE=1) reads its cache at once."""
    unreachable = hub_unreachable()
    if unreachable is not None:
        raise EnvironmentProblem(
            f"cannot load Hub dataset '{spec.path}': the Hub cannot be reached ({unreachable})",
            fix="check the path (a local file) and the network; set HF_HUB_OFFLINE=1 to use a copy in the datasets cache",
        )


def read_hub_dataset(spec: DatasetSpec):
    """A Hub dataset's split as a datasets.Dataset (datasets caches it)."""
    hub_unreachable_problem(spec)
    import datasets

    try:
        dataset = datasets.load_dataset(spec.path, spec.name, split=spec.split)
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
        raise EnvironmentProblem(
            f"cannot load Hub dataset '{spec.path}': {str(e).splitlines()[0] if str(e) else type(e).__name__}",
            fix="check the id and your network (HF_DATASETS_OFFLINE=1 blocks downloads), or use a local file",
        ) from None
    except ValueError as e:  # unknown split / config
        raise DataError(f"Hub dataset '{spec.path}': {str(e).splitlines()[0]}", fix="check data split / name") from None
    return dataset


def normalized_rows(rows: list[dict], spec, normalize: Callable, source: dict) -> list[dict]:
    """Every row through `normalize(row, source)`, or the first bad one named by its row (and line): `qtune
    validate`'s check of a format, with no tokenizer."""
    if not rows:
        raise DataError(f"dataset is empty: {spec.path}", fix="add rows or remove it from data.datasets")
    out = []
    for index, row in enumerate(rows):
        try:
            out.append(normalize(row, source))
        except DataError as e:
            raise DataError(e.what, where=f"{spec.path}, {place_of(rows, index)}", fix=e.fix) from None
    return out
