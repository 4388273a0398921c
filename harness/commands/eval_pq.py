"""`harness eval-pq`: Mask PQ (and Boundary PQ) of COCO panoptic predictions, like panopticapi.

With the compiled kernel (`make setup`) it imports neither numpy nor OpenCV, let alone torch:
start-up is part of the time a user waits for.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

HELP = "Mask PQ / Boundary PQ of panoptic predictions (panopticapi and boundary-iou-api rules)"
DESCRIPTION = """\
Scores COCO panoptic predictions (JSON + PNG folder) against GT exactly as panopticapi's pq_compute
(and boundary-iou-api's Boundary PQ with --boundary), and writes R.json:
  {"pq": {"All": {pq, sq, rq, n}, "Things": ..., "Stuff": ..., "per_class": {"<category_id>": {pq, sq, rq}}},
   "boundary_pq": <same, only with --boundary>}
Values are fractions in [0, 1]; a split with no class present has n = 0 and null values.
Predictions are matched to GT by image id; segments need only "id" and "category_id".
Scoring runs in the compiled kernel (csrc/png_pq.c, built by `make setup`) when it is available
(`harness doctor` says), else in numpy with a general PNG decoder: same numbers, slower.

Example:
  harness eval-pq --gt-json val.json --gt-dir val/ --pred-json pred.json --pred-dir pred/ --boundary --out R.json"""

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gt-json", required=True, help="GT COCO panoptic JSON")
    parser.add_argument("--gt-dir", default=None, help="GT PNG folder (default: GT JSON path without .json)")
    parser.add_argument("--pred-json", required=True, help="prediction COCO panoptic JSON")
    parser.add_argument("--pred-dir", default=None, help="prediction PNG folder (default: JSON path without .json)")
    parser.add_argument("--boundary", action="store_true", help="also compute Boundary PQ (boundary-iou-api)")
    parser.add_argument("--dilation-ratio", type=float, default=0.02,
                        help="boundary width as a fraction of the image diagonal "
                             "(default 0.02 as for COCO; boundary-iou-api uses 0.005 for Cityscapes)")
    parser.add_argument("--workers", type=int, default=None,
                        help="workers: threads with the compiled kernel, processes without it "
                             "(default: number of CPUs, 1 for small sets)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="score GT images without prediction as all false negatives instead of failing")
    parser.add_argument("--all-crowd-regions", action="store_true",
                        help="corrected crowd rule: use every crowd region of a category (panopticapi keeps the last)")
    parser.add_argument("--separate-boundary-label", action="store_true",
                        help="corrected Boundary PQ: interior label never collides with a segment id")
    parser.add_argument("--out", default=None, help="write results as JSON here (R.json)")


def run(args: argparse.Namespace) -> int:
    from harness.errors import UserError
    from harness.metrics.pq_core import PQOptions
    from harness.metrics.pq_files import evaluate_pq_files
    from harness.metrics.report import format_pq_table

    if args.dilation_ratio <= 0:
        raise UserError(f"--dilation-ratio must be positive, got {args.dilation_ratio}")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    options = PQOptions(
        boundary=args.boundary,
        dilation_ratio=args.dilation_ratio,
        all_crowd_regions=args.all_crowd_regions,
        separate_boundary_label=args.separate_boundary_label,
    )
    t0 = time.perf_counter()
    results = evaluate_pq_files(
        args.gt_json, args.pred_json, args.gt_dir, args.pred_dir, options=options, workers=workers,
        allow_missing=args.allow_missing, auto_workers=args.workers is None,
    )
    elapsed = time.perf_counter() - t0
    num_images = results.pop("num_images")
    if args.out:
        from harness.io import atomic_write_json

        atomic_write_json(args.out, results, indent=1)
        log.info("wrote %s", args.out)
    print(format_pq_table(results["pq"], "Mask PQ"))
    if "boundary_pq" in results:
        print()
        print(format_pq_table(results["boundary_pq"], f"Boundary PQ (dilation ratio {args.dilation_ratio:g})"))
    log.info("%d images evaluated in %.2f s", num_images, elapsed)
    return 0
