"""Training-engine timings: one full training iteration (matching + losses), the post-processors, the overfit run.

Run: `.venv/bin/python benchmarks/bench_train.py [--iters 100] [--skip-overfit]`. Prints one line per measurement.
The overfit run is the one `tests/test_overfit.py` asserts on (tiny config, 4 synthetic 128-px images).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from harness.data.coco_panoptic import PanopticDataset
from harness.data.synthetic import generate_dataset
from harness.engine.data import AugmentConfig, augment, collate, item_from_sample
from harness.engine.evaluate import evaluate
from harness.engine.train import default_train_config, train
from models.configs import panoptic_segformer_tiny
from models.losses import PanopticCriterion
from models.panoptic_segformer import PanopticSegFormer
from models.postprocess import POST_PROCESSORS, Candidates

from _timing import mean_time  # benchmarks/ is on sys.path when the script runs


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-overfit", action="store_true")
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
        f"cuda {torch.cuda.is_available()}"
    )
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        root = generate_dataset(tmp / "data", 4, 0, seed=7, size=128, workers=1, preview=False)
        ds = PanopticDataset(root, "train2017")
        cats = ds.categories
        cfg = panoptic_segformer_tiny(num_things=cats.num_things, num_stuff=cats.num_stuff, test_scale=(128, 128))
        torch.manual_seed(0)
        model = PanopticSegFormer(cfg).train()
        crit = PanopticCriterion(cats.num_things, cats.num_stuff)
        rng = np.random.default_rng(0)
        items = [
            augment(item_from_sample(ds[i], ds), AugmentConfig(enabled=False), cfg.test_scale, rng) for i in range(2)
        ]
        images, pad_mask, targets = collate(items, cats.num_things, cfg.pixel_mean, cfg.pixel_std)

        def step() -> None:
            loss, _ = crit(model, images, pad_mask, targets)
            loss.backward()

        t = mean_time(step, args.repeat)
        print(f"tiny train step (fwd + matching + losses + bwd), batch 2 at 128 px: {t * 1000:.0f} ms")

        g = torch.Generator().manual_seed(0)
        k, h, w = 153, 100, 134  # COCO-sized candidate set at 1/8 of 800x1067
        cands = Candidates(
            torch.rand(k, generator=g), torch.randint(0, 133, (k,), generator=g), torch.rand(k, h, w, generator=g) * 1.2
        )
        for name, fn in POST_PROCESSORS.items():
            t = mean_time(lambda fn=fn: fn(cands, 80, (800, 1067)), max(1, args.repeat // 2))
            print(f"post-process {name:9s} 153 candidates -> 800x1067: {t * 1000:.0f} ms")

        if not args.skip_overfit:
            tc = dataclasses.replace(
                default_train_config(cfg.name),
                augment=AugmentConfig(enabled=False),
                lr_drops=(),
                warmup_iters=0,
                checkpoint_every=10**6,
                log_every=10**6,
            )
            torch.manual_seed(0)
            before = evaluate(PanopticSegFormer(cfg), root, tmp / "ev0", split="train2017")
            start = time.perf_counter()
            weights = train(dataclasses.replace(cfg), root, tmp / "run", args.iters, tc)
            secs = time.perf_counter() - start
            after = evaluate(weights, root, tmp / "ev1", split="train2017")
            with open(tmp / "run" / "train_log.csv", newline="") as f:
                losses = [float(r["loss"]) for r in csv.DictReader(f)]
            pq0, pq1 = before["pq"], after["pq"]
            print(
                f"overfit {args.iters} iters batch 2: {secs:.1f} s ({secs / args.iters:.2f} s/iter); "
                f"loss {np.mean(losses[:5]):.2f} -> {np.mean(losses[-5:]):.2f}; "
                f"PQ {100 * (pq0['All']['pq'] or 0):.1f} -> {100 * (pq1['All']['pq'] or 0):.1f} "
                f"(Th {100 * (pq1['Things']['pq'] or 0):.1f}, St {100 * (pq1['Stuff']['pq'] or 0):.1f})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
