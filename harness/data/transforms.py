"""The official test transform (mmdet 2.12 / mmcv 1.3.4 pipeline), re-implemented with OpenCV + NumPy.

``LoadImageFromFile`` (cv2 decode, BGR) -> ``Resize(img_scale=(1333, 800), keep_ratio=True)`` -> ``Normalize(mean,
std, to_rgb=True)`` -> ``Pad(size_divisor=1)`` (a no-op) -> tensor. Every step copies mmcv's arithmetic:

* new size = ``int(w * s + 0.5), int(h * s + 0.5)`` with ``s = min(1333 / long side, 800 / short side)``;
* ``cv2.resize(..., INTER_LINEAR)`` on the **uint8** image (a float/torch resize differs by ~1 grey level);
* normalisation in float32 via ``cv2.subtract(img, mean)`` then ``cv2.multiply(img, 1 / std)`` (float64 constants).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from models.inference import TestTransformSpec

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass
class PreparedImage:
    """A transformed image.

    Attributes:
        image: ``(3, h, w)`` float32 normalised, in the model's channel order (RGB except Panoptic FCN), C-contiguous;
            zero-padded at the bottom/right to the model's size divisor (then larger than ``img_shape``).
        ori_shape: ``(H, W)`` of the decoded image.
        img_shape: ``(h, w)`` after resizing.
        scale_factor: ``(w_scale, h_scale)`` = new / old.
    """

    image: np.ndarray
    ori_shape: tuple[int, int]
    img_shape: tuple[int, int]
    scale_factor: tuple[float, float]


def read_image_bgr(path: str | Path) -> np.ndarray:
    """Decode an image as mmcv does (``cv2.imdecode(..., IMREAD_COLOR)``): ``(H, W, 3)`` uint8 BGR.

    16-bit images are scaled to 8 bits by OpenCV (as mmcv sees them); C-library messages (a truncated JPEG) become
    one warning naming the file (`harness.data.images`). Raises `DataError` (a `UserError`) naming the file.
    """
    from harness.data.images import decode_cv2, read_bytes

    return decode_cv2(read_bytes(path), path)


def rescale_size(w: int, h: int, scale: tuple[int, int]) -> tuple[tuple[int, int], float]:
    """mmcv ``rescale_size``: keep-ratio size fitting ``scale`` (long, short edge limits); ``((new_w, new_h), s)``."""
    max_long, max_short = max(scale), min(scale)
    s = min(max_long / max(h, w), max_short / min(h, w))
    return (int(w * float(s) + 0.5), int(h * float(s) + 0.5)), s


def resize_keep_ratio(img: np.ndarray, scale: tuple[int, int] = (1333, 800)) -> tuple[np.ndarray, tuple[float, float]]:
    """mmcv ``imrescale`` + mmdet ``Resize`` scale factors: ``(resized uint8 image, (w_scale, h_scale))``."""
    import cv2

    h, w = img.shape[:2]
    (new_w, new_h), _ = rescale_size(w, h, scale)
    out = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return out, (new_w / w, new_h / h)


def normalize(img: np.ndarray, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
              to_rgb: bool = True) -> np.ndarray:
    """mmcv ``imnormalize``: float32 ``(img - mean) * (1 / std)``, BGR -> RGB first when ``to_rgb``."""
    import cv2

    out = img.copy().astype(np.float32)
    mean64 = np.float64(np.asarray(mean).reshape(1, -1))
    stdinv = 1 / np.float64(np.asarray(std).reshape(1, -1))
    if to_rgb:
        cv2.cvtColor(out, cv2.COLOR_BGR2RGB, out)
    cv2.subtract(out, mean64, out)
    cv2.multiply(out, stdinv, out)
    return out


def apply_test_transform(img_bgr: np.ndarray, scale: tuple[int, int] = (1333, 800),
                   mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> PreparedImage:
    """Apply the official test pipeline to a decoded ``(H, W, 3)`` uint8 BGR image."""
    if img_bgr.ndim != 3 or img_bgr.shape[2] != 3 or img_bgr.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 BGR image, got {img_bgr.shape} {img_bgr.dtype}")
    ori = (int(img_bgr.shape[0]), int(img_bgr.shape[1]))
    resized, factor = resize_keep_ratio(img_bgr, scale)
    norm = normalize(resized, mean, std, to_rgb=True)
    chw = np.ascontiguousarray(norm.transpose(2, 0, 1))
    return PreparedImage(image=chw, ori_shape=ori, img_shape=(int(resized.shape[0]), int(resized.shape[1])),
                     scale_factor=factor)


def load_test_image(path: str | Path, scale: tuple[int, int] = (1333, 800)) -> PreparedImage:
    """Read ``path`` with OpenCV and apply :func:`apply_test_transform`."""
    return apply_test_transform(read_image_bgr(path), scale)


def collate(inputs: list[PreparedImage]) -> tuple["np.ndarray", "np.ndarray"]:
    """Pad a list to a batch: ``(images (B, 3, Hmax, Wmax) float32 zero-padded, pad_mask (B, Hmax, Wmax) bool)``.

    A single image is returned unpadded (mmdet ``Pad(size_divisor=1)``).
    """
    # An image may already be zero-padded to its model's size divisor (detectron2 transform): the canvas covers the
    # padded arrays, the mask marks only the resized image (``img_shape``) as valid.
    hmax = max(t.image.shape[1] for t in inputs)
    wmax = max(t.image.shape[2] for t in inputs)
    images = np.zeros((len(inputs), 3, hmax, wmax), dtype=np.float32)
    mask = np.ones((len(inputs), hmax, wmax), dtype=bool)
    for i, t in enumerate(inputs):
        h, w = t.img_shape
        images[i, :, : t.image.shape[1], : t.image.shape[2]] = t.image
        mask[i, :h, :w] = False
    return images, mask


def prepare(spec: "TestTransformSpec", image_rgb: np.ndarray) -> PreparedImage:
    """Apply a model's official test transform (`models.inference.TestTransformSpec`) to an RGB image.

    Args:
        spec: the model's `test_transform()`.
        image_rgb: ``(H, W, 3)`` uint8 RGB (as the data layer and the corruptions produce it).

    Returns:
        The prepared image, ``(3, h, w)`` float32 in the spec's channel order, padded to ``size_divisor``.
    """
    if spec.resize == "pil":
        return prepare_pil(spec, image_rgb)
    if spec.resize == "detectron2":
        return apply_detectron2_transform(image_rgb, spec)
    if spec.resize != "mmcv":
        raise NotImplementedError(f"test transform {spec.resize!r} is not implemented yet")
    if spec.channel_order != "rgb" or spec.size_divisor != 1:
        raise NotImplementedError("the mmcv test transform is implemented for RGB input without padding only")
    bgr = np.ascontiguousarray(image_rgb[..., ::-1])
    return apply_test_transform(bgr, (spec.long, spec.short), spec.mean, spec.std)


# ------------------------------------------------------------------------------------------------ "pil" (DETR)
def detr_resize_size(w: int, h: int, size: int, max_size: int | None) -> tuple[int, int]:
    """DETR ``datasets/transforms.py`` ``get_size_with_aspect_ratio``: output ``(oh, ow)``.

    The short side becomes ``size`` unless the long side would exceed ``max_size`` (then ``size =
    int(round(max_size * short / long))``); the other side is **truncated** (``int(size * long / short)``), unlike
    mmcv and detectron2, which round.
    """
    if max_size is not None:
        min_orig, max_orig = float(min(w, h)), float(max(w, h))
        if max_orig / min_orig * size > max_size:
            size = int(round(max_size * min_orig / max_orig))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def prepare_pil(spec: "TestTransformSpec", image_rgb: np.ndarray) -> PreparedImage:
    """DETR / Deformable DETR val transform: ``RandomResize([short], max_size=long)``, ``ToTensor``, ``Normalize``.

    * resize: ``PIL.Image.resize((ow, oh), BILINEAR)`` on the uint8 RGB image (torchvision ``F.resize`` of a PIL
      image; PIL's bilinear filter is antialiased when shrinking), size from :func:`detr_resize_size`;
    * ``ToTensor``: float32 ``x / 255``;
    * ``Normalize``: float32 ``(x - m) / s`` with ``m = mean / 255``, ``s = std / 255`` rounded to 9 decimals, i.e.
      torchvision's ``[0.485, 0.456, 0.406]`` / ``[0.229, 0.224, 0.225]`` exactly for the ImageNet spec.

    Args:
        spec: a ``resize="pil"`` spec (RGB, no padding).
        image_rgb: ``(H, W, 3)`` uint8 RGB.
    """
    from PIL import Image

    if spec.channel_order != "rgb" or spec.size_divisor != 1:
        raise NotImplementedError("the PIL (DETR) test transform is implemented for RGB input without padding only")
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image_rgb.shape} {image_rgb.dtype}")
    h, w = int(image_rgb.shape[0]), int(image_rgb.shape[1])
    oh, ow = detr_resize_size(w, h, spec.short, spec.long)
    img = Image.fromarray(np.ascontiguousarray(image_rgb))
    if (oh, ow) != (h, w):
        img = img.resize((ow, oh), resample=Image.BILINEAR)
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)
    mean = np.asarray([round(m / 255, 9) for m in spec.mean], dtype=np.float32)
    std = np.asarray([round(s / 255, 9) for s in spec.std], dtype=np.float32)
    x = (x - mean) / std
    chw = np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)
    return PreparedImage(image=chw, ori_shape=(h, w), img_shape=(oh, ow), scale_factor=(ow / w, oh / h))


# ----------------------------------------------------------------------------------- detectron2 (MaskFormer, PFCN)
def detectron2_output_shape(h: int, w: int, short: int = 800, long: int = 1333) -> tuple[int, int]:
    """detectron2 ``ResizeShortestEdge.get_output_shape``: ``(new_h, new_w)``, both rounded with ``int(x + 0.5)``.

    The short side goes to ``short`` unless the long side would exceed ``long``; then both are scaled down so the
    long side is ``long`` (before rounding).
    """
    size = short * 1.0
    scale = size / min(h, w)
    newh, neww = (size, scale * w) if h < w else (scale * h, size)
    if max(newh, neww) > long:
        scale = long * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def apply_detectron2_transform(image_rgb: np.ndarray, spec: "TestTransformSpec") -> PreparedImage:
    """detectron2's test path: ``ResizeShortestEdge(short, long)`` on the uint8 image with PIL bilinear
    (``ResizeTransform``), channels in ``spec.channel_order`` (detectron2 ``INPUT.FORMAT``), then the model's
    ``(x - pixel_mean) / pixel_std`` in float32 on the 0-255 scale, then zero padding at the bottom/right to a
    multiple of ``spec.size_divisor`` (``ImageList.from_tensors``; 1 = none).

    The arithmetic is float32 element-wise, as detectron2's torch code (uint8 -> float32, subtract, divide), so the
    network input is bitwise equal to detectron2's for the same decoded image.
    """
    from PIL import Image

    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image_rgb.shape} {image_rgb.dtype}")
    if spec.channel_order not in ("rgb", "bgr"):
        raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {spec.channel_order!r}")
    h, w = int(image_rgb.shape[0]), int(image_rgb.shape[1])
    newh, neww = detectron2_output_shape(h, w, spec.short, spec.long)
    img = image_rgb if spec.channel_order == "rgb" else image_rgb[..., ::-1]
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((neww, newh), Image.BILINEAR))
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1)
    chw = (resized.transpose(2, 0, 1).astype(np.float32) - mean) / std
    div = max(int(spec.size_divisor), 1)
    ph, pw = -(-newh // div) * div, -(-neww // div) * div
    out = np.zeros((3, ph, pw), dtype=np.float32)
    out[:, :newh, :neww] = chw
    return PreparedImage(image=out, ori_shape=(h, w), img_shape=(newh, neww), scale_factor=(neww / w, newh / h))
