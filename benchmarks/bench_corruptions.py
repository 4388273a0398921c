"""Time imagecorruptions 1.1.2 (+ compatibility fixes only) against `harness.corruptions.corrupt`.

One 480x640 RGB photo (skimage's astronaut resized), the 16 corruptions of Table 11 at the five
severities, each call timed once per repeat (best of `--repeats`); both sides get the same
`np.random.seed`, and the outputs are checked for byte identity (impulse_noise excepted: upstream
is unseedable). Prints a Markdown table and writes JSON.

    .venv/bin/python benchmarks/bench_corruptions.py [--repeats 1] [--out runs/bench/corruptions.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.corruptions import CORRUPTIONS, corrupt, corruption_seed  # noqa: E402
from harness.corruptions.compat import load_private_copy  # noqa: E402


def _photo() -> np.ndarray:
    import cv2
    import skimage.data

    return np.ascontiguousarray(cv2.resize(skimage.data.astronaut(), (640, 480), interpolation=cv2.INTER_AREA))


def _time(fn) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="best of N per call (default 1)")
    parser.add_argument("--out", default="runs/bench/corruptions.json", help="JSON result path")
    parser.add_argument("--corruptions", default=",".join(CORRUPTIONS), help="comma list (default: the 16)")
    args = parser.parse_args()
    names = [n for n in args.corruptions.split(",") if n]

    image = _photo()
    reference = load_private_copy("_bench_reference_imagecorruptions")
    t0 = time.perf_counter()
    corrupt(image[:32, :32], "glass_blur", 1, 0)  # loads the upstream copy and the numba loop (cache)
    warm_up = time.perf_counter() - t0

    rows = []
    for name in names:
        ref_s, our_s, identical = [], [], True
        for severity in range(1, 6):
            seed = corruption_seed("bench.jpg", name, severity)
            best_ref = best_our = float("inf")
            for _ in range(args.repeats):
                def run_ref() -> np.ndarray:
                    np.random.seed(seed)
                    return reference.corrupt(image, severity=severity, corruption_name=name)

                t, ref = _time(run_ref)
                best_ref = min(best_ref, t)
                t, ours = _time(lambda: corrupt(image, name, severity, seed))
                best_our = min(best_our, t)
            if name != "impulse_noise" and not np.array_equal(ref, ours):
                identical = False
            ref_s.append(best_ref)
            our_s.append(best_our)
        rows.append({"corruption": name, "reference_s": ref_s, "ours_s": our_s,
                     "identical": "n/a (unseeded upstream)" if name == "impulse_noise" else identical})

    total_ref = sum(sum(r["reference_s"]) for r in rows)
    total_our = sum(sum(r["ours_s"]) for r in rows)
    print(f"480x640 RGB, {len(names)} corruptions x 5 severities, best of {args.repeats}; "
          f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores\n")
    print("| corruption | reference ms/call (mean of 5 sev.) | ours ms/call | speed-up | byte-identical |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        ref_ms, our_ms = 1e3 * np.mean(r["reference_s"]), 1e3 * np.mean(r["ours_s"])
        print(f"| {r['corruption']} | {ref_ms:.1f} | {our_ms:.1f} | {ref_ms / our_ms:.1f}x | {r['identical']} |")
    print(f"| **total 16x5** | **{total_ref:.2f} s** | **{total_our:.2f} s** | **{total_ref / total_our:.1f}x** | |")
    print(f"\none-off start-up of ours (upstream copy import + numba loop from cache/compile): {warm_up:.2f} s")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"image": "astronaut resized to 480x640", "repeats": args.repeats, "rows": rows,
                               "total_reference_s": total_ref, "total_ours_s": total_our,
                               "warm_up_s": warm_up}, indent=1))
    bad = [r["corruption"] for r in rows if r["identical"] is False]
    if bad:
        print(f"NOT byte-identical: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
