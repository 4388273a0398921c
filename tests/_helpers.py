"""Helpers shared by several test files: released checkpoints' key lists, and the short training run of the
baseline tests."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Key/shape lists of released module trees (copied from the project reference, checkpoint_keys/).
KEYS_DIR = Path(__file__).resolve().parent / "data" / "checkpoint_keys"


def read_key_list(name: str | Path) -> dict[str, list[int]]:
    """``key<TAB>[shape]`` lines of a key list (a file name in ``KEYS_DIR``, or a path); ``#`` header lines and
    blank lines skipped."""
    path = name if isinstance(name, Path) else KEYS_DIR / name
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")
        out[key] = list(ast.literal_eval(shape))
    return out


def meta_state(keys: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """A state dict of meta tensors with these shapes (strict loading checks names and shapes only)."""
    return {k: torch.empty(s, device="meta") for k, s in keys.items()}


def train_steps(model: torch.nn.Module, criterion: Any, ds: Any, size: int, steps: int, lr: float,
                input_divisor: float = 1.0) -> tuple[list[float], dict[str, float]]:
    """``steps`` AdamW steps of ``model`` on the first two images of ``ds`` (a ``PanopticDataset``, no augmentation,
    ``size`` x ``size``), normalised with the model config's mean / std and divided by ``input_divisor``.

    Returns:
        The loss of every step and the last step's logs.
    """
    from harness.engine.data import AugmentConfig, augment, collate, item_from_sample

    rng = np.random.default_rng(0)
    items = [augment(item_from_sample(ds[i], ds), AugmentConfig(enabled=False), (size, size), rng) for i in range(2)]
    images, pad_mask, targets = collate(items, ds.categories.num_things, model.cfg.pixel_mean, model.cfg.pixel_std)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss, logs = criterion(model, images / input_divisor, pad_mask, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(logs["loss"])
    return losses, logs


def flops_in_every_grad_mode(model: torch.nn.Module, *inputs: Any) -> tuple[list[int], Any]:
    """FLOPs of ``model(*inputs)`` counted under ``no_grad``, ``inference_mode`` and ``enable_grad`` (what a
    profiler may wrap a forward in), and the last output."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = []
    for mode in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        with mode(), FlopCounterMode(display=False) as fc:
            out = model(*inputs)
        flops.append(fc.get_total_flops())
    return flops, out


def assert_checkpoint_round_trip(model: torch.nn.Module, path: Path) -> None:
    """``save_checkpoint`` then ``load_model`` gives the same config, class and tensors."""
    from models.checkpoint import load_model, save_checkpoint

    save_checkpoint(model.state_dict(), model.cfg, path)
    loaded, cfg = load_model(path)
    assert cfg == model.cfg and isinstance(loaded, type(model))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


class Evil:
    """Pickles to ``os.system("echo unsafe-code-ran")``: a checkpoint that would run code when unpickled."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, ("echo unsafe-code-ran",))


def jdump(path: Path, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` (parents created)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path
