"""Training data: the official augmentation (flip, two resize/crop policies), test transform, batch collation.

Official train pipeline (`configs/panformer/base.py:116-166`, DETR-style AutoAugment):

- `RandomFlip(0.5)`, then 50/50 between
  - policy A: keep-ratio resize, short side in {480, 512, ..., 800}, long side <= 1333;
  - policy B: keep-ratio resize, short side in {400, 500, 600} (long <= 4200), `RandomCrop`
    (`absolute_range`, crop side in [384, 600]), keep-ratio resize as in policy A.
- Normalize (ImageNet mean/std, RGB), pad (size_divisor 1) to the batch size, padding value 0.

Images are resized with OpenCV bilinear (as mmcv), masks with nearest; boxes are transformed
arithmetically (scale, flip, crop + clip) as mmdet does, and a thing whose box or mask becomes empty
after the crop is dropped. `AugmentConfig.scaled(f)` multiplies every size by f so that the same recipe
fits small synthetic images.

`SampleStream` is the deterministic, stateless order of training samples: global sample ``k`` (step ``k // G``,
slot ``k % G`` of a global batch of G images) is image ``perm_e[k mod N]`` of epoch ``e = k // N`` with its own
augmentation RNG. Nothing depends on what ran before, so a resumed run, and a run on any number of processes
(process r takes slots ``r*B .. r*B+B-1`` of each global batch), sees exactly the same images and augmentations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import cv2
import numpy as np
import torch
from torch import Tensor

from harness.data.coco_panoptic import PanopticDataset, PanopticSample
from harness.data.targets import build_targets

if TYPE_CHECKING:
    from models.inference import TestTransformSpec


@dataclass
class AugmentConfig:
    """Training augmentation (defaults = official COCO recipe).

    Attributes:
        enabled: False applies only the test transform (deterministic, e.g. for overfitting).
        flip_prob: horizontal flip probability.
        scales: short sides of policy A (and of policy B's second resize).
        max_size: long-side limit of policy A.
        crop_prob: probability of policy B.
        crop_scales: short sides of policy B's first resize.
        crop_max_size: long-side limit of policy B's first resize.
        crop_range: (min, max) crop side of `RandomCrop(absolute_range)`.
    """

    enabled: bool = True
    flip_prob: float = 0.5
    scales: tuple[int, ...] = tuple(range(480, 801, 32))
    max_size: int = 1333
    crop_prob: float = 0.5
    crop_scales: tuple[int, ...] = (400, 500, 600)
    crop_max_size: int = 4200
    crop_range: tuple[int, int] = (384, 600)

    def scaled(self, factor: float) -> "AugmentConfig":
        """Every size multiplied by `factor` (rounded, at least 8 px): the recipe for smaller images."""

        def s(v: int) -> int:
            return max(8, int(round(v * factor)))

        return dataclasses.replace(
            self,
            scales=tuple(sorted({s(v) for v in self.scales})),
            max_size=s(self.max_size),
            crop_scales=tuple(sorted({s(v) for v in self.crop_scales})),
            crop_max_size=s(self.crop_max_size),
            crop_range=(s(self.crop_range[0]), s(self.crop_range[1])),
        )


def rescale_size(h: int, w: int, short: int, long: int) -> tuple[int, int]:
    """mmcv keep-ratio rescale: scale = min(long / max(h, w), short / min(h, w)); size rounded half up.

    Returns:
        (new_h, new_w).
    """
    scale = min(long / max(h, w), short / min(h, w))
    return int(h * float(scale) + 0.5), int(w * float(scale) + 0.5)


def _resize(
    image: np.ndarray, masks: Tensor, boxes: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, Tensor, np.ndarray]:
    """Resize image (bilinear), masks (nearest) and pixel xyxy boxes (mmdet: per-axis scale factors)."""
    h, w = image.shape[:2]
    nh, nw = size
    if (nh, nw) == (h, w):
        return image, masks, boxes
    image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    if masks.shape[0]:
        masks = torch.from_numpy(
            np.stack([cv2.resize(m, (nw, nh), interpolation=cv2.INTER_NEAREST) for m in masks.numpy().astype(np.uint8)])
        ).bool()
    else:
        masks = torch.zeros((0, nh, nw), dtype=torch.bool)
    boxes = boxes * np.array([nw / w, nh / h, nw / w, nh / h], dtype=np.float32)
    return image, masks, boxes


@dataclass
class TrainItem:
    """One augmented training image before batching.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        masks: (N, H, W) bool, things first then stuff.
        labels: (N,) long contiguous labels.
        boxes: (N, 4) float32 pixel xyxy (stuff boxes unused).
        image_id: data set image id.
    """

    image: np.ndarray
    masks: Tensor
    labels: Tensor
    boxes: np.ndarray
    image_id: int | str = 0
    extra: dict[str, Any] = field(default_factory=dict)


def item_from_sample(sample: PanopticSample, dataset: PanopticDataset) -> TrainItem:
    """Targets of a sample (crowd segments excluded, as official) as one list of masks/labels/boxes."""
    t = build_targets(sample, dataset.categories)
    h, w = sample.id_map.shape
    tb = t["thing_boxes"].numpy()
    thing_xyxy = (
        np.stack(
            [
                (tb[:, 0] - tb[:, 2] / 2) * w,
                (tb[:, 1] - tb[:, 3] / 2) * h,
                (tb[:, 0] + tb[:, 2] / 2) * w,
                (tb[:, 1] + tb[:, 3] / 2) * h,
            ],
            axis=1,
        )
        .astype(np.float32)
        .reshape(-1, 4)
    )
    ns = t["stuff_labels"].numel()
    stuff_xyxy = np.tile(np.array([[0, 0, w, h]], np.float32), (ns, 1))
    return TrainItem(
        image=sample.image,
        masks=torch.cat([t["thing_masks"], t["stuff_masks"]]),
        labels=torch.cat([t["thing_labels"], t["stuff_labels"]]),
        boxes=np.concatenate([thing_xyxy, stuff_xyxy]).reshape(-1, 4),
        image_id=sample.image_id,
    )


def augment(item: TrainItem, cfg: AugmentConfig, test_scale: tuple[int, int], rng: np.random.Generator) -> TrainItem:
    """Apply the official train pipeline (or only the keep-ratio test resize when disabled).

    Args:
        item: the sample's targets.
        cfg: augmentation settings.
        test_scale: (max long side, short side) of the test transform, used when cfg.enabled is False.
        rng: random generator (the only source of randomness, so runs are reproducible).
    """
    image, masks, boxes, labels = item.image, item.masks, item.boxes.copy(), item.labels
    h, w = image.shape[:2]
    if not cfg.enabled:
        size = rescale_size(h, w, short=min(test_scale), long=max(test_scale))
        image, masks, boxes = _resize(image, masks, boxes, size)
        return dataclasses.replace(item, image=image, masks=masks, boxes=boxes)

    if rng.random() < cfg.flip_prob:
        image = np.ascontiguousarray(image[:, ::-1])
        masks = masks.flip(-1)
        boxes = boxes.copy()
        boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
    if rng.random() < cfg.crop_prob:
        short = int(rng.choice(cfg.crop_scales))
        image, masks, boxes = _resize(image, masks, boxes, rescale_size(h, w, short, cfg.crop_max_size))
        h, w = image.shape[:2]
        ch = int(rng.integers(min(h, cfg.crop_range[0]), min(h, cfg.crop_range[1]) + 1))
        cw = int(rng.integers(min(w, cfg.crop_range[0]), min(w, cfg.crop_range[1]) + 1))
        y0 = int(rng.integers(0, h - ch + 1))
        x0 = int(rng.integers(0, w - cw + 1))
        image = image[y0 : y0 + ch, x0 : x0 + cw]
        masks = masks[:, y0 : y0 + ch, x0 : x0 + cw]
        boxes = boxes - np.array([x0, y0, x0, y0], np.float32)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, cw)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, ch)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & masks.flatten(1).any(1).numpy()
        image, masks, boxes, labels = image, masks[torch.from_numpy(keep)], boxes[keep], labels[torch.from_numpy(keep)]
        h, w = image.shape[:2]
    short = int(rng.choice(cfg.scales))
    image, masks, boxes = _resize(np.ascontiguousarray(image), masks, boxes, rescale_size(h, w, short, cfg.max_size))
    return dataclasses.replace(item, image=image, masks=masks, boxes=boxes, labels=labels)


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float], channel_order: str = "rgb") -> Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 ``(x - mean) / std`` in ``channel_order`` (mmcv Normalize).

    ``channel_order="bgr"`` flips the channels first (mean and std are then given in BGR order, as the model's
    ``test_transform()`` states them).
    """
    if channel_order not in ("rgb", "bgr"):
        raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
    if channel_order == "bgr":
        image = image[..., ::-1]
    x = torch.from_numpy(np.ascontiguousarray(image)).float()
    x = (x - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
    return x.permute(2, 0, 1).contiguous()


def collate(
    items: Sequence[TrainItem],
    num_things: int,
    mean: Sequence[float],
    std: Sequence[float],
    channel_order: str = "rgb",
    size_divisor: int = 1,
) -> tuple[Tensor, Tensor, list[dict[str, Tensor]]]:
    """Pad a list of items to one batch (bottom/right padding with 0 after normalisation, as mmdet).

    Args:
        items: augmented items (RGB images).
        num_things: labels below this are things.
        mean / std: per-channel normalisation in ``channel_order`` (0-255 scale).
        channel_order: the network's input channel order ("rgb" or "bgr").
        size_divisor: pad the batch to a multiple of this (1 = to the largest image only).

    Returns:
        images (B, 3, H, W), pad_mask (B, H, W) bool True on padding, and per-image targets for
        `models.losses.PanopticCriterion` (masks padded to (H, W); boxes normalised by the unpadded size).
    """
    hmax = max(it.image.shape[0] for it in items)
    wmax = max(it.image.shape[1] for it in items)
    if size_divisor > 1:
        hmax, wmax = -(-hmax // size_divisor) * size_divisor, -(-wmax // size_divisor) * size_divisor
    images = torch.zeros((len(items), 3, hmax, wmax))
    pad_mask = torch.ones((len(items), hmax, wmax), dtype=torch.bool)
    targets = []
    for i, it in enumerate(items):
        h, w = it.image.shape[:2]
        images[i, :, :h, :w] = normalize(it.image, mean, std, channel_order)
        pad_mask[i, :h, :w] = False
        masks = torch.zeros((it.masks.shape[0], hmax, wmax), dtype=torch.bool)
        masks[:, :h, :w] = it.masks
        is_thing = it.labels < num_things
        xyxy = torch.from_numpy(np.asarray(it.boxes, np.float32)).reshape(-1, 4)[is_thing]
        cxcywh = torch.stack(
            [
                (xyxy[:, 0] + xyxy[:, 2]) / 2 / w,
                (xyxy[:, 1] + xyxy[:, 3]) / 2 / h,
                (xyxy[:, 2] - xyxy[:, 0]) / w,
                (xyxy[:, 3] - xyxy[:, 1]) / h,
            ],
            dim=1,
        )
        targets.append(
            {
                "thing_masks": masks[is_thing],
                "thing_boxes": cxcywh,
                "thing_labels": it.labels[is_thing],
                "stuff_masks": masks[~is_thing],
                "stuff_labels": it.labels[~is_thing],
                "image_size": torch.tensor([h, w]),
            }
        )
    return images, pad_mask, targets


def collate_for(
    items: Sequence[TrainItem], num_things: int, spec: "TestTransformSpec"
) -> tuple[Tensor, Tensor, list[dict[str, Tensor]]]:
    """:func:`collate` normalised as the model's ``test_transform()`` says (channel order, mean, std, padding)."""
    return collate(items, num_things, spec.mean, spec.std, spec.channel_order, spec.size_divisor)


AUGMENT_POLICIES = ("official", "flip", "none")


def augment_for(spec: "TestTransformSpec", policy: str = "official") -> AugmentConfig:
    """Augmentation for a model's test scale.

    Args:
        spec: the model's test transform.
        policy: "official" (flip + the two resize / crop policies, sizes scaled by test short side / 800), "flip"
            (flip, then the test resize: every image at the test scale) or "none" (the test resize only).
    """
    if policy == "none":
        return AugmentConfig(enabled=False)
    if policy == "flip":
        return AugmentConfig(crop_prob=0.0, scales=(spec.short,), max_size=spec.long)
    if policy != "official":
        raise ValueError(f"augmentation policy must be one of {', '.join(AUGMENT_POLICIES)}, got {policy!r}")
    return AugmentConfig().scaled(spec.short / 800.0)


class SampleStream:
    """Deterministic, stateless stream of augmented training samples (see the module docstring).

    Args:
        dataset: the training split.
        augment_cfg: augmentation settings.
        test_scale: (long, short) of the model's test transform (used when augmentation is disabled).
        seed: the run's seed.
        global_batch: images per optimisation step over all processes.
    """

    def __init__(self, dataset: PanopticDataset, augment_cfg: AugmentConfig, test_scale: tuple[int, int],
                 seed: int, global_batch: int) -> None:
        if len(dataset) == 0:
            raise ValueError("SampleStream needs a non-empty data set")
        self.dataset = dataset
        self.augment_cfg = augment_cfg
        self.test_scale = test_scale
        self.seed = int(seed)
        self.global_batch = int(global_batch)
        self._perm: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """Image order of ``epoch`` (a permutation of the data set, from the seed and the epoch only)."""
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, 1, epoch]).permutation(len(self.dataset)))
        return self._perm[1]

    def index(self, step: int, slot: int) -> int:
        """Data set index of slot ``slot`` of the global batch of ``step`` (0-based)."""
        k = step * self.global_batch + slot
        return int(self.permutation(k // len(self.dataset))[k % len(self.dataset)])

    def item(self, step: int, slot: int) -> TrainItem:
        """The augmented sample of ``(step, slot)``; its augmentation RNG depends on (seed, step, slot) only."""
        rng = np.random.default_rng([self.seed, 2, step, slot])
        sample = self.dataset[self.index(step, slot)]
        return augment(item_from_sample(sample, self.dataset), self.augment_cfg, self.test_scale, rng)

    def local_items(self, step: int, rank: int, per_process: int) -> list[TrainItem]:
        """This process's share of the global batch: slots ``rank * per_process`` onwards."""
        first = rank * per_process
        return [self.item(step, first + j) for j in range(per_process)]
