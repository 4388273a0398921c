"""Exactly mergeable statistics of a grid cell: the same numbers from 1 process, N processes, or N shards.

Integer counts (TP, FP, FN per class) add exactly in any order. The per-class IoU sum is a float sum, and float
addition is not associative, so a run split over processes would otherwise depend on how images were grouped.
Rule used everywhere (1 process included):

* each image is scored on its own (a fresh :class:`harness.metrics.pq.PQStats`), giving per class the image's IoU
  sum ``v`` as the PQ code adds it (matches in (GT id, predicted id) order, as panopticapi);
* the class total is the exact sum of those per-image values: each ``v`` is converted to the integer ``v * 2**1074``
  (exact for every finite double), integers add exactly, and the total is rounded to the nearest double once
  (Python's int / int division is correctly rounded) -- the same value as ``math.fsum`` of the per-image values.

So merging is integer addition: associative and commutative, independent of process count, shard count and image
order. Compared with panopticapi's running float sum the class totals can differ in the last bit or two (its own
result depends on its worker count); PQ values agree to ~1e-15.

Instance AP (``--ap``) is evaluated by pycocotools on all detections of a cell, sorted by the image's position in
``RUN/image_ids.json`` (then by the image's own order), so the detection list -- and COCOeval's result -- does not
depend on which process scored which image either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from harness.engine.grid_config import Cell
from harness.errors import UserError
from harness.metrics.pq import PQStats

__all__ = ["ExactPQ", "RowScore", "ImageScore", "RowState", "CellState", "row_key"]

SCALE_BITS = 1074  # 2**-1074 is the smallest positive double: every finite double is a multiple of it
_ONE = 1 << SCALE_BITS


def _exact(value: float) -> int:
    """``value * 2**1074`` as an exact integer."""
    num, den = float(value).as_integer_ratio()  # den is a power of two <= 2**1074
    return num * (_ONE // den)


def row_key(post_process: str, layer: str) -> str:
    """Key of a results row within a cell: ``m|last``."""
    return f"{post_process}|{layer}"


class ExactPQ:
    """Per-class TP / FP / FN (int64) and exactly summed IoU of one results row (see the module docstring)."""

    def __init__(self, num_classes: int) -> None:
        self.tp = np.zeros(num_classes, np.int64)
        self.fp = np.zeros(num_classes, np.int64)
        self.fn = np.zeros(num_classes, np.int64)
        self.iou: dict[int, int] = {}  # class index -> sum * 2**1074 (classes with a match only)

    @property
    def num_classes(self) -> int:
        return len(self.tp)

    def add(self, stats: PQStats) -> None:
        """Add one image's statistics (a fresh `PQStats` filled by the PQ code for that image alone)."""
        self.tp += stats.tp
        self.fp += stats.fp
        self.fn += stats.fn
        for c in np.flatnonzero(stats.iou).tolist():
            self.iou[c] = self.iou.get(c, 0) + _exact(stats.iou[c])

    def merge(self, other: "ExactPQ") -> None:
        """Add another row's statistics (exact)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge statistics of {other.num_classes} and {self.num_classes} classes")
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        for c, v in other.iou.items():
            self.iou[c] = self.iou.get(c, 0) + v

    def to_pq_stats(self) -> PQStats:
        """The totals as a `PQStats` (IoU sums rounded to the nearest double once)."""
        out = PQStats(self.num_classes)
        out.tp[:] = self.tp
        out.fp[:] = self.fp
        out.fn[:] = self.fn
        for c, v in self.iou.items():
            out.iou[c] = v / _ONE  # int / int: correctly rounded
        return out

    def to_json(self) -> dict[str, Any]:
        return {"tp": self.tp.tolist(), "fp": self.fp.tolist(), "fn": self.fn.tolist(),
                "iou": {str(c): format(v, "x") for c, v in sorted(self.iou.items())}}

    @classmethod
    def from_json(cls, doc: dict[str, Any], num_classes: int) -> "ExactPQ":
        out = cls(num_classes)
        for key in ("tp", "fp", "fn"):
            values = np.asarray(doc[key], np.int64)
            if values.shape != (num_classes,):
                raise ValueError(f"{key} has {values.shape} entries, expected {num_classes}")
            getattr(out, key)[:] = values
        out.iou = {int(c): int(v, 16) for c, v in doc["iou"].items()}
        if any(not 0 <= c < num_classes for c in out.iou):
            raise ValueError("IoU entry for a class index out of range")
        return out

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ExactPQ) and np.array_equal(self.tp, other.tp) and np.array_equal(self.fp, other.fp)
                and np.array_equal(self.fn, other.fn) and self.iou == other.iou)


# ----------------------------------------------------------------------------- per image (from the scorer)


@dataclass
class RowScore:
    """One image scored for one (post-processor, layer).

    Attributes:
        mask: the image's Mask PQ statistics.
        boundary: its Boundary PQ statistics (``--boundary``).
        detections: its thing segments as COCO results (``--ap``).
        annotation: its COCO panoptic annotation, PNG already written (``--save-predictions``).
    """

    mask: PQStats
    boundary: PQStats | None = None
    detections: list[dict[str, Any]] | None = None
    annotation: dict[str, Any] | None = None


@dataclass
class ImageScore:
    """Everything the scorer returns for one image of one cell.

    Attributes:
        position: the image's position in ``RUN/image_ids.json``.
        rows: ``row_key(pp, layer)`` -> :class:`RowScore`.
        thing_preference: the image's thing-preference statistics (clean cell, ``--thing-preference``).
        cost: CPU seconds of this image by stage (post-processing per method, scoring, writing).
    """

    position: int
    rows: dict[str, RowScore]
    thing_preference: Any = None
    cost: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- per row / per cell


@dataclass
class RowState:
    """Accumulated statistics of one results row of a cell."""

    mask: ExactPQ
    boundary: ExactPQ | None = None
    detections: list[tuple[int, list[dict[str, Any]]]] | None = None
    annotations: list[tuple[int, dict[str, Any]]] | None = None
    ap: dict[str, float | None] | None = None  # {"segm": AP %, "bbox": AP %} once evaluated

    def merge(self, other: "RowState") -> None:
        self.mask.merge(other.mask)
        if self.boundary is not None and other.boundary is not None:
            self.boundary.merge(other.boundary)
        if self.detections is not None and other.detections is not None:
            self.detections.extend(other.detections)
        if self.annotations is not None and other.annotations is not None:
            self.annotations.extend(other.annotations)

    def sorted_detections(self) -> list[dict[str, Any]]:
        """All detections by image position, each image's in its own order (the canonical COCOeval input)."""
        return [d for _, dets in sorted(self.detections or [], key=lambda t: t[0]) for d in dets]

    def sorted_annotations(self) -> list[dict[str, Any]]:
        return [a for _, a in sorted(self.annotations or [], key=lambda t: t[0])]


@dataclass
class CellState:
    """Statistics of one cell over the images some process (or all of them) evaluated.

    Attributes:
        cell: the (corruption, severity).
        rows: ``row_key(pp, layer)`` -> :class:`RowState`, in the run's row order.
        positions: image positions included.
        timing: layer -> [forward seconds, images timed] (see docs/robustness.md, ``sec_per_image``).
        cost: CPU seconds by stage, summed over images (informative, for the log and benchmarks).
        thing_preference: merged thing-preference statistics (clean cell only).
        device / started_at / commit: row metadata.
        wall_seconds: wall-clock time of the cell in the slowest process (first batch to last result).
    """

    cell: Cell
    rows: dict[str, RowState]
    positions: list[int] = field(default_factory=list)
    timing: dict[str, list[float]] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)
    thing_preference: Any = None
    device: str = ""
    started_at: str = ""
    commit: str = ""
    wall_seconds: float = 0.0

    @classmethod
    def empty(cls, cell: Cell, row_keys: Iterable[str], num_classes: int, boundary: bool, ap: bool,
              predictions: bool) -> "CellState":
        rows = {k: RowState(ExactPQ(num_classes), ExactPQ(num_classes) if boundary else None,
                            [] if ap else None, [] if predictions else None) for k in row_keys}
        return cls(cell, rows)

    def add_image(self, score: ImageScore) -> None:
        """Add one image's scores (from the scorer)."""
        for key, rs in score.rows.items():
            row = self.rows[key]
            row.mask.add(rs.mask)
            if row.boundary is not None and rs.boundary is not None:
                row.boundary.add(rs.boundary)
            if row.detections is not None and rs.detections is not None:
                row.detections.append((score.position, rs.detections))
            if row.annotations is not None and rs.annotation is not None:
                row.annotations.append((score.position, rs.annotation))
        self.positions.append(score.position)
        for stage, seconds in score.cost.items():
            self.cost[stage] = self.cost.get(stage, 0.0) + seconds
        if score.thing_preference is not None:
            if self.thing_preference is None:
                self.thing_preference = score.thing_preference
            else:
                self.thing_preference.merge(score.thing_preference)

    def add_timing(self, layer: str, seconds: float, images: int) -> None:
        t = self.timing.setdefault(layer, [0.0, 0])
        t[0] += seconds
        t[1] += images

    def merge(self, other: "CellState", what: str = "") -> None:
        """Add another process's / shard's part of the same cell (exact; refuses overlapping images)."""
        if other.cell != self.cell or list(other.rows) != list(self.rows):
            raise UserError(f"cannot merge cell {other.cell.name}{what}: other cell or rows than {self.cell.name}")
        overlap = set(self.positions) & set(other.positions)
        if overlap:
            raise UserError(f"cell {self.cell.name}{what}: image position {min(overlap)} was evaluated twice "
                            "(the same shard given twice?)")
        for key, row in other.rows.items():
            self.rows[key].merge(row)
        self.positions.extend(other.positions)
        for layer, (seconds, images) in other.timing.items():
            self.add_timing(layer, seconds, int(images))
        for stage, seconds in other.cost.items():
            self.cost[stage] = self.cost.get(stage, 0.0) + seconds
        if other.thing_preference is not None:
            if self.thing_preference is None:
                self.thing_preference = other.thing_preference
            else:
                self.thing_preference.merge(other.thing_preference)
        devices = [d for d in (self.device, other.device) if d]
        self.device = devices[0] if len(set(devices)) == 1 else "; ".join(dict.fromkeys(devices))
        self.started_at = min(s for s in (self.started_at, other.started_at) if s) if (
            self.started_at or other.started_at) else ""
        self.commit = self.commit or other.commit
        self.wall_seconds = max(self.wall_seconds, other.wall_seconds)

    def sec_per_image(self, layer: str) -> float:
        seconds, images = self.timing.get(layer, (0.0, 0))
        return float(seconds) / images if images else float("nan")


def merge_cells(parts: Sequence[CellState], what: Sequence[str] | None = None) -> CellState:
    """Merge parts of one cell (rank order or shard order; the result does not depend on it)."""
    out = parts[0]
    for k, part in enumerate(parts[1:], start=1):
        out.merge(part, f" ({what[k]})" if what else "")
    out.positions.sort()
    return out
