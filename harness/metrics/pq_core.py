"""The numpy-free parts of PQ: options, the category table, per-category counts, the averages.

Split from `harness.metrics.pq` so that `harness eval-pq` with the compiled kernel never imports
numpy (about a fifth of a 600-image evaluation's wall time is interpreter start-up and imports).
`harness.metrics.pq` re-exports everything here.
"""

from __future__ import annotations

import logging
from array import array
from typing import Any, Mapping, NamedTuple, Sequence

from harness.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["PQOptions", "CategoryTable", "Counts", "summarize_stats"]


class PQOptions(NamedTuple):
    """What to compute, and which reference quirks to keep (immutable; keyword construction).

    Attributes:
        boundary: also compute Boundary PQ.
        dilation_ratio: boundary width as a fraction of the image diagonal (0.02 for COCO,
            0.005 for Cityscapes in boundary-iou-api).
        all_crowd_regions: count every crowd region of the category in the FP ignore rule
            (panopticapi only keeps the last crowd segment of each category per image).
        separate_boundary_label: never let boundary-iou-api's interior label BOUNDARY_ID
            (max category id + 1) collide with a segment of that id (the reference lets it).
    """

    boundary: bool = False
    dilation_ratio: float = 0.02
    all_crowd_regions: bool = False
    separate_boundary_label: bool = False


class CategoryTable:
    """GT categories in GT JSON order (the order panopticapi averages in).

    Attributes:
        ids: category id per index.
        index: category id -> index.
        thing: (C,) list of bool.
        boundary_id: boundary-iou-api's BOUNDARY_ID (max category id + 1).
    """

    def __init__(self, categories: Sequence[Mapping[str, Any]], source: str = "GT JSON") -> None:
        ids: list[int] = []
        thing: list[bool] = []
        seen: set[int] = set()
        for c in categories:
            if not isinstance(c, Mapping) or "id" not in c or "isthing" not in c:
                raise DataError(f"{source}: category {c!r} lacks 'id' or 'isthing'")
            try:
                cid = int(c["id"])
            except (TypeError, ValueError):
                raise DataError(f"{source}: category {c!r} has a non-integer id") from None
            if cid in seen:
                raise DataError(f"{source}: duplicate category id {c['id']}")
            seen.add(cid)
            ids.append(cid)
            thing.append(c["isthing"] == 1)
        self.ids = ids
        self.index = {cid: i for i, cid in enumerate(ids)}
        self.thing = thing
        self.boundary_id = (max(ids) + 1) if ids else 1

    @property
    def isthing(self) -> Any:
        """(C,) numpy bool array (imports numpy)."""
        import numpy as np

        return np.array(self.thing, bool)

    def __len__(self) -> int:
        return len(self.ids)


class Counts:
    """Per-category sums tp, fp, fn (int64) and iou (float64) as plain `array`s of length C.

    The compiled kernel writes into these buffers directly; `PQStats` (numpy) can view them.
    """

    def __init__(self, num_categories: int) -> None:
        self.tp = array("q", bytes(8 * num_categories))
        self.fp = array("q", bytes(8 * num_categories))
        self.fn = array("q", bytes(8 * num_categories))
        self.iou = array("d", bytes(8 * num_categories))

    def __iadd__(self, other: Any) -> "Counts":
        """Elementwise sums in index order (the same float additions as numpy's `+=`)."""
        for mine, theirs in ((self.tp, other.tp), (self.fp, other.fp), (self.fn, other.fn), (self.iou, other.iou)):
            for i, v in enumerate(theirs):
                mine[i] += v
        return self


def summarize_stats(stats: Any, table: CategoryTable, name: str = "PQ") -> dict[str, Any]:
    """panopticapi's `pq_average` for All / Things / Stuff plus `per_class`.

    Args:
        stats: per-category tp, fp, fn, iou sequences (`PQStats` or `Counts`).
        table: the GT categories.
        name: for the warning about empty splits.

    Returns:
        {"All": {pq, sq, rq, n}, "Things": {...}, "Stuff": {...}, "per_class": {"<cat id>": {pq, sq, rq}}}
        with fractions in [0, 1]; a split without any class that has tp+fp+fn > 0 gets n = 0
        and null values (panopticapi raises ZeroDivisionError there).
    """
    tp, fp, fn, iou = stats.tp, stats.fp, stats.fn, stats.iou
    out: dict[str, Any] = {}
    per_class: dict[str, dict[str, float]] = {}
    for split, want in (("All", None), ("Things", True), ("Stuff", False)):
        pq = sq = rq = 0.0
        n = 0
        for i, cid in enumerate(table.ids):
            if want is not None and table.thing[i] != want:
                continue
            t, f_p, f_n, s = int(tp[i]), int(fp[i]), int(fn[i]), float(iou[i])
            if t + f_p + f_n == 0:
                if want is None:
                    per_class[str(cid)] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                continue
            n += 1
            denom = t + 0.5 * f_p + 0.5 * f_n
            pq_c = s / denom
            sq_c = s / t if t != 0 else 0.0
            rq_c = t / denom
            if want is None:
                per_class[str(cid)] = {"pq": pq_c, "sq": sq_c, "rq": rq_c}
            pq += pq_c
            sq += sq_c
            rq += rq_c
        if n == 0:
            log.warning("%s %s: no category with any TP, FP or FN; reporting n = 0 and null values", name, split)
            out[split] = {"pq": None, "sq": None, "rq": None, "n": 0}
        else:
            out[split] = {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}
    out["per_class"] = per_class
    return out
