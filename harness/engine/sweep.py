"""Re-merge saved candidates under other mask-wise-merging settings and score them (Tables B.3, B.4).

``harness eval --save-candidates`` writes each image's candidates (scores, labels, raw low-resolution masks) per
corruption cell and mask layer (:mod:`harness.engine.candidates_io`). A sweep re-runs only the merge "(m)"
(:func:`models.postprocess.mask_wise_merge`) for every setting of the grid and scores it with the same
:class:`harness.metrics.pq.PQAccumulator` and :func:`harness.engine.scoring.add_prediction` as the evaluation,
with the grid's exact accumulation: at the run's own setting the rows equal the direct evaluation's exactly.

Settings (paper notation, Eq. 6 and Algorithm 1):

* ``alpha``, ``beta``: exponents of the class score and of the mask score (official 1, 2);
* ``t_cnf``: confidence threshold, for things and stuff alike (official 0.25; 0.3 for Swin-L / PVTv2-B5);
* ``t_keep``: a candidate is kept when at least ``t_keep`` of its binary mask is still free, i.e. the overlap
  limit is ``1 - t_keep``. The official code has two limits, 0.4 for things (t_keep 0.6, the paper's value) and
  0.2 for stuff (t_keep 0.8). ``t_keep_applies="things"`` (default, official) sets the thing limit and keeps the
  run's stuff limit; ``"both"`` sets both (the paper's single t_keep).

Scores accumulate as the evaluation grid's do (:class:`harness.engine.grid_stats.ExactPQ`: per-image statistics,
IoU sums added exactly and rounded once), so the numbers do not depend on image order or on how ``--workers``
split the images.
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from harness.engine.candidates_io import load_candidates, read_meta
from harness.engine.grid_stats import ExactPQ
from harness.engine.results import RESULT_COLUMNS, pq_columns
from harness.errors import UserError
from harness.io import atomic_write, atomic_write_json

__all__ = ["MergeSetting", "SweepPlan", "merge_kwargs", "default_setting", "plan_sweep", "run_sweep",
           "remerge_file", "SWEEP_COLUMNS", "OFFICIAL_M", "COMMAND", "legacy_sweep"]

log = logging.getLogger(__name__)

SWEEP_COLUMNS = ["alpha", "beta", "t_cnf", "t_keep"]
COMMAND = "sweep"
# Settings that must agree for rows to accumulate in one --out (models, cells, layers and the grid may grow).
MARKER_KEYS = ("source", "t_keep_applies", "data", "split", "boundary")
SWEEP_FILES = ("results.parquet", "results.csv", "run.json")
# Official "(m)" options (models.configs defaults) for runs whose meta lacks them.
OFFICIAL_M = {"thing_threshold": 0.25, "stuff_threshold": 0.25, "thing_overlap": 0.4, "stuff_overlap": 0.2}
_EPS = 1e-9


@dataclass(frozen=True)
class MergeSetting:
    """One point of the grid."""

    alpha: float
    beta: float
    t_cnf: float
    t_keep: float


def _same(a: float, b: float) -> bool:
    return abs(a - b) < _EPS


def default_setting(base: Mapping[str, Any]) -> MergeSetting:
    """The run's own setting: ``alpha``/``beta`` of the options (1, 2 when absent), t_cnf = thing threshold,
    t_keep = 1 - thing overlap."""
    return MergeSetting(float(base.get("alpha", 1.0)), float(base.get("beta", 2.0)),
                        float(base["thing_threshold"]), round(1.0 - float(base["thing_overlap"]), 12))


def merge_kwargs(setting: MergeSetting, base: Mapping[str, Any], t_keep_applies: str = "things") -> dict[str, Any]:
    """Keyword options of :func:`models.postprocess.mask_wise_merge` for ``setting``.

    Where the setting equals the run's own value, the run's option is passed unchanged (bit-identical floats),
    so the default setting reproduces the evaluation exactly.

    Args:
        setting: the grid point.
        base: the run's "(m)" options (``thing_threshold, stuff_threshold, thing_overlap, stuff_overlap`` ...).
        t_keep_applies: "things" (official: stuff keeps the run's limit) or "both" (the paper's single t_keep).
    """
    if t_keep_applies not in ("things", "both"):
        raise UserError(f"--t-keep-applies must be 'things' or 'both', got {t_keep_applies!r}")
    opts = dict(base)
    opts["alpha"], opts["beta"] = setting.alpha, setting.beta
    # t_cnf sets both thresholds; the run's own t_cnf (its thing threshold) keeps both as the run had them (a
    # config may give stuff another one), so the default setting reproduces the evaluation exactly.
    if not _same(setting.t_cnf, float(base["thing_threshold"])):
        opts["thing_threshold"] = opts["stuff_threshold"] = setting.t_cnf
    overlap = round(1.0 - setting.t_keep, 12)
    if not _same(overlap, float(base["thing_overlap"])):
        opts["thing_overlap"] = overlap
    if t_keep_applies == "both" and not _same(overlap, float(base["stuff_overlap"])):
        opts["stuff_overlap"] = overlap
    return opts


@dataclass
class SweepPlan:
    """What a sweep does: which models, cells, layers and settings, and the images in evaluation order."""

    source: Path
    models: list[str]
    metas: dict[str, dict[str, Any]]
    cells: dict[str, list[str]]
    layers: dict[str, list[str]]
    settings: list[MergeSetting]
    t_keep_applies: str
    data_root: Path
    split: str
    boundary: bool

    def marker_settings(self) -> dict[str, Any]:
        """What the output marker pins (:data:`MARKER_KEYS`; paths resolved, so ``runs/x`` and its absolute path
        agree)."""
        d = self.describe()
        return {**{k: d[k] for k in MARKER_KEYS}, "source": str(self.source.resolve()),
                "data": str(self.data_root.resolve())}

    def describe(self) -> dict[str, Any]:
        """JSON-able settings (``RUN2/run.json``)."""
        return {"command": "sweep", "source": str(self.source), "models": self.models, "cells": self.cells,
                "layers": self.layers, "grid": [asdict(s) for s in self.settings],
                "t_keep_applies": self.t_keep_applies, "data": str(self.data_root), "split": self.split,
                "boundary": self.boundary, "post_process": "m"}


def _grid(values: Mapping[str, Sequence[float]], default: MergeSetting) -> list[MergeSetting]:
    axes = [list(values.get(k) or [getattr(default, k)]) for k in SWEEP_COLUMNS]
    out = list(dict.fromkeys(MergeSetting(*map(float, p)) for p in itertools.product(*axes)))
    for s in out:
        if s.alpha < 0 or s.beta < 0 or s.t_cnf < 0 or not 0 < s.t_keep <= 1:
            raise UserError(f"invalid setting {asdict(s)}: alpha, beta, t_cnf >= 0 and 0 < t_keep <= 1")
    return out


def plan_sweep(source: str | Path, grid: Mapping[str, Sequence[float]], models: Sequence[str] = (),
               cells: Sequence[str] = (), layers: Sequence[str] = (), t_keep_applies: str = "things",
               data_root: str | Path | None = None, boundary: bool = False) -> SweepPlan:
    """Check the candidates of run ``source`` and build the plan (``UserError`` naming what is missing)."""
    src = Path(source)
    root = src / "candidates"
    if not root.is_dir():
        raise UserError(f"{src} has no candidates/ folder (run harness eval with --save-candidates)")
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    chosen = list(models) or found
    unknown = [m for m in chosen if m not in found]
    if unknown:
        raise UserError(f"{root}: no candidates for model(s) {', '.join(unknown)} (found: {', '.join(found)})")
    metas, cell_map, layer_map = {}, {}, {}
    defaults: list[MergeSetting] = []
    for m in chosen:
        meta = read_meta(root / m)
        opts = dict(meta.get("post_process_options", {}).get("m") or {})
        if not opts:
            log.warning("%s: no post_process_options.m in meta.json; using the official (m) options", root / m)
        meta["_m"] = {**OFFICIAL_M, **opts}
        metas[m] = meta
        have = sorted(p.name for p in (root / m).iterdir() if p.is_dir())
        want = list(cells) or have
        missing = [c for c in want if c not in have]
        if missing:
            raise UserError(f"{root / m}: no candidates for cell(s) {', '.join(missing)} (found: {', '.join(have)})")
        cell_map[m] = want
        run_layers = [str(x) for x in meta.get("layers", ["last"])]
        bad = [x for x in layers if x not in run_layers]
        if bad:
            raise UserError(f"{root / m}/meta.json: layer(s) {', '.join(bad)} not saved (saved: {', '.join(run_layers)})")
        layer_map[m] = list(layers) or run_layers
        defaults.append(default_setting(meta["_m"]))
    settings = _grid(grid, defaults[0])
    first = metas[chosen[0]]
    data = Path(data_root) if data_root is not None else Path(str(first.get("data", "")))
    if not data.is_dir():
        raise UserError(f"data set root {data} (from {root / chosen[0]}/meta.json) not found; pass --data ROOT")
    return SweepPlan(src, chosen, metas, cell_map, layer_map, settings, t_keep_applies, data,
                     str(first.get("split", "val2017")), boundary)


def _image_order(plan: SweepPlan, dataset: Any, model: str) -> list[tuple[Any, str]]:
    """(image id, file stem) in evaluation order (``RUN/image_ids.json``, else the data set's order)."""
    ids_path = plan.source / "image_ids.json"
    if ids_path.is_file():
        from harness.data.panoptic_json import check_image_id, read_json

        ids = read_json(ids_path, "image list")
        if not isinstance(ids, list):
            raise UserError(f"{ids_path}: expected a JSON list of image ids, got {type(ids).__name__}")
        ids = [check_image_id(v, f"{ids_path}: entry {k}") for k, v in enumerate(ids)]
    else:
        cell_dir = plan.source / "candidates" / model / plan.cells[model][0]
        stems = {p.stem for p in cell_dir.glob("*.npz")}
        ids = [i for i in dataset.image_ids if Path(dataset.image_info(i)["file_name"]).stem in stems]
    out = []
    for iid in ids:
        try:
            out.append((iid, Path(dataset.image_info(iid)["file_name"]).stem))
        except (KeyError, TypeError):
            raise UserError(f"image id {iid!r} of {plan.source} is not in {dataset.json_path}") from None
    return out


Key = tuple[str, str, str, MergeSetting]  # model, cell, layer, setting
@dataclass
class _Part:
    """Statistics of one row over some images."""

    mask: ExactPQ
    boundary: ExactPQ | None
    images: int = 0
    seconds: float = 0.0

    def merge(self, other: "_Part") -> None:
        self.mask.merge(other.mask)
        if self.boundary is not None and other.boundary is not None:
            self.boundary.merge(other.boundary)
        self.images += other.images
        self.seconds += other.seconds


def _score_part(plan: SweepPlan, settings: list[MergeSetting], part: int, parts: int) -> dict[Key, _Part]:
    """Merge + score images ``part::parts`` (evaluation order) for ``settings``."""
    import torch
    from tqdm import tqdm

    from harness.data.coco_panoptic import PanopticDataset
    from harness.engine.scoring import image_stats
    from harness.logging_utils import progress_disabled
    from harness.metrics.pq import CategoryTable, PQOptions, panoptic_from_semantic
    from models.postprocess import mask_wise_merge

    torch.set_num_threads(1)
    dataset = PanopticDataset(plan.data_root, split=plan.split, validate=False)
    cat_ids = list(dataset.categories.ids)
    table = CategoryTable(dataset.raw_categories)
    options = PQOptions(boundary=plan.boundary)
    out: dict[Key, _Part] = {}
    for model in plan.models:
        meta = plan.metas[model]
        saved = [c.get("id") if isinstance(c, dict) else c for c in meta.get("categories", [])]
        if saved and [int(c) for c in saved] != cat_ids:
            raise UserError(f"{plan.source}/candidates/{model}/meta.json: categories differ from "
                            f"{dataset.json_path}")
        num_things = int(meta.get("num_things", dataset.categories.num_things))
        kwargs = {s: merge_kwargs(s, meta["_m"], plan.t_keep_applies) for s in settings}
        rows = {(model, c, la, s): _Part(ExactPQ(len(table)), ExactPQ(len(table)) if plan.boundary else None)
                for c in plan.cells[model] for la in plan.layers[model] for s in settings}
        order = _image_order(plan, dataset, model)[part::parts]
        for iid, stem in tqdm(order, desc=f"sweep {model}", disable=progress_disabled() or part > 0):
            sample = dataset[dataset.index_of(iid)]
            for cell in plan.cells[model]:
                path = plan.source / "candidates" / model / cell / f"{stem}.npz"
                if not path.is_file():
                    raise UserError(f"missing candidates {path} (image {iid!r} of the evaluation)")
                _, out_size, per_layer = load_candidates(path)
                for layer in plan.layers[model]:
                    if layer not in per_layer:
                        raise UserError(f"{path}: no layer {layer!r}")
                    labels = per_layer[layer].labels
                    if labels.numel() and int(labels.max()) >= len(cat_ids):
                        raise UserError(f"{path}: layer {layer!r} has class {int(labels.max())}, but {len(cat_ids)} "
                                        f"categories in {dataset.json_path} (a run of another data set?)")
                    for s in settings:
                        t0 = time.perf_counter()
                        res = mask_wise_merge(per_layer[layer], num_things, out_size, **kwargs[s])
                        pred_ids, pred_segments = panoptic_from_semantic(res.category, res.instance, cat_ids)
                        mask, boundary = image_stats(table, options, sample, pred_ids, pred_segments)
                        row = rows[(model, cell, layer, s)]
                        row.mask.add(mask)
                        if row.boundary is not None and boundary is not None:
                            row.boundary.add(boundary)
                        row.images += 1
                        row.seconds += time.perf_counter() - t0
        out.update(rows)
    return out


def _summaries(plan: SweepPlan, parts: Mapping[Key, _Part]) -> dict[Key, tuple[dict[str, float], int, float]]:
    from harness.data.coco_panoptic import PanopticDataset
    from harness.metrics.pq import CategoryTable, summarize_stats

    table = CategoryTable(PanopticDataset(plan.data_root, split=plan.split, validate=False).raw_categories)
    out = {}
    for key, p in parts.items():
        summary = {"pq": summarize_stats(p.mask.to_pq_stats(), table, "PQ")}
        if p.boundary is not None:
            summary["boundary_pq"] = summarize_stats(p.boundary.to_pq_stats(), table, "Boundary PQ")
        out[key] = (pq_columns(summary), p.images, p.seconds)
    return out


def _groups(items: list[MergeSetting], size: int) -> list[list[MergeSetting]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def git_commit() -> str:
    """Commit of the harness source tree ("" outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, text=True,
                              capture_output=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _source_info(plan: SweepPlan) -> dict[str, dict[str, Any]]:
    """Per model: weights_sha256, dataset, subset of the source run's results rows (when present)."""
    info: dict[str, dict[str, Any]] = {}
    from harness.engine.results import read_table

    for name in ("results.parquet", "results.csv"):
        p = plan.source / name
        if p.is_file():
            df = read_table(p, "results table of the evaluation")
            missing = [c for c in ("model", "weights_sha256", "dataset", "split", "subset") if c not in df.columns]
            if missing:
                raise UserError(f"{p}: not a results table of harness eval (no column {missing[0]!r})")
            for m, g in df.groupby("model"):
                first = g.iloc[0]
                info[str(m)] = {k: first[k] for k in ("weights_sha256", "dataset", "split", "subset")}
            break
    return info


def _rows(plan: SweepPlan, stats: Mapping[Key, tuple[dict[str, float], int, float]], started: str,
          commit: str) -> list[dict[str, Any]]:
    src = _source_info(plan)
    rows = []
    for (model, cell, layer, s), (metrics, n, sec) in stats.items():
        corruption, severity = cell.rsplit("_", 1)
        base = src.get(model, {"weights_sha256": plan.metas[model].get("weights_sha256", ""),
                               "dataset": plan.data_root.name, "split": plan.split, "subset": math.nan})
        row: dict[str, Any] = {**base, "model": model, "corruption": corruption, "severity": int(severity),
                               "post_process": "m", "layer": layer, **metrics,
                               "ap_segm": math.nan, "ap_bbox": math.nan, "images": n,
                               "sec_per_image": sec / n if n else math.nan, "device": "cpu", "commit": commit,
                               "started_at": started, **asdict(s)}
        rows.append(row)
    return rows


def _write(out: Path, rows: list[dict[str, Any]]) -> None:
    import pandas as pd

    df = pd.DataFrame(rows)[RESULT_COLUMNS + SWEEP_COLUMNS]
    atomic_write(out / "results.parquet", lambda p: df.to_parquet(p, index=False))
    atomic_write(out / "results.csv", lambda p: df.to_csv(p, index=False))


def _existing(out: Path, plan: SweepPlan) -> list[dict[str, Any]]:
    """Rows already in ``out`` (resume); refuses a folder holding a sweep with other settings."""
    from harness.engine.results import read_table

    old = _read_run_json(out)
    if old is not None:
        mine = plan.marker_settings()
        for k in MARKER_KEYS:
            theirs = old.get(k)
            if k in ("source", "data") and isinstance(theirs, str):
                theirs = str(Path(theirs).resolve())
            if theirs != mine[k]:
                raise UserError(f"{out} holds a sweep with {k}={old.get(k)!r} (this one: {mine[k]!r}); "
                                f"use another --out")
    p = out / "results.parquet"
    if not p.is_file():
        return []
    df = read_table(p, "sweep results table")
    missing = [c for c in RESULT_COLUMNS + SWEEP_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{p}: not a sweep results table (missing {', '.join(missing)}); it was edited or damaged -- "
                        "delete it to recompute the sweep")
    return df.to_dict("records")


def _read_run_json(out: Path) -> dict[str, Any] | None:
    """``out/run.json`` of a sweep (None when absent); UserError naming it when it is not one."""
    from harness.data.panoptic_json import read_json

    path = out / "run.json"
    if not path.is_file():
        return None
    doc = read_json(path, "sweep description")
    if not isinstance(doc, dict) or doc.get("command") != COMMAND:
        raise UserError(f"{path} is not the description of a harness sweep; use another --out")
    return doc


def legacy_sweep(out: Path) -> dict[str, Any] | None:
    """Marker settings of a sweep folder written before output markers existed (it has a sweep ``run.json``)."""
    try:
        doc = _read_run_json(out)
    except UserError:
        return None
    if doc is None:
        return None
    settings = {k: doc.get(k) for k in MARKER_KEYS}
    for k in ("source", "data"):
        if isinstance(settings[k], str):
            settings[k] = str(Path(settings[k]).resolve())
    return {**settings, "status": "complete"}


def _done_key(r: Mapping[str, Any]) -> tuple:
    return (str(r["model"]), f"{r['corruption']}_{int(r['severity'])}", str(r["layer"]),
            MergeSetting(*(float(r[c]) for c in SWEEP_COLUMNS)))


def run_sweep(plan: SweepPlan, out_dir: str | Path, workers: int = 1, group: int = 8) -> "Any":
    """Run ``plan``, writing ``out_dir/results.parquet`` + ``.csv`` (RESULT_COLUMNS + alpha, beta, t_cnf, t_keep)
    and ``out_dir/run.json``. Settings are done ``group`` at a time (images split over ``workers`` processes) and
    written as each group finishes; settings already in ``out_dir`` are skipped (resume). Returns the results
    frame."""
    import pandas as pd

    from harness.io import init_worker_signals, stop_process_pool, sweep_stale_temporaries
    from harness.outputs import claim_output_dir

    out = Path(out_dir)
    if out.resolve() == plan.source.resolve():
        raise UserError(f"--out {out} is the source run; write the sweep to another folder")
    # Only a new or empty folder, or a sweep of the same run, data and options (its rows are kept and resumed).
    claim = claim_output_dir(out, COMMAND, plan.marker_settings(), legacy=legacy_sweep)
    sweep_stale_temporaries(out)
    if claim.previous is not None:  # an interrupted sweep of other settings: its files go, only those
        for name in SWEEP_FILES:
            (out / name).unlink(missing_ok=True)
    rows = _existing(out, plan)
    done = {_done_key(r) for r in rows}
    todo = [s for s in plan.settings if any((m, c, la, s) not in done for m in plan.models
                                           for c in plan.cells[m] for la in plan.layers[m])]
    atomic_write_json(out / "run.json", {**plan.describe(), "written_at": _now()}, indent=1)
    commit = git_commit()
    if not todo:
        log.info("all %d settings already in %s", len(plan.settings), out)
    # spawn: a forked child of a process that used OpenCV / torch thread pools can deadlock.
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init_worker_signals) if workers > 1 and todo else None
    try:
        for settings in _groups(todo, max(1, group)):
            started = _now()
            if pool is None:
                parts = _score_part(plan, settings, 0, 1)
            else:
                parts = {}
                for f in [pool.submit(_score_part, plan, settings, k, workers) for k in range(workers)]:
                    for key, p in f.result().items():  # exact sums: the merge order does not matter
                        if key in parts:
                            parts[key].merge(p)
                        else:
                            parts[key] = p
            new = _rows(plan, _summaries(plan, parts), started, commit)
            fresh = {_done_key(x) for x in new}
            rows = [r for r in rows if _done_key(r) not in fresh] + new
            _write(out, rows)
    except BaseException:
        stop_process_pool(pool)  # now: a worker's running share is dropped, its temporary files removed
        raise
    if pool is not None:
        pool.shutdown()
    claim.complete()
    return pd.DataFrame(rows)[RESULT_COLUMNS + SWEEP_COLUMNS] if rows else pd.DataFrame(
        columns=RESULT_COLUMNS + SWEEP_COLUMNS)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def remerge_file(path: str | Path, meta: Mapping[str, Any], method: str = "m", layer: str = "last",
                 **options: Any) -> tuple[Any, Any]:
    """Re-merge one saved candidates file (pictures in notebooks and reports).

    Args:
        path: ``RUN/candidates/<model>/<cell>/<stem>.npz``.
        meta: that model's ``meta.json`` (:func:`harness.engine.candidates_io.read_meta`).
        method: "m", "p", "p*" or "heuristic".
        layer: the mask layer.
        options: overrides of the run's options for ``method``.

    Returns:
        ``(image_id, PanopticResult)`` at the original image size.
    """
    from models.postprocess import post_process

    image_id, out_size, per_layer = load_candidates(path)
    if layer not in per_layer:
        raise UserError(f"{path}: no layer {layer!r} (has {', '.join(per_layer)})")
    opts = {**(meta.get("post_process_options", {}).get(method) or {}), **options}
    return image_id, post_process(method, per_layer[layer], int(meta["num_things"]), out_size, **opts)
