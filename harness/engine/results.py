"""The results table of a run: one row per (model, corruption, severity, post_process, layer).

External checks, ``analysis/`` and the notebooks read these files; the column names and their meaning are a
contract (see README "Results table"):

* ``RUN/results.parquet`` and ``RUN/results.csv``: :data:`RESULT_COLUMNS`, in that order.
* ``RUN/per_class.parquet``: :data:`PER_CLASS_COLUMNS` (the row keys plus the class and its PQ / SQ / RQ).
* ``RUN/summary.csv``: per (model, post_process, layer): clean PQ, mPC, rPC, per corruption and per family.

PQ-type values are percentages (0-100), as papers print them; a metric that was not requested is empty (NaN).
Clean rows have ``corruption = "none"`` and ``severity = 0``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

__all__ = [
    "KEY_COLUMNS",
    "PQ_COLUMNS",
    "BPQ_COLUMNS",
    "RESULT_COLUMNS",
    "PER_CLASS_COLUMNS",
    "CORRUPTIONS_TABLE11",
    "CORRUPTION_FAMILIES",
    "CLEAN",
    "pq_columns",
    "path_name",
    "read_table",
]

CLEAN = "none"

# What identifies a row (a "cell" of the grid); `model` .. `layer`.
KEY_COLUMNS = ["model", "weights_sha256", "dataset", "split", "subset", "corruption", "severity", "post_process",
               "layer"]
PQ_COLUMNS = ["pq", "sq", "rq", "pq_th", "sq_th", "rq_th", "pq_st", "sq_st", "rq_st"]
BPQ_COLUMNS = ["b" + c for c in PQ_COLUMNS]
RESULT_COLUMNS = (KEY_COLUMNS + PQ_COLUMNS + BPQ_COLUMNS
                  + ["ap_segm", "ap_bbox", "images", "sec_per_image", "device", "commit", "started_at"])
PER_CLASS_COLUMNS = KEY_COLUMNS + ["category_id", "category", "isthing", "pq", "sq", "rq", "tp", "fp", "fn"]

# Table 11's 16 corruption columns, in the paper's order (shared/paper/TABLES.md, Table 11): Blur, Noise,
# Digital, Weather.
CORRUPTIONS_TABLE11 = [
    "motion_blur", "defocus_blur", "glass_blur", "gaussian_blur",
    "gaussian_noise", "impulse_noise", "shot_noise", "speckle_noise",
    "brightness", "contrast", "saturate", "jpeg_compression",
    "snow", "spatter", "fog", "frost",
]
CORRUPTION_FAMILIES = {
    "blur": CORRUPTIONS_TABLE11[0:4],
    "noise": CORRUPTIONS_TABLE11[4:8],
    "digital": CORRUPTIONS_TABLE11[8:12],
    "weather": CORRUPTIONS_TABLE11[12:16],
}

_SPLITS = (("", "All"), ("_th", "Things"), ("_st", "Stuff"))


def _pct(value: float | None) -> float:
    return math.nan if value is None else 100.0 * float(value)


def pq_columns(summary: Mapping[str, Any]) -> dict[str, float]:
    """PQ / SQ / RQ columns (percent) from a ``PQAccumulator.summarize()`` result.

    Args:
        summary: ``{"pq": {"All": {pq, sq, rq, n}, "Things": ..., "Stuff": ...}, "boundary_pq": {...}?}``.

    Returns:
        ``pq, sq, rq, pq_th, ..., rq_st`` and, when ``boundary_pq`` is present, ``bpq ... brq_st``; the Boundary
        columns are NaN otherwise.
    """
    out: dict[str, float] = {}
    for key, prefix in (("pq", ""), ("boundary_pq", "b")):
        block = summary.get(key)
        for suffix, split in _SPLITS:
            row = block[split] if block is not None else {}
            for metric in ("pq", "sq", "rq"):
                out[f"{prefix}{metric}{suffix}"] = _pct(row.get(metric))
    return out


def path_name(post_process: str) -> str:
    """A post-processor's name as used in paths (``p*`` is spelled ``pstar``)."""
    return post_process.replace("*", "star")


def read_table(path: Any, what: str = "results table", **csv_options: Any) -> Any:
    """A ``.parquet`` or ``.csv`` table as a pandas DataFrame, for every reader of run folders (``report``,
    ``sweep``, the eval grid's resume): a file that is not one (damaged, edited, garbage) is one line naming it.

    Args:
        path: the file (``.parquet``, else read as CSV).
        what: its role, for the message.
        csv_options: keyword arguments of ``pandas.read_csv`` (dtypes ...).

    Raises:
        DataError: missing, unreadable or not a table.
    """
    from pathlib import Path

    import pandas as pd

    from harness.errors import DataError

    p = Path(path)
    try:
        if p.suffix == ".parquet":
            return pd.read_parquet(p)
        return pd.read_csv(p, **csv_options)
    except FileNotFoundError:
        raise DataError(f"{what} not found: {p}") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - pandas / pyarrow raise many types for a damaged file
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"cannot read {what} {p}: {text[:200]} (damaged or not a "
                        f"{'Parquet' if p.suffix == '.parquet' else 'CSV'} table)") from None
