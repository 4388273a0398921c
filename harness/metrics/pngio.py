"""Decoding of COCO panoptic PNGs into segment id maps.

Decoding is the floor of PQ evaluation (two PNGs per image), so the compiled kernel
(`harness.metrics.fastpng`: libdeflate + C unfilter, 8-bit RGB/RGBA non-interlaced PNGs) comes
first; other PNGs (palette, grey, 16-bit, interlaced) or a missing kernel use the first general
decoder available: pyspng, OpenCV, PIL (timings in `harness.metrics.fastpng` and docs/metrics.md).
The id is computed with integer shifts (`R | G << 8 | B << 16`, panopticapi's `R + 256 G + 256^2 B`).
Set HARNESS_PNG_DECODER=pyspng|opencv|pil to skip the kernel and force a decoder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from harness.errors import DataError

__all__ = ["read_id_map", "decode_rgb", "rgb_to_ids", "decoder_name", "warm_up"]


def _load_pyspng() -> Callable[[bytes], np.ndarray] | None:
    try:
        import pyspng
    except ImportError:
        return None
    return pyspng.load


def _load_cv2() -> Callable[[bytes], np.ndarray] | None:
    try:
        import cv2
    except ImportError:
        return None

    def decode(data: bytes) -> np.ndarray:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise ValueError("OpenCV could not decode the data")
        if img.ndim == 3:
            # OpenCV gives BGR(A); reverse the colour channels to RGB.
            img = img[..., 2::-1] if img.shape[2] >= 3 else img
        return img

    return decode


def _load_pil() -> Callable[[bytes], np.ndarray]:
    import io

    from PIL import Image

    def decode(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im)

    return decode


_DECODER: tuple[str, Callable[[bytes], np.ndarray]] | None = None


def _decoder() -> tuple[str, Callable[[bytes], np.ndarray]]:
    global _DECODER
    if _DECODER is None:
        choice = os.environ.get("HARNESS_PNG_DECODER", "").lower()
        candidates: list[tuple[str, Callable[[], Callable[[bytes], np.ndarray] | None]]] = [
            ("pyspng", _load_pyspng),
            ("opencv", _load_cv2),
            ("pil", _load_pil),
        ]
        if choice:
            candidates = [c for c in candidates if c[0] == choice] or candidates
        for name, loader in candidates:
            fn = loader()
            if fn is not None:
                _DECODER = (name, fn)
                break
        assert _DECODER is not None  # PIL is always there
    return _DECODER


def decoder_name() -> str:
    """PNG decoder in use: "fast" (libdeflate + C kernel), "pyspng", "opencv" or "pil"."""
    from harness.metrics import fastpng

    if fastpng.available():
        return "fast"
    return _decoder()[0]


def decode_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a PNG file into an (H, W, C) uint8 array (RGB order), raising DataError on failure."""
    path = Path(path)
    return _decode_bytes(_read_bytes(path), path)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"PNG not found: {path}") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        raise DataError(f"cannot read PNG {path}: {exc}") from None


def _decode_bytes(data: bytes, path: Path) -> np.ndarray:
    try:
        return _decoder()[1](data)
    except Exception as exc:  # decoders raise assorted types on corrupt data
        raise DataError(f"cannot decode PNG {path}: {exc}") from None


def rgb_to_ids(rgb: np.ndarray, where: str = "") -> np.ndarray:
    """(H, W, 3|4) uint8 RGB(A) -> (H, W) uint32 ids = R + 256 G + 256^2 B (alpha ignored)."""
    if rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.dtype != np.uint8:
        raise DataError(f"{where or 'PNG'}: expected an 8-bit RGB image, got shape {rgb.shape} {rgb.dtype}")
    # In-place shifts on one buffer: one temporary instead of three (this runs per pixel).
    ids = rgb[..., 2].astype(np.uint32)
    ids <<= 8
    ids |= rgb[..., 1]
    ids <<= 8
    ids |= rgb[..., 0]
    return ids


def read_id_map(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode a COCO panoptic PNG into its (H, W) uint32 segment id map (0 = VOID).

    Raises:
        DataError: missing, unreadable or corrupt file, or not an 8-bit RGB(A) image (names the file).
    """
    from harness.metrics import fastpng

    data = _read_bytes(Path(path))
    try:
        ids = fastpng.decode_ids(data)
    except ValueError as exc:
        raise DataError(f"cannot decode PNG {path}: {exc}") from None
    if ids is not None:
        return ids
    try:
        return rgb_to_ids(_decode_bytes(data, Path(path)), str(path))
    except DataError as exc:
        raise _describe(Path(path), exc) from None


def _describe(path: Path, exc: DataError) -> DataError:
    """The error for a PNG that is not a panoptic PNG, in words from its header (``16-bit grayscale``) rather
    than the decoder's array shape (a 16-bit grey PNG decodes to ``(H, W)`` uint16 or ``(H, W, 2)`` bytes)."""
    from harness.data.images import png_header

    try:
        head = png_header(path)
    except DataError:  # not even a PNG header: the decoder's own words say more
        return exc
    if not head.is_panoptic:
        return DataError(f"{path}: a panoptic PNG must be 8-bit RGB(A), this one is {head.description}")
    return exc


def warm_up() -> None:
    """Load (or build) the compiled kernel now (call before forking worker processes)."""
    from harness.metrics import fastpng

    fastpng.warm_up()
