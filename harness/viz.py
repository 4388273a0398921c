"""Panoptic overlays and image sheets (OpenCV drawing only: fast, no matplotlib start-up).

Used by `harness show`, by `harness synth`'s preview sheet and by the prediction commands.
Colours: each segment gets its category colour, jittered per instance (things only) from a
hash of the segment id, so the same segment keeps its colour across runs and sheets.
All images are RGB uint8 arrays; conversion to OpenCV's BGR happens only at file I/O.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from harness.data.format import VOID
from harness.errors import UserError
from harness.io import atomic_write_bytes

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_BG = (24, 24, 24)


def write_png(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Write `(H, W, 3)` uint8 RGB as PNG atomically."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise RuntimeError(f"PNG encoding failed for {path}")
    return atomic_write_bytes(path, buf.tobytes())


def segment_colour(segment_id: int, category: Mapping[str, Any] | None) -> tuple[int, int, int]:
    """Display colour of one segment: category colour, jittered per instance for things."""
    base = np.array((category or {}).get("color", (200, 200, 200))[:3], np.int32)
    if category is not None and not category.get("isthing", 1):
        return tuple(int(v) for v in base)  # stuff: one segment per class, keep the class colour
    # Cheap deterministic hash of the id (no global RNG state touched).
    h = (int(segment_id) * 2654435761) & 0xFFFFFFFF
    jitter = np.array([(h >> s) & 63 for s in (0, 8, 16)], np.int32) - 32
    return tuple(int(v) for v in np.clip(base + jitter, 0, 255))


def boundaries(id_map: np.ndarray) -> np.ndarray:
    """`(H, W)` bool: pixels whose right or lower neighbour has another segment id."""
    edge = np.zeros(id_map.shape, bool)
    dx = id_map[:, 1:] != id_map[:, :-1]
    dy = id_map[1:, :] != id_map[:-1, :]
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    return edge


def render_panoptic(
    image: np.ndarray,
    id_map: np.ndarray,
    segments_info: Sequence[Mapping[str, Any]],
    categories: Mapping[int, Mapping[str, Any]],
    alpha: float = 0.55,
    outline: bool = True,
    legend: bool = True,
    title: str | None = None,
    scale: int = 1,
) -> np.ndarray:
    """Blend per-segment colours over an image, draw outlines, an optional legend and title.

    Args:
        image: `(H, W, 3)` uint8 RGB.
        id_map: `(H, W)` integer segment ids (0 = VOID, left uncoloured).
        segments_info: COCO `segments_info` dicts (`id`, `category_id`, optional `iscrowd`).
        categories: category id -> COCO category dict (`name`, `color`, `isthing`).
        alpha: overlay opacity in [0, 1].
        outline: draw white segment boundaries.
        legend: append a panel naming the categories present.
        title: text drawn in the top-left corner.
        scale: integer nearest-neighbour upscaling (small images stay legible).

    Returns:
        `(H', W', 3)` uint8 RGB; wider than the input when `legend` is set.
    """
    if image.shape[:2] != id_map.shape:
        raise UserError(f"image size {image.shape[:2]} differs from panoptic PNG size {id_map.shape}")
    if scale > 1:
        image = np.repeat(np.repeat(image, scale, 0), scale, 1)
        id_map = np.repeat(np.repeat(id_map, scale, 0), scale, 1)
    ids = np.array([int(s["id"]) for s in segments_info], np.int64)
    colours = np.array(
        [segment_colour(int(s["id"]), categories.get(int(s["category_id"]))) for s in segments_info], np.float32
    ).reshape(-1, 3)
    # Map id -> row of `colours` with a sorted search (ids are sparse 24-bit values).
    order = np.argsort(ids)
    flat = id_map.reshape(-1).astype(np.int64)
    pos = np.clip(np.searchsorted(ids[order], flat), 0, max(len(ids) - 1, 0))
    known = (len(ids) > 0) & (ids[order][pos] == flat) if len(ids) else np.zeros_like(flat, bool)
    out = image.astype(np.float32).reshape(-1, 3)
    if len(ids):
        sel = known & (flat != VOID)
        out[sel] = (1 - alpha) * out[sel] + alpha * colours[order][pos[sel]]
    out = out.reshape(image.shape)
    if outline:
        out[boundaries(id_map)] = (255, 255, 255)
    # Hatch crowd regions so they read as "many objects" rather than one.
    crowd = [int(s["id"]) for s in segments_info if s.get("iscrowd")]
    if crowd:
        yy, xx = np.indices(id_map.shape)
        hatch = ((xx + yy) % 6 == 0) & np.isin(id_map, crowd)
        out[hatch] = (0, 0, 0)
    result = np.clip(out, 0, 255).astype(np.uint8)
    if title:
        _text(result, title, (3, 12), 0.4)
    if legend:
        present = sorted({int(s["category_id"]) for s in segments_info})
        result = append_legend(result, [dict(categories.get(c, {"id": c, "name": str(c)})) for c in present])
    return result


def _text(img: np.ndarray, text: str, org: tuple[int, int], size: float) -> None:
    """White text with a dark outline, readable on any background (drawn in place)."""
    cv2.putText(img, text, org, _FONT, size, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(img, text, org, _FONT, size, (255, 255, 255), 1, cv2.LINE_AA)


def legend_panel(categories: Sequence[Mapping[str, Any]], height: int, row: int = 14) -> np.ndarray:
    """`(H, W, 3)` panel with one colour swatch and name per category, in columns of `height`."""
    per_col = max(1, (height - 4) // row)
    ncol = max(1, -(-len(categories) // per_col))
    widths = [cv2.getTextSize(str(c.get("name", c.get("id"))), _FONT, 0.38, 1)[0][0] for c in categories]
    col_w = 12 + max(widths or [0]) + 10
    panel = np.full((height, ncol * col_w + 4, 3), _BG, np.uint8)
    for k, c in enumerate(categories):
        x, y = 4 + (k // per_col) * col_w, 4 + (k % per_col) * row
        colour = tuple(int(v) for v in c.get("color", (200, 200, 200))[:3])
        cv2.rectangle(panel, (x, y), (x + 9, y + 9), colour, -1)
        name = str(c.get("name", c.get("id"))) + ("" if c.get("isthing", 1) else "*")
        cv2.putText(panel, name, (x + 13, y + 9), _FONT, 0.38, (235, 235, 235), 1, cv2.LINE_AA)
    return panel


def append_legend(image: np.ndarray, categories: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Image with a legend panel on its right (stuff names marked with `*`)."""
    if not categories:
        return image
    panel = legend_panel(categories, max(image.shape[0], 40))
    h = max(image.shape[0], panel.shape[0])
    out = np.full((h, image.shape[1] + panel.shape[1], 3), _BG, np.uint8)
    out[: image.shape[0], : image.shape[1]] = image
    out[: panel.shape[0], image.shape[1] :] = panel
    return out


def make_grid(tiles: Sequence[np.ndarray], ncols: int = 4, pad: int = 4) -> np.ndarray:
    """Lay `(h_i, w_i, 3)` uint8 tiles of any sizes on a sheet, each top-left aligned in its cell.

    Returns:
        `(rows * (Hmax + pad) + pad, ncols * (Wmax + pad) + pad, 3)` uint8 RGB.
    """
    if not tiles:
        raise ValueError("make_grid needs at least one tile")
    ncols = max(1, min(ncols, len(tiles)))
    nrows = -(-len(tiles) // ncols)
    ch, cw = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    sheet = np.full((nrows * (ch + pad) + pad, ncols * (cw + pad) + pad, 3), _BG, np.uint8)
    for k, t in enumerate(tiles):
        y, x = pad + (k // ncols) * (ch + pad), pad + (k % ncols) * (cw + pad)
        sheet[y : y + t.shape[0], x : x + t.shape[1]] = t
    return sheet
