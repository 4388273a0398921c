"""Input side of the eval grid: decode, corrupt and transform images in DataLoader workers.

Items are (cell, image) pairs in cell-major order; a batch never spans two cells. Per item:

* decode: the clean cell uses the data layer's decoder (OpenCV, as mmcv); corrupted cells decode with the decoder
  of ``harness corrupt`` (:func:`harness.corruptions.runner.read_image`, PIL), so an on-the-fly corrupted image is
  byte-identical to the PNG that ``harness corrupt`` writes (both decoders are libjpeg-turbo and give the same
  pixels on COCO and the synthetic set; the choice makes the identity hold even where they would not);
* corrupt: ``corrupt(image, c, s, corruption_seed(file_name, c, s), channel_order)``, the seed rule of
  ``harness corrupt``;
* transform: the model's official test transform (``harness.data.transforms.prepare``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from harness.engine.grid_config import Cell

__all__ = ["ImageRef", "GridImages", "CellBatches", "make_loader", "collate_images", "valid_mask_size"]


@dataclass(frozen=True)
class ImageRef:
    """One image of the run: its position in ``RUN/image_ids.json``, id, file name and path."""

    position: int
    image_id: Any
    file_name: str
    path: str


def _decode(path: str, clean: bool) -> np.ndarray:
    if clean:
        from harness.data.coco_panoptic import read_image_rgb

        return read_image_rgb(path)
    from harness.corruptions.runner import read_image

    return read_image(path)


class GridImages(Dataset):
    """(cell, image) items -> prepared network inputs.

    Args:
        items: (cell, image) pairs in evaluation order.
        spec: the model's ``test_transform()``.
        channel_order: corruption channel order (``rgb`` or ``bgr``).
    """

    def __init__(self, items: Sequence[tuple[Cell, ImageRef]], spec: Any, channel_order: str = "rgb") -> None:
        self.items = list(items)
        self.spec = spec
        self.channel_order = channel_order

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from harness.corruptions import corrupt, corruption_seed
        from harness.data.transforms import prepare

        from models.files import InputError

        cell, ref = self.items[index]
        t0 = time.perf_counter()
        try:
            image = _decode(ref.path, cell.clean)
            t1 = time.perf_counter()
            if not cell.clean:
                seed = corruption_seed(ref.file_name, cell.corruption, cell.severity)
                image = corrupt(image, cell.corruption, cell.severity, seed, channel_order=self.channel_order)
            t2 = time.perf_counter()
            prep = prepare(self.spec, image)
        except InputError as exc:
            # Handed to the main process as data: a DataLoader worker's exception would arrive wrapped in a
            # multi-line "Caught DataError in DataLoader worker process 0 ... Original Traceback" message.
            return {"cell": cell, "ref": ref, "error": " ".join(str(exc).split())}
        t3 = time.perf_counter()
        cost = {"decode": t1 - t0, "transform": t3 - t2}
        if not cell.clean:
            cost[f"corrupt {cell.corruption}"] = t2 - t1
        return {"cell": cell, "ref": ref, "image": torch.from_numpy(prep.image), "img_shape": prep.img_shape,
                "ori_shape": prep.ori_shape, "cost": cost}


class CellBatches(Sampler[list[int]]):
    """Batches of up to ``batch_size`` consecutive items of one cell each."""

    def __init__(self, items: Sequence[tuple[Cell, ImageRef]], batch_size: int) -> None:
        self.batches: list[list[int]] = []
        for k, (cell, _) in enumerate(items):
            last = self.batches[-1] if self.batches else None
            if last is not None and len(last) < batch_size and items[last[0]][0] == cell:
                last.append(k)
            else:
                self.batches.append([k])

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _worker_init(_: int) -> None:
    """One thread per DataLoader worker; load the compiled corruption kernels once; SIGTERM / Ctrl-C end the worker
    quietly (the main process reports the interruption in one line)."""
    import cv2

    from harness.io import init_worker_signals

    def load() -> None:
        from harness.corruptions.fast import warm_up

        cv2.setNumThreads(1)
        torch.set_num_threads(1)
        warm_up()

    init_worker_signals(load)


def _as_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch


def make_loader(dataset: GridImages, batch_size: int, workers: int, pin_memory: bool = False) -> DataLoader:
    """The DataLoader of a run: batches within cells, ``workers`` processes (0 = main process).

    Workers start with ``spawn``: a forked child inherits OpenCV's and OpenMP's thread pools in whatever state the
    parent left them and can deadlock on its first OpenCV call (observed with ``cv2.setNumThreads``).
    """
    import multiprocessing

    return DataLoader(dataset, batch_sampler=CellBatches(dataset.items, batch_size), num_workers=workers,
                      collate_fn=_as_list, pin_memory=pin_memory, worker_init_fn=_worker_init if workers else None,
                      prefetch_factor=4 if workers else None, persistent_workers=False,
                      multiprocessing_context=multiprocessing.get_context("spawn") if workers else None)


def collate_images(batch: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack a batch: ``(images (B, 3, H, W), pad_mask (B, H, W) or None)``.

    A single image whose array is its valid region goes unpadded with no mask (the official batch-size-1 protocol);
    otherwise images are zero-padded to the largest and the mask is True on padding.
    """
    arrays = [b["image"] for b in batch]
    if len(arrays) == 1 and tuple(arrays[0].shape[-2:]) == tuple(batch[0]["img_shape"]):
        return arrays[0][None], None
    h = max(a.shape[-2] for a in arrays)
    w = max(a.shape[-1] for a in arrays)
    images = arrays[0].new_zeros((len(arrays), 3, h, w))
    mask = torch.ones((len(arrays), h, w), dtype=torch.bool)
    for i, (a, b) in enumerate(zip(arrays, batch)):
        images[i, :, : a.shape[-2], : a.shape[-1]] = a
        vh, vw = b["img_shape"]
        mask[i, :vh, :vw] = False
    return images, mask


def valid_mask_size(img_shape: tuple[int, int], input_hw: tuple[int, int], mask_hw: tuple[int, int]) -> tuple[int, int]:
    """The valid (h, w) of an image's masks when the input was padded: its share of the mask grid, rounded up."""
    return (min(mask_hw[0], math.ceil(img_shape[0] * mask_hw[0] / input_hw[0])),
            min(mask_hw[1], math.ceil(img_shape[1] * mask_hw[1] / input_hw[1])))
