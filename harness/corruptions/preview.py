"""Preview sheet: one image under every corruption (rows) and severity (columns), labelled."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from harness.corruptions import CORRUPTIONS, SEVERITIES, corrupt, corruption_seed
from harness.io import atomic_write_bytes

_BG = 255
_FG = (0, 0, 0)


def _resize_long_side(image: np.ndarray, long_side: int) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    scale = long_side / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _text(canvas: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.5) -> None:
    import cv2

    cv2.putText(canvas, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, _FG, 1, cv2.LINE_AA)


def make_sheet(
    image: np.ndarray,
    file_name: str = "preview",
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    work_side: int = 320,
    cell_side: int = 160,
    channel_order: str = "rgb",
) -> np.ndarray:
    """Build the labelled grid.

    Args:
        image: (H, W, 3) uint8 RGB (other layouts are promoted by `corrupt`).
        file_name: seeds the corruptions through the COCO-C seed rule.
        corruptions: one row each (default: the 16 of Table 11, in order).
        severities: one column each.
        work_side: the image is first downscaled so its long side is at most this, then corrupted
            (corruption parameters are in pixels, so a small working size looks stronger than
            the same severity on a full-size COCO image; pass a large value for full size).
        cell_side: long side of each thumbnail in the sheet.
        channel_order: ``rgb`` or ``bgr`` (see `corrupt`).

    Returns:
        (H', W', 3) uint8 RGB sheet.
    """
    from harness.corruptions import to_rgb

    work = np.ascontiguousarray(_resize_long_side(to_rgb(np.asarray(image)), work_side))
    thumb_h, thumb_w = _resize_long_side(work, cell_side).shape[:2]
    label_w, header_h, pad = 150, 28, 4
    rows, cols = len(corruptions), len(severities)
    sheet = np.full((header_h + rows * (thumb_h + pad), label_w + cols * (thumb_w + pad), 3), _BG, np.uint8)
    for j, severity in enumerate(severities):
        _text(sheet, f"severity {severity}", (label_w + j * (thumb_w + pad) + 8, header_h - 9))
    for i, name in enumerate(corruptions):
        y = header_h + i * (thumb_h + pad)
        _text(sheet, name, (6, y + thumb_h // 2 + 5))
        for j, severity in enumerate(severities):
            out = corrupt(work, name, severity, corruption_seed(file_name, name, severity), channel_order=channel_order)
            thumb = _resize_long_side(out, cell_side)
            x = label_w + j * (thumb_w + pad)
            sheet[y : y + thumb.shape[0], x : x + thumb.shape[1]] = thumb
    return sheet


def write_sheet(image_path: str | Path, out_path: str | Path, **kwargs: object) -> Path:
    """Read `image_path`, build the sheet (`make_sheet` keyword arguments) and write it as PNG."""
    from harness.corruptions.runner import encode_image, read_image

    image = read_image(image_path)
    sheet = make_sheet(image, file_name=Path(image_path).name, **kwargs)  # type: ignore[arg-type]
    return atomic_write_bytes(out_path, encode_image(sheet, "png"))
