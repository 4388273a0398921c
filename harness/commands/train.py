"""`harness train`: train a Panoptic SegFormer config on a COCO-panoptic-layout data set."""

from __future__ import annotations

import argparse
import logging

from harness.commands._common import existing_dir

HELP = "train a Panoptic SegFormer config (resumable; writes model.safetensors + model.json)"
DESCRIPTION = """Train a model config on a data set in COCO panoptic layout (e.g. the synthetic one).

The optimiser is the official one (AdamW lr 1.4e-4, weight decay 1e-4, x0.1 lr for backbone /
sampling_offsets / reference_points, gradient clipping 0.1, lr x0.1 at 3/4 of the iterations) and so is
the augmentation (flip, resize / crop policies), scaled to the config's test size. Re-running with the
same --out resumes from DIR/checkpoint_last.pt.

example:
  harness train --config panoptic_segformer_tiny --data runs/synth --out runs/tiny --iters 300
"""

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="model config name, e.g. panoptic_segformer_tiny")
    parser.add_argument("--data", required=True, help="data set root (<root>/<split>/, <root>/annotations/)")
    parser.add_argument("--out", required=True, help="output folder (checkpoint, weights, train_log.csv)")
    parser.add_argument("--iters", type=int, required=True, help="total training iterations")
    parser.add_argument("--split", default="train2017", help="training split (default: train2017)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per iteration (default: 1 as official per GPU; 2 for the tiny config)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="AdamW learning rate (default: 1.4e-4 as official; 1e-3 for the tiny config)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation, sampling and augmentation")
    parser.add_argument(
        "--no-augment", action="store_true", help="only the test resize (no flip / crop / scale jitter)"
    )
    parser.add_argument("--checkpoint-every", type=int, default=100, help="iterations between checkpoints")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    parser.add_argument("--init", default=None, help="start from these weights (model.safetensors or checkpoint)")
    parser.add_argument(
        "--filter-rounds",
        choices=("official", "paper"),
        default="official",
        help="thing-query filter: official one round (default) or the paper's multi-round selection",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from harness.engine.data import AugmentConfig
    from harness.engine.train import default_train_config, train
    from harness.errors import UserError
    from models.configs import MODEL_CONFIGS
    from models.matcher import MatcherConfig

    if args.config not in MODEL_CONFIGS:
        raise UserError(f"unknown --config {args.config!r}; choose one of {', '.join(MODEL_CONFIGS)}")
    if args.iters < 1:
        raise UserError(f"--iters must be >= 1, got {args.iters}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    existing_dir(args.data, "--data")
    cfg = dataclasses.replace(
        default_train_config(args.config), seed=args.seed, checkpoint_every=max(1, args.checkpoint_every)
    )
    if args.batch_size is not None:
        cfg = dataclasses.replace(cfg, batch_size=args.batch_size)
    if args.lr is not None:
        cfg = dataclasses.replace(cfg, lr=args.lr)
    if args.no_augment:
        cfg = dataclasses.replace(cfg, augment=AugmentConfig(enabled=False))
    cfg = dataclasses.replace(cfg, matcher=MatcherConfig(rounds=args.filter_rounds))
    path = train(
        args.config,
        args.data,
        args.out,
        args.iters,
        cfg,
        split=args.split,
        resume=not args.no_resume,
        init_weights=args.init,
        device=args.device,
    )
    print(path)
    return 0
