"""Panoptic SegFormer model: parameter counts of the official configs, output shapes of every layer and variant,
batch/padding invariance."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from models.configs import (
    MODEL_CONFIGS,
    PanopticSegFormerConfig,
    get_config,
    panoptic_segformer_tiny,
)
from models.panoptic_segformer import PanopticSegFormer, count_parameters, outputs_at_layer

# Key/shape lists of the official module tree (copied from the project reference, checkpoint_keys/).
KEYS_DIR = Path(__file__).resolve().parent / "data" / "checkpoint_keys"

OFFICIAL = {
    "panoptic_segformer_r50": "r50",
    "panoptic_segformer_r101": "r101",
    "panoptic_segformer_pvtv2_b5": "pvtv2b5",
    "panoptic_segformer_swin_l": "swinl",
}


def _header(name: str) -> dict[str, int]:
    """``params`` and ``numel[prefix]`` values from a key-list header."""
    out: dict[str, int] = {}
    for line in (KEYS_DIR / f"panoptic_segformer_{name}.txt").read_text().splitlines():
        if not line.startswith("#"):
            break
        m = re.search(r"params=(\d+)", line)
        if m:
            out["params"] = int(m.group(1))
        m = re.match(r"# numel\[(.+)\]=(\d+)", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


@pytest.mark.parametrize("model_name", sorted(OFFICIAL))
def test_official_parameter_counts(model_name: str) -> None:
    """Total parameters and per-module state-dict numel equal the official module tree (reference §5.3)."""
    exact = {"panoptic_segformer_r50": 51_271_900, "panoptic_segformer_r101": 70_264_028,
             "panoptic_segformer_pvtv2_b5": 104_996_188, "panoptic_segformer_swin_l": 221_352_624}
    header = _header(OFFICIAL[model_name])
    assert header["params"] == exact[model_name]
    with torch.device("meta"):
        model = PanopticSegFormer(get_config(model_name))
    assert count_parameters(model) == exact[model_name]
    state = model.state_dict()
    for prefix, numel in header.items():
        if prefix in ("params", "backbone"):
            continue
        ours = sum(v.numel() for k, v in state.items() if k.startswith(prefix + "."))
        assert ours == numel, prefix
    # Published totals (millions, reference §5.3 / paper Table 1 for the two large ones).
    expected_m = {"panoptic_segformer_r50": 51.27, "panoptic_segformer_r101": 70.26,
                  "panoptic_segformer_pvtv2_b5": 105.0, "panoptic_segformer_swin_l": 221.35}[model_name]
    assert round(count_parameters(model) / 1e6, 2 if expected_m != 105.0 else 1) == expected_m


def test_config_thresholds_and_roundtrip() -> None:
    assert get_config("panoptic_segformer_r50").thing_threshold == 0.25
    assert get_config("panoptic_segformer_swin_l").thing_threshold == 0.3
    assert get_config("panoptic_segformer_pvtv2_b5").stuff_threshold == 0.3
    cfg = panoptic_segformer_tiny(num_things=7, num_stuff=4, num_location_layers=1)
    again = PanopticSegFormerConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ValueError, match="unknown model"):
        get_config("panoptic_segformer_r18")
    with pytest.raises(ValueError, match="unknown config keys: bogus"):
        PanopticSegFormerConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    assert set(MODEL_CONFIGS) >= set(OFFICIAL)


def _tiny(**kw: object) -> PanopticSegFormer:
    torch.manual_seed(0)
    return PanopticSegFormer(panoptic_segformer_tiny(num_things=6, num_stuff=4, **kw)).eval()


def test_per_layer_shapes() -> None:
    """Every location layer, every mask-decoder block and the tails have the documented shapes."""
    model = _tiny(num_location_layers=3, num_thing_mask_layers=2, num_stuff_mask_layers=3)
    cfg = model.cfg
    x = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        enc = model.encode(x)
        loc = model.locate(enc)
        out = model(x)
    s = (16 * 20) + (8 * 10) + (4 * 5) + (2 * 3)
    assert enc.memory.shape == (2, s, cfg.d_model)
    assert enc.spatial_shapes.tolist() == [[16, 20], [8, 10], [4, 5], [2, 3]]
    assert enc.level_start_index.tolist() == [0, 320, 400, 420]
    assert enc.valid_ratios.shape == (2, 4, 2) and torch.all(enc.valid_ratios == 1)
    assert enc.mask_memory.shape == (2, 420, cfg.d_model) and enc.mask_hw == [(16, 20), (8, 10), (4, 5)]
    q = cfg.num_thing_queries
    assert loc.logits.shape == (3, 2, q, 6) and loc.boxes.shape == (3, 2, q, 4)
    assert loc.queries.shape == (2, q, cfg.d_model)
    assert torch.all((loc.boxes > 0) & (loc.boxes < 1))
    k = cfg.max_per_image
    assert out["thing_scores"].shape == (2, k) and out["thing_labels"].shape == (2, k)
    assert out["thing_boxes"].shape == (2, k, 4) and out["thing_masks"].shape == (2, k, 16, 20)
    assert out["stuff_scores"].shape == (2, 4) and out["stuff_masks"].shape == (2, 4, 16, 20)
    masks = out["masks"]
    assert [tuple(m.shape) for m in masks.thing_masks] == [(2, k, 16, 20)] * 3
    assert [tuple(m.shape) for m in masks.stuff_masks] == [(2, 4, 16, 20)] * 4
    assert [tuple(m.shape) for m in masks.stuff_logits] == [(2, 4)] * 3
    assert [tuple(m.shape) for m in masks.thing_logits_mask] == [(2, k, 6)] * 2
    # Raw ReLU masks: non-negative, no sigmoid; final = the tail.
    assert all(float(m.min()) >= 0 for m in masks.thing_masks + masks.stuff_masks)
    assert torch.equal(out["thing_masks"], masks.thing_masks[-1])
    # Top-k decoding: query = idx // C, label = idx % C over the sigmoid of the last layer.
    prob = loc.logits[-1].sigmoid().flatten(1)
    top, idx = prob.topk(k, dim=1)
    assert torch.allclose(out["thing_scores"], top)
    assert torch.equal(out["thing_labels"], idx % 6) and torch.equal(out["thing_query_index"], idx // 6)
    assert torch.allclose(out["stuff_scores"], masks.stuff_logits[-1].sigmoid())
    # Table 10: outputs of an earlier block.
    first = outputs_at_layer(out, 0)
    assert torch.equal(first["thing_masks"], masks.thing_masks[0]) and torch.equal(first["stuff_masks"],
                                                                                   masks.stuff_masks[0])
    # Official hook: the last stuff class head on block 0's stuff query; the per-block head is our option.
    last_fc = model.bbox_head.cls_stuff_branches[-1]
    expected = last_fc(masks.stuff_queries[0]).squeeze(-1).sigmoid()
    assert torch.allclose(first["stuff_scores"], expected)
    assert torch.equal(first["thing_scores"], out["thing_scores"])
    block = outputs_at_layer(out, 0, stuff_head="block")
    assert torch.equal(block["stuff_scores"], masks.stuff_logits[0].sigmoid())
    assert outputs_at_layer(out, -1)["thing_masks"] is out["thing_masks"]
    with pytest.raises(ValueError, match="out of range"):
        outputs_at_layer(out, 2)
    # The truncated forward (decoders stopped after block 1) gives the same outputs as slicing the full one.
    with torch.no_grad():
        trunc = model(x, mask_layer=1)
    for key in ("thing_masks", "stuff_masks", "stuff_scores", "thing_scores"):
        assert torch.allclose(trunc[key], first[key], atol=1e-6), key
    assert model.mask_layers() == ["1", "last"]
    cands = model.candidates(out, 1, "1")
    assert torch.equal(cands.masks[: k], masks.thing_masks[0][1])
    assert torch.equal(cands.query_index[:k], out["thing_query_index"][1])
    nq = model.cfg.num_thing_queries  # stuff query j is query nq + j of the candidates
    assert cands.query_index[k:].tolist() == [nq, nq + 1, nq + 2, nq + 3]
    with pytest.raises(ValueError, match="out of range"):
        model(x, mask_layer=3)


def test_mask_logits_from_attention_branch() -> None:
    """The mask of a block is ReLU(Linear(cat of per-level ReLU(Linear(heads)))) of the raw q.k logits."""
    from models.mask_decoder import MaskAttention

    torch.manual_seed(1)
    att = MaskAttention(16, 2, with_value=True).eval()
    hw = [(4, 6), (2, 3), (1, 2)]
    mem = torch.randn(1, 24 + 6 + 2, 16)
    q = torch.randn(1, 3, 16)
    _, mask = att(q, mem, hw)
    # Independent computation for query 0, pixel (1, 2) of level 1 and the nearest level-2/3 samples.
    logits = (att.q(q) .reshape(1, 3, 2, 8).transpose(1, 2) @ att.k(mem).reshape(1, 32, 2, 8).permute(0, 2, 3, 1))
    logits = logits * 8 ** -0.5  # (1, heads, 3, 32)
    a = logits[0, :, 0].T  # (32, heads)
    l1 = torch.relu(att.linear_l1[0](a[:24])).reshape(4, 6, 2)
    l2 = torch.relu(att.linear_l2[0](a[24:30])).reshape(2, 3, 2).permute(2, 0, 1)[None]
    l3 = torch.relu(att.linear_l3[0](a[30:])).reshape(1, 2, 2).permute(2, 0, 1)[None]
    l2 = torch.nn.functional.interpolate(l2, size=(4, 6), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    l3 = torch.nn.functional.interpolate(l3, size=(4, 6), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    want = torch.relu(att.linear[0](torch.cat([l1, l2, l3], -1)))[..., 0]
    assert torch.allclose(mask[0, 0, :, 0].reshape(4, 6), want, atol=1e-6)


@pytest.mark.parametrize("overrides, ld, width", [
    ({"num_location_layers": 0}, 1, 6),
    ({"num_location_layers": 1}, 1, 6),
    ({"box_free": True}, 2, 6),
    ({"with_box_refine": False}, 2, 6),
    ({"decouple_queries": False, "num_thing_queries": 14}, 2, 10),
    ({"mask_num_heads": 1}, 2, 6),
])
def test_variants_run(overrides: dict[str, object], ld: int, width: int) -> None:
    """Table 6 / 8 / B.5 variants are config fields and produce well-formed outputs."""
    model = _tiny(**overrides)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    loc = out["location"]
    assert loc.logits.shape[0] == ld and loc.logits.shape[-1] == width
    assert out["thing_masks"].shape[-2:] == (8, 12)
    if overrides.get("box_free"):
        assert model.bbox_head.reg_branches[0][-1].out_features == 2  # mass centres
        assert torch.all(loc.boxes[..., 2:] == 0) and torch.all((loc.boxes[..., :2] > 0) & (loc.boxes[..., :2] < 1))
    if overrides.get("decouple_queries") is False:
        assert model.bbox_head.stuff_mask_head is None and out["stuff_masks"].shape[1] == 0
    if overrides.get("with_box_refine") is False:
        heads = model.bbox_head.cls_branches
        assert heads[0] is heads[1]


def test_batch_of_two_equals_each_alone() -> None:
    """Same-size images: the batch changes nothing (no cross-image leakage)."""
    model = _tiny()
    a, b = torch.randn(1, 3, 96, 128), torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        both = model(torch.cat([a, b]))
        alone = [model(a), model(b)]
    for i in range(2):
        for key in ("thing_scores", "thing_boxes", "thing_masks", "stuff_scores", "stuff_masks"):
            assert torch.allclose(both[key][i], alone[i][key][0], atol=1e-5, rtol=1e-4), key


def _padded_pair(model: PanopticSegFormer) -> tuple[dict[str, object], dict[str, object]]:
    """Encoder/decoder outputs of image A alone and of A padded inside a batch with a larger image B.

    The padded features of A are its own features followed by arbitrary values: the CNN's border effects are
    outside this model's control (any CNN sees padding), everything after the neck must ignore the padding.
    """
    torch.manual_seed(3)
    a = torch.randn(1, 3, 128, 128)
    b = torch.randn(1, 3, 128, 192)
    with torch.no_grad():
        fa = model.extract(a)
        fb = model.extract(b)
        padded = []
        for la, lb in zip(fa, fb):
            p = torch.randn_like(lb) * 5
            p[..., : la.shape[-2], : la.shape[-1]] = la
            padded.append(torch.cat([p, lb]))
        mask = torch.zeros(2, 128, 192, dtype=torch.bool)
        mask[0, :, 128:] = True
        outs = []
        for feats, m in ((fa, torch.zeros(1, 128, 128, dtype=torch.bool)), (padded, mask)):
            enc = model.encode_features(feats, m)
            loc = model.locate(enc)
            seg = model.segment(enc, loc.queries[:, :10])
            outs.append({"loc": loc, "seg": seg, "enc": enc})
    return outs[0], outs[1]


def test_padded_batch_location_decoder_equals_single() -> None:
    """Encoder + location decoder ignore padding exactly (masked values, valid-ratio reference points)."""
    alone, batch = _padded_pair(_tiny())
    assert torch.allclose(batch["enc"].valid_ratios[0, :, 0], torch.full((4,), 128 / 192))
    assert torch.allclose(batch["loc"].logits[:, 0], alone["loc"].logits[:, 0], atol=1e-4, rtol=1e-4)
    assert torch.allclose(batch["loc"].boxes[:, 0], alone["loc"].boxes[:, 0], atol=1e-5)


def test_padded_batch_masks_with_padding_flag() -> None:
    """With ``mask_ignore_padding=False`` masks agree inside the valid region except its last two rows/columns,
    where the bilinear upsampling of the 1/32 level (x4) reads the neighbouring padded cell; the official setting,
    which ignores the padding mask, does not agree."""
    alone, batch = _padded_pair(_tiny(mask_ignore_padding=False))
    for ma, mb in zip(alone["seg"].thing_masks + alone["seg"].stuff_masks,
                      batch["seg"].thing_masks + batch["seg"].stuff_masks):
        h, w = ma.shape[-2:]
        assert torch.allclose(mb[0, :, : h - 2, : w - 2], ma[0, :, : h - 2, : w - 2], atol=1e-4, rtol=1e-3)
    for la, lb in zip(alone["seg"].stuff_logits, batch["seg"].stuff_logits):
        assert torch.allclose(lb[0], la[0], atol=1e-4, rtol=1e-3)
    alone_o, batch_o = _padded_pair(_tiny())  # official: padding leaks into the mask decoder's softmax
    diff = (batch_o["seg"].stuff_logits[-1][0] - alone_o["seg"].stuff_logits[-1][0]).abs().max()
    assert float(diff) > 1e-3


def test_frozen_backbone_parts() -> None:
    """Official R50: stem + layer1 frozen, every BatchNorm frozen and kept in eval mode by train()."""
    with torch.device("meta"):
        model = PanopticSegFormer(get_config("panoptic_segformer_r50"))
    bb = model.backbone
    assert not any(p.requires_grad for p in bb.conv1.parameters())
    assert not any(p.requires_grad for p in bb.layer1.parameters())
    assert all(p.requires_grad for p in bb.layer2[0].conv1.parameters())
    assert not bb.layer3[0].bn1.weight.requires_grad
    model.train()
    assert not bb.layer3[0].bn1.training and model.bbox_head.training
    # norm_eval=False trains BatchNorm (full ResNet from scratch).
    with torch.device("meta"):
        tiny = PanopticSegFormer(panoptic_segformer_tiny(norm_eval=False)).train()
    assert tiny.backbone.layer1[0].bn2.training and tiny.backbone.layer1[0].bn2.weight.requires_grad


def test_sine_position_encoding_hand_computed() -> None:
    """mmdet layout: cat(pos_y, pos_x); sin/cos interleaved; (cumsum - 0.5) / extent * 2 pi."""
    import math

    from models.position_encoding import SinePositionalEncoding

    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    mask[0, :, 2] = True  # last column padded: the valid width is 2
    pos = SinePositionalEncoding(num_feats=4)(mask)
    assert pos.shape == (1, 8, 2, 3)
    y = (1 + 1 - 0.5) / (2 + 1e-6) * 2 * math.pi  # row 1
    x = (1 - 0.5) / (2 + 1e-6) * 2 * math.pi  # column 0
    dim_t = [1.0, 1.0, 100.0, 100.0]  # 10000 ** (2 * (k // 2) / 4)
    want = [math.sin(y / dim_t[0]), math.cos(y / dim_t[1]), math.sin(y / dim_t[2]), math.cos(y / dim_t[3]),
            math.sin(x / dim_t[0]), math.cos(x / dim_t[1]), math.sin(x / dim_t[2]), math.cos(x / dim_t[3])]
    assert torch.allclose(pos[0, :, 1, 0], torch.tensor(want), atol=1e-6)


def test_encoder_reference_points_and_valid_ratios() -> None:
    """Pixel centres normalised by the valid extent, then scaled by each level's valid ratio."""
    from models.transformer import DeformableTransformer, Encoder

    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :, 2:] = True
    ratio = DeformableTransformer.get_valid_ratio(mask)
    assert ratio.tolist() == [[0.5, 1.0]]
    ref = Encoder.get_reference_points(torch.tensor([[4, 4]]), ratio[:, None])
    # Pixel (row 1, col 1): x = 1.5 / (0.5 * 4) * 0.5 = 0.375 = 1.5 / 4 in padded units; y = 1.5 / 4.
    assert torch.allclose(ref[0, 5, 0], torch.tensor([0.375, 0.375]))


def test_neck_extra_level_reads_raw_c5() -> None:
    from models.neck import ChannelMapper

    torch.manual_seed(0)
    neck = ChannelMapper((8, 16, 32), 16, 4, gn_groups=4).eval()
    feats = [torch.randn(1, 8, 16, 16), torch.randn(1, 16, 8, 8), torch.randn(1, 32, 4, 4)]
    outs = neck(feats)
    assert [tuple(o.shape) for o in outs] == [(1, 16, 16, 16), (1, 16, 8, 8), (1, 16, 4, 4), (1, 16, 2, 2)]
    assert all(c.conv.bias is None for c in neck.convs) and neck.extra_convs[0].conv.in_channels == 32
    with torch.no_grad():
        neck.convs[2].conv.weight.zero_()  # the mapped C5 changes, the stride-64 level must not
    assert torch.equal(neck(feats)[3], outs[3])


def test_pretrained_backbone_from_local_file(tmp_path: Path) -> None:
    """`pretrained_backbone` loads torchvision-style weights (classifier ignored) from a path; nothing downloads."""
    torch.manual_seed(5)
    bn = {"backbone_norm": "bn", "backbone_width": None}  # a standard (torchvision-layout) ResNet-18
    donor = PanopticSegFormer(panoptic_segformer_tiny(num_things=2, num_stuff=1, **bn)).backbone
    state = dict(donor.state_dict())
    state["fc.weight"] = torch.zeros(1000, 512)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": state}, path)
    model = PanopticSegFormer(panoptic_segformer_tiny(num_things=2, num_stuff=1, pretrained_backbone=str(path), **bn))
    assert torch.equal(model.backbone.layer3[1].conv2.weight, donor.layer3[1].conv2.weight)
    assert torch.equal(model.backbone.bn1.running_var, donor.bn1.running_var)
