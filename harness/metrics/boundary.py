"""Segment boundaries as boundary-iou-api defines them (Cheng et al., CVPR 2021).

The boundary of a binary mask is the mask minus its erosion by a 3x3 kernel repeated `d`
times, with the image padded by a 1-pixel zero border first so that a mask cut by the image
edge has a boundary there (`boundary_iou/utils/boundary_utils.py: mask_to_boundary`). `d` is
`max(1, round(dilation_ratio * image_diagonal))` with Python's round-half-to-even.

Eroding d times by 3x3 equals one erosion by a (2d+1) x (2d+1) square, so a pixel of segment
`s` is on the boundary of `s` iff the square window around it contains a pixel of another
segment (or VOID, or lies partly outside the image). For all segments of an id map at once
that is `max_filter(codes) != min_filter(codes)` over the window, which is what
`boundary_band` computes: one dilation and one erosion of the whole map instead of one
erosion per segment. The compiled kernel gets the same band without any (2d+1)^2 filter: the
window is constant iff each of its rows is constant and vertically adjacent pixels in its
middle column agree, so with R(y, x) = "row window [x-d, x+d] not constant or outside" and
V(y, x) = "differs from the pixel above", the band is "any R in rows y-d..y+d or any V in rows
y-d+1..y+d, or within d of the top or bottom edge": running counts, O(H W) for any d.

boundary-iou-api's Boundary PQ builds a "boundary id map": each segment's interior is painted
with a dummy label `BOUNDARY_ID = max(category id) + 1` and its boundary keeps the segment id.
Segments are processed in JSON order on the map being painted, so if a segment id equals
BOUNDARY_ID, that segment's mask also picks up the interiors painted before it. The fast path
cannot see that; `boundary_codes_sequential` replays the reference painting order and is used
for the (rare) images where the collision happens, unless the corrected behaviour is asked for.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "dilation_pixels",
    "mask_to_boundary",
    "boundary_band",
    "boundary_codes",
    "boundary_codes_sequential",
]

# Border value for the max filter: larger than any compact code, so windows that reach outside
# the image are never constant (image-border pixels of a mask are boundary, as with zero padding).
_BORDER_CODE = np.iinfo(np.uint16).max


def dilation_pixels(height: int, width: int, dilation_ratio: float = 0.02) -> int:
    """Number of erosion iterations `d` for an image of the given size.

    Same arithmetic as boundary-iou-api: `int(round(ratio * sqrt(h**2 + w**2)))`, at least 1.
    Python's `round` rounds halves to even (e.g. 2.5 -> 2).
    """
    diag = math.sqrt(height**2 + width**2)
    return max(1, int(round(dilation_ratio * diag)))


def mask_to_boundary(mask: np.ndarray, dilation_ratio: float = 0.02) -> np.ndarray:
    """Boundary of one binary mask, exactly as boundary-iou-api's `mask_to_boundary`.

    Args:
        mask: (H, W) bool or 0/1 integer mask.
        dilation_ratio: fraction of the image diagonal.

    Returns:
        (H, W) bool boundary mask (mask pixels within `d` of a non-mask pixel or the border).
    """
    import cv2

    m = np.ascontiguousarray(mask, dtype=np.uint8)
    h, w = m.shape
    d = dilation_pixels(h, w, dilation_ratio)
    padded = cv2.copyMakeBorder(m, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=d)[1 : h + 1, 1 : w + 1]
    return (m - eroded) > 0


def boundary_band(codes: np.ndarray, d: int) -> np.ndarray:
    """Pixels whose (2d+1)^2 window is not constant or reaches outside the image.

    Args:
        codes: (H, W) uint16 compact segment codes (every distinct segment a distinct code,
            all codes < 65535).
        d: window radius in pixels (erosion iterations).

    Returns:
        (H, W) bool; for the pixels of a segment this is exactly its boundary-iou-api boundary.
    """
    from harness.metrics import fastpng

    codes = np.ascontiguousarray(codes, dtype=np.uint16)
    fast = fastpng.band(codes, d)  # running counts in C, O(H W) for any d
    if fast is not None:
        return fast
    import cv2

    kernel = np.ones((2 * d + 1, 2 * d + 1), np.uint8)
    hi = cv2.dilate(codes, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=_BORDER_CODE)
    lo = cv2.erode(codes, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=_BORDER_CODE)
    return hi != lo


def boundary_codes(codes: np.ndarray, num_segments: int, interior_code: int, d: int) -> np.ndarray:
    """Boundary code map (fast path): segment interiors replaced by `interior_code`.

    Args:
        codes: (H, W) uint16 map; segments are codes 1..num_segments, any other code (VOID,
            unlisted ids) is kept as is.
        num_segments: number of listed segments.
        interior_code: code standing for boundary-iou-api's BOUNDARY_ID.
        d: erosion iterations.

    Returns:
        (H, W) uint16 map: boundary pixels keep their segment code, interiors get `interior_code`.
    """
    band = boundary_band(codes, d)
    out = codes.copy()
    interior = ~band
    interior &= codes >= 1
    interior &= codes <= num_segments
    out[interior] = interior_code
    return out


def boundary_codes_sequential(
    codes: np.ndarray, num_segments: int, interior_code: int, d: int
) -> tuple[np.ndarray, np.ndarray]:
    """Boundary code map painted segment by segment in JSON order, as boundary-iou-api does.

    Only needed when `interior_code` is itself a segment code (BOUNDARY_ID equals a segment id):
    then a segment's mask is taken from the partly painted map and can include the interiors of
    segments painted before it, and a later painting can overwrite earlier boundaries.

    Args:
        codes: (H, W) uint16 map; segments are codes 1..num_segments in JSON order.
        num_segments: number of listed segments.
        interior_code: code standing for BOUNDARY_ID.
        d: erosion iterations.

    Returns:
        ((H, W) uint16 boundary code map, (num_segments,) int64 boundary area of each segment
        as measured when it was painted).
    """
    import cv2

    out = codes.copy()
    areas = np.zeros(num_segments, np.int64)
    kernel = np.ones((3, 3), np.uint8)
    h, w = codes.shape
    for c in range(1, num_segments + 1):
        m = (out == c).astype(np.uint8)
        padded = cv2.copyMakeBorder(m, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
        eroded = cv2.erode(padded, kernel, iterations=d)[1 : h + 1, 1 : w + 1]
        bnd = (m - eroded) > 0
        out[m > 0] = interior_code
        out[bnd] = c
        areas[c - 1] = int(bnd.sum())
    return out, areas
