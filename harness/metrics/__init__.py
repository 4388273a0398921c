"""Panoptic metrics: Mask PQ and Boundary PQ (panopticapi / boundary-iou-api rules), instance AP.

Light on purpose (numpy only, never torch): `harness eval-pq` starts fast.

- `pq`: the in-memory accumulator (`PQAccumulator`) and per-image scoring used by the engine;
- `pq_files`: the file-based evaluator behind `harness eval-pq` (same implementation);
- `boundary`: boundary-iou-api's mask boundaries; `pngio`: fast PNG -> id map decoding;
- `ap`: instance AP with pycocotools and the panoptic -> instances converter;
- `report`: panopticapi-style tables.
"""

from harness.metrics.pq import PQAccumulator, PQOptions, panoptic_from_semantic, summarize_stats

__all__ = ["PQAccumulator", "PQOptions", "panoptic_from_semantic", "summarize_stats"]
