"""`harness eval`: predict a data set with a model, write COCO panoptic predictions and score PQ."""

from __future__ import annotations

import argparse

from harness.commands._common import existing_dir, existing_file

HELP = "evaluate weights on a data set: COCO panoptic predictions + PQ (post-processing m|p|p*|heuristic)"
DESCRIPTION = """Run a model over a split with the official test transform, post-process each image, write
DIR/pred/*.png + DIR/pred.json (COCO panoptic) and DIR/pq.json, and print the PQ table.

Post-processing: m = the official mask-wise merging (default), p = our pixel-wise argmax, p* = MaskFormer's
score-weighted argmax, heuristic = Kirillov et al. (see models/postprocess.py).

example:
  harness eval --weights runs/tiny/model.safetensors --data runs/synth --out runs/tiny/eval
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights", required=True, help="model.safetensors (model.json beside it) or checkpoint_last.pt"
    )
    parser.add_argument("--data", required=True, help="data set root")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", default="val2017", help="split to evaluate (default: val2017)")
    parser.add_argument(
        "--post-process", choices=("m", "p", "p*", "heuristic"), default="m", help="merging method (default: m)"
    )
    parser.add_argument("--model", default=None, help="config name, for weights without model.json")
    parser.add_argument("--max-images", type=int, default=None, help="score only the first N images")
    parser.add_argument("--boundary", action="store_true", help="also compute Boundary PQ")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def run(args: argparse.Namespace) -> int:
    from harness.engine.evaluate import evaluate
    from harness.errors import UserError

    existing_file(args.weights, "--weights")
    existing_dir(args.data, "--data")
    if args.max_images is not None and args.max_images < 1:
        raise UserError(f"--max-images must be >= 1, got {args.max_images}")
    result = evaluate(
        args.weights,
        args.data,
        args.out,
        split=args.split,
        post_process_method=args.post_process,
        max_images=args.max_images,
        model_name=args.model,
        device=args.device,
        boundary=args.boundary,
    )
    for key, title in (("pq", "Mask PQ"), ("boundary_pq", "Boundary PQ")):
        if key not in result:
            continue
        print(f"{title:12s} {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} {'N':>4s}")
        for split in ("All", "Things", "Stuff"):
            row = result[key][split]
            vals = [f"{100 * row[k]:6.1f}" if row[k] is not None else f"{'-':>6s}" for k in ("pq", "sq", "rq")]
            print(f"{split:12s} {' '.join(vals)} {row['n']:4d}")
    return 0
