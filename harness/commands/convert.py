"""`harness convert`: official Panoptic SegFormer `.pth` -> our format (safetensors + JSON config)."""

from __future__ import annotations

import argparse
import logging

HELP = "convert an official Panoptic SegFormer checkpoint to our format (strict key check)"
DESCRIPTION = """Convert a released Panoptic SegFormer checkpoint (mmcv `.pth`, old or new key names) into our
format: a folder (or X.safetensors + X.json) with the weights and the model config. The keys are renamed by whole
path segments and then loaded strictly into the model: any missing, unexpected or shape-mismatched key is listed
and the command exits with status 2.

Example:
  harness convert --from official-psf --model panoptic_segformer_r50 \\
      --in panoptic_segformer_r50_2x.pth --out weights/psf_r50
"""

SOURCES = ("official-psf",)
MODELS = ("panoptic_segformer_r50", "panoptic_segformer_r101", "panoptic_segformer_swin_l",
          "panoptic_segformer_pvtv2_b5", "panoptic_segformer_tiny")

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `harness convert`."""
    parser.add_argument("--from", dest="source", choices=SOURCES, default="official-psf",
                        help="checkpoint flavour (default: official-psf)")
    parser.add_argument("--model", required=True, choices=MODELS, help="model config the checkpoint belongs to")
    parser.add_argument("--in", dest="input", required=True, help="official .pth file")
    parser.add_argument("--out", required=True,
                        help="output folder (model.safetensors + model.json) or a path ending in .safetensors")
    parser.add_argument("--num-things", type=int, default=80, help="thing classes (default: COCO 80)")
    parser.add_argument("--num-stuff", type=int, default=53, help="stuff classes (default: COCO 53)")


def run(args: argparse.Namespace) -> int:
    """Convert, check strictly, write; exit 2 listing the offending keys on any mismatch."""
    from harness.commands._common import existing_file
    from harness.errors import UserError
    from models.checkpoint import CheckpointError, load_state_dict_strict, save_checkpoint
    from models.configs import get_config
    from models.convert_official import convert_state_dict, read_official
    from models.panoptic_segformer import PanopticSegFormer

    src = existing_file(args.input, "checkpoint")
    cfg = get_config(args.model, num_things=args.num_things, num_stuff=args.num_stuff)
    try:
        raw, meta = read_official(src)
        state = convert_state_dict(raw, cfg.backbone)
        model = PanopticSegFormer(cfg)
        load_state_dict_strict(model, state, str(src))
    except CheckpointError as exc:
        raise UserError(str(exc)) from exc
    info = {"source": str(src), "source_format": args.source,
            "source_meta": {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))}}
    out = save_checkpoint(model.state_dict(), cfg, args.out, meta=info)
    log.info("converted %d tensors from %s to %s (%s)", len(state), src, out, cfg.name)
    return 0
