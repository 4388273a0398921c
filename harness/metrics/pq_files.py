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
import json
import logging
import os
import sys
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
    gt_json: str = "GT JSON"  # the files, for messages naming the entry at fault
    pred_json: str = "prediction JSON"


Pair = tuple[dict[str, Any], dict[str, Any]]  # (GT annotation, predicted annotation) of one image


def _score_one(job: EvalJob, table: CategoryTable, gt_ann: dict[str, Any], pred_ann: dict[str, Any],
               mask: PQStats, boundary: PQStats | None) -> None:
    """Score one image with numpy (any PNG decoder); raises DataError naming the image and files."""
    from harness.metrics.pngio import read_id_map
    from harness.metrics.pq import score_image

    image_id = gt_ann["image_id"]
    check_segments(job, table, gt_ann, pred_ann)
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


def check_segments(job: EvalJob, table: CategoryTable, gt_ann: dict[str, Any], pred_ann: dict[str, Any]) -> None:
    """The precise checks of one image's segments, in the words of the shared reader
    (:func:`harness.data.panoptic_json.check_segments`): the numpy path runs them on every image, the kernel path
    only on an image whose segments its fast checks (:func:`_pack_segments`) did not accept."""
    from harness.data.panoptic_json import check_segments as check

    cat_ids = set(table.index)
    check(gt_ann["segments_info"], f"GT JSON {job.gt_json}: image id {gt_ann['image_id']!r}", cat_ids,
          void_segment=True)
    check(pred_ann["segments_info"], f"prediction JSON {job.pred_json}: image id {pred_ann['image_id']!r}", cat_ids)


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

    def load() -> None:
        if boundary:
            import cv2

            cv2.setNumThreads(1)

    init_worker_signals(load)


def _score_chunk_star(args: tuple[EvalJob, Sequence[Pair]]) -> tuple[PQStats, PQStats | None, int]:
    return _score_chunk(*args)


_NUMBER_TYPES = frozenset((int, float))  # `x - x == 0` below: False for nan and +-inf
_MAX_SEGMENT_ID = 256**3


def _pack_segments(segments: Any, index: dict[Any, int], ids: array, cats: array, crowd: array | None,
                   area: array | None, first_id: int = 1) -> bool:
    """Append one side's segments to the kernel's arrays; False (nothing appended) when anything is unusual, so
    that the numpy path names the mistake (:func:`check_segments`) or scores the image itself.

    The checks are those of the shared reader's fast path (``harness.data.panoptic_json.load_panoptic``: integer
    ids in ``[first_id, 256^3)``, unique, known integer category ids, ``iscrowd`` 0/1, finite non-negative areas,
    ``[x, y, w, h]`` boxes, finite scores), made here in the one pass the kernel needs anyway: validating costs
    eval-pq nearly nothing.
    """
    marks = [len(a) for a in (ids, cats, crowd, area) if a is not None]
    try:
        seen: set[int] = set()
        for s in segments:
            get = s.get
            sid, cid = get("id"), get("category_id")
            v, a, b, sc = get("iscrowd", 0), get("area", 0), get("bbox"), get("score", 0)
            if not (type(sid) is int and first_id <= sid < _MAX_SEGMENT_ID and sid not in seen and type(cid) is int
                    and (v == 0 or v == 1) and type(v) in (int, bool) and type(a) in _NUMBER_TYPES and a >= 0
                    and a - a == 0 and type(sc) in _NUMBER_TYPES and sc - sc == 0
                    and (b is None or (type(b) is list and len(b) == 4 and type(b[0]) in _NUMBER_TYPES
                                       and type(b[1]) in _NUMBER_TYPES and type(b[2]) in _NUMBER_TYPES
                                       and type(b[3]) in _NUMBER_TYPES and b[2] >= 0 and b[3] >= 0
                                       and (b[0] - b[0]) + (b[1] - b[1]) + (b[2] - b[2]) + (b[3] - b[3]) == 0))):
                raise ValueError(sid)
            seen.add(sid)
            cats.append(index[cid])
            ids.append(sid)
            if crowd is not None and area is not None:
                crowd.append(v == 1)
                a = get("area")
                area.append(-1 if a is None else a)
        return True
    except Exception:  # noqa: BLE001 - KeyError, TypeError, OverflowError, ...: the numpy path decides
        for arr, m in zip([x for x in (ids, cats, crowd, area) if x is not None], marks):
            del arr[m:]
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
        ok = ok and _pack_segments(gt_ann["segments_info"], index, gid, gcat, gcrowd, garea, first_id=0)
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


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read())
    except Exception:  # noqa: BLE001 - the shared reader re-reads the file and says what is wrong, in its words
        from harness.data.panoptic_json import read_json

        return read_json(path, what)


def _plain_name(name: Any) -> bool:
    return type(name) is str and name != "" and "/" not in name and "\\" not in name and name != ".."


def _structure_ok(doc: Any, gt: bool) -> bool:
    """The shared reader's checks above the segments (top level, categories, images, annotations), fast: True when
    all is well, False when anything is unusual (the shared reader then names it, or accepts it)."""
    if type(doc) is not dict or type(doc.get("annotations")) is not list:
        return False
    cats = doc.get("categories")
    if cats is None and gt:
        return False
    if cats is not None:
        if type(cats) is not list:
            return False
        ids = set()
        for c in cats:
            if type(c) is not dict or type(c.get("id")) is not int or c["id"] in ids:
                return False
            ids.add(c["id"])
            if c.get("isthing") not in (0, 1) or type(c.get("isthing")) not in (int, bool):
                return False
            if "name" in c and type(c["name"]) is not str:
                return False
            col = c.get("color")
            if col is not None and not (type(col) is list and len(col) == 3
                                        and all(type(x) is int and 0 <= x <= 255 for x in col)):
                return False
    images = doc.get("images")
    if images is not None:
        if type(images) is not list:
            return False
        seen: set[Any] = set()
        for img in images:
            if type(img) is not dict:
                return False
            iid = img.get("id")
            if not (type(iid) is int or (type(iid) is str and iid)) or iid in seen or not _plain_name(img.get("file_name")):
                return False
            seen.add(iid)
            for key in ("height", "width"):
                if key in img and not (type(img[key]) is int and img[key] >= 1):
                    return False
    seen = set()
    for ann in doc["annotations"]:
        if type(ann) is not dict:
            return False
        iid = ann.get("image_id")
        if not (type(iid) is int or (type(iid) is str and iid)) or iid in seen:
            return False
        seen.add(iid)
        if not _plain_name(ann.get("file_name")) or type(ann.get("segments_info")) is not list:
            return False
    return True


def read_inputs(gt_json_path: str | os.PathLike[str], pred_json_path: str | os.PathLike[str],
                allow_missing: bool = False) -> tuple[list[dict[str, Any]], list[Pair], list[dict[str, Any]]]:
    """Read both JSON files and pair their annotations by image id, in GT order, refusing what the shared reader
    (:mod:`harness.data.panoptic_json`, used by every other command) refuses, with its words.

    eval-pq keeps its own fast reader (the shared one would cost it a measurable share of its run time): the
    checks above the segments run here in one pass over the annotations; the segments are checked where the
    kernel packs them anyway (:func:`_pack_segments`) or, on the numpy path, by :func:`check_segments`. Anything
    unusual is handed to the shared reader, which names the file and the entry (or accepts it: the fast checks
    are stricter, never looser).

    Returns:
        ``(GT categories, (GT annotation, predicted annotation) pairs, GT annotations without prediction)``.

    Raises:
        DataError: naming the file and the entry (image id, segment) at fault.
    """
    gt_path, pred_path = Path(gt_json_path), Path(pred_json_path)
    gt = _read_json(gt_path, "GT JSON")
    pred = _read_json(pred_path, "prediction JSON")
    if not (_structure_ok(gt, gt=True) and _structure_ok(pred, gt=False)):
        _shared_reader(gt_path, pred_path, allow_missing)  # raises, naming the entry
    categories = gt["categories"]
    preds = {ann["image_id"]: ann for ann in pred["annotations"]}
    pairs: list[Pair] = []
    missing: list[dict[str, Any]] = []
    for ann in gt["annotations"]:
        pa = preds.get(ann["image_id"])
        if pa is not None:
            pairs.append((ann, pa))
        elif allow_missing:
            missing.append(ann)
        else:
            _shared_reader(gt_path, pred_path, allow_missing)  # "no prediction for image id ...", with its hints
    extra = len(preds) - len(pairs)
    if extra:  # predictions of other images: ignored, but checked as the shared reader checks every annotation
        _shared_reader(gt_path, pred_path, allow_missing)
    elif missing:
        log.warning("%d GT image(s) have no prediction: scored as all false negatives (--allow-missing)", len(missing))
    return categories, pairs, missing


def _shared_reader(gt_path: Path, pred_path: Path, allow_missing: bool) -> None:
    """The shared reader on both files: raises its DataError, or warns as it does when all is acceptable."""
    from harness.data.panoptic_json import load_panoptic, pair_by_image

    # A GT segment listed with id 0 is scored as a segment, as panopticapi does (kept for exact parity).
    gt = load_panoptic(gt_path, "GT JSON", void_segment=True)
    pred = load_panoptic(pred_path, "prediction JSON", categories=gt.categories, require_categories=False)
    # --allow-missing: a prediction file matching no GT image scores every image as missing (with a warning).
    _, missing = pair_by_image(gt, pred, allow_missing, refuse_unmatched=not allow_missing)
    if missing:
        log.warning("%d GT image(s) have no prediction: scored as all false negatives (--allow-missing)", len(missing))


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

    job = EvalJob(str(gt_dir), str(pred_dir), categories, options, str(gt_json_path), str(pred_json_path))
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

            # Not "fork": a child forked after the parent used OpenCV's thread pool can deadlock in
            # cv2.setNumThreads (seen in CI-like runs). A fork server starts children from a clean process.
            methods = multiprocessing.get_all_start_methods()
            method = "forkserver" if "forkserver" in methods else "spawn"
            pool = multiprocessing.get_context(method).Pool(workers, _init_worker, (options.boundary,))
            results = pool.imap(_score_chunk_star, [(job, c) for c in chunks])
        for m, b, n in results:
            mask += m
            if boundary is not None:
                boundary += b
            if bar is not None:
                bar.update(n)
    finally:
        if pool is not None:
            if sys.exc_info()[0] is None:
                pool.close()
                pool.join()
            else:  # an error, Ctrl-C or SIGTERM: stop the workers now (never waits for queued chunks)
                from harness.io import stop_process_pool

                stop_process_pool(pool)
        if bar is not None:
            bar.close()
    result: dict[str, Any] = {"pq": summarize_stats(mask, table, "PQ")}
    if boundary is not None:
        result["boundary_pq"] = summarize_stats(boundary, table, "Boundary PQ")
    result["num_images"] = len(pairs) + len(missing)
    return result
