"""Losses against independent oracles (torchvision, OpenCV, hand computation) and the full criterion."""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import generalized_box_iou_loss
from torchvision.ops import sigmoid_focal_loss as tv_focal

from models.box_ops import box_cxcywh_to_xyxy
from models.losses import LossConfig, PanopticCriterion, dice_loss, giou_loss, l1_loss, sigmoid_focal_loss
from models.matcher import HungarianMatcher, MatcherConfig


def test_sigmoid_focal_loss_matches_torchvision() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 4, generator=gen) * 2
    labels = torch.tensor([0, 4, 2, 4, 4, 3, 1])  # 4 = background
    target = torch.zeros(7, 4)
    for i, lab in enumerate(labels.tolist()):
        if lab < 4:
            target[i, lab] = 1
    ref = tv_focal(logits, target, alpha=0.25, gamma=2.0, reduction="sum") / 3.0
    torch.testing.assert_close(sigmoid_focal_loss(logits, labels, avg_factor=3.0), ref)


def test_dice_loss_hand_computed_no_sigmoid() -> None:
    pred = torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    eps = 1e-6
    d0 = 1 - 2 * 3 / (5 + eps + 2 + eps)
    d1 = 1 - 0 / (1 + eps + 0 + eps)
    assert float(dice_loss(pred, target)) == pytest.approx(d0 + d1, rel=1e-6)
    assert float(dice_loss(pred, target, weight=torch.tensor([1.0, 0.0]), avg_factor=2.0)) == pytest.approx(
        d0 / 2, rel=1e-6
    )
    # Raw values above 1 are penalised (no sigmoid squashes them).
    assert float(dice_loss(target[:1] * 3, target[:1])) > 0.3


def test_box_losses_match_torchvision() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.cat([torch.rand(5, 2, generator=gen) * 50, torch.rand(5, 2, generator=gen) * 50 + 60], 1)
    b = torch.cat([torch.rand(5, 2, generator=gen) * 50, torch.rand(5, 2, generator=gen) * 50 + 60], 1)
    torch.testing.assert_close(giou_loss(a, b, avg_factor=2.0), generalized_box_iou_loss(a, b, reduction="sum") / 2.0)
    assert float(l1_loss(a, b, avg_factor=4.0)) == pytest.approx(float((a - b).abs().sum()) / 4.0, rel=1e-6)


class _FixedModel(nn.Module):
    """Tiny stand-in with learnable fixed outputs, so every loss term can be computed by hand.

    Queries are one-hot rows, so `segment` maps each gathered query back to its own mask in a bank.
    """

    def __init__(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        bank: torch.Tensor,
        stuff: torch.Tensor,
        stuff_logits: torch.Tensor,
    ) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)  # (L, B, Q, C)
        self.boxes = nn.Parameter(boxes)  # (L, B, Q, 4)
        self.bank = nn.Parameter(bank)  # (Q, h, w)
        self.stuff = nn.Parameter(stuff)  # (B, Ns, h, w)
        self.stuff_logits = nn.Parameter(stuff_logits)  # (B, Ns)

    def encode(self, images: torch.Tensor, pad_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(images=images)

    def locate(self, enc: SimpleNamespace) -> SimpleNamespace:
        q = self.bank.shape[0]
        b = self.logits.shape[1]
        return SimpleNamespace(logits=self.logits, boxes=self.boxes, queries=torch.eye(q).expand(b, q, q))

    def segment(self, enc: SimpleNamespace, thing_queries: torch.Tensor) -> SimpleNamespace:
        things = torch.einsum("bkq,qhw->bkhw", thing_queries, self.bank)
        return SimpleNamespace(thing_masks=[things], stuff_masks=[self.stuff], stuff_logits=[self.stuff_logits])


def test_criterion_hand_computed() -> None:
    # One 8x8 image: thing of class 1 on the top-left 4x4 block, stuff class 0 (label 2) elsewhere.
    nt, ns = 2, 2
    gt_thing = torch.zeros(1, 8, 8, dtype=torch.bool)
    gt_thing[0, :4, :4] = True
    gt_box = torch.tensor([[0.25, 0.25, 0.5, 0.5]])
    logits = torch.tensor([[[[-2.0, 3.0], [0.5, -1.0]]]])  # query 0 is the confident class-1 query
    boxes = torch.tensor([[[[0.25, 0.25, 0.5, 0.5], [0.7, 0.7, 0.2, 0.2]]]])
    bank = torch.zeros(2, 4, 4)
    bank[0, :2, :2] = 0.9
    bank[0, 2, 0] = 0.3
    bank[1, 2:, 2:] = 1.0
    stuff = torch.zeros(1, ns, 4, 4)
    stuff[0, 0] = 0.8
    stuff[0, 0, :2, :2] = 0.1
    stuff[0, 1, 0, 0] = 0.5
    stuff_logits = torch.tensor([[1.5, -0.5]])
    model = _FixedModel(logits, boxes, bank, stuff, stuff_logits)
    targets = [
        {
            "thing_masks": gt_thing,
            "thing_boxes": gt_box,
            "thing_labels": torch.tensor([1]),
            "stuff_masks": ~gt_thing,
            "stuff_labels": torch.tensor([2]),
            "image_size": torch.tensor([8, 8]),
        }
    ]
    crit = PanopticCriterion(nt, ns)
    total, logs = crit(model, torch.zeros(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool), targets)

    # Independent expected values.
    focal_th = tv_focal(logits[0, 0], torch.tensor([[0.0, 1.0], [0.0, 0.0]]), 0.25, 2.0, reduction="sum")
    up = cv2.resize(bank[0].numpy(), (8, 8), interpolation=cv2.INTER_LINEAR)
    t = gt_thing[0].numpy().astype(np.float64)
    dice_th = 1 - 2 * (up * t).sum() / ((up * up).sum() + 1e-6 + (t * t).sum() + 1e-6)
    up_st = cv2.resize(stuff[0, 0].numpy(), (8, 8), interpolation=cv2.INTER_LINEAR)
    ts = 1 - t
    dice_st = 1 - 2 * (up_st * ts).sum() / ((up_st * up_st).sum() + 1e-6 + (ts * ts).sum() + 1e-6)
    focal_st = tv_focal(stuff_logits.reshape(2, 1), torch.tensor([[1.0], [0.0]]), 0.25, 2.0, reduction="sum")
    ratio = 0.5  # one thing, one stuff
    assert logs["d0.loss_cls"] == pytest.approx(ratio * 2 * float(focal_th), rel=1e-5)
    assert logs["d0.loss_l1"] == pytest.approx(0.0, abs=1e-6)
    assert logs["d0.loss_giou"] == pytest.approx(0.0, abs=1e-6)
    assert logs["loss_mask_things"] == pytest.approx(ratio * 2 * dice_th, rel=1e-5)
    assert logs["loss_mask_stuff"] == pytest.approx(ratio * 2 * dice_st, rel=1e-5)
    assert logs["d0.loss_cls_stuff_f"] == pytest.approx(ratio * 4 * float(focal_st), rel=1e-5)  # the hidden x2
    expected = ratio * (2 * float(focal_th) + 2 * dice_th) + ratio * (2 * dice_st + 4 * float(focal_st))
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)

    # Options: no stuff doubling, no ratios.
    crit2 = PanopticCriterion(nt, ns, config=LossConfig(double_stuff_cls=False, ratio_mode="none"))
    _, logs2 = crit2(model, torch.zeros(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool), targets)
    assert logs2["d0.loss_cls_stuff_f"] == pytest.approx(2 * float(focal_st), rel=1e-5)
    assert logs2["loss_mask_things"] == pytest.approx(2 * dice_th, rel=1e-5)

    # Gradients reach the matched query's mask, not the unmatched one.
    total.backward()
    assert model.bank.grad[0].abs().sum() > 0
    assert model.bank.grad[1].abs().sum() == 0
    assert model.stuff.grad[0, 1].abs().sum() == 0  # absent stuff class has weight 0


def test_criterion_gt_matching_swaps_query_order() -> None:
    # Query 1 is the good one now: the matched query, not the first, must be supervised.
    logits = torch.tensor([[[[0.5, -1.0], [-2.0, 3.0]]]])
    boxes = torch.tensor([[[[0.7, 0.7, 0.2, 0.2], [0.25, 0.25, 0.5, 0.5]]]])
    bank = torch.zeros(2, 4, 4)
    bank[1, :2, :2] = 1.0
    model = _FixedModel(logits, boxes, bank, torch.zeros(1, 2, 4, 4), torch.zeros(1, 2))
    gt = torch.zeros(1, 8, 8, dtype=torch.bool)
    gt[0, :4, :4] = True
    targets = [
        {
            "thing_masks": gt,
            "thing_boxes": torch.tensor([[0.25, 0.25, 0.5, 0.5]]),
            "thing_labels": torch.tensor([1]),
            "stuff_masks": torch.zeros(0, 8, 8, dtype=torch.bool),
            "stuff_labels": torch.zeros(0, dtype=torch.long),
            "image_size": torch.tensor([8, 8]),
        }
    ]
    _, logs = PanopticCriterion(2, 2)(model, torch.zeros(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool), targets)
    assert logs["d0.loss_l1"] == pytest.approx(0.0, abs=1e-6)
    up = cv2.resize(bank[1].numpy(), (8, 8), interpolation=cv2.INTER_LINEAR)
    t = gt[0].numpy().astype(np.float64)
    dice = 1 - 2 * (up * t).sum() / ((up * up).sum() + 1e-6 + t.sum() + 1e-6)
    # No stuff GT: N_st clamps to 1, things_ratio = 1 / 2.
    assert logs["loss_mask_things"] == pytest.approx(0.5 * 2 * dice, rel=1e-5)
    # Box conversions used by the GIoU loss stay consistent.
    assert box_cxcywh_to_xyxy(torch.tensor([0.25, 0.25, 0.5, 0.5])).tolist() == [0.0, 0.0, 0.5, 0.5]


def _real_batch(root, num_things: int, cfg, n: int = 2):
    from harness.data.coco_panoptic import PanopticDataset
    from harness.engine.data import AugmentConfig, augment, collate, item_from_sample

    ds = PanopticDataset(root, "train2017")
    rng = np.random.default_rng(0)
    items = [augment(item_from_sample(ds[i], ds), AugmentConfig(enabled=False), cfg.test_scale, rng) for i in range(n)]
    return collate(items, num_things, cfg.pixel_mean, cfg.pixel_std)


@pytest.mark.parametrize("decouple,rounds", [(True, "official"), (True, "paper"), (False, "official")])
def test_criterion_on_tiny_model(synth_root, decouple: bool, rounds: str) -> None:
    from harness.data.coco_panoptic import PanopticDataset
    from models.configs import panoptic_segformer_tiny
    from models.panoptic_segformer import PanopticSegFormer

    cats = PanopticDataset(synth_root, "train2017").categories
    over = {} if decouple else {"decouple_queries": False, "num_thing_queries": 66}
    cfg = panoptic_segformer_tiny(num_things=cats.num_things, num_stuff=cats.num_stuff, test_scale=(128, 128), **over)
    torch.manual_seed(0)
    model = PanopticSegFormer(cfg)
    images, pad_mask, targets = _real_batch(synth_root, cats.num_things, cfg)
    assert pad_mask.any()  # two image sizes: the batch is padded
    seen: list[int] = []
    segment = model.segment
    model.segment = lambda enc, q: (seen.append(q.shape[1]), segment(enc, q))[1]  # record K, run the real decoder
    matcher = HungarianMatcher(MatcherConfig(rounds=rounds))
    total, logs = PanopticCriterion(cats.num_things, cats.num_stuff, matcher)(model, images, pad_mask, targets)
    n_gt = [len(t["thing_labels"]) + (0 if decouple else len(t["stuff_labels"])) for t in targets]
    # Official: the mask decoder gets exactly the N_gt round-1 queries; paper: min(3, Q // N_gt) rounds.
    per_image = n_gt if rounds == "official" else [min(3, cfg.num_thing_queries // n) * n for n in n_gt]
    assert seen == [max(per_image)]
    ld, tm, sm = cfg.num_location_layers, cfg.num_thing_mask_layers, cfg.num_stuff_mask_layers
    expected = {f"d{i}.loss_{k}" for i in range(ld) for k in ("cls", "l1", "giou")}
    expected |= {"loss_mask_things"} | {f"d{i}.loss_mask_things_f" for i in range(tm)}
    if decouple:
        expected |= {"loss_mask_stuff"} | {f"d{i}.loss_mask_stuff_f" for i in range(sm)}
        expected |= {f"d{i}.loss_cls_stuff_f" for i in range(sm)}
    assert set(logs) - {"loss"} == expected
    assert torch.isfinite(total)
    total.backward()
    head = model.bbox_head
    assert head.cls_branches[-1].weight.grad.abs().sum() > 0
    assert head.things_mask_head.parameters().__next__().grad is not None
    # Mask-decoder thing classes are weighted 0 officially: no gradient reaches them.
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in head.cls_thing_branches.parameters())
    if decouple:
        assert head.cls_stuff_branches[-1].weight.grad.abs().sum() > 0


def test_joint_targets_use_tight_stuff_boxes() -> None:
    crit = PanopticCriterion(2, 2)
    stuff = torch.zeros(1, 10, 20, dtype=torch.bool)
    stuff[0, 2:6, 4:14] = True  # rows 2-5, cols 4-13 -> xyxy (4, 2, 14, 6)
    t = {
        "thing_masks": torch.zeros(0, 10, 20, dtype=torch.bool),
        "thing_boxes": torch.zeros(0, 4),
        "thing_labels": torch.zeros(0, dtype=torch.long),
        "stuff_masks": stuff,
        "stuff_labels": torch.tensor([3]),
        "image_size": torch.tensor([10, 20]),
    }
    j = crit._joint_targets(t)
    assert j["thing_labels"].tolist() == [3] and j["stuff_labels"].numel() == 0
    torch.testing.assert_close(j["thing_boxes"], torch.tensor([[9 / 20, 4 / 10, 10 / 20, 4 / 10]]))


def test_mass_center_targets_hand_computed() -> None:
    """Box-free variant: GT 'boxes' become mass centres (cx, cy, 0, 0) of the unpadded image."""
    masks = torch.zeros(2, 12, 24, dtype=torch.bool)  # padded to 12 x 24; the image is 10 x 20
    masks[0, 2:4, 4:8] = True  # pixel centres x 4.5..7.5 -> 6.0, y 2.5..3.5 -> 3.0
    masks[1, 0, 0] = True
    masks[1, 9, 19] = True  # two pixels: centre ((0.5 + 19.5) / 2, (0.5 + 9.5) / 2) = (10, 5)
    t = {"thing_masks": masks, "thing_boxes": torch.zeros(2, 4), "image_size": torch.tensor([10, 20])}
    got = PanopticCriterion._center_targets(t)["thing_boxes"]
    torch.testing.assert_close(got, torch.tensor([[6.0 / 20, 3.0 / 10, 0, 0], [10.0 / 20, 5.0 / 10, 0, 0]]))


def test_box_free_variant_trains_centres_with_l1_only(synth_root) -> None:
    from harness.data.coco_panoptic import PanopticDataset
    from models.configs import panoptic_segformer_tiny
    from models.panoptic_segformer import PanopticSegFormer

    cats = PanopticDataset(synth_root, "train2017").categories
    cfg = panoptic_segformer_tiny(num_things=cats.num_things, num_stuff=cats.num_stuff, test_scale=(128, 128),
                                  box_free=True)
    torch.manual_seed(0)
    model = PanopticSegFormer(cfg)
    images, pad_mask, targets = _real_batch(synth_root, cats.num_things, cfg)
    crit = PanopticCriterion(cats.num_things, cats.num_stuff, HungarianMatcher(MatcherConfig(use_giou=False)),
                             LossConfig(use_giou=False, box_target="mass_center"))
    total, logs = crit(model, images, pad_mask, targets)
    assert not any("giou" in k for k in logs)
    l1_keys = [f"d{i}.loss_l1" for i in range(cfg.num_location_layers)]
    assert all(logs[k] > 0 for k in l1_keys)
    total.backward()
    assert model.bbox_head.reg_branches[-1][-1].weight.grad.abs().sum() > 0  # the centre regressor learns
