"""Loading a model for evaluation from any weights a command accepts (`--weights`), with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from harness.errors import UserError

__all__ = ["load_model"]


def load_model(
    weights: str | Path,
    model_name: str | None = None,
    num_things: int | None = None,
    num_stuff: int | None = None,
    device: str = "cpu",
) -> torch.nn.Module:
    """Build the model from weights and load them strictly (`models.checkpoint.load_model`).

    Accepts our format (`model.safetensors` + `model.json`, or the folder holding them), our training
    `checkpoint_last.pt`, and released checkpoints of every family (converted on the fly; they need `model_name`).

    Args:
        weights: the weights path.
        model_name: model name, needed for released files and for our files without a config; must match the
            name stored with ours.
        num_things / num_stuff: class counts for `model_name` (from the data set); ignored for files with a config.
        device: torch device.

    Raises:
        UserError: unreadable file, unknown format, a model name that does not match the weights, or any missing /
            unexpected / shape-mismatched key (all listed).
    """
    from models.checkpoint import CheckpointError
    from models.checkpoint import load_model as load_checkpoint_model

    overrides: dict[str, Any] = {}
    if model_name is not None:  # a named config takes its class counts from the data set
        overrides = {k: v for k, v in (("num_things", num_things), ("num_stuff", num_stuff)) if v is not None}
    try:
        model, _cfg = load_checkpoint_model(Path(weights), model_name, **overrides)
    except (CheckpointError, ValueError) as exc:
        text = str(exc)
        raise UserError(text if str(weights) in text else f"cannot load --weights {weights}: {text}") from None
    return model.to(device).eval()
