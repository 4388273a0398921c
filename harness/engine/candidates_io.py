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
from harness.io import atomic_write_json, atomic_write_npz
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
    return atomic_write_npz(path, arrays, compressed=True)  # np.savez_compressed's format, reproducible bytes


def _bad(p: Path, what: str) -> UserError:
    return UserError(f"candidates file {p}: {what} (not what harness eval --save-candidates writes; re-run the "
                     "evaluation to rewrite it)")


def load_candidates(path: str | Path) -> tuple[Any, tuple[int, int], dict[str, Candidates]]:
    """Read a file written by :func:`save_candidates`: ``(image_id, (H, W), {layer: Candidates})``.

    Raises:
        UserError: naming the file and the entry, for a file that is not an ``.npz`` archive or whose arrays do not
            have the shapes and types above.
    """
    import zipfile

    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise UserError(f"candidates file not found: {p}") from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, NotImplementedError, AttributeError) as exc:
        raise UserError(f"cannot read candidates file {p}: not an .npz archive of arrays "
                        f"({' '.join(str(exc).split()) or type(exc).__name__})") from None
    if not isinstance(arrays, dict):
        raise _bad(p, "not an .npz archive")
    for key in ("image_id", "out_size"):
        if key not in arrays:
            raise _bad(p, f"lacks {key!r}")
    iid = arrays.pop("image_id")
    if iid.shape != () or iid.dtype.kind not in "iuU":
        raise _bad(p, f"'image_id' is a {iid.dtype} array of shape {iid.shape}, expected one integer or string")
    image_id = iid.item()
    size = arrays.pop("out_size")
    if size.shape != (2,) or size.dtype.kind not in "iu" or (size < 1).any():
        raise _bad(p, f"'out_size' is {size.tolist() if size.size <= 4 else size.shape}, expected (H, W) >= 1")
    h, w = (int(v) for v in size)
    layers = sorted(k[len("scores_"):] for k in arrays if k.startswith("scores_"))
    if not layers:
        raise _bad(p, "no 'scores_<layer>' array")
    out: dict[str, Candidates] = {}
    for layer in layers:
        names = {k: f"{k}_{layer}" for k in ("scores", "labels", "masks", "query_index")}
        for k in ("labels", "masks"):
            if names[k] not in arrays:
                raise _bad(p, f"lacks {names[k]!r}")
        scores, labels, masks = (arrays[names[k]] for k in ("scores", "labels", "masks"))
        qi = arrays.get(names["query_index"])
        k_ = scores.shape[0] if scores.ndim == 1 else -1
        if scores.ndim != 1 or scores.dtype.kind != "f":
            raise _bad(p, f"{names['scores']!r} is {scores.dtype} {scores.shape}, expected float (K,)")
        if labels.shape != (k_,) or labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
            raise _bad(p, f"{names['labels']!r} is {labels.dtype} {labels.shape}, expected non-negative integers "
                          f"({k_},)")
        if masks.ndim != 3 or masks.shape[0] != k_ or masks.dtype.kind != "f" or 0 in masks.shape[1:]:
            raise _bad(p, f"{names['masks']!r} is {masks.dtype} {masks.shape}, expected float ({k_}, h, w)")
        if qi is not None and (qi.shape != (k_,) or qi.dtype.kind not in "iu"):
            raise _bad(p, f"{names['query_index']!r} is {qi.dtype} {qi.shape}, expected integers ({k_},)")
        if not (np.isfinite(scores).all() and np.isfinite(masks).all()):
            raise _bad(p, f"layer {layer!r} holds NaN or infinite scores or masks")
        out[layer] = Candidates(
            scores=torch.from_numpy(scores),
            labels=torch.from_numpy(labels.astype(np.int64, copy=False)),
            masks=torch.from_numpy(masks),
            query_index=None if qi is None else torch.from_numpy(qi.astype(np.int64, copy=False)),
        )
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
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise UserError(f"cannot read {p}: {' '.join(str(exc).split())}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{p}: expected a JSON object")
    checks = {"num_things": lambda v: type(v) is int and v >= 0, "num_stuff": lambda v: type(v) is int and v >= 0,
              "layers": lambda v: isinstance(v, list) and v and all(isinstance(x, str) for x in v),
              "categories": lambda v: isinstance(v, list), "post_process_options": lambda v: isinstance(v, dict),
              "data": lambda v: isinstance(v, str), "split": lambda v: isinstance(v, str) and v != "",
              "model": lambda v: isinstance(v, str)}
    for key, ok in checks.items():
        if key in meta and not ok(meta[key]):
            raise UserError(f"{p}: '{key}' is {json.dumps(meta[key])[:60]}, not what harness eval writes")
    opts = meta.get("post_process_options", {})
    if any(not isinstance(v, dict) for v in opts.values()):
        raise UserError(f"{p}: 'post_process_options' must map each method to an object of options")
    return meta
