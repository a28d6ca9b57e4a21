"""eval_report.json: `qtune eval` writes the loss table into it ("models"), `qtune eval --tasks` the task scores
("tasks"); each command replaces its own keys and keeps the other's."""

from __future__ import annotations

import json
from pathlib import Path

from qtune.core.fs import write_json_atomically


def update_eval_report(path: Path, part: dict) -> dict:
    """eval_report.json holds the loss table (`qtune eval`) and the task scores (`qtune eval --tasks`): each command
    replaces its own keys and keeps the other's."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        report = {}
    report = {**(report if isinstance(report, dict) else {}), **part}
    write_json_atomically(path, report)
    return report
