"""On-the-fly COCO-C: corrupt images as they are loaded instead of storing ~80 copies of a data set.

`CorruptedDataset` wraps any indexable data set whose samples carry an RGB image and its file
name (the data layer's ``PanopticSample``, a dict, or `ImageFolderDataset` below) and replaces the
image by ``corrupt(image, corruption, severity, corruption_seed(file_name, corruption, severity))``.
That is the call the on-disk runner makes, so with the same decoded clean image the result equals
the PNG written by ``harness corrupt`` byte for byte (``--format jpg`` outputs are lossy and do
not). The runner decodes with PIL (`harness.corruptions.runner.read_image`); a base data set that
decodes JPEGs with another library may see slightly different clean pixels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from harness.corruptions import CHANNEL_ORDERS, check_corruption, check_severity, corrupt, corruption_seed
from harness.errors import UserError


@dataclass
class ImageSample:
    """A clean image and its file name (the minimum the wrapper needs).

    Attributes:
        file_name: base name, e.g. ``000000000139.jpg`` (it keys the seed rule).
        image: (H, W, 3) uint8 RGB.
    """

    file_name: str
    image: np.ndarray


class ImageFolderDataset:
    """Images of a folder, decoded exactly as the on-disk runner decodes them.

    Args:
        root: folder of images.
        file_names: which files, in order (default: every image file in `root`, sorted by name).
    """

    def __init__(self, root: str | Path, file_names: Sequence[str] | None = None) -> None:
        from harness.corruptions.runner import list_images

        self.root = Path(root)
        if file_names is None:
            file_names = [e.file_name for e in list_images(self.root, None)]
        self.file_names = list(file_names)

    def __len__(self) -> int:
        return len(self.file_names)

    def __getitem__(self, index: int) -> ImageSample:
        from harness.corruptions.runner import read_image

        name = self.file_names[index]
        return ImageSample(file_name=name, image=read_image(self.root / name))


def _get(sample: Any, key: str) -> Any:
    if isinstance(sample, dict):
        if key not in sample:
            raise UserError(f"sample dict lacks key {key!r} needed for on-the-fly corruption")
        return sample[key]
    if not hasattr(sample, key):
        raise UserError(
            f"sample of type {type(sample).__name__} lacks attribute {key!r} needed for on-the-fly corruption"
        )
    return getattr(sample, key)


def _with_image(sample: Any, key: str, image: np.ndarray) -> Any:
    if isinstance(sample, dict):
        return {**sample, key: image}
    if dataclasses.is_dataclass(sample) and not isinstance(sample, type):
        return dataclasses.replace(sample, **{key: image})
    setattr(sample, key, image)
    return sample


class CorruptedDataset:
    """Wrap a data set so every sample's image is corrupted with the COCO-C seed rule.

    Args:
        base: indexable data set; each sample has an image (H, W, 3) uint8 RGB and a file name,
            as attributes (dataclass, object) or keys (dict).
        corruption: corruption name.
        severity: 1..5, or 0 for the clean image (convenient for a P/mPC sweep).
        channel_order: ``rgb`` (default) or ``bgr`` (see `harness.corruptions.corrupt`).
        image_key: name of the image field.
        file_name_key: name of the file-name field.

    The returned sample is a copy (dataclasses.replace / new dict) with the image replaced; plain
    objects are updated in place.
    """

    def __init__(
        self,
        base: Any,
        corruption: str,
        severity: int,
        channel_order: str = "rgb",
        image_key: str = "image",
        file_name_key: str = "file_name",
    ) -> None:
        self.base = base
        self.corruption = check_corruption(corruption)
        self.severity = 0 if severity == 0 else check_severity(severity)
        if channel_order not in CHANNEL_ORDERS:
            raise UserError(f"invalid channel order {channel_order!r}; valid: {', '.join(CHANNEL_ORDERS)}")
        self.channel_order = channel_order
        self.image_key = image_key
        self.file_name_key = file_name_key

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Any:
        sample = self.base[index]
        if self.severity == 0:
            return sample
        image = _get(sample, self.image_key)
        file_name = str(_get(sample, self.file_name_key))
        seed = corruption_seed(file_name, self.corruption, self.severity)
        out = corrupt(image, self.corruption, self.severity, seed, channel_order=self.channel_order)
        return _with_image(sample, self.image_key, out)

    def __repr__(self) -> str:
        return (f"CorruptedDataset({type(self.base).__name__}, corruption={self.corruption!r}, "
                f"severity={self.severity}, channel_order={self.channel_order!r})")
