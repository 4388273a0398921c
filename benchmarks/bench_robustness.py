"""Robustness-run throughput on this machine: model-only vs full `harness eval` grid, and the non-model CPU costs.

For the tiny config and for R50 (random weights), on synthetic images of COCO size (long side 640):

* model-only images/s: the forward alone on prepared inputs held in memory (warm-up first, batch 1);
* full-grid images/s: `harness eval` (`run_grid`) over clean + corrupted cells with DataLoader workers and scorer
  processes, steady state (cells after the first, whose time includes warm-up and process start-up);
* non-model CPU per image on one core: decode (OpenCV for clean, PIL for corrupted cells), each corruption at
  severity 3, the test transform, each post-processor and the PQ scoring of its result.

The tiny model runs at each of `--tiny-scales`: its own test scale (128: the synthetic training size, a 25 ms
forward) and COCO's (800 x 1333, the scale R50 runs at). Its robustness run is model-bound only when the forward
outweighs the per-image decode + corruption + post-processing of a COCO-sized image.

Random weights give scores near the 0.01 prior, so every post-processor would drop every candidate and do no work;
the benchmark therefore draws candidate scores uniformly in [0, 1] for the per-stage costs and runs the grid with
every confidence threshold at 0: more candidates than a trained model keeps, an upper bound on the
post-processing cost. `--tiny-weights W` (e.g. the demo's `runs/demo/train_qd/model.safetensors`) also measures
the per-post-processor costs on a trained tiny model's own candidates with the default thresholds, the cost a real
run pays.

Run: `.venv/bin/python benchmarks/bench_robustness.py [--images 24] [--workers 2] [--skip-r50]
[--tiny-weights W] [--json out.json]`. Record `uptime` with the figures: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

COCO_C_IMAGES = 2000 * (16 * 5 + 1)  # Table 11 protocol: 2000 images x 16 corruptions x 5 severities + clean
PAPER_R50_FPS = 7.8  # Table 5 / Table 10: Panoptic SegFormer R50, one V100, batch 1 (includes its post-processing)
# Post-processor options that keep every candidate (random weights score below every default threshold).
KEEP_ALL = {"m": {"thing_threshold": 0.0, "stuff_threshold": 0.0}, "p": {"score_threshold": 0.0},
            "p*": {"object_mask_threshold": 0.0}, "heuristic": {"instance_score_threshold": 0.0}}


def _ms(fn: Callable[[], Any], repeat: int = 1) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return 1000 * (time.perf_counter() - t0) / repeat


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def model_only(model: torch.nn.Module, inputs: list[torch.Tensor], warmup: int = 1) -> float:
    """Images per second of the forward alone (batch 1, inputs already prepared)."""
    with torch.inference_mode():
        for x in inputs[:warmup]:
            model(x)
        t0 = time.perf_counter()
        for x in inputs:
            model(x)
    return len(inputs) / (time.perf_counter() - t0)


def full_grid(weights: Path, data: Path, out: Path, images: int, workers: int, score_workers: int,
              corruptions: str, post_process: str) -> dict[str, Any]:
    """Steady-state images/s of the grid (cells after the first) and the per-stage CPU seconds per image."""
    from harness.engine.grid import run_grid
    from harness.engine.grid_config import GridOptions

    t0 = time.perf_counter()
    methods = post_process.split(",")
    outcome = run_grid(GridOptions(weights=weights, data=data, out=out, max_images=images, corruptions=corruptions,
                                   severities="3", post_process=methods,
                                   pp_options={m: KEEP_ALL[m] for m in methods}, workers=workers,
                                   score_workers=score_workers, warmup=1, timing_images=1))
    total = time.perf_counter() - t0
    states = [outcome.cells[c] for c in outcome.plan.cells]
    steady = states[1:] or states
    images = sum(len(s.positions) for s in steady)
    wall = sum(s.wall_seconds for s in steady)
    cost: dict[str, float] = {}
    for s in steady:
        for k, v in s.cost.items():
            cost[k] = cost.get(k, 0.0) + v
    return {"images_per_s": images / wall, "total_s": total, "cells": len(states),
            "cost_ms_per_image": {k: 1000 * v / images for k, v in sorted(cost.items())}}


def non_model_costs(ds: Any, model: torch.nn.Module, images: int) -> dict[str, float]:
    """Mean milliseconds per COCO-sized image of each non-model stage, one core, in this process (post-processing
    on the random model's candidates with scores drawn in [0, 1] and every threshold at the default)."""
    from harness.corruptions import CORRUPTIONS, corrupt, corruption_seed
    from harness.corruptions.runner import read_image
    from harness.data.coco_panoptic import read_image_rgb
    from harness.data.transforms import prepare

    out: dict[str, list[float]] = {}
    spec = model.test_transform()
    for i in range(min(images, len(ds))):
        sample = ds[i]
        path = str(ds.image_path(sample.image_id))
        image = sample.image
        out.setdefault("decode (OpenCV, clean)", []).append(_ms(lambda p=path: read_image_rgb(p), 3))
        out.setdefault("decode (PIL, corrupted)", []).append(_ms(lambda p=path: read_image(p), 3))
        out.setdefault("transform", []).append(_ms(lambda im=image: prepare(spec, im), 3))
        for c in CORRUPTIONS:
            seed = corruption_seed(sample.file_name, c, 3)
            t0 = time.perf_counter()
            corrupt(sample.image, c, 3, seed)
            out.setdefault(f"corrupt {c}", []).append(1000 * (time.perf_counter() - t0))
    costs = {k: statistics.fmean(v) for k, v in out.items()}
    return {**costs, **post_process_costs(ds, model, images, random_scores=True)}


def post_process_costs(ds: Any, model: torch.nn.Module, images: int, random_scores: bool) -> dict[str, float]:
    """Mean milliseconds per image of each post-processor (default options) and of the PQ scoring of its result,
    one core. ``random_scores``: replace the candidates' scores by uniform draws (random weights); otherwise the
    model's own candidates (trained weights)."""
    from harness.data.transforms import prepare
    from harness.engine.scoring import image_stats
    from harness.metrics.pq import PQAccumulator, panoptic_from_semantic
    from models.postprocess import post_process

    out: dict[str, list[float]] = {}
    acc = PQAccumulator(ds.raw_categories, boundary=True)
    acc_mask = PQAccumulator(ds.raw_categories)
    gen = torch.Generator().manual_seed(0)
    spec = model.test_transform()
    for i in range(min(images, len(ds))):
        sample = ds[i]
        with torch.inference_mode():
            outputs = model(torch.from_numpy(prepare(spec, sample.image).image)[None])
        cands = model.candidates(outputs, 0)
        if random_scores:
            cands.scores = torch.rand(cands.scores.shape, generator=gen)
        h, w = sample.image.shape[:2]
        for method in ("m", "p", "p*", "heuristic"):
            opts = model.post_process_options(method)
            result = post_process(method, cands, model.cfg.num_things, (h, w), **opts)
            out.setdefault(f"post-process {method}", []).append(_ms(lambda m=method, c=cands, o=opts, hw=(h, w): post_process(
                m, c, model.cfg.num_things, hw, **o)))
            out.setdefault(f"segments {method}", []).append(len(result.segments))

            def score(a: PQAccumulator = acc_mask, r: Any = result, gt: Any = sample) -> None:
                ids, segs = panoptic_from_semantic(r.category, r.instance, ds.categories.ids)
                image_stats(a.table, a.options, gt, ids, segs)

            out.setdefault(f"scoring (mask PQ) {method}", []).append(_ms(score))
            out.setdefault(f"scoring (mask + boundary PQ) {method}", []).append(_ms(lambda s=score: s(acc)))
    return {k: statistics.fmean(v) for k, v in out.items()}


def _dataset(root: Path, images: int) -> Path:
    from harness.data.synthetic import generate_dataset

    if not (root / "annotations").is_dir():
        generate_dataset(root, 0, images, seed=0, size=640, workers=1, preview=False)
    return root


def _save(model: torch.nn.Module, cfg: Any, folder: Path) -> Path:
    from models.checkpoint import save_checkpoint

    return save_checkpoint(model.state_dict(), cfg, folder / "model.safetensors")


def _report_costs(name: str, costs: dict[str, float]) -> dict[str, float]:
    corrupt = [v for k, v in costs.items() if k.startswith("corrupt ")]
    fixed = costs["decode (PIL, corrupted)"] + statistics.fmean(corrupt) + costs["transform"]
    print(f"  [{name}] per image (ms, 1 core): " + ", ".join(f"{k} {v:.1f}" for k, v in costs.items()))
    print(f"  [{name}] fixed per corrupted image: decode + mean corruption + transform = {fixed:.1f} ms")
    per_pp = {m: costs[f"post-process {m}"] + costs[f"scoring (mask PQ) {m}"] for m in ("m", "p", "p*", "heuristic")}
    print(f"  [{name}] per post-processor (post-process + mask PQ): "
          + ", ".join(f"{m} {v:.1f} ms" for m, v in per_pp.items()) + "  (target <= 60 ms)")
    return {"fixed_ms": fixed, **{f"pp_{m}_ms": v for m, v in per_pp.items()}}


def _scale(text: str) -> tuple[int, int]:
    short, long = (int(v) for v in text.lower().split("x"))
    return short, long


def _bench_model(name: str, cfg: Any, model: torch.nn.Module, data: Path, ds: Any, tmp: Path, n_img: int,
                 args: argparse.Namespace) -> dict[str, Any]:
    """Model-only and full-grid images/s of one (random-weight) model on the data set ``ds`` at ``data``, and its
    non-model costs."""
    from harness.data.transforms import prepare

    spec = model.test_transform()
    inputs = [torch.from_numpy(prepare(spec, ds[i].image).image)[None] for i in range(min(n_img, len(ds)))]
    fps = model_only(model, inputs)
    print(f"{name}: input {tuple(inputs[0].shape[-2:])}, model-only {fps:.2f} images/s (1 thread)")
    weights = _save(model, cfg, tmp / name)
    rows = {}
    r50 = name.startswith("panoptic_segformer_r50")
    for pp in ("m",) if r50 else ("m", "m,p,p*,heuristic"):
        g = full_grid(weights, data, tmp / f"{name}_{pp.replace(',', '_').replace('*', 's')}", n_img,
                      args.workers, args.score_workers, args.r50_corruptions if r50 else args.corruptions, pp)
        ratio = g["images_per_s"] / fps
        print(f"  full grid (post-process {pp}, {args.workers} workers + {args.score_workers} scorer): "
              f"{g['images_per_s']:.2f} images/s = {ratio:.2f} x model-only")
        print("    main/scorer stages (ms per image): "
              + ", ".join(f"{k} {v:.1f}" for k, v in g["cost_ms_per_image"].items()))
        rows[pp] = {**g, "ratio": ratio}
    costs = non_model_costs(ds, model, min(n_img, 4))
    return {"input": list(inputs[0].shape[-2:]), "model_only_fps": fps, "grid": rows, "costs_ms": costs,
            "summary": _report_costs(name, costs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24, help="synthetic COCO-sized images (default 24)")
    parser.add_argument("--tiny-scales", default="128x128,800x1333",
                        help="test scales (short x long) the tiny model is measured at (default: its own, COCO's)")
    parser.add_argument("--coco-scale-images", type=int, default=8,
                        help="images for the tiny model at a test scale above 256 (default 8)")
    parser.add_argument("--tiny-weights", default=None,
                        help="trained tiny weights: also measure post-processing on their own candidates")
    parser.add_argument("--r50-images", type=int, default=2, help="images for the R50 grid / model timing")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the grid (default 2)")
    parser.add_argument("--score-workers", type=int, default=1, help="scorer processes of the grid (default 1)")
    parser.add_argument("--corruptions", default="gaussian_noise,fog,jpeg_compression",
                        help="corrupted cells of the tiny model's grid measurement (severity 3)")
    parser.add_argument("--r50-corruptions", default="gaussian_noise",
                        help="corrupted cells of the R50 grid measurement (severity 3; R50 is slow on a CPU)")
    parser.add_argument("--skip-r50", action="store_true")
    parser.add_argument("--data", default=None, help="reuse a synthetic data set root")
    parser.add_argument("--json", default=None, help="also write the figures as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from harness.engine.grid import device_label
    from models.zoo import build_model, get_config

    print(f"machine: {device_label('cpu')}, {os.cpu_count()} cores, load average {_load()}")
    report: dict[str, Any] = {"machine": device_label("cpu"), "cores": os.cpu_count(), "load_before": _load()}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = Path(args.data) if args.data else _dataset(tmp / "coco", max(args.images, args.coco_scale_images))
        from harness.data.coco_panoptic import PanopticDataset

        ds = PanopticDataset(data)
        cats = ds.categories
        runs = [("panoptic_segformer_tiny", _scale(t)) for t in args.tiny_scales.split(",") if t]
        if not args.skip_r50:
            runs.append(("panoptic_segformer_r50", None))
        for name, scale in runs:
            torch.manual_seed(0)
            overrides = {} if scale is None else {"test_scale": scale}
            cfg = get_config(name, num_things=cats.num_things, num_stuff=cats.num_stuff, **overrides)
            key = name if scale is None else f"{name}@{scale[0]}x{scale[1]}"
            n_img = args.r50_images if scale is None else args.images if max(scale) <= 256 else args.coco_scale_images
            report[key] = _bench_model(key, cfg, build_model(cfg).eval(), data, ds, tmp, n_img, args)
        if args.tiny_weights:
            from harness.engine.loading import load_model

            model = load_model(args.tiny_weights)
            costs = post_process_costs(ds, model, min(args.images, len(ds)), random_scores=False)
            per_pp = {m: costs[f"post-process {m}"] + costs[f"scoring (mask PQ) {m}"]
                      for m in ("m", "p", "p*", "heuristic")}
            print(f"trained tiny ({args.tiny_weights}), its own candidates, default thresholds, per post-processor "
                  "(post-process + mask PQ): " + ", ".join(f"{m} {v:.1f} ms" for m, v in per_pp.items())
                  + "  (target <= 60 ms); segments per image: "
                  + ", ".join(f"{m} {costs[f'segments {m}']:.1f}" for m in per_pp))
            report["trained_tiny"] = {"weights": str(args.tiny_weights), "costs_ms": costs,
                                      **{f"pp_{m}_ms": v for m, v in per_pp.items()}}
    report["load_after"] = _load()
    if "panoptic_segformer_r50" in report:
        s = report["panoptic_segformer_r50"]["summary"]
        per_image_cpu = (s["fixed_ms"] + s["pp_m_ms"]) / 1000
        hours = COCO_C_IMAGES / PAPER_R50_FPS / 3600
        cores = PAPER_R50_FPS * per_image_cpu
        print(f"extrapolation, full COCO-C (2000 x (16 x 5 + 1) = {COCO_C_IMAGES} forwards, R50, post-process m):")
        print(f"  GPU model FPS {PAPER_R50_FPS} (paper Table 5: one V100, batch 1; no GPU was measured here)")
        print(f"  one GPU: {hours:.1f} h if the CPU side keeps up: {per_image_cpu * 1000:.0f} ms CPU per image x "
              f"{PAPER_R50_FPS} images/s = {cores:.1f} cores busy with workers + scorers")
        print(f"  8 GPUs (torchrun, 8 x that CPU): {hours / 8:.2f} h")
        report["extrapolation"] = {"gpu_fps": PAPER_R50_FPS, "one_gpu_h": hours, "eight_gpu_h": hours / 8,
                                   "cpu_cores_per_gpu": cores}
    print(f"load average after: {report['load_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
