"""``harness eval --merge RUN_0 ... RUN_n-1 --out RUN``: combine shard runs (``--shard i/n``) exactly.

Each shard folder holds the same settings except ``shard`` and the cell files of its share of the images. The merge
checks that the n shards are 0/n .. n-1/n of one run, that every shard finished every cell and that together they
cover every image exactly once; then it adds the statistics (integers: exact, see :mod:`grid_stats`), evaluates AP
on the union of the detections, combines the prediction files, and writes ``RUN`` as an unsharded run would: the
same ``run.json`` settings (``shard`` null), cell files and tables. Merging again into the same ``RUN`` rewrites it
identically.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

from harness.engine.grid_config import (
    CLEAN_CELL,
    RUN_JSON,
    Cell,
    check_run_folder,
    claim_run,
    file_sha256,
    read_run_json,
    row_pairs,
    source_commit,
)
from harness.engine.grid_results import TableMeta
from harness.engine.grid_stats import CellState, merge_cells
from harness.engine.grid_store import cell_path, read_cell, write_cell
from harness.errors import UserError
from harness.io import atomic_write_json

log = logging.getLogger(__name__)

__all__ = ["merge_runs"]


def _run_doc(path: Path) -> dict[str, Any]:
    from harness.outputs import read_marker

    marker = read_marker(path)  # DataError for a garbage marker
    if marker is not None and marker["command"] != "eval":
        raise UserError(f"--merge {path} holds the output of 'harness {marker['command']}', not a shard of "
                        "'harness eval'")
    doc = read_run_json(path)
    if doc is None:
        raise UserError(f"{path} is not a grid run folder (no {RUN_JSON})")
    return doc


def _read_own_json(path: Path) -> Any:
    """A JSON file a shard run wrote (image_ids.json, gt_subset.json); UserError naming it when damaged."""
    from harness.data.panoptic_json import read_json

    try:
        return read_json(path, "shard file")
    except UserError as exc:
        raise UserError(f"{exc}; re-run that shard's command to rewrite it") from None


def _check_shards(sources: Sequence[Path]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(merged settings, info of shard 0); UserError naming the folder at fault."""
    from harness.engine.grid_config import first_difference

    docs = [_run_doc(p) for p in sources]
    n = len(sources)
    seen: dict[int, Path] = {}
    for path, doc in zip(sources, docs):
        shard = doc["settings"].get("shard")
        if not shard:
            raise UserError(f"{path} is not a shard run (made without --shard); nothing to merge")
        try:
            i, total = (int(v) for v in str(shard).split("/"))
        except ValueError:
            raise UserError(f"{path / RUN_JSON}: shard {shard!r} is not i/n; re-run that shard's command") from None
        if total != n:
            raise UserError(f"{path} is shard {shard}, but {n} folder(s) were given; pass all {total} shards")
        if i in seen:
            raise UserError(f"{path} and {seen[i]} are both shard {shard}")
        seen[i] = path
    base = {**docs[0]["settings"], "shard": None}
    for path, doc in zip(sources[1:], docs[1:]):
        diff = first_difference(base, {**doc["settings"], "shard": None})
        if diff is not None:
            raise UserError(f"{path} was run with other settings than {sources[0]} ({diff}); cannot merge them")
    ref = file_sha256(sources[0] / "image_ids.json")
    for path in sources[1:]:
        if file_sha256(path / "image_ids.json") != ref:
            raise UserError(f"{path / 'image_ids.json'} differs from {sources[0] / 'image_ids.json'}")
    return base, docs[0].get("info", {})


def _cells_of(settings: dict[str, Any]) -> list[Cell]:
    return [CLEAN_CELL] + [Cell(c, int(s)) for c in settings["corruptions"] for s in settings["severities"]]


def merge_runs(sources: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str]) -> Path:
    """Merge shard folders into ``out`` (see the module docstring); returns ``out``."""
    from harness.engine.grid import write_run_tables

    paths = [Path(p) for p in sources]
    out = Path(out)
    if out.resolve() in {p.resolve() for p in paths}:
        raise UserError(f"--out {out} is one of the shard folders; merge into a new folder")
    check_run_folder(out)
    settings, info = _check_shards(paths)
    gt = _read_own_json(paths[0] / "gt_subset.json")
    image_ids = _read_own_json(paths[0] / "image_ids.json")
    if not isinstance(gt, dict) or not isinstance(gt.get("categories"), list) or not isinstance(image_ids, list):
        raise UserError(f"{paths[0]}: gt_subset.json or image_ids.json is not what harness eval writes; re-run that "
                        "shard's command to rewrite it")
    cells = _cells_of(settings)
    rows = row_pairs(settings["post_process"], settings["layers"])
    categories = gt["categories"]
    boundary = bool(settings["boundary"])
    merged: dict[Cell, CellState] = {}
    for cell in cells:
        parts = []
        for k, path in enumerate(paths):
            f = cell_path(path, cell)
            if not f.exists():
                raise UserError(f"{path} lacks cell {cell.name} ({f}): that shard has not finished; re-run its "
                                "command to complete it, then merge again")
            parts.append(read_cell(f, rows, len(categories), boundary)[0])
        state = merge_cells(parts, [str(p) for p in paths])
        if state.positions != list(range(len(image_ids))):
            raise UserError(f"cell {cell.name}: the shards cover {len(state.positions)} of {len(image_ids)} images")
        state.commit = state.commit or source_commit()
        merged[cell] = state
    claim, _ = claim_run(out, settings, {**info, "merged_from": [str(p.resolve()) for p in paths]})
    atomic_write_json(out / "image_ids.json", image_ids)
    atomic_write_json(out / "gt_subset.json", gt)
    if settings["ap"]:
        _evaluate_ap(merged, gt, info, settings)
    for cell, state in merged.items():
        write_cell(out, state, None, keep_detections=False)
    if settings["save_predictions"]:
        _merge_predictions(paths, out, settings["model"], cells, rows, image_ids)
    if settings["save_candidates"]:
        _merge_tree(paths, out / "candidates", "candidates")
    meta = TableMeta(settings["model"], settings["weights_sha256"], settings["dataset"], settings["split"],
                     len(image_ids), tuple(rows), tuple(categories),
                     {int(c["id"]): str(c.get("name", c["id"])) for c in categories})
    write_run_tables(out, cells, meta, merged, bool(settings["save_predictions"]))
    claim.complete()
    log.info("merged %d shards into %s: %d cells x %d images", len(paths), out, len(cells), len(image_ids))
    return out


def _evaluate_ap(merged: dict[Cell, CellState], gt: dict[str, Any], info: dict[str, Any],
                 settings: dict[str, Any]) -> None:
    from harness.data.coco_panoptic import PanopticDataset
    from harness.metrics.ap import evaluate_ap, panoptic_to_instances

    data = info.get("data")
    if not data or not Path(data).is_dir():
        raise UserError(f"--ap needs the GT PNGs of the data set the shards used ({data}); it is not reachable here")
    png_dir = PanopticDataset(data, split=settings["split"]).png_dir
    instances = panoptic_to_instances(gt, png_dir)
    for state in merged.values():
        for key, row in state.rows.items():
            if row.detections is None:
                raise UserError(f"cell {state.cell.name} row {key}: the shard files hold no detections for --ap")
            res = evaluate_ap(instances, row.sorted_detections())
            row.ap = {k: (None if res[k]["AP"] is None else 100.0 * res[k]["AP"]) for k in ("segm", "bbox")}


def _link_or_copy(src: Path, dst: Path) -> None:
    from harness.io import atomic_link_or_copy

    atomic_link_or_copy(src, dst)


def _merge_predictions(paths: Sequence[Path], out: Path, model: str, cells: Sequence[Cell],
                       rows: Sequence[tuple[str, str]], image_ids: list[Any]) -> None:
    from harness.engine.results import path_name

    order = {iid: k for k, iid in enumerate(image_ids)}
    for cell in cells:
        for pp, layer in rows:
            rel = Path("predictions") / model / cell.name / f"{path_name(pp)}_{layer}"
            images: list[dict[str, Any]] = []
            anns: list[dict[str, Any]] = []
            categories: list[dict[str, Any]] = []
            for path in paths:
                doc = _read_own_json(path / rel / "panoptic.json")
                images += doc["images"]
                anns += doc["annotations"]
                categories = doc["categories"]
                for ann in doc["annotations"]:
                    _link_or_copy(path / rel / ann["file_name"], out / rel / ann["file_name"])
            images.sort(key=lambda im: order[im["id"]])
            anns.sort(key=lambda a: order[a["image_id"]])
            atomic_write_json(out / rel / "panoptic.json", {"images": images, "annotations": anns,
                                                            "categories": categories})


def _merge_tree(paths: Sequence[Path], dst: Path, name: str) -> None:
    for path in paths:
        src = path / name
        if not src.is_dir():
            continue
        for f in src.rglob("*"):
            if f.is_file():
                _link_or_copy(f, dst / f.relative_to(src))
