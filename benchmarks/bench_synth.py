"""Synthetic dataset generator speed: images/s on one core at a given size.

Pins the process to one CPU core (and OpenCV to one thread), then times
`generate_dataset(..., workers=1)` end to end (render + JPEG/PNG encode + atomic writes + JSON)
and `render_image` alone. Reports wall-clock and CPU-time throughput: on a shared machine the
CPU-time figure is the one that does not depend on other load.

usage: .venv/bin/python benchmarks/bench_synth.py [--images 400] [--size 256] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import cv2

    cv2.setNumThreads(1)
    from harness.data.synthetic import generate_dataset, render_image
    from harness.logging_utils import setup_logging

    setup_logging(-1)  # no progress bars in timings
    render_image(args.seed, "train2017", 0, args.size)  # texture bank built outside the timings

    results = {"machine": f"{platform.machine()} {os.cpu_count()} cores, 1 pinned", "size": args.size,
               "images": args.images, "runs": []}
    for rep in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(args.images):
            render_image(args.seed, "train2017", i, args.size)
        t1, c1 = time.perf_counter(), time.process_time()
        with tempfile.TemporaryDirectory() as tmp:
            generate_dataset(tmp, args.images, 0, args.seed, size=args.size, workers=1, preview=False)
            t2, c2 = time.perf_counter(), time.process_time()
        run = {
            "render_wall_ips": args.images / (t1 - t0), "render_cpu_ips": args.images / (c1 - c0),
            "generate_wall_ips": args.images / (t2 - t1), "generate_cpu_ips": args.images / (c2 - c1),
        }
        results["runs"].append(run)
        print(f"run {rep}: render {run['render_wall_ips']:.0f} img/s wall ({run['render_cpu_ips']:.0f} CPU), "
              f"generate+write {run['generate_wall_ips']:.0f} img/s wall ({run['generate_cpu_ips']:.0f} CPU)")
    best = {k: max(r[k] for r in results["runs"]) for k in results["runs"][0]}
    results["best"] = best
    print(f"best of {args.repeats}, {args.images} images at {args.size} px on one core: "
          f"generate+write {best['generate_wall_ips']:.0f} img/s wall, {best['generate_cpu_ips']:.0f} img/s CPU time; "
          f"render only {best['render_wall_ips']:.0f} img/s wall")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
