"""Byte-identical speed-ups of imagecorruptions 1.1.2 corruptions: glass_blur, brightness, saturate.

``glass_blur`` dominates the cost of COCO-C generation: upstream runs a per-pixel Python loop
that draws ``np.random.randint(-d, d, size=(2,))`` and then "swaps" two pixels, 300 000 times
per iteration on a 480x640 image (~4 s per call). Two observations make it fast without
changing a single output byte:

* The legacy ``RandomState.randint`` stream is sequential: ``randint(lo, hi, size=(n, 2))``
  returns exactly the values of ``n`` successive ``randint(lo, hi, size=(2,))`` calls (each value
  consumes 32-bit MT19937 outputs by masked rejection, with no state carried between calls). So
  all offsets can be drawn up front, in one call, in loop order.
* The swaps are order-dependent (a pixel moved early can be moved again later), so the loop
  itself is kept sequential, in the same order, compiled with numba. Upstream's swap
  ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` acts on numpy *views* of (3,) pixel rows: the
  right-hand side is evaluated first as two views, ``x[h, w]`` is overwritten with ``x[h', w']``
  and then ``x[h', w']`` is assigned from the view of ``x[h, w]``, which now holds the same
  values. The effect is a copy ``x[h, w] = x[h', w']``, not a swap; we reproduce the copy.

Without numba the same loop runs in Python over the pre-drawn offsets (still exact, slower).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# (sigma, max_delta, iterations) per severity, as in imagecorruptions 1.1.2.
GLASS_BLUR_PARAMS: tuple[tuple[float, int, int], ...] = (
    (0.7, 1, 2),
    (0.9, 2, 1),
    (1.0, 2, 3),
    (1.1, 3, 2),
    (1.5, 4, 2),
)


def _shuffle_python(x: np.ndarray, offsets: np.ndarray, delta: int, iterations: int) -> None:
    """Reference loop over pre-drawn offsets (used when numba is missing).

    Args:
        x: (H, W, C) uint8 image, modified in place.
        offsets: (iterations * n_h * n_w, 2) int64 (dx, dy) pairs in loop order.
        delta: maximum displacement; rows/columns scanned are (size - delta, delta] descending.
        iterations: number of passes.
    """
    k = 0
    height, width = x.shape[:2]
    for _ in range(iterations):
        for h in range(height - delta, delta, -1):
            for w in range(width - delta, delta, -1):
                dx, dy = offsets[k]
                k += 1
                x[h, w] = x[h + dy, w + dx]


try:
    import numba

    @numba.njit(cache=True, nogil=True)
    def _shuffle_numba(x: np.ndarray, offsets: np.ndarray, delta: int, iterations: int) -> None:  # pragma: no cover
        k = 0
        height, width, channels = x.shape
        for _ in range(iterations):
            for h in range(height - delta, delta, -1):
                for w in range(width - delta, delta, -1):
                    dx = offsets[k, 0]
                    dy = offsets[k, 1]
                    k += 1
                    hp = h + dy
                    wp = w + dx
                    for ch in range(channels):
                        x[h, w, ch] = x[hp, wp, ch]

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba is a declared dependency
    HAVE_NUMBA = False
    log.debug("numba not available: glass_blur uses the (exact, slower) Python loop")


def local_shuffle(x: np.ndarray, delta: int, iterations: int, use_numba: bool = HAVE_NUMBA) -> np.ndarray:
    """glass_blur's pixel shuffle, drawing offsets from the global numpy RNG exactly as upstream.

    Args:
        x: (H, W, 3) uint8 image, modified in place and returned.
        delta: maximum displacement (offsets are drawn from [-delta, delta)).
        iterations: number of passes.
        use_numba: use the compiled loop (same result either way).

    Returns:
        x, shuffled.
    """
    if x.ndim != 3:
        raise ValueError(f"local_shuffle expects (H, W, C), got shape {x.shape}")
    n_h = max(0, x.shape[0] - 2 * delta)
    n_w = max(0, x.shape[1] - 2 * delta)
    count = iterations * n_h * n_w
    if count == 0:
        return x
    # One draw in loop order == the upstream sequence of per-pixel draws (see module docstring).
    offsets = np.ascontiguousarray(np.random.randint(-delta, delta, size=(count, 2)), dtype=np.int64)
    if use_numba and HAVE_NUMBA:
        _shuffle_numba(x, offsets, delta, iterations)
    else:
        _shuffle_python(x, offsets, delta, iterations)
    return x


def glass_blur(x: Any, severity: int = 1) -> np.ndarray:
    """Drop-in replacement for ``imagecorruptions.corruptions.glass_blur`` (byte-identical).

    Args:
        x: PIL image or (H, W, 3) uint8 array, as upstream ``corrupt`` passes it.
        severity: 1..5.

    Returns:
        (H, W, 3) float64 array in [0, 255] (upstream's ``corrupt`` truncates it to uint8).
    """
    from skimage.filters import gaussian

    sigma, delta, iterations = GLASS_BLUR_PARAMS[severity - 1]
    img = np.uint8(gaussian(np.array(x) / 255.0, sigma=sigma, channel_axis=-1) * 255)
    local_shuffle(img, delta, iterations)
    return np.clip(gaussian(img / 255.0, sigma=sigma, channel_axis=-1), 0, 1) * 255


# --------------------------------------------------------------------------- brightness / saturate
#
# Upstream: x / 255 -> skimage rgb2hsv -> adjust V (brightness) or S (saturate) -> skimage hsv2rgb ->
# clip * 255, ~150-250 ms per 480x640 call in whole-image numpy passes. The fused per-pixel loop
# below performs the same IEEE double operations in the same order (max/min, delta / v, the hue
# branches with skimage's precedence blue > green > red, `% 1.0` with Python/numpy semantics,
# floor(h * 6) % 6 sector choice), without fast-math, so every output value is bit-identical.

BRIGHTNESS_PARAMS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)
SATURATE_PARAMS: tuple[tuple[float, float], ...] = ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2))


def _hsv_adjust_python(x: np.ndarray, channel: int, mult: float, add: float) -> np.ndarray:
    """NumPy path (same formulas as skimage), used without numba. x: (H, W, 3) uint8 -> float64."""
    from skimage.color import hsv2rgb, rgb2hsv

    hsv = rgb2hsv(x / 255.0)
    hsv[:, :, channel] = np.clip(hsv[:, :, channel] * mult + add, 0, 1)
    return np.clip(hsv2rgb(hsv), 0, 1) * 255


if HAVE_NUMBA:

    @numba.njit(cache=True, nogil=True)
    def _hsv_adjust_numba(x: np.ndarray, channel: int, mult: float, add: float) -> np.ndarray:  # pragma: no cover
        height, width, _ = x.shape
        out = np.empty((height, width, 3), np.float64)
        for i in range(height):
            for j in range(width):
                r = x[i, j, 0] / 255.0
                g = x[i, j, 1] / 255.0
                b = x[i, j, 2] / 255.0
                v = max(r, g, b)
                delta = v - min(r, g, b)
                if delta == 0.0:
                    s = 0.0
                    h = 0.0
                else:
                    s = delta / v
                    if b == v:
                        h0 = 4.0 + (r - g) / delta
                    elif g == v:
                        h0 = 2.0 + (b - r) / delta
                    else:
                        h0 = (g - b) / delta
                    h = (h0 / 6.0) % 1.0
                if channel == 1:
                    s = min(max(s * mult + add, 0.0), 1.0)
                else:
                    v = min(max(v * mult + add, 0.0), 1.0)
                hi6 = np.floor(h * 6)
                f = h * 6 - hi6
                p = v * (1 - s)
                q = v * (1 - f * s)
                t = v * (1 - (1 - f) * s)
                sector = np.uint8(hi6) % 6
                if sector == 0:
                    rr, gg, bb = v, t, p
                elif sector == 1:
                    rr, gg, bb = q, v, p
                elif sector == 2:
                    rr, gg, bb = p, v, t
                elif sector == 3:
                    rr, gg, bb = p, q, v
                elif sector == 4:
                    rr, gg, bb = t, p, v
                else:
                    rr, gg, bb = v, p, q
                out[i, j, 0] = min(max(rr, 0.0), 1.0) * 255
                out[i, j, 1] = min(max(gg, 0.0), 1.0) * 255
                out[i, j, 2] = min(max(bb, 0.0), 1.0) * 255
        return out


def hsv_adjust(x: np.ndarray, channel: int, mult: float, add: float, use_numba: bool = HAVE_NUMBA) -> np.ndarray:
    """clip(hsv2rgb(adjust(rgb2hsv(x / 255))), 0, 1) * 255 with channel `channel` set to clip(c * mult + add, 0, 1).

    Args:
        x: (H, W, 3) uint8 RGB.
        channel: 1 (saturation) or 2 (value).
        mult: multiplier of the channel.
        add: offset added after the multiplication.
        use_numba: use the fused compiled loop (bit-identical either way).

    Returns:
        (H, W, 3) float64 in [0, 255].
    """
    x = np.ascontiguousarray(x, dtype=np.uint8)
    if use_numba and HAVE_NUMBA:
        return _hsv_adjust_numba(x, channel, float(mult), float(add))
    return _hsv_adjust_python(x, channel, mult, add)


def brightness(x: Any, severity: int = 1) -> np.ndarray:
    """Drop-in replacement for ``imagecorruptions.corruptions.brightness`` on RGB input (bit-identical)."""
    arr = np.array(x)
    if arr.ndim < 3 or arr.shape[2] < 3:  # upstream's grey branch; `corrupt` never takes it
        return np.clip(np.clip(arr / 255.0 + BRIGHTNESS_PARAMS[severity - 1], 0, 1), 0, 1) * 255
    return hsv_adjust(arr, 2, 1.0, BRIGHTNESS_PARAMS[severity - 1])


def saturate(x: Any, severity: int = 1) -> np.ndarray:
    """Drop-in replacement for ``imagecorruptions.corruptions.saturate`` on RGB input (bit-identical)."""
    arr = np.array(x)
    mult, add = SATURATE_PARAMS[severity - 1]
    if arr.ndim < 3 or arr.shape[2] < 3:  # upstream's grey branch; `corrupt` never takes it
        return hsv_adjust(np.stack([arr] * 3, axis=-1), 1, mult, add)[:, :, 0]
    return hsv_adjust(arr, 1, mult, add)


def warm_up() -> None:
    """Compile (or load from cache) the numba loop so the first real call is not slowed down."""
    if HAVE_NUMBA:
        state = np.random.get_state()
        try:
            local_shuffle(np.zeros((8, 8, 3), np.uint8), 1, 1)
            hsv_adjust(np.zeros((2, 2, 3), np.uint8), 1, 1.0, 0.0)
        finally:
            np.random.set_state(state)
