"""Evaluate table specs on results and render them as Markdown, LaTeX and long-form CSV.

Each rendered cell holds the **measured** value (from results files only), the **paper** value (from the shipped
``tables.json`` only) and their difference. A cell without measurement stays empty.

Which rows measure a table: the spec's real models first; when none of them has a measurement, the tiny stand-ins
(:data:`analysis.model_names.DEMO_STANDINS`) render a *demo version*: same paper rows and columns, but every
measured number comes from a different model on a different data set, which the caption and a "measured with"
column state. Real and stand-in rows are never mixed in one table.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from analysis.model_names import DEFAULT_VARIANT, default_post_process
from analysis.paper import PaperTable, format_value, paper_table
from analysis.paper_specs import TABLE_SPECS
from analysis.runs import RunData, unique_values
from analysis.specs import CorruptionMean, CorruptionsMean, Frames, RowSpec, TableSpec
from analysis.thing_preference import bins_from_queries
from harness.io import atomic_write_text

__all__ = ["Cell", "RenderedTable", "build_table", "build_tables", "write_table", "CSV_COLUMNS", "missing_rows"]

CSV_COLUMNS = ["table", "row", "column", "measured", "paper", "diff", "source"]
DEMO_WARNING = ("DEMO VERSION: the measured numbers come from tiny CPU models on the synthetic data set, not from "
                "the paper's models on COCO; they show that the pipeline runs, they are not comparable with the "
                "paper's numbers.")


@dataclass
class Cell:
    """One cell: measured (None = not measured), paper (None = printed "-"), printed decimals, result files."""

    row: str
    column: str
    measured: float | None
    paper: float | None
    decimals: int
    sources: tuple[str, ...] = ()

    @property
    def diff(self) -> float | None:
        if self.measured is None or self.paper is None:
            return None
        return self.measured - self.paper


@dataclass
class RenderedTable:
    """A table with its cells, ready to write.

    Attributes:
        spec, paper: the spec and the paper's table.
        cells: row-major, every (row, column) of the spec.
        demo: measured with tiny stand-ins on synthetic data.
        measured_with: row label -> "model [variant] (post_process)" of the measurement ("" when none).
        measured_on: data sets, splits, image counts and devices of the measurement.
    """

    spec: TableSpec
    paper: PaperTable
    cells: list[Cell]
    demo: bool
    measured_with: dict[str, str]
    measured_on: dict[str, list[str]] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def n_measured(self) -> int:
        return sum(c.measured is not None for c in self.cells)

    def title(self) -> str:
        return self.paper.title + (" (demo version)" if self.demo else "")

    def caption(self) -> str:
        on = self.measured_on
        parts = [self.paper.caption]
        where = ", ".join(filter(None, [
            "data set " + "/".join(on.get("dataset", [])) if on.get("dataset") else "",
            "split " + "/".join(on.get("split", [])) if on.get("split") else "",
            "images " + "/".join(on.get("images", [])) if on.get("images") else "",
            "device " + "/".join(on.get("device", [])) if on.get("device") else "",
            "severities " + ",".join(on.get("severities", [])) if on.get("severities") else "",
        ]))
        parts.append(f"Measured: {where or 'see sources'}. Paper: {self.paper.setting}")
        if self.demo:
            parts.append(DEMO_WARNING)
        parts.append("Cells: measured / paper (measured - paper); empty = not measured.")
        return " ".join(parts)

    def frame(self) -> pd.DataFrame:
        """Long form: ``table, row, column, measured, paper, diff, source`` (NaN where empty)."""
        nan = math.nan
        rows = [{"table": self.id, "row": c.row, "column": c.column,
                 "measured": nan if c.measured is None else c.measured,
                 "paper": nan if c.paper is None else c.paper,
                 "diff": nan if c.diff is None else c.diff,
                 "source": ";".join(c.sources)} for c in self.cells]
        return pd.DataFrame(rows, columns=CSV_COLUMNS)

    def _grid(self) -> tuple[list[str], list[str], dict[tuple[str, str], Cell]]:
        rows = [r.label for r in self.spec.rows]
        cols = [c.name for c in self.spec.columns]
        return rows, cols, {(c.row, c.column): c for c in self.cells}

    @staticmethod
    def _text(c: Cell, dash: str = "–") -> str:
        m = format_value(c.measured, c.decimals) or dash
        p = format_value(c.paper, c.decimals) or dash
        d = c.diff
        return f"{m} / {p}" + (f" ({d:+.{c.decimals}f})" if d is not None else "")

    def markdown(self) -> str:
        rows, cols, cells = self._grid()
        head = ["Row", "Measured with"] + cols
        lines = [f"**{self.title()}.** {self.caption()}", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            vals = [self._text(cells[(r, c)]) for c in cols]
            lines.append("| " + " | ".join([r, self.measured_with.get(r, "")] + vals) + " |")
        notes = list(self.spec.notes) + [f"{r.label}: {r.note}" for r in self.spec.rows if r.note]
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
        return "\n".join(lines) + "\n"

    def latex(self) -> str:
        rows, cols, cells = self._grid()
        spec = "ll" + "c" * len(cols)
        lines = ["\\begin{table}[t]", "\\centering", "\\scriptsize", f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
                 " & ".join(["Row", "Measured with"] + [_tex(c) for c in cols]) + " \\\\", "\\midrule"]
        for r in rows:
            vals = [_tex(self._text(cells[(r, c)], dash="--")) for c in cols]
            lines.append(" & ".join([_tex(r), _tex(self.measured_with.get(r, ""))] + vals) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}", f"\\caption{{{_tex(self.title() + '. ' + self.caption())}}}",
                  f"\\label{{tab:measured_{self.id}}}", "\\end{table}"]
        return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}", "–": "--", "−": "-", "α": r"$\alpha$", "β": r"$\beta$",
        "†": r"$\dagger$"}


def _tex(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def _table_rows(spec: TableSpec, df: pd.DataFrame) -> pd.DataFrame:
    """Rows of the table's data set kind and split kind."""
    if df.empty:
        return df
    ade = df["dataset"].astype(str).str.lower().str.contains("ade")
    test = df["split"].astype(str).str.lower().str.startswith("test")
    keep = (ade if spec.dataset == "ade20k" else ~ade) & (test if spec.split == "test-dev" else ~test)
    return df[keep]


def _row_frames(spec: TableSpec, row: RowSpec, data: RunData, models: Sequence[str], results: pd.DataFrame,
                tp: pd.DataFrame) -> tuple[Frames, str] | None:
    """Frames of the first model in ``models`` that has any data for this row, and its description."""
    sel = row.select
    assert sel is not None
    for model in models:
        mine = results[(results["model"] == model) & (results["variant"] == sel.variant)]
        layer_ok = mine[mine["layer"] == sel.layer]
        if sel.sweep is None:
            layer_ok = layer_ok[layer_ok["alpha"].isna()]
        else:
            layer_ok = layer_ok[layer_ok["alpha"].notna()]
        chosen, used_pp = mine.iloc[0:0], ""
        for pp in sel.post_process or (default_post_process(model),):
            if (layer_ok["post_process"] == pp).any():
                chosen, used_pp = mine[mine["post_process"] == pp], pp
                break
        prof = data.profile[(data.profile["model"] == model) & (data.profile["variant"] == sel.variant)] \
            if len(data.profile) else data.profile
        queries = tp[(tp["model"] == model) & (tp["variant"] == sel.variant)] if len(tp) else tp
        bins = pd.DataFrame()
        if len(queries):
            bins = bins_from_queries(queries)
            bins["source"] = ";".join(unique_values(queries["source"]))
        if chosen.empty and prof.empty and bins.empty:
            continue
        if spec.source == "thing_preference" and bins.empty:
            continue
        what = model + ("" if sel.variant == DEFAULT_VARIANT or sel.variant in model else f" [{sel.variant}]")
        what += f" ({used_pp})" if used_pp else ""
        return Frames(chosen, prof, bins, sel.layer, sel.sweep, row.bin_label), what
    return None


def _evaluate(spec: TableSpec, data: RunData, demo: bool) -> RenderedTable:
    paper = paper_table(spec.id)
    results = _table_rows(spec, data.results)
    tp = _table_rows(spec, data.thing_preference) if len(data.thing_preference) else data.thing_preference
    cells: list[Cell] = []
    measured_with: dict[str, str] = {}
    used: list[pd.DataFrame] = []
    for row in spec.rows:
        found = None
        if row.select is not None:
            models = row.select.standins() if demo else row.select.models
            found = _row_frames(spec, row, data, models, results, tp) if models else None
        row_cells = []
        for col in spec.columns:
            value, sources = (None, ())
            if found is not None and col.measure is not None:
                value, sources = col.measure(found[0])
            row_cells.append(Cell(row.label, col.name, value, paper.value(row.paper, col.key),
                                  paper.decimals.get(col.key, 1), sources))
        cells.extend(row_cells)
        if found is not None and any(c.measured is not None for c in row_cells):
            measured_with[row.label] = found[1]
            res = found[0].results
            used.append(res[res["alpha"].isna()] if row.select.sweep is None else res[res["alpha"].notna()])
            if spec.source == "thing_preference" and len(tp):
                used.append(tp[tp["source"].isin(found[0].bins["source"].str.split(";").explode())])
    on: dict[str, list[str]] = {}
    frames = [u for u in used if len(u)]
    if frames:
        allrows = pd.concat(frames, ignore_index=True)
        for key in ("dataset", "split", "images", "device"):
            if key in allrows.columns:
                vals = allrows[key].map(lambda v: f"{int(v)}" if isinstance(v, float) and v.is_integer() else v)
                on[key] = unique_values(vals)
        if any(isinstance(c.measure, (CorruptionMean, CorruptionsMean)) for c in spec.columns):
            on["severities"] = [str(v) for v in sorted(set(allrows["severity"].astype(int)) - {0})]
    return RenderedTable(spec, paper, cells, demo, measured_with, on)


def build_table(spec: TableSpec | str, data: RunData) -> RenderedTable | None:
    """Evaluate one table on ``data``: the real models' version, else the demo version, else None (no rows)."""
    if isinstance(spec, str):
        from analysis.paper_specs import table_spec

        spec = table_spec(spec)
    real = _evaluate(spec, data, demo=False)
    if real.n_measured:
        return real
    if not spec.demo:
        return None
    demo = _evaluate(spec, data, demo=True)
    return demo if demo.n_measured else None


def build_tables(data: RunData, table_ids: Sequence[str] | None = None) -> list[RenderedTable]:
    """Every table (or those in ``table_ids``) that has at least one measured cell, in paper order."""
    from analysis.paper import normalise_table_id

    ids = [normalise_table_id(t) for t in table_ids] if table_ids else list(TABLE_SPECS)
    out = []
    for tid in ids:
        t = build_table(TABLE_SPECS[tid], data)
        if t is not None:
            out.append(t)
    return out


def missing_rows(spec: TableSpec, data: RunData | None) -> list[RowSpec]:
    """Rows of ``spec`` that are reproducible here but have no measured cell in ``data`` (all when None)."""
    rows = [r for r in spec.rows if r.select is not None and r.recipe is not None]
    if data is None:
        return rows
    table = _evaluate(spec, data, demo=False)
    have = {c.row for c in table.cells if c.measured is not None}
    return [r for r in rows if r.label not in have]


def write_table(table: RenderedTable, out_dir: str | Path) -> dict[str, Path]:
    """Write ``table_<id>.md``, ``.tex``, ``.csv`` and ``.json`` (caption, demo flag, measured-with) to ``out_dir``."""
    out = Path(out_dir)
    stem = f"table_{table.id}"
    paths = {
        "md": atomic_write_text(out / f"{stem}.md", table.markdown()),
        "tex": atomic_write_text(out / f"{stem}.tex", table.latex()),
        "csv": atomic_write_text(out / f"{stem}.csv", table.frame().to_csv(index=False)),
    }
    meta: dict[str, Any] = {"table": table.id, "title": table.title(), "demo": table.demo,
                            "caption": table.caption(), "measured_with": table.measured_with,
                            "measured_on": table.measured_on, "measured_cells": table.n_measured}
    paths["json"] = atomic_write_text(out / f"{stem}.json", json.dumps(meta, indent=1))
    return paths
