"""Cell files: the durable, exactly mergeable statistics of each finished cell (``RUN/cells/<cell>.json``).

A cell file is written atomically when a cell finishes, before the tables are rebuilt from all cell files, so a
killed run loses at most the cell in progress and a resumed run skips every cell that has a file. Shard runs
(``--shard i/n``) write the same files over their share of the images, plus the AP detections when ``--ap`` is on
(AP needs every detection of the cell at once); ``harness eval --merge`` adds them up exactly.

Layout of one file::

    {"format", "cell": {"corruption", "severity"}, "positions": [...], "shard": "i/n" | null,
     "rows": [{"post_process", "layer", "mask": ExactPQ, "boundary": ExactPQ | null, "ap": {...} | null,
               "detections": [[position, [COCO results ...]], ...] | null}],
     "timing": {layer: [seconds, images]}, "cost": {stage: seconds}, "device", "started_at", "commit",
     "wall_seconds",
     "thing_preference": ThingPreferenceStats.state_dict() | null}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from harness.engine.grid_config import Cell
from harness.engine.grid_stats import CellState, ExactPQ, RowState, row_key
from harness.errors import UserError
from harness.io import atomic_write_json

__all__ = ["CELLS_DIR", "cell_path", "write_cell", "read_cell", "read_cells"]

CELLS_DIR = "cells"
CELL_FORMAT = "psf-harness/eval-grid-cell/v1"


def cell_path(out: Path, cell: Cell) -> Path:
    return out / CELLS_DIR / f"{cell.name}.json"


def _tp_from_state(state: dict[str, Any] | None) -> Any:
    if state is None:
        return None
    from harness.metrics.thing_preference import ThingPreferenceStats

    return ThingPreferenceStats.from_state_dict(state)


def write_cell(out: Path, state: CellState, shard: str | None, keep_detections: bool) -> Path:
    """Write one finished cell (atomic).

    Args:
        out: run folder.
        state: the merged statistics of the cell (over all of this run's images, or the shard's).
        shard: ``i/n`` for a shard run.
        keep_detections: store the AP detections (shard runs: the merge evaluates AP).
    """
    rows = []
    for key, row in state.rows.items():
        pp, layer = key.split("|", 1)
        rows.append({"post_process": pp, "layer": layer, "mask": row.mask.to_json(),
                     "boundary": row.boundary.to_json() if row.boundary is not None else None, "ap": row.ap,
                     "detections": sorted(row.detections, key=lambda t: t[0])
                     if keep_detections and row.detections is not None else None})
    doc = {"format": CELL_FORMAT, "cell": {"corruption": state.cell.corruption, "severity": state.cell.severity},
           "positions": sorted(state.positions), "shard": shard, "rows": rows,
           "timing": state.timing, "cost": state.cost, "device": state.device, "started_at": state.started_at,
           "commit": state.commit, "wall_seconds": state.wall_seconds,
           "thing_preference": None if state.thing_preference is None else state.thing_preference.state_dict()}
    return atomic_write_json(cell_path(out, state.cell), doc)


def read_cell(path: Path, row_pairs: Sequence[tuple[str, str]], num_classes: int,
              boundary: bool) -> tuple[CellState, str | None]:
    """Read and check one cell file against the run's rows: ``(statistics, shard "i/n" or None)``.

    Raises:
        UserError: naming the file, when it is unreadable or does not fit the run.
    """
    hint = "delete it to recompute that cell"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not readable ({exc}); {hint}") from None
    try:
        if doc.get("format") != CELL_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {CELL_FORMAT!r}")
        cell = Cell(str(doc["cell"]["corruption"]), int(doc["cell"]["severity"]))
        if path.stem != cell.name:
            raise ValueError(f"it holds cell {cell.name}")
        by_key = {row_key(r["post_process"], r["layer"]): r for r in doc["rows"]}
        want = [row_key(pp, layer) for pp, layer in row_pairs]
        if sorted(by_key) != sorted(want):
            raise ValueError(f"rows {sorted(by_key)}, the run has {sorted(want)}")
        rows = {}
        for key in want:
            r = by_key[key]
            if boundary != (r["boundary"] is not None):
                raise ValueError(f"row {key}: boundary statistics {'missing' if boundary else 'unexpected'}")
            rows[key] = RowState(ExactPQ.from_json(r["mask"], num_classes),
                                 ExactPQ.from_json(r["boundary"], num_classes) if boundary else None,
                                 [(int(p), d) for p, d in r["detections"]] if r.get("detections") is not None
                                 else None, None, r.get("ap"))
        state = CellState(cell, rows, [int(p) for p in doc["positions"]],
                          {k: [float(v[0]), int(v[1])] for k, v in doc["timing"].items()},
                          {k: float(v) for k, v in doc.get("cost", {}).items()},
                          _tp_from_state(doc.get("thing_preference")), str(doc.get("device", "")),
                          str(doc.get("started_at", "")), str(doc.get("commit", "")),
                          float(doc.get("wall_seconds", 0.0)))
        shard = doc.get("shard")
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise UserError(f"{path} is not a valid cell file ({exc}); {hint}") from None
    return state, shard


def read_cells(out: Path, cells: Sequence[Cell], row_pairs: Sequence[tuple[str, str]], num_classes: int,
               boundary: bool, shard: str | None) -> dict[Cell, CellState]:
    """The finished cells of a run folder (cells without a file are not finished)."""
    found: dict[Cell, CellState] = {}
    known = {c.name for c in cells}
    folder = out / CELLS_DIR
    if folder.is_dir():
        for path in sorted(folder.glob("*.json")):
            if path.stem not in known:
                raise UserError(f"{path} is not a cell of this run; remove it (run.json lists the run's cells)")
    for cell in cells:
        path = cell_path(out, cell)
        if path.exists():
            state, written_by = read_cell(path, row_pairs, num_classes, boundary)
            if written_by != shard:
                raise UserError(f"{path} was written by shard {written_by}, this run is shard {shard}; "
                                "delete it to recompute that cell")
            found[cell] = state
    return found
