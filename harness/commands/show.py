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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", nargs="+", required=True, metavar="IMG", help="image file(s)")
    parser.add_argument("--panoptic", nargs="+", required=True, metavar="PNG",
                        help="panoptic PNG(s), one per image, same order")
    parser.add_argument("--json", required=True, metavar="J",
                        help="COCO panoptic JSON with segments_info and categories")
    parser.add_argument("--out", required=True, metavar="OUT.png", help="output PNG")
    parser.add_argument("--grid", action="store_true", help="render all images on one sheet")
    parser.add_argument("--cols", type=int, default=4, help="sheet columns with --grid (default 4)")
    parser.add_argument("--alpha", type=float, default=0.55, help="overlay opacity in [0, 1] (default 0.55)")
    parser.add_argument("--scale", type=int, default=1, help="integer upscaling of each image (default 1)")
    parser.add_argument("--no-outline", action="store_true", help="do not draw segment boundaries")
    parser.add_argument("--no-legend", action="store_true", help="do not draw the category legend")


def _load_json(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], dict[int, dict[str, Any]]]:
    """(annotations by PNG name, annotations by stem, categories by id) from a panoptic JSON."""
    import json

    from harness.errors import DataError

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read panoptic JSON {path}: {exc}") from None
    if not isinstance(data, dict) or "annotations" not in data or "categories" not in data:
        raise DataError(f"{path}: expected a COCO panoptic JSON with 'annotations' and 'categories'")
    cats: dict[int, dict[str, Any]] = {}
    for c in data["categories"]:
        if "id" not in c:
            raise DataError(f"{path}: category entry without 'id': {c!r}")
        cats[int(c["id"])] = c
    by_name: dict[str, dict[str, Any]] = {}
    by_stem: dict[str, dict[str, Any]] = {}
    for a in data["annotations"]:
        if "segments_info" not in a or "file_name" not in a:
            raise DataError(f"{path}: annotation of image_id {a.get('image_id')} lacks 'file_name' or 'segments_info'")
        by_name[str(a["file_name"])] = a
        by_stem[Path(str(a["file_name"])).stem] = a
    return by_name, by_stem, cats


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from harness import viz
    from harness.data.coco_panoptic import read_id_png, read_image_rgb
    from harness.commands._common import existing_file
    from harness.errors import DataError, UserError

    images = [existing_file(p, "image") for p in args.image]
    pngs = [existing_file(p, "panoptic PNG") for p in args.panoptic]
    json_path = existing_file(args.json, "panoptic JSON")
    if len(images) != len(pngs):
        raise UserError(f"got {len(images)} --image but {len(pngs)} --panoptic files; give one PNG per image")
    if len(images) > 1 and not args.grid:
        raise UserError(f"{len(images)} images given: add --grid to render them on one sheet")
    if not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha must be in [0, 1] (got {args.alpha})")
    if args.scale < 1 or args.cols < 1:
        raise UserError("--scale and --cols must be >= 1")
    if Path(args.out).suffix.lower() != ".png":
        raise UserError(f"--out must be a .png file (got {args.out})")

    by_name, by_stem, cats = _load_json(json_path)
    tiles = []
    used: set[int] = set()
    for img_path, png_path in zip(images, pngs):
        ann = by_name.get(png_path.name) or by_stem.get(png_path.stem) or by_stem.get(img_path.stem)
        if ann is None:
            raise UserError(f"no annotation for {png_path.name} (or {img_path.stem}) in {json_path}")
        segments = ann["segments_info"]
        for s in segments:
            if int(s["category_id"]) not in cats:
                raise DataError(f"{json_path}: segment id {s['id']} of {ann['file_name']} has unknown category_id "
                                f"{s['category_id']}")
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
    viz.write_png(args.out, out)
    log.info("wrote %s (%dx%d)", args.out, out.shape[1], out.shape[0])
    return 0
