"""File-based PQ evaluation: COCO panoptic JSON + PNG folders, like panopticapi's `pq_compute`.

Same rules and the same numbers as `harness.metrics.pq` (one implementation). Differences from
panopticapi in what it accepts:

- predictions are matched to GT by image id; file names need not match the GT's;
- predictions for images absent from the GT are ignored with one warning that counts them;
- an image without prediction is an error, or with `allow_missing=True` all false negatives;
- bad input raises `DataError` naming the file, image id and segment id (no KeyError traces);
- `workers` sets the number of processes (panopticapi always uses one per CPU).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from tqdm import tqdm

from harness.errors import DataError
from harness.logging_utils import progress_disabled
from harness.metrics.pq import CategoryTable, PQAccumulator, PQOptions, PQStats, score_image

log = logging.getLogger(__name__)

_MIN_IMAGES_PER_WORKER = 32

__all__ = ["load_json", "evaluate_pq_files", "EvalJob"]


def load_json(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """Read a JSON object, raising DataError with the file name on any problem."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{what} {path} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{what} {path}: expected a JSON object at the top level")
    return obj


@dataclass
class EvalJob:
    """Everything a worker needs (picklable)."""

    gt_dir: str
    pred_dir: str
    categories: list[dict[str, Any]]
    options: PQOptions


Pair = tuple[dict[str, Any], dict[str, Any]]  # (GT annotation, predicted annotation) of one image


def _score_chunk(job: EvalJob, pairs: Sequence[Pair]) -> tuple[PQStats, PQStats | None, int]:
    """Score a chunk of (gt_ann, pred_ann) pairs; returns (mask stats, boundary stats, count)."""
    from harness.metrics.pngio import read_id_map

    table = CategoryTable(job.categories)
    mask = PQStats(len(table))
    boundary = PQStats(len(table)) if job.options.boundary else None
    for gt_ann, pred_ann in pairs:
        image_id = gt_ann["image_id"]
        gt_path = os.path.join(job.gt_dir, gt_ann["file_name"])
        pred_path = os.path.join(job.pred_dir, pred_ann["file_name"])
        try:
            gt_ids = read_id_map(gt_path)
            pred_ids = read_id_map(pred_path)
        except DataError as exc:
            raise DataError(f"image {image_id}: {exc}") from None
        try:
            score_image(
                gt_ids, gt_ann["segments_info"], pred_ids, pred_ann["segments_info"],
                table, job.options, mask, boundary, image_id, from_png=True,
            )
        except DataError as exc:
            raise DataError(f"{exc} (GT {gt_path}, prediction {pred_path})") from None
    return mask, boundary, len(pairs)


def _init_worker(boundary: bool) -> None:
    """One OpenCV thread per worker process: the workers already use every core."""
    if boundary:
        import cv2

        cv2.setNumThreads(1)


def _score_chunk_star(args: tuple[EvalJob, Sequence[Pair]]) -> tuple[PQStats, PQStats | None, int]:
    return _score_chunk(*args)


def _match_annotations(
    gt_json: dict[str, Any], pred_json: dict[str, Any], gt_json_path: Path, pred_json_path: Path, allow_missing: bool
) -> tuple[list[tuple[dict[str, Any], dict[str, Any]]], list[dict[str, Any]]]:
    """Pair GT and predicted annotations by image id, in GT order."""
    for key in ("annotations", "categories"):
        if key not in gt_json:
            raise DataError(f"GT JSON {gt_json_path} lacks key '{key}'")
    if "annotations" not in pred_json:
        raise DataError(f"prediction JSON {pred_json_path} lacks key 'annotations'")
    preds: dict[Any, dict[str, Any]] = {}
    for ann in pred_json["annotations"]:
        if "image_id" not in ann or "file_name" not in ann or "segments_info" not in ann:
            raise DataError(
                f"prediction JSON {pred_json_path}: an annotation lacks image_id, file_name or segments_info")
        if ann["image_id"] in preds:
            raise DataError(f"prediction JSON {pred_json_path}: image id {ann['image_id']} appears twice")
        preds[ann["image_id"]] = ann
    pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    missing: list[dict[str, Any]] = []
    seen: set[Any] = set()
    for ann in gt_json["annotations"]:
        if "image_id" not in ann or "file_name" not in ann or "segments_info" not in ann:
            raise DataError(f"GT JSON {gt_json_path}: an annotation lacks image_id, file_name or segments_info")
        image_id = ann["image_id"]
        if image_id in seen:
            raise DataError(f"GT JSON {gt_json_path}: image id {image_id} appears twice")
        seen.add(image_id)
        pred = preds.get(image_id)
        if pred is None:
            if not allow_missing:
                raise DataError(
                    f"no prediction for image id {image_id} in {pred_json_path} "
                    "(use --allow-missing to score missing images as all false negatives)"
                )
            missing.append(ann)
        else:
            pairs.append((ann, pred))
    extra = len(preds) - len(pairs)
    if extra:
        log.warning("ignoring predictions for %d image(s) that are not in the GT JSON %s", extra, gt_json_path)
    if missing:
        log.warning("%d GT image(s) have no prediction: scored as all false negatives (--allow-missing)", len(missing))
    return pairs, missing


def iter_chunks(items: Sequence[Any], num_chunks: int) -> Iterable[Sequence[Any]]:
    """Split into `num_chunks` contiguous chunks of near-equal size (like np.array_split)."""
    n = len(items)
    k = max(1, min(num_chunks, n)) if n else 1
    base, extra = divmod(n, k)
    start = 0
    for i in range(k):
        stop = start + base + (1 if i < extra else 0)
        yield items[start:stop]
        start = stop


def evaluate_pq_files(
    gt_json_path: str | os.PathLike[str],
    pred_json_path: str | os.PathLike[str],
    gt_dir: str | os.PathLike[str] | None = None,
    pred_dir: str | os.PathLike[str] | None = None,
    options: PQOptions = PQOptions(),
    workers: int = 1,
    allow_missing: bool = False,
    auto_workers: bool = False,
) -> dict[str, Any]:
    """Evaluate a COCO panoptic prediction against GT from files.

    Args:
        gt_json_path: GT panoptic JSON.
        pred_json_path: prediction panoptic JSON (segments need only `id` and `category_id`).
        gt_dir: GT PNG folder (default: the JSON path without ".json", as panopticapi).
        pred_dir: prediction PNG folder (same default).
        options: what to compute and which quirks to keep.
        workers: number of processes (1 = in this process).
        allow_missing: score GT images without prediction as all false negatives.
        auto_workers: `workers` is a default, not a request: use one process for small sets,
            where starting a pool costs more than it saves.

    Returns:
        {"pq": {...}, "boundary_pq": {...} (with options.boundary), "num_images": int}.
    """
    gt_json_path, pred_json_path = Path(gt_json_path), Path(pred_json_path)
    gt_dir = Path(gt_dir) if gt_dir is not None else gt_json_path.with_suffix("")
    pred_dir = Path(pred_dir) if pred_dir is not None else pred_json_path.with_suffix("")
    for d, what in ((gt_dir, "GT PNG folder"), (pred_dir, "prediction PNG folder")):
        if not d.is_dir():
            raise DataError(f"{what} is not a folder: {d}")
    gt_json = load_json(gt_json_path, "GT JSON")
    pred_json = load_json(pred_json_path, "prediction JSON")
    acc = PQAccumulator(
        gt_json.get("categories", []), options.boundary, options.dilation_ratio,
        options.all_crowd_regions, options.separate_boundary_label,
    )
    pairs, missing = _match_annotations(gt_json, pred_json, gt_json_path, pred_json_path, allow_missing)
    for ann in missing:
        acc.add_missing(ann["segments_info"], ann["image_id"])

    job = EvalJob(str(gt_dir), str(pred_dir), list(gt_json["categories"]), options)
    workers = max(1, min(int(workers), len(pairs)))
    if auto_workers and len(pairs) < _MIN_IMAGES_PER_WORKER * 2:
        workers = 1
    # Contiguous chunks summed in GT order (panopticapi: np.array_split + apply_async); more chunks
    # than workers only for the progress bar on large sets.
    per_chunk = max(_MIN_IMAGES_PER_WORKER, -(-len(pairs) // (workers * 8)))
    chunks = [(job, c) for c in iter_chunks(pairs, max(workers, -(-len(pairs) // per_chunk)))]
    with tqdm(total=len(pairs), unit="img", disable=progress_disabled() or len(pairs) < 100, leave=False) as bar:
        if workers == 1:
            results = map(_score_chunk_star, chunks)
            pool = None
        else:
            from harness.metrics.pngio import warm_up

            warm_up()  # load the compiled PNG kernel once, before the workers fork
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
            pool = multiprocessing.get_context(method).Pool(workers, _init_worker, (options.boundary,))
            results = pool.imap(_score_chunk_star, chunks)
        try:
            for mask, boundary, n in results:
                acc.merge(mask, boundary, n)
                bar.update(n)
        finally:
            if pool is not None:
                pool.terminate()
    result = acc.summarize()
    result["num_images"] = acc.num_images
    return result
