"""`harness corrupt`: generate COCO-C (16 corruptions x 5 severities) on disk, or a preview sheet."""

from __future__ import annotations

import argparse
import logging

from harness.commands._common import existing_dir, existing_file
from harness.errors import UserError

HELP = "generate COCO-C corrupted images (resumable, shardable) or a preview sheet"
DESCRIPTION = """\
Generate corrupted copies of a folder of images: OUT/<corruption>/<severity>/<stem>.png, plus
OUT/manifest.json (seed rule, channel order, format) and OUT/manifest.csv (file, seed, sha256, seconds, time).

Each output is seeded by (image file name, corruption, severity) alone, so a killed run re-run with
the same command completes byte-identically, and --shard i/n (0-based) splits the images across
machines with no overlap. Outputs equal imagecorruptions 1.1.2 (+ compatibility fixes) byte for byte
(impulse_noise: seeded, statistically equivalent).

examples:
  harness corrupt --images coco/val2017 --ann coco/annotations/panoptic_val2017.json \\
      --subset 2000 --subset-seed 0 --out coco_c --workers 2
  harness corrupt --images coco/val2017 --out coco_c --corruptions blur,fog --severities 1,3,5 --shard 0/8
  harness corrupt --preview photo.jpg --out sheet.png
"""

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `corrupt` options."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="folder of clean images")
    src.add_argument("--preview", metavar="IMG", help="write a labelled 16 x 5 sheet of one image to --out")
    parser.add_argument("--out", required=True, help="output folder (or the sheet's .png path with --preview)")
    parser.add_argument("--ann", metavar="JSON", help="COCO panoptic JSON: its images define the image list")
    parser.add_argument("--corruptions", default="all",
                        help="all | blur | noise | digital | weather | name,name,... (default: all 16)")
    parser.add_argument("--severities", default="1-5", help="e.g. 1-5, 3 or 1,3,5 (default: 1-5)")
    parser.add_argument("--subset", type=int, metavar="N",
                        help="deterministic subset of N annotated images (needs --ann)")
    parser.add_argument("--subset-seed", type=int, default=0, metavar="S", help="seed of the subset rule (default: 0)")
    parser.add_argument("--workers", type=int, default=1, metavar="K", help="worker processes (default: 1)")
    parser.add_argument("--shard", default="0/1", metavar="i/n", help="do shard i of n (0-based), e.g. 3/8")
    parser.add_argument("--format", dest="fmt", choices=("png", "jpg"), default="png",
                        help="png (default, lossless: equals on-the-fly) or jpg (quality 95, lossy)")
    parser.add_argument("--channel-order", choices=("rgb", "bgr"), default="rgb",
                        help="rgb (default) or bgr: reproduce the original COCO-C script, which fed BGR arrays")
    parser.add_argument("--keep-going", action="store_true",
                        help="continue past unreadable images, list them at the end, exit 1")


def _run_preview(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness.corruptions import parse_corruptions, parse_severities
    from harness.corruptions.preview import write_sheet

    image = existing_file(args.preview, "preview image")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out for --preview must be a .png file, got {out}")
    path = write_sheet(image, out, corruptions=parse_corruptions(args.corruptions),
                       severities=parse_severities(args.severities), channel_order=args.channel_order)
    log.info("wrote preview sheet %s", path)
    return 0


def run(args: argparse.Namespace) -> int:
    """Run `harness corrupt`; returns 0, or 1 when --keep-going recorded failures."""
    from pathlib import Path

    from harness.corruptions import parse_corruptions, parse_severities

    if args.preview:
        return _run_preview(args)
    from harness.corruptions.runner import RunConfig, parse_shard, run as run_generation

    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    config = RunConfig(
        images_dir=existing_dir(args.images, "--images"),
        out_dir=Path(args.out),
        corruptions=parse_corruptions(args.corruptions),
        severities=parse_severities(args.severities),
        ann=existing_file(args.ann, "--ann") if args.ann else None,
        subset=args.subset,
        subset_seed=args.subset_seed,
        workers=args.workers,
        shard=parse_shard(args.shard),
        fmt=args.fmt,
        channel_order=args.channel_order,
        keep_going=args.keep_going,
    )
    summary = run_generation(config)
    log.info("%d images: %d outputs written, %d already present, %d failures, %.1f s",
             summary.images, summary.written, summary.skipped, len(summary.failures), summary.seconds)
    if summary.failures:
        log.error("%d failures:", len(summary.failures))
        for _, message in summary.failures:
            log.error("  %s", message)
        return 1
    return 0
