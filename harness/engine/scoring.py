"""Score in-memory predictions against a data set's GT without writing PNGs (eval grids, sweeps).

The GT of one image is its :class:`harness.data.coco_panoptic.PanopticSample`; a prediction is a
:class:`models.postprocess.PanopticResult` (contiguous class index per pixel + instance numbers). Both go through
the same PQ code as ``harness eval-pq`` (:func:`harness.metrics.pq.score_image`), so the numbers equal those of the
PNG round trip (panopticapi).

* :func:`add_prediction` adds an image into a running :class:`harness.metrics.pq.PQAccumulator` (sweeps);
* :func:`image_stats` returns one image's own statistics, which the eval grid sums exactly across images and
  processes (:mod:`harness.engine.grid_stats`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from harness.data.coco_panoptic import PanopticSample
from harness.metrics.pq import (
    CategoryTable,
    PQAccumulator,
    PQOptions,
    PQStats,
    panoptic_from_semantic,
    score_image,
)
from models.postprocess import PanopticResult

__all__ = ["gt_segments", "add_prediction", "image_stats"]


def gt_segments(sample: PanopticSample) -> list[dict[str, Any]]:
    """The GT ``segments_info`` of a sample as the PQ code reads it (id, category_id, iscrowd, area).

    An area of -1 (absent from the JSON) makes the PQ code count the GT PNG's pixels instead.
    """
    return [{"id": s.id, "category_id": s.category_id, "iscrowd": int(s.iscrowd), "area": s.area}
            for s in sample.segments]


def add_prediction(acc: PQAccumulator, sample: PanopticSample, result: PanopticResult,
                   category_ids: Sequence[int]) -> None:
    """Score one image's prediction into ``acc``.

    Args:
        acc: the accumulator (built with the GT JSON's categories).
        sample: the GT image (its ``id_map`` and ``segments``).
        result: the prediction at the sample's size (``category`` -1 = void).
        category_ids: data set category id per contiguous class index (``CategoryMap.ids``).
    """
    if result.category.shape != sample.id_map.shape:
        raise ValueError(f"image {sample.image_id}: prediction {result.category.shape} and GT "
                         f"{sample.id_map.shape} differ in size")
    pred_ids, pred_segments = panoptic_from_semantic(result.category, result.instance, category_ids)
    acc.add(sample.id_map, gt_segments(sample), pred_ids, pred_segments, sample.image_id)


def image_stats(table: CategoryTable, options: PQOptions, sample: PanopticSample, pred_ids: np.ndarray,
                pred_segments: Sequence[dict[str, Any]]) -> tuple[PQStats, PQStats | None]:
    """One image's Mask PQ (and, with ``options.boundary``, Boundary PQ) statistics, from zero.

    Args:
        table / options: from the run's ``PQAccumulator`` (GT categories, what to compute).
        sample: the GT image.
        pred_ids: (H, W) predicted segment ids (`harness.metrics.pq.panoptic_from_semantic`).
        pred_segments: their ``segments_info``.

    Returns:
        ``(mask statistics, boundary statistics or None)``.
    """
    if pred_ids.shape != sample.id_map.shape:
        raise ValueError(f"image {sample.image_id}: prediction {pred_ids.shape} and GT "
                         f"{sample.id_map.shape} differ in size")
    mask = PQStats(len(table))
    boundary = PQStats(len(table)) if options.boundary else None
    score_image(sample.id_map, gt_segments(sample), pred_ids, pred_segments, table, options, mask, boundary,
                sample.image_id)
    return mask, boundary
