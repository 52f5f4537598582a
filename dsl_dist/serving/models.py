"""Which serving module scores a model: the one its spec names (dsl_dist/config/registry.py),
or a refusal naming the model and why it is not served."""

from __future__ import annotations

import importlib
from types import ModuleType

from dsl_dist.config import MODELS


class NotServed(ValueError):
    """A model serving cannot score (the message names it and says why)."""


def serving_module(name: str) -> ModuleType:
    """Model `name`'s serving module (see the registry's docstring for what it defines)."""
    spec = MODELS.get(name)
    if spec is None:
        raise NotServed(f"model.name={name!r}: no model spec is registered under this name "
                        f"(models: {', '.join(MODELS)})")
    if spec.serving is None:
        raise NotServed(f"model.name={name!r}: not exported: {spec.not_served}")
    return importlib.import_module(spec.serving)
