"""Reading a dataset source into plain rows: local .json / .jsonl / .csv / .parquet files or folders of them, or a
Hub dataset. A bad line is reported by its number, before anything is tokenized."""

from __future__ import annotations

import json
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


def read_rows(spec: DatasetSpec) -> list[dict]:
    """Rows of one dataset source as plain dicts."""
    path = Path(spec.path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise DataError(f"folder has no .json/.jsonl/.csv/.parquet files: {spec.path}", fix="point at a data file")
        return [row for f in files for row in read_local_file(f)]
    if path.is_file():
        return read_local_file(path)
    if names_a_local_path(spec.path):
        raise DataError(f"dataset file not found: {spec.path}", fix=no_such_path(spec.path, "the dataset path", "file"))
    return read_hub_dataset(spec)


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


def read_hub_dataset(spec: DatasetSpec) -> list[dict]:
    """The rows of a Hub dataset's split (through datasets, which caches it)."""
    unreachable = hub_unreachable()
    if unreachable is not None:  # datasets would retry for most of a minute; offline mode reads its cache at once
        raise EnvironmentProblem(
            f"cannot load Hub dataset '{spec.path}': the Hub cannot be reached ({unreachable})",
            fix="check the path (a local file) and the network; set HF_HUB_OFFLINE=1 to use a copy in the datasets cache",
        )
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
    return dataset.to_list()
