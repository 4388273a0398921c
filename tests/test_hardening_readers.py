"""Issue #15 mechanisms, unit level: validating readers, RLE checks, PNG headers, output claims, image decoding,
checkpoint sniffing and model.json checks. (The CLI-level table is tests/test_cli_errors.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from harness.data.images import native_messages, png_header, read_image_pil
from harness.data.panoptic_json import (
    _rle_string_counts,
    check_rle,
    load_instances,
    load_panoptic,
    load_results,
    pair_by_image,
)
from harness.errors import DataError, UserError
from harness.io import visible_files
from harness.outputs import MARKER_NAME, claim_output_dir, read_marker

CATS = [{"id": 1, "name": "a", "isthing": 1}, {"id": 9, "name": "sky", "isthing": 0}]


def _pan(tmp_path: Path, name: str, anns: list, **more: object) -> Path:
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps({"annotations": anns, "categories": CATS, **more}))
    return p


# ----------------------------------------------------------------------------- readers


@pytest.mark.parametrize(("ann", "needle"), [
    ({"image_id": 1, "file_name": "a.png", "segments_info": [{"id": 3}]}, "image id 1, segment id 3 lacks "
                                                                           "'category_id'"),
    ({"image_id": 1, "file_name": "a.png", "segments_info": [{"id": True, "category_id": 1}]}, "'id' is true"),
    ({"image_id": 1, "file_name": "a.png", "segments_info": [{"id": 2**24, "category_id": 1}]}, "outside"),
    ({"image_id": [1], "file_name": "a.png", "segments_info": []}, "image id [1]"),
    ({"image_id": "", "file_name": "a.png", "segments_info": []}, "non-empty string"),
    ({"image_id": 1, "file_name": "../a.png", "segments_info": []}, "plain name"),
    ({"image_id": 1, "file_name": 5, "segments_info": []}, "'file_name' is 5"),
    ({"image_id": 1, "file_name": "a.png", "segments_info": {}}, "'segments_info' is {}"),
    ({"image_id": 1, "file_name": "a.png", "segments_info": [{"id": 3, "category_id": 1, "iscrowd": 2}]}, "iscrowd"),
    ({"image_id": 1, "file_name": "a.png", "segments_info": [{"id": 3, "category_id": 1, "bbox": [0, 0, -1, 2]}]},
     "'bbox'"),
    ({"image_id": 1, "file_name": "a.png", "segments_info": [{"id": 3, "category_id": 1, "area": float("nan")}]},
     "'area'"),
    ({"image_id": 1, "file_name": "a.png", "segments_info": [{"id": 3, "category_id": 2}]}, "unknown category id 2"),
])
def test_panoptic_reader_names_file_and_entry(tmp_path: Path, ann: dict, needle: str) -> None:
    path = _pan(tmp_path, "p", [ann])
    with pytest.raises(DataError) as exc:
        load_panoptic(path, "GT JSON")
    assert needle in str(exc.value) and str(path) in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize(("cats", "needle"), [
    ([1, 2], "categories[0] is 1"), ([{"id": "1", "isthing": 1}], "'id' is '1'"),
    ([{"id": 1}], "lacks 'isthing'"), ([{"id": 1, "isthing": 1}, {"id": 1, "isthing": 0}], "duplicate category id 1"),
    ([{"id": 1, "isthing": 1, "color": [1, 2]}], "'color'"), ({"id": 1}, "expected a list"),
])
def test_category_lists(tmp_path: Path, cats: object, needle: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"annotations": [], "categories": cats}))
    with pytest.raises(DataError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_panoptic(path)


def test_pairing_hints_at_id_types(tmp_path: Path) -> None:
    gt = load_panoptic(_pan(tmp_path, "gt", [{"image_id": 139, "file_name": "a.png", "segments_info": []}]))
    pred = load_panoptic(_pan(tmp_path, "pred", [{"image_id": "139", "file_name": "a.png", "segments_info": []}]))
    with pytest.raises(DataError, match="same type"):
        pair_by_image(gt, pred)
    ok = load_panoptic(_pan(tmp_path, "ok", [{"image_id": 139, "file_name": "b.png", "segments_info": []},
                                             {"image_id": 7, "file_name": "c.png", "segments_info": []}]))
    pairs, missing = pair_by_image(gt, ok)
    assert len(pairs) == 1 and not missing
    empty = load_panoptic(_pan(tmp_path, "none", []))
    with pytest.raises(DataError, match="no prediction for image id 139"):
        pair_by_image(gt, empty)
    assert pair_by_image(gt, empty, allow_missing=True) == ([], [gt.by_image[139]])


def test_rle_counts_equal_pycocotools_and_garbage_is_refused() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(1, 60, 2))
        m = np.asfortranarray((rng.random((h, w)) > rng.random()).astype(np.uint8))
        rle = mask_utils.encode(m)
        counts = _rle_string_counts(rle["counts"].decode())
        flat = m.flatten(order="F")
        runs = np.diff(np.flatnonzero(np.r_[True, flat[1:] != flat[:-1], True]))
        expected = list(runs) if flat[0] == 0 else [0, *runs]
        assert list(counts) == expected
        check_rle({"size": [h, w], "counts": rle["counts"].decode()}, (h, w), "x")
    for bad, needle in [({"size": [4, 4], "counts": "~~~"}, "not a valid"), ({"size": [4, 4], "counts": [3, -1, 14]},
                        "negative"), ({"size": [4, 4], "counts": [3, 3]}, "cover 6"), ({"size": [4], "counts": ""},
                        "'size'"), ({"counts": [16]}, "'size' and 'counts'"), ({"size": [4, 4], "counts": 7}, "counts")]:
        with pytest.raises(DataError, match=needle):
            check_rle(bad, None, "where")
    with pytest.raises(DataError, match="differs from its image"):
        check_rle({"size": [4, 4], "counts": [16]}, (4, 5), "where")


def test_instances_and_results_readers(tmp_path: Path) -> None:
    good = {"images": [{"id": 1, "file_name": "a.jpg", "height": 4, "width": 4}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 4, "bbox": [0, 0, 2, 2],
                             "segmentation": [[0, 0, 2, 0, 2, 2]]}],
            "categories": [{"id": 1, "name": "a"}]}
    path = tmp_path / "inst.json"
    path.write_text(json.dumps(good))
    assert load_instances(path)["annotations"][0]["id"] == 1
    for mutate, needle in [
        (lambda d: d["annotations"].append(dict(d["annotations"][0])), "duplicate annotation id 1"),
        (lambda d: d["annotations"][0].update(segmentation={"size": [4, 5], "counts": [20]}), "differs"),
        (lambda d: d["annotations"][0].update(iscrowd=1), "crowd annotation needs an RLE"),
        (lambda d: d["annotations"][0].update(image_id=2), "not in 'images'"),
        (lambda d: d["images"][0].pop("height"), "lacks 'height'"),
        (lambda d: d.pop("annotations"), "lacks 'annotations'"),
    ]:
        doc = json.loads(json.dumps(good))
        mutate(doc)
        path.write_text(json.dumps(doc))
        with pytest.raises(DataError, match=needle):
            load_instances(path)
    res = tmp_path / "res.json"
    det = {"image_id": 1, "category_id": 1, "score": 0.5, "bbox": [0, 0, 1, 1]}
    res.write_text(json.dumps([det, {**det, "image_id": 99}]))
    assert load_results(res, {1: (4, 4)}, {1}) == [det]  # the unknown image is dropped (one warning)
    res.write_text(json.dumps([{**det, "score": None}]))
    with pytest.raises(DataError, match="'score'"):
        load_results(res, {1: (4, 4)}, {1})


# ----------------------------------------------------------------------------- images


def test_16_bit_images_are_scaled_like_opencv_never_clipped(tmp_path: Path) -> None:
    from harness.data.coco_panoptic import read_image_rgb
    from harness.data.transforms import read_image_bgr

    g16 = (np.arange(24 * 31).reshape(24, 31) * 85 % 65536).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "g.png"), g16)
    expected = np.repeat((g16 >> 8).astype(np.uint8)[..., None], 3, axis=2)
    np.testing.assert_array_equal(read_image_pil(tmp_path / "g.png"), expected)  # PIL alone would clip to 255
    np.testing.assert_array_equal(read_image_rgb(tmp_path / "g.png"), expected)
    np.testing.assert_array_equal(read_image_bgr(tmp_path / "g.png"), expected)
    Image.fromarray(np.full((4, 4), 3.5, np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(DataError, match="floating-point"):
        read_image_pil(tmp_path / "f.tif")


def test_png_header_describes_what_a_png_is(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "g16.png"), np.zeros((5, 7), np.uint16))
    cv2.imwrite(str(tmp_path / "rgb.png"), np.zeros((5, 7, 3), np.uint8))
    head = png_header(tmp_path / "g16.png")
    assert (head.width, head.height, head.description, head.is_panoptic) == (7, 5, "16-bit grayscale", False)
    assert png_header(tmp_path / "rgb.png").is_panoptic
    (tmp_path / "x.png").write_text("not a png")
    with pytest.raises(DataError, match="not a PNG"):
        png_header(tmp_path / "x.png")
    from harness.data.coco_panoptic import read_id_png

    with pytest.raises(DataError, match="16-bit grayscale") as exc:
        read_id_png(tmp_path / "g16.png")
    assert "(5, 7, 2)" not in str(exc.value)


def test_native_messages_are_captured_not_printed(tmp_path: Path) -> None:
    code = ("import os\nfrom harness.data.images import native_messages\n"
            "with native_messages() as m:\n    os.write(2, b'libjpeg says hi\\n')\nprint(m)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert proc.stderr == "" and "libjpeg says hi" in proc.stdout
    with native_messages() as outer, native_messages() as inner:  # nesting: the outer one captures
        os.write(2, b"nested\n")
    assert outer == ["nested"] and inner == []


def test_visible_files_skip_hidden_and_temporaries(tmp_path: Path) -> None:
    for name in ("b.jpg", "a.PNG", ".x.jpg", "._a.jpg", ".a.tmp-1-abc.png", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "d.jpg").mkdir()
    assert [p.name for p in visible_files(tmp_path, (".jpg", ".png"))] == ["a.PNG", "b.jpg"]


# ----------------------------------------------------------------------------- output claims


def test_output_claims(tmp_path: Path) -> None:
    out = tmp_path / "o"
    claim = claim_output_dir(out, "synth", {"seed": 0, "n": 2})
    assert read_marker(out)["status"] == "incomplete"
    (out / "x.jpg").write_bytes(b"")
    claim.complete()
    assert read_marker(out)["status"] == "complete"
    again = claim_output_dir(out, "synth", {"seed": 0, "n": 2})
    assert again.resumed and again.previous is None
    with pytest.raises(UserError, match="--seed 0; this run asks for --seed 1.*--overwrite"):
        claim_output_dir(out, "synth", {"seed": 1, "n": 2}, overwrite_flag="--overwrite")
    with pytest.raises(UserError, match="output of 'harness synth', not of 'harness corrupt'"):
        claim_output_dir(out, "corrupt", {"seed": 0})
    replaced = claim_output_dir(out, "synth", {"seed": 1, "n": 2}, overwrite=True)
    assert replaced.previous == {"seed": 0, "n": 2}
    # Interrupted (incomplete): another setting may replace it without --overwrite.
    assert claim_output_dir(out, "synth", {"seed": 2, "n": 2}).previous == {"seed": 1, "n": 2}
    # Without a status, other settings are always refused.
    c = tmp_path / "c"
    claim_output_dir(c, "corrupt", {"order": "rgb"}, track_status=False)
    with pytest.raises(UserError, match="refusing"):
        claim_output_dir(c, "corrupt", {"order": "bgr"}, track_status=False, overwrite=True)
    # Foreign content; temporaries do not count; garbage markers are refused.
    f = tmp_path / "f"
    f.mkdir()
    (f / ".x.tmp-1-abc.png").write_bytes(b"")
    claim_output_dir(f, "synth", {})
    g = tmp_path / "g"
    g.mkdir()
    (g / "photo.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="did not write.*photo.jpg"):
        claim_output_dir(g, "synth", {})
    (g / MARKER_NAME).write_text(json.dumps({"tool": "other"}))
    with pytest.raises(DataError, match="not a psf-harness output marker"):
        claim_output_dir(g, "synth", {})
    # A legacy output is adopted from what the callback recognises.
    (g / MARKER_NAME).unlink()
    adopted = claim_output_dir(g, "synth", {"seed": 3}, legacy=lambda root: {"seed": 3})
    assert adopted.resumed and read_marker(g)["settings"] == {"seed": 3}


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_messages(tmp_path: Path) -> None:
    import torch

    from models.checkpoint import CheckpointError, load_model, save_checkpoint, sniff_checkpoint
    from models.configs import get_config

    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(999))
    torch.save({"w": torch.ones(1)}, tmp_path / "plain.pt")
    (tmp_path / "empty").mkdir()
    assert sniff_checkpoint(tmp_path / "plain.pt") == "zip"
    for path, needle in [("random.pt", "not a PyTorch checkpoint"), ("plain.pt", "not one of our training"),
                         ("empty", "holds neither model.safetensors nor checkpoint_last.pt"),
                         ("missing", "weights not found")]:
        with pytest.raises(CheckpointError, match=needle):
            load_model(tmp_path / path)
    cfg = get_config("panoptic_segformer_tiny", num_things=3, num_stuff=2)
    from models.zoo import build_model

    save_checkpoint(build_model(cfg).state_dict(), cfg, tmp_path / "w")
    net, got = load_model(tmp_path / "w")  # a folder, as README shows
    assert got == cfg
    doc = json.loads((tmp_path / "w" / "model.json").read_text())
    doc["config"]["d_model"] = "256"
    (tmp_path / "w" / "model.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="config key 'd_model' is \"256\", expected int") as exc:
        load_model(tmp_path / "w")
    assert "not all arguments converted" not in str(exc.value)
