"""`harness show`: draw panoptic segments (COCO PNG + JSON) over images."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

HELP = "overlay a COCO panoptic annotation or prediction on images"
DESCRIPTION = """\
Overlay COCO panoptic segments on images: per-segment colours (category colour, jittered per
instance), white outlines, hatched crowd regions and a legend of the category names present
(stuff names end with '*'). --grid renders several images on one sheet.

The segments of each PNG are looked up in --json by the annotation `file_name` (the PNG name),
falling back to the image file stem.

examples:
  harness show --image val2017/000001000001.jpg \\
      --panoptic annotations/panoptic_val2017/000001000001.png \\
      --json annotations/panoptic_val2017.json --out overlay.png
  harness show --grid --image a.jpg b.jpg --panoptic a.png b.png --json pred.json --out sheet.png
"""

log = logging.getLogger(__name__)

MAX_OUTPUT_PIXELS = 2**27  # ~134 Mpixel (400 MB of RGB) for the whole sheet
MAX_IMAGES = 256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from harness.commands._common import float_range, int_range

    parser.add_argument("--image", nargs="+", required=True, metavar="IMG", help="image file(s)")
    parser.add_argument("--panoptic", nargs="+", required=True, metavar="PNG",
                        help="panoptic PNG(s), one per image, same order")
    parser.add_argument("--json", required=True, metavar="J",
                        help="COCO panoptic JSON with segments_info and categories")
    parser.add_argument("--out", required=True, metavar="OUT.png", help="output PNG")
    parser.add_argument("--grid", action="store_true", help="render all images on one sheet")
    parser.add_argument("--cols", type=int_range(1, 64), default=4, help="sheet columns with --grid, 1..64 (default 4)")
    parser.add_argument("--alpha", type=float_range(0.0, 1.0), default=0.55,
                        help="overlay opacity in [0, 1] (default 0.55)")
    parser.add_argument("--scale", type=int_range(1, 16), default=1,
                        help="integer upscaling of each image, 1..16 (default 1)")
    parser.add_argument("--no-outline", action="store_true", help="do not draw segment boundaries")
    parser.add_argument("--no-legend", action="store_true", help="do not draw the category legend")


def _index(parsed: Any) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], dict[int, dict[str, Any]]]:
    """(annotations by PNG name, annotations by stem, categories by id) of a validated panoptic JSON."""
    by_name: dict[str, dict[str, Any]] = {}
    by_stem: dict[str, dict[str, Any]] = {}
    for a in parsed.by_image.values():
        by_name[Path(a["file_name"]).name] = a
        by_stem[Path(a["file_name"]).stem] = a
    return by_name, by_stem, {int(c["id"]): c for c in parsed.categories}


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from harness import viz
    from harness.commands._common import check_output, existing_file
    from harness.data.coco_panoptic import read_id_png, read_image_rgb, read_image_size
    from harness.data.images import png_header
    from harness.data.panoptic_json import load_panoptic
    from harness.errors import DataError, UserError

    images = [existing_file(p, "image") for p in args.image]
    pngs = [existing_file(p, "panoptic PNG") for p in args.panoptic]
    json_path = existing_file(args.json, "panoptic JSON")
    if len(images) != len(pngs):
        raise UserError(f"got {len(images)} --image but {len(pngs)} --panoptic files; give one PNG per image")
    if len(images) > 1 and not args.grid:
        raise UserError(f"{len(images)} images given: add --grid to render them on one sheet")
    if len(images) > MAX_IMAGES:
        raise UserError(f"{len(images)} images for one sheet; at most {MAX_IMAGES}")
    out_path = check_output(args.out, "--out", inputs=[*images, *pngs, json_path], suffixes=(".png",))

    parsed = load_panoptic(json_path, "panoptic JSON")
    by_name, by_stem, cats = _index(parsed)
    # Everything that can be checked from headers is checked before any decoding.
    anns = []
    pixels = 0
    for img_path, png_path in zip(images, pngs):
        ann = by_name.get(png_path.name) or by_stem.get(png_path.stem) or by_stem.get(img_path.stem)
        if ann is None:
            raise UserError(f"no annotation for {png_path.name} (or {img_path.stem}) in {json_path}")
        head = png_header(png_path, "panoptic PNG")
        if not head.is_panoptic:
            raise DataError(f"{png_path}: a panoptic PNG must be 8-bit RGB(A), this one is {head.description}")
        h, w = read_image_size(img_path)
        if (h, w) != (head.height, head.width):
            raise DataError(f"{img_path} is {w}x{h} but {png_path} is {head.width}x{head.height}")
        pixels += h * w * args.scale**2
        anns.append(ann)
    if pixels > MAX_OUTPUT_PIXELS:
        raise UserError(f"the overlay would have {pixels / 1e6:.0f} Mpixel (--scale {args.scale} x "
                        f"{len(images)} image(s)); at most {MAX_OUTPUT_PIXELS / 1e6:.0f} Mpixel: lower --scale")

    tiles = []
    used: set[int] = set()
    for img_path, png_path, ann in zip(images, pngs, anns):
        segments = ann["segments_info"]
        id_map = read_id_png(png_path)
        image = read_image_rgb(img_path)
        if image.shape[:2] != id_map.shape:
            raise DataError(f"{img_path} is {image.shape[1]}x{image.shape[0]} but {png_path} is "
                            f"{id_map.shape[1]}x{id_map.shape[0]}")
        missing = np.setdiff1d(np.unique(id_map), [0] + [int(s["id"]) for s in segments])
        if missing.size:
            raise DataError(f"{png_path}: segment id {int(missing[0])} is not in segments_info of {ann['file_name']} "
                            f"in {json_path}")
        used.update(int(s["category_id"]) for s in segments)
        tiles.append(viz.render_panoptic(image, id_map, segments, cats, alpha=args.alpha, outline=not args.no_outline,
                                         legend=not args.no_legend and not args.grid,
                                         title=img_path.stem if args.grid else None, scale=args.scale))
    if args.grid:
        out = viz.make_grid(tiles, ncols=args.cols)
        if not args.no_legend:
            out = viz.append_legend(out, [cats[c] for c in sorted(used)])
    else:
        out = tiles[0]
    viz.write_png(out_path, out)
    log.info("wrote %s (%dx%d)", out_path, out.shape[1], out.shape[0])
    return 0
