"""Mask-wise merging "(m)" on box-restricted masks: the fast path of `models.postprocess.mask_wise_merge`, and
`mask_wise_trace`, the same merge with its working shown (which candidates it tried, in which order, with which
binary masks, and which pixels each painted; thing-preference statistics count exactly these).

The merge is the official one (see `models.postprocess`); ``models.postprocess_full.mask_wise_merge_full`` is its
full-resolution definition, which runs whenever the box path cannot guarantee the same bits (`exact_box_masks`).
Here:

- A candidate whose upper bound ``score**alpha * (max mask value * slack)**beta`` is below its t_cnf can never be
  painted and is not resized at all (`_may_reach`). The others' scores use the official float32 expressions on the
  full (K,) vectors in the input order, and their masked sums are reduced by ``torch.sum`` over full-size (H, W)
  rows of a 2-row buffer (the official ``(K, H, W).sum((1, 2))`` cascade order, row by row). When two tried
  candidates tie (``stable=False`` sort), every candidate's score is computed and the whole vector sorted, as
  official.
- Overlap tests and painting work inside the boxes; segment areas are counted while painting.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from models.box_resize import Box, BoxMasks, exact_box_masks, paint, support_threshold, view
from models.candidates import Candidates, Painted, PanopticResult, empty_maps, segments_from_counts
from models.postprocess_full import mask_wise_merge_full

__all__ = ["MaskWiseOptions", "MaskWiseTrace", "mask_wise_merge", "mask_wise_trace"]


@dataclass(frozen=True)
class MaskWiseOptions:
    """The settings of "(m)" (the keyword arguments of `mask_wise_merge`, same meaning and defaults: R50's)."""

    thing_threshold: float = 0.25
    stuff_threshold: float = 0.25
    thing_overlap: float = 0.4
    stuff_overlap: float = 0.2
    alpha: float = 1.0
    beta: float = 2.0
    mask_threshold: float = 0.5
    plus_one: bool = True
    stable: bool = False


@dataclass
class MaskWiseTrace:
    """What "(m)" did on one image.

    Attributes:
        index: (N,) int64 input positions of the candidates it tried (rescored score >= t_cnf and a non-empty binary
            mask), in the order it tried them (descending rescored score, the official sort).
        scores: (N,) float32 their rescored scores.
        boxes: N output boxes ``(y0, y1, x0, x1)``, each holding the candidate's binary mask.
        masks: N bool ``(y1 - y0, x1 - x0)`` binary masks (resized mask > mask_threshold) inside the boxes.
        painted: N bool masks in the same boxes: the pixels each candidate painted; None where the overlap test
            skipped it (an accepted candidate may paint no pixel when an overlap threshold is >= 1).
        result: the merged panoptic map (that of `mask_wise_merge`, without the candidate list).
    """

    index: np.ndarray
    scores: np.ndarray
    boxes: list[Box]
    masks: list[np.ndarray]
    painted: list[np.ndarray | None] = dataclasses.field(default_factory=list)
    result: PanopticResult | None = None


def mask_wise_merge(
    cands: Candidates,
    num_things: int,
    out_size: tuple[int, int],
    thing_threshold: float = 0.25,
    stuff_threshold: float = 0.25,
    thing_overlap: float = 0.4,
    stuff_overlap: float = 0.2,
    alpha: float = 1.0,
    beta: float = 2.0,
    mask_threshold: float = 0.5,
    plus_one: bool = True,
    stable: bool = False,
    return_candidates: bool = False,
) -> PanopticResult:
    """Mask-wise merging "(m)", exactly as the official code (see the `models.postprocess` docstring).

    Args:
        cands: candidates with K masks (K, h, w).
        num_things: labels below this are things.
        out_size: (H, W) of the output (the original image size).
        thing_threshold / stuff_threshold: t_cnf; a candidate is skipped when its rescored score is
            strictly below it.
        thing_overlap / stuff_overlap: a candidate is skipped when |mask ∩ painted| / |mask| is strictly
            above it (or its mask is empty).
        alpha / beta: exponents of the class score and of the mask score (Eq. 6; Table B.3).
        mask_threshold: binarisation threshold of the raw mask values.
        plus_one: official "+1" in the mask-score denominator; False gives the paper's plain mean.
        stable: stable sort (ties keep the input order, things first). Default False, as official.
        return_candidates: also return the sorted candidate list (scores, labels, full-resolution masks); this
            takes the full-resolution path (seconds per COCO image on a CPU).

    Returns:
        PanopticResult (with the sorted candidate list when ``return_candidates``).
    """
    opts = MaskWiseOptions(thing_threshold, stuff_threshold, thing_overlap, stuff_overlap, alpha, beta,
                           mask_threshold, plus_one, stable)
    trace = None if return_candidates else _fast_trace(cands, num_things, out_size, opts)
    if trace is None:
        return mask_wise_merge_full(cands, num_things, out_size, **dataclasses.asdict(opts))
    assert trace.result is not None
    return trace.result


def mask_wise_trace(cands: Candidates, num_things: int, out_size: tuple[int, int],
                    options: MaskWiseOptions | None = None) -> MaskWiseTrace:
    """"(m)" with its working shown (see `MaskWiseTrace`); its ``result`` equals `mask_wise_merge`'s maps and
    segments. Where the box path does not apply, the candidates are ranked by the full-resolution definition."""
    opts = options or MaskWiseOptions()
    trace = _fast_trace(cands, num_things, out_size, opts)
    if trace is None:
        trace = _full_ranking(cands, num_things, out_size, opts)
        _paint(trace, cands.labels.cpu().numpy().astype(np.int64), num_things, (int(out_size[0]), int(out_size[1])),
               opts)
    return trace


def _fast_trace(cands: Candidates, num_things: int, out_size: tuple[int, int], opts: MaskWiseOptions
                ) -> MaskWiseTrace | None:
    """The box-restricted merge, or None when the full-resolution path must decide."""
    bm = exact_box_masks(cands.masks, cands.scores, out_size)
    if bm is None:
        return None
    size = (int(out_size[0]), int(out_size[1]))
    lab = cands.labels.cpu().numpy().astype(np.int64)
    trace = _fast_ranking(cands.scores.float(), lab, bm, num_things, size, opts)
    if trace is not None:
        _paint(trace, lab, num_things, size, opts)
    return trace


def _may_reach(scores: Tensor, vmax: np.ndarray, thr: np.ndarray, alpha: float, beta: float,
               mask_threshold: float, hw: int) -> np.ndarray:
    """(K,) bool: False where the rescored score provably stays below its threshold.

    s_mask is a mean of values above ``mask_threshold`` (>= 0), each at most the candidate's largest
    low-resolution value (bilinear weights are convex, float32 rounding < 1e-6), and float32 summation of n
    non-negative terms errs by at most (1 + 2^-23)^n; 0.1 % more covers division, powers and the product.
    """
    k = len(vmax)
    if not beta > 0 or not mask_threshold >= 0 or not math.isfinite(alpha) or not math.isfinite(beta):
        return np.ones(k, bool)
    s = scores.double().numpy()
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        f = s if alpha == 1.0 else s**alpha
        ub = f * (np.maximum(vmax, 0.0) * math.exp((hw + 16) * 2.0**-23) * 1.001) ** beta
    return ~(ub < thr - np.abs(thr) * 1e-3)


def _fast_ranking(scores: Tensor, lab: np.ndarray, bm: BoxMasks, num_things: int, out_size: tuple[int, int],
                  o: MaskWiseOptions) -> MaskWiseTrace | None:
    """The tried candidates in order, from box-restricted masks; None when NaN rescored scores need the
    full-resolution path."""
    k = bm.masks.shape[0]
    hh, ww = out_size
    thr = np.where(lab < num_things, o.thing_threshold, o.stuff_threshold).astype(np.float64)
    sup = support_threshold(o.mask_threshold)
    vmax = bm.vmax
    # Candidates without a low-resolution value above `sup` have no pixel above mask_threshold: sum 0, count 0.
    touched = vmax > sup
    msum = np.zeros(k, np.float32)
    count = np.zeros(k, np.int64)
    known = ~touched
    boxes: dict[int, Box] = {}
    segs: dict[int, np.ndarray] = {}
    # A zero buffer of two full-size rows: a candidate's masked values go in its box and torch sums whole rows,
    # which reproduces the official (K, H, W).sum((1, 2)) row by row (a 1-row sum may be split across threads;
    # two rows never are). Boxes are re-zeroed after use.
    buf = torch.zeros((2, hh, ww))
    buf_np = buf.numpy()

    def compute(ks: list[int]) -> None:
        known[ks] = True
        bxs = bm.boxes(ks, sup)
        ks = [c for c, b in zip(ks, bxs) if b is not None]
        bxs = [b for b in bxs if b is not None]
        vals = bm.values(ks, bxs)
        for start in range(0, len(ks), 2):
            part = range(start, min(start + 2, len(ks)))
            for r, i in enumerate(part):
                seg = vals[i] > o.mask_threshold
                np.multiply(vals[i], seg, out=view(buf_np[r], bxs[i]))  # = masks * seg.float()
                boxes[ks[i]], segs[ks[i]] = bxs[i], seg
                count[ks[i]] = np.count_nonzero(seg)
            sums = buf.sum((1, 2)).numpy()
            for r, i in enumerate(part):
                msum[ks[i]] = sums[r]
                view(buf_np[r], bxs[i])[...] = 0

    def rescore() -> np.ndarray:
        # The official expressions on full (K,) vectors in the input order (pow may be vectorised per lane).
        cnt = torch.from_numpy(count).float()
        mask_score = torch.from_numpy(msum) / (cnt + 1 if o.plus_one else cnt.clamp(min=1.0))
        return ((scores if o.alpha == 1.0 else scores**o.alpha) * mask_score**o.beta).numpy()

    compute(np.flatnonzero(touched & _may_reach(scores, vmax, thr, o.alpha, o.beta, o.mask_threshold, hh * ww))
            .tolist())
    rescored = rescore()
    contenders = np.flatnonzero(known & ~(rescored < thr) & (count > 0))
    values = rescored[contenders]
    if np.isnan(values).any():
        return None
    if o.stable or len(np.unique(values)) == len(values):
        order = contenders[torch.sort(torch.from_numpy(values), descending=True, stable=True).indices.numpy()]
    else:
        # Tied tried candidates: their order from an unstable sort depends on every value, as official.
        compute(np.flatnonzero(touched & ~known).tolist())
        rescored = rescore()
        full_order = torch.sort(torch.from_numpy(rescored), descending=True, stable=False).indices.numpy()
        is_contender = ~(rescored < thr) & (count > 0)
        order = full_order[is_contender[full_order]]
    return MaskWiseTrace(index=order.astype(np.int64), scores=rescored[order], boxes=[boxes[c] for c in order],
                         masks=[segs[c] for c in order])


def _full_ranking(cands: Candidates, num_things: int, out_size: tuple[int, int], o: MaskWiseOptions
                  ) -> MaskWiseTrace:
    """The tried candidates in order, read off the full-resolution definition's sorted candidate list."""
    full = mask_wise_merge_full(cands, num_things, out_size, **dataclasses.asdict(o))
    assert full.candidate_masks is not None and full.candidate_scores is not None
    assert full.candidate_labels is not None and full.candidate_index is not None
    thr = np.where(full.candidate_labels < num_things, o.thing_threshold, o.stuff_threshold)
    seg = full.candidate_masks > o.mask_threshold
    tried = np.flatnonzero(~(full.candidate_scores < thr) & seg.any((1, 2)))
    boxes: list[Box] = []
    for i in tried:
        rows, cols = np.flatnonzero(seg[i].any(1)), np.flatnonzero(seg[i].any(0))
        boxes.append((int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1))
    return MaskWiseTrace(index=full.candidate_index[tried], scores=full.candidate_scores[tried], boxes=boxes,
                         masks=[view(seg[i], b) for i, b in zip(tried, boxes)])


def _paint(trace: MaskWiseTrace, lab: np.ndarray, num_things: int, out_size: tuple[int, int],
           o: MaskWiseOptions) -> None:
    """Paint the tried candidates in order (overlap test inside the boxes); fills ``painted`` and ``result``."""
    filled = np.zeros(out_size, dtype=bool)
    category, instance = empty_maps(out_size)
    painted: Painted = []
    areas: dict[int, int] = {}
    next_instance = 1
    trace.painted = []
    for c, score, box, seg in zip(trace.index.tolist(), trace.scores.tolist(), trace.boxes, trace.masks):
        isthing = bool(lab[c] < num_things)
        count = int(np.count_nonzero(seg))
        free = ~view(filled, box)
        region = seg & free
        if (count - int(np.count_nonzero(region))) / count > (o.thing_overlap if isthing else o.stuff_overlap):
            trace.painted.append(None)
            continue
        inst = next_instance if isthing else 0
        areas[len(painted)] = paint(category, instance, filled, box, region, int(lab[c]), inst)
        painted.append((int(lab[c]), isthing, score, inst, c))
        next_instance += isthing
        trace.painted.append(region)
    trace.result = PanopticResult(category=category, instance=instance, segments=segments_from_counts(painted, areas))
