"""Charts written as PNG files (loss curves, the quantize report), without a display."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


@contextmanager
def saved_figure(path: Path, size: tuple[float, float] = (7, 4)):
    """Yields a matplotlib axis; the figure is written to `path` and closed when the block ends."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=size)
    try:
        yield axis
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(path, dpi=100)
    finally:
        plt.close(figure)


def draw_losses(axis, train: list[tuple], evals: list[tuple]) -> None:
    """Train loss per logged step and eval loss per evaluation, on one axis (loss.png and the report page)."""
    if train:
        axis.plot(*zip(*train), label="train loss")
    if evals:
        axis.plot(*zip(*evals), "o-", label="eval loss")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
