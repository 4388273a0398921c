"""Model timings on this machine: tiny config forward / forward+backward, R50 inference at the official test size.

Run: `.venv/bin/python benchmarks/bench_model.py [--skip-r50]`. Prints one CSV-like line per measurement.
"""

from __future__ import annotations

import argparse
import platform

import torch

from models.configs import panoptic_segformer_r50, panoptic_segformer_tiny
from models.panoptic_segformer import PanopticSegFormer

from _timing import mean_time  # benchmarks/ is on sys.path when the script runs


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-r50", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"cuda {torch.cuda.is_available()}")
    torch.manual_seed(0)
    tiny = PanopticSegFormer(panoptic_segformer_tiny(num_things=8, num_stuff=5))
    for size in (128, 256):
        x = torch.randn(2, 3, size, size)
        tiny.eval()
        with torch.no_grad():
            t = mean_time(lambda: tiny(x), args.repeat)
        print(f"tiny forward  batch 2 {size}x{size}: {t * 1000:.0f} ms ({1 / t:.1f} it/s)")
        tiny.train()

        def step() -> None:
            enc = tiny.encode(x)
            loc = tiny.locate(enc)
            masks = tiny.segment(enc, loc.queries[:, :10])
            loss = loc.logits.sigmoid().mean() + loc.boxes.mean() + sum(m.mean() for m in masks.thing_masks)
            loss = loss + sum(m.mean() for m in masks.stuff_masks)
            loss.backward()

        t = mean_time(step, args.repeat)
        print(f"tiny fwd+bwd  batch 2 {size}x{size}: {t * 1000:.0f} ms ({1 / t:.1f} it/s)")
    if not args.skip_r50:
        r50 = PanopticSegFormer(panoptic_segformer_r50()).eval()
        x = torch.randn(1, 3, 800, 1067)
        with torch.no_grad():
            t = mean_time(lambda: r50(x), max(1, args.repeat // 5))
        print(f"R50 inference 1x800x1067 (no post-processing): {t:.2f} s/img")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
