"""The synthetic dataset: COCO panoptic layout, determinism, independent-oracle checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.cli import main
from harness.data.synthetic import SPLITS, STUFF_CLASSES, THING_CLASSES, generate_dataset, render_image

PANOPTIC_IMAGE_KEYS = ["id", "file_name", "height", "width"]
SEGMENT_KEYS = ["id", "category_id", "area", "bbox", "iscrowd"]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _id_map_pil(path: Path) -> np.ndarray:
    """Decode a panoptic PNG with PIL + panopticapi's rgb2id (independent of our cv2 reader)."""
    from panopticapi.utils import rgb2id

    return rgb2id(np.array(Image.open(path).convert("RGB"), dtype=np.uint32)).astype(np.int64)


@pytest.fixture(scope="module")
def stats_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A larger, still cheap, val split for statistics about content."""
    return generate_dataset(tmp_path_factory.mktemp("stats"), 0, 48, seed=7, size=128, preview=False)


def test_files_byte_identical_for_a_seed_and_independent_of_workers(tmp_path: Path) -> None:
    a = generate_dataset(tmp_path / "a", 3, 5, seed=11, size=96, workers=1)
    b = generate_dataset(tmp_path / "b", 3, 5, seed=11, size=96, workers=2)
    fa, fb = _files(a), _files(b)
    assert "preview_val.png" in fa
    assert len(fa) == 2 * 8 + 4 + 1  # jpg + png per image, 2 panoptic + 2 instances JSON, preview
    assert fa.keys() == fb.keys()
    for name in fa:
        assert fa[name] == fb[name], name
    c = _files(generate_dataset(tmp_path / "c", 3, 5, seed=12, size=96, preview=False))
    assert c["annotations/panoptic_val2017.json"] != fa["annotations/panoptic_val2017.json"]


def test_any_image_regenerates_alone(synth_root: Path) -> None:
    from tests.conftest import SYNTH_SEED, SYNTH_SIZE

    pan = json.loads((synth_root / "annotations" / "panoptic_val2017.json").read_text())
    ann = pan["annotations"][4]
    sample = render_image(SYNTH_SEED, "val2017", 4, SYNTH_SIZE)
    assert sample.segments == ann["segments_info"]
    np.testing.assert_array_equal(_id_map_pil(synth_root / "annotations" / "panoptic_val2017" / ann["file_name"]),
                                  sample.id_map)


def test_coco_panoptic_layout_and_json_shape(synth_root: Path) -> None:
    for split in SPLITS:
        pan = json.loads((synth_root / "annotations" / f"panoptic_{split}.json").read_text())
        assert list(pan) == ["info", "licenses", "images", "annotations", "categories"]
        assert len(pan["images"]) == len(pan["annotations"]) == 6
        for img, ann in zip(pan["images"], pan["annotations"]):
            assert list(img) == PANOPTIC_IMAGE_KEYS
            assert list(ann) == ["image_id", "file_name", "segments_info"]
            assert ann["image_id"] == img["id"] and Path(ann["file_name"]).stem == Path(img["file_name"]).stem
            with Image.open(synth_root / split / img["file_name"]) as im:
                assert im.format == "JPEG" and im.size == (img["width"], img["height"])
            assert max(img["height"], img["width"]) == 128
            for s in ann["segments_info"]:
                assert list(s) == SEGMENT_KEYS
        cats = pan["categories"]
        assert [list(c) for c in cats] == [["id", "name", "supercategory", "isthing", "color"]] * len(cats)
        things = [c["id"] for c in cats if c["isthing"]]
        stuff = [c["id"] for c in cats if not c["isthing"]]
        assert len(things) >= 8 and len(stuff) >= 5
        assert things != list(range(1, len(things) + 1)), "thing ids should have gaps"
        assert min(stuff) > 90
        assert len({c["name"] for c in cats}) == len(cats)
    ids = [i["id"] for s in SPLITS
           for i in json.loads((synth_root / "annotations" / f"panoptic_{s}.json").read_text())["images"]]
    assert len(set(ids)) == len(ids)


def test_png_matches_segments_info(synth_root: Path) -> None:
    """Independent recount: ids, areas and xywh boxes from the PNG decoded by PIL."""
    for split in SPLITS:
        pan = json.loads((synth_root / "annotations" / f"panoptic_{split}.json").read_text())
        cat_ids = {c["id"] for c in pan["categories"]}
        for ann in pan["annotations"]:
            ids = _id_map_pil(synth_root / "annotations" / f"panoptic_{split}" / ann["file_name"])
            present = set(np.unique(ids).tolist()) - {0}
            assert present == {s["id"] for s in ann["segments_info"]}, ann["file_name"]
            for s in ann["segments_info"]:
                assert s["category_id"] in cat_ids
                ys, xs = np.nonzero(ids == s["id"])
                assert s["area"] == len(ys)
                assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            # At most one segment per stuff class per image (COCO panoptic rule).
            stuff = [s["category_id"] for s in ann["segments_info"] if s["category_id"] > 90]
            assert len(stuff) == len(set(stuff))


def test_gt_against_itself_scores_pq_100_with_panopticapi(synth_root: Path, tmp_path: Path) -> None:
    from panopticapi.evaluation import pq_compute

    ann_dir = synth_root / "annotations"
    res = pq_compute(str(ann_dir / "panoptic_val2017.json"), str(ann_dir / "panoptic_val2017.json"),
                     str(ann_dir / "panoptic_val2017"), str(ann_dir / "panoptic_val2017"))
    assert res["All"]["pq"] == pytest.approx(1.0)
    assert res["All"]["n"] >= 6


def test_instances_json_loads_with_pycocotools(synth_root: Path) -> None:
    from pycocotools.coco import COCO

    thing_ids = {c.id for c in THING_CLASSES}
    pan = json.loads((synth_root / "annotations" / "panoptic_val2017.json").read_text())
    coco = COCO(str(synth_root / "annotations" / "instances_val2017.json"))
    assert set(coco.getCatIds()) == thing_ids
    assert sorted(coco.getImgIds()) == sorted(i["id"] for i in pan["images"])
    n_things = 0
    for ann in pan["annotations"]:
        ids = _id_map_pil(synth_root / "annotations" / "panoptic_val2017" / ann["file_name"])
        things = [s for s in ann["segments_info"] if s["category_id"] in thing_ids]
        inst = coco.loadAnns(coco.getAnnIds(imgIds=[ann["image_id"]], iscrowd=None))
        assert len(inst) == len(things)
        for s, a in zip(things, inst):
            assert (a["category_id"], a["iscrowd"], a["area"]) == (s["category_id"], s["iscrowd"], s["area"])
            np.testing.assert_array_equal(coco.annToMask(a).astype(bool), ids == s["id"])
        n_things += len(things)
    assert n_things > 0


def test_content_has_the_required_difficulty(stats_root: Path) -> None:
    pan = json.loads((stats_root / "annotations" / "panoptic_val2017.json").read_text())
    cats = {c["id"]: c for c in pan["categories"]}
    seen: set[int] = set()
    crowd = void_images = touching = small = 0
    sizes = {(i["height"], i["width"]) for i in pan["images"]}
    for ann in pan["annotations"]:
        ids = _id_map_pil(stats_root / "annotations" / "panoptic_val2017" / ann["file_name"])
        segs = {s["id"]: s for s in ann["segments_info"]}
        seen |= {s["category_id"] for s in segs.values()}
        crowd += sum(s["iscrowd"] for s in segs.values())
        small += sum(1 for s in segs.values() if cats[s["category_id"]]["isthing"] and s["area"] < 32)
        void_images += int((ids == 0).any())
        # Touching instances: 4-neighbours with different ids but the same thing category.
        lut = {k: v["category_id"] for k, v in segs.items()}
        for a, b in ((ids[:, 1:], ids[:, :-1]), (ids[1:, :], ids[:-1, :])):
            pairs = {(int(x), int(y)) for x, y in zip(a[a != b], b[a != b]) if x and y}
            touching += sum(1 for x, y in pairs if lut[x] == lut[y] and cats[lut[x]]["isthing"])
    assert seen == set(cats), f"classes never drawn: {set(cats) - seen}"
    assert crowd >= 3
    assert void_images >= 10
    assert touching >= 3
    assert small >= 10
    assert len(sizes) >= 3


def test_thing_and_stuff_share_a_texture() -> None:
    from harness.data.synthetic import _THING_FILLS

    assert any("grass" in fills for fills in _THING_FILLS.values())
    assert "grass" in {c.name for c in STUFF_CLASSES}


def test_synth_cli_writes_dataset_and_preview(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    assert main(["synth", "--out", str(out), "--train", "2", "--val", "3", "--seed", "5", "--size", "64", "-q"]) == 0
    assert len(list((out / "train2017").glob("*.jpg"))) == 2
    assert len(list((out / "annotations" / "panoptic_val2017").glob("*.png"))) == 3
    with Image.open(out / "preview_val.png") as im:
        assert im.format == "PNG" and im.width > 3 * 64


@pytest.mark.parametrize("bad", [["--size", "8"], ["--train", "-1"], ["--workers", "0"]])
def test_synth_cli_rejects_bad_arguments(tmp_path: Path, bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--out", str(tmp_path / "x"), *bad]) == 2
    err = capsys.readouterr().err
    assert bad[0] in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_synth_and_show_help_and_light_import() -> None:
    for name in ("synth", "show"):
        proc = subprocess.run([sys.executable, "-m", "harness", name, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stdout.startswith(f"usage: harness {name}")
    code = ("import sys, harness.commands.synth, harness.commands.show; "
            "bad = [m for m in ('torch', 'cv2', 'numpy') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rerun_with_fewer_images_leaves_no_stale_files(tmp_path: Path) -> None:
    generate_dataset(tmp_path, 1, 4, seed=3, size=64, preview=False)
    (tmp_path / "val2017" / "notes.jpg").write_bytes(b"user file")
    generate_dataset(tmp_path, 1, 2, seed=3, size=64, preview=False)
    pan = json.loads((tmp_path / "annotations" / "panoptic_val2017.json").read_text())
    jpgs = sorted(p.name for p in (tmp_path / "val2017").glob("*.jpg"))
    assert jpgs == sorted([i["file_name"] for i in pan["images"]] + ["notes.jpg"])
    assert len(list((tmp_path / "annotations" / "panoptic_val2017").glob("*.png"))) == 2
