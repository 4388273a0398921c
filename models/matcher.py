"""Hungarian matching for Panoptic SegFormer: costs, the thing-query filter and the mask-aware rematch.

Official behaviour (zhiqi-li/Panoptic-SegFormer, mmdet 2.12 match costs):

- Costs: `FocalLossCost` (weight 2, alpha 0.25, gamma 2, eps 1e-12) on pre-sigmoid logits, `BBoxL1Cost`
  (weight 5) on normalised cxcywh, `IoUCost` (GIoU, weight 2) on xyxy boxes in pixels of the unpadded
  image (as official; GIoU of axis-aligned boxes is invariant to per-axis scaling, so this equals the
  GIoU of the normalised boxes up to float rounding).
- Location-decoder layers 0..L-2: plain Hungarian (`HungarianAssigner`).
- Last layer: `HungarianAssigner_filter`, meant to run min(max_pos=3, 300 // N_gt) rounds, each round
  blocking the rows matched before. Its `break` test runs after those rows were set to INF, so it
  always fires: **one round**, i.e. exactly the N_gt plain-Hungarian matches feed the mask decoder.
  `rounds="official"` (default) reproduces that; `rounds="paper"` runs the intended rounds
  (App. B.2: "several rounds of bipartite matching").
- Mask-aware rematch (`HungarianAssigner_multi_info`) over the selected queries: the same costs plus a
  dice cost (weight 2) on the final thing masks, with the class-cost weight **doubled in place** to 4
  (`cls_cost['weight'] *= 2`). `double_cls_weight=False` gives the configured weight 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = [
    "focal_cost",
    "l1_cost",
    "giou_cost",
    "dice_cost",
    "hungarian",
    "MatcherConfig",
    "HungarianMatcher",
]

# A cost large enough that the solver never prefers it; finite so scipy accepts the matrix.
BLOCKED = 1e8


def focal_cost(
    logits: Tensor, gt_labels: Tensor, alpha: float = 0.25, gamma: float = 2.0, eps: float = 1e-12
) -> Tensor:
    """mmdet `FocalLossCost` (unweighted).

    Args:
        logits: (Q, C) pre-sigmoid class logits.
        gt_labels: (G,) long class indices.

    Returns:
        (Q, G) cost ``pos[:, gt] - neg[:, gt]`` with ``pos = -log(p + eps) * alpha * (1 - p)**gamma`` and
        ``neg = -log(1 - p + eps) * (1 - alpha) * p**gamma``.
    """
    p = logits.sigmoid()
    neg = -(1 - p + eps).log() * (1 - alpha) * p.pow(gamma)
    pos = -(p + eps).log() * alpha * (1 - p).pow(gamma)
    return pos[:, gt_labels] - neg[:, gt_labels]


def l1_cost(pred_boxes: Tensor, gt_boxes: Tensor) -> Tensor:
    """mmdet `BBoxL1Cost` (unweighted): (Q, 4) and (G, 4) normalised cxcywh -> (Q, G) L1 distance."""
    return torch.cdist(pred_boxes, gt_boxes, p=1)


def giou_cost(pred_boxes: Tensor, gt_boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """mmdet `IoUCost(giou)` (unweighted): ``-GIoU`` of xyxy boxes in pixels.

    Args:
        pred_boxes: (Q, 4) normalised cxcywh.
        gt_boxes: (G, 4) normalised cxcywh.
        image_size: (h, w) of the unpadded image the boxes are normalised by.

    Returns:
        (Q, G) cost.
    """
    h, w = image_size
    factor = pred_boxes.new_tensor([w, h, w, h])
    bad = ~torch.isfinite(pred_boxes).all(-1)
    if bad.any():  # diverged predictions: NaN costs (blocked by `hungarian`); the loss then reports the NaN
        pred_boxes = torch.where(bad[:, None], pred_boxes.new_tensor([0.5, 0.5, 0.1, 0.1]), pred_boxes)
    cost = -generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes) * factor, box_cxcywh_to_xyxy(gt_boxes) * factor)
    return cost.masked_fill(bad[:, None], float("nan")) if bad.any() else cost


def dice_cost(pred_masks: Tensor, gt_masks: Tensor, eps: float = 1e-3) -> Tensor:
    """Official `DiceCost` (unweighted), on raw mask values (no sigmoid).

    Args:
        pred_masks: (Q, h, w) or (Q, N) predicted masks.
        gt_masks: (G, h, w) or (G, N) float targets at the same resolution.
        eps: added twice to the denominator (official 0.001).

    Returns:
        (Q, G) cost ``1 - 2 Σab / (Σa² + eps + Σb² + eps)``.
    """
    a = pred_masks.flatten(1).float()
    b = gt_masks.flatten(1).float()
    numerator = 2 * a @ b.t()
    denominator = (a * a).sum(1)[:, None] + eps + (b * b).sum(1)[None, :] + eps
    return 1 - numerator / denominator


def hungarian(cost: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum-cost one-to-one assignment (scipy). Returns (rows, cols) long tensors, rows ascending."""
    c = cost.detach().cpu().float().numpy()
    if not np.isfinite(c).all():
        # NaN/inf would make scipy raise an obscure error; treat them as blocked pairs.
        c = np.nan_to_num(c, nan=BLOCKED, posinf=BLOCKED, neginf=-BLOCKED)
    rows, cols = linear_sum_assignment(c)
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


@dataclass
class MatcherConfig:
    """Match-cost weights and the query-filter options.

    Attributes:
        cls_weight: focal class-cost weight (official 2).
        l1_weight: L1 box-cost weight (official 5).
        giou_weight: GIoU box-cost weight (official 2).
        dice_weight: dice mask-cost weight of the mask-aware rematch (official 2).
        focal_alpha / focal_gamma: focal cost parameters.
        dice_eps: dice cost epsilon (official 1e-3).
        rounds: "official" (one round, the released code) or "paper" (up to max_pos rounds).
        max_pos: intended number of filter rounds (official 3).
        max_queries_per_round: rounds are limited to max_queries // N_gt (official 300).
        double_cls_weight: the official rematch doubles the class-cost weight (2 -> 4).
        use_boxes: include the L1 (and GIoU) costs.
        use_giou: include the GIoU cost (False for the box-free variant, whose "boxes" are mass centres
            (cx, cy, 0, 0): the L1 cost then measures the centre distance).
    """

    cls_weight: float = 2.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    dice_weight: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    dice_eps: float = 1e-3
    rounds: str = "official"
    max_pos: int = 3
    max_queries_per_round: int = 300
    double_cls_weight: bool = True
    use_boxes: bool = True
    use_giou: bool = True


class HungarianMatcher:
    """Matching of thing queries to thing ground truth (no learnable parameters).

    Args:
        config: cost weights and filter options.
    """

    def __init__(self, config: MatcherConfig | None = None) -> None:
        self.config = config or MatcherConfig()
        if self.config.rounds not in ("official", "paper"):
            raise ValueError(f"MatcherConfig.rounds must be 'official' or 'paper', got {self.config.rounds!r}")

    @torch.no_grad()
    def cost_matrix(
        self,
        logits: Tensor,
        boxes: Tensor | None,
        gt_labels: Tensor,
        gt_boxes: Tensor | None,
        image_size: tuple[int, int],
        cls_weight: float | None = None,
    ) -> Tensor:
        """Weighted focal + L1 + GIoU cost.

        Args:
            logits: (Q, C) pre-sigmoid logits.
            boxes: (Q, 4) normalised cxcywh, or None (box-free).
            gt_labels: (G,) class indices.
            gt_boxes: (G, 4) normalised cxcywh, or None.
            image_size: (h, w) of the unpadded image.
            cls_weight: override of the class-cost weight.

        Returns:
            (Q, G) cost.
        """
        cfg = self.config
        w = cfg.cls_weight if cls_weight is None else cls_weight
        cost = w * focal_cost(logits.float(), gt_labels, cfg.focal_alpha, cfg.focal_gamma)
        if cfg.use_boxes and boxes is not None and gt_boxes is not None:
            cost = cost + cfg.l1_weight * l1_cost(boxes.float(), gt_boxes.float())
            if cfg.use_giou:
                cost = cost + cfg.giou_weight * giou_cost(boxes.float(), gt_boxes.float(), image_size)
        return cost

    def match(
        self,
        logits: Tensor,
        boxes: Tensor | None,
        gt_labels: Tensor,
        gt_boxes: Tensor | None,
        image_size: tuple[int, int],
    ) -> tuple[Tensor, Tensor]:
        """Plain one-to-one Hungarian matching (`HungarianAssigner`).

        Returns:
            (query indices (M,), gt indices (M,)) with M = min(Q, G), queries ascending.
        """
        if gt_labels.numel() == 0:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty
        return hungarian(self.cost_matrix(logits, boxes, gt_labels, gt_boxes, image_size))

    @torch.no_grad()
    def match_rounds(
        self,
        logits: Tensor,
        boxes: Tensor | None,
        gt_labels: Tensor,
        gt_boxes: Tensor | None,
        image_size: tuple[int, int],
        rounds: int,
    ) -> tuple[Tensor, Tensor]:
        """One-to-many matching: ``rounds`` Hungarian rounds, each blocking the queries matched before (at most
        Q // G rounds), so every GT gets up to ``rounds`` queries. ``rounds=1`` is :meth:`match`.

        Returns:
            (query indices, gt indices) of all rounds, concatenated.
        """
        num_gt, num_queries = gt_labels.numel(), logits.shape[0]
        if num_gt == 0 or rounds <= 1:
            return self.match(logits, boxes, gt_labels, gt_boxes, image_size)
        cost = self.cost_matrix(logits, boxes, gt_labels, gt_boxes, image_size).detach().cpu().clone()
        qs, gs = [], []
        for _ in range(min(rounds, num_queries // num_gt)):
            r, c = hungarian(cost)
            qs.append(r)
            gs.append(c)
            cost[r] = BLOCKED
        return torch.cat(qs), torch.cat(gs)

    @torch.no_grad()
    def filter_queries(
        self,
        logits: Tensor,
        boxes: Tensor | None,
        gt_labels: Tensor,
        gt_boxes: Tensor | None,
        image_size: tuple[int, int],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The last-layer thing-query filter (`HungarianAssigner_filter`).

        Returns:
            (round-1 query indices, round-1 gt indices, selected query indices ascending). The round-1
            pair drives the last-layer detection loss; the selected queries go to the mask decoder.
            With rounds="official" the selection equals the round-1 queries.
        """
        cfg = self.config
        num_gt, num_queries = gt_labels.numel(), logits.shape[0]
        if num_gt == 0:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty, empty
        cost = self.cost_matrix(logits, boxes, gt_labels, gt_boxes, image_size).detach().cpu().clone()
        rows, cols = hungarian(cost)
        if cfg.rounds == "official":
            return rows, cols, rows.clone()
        # The intended loop: block the rows matched so far and match again, min(max_pos, Q // G) rounds.
        n_rounds = min(cfg.max_pos, cfg.max_queries_per_round // num_gt, num_queries // num_gt)
        selected = [rows]
        for _ in range(1, n_rounds):
            cost[torch.cat(selected)] = BLOCKED
            r, _c = hungarian(cost)
            selected.append(r)
        return rows, cols, torch.cat(selected).unique(sorted=True)

    @torch.no_grad()
    def mask_aware_match(
        self,
        logits: Tensor,
        boxes: Tensor | None,
        masks: Tensor,
        gt_labels: Tensor,
        gt_boxes: Tensor | None,
        gt_masks: Tensor,
        image_size: tuple[int, int],
    ) -> tuple[Tensor, Tensor]:
        """Rematch the selected queries with a dice term (`HungarianAssigner_multi_info`).

        Args:
            logits: (K, C) last location-decoder logits of the selected queries.
            boxes: (K, 4) their boxes (normalised cxcywh) or None.
            masks: (K, h, w) final thing masks (raw values).
            gt_labels: (G,) labels; gt_boxes: (G, 4) or None.
            gt_masks: (G, h, w) float GT masks already resized to the mask resolution.
            image_size: (h, w) of the unpadded image.

        Returns:
            (selected-query positions (M,), gt indices (M,)); positions index into the K selected queries.
        """
        cfg = self.config
        if gt_labels.numel() == 0 or logits.shape[0] == 0:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty
        cls_w = cfg.cls_weight * (2.0 if cfg.double_cls_weight else 1.0)
        cost = self.cost_matrix(logits, boxes, gt_labels, gt_boxes, image_size, cls_weight=cls_w)
        cost = cost + cfg.dice_weight * dice_cost(masks, gt_masks, cfg.dice_eps)
        return hungarian(cost)


def resize_gt_masks(gt_masks: Tensor, size: tuple[int, int]) -> Tensor:
    """(G, H, W) bool/float GT masks -> (G, h, w) float by bilinear interpolation (soft targets, as official)."""
    if gt_masks.shape[0] == 0:
        return gt_masks.new_zeros((0, *size), dtype=torch.float32)
    return F.interpolate(gt_masks[None].float(), size=size, mode="bilinear", align_corners=False)[0]
