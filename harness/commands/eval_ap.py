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
    gt.add_argument("--gt-json", help="COCO instances GT JSON (e.g. synth's annotations/instances_val2017.json)")
    gt.add_argument("--panoptic-gt-json", help="COCO panoptic GT JSON (converted to instances)")
    parser.add_argument("--panoptic-gt-dir", default=None, help="its PNG folder (default: JSON path without .json)")
    parser.add_argument("--write-instances", default=None, help="save the converted instances JSON here")
    pred = parser.add_mutually_exclusive_group(required=True)
    pred.add_argument("--results", help="COCO results JSON (list of {image_id, category_id, segmentation, score})")
    pred.add_argument("--pred-json", help="panoptic prediction JSON (thing segments are scored)")
    parser.add_argument("--pred-dir", default=None, help="its PNG folder (default: JSON path without .json)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="with --pred-json: a GT image without prediction has no detections (default: error, "
                             "as eval-pq)")
    parser.add_argument("--iou-types", nargs="+", default=["segm", "bbox"], choices=["segm", "bbox"],
                        help="IoU types to evaluate (default: segm bbox)")
    parser.add_argument("--out", default=None, help="write results as JSON here")


def _folder(json_path: Path, folder: str | None, what: str) -> Path:
    from harness.commands._common import existing_dir

    return existing_dir(folder if folder is not None else str(json_path.with_suffix("")), what)


def run(args: argparse.Namespace) -> int:
    from harness.commands._common import check_distinct_outputs, check_output, existing_file
    from harness.data.panoptic_json import (
        PanopticJSON,
        check_category_ids,
        check_png_sizes,
        gt_image_sizes,
        load_instances,
        load_panoptic,
        load_results,
        pair_by_image,
    )
    from harness.errors import UserError
    from harness.io import atomic_write_json

    # Inputs and outputs are checked before anything is read or converted.
    gt_path = existing_file(args.gt_json or args.panoptic_gt_json,
                            "--gt-json" if args.gt_json else "--panoptic-gt-json")
    pred_path = existing_file(args.results or args.pred_json, "--results" if args.results else "--pred-json")
    gt_dir = _folder(gt_path, args.panoptic_gt_dir, "panoptic GT PNG folder") if args.panoptic_gt_json else None
    pred_dir = _folder(pred_path, args.pred_dir, "prediction PNG folder") if args.pred_json else None
    if args.write_instances and not args.panoptic_gt_json:
        raise UserError("--write-instances saves the instances converted from --panoptic-gt-json; "
                        "with --gt-json there is nothing to convert")
    if args.allow_missing and not args.pred_json:
        raise UserError("--allow-missing applies to --pred-json (a results list has no per-image entries)")
    inputs = [gt_path, pred_path]
    for what, path in (("--out", args.out), ("--write-instances", args.write_instances)):
        if path is not None:
            check_output(path, what, inputs=inputs, input_dirs=[gt_dir, pred_dir])
    check_distinct_outputs(("--out", args.out), ("--write-instances", args.write_instances))

    from harness.metrics.ap import evaluate_ap, panoptic_to_instances, panoptic_to_results
    from harness.metrics.report import format_ap_table

    # Every input is validated (JSON, PNG headers) before the GT conversion decodes anything.
    if args.gt_json:
        instances = load_instances(gt_path)
        # An instances file lists thing categories only (isthing is optional there).
        things = [{**c, "isthing": 1} for c in instances["categories"] if c.get("isthing", 1) == 1]
        images = {img["id"]: img for img in instances["images"]}
        sizes = {iid: (int(img["height"]), int(img["width"])) for iid, img in images.items()}
        gt_ids = {int(c["id"]) for c in instances["categories"]}
        gt = PanopticJSON(gt_path, "instances GT JSON", instances, images, images, instances["categories"])
    else:
        gt = load_panoptic(gt_path, "panoptic GT JSON")
        sizes = gt_image_sizes(gt, gt_dir)
        things = [c for c in gt.categories if c["isthing"] == 1]
        gt_ids = {int(c["id"]) for c in gt.categories}

    if args.results:
        results = load_results(pred_path, sizes, gt_ids)
        pairs = None
    else:
        pred = load_panoptic(pred_path, "panoptic prediction JSON", require_categories=False)
        raw = {int(c["id"]) for c in pred.categories or []}
        if raw or not args.gt_json:  # with an instances GT and no categories of its own, stuff ids are unknowable
            check_category_ids(pred, gt_ids | raw)
        pairs, _missing = pair_by_image(gt, pred, allow_missing=args.allow_missing)
        check_png_sizes(pred, pred_dir, sizes, "prediction PNG")

    if not args.gt_json:
        instances = panoptic_to_instances(gt.data, gt_dir)
        log.info("converted %d thing segments to instances", len(instances["annotations"]))
        if args.write_instances:
            atomic_write_json(args.write_instances, instances)
    if pairs is not None:
        thing_ids = {int(c["id"]) for c in things}
        other = sum(1 for _, pa in pairs for s in pa["segments_info"] if s["category_id"] not in thing_ids)
        if other and args.gt_json and not raw:
            log.info("%d predicted segment(s) of categories that are not GT things (stuff) are not scored", other)
        results = panoptic_to_results({"annotations": [pa for _, pa in pairs]}, pred_dir, things)
    ap = evaluate_ap(instances, results, args.iou_types)
    if args.out:
        atomic_write_json(args.out, ap, indent=1)
        log.info("wrote %s", args.out)
    print(format_ap_table(ap))
    return 0
