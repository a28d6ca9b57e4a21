"""Charts without a display: PNG files (loss curves, the quantize report) and inline SVG (the report page)."""

from __future__ import annotations

import io
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def drawn_figure(size: tuple[float, float]):
    """Yields (figure, axis), without a display; the figure is closed when the block ends."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=size)
    try:
        yield figure, axis
    finally:
        plt.close(figure)


@contextmanager
def saved_figure(path: Path, size: tuple[float, float] = (7, 4)):
    """Yields a matplotlib axis; the figure is written to `path` as PNG when the block ends."""
    with drawn_figure(size) as (figure, axis):
        yield axis
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(path, dpi=100)


def inline_svg(draw, size: tuple[float, float] = (7, 3.2)) -> str:
    """draw(axis)'s chart as SVG markup for an HTML page: text kept as text (so a chart is a few KB), no date and
    fixed element ids (the same data give the same page)."""
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "qtune"}), drawn_figure(size) as (figure, ax):
        draw(ax)
        ax.grid(alpha=0.3)
        figure.tight_layout()
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    return svg[svg.index("<svg") :]  # no XML prolog or DOCTYPE inside HTML


def draw_losses(axis, train: list[tuple], evals: list[tuple]) -> None:
    """Train loss per logged step and eval loss per evaluation, on one axis (loss.png and the report page)."""
    if train:
        axis.plot(*zip(*train), label="train loss")
    if evals:
        axis.plot(*zip(*evals), "o-", label="eval loss")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
