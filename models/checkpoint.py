"""Our checkpoint format and strict loading.

Format: a directory holding ``model.safetensors`` (the state dict) and ``model.json`` (``{"format", "config":
<PanopticSegFormerConfig fields>, "meta"}``), or a ``X.safetensors`` file next to ``X.json``. This is the layout the
training engine writes too (``harness/engine/train.py``), so every reader accepts every writer's output; a JSON
that is the bare config dict is accepted as well.
Loading is always strict: any missing, unexpected or shape-mismatched key raises :class:`CheckpointMismatchError`
listing all of them.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from models.configs import PanopticSegFormerConfig

FORMAT = "psf-harness/panoptic_segformer/v1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "model.json"


class CheckpointError(Exception):
    """A checkpoint cannot be read (missing file, wrong format). The message names the file."""


class CheckpointMismatchError(CheckpointError):
    """State-dict keys do not match the model.

    Attributes:
        missing: keys the model needs that the checkpoint lacks.
        unexpected: keys in the checkpoint the model does not have.
        mismatched: ``(key, checkpoint shape, model shape)`` triples.
    """

    def __init__(self, source: str, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> None:
        self.source = source
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        super().__init__(self.describe())

    def describe(self, limit: int = 20) -> str:
        """One line per problem group, each listing up to ``limit`` keys."""
        parts = [f"checkpoint {self.source} does not match the model"]
        if self.missing:
            parts.append(f"missing keys ({len(self.missing)}): {', '.join(self.missing[:limit])}"
                         + (" ..." if len(self.missing) > limit else ""))
        if self.unexpected:
            parts.append(f"unexpected keys ({len(self.unexpected)}): {', '.join(self.unexpected[:limit])}"
                         + (" ..." if len(self.unexpected) > limit else ""))
        if self.mismatched:
            items = [f"{k} (checkpoint {list(a)} vs model {list(b)})" for k, a, b in self.mismatched[:limit]]
            parts.append(f"shape mismatches ({len(self.mismatched)}): {', '.join(items)}"
                         + (" ..." if len(self.mismatched) > limit else ""))
        return "; ".join(parts)


def compare_state_dict(model: nn.Module, state: Mapping[str, Tensor]
                       ) -> tuple[list[str], list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """``(missing, unexpected, mismatched)`` of ``state`` against ``model.state_dict()``."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
                  if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, sorted(mismatched)


def load_state_dict_strict(model: nn.Module, state: Mapping[str, Tensor], source: str = "<state dict>") -> None:
    """Load ``state`` into ``model``; raise :class:`CheckpointMismatchError` listing every bad key first."""
    missing, unexpected, mismatched = compare_state_dict(model, state)
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(source, missing, unexpected, mismatched)
    model.load_state_dict(dict(state), strict=True)


def _paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    p = Path(path)
    if p.is_dir() or p.suffix == "":
        return p / WEIGHTS_NAME, p / CONFIG_NAME
    return p, p.with_suffix(".json")


def save_checkpoint(state: Mapping[str, Tensor], cfg: PanopticSegFormerConfig, path: str | os.PathLike[str],
                    meta: dict[str, Any] | None = None) -> Path:
    """Write ``state`` + ``cfg`` in our format (atomic: temp files then rename).

    Args:
        state: state dict (tensors are made contiguous; shared storage is fine).
        cfg: model config.
        path: a directory (``model.safetensors`` + ``model.json`` inside) or ``X.safetensors`` (+ ``X.json``).
        meta: extra JSON-able info stored under ``meta`` in the config file (e.g. the source checkpoint).

    Returns:
        The weights path.
    """
    from safetensors.torch import save_file

    weights, config = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    doc = {"format": FORMAT, "config": cfg.to_dict(), "meta": meta or {}}
    for target, writer in ((weights, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT})),
                           (config, lambda p: p.write_text(json.dumps(doc, indent=2), encoding="utf-8"))):
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        os.close(fd)
        try:
            writer(Path(tmp))
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return weights


def is_our_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True for a directory with ``model.safetensors`` or a ``.safetensors`` file."""
    p = Path(path)
    return (p.is_dir() and (p / WEIGHTS_NAME).is_file()) or (p.is_file() and p.suffix == ".safetensors")


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], PanopticSegFormerConfig | None]:
    """Read our format: ``(state, config or None when the JSON file is absent)``."""
    from safetensors.torch import load_file

    weights, config = _paths(path)
    if not weights.is_file():
        raise CheckpointError(f"weights file not found: {weights}")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {weights}: {exc}") from exc
    cfg = None
    if config.is_file():
        try:
            doc = json.loads(config.read_text(encoding="utf-8"))
            cfg = PanopticSegFormerConfig.from_dict(doc["config"] if "config" in doc else doc)
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"bad config file {config}: {exc}") from exc
    return state, cfg


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``meta`` entry of our format's JSON file (e.g. the training data set's categories); {} when absent."""
    p = Path(path)
    if p.suffix in (".pth", ".pt"):
        return {}
    _, config = _paths(p)
    if not config.is_file():
        return {}
    try:
        doc = json.loads(config.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckpointError(f"bad config file {config}: {exc}") from exc
    meta = doc.get("meta", {}) if isinstance(doc, dict) else {}
    return meta if isinstance(meta, dict) else {}


def _is_training_checkpoint(path: Path) -> bool:
    """Our training engine's ``checkpoint_last.pt``: a dict with ``model`` and ``config`` entries."""
    try:
        obj = torch.load(str(path), map_location="meta", weights_only=True)
    except Exception:
        # Our training checkpoints hold RNG state that weights_only refuses; only ``.pt`` files (our engine's
        # suffix, never the official ``.pth`` releases) are unpickled fully.
        if path.suffix != ".pt":
            return False
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception:
            return False
    return isinstance(obj, dict) and "model" in obj and "config" in obj


def load_model(weights: str | os.PathLike[str], model: str | None = None, **overrides: Any
               ) -> tuple[nn.Module, PanopticSegFormerConfig]:
    """Build a model and load weights strictly, from our format or an official ``.pth`` (converted on the fly).

    Args:
        weights: our directory / ``.safetensors`` file, our training ``checkpoint_last.pt``, or an official ``.pth``.
        model: config name (``panoptic_segformer_r50`` ...). Required for official files and for our files
            without a JSON config; for our files with a config it must agree with the stored name if given.
        overrides: config fields to override (e.g. ``num_things``); class counts of official files default to COCO.

    Returns:
        ``(model in eval mode, config)``.
    """
    from models.configs import get_config
    from models.convert_official import convert_state_dict, looks_official, read_official
    from models.panoptic_segformer import PanopticSegFormer

    path = Path(weights)
    if is_our_checkpoint(path):
        state, cfg = read_checkpoint(path)
        if cfg is None:
            if model is None:
                raise CheckpointError(f"{path}: no config JSON next to the weights; pass the model name")
            cfg = get_config(model, **overrides)
        elif model is not None and cfg.name != model:
            raise CheckpointError(f"{path} holds {cfg.name!r}, not {model!r}")
        elif overrides:
            cfg = PanopticSegFormerConfig.from_dict({**cfg.to_dict(), **overrides})
        source = str(path)
    elif looks_official(path) and _is_training_checkpoint(path):
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
        cfg = PanopticSegFormerConfig.from_dict({**obj["config"], **overrides})
        if model is not None and cfg.name != model:
            raise CheckpointError(f"{path} holds {cfg.name!r}, not {model!r}")
        state = obj["model"]
        source = f"{path} (training checkpoint)"
    elif looks_official(path):
        if model is None:
            raise CheckpointError(f"{path}: an official checkpoint needs the model name (e.g. panoptic_segformer_r50)")
        cfg = get_config(model, **overrides)
        raw, _ = read_official(path)
        state = convert_state_dict(raw, cfg.backbone)
        source = f"{path} (official, converted)"
    else:
        raise CheckpointError(f"weights not found or not a known format: {path} "
                              "(expected a directory with model.safetensors, a .safetensors file or an official .pth)")
    net = PanopticSegFormer(cfg)
    load_state_dict_strict(net, state, source)
    return net.eval(), cfg
