"""Declarative table specs: which measured rows and columns make each cell of a paper table.

A :class:`TableSpec` lists :class:`RowSpec` (a paper row: its label, how to find it in ``tables.json``, which
results rows measure it (:class:`Select`) and the :class:`~analysis.recipes.Recipe` that produces them) and
:class:`ColumnSpec` (a paper column: its printed name, its ``tables.json`` key and a :class:`Measure`). The specs
of the paper's 17 tables are in :mod:`analysis.paper_specs`; :mod:`analysis.tables` evaluates them.

Measures read one of three frames of :class:`analysis.runs.RunData`: results rows (``Metric``, ``Fps``,
``CorruptionMean``, ``CorruptionsMean``), cost profiles (``ProfileValue``) and thing-preference bins
(``BinValue``). A measure returns ``(value, sources)``; ``value`` is None when the rows are absent. No measure
ever reads ``tables.json``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import pandas as pd

from analysis.model_names import DEFAULT_VARIANT, demo_standin
from harness.engine.results import CLEAN, CORRUPTIONS_TABLE11

__all__ = ["Select", "Measure", "Metric", "Fps", "CorruptionMean", "CorruptionsMean", "ProfileValue", "BinValue",
           "ColumnSpec", "RowSpec", "TableSpec", "Frames", "Measured"]

log = logging.getLogger(__name__)

Measured = tuple[float | None, tuple[str, ...]]


@dataclass(frozen=True)
class Select:
    """The measured rows of one paper row.

    Attributes:
        models: model names in preference order (the first with rows is used).
        post_process: post-processors in preference order; None = each model's default ("m" / "own").
        layer: mask-decoder layer ("last" or "1", "2", ...).
        variant: training variant (see :func:`analysis.model_names.row_variant`).
        sweep: for ``harness sweep`` rows, the setting (``alpha, beta, t_cnf, t_keep``; omitted keys are free);
            None selects only ``harness eval`` rows.
        demo: allow a tiny stand-in (:func:`analysis.model_names.demo_standin`) for a demo version.
    """

    models: tuple[str, ...]
    post_process: tuple[str, ...] | None = None
    layer: str = "last"
    variant: str = DEFAULT_VARIANT
    sweep: Mapping[str, float] | None = None
    demo: bool = True

    def standins(self) -> tuple[str, ...]:
        """The demo models that stand in for :attr:`models` (empty when ``demo`` is False)."""
        if not self.demo:
            return ()
        out = [demo_standin(m, self.variant) for m in self.models]
        return tuple(dict.fromkeys(m for m in out if m))


@dataclass
class Frames:
    """What a measure may read, already filtered to one table's data set / split and to one row's model.

    Attributes:
        results: results rows of the chosen model, variant and post-processor (all corruptions, layers, sweeps).
        profile: profile rows of the model.
        bins: Table B.6 bins of the model (``analysis.thing_preference.bins_from_queries``), with ``source``.
        layer: the row's layer; sweep: the row's sweep setting (None = eval rows only); bin_label: the row's
            P_t bin (Table B.6).
    """

    results: pd.DataFrame
    profile: pd.DataFrame
    bins: pd.DataFrame
    layer: str = "last"
    sweep: Mapping[str, float] | None = None
    bin_label: str | None = None


def _match_sweep(df: pd.DataFrame, setting: Mapping[str, float] | None) -> pd.DataFrame:
    if setting is None:
        return df[df["alpha"].isna()]
    keep = df["alpha"].notna()
    for k, v in setting.items():
        keep &= (df[k] - float(v)).abs() < 1e-9
    return df[keep]


def _one(df: pd.DataFrame, what: str) -> pd.Series | None:
    """The single row of ``df``; with several (two runs of one cell), the most recent, with a warning."""
    if df.empty:
        return None
    if len(df) > 1:
        log.warning("%s: %d measured rows (different weights or subsets?); using the most recent", what, len(df))
        df = df.sort_values("started_at", kind="stable")
    return df.iloc[-1]


def _sources(df: pd.DataFrame) -> tuple[str, ...]:
    return tuple(dict.fromkeys(str(s) for s in df["source"])) if "source" in df.columns else ()


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


class Measure:
    """How one cell's measured value is computed from :class:`Frames`."""

    def __call__(self, frames: Frames) -> Measured:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class Metric(Measure):
    """A results column of the clean row (or of one corruption / severity), e.g. ``pq_th``.

    ``where`` adds sweep-setting filters for this column (Table B.4: one column per ``t_keep``).
    """

    column: str
    corruption: str = CLEAN
    severity: int = 0
    where: tuple[tuple[str, float], ...] = ()

    def __call__(self, frames: Frames) -> Measured:
        setting = None if frames.sweep is None and not self.where else {**(frames.sweep or {}), **dict(self.where)}
        df = _match_sweep(frames.results, setting)
        df = df[(df["layer"] == frames.layer) & (df["corruption"] == self.corruption)
                & (df["severity"] == self.severity)]
        row = _one(df, f"{self.column} ({self.corruption})")
        if row is None:
            return None, ()
        return _num(row[self.column]), (str(row["source"]),)


@dataclass(frozen=True)
class Fps(Measure):
    """Images per second of the clean row: ``1 / sec_per_image``."""

    def __call__(self, frames: Frames) -> Measured:
        df = _match_sweep(frames.results, frames.sweep)
        row = _one(df[(df["layer"] == frames.layer) & (df["corruption"] == CLEAN)], "fps")
        if row is None:
            return None, ()
        sec = _num(row["sec_per_image"])
        return (1.0 / sec if sec else None), (str(row["source"]),)


def _corruption_means(frames: Frames, column: str) -> tuple[dict[str, float], pd.DataFrame]:
    df = _match_sweep(frames.results, frames.sweep)
    df = df[(df["layer"] == frames.layer) & (df["corruption"] != CLEAN) & (df["severity"] > 0)]
    df = df[df[column].notna()]
    means = df.groupby("corruption")[column].mean().to_dict()
    return {k: float(v) for k, v in means.items()}, df


@dataclass(frozen=True)
class CorruptionMean(Measure):
    """Mean of ``column`` over the severities (1-5) measured for one corruption (Table 11's columns)."""

    corruption: str
    column: str = "pq"

    def __call__(self, frames: Frames) -> Measured:
        means, df = _corruption_means(frames, self.column)
        if self.corruption not in means:
            return None, ()
        return means[self.corruption], _sources(df[df["corruption"] == self.corruption])


@dataclass(frozen=True)
class CorruptionsMean(Measure):
    """Mean over the 16 per-corruption means (Table 11 "Mean", = mPC); empty unless all 16 are measured."""

    column: str = "pq"

    def __call__(self, frames: Frames) -> Measured:
        means, df = _corruption_means(frames, self.column)
        if not all(c in means for c in CORRUPTIONS_TABLE11):
            return None, ()
        return sum(means[c] for c in CORRUPTIONS_TABLE11) / len(CORRUPTIONS_TABLE11), _sources(df)


@dataclass(frozen=True)
class ProfileValue(Measure):
    """A ``harness profile`` value (``params_M``, ``flops_G`` or ``fps``)."""

    column: str

    def __call__(self, frames: Frames) -> Measured:
        df = frames.profile[frames.profile[self.column].notna()] if len(frames.profile) else frames.profile
        if df.empty:
            return None, ()
        row = df.iloc[-1]
        return _num(row[self.column]), (str(row["source"]),)


@dataclass(frozen=True)
class BinValue(Measure):
    """A Table B.6 value (``num_queries``, ``stuff_TP``, ``stuff_precision`` ...) of the row's P_t bin."""

    column: str

    def __call__(self, frames: Frames) -> Measured:
        df = frames.bins
        if df.empty or frames.bin_label is None:
            return None, ()
        hit = df[df["P_t_bin"] == frames.bin_label]
        if hit.empty:
            return None, ()
        return _num(hit.iloc[0][self.column]), _sources(hit)


@dataclass(frozen=True)
class ColumnSpec:
    """A paper column.

    Attributes:
        name: the paper's printed column name ("PQ^th", "Clean", "Motion", "Mask PQ", "0.9").
        key: the ``tables.json`` key ("PQ_th", "clean", "blur_motion", "mask_PQ", "t_keep_0.9").
        measure: how the measured value is computed; None = this harness cannot measure it (stays empty).
    """

    name: str
    key: str
    measure: Measure | None


@dataclass(frozen=True)
class RowSpec:
    """A paper row.

    Attributes:
        label: row label as printed in the rendered table (and the ``row`` column of the CSV).
        paper: label-column values that find the row in ``tables.json``.
        select: which results rows measure it; None = not reproducible here (``note`` says why).
        recipe: commands that produce the rows (:class:`analysis.recipes.Recipe`), None when ``select`` is None.
        note: what differs from the paper, or why the row cannot be measured.
        bin_label: Table B.6 only: the P_t bin of this row.
    """

    label: str
    paper: Mapping[str, Any]
    select: Select | None = None
    recipe: Any = None
    note: str = ""
    bin_label: str | None = None


@dataclass(frozen=True)
class TableSpec:
    """A paper table.

    Attributes:
        id: paper id ("7", "11", "B3").
        rows, columns: as above.
        dataset: the data set kind of its rows: "coco" (any data set but ADE20K; demo rows come from the synthetic
            one) or "ade20k".
        split: "val" (any split but test-dev) or "test-dev".
        source: what the measured cells are read from: "results", "sweep" or "thing_preference".
        demo: a demo version (tiny stand-ins on synthetic data) is meaningful for this table; False where the
            tiny models differ in exactly what the table varies (backbones, heads, location layers, cost).
        notes: measurement protocol notes shown under the table.
    """

    id: str
    rows: tuple[RowSpec, ...]
    columns: tuple[ColumnSpec, ...]
    dataset: str = "coco"
    split: str = "val"
    source: str = "results"
    demo: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    def row(self, label: str) -> RowSpec:
        for r in self.rows:
            if r.label == label:
                return r
        raise KeyError(f"Table {self.id}: no row {label!r}")
