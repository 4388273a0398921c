"""File-based PQ evaluation: COCO panoptic JSON + PNG folders, like panopticapi's `pq_compute`.

Same rules and the same numbers as `harness.metrics.pq` (one implementation of the rules, in numpy,
mirrored in C). Differences from panopticapi in what it accepts:

- predictions are matched to GT by image id; file names need not match the GT's;
- predictions for images absent from the GT are ignored with one warning that counts them;
- an image without prediction is an error, or with `allow_missing=True` all false negatives;
- bad input raises `DataError` naming the file, image id and segment id (no KeyError traces);
- `workers` sets the number of threads or processes (panopticapi always uses one process per CPU).

How it runs: with the compiled kernel (`harness.metrics.native`) each chunk of images is scored by
one C call in a thread (ctypes releases the GIL, so `workers` threads use `workers` cores, with no
process start-up, pickling or numpy import); the kernel stops before any image it cannot score
exactly (an unusual PNG, bad input, the BOUNDARY_ID quirk) and that image goes through the numpy
path, which also names the file at fault. Without the kernel, chunks go to a process pool running
the numpy path. Both paths sum the same chunks in the same order, so the floats are identical.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, NamedTuple, Sequence

from harness.errors import DataError
from harness.logging_utils import progress_disabled
from harness.metrics.pq_core import CategoryTable, Counts, PQOptions, summarize_stats

if TYPE_CHECKING:
    from harness.metrics.native import Native
    from harness.metrics.pq import PQStats

log = logging.getLogger(__name__)

_MIN_IMAGES_PER_WORKER = 32

__all__ = ["read_inputs", "evaluate_pq_files", "EvalJob"]


class EvalJob(NamedTuple):
    """Everything a worker needs (picklable)."""

    gt_dir: str
    pred_dir: str
    categories: list[dict[str, Any]]
    options: PQOptions


Pair = tuple[dict[str, Any], dict[str, Any]]  # (GT annotation, predicted annotation) of one image


def _score_one(job: EvalJob, table: CategoryTable, gt_ann: dict[str, Any], pred_ann: dict[str, Any],
               mask: PQStats, boundary: PQStats | None) -> None:
    """Score one image with numpy (any PNG decoder); raises DataError naming the image and files."""
    from harness.metrics.pngio import read_id_map
    from harness.metrics.pq import score_image

    image_id = gt_ann["image_id"]
    try:
        gt_path = os.path.join(job.gt_dir, gt_ann["file_name"])
        pred_path = os.path.join(job.pred_dir, pred_ann["file_name"])
    except TypeError:
        raise DataError(f"image {image_id}: file_name must be a string (GT {gt_ann['file_name']!r}, "
                        f"prediction {pred_ann['file_name']!r})") from None
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


def _score_chunk(job: EvalJob, pairs: Sequence[Pair]) -> tuple[PQStats, PQStats | None, int]:
    """Score a chunk of (gt_ann, pred_ann) pairs with numpy; returns (mask stats, boundary stats, count)."""
    from harness.metrics.pq import PQStats

    table = CategoryTable(job.categories)
    mask = PQStats(len(table))
    boundary = PQStats(len(table)) if job.options.boundary else None
    for gt_ann, pred_ann in pairs:
        _score_one(job, table, gt_ann, pred_ann, mask, boundary)
    return mask, boundary, len(pairs)


def _init_worker(boundary: bool) -> None:
    """One OpenCV thread per worker process (the workers already use every core); SIGTERM / Ctrl-C end a worker
    quietly (the parent reports the interruption in one line and stops the pool)."""
    from harness.io import init_worker_signals

    init_worker_signals()
    if boundary:
        import cv2

        cv2.setNumThreads(1)


def _start_method() -> str | None:
    """``fork`` (fast) in a fresh process; ``spawn`` once OpenCV or torch are loaded: a forked child inherits their
    thread pools in whatever state the parent left them and can deadlock on its first OpenCV call."""
    import multiprocessing
    import sys

    if "fork" not in multiprocessing.get_all_start_methods():
        return None
    if "cv2" in sys.modules or "torch" in sys.modules:
        return "spawn"
    return "fork"


def _score_chunk_star(args: tuple[EvalJob, Sequence[Pair]]) -> tuple[PQStats, PQStats | None, int]:
    return _score_chunk(*args)


def _pack_segments(segments: Any, index: dict[Any, int], ids: array, cats: array, crowd: array | None,
                   area: array | None) -> bool:
    """Append one side's segments to the kernel's arrays; False (nothing appended) when anything is
    unusual, so that the numpy path raises its precise error for that image."""
    marks = [len(a) for a in (ids, cats, crowd, area) if a is not None]
    try:
        for s in segments:
            cats.append(index[s["category_id"]])
            ids.append(s["id"])
            if crowd is not None and area is not None:
                crowd.append(s.get("iscrowd", 0) == 1)
                a = s.get("area")
                area.append(-1 if a is None else a)
        return True
    except Exception:  # noqa: BLE001 - KeyError, TypeError, OverflowError, ...: numpy path decides
        for a, m in zip([a for a in (ids, cats, crowd, area) if a is not None], marks):
            del a[m:]
        return False


def _score_chunk_native(lib: Native, job: EvalJob, table: CategoryTable,
                        pairs: Sequence[Pair]) -> tuple[Counts, Counts | None, int]:
    """Score a chunk with the compiled kernel (GIL released); images it stops at go through numpy."""
    n = len(pairs)
    mask = Counts(len(table))
    boundary = Counts(len(table)) if job.options.boundary else None
    paths = bytearray()
    path_off = array("q")
    gstart, gid, gcat, gcrowd, garea = array("q", [0]), array("q"), array("i"), array("B"), array("q")
    pstart, pid, pcat = array("q", [0]), array("q"), array("i")
    ready = bytearray(n)  # 1: the kernel may score this image
    index = table.index
    for k, (gt_ann, pred_ann) in enumerate(pairs):
        ok = False
        try:
            gp = os.fsencode(os.path.join(job.gt_dir, gt_ann["file_name"]))
            pp = os.fsencode(os.path.join(job.pred_dir, pred_ann["file_name"]))
            ok = b"\0" not in gp and b"\0" not in pp
        except (TypeError, ValueError):
            gp = pp = b""
        ok = ok and _pack_segments(gt_ann["segments_info"], index, gid, gcat, gcrowd, garea)
        if ok and not _pack_segments(pred_ann["segments_info"], index, pid, pcat, None, None):
            del gid[gstart[-1]:], gcat[gstart[-1]:], gcrowd[gstart[-1]:], garea[gstart[-1]:]
            ok = False
        ready[k] = ok
        for p in (gp, pp) if ok else (b"", b""):
            path_off.append(len(paths))
            paths += p + b"\0"
        gstart.append(len(gid))
        pstart.append(len(pid))
    for a in (gid, gcat, gcrowd, garea, pid, pcat, path_off):
        a.append(0)  # never empty: buffer addresses stay valid
    opts = array("q", [int(job.options.boundary), int(job.options.all_crowd_regions),
                       int(job.options.separate_boundary_label), table.boundary_id])
    status = array("q", [0, 0])
    out = boundary or mask  # boundary counts go nowhere without --boundary
    addr = [a.buffer_info()[0] for a in (path_off, gstart, gid, gcat, gcrowd, garea, pstart, pid, pcat, opts)]
    counts = [a.buffer_info()[0] for a in (mask.tp, mask.fp, mask.fn, mask.iou, out.tp, out.fp, out.fn, out.iou)]
    path_bytes = bytes(paths)
    ctx = lib.ctx()
    i = 0
    while i < n:
        j = i
        while j < n and ready[j]:
            j += 1
        if j > i:
            stop = lib.lib.pq_score_files(ctx, i, j, path_bytes, *addr, float(job.options.dilation_ratio), *counts,
                                          status.buffer_info()[0])
            if stop < j:
                log.debug("kernel stopped at image %s (%s): numpy path", pairs[stop][0].get("image_id"),
                          _stop_reason(int(status[0])))
                j = stop
            i = j
        if i < n:
            _score_slow(job, table, pairs[i], mask, boundary)
            i += 1
    return mask, boundary, n


def _stop_reason(code: int) -> str:
    from harness.metrics.native import STOP_REASONS

    return STOP_REASONS.get(code, f"code {code}")


def _score_slow(job: EvalJob, table: CategoryTable, pair: Pair, mask: Counts, boundary: Counts | None) -> None:
    """The numpy path for one image, adding into the chunk's counts in place (same order of sums)."""
    from harness.metrics.pq import PQStats

    _score_one(job, table, pair[0], pair[1], PQStats.view(mask), PQStats.view(boundary) if boundary else None)


def _run_threads(lib: Native, job: EvalJob, table: CategoryTable, chunks: Sequence[Sequence[Pair]],
                 workers: int) -> Iterator[tuple[Counts, Counts | None, int]]:
    """Score chunks in `workers` threads; yields results in chunk order (errors too, in that order)."""
    if workers <= 1 or len(chunks) <= 1:
        for c in chunks:
            yield _score_chunk_native(lib, job, table, c)
        return
    results: list[Any] = [None] * len(chunks)
    done = [threading.Event() for _ in chunks]
    take = itertools.count()  # next() on a count is atomic under the GIL
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            i = next(take)
            if i >= len(chunks):
                return
            try:
                results[i] = (True, _score_chunk_native(lib, job, table, chunks[i]))
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                results[i] = (False, exc)
            done[i].set()

    threads = [threading.Thread(target=work, daemon=True, name=f"pq-{k}") for k in range(min(workers, len(chunks)))]
    for t in threads:
        t.start()
    try:
        for i in range(len(chunks)):
            done[i].wait()
            ok, value = results[i]
            results[i] = None
            if not ok:
                raise value
            yield value
    finally:
        stop.set()
        for t in threads:
            t.join()


def read_inputs(gt_json_path: str | os.PathLike[str], pred_json_path: str | os.PathLike[str],
                allow_missing: bool = False) -> tuple[list[dict[str, Any]], list[Pair], list[dict[str, Any]]]:
    """Read and validate both JSON files with the shared reader (:mod:`harness.data.panoptic_json`: every
    command refuses the same mistakes with the same words) and pair them by image id, in GT order.

    Returns:
        ``(GT categories, (GT annotation, predicted annotation) pairs, GT annotations without prediction)``.

    Raises:
        DataError: naming the file and the entry (image id, segment) at fault.
    """
    from harness.data.panoptic_json import load_panoptic, pair_by_image

    # A GT segment listed with id 0 is scored as a segment, as panopticapi does (kept for exact parity).
    gt = load_panoptic(gt_json_path, "GT JSON", void_segment=True)
    pred = load_panoptic(pred_json_path, "prediction JSON", categories=gt.categories, require_categories=False)
    # --allow-missing: a prediction file matching no GT image scores every image as missing (with a warning).
    pairs, missing = pair_by_image(gt, pred, allow_missing, refuse_unmatched=not allow_missing)
    if missing:
        log.warning("%d GT image(s) have no prediction: scored as all false negatives (--allow-missing)", len(missing))
    return list(gt.categories or []), pairs, missing


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
    """Evaluate a COCO panoptic prediction against GT from files (exactly panopticapi's numbers).

    Args:
        gt_json_path: GT panoptic JSON.
        pred_json_path: prediction panoptic JSON (segments need only `id` and `category_id`).
        gt_dir: GT PNG folder (default: the JSON path without ".json", as panopticapi).
        pred_dir: prediction PNG folder (same default).
        options: what to compute and which quirks to keep.
        workers: number of threads (compiled kernel) or processes (numpy path); 1 = this thread.
        allow_missing: score GT images without prediction as all false negatives.
        auto_workers: `workers` is a default, not a request: use one worker for small sets.

    Returns:
        {"pq": {...}, "boundary_pq": {...} (with options.boundary), "num_images": int}.
    """
    gt_json_path, pred_json_path = Path(gt_json_path), Path(pred_json_path)
    gt_dir = Path(gt_dir) if gt_dir is not None else gt_json_path.with_suffix("")
    pred_dir = Path(pred_dir) if pred_dir is not None else pred_json_path.with_suffix("")
    for d, what in ((gt_dir, "GT PNG folder"), (pred_dir, "prediction PNG folder")):
        if not d.is_dir():
            raise DataError(f"{what} is not a folder: {d}")
    categories, pairs, missing = read_inputs(gt_json_path, pred_json_path, allow_missing)
    table = CategoryTable(categories)
    mask = Counts(len(table))
    boundary = Counts(len(table)) if options.boundary else None
    if missing:
        from harness.metrics.pq import PQAccumulator, PQStats

        acc = PQAccumulator(categories, options.boundary)
        acc.mask, acc.boundary = PQStats.view(mask), PQStats.view(boundary) if boundary else None
        for ann in missing:
            acc.add_missing(ann["segments_info"], ann["image_id"])

    job = EvalJob(str(gt_dir), str(pred_dir), categories, options)
    workers = max(1, min(int(workers), len(pairs)))
    if auto_workers and len(pairs) < _MIN_IMAGES_PER_WORKER * 2:
        workers = 1
    # Contiguous chunks summed in GT order (panopticapi: np.array_split + apply_async); more chunks
    # than workers only for the progress bar and load balance on large sets.
    per_chunk = max(_MIN_IMAGES_PER_WORKER, -(-len(pairs) // (workers * 8)))
    chunks = list(iter_chunks(pairs, max(workers, -(-len(pairs) // per_chunk))))
    from harness.metrics import native

    lib = native.load()
    bar = None
    if not progress_disabled() and len(pairs) >= 100:
        from tqdm import tqdm

        bar = tqdm(total=len(pairs), unit="img", leave=False)
    pool = None
    try:
        if lib is not None:
            results: Iterable[tuple[Any, Any, int]] = _run_threads(lib, job, table, chunks, workers)
        elif workers == 1:
            results = map(_score_chunk_star, [(job, c) for c in chunks])
        else:
            import multiprocessing

            pool = multiprocessing.get_context(_start_method()).Pool(workers, _init_worker, (options.boundary,))
            results = pool.imap(_score_chunk_star, [(job, c) for c in chunks])
        for m, b, n in results:
            mask += m
            if boundary is not None:
                boundary += b
            if bar is not None:
                bar.update(n)
    finally:
        if pool is not None:
            from harness.io import stop_process_pool

            stop_process_pool(pool)
        if bar is not None:
            bar.close()
    result: dict[str, Any] = {"pq": summarize_stats(mask, table, "PQ")}
    if boundary is not None:
        result["boundary_pq"] = summarize_stats(boundary, table, "Boundary PQ")
    result["num_images"] = len(pairs) + len(missing)
    return result
