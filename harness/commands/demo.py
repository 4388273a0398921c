"""`harness demo`: the paper's story on the embedded synthetic data set, end to end, on a laptop CPU."""

from __future__ import annotations

import argparse
import logging

from harness.commands._common import int_range

HELP = "the whole story on synthetic data: train three tiny models, robustness grid, report (resumable)"
DESCRIPTION = """Generates the synthetic data set, trains the tiny query-decoupled and joint-matching Panoptic
SegFormers and the tiny Panoptic FCN baseline (at the same time, one core each), evaluates them clean and under the
16 COCO-C corruptions at severities 1-5 with (m), (p) and (p*) post-processing, every mask-decoder layer, Boundary
PQ and thing-preference statistics (`harness eval`), sweeps the mask-wise merge's alpha/beta and t_cnf/t_keep on
saved candidates (`harness sweep`), writes one results table (OUT/results.csv, OUT/results.parquet) and the report
(OUT/report.md: the demo versions of Tables 7, 8, 10, 11, B.2, B.3, B.4, B.6 and Fig. 7, `harness report`), then
prints the report's path and the headline numbers.

About 14 minutes on a 2-core CPU (--quick: a smoke version in a few minutes). Re-running the same command reuses
the finished stages and resumes an interrupted one; --fresh starts over. --out must be new, empty or a demo
folder (OUT/.psf-harness.json): a demo of other settings is refused unless --fresh, which deletes only the demo's
own files.

examples:
  harness demo                      # runs/demo
  harness demo --quick --out /tmp/demo
  harness demo --fresh
"""

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--quick", action="store_true", help="smoke version: tiny data, a few steps, severity 3")
    parser.add_argument("--fresh", action="store_true",
                        help="delete the demo folder's previous run (only the demo's files) and start over")
    parser.add_argument("--seed", type=int_range(0, 2**32 - 1), default=None, help="data set seed (default 0)")
    parser.add_argument("--iters", type=int_range(1, 10**6), default=None,
                        help="training steps of each tiny Panoptic SegFormer (default 3500; --quick 12)")
    parser.add_argument("--eval-images", type=int_range(1, 499_999), default=None,
                        help="validation images of the robustness grid (default 12; --quick 2)")


def run(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from harness.commands._common import check_output
    from harness.demo_stages import (
        QUICK,
        DemoRun,
        DemoSettings,
        stage_corruption_preview,
        stage_eval,
        stage_report,
        stage_results,
        stage_sweeps,
        stage_synth,
        stage_train,
    )
    from harness.errors import UserError

    settings = QUICK if args.quick else DemoSettings()
    changes = {k: v for k, v in (("seed", args.seed), ("iters", args.iters), ("eval_images", args.eval_images))
               if v is not None}
    settings = dataclasses.replace(settings, **changes)
    if settings.eval_images > settings.val_images:
        raise UserError(f"--eval-images {settings.eval_images} is more than the {settings.val_images} validation "
                        "images the demo generates")
    out = check_output(Path(args.out), "--out", kind="dir")
    run_ = DemoRun(out, settings, fresh=args.fresh)  # claims --out (refusing a folder that is not a demo's)
    data = out / "data"
    run_.run("synthetic data", stage_synth, settings, data)
    run_.run("COCO-C preview", stage_corruption_preview, data, out / "corruptions")
    run_.run("train the tiny models", stage_train, settings, data, out)
    run_.run("robustness grid (harness eval)", stage_eval, settings, data, out)
    run_.run("post-processing sweeps (harness sweep)", stage_sweeps, settings, data, out)
    results = run_.run("results table", stage_results, out)
    report = run_.run("report", stage_report, settings, run_)
    run_.save()
    run_.claim.complete()
    print(f"\nDemo finished. Report: {Path(report.outputs['report']).resolve()}")
    print(f"Results table: {(out / 'results.csv').resolve()}")
    for key, value in results.metrics.items():
        print(f"  {key}: {value}")
    print(f"  total time: {sum(s.seconds for s in run_.stages.values()):.0f} s")
    return 0
