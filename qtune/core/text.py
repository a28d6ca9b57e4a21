"""Numbers as qtune's lines, tables, page and model card print them."""

from __future__ import annotations


def fmt(value, spec: str = ".4f") -> str:
    """`value` formatted with `spec`, or "n/a" when there is none."""
    return "n/a" if value is None else format(value, spec)
