"""The built-in rewards: what people write by hand for GSM8K-style tasks, each from the recipe's settings.

- exact_match: the answer taken from the completion (`pattern`'s first group, else the whole completion) equals the
  reference answer after normalisation (case, spaces, a trailing period, thousands separators)
- numeric: the last number of the extracted answer is within `tolerance` of the reference's last number
- regex: the completion matches `pattern` (e.g. a <think>...</think> block then an answer)
- length: 0 up to `target` tokens, then minus the share past it (a penalty for rambling)
- contains: the completion contains `text`
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize(text: str) -> str:
    """An answer as it is compared: lower case, single spaces, no trailing period, no thousands separators."""
    text = " ".join(str(text).strip().lower().split()).rstrip(".")
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)


def extract(text: str, pattern: str | None) -> str | None:
    """What `pattern` finds in `text` (its first group, else the match; the last match), the whole text without a
    pattern, or None when the pattern finds nothing."""
    if pattern is None:
        return text
    matches = list(re.finditer(pattern, text, flags=re.DOTALL))
    if not matches:
        return None
    last = matches[-1]
    return last.group(1) if last.groups() else last.group(0)


def last_number(text: str | None) -> float | None:
    """The last number in `text` (commas as thousands separators), or None."""
    found = NUMBER.findall(text or "")
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def completion_text(completion) -> str:
    """A completion as text: trl passes text, or a conversation's assistant turns for chat prompts."""
    if isinstance(completion, list):
        return "".join(turn.get("content", "") for turn in completion if isinstance(turn, dict))
    return str(completion)


def exact_match(spec, reference: Callable) -> Callable:
    """1.0 where the extracted answer equals the reference, else 0.0."""

    same = normalize if spec.normalize else str.strip

    def reward(completions, answer, **_):
        out = []
        for completion, ref in zip(completions, answer):
            found = extract(completion_text(completion), spec.pattern)
            out.append(1.0 if found is not None and same(found) == same(reference(ref)) else 0.0)
        return out

    return reward


def numeric(spec, reference: Callable) -> Callable:
    """1.0 where the extracted answer's last number is within the tolerance of the reference's, else 0.0."""

    def reward(completions, answer, **_):
        out = []
        for completion, ref in zip(completions, answer):
            got, want = last_number(extract(completion_text(completion), spec.pattern)), last_number(reference(ref))
            out.append(1.0 if got is not None and want is not None and abs(got - want) <= spec.tolerance else 0.0)
        return out

    return reward


def regex(spec, reference: Callable) -> Callable:
    """1.0 where the completion matches the pattern (searched, across lines), else 0.0."""
    compiled = re.compile(spec.pattern, flags=re.DOTALL)

    def reward(completions, **_):
        return [1.0 if compiled.search(completion_text(c)) else 0.0 for c in completions]

    return reward


def length(spec, reference: Callable) -> Callable:
    """0.0 up to `target` completion tokens, then minus the share of tokens past it."""

    def reward(completions, completion_ids=None, **_):
        counts = [len(ids) for ids in completion_ids] if completion_ids is not None else None
        counts = counts or [len(completion_text(c).split()) for c in completions]
        return [-max(0, n - spec.target) / spec.target for n in counts]

    return reward


def contains(spec, reference: Callable) -> Callable:
    """1.0 where the completion contains the text, else 0.0."""

    def reward(completions, **_):
        return [1.0 if spec.text in completion_text(c) else 0.0 for c in completions]

    return reward


BUILTIN_REWARDS: dict[str, Callable] = {
    "exact_match": exact_match,
    "numeric": numeric,
    "regex": regex,
    "length": length,
    "contains": contains,
}
# what each needs besides its weight
NEEDS = {"regex": ("pattern",), "length": ("target",), "contains": ("text",)}
REWARD_NAMES = tuple(BUILTIN_REWARDS)
PYTHON = "python:"


def check_reward_spec(spec) -> str | None:
    """Why a reward entry of the recipe cannot be built (no import of the user's code), or None."""
    if spec.function.startswith(PYTHON):
        target = spec.function[len(PYTHON) :].strip()
        module, _, name = target.partition(":")
        if not module or not name:
            return f"reward '{spec.function}': write python: package.module:function"
        return None
    if spec.function not in BUILTIN_REWARDS:
        import difflib

        guess = difflib.get_close_matches(spec.function, REWARD_NAMES, n=1)
        hint = f"did you mean '{guess[0]}'?" if guess else f"choose from {', '.join(REWARD_NAMES)} or python: ..."
        return f"unknown reward '{spec.function}': {hint}"
    for field in NEEDS.get(spec.function, ()):
        if getattr(spec, field) is None:
            return f"reward {spec.function} needs {field}"
    for field in ("pattern",):
        value = getattr(spec, field)
        if value is not None:
            try:
                re.compile(value)
            except re.error as e:
                return f"reward {spec.function}: pattern {value!r} is not a regular expression ({e})"
    return None


def build_reward(spec, reference_pattern: str | None) -> Callable:
    """The reward function of one recipe entry (a user's own imported now), named for trl's logs."""

    def reference(answer) -> str:
        found = extract(str(answer), reference_pattern)
        return found if found is not None else str(answer)

    if spec.function.startswith(PYTHON):
        module, _, name = spec.function[len(PYTHON) :].strip().partition(":")
        return getattr(importlib.import_module(module), name)  # the user's own, called as it is
    function = BUILTIN_REWARDS[spec.function](spec, reference)
    function.__name__ = spec.function  # the name trl logs its figures under
    return function
