"""COCO-panoptic reader, validation, category mapping and training targets (harness/data)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from harness.data.coco_panoptic import (
    PanopticDataset,
    PanopticSample,
    Segment,
    coco_categories,
    coco_category_map,
    load_panoptic_json,
    read_id_png,
    read_image_rgb,
    segment_stats,
)
from harness.data.format import id2rgb
from harness.errors import DataError, UserError

SPLIT = "val2017"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dataset_root(synth_root: Path) -> Path:
    """The shared synthetic data set (read-only; copy it before breaking files)."""
    return synth_root


@pytest.fixture()
def broken(dataset_root: Path, tmp_path: Path) -> Path:
    """A private copy of the val split, to be broken by the test."""
    root = tmp_path / "ds"
    shutil.copytree(dataset_root / SPLIT, root / SPLIT)
    (root / "annotations").mkdir()
    shutil.copytree(dataset_root / "annotations" / f"panoptic_{SPLIT}", root / "annotations" / f"panoptic_{SPLIT}")
    shutil.copy(dataset_root / "annotations" / f"panoptic_{SPLIT}.json", root / "annotations")
    return root


def _json_path(root: Path) -> Path:
    return root / "annotations" / f"panoptic_{SPLIT}.json"


def _edit_json(root: Path) -> dict[str, Any]:
    return json.loads(_json_path(root).read_text())


def _save_json(root: Path, data: dict[str, Any]) -> None:
    _json_path(root).write_text(json.dumps(data))


# ----------------------------------------------------------------------------- categories


def test_coco_categories_contiguous_mapping() -> None:
    cats = coco_categories()
    assert len(cats) == 133
    assert len({c["id"] for c in cats}) == 133
    cmap = coco_category_map()
    assert (cmap.num_things, cmap.num_stuff, cmap.num_classes) == (80, 53, 133)
    thing_ids = sorted(c["id"] for c in cats if c["isthing"])
    stuff_ids = sorted(c["id"] for c in cats if not c["isthing"])
    assert [cmap.to_contiguous(i) for i in thing_ids] == list(range(80))
    assert [cmap.to_contiguous(i) for i in stuff_ids] == list(range(80, 133))
    for c in cats:
        assert cmap.to_category_id(cmap.to_contiguous(c["id"])) == c["id"]
    # Anchors from panopticapi's panoptic_coco_categories.json.
    by_id = {c["id"]: c for c in cats}
    assert by_id[1]["name"] == "person" and cmap.to_contiguous(1) == 0
    assert by_id[90]["name"] == "toothbrush" and cmap.to_contiguous(90) == 79
    assert by_id[92]["name"] == "banner" and cmap.to_contiguous(92) == 80
    assert by_id[200]["name"] == "rug-merged" and cmap.to_contiguous(200) == 132
    assert max(thing_ids) == 90 and min(stuff_ids) == 92
    assert all(len(c["color"]) == 3 and c["supercategory"] for c in cats)
    with pytest.raises(KeyError, match="12"):
        cmap.to_contiguous(12)  # COCO id 12 ("street sign") is not a panoptic category


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    ("mode", "ext", "tol"),
    [("L", "png", 0), ("L", "jpg", 2), ("RGBA", "png", 0), ("P", "png", 0), ("CMYK", "jpg", 2), ("RGB", "jpg", 2)],
)
def test_read_image_converts_to_rgb(tmp_path: Path, mode: str, ext: str, tol: int) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (23, 31, 3), dtype=np.uint8)
    path = tmp_path / f"im.{ext}"
    Image.fromarray(rgb).convert(mode).save(path)
    out = read_image_rgb(path)
    assert out.shape == (23, 31, 3) and out.dtype == np.uint8
    with Image.open(path) as im:
        ref = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert np.abs(out.astype(np.int16) - ref).max() <= tol
    if mode == "L":
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_read_image_ignores_exif_orientation(tmp_path: Path) -> None:
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW" on display; COCO loaders ignore it
    path = tmp_path / "rot.jpg"
    Image.fromarray(rgb).save(path, exif=exif)
    out = read_image_rgb(path)
    assert out.shape == (20, 40, 3)
    assert out[:, :15].mean() > 240 and out[:, 25:].mean() < 15


def test_read_image_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.jpg"):
        read_image_rgb(tmp_path / "nope.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.jpg"):
        read_image_rgb(bad)


def test_read_id_png_and_segment_stats(tmp_path: Path) -> None:
    ids = np.zeros((6, 7), np.uint32)
    ids[1:3, 2:6] = 300 + 256**2 * 5  # uses all three channels
    ids[4, 0] = 1
    path = tmp_path / "p.png"
    Image.fromarray(id2rgb(ids)).save(path)
    assert np.array_equal(read_id_png(path), ids)
    stats = segment_stats(ids)
    assert stats == {300 + 256**2 * 5: (8, (2.0, 1.0, 4.0, 2.0)), 1: (1, (0.0, 4.0, 1.0, 1.0))}
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(tmp_path / "gray.png")
    with pytest.raises(DataError, match="gray.png"):
        read_id_png(tmp_path / "gray.png")


# ----------------------------------------------------------------------------- reader


def test_reader_on_synthetic(dataset_root: Path) -> None:
    ds = PanopticDataset(dataset_root, SPLIT)
    raw = json.loads(_json_path(dataset_root).read_text())
    assert ds.image_ids == [a["image_id"] for a in raw["annotations"]]
    assert len(ds) == len(raw["images"]) > 0
    assert ds.validate_all() == len(ds)
    sample = ds[0]
    assert isinstance(sample, PanopticSample)
    assert sample.image.dtype == np.uint8 and sample.image.shape == sample.id_map.shape + (3,)
    assert sample.id_map.dtype == np.uint32
    ann = raw["annotations"][0]
    assert [s.id for s in sample.segments] == [s["id"] for s in ann["segments_info"]]
    stats = segment_stats(sample.id_map)
    for seg, info in zip(sample.segments, ann["segments_info"]):
        assert seg.category_id == info["category_id"]
        assert seg.label == ds.categories.to_contiguous(info["category_id"])
        assert seg.isthing == bool(next(c for c in raw["categories"] if c["id"] == seg.category_id)["isthing"])
        assert seg.iscrowd == bool(info["iscrowd"])
        assert seg.area == info["area"] == int(seg.mask.sum())
        assert seg.bbox == tuple(float(v) for v in info["bbox"]) == stats[seg.id][1]
        assert np.array_equal(seg.mask, seg.mask_in(sample.id_map))


def test_reader_with_other_category_list(tmp_path: Path) -> None:
    """An ADE20K-panoptic-like set: 100 thing + 50 stuff classes, ids from 0, string image ids,
    the layout Mask2Former's `prepare_ade20k_pan_seg.py` writes."""
    rng = np.random.default_rng(1)
    cats = [{"id": i, "name": f"c{i}", "isthing": int(i % 3 != 0), "color": [i, 255 - i, (7 * i) % 256]}
            for i in range(150)]
    assert sum(c["isthing"] for c in cats) == 100
    ade = tmp_path / "ADEChallengeData2016"
    images, annotations = [], []
    for k in range(2):
        stem = f"ADE_val_0000000{k + 1}"
        h, w = 24 + k, 32
        ids = np.zeros((h, w), np.uint32)
        ids[:, : w // 2] = 1000  # stuff (id 0 "wall"-like: isthing 0)
        ids[5:15, 20:30] = 2000 + k  # thing (category 1)
        ids[0, 0] = 0
        infos = [
            {"id": 1000, "category_id": 0, "iscrowd": 0, "area": int((ids == 1000).sum()), "bbox": [0, 0, 16, h]},
            {"id": 2000 + k, "category_id": 1, "iscrowd": 0, "area": 100, "bbox": [20, 5, 10, 10]},
        ]
        (ade / "images" / "validation").mkdir(parents=True, exist_ok=True)
        (ade / "ade20k_panoptic_val").mkdir(exist_ok=True)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(image).save(ade / "images" / "validation" / f"{stem}.jpg")
        Image.fromarray(id2rgb(ids)).save(ade / "ade20k_panoptic_val" / f"{stem}.png")
        images.append({"id": stem, "file_name": f"{stem}.jpg", "height": h, "width": w})
        annotations.append({"image_id": stem, "file_name": f"{stem}.png", "segments_info": infos})
    (ade / "ade20k_panoptic_val.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": cats})
    )
    ds = PanopticDataset(None, image_dir=ade / "images" / "validation", json_path=ade / "ade20k_panoptic_val.json")
    assert ds.png_dir == ade / "ade20k_panoptic_val"
    assert (ds.categories.num_things, ds.categories.num_stuff) == (100, 50)
    assert ds.categories.to_contiguous(1) == 0 and ds.categories.to_contiguous(0) == 100
    assert ds.categories.to_contiguous(149) == 99  # 149 % 3 != 0: the last thing
    assert ds.image_ids == ["ADE_val_00000001", "ADE_val_00000002"]
    assert ds.validate_all() == 2
    s = ds[1]
    assert s.image_id == "ADE_val_00000002" and s.image.shape == (25, 32, 3)
    assert [(g.label, g.isthing) for g in s.segments] == [(100, False), (0, True)]
    # The category list can also come from elsewhere (e.g. the COCO list): then id 0 is unknown.
    with pytest.raises(DataError, match="unknown category id 0"):
        PanopticDataset(None, image_dir=ade / "images" / "validation", json_path=ade / "ade20k_panoptic_val.json",
                        categories=coco_categories())
    cat_file = tmp_path / "cats.json"
    cat_file.write_text(json.dumps([dict(c, isthing=1) for c in cats]))
    ds2 = PanopticDataset(None, image_dir=ade / "images" / "validation", json_path=ade / "ade20k_panoptic_val.json",
                          categories=cat_file)
    assert (ds2.categories.num_things, ds2.categories.num_stuff) == (150, 0)


def test_targets_on_synthetic_partition_the_image(dataset_root: Path) -> None:
    import torch

    from harness.data.targets import build_targets

    ds = PanopticDataset(dataset_root, SPLIT)
    for i in range(min(len(ds), 3)):
        sample = ds[i]
        t = build_targets(sample, ds.categories)
        h, w = sample.id_map.shape
        nt, ns = len(t["thing_labels"]), len(t["stuff_labels"])
        assert t["thing_masks"].shape == (nt, h, w) and t["thing_masks"].dtype == torch.bool
        assert t["thing_boxes"].shape == (nt, 4) and t["thing_boxes"].dtype == torch.float32
        assert t["stuff_masks"].shape == (ns, h, w) and t["ignore_mask"].shape == (h, w)
        assert t["thing_labels"].dtype == torch.long and t["stuff_labels"].dtype == torch.long
        assert ((t["thing_labels"] >= 0) & (t["thing_labels"] < ds.categories.num_things)).all()
        assert (t["stuff_labels"] >= ds.categories.num_things).all()
        assert ((t["thing_boxes"] >= 0) & (t["thing_boxes"] <= 1)).all()
        # Things, stuff and ignore tile the image exactly once (segments are disjoint).
        cover = t["thing_masks"].sum(0) + t["stuff_masks"].sum(0) + t["ignore_mask"].long()
        assert (cover == 1).all()
        crowd = [s for s in sample.segments if s.iscrowd]
        assert nt == sum(1 for s in sample.segments if s.isthing and not s.iscrowd)
        for s in crowd:
            assert t["ignore_mask"][torch.from_numpy(s.mask)].all()


def test_targets_hand_computed() -> None:
    from harness.data.targets import build_targets

    cats = [{"id": 7, "isthing": 1}, {"id": 3, "isthing": 1}, {"id": 50, "isthing": 0}, {"id": 40, "isthing": 0}]
    cmap = __import__("harness.data.format", fromlist=["CategoryMap"]).CategoryMap.from_categories(cats)
    # contiguous: 3 -> 0, 7 -> 1, 40 -> 2, 50 -> 3
    ids = np.zeros((4, 8), np.uint32)
    ids[0:2, 0:2] = 11  # thing cat 7
    ids[2:4, 4:8] = 12  # crowd thing cat 3
    ids[0, 4:8] = 21  # stuff cat 50, first piece
    ids[3, 0:2] = 22  # stuff cat 50, second piece
    ids[1, 6:8] = 23  # stuff cat 40
    segs = [
        Segment(11, 7, 1, False, 4, (0.0, 0.0, 2.0, 2.0), True, ids),
        Segment(12, 3, 0, True, 8, (4.0, 2.0, 4.0, 2.0), True, ids),
        Segment(21, 50, 3, False, 4, (4.0, 0.0, 4.0, 1.0), False, ids),
        Segment(22, 50, 3, False, 2, (0.0, 3.0, 2.0, 1.0), False, ids),
        Segment(23, 40, 2, False, 2, (6.0, 1.0, 2.0, 1.0), False, ids),
    ]
    sample = PanopticSample(1, "x.jpg", np.zeros((4, 8, 3), np.uint8), ids, segs)
    t = build_targets(sample, cmap)
    assert t["thing_labels"].tolist() == [1]
    assert t["thing_boxes"].tolist() == [[1 / 8, 1 / 4, 2 / 8, 2 / 4]]
    assert t["thing_masks"][0].numpy().tolist() == (ids == 11).tolist()
    assert t["stuff_labels"].tolist() == [2, 3]
    assert t["stuff_masks"][0].numpy().tolist() == (ids == 23).tolist()
    assert t["stuff_masks"][1].numpy().tolist() == ((ids == 21) | (ids == 22)).tolist()
    assert t["ignore_mask"].numpy().tolist() == ((ids == 0) | (ids == 12)).tolist()


# ----------------------------------------------------------------------------- validation


def test_valid_copy_loads(broken: Path) -> None:
    assert PanopticDataset(broken, SPLIT).validate_all() > 0


def test_missing_image(broken: Path) -> None:
    data = _edit_json(broken)
    img = data["images"][1]
    (broken / SPLIT / img["file_name"]).unlink()
    with pytest.raises(DataError, match=rf"{img['file_name']}.*image id {img['id']}"):
        PanopticDataset(broken, SPLIT)
    # Without validation the dataset loads and the item fails when read, naming the file.
    ds = PanopticDataset(broken, SPLIT, validate=False)
    with pytest.raises(DataError, match=img["file_name"]):
        ds[1]


def test_missing_png(broken: Path) -> None:
    ann = _edit_json(broken)["annotations"][0]
    (broken / "annotations" / f"panoptic_{SPLIT}" / ann["file_name"]).unlink()
    with pytest.raises(DataError, match=rf"{ann['file_name']}.*image id {ann['image_id']}"):
        PanopticDataset(broken, SPLIT)


def test_png_size_differs_from_image(broken: Path) -> None:
    ann = _edit_json(broken)["annotations"][0]
    png = broken / "annotations" / f"panoptic_{SPLIT}" / ann["file_name"]
    rgb = np.asarray(Image.open(png).convert("RGB"))
    Image.fromarray(np.ascontiguousarray(rgb[:, :-1])).save(png)
    ds = PanopticDataset(broken, SPLIT)  # JSON-level checks pass
    with pytest.raises(DataError, match=rf"{ann['file_name']}: PNG size .* differs.*image id {ann['image_id']}"):
        ds[0]
    with pytest.raises(DataError, match="differs"):
        ds.validate_all()


def test_json_segment_absent_from_png(broken: Path) -> None:
    data = _edit_json(broken)
    ann = data["annotations"][0]
    ghost = {"id": 16777215, "category_id": ann["segments_info"][0]["category_id"], "iscrowd": 0,
             "area": 1, "bbox": [0, 0, 1, 1]}
    ann["segments_info"].append(ghost)
    _save_json(broken, data)
    ds = PanopticDataset(broken, SPLIT)
    with pytest.raises(DataError, match=rf"segment id 16777215 \(image id {ann['image_id']}\) is in .* not in the PNG"):
        ds[0]
    lenient = PanopticDataset(broken, SPLIT, allow_missing_segments=True)
    assert [s.id for s in lenient[0].segments] == [s["id"] for s in ann["segments_info"][:-1]]


def test_png_segment_absent_from_json(broken: Path) -> None:
    data = _edit_json(broken)
    ann = data["annotations"][0]
    dropped = ann["segments_info"].pop(0)
    _save_json(broken, data)
    ds = PanopticDataset(broken, SPLIT)
    with pytest.raises(DataError, match=rf"segment id {dropped['id']} \(image id {ann['image_id']}\) is in the PNG"):
        ds[0]


def test_unknown_category_id(broken: Path) -> None:
    data = _edit_json(broken)
    ann = data["annotations"][-1]
    seg = ann["segments_info"][-1]
    seg["category_id"] = 4242
    _save_json(broken, data)
    message = rf"image id {ann['image_id']}, segment id {seg['id']}: unknown category id 4242"
    with pytest.raises(DataError, match=message):
        PanopticDataset(broken, SPLIT)


def test_duplicate_image_ids(broken: Path) -> None:
    data = _edit_json(broken)
    dup = dict(data["images"][0])
    data["images"].append(dup)
    _save_json(broken, data)
    with pytest.raises(DataError, match=rf"panoptic_{SPLIT}.json: duplicate image id {dup['id']} in 'images'"):
        PanopticDataset(broken, SPLIT)
    data["images"].pop()
    data["annotations"].append(dict(data["annotations"][0]))
    _save_json(broken, data)
    with pytest.raises(DataError, match=rf"duplicate image id {dup['id']} in 'annotations'"):
        PanopticDataset(broken, SPLIT)


def test_other_json_errors(broken: Path, tmp_path: Path) -> None:
    path = _json_path(broken)
    path.write_text("{broken")
    with pytest.raises(DataError, match="not valid JSON"):
        load_panoptic_json(path)
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DataError, match="'categories'"):
        load_panoptic_json(path)
    with pytest.raises(DataError, match="file not found"):
        load_panoptic_json(tmp_path / "missing.json")
    base = {"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "isthing": 1}]}
    cases = [
        ([{"image_id": 1, "file_name": "a.png", "segments_info": [{"id": 0, "category_id": 1}]}], "segment id 0"),
        ([{"image_id": 1, "file_name": "a.png",
           "segments_info": [{"id": 5, "category_id": 1}, {"id": 5, "category_id": 1}]}], "duplicate segment id 5"),
        ([{"image_id": 2, "file_name": "a.png", "segments_info": []}], "image id 2 which is not in 'images'"),
        ([], "image id 1 has no annotation"),
    ]
    for annotations, message in cases:
        path.write_text(json.dumps(dict(base, annotations=annotations)))
        with pytest.raises(DataError, match=message):
            load_panoptic_json(path)
    assert issubclass(DataError, UserError)  # the CLI prints these as one line, exit 2


def test_missing_root_and_folders(broken: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data set root is not a folder"):
        PanopticDataset(tmp_path / "nowhere", SPLIT)
    with pytest.raises(DataError, match="panoptic_train2017.json"):
        PanopticDataset(broken, "train2017")  # only val was copied
    shutil.rmtree(broken / "annotations" / f"panoptic_{SPLIT}")
    with pytest.raises(DataError, match=f"panoptic PNG folder not found: .*panoptic_{SPLIT}"):
        PanopticDataset(broken, SPLIT)
