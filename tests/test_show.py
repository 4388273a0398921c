"""`harness show` and harness.viz: overlay pixels against a hand-computed case, sheets, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness import viz
from harness.cli import main
from harness.data.format import id2rgb

CATS = [
    {"id": 3, "name": "thing", "supercategory": "x", "isthing": 1, "color": [200, 0, 0]},
    {"id": 97, "name": "ground", "supercategory": "y", "isthing": 0, "color": [0, 0, 200]},
]
SEGS = [
    {"id": 1000, "category_id": 3, "area": 36, "bbox": [4, 4, 6, 6], "iscrowd": 0},
    {"id": 77777, "category_id": 97, "area": 0, "bbox": [0, 0, 0, 0], "iscrowd": 0},
]


@pytest.fixture()
def tiny(tmp_path: Path) -> dict[str, Path]:
    """A 20x30 grey image: stuff everywhere, a 6x6 thing at (4, 4), a VOID column at x = 29."""
    ids = np.full((20, 30), 77777, np.uint32)
    ids[4:10, 4:10] = 1000
    ids[:, 29] = 0
    image = np.full((20, 30, 3), 100, np.uint8)
    Image.fromarray(image).save(tmp_path / "img.png")
    Image.fromarray(id2rgb(ids)).save(tmp_path / "pan.png")
    ann = {"image_id": 1, "file_name": "pan.png", "segments_info": SEGS}
    (tmp_path / "pan.json").write_text(json.dumps({"images": [], "annotations": [ann], "categories": CATS}))
    return {"image": tmp_path / "img.png", "panoptic": tmp_path / "pan.png", "json": tmp_path / "pan.json",
            "out": tmp_path / "out.png"}


def _show(paths: dict[str, Path], *extra: str) -> int:
    return main(["show", "--image", str(paths["image"]), "--panoptic", str(paths["panoptic"]), "--json",
                 str(paths["json"]), "--out", str(paths["out"]), "-q", *extra])


def test_overlay_pixels_match_hand_computed_blend(tiny: dict[str, Path]) -> None:
    assert _show(tiny, "--alpha", "0.5") == 0
    out = np.array(Image.open(tiny["out"]).convert("RGB")).astype(int)
    assert out.shape[0] == 40 and out.shape[1] > 30  # legend panel: at least 40 px high, to the right
    thing_colour = np.array(viz.segment_colour(1000, CATS[0]))
    assert np.abs(thing_colour - [200, 0, 0]).max() <= 32  # instance jitter stays near the class colour
    np.testing.assert_allclose(out[7, 7], 0.5 * 100 + 0.5 * thing_colour, atol=1)  # thing interior
    np.testing.assert_allclose(out[15, 20], [50, 50, 150], atol=1)  # stuff: exact class colour
    np.testing.assert_array_equal(out[15, 29], [255, 255, 255])  # boundary to VOID is outlined
    np.testing.assert_array_equal(out[4, 6], [255, 255, 255])  # thing outline
    np.testing.assert_array_equal(out[0, 28], [255, 255, 255])  # stuff pixel next to VOID: outline
    np.testing.assert_array_equal(out[0, 0], [50, 50, 150])
    # Legend swatches carry the category colours.
    legend = out[:, 30:].reshape(-1, 3)
    for c in CATS:
        assert (legend == c["color"]).all(1).any(), c["name"]


def test_void_is_left_unpainted_without_outline(tiny: dict[str, Path]) -> None:
    assert _show(tiny, "--no-outline", "--no-legend", "--alpha", "1") == 0
    out = np.array(Image.open(tiny["out"]).convert("RGB")).astype(int)
    assert out.shape[:2] == (20, 30)
    np.testing.assert_array_equal(out[:, 29], np.full((20, 3), 100))
    np.testing.assert_array_equal(out[10, 20], [0, 0, 200])


def test_scale_upsamples_nearest(tiny: dict[str, Path]) -> None:
    assert _show(tiny, "--scale", "3", "--no-legend") == 0
    assert Image.open(tiny["out"]).size == (90, 60)


def test_grid_sheet_of_synthetic_images(synth_root: Path, tmp_path: Path) -> None:
    pan = json.loads((synth_root / "annotations" / "panoptic_val2017.json").read_text())
    imgs = [str(synth_root / "val2017" / i["file_name"]) for i in pan["images"][:5]]
    pngs = [str(synth_root / "annotations" / "panoptic_val2017" / a["file_name"]) for a in pan["annotations"][:5]]
    out = tmp_path / "sheet.png"
    args = ["show", "--grid", "--cols", "3", "--image", *imgs, "--panoptic", *pngs, "--json",
            str(synth_root / "annotations" / "panoptic_val2017.json"), "--out", str(out), "-q"]
    assert main(args + ["--no-legend"]) == 0
    hmax = max(i["height"] for i in pan["images"][:5])
    wmax = max(i["width"] for i in pan["images"][:5])
    assert Image.open(out).size == (3 * (wmax + 4) + 4, 2 * (hmax + 4) + 4)
    assert main(args) == 0
    assert Image.open(out).size[0] > 3 * (wmax + 4) + 4


def test_make_grid_places_tiles_of_different_sizes() -> None:
    a = np.full((10, 20, 3), 10, np.uint8)
    b = np.full((16, 8, 3), 20, np.uint8)
    sheet = viz.make_grid([a, b, a], ncols=2, pad=2)
    assert sheet.shape == (2 * (16 + 2) + 2, 2 * (20 + 2) + 2, 3)
    assert (sheet[2:12, 2:22] == 10).all() and (sheet[2:18, 24:32] == 20).all()
    assert (sheet[20:30, 2:22] == 10).all()


def test_boundaries_marks_both_sides() -> None:
    ids = np.zeros((4, 4), np.int64)
    ids[:, 2:] = 5
    edge = viz.boundaries(ids)
    np.testing.assert_array_equal(edge, np.tile([False, True, True, False], (4, 1)))


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda p: {**p, "json": p["image"]}, "cannot read panoptic JSON"),
        (lambda p: {**p, "image": p["out"]}, "image not found"),
    ],
)
def test_bad_input_is_one_line_exit_2(tiny: dict[str, Path], mutate, needle: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert _show(mutate(tiny)) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_unknown_segment_id_in_png_is_named(tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    ids = np.full((20, 30), 1000, np.uint32)
    ids[0, 0] = 4242
    Image.fromarray(id2rgb(ids)).save(tiny["panoptic"])
    assert _show(tiny) == 2
    err = capsys.readouterr().err
    assert "segment id 4242" in err and "pan.png" in err


def test_png_missing_from_json_names_the_file(tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    other = tiny["panoptic"].with_name("other.png")
    other.write_bytes(tiny["panoptic"].read_bytes())
    assert _show({**tiny, "panoptic": other}) == 2
    assert "other.png" in capsys.readouterr().err


def test_several_images_need_grid_and_matching_counts(tiny: dict[str, Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    base = ["show", "--json", str(tiny["json"]), "--out", str(tiny["out"])]
    img, png = str(tiny["image"]), str(tiny["panoptic"])
    assert main(base + ["--image", img, img, "--panoptic", png, png]) == 2
    assert "--grid" in capsys.readouterr().err
    assert main(base + ["--grid", "--image", img, img, "--panoptic", png]) == 2
    assert "one PNG per image" in capsys.readouterr().err
