"""DETR's own panoptic post-processing (``PostProcessPanoptic``, facebookresearch/detr ``models/segmentation.py``).

Per image, on the queries kept by the caller (DETR: softmax over all logits incl. no-object, argmax is not
no-object and its probability > 0.85):

1. the kept mask logits are resized bilinearly (``align_corners=False``) to the processed image size (after the
   test resize, before batch padding);
2. each pixel takes the kept query of largest ``softmax over queries`` (i.e. the largest logit); **no void**;
3. the first pass merges duplicate stuff queries into the first query of their class (so the duplicates get area 0);
4. the id map is resized to the original image size with PIL ``NEAREST`` and segment areas are counted there;
5. while some kept query has area <= 4 pixels, those queries are dropped and steps 2 and 4 are redone without the
   stuff merging (a dropped duplicate's pixels go to the next best query, possibly of another class).

Segment order = kept-query order; DETR numbers segments 0, 1, ...; :class:`PanopticResult` numbers thing instances
1, 2, ... in the same order.

**Padding bug (DETR issues #217, #263, #474).** DETR resizes the mask logits of a padded batch canvas straight to the
unpadded size, which stretches the padding into the image of every smaller image of a batch of two or more. Here the
logits are first cropped to the image's own stride-4 region ``ceil(h/4) x ceil(w/4)`` (C2 of a torchvision ResNet
covers exactly that), which leaves a batch of one (the official evaluation) unchanged.
``reproduce_padding_bug=True`` skips the crop, as DETR does.

:class:`DETRStyleInference` holds the ``PanopticModel`` methods DETR panoptic and D-DETR-MS share around it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from models.baselines.common import ceil_div, valid_sizes
from models.inference import LAST_LAYER, TestTransformSpec, parse_layer
from models.postprocess import PanopticResult

__all__ = ["detr_panoptic_postprocess", "crop_to_valid", "MIN_AREA", "DETRStyleInference"]

MIN_AREA = 4  # DETR drops segments of area <= 4 pixels at the original size


def crop_to_valid(masks: Tensor, valid_hw: tuple[int, int], stride: int = 4) -> Tensor:
    """``(..., H_s, W_s)`` stride-``stride`` maps of a padded canvas -> the image's own ``ceil(h/s) x ceil(w/s)``."""
    return masks[..., : ceil_div(int(valid_hw[0]), stride), : ceil_div(int(valid_hw[1]), stride)]


def _resize_ids_nearest(ids: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """DETR's ``id2rgb`` -> ``PIL.Image.resize(NEAREST)`` -> ``rgb2id`` round trip of an ``(h, w)`` id map."""
    h, w = ids.shape
    if (h, w) == tuple(out_size):
        return ids.astype(np.int64)
    rgb = np.zeros((h, w, 3), dtype=np.uint8)
    rest = ids.astype(np.int64)
    for c in range(3):
        rgb[..., c] = rest % 256
        rest = rest // 256
    img = Image.fromarray(rgb).resize((int(out_size[1]), int(out_size[0])), resample=Image.NEAREST)
    arr = np.asarray(img).astype(np.int64)
    return arr[..., 0] + 256 * arr[..., 1] + 256 * 256 * arr[..., 2]


def detr_panoptic_postprocess(scores: Tensor, labels: Tensor, mask_logits: Tensor, is_thing: Tensor,
                              processed_size: tuple[int, int], out_size: tuple[int, int],
                              min_area: int = MIN_AREA) -> PanopticResult:
    """DETR's ``PostProcessPanoptic`` on already-kept queries (see the module docstring).

    Args:
        scores: ``(K,)`` class confidence of each kept query (carried into the segments; DETR never uses it).
        labels: ``(K,)`` long contiguous class of each kept query.
        mask_logits: ``(K, h, w)`` mask logits of the kept queries at stride 4 (already cropped, unless reproducing
            the padding bug), on any device (the resize and argmax run there, as upstream).
        is_thing: ``(K,)`` bool.
        processed_size: ``(h, w)`` of the image fed to the network (before padding): the argmax resolution.
        out_size: ``(H, W)`` of the original image.
        min_area: segments of this many pixels or fewer are removed and the argmax redone (DETR: 4).

    Returns:
        :class:`PanopticResult` (contiguous labels, -1 nowhere unless nothing is kept).
    """
    out_size = (int(out_size[0]), int(out_size[1]))
    category = np.full(out_size, -1, dtype=np.int32)
    instance = np.zeros(out_size, dtype=np.int32)
    k = int(scores.shape[0])
    if k == 0:
        return PanopticResult(category=category, instance=instance)
    h, w = int(processed_size[0]), int(processed_size[1])
    masks = F.interpolate(mask_logits[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    masks = masks.flatten(1)
    stuff_groups: dict[int, list[int]] = {}
    for i in range(k):
        if not bool(is_thing[i]):
            stuff_groups.setdefault(int(labels[i]), []).append(i)

    def ids_and_area(m: Tensor, n: int, dedup: bool) -> tuple[np.ndarray, list[int]]:
        if n == 0:
            ids = torch.zeros((h, w), dtype=torch.long)
        else:  # on the masks' device, as upstream; only the id map goes to the CPU for PIL
            ids = m.transpose(0, 1).softmax(-1).argmax(-1).view(h, w).cpu()
        if dedup:
            for group in stuff_groups.values():
                for j in group[1:]:
                    ids.masked_fill_(ids.eq(j), group[0])
        full = _resize_ids_nearest(ids.numpy(), out_size)
        area = np.bincount(full.ravel(), minlength=n)[:n].tolist() if n else []
        return full, area

    keep = list(range(k))
    full, area = ids_and_area(masks, k, dedup=True)
    while True:
        small = [a <= min_area for a in area]
        if not any(small):
            break
        keep = [q for q, s in zip(keep, small) if not s]
        full, area = ids_and_area(masks[torch.tensor(keep, dtype=torch.long, device=masks.device)], len(keep),
                                  dedup=False)
    if not keep:
        return PanopticResult(category=category, instance=instance)
    segments = []
    next_instance = 1
    for j, q in enumerate(keep):
        sel = full == j
        label = int(labels[q])
        thing = bool(is_thing[q])
        category[sel] = label
        inst = 0
        if thing:
            inst = next_instance
            next_instance += 1
            instance[sel] = inst
        segments.append({"label": label, "isthing": thing, "score": float(scores[q]), "instance": inst,
                         "area": int(area[j])})
    return PanopticResult(category=category, instance=instance, segments=segments)


class DETRStyleInference:
    """``PanopticModel`` methods shared by DETR panoptic and D-DETR-MS: DETR's PIL test transform, one mask head with
    stride-4 logits cropped to each image, DETR's ``PostProcessPanoptic`` as the own post-processing, and the
    forward's argument checks and output dict.

    The model's ``cfg`` has ``name``, ``num_things``, ``num_queries``, ``test_short``, ``test_long``, ``pixel_mean``,
    ``pixel_std``, ``panoptic_threshold`` and ``reproduce_padding_bug``.
    """

    cfg: Any
    default_post_process = "own"
    mask_stride = 4  # candidates' masks are at 1/4 of the input; ``valid_hw`` (optional) is in these pixels

    def test_transform(self) -> TestTransformSpec:
        """DETR's val transform: PIL bilinear resize (short 800, long <= 1333, DETR rounding), ToTensor, ImageNet."""
        return TestTransformSpec(resize="pil", short=self.cfg.test_short, long=self.cfg.test_long,
                                 mean=self.cfg.pixel_mean, std=self.cfg.pixel_std, channel_order="rgb",
                                 size_divisor=1)

    def mask_layers(self) -> list[str]:
        """One mask head: ``["last"]``."""
        return [LAST_LAYER]

    def post_process_options(self, method: str) -> dict[str, Any]:
        """"p" uses the own threshold (``panoptic_threshold``) and no void (mask_threshold 0), like the own
        post-processing; others: defaults."""
        if method == "p":
            return {"score_threshold": self.cfg.panoptic_threshold, "mask_threshold": 0.0}
        return {}

    def _pad_mask(self, images: Tensor, pad_mask: Tensor | None, mask_layer: int | None) -> Tensor:
        """The forward's ``(B, H, W)`` padding mask (all False when None); ``mask_layer`` must be None."""
        if mask_layer is not None:
            raise ValueError(f"{self.cfg.name} has one mask head: mask_layer must be None (got {mask_layer})")
        if pad_mask is None:
            pad_mask = images.new_zeros((images.shape[0], *images.shape[-2:]), dtype=torch.bool)
        return pad_mask

    def _outputs(self, images: Tensor, pad_mask: Tensor, logits: Tensor, boxes: Tensor, seg: Tensor
                 ) -> dict[str, Any]:
        """The forward's dict from every decoder layer's ``logits (L, B, Q, C)`` / ``boxes (L, B, Q, 4)`` and the
        mask head's ``seg (B * Q, 1, h, w)``."""
        b = images.shape[0]
        return {"pred_logits": logits[-1], "pred_boxes": boxes[-1],
                "pred_masks": seg.view(b, self.cfg.num_queries, seg.shape[-2], seg.shape[-1]),
                "aux_logits": logits, "aux_boxes": boxes, "valid_sizes": valid_sizes(pad_mask),
                "image_size": (int(images.shape[-2]), int(images.shape[-1]))}

    def _check_layer(self, layer: str) -> None:
        if parse_layer(layer) is not None:
            raise ValueError(f"{self.cfg.name} has only the layer 'last', got {layer!r}")

    def _masks(self, outputs: dict[str, Any], index: int, valid_hw: tuple[int, int] | None) -> Tensor:
        """Image ``index``'s mask logits ``(Q, h, w)`` cropped to its own region (``valid_hw`` in mask pixels wins)."""
        masks = outputs["pred_masks"][index]
        if valid_hw is not None:
            return masks[:, : int(valid_hw[0]), : int(valid_hw[1])]
        return crop_to_valid(masks, tuple(outputs["valid_sizes"][index].tolist()))

    def _own(self, outputs: dict[str, Any], index: int, scores: Tensor, labels: Tensor, rows: Tensor,
             out_size: tuple[int, int], valid_hw: tuple[int, int] | None) -> PanopticResult:
        """DETR's ``PostProcessPanoptic`` on the kept queries: ``scores`` / ``labels`` (K,) and ``rows`` selecting
        their masks from the image's ``(Q, h, w)`` (a bool keep mask or query indices)."""
        if self.cfg.reproduce_padding_bug:
            masks = outputs["pred_masks"][index]
        else:
            masks = self._masks(outputs, index, valid_hw)
        masks = masks[rows.to(masks.device)].detach().float()
        processed = tuple(int(v) for v in outputs["valid_sizes"][index].tolist())
        return detr_panoptic_postprocess(scores, labels, masks, labels < self.cfg.num_things, processed, out_size)
