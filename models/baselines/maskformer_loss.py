"""MaskFormer's training loss (facebookresearch/MaskFormer ``modeling/criterion.py`` and ``matcher.py``).

Per decoder layer (deep supervision: the last layer and every auxiliary one, each matched on its own):

* Hungarian matching per image with cost ``1 * (-p[class]) + 20 * focal + 1 * dice`` (GT masks resized to the
  prediction's stride-4 grid with nearest; the focal and dice costs are the batched forms, focal averaged over
  pixels);
* ``loss_ce``: cross-entropy over K + 1 classes with weight 0.1 on no-object (``empty_weight``), weighted mean;
* ``loss_mask``: sigmoid focal (alpha 0.25, gamma 2) of matched masks upsampled bilinearly to the padded GT size,
  mean over pixels, summed over masks / ``num_masks``; weight 20;
* ``loss_dice``: ``1 - (2 sum(pt) + 1) / (sum(p) + sum(t) + 1)`` summed / ``num_masks``; weight 1.

``num_masks`` = GT segments in the batch (averaged over ranks under torchrun), at least 1. Things and stuff are
one set of targets (mask classification); void pixels are background of every mask, as upstream.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

__all__ = ["MaskFormerCriterion", "match"]


def _batch_dice(inputs: Tensor, targets: Tensor) -> Tensor:
    """``(Q, P)`` logits, ``(G, P)`` targets -> ``(Q, G)`` dice cost."""
    inputs = inputs.sigmoid()
    numerator = 2 * torch.einsum("nc,mc->nm", inputs, targets)
    denominator = inputs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def _batch_focal(inputs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """``(Q, P)`` logits, ``(G, P)`` targets -> ``(Q, G)`` focal cost averaged over pixels."""
    hw = inputs.shape[1]
    prob = inputs.sigmoid()
    pos = ((1 - prob) ** gamma) * F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = (prob**gamma) * F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    cost = torch.einsum("nc,mc->nm", pos * alpha, targets) + torch.einsum("nc,mc->nm", neg * (1 - alpha), 1 - targets)
    return cost / hw


@torch.no_grad()
def match(logits: Tensor, masks: Tensor, labels: Tensor, gt_masks: Tensor, cost_class: float = 1.0,
          cost_mask: float = 20.0, cost_dice: float = 1.0) -> tuple[Tensor, Tensor]:
    """Hungarian matching of one image: ``(query indices, GT indices)``, both long, in scipy's order.

    Args:
        logits: ``(Q, K+1)`` class logits.
        masks: ``(Q, h, w)`` mask logits.
        labels: ``(G,)`` contiguous classes.
        gt_masks: ``(G, H, W)`` float GT masks (padded canvas).
    """
    if labels.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    prob = logits.softmax(-1)
    c_class = -prob[:, labels]
    tgt = F.interpolate(gt_masks[:, None].to(masks), size=masks.shape[-2:], mode="nearest")[:, 0].flatten(1)
    out = masks.flatten(1)
    cost = cost_mask * _batch_focal(out, tgt) + cost_class * c_class + cost_dice * _batch_dice(out, tgt)
    rows, cols = linear_sum_assignment(cost.float().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


class MaskFormerCriterion(nn.Module):
    """``criterion(model, images, pad_mask, targets) -> (loss, logs)`` (same signature as
    ``models.losses.PanopticCriterion``; targets from ``harness.engine.data.collate``)."""

    def __init__(self, cfg: Any, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.mask_weight = cfg.mask_weight
        self.dice_weight = cfg.dice_weight
        self.deep_supervision = cfg.deep_supervision
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = cfg.no_object_weight
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def _layer_losses(self, logits: Tensor, masks: Tensor, tgts: list[dict[str, Tensor]],
                      num_masks: float) -> dict[str, Tensor]:
        idx = [match(logits[i].detach(), masks[i].detach(), t["labels"], t["masks"]) for i, t in enumerate(tgts)]
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.long, device=logits.device)
        src_masks, tgt_masks = [], []
        for i, ((qi, gi), t) in enumerate(zip(idx, tgts)):
            target_classes[i, qi.to(logits.device)] = t["labels"][gi].to(logits.device)
            src_masks.append(masks[i, qi.to(masks.device)])
            tgt_masks.append(t["masks"][gi].to(masks))
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(logits))
        src = torch.cat(src_masks)
        if src.shape[0] == 0:
            zero = masks.sum() * 0
            return {"loss_ce": loss_ce, "loss_mask": zero, "loss_dice": zero}
        tgt = torch.cat(tgt_masks)
        src = F.interpolate(src[:, None], size=tgt.shape[-2:], mode="bilinear", align_corners=False)[:, 0].flatten(1)
        tgt = tgt.flatten(1)
        prob = src.sigmoid()
        ce = F.binary_cross_entropy_with_logits(src, tgt, reduction="none")
        p_t = prob * tgt + (1 - prob) * (1 - tgt)
        focal = (0.25 * tgt + 0.75 * (1 - tgt)) * ce * (1 - p_t) ** 2
        loss_mask = focal.mean(1).sum() / num_masks
        dice = 1 - (2 * (prob * tgt).sum(-1) + 1) / (prob.sum(-1) + tgt.sum(-1) + 1)
        return {"loss_ce": loss_ce, "loss_mask": loss_mask, "loss_dice": dice.sum() / num_masks}

    def forward(self, model: nn.Module, images: Tensor, pad_mask: Tensor,
                targets: list[dict[str, Tensor]]) -> tuple[Tensor, dict[str, float]]:
        """Run ``model`` on the batch; total weighted loss over all supervised layers and the parts for logging."""
        outputs = model(images, pad_mask)
        device = images.device
        tgts = [{"labels": torch.cat([t["thing_labels"], t["stuff_labels"]]).long().to(device),
                 "masks": torch.cat([t["thing_masks"], t["stuff_masks"]]).float().to(device)} for t in targets]
        n = torch.tensor([float(sum(len(t["labels"]) for t in tgts))], device=device)
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(n)
            world = torch.distributed.get_world_size()
        num_masks = max(float(n.item()) / world, 1.0)
        layers = [("", outputs["pred_logits"], outputs["pred_masks"])]
        if self.deep_supervision:
            layers += [(f"d{i}.", outputs["aux_logits"][i], outputs["aux_masks"][i])
                       for i in range(outputs["aux_logits"].shape[0])]
        weights = {"loss_ce": 1.0, "loss_mask": self.mask_weight, "loss_dice": self.dice_weight}
        losses: dict[str, Tensor] = {}
        for prefix, logits, masks in layers:
            for k, v in self._layer_losses(logits, masks, tgts, num_masks).items():
                losses[prefix + k] = v * weights[k]
        total = torch.stack(list(losses.values())).sum()
        logs = {k: float(v.detach()) for k, v in losses.items()}
        logs["loss"] = float(total.detach())
        return total, logs
