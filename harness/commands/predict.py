"""`harness predict`: run Panoptic SegFormer on images with the official test transform."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

HELP = "predict panoptic segmentations of images (official test transform)"
DESCRIPTION = """Run a Panoptic SegFormer on one or more images and write, per image <stem>:

  DIR/<stem>.png          COCO panoptic PNG (segment id = R + 256 G + 256^2 B, 0 = void)
  DIR/<stem>.json         segments_info with COCO category ids, scores, areas and boxes
  DIR/<stem>_overlay.png  the segments drawn over the image
  DIR/<stem>.npz          with --dump-raw: the candidate list and raw outputs (see README)

Images go through the official test transform: keep-ratio resize to short side 800 / long side <= 1333 with
OpenCV bilinear on uint8 (as mmcv), ImageNet mean/std in RGB, no padding (one image at a time).
--weights takes our format (folder or .safetensors) or an official .pth (converted on the fly).

Example:
  harness predict --model panoptic_segformer_r50 --weights panoptic_segformer_r50_2x.pth \\
      --image a.jpg b.jpg --out preds/
"""

METHODS = ("m", "p", "p*", "heuristic")

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `harness predict`."""
    parser.add_argument("--model", default=None,
                        help="model config name (panoptic_segformer_r50, _r101, _swin_l, _pvtv2_b5, _tiny); "
                             "optional for our checkpoints, which store it")
    parser.add_argument("--weights", required=True, help="our checkpoint (folder / .safetensors) or official .pth")
    parser.add_argument("--image", nargs="+", required=True, help="image files")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--post-process", choices=METHODS, default="m",
                        help="merging: m = official mask-wise (default), p = pixel argmax, p* = MaskFormer-style, "
                             "heuristic = Kirillov et al.")
    parser.add_argument("--dump-raw", action="store_true", help="also write <stem>.npz with the raw outputs")
    parser.add_argument("--categories", default=None,
                        help="JSON with a COCO 'categories' list (default: COCO panoptic when the class counts match)")
    parser.add_argument("--num-things", type=int, default=None, help="thing classes of an official checkpoint")
    parser.add_argument("--num-stuff", type=int, default=None, help="stuff classes of an official checkpoint")
    parser.add_argument("--mask-layer", type=int, default=-1,
                        help="take masks from mask-decoder block N (0-based; Table 10) instead of the final tail")
    parser.add_argument("--no-overlay", action="store_true", help="skip the overlay picture")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _load_categories(path: str | None, num_things: int, num_stuff: int,
                     stored: list[dict[str, Any]] | None = None) -> list[dict[str, Any]] | None:
    """Categories in contiguous order (things first); None when unknown.

    Order of precedence: `--categories`, the categories stored with the weights by `harness train`, then
    COCO panoptic when the class counts are COCO's.
    """
    import json

    from harness.data.coco_panoptic import coco_categories
    from harness.data.format import CategoryMap
    from harness.errors import UserError

    if path is not None:
        src = str(path)
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read categories from {src}: {exc}") from exc
        cats = doc["categories"] if isinstance(doc, dict) and "categories" in doc else doc
        if not isinstance(cats, list):
            raise UserError(f"{src}: expected a list of categories or a dict with 'categories'")
    elif stored:
        src, cats = "the categories stored with the weights", stored
    elif (num_things, num_stuff) == (80, 53):
        src, cats = "COCO panoptic categories", coco_categories()
    else:
        return None
    try:
        cmap = CategoryMap.from_categories(cats)
    except ValueError as exc:
        raise UserError(f"{src}: {exc}") from exc
    if (cmap.num_things, cmap.num_stuff) != (num_things, num_stuff):
        raise UserError(f"{src} has {cmap.num_things} thing + {cmap.num_stuff} stuff categories; the model has "
                        f"{num_things} + {num_stuff}")
    return [dict(c) for c in cmap.categories]


def _method_options(method: str, cfg: Any) -> dict[str, Any]:
    if method == "m":
        return {"thing_threshold": cfg.thing_threshold, "stuff_threshold": cfg.stuff_threshold,
                "thing_overlap": cfg.thing_overlap, "stuff_overlap": cfg.stuff_overlap}
    return {}


def _segments_info(result: Any, categories: list[dict[str, Any]] | None) -> tuple[Any, list[dict[str, Any]]]:
    """Segment id map ``(H, W) int64`` and COCO segments_info (ids 1, 2, ... in painting order)."""
    import numpy as np

    id_map = np.zeros(result.category.shape, np.int64)
    infos = []
    for n, seg in enumerate(result.segments, start=1):
        label = int(seg["label"])
        if seg["isthing"]:
            sel = (result.category == label) & (result.instance == int(seg["instance"]))
        else:
            sel = (result.category == label) & (result.instance == 0)
        if not sel.any():
            continue
        id_map[sel] = n
        ys, xs = np.nonzero(sel)
        x0, y0 = int(xs.min()), int(ys.min())
        cat_id = int(categories[label]["id"]) if categories is not None else label + 1
        infos.append({"id": n, "category_id": cat_id, "iscrowd": 0, "isthing": bool(seg["isthing"]),
                      "score": float(seg["score"]), "area": int(sel.sum()),
                      "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]})
    return id_map, infos


def run(args: argparse.Namespace) -> int:
    """Predict every image; one PNG + JSON (+ overlay, + npz) per image."""
    import numpy as np
    import torch

    from harness.commands._common import existing_file
    from harness.data.format import id2rgb
    from harness.data.transforms import load_test_image
    from harness.errors import UserError
    from harness.io import atomic_write, atomic_write_bytes, atomic_write_json
    from harness.logging_utils import progress_disabled
    from models.checkpoint import CheckpointError, load_model, read_meta
    from models.panoptic_segformer import outputs_at_layer

    try:
        from models.postprocess import candidates_from_outputs, post_process
    except ImportError as exc:  # part of another issue; predict needs it
        raise UserError(f"post-processing is not available (models.postprocess: {exc})") from exc

    images = [existing_file(p, "image") for p in args.image]
    stems = [p.stem for p in images]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise UserError(f"several --image files share the stem {dupes[0]!r}; outputs would overwrite each other")
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("num_things", args.num_things), ("num_stuff", args.num_stuff)) if v is not None}
    weights = Path(args.weights)
    if not weights.exists():
        raise UserError(f"weights not found: {weights}")
    try:
        model, cfg = load_model(weights, args.model, **overrides)
    except (CheckpointError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    try:
        device = torch.device(args.device)
        model.to(device)
    except (RuntimeError, AssertionError) as exc:
        raise UserError(f"cannot use device {args.device!r}: {exc}") from exc
    try:
        stored = read_meta(weights).get("categories")
    except CheckpointError as exc:
        raise UserError(str(exc)) from exc
    categories = _load_categories(args.categories, cfg.num_things, cfg.num_stuff, stored)
    if categories is None:
        log.warning("no categories for %d+%d classes: category_id = contiguous index + 1 (use --categories)",
                    cfg.num_things, cfg.num_stuff)
    viz = None
    if not args.no_overlay:
        try:
            import harness.viz as viz  # written in another issue
        except ImportError:
            log.info("harness.viz not available: skipping the overlay pictures")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    for path in tqdm(images, desc="predict", unit="img", disable=progress_disabled()):
        prep = load_test_image(path, cfg.test_scale)
        x = torch.from_numpy(prep.image)[None].to(device)
        with torch.no_grad():
            outputs = model(x)
            try:
                outputs = outputs_at_layer(outputs, args.mask_layer)
            except ValueError as exc:
                raise UserError(f"--mask-layer: {exc}") from exc
            cands = candidates_from_outputs(outputs, 0, cfg.num_things)
            result = post_process(args.post_process, cands, cfg.num_things, prep.ori_shape,
                                  **_method_options(args.post_process, cfg))
        id_map, infos = _segments_info(result, categories)
        png = path.stem + ".png"
        import cv2

        ok, buf = cv2.imencode(".png", np.ascontiguousarray(id2rgb(id_map)[..., ::-1]))
        if not ok:
            raise RuntimeError(f"PNG encoding failed for {png}")
        atomic_write_bytes(out_dir / png, buf.tobytes())
        atomic_write_json(out_dir / f"{path.stem}.json", {
            "file_name": png, "image": str(path), "height": prep.ori_shape[0], "width": prep.ori_shape[1],
            "model": cfg.name, "post_process": args.post_process, "segments_info": infos}, indent=1)
        if viz is not None:
            cat_by_id = {int(c["id"]): c for c in categories} if categories is not None else {}
            rgb = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            overlay = viz.render_panoptic(rgb, id_map, infos, cat_by_id, title=path.name)
            viz.write_png(out_dir / f"{path.stem}_overlay.png", overlay)
        if args.dump_raw:
            loc = outputs["location"]
            raw: dict[str, Any] = {
                "panoptic_category": result.category.astype(np.int32),
                "panoptic_instance": result.instance.astype(np.int32),
                "thing_logits_last": loc.logits[-1, 0].float().cpu().numpy(),
                "thing_boxes_last": loc.boxes[-1, 0].float().cpu().numpy(),
                "image_shape": np.asarray(prep.img_shape, np.int64),
                "ori_shape": np.asarray(prep.ori_shape, np.int64),
            }
            if result.candidate_scores is not None:
                raw["candidate_scores"] = result.candidate_scores.astype(np.float32)
                raw["candidate_labels"] = result.candidate_labels.astype(np.int64)
                raw["candidate_masks"] = result.candidate_masks.astype(np.float32)
            atomic_write(out_dir / f"{path.stem}.npz", lambda p: np.savez(p, **raw))
        log.info("%s: %d segments -> %s", path.name, len(infos), out_dir / png)
    return 0
