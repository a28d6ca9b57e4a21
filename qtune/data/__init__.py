"""Training data: reading dataset files (readers), the prompt and chat templates (templates), the kinds of data and
their formats, each tokenized and checked before any model loads (sft: prompt/answer, conversations, text; pairs:
preference pairs), and packing samples into rows (packing).

DATA_KINDS is the registry of kinds; a recipe's dataset format names one of their formats. A training method says
which kind it trains on (qtune.training.methods)."""

from __future__ import annotations

from qtune.data.labelled import LABELLED_DATA
from qtune.data.pairs import PAIR_DATA
from qtune.data.prepared import DataKind
from qtune.data.prompts import PROMPT_DATA
from qtune.data.sft import SFT_DATA

DATA_KINDS: tuple[DataKind, ...] = (SFT_DATA, PAIR_DATA, LABELLED_DATA, PROMPT_DATA)
DATA_FORMATS: tuple[str, ...] = tuple(fmt for kind in DATA_KINDS for fmt in kind.formats)


def kind_of(fmt: str) -> DataKind:
    """The kind of data a dataset format holds."""
    return next(kind for kind in DATA_KINDS if fmt in kind.formats)
