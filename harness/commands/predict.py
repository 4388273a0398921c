"""`harness predict`: run any panoptic model of the zoo on images with its official test transform."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

HELP = "predict panoptic segmentations of images (official test transform of the model)"
DESCRIPTION = """Run a panoptic model (Panoptic SegFormer or a baseline) on one or more images and write, per image
<stem>:

  DIR/<stem>.png            COCO panoptic PNG (segment id = R + 256 G + 256^2 B, 0 = void)
  DIR/<stem>.json           segments_info with COCO category ids, scores, areas and boxes
  DIR/<stem>_overlay.png    the segments drawn over the image
  DIR/<stem>.npz            with --dump-raw: the candidate list and raw outputs (see README)
  DIR/<stem>_layers.npz     with --dump-raw --layers all: candidates and panoptic maps of every mask layer
  DIR/<stem>_attention.npz  with --dump-attention: mask-decoder attention maps of the painted queries

Images go through the model's official test transform (Panoptic SegFormer: keep-ratio resize to short side 800 /
long side <= 1333 with OpenCV bilinear on uint8 (as mmcv), ImageNet mean/std in RGB, no padding; one image at a
time). --weights takes our format (folder or .safetensors) or a released checkpoint (converted on the fly).

Mask layers (Table 10): --layer K takes masks from mask-decoder block K (1-based; "last" = the final tail, the
default), with the official per-layer scoring. --mask-layer N is the older 0-based spelling (-1 = last).

Examples:
  harness predict --model panoptic_segformer_r50 --weights panoptic_segformer_r50_2x.pth \\
      --image a.jpg b.jpg --out preds/
  harness predict --weights runs/tiny --image a.jpg --out preds/ --dump-raw --layers all --dump-attention
"""

METHODS = ("m", "p", "p*", "heuristic", "own")

log = logging.getLogger(__name__)


def _layer_name(text: str) -> str:
    """argparse type of --layer: ``last`` or a mask-decoder block 1..64 (the model's own are checked once loaded)."""
    from harness.errors import UserError

    t = text.strip()
    if t == "last":
        return t
    if t.isdigit() and 1 <= int(t) <= 64:
        return str(int(t))
    raise UserError(f"mask layer must be 'last' or a block number >= 1, got {text!r}")


def _layer_list(text: str) -> str:
    """argparse type of --layers: ``all`` or a comma list of layers (syntax; the model's are checked later)."""
    from harness.errors import UserError

    items = [s.strip() for s in text.split(",") if s.strip()]
    if items == ["all"]:
        return text
    if not items:
        raise UserError("give 'all' or a comma list of mask layers")
    for item in items:
        _layer_name(item)
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `harness predict` (every value is checked here, at parse time)."""
    from harness.commands._common import device, int_range, user_type

    parser.add_argument("--model", default=None,
                        help="model name (panoptic_segformer_r50, _r101, _swin_l, _pvtv2_b5, _tiny, or a baseline such "
                             "as detr_r50_panoptic); optional for our checkpoints, which store it")
    parser.add_argument("--weights", required=True,
                        help="our checkpoint (folder / .safetensors), a training folder or its checkpoint_last.pt, or "
                             "a released file")
    parser.add_argument("--from", dest="source", default=None,
                        help="format of a released checkpoint (default: the model family's own)")
    parser.add_argument("--image", nargs="+", required=True, help="image files")
    parser.add_argument("--out", required=True,
                        help="output folder: new, empty, or an earlier output of harness predict with the same model, "
                             "weights and post-processing (more images are added to it)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier output of other settings in --out (only the files it wrote)")
    parser.add_argument("--post-process", choices=METHODS, default=None,
                        help="merging: m = official mask-wise (Panoptic SegFormer's default), p = pixel argmax, "
                             "p* = MaskFormer-style, heuristic = Kirillov et al., own = the model's own official "
                             "post-processing (a baseline's default)")
    parser.add_argument("--layer", default=None, type=user_type(_layer_name, "layer"),
                        help="mask layer of the output: 'last' (default) or a mask-decoder block 1, 2, ...")
    parser.add_argument("--mask-layer", type=int_range(-1, 63), default=None,
                        help="older spelling of --layer: 0-based block, -1 = last")
    parser.add_argument("--dump-raw", action="store_true", help="also write <stem>.npz with the raw outputs")
    parser.add_argument("--layers", default=None, type=user_type(_layer_list, "layers"),
                        help="with --dump-raw: also write <stem>_layers.npz for these mask layers: 'all' (the "
                             "model's mask layers, e.g. 1,2,3,last for R50) or a comma list")
    parser.add_argument("--dump-attention", action="store_true",
                        help="also write <stem>_attention.npz: per-head mask-decoder attention over the 1/8 grid, "
                             "every layer, for the queries painted in the result (Panoptic SegFormer)")
    parser.add_argument("--attention-kind", choices=("logits", "softmax"), default="logits",
                        help="logits = raw q.k/sqrt(d), the maps the mask head reads (paper Eq. 1, default); "
                             "softmax = attention weights over all keys, 1/8 part")
    parser.add_argument("--categories", default=None,
                        help="JSON with a COCO 'categories' list (default: COCO panoptic when the class counts match)")
    parser.add_argument("--num-things", type=int_range(1, 100000), default=None,
                        help="thing classes of a released checkpoint")
    parser.add_argument("--num-stuff", type=int_range(0, 100000), default=None,
                        help="stuff classes of a released checkpoint")
    parser.add_argument("--no-overlay", action="store_true", help="skip the overlay picture")
    parser.add_argument("--device", type=device, default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--threads", type=int_range(1, 1024), default=None, help="torch CPU threads")


OUTPUT_SUFFIXES = (".png", ".json", "_overlay.png", ".npz", "_layers.npz", "_attention.npz")
COMMAND = "predict"


def _own_stems(out_dir: Path) -> list[str]:
    """Image stems whose outputs harness predict wrote in `out_dir`: each has its ``<stem>.json`` (written first,
    before the PNG and the rest), recognised by its keys."""
    import json

    from harness.io import visible_files

    stems = []
    for p in visible_files(out_dir, (".json",)):
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and {"file_name", "model", "post_process", "segments_info"} <= set(doc):
            stems.append(p.stem)
    return stems


def _remove_outputs(out_dir: Path, stems: Any) -> int:
    """Delete the files that harness predict writes for these image stems (and nothing else) from `out_dir`."""
    removed = 0
    for stem in stems:
        for suffix in OUTPUT_SUFFIXES:
            p = out_dir / f"{stem}{suffix}"
            if p.is_file() and not p.is_symlink():
                p.unlink()
                removed += 1
    return removed


def _load_categories(path: str | None, num_things: int, num_stuff: int,
                     stored: list[dict[str, Any]] | None = None) -> list[dict[str, Any]] | None:
    """Categories in contiguous order (things first); None when unknown.

    Order of precedence: `--categories`, the categories stored with the weights by `harness train`, then
    COCO panoptic when the class counts are COCO's.
    """
    from harness.data.coco_panoptic import coco_categories
    from harness.data.format import CategoryMap
    from harness.errors import UserError

    if path is not None:
        from harness.data.panoptic_json import load_categories

        src = f"--categories {path}"
        cats = load_categories(path, "--categories")  # validated: names the file and the entry
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


def _output_layer(args: argparse.Namespace) -> str:
    """The mask layer of the main output from --layer / --mask-layer ("last" or "1", "2", ...)."""
    from harness.errors import UserError
    from models.inference import LAST_LAYER, parse_layer

    if args.layer is not None and args.mask_layer is not None:
        raise UserError("give --layer or --mask-layer, not both")
    if args.mask_layer is not None:
        if args.mask_layer < -1:
            raise UserError(f"--mask-layer {args.mask_layer}: use -1 (last) or a 0-based block number")
        return LAST_LAYER if args.mask_layer == -1 else str(args.mask_layer + 1)
    try:
        k = parse_layer(args.layer)
    except ValueError as exc:
        raise UserError(f"--layer: {exc}") from None
    return LAST_LAYER if k is None else str(k)


def _dump_layers(spec: str | None, model: Any) -> list[str]:
    """Layers of ``<stem>_layers.npz`` from --layers ('all' or a comma list), validated against the model."""
    from harness.errors import UserError
    from models.inference import LAST_LAYER, parse_layer

    if spec is None:
        return []
    available = list(model.mask_layers())
    if spec.strip() == "all":
        return available
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        try:
            k = parse_layer(item)
        except ValueError as exc:
            raise UserError(f"--layers: {exc}") from None
        name = LAST_LAYER if k is None else str(k)
        if name not in available:
            raise UserError(f"--layers: the model has mask layers {', '.join(available)}; {item!r} is not one")
        out.append(name)
    if not out:
        raise UserError("--layers: give 'all' or a comma list of mask layers")
    return out


def _valid_mask_size(img_shape: tuple[int, int], input_hw: tuple[int, int],
                     mask_hw: tuple[int, int]) -> tuple[int, int]:
    """The valid (h, w) of masks when the input was padded: the image's share of the mask grid, rounded up."""
    return (min(mask_hw[0], math.ceil(img_shape[0] * mask_hw[0] / input_hw[0])),
            min(mask_hw[1], math.ceil(img_shape[1] * mask_hw[1] / input_hw[1])))


class _Predictor:
    """Model + post-processing of one `harness predict` run (any family of the zoo)."""

    def __init__(self, model: Any, method: str, device: Any) -> None:
        self.model = model
        self.cfg = model.cfg
        self.method = method
        self.device = device

    def forward(self, prep: Any) -> tuple[dict[str, Any], tuple[int, int] | None]:
        """Model outputs of one prepared image and the valid mask size when the input is padded (else None)."""
        import torch

        x = torch.from_numpy(prep.image)[None].to(self.device)
        pad = None
        if tuple(prep.image.shape[-2:]) != tuple(prep.img_shape):  # the transform padded (size_divisor > 1)
            pad = torch.ones((1, *prep.image.shape[-2:]), dtype=torch.bool, device=self.device)
            pad[0, : prep.img_shape[0], : prep.img_shape[1]] = False
        with torch.no_grad():
            outputs = self.model(x, pad)
        return outputs, (None if pad is None else tuple(prep.image.shape[-2:]))

    def candidates(self, outputs: dict[str, Any], layer: str, padded_hw: tuple[int, int] | None,
                   prep: Any) -> Any:
        from harness.errors import UserError

        try:
            cands = self.model.candidates(outputs, 0, layer)
        except ValueError as exc:
            raise UserError(f"mask layer {layer!r}: {exc}") from None
        if padded_hw is not None:
            vh, vw = _valid_mask_size(prep.img_shape, padded_hw, tuple(cands.masks.shape[-2:]))
            cands.masks = cands.masks[:, :vh, :vw]
        return cands

    def merge(self, outputs: dict[str, Any], layer: str, padded_hw: tuple[int, int] | None, prep: Any,
              with_candidates: bool) -> Any:
        """Panoptic result of mask layer ``layer`` (the "(m)" candidate list too when ``with_candidates``)."""
        from harness.errors import UserError
        from models.inference import LAST_LAYER
        from models.postprocess import post_process

        if self.method == "own":
            if layer != LAST_LAYER:
                raise UserError(f"--post-process own works on the last mask layer only, not {layer!r} (use m, p, "
                                "p* or heuristic for the other layers)")
            valid = None
            if padded_hw is not None:
                cands = self.candidates(outputs, layer, padded_hw, prep)
                valid = tuple(cands.masks.shape[-2:])
            return self.model.own_post_process(outputs, 0, prep.ori_shape, valid)
        cands = self.candidates(outputs, layer, padded_hw, prep)
        options = dict(self.model.post_process_options(self.method))
        if self.method == "m" and with_candidates:
            options["return_candidates"] = True
        return post_process(self.method, cands, self.cfg.num_things, prep.ori_shape, **options)


def _psf_raw(outputs: dict[str, Any], prep: Any, result: Any) -> dict[str, Any]:
    """Panoptic SegFormer's --dump-raw keys (unchanged since the first release of predict)."""
    import numpy as np

    loc = outputs["location"]
    raw: dict[str, Any] = {
        "panoptic_category": result.category.astype(np.int32),
        "panoptic_instance": result.instance.astype(np.int32),
        "thing_logits_last": loc.logits[-1, 0].float().cpu().numpy(),
        "thing_boxes_last": loc.boxes[-1, 0].float().cpu().numpy(),
        "image_shape": np.asarray(prep.img_shape, np.int64),
        "ori_shape": np.asarray(prep.ori_shape, np.int64),
    }
    raw.update(_candidate_arrays(result, ""))
    return raw


def _candidate_arrays(result: Any, suffix: str) -> dict[str, Any]:
    import numpy as np

    if result.candidate_scores is None:
        return {}
    return {f"candidate_scores{suffix}": result.candidate_scores.astype(np.float32),
            f"candidate_labels{suffix}": result.candidate_labels.astype(np.int64),
            f"candidate_masks{suffix}": result.candidate_masks.astype(np.float32)}


def _attention_dump(maps_thing: dict[str, Any], maps_stuff: dict[str, Any], result: Any, num_thing_cands: int,
                    prep: Any, kind: str) -> dict[str, Any]:
    """``<stem>_attention.npz`` content (CONTRACTS.md "Attention dump").

    A painted segment's candidate index says which decoder query made it: index < ``num_thing_cands`` is row
    ``index`` of the thing mask decoder (one selected (query, label) pair), otherwise stuff query
    ``index - num_thing_cands``. Segments are kept in painting order; with joint matching (no stuff decoder) every
    segment, stuff classes included, is a thing-decoder query.
    """
    import numpy as np

    rows: dict[str, list[tuple[int, int, float]]] = {"thing": [], "stuff": []}
    for seg in result.segments:
        c = int(seg["candidate"])
        group, row = ("thing", c) if c < num_thing_cands else ("stuff", c - num_thing_cands)
        rows[group].append((row, int(seg["label"]), float(seg["score"])))
    out: dict[str, Any] = {"image_shape": np.asarray(prep.img_shape, np.int64),
                           "ori_shape": np.asarray(prep.ori_shape, np.int64),
                           "stride": np.asarray(8, np.int64), "kind": np.asarray(kind)}
    for group, maps in (("thing", maps_thing), ("stuff", maps_stuff)):
        idx = [r for r, _, _ in rows[group]]
        out[f"labels_{group}"] = np.asarray([lab for _, lab, _ in rows[group]], np.int64)
        out[f"scores_{group}"] = np.asarray([s for _, _, s in rows[group]], np.float32)
        for layer, m in maps.items():  # (1, heads, N, h, w) float16
            out[f"attn_{group}_{layer}"] = m[0][:, idx].permute(1, 0, 2, 3).cpu().numpy().astype(np.float16)
    return out


def run(args: argparse.Namespace) -> int:
    """Predict every image; one PNG + JSON (+ overlay, + npz files) per image."""
    import contextlib

    import numpy as np
    import torch

    from harness.commands._common import check_device, check_output, existing_file
    from harness.data.format import id2rgb
    from harness.data.transforms import prepare, read_image_bgr
    from harness.errors import UserError
    from harness.io import atomic_write_bytes, atomic_write_json, atomic_write_npz, sweep_stale_temporaries
    from harness.logging_utils import progress_disabled
    from harness.outputs import check_claimable, claim_output_dir
    from models.checkpoint import CheckpointError, load_model, read_meta, resolve_weights
    from models.inference import LAST_LAYER

    # Everything that needs no model first: inputs, options, the output folder (nothing is written yet).
    images = [existing_file(p, "--image") for p in args.image]
    stems = [p.stem for p in images]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise UserError(f"several --image files share the stem {dupes[0]!r}; outputs would overwrite each other")
    if args.layers is not None and not args.dump_raw:
        raise UserError("--layers selects the mask layers of --dump-raw's <stem>_layers.npz; add --dump-raw")
    layer = _output_layer(args)
    weights = resolve_weights(args.weights)  # CheckpointError (one line) for a missing or empty folder
    categories_file = existing_file(args.categories, "--categories") if args.categories else None
    inputs = [*images, Path(args.weights), weights, categories_file]
    out_dir = check_output(args.out, "--out", kind="dir", inputs=inputs)
    for stem in stems:  # e.g. --image preds/a.png --out preds: a.png would be replaced by its own prediction
        for suffix in OUTPUT_SUFFIXES:
            check_output(out_dir / f"{stem}{suffix}", "--out", inputs=inputs)
    check_claimable(out_dir, COMMAND)
    if categories_file is not None:
        from harness.data.panoptic_json import load_categories

        load_categories(categories_file, "--categories")  # a malformed file is refused before the model loads
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("num_things", args.num_things), ("num_stuff", args.num_stuff)) if v is not None}
    try:
        model, cfg = load_model(weights, args.model, args.source, **overrides)
    except (CheckpointError, ValueError) as exc:
        raise UserError(str(exc)) from None
    try:
        device = torch.device(args.device)
        model.to(device)
    except (RuntimeError, AssertionError) as exc:
        raise UserError(f"cannot use device {args.device!r}: {exc}") from None
    if layer not in model.mask_layers():
        raise UserError(f"--layer: mask layer {layer!r} is not one of {cfg.name}'s mask layers "
                        f"({', '.join(model.mask_layers())})")
    method = args.post_process or getattr(model, "default_post_process", "m")
    dump_layers = _dump_layers(args.layers, model) if args.dump_raw else []
    if method == "own" and any(name != LAST_LAYER for name in [layer, *dump_layers]):
        raise UserError("--post-process own merges the last mask layer only; use m, p, p* or heuristic for --layer / "
                        "--layers with other layers")
    attention_heads = None
    if args.dump_attention:
        from models.panoptic_segformer import PanopticSegFormer

        if not isinstance(model, PanopticSegFormer):
            raise UserError(f"--dump-attention: {cfg.name} has no Panoptic SegFormer mask decoder to record")
        head = model.bbox_head
        attention_heads = (head.things_mask_head, head.stuff_mask_head)
    try:
        stored = read_meta(weights).get("categories")
    except CheckpointError as exc:
        raise UserError(str(exc)) from exc
    categories = _load_categories(str(categories_file) if categories_file else None, cfg.num_things,
                                  cfg.num_stuff, stored)
    if categories is None:
        log.warning("no categories for %d+%d classes: category_id = contiguous index + 1 (use --categories)",
                    cfg.num_things, cfg.num_stuff)
    viz = None
    if not args.no_overlay:
        try:
            import harness.viz as viz  # written in another issue
        except ImportError:
            log.info("harness.viz not available: skipping the overlay pictures")

    # The output folder: ours (marker), or new/empty. Settings decide the bytes of every <stem>.png / .json.
    from harness.engine.grid_config import weights_sha256

    settings = {"model": cfg.name, "weights_sha256": weights_sha256(weights), "source": args.source,
                "post_process": method, "layer": layer,
                "categories": [int(c["id"]) for c in categories] if categories is not None else None,
                "attention_kind": args.attention_kind if args.dump_attention else None}
    claim = claim_output_dir(out_dir, COMMAND, settings, overwrite=args.overwrite, overwrite_flag="--overwrite")
    sweep_stale_temporaries(out_dir)
    if claim.previous is not None:  # an interrupted (or, with --overwrite, complete) output of other settings
        n = _remove_outputs(out_dir, _own_stems(out_dir))
        log.info("replacing the earlier predict output in %s (%d of its files removed)", out_dir, n)
    predictor = _Predictor(model, method, device)
    spec = model.test_transform()

    from tqdm import tqdm

    from models.mask_decoder import record_attention

    for path in tqdm(images, desc="predict", unit="img", disable=progress_disabled()):
        bgr = read_image_bgr(path)
        rgb = np.ascontiguousarray(bgr[..., ::-1])
        prep = prepare(spec, rgb)
        with contextlib.ExitStack() as stack:
            maps = [stack.enter_context(record_attention(h, args.attention_kind)) if h is not None else {}
                    for h in (attention_heads or ())]
            outputs, padded_hw = predictor.forward(prep)
        result = predictor.merge(outputs, layer, padded_hw, prep, with_candidates=args.dump_raw)
        id_map, infos = _segments_info(result, categories)
        png = path.stem + ".png"
        import cv2

        ok, buf = cv2.imencode(".png", np.ascontiguousarray(id2rgb(id_map)[..., ::-1]))
        if not ok:
            raise RuntimeError(f"PNG encoding failed for {png}")
        # The JSON first: it marks the stem's files as ours (_own_stems) before any other is written.
        atomic_write_json(out_dir / f"{path.stem}.json", {
            "file_name": png, "image": str(path), "height": prep.ori_shape[0], "width": prep.ori_shape[1],
            "model": cfg.name, "post_process": method, "layer": layer, "segments_info": infos}, indent=1)
        atomic_write_bytes(out_dir / png, buf.tobytes())
        if viz is not None:
            cat_by_id = {int(c["id"]): c for c in categories} if categories is not None else {}
            overlay = viz.render_panoptic(rgb, id_map, infos, cat_by_id, title=path.name)
            viz.write_png(out_dir / f"{path.stem}_overlay.png", overlay)
        if args.dump_raw:
            dump = getattr(model, "dump_raw", None)
            raw = dump(outputs, 0, prep, result) if dump is not None else _psf_raw(outputs, prep, result)
            atomic_write_npz(out_dir / f"{path.stem}.npz", raw)
        if dump_layers:
            per_layer: dict[str, Any] = {}
            for name in dump_layers:
                res = result if name == layer else predictor.merge(outputs, name, padded_hw, prep, True)
                per_layer[f"panoptic_category_{name}"] = res.category.astype(np.int32)
                per_layer[f"panoptic_instance_{name}"] = res.instance.astype(np.int32)
                per_layer.update(_candidate_arrays(res, f"_{name}"))
            atomic_write_npz(out_dir / f"{path.stem}_layers.npz", per_layer)
        if attention_heads is not None:
            num_thing_cands = int(outputs["thing_masks"].shape[1])
            attn = _attention_dump(maps[0], maps[1] if len(maps) > 1 else {}, result, num_thing_cands, prep,
                                   args.attention_kind)
            atomic_write_npz(out_dir / f"{path.stem}_attention.npz", attn)
        log.info("%s: %d segments -> %s", path.name, len(infos), out_dir / png)
    claim.complete()
    return 0
