"""The paper's numbers: a shipped copy of ``shared/paper/tables.json`` (package data ``analysis/data/tables.json``).

Every "paper" cell of a rendered table comes from here and only from here; measured cells come from results
files (:mod:`analysis.runs`). Table ids are the paper's (``"1"`` .. ``"8"``, ``"10"``, ``"11"``, ``"B1"`` ..
``"B6"``, ``"D1"``; there is no Table 9); the JSON keys are ``table_<id>``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Mapping

__all__ = ["PaperTable", "paper_tables", "paper_table", "format_value", "TABLE_IDS", "normalise_table_id"]

# Paper order; there is no Table 9.
TABLE_IDS = ["1", "2", "3", "4", "5", "6", "7", "8", "10", "11", "B1", "B2", "B3", "B4", "B5", "B6", "D1"]


def normalise_table_id(value: str) -> str:
    """``"b.3"``, ``"B3"``, ``"table_B3"``, ``"11"`` -> ``"B3"`` / ``"11"``; ``ValueError`` for unknown ids."""
    v = str(value).strip()
    if v.lower().startswith("table_"):
        v = v[len("table_"):]
    elif v.lower().startswith("table"):
        v = v[len("table"):].strip()
    v = v.replace(".", "").replace(" ", "").upper()
    if v not in TABLE_IDS:
        raise ValueError(f"unknown table {value!r}; the paper's tables are {', '.join(TABLE_IDS)} (no Table 9)")
    return v


@dataclass(frozen=True)
class PaperTable:
    """One table of the paper as in ``tables.json``.

    Attributes:
        id: paper id (``"11"``, ``"B3"``).
        title: e.g. ``"Table 11"``.
        caption: the paper's caption.
        setting: data set / model / protocol notes of the transcription.
        columns: JSON column keys, label columns first.
        rows: one dict per printed row (numbers as JSON numbers; ``None`` for a printed "-").
        decimals: printed decimals per numeric column.
    """

    id: str
    title: str
    caption: str
    setting: str
    columns: tuple[str, ...]
    rows: tuple[Mapping[str, Any], ...]
    decimals: Mapping[str, int]

    def find_row(self, match: Mapping[str, Any]) -> Mapping[str, Any]:
        """The unique row whose label columns equal ``match`` (``KeyError`` naming the table otherwise)."""
        found = [r for r in self.rows if all(r.get(k) == v for k, v in match.items())]
        if len(found) != 1:
            raise KeyError(f"{self.title}: {len(found)} rows match {dict(match)}")
        return found[0]

    def value(self, match: Mapping[str, Any], key: str) -> float | None:
        """The paper's number in column ``key`` of the row matching ``match`` (None for a printed "-")."""
        row = self.find_row(match)
        if key not in row:
            raise KeyError(f"{self.title}: no column {key!r}")
        v = row[key]
        return None if v is None else float(v)


def _load() -> dict[str, Any]:
    text = resources.files("analysis").joinpath("data/tables.json").read_text(encoding="utf-8")
    return json.loads(text)


@lru_cache(maxsize=1)
def paper_tables() -> dict[str, PaperTable]:
    """All tables of the paper, by id (in paper order)."""
    raw = _load()
    out: dict[str, PaperTable] = {}
    for tid in TABLE_IDS:
        t = raw[f"table_{tid}"]
        out[tid] = PaperTable(
            id=tid,
            title=t["title"],
            caption=t["caption"],
            setting=t.get("setting", ""),
            columns=tuple(t["columns"]),
            rows=tuple(t["rows"]),
            decimals=dict(t.get("decimals", {})),
        )
    return out


def paper_table(table_id: str) -> PaperTable:
    """One paper table (``"11"``, ``"B.3"`` ... accepted)."""
    return paper_tables()[normalise_table_id(table_id)]


def format_value(value: float | None, decimals: int) -> str:
    """A number as the paper prints it (``decimals`` places); empty string for None / NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{decimals}f}"
