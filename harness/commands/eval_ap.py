"""`harness eval-ap`: instance AP (segm, bbox) of thing predictions with pycocotools.

Never imports torch.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

HELP = "instance AP (segm and bbox) of thing predictions with pycocotools' COCOeval"
DESCRIPTION = """\
GT: a COCO instances JSON (--gt-json), or a COCO panoptic GT (--panoptic-gt-json/--panoptic-gt-dir)
converted on the fly to instances (things only, crowd kept; --write-instances saves it).
Predictions: a COCO results JSON with RLE masks and scores (--results), or panoptic predictions
(--pred-json/--pred-dir; thing segments, score from segments_info["score"] or 1.0).
Writes {"segm": {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", ...}, "bbox": {...}} as fractions."""

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gt = parser.add_mutually_exclusive_group(required=True)
    gt.add_argument("--gt-json", help="COCO instances GT JSON")
    gt.add_argument("--panoptic-gt-json", help="COCO panoptic GT JSON (converted to instances)")
    parser.add_argument("--panoptic-gt-dir", default=None, help="its PNG folder (default: JSON path without .json)")
    parser.add_argument("--write-instances", default=None, help="save the converted instances JSON here")
    pred = parser.add_mutually_exclusive_group(required=True)
    pred.add_argument("--results", help="COCO results JSON (list of {image_id, category_id, segmentation, score})")
    pred.add_argument("--pred-json", help="panoptic prediction JSON (thing segments are scored)")
    parser.add_argument("--pred-dir", default=None, help="its PNG folder (default: JSON path without .json)")
    parser.add_argument("--iou-types", nargs="+", default=["segm", "bbox"], choices=["segm", "bbox"],
                        help="IoU types to evaluate (default: segm bbox)")
    parser.add_argument("--out", default=None, help="write results as JSON here")


def _folder(json_path: str, folder: str | None, what: str) -> Path:
    from harness.commands._common import existing_dir

    return existing_dir(folder if folder is not None else str(Path(json_path).with_suffix("")), what)


def run(args: argparse.Namespace) -> int:
    import json

    from harness.errors import UserError
    from harness.io import atomic_write_json
    from harness.metrics.ap import evaluate_ap, panoptic_to_instances, panoptic_to_results
    from harness.metrics.pq_files import load_json
    from harness.metrics.report import format_ap_table

    if args.gt_json:
        instances = load_json(args.gt_json, "instances GT JSON")
    else:
        pan = load_json(args.panoptic_gt_json, "panoptic GT JSON")
        gt_dir = _folder(args.panoptic_gt_json, args.panoptic_gt_dir, "panoptic GT PNG folder")
        instances = panoptic_to_instances(pan, gt_dir)
        log.info("converted %d thing segments to instances", len(instances["annotations"]))
        if args.write_instances:
            atomic_write_json(args.write_instances, instances)
    for key in ("images", "annotations", "categories"):
        if key not in instances:
            raise UserError(f"instances GT lacks key '{key}'")
    if args.results:
        try:
            with open(args.results, encoding="utf-8") as f:
                results = json.load(f)
        except FileNotFoundError:
            raise UserError(f"results JSON not found: {args.results}") from None
        except ValueError as exc:
            raise UserError(f"results JSON {args.results} is not valid JSON: {exc}") from None
        if not isinstance(results, list):
            raise UserError(f"results JSON {args.results}: expected a list of detections")
        cat_ids = {c["id"] for c in instances["categories"]}
        for i, r in enumerate(results):
            if not isinstance(r, dict) or "image_id" not in r or "category_id" not in r or "score" not in r:
                raise UserError(f"results JSON {args.results}: entry {i} lacks image_id, category_id or score")
            if r["category_id"] not in cat_ids:
                raise UserError(f"results JSON {args.results}: entry {i} has unknown category_id {r['category_id']}")
    else:
        pred = load_json(args.pred_json, "panoptic prediction JSON")
        results = panoptic_to_results(pred, _folder(args.pred_json, args.pred_dir, "prediction PNG folder"),
                                      instances["categories"] if not args.panoptic_gt_json else pan["categories"])
    ap = evaluate_ap(instances, results, args.iou_types)
    if args.out:
        atomic_write_json(args.out, ap, indent=1)
        log.info("wrote %s", args.out)
    print(format_ap_table(ap))
    return 0
