"""`harness predict` generic path, per-layer dumps (--layers), attention dumps (--dump-attention)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from harness.cli import main
from harness.data.transforms import load_test_image, prepare, read_image_bgr
from models.checkpoint import save_checkpoint
from models.configs import panoptic_segformer_tiny
from models.mask_decoder import record_attention
from models.panoptic_segformer import PanopticSegFormer, outputs_at_layer
from models.postprocess import candidates_from_outputs, mask_wise_merge
from models.postprocess_full import mask_wise_merge_full


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, PanopticSegFormer]:
    """Tiny COCO-sized random model saved in our format, and a 90x120 picture. Raised class biases, stronger
    thing masks and sparser stuff masks make it paint 4 things and 2 stuff classes there."""
    root = tmp_path_factory.mktemp("predict_dump")
    torch.manual_seed(0)
    cfg = panoptic_segformer_tiny(num_things=80, num_stuff=53, test_scale=(176, 136))
    model = PanopticSegFormer(cfg).eval()
    with torch.no_grad():
        head = model.bbox_head
        head.cls_branches[-1].bias.fill_(4.0)
        head.cls_stuff_branches[-1].bias.fill_(2.0)
        for attn in [head.things_mask_head.attnen] + [b.attn for b in head.things_mask_head.blocks]:
            attn.linear[0].weight.mul_(3.0)
        for attn in [head.stuff_mask_head.attnen] + [b.attn for b in head.stuff_mask_head.blocks]:
            attn.linear[0].bias.sub_(3.0)
    weights = root / "tiny"
    save_checkpoint(model.state_dict(), cfg, weights)
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:90, 0:120]
    picture = np.stack([xx * 2, yy * 2, xx + yy], -1).astype(np.uint8) + rng.integers(0, 20, (90, 120, 3)).astype(
        np.uint8)
    img = root / "street.png"
    cv2.imwrite(str(img), picture)
    return weights, img, model


def _forward(model: PanopticSegFormer, img: Path) -> tuple[dict, object]:
    prep = load_test_image(img, model.cfg.test_scale)  # the previous predict path
    with torch.no_grad():
        return model(torch.from_numpy(prep.image)[None]), prep


def test_model_transform_equals_previous_path(tiny: tuple[Path, Path, PanopticSegFormer]) -> None:
    """prepare(model.test_transform(), rgb) is bit-identical to load_test_image (what predict used before)."""
    _, img, model = tiny
    for scale in ((176, 136), (1333, 800)):
        model.cfg.test_scale = scale
        old = load_test_image(img, scale)
        new = prepare(model.test_transform(), np.ascontiguousarray(read_image_bgr(img)[..., ::-1]))
        assert new.image.tobytes() == old.image.tobytes()
        assert (new.ori_shape, new.img_shape, new.scale_factor) == (old.ori_shape, old.img_shape, old.scale_factor)
    model.cfg.test_scale = (176, 136)


def test_dump_raw_layers_all(tiny: tuple[Path, Path, PanopticSegFormer], tmp_path: Path) -> None:
    weights, img, model = tiny
    out = tmp_path / "o"
    assert main(["predict", "-q", "--weights", str(weights), "--image", str(img), "--out", str(out), "--dump-raw",
                 "--layers", "all", "--no-overlay"]) == 0
    raw, layers = np.load(out / "street.npz"), np.load(out / "street_layers.npz")
    assert model.mask_layers() == ["1", "last"]
    keys = ("candidate_scores", "candidate_labels", "candidate_masks", "panoptic_category", "panoptic_instance")
    assert sorted(layers.files) == sorted(f"{k}_{layer}" for k in keys for layer in ("1", "last"))
    for k in keys:  # "last" is the single-layer dump, same dtypes and shapes for every layer
        np.testing.assert_array_equal(layers[f"{k}_last"], raw[k])
        assert layers[f"{k}_1"].dtype == raw[k].dtype and layers[f"{k}_1"].shape == raw[k].shape
    # Layer 1 from the official hook, merged by the previous (full-resolution) implementation.
    outputs, prep = _forward(model, img)
    cands = candidates_from_outputs(outputs_at_layer(outputs, 0), 0, 80)
    want = mask_wise_merge_full(cands, 80, prep.ori_shape)
    np.testing.assert_array_equal(layers["candidate_scores_1"], want.candidate_scores)
    np.testing.assert_array_equal(layers["candidate_labels_1"], want.candidate_labels)
    np.testing.assert_array_equal(layers["candidate_masks_1"], want.candidate_masks)
    np.testing.assert_array_equal(layers["panoptic_category_1"], want.category)
    np.testing.assert_array_equal(layers["panoptic_instance_1"], want.instance)
    # and the last layer's candidate list is still the previous implementation's
    want_last = mask_wise_merge_full(candidates_from_outputs(outputs, 0, 80), 80, prep.ori_shape)
    np.testing.assert_array_equal(raw["candidate_scores"], want_last.candidate_scores)
    np.testing.assert_array_equal(raw["candidate_masks"], want_last.candidate_masks)
    np.testing.assert_array_equal(raw["panoptic_category"], want_last.category)


def test_layer_options(tiny: tuple[Path, Path, PanopticSegFormer], tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    weights, img, _ = tiny
    base = ["predict", "-q", "--weights", str(weights), "--image", str(img), "--no-overlay", "--out"]
    assert main(base + [str(tmp_path / "a"), "--layer", "1"]) == 0
    assert main(base + [str(tmp_path / "b"), "--mask-layer", "0"]) == 0  # older 0-based spelling
    assert (tmp_path / "a/street.png").read_bytes() == (tmp_path / "b/street.png").read_bytes()
    assert json.loads((tmp_path / "a/street.json").read_text())["layer"] == "1"
    assert main(base + [str(tmp_path / "c"), "--layer", "last"]) == 0
    assert main(base + [str(tmp_path / "d"), "--mask-layer", "-1"]) == 0
    assert (tmp_path / "c/street.png").read_bytes() == (tmp_path / "d/street.png").read_bytes()
    capsys.readouterr()
    for bad, msg in ((["--layer", "1", "--mask-layer", "0"], "not both"), (["--layers", "all"], "--dump-raw"),
                     (["--dump-raw", "--layers", "7"], "mask layers 1, last"), (["--layer", "x"], "--layer"),
                     (["--layer", "9"], "mask layer '9'")):
        assert main(base + [str(tmp_path / "e")] + bad) == 2, bad
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (bad, err)


def test_generic_post_process_hooks(tiny: tuple[Path, Path, PanopticSegFormer], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`own` (Panoptic SegFormer's own is "(m)"), a model's default_post_process, and its optional dump_raw."""
    weights, img, _ = tiny
    base = ["predict", "-q", "--weights", str(weights), "--image", str(img), "--no-overlay", "--out"]
    assert main(base + [str(tmp_path / "m")]) == 0
    assert main(base + [str(tmp_path / "own"), "--post-process", "own"]) == 0
    assert (tmp_path / "m/street.png").read_bytes() == (tmp_path / "own/street.png").read_bytes()
    assert json.loads((tmp_path / "own/street.json").read_text())["post_process"] == "own"
    calls = []

    def dump_raw(self: PanopticSegFormer, outputs: dict, index: int, prep: object, result: object) -> dict:
        calls.append((index, prep.ori_shape, result.category.shape))
        return {"custom": np.arange(3)}

    monkeypatch.setattr(PanopticSegFormer, "default_post_process", "p", raising=False)
    monkeypatch.setattr(PanopticSegFormer, "dump_raw", dump_raw, raising=False)
    assert main(base + [str(tmp_path / "hooks"), "--dump-raw"]) == 0
    assert json.loads((tmp_path / "hooks/street.json").read_text())["post_process"] == "p"
    assert calls == [(0, (90, 120), (90, 120))]
    assert np.load(tmp_path / "hooks/street.npz").files == ["custom"]


def test_record_attention_leaves_outputs_unchanged(tiny: tuple[Path, Path, PanopticSegFormer]) -> None:
    _, img, model = tiny
    plain, prep = _forward(model, img)
    head = model.bbox_head
    with record_attention(head.things_mask_head) as t_maps, record_attention(head.stuff_mask_head, "softmax") as s_maps:
        recorded, _ = _forward(model, img)
    for key in ("thing_scores", "thing_labels", "thing_masks", "stuff_scores", "stuff_masks"):
        assert torch.equal(plain[key], recorded[key]), key
    h, w = (-(-s // 8) for s in prep.img_shape)  # the 1/8 grid
    assert sorted(t_maps) == ["1", "2", "last"] and sorted(s_maps) == ["1", "2", "last"]
    assert t_maps["last"].shape == (1, 4, plain["thing_masks"].shape[1], h, w) and t_maps["1"].dtype == torch.float16
    assert s_maps["2"].shape == (1, 4, 53, h, w)
    assert float(s_maps["2"].float().sum(-1).sum(-1).max()) <= 1.0 + 1e-2  # a share of each query's weights
    # Recording is off again: no state kept on the modules.
    assert all(b.attn.record is None and not b.attn.recorded for b in head.things_mask_head.blocks)
    assert head.things_mask_head.attnen.record is None
    with pytest.raises(ValueError, match="attention kind"):
        with record_attention(head.things_mask_head, "weights"):
            pass


def test_dump_attention(tiny: tuple[Path, Path, PanopticSegFormer], tmp_path: Path) -> None:
    weights, img, model = tiny
    out = tmp_path / "att"
    assert main(["predict", "-q", "--weights", str(weights), "--image", str(img), "--out", str(out),
                 "--no-overlay", "--dump-attention"]) == 0
    att = np.load(out / "street_attention.npz")
    info = json.loads((out / "street.json").read_text())
    assert str(att["kind"]) == "logits" and att["kind"].shape == ()
    assert int(att["stride"]) == 8 and tuple(att["ori_shape"]) == (90, 120)
    img_shape = tuple(int(v) for v in att["image_shape"])
    h, w = -(-img_shape[0] // 8), -(-img_shape[1] // 8)
    n_thing, n_stuff = len(att["labels_thing"]), len(att["labels_stuff"])
    assert n_thing + n_stuff == len(info["segments_info"]) and n_thing > 0 and n_stuff > 0
    assert att["labels_thing"].dtype == np.int64 and att["scores_stuff"].dtype == np.float32
    assert np.all(att["labels_thing"] < 80) and np.all(att["labels_stuff"] >= 80)
    for group, n in (("thing", n_thing), ("stuff", n_stuff)):
        for layer in ("1", "2", "last"):
            a = att[f"attn_{group}_{layer}"]
            assert a.dtype == np.float16 and a.shape == (n, 4, h, w), (group, layer, a.shape)
    # The rows are the painted queries (painting order): recompute them directly.
    outputs, prep = _forward(model, img)
    with record_attention(model.bbox_head.things_mask_head) as maps:
        _forward(model, img)
    res = mask_wise_merge(candidates_from_outputs(outputs, 0, 80), 80, prep.ori_shape)
    things = [s for s in res.segments if s["isthing"]]
    assert att["labels_thing"].tolist() == [s["label"] for s in things]
    np.testing.assert_array_equal(att["scores_thing"], np.asarray([s["score"] for s in things], np.float32))
    assert [s["score"] for s in things] == [s["score"] for s in info["segments_info"] if s["isthing"]]
    for i, seg in enumerate(things):
        assert int(outputs["thing_labels"][0, seg["candidate"]]) == seg["label"]
        np.testing.assert_array_equal(att["attn_thing_last"][i], maps["last"][0, :, seg["candidate"]].numpy())
