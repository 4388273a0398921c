"""Instance AP: panoptic -> instances converter, COCOeval wiring (hand-computed AP), CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from harness.data.format import id2rgb
from harness.metrics.ap import evaluate_ap, panoptic_to_instances, panoptic_to_results

CATS = [{"id": 1, "name": "a", "isthing": 1}, {"id": 2, "name": "b", "isthing": 1},
        {"id": 7, "name": "sky", "isthing": 0}]


def _write(root: Path, name: str, maps: list[np.ndarray], segs: list[list[dict[str, Any]]]) -> tuple[Path, Path]:
    folder = root / name
    folder.mkdir(parents=True)
    anns = []
    for i, (m, s) in enumerate(zip(maps, segs)):
        Image.fromarray(id2rgb(m)).save(folder / f"{i}.png")
        anns.append({"image_id": i, "file_name": f"{i}.png", "segments_info": s})
    images = [{"id": i, "file_name": f"{i}.jpg", "height": m.shape[0], "width": m.shape[1]}
              for i, m in enumerate(maps)]
    path = root / f"{name}.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    return path, folder


def _gt(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    g = np.zeros((40, 50), np.uint32)
    g[:10, :] = 70  # stuff
    g[12:30, 3:20] = 11  # thing, category 1
    g[15:35, 30:45] = 12  # thing, category 1
    g[36:40, 0:10] = 13  # crowd, category 2
    segs = [{"id": 70, "category_id": 7, "iscrowd": 0}, {"id": 11, "category_id": 1, "iscrowd": 0},
            {"id": 12, "category_id": 1, "iscrowd": 0}, {"id": 13, "category_id": 2, "iscrowd": 1}]
    path, folder = _write(tmp_path, "gt", [g], [segs])
    return path, folder, g


def test_converter_things_only_crowd_kept_exact_masks(tmp_path: Path) -> None:
    path, folder, g = _gt(tmp_path)
    inst = panoptic_to_instances(json.loads(path.read_text()), folder)
    assert [c["id"] for c in inst["categories"]] == [1, 2]
    anns = inst["annotations"]
    assert [(a["category_id"], a["iscrowd"]) for a in anns] == [(1, 0), (1, 0), (2, 1)]
    assert len({a["id"] for a in anns}) == 3
    for a, sid in zip(anns, (11, 12, 13)):
        m = mask_utils.decode(a["segmentation"]).astype(bool)
        np.testing.assert_array_equal(m, g == sid)
        ys, xs = np.nonzero(g == sid)
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert a["area"] == (g == sid).sum()


def test_converter_agrees_with_synthetic_instances(tmp_path: Path) -> None:
    synthetic = pytest.importorskip("harness.data.synthetic")
    root = synthetic.generate_dataset(tmp_path / "synth", 0, 3, seed=0, size=64, preview=False)
    pan = json.loads((root / "annotations" / "panoptic_val2017.json").read_text())
    inst = panoptic_to_instances(pan, root / "annotations" / "panoptic_val2017")
    theirs = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    key = lambda a: (a["image_id"], a["category_id"], a["bbox"][0], a["bbox"][1])  # noqa: E731
    ours_sorted, theirs_sorted = sorted(inst["annotations"], key=key), sorted(theirs["annotations"], key=key)
    assert len(ours_sorted) == len(theirs_sorted) > 0
    for a, b in zip(ours_sorted, theirs_sorted):
        assert a["iscrowd"] == b["iscrowd"]
        np.testing.assert_array_equal(mask_utils.decode(a["segmentation"]), mask_utils.decode(b["segmentation"]))


def test_perfect_predictions_give_ap_one(tmp_path: Path) -> None:
    path, folder, _ = _gt(tmp_path)
    pan = json.loads(path.read_text())
    inst = panoptic_to_instances(pan, folder)
    res = panoptic_to_results(pan, folder, CATS)
    assert {r["category_id"] for r in res} == {1, 2}
    ap = evaluate_ap(inst, res)
    assert ap["segm"]["AP"] == pytest.approx(1.0) and ap["bbox"]["AP"] == pytest.approx(1.0)


def test_one_hit_one_false_positive_one_miss_by_hand(tmp_path: Path) -> None:
    """Category 1 has 2 GT objects; detections: a perfect one (score .9), a false one (.8).
    Precision 1 up to recall .5, nothing beyond: AP = 51/101 over COCO's 101 recall points."""
    path, folder, g = _gt(tmp_path)
    inst = panoptic_to_instances(json.loads(path.read_text()), folder)
    hit = mask_utils.encode(np.asfortranarray((g == 11).astype(np.uint8)))
    false = np.zeros_like(g, np.uint8)
    false[0:8, 40:48] = 1
    fp = mask_utils.encode(np.asfortranarray(false))
    res = [{"image_id": 0, "category_id": 1, "segmentation": {**hit, "counts": hit["counts"].decode()}, "score": 0.9},
           {"image_id": 0, "category_id": 1, "segmentation": {**fp, "counts": fp["counts"].decode()}, "score": 0.8}]
    ap = evaluate_ap(inst, res, ["segm", "bbox"])
    assert ap["segm"]["AP"] == pytest.approx(51 / 101)
    assert ap["bbox"]["AP"] == pytest.approx(51 / 101)  # boxes derived from the masks
    assert ap["segm"]["AR100"] == pytest.approx(0.5)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness", "eval-ap", *args], capture_output=True, text=True)


def test_cli_panoptic_gt_and_predictions(tmp_path: Path) -> None:
    path, folder, g = _gt(tmp_path)
    p = g.copy()
    p[15:35, 30:45] = 0  # miss one object
    pred_json, pred_dir = _write(tmp_path, "pred", [p], [[
        {"id": 70, "category_id": 7}, {"id": 11, "category_id": 1, "score": 0.7}, {"id": 13, "category_id": 2}]])
    out = tmp_path / "ap.json"
    proc = _cli("--panoptic-gt-json", str(path), "--panoptic-gt-dir", str(folder), "--pred-json", str(pred_json),
                "--pred-dir", str(pred_dir), "--write-instances", str(tmp_path / "inst.json"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert set(r) == {"segm", "bbox"}
    assert r["segm"]["AP"] == pytest.approx(51 / 101)  # category 1: recall .5 at precision 1; crowd ignored
    inst = json.loads((tmp_path / "inst.json").read_text())
    assert len(inst["annotations"]) == 3
    # the saved instances JSON works as --gt-json too
    proc = _cli("--gt-json", str(tmp_path / "inst.json"), "--pred-json", str(pred_json), "--pred-dir",
                str(pred_dir), "--iou-types", "segm")
    assert proc.returncode == 0, proc.stderr
    assert "segm" in proc.stdout


def test_cli_bad_results_exit_2(tmp_path: Path) -> None:
    path, folder, _ = _gt(tmp_path)
    res = tmp_path / "res.json"
    res.write_text(json.dumps([{"image_id": 0, "category_id": 99, "score": 1.0, "bbox": [0, 0, 1, 1]}]))
    proc = _cli("--panoptic-gt-json", str(path), "--panoptic-gt-dir", str(folder), "--results", str(res))
    assert proc.returncode == 2
    assert "unknown category id 99" in proc.stderr and "Traceback" not in proc.stderr
