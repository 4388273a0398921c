"""`harness eval`: evaluate a model over clean and corrupted images, post-processors and mask layers."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from harness.commands._common import device, int_range, user_type

HELP = "evaluate a model: clean + COCO-C corruptions x severities x post-processors x layers -> one results table"
DESCRIPTION = """Evaluate weights on a split, on the fly over the COCO-C corruptions (the seed rule of `harness corrupt`),
scoring every requested post-processor and mask layer from one forward per image. Writes RUN/results.parquet and
RUN/results.csv (one row per model, corruption, severity, post_process, layer), RUN/per_class.parquet,
RUN/summary.csv (clean, mPC, rPC, the 16 corruptions of Table 11, the four families) and RUN/run.json.
Resumable: re-running the same command skips finished cells; other settings on the same --out are refused
(--overwrite replaces that run, deleting only the files harness eval wrote). --out must be new, empty or a run
folder of harness eval.

Without grid options (clean, one post-processor, last layer) it is the single-cell evaluation and also writes
RUN/pred.json + RUN/pred/ (COCO panoptic) and RUN/pq.json, printing the PQ table.

Post-processing: m = the official mask-wise merging (Panoptic SegFormer's default), p = pixel-wise argmax,
p* = MaskFormer's score-weighted argmax, heuristic = Kirillov et al., own = the model's own (a baseline's default).

examples:
  harness eval --weights runs/tiny --data data/synth --out runs/tiny/eval
  harness eval --model panoptic_segformer_r50 --weights panoptic_segformer_r50_2x.pth --data coco \\
      --subset 2000 --corruptions all --severities 1-5 --post-process m,p,p*,heuristic --layers all \\
      --device cuda --workers 8 --out runs/r50_cococ
  torchrun --nproc-per-node 8 -m harness eval ... --device cuda --out runs/r50_cococ
  harness eval ... --shard $SLURM_ARRAY_TASK_ID/8 --out runs/r50_shard$SLURM_ARRAY_TASK_ID
  harness eval --merge runs/r50_shard0 ... runs/r50_shard7 --out runs/r50_cococ
"""


def _checked(parse: Any, name: str) -> Any:
    """argparse type: the text, once ``parse(text)`` accepted it (the grid parses it again with the model at hand)."""

    def check(text: str) -> str:
        parse(text)
        return text

    return user_type(check, name)


def _corruptions(text: str) -> Any:
    from harness.engine.grid_config import parse_corruption_list

    return parse_corruption_list(text)


def _severities(text: str) -> Any:
    from harness.corruptions import parse_severities  # bounds first: "1-1000000000" builds nothing

    return parse_severities(text)


def _post_processors(text: str) -> Any:
    from harness.engine.grid_config import parse_post_processors

    return parse_post_processors(text, "m")


def _layers(text: str) -> Any:
    """Syntax only (``last``, ``all``, ``1,last``); the model's own layers are checked once it is loaded."""
    from harness.errors import UserError

    tokens = [t.strip() for t in text.split(",") if t.strip()]
    if tokens == ["all"]:
        return tokens
    bad = [t for t in tokens if not (t == "last" or (t.isdigit() and 1 <= int(t) <= 64))]
    if bad or not tokens:
        raise UserError(f"invalid mask layer {bad[0] if bad else text!r}; use last, all or a comma list such as 1,last")
    return tokens


def _shard(text: str) -> Any:
    from harness.engine.grid_config import parse_shard

    return parse_shard(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `harness eval` (every value is checked here, at parse time)."""
    parser.add_argument("--weights", help="our folder / model.safetensors / checkpoint_last.pt (or the training "
                                          "folder holding it), or a released file")
    parser.add_argument("--model", default=None, help="model name (needed for released checkpoints)")
    parser.add_argument("--data", help="data set root (COCO panoptic layout)")
    parser.add_argument("--out", required=True, help="run folder: new, empty, or a run of this command (the same "
                                                     "settings resume it; other settings are refused)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run with other settings in --out (only the files harness eval wrote)")
    parser.add_argument("--split", default="val2017", help="split (default: val2017)")
    images = parser.add_mutually_exclusive_group()
    images.add_argument("--subset", type=int_range(1, 10**9), default=None, metavar="N",
                        help="deterministic subset of N images (the rule of `harness corrupt --subset`)")
    images.add_argument("--subset-file", default=None, metavar="F",
                        help="image ids to evaluate (JSON list, subset_<N>_<S>.json of harness corrupt, or lines)")
    parser.add_argument("--subset-seed", type=int_range(0, 2**32 - 1), default=0, metavar="S",
                        help="seed of the subset rule (default 0)")
    parser.add_argument("--max-images", type=int_range(1, 10**9), default=None, metavar="N",
                        help="only the first N images (ascending id)")
    parser.add_argument("--corruptions", default="none", type=_checked(_corruptions, "corruptions"),
                        help="none (clean only, default) | all | blur,noise,digital,weather | names; clean is "
                             "always evaluated")
    parser.add_argument("--severities", default="1-5", type=_checked(_severities, "severities"),
                        help="e.g. 1-5 (default), 3 or 1,3,5")
    parser.add_argument("--channel-order", choices=("rgb", "bgr"), default="rgb",
                        help="channel order the corruptions see (default rgb; bgr = the original COCO-C script)")
    parser.add_argument("--post-process", default=None, metavar="M,...",
                        type=_checked(_post_processors, "post-processors"),
                        help="m, p, p*, heuristic, own (comma list; default: m, or own for baselines)")
    parser.add_argument("--layers", default="last", type=_checked(_layers, "layers"),
                        help="last (default) | all | e.g. 1,last (mask-decoder layers)")
    parser.add_argument("--boundary", action="store_true", help="also Boundary PQ")
    parser.add_argument("--ap", action="store_true", help="also instance AP (segm, bbox) of the thing segments")
    parser.add_argument("--thing-preference", action="store_true",
                        help="per-query thing/stuff statistics (clean cell): thing_preference.parquet + bins")
    parser.add_argument("--save-predictions", action="store_true",
                        help="COCO panoptic PNG/JSON per cell and row under RUN/predictions/")
    parser.add_argument("--save-candidates", action="store_true",
                        help="per-image candidates under RUN/candidates/ (for harness sweep)")
    parser.add_argument("--batch-size", type=int_range(1, 1024), default=1,
                        help="images per forward (default 1, the official protocol; more pads the batch)")
    parser.add_argument("--workers", type=int_range(0, 256), default=2,
                        help="DataLoader processes (decode, corrupt, transform)")
    parser.add_argument("--score-workers", type=int_range(0, 256), default=None,
                        help="post-processing + scoring processes (default: cores - workers - 1, at least 1; 0 = "
                             "in the main process)")
    parser.add_argument("--device", type=device, default="cpu",
                        help="torch device (default cpu; torchrun: cuda = one GPU each)")
    parser.add_argument("--threads", type=int_range(1, 1024), default=None,
                        help="torch CPU threads of the model process")
    parser.add_argument("--shard", default=None, metavar="i/n", type=user_type(_shard, "shard"),
                        help="evaluate shard i of n (0-based) of the images")
    parser.add_argument("--merge", nargs="+", default=None, metavar="RUN", help="merge shard runs into --out")
    parser.add_argument("--timing-images", type=int_range(1, 10**6), default=8,
                        help="images per cell on which each truncated decoder is timed (default 8)")
    parser.add_argument("--warmup", type=int_range(0, 1000), default=2,
                        help="untimed forwards per variant first (default 2)")


def _print_single(result: dict) -> None:
    for key, title in (("pq", "Mask PQ"), ("boundary_pq", "Boundary PQ")):
        if key not in result:
            continue
        print(f"{title:12s} {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} {'N':>4s}")
        for split in ("All", "Things", "Stuff"):
            row = result[key][split]
            vals = [f"{100 * row[k]:6.1f}" if row[k] is not None else f"{'-':>6s}" for k in ("pq", "sq", "rq")]
            print(f"{split:12s} {' '.join(vals)} {row['n']:4d}")


def run(args: argparse.Namespace) -> int:
    """Run, resume or merge a grid; print the results."""
    import json

    from harness.commands._common import (
        check_device,
        check_output,
        existing_dir,
        existing_file,
    )
    from harness.errors import UserError

    if args.merge:
        from harness.engine.grid_merge import merge_runs

        if args.shard or args.weights:
            raise UserError("--merge combines finished shard folders; do not pass --weights or --shard with it")
        for src in args.merge:
            existing_dir(src, "--merge")
        check_output(args.out, "--out", kind="dir", input_dirs=args.merge)
        merge_runs(args.merge, args.out)
        _print_tables(Path(args.out))
        return 0
    if not args.weights or not args.data:
        raise UserError("--weights and --data are required (or --merge RUN ... to combine shards)")
    from models.checkpoint import resolve_weights

    weights = resolve_weights(args.weights)  # every form predict accepts; one line for a missing or empty folder
    existing_dir(args.data, "--data")
    subset_file = existing_file(args.subset_file, "--subset-file") if args.subset_file else None
    out = check_output(args.out, "--out", kind="dir", inputs=[args.weights, weights, subset_file],
                       input_dirs=[args.data])
    from harness.engine.grid_config import check_run_folder

    check_run_folder(out)  # not ours, another command's, garbage marker: refused before the model is loaded
    check_device(args.device)

    from harness.engine.grid import run_grid
    from harness.engine.grid_config import GridOptions

    opts = GridOptions(
        weights=args.weights, data=args.data, out=args.out, model=args.model, split=args.split, subset=args.subset,
        subset_seed=args.subset_seed, subset_file=args.subset_file, max_images=args.max_images,
        corruptions=args.corruptions, severities=args.severities, channel_order=args.channel_order,
        post_process=args.post_process, layers=args.layers, boundary=args.boundary, ap=args.ap,
        thing_preference=args.thing_preference, save_predictions=True if args.save_predictions else None,
        save_candidates=args.save_candidates, batch_size=args.batch_size, workers=args.workers,
        score_workers=args.score_workers, device=args.device, shard=args.shard,
        timing_images=args.timing_images, warmup=args.warmup, threads=args.threads, replace=args.overwrite)
    outcome = run_grid(opts)
    if not outcome.plan.dist.is_main:
        return 0
    if outcome.plan.shard_name is not None:
        print(f"shard {outcome.plan.shard_name}: partial statistics in {outcome.out}/cells/; combine all shards "
              f"with: harness eval --merge <shard folders> --out RUN")
        return 0
    if outcome.plan.single_cell:
        _print_single(json.loads((outcome.out / "pq.json").read_text(encoding="utf-8")))
        return 0
    _print_tables(outcome.out)
    return 0


def _print_tables(out: Path) -> None:
    import pandas as pd

    from harness.engine.grid_results import RESULTS_PARQUET, SUMMARY_CSV, format_table

    results = pd.read_parquet(out / RESULTS_PARQUET)
    print(format_table(results))
    summary = pd.read_csv(out / SUMMARY_CSV, dtype={"layer": str})
    if (results["corruption"] != "none").any():
        cols = ["post_process", "layer", "clean", "mPC", "rPC", "blur", "noise", "digital", "weather"]
        print()
        print(summary[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
