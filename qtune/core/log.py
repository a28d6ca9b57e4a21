"""qtune's voice: one logger, `qtune`, that prints plain lines to stdout on the main process only.

Stages call `get_logger(__name__).info(...)`; nothing threads a print function through. Under DDP (torchrun,
accelerate) every rank runs the same code and only global rank 0 speaks. Lines go out through tqdm, so a line said
while a progress bar is drawn lands above the bar instead of through it.
"""

from __future__ import annotations

import logging
import sys

ROOT = "qtune"


class MainProcessOnly(logging.Filter):
    """Passes records on global rank 0 (or without a launcher), drops them on the other ranks."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether this process is the one that speaks."""
        from qtune.core.distributed import rank

        return rank() == 0


class PlainLines(logging.Handler):
    """Each record as its message alone, written to the stdout of the moment (so pytest's capture and a notebook's
    redirection see it) above any progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        """Writes the record's message as one line."""
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # a closed or broken stdout must not end the run
            self.handleError(record)


def get_logger(name: str = ROOT) -> logging.Logger:
    """The logger for module `name` (a child of `qtune`); the first call gives `qtune` its handler and filter."""
    root = logging.getLogger(ROOT)
    if not any(isinstance(handler, PlainLines) for handler in root.handlers):
        handler = PlainLines()
        handler.addFilter(MainProcessOnly())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False  # a notebook's or an application's root handler would print every line twice
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")
