"""The demo's multiple-choice benchmark: its four rules (qtune.demo.tiny_models.demo_rows) asked as questions with the
right answer among three typical wrong ones, written as a local lm-evaluation-harness task for `qtune eval --tasks`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from qtune.core.errors import EXIT_RECIPE, QtuneError
from qtune.core.fs import write_text_atomically
from qtune.demo.tiny_models import demo_rows


def wrong_answers(row: dict, rng: random.Random) -> list[str]:
    """Three typical wrong answers to a demo task, all different from the right one: sums off by one or ten, the
    word unreversed or half reversed, counts off by one or two, the text in lower or title case."""
    answer, given = row["output"], row["input"]
    if row["instruction"].startswith("Add"):
        candidates = [str(int(answer) + d) for d in rng.sample([-10, -1, 1, 10, 2], 5)]
    elif row["instruction"].startswith("Reverse"):
        candidates = [
            given,
            given[::-1][1:] + given[-1],
            given[-1] + given[:-1],
            answer + answer[-1],
            answer + "s",
            answer.upper(),
        ]
    elif row["instruction"].startswith("How many"):
        candidates = [str(int(answer) + d) for d in (1, -1, 2, 3)]
    else:
        candidates = [given, given.title(), given.capitalize(), answer.lower() + "S", answer + "S"]
    unique = [c for c in dict.fromkeys(candidates) if c != answer]
    return unique[:3]


def choice_rows(count: int, seed: int = 0) -> list[dict]:
    """A multiple-choice task on the demo rules (lm-evaluation-harness's `multiple_choice`): the alpaca prompt, the
    right answer among three typical wrong ones, in a random place."""
    from qtune.data.templates import alpaca_prompt

    rng = random.Random(seed)
    rows = []
    for row in demo_rows(count, seed):
        choices = wrong_answers(row, rng)
        answer = rng.randrange(len(choices) + 1)
        choices.insert(answer, row["output"])
        rows.append({"question": alpaca_prompt(row["instruction"], row["input"]), "choices": choices, "answer": answer})
    return rows


CHOICE_TASK = "demo_choice"


def write_choice_task(folder: str | Path, count: int = 400, seed: int = 2) -> Path:
    """The demo's multiple-choice task as lm-evaluation-harness reads a local one: the rows as JSON lines and a task
    YAML beside them (`qtune eval RUN --tasks FOLDER/demo_choice.yaml`). Returns the YAML's path. Files of the same
    names with other contents are the user's: refused, before anything is written."""
    folder = Path(folder)
    rows = folder / f"{CHOICE_TASK}.jsonl"
    task = folder / f"{CHOICE_TASK}.yaml"
    texts = {
        rows: "".join(json.dumps(row) + "\n" for row in choice_rows(count, seed)),
        task: (
            f"# The demo rules as a multiple-choice task: {count} prompts, each with the right answer and three typical\n"
            "# wrong ones. lm-evaluation-harness scores each choice's log-likelihood after the prompt; acc is the share\n"
            "# where the right one scores highest, acc_norm the same per byte of answer.\n"
            f"task: {CHOICE_TASK}\n"
            "dataset_path: json\n"
            f"dataset_kwargs: {{data_files: {{test: {rows.name}}}}}  # relative paths: to this file's folder (qtune)\n"
            "test_split: test\n"
            "output_type: multiple_choice\n"
            'doc_to_text: "{{question}}"\n'
            "doc_to_choice: choices\n"
            "doc_to_target: answer\n"
            'target_delimiter: ""  # the prompt ends in a newline\n'
            "metric_list:\n"
            "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
            "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
        ),
    }
    for path, text in texts.items():
        if path.exists() and (not path.is_file() or path.read_text(encoding="utf-8") != text):
            raise QtuneError(
                f"{path} exists with other contents; qtune does not overwrite it",
                fix="choose another --demo-task folder",
                code=EXIT_RECIPE,
            )
    folder.mkdir(parents=True, exist_ok=True)
    for path, text in texts.items():
        write_text_atomically(path, text)
    return task
