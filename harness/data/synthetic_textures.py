"""Texture banks and shape rasterisation for the synthetic panoptic dataset.

Each stuff texture is a grey-level pattern in [0, 1] (float32, `(S, S)`) generated once per
worker process; an image takes a random crop of the bank and colourises it with two per-image
colours (`colourise`). Cropping a precomputed bank is what keeps the generator at hundreds of
images per second: no per-pixel Python and no per-image noise synthesis.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np

# Pattern names in a bank. "grass" is shared by the stuff class `grass` and the thing class
# `leaf` on purpose (a camouflaged object is only told apart by its outline).
PATTERNS: tuple[str, ...] = ("grass", "water", "brick", "road", "sand", "grain")


def _normalise(a: np.ndarray) -> np.ndarray:
    """Affine-rescale to [0, 1] as float32."""
    lo, hi = float(a.min()), float(a.max())
    return ((a - lo) / max(hi - lo, 1e-6)).astype(np.float32)


def _grass(rng: np.random.Generator, s: int) -> np.ndarray:
    # Vertically elongated blobs (blades) over fine noise.
    noise = rng.random((s, s), dtype=np.float32)
    blades = cv2.GaussianBlur(noise, (0, 0), sigmaX=0.8, sigmaY=3.5, borderType=cv2.BORDER_REFLECT)
    clumps = cv2.GaussianBlur(rng.random((s, s), dtype=np.float32), (0, 0), sigmaX=8.0)
    return _normalise(0.7 * _normalise(blades) + 0.3 * _normalise(clumps))


def _water(rng: np.random.Generator, s: int) -> np.ndarray:
    y, x = np.mgrid[0:s, 0:s].astype(np.float32)
    phase = 0.6 * np.sin(2 * np.pi * x / rng.uniform(40, 70)) + 0.3 * np.sin(2 * np.pi * x / rng.uniform(9, 15))
    waves = np.sin(2 * np.pi * (y / rng.uniform(6, 10)) + phase)
    noise = cv2.GaussianBlur(rng.random((s, s), dtype=np.float32), (0, 0), sigmaX=2.0)
    return _normalise(waves + 1.5 * _normalise(noise))


def _brick(rng: np.random.Generator, s: int) -> np.ndarray:
    bh, bw = int(rng.integers(7, 10)), int(rng.integers(16, 22))
    y, x = np.mgrid[0:s, 0:s]
    row = y // bh
    xs = x + (row % 2) * (bw // 2)
    col = xs // bw
    # Per-brick brightness from a small random table indexed by (row, col).
    table = rng.uniform(0.55, 1.0, size=(s // bh + 2, s // bw + 3)).astype(np.float32)
    out = table[row, col]
    mortar = (y % bh == 0) | (xs % bw == 0)
    out = np.where(mortar, 0.15, out) + 0.12 * rng.random((s, s), dtype=np.float32)
    return _normalise(out)


def _road(rng: np.random.Generator, s: int) -> np.ndarray:
    fine = rng.random((s, s), dtype=np.float32)
    coarse = cv2.GaussianBlur(rng.random((s, s), dtype=np.float32), (0, 0), sigmaX=12.0)
    return _normalise(0.5 * fine + 0.5 * _normalise(coarse))


def _sand(rng: np.random.Generator, s: int) -> np.ndarray:
    speckle = (rng.random((s, s), dtype=np.float32) > 0.93).astype(np.float32)
    ripples = np.sin(np.mgrid[0:s, 0:s][0].astype(np.float32) / 3.0 + 4 * _normalise(
        cv2.GaussianBlur(rng.random((s, s), dtype=np.float32), (0, 0), sigmaX=10.0)))
    return _normalise(0.6 * ripples + speckle + 0.3 * rng.random((s, s), dtype=np.float32))


def _grain(rng: np.random.Generator, s: int) -> np.ndarray:
    return cv2.GaussianBlur(rng.random((s, s), dtype=np.float32), (0, 0), sigmaX=0.7)


_MAKERS = {"grass": _grass, "water": _water, "brick": _brick, "road": _road, "sand": _sand, "grain": _grain}


@functools.lru_cache(maxsize=4)
def texture_bank(seed: int, side: int) -> dict[str, np.ndarray]:
    """Deterministic pattern bank for a dataset seed.

    Args:
        seed: dataset seed (the bank depends only on it, never on worker count).
        side: bank side length S; crops up to S x S are available.

    Returns:
        Pattern name -> `(S, S)` float32 array in [0, 1].
    """
    bank = {}
    for k, name in enumerate(PATTERNS):
        rng = np.random.default_rng([int(seed), 7919, k])
        bank[name] = np.ascontiguousarray(_MAKERS[name](rng, side))
    return bank


@functools.lru_cache(maxsize=4)
def texture_bank_u8(seed: int, side: int) -> dict[str, np.ndarray]:
    """`texture_bank` quantised to uint8 (0..255), for look-up-table colouring of large regions."""
    return {k: np.round(v * 255).astype(np.uint8) for k, v in texture_bank(seed, side).items()}


def colour_table(dark: np.ndarray, light: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """`(256, 3)` uint8 look-up table mapping a quantised pattern value to RGB between two colours."""
    t = np.linspace(0.0, 1.0, 256, dtype=np.float32)[:, None]
    return np.clip((dark + t * (light - dark)) * gain, 0, 255).astype(np.uint8)


def crop(pattern: np.ndarray, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Random `(h, w)` crop of a `(S, S)` pattern (a view, no copy)."""
    s = pattern.shape[0]
    y0 = int(rng.integers(0, s - h + 1))
    x0 = int(rng.integers(0, s - w + 1))
    return pattern[y0 : y0 + h, x0 : x0 + w]


def colourise(pattern: np.ndarray, dark: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Map a `(h, w)` pattern in [0, 1] to `(h, w, 3)` float32 RGB between two colours."""
    return dark.astype(np.float32) + pattern[..., None] * (light.astype(np.float32) - dark.astype(np.float32))


def stripes(h: int, w: int, angle: float, period: float) -> np.ndarray:
    """`(h, w)` float32 square-wave stripes in {0, 1} at `angle` radians."""
    y, x = np.ogrid[0:h, 0:w]
    t = (x * np.cos(angle) + y * np.sin(angle)) / period
    return (np.floor(t) % 2).astype(np.float32)


def checker(h: int, w: int, cell: int) -> np.ndarray:
    """`(h, w)` float32 checkerboard in {0, 1}."""
    y, x = np.ogrid[0:h, 0:w]
    return (((y // cell) + (x // cell)) % 2).astype(np.float32)


def unit_polygon(name: str, rng: np.random.Generator) -> np.ndarray:
    """`(N, 2)` float vertices of a shape of circumradius ~1 centred at 0."""
    if name == "triangle":
        a = np.deg2rad([90, 210, 330]) + rng.uniform(-0.25, 0.25, 3)
        return np.stack([np.cos(a), np.sin(a)], 1)
    if name == "hexagon":
        a = np.arange(6) * np.pi / 3
        return np.stack([np.cos(a), np.sin(a)], 1)
    if name == "star":
        a = np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if name == "cross":
        t = rng.uniform(0.22, 0.35)
        return np.array([[t, 1], [t, t], [1, t], [1, -t], [t, -t], [t, -1], [-t, -1], [-t, -t], [-1, -t],
                         [-1, t], [-t, t], [-t, 1]], dtype=np.float64)
    if name == "box":
        a = rng.uniform(0.45, 1.0)
        return np.array([[1, a], [1, -a], [-1, -a], [-1, a]], dtype=np.float64) / math.hypot(1, a)
    raise ValueError(name)


def draw_shape(seg: np.ndarray, name: str, cx: float, cy: float, r: float, rng: np.random.Generator,
                value: int) -> tuple[float, float, float, float]:
    """Rasterise one shape into `seg` (H, W) with `value` (no anti-aliasing: it is an id map).

    Returns:
        The drawn extent (x0, y0, x1, y1) in float pixels, before clipping.
    """
    theta = float(rng.uniform(0, 2 * np.pi))
    c = (int(round(cx * 16)), int(round(cy * 16)))  # fixed-point centre (shift=4) for sub-pixel placement
    if name in ("disc", "bead"):
        cv2.circle(seg, c, max(1, int(round(r * 16))), value, -1, cv2.LINE_8, 4)
        return cx - r, cy - r, cx + r + 1, cy + r + 1
    if name == "ring":
        th = max(2, int(round(r * rng.uniform(0.25, 0.45))))
        cv2.circle(seg, c, max(1, int(round((r - th / 2) * 16))), value, th, cv2.LINE_8, 4)
        return cx - r - 1, cy - r - 1, cx + r + 2, cy + r + 2
    if name == "leaf":
        axes = (max(1, int(round(r * 16))), max(1, int(round(r * rng.uniform(0.3, 0.55) * 16))))
        cv2.ellipse(seg, c, axes, float(np.rad2deg(theta)), 0, 360, value, -1, cv2.LINE_8, 4)
        return cx - r, cy - r, cx + r + 1, cy + r + 1
    if name == "stick":
        long_side = max(seg.shape)
        th = max(1, int(round(long_side * rng.uniform(0.03, 0.045))))
        dx, dy = r * np.cos(theta), r * np.sin(theta)
        p0 = (int(round((cx - dx) * 16)), int(round((cy - dy) * 16)))
        p1 = (int(round((cx + dx) * 16)), int(round((cy + dy) * 16)))
        cv2.line(seg, p0, p1, value, th, cv2.LINE_8, 4)
        return cx - abs(dx) - th, cy - abs(dy) - th, cx + abs(dx) + th + 1, cy + abs(dy) + th + 1
    pts = unit_polygon(name, rng)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    pts = pts @ rot.T * r + np.array([cx, cy])
    cv2.fillPoly(seg, [np.round(pts * 16).astype(np.int32)], value, cv2.LINE_8, 4)
    return float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()) + 1, float(pts[:, 1].max()) + 1
