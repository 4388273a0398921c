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


def _parse_corruptions(text: str) -> list[str]:
    from harness.corruptions import parse_corruptions  # imports numpy: only when the option is parsed

    return parse_corruptions(text)


def _parse_severities(text: str) -> list[int]:
    from harness.corruptions import parse_severities

    return parse_severities(text)


def _parse_shard(text: str) -> tuple[int, int]:
    from harness.corruptions.runner import parse_shard

    return parse_shard(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `corrupt` options (every value is checked here, at parse time)."""
    from harness.commands._common import int_range, user_type

    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="folder of clean images (hidden files are skipped)")
    src.add_argument("--preview", metavar="IMG", help="write a labelled 16 x 5 sheet of one image to --out")
    parser.add_argument("--out", required=True,
                        help="output folder: new, empty, or an earlier output of this command with the same images, "
                             "channel order and format (or the sheet's .png path with --preview)")
    parser.add_argument("--ann", metavar="JSON", help="COCO panoptic JSON: its images define the image list")
    parser.add_argument("--corruptions", default="all", type=user_type(_parse_corruptions, "corruptions"),
                        help="all | blur | noise | digital | weather | name,name,... (default: all 16)")
    parser.add_argument("--severities", default="1-5", type=user_type(_parse_severities, "severities"),
                        help="e.g. 1-5, 3 or 1,3,5 (default: 1-5)")
    parser.add_argument("--subset", type=int_range(1, 10**9), metavar="N",
                        help="deterministic subset of N annotated images (needs --ann)")
    parser.add_argument("--subset-seed", type=int_range(0, 2**32 - 1), default=0, metavar="S",
                        help="seed of the subset rule (default: 0)")
    parser.add_argument("--workers", type=int_range(1, 256), default=1, metavar="K",
                        help="worker processes (default: 1)")
    parser.add_argument("--shard", default="0/1", type=user_type(_parse_shard, "shard"), metavar="i/n",
                        help="do shard i of n (0-based), e.g. 3/8")
    parser.add_argument("--format", dest="fmt", choices=("png", "jpg"), default="png",
                        help="png (default, lossless: equals on-the-fly) or jpg (quality 95, lossy)")
    parser.add_argument("--channel-order", choices=("rgb", "bgr"), default="rgb",
                        help="rgb (default) or bgr: reproduce the original COCO-C script, which fed BGR arrays")
    parser.add_argument("--keep-going", action="store_true",
                        help="continue past unreadable images, list them at the end, exit 1")


def _run_preview(args: argparse.Namespace) -> int:
    from harness.commands._common import check_output
    from harness.corruptions.preview import write_sheet

    image = existing_file(args.preview, "preview image")
    out = check_output(args.out, "--out", inputs=[image], suffixes=(".png",))
    for flag, value in (("--ann", args.ann), ("--subset", args.subset)):
        if value is not None:
            raise UserError(f"{flag} does not apply to --preview")
    path = write_sheet(image, out, corruptions=args.corruptions, severities=args.severities,
                       channel_order=args.channel_order)
    log.info("wrote preview sheet %s", path)
    return 0


def run(args: argparse.Namespace) -> int:
    """Run `harness corrupt`; returns 0, or 1 when --keep-going recorded failures."""
    from pathlib import Path

    from harness.commands._common import check_output

    if args.preview:
        return _run_preview(args)
    from harness.corruptions.runner import RunConfig, run as run_generation

    images = existing_dir(args.images, "--images")
    ann = existing_file(args.ann, "--ann") if args.ann else None
    out = check_output(args.out, "--out", kind="dir", inputs=[ann], input_dirs=[images])
    config = RunConfig(
        images_dir=images,
        out_dir=Path(out),
        corruptions=args.corruptions,
        severities=args.severities,
        ann=ann,
        subset=args.subset,
        subset_seed=args.subset_seed,
        workers=args.workers,
        shard=args.shard,
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
