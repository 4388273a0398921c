"""`harness predict` and the official (mmcv-style) test transform."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from harness.cli import main
from harness.data.format import CategoryMap, rgb2id
from harness.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    apply_test_transform,
    collate,
    load_test_image,
    rescale_size,
)
from models.checkpoint import save_checkpoint
from models.configs import panoptic_segformer_tiny
from models.convert_official import to_official_names
from models.panoptic_segformer import PanopticSegFormer


@pytest.mark.parametrize("w, h, want", [
    (640, 480, (1067, 800)),   # short side -> 800; 640 * 5/3 = 1066.67 rounds half up
    (427, 640, (800, 1199)),   # portrait: s = 800 / 427, 640 * s = 1199.06
    (1000, 200, (1333, 267)),  # long side caps at 1333: 200 * 1.333 = 266.6 -> 267
    (800, 800, (800, 800)),
])
def test_rescale_size_as_mmcv(w: int, h: int, want: tuple[int, int]) -> None:
    assert rescale_size(w, h, (1333, 800))[0] == want


def test_transform_matches_mmcv_arithmetic() -> None:
    """uint8 bilinear resize by OpenCV, then (RGB - mean) / std in float32; no padding."""
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    out = apply_test_transform(bgr)
    assert out.img_shape == (800, 1067) and out.ori_shape == (48, 64)
    assert out.scale_factor == pytest.approx((1067 / 64, 800 / 48))
    resized = cv2.resize(bgr, (1067, 800), interpolation=cv2.INTER_LINEAR)  # what mmcv.imresize calls
    want = (resized[..., ::-1].astype(np.float64) - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert out.image.dtype == np.float32 and out.image.shape == (3, 800, 1067)
    np.testing.assert_allclose(out.image, want.transpose(2, 0, 1), atol=1e-5)
    # Resizing the float image instead (what a torch pipeline does) is measurably different.
    float_resized = cv2.resize(bgr.astype(np.float32), (1067, 800), interpolation=cv2.INTER_LINEAR)
    assert np.abs(float_resized - resized).max() > 0.4


def test_collate_pads_bottom_right() -> None:
    rng = np.random.default_rng(1)
    a = apply_test_transform(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), (64, 64))
    b = apply_test_transform(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8), (64, 64))
    images, mask = collate([a, b])
    assert images.shape == (2, 3, 64, 64) and a.img_shape == (64, 64) and b.img_shape == (43, 64)
    assert not mask[0].any() and mask[1, 43:].all() and not mask[1, :43].any()
    assert np.all(images[1, :, 43:] == 0)


def test_unreadable_image_is_a_user_error(tmp_path: Path) -> None:
    from harness.errors import UserError

    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    with pytest.raises(UserError, match="bad.jpg"):
        load_test_image(bad)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny COCO-sized model whose classes fire (biases raised) so segments get painted; our format + .pth."""
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    # The default tiny config: the .pth route below builds its config from the model name alone.
    cfg = panoptic_segformer_tiny(num_things=80, num_stuff=53)
    model = PanopticSegFormer(cfg)
    with torch.no_grad():
        model.bbox_head.cls_branches[-1].bias.fill_(4.0)
        model.bbox_head.cls_stuff_branches[-1].bias.fill_(4.0)
    ours = root / "tiny"
    save_checkpoint(model.state_dict(), cfg, ours)
    pth = root / "tiny.pth"
    torch.save({"state_dict": to_official_names(model.state_dict(), cfg.backbone, old_names=True), "meta": {}}, pth)
    rng = np.random.default_rng(2)
    img = root / "street.png"
    yy, xx = np.mgrid[0:90, 0:120]
    picture = np.stack([xx * 2, yy * 2, (xx + yy)], -1).astype(np.uint8) + rng.integers(0, 20, (90, 120, 3)).astype(
        np.uint8)
    cv2.imwrite(str(img), picture)
    return ours, pth, img


def test_predict_writes_png_json_overlay_and_raw(tiny_weights: tuple[Path, Path, Path], tmp_path: Path) -> None:
    ours, _, img = tiny_weights
    out = tmp_path / "out"
    assert main(["predict", "-q", "--weights", str(ours), "--image", str(img), "--out", str(out), "--dump-raw"]) == 0
    info = json.loads((out / "street.json").read_text())
    ids = rgb2id(cv2.imread(str(out / "street.png"))[..., ::-1])
    assert ids.shape == (90, 120)
    segs = info["segments_info"]
    assert segs, "the raised biases must paint segments"
    assert sorted(np.unique(ids[ids > 0]).tolist()) == sorted(s["id"] for s in segs)
    cats = CategoryMap.from_categories(json.loads(
        (Path(__file__).resolve().parents[1] / "harness/data/coco_panoptic_categories.json").read_text()))
    raw = np.load(out / "street.npz")
    k = 50 + 53
    assert raw["candidate_scores"].shape == (k,) and raw["candidate_labels"].shape == (k,)
    assert raw["candidate_masks"].shape == (k, 90, 120) and raw["candidate_masks"].dtype == np.float32
    assert np.all(np.diff(raw["candidate_scores"]) <= 0)
    nq = panoptic_segformer_tiny().num_thing_queries
    assert raw["thing_logits_last"].shape == (nq, 80) and raw["thing_boxes_last"].shape == (nq, 4)
    category, instance = raw["panoptic_category"], raw["panoptic_instance"]
    assert category.dtype == np.int32 and instance.dtype == np.int32 and category.shape == (90, 120)
    for s in segs:
        sel = ids == s["id"]
        assert s["area"] == int(sel.sum())
        assert np.all(category[sel] == cats.to_contiguous(s["category_id"]))
        assert s["isthing"] == cats.is_thing_id(s["category_id"])
        assert np.all(instance[sel] > 0) if s["isthing"] else np.all(instance[sel] == 0)
    assert np.all((ids == 0) == (category == -1))
    overlay = cv2.imread(str(out / "street_overlay.png"))
    assert overlay is not None and overlay.shape[0] == 90


def test_predict_official_pth_and_other_mergers(tiny_weights: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """An official .pth is converted on the fly and gives the same panoptic map as our format."""
    ours, pth, img = tiny_weights
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["predict", "-q", "--weights", str(ours), "--image", str(img), "--out", str(a), "--no-overlay"]) == 0
    assert main(["predict", "-q", "--model", "panoptic_segformer_tiny", "--weights", str(pth), "--image", str(img),
                 "--out", str(b), "--no-overlay"]) == 0
    assert (a / "street.png").read_bytes() == (b / "street.png").read_bytes()
    assert main(["predict", "-q", "--weights", str(ours), "--image", str(img), "--out", str(tmp_path / "l0"),
                 "--mask-layer", "0", "--no-overlay"]) == 0
    assert main(["predict", "-q", "--weights", str(ours), "--image", str(img), "--out", str(tmp_path / "l9"),
                 "--mask-layer", "9", "--no-overlay"]) == 2
    for method in ("p", "p*", "heuristic"):
        d = tmp_path / method.replace("*", "star")
        assert main(["predict", "-q", "--weights", str(ours), "--image", str(img), "--out", str(d),
                     "--post-process", method, "--no-overlay"]) == 0
        assert json.loads((d / "street.json").read_text())["post_process"] == method


def test_predict_user_errors(tiny_weights: tuple[Path, Path, Path], tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    ours, pth, img = tiny_weights
    out = str(tmp_path / "o")
    assert main(["predict", "--weights", str(tmp_path / "nope"), "--image", str(img), "--out", out]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["predict", "--weights", str(pth), "--image", str(img), "--out", out]) == 2
    assert "model name" in capsys.readouterr().err
    assert main(["predict", "--model", "panoptic_segformer_r50", "--weights", str(pth), "--image", str(img),
                 "--out", out]) == 2
    err = capsys.readouterr().err
    assert "missing keys" in err and "Traceback" not in err
    assert main(["predict", "--weights", str(ours), "--image", str(tmp_path / "x.jpg"), "--out", out]) == 2
    assert "x.jpg" in capsys.readouterr().err


def test_predict_takes_categories_stored_by_train(synth_root: Path, tmp_path: Path) -> None:
    """Weights written by `harness train` carry the data set's categories; predict maps labels through them."""
    from harness.commands.predict import _load_categories
    from harness.data.coco_panoptic import PanopticDataset
    from harness.engine.train import save_weights
    from harness.errors import UserError
    from models.checkpoint import read_meta

    cats = PanopticDataset(synth_root, split="val2017").categories
    model = PanopticSegFormer(panoptic_segformer_tiny(num_things=cats.num_things, num_stuff=cats.num_stuff))
    save_weights(model, tmp_path / "w", [dict(c) for c in cats.categories])
    stored = read_meta(tmp_path / "w")["categories"]
    got = _load_categories(None, cats.num_things, cats.num_stuff, stored)
    assert [c["id"] for c in got] == list(cats.ids)
    assert _load_categories(None, cats.num_things, cats.num_stuff, None) is None  # not COCO-sized: unknown
    assert len(_load_categories(None, 80, 53, None)) == 133  # COCO by default for COCO-sized models
    with pytest.raises(UserError, match="stored with the weights"):
        _load_categories(None, cats.num_things + 1, cats.num_stuff, stored)
