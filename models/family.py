"""The :class:`Family` record that each model family module exports as ``FAMILY`` (collected by ``models.zoo``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import Tensor, nn

__all__ = ["Family", "Converter"]

# (path of the released file, config) -> our state dict (keys renamed; not yet loaded).
Converter = Callable[[Path, Any], dict[str, Tensor]]


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: family name stored in ``model.json`` (``panoptic_segformer``, ``detr`` ...).
        configs: model name -> config builder ``(num_things=..., num_stuff=..., **overrides) -> config``.
        config_from_dict: inverse of the config's ``to_dict()`` (``ValueError`` naming unknown keys).
        build: config -> model (random init). The model implements ``models.inference.PanopticModel``.
        converters: ``--from`` source name -> converter of that released format (``official-psf``, ``detr`` ...).
        default_source: the converter used when a released file is given to ``predict``/``eval`` directly.
    """

    name: str
    configs: Mapping[str, Callable[..., Any]]
    config_from_dict: Callable[[dict[str, Any]], Any]
    build: Callable[[Any], nn.Module]
    converters: Mapping[str, Converter] = field(default_factory=dict)
    default_source: str | None = None
