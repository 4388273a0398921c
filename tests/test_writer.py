"""Prediction writer (harness/data/writer.py): round trip through our reader and panopticapi."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.data.coco_panoptic import PanopticDataset, coco_category_map
from harness.data.format import CategoryMap, rgb2id
from harness.data.writer import PanopticPredictionWriter
from harness.errors import DataError

SPLIT = "val2017"


@pytest.fixture(scope="module")
def dataset_root(synth_root: Path) -> Path:
    """The shared synthetic data set (read-only; copy it before breaking files)."""
    return synth_root


@pytest.fixture(scope="module")
def gt(dataset_root: Path) -> PanopticDataset:
    return PanopticDataset(dataset_root, SPLIT)


def _write_gt_copy(gt: PanopticDataset, out: Path) -> Path:
    with PanopticPredictionWriter(out / "pred", out / "pred.json", gt.categories) as w:
        for iid in gt.image_ids:
            ann = gt.annotation(iid)
            # Drop area/bbox on purpose: the writer must recompute them.
            infos = [{"id": s["id"], "category_id": s["category_id"], "iscrowd": s["iscrowd"]}
                     for s in ann["segments_info"]]
            w.add(iid, gt.image_info(iid)["file_name"], gt.load_id_map(iid), infos)
    return out / "pred.json"


def test_round_trip_writer_reader(gt: PanopticDataset, tmp_path: Path) -> None:
    pred_json = _write_gt_copy(gt, tmp_path)
    back = PanopticDataset(None, image_dir=gt.image_dir, json_path=pred_json, png_dir=tmp_path / "pred")
    assert back.image_ids == gt.image_ids
    assert back.categories.ids == gt.categories.ids
    assert back.validate_all() == len(gt)
    for i, iid in enumerate(gt.image_ids):
        ref = gt.annotation(iid)["segments_info"]
        got = back.annotation(iid)["segments_info"]
        key = ("id", "category_id", "iscrowd", "area", "bbox")
        assert [{k: s[k] for k in key} for s in got] == [{k: s[k] for k in key} for s in ref]
        assert np.array_equal(back.load_id_map(iid), gt.load_id_map(iid))
        a, b = gt[i], back[i]
        assert [(s.id, s.label, s.iscrowd, s.area, s.bbox) for s in a.segments] == [
            (s.id, s.label, s.iscrowd, s.area, s.bbox) for s in b.segments
        ]
    # Atomic writes leave no temporary file behind.
    assert not [p for p in os.listdir(tmp_path / "pred") if p.startswith(".")]
    assert sorted(os.listdir(tmp_path)) == ["pred", "pred.json"]


def _panopticapi_pq(gt: PanopticDataset, pred_json: Path, pred_dir: Path) -> dict[str, dict[str, float]]:
    """panopticapi's PQ, single process (its `pq_compute` forks a pool it never closes)."""
    from panopticapi.evaluation import pq_compute_single_core

    gt_data = json.loads(gt.json_path.read_text())
    preds = {a["image_id"]: a for a in json.loads(pred_json.read_text())["annotations"]}
    categories = {c["id"]: c for c in gt_data["categories"]}
    pairs = [(a, preds[a["image_id"]]) for a in gt_data["annotations"]]
    stat = pq_compute_single_core(0, pairs, str(gt.png_dir), str(pred_dir), categories)
    return {name: stat.pq_average(categories, isthing=isthing)[0]
            for name, isthing in (("All", None), ("Things", True), ("Stuff", False))}


def test_panopticapi_reads_writer_output(gt: PanopticDataset, tmp_path: Path) -> None:
    """Oracle: panopticapi scores a GT copy (via `add`) and a per-pixel copy (via `add_semantic`)
    at PQ = RQ = 1 on all, things and stuff."""
    pred_json = _write_gt_copy(gt, tmp_path / "add")
    sem_dir = tmp_path / "sem"
    with PanopticPredictionWriter(sem_dir / "pred", sem_dir / "pred.json", gt.categories) as w:
        for iid in gt.image_ids:
            id_map = gt.load_id_map(iid)
            category = np.full(id_map.shape, -1, np.int64)
            for s in gt.annotation(iid)["segments_info"]:
                category[id_map == s["id"]] = gt.categories.to_contiguous(s["category_id"])
            w.add_semantic(iid, gt.image_info(iid)["file_name"], category, id_map.astype(np.int64))
    for json_path in (pred_json, sem_dir / "pred.json"):
        results = _panopticapi_pq(gt, json_path, json_path.parent / "pred")
        for group in ("All", "Things", "Stuff"):
            assert results[group]["pq"] == pytest.approx(1.0), (json_path, group)
            assert results[group]["rq"] == pytest.approx(1.0), (json_path, group)
    # and panopticapi's rgb2id decodes our PNG to our ids
    from panopticapi.utils import rgb2id as api_rgb2id

    iid = gt.image_ids[0]
    png = tmp_path / "add" / "pred" / gt.annotation(iid)["file_name"]
    assert np.array_equal(api_rgb2id(np.asarray(Image.open(png), dtype=np.uint32)), gt.load_id_map(iid))


def test_add_semantic_matches_gt_partition(gt: PanopticDataset, tmp_path: Path) -> None:
    sample = gt[0]
    label_of = {s.id: s.label for s in sample.segments}
    category = np.full(sample.id_map.shape, -1, np.int64)
    for sid, lab in label_of.items():
        category[sample.id_map == sid] = lab
    instance = sample.id_map.astype(np.int64)  # one instance per GT segment
    paths = []
    for run in range(2):
        out = tmp_path / f"run{run}"
        with PanopticPredictionWriter(out / "pred", out / "pred.json", gt.categories) as w:
            ann = w.add_semantic(sample.image_id, sample.file_name, category, instance,
                                 extra={int(s.id): {"score": 0.5} for s in sample.segments if s.isthing})
        paths.append(out / "pred" / ann["file_name"])
    assert paths[0].read_bytes() == paths[1].read_bytes()  # deterministic ids

    pred = rgb2id(np.asarray(Image.open(paths[0]).convert("RGB")))
    assert ((pred == 0) == (sample.id_map == 0)).all()
    infos = {s["id"]: s for s in ann["segments_info"]}
    assert set(np.unique(pred[pred > 0]).tolist()) == set(infos)
    # Things: one predicted segment per GT segment. Stuff: one per class (GT may split a class).
    for seg in sample.segments:
        ids = np.unique(pred[sample.id_map == seg.id])
        assert len(ids) == 1
        info = infos[int(ids[0])]
        assert info["category_id"] == seg.category_id
        if seg.isthing:
            assert info["area"] == seg.area and info["bbox"] == list(seg.bbox)
            assert info["score"] == 0.5 and info["isthing"] is True
    n_stuff_classes = len({s.label for s in sample.segments if not s.isthing})
    n_things = sum(1 for s in sample.segments if s.isthing)
    assert len(infos) == n_stuff_classes + n_things


def test_add_semantic_hand_case(tmp_path: Path) -> None:
    cmap = coco_category_map()
    category = np.array([[0, 0, 80, 80], [0, -1, 80, 80], [1, 1, 1, 80]])  # person, banner, bicycle
    instance = np.array([[5, 5, 0, 0], [6, 0, 9, 9], [5, 5, 5, 3]])  # banner ignores instance
    with PanopticPredictionWriter(tmp_path / "p", tmp_path / "p.json", cmap) as w:
        ann = w.add_semantic(42, "000000000042.jpg", category, instance)
    infos = sorted(((s["category_id"], s["area"], tuple(s["bbox"])) for s in ann["segments_info"]))
    assert infos == [(1, 1, (0, 1, 1, 1)), (1, 2, (0, 0, 2, 1)), (2, 3, (0, 2, 3, 1)), (92, 5, (2, 0, 2, 3))]
    banner = next(s for s in ann["segments_info"] if s["category_id"] == 92)
    assert banner["id"] == 255 + 256 * 255 + 65536 * 128  # stuff keeps its category colour
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["annotations"][0]["file_name"] == "000000000042.png"
    assert data["images"] == [{"id": 42, "file_name": "000000000042.jpg", "height": 3, "width": 4}]
    assert len(data["categories"]) == 133


def test_writer_errors(tmp_path: Path) -> None:
    cmap = CategoryMap.from_categories([{"id": 1, "isthing": 1}, {"id": 2, "isthing": 0}])
    ids = np.array([[0, 3], [4, 4]])
    w = PanopticPredictionWriter(tmp_path / "p", tmp_path / "p.json", cmap)
    ok = [{"id": 3, "category_id": 1}, {"id": 4, "category_id": 2}]
    w.add(7, "a.jpg", ids, ok)
    cases = [
        ((7, "b.jpg", ids, ok), "image id 7 added twice"),
        ((8, "c.jpg", ids, ok[:1]), "image id 8: segment id 4 is in the id map but not in segments_info"),
        ((8, "c.jpg", ids, [ok[0], {"id": 4, "category_id": 9}]), "image id 8, segment id 4: unknown category id 9"),
        ((8, "c.jpg", ids, ok + [{"id": 3, "category_id": 1}]), "image id 8: duplicate segment id 3"),
        ((8, "c.jpg", ids, ok + [{"id": 0, "category_id": 1}]), "image id 8: segment id 0 is reserved"),
        ((8, "c.jpg", ids - 1, ok), r"image id 8: segment ids must lie in \[0, 256\^3\)"),
        ((8, "c.jpg", np.zeros((2, 2, 3), np.int64), ok), "image id 8: id map must be"),
        ((8, "a.png", ids, ok), "image id 8: PNG name a.png already used"),
    ]
    for args, message in cases:
        with pytest.raises(DataError, match=message):
            w.add(*args)
    # A listed segment without pixels is dropped (panopticapi rejects JSON ids absent from the PNG).
    ann = w.add(9, "d.jpg", ids, ok + [{"id": 77, "category_id": 1}])
    assert [s["id"] for s in ann["segments_info"]] == [3, 4]
    with pytest.raises(DataError, match="class index outside"):
        w.add_semantic(10, "e.jpg", np.full((2, 2), 2), np.zeros((2, 2)))
    w.close()
    assert [a["image_id"] for a in json.loads((tmp_path / "p.json").read_text())["annotations"]] == [7, 9]
    with pytest.raises(RuntimeError, match="closed"):
        w.add(11, "f.jpg", ids, ok)
