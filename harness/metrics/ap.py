"""Instance AP (segm and bbox) of thing predictions with pycocotools' COCOeval.

- `panoptic_to_instances`: COCO panoptic GT (JSON + PNGs) -> COCO instances JSON (thing
  categories only, crowd segments kept with iscrowd=1, masks as compressed RLE), so instance AP
  works on any panoptic dataset, the synthetic one included (panopticapi's
  `panoptic2detection_coco_format.py --things_only` does the same conversion).
- `panoptic_to_results`: panoptic predictions -> COCO results list (things only; `score` from
  `segments_info` when present, else 1.0).
- `evaluate_ap`: stock COCOeval for each IoU type; returns the 12 summary numbers as fractions.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from harness.errors import DataError
from harness.logging_utils import progress_disabled

log = logging.getLogger(__name__)

__all__ = ["panoptic_to_instances", "panoptic_to_results", "evaluate_ap", "STAT_NAMES"]

# COCOeval.summarize() order for segm/bbox.
STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def _thing_ids(categories: Sequence[Mapping[str, Any]], where: str) -> set[int]:
    try:
        return {int(c["id"]) for c in categories if c["isthing"] == 1}
    except KeyError as exc:
        raise DataError(f"{where}: a category lacks key {exc.args[0]!r}") from None


def _segment_rles(id_map: np.ndarray, segments: Sequence[Mapping[str, Any]], image_id: Any, where: str) -> list[dict]:
    """Compressed RLE of each segment's mask (ids taken from `id_map`), in `segments` order."""
    from pycocotools import mask as mask_utils

    if not segments:
        return []
    id_t = np.ascontiguousarray(id_map.T)  # (W, H): stacking gives (N, W, H) = Fortran (H, W, N) view
    masks = np.empty((len(segments),) + id_t.shape, np.uint8)
    for k, s in enumerate(segments):
        np.equal(id_t, s["id"], out=masks[k], casting="unsafe")
        if not masks[k].any():
            raise DataError(f"{where}: image {image_id}: segment id {s['id']} is in the JSON but not in the PNG")
    rles = mask_utils.encode(masks.transpose(2, 1, 0))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def _check_png_ids(id_map: np.ndarray, ann: Mapping[str, Any], png_dir: Path) -> None:
    """Every non-VOID id of a prediction PNG is listed in its ``segments_info`` (eval-pq refuses the same file:
    panopticapi raises KeyError for it)."""
    present = np.unique(id_map)
    listed = np.array(sorted({int(s["id"]) for s in ann["segments_info"]}), np.int64)
    unknown = present[(present != 0) & ~np.isin(present, listed)]
    if unknown.size:
        more = f" ({unknown.size} such ids)" if unknown.size > 1 else ""
        raise DataError(f"image {ann.get('image_id')}: predicted segment id {int(unknown[0])} is in the PNG but not "
                        f"in the JSON{more} ({png_dir / str(ann['file_name'])})")


def _iter_id_maps(
    annotations: Sequence[Mapping[str, Any]], png_dir: Path, what: str
) -> Iterable[tuple[Mapping[str, Any], np.ndarray]]:
    from harness.metrics.pngio import read_id_map

    for ann in tqdm(annotations, desc=what, unit="img", disable=progress_disabled() or len(annotations) < 100,
                    leave=False):
        try:
            yield ann, read_id_map(png_dir / ann["file_name"])
        except KeyError as exc:
            raise DataError(f"{what}: an annotation lacks key {exc.args[0]!r}") from None
        except DataError as exc:
            raise DataError(f"image {ann.get('image_id')}: {exc}") from None


def panoptic_to_instances(panoptic: Mapping[str, Any], png_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Convert COCO panoptic GT to a COCO instances dict (things only, crowd kept).

    Args:
        panoptic: the panoptic GT JSON (images, annotations, categories).
        png_dir: folder of its PNGs.

    Returns:
        {"images", "annotations", "categories"}; annotation ids are 1..N, areas are pixel counts
        of the PNG masks, boxes come from the masks (COCO xywh).
    """
    from pycocotools import mask as mask_utils

    png_dir = Path(png_dir)
    categories = list(panoptic.get("categories", []))
    things = _thing_ids(categories, "panoptic GT JSON")
    images = list(panoptic.get("images", []))
    known = {im.get("id") for im in images}
    anns: list[dict[str, Any]] = []
    for ann, id_map in _iter_id_maps(panoptic.get("annotations", []), png_dir, "panoptic GT"):
        image_id = ann["image_id"]
        if image_id not in known:
            images.append({"id": image_id, "file_name": Path(ann["file_name"]).with_suffix(".jpg").name,
                           "height": int(id_map.shape[0]), "width": int(id_map.shape[1])})
            known.add(image_id)
        segs = [s for s in ann["segments_info"] if int(s["category_id"]) in things]
        rles = _segment_rles(id_map, segs, image_id, "panoptic GT")
        for s, rle in zip(segs, rles):
            anns.append({
                "id": len(anns) + 1,
                "image_id": image_id,
                "category_id": int(s["category_id"]),
                "segmentation": rle,
                "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": int(s.get("iscrowd", 0)),
            })
    return {"images": images, "annotations": anns, "categories": [c for c in categories if int(c["id"]) in things]}


def panoptic_to_results(panoptic: Mapping[str, Any], png_dir: str | os.PathLike[str],
                        categories: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Thing segments of panoptic predictions as a COCO results list (RLE masks and boxes).

    Args:
        panoptic: prediction panoptic JSON (annotations with segments_info; optional `score`).
        png_dir: folder of its PNGs.
        categories: category list that says which ids are things.
    """
    from pycocotools import mask as mask_utils

    things = _thing_ids(categories, "categories")
    out: list[dict[str, Any]] = []
    for ann, id_map in _iter_id_maps(panoptic.get("annotations", []), Path(png_dir), "panoptic predictions"):
        _check_png_ids(id_map, ann, Path(png_dir))
        segs = [s for s in ann["segments_info"] if int(s["category_id"]) in things]
        for s, rle in zip(segs, _segment_rles(id_map, segs, ann["image_id"], "panoptic predictions")):
            out.append({
                "image_id": ann["image_id"],
                "category_id": int(s["category_id"]),
                "segmentation": rle,
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "score": float(s.get("score", 1.0)),
            })
    return out


def evaluate_ap(instances: Mapping[str, Any], results: Sequence[Mapping[str, Any]],
                iou_types: Sequence[str] = ("segm", "bbox")) -> dict[str, dict[str, float]]:
    """COCO AP with pycocotools' COCOeval (stock parameters: IoU .50:.95, areas, maxDets 100).

    Args:
        instances: COCO instances GT dict.
        results: COCO results list (segm needs `segmentation`, bbox needs `bbox`).
        iou_types: any of "segm", "bbox".

    Returns:
        {iou_type: {"AP", "AP50", ..., "ARl"}} as fractions (COCOeval's -1 for "no GT" becomes None).
    """
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = {k: list(v) if isinstance(v, list) else v for k, v in instances.items()}
    gt.dataset.setdefault("info", {})
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    gt_images = set(gt.getImgIds())
    results = [r for r in results if r.get("image_id") in gt_images]
    out: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        if iou_type not in ("segm", "bbox"):
            raise DataError(f"unknown IoU type {iou_type!r} (use segm or bbox)")
        if iou_type == "segm":
            dets = [r for r in results if "segmentation" in r]
        else:
            dets = [r if "bbox" in r else dict(r, bbox=[float(v) for v in mask_utils.toBbox(r["segmentation"])])
                    for r in results if "bbox" in r or "segmentation" in r]
        if not dets:
            log.warning("%s AP: no detections; every AP is 0", iou_type)
            out[iou_type] = {k: 0.0 for k in STAT_NAMES}
            continue
        if iou_type == "bbox":  # loadRes derives boxes from masks when a segmentation is present
            dets = [{k: v for k, v in r.items() if k != "segmentation"} for r in dets]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            dt = gt.loadRes([dict(r) for r in dets])
            ev = COCOeval(gt, dt, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        log.debug("%s", buf.getvalue())
        out[iou_type] = {k: (float(v) if v >= 0 else None) for k, v in zip(STAT_NAMES, ev.stats)}
    return out
