"""The data types of panoptic post-processing: candidates in, a panoptic map out (`models.postprocess`).

`Candidates` are one image's thing + stuff segments before merging (scores, labels, low-resolution masks), made by
every model's ``candidates(...)`` (Panoptic SegFormer: `candidates_from_outputs`); `PanopticResult` is the merged
map. The segment-list helpers are shared by the fast and the full-resolution post-processors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["Candidates", "PanopticResult", "candidates_from_outputs", "Painted", "empty_maps",
           "segments_from_maps", "segments_from_counts"]


@dataclass
class Candidates:
    """Candidate segments of one image (things first, then stuff, as the model emits them).

    Attributes:
        scores: (K,) class confidences before rescoring (sigmoid probabilities).
        labels: (K,) long contiguous class indices (things 0..num_things-1, then stuff).
        masks: (K, h, w) float raw mask values (ReLU outputs at 1/8 resolution, no sigmoid).
        boxes: (K, 4) normalised cxcywh boxes for things (zeros for stuff), or None.
        query_index: (K,) long index of the query that produced each candidate, or None: for Panoptic SegFormer
            the location query for things (a query may appear under several labels) and
            ``num_thing_queries + j`` for stuff query j (query-decoupled models); thing-preference statistics
            group candidates by it.
    """

    scores: Tensor
    labels: Tensor
    masks: Tensor
    boxes: Tensor | None = None
    query_index: Tensor | None = None

    def __post_init__(self) -> None:
        k = self.scores.shape[0]
        if self.labels.shape[0] != k or self.masks.shape[0] != k or self.masks.dim() != 3:
            raise ValueError(
                f"Candidates: scores {tuple(self.scores.shape)}, labels {tuple(self.labels.shape)} and "
                f"masks {tuple(self.masks.shape)} must agree on K (masks (K, h, w))"
            )
        if self.query_index is not None and self.query_index.shape[0] != k:
            raise ValueError(f"Candidates: query_index {tuple(self.query_index.shape)} must have K = {k} entries")


@dataclass
class PanopticResult:
    """Panoptic output of one image at the requested size.

    Attributes:
        category: (H, W) int32 contiguous class index, -1 for void.
        instance: (H, W) int32 thing instance number 1, 2, ... in painting order; 0 for stuff and void.
        segments: one dict per painted segment, in painting order: label, isthing, score, instance, area, and
            candidate (index into the input candidates of the one that painted it; for a stuff class painted
            by several candidates, the first).
        candidate_scores: (K,) float32 rescored candidate scores, sorted descending ("(m)" with
            ``return_candidates=True`` only; None otherwise).
        candidate_labels: (K,) int64 labels in that order (same condition).
        candidate_masks: (K, H, W) float32 mask values at out_size before thresholding, same order.
        candidate_index: (K,) int64 input position of each candidate in that order (same condition).
    """

    category: np.ndarray
    instance: np.ndarray
    segments: list[dict[str, Any]] = field(default_factory=list)
    candidate_scores: np.ndarray | None = None
    candidate_labels: np.ndarray | None = None
    candidate_masks: np.ndarray | None = None
    candidate_index: np.ndarray | None = None


def candidates_from_outputs(
    outputs: dict[str, Any], index: int, num_things: int, valid_hw: tuple[int, int] | None = None
) -> Candidates:
    """Build the 100 thing + Ns stuff candidates of image `index` from the model's inference dict.

    Args:
        outputs: `PanopticSegFormer.forward` dict with thing_scores (B, T), thing_labels (B, T),
            thing_masks (B, T, h, w), stuff_scores (B, Ns), stuff_masks (B, Ns, h, w) and optionally
            thing_boxes (B, T, 4).
        index: image index in the batch.
        num_things: number of thing classes; stuff query j gets label num_things + j (class-fixed).
        valid_hw: (h, w) of the unpadded region in mask pixels; masks are cropped to it. None keeps all
            (the official single-image, no-padding case).

    Returns:
        Candidates with K = T + Ns, masks as float32 on the CPU.
    """
    thing_masks = outputs["thing_masks"][index]
    stuff_masks = outputs["stuff_masks"][index]
    num_stuff = stuff_masks.shape[0]
    scores = torch.cat([outputs["thing_scores"][index], outputs["stuff_scores"][index]]).detach().float().cpu()
    stuff_labels = torch.arange(num_stuff, device=thing_masks.device) + num_things
    labels = torch.cat([outputs["thing_labels"][index].long(), stuff_labels]).cpu()
    masks = torch.cat([thing_masks, stuff_masks]).detach().float().cpu()
    if valid_hw is not None:
        masks = masks[:, : valid_hw[0], : valid_hw[1]]
    boxes = None
    if outputs.get("thing_boxes") is not None:
        tb = outputs["thing_boxes"][index].detach().float().cpu()
        boxes = torch.cat([tb, tb.new_zeros(num_stuff, 4)])
    query_index = None
    if outputs.get("thing_query_index") is not None:
        qi = outputs["thing_query_index"][index].detach().long().cpu()
        loc = outputs.get("location")
        num_queries = int(loc.logits.shape[-2]) if loc is not None else (int(qi.max()) + 1 if qi.numel() else 0)
        query_index = torch.cat([qi, torch.arange(num_stuff) + num_queries])
    return Candidates(scores=scores, labels=labels, masks=masks, boxes=boxes, query_index=query_index)


# (label, isthing, score, instance, candidate index) of each painted segment, in painting order.
Painted = list[tuple[int, bool, float, int, int]]


def empty_maps(out_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    return np.full(out_size, -1, dtype=np.int32), np.zeros(out_size, dtype=np.int32)


def _segment_dict(label: int, isthing: bool, score: float, inst: int, area: int, candidate: int) -> dict[str, Any]:
    return {"label": int(label), "isthing": bool(isthing), "score": float(score), "instance": int(inst),
            "area": int(area), "candidate": int(candidate)}


def segments_from_maps(category: np.ndarray, instance: np.ndarray, painted: Painted) -> list[dict[str, Any]]:
    """Segment list with the areas actually painted (full-resolution paths)."""
    segments = []
    for label, isthing, score, inst, cand in painted:
        if isthing:
            area = int(((category == label) & (instance == inst)).sum())
        else:
            area = int(((category == label) & (instance == 0)).sum())
        if area > 0:
            segments.append(_segment_dict(label, isthing, score, inst, area, cand))
    return segments


def segments_from_counts(painted: Painted, areas: dict[int, int]) -> list[dict[str, Any]]:
    """Segment list from pixel counts taken while painting (fast paths).

    ``areas`` maps a painted entry's position in ``painted`` to its pixel count for things; a stuff entry's area
    is the total over every entry of its label, which is what ``segments_from_maps`` reads off the maps.
    """
    stuff_total: dict[int, int] = {}
    for i, (label, isthing, *_rest) in enumerate(painted):
        if not isthing:
            stuff_total[label] = stuff_total.get(label, 0) + areas.get(i, 0)
    segments = []
    for i, (label, isthing, score, inst, cand) in enumerate(painted):
        area = areas.get(i, 0) if isthing else stuff_total[label]
        if area > 0:
            segments.append(_segment_dict(label, isthing, score, inst, area, cand))
    return segments
