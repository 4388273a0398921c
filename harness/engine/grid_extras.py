"""Outputs of a grid run beyond the results tables: the thing-preference statistics (Fig. 7, Table B.6).

``--thing-preference`` counts, on the clean cell and the last mask layer, per query of the model, how often it
predicts things and stuff and how often those predictions are right
(:class:`harness.metrics.thing_preference.ThingPreferenceStats`; its module documents the definitions). The counts
are integers, merged exactly across processes and shards like the PQ statistics, and written as
``RUN/thing_preference.parquet`` (one row per query) and ``RUN/thing_preference_bins.csv`` (Table B.6 bins).
"""

from __future__ import annotations

import logging
from pathlib import Path

from harness.engine.grid_config import CLEAN_CELL, Cell
from harness.engine.grid_stats import CellState
from harness.io import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["write_thing_preference", "THING_PREFERENCE_PARQUET", "THING_PREFERENCE_BINS"]

THING_PREFERENCE_PARQUET = "thing_preference.parquet"
THING_PREFERENCE_BINS = "thing_preference_bins.csv"


def write_thing_preference(out: Path, finished: dict[Cell, CellState]) -> bool:
    """Write the per-query table and the bins from the clean cell's statistics; False when there are none."""
    state = finished.get(CLEAN_CELL)
    stats = None if state is None else state.thing_preference
    if stats is None:
        log.warning("no thing-preference statistics in %s (clean cell not finished?)", out)
        return False
    per_query = stats.per_query()
    atomic_write(out / THING_PREFERENCE_PARQUET, lambda p: per_query.to_parquet(p, index=False))
    atomic_write_text(out / THING_PREFERENCE_BINS, stats.bins().to_csv(index=False))
    return True
