"""MaskFormer baseline: released-key conversion, parameter counts, own inference, contract, transform, training.

Oracles: the key lists dumped from the official classes (``/work/shared/reference/checkpoint_keys`` copies in
``tests/data/checkpoint_keys`` when present), hand-made head outputs with known panoptic answers, detectron2's
``ResizeShortestEdge`` arithmetic done by hand with fractions.
"""

from __future__ import annotations

import math
import pickle
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import assert_checkpoint_round_trip, train_steps

from models.baselines.maskformer import (
    CONFIGS,
    MaskFormer,
    _swin_relative_index,
    convert_state_dict,
    maskformer_panoptic_inference,
)
from models.checkpoint import CheckpointError, load_model

KEYS_DIRS = [Path(__file__).parent / "data" / "checkpoint_keys", Path("/work/shared/reference/checkpoint_keys")]
NO_OBJECT = 133


def _key_file(name: str) -> Path:
    for d in KEYS_DIRS:
        if (d / name).is_file():
            return d / name
    pytest.skip(f"checkpoint key list {name} not available")


def _released_state(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A state dict with the official names and shapes (random values; Swin index buffers as upstream)."""
    rng = np.random.default_rng(seed)
    out = {}
    for line in _key_file(name).read_text().splitlines():
        key, shape = line.split("\t")
        dims = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
        if key.endswith("relative_position_index"):
            out[key] = _swin_relative_index(math.isqrt(dims[0])).numpy()
        else:
            out[key] = rng.standard_normal(dims, dtype=np.float32)
    return out


def _official_param_count(name: str) -> int:
    """Parameters of the official model: every key but BN statistics, FrozenBN affine buffers, index buffers."""
    total = 0
    for line in _key_file(name).read_text().splitlines():
        key, shape = line.split("\t")
        dims = [int(v) for v in shape.strip("()").split(",") if v.strip()]
        frozen_bn = key.startswith("backbone.") and (".norm." in key) and not key.startswith("backbone.layers") \
            and "patch_embed" not in key
        if "running_" in key or "empty_weight" in key or "relative_position_index" in key or frozen_bn:
            continue
        total += math.prod(dims)
    return total


def _write_pkl(path: Path, state: dict[str, np.ndarray]) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "test"}, f)
    return path


# ------------------------------------------------------------------------------------------ released weights
@pytest.fixture(scope="module")
def r50_state() -> dict[str, np.ndarray]:
    return _released_state("maskformer_r50_panoptic.txt")


@pytest.fixture(scope="module")
def r50_model() -> MaskFormer:
    return MaskFormer(CONFIGS["maskformer_r50_panoptic"]())


def test_r50_pkl_converts_and_loads_strictly(tmp_path: Path, r50_state: dict[str, np.ndarray]) -> None:
    path = _write_pkl(tmp_path / "model_final_6f60dc.pkl", r50_state)
    model, cfg = load_model(path, model="maskformer_r50_panoptic", source="maskformer")
    own = model.state_dict()
    for key in ("sem_seg_head.pixel_decoder.adapter_1.weight", "backbone.res3.0.conv2.norm.running_var",
                "sem_seg_head.predictor.class_embed.weight",
                "sem_seg_head.pixel_decoder.transformer.encoder.layers.5.self_attn.in_proj_weight"):
        assert torch.equal(own[key], torch.from_numpy(r50_state[key])), key
    assert "criterion.empty_weight" not in own
    assert cfg.name == "maskformer_r50_panoptic" and not model.training


def test_r50_old_pixel_decoder_names_convert(r50_state: dict[str, np.ndarray], r50_model: MaskFormer) -> None:
    from models.checkpoint import load_state_dict_strict

    # Version-1 files have no "pixel_decoder." segment (the official loader renames them).
    old = {k.replace("sem_seg_head.pixel_decoder.", "sem_seg_head."): torch.from_numpy(v) for k, v in r50_state.items()}
    assert "sem_seg_head.adapter_1.weight" in old and "sem_seg_head.transformer.encoder.layers.0.linear1.bias" in old
    converted = convert_state_dict(old, r50_model.cfg)
    load_state_dict_strict(r50_model, converted)
    assert torch.equal(r50_model.sem_seg_head.pixel_decoder.adapter_1.weight,
                       torch.from_numpy(r50_state["sem_seg_head.pixel_decoder.adapter_1.weight"]))
    # FrozenBN layers without running stats (pre-v2 detectron2 files) get mean 0 / var 1, as detectron2 does.
    del old["backbone.stem.conv1.norm.running_mean"], old["backbone.stem.conv1.norm.running_var"]
    converted = convert_state_dict(old, r50_model.cfg)
    assert torch.equal(converted["backbone.stem.conv1.norm.running_var"], torch.ones(64))


def test_parameter_counts_equal_official(r50_model: MaskFormer) -> None:
    n = sum(p.numel() for p in r50_model.parameters())
    assert n == _official_param_count("maskformer_r50_panoptic.txt")
    assert round(n / 1e6, 1) == 45.0  # Table 1 #P


@pytest.mark.slow
def test_swin_l_converts_loads_and_counts(tmp_path: Path) -> None:
    state = _released_state("maskformer_swinL_panoptic.txt")
    cfg = CONFIGS["maskformer_swin_l_panoptic"]()
    converted = convert_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, cfg)
    # Original Swin layout (merging at the end of stage i) -> timm (start of stage i + 1).
    assert torch.equal(converted["backbone.layers.1.downsample.reduction.weight"],
                       torch.from_numpy(state["backbone.layers.0.downsample.reduction.weight"]))
    model = MaskFormer(cfg)
    model.load_state_dict(converted, strict=True)
    n = sum(p.numel() for p in model.parameters())
    assert n == _official_param_count("maskformer_swinL_panoptic.txt")
    assert round(n / 1e6) == 212  # Table 1 #P 212.0


def test_wrong_family_and_wrong_backbone_are_named(tmp_path: Path, r50_state: dict[str, np.ndarray],
                                                  r50_model: MaskFormer) -> None:
    from models.checkpoint import load_state_dict_strict

    pfcn = {"position_head.out_inst.weight": np.zeros((80, 256, 3, 3), np.float32),
            "kernel_head.out_conv.weight": np.zeros((256, 256, 3, 3), np.float32)}
    with pytest.raises(CheckpointError, match="not a MaskFormer checkpoint.*Panoptic FCN"):
        load_model(_write_pkl(tmp_path / "pfcn.pkl", pfcn), model="maskformer_r50_panoptic")
    psf = tmp_path / "psf.pth"
    torch.save({"state_dict": {"bbox_head.cls_branches.0.weight": torch.zeros(80, 256)}}, psf)
    with pytest.raises(CheckpointError, match="Panoptic SegFormer"):
        load_model(psf, model="maskformer_r50_panoptic", source="maskformer")
    swin = {"backbone.patch_embed.proj.weight": np.zeros((192, 3, 4, 4), np.float32),
            "sem_seg_head.predictor.query_embed.weight": np.zeros((100, 256), np.float32)}
    with pytest.raises(CheckpointError, match="maskformer_swin_l_panoptic"):
        load_model(_write_pkl(tmp_path / "swin.pkl", swin), model="maskformer_r50_panoptic")
    drop = "sem_seg_head.predictor.mask_embed.layers.2.bias"
    state = {k: torch.from_numpy(v) for k, v in r50_state.items() if k != drop}
    with pytest.raises(CheckpointError, match="missing keys.*mask_embed.layers.2.bias"):
        load_state_dict_strict(r50_model, convert_state_dict(state, r50_model.cfg))


def test_pkl_reader_refuses_arbitrary_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"a": Path("x")}}, f)
    with pytest.raises(CheckpointError, match="evil.pkl: refusing to load.*could run code"):
        load_model(path, model="maskformer_r50_panoptic")


# ------------------------------------------------------------------------------------------ own inference
def _logits(spec: list[tuple[int, float]], num_classes: int = 134) -> torch.Tensor:
    """Class logits whose softmax max is exactly ``p`` at class ``c`` (rest on no-object, or one other class)."""
    out = torch.full((len(spec), num_classes), -1e4)
    for q, (c, p) in enumerate(spec):
        out[q, c] = math.log(p)
        out[q, NO_OBJECT if c != NO_OBJECT else 0] = math.log(1 - p)
    return out


def _block(rows: slice, cols: slice, size: int = 8) -> torch.Tensor:
    m = torch.full((size, size), -5.0)
    m[rows, cols] = 5.0
    return m


def test_own_inference_merges_stuff_and_numbers_things() -> None:
    # q0 thing 5 (left half); q1 / q2 stuff 90 (top-right / bottom-right) -> one segment; q3 no-object;
    # q4 thing 3 below the 0.8 score threshold.
    logits = _logits([(5, 0.95), (90, 0.9), (90, 0.85), (NO_OBJECT, 0.99), (3, 0.7)])
    masks = torch.stack([_block(slice(None), slice(0, 4)), _block(slice(0, 4), slice(4, 8)),
                         _block(slice(4, 8), slice(4, 8)), _block(slice(None), slice(None)),
                         _block(slice(None), slice(None))])
    res = maskformer_panoptic_inference(logits, masks, (8, 8), (8, 8), (8, 8), num_things=80)
    expect_cat = np.full((8, 8), 90, np.int32)
    expect_cat[:, :4] = 5
    expect_inst = np.zeros((8, 8), np.int32)
    expect_inst[:, :4] = 1
    np.testing.assert_array_equal(res.category, expect_cat)
    np.testing.assert_array_equal(res.instance, expect_inst)
    assert [(s["label"], s["isthing"], s["area"]) for s in res.segments] == [(5, True, 32), (90, False, 32)]


def test_own_inference_drops_overlapped_queries_to_void() -> None:
    # q3 (thing 7, score 0.99) takes columns 6-7 from the stuff queries, which then keep 8 of their 16 pixels
    # (< 0.8 of their own area) and are dropped: their remaining pixels become void.
    logits = _logits([(5, 0.95), (90, 0.9), (90, 0.85), (7, 0.99)])
    masks = torch.stack([_block(slice(None), slice(0, 4)), _block(slice(0, 4), slice(4, 8)),
                         _block(slice(4, 8), slice(4, 8)), _block(slice(None), slice(6, 8))])
    res = maskformer_panoptic_inference(logits, masks, (8, 8), (8, 8), (8, 8), num_things=80)
    expect_cat = np.full((8, 8), -1, np.int32)
    expect_cat[:, :4], expect_cat[:, 6:] = 5, 7
    expect_inst = np.zeros((8, 8), np.int32)
    expect_inst[:, :4], expect_inst[:, 6:] = 1, 2
    np.testing.assert_array_equal(res.category, expect_cat)
    np.testing.assert_array_equal(res.instance, expect_inst)


def test_own_inference_crops_padding_before_resizing() -> None:
    # Mask logits over a padded 8x16 input whose image is the left 8x8: the right half must not be stretched in.
    logits = _logits([(5, 0.95), (90, 0.9)])
    m0 = torch.full((8, 16), -5.0)
    m0[:, :4] = 5.0
    m1 = torch.full((8, 16), -5.0)
    m1[:, 4:] = 5.0
    res = maskformer_panoptic_inference(logits, torch.stack([m0, m1]), (8, 16), (8, 8), (8, 8), num_things=80)
    assert (res.category[:, :4] == 5).all() and (res.category[:, 4:] == 90).all()


# ------------------------------------------------------------------------------------------ model contract
@pytest.fixture(scope="module")
def tiny() -> tuple[MaskFormer, dict]:
    torch.manual_seed(0)
    model = MaskFormer(CONFIGS["maskformer_tiny"](num_things=10, num_stuff=6)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96), torch.zeros(2, 64, 96, dtype=torch.bool))
    return model, out


def test_contract_candidates_and_post_processors(tiny: tuple[MaskFormer, dict]) -> None:
    from models.inference import PanopticModel
    from models.postprocess import post_process

    model, out = tiny
    assert isinstance(model, PanopticModel) and model.default_post_process == "own"
    assert model.mask_layers() == ["1", "last"]
    assert out["pred_logits"].shape == (2, 20, 17) and out["pred_masks"].shape == (2, 20, 16, 24)
    for layer in model.mask_layers():
        c = model.candidates(out, 1, layer)
        assert c.masks.shape[1:] == (16, 24) and c.labels.max() < 16 and c.query_index.max() < 20
        assert ((c.masks >= 0) & (c.masks <= 1)).all()
        for method in ("m", "p", "p*", "heuristic"):
            res = post_process(method, c, 10, (40, 60), **model.post_process_options(method))
            assert res.category.shape == (40, 60)
    res = model.own_post_process(out, 0, (40, 60))
    assert res.category.shape == (40, 60) and res.category.min() >= -1
    # valid_hw (mask pixels) equal to the recorded size / 4 rounded up keeps the exact crop (image 62 x 94 here).
    pad = torch.zeros(1, 64, 96, dtype=torch.bool)
    pad[0, 62:], pad[0, :, 94:] = True, True
    with torch.no_grad():
        o = model(torch.randn(1, 3, 64, 96), pad)
    assert o["image_sizes"] == [(62, 94)]
    for valid in ((16, 24), (17, 25)):  # the padding mask is exact; a caller's rounded-up valid_hw does not move it
        np.testing.assert_array_equal(model.own_post_process(o, 0, (31, 47), valid_hw=valid).category,
                                      model.own_post_process(o, 0, (31, 47)).category)
    with torch.no_grad():
        trunc = model(torch.zeros(1, 3, 64, 96), mask_layer=1)
        full = model(torch.zeros(1, 3, 64, 96))
    assert torch.equal(trunc["pred_logits"], full["aux_logits"][0])
    with pytest.raises(ValueError):
        model(torch.zeros(1, 3, 64, 96), mask_layer=3)


def test_image_size_for_the_crop() -> None:
    from models.baselines.maskformer_detectron2 import image_size_in_pixels

    masked = {"image_sizes": [(62, 94)], "sizes_from_mask": True, "input_size": (64, 96)}
    assert image_size_in_pixels(masked, 0, (17, 25), 4) == (62, 94)
    unmasked = {"image_sizes": [(64, 96)], "sizes_from_mask": False, "input_size": (64, 96)}
    assert image_size_in_pixels(unmasked, 0, None, 4) == (64, 96)
    assert image_size_in_pixels(unmasked, 0, (10, 12), 4) == (40, 48)
    assert image_size_in_pixels(unmasked, 0, (16, 24), 4) == (64, 96)


def test_dump_raw_has_the_issue_keys_for_r50() -> None:
    from harness.data.transforms import prepare

    torch.manual_seed(0)
    model = MaskFormer(CONFIGS["maskformer_r50_panoptic"](test_short=64, test_long=100)).eval()
    img = np.random.default_rng(0).integers(0, 256, (50, 75, 3), dtype=np.uint8)
    prep = prepare(model.test_transform(), img)
    assert prep.img_shape == (64, 96) and prep.image.shape == (3, 64, 96)
    with torch.no_grad():
        out = model(torch.from_numpy(prep.image)[None])
    raw = model.dump_raw(out, 0, prep, model.own_post_process(out, 0, prep.ori_shape))
    assert list(raw) == ["pred_logits", "pred_masks", "panoptic_category", "panoptic_instance"]
    assert raw["pred_logits"].shape == (100, 134) and raw["pred_logits"].dtype == np.float32
    assert raw["pred_masks"].shape == (100, 16, 24) and raw["pred_masks"].dtype == np.float32
    assert raw["panoptic_category"].shape == (50, 75) and raw["panoptic_category"].dtype == np.int32
    assert raw["panoptic_instance"].shape == (50, 75) and raw["panoptic_instance"].dtype == np.int32


# ------------------------------------------------------------------------------------------ test transform
def _d2_shape_by_hand(h: int, w: int, short: int, long: int) -> tuple[int, int]:
    s = Fraction(short, min(h, w))
    nh, nw = (Fraction(short), s * w) if h < w else (s * h, Fraction(short))
    if max(nh, nw) > long:
        r = Fraction(long) / max(nh, nw)
        nh, nw = nh * r, nw * r
    return math.floor(nh + Fraction(1, 2)), math.floor(nw + Fraction(1, 2))


@pytest.mark.parametrize("hw", [(480, 640), (640, 480), (427, 640), (1000, 300), (333, 500), (800, 800), (375, 500)])
def test_detectron2_resize_shape_matches_hand_computation(hw: tuple[int, int]) -> None:
    from harness.data.transforms import detectron2_output_shape

    assert detectron2_output_shape(*hw, 800, 1333) == _d2_shape_by_hand(*hw, 800, 1333)
    assert detectron2_output_shape(480, 640) == (800, 1067)  # DETR's truncating rule gives 1066
    assert detectron2_output_shape(1000, 300) == (1333, 400)


def test_detectron2_transform_normalises_rgb_without_padding() -> None:
    from harness.data.transforms import prepare

    model = MaskFormer(CONFIGS["maskformer_tiny"]())
    spec = model.test_transform()
    assert (spec.resize, spec.channel_order, spec.size_divisor) == ("detectron2", "rgb", 1)
    img = np.zeros((30, 50, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 10, 120, 250
    prep = prepare(spec, img)
    assert prep.img_shape == (128, 213) and prep.image.shape == (3, 128, 213)
    for c, v in enumerate((10, 120, 250)):
        expect = (np.float32(v) - np.float32(spec.mean[c])) / np.float32(spec.std[c])
        assert (prep.image[c] == expect).all()


# ------------------------------------------------------------------------------------------ training
def test_tiny_config_trains_with_falling_loss(synth_root: Path) -> None:
    from harness.data.coco_panoptic import PanopticDataset
    from models.baselines.maskformer import build_criterion

    torch.manual_seed(0)
    ds = PanopticDataset(synth_root, "train2017")
    nt, ns = ds.categories.num_things, ds.categories.num_stuff
    cfg = CONFIGS["maskformer_tiny"](num_things=nt, num_stuff=ns)
    model = MaskFormer(cfg).train()
    assert all(p.requires_grad for p in model.parameters())  # every parameter trains
    losses, logs = train_steps(model, build_criterion(cfg, nt, ns), ds, 128, steps=12, lr=1e-3)
    assert {"loss_ce", "loss_mask", "loss_dice", "d0.loss_ce"} <= set(logs)
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_our_checkpoint_format_round_trip(tmp_path: Path, tiny: tuple[MaskFormer, dict]) -> None:
    assert_checkpoint_round_trip(tiny[0], tmp_path / "mf")
