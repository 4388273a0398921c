"""Saved candidates (``harness eval --save-candidates``), re-merged by ``harness sweep`` without re-inference.

Layout (see README "Run folder"):

* ``RUN/candidates/<model>/meta.json``: ``{"model", "num_things", "num_stuff", "categories", "layers",
  "post_process_options": {method: {...}}, "data", "split"}``;
* ``RUN/candidates/<model>/<corruption>_<severity>/<image file stem>.npz``: per layer ``L``: ``scores_<L>`` (K,)
  float32, ``labels_<L>`` (K,) int64, ``masks_<L>`` (K, h, w) float32 raw low-resolution masks (cropped to the
  valid region), ``query_index_<L>`` (K,) int64 when known; ``image_id`` (0-d int or str) and ``out_size`` (2,)
  int64 = original (H, W). Written with ``np.savez_compressed`` (lossless: a sweep at the default setting equals the
  direct evaluation exactly).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from harness.errors import UserError
from harness.io import atomic_write, atomic_write_json
from models.postprocess import Candidates

__all__ = ["save_candidates", "load_candidates", "write_meta", "read_meta", "META_NAME"]

META_NAME = "meta.json"


def save_candidates(path: str | Path, image_id: Any, out_size: tuple[int, int],
                    per_layer: Mapping[str, Candidates]) -> Path:
    """Write one image's candidates of every layer to ``path`` (atomic)."""
    arrays: dict[str, np.ndarray] = {
        "image_id": np.asarray(image_id),
        "out_size": np.asarray(out_size, np.int64),
    }
    for layer, c in per_layer.items():
        arrays[f"scores_{layer}"] = c.scores.detach().cpu().numpy().astype(np.float32, copy=False)
        arrays[f"labels_{layer}"] = c.labels.detach().cpu().numpy().astype(np.int64, copy=False)
        arrays[f"masks_{layer}"] = c.masks.detach().cpu().numpy().astype(np.float32, copy=False)
        if c.query_index is not None:
            arrays[f"query_index_{layer}"] = c.query_index.detach().cpu().numpy().astype(np.int64, copy=False)
    return atomic_write(path, lambda p: np.savez_compressed(p, **arrays))


def load_candidates(path: str | Path) -> tuple[Any, tuple[int, int], dict[str, Candidates]]:
    """Read a file written by :func:`save_candidates`: ``(image_id, (H, W), {layer: Candidates})``."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f"cannot read candidates file {p}: {exc}") from None
    try:
        image_id = arrays.pop("image_id").item()
        h, w = (int(v) for v in arrays.pop("out_size"))
    except KeyError as exc:
        raise UserError(f"candidates file {p} lacks {exc.args[0]!r}") from None
    layers = sorted(k[len("scores_"):] for k in arrays if k.startswith("scores_"))
    out: dict[str, Candidates] = {}
    for layer in layers:
        try:
            qi = arrays.get(f"query_index_{layer}")
            out[layer] = Candidates(
                scores=torch.from_numpy(arrays[f"scores_{layer}"]),
                labels=torch.from_numpy(arrays[f"labels_{layer}"]),
                masks=torch.from_numpy(arrays[f"masks_{layer}"]),
                query_index=None if qi is None else torch.from_numpy(qi),
            )
        except (KeyError, ValueError) as exc:
            raise UserError(f"candidates file {p}: bad layer {layer!r}: {exc}") from None
    return image_id, (h, w), out


def write_meta(model_dir: str | Path, meta: Mapping[str, Any]) -> Path:
    """Write ``<model_dir>/meta.json``."""
    return atomic_write_json(Path(model_dir) / META_NAME, dict(meta), indent=1)


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    """Read ``<model_dir>/meta.json`` (``UserError`` naming the file when missing or malformed)."""
    p = Path(model_dir) / META_NAME
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no candidates metadata {p} (was the run made with --save-candidates?)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {p}: {exc}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{p}: expected a JSON object")
    return meta
