"""`harness synth`: write the embedded synthetic dataset in COCO panoptic layout."""

from __future__ import annotations

import argparse
import logging

HELP = "generate the synthetic panoptic dataset (COCO layout)"
DESCRIPTION = """\
Generate the embedded synthetic panoptic dataset in the exact COCO panoptic layout:

  DIR/train2017/*.jpg  DIR/val2017/*.jpg
  DIR/annotations/panoptic_{train,val}2017.json  DIR/annotations/panoptic_{train,val}2017/*.png
  DIR/annotations/instances_{train,val}2017.json (things, RLE)  DIR/preview_val.png

10 thing classes (shapes) and 6 stuff classes (textures), crowd clumps, VOID pixels, a few
aspect ratios with long side --size. Files are byte-identical for equal --seed/--size,
whatever --workers.

example: harness synth --out data/synth --train 2000 --val 200 --seed 0
"""

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="dataset root to write (created if missing)")
    parser.add_argument("--train", type=int, default=200, metavar="N", help="train2017 images (default 200)")
    parser.add_argument("--val", type=int, default=50, metavar="M", help="val2017 images (default 50)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="dataset seed (default 0)")
    parser.add_argument("--size", type=int, default=256, help="long image side in pixels (default 256)")
    parser.add_argument("--workers", type=int, default=1, metavar="K", help="rendering processes (default 1)")
    parser.add_argument("--no-preview", action="store_true", help="skip DIR/preview_val.png")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness.errors import UserError

    if args.train < 0 or args.val < 0:
        raise UserError(f"--train/--val must be >= 0 (got {args.train}, {args.val})")
    if args.size < 32 or args.size > 4096:
        raise UserError(f"--size must be in [32, 4096] (got {args.size})")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1 (got {args.workers})")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0 (got {args.seed})")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out exists and is not a folder: {out}")

    import time

    from harness.data.synthetic import generate_dataset

    t0 = time.perf_counter()
    root = generate_dataset(out, args.train, args.val, args.seed, size=args.size, workers=args.workers,
                            preview=not args.no_preview)
    dt = time.perf_counter() - t0
    n = args.train + args.val
    log.info("%d images in %.1f s (%.0f images/s) -> %s", n, dt, n / max(dt, 1e-9), root)
    if not args.no_preview and args.val > 0:
        log.info("preview sheet: %s", root / "preview_val.png")
    return 0
