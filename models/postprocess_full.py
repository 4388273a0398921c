"""The full-resolution definitions of the post-processors (every candidate resized to the output size).

These are the reference semantics of ``models.postprocess`` (the code before the fast rewrite, plus the painting
candidate of each segment): the fast paths there give the same maps, segments and scores bit for bit. They run when
the fast path cannot guarantee that (another bilinear kernel, non-finite values) and for "(m)" with
``return_candidates=True`` (``harness predict --dump-raw``), which needs the full-resolution candidate list.

They are also the tests' and the benchmark's oracle (``tests/test_postprocess_fast.py``), so they stay plain and
independent of the fast paths: nothing here calls into ``models.box_resize`` or the box-restricted code.
Defaults are those of the public functions in ``models.postprocess``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.candidates import Candidates, Painted, PanopticResult, empty_maps, segments_from_maps

__all__ = ["resize", "mask_wise_merge_full", "pixel_argmax_full", "maskformer_merge_full", "heuristic_merge_full"]


def resize(masks: Tensor, out_size: tuple[int, int]) -> Tensor:
    """(K, h, w) -> (K, H, W) float32, bilinear, align_corners=False (as `F.interpolate` in the official code)."""
    masks = masks.float()
    if tuple(masks.shape[-2:]) == tuple(out_size):
        return masks
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *out_size))
    return F.interpolate(masks[None], size=tuple(out_size), mode="bilinear", align_corners=False)[0]


def mask_wise_merge_full(
    cands: Candidates, num_things: int, out_size: tuple[int, int], thing_threshold: float = 0.25,
    stuff_threshold: float = 0.25, thing_overlap: float = 0.4, stuff_overlap: float = 0.2, alpha: float = 1.0,
    beta: float = 2.0, mask_threshold: float = 0.5, plus_one: bool = True, stable: bool = False,
) -> PanopticResult:
    """The full-resolution definition of "(m)" (every candidate resized to ``out_size``), with the sorted list
    (and each sorted candidate's input position, ``candidate_index``)."""
    masks = resize(cands.masks, out_size)
    seg = masks > mask_threshold
    # Same expressions and reduction order as the official code, so float32 results agree bit for bit.
    count = seg.sum((1, 2)).float()
    mask_score = (masks * seg.float()).sum((1, 2)) / (count + 1 if plus_one else count.clamp(min=1.0))
    scores = cands.scores.float()
    # alpha == 1 multiplies by the score itself, as the official `scores_all *= seg_scores**2`.
    rescored = (scores if alpha == 1.0 else scores**alpha) * mask_score**beta
    # The official call (`torch.sort(descending=True)`, not stable): tied scores (e.g. the many 0.0 of empty
    # masks) then come out in the same order as the official code on the same torch build and device.
    rescored, order = torch.sort(rescored, descending=True, stable=stable)
    masks, seg, labels = masks[order], seg[order], cands.labels[order]

    filled = torch.zeros(out_size, dtype=torch.bool)
    category, instance = empty_maps(out_size)
    cat_t, inst_t = torch.from_numpy(category), torch.from_numpy(instance)
    painted: Painted = []
    next_instance = 1
    for i in range(labels.shape[0]):
        label = int(labels[i])
        isthing = label < num_things
        score = float(rescored[i])
        if score < (thing_threshold if isthing else stuff_threshold):
            continue
        m = seg[i]
        area = int(m.sum())
        if area == 0:
            continue
        inter = int((m & filled).sum())
        if inter / area > (thing_overlap if isthing else stuff_overlap):
            continue
        m = m & ~filled
        filled |= m
        cat_t.masked_fill_(m, label)
        if isthing:
            inst_t.masked_fill_(m, next_instance)
            painted.append((label, True, score, next_instance, int(order[i])))
            next_instance += 1
        else:
            painted.append((label, False, score, 0, int(order[i])))
    return PanopticResult(
        category=category,
        instance=instance,
        segments=segments_from_maps(category, instance, painted),
        candidate_scores=rescored.numpy().astype(np.float32),
        candidate_labels=labels.numpy().astype(np.int64),
        candidate_masks=masks.numpy().astype(np.float32, copy=False),
        candidate_index=order.numpy().astype(np.int64),
    )


def _paint_ids(
    ids: Tensor, kept: list[int], labels: Tensor, scores: Tensor, num_things: int, valid: Tensor
) -> tuple[np.ndarray, np.ndarray, Painted]:
    """Paint per-pixel winner ids (index into `kept`) into category/instance maps.

    Things get instance numbers in descending score order; stuff of one class shares one segment.
    """
    category, instance = empty_maps(tuple(ids.shape))
    cat_t, inst_t = torch.from_numpy(category), torch.from_numpy(instance)
    painted: Painted = []
    order = sorted(range(len(kept)), key=lambda j: -float(scores[kept[j]]))
    next_instance = 1
    for j in order:
        k = kept[j]
        m = (ids == j) & valid
        if not bool(m.any()):
            continue
        label = int(labels[k])
        cat_t.masked_fill_(m, label)
        if label < num_things:
            inst_t.masked_fill_(m, next_instance)
            painted.append((label, True, float(scores[k]), next_instance, k))
            next_instance += 1
        elif all(p[0] != label for p in painted):
            painted.append((label, False, float(scores[k]), 0, k))
    return category, instance, painted


def pixel_argmax_full(cands: Candidates, num_things: int, out_size: tuple[int, int], score_threshold: float = 0.25,
                      mask_threshold: float = 0.5, min_area: int = 4) -> PanopticResult:
    """The full-resolution definition of "(p)"."""
    masks = resize(cands.masks, out_size)
    kept = [int(k) for k in torch.nonzero(cands.scores >= score_threshold).flatten()]
    while True:
        if not kept:
            category, instance = empty_maps(out_size)
            return PanopticResult(category=category, instance=instance)
        values, ids = masks[kept].max(0)
        valid = values >= mask_threshold
        areas = torch.bincount(ids[valid], minlength=len(kept)).tolist()
        small = [k for k, a in zip(kept, areas) if a <= min_area]
        if not small:
            break
        kept = [k for k in kept if k not in small]
    category, instance, painted = _paint_ids(ids, kept, cands.labels, cands.scores, num_things, valid)
    return PanopticResult(
        category=category, instance=instance, segments=segments_from_maps(category, instance, painted)
    )


def maskformer_merge_full(cands: Candidates, num_things: int, out_size: tuple[int, int],
                          object_mask_threshold: float = 0.8, overlap_threshold: float = 0.8,
                          mask_threshold: float = 0.5) -> PanopticResult:
    """The full-resolution definition of "(p*)"."""
    masks = resize(cands.masks, out_size)
    category, instance = empty_maps(out_size)
    kept = [int(k) for k in torch.nonzero(cands.scores > object_mask_threshold).flatten()]
    if not kept:
        return PanopticResult(category=category, instance=instance)
    prob = cands.scores[kept].float()[:, None, None] * masks[kept]
    ids = prob.argmax(0)
    cat_t, inst_t = torch.from_numpy(category), torch.from_numpy(instance)
    painted: Painted = []
    stuff_seen: set[int] = set()
    next_instance = 1
    for j, k in enumerate(kept):
        label = int(cands.labels[k])
        isthing = label < num_things
        m = ids == j
        mask_area = int(m.sum())
        original_area = int((masks[k] >= mask_threshold).sum())
        if mask_area == 0 or original_area == 0:
            continue
        if mask_area / original_area < overlap_threshold:
            continue
        cat_t.masked_fill_(m, label)
        if isthing:
            inst_t.masked_fill_(m, next_instance)
            painted.append((label, True, float(cands.scores[k]), next_instance, k))
            next_instance += 1
        elif label not in stuff_seen:
            stuff_seen.add(label)
            painted.append((label, False, float(cands.scores[k]), 0, k))
    return PanopticResult(
        category=category, instance=instance, segments=segments_from_maps(category, instance, painted)
    )


def heuristic_merge_full(cands: Candidates, num_things: int, out_size: tuple[int, int],
                         instance_score_threshold: float = 0.5, overlap_threshold: float = 0.5,
                         stuff_area_limit: int = 4096, mask_threshold: float = 0.5) -> PanopticResult:
    """The full-resolution definition of the heuristic."""
    masks = resize(cands.masks, out_size)
    scores, labels = cands.scores.float(), cands.labels
    category, instance = empty_maps(out_size)
    cat_t, inst_t = torch.from_numpy(category), torch.from_numpy(instance)
    filled = torch.zeros(out_size, dtype=torch.bool)
    painted: Painted = []
    thing_idx = [int(k) for k in torch.nonzero(labels < num_things).flatten()]
    thing_idx.sort(key=lambda k: -float(scores[k]))
    next_instance = 1
    for k in thing_idx:
        if float(scores[k]) < instance_score_threshold:
            break  # sorted: every later one is below too (detectron2 breaks here as well)
        m = masks[k] > mask_threshold
        area = int(m.sum())
        if area == 0:
            continue
        if int((m & filled).sum()) / area > overlap_threshold:
            continue
        m = m & ~filled
        filled |= m
        cat_t.masked_fill_(m, int(labels[k]))
        inst_t.masked_fill_(m, next_instance)
        painted.append((int(labels[k]), True, float(scores[k]), next_instance, k))
        next_instance += 1

    num_classes = int(labels.max()) + 1 if labels.numel() else 0
    if num_classes > num_things:
        semantic = masks.new_zeros((num_classes, *out_size))
        semantic.index_add_(0, labels.long(), scores[:, None, None] * masks)
        best, sem = semantic.max(0)
        sem[best <= 0] = -1
        for label in range(num_things, num_classes):
            m = (sem == label) & ~filled
            if int(m.sum()) < stuff_area_limit:
                continue
            filled |= m
            cat_t.masked_fill_(m, label)
            members = torch.nonzero(labels == label).flatten()
            stuff_score = float(scores[members].max())
            painted.append((label, False, stuff_score, 0, int(members[scores[members].argmax()])))
    return PanopticResult(
        category=category, instance=instance, segments=segments_from_maps(category, instance, painted)
    )
