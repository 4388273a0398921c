"""Panoptic metrics: Mask PQ and Boundary PQ (panopticapi / boundary-iou-api rules), instance AP.

Light on purpose (never torch; numpy only where needed): `harness eval-pq` starts fast.

- `pq_core`: options, category table, per-category counts and averages (no numpy);
- `pq`: the in-memory accumulator (`PQAccumulator`) and per-image scoring used by the engine;
- `pq_files`: the file-based evaluator behind `harness eval-pq` (same rules, compiled kernel);
- `native`: builds/loads the compiled kernel `csrc/png_pq.c`; `fastpng`: its numpy wrappers;
- `boundary`: boundary-iou-api's mask boundaries; `pngio`: PNG -> id map decoding;
- `ap`: instance AP with pycocotools and the panoptic -> instances converter;
- `report`: panopticapi-style tables.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PQAccumulator", "PQOptions", "panoptic_from_semantic", "summarize_stats"]


def __getattr__(name: str) -> Any:
    # Lazy: importing a submodule (e.g. pq_files) must not import numpy through this package.
    if name in ("PQAccumulator", "panoptic_from_semantic"):
        from harness.metrics import pq

        return getattr(pq, name)
    if name in ("PQOptions", "summarize_stats"):
        from harness.metrics import pq_core

        return getattr(pq_core, name)
    raise AttributeError(f"module 'harness.metrics' has no attribute {name!r}")
