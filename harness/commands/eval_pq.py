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
    """Arguments of `harness eval-pq` (every value is checked here, at parse time)."""
    from harness.commands._common import float_range, int_range

    parser.add_argument("--gt-json", required=True, help="GT COCO panoptic JSON")
    parser.add_argument("--gt-dir", default=None, help="GT PNG folder (default: GT JSON path without .json)")
    parser.add_argument("--pred-json", required=True, help="prediction COCO panoptic JSON")
    parser.add_argument("--pred-dir", default=None, help="prediction PNG folder (default: JSON path without .json)")
    parser.add_argument("--boundary", action="store_true", help="also compute Boundary PQ (boundary-iou-api)")
    parser.add_argument("--dilation-ratio", type=float_range(0, 1, lo_open=True), default=0.02,
                        help="boundary width as a fraction of the image diagonal, in (0, 1] "
                             "(default 0.02 as for COCO; boundary-iou-api uses 0.005 for Cityscapes)")
    parser.add_argument("--workers", type=int_range(1, 256), default=None,
                        help="workers: threads with the compiled kernel, processes without it "
                             "(default: number of CPUs, 1 for small sets)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="score GT images without prediction as all false negatives instead of failing")
    parser.add_argument("--all-crowd-regions", action="store_true",
                        help="corrected crowd rule: use every crowd region of a category (panopticapi keeps the last)")
    parser.add_argument("--separate-boundary-label", action="store_true",
                        help="corrected Boundary PQ: interior label never collides with a segment id")
    parser.add_argument("--out", default=None, help="write results as JSON here (R.json; not one of the inputs)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness.commands._common import check_output, existing_dir, existing_file
    from harness.metrics.pq_core import PQOptions
    from harness.metrics.pq_files import evaluate_pq_files
    from harness.metrics.report import format_pq_table

    # Inputs and the output first: nothing is read, scored or written before they are known to be usable.
    gt_json = existing_file(args.gt_json, "--gt-json")
    pred_json = existing_file(args.pred_json, "--pred-json")
    gt_dir = existing_dir(args.gt_dir if args.gt_dir is not None else gt_json.with_suffix(""),
                          "--gt-dir" if args.gt_dir is not None else "GT PNG folder (--gt-dir)")
    pred_dir = existing_dir(args.pred_dir if args.pred_dir is not None else pred_json.with_suffix(""),
                            "--pred-dir" if args.pred_dir is not None else "prediction PNG folder (--pred-dir)")
    out = None
    if args.out:
        from harness.io import sweep_stale_temporaries

        out = check_output(args.out, "--out", inputs=[gt_json, pred_json], input_dirs=[gt_dir, pred_dir])
        sweep_stale_temporaries(Path(out).parent, targets={Path(out).name})
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    options = PQOptions(
        boundary=args.boundary,
        dilation_ratio=args.dilation_ratio,
        all_crowd_regions=args.all_crowd_regions,
        separate_boundary_label=args.separate_boundary_label,
    )
    t0 = time.perf_counter()
    results = evaluate_pq_files(
        gt_json, pred_json, gt_dir, pred_dir, options=options, workers=workers,
        allow_missing=args.allow_missing, auto_workers=args.workers is None,
    )
    elapsed = time.perf_counter() - t0
    num_images = results.pop("num_images")
    if out is not None:
        from harness.io import atomic_write_json

        atomic_write_json(out, results, indent=1)
        log.info("wrote %s", out)
    print(format_pq_table(results["pq"], "Mask PQ"))
    if "boundary_pq" in results:
        print()
        print(format_pq_table(results["boundary_pq"], f"Boundary PQ (dilation ratio {args.dilation_ratio:g})"))
    log.info("%d images evaluated in %.2f s", num_images, elapsed)
    return 0
