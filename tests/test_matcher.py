"""Hungarian matching: cost formulas against hand computation, solver against brute force, the filter."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from models.matcher import (
    HungarianMatcher,
    MatcherConfig,
    dice_cost,
    focal_cost,
    giou_cost,
    hungarian,
    l1_cost,
    resize_gt_masks,
)


def _brute_force(cost: np.ndarray) -> float:
    """Minimum total cost of a one-to-one assignment of all columns (rows >= cols)."""
    q, g = cost.shape
    return min(sum(cost[r, c] for c, r in enumerate(rows)) for rows in itertools.permutations(range(q), g))


def _random_boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    cxcy = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
    return torch.cat([cxcy, wh], 1)


def test_focal_cost_hand_computed() -> None:
    # logit 0 -> p = 0.5: pos = ln2 * 0.25 * 0.25, neg = ln2 * 0.75 * 0.25.
    cost = focal_cost(torch.zeros(1, 3), torch.tensor([1]))
    assert cost.shape == (1, 1)
    assert float(cost) == pytest.approx(math.log(2) * 0.25 * (0.25 - 0.75), rel=1e-6)
    # logit 2 for class 0, -1 for class 2, general formula.
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    cost = focal_cost(logits, torch.tensor([2, 0]))
    for j, cls in enumerate([2, 0]):
        p = 1 / (1 + math.exp(-float(logits[0, cls])))
        pos = -math.log(p + 1e-12) * 0.25 * (1 - p) ** 2
        neg = -math.log(1 - p + 1e-12) * 0.75 * p**2
        assert float(cost[0, j]) == pytest.approx(pos - neg, rel=1e-5)
    # A confident correct class is cheaper than an unsure one.
    assert cost[0, 1] < focal_cost(torch.zeros(1, 3), torch.tensor([0]))[0, 0]


def test_l1_and_giou_costs_hand_computed() -> None:
    a = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    b = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.6, 0.3, 0.1, 0.1]])
    assert l1_cost(a, b)[0].tolist() == pytest.approx([0.0, 0.1 + 0.2 + 0.1 + 0.3], abs=1e-6)
    g = giou_cost(a, b, (100, 200))
    assert float(g[0, 0]) == pytest.approx(-1.0, abs=1e-6)
    # Pixel boxes (w=200, h=100): a = [80, 30, 120, 70], b1 = [110, 25, 130, 35].
    inter = (120 - 110) * (35 - 30)
    union = 40 * 40 + 20 * 10 - inter
    hull = (130 - 80) * (70 - 25)
    assert float(g[0, 1]) == pytest.approx(-(inter / union - (hull - union) / hull), rel=1e-5)


def test_giou_cost_is_invariant_to_per_axis_scaling() -> None:
    # Every area in GIoU scales by sx * sy, so pixel and normalised boxes give the same cost.
    a = torch.tensor([[0.3, 0.5, 0.2, 0.2]])
    b = torch.tensor([[0.6, 0.4, 0.3, 0.1]])
    torch.testing.assert_close(giou_cost(a, b, (100, 100)), giou_cost(a, b, (100, 400)))
    torch.testing.assert_close(giou_cost(a, b, (1, 1)), giou_cost(a, b, (300, 700)))


def test_dice_cost_official_eps() -> None:
    a = torch.tensor([[1.0, 1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])  # raw values, no sigmoid
    b = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    cost = dice_cost(a, b)
    assert float(cost[0, 0]) == pytest.approx(1 - 2 * 1 / (2 + 0.001 + 1 + 0.001), rel=1e-6)
    assert float(cost[1, 0]) == pytest.approx(1 - 2 * 2 / (4 + 0.001 + 1 + 0.001), rel=1e-6)


def test_hungarian_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    for q, g in [(4, 3), (5, 5), (6, 2)]:
        cost = rng.normal(size=(q, g))
        rows, cols = hungarian(torch.from_numpy(cost))
        assert len(set(rows.tolist())) == g and sorted(cols.tolist()) == list(range(g))
        assert cost[rows.numpy(), cols.numpy()].sum() == pytest.approx(_brute_force(cost))


def test_official_filter_is_plain_hungarian_and_paper_runs_more_rounds() -> None:
    gen = torch.Generator().manual_seed(0)
    q, c, g = 12, 5, 3
    logits = torch.randn(q, c, generator=gen)
    boxes = _random_boxes(q, gen)
    gt_labels = torch.tensor([0, 3, 3])
    gt_boxes = _random_boxes(g, gen)
    size = (64, 96)
    official = HungarianMatcher()
    rows, cols, sel = official.filter_queries(logits, boxes, gt_labels, gt_boxes, size)
    plain_rows, plain_cols = official.match(logits, boxes, gt_labels, gt_boxes, size)
    assert rows.tolist() == plain_rows.tolist() and cols.tolist() == plain_cols.tolist()
    assert sel.tolist() == plain_rows.tolist()  # the one-round bug: exactly N_gt queries
    # Total cost of the plain match equals the brute-force optimum of the explicit weighted cost.
    explicit = (
        2 * focal_cost(logits, gt_labels) + 5 * l1_cost(boxes, gt_boxes) + 2 * giou_cost(boxes, gt_boxes, size)
    ).numpy()
    assert explicit[rows.numpy(), cols.numpy()].sum() == pytest.approx(_brute_force(explicit), rel=1e-5)

    paper = HungarianMatcher(MatcherConfig(rounds="paper", max_pos=3))
    rows_p, cols_p, sel_p = paper.filter_queries(logits, boxes, gt_labels, gt_boxes, size)
    assert rows_p.tolist() == rows.tolist()  # round 1 still drives the detection loss
    assert len(sel_p) == 3 * g and len(set(sel_p.tolist())) == 3 * g
    assert set(rows.tolist()) <= set(sel_p.tolist())
    # Round 2 is the optimum once round-1 rows are removed.
    rest = [i for i in range(q) if i not in rows.tolist()]
    r2, c2 = hungarian(torch.from_numpy(explicit[rest]))
    assert {rest[i] for i in r2.tolist()} <= set(sel_p.tolist())
    # Rounds are capped by Q // N_gt.
    few = HungarianMatcher(MatcherConfig(rounds="paper", max_pos=10))
    assert len(few.filter_queries(logits, boxes, gt_labels, gt_boxes, size)[2]) == (q // g) * g


def test_filter_with_no_ground_truth() -> None:
    m = HungarianMatcher()
    rows, cols, sel = m.filter_queries(
        torch.randn(5, 3),
        _random_boxes(5, torch.Generator()),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, 4),
        (10, 10),
    )
    assert rows.numel() == cols.numel() == sel.numel() == 0


def test_mask_aware_match_doubles_class_weight() -> None:
    gen = torch.Generator().manual_seed(3)
    k, c, g = 4, 3, 4
    logits = torch.randn(k, c, generator=gen) * 3
    boxes = _random_boxes(k, gen)
    masks = torch.rand(k, 6, 6, generator=gen)
    gt_labels = torch.tensor([0, 1, 2, 1])
    gt_boxes = _random_boxes(g, gen)
    gt_masks = (torch.rand(g, 6, 6, generator=gen) > 0.5).float()
    size = (48, 48)
    for double, w_cls in ((True, 4.0), (False, 2.0)):
        m = HungarianMatcher(MatcherConfig(double_cls_weight=double))
        rows, cols = m.mask_aware_match(logits, boxes, masks, gt_labels, gt_boxes, gt_masks, size)
        explicit = (
            w_cls * focal_cost(logits, gt_labels)
            + 5 * l1_cost(boxes, gt_boxes)
            + 2 * giou_cost(boxes, gt_boxes, size)
            + 2 * dice_cost(masks, gt_masks)
        ).numpy()
        assert explicit[rows.numpy(), cols.numpy()].sum() == pytest.approx(_brute_force(explicit), rel=1e-5)


def test_resize_gt_masks_is_soft_bilinear() -> None:
    m = torch.zeros(1, 4, 4, dtype=torch.bool)
    m[0, :, :2] = True
    small = resize_gt_masks(m, (2, 2))
    assert small.dtype == torch.float32 and small.shape == (1, 2, 2)
    assert small[0, :, 0].tolist() == [1.0, 1.0] and small[0, :, 1].tolist() == [0.0, 0.0]
    up = resize_gt_masks(m, (4, 8))
    assert 0 < float(up[0, 0, 3]) < 1  # soft edge
