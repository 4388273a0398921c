"""Panoptic FCN baseline: released-key conversion, parameter count, DCNv2 against the detectron2 CUDA kernel's
arithmetic, own inference on hand-made outputs, contract, BGR transform, training.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import assert_checkpoint_round_trip, train_steps

from models.baselines.panoptic_fcn import (
    CONFIGS,
    Detections,
    ModulatedDeformConvWithOff,
    PanopticFCN,
    combine_thing_and_stuff,
    convert_state_dict,
)
from models.checkpoint import CheckpointError, load_model

KEYS = "panopticfcn_r50_3x.txt"
KEYS_DIRS = [Path(__file__).parent / "data" / "checkpoint_keys", Path("/work/shared/reference/checkpoint_keys")]


def _key_lines() -> list[tuple[str, tuple[int, ...]]]:
    for d in KEYS_DIRS:
        if (d / KEYS).is_file():
            lines = (d / KEYS).read_text().splitlines()
            return [(k, tuple(int(v) for v in s.strip("()").split(",") if v.strip()))
                    for k, s in (line.split("\t") for line in lines)]
    pytest.skip(f"checkpoint key list {KEYS} not available")


@pytest.fixture(scope="module")
def released() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=g) for k, shape in _key_lines()}


@pytest.fixture(scope="module")
def r50() -> PanopticFCN:
    return PanopticFCN(CONFIGS["panoptic_fcn_r50_3x"]())


# ------------------------------------------------------------------------------------------ released weights
def test_pth_converts_and_loads_strictly(tmp_path: Path, released: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "model_final.pth"
    torch.save({"model": released, "iteration": 269999}, path)  # detectron2 checkpointer layout
    model, cfg = load_model(path, model="panoptic_fcn_r50_3x", source="panoptic-fcn")
    own = model.state_dict()
    for key in ("backbone.bottom_up.res2.0.conv1.weight", "backbone.bottom_up.stem.conv1.norm.running_mean",
                "position_head.position_head.position_head_head_2.offset_mask_conv.weight",
                "kernel_head.kernel_head.kernel_head_head_1.weight", "stuff_generator.embed_extractor.bias"):
        assert torch.equal(own[key], released[key]), key
    assert cfg.name == "panoptic_fcn_r50_3x" and not model.training
    # MSRA ResNet: the stage stride sits in the 1x1 conv.
    assert model.backbone.bottom_up.res3[0].conv1.stride == (2, 2)
    assert model.backbone.bottom_up.res3[0].conv2.stride == (1, 1)


def test_parameter_count_equals_official(r50: PanopticFCN) -> None:
    # Official parameters: every key except BN statistics and FrozenBN affine buffers of the ResNet.
    official = sum(math.prod(s) for k, s in _key_lines() if "running_" not in k
                   and not (k.startswith("backbone.bottom_up.") and ".norm." in k))
    n = sum(p.numel() for p in r50.parameters())
    assert n == official
    assert round(n / 1e6, 1) == 37.0  # Table 1 #P


def test_pth_with_code_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "extra": Path("x")}, path)  # a pickled object that is not data
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model(path, model="panoptic_fcn_r50_3x")


def test_wrong_family_is_named(tmp_path: Path, released: dict[str, torch.Tensor], r50: PanopticFCN) -> None:
    from models.checkpoint import load_state_dict_strict

    path = tmp_path / "maskformer.pth"
    torch.save({"model": {"sem_seg_head.predictor.query_embed.weight": torch.zeros(100, 256)}}, path)
    with pytest.raises(CheckpointError, match="not a Panoptic FCN checkpoint.*MaskFormer"):
        load_model(path, model="panoptic_fcn_r50_3x")
    state = dict(released)
    state["position_head.out_sem.weight"] = torch.zeros(134, 256, 3, 3)  # a different class count
    with pytest.raises(CheckpointError, match="shape mismatches.*out_sem.weight"):
        load_state_dict_strict(r50, convert_state_dict(state, r50.cfg))


# ------------------------------------------------------------------------------------------ DCNv2
def _dcn_reference(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """detectron2 ``modulated_deformable_im2col_gpu_kernel`` + GEMM (stride 1, pad 1, one deformable group), in
    float64: offset channel 2k = dy, 2k+1 = dx of tap k = i * kw + j; samples outside (-1, size) are 0; corners
    outside the map are 0 (``dmcn_im2col_bilinear``)."""
    x, offset, mask, weight = (t.double() for t in (x, offset, mask, weight))
    b, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    cols = torch.zeros(b, c, kh * kw, h, w, dtype=torch.float64)
    for bi in range(b):
        for yo in range(h):
            for xo in range(w):
                for i in range(kh):
                    for j in range(kw):
                        k = i * kw + j
                        hy = yo - 1 + i + float(offset[bi, 2 * k, yo, xo])
                        wx = xo - 1 + j + float(offset[bi, 2 * k + 1, yo, xo])
                        if not (hy > -1 and wx > -1 and hy < h and wx < w):
                            continue
                        y0, x0 = math.floor(hy), math.floor(wx)
                        ly, lx = hy - y0, wx - x0
                        val = torch.zeros(c, dtype=torch.float64)
                        for yy, xx, wgt in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx),
                                            (y0 + 1, x0, ly * (1 - lx)), (y0 + 1, x0 + 1, ly * lx)):
                            if 0 <= yy <= h - 1 and 0 <= xx <= w - 1:
                                val += wgt * x[bi, :, yy, xx]
                        cols[bi, :, k, yo, xo] = val * mask[bi, k, yo, xo]
    return torch.einsum("bckhw,ock->bohw", cols, weight.reshape(o, c, kh * kw))


def test_dcnv2_matches_the_detectron2_kernel_arithmetic() -> None:
    torch.manual_seed(0)
    conv = ModulatedDeformConvWithOff(3, 4, norm=None, activation=None)
    with torch.no_grad():
        conv.offset_mask_conv.weight.normal_(std=0.5)  # offsets of several pixels, some samples off the map
        conv.offset_mask_conv.bias.normal_(std=1.0)
        conv.dcnv2.bias.zero_()
    x = torch.randn(2, 3, 5, 6)
    with torch.no_grad():
        om = conv.offset_mask_conv(x)
        ours = conv(x)
    # Upstream: o1, o2, mask = chunk(3); offset = cat(o1, o2); mask = sigmoid(mask).
    o1, o2, m = torch.chunk(om, 3, dim=1)
    ref = _dcn_reference(x, torch.cat((o1, o2), dim=1), m.sigmoid(), conv.dcnv2.weight.detach())
    assert om[:, :18].abs().max() > 2  # the test does sample far away
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)


def test_flop_counter_counts_deformable_convs() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    conv = ModulatedDeformConvWithOff(8, 16, norm=None, activation=None)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        conv(torch.randn(1, 8, 10, 12))
    dense = 2 * 10 * 12 * 16 * 8 * 9  # deformable conv counted as the dense 3x3 conv it replaces
    offsets = 2 * 10 * 12 * 27 * 8 * 9
    assert fc.get_total_flops() == dense + offsets


# ------------------------------------------------------------------------------------------ own inference
def test_combine_thing_and_stuff_by_hand() -> None:
    h, w = 6, 8
    things = torch.zeros(3, h, w, dtype=torch.bool)
    things[0, :, :3] = True  # 18 px, score 0.9
    things[1, :, 2:4] = True  # 12 px, 6 taken by thing 0 (0.5, not > 0.5): keeps its 6 free px
    things[2, :, 1:4] = True  # 18 px, 18 taken (> 0.5): dropped
    stuff = torch.zeros(h, w, dtype=torch.long)  # region class 0 = "things": never painted
    stuff[:, 4:6] = 2  # 12 px -> contiguous 80 + 2 - 1 = 81
    stuff[:, 6:] = 5  # 12 px -> 84 (limit 12 here; below the limit of 13 in the second call)
    res = combine_thing_and_stuff(things, torch.tensor([3, 7, 9]), torch.tensor([0.9, 0.5, 0.4]), stuff, 80,
                                  overlap_threshold=0.5, stuff_area_limit=12, inst_threshold=0.2)
    cat = np.full((h, w), -1)
    cat[:, :3], cat[:, 3], cat[:, 4:6], cat[:, 6:] = 3, 7, 81, 84
    inst = np.zeros((h, w))
    inst[:, :3], inst[:, 3] = 1, 2
    np.testing.assert_array_equal(res.category, cat)
    np.testing.assert_array_equal(res.instance, inst)
    res = combine_thing_and_stuff(things, torch.tensor([3, 7, 9]), torch.tensor([0.9, 0.15, 0.4]), stuff, 80,
                                  stuff_area_limit=13)
    # thing 1 is below the 0.2 instance threshold; the 12-px stuff regions are below the area limit.
    assert set(np.unique(res.category)) == {-1, 3} and [s["label"] for s in res.segments] == [3]


def test_own_inference_rescoring_and_thresholds() -> None:
    cfg = CONFIGS["panoptic_fcn_tiny"](num_things=10, num_stuff=6, stuff_area_limit=1)
    model = PanopticFCN(cfg)
    h, w = 4, 8  # stride-4 logits of a 16 x 32 image (no padding), output at the same size
    logits = torch.full((3, h, w), -4.0)
    logits[0, :, :2] = 4.0  # p = 0.982 on columns 0-1: rescored 0.8 * 0.982
    logits[1, :, :2] = 4.0  # same mask, centre score 0.3: rescored 0.29 >= 0.2 but fully overlapped -> dropped
    logits[2, :, 3:5] = 0.0  # p = 0.5 on columns 3-4: rescored 0.9 * 0.5 = 0.45
    stuff = torch.full((2, h, w), -4.0)
    stuff[0, :, :5] = 4.0  # region class 0 ("things"), never painted
    stuff[1, :, 6:] = 5.0  # stuff class 3 -> contiguous 10 + 3 - 1 = 12
    d = Detections(logits, torch.tensor([0.8, 0.3, 0.9]), torch.tensor([1, 2, 4]), stuff, torch.tensor([0.5, 0.6]),
                   torch.tensor([0, 3]))
    res = model._own(d, (16, 32), (16, 32))
    seg = {(s["label"], s["instance"]): s["score"] for s in res.segments}
    assert set(seg) == {(1, 1), (4, 2), (12, 0)}
    assert seg[(1, 1)] == pytest.approx(0.8 * torch.sigmoid(torch.tensor(4.0)).item(), rel=1e-5)
    assert seg[(4, 2)] == pytest.approx(0.45, rel=1e-5)
    # Interiors (x4 bilinear upsampling of the probabilities blurs the block edges by a few pixels).
    assert (res.category[:, :6] == 1).all() and (res.instance[:, :6] == 1).all()
    assert (res.category[:, 14:18] == 4).all() and (res.instance[:, 14:18] == 2).all()
    assert (res.category[:, 27:] == 12).all() and (res.instance[:, 27:] == 0).all()
    assert (res.category[:, 21] == -1).all()  # the "things" region class wins there but no thing does: void


# ------------------------------------------------------------------------------------------ model contract
@pytest.fixture(scope="module")
def tiny() -> tuple[PanopticFCN, dict]:
    torch.manual_seed(0)
    model = PanopticFCN(CONFIGS["panoptic_fcn_tiny"](num_things=10, num_stuff=6)).eval()
    pad = torch.zeros(2, 96, 120, dtype=torch.bool)
    pad[1, 80:], pad[1, :, 100:] = True, True
    with torch.no_grad():
        out = model(torch.randn(2, 3, 96, 120) * 50, pad)
    return model, out


def test_contract_candidates_and_post_processors(tiny: tuple[PanopticFCN, dict]) -> None:
    from models.inference import PanopticModel
    from models.postprocess import post_process

    model, out = tiny
    assert isinstance(model, PanopticModel) and model.mask_layers() == ["last"]
    assert out["input_size"] == (96, 128)  # padded to a multiple of 32 inside the model
    assert out["image_sizes"] == [(96, 120), (80, 100)]
    c = model.candidates(out, 1)
    d = out["detections"][1]
    assert c.masks.shape[1:] == (20, 25)  # (80 / 4, 100 / 4): cropped to the image
    assert len(c.scores) == d.thing_logits.shape[0] + int((d.stuff_classes > 0).sum())
    assert c.labels.max() < 16
    for method in ("m", "p", "p*", "heuristic"):
        assert post_process(method, c, 10, (40, 50), **model.post_process_options(method)).category.shape == (40, 50)
    own = model.own_post_process(out, 1, (40, 50))
    assert own.category.shape == (40, 50)
    # A caller's valid_hw in mask pixels that agrees with the padding mask keeps the exact (pixel) crop.
    np.testing.assert_array_equal(model.own_post_process(out, 1, (40, 50), valid_hw=(20, 25)).category, own.category)


def test_dump_raw_has_the_issue_keys_for_r50(r50: PanopticFCN) -> None:
    from harness.data.transforms import prepare

    torch.manual_seed(0)
    model = PanopticFCN(CONFIGS["panoptic_fcn_r50_3x"](test_short=64, test_long=100)).eval()
    model.load_state_dict(r50.state_dict())
    img = np.random.default_rng(0).integers(0, 256, (50, 75, 3), dtype=np.uint8)
    prep = prepare(model.test_transform(), img)
    assert prep.img_shape == (64, 96) and prep.image.shape == (3, 64, 96)
    pad = torch.ones(1, 64, 96, dtype=torch.bool)
    pad[0, :64, :96] = False
    with torch.no_grad():
        out = model(torch.from_numpy(prep.image)[None], pad)
    raw = model.dump_raw(out, 0, prep, model.own_post_process(out, 0, prep.ori_shape))
    levels = [f"center_logits_p{i}" for i in range(3, 8)] + [f"region_logits_p{i}" for i in range(3, 8)]
    assert list(raw) == levels + ["encode_feat", "thing_mask_logits", "thing_scores", "thing_classes",
                                  "stuff_mask_logits", "stuff_scores", "stuff_classes", "panoptic_category",
                                  "panoptic_instance"]
    sizes = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    for i, hw in zip(range(3, 8), sizes):
        assert raw[f"center_logits_p{i}"].shape == (80, *hw) and raw[f"region_logits_p{i}"].shape == (54, *hw)
    assert raw["encode_feat"].shape == (64, 16, 24)
    k, s = raw["thing_scores"].shape[0], raw["stuff_scores"].shape[0]
    assert raw["thing_mask_logits"].shape == (k, 16, 24) and raw["thing_classes"].dtype == np.int64
    assert raw["stuff_mask_logits"].shape == (s, 16, 24) and (np.diff(raw["stuff_classes"]) > 0).all()
    assert raw["panoptic_category"].shape == (50, 75) and raw["panoptic_instance"].dtype == np.int32


def test_bgr_transform_std_one_and_padding() -> None:
    from harness.data.transforms import prepare

    spec = PanopticFCN(CONFIGS["panoptic_fcn_tiny"]()).test_transform()
    assert (spec.channel_order, spec.std, spec.size_divisor) == ("bgr", (1.0, 1.0, 1.0), 32)
    img = np.zeros((30, 50, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 10, 120, 250  # R, G, B
    prep = prepare(spec, img)
    assert prep.img_shape == (128, 213) and prep.image.shape == (3, 128, 224)
    for c, v in enumerate((250, 120, 10)):  # B, G, R minus the released mean as written (RGB order)
        assert (prep.image[c, :, :213] == np.float32(v) - np.float32(spec.mean[c])).all()
    assert (prep.image[:, :, 213:] == 0).all()


# ------------------------------------------------------------------------------------------ training
def test_tiny_config_trains_with_falling_loss(synth_root: Path) -> None:
    from harness.data.coco_panoptic import PanopticDataset
    from models.baselines.panoptic_fcn import build_criterion

    torch.manual_seed(0)
    ds = PanopticDataset(synth_root, "train2017")
    nt, ns = ds.categories.num_things, ds.categories.num_stuff
    cfg = CONFIGS["panoptic_fcn_tiny"](num_things=nt, num_stuff=ns)
    model = PanopticFCN(cfg).train()
    losses, logs = train_steps(model, build_criterion(cfg, nt, ns), ds, 128, steps=12, lr=3e-3, input_divisor=60.0)
    assert set(logs) == {"loss_pos_th", "loss_pos_st", "loss_seg_th", "loss_seg_st", "loss"}
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_our_checkpoint_format_round_trip(tmp_path: Path, tiny: tuple[PanopticFCN, dict]) -> None:
    assert_checkpoint_round_trip(tiny[0], tmp_path / "pfcn")
