"""Whole-command speed of `harness eval-pq` vs hotcoco and panopticapi(-lite) on the same data.

Generates N GT/prediction pairs (COCO panoptic PNG + JSON, default 600 images of 480x640 with the
133 COCO categories: warped Voronoi stuff regions, elliptic and polygonal things, VOID bands,
perturbed predictions; PNGs written with PIL like the COCO GT), then times each evaluator as a
subprocess, start to exit, with the same worker count K (default: the number of CPUs):

- `harness eval-pq --workers K` and `harness eval-pq --workers K --boundary`;
- hotcoco `hotcoco.panoptic.pq_compute` with RAYON_NUM_THREADS=K;
- panopticapi `pq_compute` with `multiprocessing.cpu_count` patched to K (it has no option);
- boundary-iou-api's Boundary PQ once, when `--boundary-iou-api PATH` points at a checkout.

Each command runs once untimed, then `--repeat` rounds interleaved (the order rotates every round),
so every command sees the same machine load; ratios use the minimum (the least disturbed run) and
are shown for the median too. The load average is printed before and after: on a busy machine the
absolute times are upper bounds but the interleaved ratios stay meaningful. All PQ of each evaluator
is printed (they must agree). `--decoders` times PNG decoders and inflate libraries per PNG instead.

    .venv/bin/python benchmarks/bench_pq.py [--images 600] [--workers K] [--repeat 7] [--data DIR]
    .venv/bin/python benchmarks/bench_pq.py --decoders [--data DIR]
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

OURS, OURS_B, HOTCOCO, PANOPTICAPI = ("harness eval-pq", "harness eval-pq --boundary", "hotcoco pq_compute",
                                      "panopticapi pq_compute")


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


def time_interleaved(cmds: dict[str, list[str]], env: dict[str, str],
                     repeat: int) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, str]]:
    """Wall and CPU times of each command over `repeat` rounds (after one untimed round); the order
    rotates every round so that no command always runs right after the same one."""
    names = list(cmds)
    walls: dict[str, list[float]] = {k: [] for k in names}
    cpus: dict[str, list[float]] = {k: [] for k in names}
    outs: dict[str, str] = {}
    for name in names:  # warm-up round (page cache, compiled kernel, .pyc), not timed
        _run(cmds[name], env)
    for r in range(repeat):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t, outs[name], c = _run(cmds[name], env)
            walls[name].append(t)
            cpus[name].append(c)
    return walls, cpus, outs


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def machine() -> str:
    """CPU model and count, for the record."""
    from harness.logging_utils import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}"


def load() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def bench_decoders(data: Path, count: int = 200) -> list[tuple[str, float]]:
    """Per-PNG CPU time (ms, min over 3 rounds) of each available decoder and inflate library."""
    import struct
    import zlib

    from harness.metrics import fastpng

    files = sorted((data / "gt").glob("*.png"))[: count // 2] + sorted((data / "pred").glob("*.png"))[: count // 2]
    datas = [f.read_bytes() for f in files]

    def idat(d: bytes) -> tuple[bytes, int]:
        pos, chunks, size = 8, [], 0
        while pos + 8 <= len(d):
            length, kind = struct.unpack_from(">I4s", d, pos)
            if kind == b"IHDR":
                w, h = struct.unpack_from(">II", d, pos + 8)
                size = h * (w * 3 + 1)
            elif kind == b"IDAT":
                chunks.append(d[pos + 8 : pos + 8 + length])
            pos += 12 + length
        return b"".join(chunks), size

    streams = [idat(d) for d in datas]

    def ids(rgb: np.ndarray) -> np.ndarray:
        out = rgb[..., 2].astype(np.uint32)
        out <<= 8
        out |= rgb[..., 1]
        out <<= 8
        out |= rgb[..., 0]
        return out

    cases: list[tuple[str, Any, list[Any]]] = []
    if fastpng.available():
        cases.append(("harness kernel: libdeflate + C unfilter -> ids", fastpng.decode_ids, datas))
    if _installed("pyspng"):
        import pyspng

        cases.append(("pyspng (libspng + zlib) + ids", lambda d: ids(pyspng.load(d)), datas))
    if _installed("imagecodecs"):
        import imagecodecs

        cases.append(("imagecodecs.png_decode + ids", lambda d: ids(imagecodecs.png_decode(d)), datas))
    if _installed("cv2"):
        import cv2

        cv2.setNumThreads(1)
        cases.append(("OpenCV imdecode + ids", lambda d: ids(cv2.imdecode(np.frombuffer(d, np.uint8),
                                                                         cv2.IMREAD_UNCHANGED)[..., ::-1]), datas))
    import io

    from PIL import Image

    cases.append(("PIL + ids", lambda d: ids(np.asarray(Image.open(io.BytesIO(d)))), datas))
    cases.append(("inflate only: zlib (stdlib)", lambda s: zlib.decompress(s[0]), streams))
    if _installed("deflate"):
        import deflate

        cases.append(("inflate only: libdeflate (deflate)", lambda s: deflate.zlib_decompress(s[0], s[1]), streams))
    if _installed("zlib_ng"):
        from zlib_ng import zlib_ng

        cases.append(("inflate only: zlib-ng (zlib-ng)", lambda s: zlib_ng.decompress(s[0]), streams))
    if _installed("isal"):
        from isal import isal_zlib

        cases.append(("inflate only: ISA-L (isal)", lambda s: isal_zlib.decompress(s[0]), streams))
    out = []
    for name, fn, items in cases:
        fn(items[0])
        best = math.inf
        for _ in range(3):
            t0 = time.process_time()
            for it in items:
                fn(it)
            best = min(best, (time.process_time() - t0) / len(items))
        out.append((name, best * 1e3))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="K for every tool (default: CPUs)")
    p.add_argument("--repeat", type=int, default=7, help="timed rounds (after one untimed round)")
    p.add_argument("--data", default=None, help="data folder (default: a temporary folder; reused if it exists)")
    p.add_argument("--boundary-iou-api", default=None, help="checkout of bowenc0221/boundary-iou-api to time too")
    p.add_argument("--decoders", action="store_true", help="time PNG decoders / inflate per PNG instead")
    p.add_argument("--no-panopticapi", action="store_true", help="skip panopticapi (slow) in quick checks")
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
        generate(data, args.images, args.height, args.width, max(1, args.workers))
        print(f"generated {args.images} pairs of {args.height}x{args.width} in {time.perf_counter() - t0:.1f} s")
    print(f"machine: {machine()}; {load()}")
    if args.decoders:
        rows = bench_decoders(data)
        print(f"\nCPU time per {args.height}x{args.width} panoptic PNG (min of 3 rounds over 200 PNGs):")
        for name, ms in rows:
            print(f"  {name:50s} {ms:7.3f} ms")
        print(f"after: {load()}")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({"machine": machine(), "decoders_ms": dict(rows)}, indent=1))
        return 0

    gt, pred, gtd, prd = str(data / "gt.json"), str(data / "pred.json"), str(data / "gt"), str(data / "pred")
    k = str(args.workers)
    env = dict(os.environ, RAYON_NUM_THREADS=k, OMP_NUM_THREADS="1")
    res_json, res_b = data / "R.json", data / "R_boundary.json"
    ours = [sys.executable, "-m", "harness", "eval-pq", "--gt-json", gt, "--gt-dir", gtd, "--pred-json", pred,
            "--pred-dir", prd, "--workers", k, "-q", "--out", str(res_json)]
    fmt = dict(gt=gt, pred=pred, gtd=gtd, prd=prd, workers=args.workers)
    cmds = {OURS: ours, OURS_B: ours[:-1] + [str(res_b), "--boundary"]}
    if _installed("hotcoco"):
        cmds[HOTCOCO] = [sys.executable, "-c", _HOTCOCO.format(**fmt)]
    if _installed("panopticapi") and not args.no_panopticapi:
        cmds[PANOPTICAPI] = [sys.executable, "-c", _PANOPTICAPI.format(**fmt)]
    load_before = load()
    walls, cpus, outs = time_interleaved(cmds, env, args.repeat)
    load_after = load()
    pqs = {OURS: json.loads(res_json.read_text())["pq"]["All"]["pq"],
           OURS_B: json.loads(res_b.read_text())["boundary_pq"]["All"]["pq"]}
    for name in (HOTCOCO, PANOPTICAPI):
        if name in outs:
            pqs[name] = json.loads(outs[name].strip().splitlines()[-1])["pq"]
    if args.boundary_iou_api:
        name = "boundary-iou-api (boundary, 1 run)"
        t, out, c = _run([sys.executable, "-c", _BOUNDARY_API.format(path=args.boundary_iou_api, **fmt)], env)
        walls[name], cpus[name], pqs[name] = [t], [c], json.loads(out.strip().splitlines()[-1])["pq"]

    def ratio(ref: str, name: str, stat: Any) -> str:
        return f"{stat(walls[ref]) / stat(walls[name]):7.2f}x" if ref in walls else f"{'-':>8s}"

    print(f"\n{args.images} images {args.height}x{args.width}, {args.workers} workers, {args.repeat} interleaved "
          f"rounds; {load_before} before, {load_after} after")
    print(f"{'evaluator':36s} {'min s':>6s} {'median s':>8s} {'CPU s':>6s} {'vs hotcoco':>10s} "
          f"{'vs panopticapi':>14s}  All PQ")
    for name in walls:
        print(f"{name:36s} {min(walls[name]):6.2f} {statistics.median(walls[name]):8.2f} "
              f"{min(cpus[name]):6.2f} {ratio(HOTCOCO, name, min):>10s} {ratio(PANOPTICAPI, name, min):>14s}  "
              f"{pqs[name]:.15f}")
    summary = {
        "eval_pq_vs_hotcoco_min": min(walls[HOTCOCO]) / min(walls[OURS]) if HOTCOCO in walls else None,
        "eval_pq_vs_hotcoco_median": (statistics.median(walls[HOTCOCO]) / statistics.median(walls[OURS])
                                      if HOTCOCO in walls else None),
        "boundary_over_mask_min": min(walls[OURS_B]) / min(walls[OURS]),
        "boundary_over_mask_median": statistics.median(walls[OURS_B]) / statistics.median(walls[OURS]),
    }
    if summary["eval_pq_vs_hotcoco_min"] is not None:
        print(f"harness eval-pq is {summary['eval_pq_vs_hotcoco_min']:.2f}x faster than hotcoco (min; "
              f"{summary['eval_pq_vs_hotcoco_median']:.2f}x median)")
    print(f"--boundary costs {summary['boundary_over_mask_min']:.2f}x a Mask PQ run (min; "
          f"{summary['boundary_over_mask_median']:.2f}x median)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(
            {"machine": machine(), "load_before": load_before, "load_after": load_after, "images": args.images,
             "size": [args.height, args.width], "workers": args.workers, "repeat": args.repeat,
             "wall_s": walls, "cpu_s": cpus, "all_pq": pqs, **summary}, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
