"""Score in-memory predictions against a data set's GT without writing PNGs (eval grids, sweeps).

The GT of one image is its :class:`harness.data.coco_panoptic.PanopticSample`; a prediction is a
:class:`models.postprocess.PanopticResult` (contiguous class index per pixel + instance numbers). Both go through
the same :class:`harness.metrics.pq.PQAccumulator` as ``harness eval-pq``, so the numbers equal those of the PNG
round trip (panopticapi) exactly.
"""

from __future__ import annotations

from typing import Any, Sequence

from harness.data.coco_panoptic import PanopticSample
from harness.metrics.pq import PQAccumulator, panoptic_from_semantic
from models.postprocess import PanopticResult

__all__ = ["gt_segments", "add_prediction"]


def gt_segments(sample: PanopticSample) -> list[dict[str, Any]]:
    """The GT ``segments_info`` of a sample as the PQ code reads it (id, category_id, iscrowd, area)."""
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
