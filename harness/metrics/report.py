"""Result tables in panopticapi's layout (values x100), for PQ and Boundary PQ results."""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["format_pq_table", "format_ap_table"]


def _cell(value: float | None) -> str:
    return f"{100 * value:5.1f}" if value is not None else "    -"


def format_pq_table(results: Mapping[str, Any], title: str = "") -> str:
    """panopticapi's summary table (rows All / Things / Stuff; PQ SQ RQ x100 and N).

    Args:
        results: one PQ block: {"All": {pq, sq, rq, n}, "Things": ..., "Stuff": ...}.
        title: optional first line.
    """
    lines = [title] if title else []
    lines.append("{:10s}| {:>5s}  {:>5s}  {:>5s} {:>5s}".format("", "PQ", "SQ", "RQ", "N"))
    lines.append("-" * (10 + 7 * 4))
    for name in ("All", "Things", "Stuff"):
        r = results[name]
        lines.append(f"{name:10s}| {_cell(r['pq'])}  {_cell(r['sq'])}  {_cell(r['rq'])} {r['n']:5d}")
    return "\n".join(lines)


def format_ap_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """COCO AP summary: one row per IoU type (segm, bbox), AP columns x100."""
    cols = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    lines = ["{:6s}|".format("") + "".join(f" {c:>5s}" for c in cols), "-" * (7 + 6 * len(cols))]
    for iou_type, r in results.items():
        cells = "".join(" " + _cell(r.get(c)) for c in cols)
        lines.append(f"{iou_type:6s}|{cells}")
    return "\n".join(lines)
