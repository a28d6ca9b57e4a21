"""Training methods: THE registry of them. One module per method (sft.py, dpo.py, orpo.py, kto.py, grpo.py) holds its recipe section,
the kind of data it trains on, its trl config and trainer, what it adds to metrics.json, and what the closing line,
the run's page and the model card say of it (qtune.training.methods.method.TrainingMethod says what each field is).

Adding a method is one module and one line below. The method modules are light to import (the recipe is made of their
sections); their trainers (sft_trainer.py, preference_trainer.py, on base_trainer.py) import trl."""

from __future__ import annotations

from qtune.training.methods.dpo import DPO
from qtune.training.methods.grpo import GRPO
from qtune.training.methods.kto import KTO
from qtune.training.methods.method import TrainingMethod
from qtune.training.methods.orpo import ORPO
from qtune.training.methods.sft import SFT

METHODS: dict[str, TrainingMethod] = {method.name: method for method in (SFT, DPO, ORPO, KTO, GRPO)}


def method_of(recipe) -> TrainingMethod:
    """The method a recipe trains with (train.method)."""
    return METHODS[recipe.train.method]
