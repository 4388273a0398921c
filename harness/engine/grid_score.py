"""Post-processing and scoring of one image of a grid cell, off the model's thread.

The main process runs the model and sends, per image, the candidates of every requested layer (plain NumPy arrays,
so nothing but bytes crosses the process boundary) and, for ``--post-process own``, the model's own result. A
:class:`Scorer` then, for every (post-processor, layer): merges the candidates into a panoptic map, scores it
against the GT (read here, so the GT never travels through the model process) into fresh per-image statistics
(:mod:`harness.engine.grid_stats`), and optionally writes the prediction PNG, the AP detections, the candidates
file and the thing-preference counts.

``Scorer(ctx, workers=0)`` does this in the calling thread (tests, debugging); ``workers=K`` uses K processes
started with ``spawn`` (never ``fork``: the parent holds CUDA and OpenMP state).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from harness.data.coco_panoptic import PanopticSample, Segment
from harness.data.format import CategoryMap
from harness.engine.grid_config import Cell
from harness.engine.grid_stats import ImageScore, RowScore, row_key
from harness.engine.results import path_name
from harness.engine.scoring import image_stats
from harness.metrics.pq import PQAccumulator, panoptic_from_semantic
from models.postprocess import Candidates, PanopticResult, post_process

log = logging.getLogger(__name__)

__all__ = ["ScoreContext", "ScoreJob", "Scorer", "score_job", "candidates_to_arrays", "detections_from_ids"]


@dataclass
class ScoreContext:
    """What every scorer process needs, sent once (picklable).

    Attributes:
        categories: the GT JSON's category list (its order is the PQ averaging order).
        category_map: contiguous class index <-> category id.
        png_dir: GT PNG folder.
        annotations: image id -> GT annotation (``file_name``, ``segments_info``) of the run's images.
        rows: (post-processor, layer) pairs in results order; ``own`` rows are filled from the job's own result.
        pp_options: method -> keyword options of the post-processor.
        boundary / ap: extra statistics.
        predictions_root: ``RUN/predictions/<model>`` with ``--save-predictions``.
        candidates_root: ``RUN/candidates/<model>`` with ``--save-candidates``.
        thing_preference: keyword arguments of ``ThingPreferenceStats`` with ``--thing-preference``.
    """

    categories: list[dict[str, Any]]
    category_map: CategoryMap
    png_dir: str
    annotations: dict[Any, dict[str, Any]]
    rows: list[tuple[str, str]]
    pp_options: dict[str, dict[str, Any]]
    boundary: bool = False
    ap: bool = False
    predictions_root: str | None = None
    candidates_root: str | None = None
    thing_preference: dict[str, Any] | None = None


@dataclass
class ScoreJob:
    """One image of one cell, as the model produced it.

    Attributes:
        cell: the cell.
        position: the image's position in ``RUN/image_ids.json``.
        image_id / file_name: GT identity.
        out_size: (H, W) of the original image.
        candidates: layer -> arrays of :class:`models.postprocess.Candidates` (see `candidates_to_arrays`).
        own: the model's own post-processing of the last layer (``--post-process own``).
    """

    cell: Cell
    position: int
    image_id: Any
    file_name: str
    out_size: tuple[int, int]
    candidates: dict[str, dict[str, np.ndarray]]
    own: PanopticResult | None = None
    cost: dict[str, float] = field(default_factory=dict)


def candidates_to_arrays(c: Candidates) -> dict[str, np.ndarray]:
    """Candidates -> dict of NumPy arrays (what crosses the process boundary)."""
    out = {"scores": c.scores.numpy(), "labels": c.labels.numpy(), "masks": c.masks.numpy()}
    if c.boxes is not None:
        out["boxes"] = c.boxes.numpy()
    if c.query_index is not None:
        out["query_index"] = c.query_index.numpy()
    return out


def _arrays_to_candidates(a: dict[str, np.ndarray]) -> Candidates:
    import torch

    return Candidates(scores=torch.from_numpy(a["scores"]), labels=torch.from_numpy(a["labels"]),
                      masks=torch.from_numpy(a["masks"]),
                      boxes=torch.from_numpy(a["boxes"]) if "boxes" in a else None,
                      query_index=torch.from_numpy(a["query_index"]) if "query_index" in a else None)


# ----------------------------------------------------------------------------- the work


class _State:
    """Per-process scorer state built from the context once."""

    def __init__(self, ctx: ScoreContext) -> None:
        self.ctx = ctx
        acc = PQAccumulator(ctx.categories, boundary=ctx.boundary)
        self.table, self.options = acc.table, acc.options
        self.num_things = ctx.category_map.num_things


def _gt_sample(ctx: ScoreContext, image_id: Any, file_name: str) -> PanopticSample:
    """The GT of one image (PNG + JSON segments); the image itself is not needed and left empty."""
    from harness.data.coco_panoptic import read_id_png

    ann = ctx.annotations[image_id]
    id_map = read_id_png(Path(ctx.png_dir) / ann["file_name"])
    cmap = ctx.category_map
    segments = []
    for s in ann["segments_info"]:
        label = cmap.to_contiguous(s["category_id"])
        segments.append(Segment(id=int(s["id"]), category_id=int(s["category_id"]), label=label,
                                iscrowd=bool(s.get("iscrowd", 0)), area=int(s.get("area", -1)),
                                bbox=tuple(float(v) for v in s.get("bbox", (0, 0, 0, 0))),  # type: ignore[arg-type]
                                isthing=label < cmap.num_things, id_map=id_map))
    return PanopticSample(image_id, file_name, np.zeros((0, 0, 3), np.uint8), id_map, segments)


def detections_from_ids(result: PanopticResult, pred_ids: np.ndarray, pred_segments: list[dict[str, Any]],
                        image_id: Any, num_things: int, category_ids: tuple[int, ...]) -> list[dict[str, Any]]:
    """Thing segments of a prediction as COCO results (compressed RLE, box, score), in segment order."""
    from pycocotools import mask as mask_utils

    thing_ids = set(category_ids[:num_things])
    segs = [s for s in pred_segments if s["category_id"] in thing_ids]
    if not segs:
        return []
    ids = np.array([s["id"] for s in segs], np.int64)
    uniq, first = np.unique(pred_ids.ravel(), return_index=True)
    pix = first[np.searchsorted(uniq, ids)]
    labels, insts = result.category.ravel()[pix], result.instance.ravel()[pix]
    score_of = {(int(s["label"]), int(s["instance"])): float(s["score"]) for s in result.segments if s["isthing"]}
    id_t = np.ascontiguousarray(pred_ids.T)  # (W, H): stacking gives a Fortran-ordered (H, W, N) view
    masks = np.empty((len(ids),) + id_t.shape, np.uint8)
    for k, sid in enumerate(ids.tolist()):
        np.equal(id_t, sid, out=masks[k], casting="unsafe")
    rles = mask_utils.encode(masks.transpose(2, 1, 0))
    out = []
    for s, rle, label, inst in zip(segs, rles, labels.tolist(), insts.tolist()):
        rle["counts"] = rle["counts"].decode("ascii")
        out.append({"image_id": image_id, "category_id": int(s["category_id"]), "segmentation": rle,
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "score": score_of.get((int(label), int(inst)), 1.0)})
    return out


def _write_prediction(ctx: ScoreContext, folder: Path, job: ScoreJob, result: PanopticResult) -> dict[str, Any]:
    from harness.data.writer import PanopticPredictionWriter

    writer = PanopticPredictionWriter(folder, folder / "panoptic.json", ctx.category_map)
    extra = {int(s["instance"]): {"score": float(s["score"])} for s in result.segments if s["isthing"]}
    return writer.add_semantic(job.image_id, job.file_name, result.category, result.instance, extra)


def _score_one(state: _State, job: ScoreJob) -> ImageScore:
    ctx = state.ctx
    cost: dict[str, float] = dict(job.cost)
    t0 = time.perf_counter()
    sample = _gt_sample(ctx, job.image_id, job.file_name)
    cost["gt"] = cost.get("gt", 0.0) + time.perf_counter() - t0
    cands = {layer: _arrays_to_candidates(a) for layer, a in job.candidates.items()}
    rows: dict[str, RowScore] = {}
    for method, layer in ctx.rows:
        t0 = time.perf_counter()
        if method == "own":
            if job.own is None:
                raise RuntimeError(f"image {job.image_id}: no own post-processing result for layer {layer}")
            result = job.own
        else:
            result = post_process(method, cands[layer], state.num_things, job.out_size, **ctx.pp_options[method])
        t1 = time.perf_counter()
        pred_ids, pred_segments = panoptic_from_semantic(result.category, result.instance, ctx.category_map.ids)
        mask, boundary = image_stats(state.table, state.options, sample, pred_ids, pred_segments)
        t2 = time.perf_counter()
        score = RowScore(mask, boundary)
        if ctx.ap:
            score.detections = detections_from_ids(result, pred_ids, pred_segments, job.image_id,
                                                   state.num_things, ctx.category_map.ids)
        if ctx.predictions_root is not None:
            folder = Path(ctx.predictions_root) / job.cell.name / f"{path_name(method)}_{layer}"
            score.annotation = _write_prediction(ctx, folder, job, result)
        rows[row_key(method, layer)] = score
        cost[f"post_process {method}"] = cost.get(f"post_process {method}", 0.0) + t1 - t0
        cost["scoring"] = cost.get("scoring", 0.0) + t2 - t1
        cost["writing"] = cost.get("writing", 0.0) + time.perf_counter() - t2
    t0 = time.perf_counter()
    tp = None
    if ctx.thing_preference is not None and job.cell.clean:
        from harness.metrics.thing_preference import ThingPreferenceStats

        tp = ThingPreferenceStats(**ctx.thing_preference)
        tp.add(cands["last"], sample, job.out_size)
    if ctx.candidates_root is not None:
        from harness.engine.candidates_io import save_candidates

        stem = Path(job.file_name).stem
        save_candidates(Path(ctx.candidates_root) / job.cell.name / f"{stem}.npz", job.image_id, job.out_size, cands)
    cost["writing"] = cost.get("writing", 0.0) + time.perf_counter() - t0
    return ImageScore(job.position, rows, tp, cost)


_WORKER_STATE: _State | None = None


def _init_worker(ctx: ScoreContext) -> None:
    """Scorer process start: one thread each (the processes already share the cores); Ctrl-C / SIGTERM end it
    quietly with its temporary files removed (the main process logs one line and stops the pool)."""
    from harness.io import init_worker_signals

    def load() -> None:
        global _WORKER_STATE
        import cv2
        import torch

        torch.set_num_threads(1)
        cv2.setNumThreads(1)
        _WORKER_STATE = _State(ctx)

    init_worker_signals(load)


def score_job(job: ScoreJob) -> ImageScore:
    """Score one job in a scorer process (after `_init_worker`)."""
    assert _WORKER_STATE is not None, "scorer process not initialised"
    return _score_one(_WORKER_STATE, job)


class Scorer:
    """Scores jobs inline (``workers=0``) or in ``workers`` processes, at most ``max_pending`` in flight.

    Args:
        ctx: the scoring context.
        workers: scorer processes (0 = in the calling thread).
        on_result: called in the calling thread with each finished :class:`ImageScore`, in completion order.
        max_pending: jobs in flight before `submit` blocks (bounds memory; default 2 per worker + 2).
    """

    def __init__(self, ctx: ScoreContext, workers: int, on_result: Callable[[ImageScore], None],
                 max_pending: int | None = None) -> None:
        self.on_result = on_result
        self.workers = workers
        self.max_pending = max_pending or 2 * workers + 2
        self._pending: deque[cf.Future[ImageScore]] = deque()
        self._state = _State(ctx) if workers == 0 else None
        self._pool: cf.ProcessPoolExecutor | None = None
        if workers > 0:
            self._pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_init_worker, initargs=(ctx,))

    def submit(self, job: ScoreJob) -> float:
        """Score a job (inline: now; otherwise queue it, first collecting results if too many are in flight).

        Returns:
            Seconds the caller waited for the scorers (a run whose model waits here is scorer-bound).
        """
        if self._pool is None:
            assert self._state is not None
            self.on_result(_score_one(self._state, job))
            return 0.0
        t0 = time.perf_counter()
        while len(self._pending) >= self.max_pending:
            self._collect(block=True)
        waited = time.perf_counter() - t0
        self._pending.append(self._pool.submit(score_job, job))
        self._collect(block=False)
        return waited

    def _collect(self, block: bool) -> None:
        if block and self._pending:
            cf.wait(self._pending, return_when=cf.FIRST_COMPLETED)
        still: deque[cf.Future[ImageScore]] = deque()
        while self._pending:
            fut = self._pending.popleft()
            if fut.done():
                self.on_result(fut.result())  # re-raises a scorer's error here, in the main process
            else:
                still.append(fut)
        self._pending = still

    def drain(self) -> None:
        """Wait for every job submitted so far and hand over its result."""
        while self._pending:
            self._collect(block=True)

    def close(self, cancel: bool = False) -> None:
        """Stop the processes (``cancel``: now, dropping queued jobs, e.g. after an error, Ctrl-C or SIGTERM; the
        workers remove their temporary files and are joined, so none outlives the command)."""
        if self._pool is not None:
            if cancel:
                from harness.io import stop_process_pool

                stop_process_pool(self._pool)
            else:
                self._pool.shutdown(wait=True)
            self._pool = None
        self._pending.clear()

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(cancel=exc_type is not None)
