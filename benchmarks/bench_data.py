"""Speed of the COCO-panoptic data layer (reader, decoders, targets, writer) on synthetic images.

Generates N synthetic val images (long side --size, COCO-like 640 by default), then times each
step per image; every step runs --repeat times, interleaved, and the table shows the median and
the minimum (the machine may be shared). Decoder alternatives are timed next to the ones used.

    .venv/bin/python benchmarks/bench_data.py [--images 40] [--size 640] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    import cv2
    from PIL import Image

    from harness.data.coco_panoptic import PanopticDataset, read_id_png, read_image_rgb, segment_stats
    from harness.data.synthetic import generate_dataset
    from harness.data.targets import build_targets
    from harness.data.writer import PanopticPredictionWriter

    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    t0 = time.perf_counter()
    root = generate_dataset(tmp / "synth", 0, args.images, seed=0, size=args.size, preview=False)
    print(f"generated {args.images} images (long side {args.size}) in {time.perf_counter() - t0:.1f} s")

    ds = PanopticDataset(root, "val2017")
    ds_fast = PanopticDataset(root, "val2017", validate=False)
    ids = ds.image_ids
    jpgs = [ds.image_path(i) for i in ids]
    pngs = [ds.png_path(i) for i in ids]
    samples = [ds[i] for i in range(len(ds))]
    writer = PanopticPredictionWriter(tmp / "pred", tmp / "pred.json", ds.categories)
    semantic = []
    for s in samples:
        cat = np.full(s.id_map.shape, -1, np.int64)
        for g in s.segments:
            cat[s.id_map == g.id] = g.label
        semantic.append((s, cat, s.id_map.astype(np.int64)))

    def rewrite(s: Any) -> None:
        # The writer refuses an image id twice; forget it so each repeat writes again.
        writer._seen.discard(s.image_id)
        writer._png_names.discard(Path(s.file_name).stem + ".png")

    def add(s: Any) -> None:
        rewrite(s)
        writer.add(s.image_id, s.file_name, s.id_map, [{"id": g.id, "category_id": g.category_id} for g in s.segments])

    def add_semantic(x: tuple[Any, np.ndarray, np.ndarray]) -> None:
        rewrite(x[0])
        writer.add_semantic(x[0].image_id, x[0].file_name, x[1], x[2])

    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    steps: list[tuple[str, Callable[[Any], Any], Sequence[Any]]] = [
        ("open data set (JSON + file checks), per image", lambda _: PanopticDataset(root, "val2017"), [None]),
        ("dataset[i], validate=True", lambda i: ds[i], range(len(ds))),
        ("dataset[i], validate=False", lambda i: ds_fast[i], range(len(ds))),
        ("JPEG decode: read_image_rgb (OpenCV)", read_image_rgb, jpgs),
        ("JPEG decode: OpenCV imread + flipped copy", lambda p: np.ascontiguousarray(cv2.imread(str(p), flags)[..., ::-1]), jpgs),
        ("JPEG decode: PIL convert('RGB')", lambda p: np.asarray(Image.open(p).convert("RGB")), jpgs),
        ("PNG decode: read_id_png (pyspng)", read_id_png, pngs),
        ("PNG decode: OpenCV", lambda p: cv2.imread(str(p), cv2.IMREAD_UNCHANGED), pngs),
        ("PNG decode: PIL", lambda p: np.asarray(Image.open(p)), pngs),
        ("segment_stats (area + bbox)", lambda s: segment_stats(s.id_map), samples),
        ("build_targets", lambda s: build_targets(s, ds.categories), samples),
        ("writer.add (stats + PNG encode + write)", add, samples),
        ("writer.add_semantic", add_semantic, semantic),
    ]
    times: dict[str, list[float]] = {name: [] for name, _, _ in steps}
    for name, fn, items in steps:  # warm-up (imports, caches)
        fn(next(iter(items)))
    for _ in range(args.repeat):
        for name, fn, items in steps:
            start = time.perf_counter()
            for item in items:
                fn(item)
            elapsed = time.perf_counter() - start
            times[name].append(elapsed / (len(ds) if items == [None] else len(items)))
    t0 = time.perf_counter()
    ds.validate_all()
    validate_all = (time.perf_counter() - t0) / len(ds)
    writer.close()

    h, w = samples[0].id_map.shape
    segs = statistics.mean(len(s.segments) for s in samples)
    print(f"\n{len(ds)} images of {w}x{h}, {segs:.1f} segments per image, {args.repeat} repeats\n")
    print("| step | median ms / image | min |")
    print("|---|---|---|")
    for name, _, _ in steps:
        v = [x * 1e3 for x in times[name]]
        print(f"| {name} | {statistics.median(v):.2f} | {min(v):.2f} |")
    print(f"| validate_all (header + PNG + checks, once) | {validate_all * 1e3:.2f} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
