"""`harness train`: train a model config on a COCO-panoptic-layout data set (one process, or torchrun)."""

from __future__ import annotations

import argparse
import logging

from harness.commands._common import device, float_range, int_range

HELP = "train a model config (resumable, torchrun-ready; writes model.safetensors + model.json)"
DESCRIPTION = """Train a model config on a data set in COCO panoptic layout (e.g. the synthetic one).

Give the length as --iters N (optimisation steps) or --epochs E (passes over the training split), exactly one.
The recipe is the official one (AdamW lr 1.4e-4 for a global batch of 8, weight decay 1e-4, x0.1 lr for
backbone / sampling_offsets / reference_points, gradient clipping 0.1, lr x0.1 at 3/4 of the run, flip and
resize / crop augmentation scaled to the config's test size); the full baselines use their own upstream recipes
(DETR / Deformable DETR main.py, MaskFormer AdamW, Panoptic FCN SGD + poly) and the tiny configs the tiny recipe
(docs/training.md). Re-running with the same --out resumes from DIR/checkpoint_last.pt (exactly: the sample
order and augmentation are functions of the seed and the step); a larger --iters / --epochs continues the run.
--out must be new, empty or a training folder of this command (DIR/.psf-harness.json pins the settings): a run of
other settings (data, split, seed, batch size, lr, augmentation, --init weights ...) is refused, naming the first
difference, unless --overwrite, which deletes only the files harness train writes; --no-resume over a run's
weights needs --overwrite too. With torchrun each process takes
--batch-size images per step; the global batch and the learning rate (optionally scaled linearly with
--lr-scaling linear) are printed.

examples:
  harness train --config panoptic_segformer_tiny --data runs/synth --out runs/tiny --iters 3000 --val-every 500
  torchrun --nproc-per-node 8 -m harness train --config panoptic_segformer_r50 --data coco --out runs/r50 \\
      --epochs 24 --device cuda --amp
"""

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="model name, e.g. panoptic_segformer_tiny")
    parser.add_argument("--data", required=True, help="data set root (<root>/<split>/, <root>/annotations/)")
    parser.add_argument("--out", required=True, help="output folder (checkpoints, logs, weights)")
    parser.add_argument("--iters", type=int_range(1, 10**7), default=None, help="run length in optimisation steps")
    parser.add_argument("--epochs", type=float_range(0, 10**5, lo_open=True), default=None,
                        help="run length in epochs (lr x0.1 at 3/4)")
    parser.add_argument("--split", default="train2017", help="training split (default: train2017)")
    parser.add_argument("--batch-size", type=int_range(1, 1024), default=None,
                        help="images per step and process (default: 1 as official; 2 for the tiny configs)")
    parser.add_argument("--lr", type=float_range(0, 10, lo_open=True), default=None,
                        help="AdamW learning rate (default: 1.4e-4 as official; 1e-3 for the tiny configs)")
    parser.add_argument("--lr-scaling", choices=("none", "linear"), default="none",
                        help="none: use --lr as given (official); linear: lr x global batch / reference batch "
                             "(8 official, 2 tiny)")
    parser.add_argument("--lr-drop", type=float_range(0, 1, lo_open=True, hi_open=True), nargs="+", default=None,
                        metavar="FRACTION", help="lr x0.1 after these fractions of the run (default 0.75: epoch 18 "
                                                 "of 24 as the official 2x; the official 1x drops at 8/12 = 0.667)")
    parser.add_argument("--warmup", type=int_range(0, 10**7), default=None,
                        help="linear lr warm-up steps (official: 0)")
    parser.add_argument("--ema", type=float_range(0, 1, hi_open=True), default=None, metavar="DECAY",
                        help="validate and write an exponential moving average of the weights with this decay, "
                             "e.g. 0.998 (default 0 = off, as official)")
    parser.add_argument("--amp", nargs="?", const="auto", default=None, choices=("auto", "bf16", "fp16"),
                        help="mixed precision: bf16 where supported (CPU, recent GPUs), else fp16 on CUDA")
    parser.add_argument("--seed", type=int_range(0, 2**32 - 1), default=0,
                        help="seed for initialisation, sample order, augmentation")
    parser.add_argument("--augment", choices=("official", "flip", "none"), default=None,
                        help="official: flip + resize/crop jitter scaled to the test size (default of the full "
                             "configs); flip: flips at the test scale (tiny default); none: the test resize only")
    parser.add_argument("--no-augment", action="store_true", help="same as --augment none")
    parser.add_argument("--val-every", type=int_range(0, 10**7), default=0,
                        help="steps between validations (PQ on --val-images images; 0 = at the end only)")
    parser.add_argument("--val-images", type=int_range(0, 10**6), default=None,
                        help="validation images (default: 32 with --val-every, else 0 = no validation)")
    parser.add_argument("--val-split", default="val2017", help="validation split (default: val2017)")
    parser.add_argument("--checkpoint-every", type=int_range(1, 10**7), default=100, help="steps between checkpoints")
    parser.add_argument("--no-resume", action="store_true",
                        help="start over instead of resuming (over an existing run: with --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a training run of other settings in --out (deletes only the files harness "
                             "train wrote)")
    parser.add_argument("--pretrained-backbone", default=None, metavar="FILE",
                        help="ImageNet backbone weights to start from (a local .pth, e.g. torchvision's or timm's "
                             "resnet50; Panoptic SegFormer configs; the paper's recipe starts from these)")
    parser.add_argument("--init", default=None,
                        help="start from these weights, same model config (a folder with model.safetensors, a "
                             ".safetensors file, a training folder or its checkpoint_last.pt)")
    parser.add_argument("--filter-rounds", choices=("official", "paper"), default="official",
                        help="Panoptic SegFormer thing-query filter: official one round, or the paper's rounds")
    parser.add_argument("--device", type=device, default="cpu",
                        help="torch device (default: cpu; with torchrun, cuda means cuda:LOCAL_RANK)")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from harness.commands._common import check_device, check_output, existing_dir, existing_file
    from harness.engine.train import default_train_config, train
    from harness.engine.train_outputs import check_folder
    from harness.errors import UserError
    from models.zoo import model_names

    if args.config not in model_names():
        raise UserError(f"unknown --config {args.config!r}; choose one of {', '.join(model_names())}")
    if (args.iters is None) == (args.epochs is None):
        raise UserError("give exactly one of --iters and --epochs")
    existing_dir(args.data, "--data")
    out = check_output(args.out, "--out", kind="dir", inputs=[args.init, args.pretrained_backbone],
                       input_dirs=[args.data])
    check_device(args.device)
    check_folder(out)  # not ours / another command's output / a garbage marker: before any work
    if args.init is not None:
        _check_init(args.init)
    overrides = {}
    if args.pretrained_backbone is not None:
        from models.zoo import get_config

        existing_file(args.pretrained_backbone, "--pretrained-backbone")
        if not hasattr(get_config(args.config), "pretrained_backbone"):
            raise UserError(f"--pretrained-backbone: {args.config} has no pretrained-backbone option (Panoptic "
                            "SegFormer configs have; the baselines' released files hold their whole model: --init)")
        overrides["pretrained_backbone"] = args.pretrained_backbone
    cfg = default_train_config(args.config)
    val_images = args.val_images if args.val_images is not None else (32 if args.val_every else 0)
    changes = {"seed": args.seed, "checkpoint_every": args.checkpoint_every, "lr_scaling": args.lr_scaling,
               "val_every": args.val_every, "val_images": val_images, "val_split": args.val_split, "amp": args.amp,
               "matcher": dataclasses.replace(cfg.matcher, rounds=args.filter_rounds)}
    if args.batch_size is not None:
        changes["batch_size"] = args.batch_size
    if args.lr is not None:
        changes["lr"] = args.lr
    if args.warmup is not None:
        changes["warmup_iters"] = args.warmup
    if args.ema is not None:
        changes["ema_decay"] = args.ema
    if args.lr_drop is not None:
        changes["lr_drops"] = tuple(sorted(args.lr_drop))
    if args.no_augment or args.augment is not None:
        changes["augment_policy"] = "none" if args.no_augment else args.augment
    cfg = dataclasses.replace(cfg, **changes)
    try:
        path = train(args.config, args.data, args.out, iters=args.iters, epochs=args.epochs, train_cfg=cfg,
                     split=args.split, resume=not args.no_resume, init_weights=args.init, device=args.device,
                     overwrite=args.overwrite, **overrides)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    print(path)
    return 0


def _check_init(path: str) -> None:
    """``--init`` exists in a form `resolve_weights` accepts and, when a pickle, is one (cheap: the first bytes)."""
    from models.checkpoint import CheckpointError, resolve_weights, sniff_checkpoint

    try:
        weights = resolve_weights(path)
    except CheckpointError as exc:
        raise CheckpointError(f"--init: {exc}") from None
    if weights.is_file() and weights.suffix != ".safetensors":
        kind = sniff_checkpoint(weights)
        if kind not in ("zip", "pickle"):
            raise CheckpointError(f"--init {weights}: not a PyTorch checkpoint ({kind})")
