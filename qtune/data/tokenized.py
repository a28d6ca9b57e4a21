"""Dataset sources as tokenized Arrow tables, and the cache a second start reads them from.

Each source is read by datasets' own loaders (qtune.data.readers.load_source), tokenized by a data kind's batch
function through `Dataset.map(batched=True)` in worker processes, and written as memory-mapped Arrow files under a
fingerprint of everything the tokens depend on: the source's bytes (or a Hub dataset's fingerprint), the tokenizer, the
chat template, the kind's settings (max_length, train_on_inputs, column mapping) and this package's source code. The
next start with the same fingerprint (a --resume, a re-run, `qtune eval`) reads the files instead of tokenizing. An
entry is written into a scratch folder and renamed into place whole, and its files' sizes and hashes are checked when it
is read: a damaged entry is tokenized again, never trusted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtune.core.errors import DataError, QtuneError
from qtune.core.log import get_logger

if TYPE_CHECKING:
    from qtune.config.recipe import DatasetSpec

log = get_logger(__name__)

CACHE_SETTING = "QTUNE_DATA_CACHE"  # where the tokenized data are kept (default: the datasets cache's qtune-tokenized)
BATCH_ROWS = 1000  # rows per call of a kind's batch function
ROWS_PER_WORKER = 20_000  # fewer rows than this per extra process: starting one costs more than it saves
BARS_FROM_ROWS = 20_000  # a progress bar for the data stage from this many rows
HASH_CHUNK = 16 * 2**20
STALE_PARTIAL_SECONDS = 6 * 3600  # a scratch folder this old belongs to no running tokenization


class RowProblem(Exception):
    """A row the data kind cannot use, raised inside a map worker: its index in the source, what, how to fix. Plain
    positional arguments, so it crosses the process boundary pickled."""

    def __init__(self, index: int, what: str, fix: str | None = None):
        super().__init__(index, what, fix)
        self.index, self.what, self.fix = index, what, fix


# --------------------------------------------------------------------------- fingerprints


class hasher:
    """A fast 128-bit hash (xxhash, which datasets depends on) that takes text as UTF-8."""

    def __init__(self):
        import xxhash

        self.state = xxhash.xxh3_128()

    def update(self, data) -> None:
        """Hashes `data` (bytes, or text as UTF-8) after what came before."""
        self.state.update(data.encode() if isinstance(data, str) else data)

    def hexdigest(self) -> str:
        """The hash so far, as 32 hex digits."""
        return self.state.hexdigest()


def file_digest(path: Path) -> str:
    """The hash of a file's bytes."""
    digest = hasher()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the tokenizer's ids: its class, its fast tokenizer's whole definition (vocabulary,
    merges, normalizer, pre-tokenizer, post-processor), its special tokens and their ids."""
    digest = hasher()
    digest.update(type(tokenizer).__name__)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str())
    else:  # a slow (Python) tokenizer: datasets' own hash of the object
        from datasets.fingerprint import Hasher

        digest.update(Hasher.hash(tokenizer))
    specials = {
        "map": tokenizer.special_tokens_map,
        "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "added": sorted(str(t) for t in tokenizer.get_added_vocab()),
    }
    digest.update(json.dumps(specials, sort_keys=True, default=str))
    return digest.hexdigest()


def code_fingerprint() -> str:
    """A hash of this package's data code (every module of qtune.data, so a new data kind is covered without a list to
    keep): any change to how rows become tokens makes earlier entries unused."""
    digest = hasher()
    for module in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(module.name)
        digest.update(module.read_bytes())
    return digest.hexdigest()


def cache_key(source: str, settings: dict) -> str:
    """The entry's name: a hash of the source's fingerprint and the settings (tokenizer, template, kind, lengths...)."""
    digest = hasher()
    digest.update(source)
    digest.update(json.dumps(settings, sort_keys=True, default=str))
    return digest.hexdigest()


def cache_root() -> Path:
    """QTUNE_DATA_CACHE, else `qtune-tokenized` in the datasets cache (HF_DATASETS_CACHE)."""
    setting = os.environ.get(CACHE_SETTING)
    if setting:
        return Path(setting).expanduser()
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "qtune-tokenized"


# --------------------------------------------------------------------------- the cache


def read_entry(folder: Path, *, verify: bool = True):
    """The tokenized dataset of a complete, undamaged entry; None when there is none; a string saying what is wrong
    with a damaged one. `verify=False` skips the hashes (an entry this process has just written and hashed)."""
    meta_file = folder / "meta.json"
    if not folder.is_dir():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        from datasets import Dataset, concatenate_datasets

        parts = []
        for part in meta["files"]:
            path = folder / part["name"]
            if path.stat().st_size != part["bytes"] or (verify and file_digest(path) != part["hash"]):
                return f"{part['name']} differs from when it was written"
            parts.append(Dataset.from_file(str(path)))
        dataset = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    except Exception as e:  # pyarrow refuses a truncated or overwritten file with its own error types
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if len(dataset) != meta["rows"]:
        return f"{len(dataset)} rows where {meta['rows']} were written"
    return dataset


def write_entry(scratch: Path, folder: Path, dataset, started: float) -> Any:
    """Moves the tokenized files from `scratch` into the entry `folder` with their sizes and hashes, whole or not at all;
    returns the dataset read back from the entry (memory-mapped)."""
    files = sorted({Path(f["filename"]) for f in dataset.cache_files})
    meta = {
        "rows": len(dataset),
        "files": [{"name": f.name, "bytes": f.stat().st_size, "hash": file_digest(f)} for f in files],
        "seconds": round(time.perf_counter() - started, 1),
    }
    (scratch / "meta.json").write_text(json.dumps(meta))
    for stale in scratch.iterdir():  # the source's raw Arrow copy, and datasets' lock files
        if stale.name != "meta.json" and stale not in files:
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    try:
        os.rename(scratch, folder)
        entry = read_entry(folder, verify=False)
    except OSError:  # another process (a DDP rank) put the same entry there first: theirs is as good
        shutil.rmtree(scratch, ignore_errors=True)
        entry = read_entry(folder)
    if not hasattr(entry, "column_names"):
        raise QtuneError(f"the tokenized data just written are unreadable ({entry})", where=str(folder))
    return entry


@contextmanager
def data_stage_bars(rows: int):
    """datasets' progress bars (rows/s and time left) for a data stage of BARS_FROM_ROWS rows or more; qtune's commands
    keep them off otherwise (qtune.core.noise), and the state before is put back."""
    import datasets

    was_on = datasets.is_progress_bar_enabled()
    if rows >= BARS_FROM_ROWS:
        datasets.enable_progress_bars()
    try:
        yield
    finally:
        if not was_on:
            datasets.disable_progress_bars()


def worker_count(rows: int) -> int:
    """Processes for tokenizing `rows` rows: the cores other processes leave free (qtune.core.cpu_threads), one per
    ROWS_PER_WORKER rows at most; 1 means the main process alone."""
    from qtune.core.cpu_threads import FreeCoreThreads, choose_threads, fixed_setting

    most = rows // ROWS_PER_WORKER
    if most < 2:
        return 1
    setting = fixed_setting()
    if isinstance(setting, int):
        free = setting
    else:
        threads = FreeCoreThreads()
        threads.busy_elsewhere()  # psutil's first reading of a process is 0: it starts the interval measured
        time.sleep(0.3)
        free = threads.cores if setting == "all" else choose_threads(threads.cores, threads.busy_elsewhere())
    return max(1, min(free, most))


def tokenized_source(
    spec: DatasetSpec,
    *,
    load: Callable,
    source_fingerprint: str | None,
    settings: dict,
    tokenize_batch: Callable,
    features,
    place: Callable,
    on_loaded: Callable | None = None,
):
    """The source of `spec` tokenized: from the cache when an undamaged entry has this fingerprint, else loaded
    (`load(scratch)` -> (datasets.Dataset, its fingerprint when `source_fingerprint` is None: a Hub dataset's)), checked (`on_loaded(dataset)` -> the dataset to tokenize), tokenized by `tokenize_batch` and
    cached. A RowProblem becomes a DataError naming the row by `place(index)`."""
    root = cache_root()
    key = cache_key(source_fingerprint, settings) if source_fingerprint else None
    if key is not None:
        entry = read_entry(root / key)
        if hasattr(entry, "column_names"):
            return entry, True
        if entry is not None:
            log.info(f"data: the cached tokens of {spec.path} are damaged ({entry}); tokenizing it again")
            shutil.rmtree(root / key, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".partial-*"):  # left by a run killed while tokenizing
        if time.time() - stale.stat().st_mtime > STALE_PARTIAL_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
    try:
        started = time.perf_counter()
        raw, fingerprint = load(scratch / "raw")
        if key is None:  # a Hub dataset: its fingerprint is known once loaded
            key = cache_key(fingerprint, settings)
            entry = read_entry(root / key)
            if hasattr(entry, "column_names"):
                return entry, True
            shutil.rmtree(root / key, ignore_errors=True)
        if on_loaded is not None:
            raw = on_loaded(raw)
        workers = worker_count(len(raw))
        with data_stage_bars(len(raw)):
            try:
                tokenized = raw.map(
                    tokenize_batch,
                    batched=True,
                    batch_size=BATCH_ROWS,
                    with_indices=True,
                    remove_columns=raw.column_names,
                    features=features,
                    num_proc=workers if workers > 1 else None,
                    cache_file_name=str(scratch / "tokens.arrow"),
                    load_from_cache_file=False,
                    new_fingerprint=key,
                    desc=f"data: tokenizing {Path(spec.path).name}",
                )
            except RowProblem as problem:
                raise DataError(problem.what, where=f"{spec.path}, {place(problem.index)}", fix=problem.fix) from None
        return write_entry(scratch, root / key, tokenized, started), False
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
