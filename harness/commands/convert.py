"""`harness convert`: a released checkpoint (any model family) -> our format (safetensors + JSON config)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

from harness.commands._common import int_range

HELP = "convert a released checkpoint (Panoptic SegFormer, DETR, Deformable DETR, ...) to our format (strict check)"
DESCRIPTION = """Convert a released checkpoint into our format: a folder (or X.safetensors + X.json) with the
weights and the model config. Each --from format has one converter (models.zoo.converter_sources()): the keys are
renamed to our module names and then loaded strictly into the model: any missing, unexpected or shape-mismatched
key is listed and the command exits with status 2. A partial load (Deformable DETR detection weights into D-DETR-MS,
whose panoptic head has no released weights) lists the new tensors in the log and in model.json "meta".

Formats: official-psf (Panoptic SegFormer mmcv .pth), detr (DETR panoptic .pth), deformable-detr (Deformable DETR
detection .pth), and the other baseline families' formats. Default: the model family's own format.

Examples:
  harness convert --from official-psf --model panoptic_segformer_r50 \\
      --in panoptic_segformer_r50_2x.pth --out weights/psf_r50
  harness convert --from detr --model detr_r50_panoptic --in detr-r50-panoptic-00ce5173.pth --out weights/detr_r50
"""

log = logging.getLogger(__name__)


class _LazyChoices:
    """argparse ``choices`` computed on first use (keeps ``harness --help`` from importing torch)."""

    def __init__(self, compute: Callable[[], list[str]]) -> None:
        self._compute = compute
        self._values: list[str] | None = None

    def _get(self) -> list[str]:
        if self._values is None:
            self._values = list(self._compute())
        return self._values

    def __contains__(self, item: object) -> bool:
        return item in self._get()

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


def _sources() -> list[str]:
    from models.zoo import converter_sources

    return sorted(converter_sources())


def _models() -> list[str]:
    from models.zoo import model_names

    return model_names()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `harness convert`."""
    parser.add_argument("--from", dest="source", choices=_LazyChoices(_sources), default=None, metavar="FORMAT",
                        help="released checkpoint format (official-psf, detr, deformable-detr, ...; default: the "
                             "model family's own)")
    parser.add_argument("--model", required=True, choices=_LazyChoices(_models), metavar="MODEL",
                        help="model config the checkpoint belongs to (panoptic_segformer_r50, detr_r50_panoptic, "
                             "deformable_detr_r50_ms_refine, ...)")
    parser.add_argument("--in", dest="input", required=True, help="released checkpoint file")
    parser.add_argument("--out", required=True,
                        help="output folder (model.safetensors + model.json) or a path ending in .safetensors")
    parser.add_argument("--num-things", type=int_range(1, 100_000), default=80, help="thing classes (default: COCO 80)")
    parser.add_argument("--num-stuff", type=int_range(0, 100_000), default=53, help="stuff classes (default: COCO 53)")


def _convert_psf(args: argparse.Namespace, src: Any) -> int:
    """The Panoptic SegFormer path (unchanged: mmcv meta is kept in model.json)."""
    from harness.errors import UserError
    from models.checkpoint import CheckpointError, load_state_dict_strict, save_checkpoint
    from models.configs import get_config
    from models.convert_official import convert_state_dict, read_official
    from models.panoptic_segformer import PanopticSegFormer

    try:
        cfg = get_config(args.model, num_things=args.num_things, num_stuff=args.num_stuff)
    except ValueError as exc:
        raise UserError(f"--model {args.model}: {exc}") from None
    try:
        raw, meta = read_official(src)
        state = convert_state_dict(raw, cfg.backbone)
        model = PanopticSegFormer(cfg)
        load_state_dict_strict(model, state, str(src))
    except CheckpointError as exc:
        raise UserError(str(exc)) from exc
    info = {"source": str(src), "source_format": args.source or "official-psf",
            "source_meta": {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))}}
    out = save_checkpoint(model.state_dict(), cfg, args.out, meta=info)
    log.info("converted %d tensors from %s to %s (%s)", len(state), src, out, cfg.name)
    return 0


def run(args: argparse.Namespace) -> int:
    """Convert, check strictly, write; exit 2 listing the offending keys on any mismatch."""
    from harness.commands._common import check_output, existing_file
    from harness.errors import UserError
    from models.checkpoint import (
        CheckpointError,
        check_checkpoint_target,
        load_state_dict_strict,
        save_checkpoint,
        sniff_checkpoint,
    )
    from models.zoo import build_model, converter_sources, family_of, get_config

    # Everything about the paths is checked before the (slow) conversion.
    src = existing_file(args.input, "--in")
    out = check_output(args.out, "--out", kind="file" if Path(args.out).suffix else "dir", inputs=[src])
    try:
        weights, config = check_checkpoint_target(out)
    except CheckpointError as exc:
        raise UserError(f"--out {exc}") from None
    for target in (weights, config):
        check_output(target, "--out", inputs=[src])
    kind = sniff_checkpoint(src)
    if kind == "safetensors":
        raise UserError(f"--in {src} is already in our format (safetensors); nothing to convert")
    if kind not in ("zip", "pickle"):
        raise UserError(f"--in {src}: not a PyTorch checkpoint ({kind})")
    fam = family_of(args.model)
    source = args.source or fam.default_source
    if source not in fam.converters:
        owner = converter_sources().get(source, "?")
        raise UserError(f"--from {source} reads {owner} checkpoints, but {args.model} is a {fam.name} model "
                        f"(use --from {' / '.join(fam.converters) or '(none)'})")
    if fam.name == "panoptic_segformer":
        return _convert_psf(args, src)
    try:
        cfg = get_config(args.model, num_things=args.num_things, num_stuff=args.num_stuff)
    except ValueError as exc:
        raise UserError(f"--model {args.model}: {exc}") from exc
    try:
        state = fam.converters[source](src, cfg)
        model = build_model(cfg)
        load_state_dict_strict(model, state, str(src))
    except CheckpointError as exc:
        raise UserError(str(exc)) from exc
    info: dict[str, Any] = {"source": str(src), "source_format": source}
    partial = getattr(state, "partial_load", None)
    if partial is not None:
        info["partial_load"] = partial.to_dict()
        log.warning("%s", partial.summary())
    out = save_checkpoint(model.state_dict(), cfg, args.out, meta=info)
    log.info("converted %d tensors from %s to %s (%s)", len(state), src, out, cfg.name)
    return 0
