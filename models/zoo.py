"""Every model family the harness can build, load and convert, in one plain table (no registry decorators).

A family is a model class with its config dataclass, the named configs (``panoptic_segformer_r50``,
``detr_r50_panoptic`` ...) and one converter per released checkpoint format. Each family module defines a
module-level ``FAMILY = Family(...)``; :data:`FAMILY_MODULES` lists those modules and is the only place a new
family is added. Modules are imported on first use, so ``import models.zoo`` stays cheap.

``models.checkpoint`` uses this table to save and load our format for every family (the family's name is stored
in ``model.json``) and to read released checkpoints (``--from`` of ``harness convert``).
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from models.family import Family

__all__ = ["Family", "FAMILY_MODULES", "families", "family_of", "family_of_config", "model_names", "get_config",
           "build_model", "converter_sources"]

# Family modules, each defining FAMILY. Order = order of `model_names()`.
FAMILY_MODULES: tuple[str, ...] = (
    "models.panoptic_segformer",
    "models.baselines.detr",
    "models.baselines.deformable_detr",
    "models.baselines.maskformer",
    "models.baselines.panoptic_fcn",
)

_CACHE: dict[str, Family] = {}


def families() -> dict[str, Family]:
    """Family name -> :class:`Family`, importing the family modules on first call."""
    if not _CACHE:
        for module in FAMILY_MODULES:
            fam: Family = importlib.import_module(module).FAMILY
            _CACHE[fam.name] = fam
    return dict(_CACHE)


def model_names() -> list[str]:
    """Every model name of every family."""
    return [name for fam in families().values() for name in fam.configs]


def family_of(model_name: str) -> Family:
    """The family that defines ``model_name``; ``ValueError`` listing the valid names otherwise."""
    for fam in families().values():
        if model_name in fam.configs:
            return fam
    raise ValueError(f"unknown model {model_name!r}; choose one of {', '.join(model_names())}")


def family_of_config(cfg: Any) -> Family:
    """The family of a config object (by its ``name`` field)."""
    return family_of(cfg.name)


def get_config(model_name: str, **kwargs: Any) -> Any:
    """Config by model name (``num_things``, ``num_stuff`` and field overrides as keywords)."""
    return family_of(model_name).configs[model_name](**kwargs)


def build_model(cfg: Any) -> nn.Module:
    """Build the model of a config (random init)."""
    return family_of_config(cfg).build(cfg)


def converter_sources() -> dict[str, str]:
    """``--from`` source name -> family name, over every family."""
    return {src: fam.name for fam in families().values() for src in fam.converters}
