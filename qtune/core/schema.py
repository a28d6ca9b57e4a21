"""The base of every recipe section, so that the recipe's own sections (qtune.config) and those of the training
methods (qtune.training.methods) behave alike. No torch, no Hugging Face library: loading a recipe stays cheap."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A recipe section: an unknown key is an error, never silently ignored; values are frozen; each field's
    docstring is its documentation (the recipe reference is generated from it)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
