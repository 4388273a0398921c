"""Boundary PQ: hand-computed boundaries and scores, and a straightforward reference implementation.

The reference below follows boundary-iou-api's `mask_to_boundary` and Boundary PQ literally
(one cv2 erosion per segment on a 1-px zero-padded mask, boundary id maps painted in JSON order
with BOUNDARY_ID = max category id + 1, dict-based pair counting); the harness computes the same
with one dilation/erosion of the whole id map and a joint histogram.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from harness.data.format import id2rgb
from harness.metrics.boundary import boundary_band, dilation_pixels, mask_to_boundary
from harness.metrics.pq import PQAccumulator, PQOptions
from harness.metrics.pq_files import evaluate_pq_files

CATS = [{"id": i, "name": f"c{i}", "isthing": int(i <= 4), "supercategory": "x"} for i in range(1, 9)]


# ----------------------------------------------------------------------------- straightforward reference


def ref_mask_to_boundary(mask: np.ndarray, ratio: float) -> np.ndarray:
    h, w = mask.shape
    d = int(round(ratio * np.sqrt(h**2 + w**2)))
    d = max(d, 1)
    padded = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=d)[1 : h + 1, 1 : w + 1]
    return (mask.astype(np.uint8) - eroded) > 0


def ref_boundary_pq(images: list[tuple], cats: list[dict[str, Any]], ratio: float) -> dict[str, Any]:
    """boundary-iou-api's algorithm written plainly (per segment, dicts, np.unique)."""
    cat_info = {c["id"]: c for c in cats}
    boundary_id = max(cat_info) + 1
    stat: dict[int, list[float]] = defaultdict(lambda: [0, 0, 0, 0.0])  # tp, fp, fn, iou
    for g, gsegs, p, psegs in images:
        gsegs = [dict(s) for s in gsegs]
        psegs = [dict(s) for s in psegs]
        maps = []
        for idmap, segs in ((g, gsegs), (p, psegs)):
            b = idmap.astype(np.int64).copy()
            for s in segs:
                m = b == s["id"]
                bd = ref_mask_to_boundary(m, ratio)
                b[m] = boundary_id
                b[bd] = s["id"]
                s["boundary_area"] = int(bd.sum())
            maps.append(b)
        ids, cnt = np.unique(p, return_counts=True)
        parea = dict(zip(ids.tolist(), cnt.tolist()))
        for s in psegs:
            s["area"] = parea[s["id"]]

        def pairs(a: np.ndarray, b: np.ndarray) -> dict[tuple[int, int], int]:
            k, c = np.unique(a.astype(np.int64) * (1 << 32) + b, return_counts=True)
            return {(int(x >> 32), int(x & 0xFFFFFFFF)): int(n) for x, n in zip(k, c)}

        mask_pairs = pairs(g, p)
        bnd_pairs = pairs(maps[0], maps[1])
        gd = {s["id"]: s for s in gsegs}
        pd = {s["id"]: s for s in psegs}
        gm, pm = set(), set()
        for (gi, pi), inter in mask_pairs.items():
            if gi not in gd or pi not in pd or gd[gi]["iscrowd"] or gd[gi]["category_id"] != pd[pi]["category_id"]:
                continue
            union = pd[pi]["area"] + gd[gi]["area"] - inter - mask_pairs.get((0, pi), 0)
            b_inter = bnd_pairs.get((gi, pi), 0)
            b_union = pd[pi]["boundary_area"] + gd[gi]["boundary_area"] - b_inter - bnd_pairs.get((0, pi), 0)
            iou = min(inter / union, b_inter / b_union)
            if iou > 0.5:
                stat[gd[gi]["category_id"]][0] += 1
                stat[gd[gi]["category_id"]][3] += iou
                gm.add(gi)
                pm.add(pi)
        crowd = {}
        for gi, s in gd.items():
            if gi in gm:
                continue
            if s["iscrowd"]:
                crowd[s["category_id"]] = gi
                continue
            stat[s["category_id"]][2] += 1
        for pi, s in pd.items():
            if pi in pm:
                continue
            ign = mask_pairs.get((0, pi), 0)
            if s["category_id"] in crowd:
                ign += mask_pairs.get((crowd[s["category_id"]], pi), 0)
            if ign / s["area"] > 0.5:
                continue
            stat[s["category_id"]][1] += 1
    per_class = {}
    for cid in cat_info:
        tp, fp, fn, iou = stat[cid]
        if tp + fp + fn == 0:
            per_class[str(cid)] = None
            continue
        per_class[str(cid)] = (iou / (tp + fp / 2 + fn / 2), iou / tp if tp else 0.0, tp / (tp + fp / 2 + fn / 2))
    return per_class


# ----------------------------------------------------------------------------- boundaries


def test_dilation_pixels_rounds_half_to_even() -> None:
    assert dilation_pixels(480, 640) == 16
    assert dilation_pixels(427, 640) == 15
    assert dilation_pixels(3, 4, 0.5) == 2  # 2.5 -> 2 (banker's rounding, as Python's round)
    assert dilation_pixels(3, 4, 0.3) == 2  # 1.5 -> 2
    assert dilation_pixels(3, 4, 0.1) == 1  # 0.5 -> 0 -> at least 1
    assert dilation_pixels(3, 4, 0.7) == 4  # 3.5 -> 4


def _ratio_for(d: int, h: int, w: int) -> float:
    return d / np.sqrt(h**2 + w**2)


def test_square_ring_line_and_border_by_hand() -> None:
    h, w = 12, 12
    r1 = _ratio_for(1, h, w)
    square = np.zeros((h, w), bool)
    square[3:9, 3:9] = True
    expected = square.copy()
    expected[4:8, 4:8] = False  # 1-px inner band of a 6x6 square: 20 px
    np.testing.assert_array_equal(mask_to_boundary(square, r1), expected)
    assert expected.sum() == 20
    # ring: outer 8x8, hole 4x4 -> with d=1 both the outer and the inner band are boundary
    ring = np.zeros((h, w), bool)
    ring[2:10, 2:10] = True
    ring[4:8, 4:8] = False
    expected = ring.copy()
    expected[3:9, 3:9] = False
    expected[3, 3:9] = expected[8, 3:9] = expected[3:9, 3] = expected[3:9, 8] = True
    np.testing.assert_array_equal(mask_to_boundary(ring, r1), expected)
    assert expected.sum() == ring.sum()  # a 2-px wide ring is all boundary at d=1
    # 1-pixel-wide line: all boundary
    line = np.zeros((h, w), bool)
    line[5, 1:11] = True
    np.testing.assert_array_equal(mask_to_boundary(line, r1), line)
    # a mask filling the image: the image border counts as outside (1-px zero padding)
    full = np.ones((h, w), bool)
    expected = np.zeros((h, w), bool)
    expected[:2, :] = expected[-2:, :] = expected[:, :2] = expected[:, -2:] = True
    np.testing.assert_array_equal(mask_to_boundary(full, _ratio_for(2, h, w)), expected)


@pytest.mark.parametrize("d", [1, 2, 3, 7])
def test_boundary_band_equals_per_segment_erosion(d: int) -> None:
    rng = np.random.default_rng(d)
    h, w = 40, 53
    ids = cv2.resize(rng.integers(0, 6, (6, 7)).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    ids[rng.random((h, w)) < 0.03] = 9  # speckles and 1-px segments
    ratio = _ratio_for(d, h, w)
    band = boundary_band(ids.astype(np.uint16), d)
    for v in np.unique(ids):
        m = ids == v
        np.testing.assert_array_equal(band & m, ref_mask_to_boundary(m, ratio), err_msg=f"segment {v}")


# ----------------------------------------------------------------------------- Boundary PQ


def test_shifted_square_boundary_iou_one_third_by_hand() -> None:
    """GT 10x10 square, prediction shifted by 1 px onto VOID, d = 1.

    Mask: inter 90, union 100 + 100 - 90 - 10 (VOID) = 100 -> IoU 0.9.
    Boundary: 36-px rings, inter 18 (top and bottom rows), union 36 + 36 - 18 - 10 (VOID) = 44
    -> 0.41; min(0.9, 0.41) <= 0.5 so Boundary PQ has no match (one FN, one FP).
    """
    h, w = 20, 20
    g = np.zeros((h, w), np.uint32)
    p = np.zeros((h, w), np.uint32)
    g[5:15, 5:15] = 100
    p[5:15, 6:16] = 200
    g[0:2, :] = 101
    p[0:2, :] = 201  # a stuff segment matched exactly (boundary IoU 1)
    gs = [{"id": 100, "category_id": 1, "iscrowd": 0, "area": 100}, {"id": 101, "category_id": 5, "iscrowd": 0,
                                                                      "area": 40}]
    ps = [{"id": 200, "category_id": 1}, {"id": 201, "category_id": 5}]
    acc = PQAccumulator(CATS, boundary=True, dilation_ratio=_ratio_for(1, h, w))
    acc.add(g, gs, p, ps)
    r = acc.summarize()
    assert r["pq"]["per_class"]["1"]["sq"] == pytest.approx(0.9)
    assert r["boundary_pq"]["per_class"]["1"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}  # min(0.9, 18/44): no match
    assert r["boundary_pq"]["per_class"]["5"]["pq"] == 1.0
    assert r["boundary_pq"]["Things"]["n"] == 1  # an FN and an FP, still present


def _random_image(rng: np.random.Generator, small_ids: bool) -> tuple:
    h, w = int(rng.integers(24, 48)), int(rng.integers(24, 48))
    lab = np.zeros((h, w), np.int64)
    n = int(rng.integers(1, 11))
    for s in range(1, n + 1):
        y, x = rng.integers(0, h), rng.integers(0, w)
        hh, ww = rng.integers(2, 26, 2)
        lab[y : y + hh, x : x + ww] = s
    plab = np.roll(lab, int(rng.integers(-2, 3)), axis=int(rng.integers(0, 2)))
    for _ in range(int(rng.integers(0, 3))):
        y, x = rng.integers(0, h), rng.integers(0, w)
        plab[y : y + 5, x : x + 7] = rng.integers(0, n + 2)
    gids = np.arange(n + 1) + 2 if small_ids else rng.choice(np.arange(1, 1 << 24), n + 1, replace=False)
    pids = rng.permutation(np.arange(n + 2)) + 2 if small_ids else rng.choice(np.arange(1, 1 << 24), n + 2,
                                                                              replace=False)
    g = np.zeros((h, w), np.uint32)
    p = np.zeros((h, w), np.uint32)
    gs, ps, cat_of = [], [], {}
    for s in range(1, n + 1):
        m = lab == s
        if m.any():
            g[m] = gids[s]
            cat_of[s] = int(rng.integers(1, 9))
            gs.append({"id": int(gids[s]), "category_id": cat_of[s], "iscrowd": int(rng.random() < 0.15),
                       "area": int(m.sum())})
    for s in range(1, n + 2):
        m = plab == s
        if m.any():
            p[m] = pids[s]
            c = cat_of.get(s, int(rng.integers(1, 9))) if rng.random() > 0.15 else int(rng.integers(1, 9))
            ps.append({"id": int(pids[s]), "category_id": c})
    return g, gs, p, ps


@pytest.mark.parametrize("seed, small_ids, ratio", [(0, False, 0.02), (1, False, 0.06), (2, True, 0.04),
                                                     (3, True, 0.1)])
def test_boundary_pq_matches_straightforward_reference(seed: int, small_ids: bool, ratio: float) -> None:
    """small_ids: segment ids 2..12 include BOUNDARY_ID = 9, the reference's collision quirk."""
    rng = np.random.default_rng(seed)
    images = [_random_image(rng, small_ids) for _ in range(30)]
    ref = ref_boundary_pq(images, CATS, ratio)
    acc = PQAccumulator(CATS, boundary=True, dilation_ratio=ratio)
    for g, gs, p, ps in images:
        acc.add(g, gs, p, ps)
    got = acc.summarize()["boundary_pq"]["per_class"]
    for cid, v in ref.items():
        if v is None:
            assert got[cid] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
        else:
            assert (got[cid]["pq"], got[cid]["sq"], got[cid]["rq"]) == pytest.approx(v, abs=1e-12), cid


def test_boundary_id_collision_quirk_and_corrected_option() -> None:
    """A GT segment whose id equals BOUNDARY_ID (9) listed after another one takes over that
    segment's interior in the reference; `separate_boundary_label` gives the clean result."""
    h, w = 30, 30
    g = np.zeros((h, w), np.uint32)
    g[2:14, 2:28] = 3  # painted first: its interior becomes label 9
    g[16:28, 2:28] = 9  # id == BOUNDARY_ID
    p = g.copy()
    gs = [{"id": 3, "category_id": 5, "iscrowd": 0, "area": int((g == 3).sum())},
          {"id": 9, "category_id": 6, "iscrowd": 0, "area": int((g == 9).sum())}]
    ps = [{"id": 3, "category_id": 5}, {"id": 9, "category_id": 6}]
    ratio = _ratio_for(2, h, w)
    quirk = PQAccumulator(CATS, boundary=True, dilation_ratio=ratio)
    quirk.add(g, gs, p, ps)
    clean = PQAccumulator(CATS, boundary=True, dilation_ratio=ratio, separate_boundary_label=True)
    clean.add(g, gs, p, ps)
    ref = ref_boundary_pq([(g, gs, p, ps)], CATS, ratio)
    q = quirk.summarize()["boundary_pq"]["per_class"]
    c = clean.summarize()["boundary_pq"]["per_class"]
    assert (q["6"]["pq"], q["6"]["sq"], q["6"]["rq"]) == pytest.approx(ref["6"], abs=1e-12)
    assert c["5"]["pq"] == 1.0 and c["6"]["pq"] == 1.0
    assert q["6"]["pq"] != 1.0  # the quirk changes the score


def test_file_evaluation_boundary_with_workers(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    images = [_random_image(rng, False) for _ in range(12)]
    for d in ("gt", "pred"):
        (tmp_path / d).mkdir()
    gt_anns, pred_anns = [], []
    for i, (g, gs, p, ps) in enumerate(images):
        Image.fromarray(id2rgb(g)).save(tmp_path / "gt" / f"{i}.png")
        Image.fromarray(id2rgb(p)).save(tmp_path / "pred" / f"{i}.png")
        gt_anns.append({"image_id": i, "file_name": f"{i}.png", "segments_info": gs})
        pred_anns.append({"image_id": i, "file_name": f"{i}.png", "segments_info": ps})
    (tmp_path / "gt.json").write_text(json.dumps({"annotations": gt_anns, "categories": CATS}))
    (tmp_path / "pred.json").write_text(json.dumps({"annotations": pred_anns}))
    one = evaluate_pq_files(tmp_path / "gt.json", tmp_path / "pred.json", options=PQOptions(boundary=True), workers=1)
    two = evaluate_pq_files(tmp_path / "gt.json", tmp_path / "pred.json", options=PQOptions(boundary=True), workers=2)
    ref = ref_boundary_pq(images, CATS, 0.02)
    for cid, v in ref.items():
        if v is not None:
            assert one["boundary_pq"]["per_class"][cid]["pq"] == pytest.approx(v[0], abs=1e-12)
    assert one["boundary_pq"]["All"]["pq"] == pytest.approx(two["boundary_pq"]["All"]["pq"], abs=1e-15)
