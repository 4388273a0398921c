"""Panoptic post-processing: turn thing + stuff candidates into one non-overlapping panoptic map.

Four methods share one input (`Candidates`) and one output (`PanopticResult`):

- `mask_wise_merge` "(m)": the official Panoptic SegFormer merge (`panformer_head.py` `get_bboxes`).
  Rescore ``score * s_mask**beta`` with ``s_mask = sum(m * [m > 0.5]) / (sum([m > 0.5]) + 1)`` (the
  official "+1" denominator; ``plus_one=False`` gives the paper's plain average, Eq. 6), sort all
  candidates, skip those below the confidence threshold (0.25; 0.3 for Swin-L/PVTv2-B5) and those whose
  binary mask overlaps already painted pixels by more than 0.4 (things) / 0.2 (stuff), paint free pixels.
  The paper states one t_keep = 0.6 (overlap 0.4) for both; pass ``stuff_overlap=0.4`` for that.
- `pixel_argmax` "(p)": no official version exists. Ours: keep candidates whose class confidence is
  at least ``score_threshold``; each pixel goes to the kept candidate with the largest raw mask value;
  a pixel is void when that value is below ``mask_threshold`` (0.5, the binarisation threshold every other
  path uses); candidates left with ``min_area`` pixels or fewer are dropped and the argmax is redone,
  as DETR's `PostProcessPanoptic` does.
- `maskformer_merge` "(p*)": MaskFormer's `panoptic_inference` (object mask threshold 0.8, overlap 0.8),
  with the score-weighted argmax ``score * mask``. Our masks are raw non-negative values, used where
  MaskFormer uses sigmoid probabilities.
- `heuristic_merge`: Kirillov et al.'s heuristic as in panopticapi / detectron2: things sorted by
  class score, instance score threshold 0.5, overlap threshold 0.5, then stuff from a semantic map
  (per-pixel argmax over classes of ``score * mask`` summed per class) fills the free pixels, with a
  minimum stuff area of 4096 pixels at the output resolution.

Masks are upsampled bilinearly (align_corners=False) straight to ``out_size``, as the official code does
(it never crops padding: batch size 1 without padding at test time). Callers with padded batches crop
first (`candidates_from_outputs(..., valid_hw=...)`).

Speed (issue #10.7). The definitions above resize every candidate to the full image (153 x H x W floats for
COCO), which costs seconds per image on a CPU (`models.postprocess_full` keeps them). The functions here give
bit-identical maps, segments and scores at a small fraction of the cost:

- Masks are ReLU outputs: a resized mask can exceed a threshold only next to low-resolution pixels that exceed
  it, and it is exactly 0 away from non-zero ones. Each candidate is resized only inside that support box, with
  PyTorch's own kernels (`models.box_resize`: the CPU bilinear kernel is separable, so a pass along W over the
  needed source rows and one along H over the box's columns reproduce it bit for bit on any CPU). Whenever that
  cannot be guaranteed (``F.interpolate`` would take its channels-last kernel: output H + W <= 128, 3 candidates
  on one thread; non-finite values; a failed probe) the full-resolution definition runs instead.
- "(m)" (`models.mask_wise`) resizes only the candidates whose rescored score can reach t_cnf and reproduces the
  official float32 rescoring and sort order exactly; `models.mask_wise.mask_wise_trace` shows its working.
- Overlap tests, argmaxes and painting work inside the boxes; segment areas are counted while painting.

``return_candidates=True`` ("(m)" only; ``harness predict --dump-raw``) takes the full-resolution path, which also
returns the sorted candidate list with full-resolution masks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from models.box_resize import Box, BoxMasks, exact_box_masks, paint, support_threshold, view
from models.candidates import (
    Candidates,
    Painted,
    PanopticResult,
    candidates_from_outputs,
    empty_maps,
    segments_from_counts,
)
from models.mask_wise import mask_wise_merge
from models.postprocess_full import heuristic_merge_full, maskformer_merge_full, pixel_argmax_full

__all__ = [
    "Candidates",
    "PanopticResult",
    "candidates_from_outputs",
    "mask_wise_merge",
    "pixel_argmax",
    "maskformer_merge",
    "heuristic_merge",
    "POST_PROCESSORS",
    "post_process",
]


def _fast_masks(cands: Candidates, out_size: tuple[int, int]) -> BoxMasks | None:
    """The box resizer of the candidates when the exact fast path applies, else None (use the full-resolution
    definition)."""
    return exact_box_masks(cands.masks, cands.scores, out_size)


def _empty_result(out_size: tuple[int, int]) -> PanopticResult:
    category, instance = empty_maps(out_size)
    return PanopticResult(category=category, instance=instance)


def _winner_luts(winners: list[int], kept: list[int], areas: np.ndarray, cands: Candidates, num_things: int
                 ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Look-up tables position in ``kept`` -> category / instance (-1 / 0 for losers) and the segment list, for the
    positions ``winners`` in painting order (each with ``areas[j] > 0`` pixels): things get instance numbers in that
    order; the winners of one stuff class share one segment (that of the first)."""
    lut_cat = np.full(len(kept), -1, np.int32)
    lut_inst = np.zeros(len(kept), np.int32)
    painted: Painted = []
    counts: dict[int, int] = {}
    stuff_entry: dict[int, int] = {}
    next_instance = 1
    for j in winners:
        k = kept[j]
        label = int(cands.labels[k])
        lut_cat[j] = label
        if label < num_things:
            lut_inst[j] = next_instance
            counts[len(painted)] = int(areas[j])
            painted.append((label, True, float(cands.scores[k]), next_instance, k))
            next_instance += 1
        else:
            if label not in stuff_entry:
                stuff_entry[label] = len(painted)
                painted.append((label, False, float(cands.scores[k]), 0, k))
            counts[stuff_entry[label]] = counts.get(stuff_entry[label], 0) + int(areas[j])
    return lut_cat, lut_inst, segments_from_counts(painted, counts)


# ----------------------------------------------------------------------------------------------------------------
# (p) pixel-wise argmax
# ----------------------------------------------------------------------------------------------------------------


def _argmax_in_boxes(out_size: tuple[int, int], positions: list[int], boxes: list[Box], vals: list[np.ndarray],
                     init: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel maximum over candidates given inside boxes (in ascending ``positions``), and the position of the
    first maximal one (``torch.max(dim=0)``'s rule); pixels no candidate beats ``init`` keep ``(init, 0)``."""
    best = np.full(out_size, init, dtype=np.float32)
    ids = np.zeros(out_size, dtype=np.int32)
    for j, box, v in zip(positions, boxes, vals):
        sub = view(best, box)
        win = v > sub  # strict: an earlier candidate keeps a tie
        np.maximum(sub, v, out=sub)  # = v where win, else sub (equal values on ties)
        np.copyto(view(ids, box), np.int32(j), where=win)
    return best, ids


def pixel_argmax(
    cands: Candidates,
    num_things: int,
    out_size: tuple[int, int],
    score_threshold: float = 0.25,
    mask_threshold: float = 0.5,
    min_area: int = 4,
) -> PanopticResult:
    """Pixel-wise argmax "(p)" (our definition; the official code has none, see the module docstring).

    Args:
        cands: candidates with K masks (K, h, w).
        num_things: labels below this are things.
        out_size: (H, W) of the output.
        score_threshold: candidates with class confidence below it take no part.
        mask_threshold: a pixel whose largest mask value is below it is void.
        min_area: candidates that win this many pixels or fewer are removed and the argmax redone.
    """
    bm = _fast_masks(cands, out_size)
    if bm is None:
        return pixel_argmax_full(cands, num_things, out_size, score_threshold, mask_threshold, min_area)
    out_size = (int(out_size[0]), int(out_size[1]))
    kept = [int(k) for k in torch.nonzero(cands.scores >= score_threshold).flatten()]
    if not kept:
        return _empty_result(out_size)
    # Only candidates with a pixel >= mask_threshold can win a valid pixel; the others win none, are removed as
    # "small" in the first round and change nothing else.
    sup = support_threshold(mask_threshold)
    kept = [k for k in kept if bm.vmax[k] > sup]
    boxes = bm.boxes(kept, sup)
    kept = [k for k, b in zip(kept, boxes) if b is not None]
    boxes = [b for b in boxes if b is not None]
    vals = bm.values(kept, boxes)
    if not kept:
        return _empty_result(out_size)
    n = len(kept)
    best, ids = _argmax_in_boxes(out_size, list(range(n)), boxes, vals, -np.inf)
    valid = best >= mask_threshold
    areas = np.bincount(ids[valid], minlength=n)
    alive = np.ones(n, bool)
    while True:
        small = alive & (areas <= min_area)
        if not small.any():
            break
        alive &= ~small
        if not alive.any():
            return _empty_result(out_size)
        # Removing candidates that are not a pixel's winner changes nothing there (same maximum, same first
        # maximal survivor); only the few pixels the removed ones won are decided again among the survivors.
        lost_y, lost_x = [], []
        for j in np.flatnonzero(small):
            ly, lx = np.nonzero((view(ids, boxes[j]) == j) & view(valid, boxes[j]))
            lost_y.append(ly + boxes[j][0])
            lost_x.append(lx + boxes[j][2])
        areas[small] = 0
        ys, xs = np.concatenate(lost_y), np.concatenate(lost_x)
        new_best = np.full(len(xs), -np.inf, np.float32)
        new_ids = np.zeros(len(xs), np.int32)
        for j in np.flatnonzero(alive):
            y0, y1, x0, x1 = boxes[j]
            inside = np.flatnonzero((xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1))
            if inside.size:
                v = vals[j][ys[inside] - y0, xs[inside] - x0]
                win = v > new_best[inside]
                new_best[inside[win]] = v[win]
                new_ids[inside[win]] = j
        best[ys, xs], ids[ys, xs] = new_best, new_ids
        won = new_best >= mask_threshold
        valid[ys, xs] = won
        areas += np.bincount(new_ids[won], minlength=n)

    winners = sorted(np.flatnonzero(alive).tolist(), key=lambda j: -float(cands.scores[kept[j]]))
    lut_cat, lut_inst, segments = _winner_luts([j for j in winners if areas[j] > 0], kept, areas, cands, num_things)
    code = np.where(valid, ids, np.int32(n))  # n = void
    category = np.append(lut_cat, np.int32(-1))[code]
    instance = np.append(lut_inst, np.int32(0))[code]
    return PanopticResult(category=category, instance=instance, segments=segments)


# ----------------------------------------------------------------------------------------------------------------
# (p*) MaskFormer-style merging
# ----------------------------------------------------------------------------------------------------------------


def maskformer_merge(
    cands: Candidates,
    num_things: int,
    out_size: tuple[int, int],
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
    mask_threshold: float = 0.5,
) -> PanopticResult:
    """MaskFormer's `panoptic_inference` "(p*)" on our candidates.

    Keeps candidates with score > object_mask_threshold, assigns each pixel to the argmax of
    ``score * mask``, then walks the kept candidates in their input order: a candidate whose won area
    is less than overlap_threshold of its own binary area (mask >= 0.5) is dropped (its pixels become
    void); a second candidate of an already present stuff class joins that segment. Where every kept
    ``score * mask`` is 0 the argmax is the first kept candidate (``argmax``'s first-maximum rule).
    """
    bm = _fast_masks(cands, out_size)
    # The box path needs masks >= 0 (so score * mask is 0 outside a candidate's non-zero support) and a positive
    # threshold (so the binary area lies inside that support).
    if bm is None or not mask_threshold > 0 or not bm.nonneg:
        return maskformer_merge_full(cands, num_things, out_size, object_mask_threshold, overlap_threshold,
                                      mask_threshold)
    out_size = (int(out_size[0]), int(out_size[1]))
    kept = [int(k) for k in torch.nonzero(cands.scores > object_mask_threshold).flatten()]
    if not kept:
        return _empty_result(out_size)
    boxes = bm.boxes(kept, None)
    pos = [j for j, b in enumerate(boxes) if b is not None]
    vals = bm.values([kept[j] for j in pos], [boxes[j] for j in pos])
    kept_scores = cands.scores[kept].float().numpy()
    probs = [kept_scores[j] * v for j, v in zip(pos, vals)]  # float32, as ``scores[:, None, None] * masks``
    # Pixels where every score * mask is 0 go to position 0 (argmax's first maximum), box or not.
    _, ids = _argmax_in_boxes(out_size, pos, [boxes[j] for j in pos], probs, 0.0)
    mask_area = np.bincount(ids.ravel(), minlength=len(kept))
    original_area = np.zeros(len(kept), np.int64)
    for j, v in zip(pos, vals):
        original_area[j] = np.count_nonzero(v >= mask_threshold)

    winners = [j for j in range(len(kept)) if mask_area[j] > 0 and original_area[j] > 0
               and not mask_area[j] / original_area[j] < overlap_threshold]
    lut_cat, lut_inst, segments = _winner_luts(winners, kept, mask_area, cands, num_things)
    return PanopticResult(category=lut_cat[ids], instance=lut_inst[ids], segments=segments)


# ----------------------------------------------------------------------------------------------------------------
# Kirillov et al.'s heuristic
# ----------------------------------------------------------------------------------------------------------------


def heuristic_merge(
    cands: Candidates,
    num_things: int,
    out_size: tuple[int, int],
    instance_score_threshold: float = 0.5,
    overlap_threshold: float = 0.5,
    stuff_area_limit: int = 4096,
    mask_threshold: float = 0.5,
) -> PanopticResult:
    """The heuristic of Kirillov et al. (panopticapi `combine_semantic_and_instance_predictions`).

    Things: sorted by class score, dropped below instance_score_threshold or when more than
    overlap_threshold of their binary mask is already taken; they fill free pixels. Stuff: a semantic
    map (per-pixel argmax over classes of the per-class sum of ``score * mask``; void where that sum is 0)
    fills the still-free pixels with each stuff class whose free area is at least stuff_area_limit.
    """
    args = (instance_score_threshold, overlap_threshold, stuff_area_limit, mask_threshold)
    bm = _fast_masks(cands, out_size)
    if bm is None or not stuff_area_limit > 0 or int(cands.labels.min()) < 0:
        return heuristic_merge_full(cands, num_things, out_size, *args)
    out_size = (int(out_size[0]), int(out_size[1]))
    scores, labels = cands.scores.float(), cands.labels
    lab = labels.cpu().numpy().astype(np.int64)
    s32 = scores.numpy()
    category, instance = empty_maps(out_size)
    filled = np.zeros(out_size, dtype=bool)
    painted: Painted = []
    counts: dict[int, int] = {}

    thing_idx = [int(k) for k in torch.nonzero(labels < num_things).flatten()]
    thing_idx.sort(key=lambda k: -float(scores[k]))
    active = []
    for k in thing_idx:
        if float(scores[k]) < instance_score_threshold:
            break  # sorted: every later one is below too (detectron2 breaks here as well)
        active.append(k)
    num_classes = int(lab.max()) + 1 if lab.size else 0
    with_stuff = num_classes > num_things
    if with_stuff:  # every candidate's values inside its non-zero support, for things and the semantic map
        all_boxes = bm.boxes(list(range(len(lab))), None)
        live = [k for k, b in enumerate(all_boxes) if b is not None]
        vals = dict(zip(live, bm.values(live, [all_boxes[k] for k in live])))
        t_list = [(k, all_boxes[k]) for k in active if all_boxes[k] is not None]
        t_vals = [vals[k] for k, _ in t_list]
    else:
        t_boxes = bm.boxes(active, support_threshold(mask_threshold))
        t_list = [(k, b) for k, b in zip(active, t_boxes) if b is not None]
        t_vals = bm.values([k for k, _ in t_list], [b for _, b in t_list])
    next_instance = 1
    for (k, box), v in zip(t_list, t_vals):
        m = v > mask_threshold
        area = int(np.count_nonzero(m))
        if area == 0:
            continue
        free = ~view(filled, box)
        region = m & free
        kept_area = int(np.count_nonzero(region))
        if (area - kept_area) / area > overlap_threshold:
            continue
        counts[len(painted)] = paint(category, instance, filled, box, region, int(lab[k]), next_instance)
        painted.append((int(lab[k]), True, float(scores[k]), next_instance, k))
        next_instance += 1

    if with_stuff:
        # Per-class sums of score * mask (index_add_ adds the candidates in input order; a candidate adds exactly
        # 0 outside its non-zero support), then the first class with the largest positive sum per pixel.
        best = np.zeros(out_size, np.float32)
        sem = np.full(out_size, -1, np.int32)
        groups: dict[int, list[int]] = {}
        for k in live:  # input order within each class
            groups.setdefault(int(lab[k]), []).append(k)
        for c in sorted(groups):
            members = groups[c]
            if len(members) == 1:  # 0 + x = x: the class sum is the product itself
                union = all_boxes[members[0]]
                acc = s32[members[0]] * vals[members[0]]
            else:
                b = np.asarray([all_boxes[k] for k in members])
                union = (int(b[:, 0].min()), int(b[:, 1].max()), int(b[:, 2].min()), int(b[:, 3].max()))
                acc = np.zeros((union[1] - union[0], union[3] - union[2]), np.float32)
                for k in members:
                    y0, y1, x0, x1 = all_boxes[k]
                    part = acc[y0 - union[0]:y1 - union[0], x0 - union[2]:x1 - union[2]]
                    part += s32[k] * vals[k]
            sub = view(best, union)
            win = acc > sub  # best starts at 0: a class wins only with a positive sum (else void, as official)
            np.maximum(sub, acc, out=sub)
            np.copyto(view(sem, union), np.int32(c), where=win)
        free = ~filled
        area = np.bincount(sem[free & (sem >= num_things)], minlength=num_classes)
        for label in range(num_things, num_classes):
            if int(area[label]) < stuff_area_limit:
                continue
            np.copyto(category, np.int32(label), where=free & (sem == label))
            counts[len(painted)] = int(area[label])
            members = np.flatnonzero(lab == label)
            best_member = int(members[np.argmax(s32[members])])
            painted.append((label, False, float(scores[labels == label].max()), 0, best_member))
    return PanopticResult(category=category, instance=instance, segments=segments_from_counts(painted, counts))


# Method name (as on the command line) -> function; a plain dict, not a registry.
POST_PROCESSORS = {
    "m": mask_wise_merge,
    "p": pixel_argmax,
    "p*": maskformer_merge,
    "heuristic": heuristic_merge,
}


def post_process(
    method: str, cands: Candidates, num_things: int, out_size: tuple[int, int], **options: Any
) -> PanopticResult:
    """Dispatch on the command-line method name ("m", "p", "p*", "heuristic")."""
    try:
        fn = POST_PROCESSORS[method]
    except KeyError:
        raise ValueError(f"unknown post-processing method {method!r}; choose from {sorted(POST_PROCESSORS)}") from None
    return fn(cands, num_things, out_size, **options)
