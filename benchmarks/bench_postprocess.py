"""Post-processing speed: the fast box-restricted (m), (p), (p*), heuristic against the previous full-resolution
implementation (``models.postprocess_full``, the fast paths' fallback), on COCO-sized R50-like candidates.

Run: ``python benchmarks/bench_postprocess.py [--images 3] [--r50] [--threads 1]``.

Candidates: 100 thing + 53 stuff masks at 1/8 of an 800x1067 input (100x134), merged at 480x640 (a COCO image).
``synthetic`` candidates imitate a trained R50 (a dozen objects, each found by 1-3 queries, a long tail of weak
low-score thing queries, ~6 large present stuff classes and 47 weak absent ones; see `synthetic_candidates`).
``--r50`` adds the candidates of a random-init R50 forward at 800x1067 (seed 0): as they come (scores ~0.01, so
"(m)" paints nothing) and with the synthetic scores substituted (diffuse masks with high scores: a hard case).
Every fast result is checked against the old implementation (maps, segments, scores) before it is timed; the old
one runs once, the new one ``--repeat`` times (best). Times are wall and CPU seconds of this process (CPU time is
less disturbed by other load on a shared machine; the speed-up column uses it). Exit status 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Callable

import numpy as np
import torch

from models import postprocess as new
from models import postprocess_full as old

NUM_THINGS, NUM_STUFF = 80, 53
MASK_HW = (100, 134)
OUT_HW = (480, 640)
METHODS: dict[str, tuple[Callable, Callable]] = {
    "m": (new.mask_wise_merge, old.mask_wise_merge_full),
    "p": (new.pixel_argmax, old.pixel_argmax_full),
    "p*": (new.maskformer_merge, old.maskformer_merge_full),
    "heuristic": (new.heuristic_merge, old.heuristic_merge_full),
}


def _blob(rng: np.random.Generator, h: int, w: int, cy: float, cx: float, ry: float, rx: float,
          peak: float) -> np.ndarray:
    """A ReLU-like bump: ``peak * min(1, 2 (1 - d^2))`` clipped at 0, d the elliptic distance, plus texture."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    tex = 1 + 0.1 * rng.standard_normal((h, w)).astype(np.float32)
    return np.maximum(peak * np.minimum(1, 2 * (1 - d2)) * tex, 0).astype(np.float32)


def synthetic_candidates(seed: int) -> new.Candidates:
    """Candidates shaped like a trained R50's on a COCO image (see the module docstring)."""
    rng = np.random.default_rng(seed)
    h, w = MASK_HW
    things, t_scores, t_labels = [], [], []
    for _ in range(int(rng.integers(6, 16))):  # objects, each seen by 1-3 queries / labels
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(2, 25), rng.uniform(2, 30)
        base = _blob(rng, h, w, cy, cx, ry, rx, rng.uniform(0.8, 1.6))
        score = rng.uniform(0.3, 0.95)
        label = int(rng.integers(0, NUM_THINGS))
        for dup in range(int(rng.integers(1, 4))):
            if dup == 1 and rng.uniform() < 0.5:  # same query under another label: identical mask
                things.append(base)
                t_labels.append(int(rng.integers(0, NUM_THINGS)))
            else:
                things.append(base if dup == 0 else _blob(rng, h, w, cy + rng.normal(0, 2), cx + rng.normal(0, 2),
                                                          ry, rx, rng.uniform(0.5, 1.3)))
                t_labels.append(label)
            t_scores.append(score if dup == 0 else score * rng.uniform(0.05, 0.6))
    while len(things) < 100:  # weak tail
        if rng.uniform() < 0.3:
            things.append(np.zeros((h, w), np.float32))
        else:
            things.append(_blob(rng, h, w, rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, 15),
                                rng.uniform(1, 15), rng.uniform(0.2, 1.0)))
        t_scores.append(rng.uniform(0.005, 0.08))
        t_labels.append(int(rng.integers(0, NUM_THINGS)))
    order = np.argsort(-np.asarray(t_scores), kind="stable")[:100]  # top-k comes sorted
    # Stuff: the present classes share the image (a wavy Voronoi partition); each mask is ~1 inside its cell,
    # falls to 0 over a few pixels across the border, and is weaker where objects are.
    stuff, s_scores = [], []
    present = rng.choice(NUM_STUFF, size=int(rng.integers(3, 9)), replace=False).tolist()
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    seeds = np.stack([rng.uniform(0, h, len(present)), rng.uniform(0, w, len(present))], 1)
    dist = np.stack([np.hypot(yy - sy, (xx - sx) * 0.7) + 4 * np.sin(xx / 9 + i) + 4 * np.cos(yy / 7 - i)
                     for i, (sy, sx) in enumerate(seeds)])
    margin = np.sort(dist, 0)[1] - dist  # > 0 inside a cell, 0 on its border
    objects = np.clip(sum(things[i] for i in order[:20]), 0, 1)
    for j in range(NUM_STUFF):
        if j in present:
            cell = np.clip(margin[present.index(j)] / 3 + 0.5, 0, 1) * (1 - 0.6 * objects)
            m = cell * rng.uniform(0.8, 1.3) * (1 + 0.1 * rng.standard_normal((h, w)))
            stuff.append(np.maximum(m, 0).astype(np.float32))
            s_scores.append(rng.uniform(0.35, 0.9))
        else:
            stuff.append(np.zeros((h, w), np.float32) if rng.uniform() < 0.5 else
                         _blob(rng, h, w, rng.uniform(0, h), rng.uniform(0, w), rng.uniform(5, 40),
                               rng.uniform(5, 40), rng.uniform(0.1, 0.7)))
            s_scores.append(rng.uniform(0.005, 0.1))
    masks = np.stack([things[i] for i in order] + stuff)
    scores = np.asarray([t_scores[i] for i in order] + s_scores, np.float32)
    labels = np.asarray([t_labels[i] for i in order] + list(range(NUM_THINGS, NUM_THINGS + NUM_STUFF)))
    return new.Candidates(torch.from_numpy(scores), torch.from_numpy(labels), torch.from_numpy(masks))


def r50_candidates(seed: int = 0) -> new.Candidates:
    """Candidates of a random-init Panoptic SegFormer R50 on a smooth random 800x1067 picture."""
    from models.configs import panoptic_segformer_r50
    from models.panoptic_segformer import PanopticSegFormer

    torch.manual_seed(seed)
    model = PanopticSegFormer(panoptic_segformer_r50()).eval()
    img = torch.nn.functional.interpolate(torch.randn(1, 3, 25, 34), size=(800, 1067), mode="bilinear")
    with torch.no_grad():
        outputs = model(img)
    return model.candidates(outputs, 0)


def _equal(a: new.PanopticResult, b: new.PanopticResult) -> bool:
    return np.array_equal(a.category, b.category) and np.array_equal(a.instance, b.instance) and \
        a.segments == b.segments


def _time(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Best (wall, CPU) seconds of ``repeat`` calls (CPU time of this process: less sensitive to other load)."""
    wall = cpu = float("inf")
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    return wall, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3, help="synthetic candidate sets (seeds 0..N-1)")
    parser.add_argument("--r50", action="store_true", help="also a random-init R50 forward (about a minute)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="timed calls of the fast path (best of)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch threads "
          f"{torch.get_num_threads()}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    sets = [(f"synthetic-{i}", synthetic_candidates(i)) for i in range(args.images)]
    if args.r50:
        r50 = r50_candidates()
        sets.append(("r50-random-init", r50))
        mixed = synthetic_candidates(0)
        sets.append(("r50-random-init+synthetic-scores",
                     new.Candidates(mixed.scores, r50.labels, r50.masks)))
    print(f"{'candidates':34s} {'method':9s} {'old wall':>9s} {'new wall':>9s} {'old cpu':>8s} {'new cpu':>8s} "
          f"{'speed-up (cpu)':>14s} segments")
    failed = False
    totals: dict[str, np.ndarray] = {m: np.zeros(4) for m in METHODS}
    for name, cands in sets:
        for method, (fast, slow) in METHODS.items():
            w0, c0 = time.perf_counter(), time.process_time()
            want = slow(cands, NUM_THINGS, OUT_HW)
            old_t = (time.perf_counter() - w0, time.process_time() - c0)
            got = fast(cands, NUM_THINGS, OUT_HW)
            if not _equal(got, want):
                print(f"{name:34s} {method:9s} MISMATCH with the previous implementation")
                failed = True
                continue
            new_t = _time(lambda: fast(cands, NUM_THINGS, OUT_HW), args.repeat)
            row = np.array([old_t[0], new_t[0], old_t[1], new_t[1]])
            totals[method] += row
            print(f"{name:34s} {method:9s} {row[0]:9.3f} {row[1]:9.4f} {row[2]:8.3f} {row[3]:8.4f} "
                  f"{row[2] / row[3]:13.1f}x {len(got.segments)}")
    for method, row in totals.items():
        if row[1] > 0:
            print(f"{'all':34s} {method:9s} {row[0]:9.3f} {row[1]:9.4f} {row[2]:8.3f} {row[3]:8.4f} "
                  f"{row[2] / row[3]:13.1f}x")
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
