"""D-DETR-MS baseline: Deformable DETR key layouts (with / without box refinement, two-stage refused), the explicit
detector-only load, parameter counts, own post-processing and top-100 dump on hand-made outputs, the contract and a
short training run."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import flops_in_every_grad_mode, meta_state, read_key_list, train_steps

from models.baselines.common import COCO_PANOPTIC_IDS, fill_new_keys
from models.baselines.deformable_detr import (HEAD_PREFIXES, DeformableDETRPanoptic, build_criterion,
                                              convert_deformable_detr, convert_state_dict, deformable_detr_r50_ms,
                                              deformable_detr_r50_ms_refine, deformable_detr_tiny,
                                              to_official_names)
from models.checkpoint import CheckpointError, load_model, load_state_dict_strict
from models.postprocess import post_process

def zeros_state(keys: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Small real tensors would not fit R50; zero tensors are cheap and let the equal-copies check run."""
    return {k: torch.zeros(s) for k, s in keys.items()}


@pytest.mark.parametrize("name,factory,detector_params", [
    ("ddetr_refine0_two0.txt", deformable_detr_r50_ms, 40_069_665),  # reference A2: unique parameters
    ("ddetr_refine1_two0.txt", deformable_detr_r50_ms_refine, None),
])
def test_released_key_lists_load_strictly(name: str, factory, detector_params: int | None) -> None:
    keys = read_key_list(name)
    cfg = factory()
    with torch.device("meta"):
        model = DeformableDETRPanoptic(cfg)
    state = {k: v.to("meta") for k, v in convert_state_dict(zeros_state(keys), cfg, name).items()}
    # Without filling the head the strict load must fail, listing exactly the panoptic head.
    with pytest.raises(CheckpointError) as err:
        load_state_dict_strict(model, state, name)
    assert err.value.missing and all(k.startswith(HEAD_PREFIXES) for k in err.value.missing)
    assert not err.value.unexpected and not err.value.mismatched
    full, report = fill_new_keys(model, state, HEAD_PREFIXES, name)
    load_state_dict_strict(model, full, name)
    assert sorted(report.new) == sorted(k for k in model.state_dict() if k.startswith(HEAD_PREFIXES))
    assert set(report.from_file) == set(state)
    # Refinement checkpoints carry 36 decoder aliases of bbox_embed; they are checked and dropped.
    assert len(keys) - len(state) == (36 if cfg.with_box_refine else 0)
    unique = {id(p): p.numel() for n, p in model.named_parameters() if not n.startswith(HEAD_PREFIXES)}
    if detector_params is not None:
        assert sum(unique.values()) == detector_params
    # refine: 5 extra independent class heads (91 x 256 + 91) and box MLPs (2 x 65792 + 1028)
    else:
        assert sum(unique.values()) == 40_069_665 + 5 * (91 * 257) + 5 * (2 * 65_792 + 1_028)


def test_values_land_in_the_right_modules() -> None:
    keys = read_key_list("ddetr_refine1_two0.txt")
    g = torch.Generator().manual_seed(0)
    small = {k: s for k, s in keys.items() if not k.startswith("backbone.")}
    state = {k: torch.randn(s, generator=g) for k, s in small.items()}
    for k in ("transformer.decoder.bbox_embed.3.layers.1.weight",):
        state[k] = state[k[len("transformer.decoder."):]]
    for k, v in list(state.items()):  # aliases must equal their twins
        if k.startswith("transformer.decoder.bbox_embed."):
            state[k] = state[k[len("transformer.decoder."):]]
    cfg = deformable_detr_r50_ms_refine()
    out = convert_state_dict(state, cfg, "x.pth")
    tr = "transformer.decoder.layers.2."
    assert torch.equal(out[tr + "norms.0.weight"], state[tr + "norm2.weight"])  # after self-attention
    assert torch.equal(out[tr + "norms.1.weight"], state[tr + "norm1.weight"])  # after cross-attention
    assert torch.equal(out[tr + "attentions.0.attn.in_proj_weight"], state[tr + "self_attn.in_proj_weight"])
    assert torch.equal(out[tr + "attentions.1.value_proj.weight"], state[tr + "cross_attn.value_proj.weight"])
    assert torch.equal(out["transformer.encoder.layers.4.ffns.0.layers.0.0.weight"],
                       state["transformer.encoder.layers.4.linear1.weight"])
    assert torch.equal(out["transformer.level_embeds"], state["transformer.level_embed"])


def test_layout_errors_are_clear() -> None:
    two = zeros_state(read_key_list("ddetr_refine1_two1.txt"))
    with pytest.raises(CheckpointError, match="two-stage"):
        convert_state_dict(two, deformable_detr_r50_ms_refine(), "two.pth")
    refine = zeros_state(read_key_list("ddetr_refine1_two0.txt"))
    with pytest.raises(CheckpointError, match="use deformable_detr_r50_ms_refine"):
        convert_state_dict(refine, deformable_detr_r50_ms(), "refine.pth")
    plain = zeros_state(read_key_list("ddetr_refine0_two0.txt"))
    plain["class_embed.3.bias"] = torch.ones_like(plain["class_embed.3.bias"])
    with pytest.raises(CheckpointError, match=r"class_embed\.3\.bias differs"):
        convert_state_dict(plain, deformable_detr_r50_ms(), "plain.pth")
    detr = meta_state(read_key_list("detr_r50_panoptic.txt"))
    with pytest.raises(CheckpointError, match="DETR panoptic"):
        convert_state_dict(detr, deformable_detr_r50_ms(), "detr.pth")


def _tiny(**kw) -> DeformableDETRPanoptic:
    torch.manual_seed(0)
    return DeformableDETRPanoptic(deformable_detr_tiny(num_things=3, num_stuff=2, **kw)).eval()


def test_detector_only_file_load_reports_new_keys(tmp_path: Path) -> None:
    """A detection file (Deformable DETR names + args) -> detector equal to the source, head listed as new."""
    src = _tiny()
    path = tmp_path / "ddetr.pth"
    torch.save({"model": to_official_names(src.state_dict(), src.cfg), "args": argparse.Namespace(lr=2e-4)}, path)
    state = convert_deformable_detr(path, src.cfg)
    report = state.partial_load
    head = sorted(k for k in src.state_dict() if k.startswith(HEAD_PREFIXES))
    assert sorted(report.new) == head and all(report.reasons[k] == "not in the file" for k in head)
    model, _ = load_model(path, "deformable_detr_tiny", num_things=3, num_stuff=2)
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        a, b = src(x), model(x)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])
    # Seeded head initialisation: converting twice gives the same tensors.
    again = convert_deformable_detr(path, src.cfg)
    assert all(torch.equal(state[k], again[k]) for k in head)
    # Another class count: class_embed is new too, with the reason given.
    other = deformable_detr_tiny(num_things=4, num_stuff=2)
    rep2 = convert_deformable_detr(path, other).partial_load
    assert "class_embed.0.weight" in rep2.new and "shape" in rep2.reasons["class_embed.0.weight"]
    assert "query_embed.weight" in rep2.from_file


def test_convert_cli_writes_partial_load_record(tmp_path: Path) -> None:
    import json

    from harness.cli import main

    src = _tiny()
    path = tmp_path / "ddetr.pth"
    torch.save({"model": to_official_names(src.state_dict(), src.cfg)}, path)
    out = tmp_path / "conv"
    assert main(["convert", "--from", "deformable-detr", "--model", "deformable_detr_tiny", "--in", str(path),
                 "--out", str(out), "--num-things", "3", "--num-stuff", "2"]) == 0
    meta = json.loads((out / "model.json").read_text())["meta"]
    assert meta["source_format"] == "deformable-detr" and meta["partial_load"]["new"]
    assert main(["convert", "--from", "detr", "--model", "deformable_detr_tiny", "--in", str(path),
                 "--out", str(tmp_path / "x"), "--num-things", "3", "--num-stuff", "2"]) == 2


# ----------------------------------------------------------------------------------------------- hand-made outputs
def _outputs() -> dict:
    """One 16x32 image, 30 queries, 5 classes (3 things + 2 stuff).

    q0: class 0 (p 0.95) and class 1 (p 0.73) with the left-half mask; q1: stuff class 3 (p 0.88), right half;
    q2: class 0 (p 0.38) whose mask loses everywhere; every other score is 0.0067.
    """
    logits = torch.full((1, 30, 5), -5.0)
    logits[0, 0, 0], logits[0, 0, 1], logits[0, 1, 3], logits[0, 2, 0] = 3.0, 1.0, 2.0, -0.5
    masks = torch.full((1, 30, 4, 8), -10.0)
    masks[0, 0, :, :4] = 10.0
    masks[0, 1, :, 4:] = 10.0
    masks[0, 2] = -5.0
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5]]).repeat(1, 30, 1)
    return {"pred_logits": logits, "pred_boxes": boxes, "pred_masks": masks,
            "aux_logits": logits[None].repeat(2, 1, 1, 1), "aux_boxes": boxes[None].repeat(2, 1, 1, 1),
            "valid_sizes": torch.tensor([[16, 32]]), "image_size": (16, 32)}


def test_own_post_process_known_answer() -> None:
    model = _tiny()
    res = model.own_post_process(_outputs(), 0, (32, 64))
    assert (res.category[:, :32] == 0).all() and (res.category[:, 32:] == 3).all()
    assert [(s["label"], s["isthing"], s["area"]) for s in res.segments] == [(0, True, 1024), (3, False, 1024)]
    assert abs(res.segments[0]["score"] - float(torch.sigmoid(torch.tensor(3.0)))) < 1e-6


def test_candidates_and_every_post_processor() -> None:
    model = _tiny()
    out = _outputs()
    c = model.candidates(out, 0)
    assert c.scores.shape == (30,) and c.masks.shape == (30, 4, 8)  # min(max_per_image 30, 30 x 5)
    assert c.query_index[:4].tolist() == [0, 1, 0, 2] and c.labels[:4].tolist() == [0, 3, 1, 0]
    assert bool((c.scores[:-1] >= c.scores[1:]).all())
    for method in ("m", "p", "p*", "heuristic"):
        res = post_process(method, c, 3, (16, 32), **model.post_process_options(method))
        assert res.category.shape == (16, 32)
    p = post_process("p", c, 3, (16, 32), **model.post_process_options("p"))
    assert (p.category[:, :16] == 0).all() and (p.category[:, 16:] == 3).all()


def test_dump_raw_top100_equals_an_independent_ranking() -> None:
    model = _tiny()
    g = torch.Generator().manual_seed(3)
    out = _outputs()
    out["pred_logits"] = torch.randn(1, 30, 5, generator=g)
    out["pred_boxes"] = torch.rand(1, 30, 4, generator=g) * 0.5 + 0.25

    class Prep:
        ori_shape = (120, 200)

    raw = model.dump_raw(out, 0, Prep(), None)
    assert sorted(raw) == sorted(["pred_logits", "pred_boxes", "aux_logits", "aux_boxes", "topk_scores",
                                  "topk_labels", "topk_boxes"])
    assert raw["aux_logits"].shape == (2, 30, 5) and raw["topk_labels"].dtype == np.int64
    prob = 1 / (1 + np.exp(-out["pred_logits"][0].numpy().astype(np.float64)))
    order = np.argsort(-prob.ravel(), kind="stable")[:100]
    assert np.array_equal(raw["topk_labels"], order % 5)
    np.testing.assert_allclose(raw["topk_scores"], prob.ravel()[order], rtol=1e-6)
    b = out["pred_boxes"][0].numpy()[order // 5]
    xyxy = np.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1)
    np.testing.assert_allclose(raw["topk_boxes"], xyxy * [200, 120, 200, 120], rtol=1e-5)


def test_coco_detection_label_space_maps_thing_ids() -> None:
    cfg = deformable_detr_r50_ms()
    assert cfg.num_logit_classes == 91 and cfg.class_logit_index == COCO_PANOPTIC_IDS[:80]
    with pytest.raises(ValueError, match="coco_detection_id"):
        deformable_detr_r50_ms(num_things=3, num_stuff=2)


def test_forward_shapes_and_padding() -> None:
    model = _tiny()
    x = torch.randn(2, 3, 70, 90)
    pad = torch.zeros(2, 70, 90, dtype=torch.bool)
    pad[1, 50:] = True
    flops, out = flops_in_every_grad_mode(model, x, pad)
    assert flops[0] > 0 and len(set(flops)) == 1
    assert out["pred_logits"].shape == (2, 30, 5) and out["pred_masks"].shape == (2, 30, 18, 23)
    assert out["aux_boxes"].shape == (2, 2, 30, 4) and out["valid_sizes"].tolist() == [[70, 90], [50, 90]]
    assert model.candidates(out, 1).masks.shape == (30, 13, 23)
    assert model.mask_layers() == ["last"] and model.default_post_process == "own"


# ----------------------------------------------------------------------------------------------- training
def test_tiny_trains_with_falling_loss(synth_root: Path) -> None:
    from harness.data.coco_panoptic import PanopticDataset

    torch.manual_seed(0)
    ds = PanopticDataset(synth_root, "train2017")
    cats = ds.categories
    cfg = deformable_detr_tiny(num_things=cats.num_things, num_stuff=cats.num_stuff, test_short=64, test_long=64,
                               num_queries=12, max_per_image=12)
    model = DeformableDETRPanoptic(cfg).train()
    crit = build_criterion(cfg, cats.num_things, cats.num_stuff)
    losses, logs = train_steps(model, crit, ds, 64, steps=12, lr=1e-3)
    assert {"ce", "bbox", "giou", "mask", "dice", "ce_0"} <= set(logs)
    assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0], losses
    # The released label space has no stuff logits: training stuff on it is refused clearly.
    det = build_criterion(deformable_detr_r50_ms(), 80, 53)
    t = {"thing_labels": torch.tensor([0]), "stuff_labels": torch.tensor([85]), "image_size": torch.tensor([8, 8]),
         "thing_boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "thing_masks": torch.ones(1, 8, 8, dtype=torch.bool),
         "stuff_masks": torch.ones(1, 8, 8, dtype=torch.bool)}
    with pytest.raises(ValueError, match="label_space='contiguous'"):
        det._targets(t, torch.device("cpu"))


def test_r50_refine_raw_dump_shapes_on_a_small_input() -> None:
    torch.manual_seed(0)
    model = DeformableDETRPanoptic(deformable_detr_r50_ms_refine()).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))

    class Prep:
        ori_shape = (480, 720)

    raw = model.dump_raw(out, 0, Prep(), model.own_post_process(out, 0, (480, 720)))
    assert {k: v.shape for k, v in raw.items()} == {
        "pred_logits": (300, 91), "pred_boxes": (300, 4), "aux_logits": (6, 300, 91), "aux_boxes": (6, 300, 4),
        "topk_scores": (100,), "topk_labels": (100,), "topk_boxes": (100, 4)}
    assert out["pred_masks"].shape == (1, 300, 16, 24)
    c = model.candidates(out, 0)
    assert c.masks.shape == (100, 16, 24) and int(c.labels.max()) < 80  # detection label space: things only
