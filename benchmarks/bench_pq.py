"""Whole-command speed of `harness eval-pq` vs panopticapi(-lite) and hotcoco on the same data.

Generates N GT/prediction pairs (COCO panoptic PNG + JSON, default 600 images of 480x640 with the
133 COCO categories: warped Voronoi stuff regions, elliptic and polygonal things, VOID bands,
perturbed predictions; PNGs written with PIL like the COCO GT), then times each evaluator as a
subprocess with the same worker count:

- `harness eval-pq --workers K` (and `--boundary`);
- panopticapi `pq_compute` with `multiprocessing.cpu_count` patched to K (it has no option);
- hotcoco `hotcoco.panoptic.pq_compute` with RAYON_NUM_THREADS=K;
- boundary-iou-api's Boundary PQ when `--boundary-iou-api PATH` points at a checkout.

Each command runs once untimed, then `--repeat` times round-robin (so all see the same machine
load); the table shows the median wall time, the median CPU time (the command and its worker
processes; less sensitive to other load on the machine) and All PQ of each (they must agree).

    .venv/bin/python benchmarks/bench_pq.py [--images 600] [--workers 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _categories() -> list[dict[str, Any]]:
    from harness.data.coco_panoptic import coco_categories

    return coco_categories()


def _stuff_layout(rng: np.random.Generator, h: int, w: int, n: int, jitter: float) -> np.ndarray:
    """(H, W) int region index of a warped Voronoi partition with `n` seeds."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 4)
    wy = yy + 12 * np.sin(xx / 37 + phase[0]) + 6 * np.sin(xx / 11 + phase[1])
    wx = xx + 12 * np.sin(yy / 41 + phase[2]) + 6 * np.sin(yy / 13 + phase[3])
    seeds = rng.uniform([0, 0], [h, w], size=(n, 2)).astype(np.float32)
    seeds += rng.normal(0, jitter, seeds.shape).astype(np.float32)
    d = (wy[None] - seeds[:, 0, None, None]) ** 2 + (wx[None] - seeds[:, 1, None, None]) ** 2
    return d.argmin(0)


def _make_pair(args: tuple[int, int, int, int]) -> tuple[np.ndarray, list[dict], np.ndarray, list[dict]]:
    """One (GT id map, GT segments, pred id map, pred segments) pair."""
    import cv2

    seed, h, w, _ = args
    rng = np.random.default_rng(seed)
    cats = _categories()
    things = [c["id"] for c in cats if c["isthing"]]
    stuff = [c["id"] for c in cats if not c["isthing"]]
    used = set()

    def new_id() -> int:
        while True:
            i = int(rng.integers(1, 1 << 24))
            if i not in used:
                used.add(i)
                return i

    n_stuff = int(rng.integers(3, 9))
    stuff_cats = rng.choice(stuff, n_stuff, replace=False)
    gt_layout = _stuff_layout(np.random.default_rng(seed), h, w, n_stuff, 0)
    pr_layout = _stuff_layout(np.random.default_rng(seed), h, w, n_stuff, 6)
    gt = np.zeros((h, w), np.uint32)
    pr = np.zeros((h, w), np.uint32)
    gseg: list[dict] = []
    pseg: list[dict] = []
    for k in range(n_stuff):
        cid = int(stuff_cats[k])
        gid, pid = new_id(), new_id()
        gt[gt_layout == k] = gid
        pr[pr_layout == k] = pid
        gseg.append({"id": gid, "category_id": cid, "iscrowd": 0})
        pseg.append({"id": pid, "category_id": cid if rng.random() > 0.15 else int(rng.choice(stuff))})
    # VOID bands along GT stuff borders (COCO leaves unlabelled pixels between regions).
    edge = cv2.morphologyEx(gt_layout.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    gt[edge] = 0
    n_things = int(rng.integers(3, 25))
    for _ in range(n_things):
        cid = int(rng.choice(things))
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ay, ax = rng.uniform(8, 80, 2)
        ang = rng.uniform(0, 180)
        crowd = rng.random() < 0.05
        gmask = np.zeros((h, w), np.uint8)
        if rng.random() < 0.5:
            cv2.ellipse(gmask, (int(cx), int(cy)), (int(ax), int(ay)), ang, 0, 360, 1, -1)
        else:
            t = np.sort(rng.uniform(0, 2 * np.pi, 7))
            r = rng.uniform(0.5, 1.0, 7)
            pts = np.stack([cx + ax * r * np.cos(t), cy + ay * r * np.sin(t)], 1).astype(np.int32)
            cv2.fillPoly(gmask, [pts], 1)
        gid = new_id()
        gt[gmask > 0] = gid
        gseg.append({"id": gid, "category_id": cid, "iscrowd": int(crowd)})
        if rng.random() < 0.12:
            continue  # missed detection
        dy, dx = rng.normal(0, 4, 2)
        s = rng.uniform(0.85, 1.15)
        mat = np.array([[s, 0, cx * (1 - s) + dx], [0, s, cy * (1 - s) + dy]], np.float32)
        pmask = cv2.warpAffine(gmask, mat, (w, h), flags=cv2.INTER_NEAREST)
        if not pmask.any():
            continue
        pid = new_id()
        pr[pmask > 0] = pid
        pseg.append({"id": pid, "category_id": cid if rng.random() > 0.1 else int(rng.choice(things))})
    for _ in range(int(rng.integers(0, 4))):  # false positives
        pmask = np.zeros((h, w), np.uint8)
        cv2.circle(pmask, (int(rng.uniform(0, w)), int(rng.uniform(0, h))), int(rng.uniform(5, 40)), 1, -1)
        pid = new_id()
        pr[pmask > 0] = pid
        pseg.append({"id": pid, "category_id": int(rng.choice(things))})
    # Keep only segments still visible (later things paint over earlier ones); GT area from the PNG.
    g_ids, g_cnt = np.unique(gt, return_counts=True)
    g_area = dict(zip(g_ids.tolist(), g_cnt.tolist()))
    gseg = [dict(s, area=g_area[s["id"]]) for s in gseg if s["id"] in g_area]
    p_ids = set(np.unique(pr).tolist())
    pseg = [s for s in pseg if s["id"] in p_ids]
    return gt, gseg, pr, pseg


def _write_one(args: tuple[int, int, int, int], out: Path) -> tuple[dict, dict, dict]:
    from PIL import Image

    from harness.data.format import id2rgb

    seed, h, w, image_id = args
    gt, gseg, pr, pseg = _make_pair(args)
    name = f"{image_id:012d}.png"
    for ids, folder in ((gt, "gt"), (pr, "pred")):
        # PIL, as panopticapi and the COCO panoptic GT (adaptive per-row PNG filters).
        Image.fromarray(id2rgb(ids)).save(out / folder / name, format="PNG")
    image = {"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": h, "width": w}
    return image, {"image_id": image_id, "file_name": name, "segments_info": gseg}, {
        "image_id": image_id, "file_name": name, "segments_info": pseg}


def _write_star(a: tuple[tuple[int, int, int, int], Path]) -> tuple[dict, dict, dict]:
    return _write_one(*a)


def generate(out: Path, n: int, h: int, w: int, workers: int) -> None:
    """Write out/gt.json, out/gt/*.png, out/pred.json, out/pred/*.png."""
    import multiprocessing

    (out / "gt").mkdir(parents=True, exist_ok=True)
    (out / "pred").mkdir(parents=True, exist_ok=True)
    jobs = [((1000 + i, h, w, i + 1), out) for i in range(n)]
    with multiprocessing.Pool(workers) as pool:
        rows = pool.map(_write_star, jobs, chunksize=8)
    images = [r[0] for r in rows]
    (out / "gt.json").write_text(json.dumps({
        "images": images, "annotations": [r[1] for r in rows], "categories": _categories()}))
    (out / "pred.json").write_text(json.dumps({"annotations": [r[2] for r in rows]}))


_PANOPTICAPI = """
import contextlib, io, json, multiprocessing, sys
multiprocessing.cpu_count = lambda: {workers}
from panopticapi.evaluation import pq_compute
with contextlib.redirect_stdout(io.StringIO()):
    r = pq_compute({gt!r}, {pred!r}, {gtd!r}, {prd!r})
print(json.dumps(r["All"], default=float))
"""

_HOTCOCO = """
import contextlib, io, json
from hotcoco.panoptic import pq_compute
with contextlib.redirect_stdout(io.StringIO()):
    r = pq_compute({gt!r}, {pred!r}, {gtd!r}, {prd!r})
print(json.dumps(r["All"], default=float))
"""

_BOUNDARY_API = """
import contextlib, io, json, multiprocessing, sys
multiprocessing.cpu_count = lambda: {workers}
sys.path.insert(0, {path!r})
from boundary_iou.coco_panoptic_api.evaluation import pq_compute
with contextlib.redirect_stdout(io.StringIO()):
    r = pq_compute({gt!r}, {pred!r}, {gtd!r}, {prd!r}, iou_type="boundary", dilation_ratio=0.02)
print(json.dumps(r["All"], default=float))
"""


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, str, float]:
    """(wall seconds, stdout, CPU seconds of the command and its worker processes)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed:\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, proc.stdout, cpu


def _time_interleaved(cmds: dict[str, list[str]], env: dict[str, str],
                      repeat: int) -> dict[str, tuple[float, str, float]]:
    """Median wall and CPU time of each command, run round-robin so all see the same machine load."""
    times: dict[str, list[float]] = {k: [] for k in cmds}
    cpus: dict[str, list[float]] = {k: [] for k in cmds}
    outs: dict[str, str] = {}
    for name, cmd in cmds.items():  # warm-up round (page cache, compiled kernel), not timed
        _run(cmd, env)
    for _ in range(repeat):
        for name, cmd in cmds.items():
            t, outs[name], c = _run(cmd, env)
            times[name].append(t)
            cpus[name].append(c)
    return {k: (statistics.median(v), outs[k], statistics.median(cpus[k])) for k, v in times.items()}


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--data", default=None, help="data folder (default: a temporary folder; reused if it exists)")
    p.add_argument("--boundary-iou-api", default=None, help="checkout of bowenc0221/boundary-iou-api to time too")
    p.add_argument("--json-out", default=None, help="write the timings here")
    args = p.parse_args(argv)

    tmp = None
    if args.data:
        data = Path(args.data)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_pq_")
        data = Path(tmp.name)
    if not (data / "pred.json").exists():
        t0 = time.perf_counter()
        generate(data, args.images, args.height, args.width, args.workers)
        print(f"generated {args.images} pairs of {args.height}x{args.width} in {time.perf_counter() - t0:.1f} s")
    gt, pred, gtd, prd = str(data / "gt.json"), str(data / "pred.json"), str(data / "gt"), str(data / "pred")
    k = str(args.workers)
    env = dict(os.environ, RAYON_NUM_THREADS=k, OMP_NUM_THREADS="1")
    res_json = data / "R.json"
    ours = [sys.executable, "-m", "harness", "eval-pq", "--gt-json", gt, "--gt-dir", gtd, "--pred-json", pred,
            "--pred-dir", prd, "--workers", k, "-q", "--out", str(res_json)]
    fmt = dict(gt=gt, pred=pred, gtd=gtd, prd=prd, workers=args.workers)
    res_b = data / "R_boundary.json"
    cmds = {
        "harness eval-pq": ours,
        "harness eval-pq --boundary": ours[:-1] + [str(res_b), "--boundary"],
    }
    if _installed("panopticapi"):
        cmds["panopticapi pq_compute"] = [sys.executable, "-c", _PANOPTICAPI.format(**fmt)]
    if _installed("hotcoco"):
        cmds["hotcoco pq_compute"] = [sys.executable, "-c", _HOTCOCO.format(**fmt)]
    timed = _time_interleaved(cmds, env, args.repeat)
    rows: list[tuple[str, float, float | None, float | None]] = [
        ("harness eval-pq", timed["harness eval-pq"][0], json.loads(res_json.read_text())["pq"]["All"]["pq"],
         timed["harness eval-pq"][2]),
        ("harness eval-pq --boundary", timed["harness eval-pq --boundary"][0],
         json.loads(res_b.read_text())["boundary_pq"]["All"]["pq"], timed["harness eval-pq --boundary"][2]),
    ]
    t_ours, t_bnd = rows[0][1], rows[1][1]
    t_ref = None
    for name in ("panopticapi pq_compute", "hotcoco pq_compute"):
        if name in timed:
            rows.append((name, timed[name][0], json.loads(timed[name][1].strip().splitlines()[-1])["pq"],
                         timed[name][2]))
    if "panopticapi pq_compute" in timed:
        t_ref = timed["panopticapi pq_compute"][0]
    if args.boundary_iou_api:
        t, out, c = _run([sys.executable, "-c", _BOUNDARY_API.format(path=args.boundary_iou_api, **fmt)], env)
        rows.append(("boundary-iou-api (boundary)", t, json.loads(out.strip().splitlines()[-1])["pq"], c))

    print(f"\n{args.images} images {args.height}x{args.width}, {args.workers} workers, "
          f"median of {args.repeat}, {os.cpu_count()} CPUs")
    print(f"{'evaluator':30s} {'wall s':>7s} {'vs panopticapi':>15s} {'CPU s':>7s} {'All PQ':>20s}")
    for name, t, pq, cpu in rows:
        ratio = f"{t_ref / t:14.2f}x" if t_ref else f"{'-':>15s}"
        print(f"{name:30s} {t:7.2f} {ratio} {cpu if cpu is not None else math.nan:7.2f} "
              f"{pq if pq is not None else math.nan:20.15f}")
    print(f"Boundary PQ / Mask PQ time: {t_bnd / t_ours:.2f}x")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(
            {"images": args.images, "size": [args.height, args.width], "workers": args.workers,
             "rows": [{"name": n, "seconds": t, "cpu_seconds": c, "all_pq": q} for n, t, q, c in rows]}, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
