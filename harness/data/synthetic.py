"""Embedded synthetic panoptic dataset written in the exact COCO panoptic layout.

`generate_dataset` writes::

    DIR/train2017/*.jpg, DIR/val2017/*.jpg
    DIR/annotations/panoptic_{split}.json, DIR/annotations/panoptic_{split}/*.png
    DIR/annotations/instances_{split}.json   (things only, RLE masks, pycocotools-loadable)
    DIR/preview_val.png                      (first 16 validation images with overlays)

Content: 10 thing classes (geometric shapes with varied colour, texture, size and rotation,
several instances per image, occluding each other, touching instances of one class, thin
sticks and small beads) over 6 textured stuff classes laid out as wavy bands. Crowd regions
are clumps of beads labelled as one `iscrowd=1` segment; VOID pixels come from thin bands
between stuff regions, unlabelled clutter blobs and fragments left too small by occlusion.
The thing class `leaf` shares its texture with the stuff class `grass`.

Category ids are non-contiguous on purpose (things 1..19 with gaps, stuff >= 92), and image
ids are odd numbers (val offset by 1,000,000), so code that confuses ids with indices fails.

Determinism: each image is drawn from its own RNG seeded with (seed, split, index) and the
texture bank depends only on the seed, so any image can be regenerated alone, the worker count
does not change the output, and files are byte-identical across runs (fixed JPEG quality and
PNG compression through OpenCV, fixed JSON key order).
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from harness.data import synthetic_textures as tx
from harness.data.format import id2rgb
from harness.io import atomic_write_bytes, atomic_write_text, init_worker_signals, stop_process_pool

log = logging.getLogger(__name__)

SPLITS: tuple[str, str] = ("train2017", "val2017")
JPEG_QUALITY = 92
PNG_COMPRESSION = 3
PREVIEW_COUNT = 16
_VAL_ID_OFFSET = 1_000_000


@dataclass(frozen=True)
class SynthClass:
    """One synthetic category.

    Attributes:
        id: COCO category id (non-contiguous).
        name: unique name.
        isthing: thing (countable shape) or stuff (textured region).
        color: RGB display colour, also the mean object colour for things.
        supercategory: COCO supercategory.
    """

    id: int
    name: str
    isthing: bool
    color: tuple[int, int, int]
    supercategory: str


THING_CLASSES: tuple[SynthClass, ...] = (
    SynthClass(1, "disc", True, (220, 40, 40), "round"),
    SynthClass(2, "box", True, (240, 160, 30), "polygon"),
    SynthClass(4, "triangle", True, (230, 220, 40), "polygon"),
    SynthClass(5, "star", True, (250, 120, 200), "polygon"),
    SynthClass(7, "cross", True, (150, 60, 220), "polygon"),
    SynthClass(9, "ring", True, (40, 200, 220), "round"),
    SynthClass(11, "stick", True, (235, 230, 190), "thin"),
    SynthClass(13, "bead", True, (255, 90, 0), "round"),
    SynthClass(16, "leaf", True, (60, 150, 40), "round"),
    SynthClass(18, "hexagon", True, (30, 90, 240), "polygon"),
)
STUFF_CLASSES: tuple[SynthClass, ...] = (
    SynthClass(92, "sky", False, (110, 170, 240), "sky"),
    SynthClass(95, "grass", False, (70, 140, 50), "ground"),
    SynthClass(100, "water", False, (30, 90, 160), "ground"),
    SynthClass(105, "brick", False, (150, 70, 45), "building"),
    SynthClass(110, "road", False, (90, 90, 95), "ground"),
    SynthClass(120, "sand", False, (200, 170, 110), "ground"),
)
ALL_CLASSES: tuple[SynthClass, ...] = THING_CLASSES + STUFF_CLASSES
_BY_NAME = {c.name: c for c in ALL_CLASSES}

# Stuff colour ranges: (dark, light) RGB anchors; a per-image jitter is added to both.
_STUFF_COLOURS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "sky": ((60, 120, 215), (175, 210, 250)),
    "grass": ((20, 70, 15), (95, 175, 60)),
    "water": ((10, 45, 105), (75, 145, 205)),
    "brick": ((55, 30, 22), (185, 85, 55)),
    "road": ((45, 45, 50), (125, 125, 130)),
    "sand": ((150, 120, 70), (235, 205, 145)),
}
_GROUND = ("grass", "water", "brick", "road", "sand")

# Thing shape parameters: radius range as a fraction of the long image side, allowed fills.
_THING_RADIUS: dict[str, tuple[float, float]] = {
    "disc": (0.063, 0.18), "box": (0.08, 0.2), "triangle": (0.1, 0.215), "star": (0.1, 0.215),
    "cross": (0.08, 0.2), "ring": (0.08, 0.18), "stick": (0.12, 0.3), "bead": (0.035, 0.05),
    "leaf": (0.09, 0.2), "hexagon": (0.08, 0.2),
}
_THING_FILLS: dict[str, tuple[str, ...]] = {
    "disc": ("plain", "gradient", "stripes"), "box": ("plain", "stripes", "checker"),
    "triangle": ("plain", "gradient"), "star": ("plain", "gradient", "stripes"), "cross": ("plain", "checker"),
    "ring": ("plain", "gradient"), "stick": ("plain",), "bead": ("plain",),
    "leaf": ("grass", "grass", "plain"), "hexagon": ("plain", "checker", "gradient"),
}
# 20 % of the shapes are drawn this much smaller. At 0.45 (until 2026-12-02) 10.7 % of the things at 128 px were
# under 64 px, i.e. under one 8 x 8 cell of the stride-8 masks every Panoptic SegFormer predicts, and the tiny model
# matched 12 % of them (README, "Third round"; docs/synth.md).
_SMALL_DRAW = 0.65
# Class frequencies when placing things (beads are mostly added as scatter and crowds).
_THING_WEIGHTS = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 1.0, 1.0])
_THING_WEIGHTS = _THING_WEIGHTS / _THING_WEIGHTS.sum()
# (short/long, portrait): long side = `size`, short side rounded to a multiple of 8.
_ASPECTS: tuple[tuple[float, bool], ...] = ((1.0, False), (0.75, False), (0.75, True), (0.625, False))


def categories() -> list[dict[str, Any]]:
    """COCO panoptic `categories` list (id, name, supercategory, isthing, color), ascending id."""
    return [
        {"id": c.id, "name": c.name, "supercategory": c.supercategory, "isthing": int(c.isthing),
         "color": list(c.color)}
        for c in sorted(ALL_CLASSES, key=lambda c: c.id)
    ]


def image_id_for(split: str, index: int) -> int:
    """Image id of the `index`-th image of `split` (odd numbers; val offset by 1,000,000)."""
    return (_VAL_ID_OFFSET if split == SPLITS[1] else 0) + 2 * index + 1


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The per-image RNG: depends only on (seed, split, index)."""
    return np.random.default_rng([int(seed), SPLITS.index(split), int(index)])


def image_shape(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """(H, W) with long side `size` and one of a few aspect ratios."""
    ratio, portrait = _ASPECTS[int(rng.integers(len(_ASPECTS)))]
    short = max(8, int(round(size * ratio / 8)) * 8) if ratio < 1 else size
    return (size, short) if portrait else (short, size)


@dataclass
class SynthImage:
    """One rendered sample.

    Attributes:
        image: `(H, W, 3)` uint8 RGB.
        id_map: `(H, W)` uint32 segment ids (0 = VOID).
        segments: COCO `segments_info` dicts (id, category_id, area, bbox, iscrowd).
    """

    image: np.ndarray
    id_map: np.ndarray
    segments: list[dict[str, Any]]


@dataclass
class _Item:
    """A painted layer: a stuff class, one thing instance, a crowd clump or a VOID blob."""

    category: str | None  # None = VOID clutter
    iscrowd: bool
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), clipped to the image
    fill: Callable[[int, int], np.ndarray] | None  # (h, w) -> (h, w, 3) float32; None for stuff


def _jitter(rng: np.random.Generator, colour: tuple[int, ...] | np.ndarray, amount: int) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float32) + rng.integers(-amount, amount + 1, 3), 0, 255).astype(np.float32)


def _thing_colour(rng: np.random.Generator, name: str) -> np.ndarray:
    # Mostly near the class colour (learnable), sometimes arbitrary (shape must decide).
    if rng.random() < 0.9:
        return _jitter(rng, _BY_NAME[name].color, 30)
    return rng.integers(0, 256, 3).astype(np.float32)


def _make_fill(
    rng: np.random.Generator, name: str, bank: dict[str, np.ndarray], colour: np.ndarray, max_box: int
) -> Callable[[int, int], np.ndarray]:
    """A closure rendering the object's texture for a `(h, w)` box; parameters drawn now."""
    styles = _THING_FILLS[name]
    style = styles[int(rng.integers(len(styles)))]
    # Texture offset such that any box up to the image size fits in the bank.
    side = bank["grain"].shape[0]
    y0, x0 = (int(v) for v in rng.integers(0, side - max_box + 1, 2))
    if style == "plain":
        amp = float(rng.uniform(0.1, 0.35))

        def fill(h: int, w: int) -> np.ndarray:
            g = bank["grain"][y0 : y0 + h, x0 : x0 + w]
            return colour * (1.0 - amp / 2 + amp * g)[..., None]

    elif style == "gradient":
        angle, dark = float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.45, 0.75))

        def fill(h: int, w: int) -> np.ndarray:
            yy, xx = np.ogrid[0:h, 0:w]
            t = xx * np.cos(angle) + yy * np.sin(angle)
            t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
            return colour * (dark + (1 - dark) * t.astype(np.float32))[..., None]

    elif style == "stripes":
        angle, period = float(rng.uniform(0, np.pi)), float(rng.uniform(2.5, 6.0))
        other = colour * float(rng.uniform(0.3, 0.6))

        def fill(h: int, w: int) -> np.ndarray:
            return tx.colourise(tx.stripes(h, w, angle, period), other, colour)

    elif style == "checker":
        cell = int(rng.integers(3, 7))
        other = _jitter(rng, 255 - colour, 30)

        def fill(h: int, w: int) -> np.ndarray:
            return tx.colourise(tx.checker(h, w, cell), other, colour)

    else:  # "grass": the stuff texture, slightly lighter, so only the outline tells them apart
        dark, light = (_jitter(rng, c, 20) * 1.1 for c in _STUFF_COLOURS["grass"])

        def fill(h: int, w: int) -> np.ndarray:
            return tx.colourise(bank["grass"][y0 : y0 + h, x0 : x0 + w], dark, light)

    return fill


def _clip_box(ext: tuple[float, float, float, float], h: int, w: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = ext
    return (max(0, int(math.floor(x0)) - 1), max(0, int(math.floor(y0)) - 1),
            min(w, int(math.ceil(x1)) + 1), min(h, int(math.ceil(y1)) + 1))


def _stuff_layout(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """Wavy bands of stuff.

    Returns:
        band `(H, W)` int index into `names`, `names` (stuff class per band), and an optional
        `(H, W)` bool VOID mask (thin unlabelled lines along the band boundaries).
    """
    vertical = rng.random() < 0.25
    across, along = (w, h) if vertical else (h, w)
    nb = int(rng.integers(2, 5))
    names: list[str] = []
    if not vertical and rng.random() < 0.65:
        names.append("sky")
    while len(names) < nb:
        pick = _GROUND[int(rng.integers(len(_GROUND)))]
        if not names or pick != names[-1]:
            names.append(pick)
    bases = np.sort(rng.uniform(0.12, 0.92, nb - 1)) * across
    t = np.arange(along, dtype=np.float32)
    curves = []
    for b in bases:
        amp1, amp2 = rng.uniform(0.0, 0.07) * across, rng.uniform(0.0, 0.02) * across
        p1, p2 = rng.uniform(0.5, 1.5) * along, rng.uniform(0.08, 0.2) * along
        ph1, ph2 = rng.uniform(0, 2 * np.pi, 2)
        curves.append(b + amp1 * np.sin(2 * np.pi * t / p1 + ph1) + amp2 * np.sin(2 * np.pi * t / p2 + ph2))
    cur = np.stack(curves).astype(np.float32)  # (nb - 1, along)
    coord = np.arange(across, dtype=np.float32)[None, :, None]  # (1, across, 1)
    band = (coord > cur[:, None, :]).sum(0)  # (across, along)
    void = None
    if rng.random() < 0.4:
        half = float(rng.uniform(0.6, 1.6))
        void = (np.abs(coord - cur[:, None, :]) < half).any(0)
    if vertical:
        band = band.T
        void = None if void is None else void.T
    return np.ascontiguousarray(band), names, void


def render_image(seed: int, split: str, index: int, size: int = 256) -> SynthImage:
    """Render one image and its panoptic annotation, a pure function of (seed, split, index, size).

    Args:
        seed: dataset seed.
        split: one of `SPLITS`.
        index: image index within the split.
        size: long image side in pixels.

    Returns:
        The rendered `SynthImage`.
    """
    rng = image_rng(seed, split, index)
    bank = tx.texture_bank(int(seed), _bank_side(size))
    h, w = image_shape(rng, size)
    long_side = float(max(h, w))

    # Layer table: index 0 is VOID; seg holds layer indices, later layers occlude earlier ones.
    items: list[_Item | None] = [None]
    band, band_names, band_void = _stuff_layout(rng, h, w)
    stuff_names = sorted(set(band_names), key=band_names.index)
    lut = np.array([1 + stuff_names.index(n) for n in band_names], dtype=np.uint16)
    seg = lut[band]
    stuff_index = seg.astype(np.intp) - 1  # (H, W) stuff class index per pixel, before things cover it
    if band_void is not None:
        seg[band_void] = 0
        stuff_index[band_void] = len(stuff_names)
    for n in stuff_names:
        items.append(_Item(n, False, (0, 0, w, h), None))

    # Things, clutter blobs and crowd clumps, shuffled into one paint order.
    plan: list[tuple[str, Any]] = []
    for _ in range(int(rng.integers(2, 7))):
        name = THING_CLASSES[int(rng.choice(len(THING_CLASSES), p=_THING_WEIGHTS))].name
        plan.append(("thing", name))
    plan += [("thing", "bead")] * int(rng.choice([0, 0, 1, 2, 3]))
    plan += [("void", None)] * int(rng.choice([0, 0, 0, 1, 2]))
    if rng.random() < 0.3:
        plan.append(("crowd", "bead"))
    order = rng.permutation(len(plan))

    for k in order:
        kind, name = plan[int(k)]
        cx, cy = float(rng.uniform(-0.05, 1.05) * w), float(rng.uniform(-0.05, 1.05) * h)
        value = len(items)
        if kind == "void":
            r = long_side * rng.uniform(0.04, 0.1)
            ext = tx.draw_shape(seg, "leaf", cx, cy, r, rng, value)
            grey = _jitter(rng, (128, 128, 128), 60)
            items.append(_Item(None, False, _clip_box(ext, h, w), _make_fill(rng, "bead", bank, grey, size)))
            continue
        if kind == "crowd":
            spread = long_side * rng.uniform(0.05, 0.11)
            ext_all = [cx - spread, cy - spread, cx + spread, cy + spread]
            for _ in range(int(rng.integers(12, 30))):
                a, d = rng.uniform(0, 2 * np.pi), spread * math.sqrt(rng.random())
                rb = long_side * rng.uniform(*_THING_RADIUS["bead"])
                tx.draw_shape(seg, "bead", cx + d * math.cos(a), cy + d * math.sin(a), rb, rng, value)
            ext_all = [ext_all[0] - 6, ext_all[1] - 6, ext_all[2] + 6, ext_all[3] + 6]
            fill = _make_fill(rng, "bead", bank, _thing_colour(rng, "bead"), size)
            items.append(_Item("bead", True, _clip_box(tuple(ext_all), h, w), fill))
            continue
        lo, hi = _THING_RADIUS[name]
        r = long_side * rng.uniform(lo, hi) * (_SMALL_DRAW if rng.random() < 0.2 and name != "bead" else 1.0)
        colour = _thing_colour(rng, name)
        ext = tx.draw_shape(seg, name, cx, cy, r, rng, value)
        items.append(_Item(name, False, _clip_box(ext, h, w), _make_fill(rng, name, bank, colour, size)))
        if name != "bead" and rng.random() < 0.3:
            # A touching sibling of the same class and a similar colour: instance separation must
            # come from the shared boundary, not from colour.
            a = rng.uniform(0, 2 * np.pi)
            r2 = r * rng.uniform(0.8, 1.2)
            d = (r + r2) * rng.uniform(0.7, 0.95) * (0.5 if name == "stick" else 1.0)
            value = len(items)
            ext = tx.draw_shape(seg, name, cx + d * math.cos(a), cy + d * math.sin(a), r2, rng, value)
            fill = _make_fill(rng, name, bank, _jitter(rng, colour, 12), size)
            items.append(_Item(name, False, _clip_box(ext, h, w), fill))

    # --- Image: stuff textures, then each layer's texture inside its own box. ---
    # Stuff: one gather through a per-(class, pattern value) colour table, no per-class masks.
    gain = float(rng.uniform(0.85, 1.12))  # global illumination
    bank_u8 = tx.texture_bank_u8(int(seed), _bank_side(size))
    k_void = len(stuff_names)
    tables = np.empty((k_void + 1, 256, 3), np.uint8)
    patterns = []
    for k, n in enumerate(stuff_names):
        dark, light = (_jitter(rng, c, 25) for c in _STUFF_COLOURS[n])
        tables[k] = tx.colour_table(dark, light, gain)
        if n == "sky":
            patterns.append(np.broadcast_to(np.linspace(0, 255, h).astype(np.uint8)[:, None], (h, w)))
        else:
            patterns.append(tx.crop(bank_u8[n], rng, h, w))
    # VOID lines keep a dark texture (unlabelled, not blank).
    tables[k_void] = tx.colour_table(np.float32([40, 40, 40]), np.float32([90, 90, 90]), gain)
    patterns.append(tx.crop(bank_u8["road"], rng, h, w))
    value = np.choose(stuff_index, patterns)
    image = tables.reshape(-1, 3)[(stuff_index.astype(np.intp) << 8) | value]
    for i in range(1 + len(stuff_names), len(items)):
        it = items[i]
        assert it is not None and it.fill is not None
        x0, y0, x1, y1 = it.box
        if x1 <= x0 or y1 <= y0:
            continue
        sub = seg[y0:y1, x0:x1] == i
        if sub.any():
            patch = image[y0:y1, x0:x1]
            patch[sub] = np.clip(it.fill(y1 - y0, x1 - x0)[sub] * gain, 0, 255).astype(np.uint8)
    # Sensor grain.
    noise = ((tx.crop(bank["grain"], rng, h, w) - 0.5) * float(rng.uniform(6, 18))).astype(np.int16)
    image = np.clip(image.astype(np.int16) + noise[..., None], 0, 255).astype(np.uint8)

    # --- Segments: drop fragments too small to annotate (they become VOID). ---
    areas = np.bincount(seg.ravel(), minlength=len(items))
    scale = (long_side / 256.0) ** 2
    keep = np.zeros(len(items), bool)
    for i in range(1, len(items)):
        it = items[i]
        if it is None or it.category is None:
            continue
        keep[i] = areas[i] >= (max(4.0, 6.0 * scale) if _BY_NAME[it.category].isthing else 48.0 * scale)
    layer_ids = np.flatnonzero(keep)
    seg_ids = _unique_ids(rng, len(layer_ids))
    id_lut = np.zeros(len(items), np.uint32)
    id_lut[layer_ids] = seg_ids
    id_map = id_lut[seg]
    segments = []
    for i, sid in zip(layer_ids, seg_ids):
        it = items[int(i)]
        assert it is not None and it.category is not None
        x0, y0, x1, y1 = it.box
        sub = seg[y0:y1, x0:x1] == i
        rows, cols = np.flatnonzero(sub.any(1)), np.flatnonzero(sub.any(0))
        bbox = [int(x0 + cols[0]), int(y0 + rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
        segments.append({"id": int(sid), "category_id": _BY_NAME[it.category].id, "area": int(areas[i]),
                         "bbox": bbox, "iscrowd": int(it.iscrowd)})
    return SynthImage(image=image, id_map=id_map, segments=segments)


def _unique_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` distinct segment ids in [1, 2**24) (random, so ids never equal indices)."""
    ids: list[int] = []
    seen: set[int] = set()
    while len(ids) < n:
        v = int(rng.integers(1, 1 << 24))
        if v not in seen:
            seen.add(v)
            ids.append(v)
    return np.array(ids, dtype=np.uint32)


def _bank_side(size: int) -> int:
    # Crops up to size x size plus room for random offsets.
    return int(size + max(64, size // 2))


# ----------------------------------------------------------------------------- writing


def _encode_image(image: np.ndarray) -> bytes:
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def _encode_png(id_map: np.ndarray) -> bytes:
    bgr = cv2.cvtColor(id2rgb(id_map), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _instance_annotations(sample: SynthImage, image_id: int) -> list[dict[str, Any]]:
    """Thing segments as COCO instance annotations (compressed RLE), without `id` yet."""
    from pycocotools import mask as mask_utils

    thing_ids = {c.id for c in THING_CLASSES}
    segs = [s for s in sample.segments if s["category_id"] in thing_ids]
    if not segs:
        return []
    # (N, W, H) C-order transposed is (H, W, N) Fortran order, what the RLE encoder wants, without a copy.
    id_t = np.ascontiguousarray(sample.id_map.T)
    masks = np.empty((len(segs),) + id_t.shape, np.uint8)
    for k, s in enumerate(segs):
        np.equal(id_t, s["id"], out=masks[k], casting="unsafe")
    rles = mask_utils.encode(masks.transpose(2, 1, 0))
    out = []
    for s, rle in zip(segs, rles):
        out.append({
            "image_id": image_id,
            "category_id": s["category_id"],
            "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": s["area"],
            "bbox": [float(v) for v in s["bbox"]],
            "iscrowd": s["iscrowd"],
        })
    return out


def _write_one(job: tuple[Path, int, str, int, int]) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Render and write one image + panoptic PNG; return its JSON entries (worker entry point)."""
    root, seed, split, index, size = job
    sample = render_image(seed, split, index, size)
    image_id = image_id_for(split, index)
    stem = f"{image_id:012d}"
    atomic_write_bytes(root / split / f"{stem}.jpg", _encode_image(sample.image))
    atomic_write_bytes(root / "annotations" / f"panoptic_{split}" / f"{stem}.png", _encode_png(sample.id_map))
    h, w = sample.id_map.shape
    img = {"id": image_id, "file_name": f"{stem}.jpg", "height": int(h), "width": int(w)}
    ann = {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": sample.segments}
    return img, ann, _instance_annotations(sample, image_id)


def _init_worker() -> None:
    init_worker_signals(lambda: cv2.setNumThreads(1))  # one core per worker; then SIGTERM / Ctrl-C: exit quietly  # SIGTERM / Ctrl-C: exit quietly, temporaries removed


def _dump(obj: Any) -> str:
    # Compact separators and insertion-ordered keys: byte-identical for identical content.
    return json.dumps(obj, separators=(",", ":"))


def generate_dataset(
    out_dir: str | Path,
    num_train: int,
    num_val: int,
    seed: int,
    size: int = 256,
    workers: int = 1,
    preview: bool = True,
    remove_stale: bool = True,
) -> Path:
    """Write the synthetic dataset in COCO panoptic layout (see module docstring).

    Args:
        out_dir: dataset root (created if missing; files of an earlier run are replaced, extra ones removed).
        num_train: images in `train2017`.
        num_val: images in `val2017`.
        seed: dataset seed; equal seeds give byte-identical files.
        size: long image side in pixels (>= 32).
        workers: processes used for rendering (output does not depend on it).
        preview: also write `preview_val.png` (first 16 validation images with overlays).
        remove_stale: delete 12-digit images/PNGs of an earlier, larger run (`harness synth` removes exactly the
            files of the previous run's settings itself, from its output marker, and passes False).

    Returns:
        The dataset root as a Path.
    """
    from tqdm import tqdm

    from harness.logging_utils import progress_disabled

    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    if num_train < 0 or num_val < 0:
        raise ValueError("image counts must be >= 0")
    root = Path(out_dir)
    cats = categories()
    info = {"description": "psf-harness synthetic panoptic dataset", "version": "1.0", "seed": int(seed),
            "size": int(size)}
    # "spawn": safe whatever threads the caller has started (torch, OpenCV); output never depends on it.
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) if workers > 1 else None
    try:
        for split, n in zip(SPLITS, (num_train, num_val)):
            (root / split).mkdir(parents=True, exist_ok=True)
            (root / "annotations" / f"panoptic_{split}").mkdir(parents=True, exist_ok=True)
            jobs = [(root, int(seed), split, i, int(size)) for i in range(n)]
            results = pool.imap(_write_one, jobs, chunksize=8) if pool else map(_write_one, jobs)
            images, annotations, instances = [], [], []
            for img, ann, inst in tqdm(results, total=n, desc=split, disable=progress_disabled(), leave=False):
                images.append(img)
                annotations.append(ann)
                instances.extend(inst)
            if remove_stale:
                _remove_stale(root, split, {Path(i["file_name"]).stem for i in images})
            for k, a in enumerate(instances, start=1):  # ids assigned in image order: deterministic
                instances[k - 1] = {"id": k, **a}
            panoptic = {"info": info, "licenses": [], "images": images, "annotations": annotations,
                        "categories": cats}
            atomic_write_text(root / "annotations" / f"panoptic_{split}.json", _dump(panoptic))
            thing_cats = [{k: c[k] for k in ("id", "name", "supercategory")} for c in cats if c["isthing"]]
            coco = {"info": info, "licenses": [], "images": images, "annotations": instances,
                    "categories": thing_cats}
            atomic_write_text(root / "annotations" / f"instances_{split}.json", _dump(coco))
            log.info("wrote %d %s images to %s", n, split, root / split)
    except BaseException:
        if pool is not None:  # an error, Ctrl-C or SIGTERM: stop the workers now instead of finishing every job
            # (not Pool.terminate() alone: it waits forever for the task queue's lock when a worker was stopped
            # while holding it, which hung `harness synth` after SIGTERM once in CI)
            stop_process_pool(pool)
            pool = None
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if preview and num_val > 0:
        write_preview(root, root / "preview_val.png")
    return root


def _remove_stale(root: Path, split: str, keep: set[str]) -> None:
    """Delete images/PNGs of an earlier, larger run in the same folder (only our 12-digit names)."""
    stale = [p for folder, ext in ((root / split, ".jpg"), (root / "annotations" / f"panoptic_{split}", ".png"))
             for p in folder.glob(f"*{ext}") if p.stem.isdigit() and len(p.stem) == 12 and p.stem not in keep]
    for p in stale:
        p.unlink()
    if stale:
        log.info("removed %d stale files of an earlier run from %s", len(stale), root)


def write_preview(root: Path, out: Path, split: str = SPLITS[1], count: int = PREVIEW_COUNT) -> Path:
    """Render the first `count` images of `split` with panoptic overlays into one PNG sheet."""
    from harness import viz
    from harness.data.coco_panoptic import read_id_png, read_image_rgb

    panoptic = json.loads((root / "annotations" / f"panoptic_{split}.json").read_text())
    cats = {c["id"]: c for c in panoptic["categories"]}
    tiles = []
    for img, ann in list(zip(panoptic["images"], panoptic["annotations"]))[:count]:
        image = read_image_rgb(root / split / img["file_name"])
        id_map = read_id_png(root / "annotations" / f"panoptic_{split}" / ann["file_name"])
        tiles.append(viz.render_panoptic(image, id_map, ann["segments_info"], cats, legend=False,
                                         title=str(img["id"])))
    sheet = viz.make_grid(tiles, ncols=4)
    sheet = viz.append_legend(sheet, list(cats.values()))
    return viz.write_png(out, sheet)
