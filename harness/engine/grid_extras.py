"""Outputs of a grid run beyond the results tables: the thing-preference statistics (Fig. 7, Table B.6).

``--thing-preference`` counts, on the clean cell and the last mask layer, per query of the model, how many thing and
stuff masks it predicts and how many are right (:class:`harness.metrics.thing_preference.ThingPreferenceStats`,
whose module and docs/thing_preference.md give the definitions: masks after the mask-wise merge (m) with the run's
(m) options, at the GT resolution). The counts are integers, merged exactly across processes and shards like the
PQ statistics, and written as ``RUN/thing_preference.parquet`` (one row per query) and
``RUN/thing_preference_bins.csv`` (Table B.6 bins, plus ``none`` and ``total``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from harness.io import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["write_thing_preference", "THING_PREFERENCE_PARQUET", "THING_PREFERENCE_BINS"]

THING_PREFERENCE_PARQUET = "thing_preference.parquet"
THING_PREFERENCE_BINS = "thing_preference_bins.csv"


def write_thing_preference(out: Path, stats: Any) -> None:
    """Write the per-query table and the Table B.6 bins of ``stats`` (a ``ThingPreferenceStats``)."""
    per_query = stats.per_query()
    atomic_write(out / THING_PREFERENCE_PARQUET, lambda p: per_query.to_parquet(p, index=False))
    atomic_write_text(out / THING_PREFERENCE_BINS, stats.bins().to_csv(index=False))
    reg = stats.regression()
    summary = stats.summary()
    log.info("thing preference over %d images: stuff precision %.3f (all queries), regression of stuff precision "
             "on P_t: slope %.3f, r %.3f, n %d", summary["images"], summary["stuff_precision_all"], reg["slope"],
             reg["r"], reg["n"])
