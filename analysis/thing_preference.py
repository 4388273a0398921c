"""Thing-preference statistics from per-query rows (``RUN/thing_preference.parquet``): Table B.6 bins, Fig. 7 fit.

Input: one row per query with ``n_things, n_stuff, thing_tp, stuff_tp`` (integer counts over the evaluation set),
``p_t = n_things / (n_things + n_stuff)`` (paper Eq. 7) and, when present, ``thing_ignored, stuff_ignored`` (masks on
crowd / void regions, neither TP nor FP: TP + FP = predicted - ignored), as
:meth:`harness.metrics.thing_preference.ThingPreferenceStats.per_query` writes them (same numbers as its
``bins()`` and ``regression()``, tested; this module needs no torch). Binning uses the integer counts
(``floor(10 * n_things / (n_things + n_stuff))``, the last bin closed at 1.0) so no query changes bin through
float rounding. Queries that predicted no mask at all have no P_t; they are left out and counted in ``unused``.
The paper prints the first bin as "(0.0, 0.1)"; it holds the queries with P_t = 0 too (its query counts add up
to all 353 queries), as ours does.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["BIN_LABELS", "bins_from_queries", "regression", "BIN_COLUMNS"]

BIN_LABELS = ["(0.0, 0.1)", "[0.1, 0.2)", "[0.2, 0.3)", "[0.3, 0.4)", "[0.4, 0.5)", "[0.5, 0.6)", "[0.6, 0.7)",
              "[0.7, 0.8)", "[0.8, 0.9)", "[0.9, 1.0]"]
BIN_COLUMNS = ["P_t_bin", "num_queries", "stuff_TP", "stuff_TP_FP", "stuff_precision", "things_TP",
               "things_TP_FP", "things_precision"]


def _precision(tp: int, n: int) -> float:
    return tp / n if n else math.nan


def bins_from_queries(queries: pd.DataFrame) -> pd.DataFrame:
    """Table B.6 from per-query rows: ten P_t bins plus a ``Total`` row, columns :data:`BIN_COLUMNS`.

    Args:
        queries: per-query rows with ``n_things, n_stuff, thing_tp, stuff_tp``.

    Returns:
        One row per bin label (all ten, empty bins with zero counts) and ``Total`` (all queries, as the paper's
        353); precision = TP / (TP + FP), NaN for no predictions. ``attrs["unused"]`` = queries without any
        predicted mask (in no bin, counted in Total).
    """
    nt = queries["n_things"].to_numpy(np.int64)
    ns = queries["n_stuff"].to_numpy(np.int64)
    tt = queries["thing_tp"].to_numpy(np.int64)
    st = queries["stuff_tp"].to_numpy(np.int64)
    ti = _ignored(queries, "thing_ignored")
    si = _ignored(queries, "stuff_ignored")
    used = (nt + ns) > 0
    idx = np.full(len(nt), -1, np.int64)
    idx[used] = np.minimum((10 * nt[used]) // (nt[used] + ns[used]), 9)
    rows: list[dict[str, Any]] = []
    for b, label in enumerate(BIN_LABELS + ["Total"]):
        sel = np.ones(len(nt), bool) if label == "Total" else idx == b
        s_tp, s_n = int(st[sel].sum()), int((ns - si)[sel].sum())
        t_tp, t_n = int(tt[sel].sum()), int((nt - ti)[sel].sum())
        rows.append({"P_t_bin": label, "num_queries": int(sel.sum()), "stuff_TP": s_tp, "stuff_TP_FP": s_n,
                     "stuff_precision": _precision(s_tp, s_n), "things_TP": t_tp, "things_TP_FP": t_n,
                     "things_precision": _precision(t_tp, t_n)})
    out = pd.DataFrame(rows, columns=BIN_COLUMNS)
    out.attrs["unused"] = int((~used).sum())
    return out


def _ignored(queries: pd.DataFrame, column: str) -> np.ndarray:
    if column in queries.columns:
        return queries[column].fillna(0).to_numpy(np.int64)
    return np.zeros(len(queries), np.int64)


def regression(queries: pd.DataFrame) -> dict[str, float]:
    """Least-squares fit of stuff precision on P_t (Fig. 7) over queries with at least one counted stuff mask.

    Returns:
        ``slope, intercept, r, p, n`` (scipy.stats.linregress; NaN when fewer than 2 queries qualify or P_t is
        constant, e.g. a decoupled model's stuff queries, all at P_t = 0).
    """
    from scipy import stats

    q = queries[(queries["n_stuff"].to_numpy(np.int64) - _ignored(queries, "stuff_ignored")) >= 1]
    x = q["p_t"].to_numpy(float)
    y = q["stuff_precision"].to_numpy(float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    nan = math.nan
    if len(x) < 2 or np.ptp(x) == 0:
        return {"slope": nan, "intercept": nan, "r": nan, "p": nan, "n": float(len(x))}
    fit = stats.linregress(x, y)
    return {"slope": float(fit.slope), "intercept": float(fit.intercept), "r": float(fit.rvalue),
            "p": float(fit.pvalue), "n": float(len(x))}
