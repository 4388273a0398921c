"""`harness eval` as a grid: one model x cells (clean + corruption x severity) x post-processors x mask layers.

Pipeline (one process per device; ``torchrun`` starts several):

1. DataLoader workers decode, corrupt (COCO-C seed rule) and transform each (cell, image) (:mod:`grid_data`);
2. the main process runs one forward per image (per batch) and takes the candidates of every requested layer from
   it (plus the model's own post-processing when asked);
3. scorer processes post-process, score and write (:mod:`grid_score`), off the model's thread;
4. at the end of a cell every process's statistics are gathered and merged exactly (:mod:`grid_stats`); rank 0
   writes the cell file (:mod:`grid_store`) and rebuilds the tables (:mod:`grid_results`).

Images are split over processes by position (rank r takes positions r, r + N, ...; ``--shard i/n`` first keeps
positions i, i + n, ...). A cell is the unit of resumption: a re-run skips every cell with a file.

``sec_per_image`` (results column): mean wall-clock seconds of the model forward alone per image, from the
normalised input tensor on the device to the output dict, synchronised (``torch.cuda.synchronize``) before and
after on CUDA; the full model for layer ``last`` (every image of the cell), the truncated decoder
``model(x, mask_layer=k)`` for layer k (the first ``timing_images`` images of the cell in each process). Warm-up
forwards (``warmup`` per variant, once per process) are not timed. Data loading, post-processing and scoring are
not included; they run in other processes, overlapped with the model (see docs/robustness.md).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from harness.engine.distributed import (
    DistInfo,
    all_gather_objects,
    barrier,
    init_distributed,
    shutdown,
)
from harness.engine.grid_config import CLEAN_CELL, Cell, GridOptions, source_commit
from harness.engine.grid_data import (
    GridImages,
    collate_images,
    make_loader,
    valid_mask_size,
)
from harness.engine.grid_plan import GridPlan, on_main, plan_run, utc_now
from harness.engine.grid_results import (
    TableMeta,
    build_tables,
    check_results_files,
    write_tables,
)
from harness.engine.grid_score import (
    ScoreContext,
    ScoreJob,
    Scorer,
    candidates_to_arrays,
)
from harness.engine.grid_stats import CellState, ImageScore, merge_cells, row_key
from harness.engine.grid_store import read_cells, write_cell
from harness.errors import DataError
from harness.io import atomic_write_json
from harness.logging_utils import cpu_name, progress_disabled
from models.inference import LAST_LAYER

log = logging.getLogger(__name__)

__all__ = ["run_grid", "GridOutcome", "device_label"]


@dataclass
class GridOutcome:
    """What a run produced (rank 0; other ranks get empty tables).

    Attributes:
        out: the run folder.
        results / summary: the tables (empty for shard runs, which only write cells/).
        cells: every finished cell's statistics.
        plan: the resolved run.
    """

    out: Path
    results: pd.DataFrame
    summary: pd.DataFrame
    cells: dict[Cell, CellState]
    plan: GridPlan


def device_label(device: str, world_size: int = 1) -> str:
    """``NVIDIA H200`` / ``cpu: <model name>, 1 thread``; ``2 x ...`` for several processes."""
    if str(device).startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        threads = torch.get_num_threads()
        name = f"cpu: {cpu_name()}, {threads} thread{'s' if threads != 1 else ''}"
    return f"{world_size} x {name}" if world_size > 1 else name


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _default_score_workers(workers: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - workers - 1))


class _CellRunner:
    """Runs the pending cells of one process and, on rank 0, records them."""

    def __init__(self, plan: GridPlan, finished: dict[Cell, CellState]) -> None:
        self.plan = plan
        self.opts = plan.opts
        self.dist: DistInfo = plan.dist
        self.device = torch.device(plan.dist.device)
        self.finished = finished
        self.truncated = [layer for layer in plan.layers if layer != LAST_LAYER]
        self.warm = False
        self.state: CellState | None = None
        self.timed: dict[str, int] = {}
        self._instances: dict[str, Any] | None = None
        self.want_own = any(pp == "own" for pp, _ in plan.rows)
        self.data_wait = 0.0  # seconds the model waited for the DataLoader before the current batch

    # -- per batch --------------------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, pad: torch.Tensor | None, layer: int | None = None) -> tuple[Any, float]:
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.plan.model(x, pad, mask_layer=layer) if layer is not None else self.plan.model(x, pad)
        _sync(self.device)
        return out, time.perf_counter() - t0

    def batch(self, batch: list[dict[str, Any]], scorer: Scorer) -> None:
        assert self.state is not None
        state, plan, n = self.state, self.plan, len(batch)
        for item in batch:
            if "error" in item:  # a bad image, found in a DataLoader worker (grid_data.GridImages)
                raise DataError(item["error"])
        state.cost["waiting for data"] = state.cost.get("waiting for data", 0.0) + self.data_wait
        x, pad = collate_images(batch)
        x = x.to(self.device, non_blocking=True)
        pad = pad.to(self.device) if pad is not None else None
        if not self.warm:  # untimed warm-up of every variant timed below (allocator, kernels, caches)
            for variant in [None] + [int(k) for k in self.truncated]:
                for _ in range(self.opts.warmup):
                    self._forward(x, pad, variant)
            self.warm = True
        outputs, seconds = self._forward(x, pad)
        state.add_timing(LAST_LAYER, seconds, n)
        state.cost["forward"] = state.cost.get("forward", 0.0) + seconds
        for layer in self.truncated:
            if self.timed.get(layer, 0) < self.opts.timing_images:
                _, sec = self._forward(x, pad, int(layer))
                state.add_timing(layer, sec, n)
                self.timed[layer] = self.timed.get(layer, 0) + n
        t0 = time.perf_counter()
        waited = 0.0
        for i, item in enumerate(batch):
            ref = item["ref"]
            cands = {layer: plan.model.candidates(outputs, i, layer) for layer in plan.layers}
            valid = None
            if pad is not None:
                mask_hw = tuple(next(iter(cands.values())).masks.shape[-2:])
                valid = valid_mask_size(item["img_shape"], tuple(x.shape[-2:]), mask_hw)
                for c in cands.values():
                    c.masks = c.masks[:, : valid[0], : valid[1]]
            own = plan.model.own_post_process(outputs, i, item["ori_shape"], valid) if self.want_own else None
            job = ScoreJob(state.cell, ref.position, ref.image_id, ref.file_name, tuple(item["ori_shape"]),
                           {layer: candidates_to_arrays(c) for layer, c in cands.items()}, own, dict(item["cost"]))
            waited += scorer.submit(job)
        cost = state.cost
        cost["candidates + submit"] = cost.get("candidates + submit", 0.0) + time.perf_counter() - t0 - waited
        cost["waiting for scorers"] = cost.get("waiting for scorers", 0.0) + waited

    # -- per cell ---------------------------------------------------------------------------------------------
    def start_cell(self, cell: Cell) -> None:
        plan = self.plan
        self.state = CellState.empty(cell, [row_key(pp, layer) for pp, layer in plan.rows], len(plan.meta.categories),
                                     plan.opts.boundary, plan.opts.ap, plan.save_predictions)
        self.state.started_at = utc_now()
        self.timed = {}

    def on_result(self, score: ImageScore) -> None:
        assert self.state is not None
        self.state.add_image(score)

    def finish_cell(self, elapsed: float) -> None:
        assert self.state is not None
        plan = self.plan
        self.state.wall_seconds = elapsed
        parts = all_gather_objects(self.dist, self.state)
        self.state = None
        if self.dist.is_main:
            merged = merge_cells(parts)
            merged.device = device_label(str(self.device), self.dist.world_size)
            merged.commit = source_commit()
            shard = plan.shard_name
            if plan.save_predictions:
                self._write_prediction_jsons(merged)
            if plan.opts.ap and shard is None:
                self._evaluate_ap(merged)
            write_cell(plan.out, merged, shard, keep_detections=shard is not None)
            for row in merged.rows.values():  # kept in the cell file (shards) or no longer needed
                row.detections = row.annotations = None
            self.finished[merged.cell] = merged
            if shard is None:
                write_run_tables(plan.out, plan.cells, plan.meta, self.finished, plan.save_predictions)
            self._log_cell(merged, elapsed)
        # No barrier: the other ranks go on with the next cell while rank 0 writes; the next gather syncs them.

    def _log_cell(self, state: CellState, elapsed: float) -> None:
        from harness.engine.grid_results import result_rows

        first = result_rows(state, self.plan.meta)[0]
        shard = f" (shard {self.plan.shard_name})" if self.plan.shard_name else ""
        log.info("cell %s%s: %d images in %.1f s, %s/%s PQ %.2f, forward %.4f s/image", state.cell.name, shard,
                 len(state.positions), elapsed, first["post_process"], first["layer"], first["pq"],
                 first["sec_per_image"])

    def _write_prediction_jsons(self, state: CellState) -> None:
        plan = self.plan
        from harness.engine.results import path_name

        images = []
        for pos in sorted(state.positions):
            info = plan.dataset.image_info(plan.refs[pos].image_id)
            images.append({k: info[k] for k in ("id", "file_name", "height", "width") if k in info})
        for (pp, layer) in plan.rows:
            row = state.rows[row_key(pp, layer)]
            folder = plan.out / "predictions" / plan.cfg.name / state.cell.name / f"{path_name(pp)}_{layer}"
            atomic_write_json(folder / "panoptic.json", {"images": images, "annotations": row.sorted_annotations(),
                                                         "categories": [dict(c) for c in plan.categories.categories]})

    def _evaluate_ap(self, state: CellState) -> None:
        from harness.metrics.ap import evaluate_ap, panoptic_to_instances

        plan = self.plan
        if self._instances is None:
            gt = json.loads((plan.out / "gt_subset.json").read_text(encoding="utf-8"))
            self._instances = panoptic_to_instances(gt, plan.dataset.png_dir)
        for row in state.rows.values():
            res = evaluate_ap(self._instances, row.sorted_detections())
            row.ap = {k: (None if res[k]["AP"] is None else 100.0 * res[k]["AP"]) for k in ("segm", "bbox")}


def write_run_tables(out: Path, cells: list[Cell], meta: TableMeta, finished: dict[Cell, CellState],
                     save_predictions: bool) -> pd.DataFrame:
    """Rebuild results / per_class / summary from the finished cells (grid order); returns the results.

    A single-cell run (clean, one post-processor, last layer) also gets the files of the single-cell
    `harness eval`: ``pq.json`` and, with predictions, ``pred.json`` + ``pred/``. With thing-preference statistics
    the clean cell's are written too (:mod:`grid_extras`).
    """
    from harness.engine.grid_extras import write_thing_preference

    states = [finished[c] for c in cells if c in finished]
    results, per_class, summary = build_tables(states, meta)
    write_tables(out, results, per_class, summary)
    clean = finished.get(CLEAN_CELL)
    if clean is not None and clean.thing_preference is not None:
        write_thing_preference(out, clean.thing_preference)
    if cells == [CLEAN_CELL] and len(meta.rows) == 1 and len(states) == 1:
        _write_single_cell_files(out, meta, states[0], save_predictions)
    return results


def _write_single_cell_files(out: Path, meta: TableMeta, state: CellState, save_predictions: bool) -> None:
    from harness.engine.results import path_name
    from harness.metrics.pq import summarize_stats

    (pp, layer), = meta.rows
    row = state.rows[row_key(pp, layer)]
    table = meta.table()
    result: dict[str, Any] = {"pq": summarize_stats(row.mask.to_pq_stats(), table, "PQ")}
    if row.boundary is not None:
        result["boundary_pq"] = summarize_stats(row.boundary.to_pq_stats(), table, "Boundary PQ")
    result.update(num_images=len(state.positions), post_process=pp, model=meta.model)
    atomic_write_json(out / "pq.json", result, indent=2)
    if save_predictions:
        folder = Path("predictions") / meta.model / state.cell.name / f"{path_name(pp)}_{layer}"
        data = (out / folder / "panoptic.json").read_text(encoding="utf-8")
        atomic_write_json(out / "pred.json", json.loads(data))
        link = out / "pred"
        if link.is_symlink() or not link.exists():
            link.unlink(missing_ok=True)
            link.symlink_to(folder, target_is_directory=True)


def _load_finished(plan: GridPlan) -> dict[Cell, CellState]:
    """Rank 0: the run's finished cells; checks the results files against them (hand edits)."""
    finished = read_cells(plan.out, plan.cells, plan.rows, len(plan.meta.categories), plan.opts.boundary,
                          plan.shard_name)
    if finished and plan.shard_name is None:
        states = [finished[c] for c in plan.cells if c in finished]
        expected, _, _ = build_tables(states, plan.meta)
        check_results_files(plan.out, expected, list(finished))
    return finished


def run_grid(opts: GridOptions) -> GridOutcome:
    """Run (or resume) a grid; see the module docstring. Rank 0's outcome holds the tables."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    dist = init_distributed(opts.device)
    try:
        plan = plan_run(opts, dist)
        finished: dict[Cell, CellState] = {}

        def load() -> list[str]:
            finished.update(_load_finished(plan))
            return [c.name for c in finished]

        done = set(on_main(dist, load))
        pending = [c for c in plan.cells if c.name not in done]
        if done:
            log.info("resuming %s: %d of %d cells already finished", plan.out, len(done), len(plan.cells))
        if pending:
            _run_cells(plan, pending, finished)
            barrier(dist)  # every rank leaves together, after rank 0 wrote the last cell
        elif dist.is_main and plan.shard_name is None:
            write_run_tables(plan.out, plan.cells, plan.meta, finished, plan.save_predictions)  # rebuild tables lost after the last cell file (or deleted)
        if dist.is_main and plan.claim is not None:
            plan.claim.complete()  # every cell file and table is written
        results = summary = pd.DataFrame()
        if dist.is_main and plan.shard_name is None:
            from harness.engine.grid_results import RESULTS_PARQUET, SUMMARY_CSV

            results = pd.read_parquet(plan.out / RESULTS_PARQUET)
            summary = pd.read_csv(plan.out / SUMMARY_CSV, dtype={"layer": str})
        return GridOutcome(plan.out, results, summary, finished, plan)
    finally:
        shutdown(dist)


def _run_cells(plan: GridPlan, pending: list[Cell], finished: dict[Cell, CellState]) -> None:
    from tqdm import tqdm

    opts, dist = plan.opts, plan.dist
    positions = list(range(len(plan.refs)))
    if opts.shard is not None:
        positions = positions[opts.shard[0]::opts.shard[1]]
    mine = positions[dist.rank::dist.world_size]
    items = [(cell, plan.refs[p]) for cell in pending for p in mine]
    loader = make_loader(GridImages(items, plan.model.test_transform(), opts.channel_order), opts.batch_size,
                         opts.workers, pin_memory=str(dist.device).startswith("cuda"))
    runner = _CellRunner(plan, finished)
    score_workers = _default_score_workers(opts.workers) if opts.score_workers is None else opts.score_workers
    ctx = ScoreContext(
        categories=[dict(c) for c in plan.dataset.raw_categories], category_map=plan.categories,
        png_dir=str(plan.dataset.png_dir),
        annotations={r.image_id: plan.dataset.annotation(r.image_id) for r in plan.refs},
        rows=list(plan.rows), pp_options=plan.pp_options, boundary=opts.boundary, ap=opts.ap,
        predictions_root=str(plan.out / "predictions" / plan.cfg.name) if plan.save_predictions else None,
        candidates_root=str(plan.out / "candidates" / plan.cfg.name) if opts.save_candidates else None,
        thing_preference=plan.settings["thing_preference"])
    log.info("%s: %d cells x %d images (%d in this process), rows %s, %d loader / %d scorer processes",
             plan.out, len(pending), len(positions), len(mine), ", ".join(f"{p}/{l}" for p, l in plan.rows),
             opts.workers, score_workers)
    bar = tqdm(total=len(items), unit="img", desc="eval", disable=progress_disabled() or not dist.is_main)
    with torch.inference_mode(), Scorer(ctx, score_workers, runner.on_result) as scorer:
        it = iter(loader)
        nxt = next(it, None)
        for cell in pending:
            t0 = time.perf_counter()
            runner.start_cell(cell)
            bar.set_postfix_str(cell.name)
            while nxt is not None and nxt[0]["cell"] == cell:
                runner.batch(nxt, scorer)
                bar.update(len(nxt))
                t_wait = time.perf_counter()
                nxt = next(it, None)
                runner.data_wait = time.perf_counter() - t_wait
            scorer.drain()
            runner.finish_cell(time.perf_counter() - t0)
    bar.close()
