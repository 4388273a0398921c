"""The user-facing tables of a grid run, derived from its cell statistics (``RUN/cells/*.json``).

``results.parquet`` / ``results.csv`` (:data:`harness.engine.results.RESULT_COLUMNS`), ``per_class.parquet``
(:data:`~harness.engine.results.PER_CLASS_COLUMNS`) and ``summary.csv`` are rebuilt, atomically, from every finished
cell each time a cell finishes. They are a pure function of the cell files, which is what makes a resumed,
distributed or merged run produce the same tables, and what lets a resume detect a results file that was edited by
hand: its rows must equal the rows the cell files give (rows of the most recent cells may be missing after a kill;
they are rebuilt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from harness.engine.grid_config import Cell
from harness.engine.grid_stats import CellState, row_key
from harness.engine.results import (
    CLEAN,
    CORRUPTION_FAMILIES,
    CORRUPTIONS_TABLE11,
    KEY_COLUMNS,
    PER_CLASS_COLUMNS,
    RESULT_COLUMNS,
    pq_columns,
)
from harness.errors import UserError
from harness.io import atomic_write, atomic_write_text
from harness.metrics.pq import CategoryTable, summarize_stats

__all__ = ["TableMeta", "result_rows", "per_class_rows", "build_tables", "write_tables", "summary_frame",
           "check_results_files", "read_results_csv", "RESULTS_PARQUET", "RESULTS_CSV", "PER_CLASS_PARQUET",
           "SUMMARY_CSV"]

RESULTS_PARQUET = "results.parquet"
RESULTS_CSV = "results.csv"
PER_CLASS_PARQUET = "per_class.parquet"
SUMMARY_CSV = "summary.csv"
_INT_COLUMNS = ("subset", "severity", "images")
_STR_COLUMNS = ("model", "weights_sha256", "dataset", "split", "corruption", "post_process", "layer", "device",
                "commit", "started_at")


@dataclass(frozen=True)
class TableMeta:
    """Row keys shared by every row of a run, and what the statistics mean.

    Attributes:
        model / weights_sha256 / dataset / split / subset: the key columns (``subset`` = images in the run).
        rows: (post-processor, layer) pairs in row order.
        categories: the GT JSON's categories (PQ averaging order); names come from ``category_names``.
        category_names: category id -> name.
    """

    model: str
    weights_sha256: str
    dataset: str
    split: str
    subset: int
    rows: tuple[tuple[str, str], ...]
    categories: tuple[dict[str, Any], ...]
    category_names: dict[int, str]

    def table(self) -> CategoryTable:
        return CategoryTable(self.categories)


def _summary(state: CellState, key: str, table: CategoryTable) -> dict[str, Any]:
    row = state.rows[key]
    out = {"pq": summarize_stats(row.mask.to_pq_stats(), table, "PQ")}
    if row.boundary is not None:
        out["boundary_pq"] = summarize_stats(row.boundary.to_pq_stats(), table, "Boundary PQ")
    return out


def result_rows(state: CellState, meta: TableMeta) -> list[dict[str, Any]]:
    """The results rows of one finished cell, in :data:`RESULT_COLUMNS` order."""
    table = meta.table()
    rows = []
    for pp, layer in meta.rows:
        key = row_key(pp, layer)
        ap = state.rows[key].ap or {}
        values = {
            "model": meta.model, "weights_sha256": meta.weights_sha256, "dataset": meta.dataset, "split": meta.split,
            "subset": meta.subset, "corruption": state.cell.corruption, "severity": state.cell.severity,
            "post_process": pp, "layer": layer, **pq_columns(_summary(state, key, table)),
            "ap_segm": _nan(ap.get("segm")), "ap_bbox": _nan(ap.get("bbox")), "images": len(state.positions),
            "sec_per_image": state.sec_per_image(layer), "device": state.device, "commit": state.commit,
            "started_at": state.started_at,
        }
        rows.append({c: values[c] for c in RESULT_COLUMNS})
    return rows


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def per_class_rows(state: CellState, meta: TableMeta) -> list[dict[str, Any]]:
    """Per-class Mask PQ / SQ / RQ (percent; NaN for a class without any TP, FP or FN) and the counts."""
    table = meta.table()
    keys = {"model": meta.model, "weights_sha256": meta.weights_sha256, "dataset": meta.dataset, "split": meta.split,
            "subset": meta.subset, "corruption": state.cell.corruption, "severity": state.cell.severity}
    rows = []
    for pp, layer in meta.rows:
        stats = state.rows[row_key(pp, layer)].mask.to_pq_stats()
        for i, cid in enumerate(table.ids):
            tp, fp, fn, iou = int(stats.tp[i]), int(stats.fp[i]), int(stats.fn[i]), float(stats.iou[i])
            denom = tp + 0.5 * fp + 0.5 * fn
            present = tp + fp + fn > 0
            rows.append({**keys, "post_process": pp, "layer": layer, "category_id": cid,
                         "category": meta.category_names.get(cid, str(cid)), "isthing": bool(table.isthing[i]),
                         "pq": 100 * iou / denom if present else math.nan,
                         "sq": (100 * iou / tp if tp else 0.0) if present else math.nan,
                         "rq": 100 * tp / denom if present else math.nan, "tp": tp, "fp": fp, "fn": fn})
    return rows


def _frame(rows: list[dict[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(columns))
    for c in _INT_COLUMNS + ("category_id", "tp", "fp", "fn"):
        if c in df.columns:
            df[c] = df[c].astype(np.int64)
    for c in _STR_COLUMNS + ("category",):
        if c in df.columns:
            df[c] = df[c].astype(object)
    return df


def build_tables(states: Sequence[CellState], meta: TableMeta) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(results, per_class, summary) frames of the finished cells, cells in the order given."""
    results = _frame([r for s in states for r in result_rows(s, meta)], RESULT_COLUMNS)
    per_class = _frame([r for s in states for r in per_class_rows(s, meta)], PER_CLASS_COLUMNS)
    return results, per_class, summary_frame(results)


def summary_frame(results: pd.DataFrame) -> pd.DataFrame:
    """Per (model, post_process, layer): clean PQ, mPC, rPC and the means per corruption and per family.

    ``mPC`` is the mean PQ over every corrupted row (all corruptions x severities evaluated); ``rPC = mPC / clean``
    (a fraction); the 16 corruption columns (Table 11 order, imagecorruptions names) are each corruption's mean
    over its severities, NaN when not evaluated; ``blur`` .. ``weather`` average the evaluated rows of the family's
    corruptions. Corruptions outside Table 11 (zoom_blur, ...) count in mPC and get a column after ``frost``.
    """
    group_cols = ["model", "weights_sha256", "dataset", "split", "subset", "post_process", "layer"]
    extra = [c for c in dict.fromkeys(results["corruption"]) if c != CLEAN and c not in CORRUPTIONS_TABLE11]
    columns = group_cols + ["clean", "mPC", "rPC"] + CORRUPTIONS_TABLE11 + extra + list(CORRUPTION_FAMILIES)
    out = []
    for keys, g in results.groupby(group_cols, sort=False, dropna=False):
        clean = g.loc[g["corruption"] == CLEAN, "pq"]
        corrupted = g[g["corruption"] != CLEAN]
        row: dict[str, Any] = dict(zip(group_cols, keys))
        row["clean"] = float(clean.iloc[0]) if len(clean) else math.nan
        row["mPC"] = float(corrupted["pq"].mean()) if len(corrupted) else math.nan
        row["rPC"] = row["mPC"] / row["clean"] if row["clean"] and not math.isnan(row["clean"]) else math.nan
        for c in CORRUPTIONS_TABLE11 + extra:
            vals = corrupted.loc[corrupted["corruption"] == c, "pq"]
            row[c] = float(vals.mean()) if len(vals) else math.nan
        for fam, names in CORRUPTION_FAMILIES.items():
            vals = corrupted.loc[corrupted["corruption"].isin(names), "pq"]
            row[fam] = float(vals.mean()) if len(vals) else math.nan
        out.append(row)
    return pd.DataFrame(out, columns=columns)


def _write_parquet(path: Path, df: pd.DataFrame) -> None:
    atomic_write(path, lambda p: df.to_parquet(p, index=False))


def write_tables(out: Path, results: pd.DataFrame, per_class: pd.DataFrame, summary: pd.DataFrame) -> None:
    """Write the four tables atomically (per_class, results.parquet, results.csv, summary.csv, in that order)."""
    _write_parquet(out / PER_CLASS_PARQUET, per_class)
    _write_parquet(out / RESULTS_PARQUET, results)
    atomic_write_text(out / RESULTS_CSV, results.to_csv(index=False))
    atomic_write_text(out / SUMMARY_CSV, summary.to_csv(index=False))


# ----------------------------------------------------------------------------- hand-edit detection


def read_results_csv(path: Path) -> pd.DataFrame:
    """Read ``results.csv`` with the column types of the table (layer stays a string, floats round-trip)."""
    dtypes = {c: str for c in _STR_COLUMNS}
    # pandas' default float parser round-trips the shortest repr that to_csv writes (checked in the tests).
    return pd.read_csv(path, dtype=dtypes, keep_default_na=False, na_values=[""])


def _read(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path) if path.suffix == ".parquet" else read_results_csv(path)
    except (OSError, ValueError, TypeError, KeyError) as exc:  # pandas / pyarrow errors of a damaged file
        raise UserError(f"{path} cannot be read ({type(exc).__name__}: {exc}); it was edited or damaged -- delete "
                        "it and re-run the same command to rebuild it from the run's cells/") from None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            fa, fb = float(a), float(b)
        except (TypeError, ValueError):
            return False
        return (math.isnan(fa) and math.isnan(fb)) or fa == fb
    return str(a) == str(b)


def check_results_files(out: Path, expected: pd.DataFrame, finished: Sequence[Cell]) -> None:
    """Refuse results files that disagree with the run's cell statistics (edited by hand, or damaged).

    Every row present must equal the expected row of its cell in every column; rows may only be missing (a kill
    between writing a cell file and the tables). Raises `UserError` naming the file, the row and the column.
    """
    names = {(c.corruption, c.severity) for c in finished}
    index = {tuple(str(v) for v in r[KEY_COLUMNS]): r for _, r in expected.iterrows()}
    for fname in (RESULTS_PARQUET, RESULTS_CSV):
        path = out / fname
        if not path.exists():
            continue
        df = _read(path)
        hint = "the file was edited by hand -- delete it and re-run the same command to rebuild it from cells/"
        if list(df.columns) != list(RESULT_COLUMNS):
            missing = [c for c in RESULT_COLUMNS if c not in df.columns]
            what = f"lacks column {missing[0]!r}" if missing else "has other columns or column order"
            raise UserError(f"{path} {what}; {hint}")
        seen: set[tuple[str, ...]] = set()
        for n, (_, row) in enumerate(df.iterrows()):
            key = tuple(str(v) for v in row[KEY_COLUMNS])
            label = f"row {n + 1} ({row['corruption']} {row['severity']}, {row['post_process']}, {row['layer']})"
            if key in seen:
                raise UserError(f"{path}: {label} appears twice; {hint}")
            seen.add(key)
            want = index.get(key)
            if want is None:
                known = (str(row["corruption"]), _int_or(row["severity"])) in names
                why = "is not a row of this run" if not known else "does not match the run's keys"
                raise UserError(f"{path}: {label} {why}; {hint}")
            for col in RESULT_COLUMNS:
                if not _same(row[col], want[col]):
                    raise UserError(f"{path}: {label}: {col} is {row[col]!r} but the run's statistics give "
                                    f"{want[col]!r}; {hint}")


def _int_or(value: Any) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def format_table(results: pd.DataFrame) -> str:
    """A compact text table of the PQ columns (the command's final printout)."""
    cols = ["corruption", "severity", "post_process", "layer", "pq", "sq", "rq", "pq_th", "pq_st"]
    for extra in ("bpq", "ap_segm", "ap_bbox"):
        if extra in results and results[extra].notna().any():
            cols.append(extra)
    cols += ["images", "sec_per_image"]
    pct = {c: (lambda v: f"{v:.2f}") for c in cols[4:-2]}
    return results[cols].to_string(index=False, formatters={**pct, "sec_per_image": lambda v: f"{v:.4f}"})
