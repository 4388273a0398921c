"""Mask PQ: agreement with panopticapi(-lite) on generated and hand-built cases, bad input, CLI."""

from __future__ import annotations

import contextlib
import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from harness.data.format import id2rgb
from harness.errors import DataError
from harness.metrics.pq import PQAccumulator, PQOptions, panoptic_from_semantic
from harness.metrics.pq_files import evaluate_pq_files

CATS = [{"id": i, "name": f"c{i}", "isthing": int(i <= 4), "supercategory": "x"} for i in range(1, 9)]
Image_ = tuple[np.ndarray, list[dict[str, Any]], np.ndarray, list[dict[str, Any]]]


# ----------------------------------------------------------------------------- helpers


def write_set(root: Path, images: list[Image_], cats: list[dict[str, Any]] = CATS) -> dict[str, str]:
    """Write GT and prediction JSON + PNG folders (PIL-encoded, as panopticapi writes them)."""
    (root / "gt").mkdir(parents=True, exist_ok=True)
    (root / "pred").mkdir(parents=True, exist_ok=True)
    gt_anns, pred_anns, imgs = [], [], []
    for i, (g, gs, p, ps) in enumerate(images):
        Image.fromarray(id2rgb(g)).save(root / "gt" / f"{i}.png")
        Image.fromarray(id2rgb(p)).save(root / "pred" / f"p{i}.png")
        gt_anns.append({"image_id": i, "file_name": f"{i}.png", "segments_info": gs})
        pred_anns.append({"image_id": i, "file_name": f"p{i}.png", "segments_info": ps})
        imgs.append({"id": i, "file_name": f"{i}.jpg", "height": g.shape[0], "width": g.shape[1]})
    (root / "gt.json").write_text(json.dumps({"images": imgs, "annotations": gt_anns, "categories": cats}))
    (root / "pred.json").write_text(json.dumps({"annotations": pred_anns}))
    return {"gt": str(root / "gt.json"), "pred": str(root / "pred.json"), "gtd": str(root / "gt"),
            "prd": str(root / "pred")}


def panopticapi(paths: dict[str, str]) -> dict[str, Any]:
    from panopticapi.evaluation import pq_compute

    with contextlib.redirect_stdout(io.StringIO()):
        return pq_compute(paths["gt"], paths["pred"], paths["gtd"], paths["prd"])


def ours(paths: dict[str, str], **kw: Any) -> dict[str, Any]:
    workers = kw.pop("workers", 1)
    return evaluate_pq_files(paths["gt"], paths["pred"], paths["gtd"], paths["prd"], options=PQOptions(**kw),
                             workers=workers)


def assert_same(ref: dict[str, Any], got: dict[str, Any], tol: float = 1e-12) -> None:
    for split in ("All", "Things", "Stuff"):
        assert got[split]["n"] == ref[split]["n"], split
        for k in ("pq", "sq", "rq"):
            assert got[split][k] == pytest.approx(float(ref[split][k]), abs=tol), (split, k)
    assert set(got["per_class"]) == {str(c) for c in ref["per_class"]}
    for cid, v in ref["per_class"].items():
        for k in ("pq", "sq", "rq"):
            assert got["per_class"][str(cid)][k] == pytest.approx(float(v[k]), abs=tol), (cid, k)


def seg(sid: int, cat: int, area: int | None = None, crowd: int = 0) -> dict[str, Any]:
    d = {"id": sid, "category_id": cat, "iscrowd": crowd, "bbox": [0, 0, 1, 1]}
    if area is not None:
        d["area"] = area
    return d


def gt_segs(g: np.ndarray, spec: dict[int, tuple[int, int]]) -> list[dict[str, Any]]:
    """spec: id -> (category, iscrowd); areas from the map."""
    return [seg(i, c, int((g == i).sum()), cr) for i, (c, cr) in spec.items()]


def random_image(rng: np.random.Generator, h: int = 36, w: int = 44, small_ids: bool = False) -> Image_:
    """Rectangles over VOID with crowd, re-labelled and shifted predictions, spurious segments."""
    lab = np.zeros((h, w), np.int64)
    nseg = int(rng.integers(0, 9))
    for s in range(1, nseg + 1):
        y, x = rng.integers(0, h), rng.integers(0, w)
        hh, ww = rng.integers(2, 22, 2)
        lab[y : y + hh, x : x + ww] = s
    ids = (np.arange(nseg + 1) + 3) if small_ids else rng.choice(np.arange(1, 1 << 24), nseg + 1, replace=False)
    g = np.zeros((h, w), np.uint32)
    gs: list[dict[str, Any]] = []
    for s in range(1, nseg + 1):
        m = lab == s
        if not m.any():
            continue
        g[m] = ids[s]
        gs.append(seg(int(ids[s]), int(rng.integers(1, 9)), int(m.sum()), int(rng.random() < 0.2)))
    plab = np.roll(lab, int(rng.integers(-3, 4)), axis=int(rng.integers(0, 2)))
    for _ in range(int(rng.integers(0, 3))):
        y, x = rng.integers(0, h), rng.integers(0, w)
        hh, ww = rng.integers(2, 16, 2)
        plab[y : y + hh, x : x + ww] = rng.integers(0, nseg + 3)
    pids = (rng.permutation(np.arange(1, nseg + 4)) + 2) if small_ids else rng.choice(
        np.arange(1, 1 << 24), nseg + 3, replace=False)
    gcat = {s["id"]: s["category_id"] for s in gs}
    p = np.zeros((h, w), np.uint32)
    ps: list[dict[str, Any]] = []
    for s in range(1, nseg + 3):
        m = plab == s
        if not m.any():
            continue
        p[m] = pids[s]
        c = gcat.get(int(ids[s]) if s <= nseg else -1, int(rng.integers(1, 9)))
        if rng.random() < 0.2:
            c = int(rng.integers(1, 9))
        ps.append({"id": int(pids[s]), "category_id": c})
    return g, gs, p, ps


# ----------------------------------------------------------------------------- agreement with panopticapi


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_sets_match_panopticapi(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    images = [random_image(rng, small_ids=seed == 2) for _ in range(25)]
    paths = write_set(tmp_path, images)
    ref = panopticapi(paths)
    assert_same(ref, ours(paths)["pq"])
    assert_same(ref, ours(paths, workers=2)["pq"])


def test_hand_built_rules_match_panopticapi_and_hand_counts(tmp_path: Path) -> None:
    """Every rule in one set: IoU exactly 0.5, VOID and crowd ignore rules, classes only in GT or
    only in predictions, an image without segments; per-class counts checked by hand too."""
    images: list[Image_] = []
    # 1) IoU exactly 0.5 (cat 1): GT 4 px, prediction covers 2 of them -> no match (FN + FP).
    g = np.zeros((6, 6), np.uint32)
    p = np.zeros((6, 6), np.uint32)
    g[0, 0:4] = 10
    p[0, 0:2] = 20
    images.append((g, gt_segs(g, {10: (1, 0)}), p, [{"id": 20, "category_id": 1}]))
    # 2) IoU just above 0.5 thanks to the VOID rule (cat 2): GT 4 px, prediction = 3 GT px + 2 VOID px:
    #    union = 3 + 4 - 3 - 2 = 2... computed: inter 3, union 5+4-3-2 = 4 -> 0.75 -> TP.
    g = np.zeros((6, 6), np.uint32)
    p = np.zeros((6, 6), np.uint32)
    g[1, 0:4] = 11
    p[1, 1:4] = 21
    p[2, 0:2] = 21
    images.append((g, gt_segs(g, {11: (2, 0)}), p, [{"id": 21, "category_id": 2}]))
    # 3) unmatched predictions: 3 of 5 px on VOID -> ignored; 2 of 4 px on VOID (exactly half) -> FP (cat 3).
    g = np.zeros((6, 6), np.uint32)
    p = np.zeros((6, 6), np.uint32)
    g[0, :] = 12
    p[0, 0:2] = 22
    p[1, 0:3] = 22
    p[0, 3:5] = 23
    p[1, 3:5] = 23
    images.append((g, gt_segs(g, {12: (5, 0)}), p, [{"id": 22, "category_id": 3}, {"id": 23, "category_id": 3}]))
    # 4) crowd (cat 4): prediction mostly on the crowd region of its category -> ignored;
    #    a prediction of another category on it -> FP (cat 1).
    g = np.zeros((6, 6), np.uint32)
    p = np.zeros((6, 6), np.uint32)
    g[0:3, 0:6] = 13
    p[0:2, 0:4] = 24
    p[2, 0:4] = 25
    images.append((g, gt_segs(g, {13: (4, 1)}), p, [{"id": 24, "category_id": 4}, {"id": 25, "category_id": 1}]))
    # 5) class only in GT (cat 6, FN) and only in predictions (cat 7, FP, on GT 14 so not ignored);
    #    a perfect match (cat 8); a prediction entirely on VOID (cat 7, ignored).
    g = np.zeros((6, 6), np.uint32)
    p = np.zeros((6, 6), np.uint32)
    g[0:2, :] = 14
    g[4:6, :] = 15
    p[4:6, :] = 26
    p[0:2, :] = 27
    p[2:4, :] = 28
    images.append((g, gt_segs(g, {14: (6, 0), 15: (8, 0)}), p, [
        {"id": 26, "category_id": 8}, {"id": 27, "category_id": 7}, {"id": 28, "category_id": 7}]))
    # 6) an image without any segment.
    images.append((np.zeros((6, 6), np.uint32), [], np.zeros((6, 6), np.uint32), []))
    paths = write_set(tmp_path, images)
    ref = panopticapi(paths)
    got = ours(paths)["pq"]
    assert_same(ref, got)
    pc = got["per_class"]
    assert pc["1"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}  # image 1: FN + FP; image 4: FP -> tp 0
    assert pc["2"]["pq"] == pytest.approx(0.75) and pc["2"]["rq"] == 1.0
    assert pc["3"]["rq"] == pytest.approx(0.0)  # one FP (the half-VOID one), no TP
    assert pc["5"]["rq"] == 0.0  # GT 12 unmatched: its predictions were category 3
    assert pc["4"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}  # crowd only, prediction ignored: absent
    assert pc["8"]["pq"] == 1.0
    assert pc["7"]["rq"] == 0.0 and pc["6"]["rq"] == 0.0
    assert got["All"]["n"] == 7  # classes 1, 2, 3, 5, 6, 7, 8 (4 had no tp/fp/fn)


def _two_crowd_case() -> list[Image_]:
    """Two crowd regions of category 1; a prediction of category 1 on the first one."""
    g = np.zeros((8, 8), np.uint32)
    p = np.zeros((8, 8), np.uint32)
    g[0:3, :] = 30  # first crowd region
    g[5:8, :] = 31  # second crowd region (last in JSON order: the one panopticapi keeps)
    g[3:5, :] = 32  # a stuff segment matched perfectly
    p[0:3, 0:6] = 40
    p[3:5, :] = 41
    return [(g, gt_segs(g, {30: (1, 1), 31: (1, 1), 32: (5, 0)}), p,
             [{"id": 40, "category_id": 1}, {"id": 41, "category_id": 5}])]


def test_two_crowd_regions_last_wins_by_default_and_corrected_option(tmp_path: Path) -> None:
    paths = write_set(tmp_path, _two_crowd_case())
    ref = panopticapi(paths)
    default = ours(paths)["pq"]
    assert_same(ref, default)
    assert default["per_class"]["1"]["rq"] == 0.0 and default["All"]["n"] == 2  # quirk: the FP counts
    fixed = ours(paths, all_crowd_regions=True)["pq"]
    assert fixed["per_class"]["1"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}  # ignored: class 1 absent
    assert fixed["All"]["n"] == 1 and fixed["All"]["pq"] == 1.0


def test_empty_split_reports_null_where_panopticapi_divides_by_zero(tmp_path: Path) -> None:
    g = np.zeros((4, 4), np.uint32)
    g[:2] = 5
    p = g.copy()
    paths = write_set(tmp_path, [(g, gt_segs(g, {5: (1, 0)}), p, [{"id": 5, "category_id": 1}])])
    with pytest.raises(ZeroDivisionError):
        panopticapi(paths)
    got = ours(paths)["pq"]
    assert got["Stuff"] == {"pq": None, "sq": None, "rq": None, "n": 0}
    assert got["Things"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}


def test_gt_area_comes_from_json_as_in_panopticapi(tmp_path: Path) -> None:
    g = np.zeros((4, 4), np.uint32)
    g[:2] = 5
    g[2:] = 6
    p = g.copy()
    gs = [seg(5, 1, area=12), seg(6, 5, area=8)]  # 12 is wrong on purpose: panopticapi trusts the JSON
    paths = write_set(tmp_path, [(g, gs, p, [{"id": 5, "category_id": 1}, {"id": 6, "category_id": 5}])])
    got = ours(paths)["pq"]
    assert got["per_class"]["1"]["sq"] == pytest.approx(8 / 12)
    assert_same(panopticapi(paths), got)


# ----------------------------------------------------------------------------- in-memory API


def test_accumulator_equals_file_evaluation(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    images = [random_image(rng) for _ in range(10)]
    paths = write_set(tmp_path, images)
    acc = PQAccumulator(CATS, boundary=True)
    for i, (g, gs, p, ps) in enumerate(images):
        acc.add(g, gs, p, ps, image_id=i)
    mem = acc.summarize()
    files = ours(paths, boundary=True)
    for key in ("pq", "boundary_pq"):
        assert_same(files[key], mem[key], tol=0)


def test_accumulator_accepts_ids_beyond_24_bits() -> None:
    g = np.zeros((4, 4), np.int64)
    g[:2] = 1 << 40
    acc = PQAccumulator(CATS)
    acc.add(g, [seg(1 << 40, 1, 8)], g.copy(), [{"id": 1 << 40, "category_id": 1}])
    assert acc.summarize()["pq"]["All"]["pq"] == 1.0


def test_panoptic_from_semantic_roundtrip() -> None:
    cat = np.array([[0, 0, 1, -1], [0, 0, 1, 1], [2, 2, 2, 2]])
    inst = np.array([[1, 1, 0, 0], [2, 2, 0, 0], [0, 0, 0, 0]])
    id_map, segs = panoptic_from_semantic(cat, inst, [7, 9, 20])
    assert id_map[0, 3] == 0
    assert len(segs) == 4 and min(s["id"] for s in segs) == 22  # above BOUNDARY_ID = 21
    by_id = {s["id"]: s for s in segs}
    assert by_id[int(id_map[0, 0])]["category_id"] == 7 and by_id[int(id_map[0, 0])]["area"] == 2
    assert id_map[0, 0] != id_map[1, 0]
    assert by_id[int(id_map[2, 0])] == {"id": int(id_map[2, 0]), "category_id": 20, "area": 4}
    cats = [{"id": 7, "isthing": 1}, {"id": 9, "isthing": 0}, {"id": 20, "isthing": 0}]
    acc = PQAccumulator(cats)
    acc.add(id_map, [dict(s, iscrowd=0) for s in segs], id_map, segs)
    assert acc.summarize()["pq"]["All"]["pq"] == 1.0


def _panoptic_from_semantic_by_sort(category: np.ndarray, instance: np.ndarray, category_ids: list[int]
                                    ) -> tuple[np.ndarray, list[dict[str, int]]]:
    """The definition: every distinct (category, instance) pair of the non-VOID pixels, ascending, by np.unique."""
    valid = category >= 0
    start = max(category_ids) + 2
    pairs, inverse, counts = np.unique(np.stack([category[valid], instance[valid]], 1), axis=0,
                                       return_inverse=True, return_counts=True)
    id_map = np.zeros(category.shape, np.uint32)
    id_map[valid] = start + inverse.ravel()
    return id_map, [{"id": start + n, "category_id": category_ids[int(c)], "area": int(a)}
                    for n, ((c, _), a) in enumerate(zip(pairs, counts))]


@pytest.mark.parametrize("inst_range", [(0, 5), (-3, 40), (0, 1 << 30)])  # the last takes the sort path
def test_panoptic_from_semantic_equals_sorting_definition(inst_range: tuple[int, int]) -> None:
    rng = np.random.default_rng(inst_range[1])
    ids = [3, 8, 9, 40, 41]
    for shape in ((48, 64), (1, 7), (5, 5)):
        category = rng.integers(-1, len(ids), shape)
        instance = rng.integers(*inst_range, shape)
        got_map, got_segs = panoptic_from_semantic(category, instance, ids)
        want_map, want_segs = _panoptic_from_semantic_by_sort(category, instance, ids)
        assert got_map.dtype == np.uint32 and np.array_equal(got_map, want_map)
        assert got_segs == want_segs
    empty = np.full((4, 4), -1)
    got_map, got_segs = panoptic_from_semantic(empty, empty, ids)
    assert not got_map.any() and got_segs == []


# ----------------------------------------------------------------------------- PNG decoding


def _png_with_filters(rgb: np.ndarray, filters: list[int]) -> bytes:
    """Encode with a chosen filter type per row (straightforward PNG spec implementation)."""
    h, w, c = rgb.shape
    a = rgb.astype(np.int64)
    rows = []
    for y in range(h):
        ft = filters[y % len(filters)]
        cur = a[y].reshape(-1)
        up = a[y - 1].reshape(-1) if y else np.zeros_like(cur)
        left = np.concatenate([np.zeros(c, np.int64), cur[:-c]])
        ul = np.concatenate([np.zeros(c, np.int64), up[:-c]])
        if ft == 0:
            f = cur
        elif ft == 1:
            f = cur - left
        elif ft == 2:
            f = cur - up
        elif ft == 3:
            f = cur - (left + up) // 2
        else:
            pa, pb, pc = np.abs(up - ul), np.abs(left - ul), np.abs(left + up - 2 * ul)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, ul))
            f = cur - pred
        rows.append(bytes([ft]) + (f % 256).astype(np.uint8).tobytes())

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2 if c == 3 else 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(
        b"IEND", b"")


@pytest.mark.parametrize("channels", [3, 4])
def test_png_decoder_all_filter_types(tmp_path: Path, channels: int) -> None:
    from harness.metrics import pngio

    rng = np.random.default_rng(channels)
    rgb = rng.integers(0, 256, (9, 11, channels), dtype=np.uint8)
    rgb[3:8, 2:9] = 200  # flat area as in panoptic maps (exercises the flat-run shortcuts)
    data = _png_with_filters(rgb, [0, 1, 2, 3, 4, 4, 3, 2, 1])
    path = tmp_path / "f.png"
    path.write_bytes(data)
    expected = np.asarray(Image.open(path))[..., :3].astype(np.uint32)
    expected = expected[..., 0] + 256 * expected[..., 1] + 65536 * expected[..., 2]
    np.testing.assert_array_equal(pngio.read_id_map(path), expected)


def test_png_decoder_rejects_corrupt_png(tmp_path: Path) -> None:
    from harness.metrics import pngio

    path = tmp_path / "bad.png"
    good = _png_with_filters(np.zeros((4, 4, 3), np.uint8), [1])
    path.write_bytes(good[:-30] + b"\0" * 30)
    with pytest.raises(DataError, match="bad.png"):
        pngio.read_id_map(path)


# ----------------------------------------------------------------------------- bad input (CLI, exit 2)


def _cli(paths: dict[str, str], *extra: str, out: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "harness", "eval-pq", "--gt-json", paths["gt"], "--gt-dir", paths["gtd"],
           "--pred-json", paths["pred"], "--pred-dir", paths["prd"], "--workers", "1", *extra]
    if out is not None:
        cmd += ["--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True)


def _simple(tmp_path: Path) -> dict[str, str]:
    g = np.zeros((4, 4), np.uint32)
    g[:2] = 5
    g[2:] = 6
    return write_set(tmp_path, [(g, gt_segs(g, {5: (1, 0), 6: (5, 0)}), g.copy(),
                                 [{"id": 5, "category_id": 1}, {"id": 6, "category_id": 5}])])


def test_cli_writes_r_json_contract(tmp_path: Path) -> None:
    paths = _simple(tmp_path)
    proc = _cli(paths, "--boundary", out=tmp_path / "R.json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads((tmp_path / "R.json").read_text())
    assert set(r) == {"pq", "boundary_pq"}
    for block in r.values():
        assert set(block) == {"All", "Things", "Stuff", "per_class"}
        assert set(block["All"]) == {"pq", "sq", "rq", "n"}
        assert set(block["per_class"]) == {str(c["id"]) for c in CATS}
    assert r["pq"]["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 2}
    assert "All" in proc.stdout and "PQ" in proc.stdout


def _edit(path: str, fn: Any) -> None:
    d = json.loads(Path(path).read_text())
    fn(d)
    Path(path).write_text(json.dumps(d))


@pytest.mark.parametrize("case, message", [
    ("missing_png", "not found"),
    ("size", "differs from prediction size"),
    ("png_not_json", "in the PNG but not in the JSON"),
    ("json_not_png", "in the JSON but not in the PNG"),
    ("unknown_category", "unknown category id 99"),
    ("missing_prediction", "no prediction for image id 0"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path, case: str, message: str) -> None:
    paths = _simple(tmp_path)
    if case == "missing_png":
        Path(paths["prd"], "p0.png").unlink()
    elif case == "size":
        Image.fromarray(np.zeros((5, 4, 3), np.uint8)).save(Path(paths["prd"], "p0.png"))
    elif case == "png_not_json":
        _edit(paths["pred"], lambda d: d["annotations"][0]["segments_info"].pop())
    elif case == "json_not_png":
        _edit(paths["pred"], lambda d: d["annotations"][0]["segments_info"].append({"id": 77, "category_id": 1}))
    elif case == "unknown_category":
        _edit(paths["pred"], lambda d: d["annotations"][0]["segments_info"][0].update(category_id=99))
    elif case == "missing_prediction":
        _edit(paths["pred"], lambda d: d["annotations"].clear())
    proc = _cli(paths)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    if case != "missing_prediction":
        assert "image 0" in proc.stderr or "image id 0," in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_allow_missing_scores_false_negatives_and_extra_predictions_warn(tmp_path: Path) -> None:
    paths = _simple(tmp_path)

    def edit(d: dict[str, Any]) -> None:
        d["annotations"][0]["image_id"] = 99  # prediction for an image not in the GT

    _edit(paths["pred"], edit)
    proc = _cli(paths, "--allow-missing", out=tmp_path / "R.json")
    assert proc.returncode == 0, proc.stderr
    assert "1 image(s) that are not in the GT" in proc.stderr
    assert "scored as all false negatives" in proc.stderr
    r = json.loads((tmp_path / "R.json").read_text())["pq"]
    assert r["All"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 2}


def test_eval_pq_help_does_not_import_torch() -> None:
    code = ("import sys\nfrom harness.cli import main\ntry:\n    main(['eval-pq', '--help'])\nexcept SystemExit:\n"
            "    pass\nassert 'torch' not in sys.modules, 'torch imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
