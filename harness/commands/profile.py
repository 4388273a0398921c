"""`harness profile`: parameters, FLOPs (two conventions) and images/s of any model in `models.zoo`."""

from __future__ import annotations

import argparse
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any

HELP = "parameters, FLOPs and images/s of a model (Tables 1, 5, D.1)"
DESCRIPTION = """\
Builds a model by name (random weights, or --weights), then prints and optionally writes one row:

  params_m            all parameters (M)
  params_trainable_m  parameters with requires_grad (M): what mmcv counts, the paper's #P
  gflops              ours: PyTorch's FLOP counter, 2 FLOPs per multiply-add, every matrix product counted,
                      plus formulas for deformable attention (compiled op or grid_sample fallback) and bilinear
                      resizing
  gflops_mmcv         the paper's convention: mmcv's get_model_complexity_info rules (1 FLOP per multiply-add,
                      nn.Conv/Linear/Norm/ReLU/Pool modules only; matmuls, interpolation and deformable
                      attention's core count 0). The paper's #F is this at --size 1200x800 (official
                      get_flops.py), mask decoders included: R50 214.2 G, R101 286 G.
  images_per_s        forward passes of a (batch, 3, H, W) random input after warm-up, CUDA-synchronised;
                      with --post-process also candidates + merge at the input size (as the paper's FPS)
  paper_*             the paper's numbers for this model (Table 1 / 5) and how they were counted

FLOPs do not depend on the weights; images/s of a Panoptic SegFormer depends on them only through the
post-processing. Timing under load is an upper bound: the command logs the load average.

Examples:
  harness profile --model panoptic_segformer_r50 --size 1200x800 --device cuda --out r50.csv
  harness profile --model panoptic_segformer_tiny --size 256x256 --threads 2 --iters 10 --out tiny.json
"""

log = logging.getLogger(__name__)

# The paper's cost numbers: Table 1 #P/#F, Table 5 FLOPs and FPS (one V100, post-processing included). Panoptic
# SegFormer's come from mmcv's counter at 1200x800 (#P: parameters with requires_grad); the baselines' from their
# own papers (DETR: Detectron2's counter averaged over 100 COCO val images, #P all parameters), so they compare
# with this command's numbers only roughly.
_PSF = "mmcv counter, 1200x800 input, #P = requires_grad"
_OWN = "the method's own paper (own counter and input sizes; #P = all parameters)"
PAPER_COST: dict[str, dict[str, Any]] = {
    "panoptic_segformer_r50": {"params_m": 51.0, "gflops": 214.2, "fps": 7.8, "convention": _PSF},
    "panoptic_segformer_r101": {"params_m": 69.9, "gflops": 286.0, "convention": _PSF},
    "panoptic_segformer_swin_l": {"params_m": 221.4, "gflops": 816.0, "convention": _PSF},
    "panoptic_segformer_pvtv2_b5": {"params_m": 104.9, "gflops": 349.0, "convention": _PSF},
    "detr_r50_panoptic": {"params_m": 42.9, "gflops": 247.5, "fps": 4.9,
                          "convention": "Detectron2 counter, mean over 100 COCO val images; #P = all parameters"},
    "detr_r101_panoptic": {"params_m": 61.8, "gflops": 306.0, "convention": _OWN},
    "maskformer_r50_panoptic": {"params_m": 45.0, "gflops": 181.0, "convention": _OWN},
    "maskformer_swin_l_panoptic": {"params_m": 212.0, "gflops": 792.0, "convention": _OWN},
    "panoptic_fcn_r50_3x": {"params_m": 37.0, "gflops": 244.0, "convention": _OWN},
}

COLUMNS = ["model", "weights", "height", "width", "batch", "params_m", "params_trainable_m", "gflops",
           "gflops_mmcv", "images_per_s", "sec_per_image", "post_process", "warmup", "iters", "device",
           "threads", "load_avg", "paper_params_m", "paper_gflops", "paper_fps", "paper_convention"]


def parse_size(text: str) -> tuple[int, int]:
    """``"800x1333"`` -> ``(800, 1333)``, each side 32..8192; ``UserError`` otherwise."""
    from harness.errors import UserError

    parts = text.lower().replace("*", "x").split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise UserError(f"--size must be HxW with positive integers (e.g. 800x1333), got {text!r}") from None
    if not (32 <= h <= 8192 and 32 <= w <= 8192):
        raise UserError(f"--size {text}: each side must be 32..8192 pixels")
    return h, w


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `harness profile` (every value is checked here, at parse time)."""
    from harness.commands._common import device, int_range, user_type

    parser.add_argument("--model", required=True, help="model name (models.zoo; e.g. panoptic_segformer_r50)")
    parser.add_argument("--weights", default=None,
                        help="optional weights (our format or a released file); random init otherwise")
    parser.add_argument("--size", default="800x1333", type=user_type(parse_size, "size"),
                        help="input HxW (default 800x1333, the COCO test maximum; the paper's FLOPs: 1200x800)")
    parser.add_argument("--batch", type=int_range(1, 256), default=1, help="images per forward (default 1, as the "
                                                                            "paper)")
    parser.add_argument("--device", type=device, default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--threads", type=int_range(1, 1024), default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int_range(0, 10000), default=2, help="untimed forwards first (default 2)")
    parser.add_argument("--iters", type=int_range(1, 100000), default=5, help="timed forwards (default 5)")
    parser.add_argument("--post-process", default="none", choices=["none", "m", "p", "p*", "heuristic", "own"],
                        help="also time candidates + this merge per image (default: none, model only)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP counts")
    parser.add_argument("--no-speed", action="store_true", help="skip the timing")
    parser.add_argument("--out", default=None, help="write the row to FILE.csv or FILE.json (not an input)")


def _build(args: argparse.Namespace) -> tuple[Any, Any]:
    from harness.errors import UserError
    from models import zoo

    if args.weights is not None:
        from models.checkpoint import CheckpointError, load_model, resolve_weights

        try:
            return load_model(resolve_weights(args.weights), args.model)
        except (CheckpointError, ValueError) as exc:
            raise UserError(str(exc)) from None
    try:
        cfg = zoo.get_config(args.model)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return zoo.build_model(cfg).eval(), cfg


def _timed(model: Any, x: Any, post_process: str, warmup: int, iters: int) -> float:
    """Mean seconds per forward (+ post-processing of every image) after ``warmup`` untimed calls."""
    import torch

    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    h, w = x.shape[-2:]

    def once() -> None:
        out = model(x)
        if post_process != "none":
            for i in range(x.shape[0]):
                if post_process == "own":
                    model.own_post_process(out, i, (h, w))
                else:
                    from models.postprocess import post_process as merge

                    cands = model.candidates(out, i)
                    opts = model.post_process_options(post_process)
                    merge(post_process, cands, model.cfg.num_things, (h, w), **opts)
        sync()

    with torch.no_grad():
        for _ in range(warmup):
            once()
        start = time.perf_counter()
        for _ in range(iters):
            once()
        return (time.perf_counter() - start) / iters


def profile(args: argparse.Namespace) -> dict[str, Any]:
    """Measure one model; returns the row (``COLUMNS``)."""
    import os

    import torch

    from harness.errors import UserError
    from models.flops import count_flops, count_mmcv_flops, count_parameters

    h, w = args.size if isinstance(args.size, tuple) else parse_size(args.size)
    if args.batch < 1 or args.iters < 1 or args.warmup < 0:
        raise UserError("--batch and --iters must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, cfg = _build(args)
    try:
        device = torch.device(args.device)
        model.to(device)
        x = torch.randn(args.batch, 3, h, w, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise UserError(f"cannot use device {args.device!r}: {exc}") from exc
    if args.post_process != "none" and not hasattr(model, "candidates"):
        raise UserError(f"model {args.model} has no candidates(); use --post-process none or own")
    paper = PAPER_COST.get(args.model, {})
    row: dict[str, Any] = {c: None for c in COLUMNS}
    row.update(model=args.model, weights=args.weights, height=h, width=w, batch=args.batch,
               params_m=count_parameters(model) / 1e6,
               params_trainable_m=sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
               post_process=args.post_process, warmup=args.warmup, iters=args.iters, device=str(device),
               threads=torch.get_num_threads(), paper_params_m=paper.get("params_m"),
               paper_gflops=paper.get("gflops"), paper_fps=paper.get("fps"),
               paper_convention=paper.get("convention"))
    if not args.no_flops:
        # One forward serves both conventions: mmcv's module hooks around PyTorch's counter.
        reports: dict[str, Any] = {}

        def forward() -> None:
            reports["torch"] = count_flops(model, lambda: model(x))

        reports["mmcv"] = count_mmcv_flops(model, forward)
        row["gflops"] = reports["torch"].total / 1e9 / args.batch
        row["gflops_mmcv"] = reports["mmcv"].total / 1e9 / args.batch
        for name, n in sorted(reports["torch"].by_op.items(), key=lambda kv: -kv[1]):
            log.info("ours  %-40s %10.2f GFLOPs", name, n / 1e9 / args.batch)
        for name, n in sorted(reports["mmcv"].by_module.items()):
            if name.count(".") < 2:
                log.info("mmcv  %-40s %10.2f GFLOPs", name, n / 1e9 / args.batch)
    if not args.no_speed:
        sec = _timed(model, x, args.post_process, args.warmup, args.iters)
        row["sec_per_image"] = sec / args.batch
        row["images_per_s"] = args.batch / sec if sec > 0 else math.inf
    try:
        row["load_avg"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return row


def _format(row: dict[str, Any]) -> str:
    def num(v: Any, fmt: str) -> str:
        if v is None:
            width = fmt.split(".")[0]
            return "-".rjust(int(width) if width.isdigit() else 0)
        return format(v, fmt)

    size = f"{row['height']}x{row['width']}"
    psf = row["paper_convention"] == _PSF
    note = "; paper at 1200x800" if psf and size != "1200x800" else ""
    lines = [
        f"model          {row['model']}  (input {row['batch']}x3x{size}, {row['device']}, "
        f"{row['threads']} threads, load {num(row['load_avg'], '.2f')}, {platform.processor() or platform.machine()})",
        f"{'':14} {'measured':>12} {'paper':>10}",
        f"{'#P (M)':14} {num(row['params_m'], '12.2f')} {num(None if psf else row['paper_params_m'], '10.1f')}"
        "   all parameters",
        f"{'#P mmcv (M)':14} {num(row['params_trainable_m'], '12.2f')} "
        f"{num(row['paper_params_m'] if psf else None, '10.1f')}   requires_grad only (mmcv's count)",
        f"{'GFLOPs mmcv':14} {num(row['gflops_mmcv'], '12.1f')} {num(row['paper_gflops'], '10.1f')}   "
        f"mmcv rules, 1 per multiply-add (Table 1's convention){note}",
        f"{'GFLOPs ours':14} {num(row['gflops'], '12.1f')} {'':10}   torch counter + formulas (2 per multiply-add)",
        f"{'images/s':14} {num(row['images_per_s'], '12.2f')} {num(row['paper_fps'], '10.1f')}   "
        f"post-process {row['post_process']}; paper: one V100, post-processing included",
    ]
    if row["paper_convention"] and not psf:
        lines.append(f"paper numbers: {row['paper_convention']}")
    return "\n".join(lines)


def _write(path: Path, row: dict[str, Any]) -> None:
    from harness.errors import UserError
    from harness.io import atomic_write_json, atomic_write_text

    if path.suffix == ".json":
        atomic_write_json(path, row, indent=1)
    elif path.suffix == ".csv":
        import csv
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerow(row)
        atomic_write_text(path, buf.getvalue())
    else:
        raise UserError(f"--out {path}: use a .csv or .json file name")


def run(args: argparse.Namespace) -> int:
    """Profile one model; print the table, write --out."""
    from harness.commands._common import check_device, check_output
    from harness.errors import UserError
    from models import zoo

    # Everything that needs no model first: the name, the weights, the device, the output path.
    if args.model not in zoo.model_names():
        raise UserError(f"--model: unknown model {args.model!r}; known: {', '.join(zoo.model_names())}")
    weights = None
    if args.weights is not None:
        from models.checkpoint import resolve_weights

        weights = resolve_weights(args.weights)  # one line for a missing file or an empty folder
    check_device(args.device)
    out = None
    if args.out:
        from harness.io import sweep_stale_temporaries

        out = check_output(args.out, "--out", inputs=[args.weights, weights], suffixes=(".csv", ".json"))
        sweep_stale_temporaries(out.parent, targets={out.name})
    row = profile(args)
    print(_format(row))
    if out is not None:
        _write(out, row)
        log.info("wrote %s", out)
    return 0
