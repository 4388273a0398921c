"""COCO-C corruptions: the 16 corruptions x 5 severities of Kamann & Rother / Panoptic SegFormer Table 11.

`corrupt(image, name, severity, seed)` returns, byte for byte, what
``np.random.seed(seed); imagecorruptions.corrupt(image, corruption_name=name, severity=severity)``
returns with imagecorruptions 1.1.2 plus only its compatibility fixes (see
:mod:`harness.corruptions.compat`), for every corruption except ``impulse_noise`` (upstream is
unseedable; ours is seeded and statistically equivalent). The identity holds with the same numpy,
scipy, scikit-image and OpenCV versions.

Seed rule (version ``SEED_RULE``): ``corruption_seed(file_name, corruption, severity)`` is the first
4 bytes (big-endian) of ``sha256("psf-harness/coco-c/v1:<file_name>:<corruption>:<severity>")``,
where ``file_name`` is the image's base name as in the COCO JSON (e.g. ``000000000139.jpg``). Any
single image can therefore be regenerated alone, in any order, in any process.

Threads: the upstream code draws from numpy's global RNG, which `corrupt` seeds and restores
around each call under a lock, so concurrent `corrupt` calls are serialised and correct, but code in
other threads that uses the global RNG at the same time would disturb it (and be disturbed). Use
processes for parallelism (the runner does).
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import numpy as np

from harness.errors import UserError

# Paper Table 11 order: blur, noise, digital, weather.
CORRUPTIONS: tuple[str, ...] = (
    "motion_blur",
    "defocus_blur",
    "glass_blur",
    "gaussian_blur",
    "gaussian_noise",
    "impulse_noise",
    "shot_noise",
    "speckle_noise",
    "brightness",
    "contrast",
    "saturate",
    "jpeg_compression",
    "snow",
    "spatter",
    "fog",
    "frost",
)
CATEGORIES: dict[str, tuple[str, ...]] = {
    "blur": CORRUPTIONS[0:4],
    "noise": CORRUPTIONS[4:8],
    "digital": CORRUPTIONS[8:12],
    "weather": CORRUPTIONS[12:16],
}
# The three ImageNet-C corruptions Kamann & Rother left out; accepted by `corrupt` for completeness.
EXTRA_CORRUPTIONS: tuple[str, ...] = ("zoom_blur", "elastic_transform", "pixelate")
ALL_CORRUPTIONS: tuple[str, ...] = CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
SEED_RULE = "psf-harness/coco-c/v1"
CHANNEL_ORDERS: tuple[str, ...] = ("rgb", "bgr")
MIN_SIDE = 32  # upstream rejects smaller images; we pad (see `corrupt`)

_rng_lock = threading.Lock()

__all__ = [
    "ALL_CORRUPTIONS",
    "CATEGORIES",
    "CHANNEL_ORDERS",
    "CORRUPTIONS",
    "SEED_RULE",
    "SEVERITIES",
    "check_corruption",
    "check_severity",
    "corrupt",
    "corruption_seed",
    "parse_corruptions",
    "parse_severities",
    "to_rgb",
]


def corruption_seed(file_name: str, corruption: str, severity: int) -> int:
    """The documented seed for one (image, corruption, severity): an integer in [0, 2**32).

    Args:
        file_name: the image file's base name (directories are ignored), e.g. ``000000000139.jpg``.
        corruption: corruption name.
        severity: 1..5.
    """
    base = str(file_name).replace("\\", "/").rsplit("/", 1)[-1]
    key = f"{SEED_RULE}:{base}:{corruption}:{int(severity)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big")


def check_corruption(name: str) -> str:
    """Return `name` if it is a known corruption, else raise UserError listing the valid names."""
    if name not in ALL_CORRUPTIONS:
        raise UserError(
            f"unknown corruption {name!r}; valid: {', '.join(ALL_CORRUPTIONS)} "
            f"(or a group: all, {', '.join(CATEGORIES)})"
        )
    return name


def check_severity(severity: Any) -> int:
    """Return `severity` as int if it is in 1..5, else raise UserError listing the valid values."""
    if isinstance(severity, (bool, np.bool_)) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise UserError(f"invalid severity {severity!r}; valid: 1, 2, 3, 4, 5")
    return int(severity)


def parse_corruptions(spec: str) -> list[str]:
    """Parse ``all``, a group (``blur``, ``noise``, ``digital``, ``weather``) or ``name,name,...``.

    Groups and names may be mixed (``blur,fog``); the result keeps Table 11 order, extras last.
    """
    chosen: set[str] = set()
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if token == "all":
            chosen.update(CORRUPTIONS)
        elif token in CATEGORIES:
            chosen.update(CATEGORIES[token])
        else:
            chosen.add(check_corruption(token))
    if not chosen:
        raise UserError(f"no corruption selected by {spec!r}; valid: all, {', '.join(CATEGORIES)}, or names")
    return [c for c in ALL_CORRUPTIONS if c in chosen]


def parse_severities(spec: str) -> list[int]:
    """Parse ``1-5``, ``3`` or ``1,3,5`` (ranges and lists may be mixed) into sorted severities."""
    chosen: set[int] = set()
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        try:
            if "-" in token:
                lo, hi = (int(v) for v in token.split("-", 1))
                if lo > hi:
                    raise ValueError(token)
            else:
                lo = hi = int(token)
        except ValueError:
            raise UserError(f"invalid severity {token!r}; valid: 1, 2, 3, 4, 5 (e.g. 1-5 or 1,3,5)") from None
        # Bounds first: "1-1000000000" must not build a list of a billion numbers.
        check_severity(lo)
        check_severity(hi)
        chosen.update(range(lo, hi + 1))
    if not chosen:
        raise UserError(f"no severity selected by {spec!r}; valid: 1, 2, 3, 4, 5")
    return sorted(chosen)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Promote (H, W), (H, W, 1) or (H, W, 4) uint8 to (H, W, 3) uint8 RGB (alpha is dropped).

    Grey is replicated to 3 channels, as upstream ``corrupt`` does itself.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        return np.stack((image,) * 3, axis=-1)
    if image.ndim == 3 and image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return image[..., :3]
    raise ValueError(f"expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, got shape {image.shape}")


def corrupt(image: np.ndarray, name: str, severity: int, seed: int, channel_order: str = "rgb") -> np.ndarray:
    """Corrupt one image, deterministically for `seed`.

    Args:
        image: uint8 array (H, W, 3) RGB; (H, W), (H, W, 1) and (H, W, 4) are promoted to RGB
            first (see `to_rgb`). Not modified.
        name: one of `ALL_CORRUPTIONS` (the benchmark uses `CORRUPTIONS`).
        severity: 1..5.
        seed: integer in [0, 2**32), usually `corruption_seed(file_name, name, severity)`.
        channel_order: ``"rgb"`` (default, what imagecorruptions expects) or ``"bgr"``: reproduce
            the original COCO-C pipeline, which handed OpenCV/mmcv BGR arrays to the corruptions.
            The input and output stay RGB; the corruption sees the channels reversed. Measured
            effect: blurs, contrast and fog unchanged; brightness/saturate within float rounding;
            noise same distribution but another per-pixel realisation; jpeg_compression (chroma),
            snow (grey weights), spatter and frost (colours) visibly different.

    Returns:
        (H, W, 3) uint8 RGB array. Images smaller than 32 px on a side (upstream refuses them)
        are padded by symmetric reflection at the bottom/right to 32 px, corrupted, and cropped
        back to (H, W).

    Raises:
        UserError: unknown `name`, severity outside 1..5, bad `channel_order`.
        ValueError: bad image dtype/shape or seed out of range.
    """
    check_corruption(name)
    severity = check_severity(severity)
    if channel_order not in CHANNEL_ORDERS:
        raise UserError(f"invalid channel order {channel_order!r}; valid: {', '.join(CHANNEL_ORDERS)}")
    seed = int(seed)
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    from harness.corruptions.compat import upstream

    package = upstream()
    rgb = to_rgb(image)
    height, width = rgb.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"empty image of shape {rgb.shape}")
    work = rgb[..., ::-1] if channel_order == "bgr" else rgb
    if height < MIN_SIDE or width < MIN_SIDE:
        pad = ((0, max(0, MIN_SIDE - height)), (0, max(0, MIN_SIDE - width)), (0, 0))
        work = np.pad(work, pad, mode="symmetric")
    # Upstream hands the array to PIL.Image.fromarray, which needs a contiguous copy anyway;
    # copying also guarantees the caller's array is never touched.
    work = np.array(work, dtype=np.uint8, order="C", copy=True)
    with _rng_lock:
        state = np.random.get_state()
        try:
            np.random.seed(seed)
            out = package.corrupt(work, severity=severity, corruption_name=name)
        finally:
            np.random.set_state(state)
    out = out[:height, :width]
    if channel_order == "bgr":
        out = out[..., ::-1]
    return np.ascontiguousarray(out, dtype=np.uint8)
