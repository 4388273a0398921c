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
COCO), which costs seconds per image on a CPU. The implementations here give bit-identical results at a small
fraction of the cost:

- Masks are ReLU outputs: a resized mask can exceed a threshold only next to low-resolution pixels that exceed
  it, and it is exactly 0 away from non-zero ones. Each candidate is resized only inside that support box
  (`_BoxMasks`), with ``F.interpolate`` itself: PyTorch's generic CPU bilinear kernel is separable (a 1-d linear
  pass along W for each source row, then one along H for each column, each output element computed by the same
  float32 expression), so a W pass over the needed source rows and an H pass over the box's columns reproduce
  the 2-d kernel bit for bit on any CPU (with or without FMA). This is checked once per process on probes;
  any doubt (another kernel would run: output H + W <= 128, 3 candidates on one thread, channels-last input;
  non-finite values; a failed probe) falls back to the full-resolution definitions below (``_*_full``).
- "(m)" needs every candidate's rescored score only to sort the ones that get painted. A candidate whose upper
  bound ``score**alpha * (max mask value * slack)**beta`` is below its t_cnf can never be painted and is not
  resized at all. The others' scores use the official float32 expressions on the full (K,) vectors in the
  original order, and their masked sums are reduced by ``torch.sum`` over full-size (H, W) rows of a >= 2-row
  buffer (the same cascade-sum order, per row, as the official ``(K, H, W).sum((1, 2))``). When two painted
  candidates tie (``stable=False`` sort), every candidate's score is computed and the full vector sorted, as
  official.
- Overlap tests and painting work inside the boxes; segment areas are counted while painting.

``return_candidates=True`` ("(m)" only; ``harness predict --dump-raw``) takes the full-resolution path, which
also returns the sorted candidate list with full-resolution masks.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

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
    """

    category: np.ndarray
    instance: np.ndarray
    segments: list[dict[str, Any]] = field(default_factory=list)
    candidate_scores: np.ndarray | None = None
    candidate_labels: np.ndarray | None = None
    candidate_masks: np.ndarray | None = None


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


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------

# (label, isthing, score, instance, candidate index) of each painted segment, in painting order.
Painted = list[tuple[int, bool, float, int, int]]


def _resize(masks: Tensor, out_size: tuple[int, int]) -> Tensor:
    """(K, h, w) -> (K, H, W) float32, bilinear, align_corners=False (as `F.interpolate` in the official code)."""
    masks = masks.float()
    if tuple(masks.shape[-2:]) == tuple(out_size):
        return masks
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *out_size))
    return F.interpolate(masks[None], size=tuple(out_size), mode="bilinear", align_corners=False)[0]


def _empty_maps(out_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    return np.full(out_size, -1, dtype=np.int32), np.zeros(out_size, dtype=np.int32)


def _segment(label: int, isthing: bool, score: float, inst: int, area: int, candidate: int) -> dict[str, Any]:
    return {"label": int(label), "isthing": bool(isthing), "score": float(score), "instance": int(inst),
            "area": int(area), "candidate": int(candidate)}


def _segments_from_maps(category: np.ndarray, instance: np.ndarray, painted: Painted) -> list[dict[str, Any]]:
    """Segment list with the areas actually painted (full-resolution paths)."""
    segments = []
    for label, isthing, score, inst, cand in painted:
        if isthing:
            area = int(((category == label) & (instance == inst)).sum())
        else:
            area = int(((category == label) & (instance == 0)).sum())
        if area > 0:
            segments.append(_segment(label, isthing, score, inst, area, cand))
    return segments


def _segments_from_counts(painted: Painted, areas: dict[int, int]) -> list[dict[str, Any]]:
    """Segment list from pixel counts taken while painting (fast paths).

    ``areas`` maps a painted entry's position in ``painted`` to its pixel count for things; a stuff entry's area
    is the total over every entry of its label, which is what ``_segments_from_maps`` reads off the maps.
    """
    stuff_total: dict[int, int] = {}
    for i, (label, isthing, *_rest) in enumerate(painted):
        if not isthing:
            stuff_total[label] = stuff_total.get(label, 0) + areas.get(i, 0)
    segments = []
    for i, (label, isthing, score, inst, cand) in enumerate(painted):
        area = areas.get(i, 0) if isthing else stuff_total[label]
        if area > 0:
            segments.append(_segment(label, isthing, score, inst, area, cand))
    return segments


# ----------------------------------------------------------------------------------------------------------------
# Exact resizing inside boxes
# ----------------------------------------------------------------------------------------------------------------

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1), half-open, in output pixels


def _support_threshold(threshold: float) -> float:
    """A source threshold below ``threshold`` with margin: bilinear outputs are convex combinations of four
    source pixels (float32 weights summing to 1 within 1e-7), so an output > or >= ``threshold`` needs a source
    neighbour above this value."""
    return float(threshold) - 0.01 - 0.01 * abs(float(threshold))


def _approx_source_index(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear source indices (i0, i1) per output index, as PyTorch computes them up to +-1 (float64 here; the
    kernel's float32/FMA arithmetic may move ``floor`` by one at exact integers, which the box margins absorb)."""
    if n_in == n_out:
        idx = np.arange(n_out, dtype=np.int64)
        return idx, idx
    scale = float(np.float32(n_in) / np.float32(n_out))
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    return i0, np.minimum(i0 + 1, n_in - 1)


def _output_range(i0: np.ndarray, i1: np.ndarray, a: np.ndarray, b: np.ndarray, n_in: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Half-open ranges of output indices whose source pixels (true indices within +-1 of ``i0``/``i1``) may
    include any of ``a..b`` (element-wise over arrays of ranges)."""
    a, b = np.maximum(a - 1, 0), np.minimum(b + 1, n_in - 1)
    return np.searchsorted(i1, a, "left"), np.searchsorted(i0, b, "right")


class _BoxMasks:
    """Full-resolution values of single candidates inside boxes, bit-identical to
    ``F.interpolate(masks[None], out_size, mode="bilinear", align_corners=False)[0, k, y0:y1, x0:x1]``.

    The 2-d generic kernel computes ``t_r = x[r, j0] * a0 + x[r, j1] * a1`` along W for the two source rows of an
    output row, then ``t_r0 * b0 + t_r1 * b1`` (float32, contracted to FMAs on AVX builds). A 1-d ``linear``
    interpolation along W of the needed source rows, then one along H of the needed columns (with the unread
    source rows left at zero), evaluates the same expressions with the same index and weight tables
    (`_separable_is_exact` checks it once per process).

    Args:
        masks: (K, h, w) float32 low-resolution masks.
        out_size: (H, W).

    Attributes:
        vmax / vmin: (K,) float64 largest / smallest low-resolution value of each candidate.
    """

    # Elements per F.interpolate call (bounds the temporary memory).
    CHUNK = 1 << 22

    def __init__(self, masks: Tensor, out_size: tuple[int, int]) -> None:
        self.masks = masks
        self.h, self.w = int(masks.shape[-2]), int(masks.shape[-1])
        self.H, self.W = int(out_size[0]), int(out_size[1])
        self.identity = (self.h, self.w) == (self.H, self.W)
        self.vmax = masks.amax((1, 2)).double().numpy()
        self.vmin = masks.amin((1, 2)).double().numpy()
        self.nonneg = bool((self.vmin >= 0).all())
        self.r0, self.r1 = _approx_source_index(self.h, self.H)
        self.c0, self.c1 = _approx_source_index(self.w, self.W)

    def boxes(self, ks: list[int], above: float | None) -> list[Box | None]:
        """Output boxes holding every pixel where candidate ``ks[i]`` can exceed a threshold whose support
        threshold is ``above`` (see `_support_threshold`), or every non-zero pixel (``above=None``); None when
        there is none."""
        if not ks:
            return []
        sel = self.masks if len(ks) == self.masks.shape[0] and ks == list(range(len(ks))) else \
            self.masks[torch.as_tensor(ks, dtype=torch.long)]
        if above is None:  # non-zero support
            sel, above = (sel if self.nonneg else sel.abs()), 0.0
        rows, cols = (sel.amax(2) > above).numpy(), (sel.amax(1) > above).numpy()  # amax: 10x faster than any
        has = rows.any(1)
        r_first, r_last = rows.argmax(1), self.h - 1 - rows[:, ::-1].argmax(1)
        c_first, c_last = cols.argmax(1), self.w - 1 - cols[:, ::-1].argmax(1)
        y0, y1 = _output_range(self.r0, self.r1, r_first, r_last, self.h)
        x0, x1 = _output_range(self.c0, self.c1, c_first, c_last, self.w)
        ok = has & (y0 < y1) & (x0 < x1)
        return [(int(y0[i]), int(y1[i]), int(x0[i]), int(x1[i])) if ok[i] else None for i in range(len(ks))]

    def values(self, ks: list[int], boxes: list[Box]) -> list[np.ndarray]:
        """Float32 values of the resized candidates ``ks`` inside ``boxes``, **transposed**: ``(x1 - x0, y1 - y0)``
        (the H pass yields columns; the fast paths work on transposed maps to avoid copies)."""
        if self.identity:
            return [self.masks[k, y0:y1, x0:x1].numpy().T for k, (y0, y1, x0, x1) in zip(ks, boxes)]
        out: list[np.ndarray] = []
        start = 0
        while start < len(ks):
            stop, cost = start, 0
            while stop < len(ks) and (stop == start or cost < self.CHUNK):
                y0, y1, x0, x1 = boxes[stop]
                cost += (x1 - x0) * self.H + (self.r1[y1 - 1] - self.r0[y0] + 3) * self.W
                stop += 1
            out.extend(self._values(ks[start:stop], boxes[start:stop]))
            start = stop
        return out

    def _values(self, ks: list[int], boxes: list[Box]) -> list[np.ndarray]:
        # Source rows each box reads (true indices within +-1 of the approximate tables).
        rows = [(max(int(self.r0[y0]) - 1, 0), min(int(self.r1[y1 - 1]) + 1, self.h - 1)) for y0, y1, _, _ in boxes]
        src = torch.cat([self.masks[k, a:b + 1] for k, (a, b) in zip(ks, rows)])  # (sum R, w)
        if self.w != self.W:  # along W (identity tables when equal: the kernel returns the source values)
            src = F.interpolate(src[None], size=self.W, mode="linear", align_corners=False)[0]
        offsets = np.cumsum([0] + [b - a + 1 for a, b in rows])
        if self.h == self.H:
            return [src[offsets[i] + y0 - a:offsets[i] + y1 - a, x0:x1].numpy().T
                    for i, ((a, _), (y0, y1, x0, x1)) in enumerate(zip(rows, boxes))]
        # Along H, one column per box column. Boxes whose source row ranges do not overlap share columns (an
        # output row of a box reads only source rows in its own range), so the H pass computes little more than
        # the boxes' area: first fit into strips, in order of the first source row.
        strips: list[list[int]] = []  # [first column, width, last source row used]
        place = [0] * len(boxes)
        total = 0
        for i in sorted(range(len(boxes)), key=lambda i: rows[i][0]):
            nx = boxes[i][3] - boxes[i][2]
            fit = [s for s in strips if s[1] >= nx and s[2] < rows[i][0]]
            if fit:
                strip = min(fit, key=lambda s: s[1])
            else:
                strip = [total, nx, -1]
                strips.append(strip)
                total += nx
            strip[2] = rows[i][1]
            place[i] = strip[0]
        cols_in = src.new_zeros((total, self.h))  # unread source rows stay 0
        for i, ((a, b), (_, _, x0, x1)) in enumerate(zip(rows, boxes)):
            cols_in[place[i]:place[i] + x1 - x0, a:b + 1] = src[offsets[i]:offsets[i + 1], x0:x1].T
        full = F.interpolate(cols_in[None], size=self.H, mode="linear", align_corners=False)[0]  # (total, H)
        return [full[place[i]:place[i] + x1 - x0, y0:y1].numpy() for i, (y0, y1, x0, x1) in enumerate(boxes)]


@functools.lru_cache(maxsize=1)
def _separable_is_exact() -> bool:
    """Probe once per process that `_BoxMasks` reproduces ``F.interpolate`` bilinear bit for bit here."""
    gen = torch.Generator().manual_seed(0)
    for (h, w), (hh, ww) in (((23, 31), (157, 211)), ((40, 30), (40, 190)), ((37, 29), (301, 29)),
                              ((50, 67), (41, 95))):  # all with H + W > 128 (generic kernel)
        x = torch.rand((2, h, w), generator=gen) * (torch.rand((2, h, w), generator=gen) > 0.3)
        ref = F.interpolate(x[None], size=(hh, ww), mode="bilinear", align_corners=False)[0]
        bm = _BoxMasks(x, (hh, ww))
        full = (0, hh, 0, ww)
        sub = (hh // 5, hh - hh // 4, ww // 3, ww - ww // 7)
        got = bm.values([0, 1, 1], [full, full, sub])
        want = [ref[0], ref[1], ref[1, sub[0]:sub[1], sub[2]:sub[3]]]
        if not all(np.array_equal(g.T, r.numpy()) for g, r in zip(got, want)):
            return False
    return True


def _reference_kernel_is_generic(masks: Tensor, out_size: tuple[int, int]) -> bool:
    """Would ``F.interpolate(masks[None], out_size, bilinear)`` run the generic (separable) CPU kernel?

    Mirrors ``upsample_bilinear2d_kernel_impl_float`` (ATen ``UpSampleKernel.cpp``): the channels-last kernel
    (another float expression) runs for small outputs (H + W <= 128), channels-last inputs with more than 3
    channels, and 3 channels on one thread.
    """
    k = int(masks.shape[0])
    if out_size[0] + out_size[1] <= 128:
        return False
    if k > 3 and masks[None].is_contiguous(memory_format=torch.channels_last):
        return False
    return not (k == 3 and torch.get_num_threads() == 1)


def _fast_masks(cands: Candidates, out_size: tuple[int, int]) -> _BoxMasks | None:
    """The box resizer of the candidates when the exact fast path applies, else None (use the full-resolution
    definition)."""
    masks = cands.masks.float()
    k, h, w = masks.shape
    if k < 2 or h == 0 or w == 0 or out_size[0] <= 0 or out_size[1] <= 0 or masks.device.type != "cpu":
        return None
    if (h, w) != tuple(out_size) and not (_reference_kernel_is_generic(masks, out_size) and _separable_is_exact()):
        return None
    bm = _BoxMasks(masks, (int(out_size[0]), int(out_size[1])))
    # amax / amin propagate NaN and show infinities: finite extremes <=> finite values.
    if not (np.isfinite(bm.vmax).all() and np.isfinite(bm.vmin).all()
            and bool(torch.isfinite(cands.scores.float()).all())):
        return None
    return bm


def _tbox(a: np.ndarray, box: Box) -> np.ndarray:
    """The view of a transposed ``(W, H)`` map under an output box."""
    return a[box[2]:box[3], box[0]:box[1]]


def _paint(category_t: np.ndarray, instance_t: np.ndarray, filled_t: np.ndarray, box: Box, region_t: np.ndarray,
           label: int, inst: int) -> int:
    """Paint ``region_t`` (bool, transposed box) into the transposed maps; returns its pixel count."""
    _tbox(filled_t, box)[...] |= region_t
    np.copyto(_tbox(category_t, box), np.int32(label), where=region_t)
    if inst:
        np.copyto(_tbox(instance_t, box), np.int32(inst), where=region_t)
    return int(np.count_nonzero(region_t))


def _untranspose(*maps: np.ndarray) -> list[np.ndarray]:
    return [np.ascontiguousarray(m.T) for m in maps]


# ----------------------------------------------------------------------------------------------------------------
# (m) mask-wise merging
# ----------------------------------------------------------------------------------------------------------------


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
    """Mask-wise merging "(m)", exactly as the official code (see the module docstring).

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
    opts = dict(thing_threshold=thing_threshold, stuff_threshold=stuff_threshold, thing_overlap=thing_overlap,
                stuff_overlap=stuff_overlap, alpha=alpha, beta=beta, mask_threshold=mask_threshold,
                plus_one=plus_one, stable=stable)
    bm = None if return_candidates else _fast_masks(cands, out_size)
    if bm is None:
        return _mask_wise_merge_full(cands, num_things, out_size, **opts)
    result = _mask_wise_merge_fast(cands, bm, num_things, (int(out_size[0]), int(out_size[1])), **opts)
    return result if result is not None else _mask_wise_merge_full(cands, num_things, out_size, **opts)


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


def _mask_wise_merge_fast(
    cands: Candidates, bm: _BoxMasks, num_things: int, out_size: tuple[int, int], thing_threshold: float,
    stuff_threshold: float, thing_overlap: float, stuff_overlap: float, alpha: float, beta: float,
    mask_threshold: float, plus_one: bool, stable: bool,
) -> PanopticResult | None:
    """Box-restricted "(m)"; None when the full-resolution path must decide (NaN scores)."""
    k = bm.masks.shape[0]
    hh, ww = out_size
    scores = cands.scores.float()
    labels = cands.labels
    lab = labels.cpu().numpy().astype(np.int64)
    isthing = lab < num_things
    thr = np.where(isthing, thing_threshold, stuff_threshold).astype(np.float64)
    sup = _support_threshold(mask_threshold)
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
    view = buf.numpy()

    def compute(ks: list[int]) -> None:
        known[ks] = True
        bxs = bm.boxes(ks, sup)
        ks = [c for c, b in zip(ks, bxs) if b is not None]
        bxs = [b for b in bxs if b is not None]
        vals = bm.values(ks, bxs)
        for start in range(0, len(ks), 2):
            part = range(start, min(start + 2, len(ks)))
            for r, i in enumerate(part):
                y0, y1, x0, x1 = bxs[i]
                seg = vals[i] > mask_threshold  # transposed
                np.multiply(vals[i].T, seg.T, out=view[r, y0:y1, x0:x1])  # = masks * seg.float(), row-major
                boxes[ks[i]], segs[ks[i]] = bxs[i], seg
                count[ks[i]] = np.count_nonzero(seg)
            sums = buf.sum((1, 2)).numpy()
            for r, i in enumerate(part):
                y0, y1, x0, x1 = bxs[i]
                msum[ks[i]] = sums[r]
                view[r, y0:y1, x0:x1] = 0

    def rescore() -> np.ndarray:
        # The official expressions on full (K,) vectors in the input order (pow may be vectorised per lane).
        cnt = torch.from_numpy(count).float()
        mask_score = torch.from_numpy(msum) / (cnt + 1 if plus_one else cnt.clamp(min=1.0))
        return ((scores if alpha == 1.0 else scores**alpha) * mask_score**beta).numpy()

    compute(np.flatnonzero(touched & _may_reach(scores, vmax, thr, alpha, beta, mask_threshold, hh * ww)).tolist())
    rescored = rescore()
    contenders = np.flatnonzero(known & ~(rescored < thr) & (count > 0))
    values = rescored[contenders]
    if np.isnan(values).any():
        return None
    if stable or len(np.unique(values)) == len(values):
        order = contenders[torch.sort(torch.from_numpy(values), descending=True, stable=True).indices.numpy()]
    else:
        # Tied painted candidates: their order from an unstable sort depends on every value, as official.
        compute(np.flatnonzero(touched & ~known).tolist())
        rescored = rescore()
        full_order = torch.sort(torch.from_numpy(rescored), descending=True, stable=False).indices.numpy()
        is_contender = ~(rescored < thr) & (count > 0)
        order = full_order[is_contender[full_order]]

    filled = np.zeros((ww, hh), dtype=bool)  # transposed maps
    category, instance = _empty_maps((ww, hh))
    painted: Painted = []
    areas: dict[int, int] = {}
    next_instance = 1
    for c in order.tolist():
        box = boxes[c]
        seg = segs[c]
        free = ~_tbox(filled, box)
        inter = int(count[c]) - int(np.count_nonzero(seg & free))
        if inter / int(count[c]) > (thing_overlap if isthing[c] else stuff_overlap):
            continue
        region = seg & free
        score = float(rescored[c])
        if isthing[c]:
            areas[len(painted)] = _paint(category, instance, filled, box, region, int(lab[c]), next_instance)
            painted.append((int(lab[c]), True, score, next_instance, c))
            next_instance += 1
        else:
            areas[len(painted)] = _paint(category, instance, filled, box, region, int(lab[c]), 0)
            painted.append((int(lab[c]), False, score, 0, c))
    category, instance = _untranspose(category, instance)
    return PanopticResult(category=category, instance=instance, segments=_segments_from_counts(painted, areas))


def _mask_wise_merge_full(
    cands: Candidates, num_things: int, out_size: tuple[int, int], thing_threshold: float = 0.25,
    stuff_threshold: float = 0.25, thing_overlap: float = 0.4, stuff_overlap: float = 0.2, alpha: float = 1.0,
    beta: float = 2.0, mask_threshold: float = 0.5, plus_one: bool = True, stable: bool = False,
) -> PanopticResult:
    """The full-resolution definition of "(m)" (every candidate resized to ``out_size``), with the sorted list."""
    masks = _resize(cands.masks, out_size)
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
    category, instance = _empty_maps(out_size)
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
        segments=_segments_from_maps(category, instance, painted),
        candidate_scores=rescored.numpy().astype(np.float32),
        candidate_labels=labels.numpy().astype(np.int64),
        candidate_masks=masks.numpy().astype(np.float32, copy=False),
    )


# ----------------------------------------------------------------------------------------------------------------
# (p) pixel-wise argmax
# ----------------------------------------------------------------------------------------------------------------


def _empty_result(out_size: tuple[int, int]) -> PanopticResult:
    category, instance = _empty_maps(out_size)
    return PanopticResult(category=category, instance=instance)


def _argmax_in_boxes(out_size: tuple[int, int], positions: list[int], boxes: list[Box], vals: list[np.ndarray],
                     init: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel maximum over candidates given inside boxes (in ascending ``positions``), and the position of the
    first maximal one (``torch.max(dim=0)``'s rule); pixels no candidate beats ``init`` keep ``(init, 0)``.
    ``out_size`` and ``vals`` are transposed, like the returned maps."""
    best = np.full(out_size, init, dtype=np.float32)
    ids = np.zeros(out_size, dtype=np.int32)
    for j, box, v in zip(positions, boxes, vals):
        sub = _tbox(best, box)
        win = v > sub  # strict: an earlier candidate keeps a tie
        np.maximum(sub, v, out=sub)  # = v where win, else sub (equal values on ties)
        np.copyto(_tbox(ids, box), np.int32(j), where=win)
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
        return _pixel_argmax_full(cands, num_things, out_size, score_threshold, mask_threshold, min_area)
    out_size = (int(out_size[0]), int(out_size[1]))
    kept = [int(k) for k in torch.nonzero(cands.scores >= score_threshold).flatten()]
    if not kept:
        return _empty_result(out_size)
    # Only candidates with a pixel >= mask_threshold can win a valid pixel; the others win none, are removed as
    # "small" in the first round and change nothing else.
    sup = _support_threshold(mask_threshold)
    kept = [k for k in kept if bm.vmax[k] > sup]
    boxes = bm.boxes(kept, sup)
    kept = [k for k, b in zip(kept, boxes) if b is not None]
    boxes = [b for b in boxes if b is not None]
    vals = bm.values(kept, boxes)
    if not kept:
        return _empty_result(out_size)
    n = len(kept)
    best, ids = _argmax_in_boxes(out_size[::-1], list(range(n)), boxes, vals, -np.inf)
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
        lost_x, lost_y = [], []
        for j in np.flatnonzero(small):
            lx, ly = np.nonzero((_tbox(ids, boxes[j]) == j) & _tbox(valid, boxes[j]))
            lost_x.append(lx + boxes[j][2])
            lost_y.append(ly + boxes[j][0])
        areas[small] = 0
        xs, ys = np.concatenate(lost_x), np.concatenate(lost_y)
        new_best = np.full(len(xs), -np.inf, np.float32)
        new_ids = np.zeros(len(xs), np.int32)
        for j in np.flatnonzero(alive):
            y0, y1, x0, x1 = boxes[j]
            inside = np.flatnonzero((xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1))
            if inside.size:
                v = vals[j][xs[inside] - x0, ys[inside] - y0]
                win = v > new_best[inside]
                new_best[inside[win]] = v[win]
                new_ids[inside[win]] = j
        best[xs, ys], ids[xs, ys] = new_best, new_ids
        won = new_best >= mask_threshold
        valid[xs, ys] = won
        areas += np.bincount(new_ids[won], minlength=n)

    labels, scores = cands.labels, cands.scores
    lut_cat = np.full(len(kept), -1, np.int32)
    lut_inst = np.zeros(len(kept), np.int32)
    painted: Painted = []
    counts: dict[int, int] = {}
    stuff_done: set[int] = set()
    next_instance = 1
    for j in sorted(np.flatnonzero(alive).tolist(), key=lambda j: -float(scores[kept[j]])):
        if areas[j] == 0:
            continue
        k = kept[j]
        label = int(labels[k])
        lut_cat[j] = label
        if label < num_things:
            lut_inst[j] = next_instance
            counts[len(painted)] = int(areas[j])
            painted.append((label, True, float(scores[k]), next_instance, k))
            next_instance += 1
        else:
            if label not in stuff_done:
                stuff_done.add(label)
                painted.append((label, False, float(scores[k]), 0, k))
            idx = next(i for i, p in enumerate(painted) if p[0] == label and not p[1])
            counts[idx] = counts.get(idx, 0) + int(areas[j])
    # One code per pixel (n = void), transposed back once, then looked up.
    code = np.ascontiguousarray(np.where(valid, ids, np.int32(n)).T)
    category = np.append(lut_cat, np.int32(-1))[code]
    instance = np.append(lut_inst, np.int32(0))[code]
    return PanopticResult(category=category, instance=instance, segments=_segments_from_counts(painted, counts))


def _paint_ids(
    ids: Tensor, kept: list[int], labels: Tensor, scores: Tensor, num_things: int, valid: Tensor
) -> tuple[np.ndarray, np.ndarray, Painted]:
    """Paint per-pixel winner ids (index into `kept`) into category/instance maps.

    Things get instance numbers in descending score order; stuff of one class shares one segment.
    """
    category, instance = _empty_maps(tuple(ids.shape))
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


def _pixel_argmax_full(cands: Candidates, num_things: int, out_size: tuple[int, int], score_threshold: float,
                       mask_threshold: float, min_area: int) -> PanopticResult:
    """The full-resolution definition of "(p)"."""
    masks = _resize(cands.masks, out_size)
    kept = [int(k) for k in torch.nonzero(cands.scores >= score_threshold).flatten()]
    while True:
        if not kept:
            return _empty_result(out_size)
        values, ids = masks[kept].max(0)
        valid = values >= mask_threshold
        areas = torch.bincount(ids[valid], minlength=len(kept)).tolist()
        small = [k for k, a in zip(kept, areas) if a <= min_area]
        if not small:
            break
        kept = [k for k in kept if k not in small]
    category, instance, painted = _paint_ids(ids, kept, cands.labels, cands.scores, num_things, valid)
    return PanopticResult(
        category=category, instance=instance, segments=_segments_from_maps(category, instance, painted)
    )


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
        return _maskformer_merge_full(cands, num_things, out_size, object_mask_threshold, overlap_threshold,
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
    _, ids = _argmax_in_boxes(out_size[::-1], pos, [boxes[j] for j in pos], probs, 0.0)
    mask_area = np.bincount(ids.ravel(), minlength=len(kept))
    original_area = np.zeros(len(kept), np.int64)
    for j, v in zip(pos, vals):
        original_area[j] = np.count_nonzero(v >= mask_threshold)

    lut_cat = np.full(len(kept), -1, np.int32)
    lut_inst = np.zeros(len(kept), np.int32)
    painted: Painted = []
    counts: dict[int, int] = {}
    stuff_entry: dict[int, int] = {}
    next_instance = 1
    for j, k in enumerate(kept):
        label = int(cands.labels[k])
        if mask_area[j] == 0 or original_area[j] == 0:
            continue
        if mask_area[j] / original_area[j] < overlap_threshold:
            continue
        lut_cat[j] = label
        if label < num_things:
            lut_inst[j] = next_instance
            counts[len(painted)] = int(mask_area[j])
            painted.append((label, True, float(cands.scores[k]), next_instance, k))
            next_instance += 1
        else:
            if label not in stuff_entry:
                stuff_entry[label] = len(painted)
                painted.append((label, False, float(cands.scores[k]), 0, k))
            counts[stuff_entry[label]] = counts.get(stuff_entry[label], 0) + int(mask_area[j])
    category, instance = _untranspose(lut_cat[ids], lut_inst[ids])
    return PanopticResult(category=category, instance=instance, segments=_segments_from_counts(painted, counts))


def _maskformer_merge_full(cands: Candidates, num_things: int, out_size: tuple[int, int],
                           object_mask_threshold: float, overlap_threshold: float, mask_threshold: float
                           ) -> PanopticResult:
    """The full-resolution definition of "(p*)"."""
    masks = _resize(cands.masks, out_size)
    category, instance = _empty_maps(out_size)
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
        category=category, instance=instance, segments=_segments_from_maps(category, instance, painted)
    )


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
        return _heuristic_merge_full(cands, num_things, out_size, *args)
    out_size = (int(out_size[0]), int(out_size[1]))
    scores, labels = cands.scores.float(), cands.labels
    lab = labels.cpu().numpy().astype(np.int64)
    s32 = scores.numpy()
    tsize = out_size[::-1]  # transposed maps
    category, instance = _empty_maps(tsize)
    filled = np.zeros(tsize, dtype=bool)
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
        t_boxes = bm.boxes(active, _support_threshold(mask_threshold))
        t_list = [(k, b) for k, b in zip(active, t_boxes) if b is not None]
        t_vals = bm.values([k for k, _ in t_list], [b for _, b in t_list])
    next_instance = 1
    for (k, box), v in zip(t_list, t_vals):
        m = v > mask_threshold
        area = int(np.count_nonzero(m))
        if area == 0:
            continue
        free = ~_tbox(filled, box)
        region = m & free
        kept_area = int(np.count_nonzero(region))
        if (area - kept_area) / area > overlap_threshold:
            continue
        counts[len(painted)] = _paint(category, instance, filled, box, region, int(lab[k]), next_instance)
        painted.append((int(lab[k]), True, float(scores[k]), next_instance, k))
        next_instance += 1

    if with_stuff:
        # Per-class sums of score * mask (index_add_ adds the candidates in input order; a candidate adds exactly
        # 0 outside its non-zero support), then the first class with the largest positive sum per pixel.
        best = np.zeros(tsize, np.float32)
        sem = np.full(tsize, -1, np.int32)
        for c in sorted(set(lab[live].tolist())):
            members = [k for k in live if lab[k] == c]
            union = (min(all_boxes[k][0] for k in members), max(all_boxes[k][1] for k in members),
                     min(all_boxes[k][2] for k in members), max(all_boxes[k][3] for k in members))
            if len(members) == 1:  # 0 + x = x: the class sum is the product itself
                acc = s32[members[0]] * vals[members[0]]
            else:
                acc = np.zeros((union[3] - union[2], union[1] - union[0]), np.float32)
                for k in members:
                    y0, y1, x0, x1 = all_boxes[k]
                    part = acc[x0 - union[2]:x1 - union[2], y0 - union[0]:y1 - union[0]]
                    part += s32[k] * vals[k]
            sub = _tbox(best, union)
            win = acc > sub  # best starts at 0: a class wins only with a positive sum (else void, as official)
            np.maximum(sub, acc, out=sub)
            np.copyto(_tbox(sem, union), np.int32(c), where=win)
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
    category, instance = _untranspose(category, instance)
    return PanopticResult(category=category, instance=instance, segments=_segments_from_counts(painted, counts))


def _heuristic_merge_full(cands: Candidates, num_things: int, out_size: tuple[int, int],
                          instance_score_threshold: float, overlap_threshold: float, stuff_area_limit: int,
                          mask_threshold: float) -> PanopticResult:
    """The full-resolution definition of the heuristic."""
    masks = _resize(cands.masks, out_size)
    scores, labels = cands.scores.float(), cands.labels
    category, instance = _empty_maps(out_size)
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
        category=category, instance=instance, segments=_segments_from_maps(category, instance, painted)
    )


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
