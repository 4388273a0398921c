"""numpy wrappers of the compiled PQ kernel (`csrc/png_pq.c`, loaded by `harness.metrics.native`).

Used by the in-memory accumulator and by `pngio.read_id_map`; `harness eval-pq` calls the kernel's
batch scorer directly (`harness.metrics.pq_files`). Every function returns None when the kernel is
unavailable (not built, no compiler, no libdeflate, HARNESS_PNG_DECODER set): callers then use numpy
and a general decoder, with the same results.

Why a kernel: zlib inflate is most of a generic PNG decode and libdeflate is ~25x faster on
panoptic PNGs (0.12 ms vs 3.4 ms per 480x640 PNG, one core of this machine); the PNG row filters are
sequential per pixel, so they are undone in C, which packs R + 256 G + 256^2 B into the id map in
the same pass. Measured alternatives (per 480x640 panoptic PNG incl. the id map, same core): pyspng
(libspng + zlib) 1.9 ms, imagecodecs.png_decode 3.5 ms, OpenCV 4.7 ms, PIL 5.8 ms; inflate alone:
zlib-ng 0.13 ms, ISA-L 0.39 ms, libdeflate 0.12 ms (docs/metrics.md).
"""

from __future__ import annotations

import numpy as np

from harness.metrics import native

__all__ = ["available", "enabled", "decode_ids", "joint_histogram", "boundary_histogram", "band", "warm_up"]


def available() -> bool:
    """True when the compiled kernel is loaded (it is off when HARNESS_PNG_DECODER names a decoder)."""
    return native.load() is not None


def enabled() -> bool:
    """Same as `available()` (kept for callers of the previous API)."""
    return available()


def warm_up() -> bool:
    """Load (or build) the kernel now, e.g. before forking workers; returns `available()`."""
    return available()


def decode_ids(data: bytes) -> np.ndarray | None:
    """(H, W) uint32 ids of an 8-bit RGB/RGBA non-interlaced PNG, or None for other PNGs / no kernel.

    Raises:
        ValueError: a truncated or corrupt PNG of the supported kind.
    """
    lib = native.load()
    if lib is None:
        return None
    info = np.zeros(4, np.int64)
    if lib.lib.pq_png_info(data, len(data), info.ctypes.data) != 0 or not info[3]:
        return None  # not a PNG, or a kind the kernel does not decode: a general decoder decides
    h, w = int(info[0]), int(info[1])
    if h <= 0 or w <= 0 or h * w > (1 << 31):
        raise ValueError(f"implausible PNG size {h}x{w}")
    out = np.empty((h, w), np.uint32)
    detail = np.zeros(1, np.int64)
    code = lib.lib.pq_decode_ids(lib.ctx(), data, len(data), out.ctypes.data, detail.ctypes.data)
    if code == 0:
        return out
    if code == 2:
        if detail[0]:
            raise ValueError(f"invalid PNG filter type in row {int(detail[0]) - 1}")
        raise ValueError("corrupt or truncated image data")
    if code == 8:
        raise MemoryError("PNG decoder out of memory")
    return None


def joint_histogram(gt_ids: np.ndarray, pred_ids: np.ndarray, lut_g: np.ndarray, lut_p: np.ndarray,
                    rows: int, cols: int) -> np.ndarray | None:
    """(rows, cols) int64 counts of (lut_g[gt id], lut_p[pred id]) pairs, or None without the kernel.

    Args:
        gt_ids: (H, W) uint32 GT ids, each < len(lut_g).
        pred_ids: (H, W) uint32 predicted ids, each < len(lut_p).
        lut_g: uint16 GT id -> code table (codes < rows).
        lut_p: uint16 predicted id -> code table (codes < cols).
    """
    lib = native.load()
    if lib is None:
        return None
    g = np.ascontiguousarray(gt_ids, np.uint32)
    p = np.ascontiguousarray(pred_ids, np.uint32)
    hist = np.zeros(rows * cols, np.int64)
    lib.lib.pq_joint_histogram(g.ctypes.data, p.ctypes.data, g.size, lut_g.ctypes.data, lut_p.ctypes.data, cols,
                               hist.ctypes.data)
    return hist.reshape(rows, cols)


def boundary_histogram(gt_codes: np.ndarray, gt_band: np.ndarray | None, gt_n: int, pred_codes: np.ndarray,
                       pred_band: np.ndarray | None, pred_n: int, rows: int, cols: int) -> np.ndarray | None:
    """(rows, cols) int64 joint histogram of boundary code maps, or None without the kernel.

    Args:
        gt_codes, pred_codes: (H, W) uint16 code maps (segments 1..n).
        gt_band, pred_band: (H, W) bool boundary bands, or None when the codes already are a
            boundary code map (then `n` is ignored).
        gt_n, pred_n: number of segments; off-band segment pixels count as code n + 2.
    """
    lib = native.load()
    if lib is None:
        return None
    g = np.ascontiguousarray(gt_codes, np.uint16)
    p = np.ascontiguousarray(pred_codes, np.uint16)
    gb = np.ascontiguousarray(gt_band).view(np.uint8) if gt_band is not None else np.zeros(g.shape, np.uint8)
    pb = np.ascontiguousarray(pred_band).view(np.uint8) if pred_band is not None else np.zeros(p.shape, np.uint8)
    hist = np.zeros(rows * cols, np.int64)
    lib.lib.pq_boundary_histogram(g.ctypes.data, gb.ctypes.data, gt_n if gt_band is not None else 0, p.ctypes.data,
                                  pb.ctypes.data, pred_n if pred_band is not None else 0, g.size, cols,
                                  hist.ctypes.data)
    return hist.reshape(rows, cols)


def band(codes: np.ndarray, d: int) -> np.ndarray | None:
    """(H, W) bool: pixels whose (2d+1)^2 window is not constant or leaves the image (see
    `harness.metrics.boundary.boundary_band`), or None without the kernel."""
    lib = native.load()
    if lib is None:
        return None
    c = np.ascontiguousarray(codes, np.uint16)
    out = np.empty(c.shape, np.uint8)
    if lib.lib.pq_band(c.ctypes.data, c.shape[0], c.shape[1], int(d), out.ctypes.data) != 0:
        raise MemoryError("boundary band: out of memory")
    return out.view(bool)
