"""DETR panoptic baseline: released key layout, parameter counts, own post-processing (known answers, padding
bug), the PanopticModel contract, dump_raw, conversion errors, the PIL test transform and a short training run."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import flops_in_every_grad_mode, meta_state, read_key_list, train_steps

from models.baselines.common import COCO_PANOPTIC_IDS, read_released_pth
from models.baselines.detr import (DETRPanoptic, build_criterion, convert_state_dict, detr_r50_panoptic,
                                   detr_r101_panoptic, detr_tiny)
from models.baselines.detr_postprocess import detr_panoptic_postprocess
from models.checkpoint import CheckpointError, load_model, load_state_dict_strict
from models.postprocess import post_process

PERSON, SKY = 1, 184  # COCO panoptic ids (a thing, a stuff)


# ----------------------------------------------------------------------------------------------- released layout
def test_released_r50_key_list_loads_strictly_and_counts_match() -> None:
    keys = read_key_list("detr_r50_panoptic.txt")
    with torch.device("meta"):
        model = DETRPanoptic(detr_r50_panoptic())
    load_state_dict_strict(model, convert_state_dict(meta_state(keys), "detr_r50_panoptic.txt"))
    # Official parameter count: every element except the FrozenBatchNorm2d buffers (weight, bias, running stats).
    frozen_bn = [k for k in keys if ".bn" in k or ".downsample.1." in k]
    official = sum(int(np.prod(s)) for k, s in keys.items() if k not in frozen_bn)
    assert official == 42_899_288  # reference: baselines.md A1.3 (the paper's 42.9 M)
    assert sum(p.numel() for p in model.parameters()) == official


def test_r101_parameter_count_matches_table_1() -> None:
    with torch.device("meta"):
        model = DETRPanoptic(detr_r101_panoptic())
    n = sum(p.numel() for p in model.parameters())
    assert n == 61_839_192 and abs(n / 1e6 - 61.8) < 0.05  # Table 1: 61.8 M


def test_released_file_round_trip_with_args_namespace(tmp_path: Path) -> None:
    """A DETR-style training file ({"model", "args": Namespace}) loads with weights_only and converts exactly."""
    torch.manual_seed(0)
    cfg = detr_tiny(num_things=3, num_stuff=2)
    src = DETRPanoptic(cfg).eval()
    path = tmp_path / "detr.pth"
    torch.save({"model": src.state_dict(), "args": argparse.Namespace(lr=1e-4), "epoch": 3}, path)
    model, cfg2 = load_model(path, "detr_tiny", num_things=3, num_stuff=2)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = src(x), model(x)
    for k in ("pred_logits", "pred_boxes", "pred_masks"):
        assert torch.equal(a[k], b[k])
    state, extra = read_released_pth(path)
    assert extra["epoch"] == 3 and "detr.class_embed.weight" in state
    # harness convert -> our format -> the same model again (config round trip through model.json).
    from harness.cli import main

    out = tmp_path / "conv"
    assert main(["convert", "--from", "detr", "--model", "detr_tiny", "--in", str(path), "--out", str(out),
                 "--num-things", "3", "--num-stuff", "2"]) == 0
    again, cfg3 = load_model(out)
    assert cfg3 == cfg2 and isinstance(again, DETRPanoptic)
    with torch.no_grad():
        assert torch.equal(again(x)["pred_masks"], a["pred_masks"])


def test_wrong_family_checkpoint_is_named(tmp_path: Path) -> None:
    psf = meta_state(read_key_list("panoptic_segformer_r50.txt"))
    with pytest.raises(CheckpointError, match="Panoptic SegFormer"):
        convert_state_dict(psf, "psf.pth")
    ddetr = meta_state(read_key_list("ddetr_refine1_two0.txt"))
    with pytest.raises(CheckpointError, match="Deformable DETR"):
        convert_state_dict(ddetr, "ddetr.pth")
    # Through the loader with a real file: a clear error naming the file.
    path = tmp_path / "not_detr.pth"
    torch.save({"model": {"bbox_head.transformer.level_embeds": torch.zeros(4, 8)}}, path)
    with pytest.raises(CheckpointError, match=r"not_detr\.pth is not a DETR panoptic checkpoint"):
        load_model(path, "detr_r50_panoptic")


def test_non_tensor_pickles_are_refused(tmp_path: Path) -> None:
    import datetime

    path = tmp_path / "odd.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "extra": datetime.date(2020, 1, 1)}, path)  # not allow-listed
    with pytest.raises(CheckpointError, match=r"odd\.pth: refusing to load.*datetime\.date"):
        read_released_pth(path)


# ----------------------------------------------------------------------------------------------- own post-processing
def _masks(regions: list[list[tuple[slice, slice, float]]], shape: tuple[int, int]) -> torch.Tensor:
    out = torch.full((len(regions), *shape), -10.0)
    for q, parts in enumerate(regions):
        for ys, xs, v in parts:
            out[q, ys, xs] = v
    return out


@pytest.mark.parametrize("second_best", ["same_stuff", "thing"])
def test_postprocess_known_answer(second_best: str) -> None:
    """Stuff duplicates are merged then dropped, tiny segments removed, the id map is nearest-resized.

    q0 thing (cols 0-3), q1 stuff A (cols 4-7, rows 0-1), q2 stuff A duplicate (cols 4-7, rows 2-3), q3 thing
    winning one pixel. The duplicate's pixels go to the second-best query there after it is dropped.
    """
    full = slice(None)
    regions = [
        [(full, slice(0, 4), 5.0), (slice(0, 1), slice(0, 1), 4.0)],
        [(slice(0, 2), slice(4, 8), 5.0)],
        [(slice(2, 4), slice(4, 8), 5.0)],
        [(slice(0, 1), slice(0, 1), 6.0)],
    ]
    masks = _masks(regions, (4, 8))
    second = 1 if second_best == "same_stuff" else 0
    masks[second, 2:4, 4:8] = 3.0  # runner-up under the duplicate
    scores = torch.tensor([0.9, 0.95, 0.92, 0.99])
    labels = torch.tensor([0, 80, 80, 5])
    res = detr_panoptic_postprocess(scores, labels, masks, labels < 80, (4, 8), (8, 16))
    cat = res.category
    assert cat.shape == (8, 16)
    assert (cat[:, :8] == 0).all()
    if second_best == "same_stuff":
        assert (cat[:, 8:] == 80).all()
        assert [(s["label"], s["area"]) for s in res.segments] == [(0, 64), (80, 64)]
    else:  # DETR's "merge" hands the duplicate's pixels to another class (reference A1.2, step 5)
        assert (cat[:4, 8:] == 80).all() and (cat[4:, 8:] == 0).all()
        assert [(s["label"], s["area"]) for s in res.segments] == [(0, 96), (80, 32)]
    assert (res.instance[cat == 0] == 1).all() and (res.instance[cat == 80] == 0).all()


def test_postprocess_nothing_kept_is_void() -> None:
    res = detr_panoptic_postprocess(torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, 2, 2),
                                    torch.zeros(0, dtype=torch.bool), (8, 8), (5, 7))
    assert (res.category == -1).all() and res.segments == []


def _coco_tiny() -> DETRPanoptic:
    torch.manual_seed(0)
    return DETRPanoptic(detr_tiny(label_space="coco_panoptic_id", num_queries=6)).eval()


def _padded_batch_outputs() -> dict:
    """Hand-made outputs of a batch of two: image 0 is 16x32, image 1 is 8x32 padded to 16x32.

    In each image's own region q0 (person) wins the left half and q1 (sky) the right half; on image 1's padding
    (mask rows 2-3) q1 wins everywhere, which DETR's unfixed post-processing stretches into the image.
    """
    q = 6
    logits = torch.zeros(2, q, 251)
    logits[:, :, 250] = 10.0  # no-object
    logits[:, 0, 250], logits[:, 0, PERSON] = 0.0, 10.0
    logits[:, 1, 250], logits[:, 1, SKY] = 0.0, 10.0
    logits[:, 2, 250], logits[:, 2, PERSON] = 0.0, 7.0  # p = 0.81 < 0.85: dropped
    masks = torch.full((2, q, 4, 8), -10.0)
    for i in range(2):
        masks[i, 0, :, :4] = 10.0
        masks[i, 1, :, 4:] = 10.0
    masks[1, 0, 2:] = -10.0
    masks[1, 1, 2:] = 10.0
    masks[:, 2] = 20.0  # would win everywhere if kept
    return {"pred_logits": logits, "pred_masks": masks, "pred_boxes": torch.rand(2, q, 4),
            "aux_logits": logits[None].repeat(2, 1, 1, 1), "aux_boxes": torch.rand(2, 2, q, 4),
            "valid_sizes": torch.tensor([[16, 32], [8, 32]]), "image_size": (16, 32)}


def test_padding_bug_fixed_and_reproducible() -> None:
    model = _coco_tiny()
    out = _padded_batch_outputs()
    person, sky = COCO_PANOPTIC_IDS.index(PERSON), COCO_PANOPTIC_IDS.index(SKY)
    for i, size in ((0, (16, 32)), (1, (8, 32))):
        res = model.own_post_process(out, i, size)
        assert (res.category[:, :16] == person).all() and (res.category[:, 16:] == sky).all()
        assert [s["area"] for s in res.segments] == [size[0] * 16, size[0] * 16]
    model.cfg.reproduce_padding_bug = True
    bug = model.own_post_process(out, 1, (8, 32))
    # The 4-row canvas (2 image rows + 2 padding rows) is stretched over the 8 image rows: rows 4-7 become sky.
    # Row 3 samples canvas row 1.25: at column 15 (canvas x 3.375) sky wins 0.625 to -0.625 (bilinear by hand).
    assert (bug.category[:3, :16] == person).all() and (bug.category[3, :15] == person).all()
    assert bug.category[3, 15] == sky and (bug.category[4:] == sky).all()
    assert [s["area"] for s in bug.segments] == [63, 193]
    assert np.array_equal(model.own_post_process(out, 0, (16, 32)).category,
                          model.own_post_process(_padded_batch_outputs(), 0, (16, 32)).category)


def test_contract_candidates_and_every_post_processor() -> None:
    model = _coco_tiny()
    out = _padded_batch_outputs()
    assert model.default_post_process == "own" and model.mask_layers() == ["last"]
    spec = model.test_transform()
    assert (spec.resize, spec.short, spec.long, spec.channel_order) == ("pil", 256, 256, "rgb")
    c = model.candidates(out, 1)
    assert c.masks.shape == (6, 2, 8) and c.scores.shape == (6,) and c.boxes.shape == (6, 4)
    assert torch.equal(c.query_index, torch.arange(6))
    assert float(c.masks.max()) <= 1.0 and float(c.masks.min()) >= 0.0  # sigmoid probabilities
    person, sky = COCO_PANOPTIC_IDS.index(PERSON), COCO_PANOPTIC_IDS.index(SKY)
    assert c.labels[:3].tolist() == [person, sky, person]
    for method in ("m", "p", "p*", "heuristic"):
        res = post_process(method, c, model.cfg.num_things, (8, 32), **model.post_process_options(method))
        assert res.category.shape == (8, 32)
    p = post_process("p", c, model.cfg.num_things, (8, 32), **model.post_process_options("p"))
    assert (p.category[:, :16] == person).all() and (p.category[:, 16:] == sky).all()
    with pytest.raises(ValueError):
        model.candidates(out, 0, layer="1")


def test_dump_raw_keys_shapes_and_category_ids() -> None:
    model = _coco_tiny()
    out = _padded_batch_outputs()

    class Prep:
        ori_shape = (8, 32)

    raw = model.dump_raw(out, 1, Prep(), None)
    assert sorted(raw) == sorted(["pred_logits", "pred_boxes", "pred_masks", "aux_logits", "aux_boxes",
                                  "panoptic_category"])
    assert raw["pred_logits"].shape == (6, 251) and raw["pred_logits"].dtype == np.float32
    assert raw["pred_boxes"].shape == (6, 4)
    assert raw["pred_masks"].shape == (6, 2, 8)  # the image's own stride-4 region
    assert raw["aux_logits"].shape == (2, 6, 251) and raw["aux_boxes"].shape == (2, 6, 4)
    cat = raw["panoptic_category"]
    assert cat.shape == (8, 32) and cat.dtype == np.int32
    assert set(np.unique(cat).tolist()) == {PERSON, SKY}  # COCO panoptic ids, not contiguous indices


# ----------------------------------------------------------------------------------------------- forward, FLOPs
def test_forward_shapes_padding_and_flops() -> None:
    torch.manual_seed(0)
    model = DETRPanoptic(detr_tiny(num_things=3, num_stuff=2)).eval()
    x = torch.randn(2, 3, 61, 90)
    pad = torch.zeros(2, 61, 90, dtype=torch.bool)
    pad[1, 40:] = True
    pad[1, :, 70:] = True
    flops, out = flops_in_every_grad_mode(model, x, pad)
    assert flops[0] > 0 and len(set(flops)) == 1
    assert out["pred_logits"].shape == (2, 20, 6) and out["pred_masks"].shape == (2, 20, 16, 23)
    assert out["aux_logits"].shape == (2, 2, 20, 6) and torch.equal(out["aux_logits"][-1], out["pred_logits"])
    assert out["valid_sizes"].tolist() == [[61, 90], [40, 70]]
    assert model.candidates(out, 1).masks.shape == (20, 10, 18)
    res = model.own_post_process(out, 1, (80, 140))
    assert res.category.shape == (80, 140)
    with pytest.raises(ValueError, match="mask_layer"):
        model(x, pad, mask_layer=1)


# ----------------------------------------------------------------------------------------------- PIL test transform
def test_pil_transform_equals_torchvision() -> None:
    """``prepare`` with the DETR spec equals DETR's val transform built from torchvision (independent oracle)."""
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF
    from PIL import Image

    from harness.data.transforms import detr_resize_size, prepare

    spec = _coco_tiny().test_transform().__class__(resize="pil")  # the R50 models' spec (800 / 1333)
    rng = np.random.default_rng(0)
    for h, w in ((48, 64), (61, 200), (333, 333), (640, 425)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        prep = prepare(spec, img)
        oh, ow = detr_resize_size(w, h, 800, 1333)
        ref = TF.resize(Image.fromarray(img), [oh, ow])
        ref = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])(T.ToTensor()(ref)).numpy()
        assert prep.img_shape == (oh, ow) and prep.ori_shape == (h, w)
        assert np.array_equal(prep.image, ref)
    assert detr_resize_size(1500, 500, 800, 1333) == (444, 1332)  # capped: short = round(1333 * 500 / 1500)
    assert detr_resize_size(640, 427, 800, 1333) == (800, 1199)  # truncation, not rounding


def test_coco_ids_match_the_harness_categories() -> None:
    from harness.data.coco_panoptic import coco_category_map

    cmap = coco_category_map()
    assert tuple(cmap.ids) == COCO_PANOPTIC_IDS and cmap.num_things == 80


# ----------------------------------------------------------------------------------------------- training
def test_tiny_trains_with_falling_loss(synth_root: Path) -> None:
    from harness.data.coco_panoptic import PanopticDataset

    torch.manual_seed(0)
    ds = PanopticDataset(synth_root, "train2017")
    cats = ds.categories
    cfg = detr_tiny(num_things=cats.num_things, num_stuff=cats.num_stuff, test_short=64, test_long=64,
                    num_queries=12)
    model = DETRPanoptic(cfg).train()
    crit = build_criterion(cfg, cats.num_things, cats.num_stuff)
    losses, logs = train_steps(model, crit, ds, 64, steps=14, lr=3e-3)
    assert {"ce", "bbox", "giou", "mask", "dice", "ce_0"} <= set(logs)
    # The synthetic set's larger objects (since the tiny-recipe change) leave DETR's loss ~13 % lower after 14 steps.
    assert np.isfinite(losses).all() and losses[-1] < 0.9 * losses[0], losses
    assert all(b < a for a, b in zip(losses[:6], losses[1:7])), losses  # falling at every early step
    with pytest.raises(ValueError, match="classes"):
        build_criterion(cfg, cats.num_things + 1, cats.num_stuff)


def test_r50_raw_dump_shapes_on_a_small_input() -> None:
    """The released R50 layout end to end at 64x96 (random weights): the issue's raw keys and shapes."""
    from harness.data.transforms import prepare

    torch.manual_seed(0)
    model = DETRPanoptic(detr_r50_panoptic()).eval()
    spec = model.test_transform()
    small = spec.__class__(resize="pil", short=64, long=96)
    prep = prepare(small, np.random.default_rng(0).integers(0, 256, (120, 170, 3), dtype=np.uint8))
    assert prep.img_shape == (64, 90)
    with torch.no_grad():
        out = model(torch.from_numpy(prep.image)[None])
    raw = model.dump_raw(out, 0, prep, model.own_post_process(out, 0, prep.ori_shape))
    shapes = {k: v.shape for k, v in raw.items()}
    assert shapes == {"pred_logits": (100, 251), "pred_boxes": (100, 4), "pred_masks": (100, 16, 23),
                      "aux_logits": (6, 100, 251), "aux_boxes": (6, 100, 4), "panoptic_category": (120, 170)}
    np.testing.assert_array_equal(raw["aux_logits"][-1], raw["pred_logits"])


def test_predict_path_on_a_synthetic_image(synth_root: Path) -> None:
    """What `harness predict` does through the contract: read, prepare, forward, own post-processing, dump."""
    from harness.data.coco_panoptic import PanopticDataset
    from harness.data.transforms import prepare

    ds = PanopticDataset(synth_root, "val2017")
    sample = ds[0]
    torch.manual_seed(0)
    model = DETRPanoptic(detr_tiny(num_things=ds.categories.num_things, num_stuff=ds.categories.num_stuff)).eval()
    prep = prepare(model.test_transform(), sample.image)
    with torch.no_grad():
        out = model(torch.from_numpy(prep.image)[None])
    own = model.own_post_process(out, 0, prep.ori_shape)
    assert own.category.shape == sample.image.shape[:2]
    raw = model.dump_raw(out, 0, prep, own)
    assert np.array_equal(raw["panoptic_category"] >= 0, own.category >= 0)
