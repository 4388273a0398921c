"""Training criteria of DETR panoptic and D-DETR-MS (``SetCriterion`` of facebookresearch/detr and
fundamentalvision/Deformable-DETR, with DETR's mask losses).

Both treat things and stuff alike (DETR's joint matching): every segment is a target with a class, a box (stuff
boxes are the tight boxes of their masks, as DETR's ``coco_panoptic.py`` ``masks_to_boxes``; ours has an exclusive
max, DETR's an inclusive one: one pixel wider) and a mask. Per decoder layer (all layers with ``aux_loss``):

* Hungarian matching with cost ``set_cost_class * class + set_cost_bbox * L1 + set_cost_giou * (-GIoU)`` on
  normalised boxes; the class cost is ``-softmax[target]`` (DETR) or the focal cost (Deformable DETR, alpha 0.25,
  gamma 2, eps 1e-8);
* classification: cross-entropy with the no-object class weighted ``eos_coef`` (DETR) or sigmoid focal loss summed
  and divided by the number of targets (Deformable DETR);
* boxes: L1 and 1 - GIoU, summed over matches / number of targets;
* masks (last layer only, as upstream): the matched stride-4 logits upsampled bilinearly to the padded target size,
  sigmoid focal (mean over pixels) and dice (``1 - (2 sum pt + 1) / (sum p + sum t + 1)`` on sigmoid), each summed
  / number of targets.

The number of targets is the batch's (clamped >= 1); upstream averages it over GPUs, we use this process's batch.
Call signature as ``models.losses.PanopticCriterion``: ``criterion(model, images, pad_mask, targets)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, generalized_box_iou, masks_to_boxes
from models.losses import sigmoid_focal_loss
from models.matcher import focal_cost, giou_cost, hungarian, l1_cost

__all__ = ["SetCriterionConfig", "SetCriterion", "mask_focal_loss", "mask_dice_loss"]


def mask_focal_loss(logits: Tensor, targets: Tensor, num_boxes: float, alpha: float = 0.25,
                    gamma: float = 2.0) -> Tensor:
    """DETR ``sigmoid_focal_loss``: ``(N, P)`` logits and 0/1 targets -> mean over P, sum over N, / num_boxes."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_boxes


def mask_dice_loss(logits: Tensor, targets: Tensor, num_boxes: float) -> Tensor:
    """DETR ``dice_loss``: sigmoid, ``1 - (2 sum pt + 1) / (sum p + sum t + 1)`` per mask, summed / num_boxes."""
    p = logits.sigmoid().flatten(1)
    numerator = 2 * (p * targets).sum(1)
    denominator = p.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_boxes


@dataclass
class SetCriterionConfig:
    """Weights of one family's set criterion (see the module docstring)."""

    focal: bool
    num_logit_classes: int
    eos_coef: float = 0.1
    focal_alpha: float = 0.25
    set_cost_class: float = 1.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    cls_loss_coef: float = 1.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    mask_loss_coef: float = 1.0
    dice_loss_coef: float = 1.0
    aux_loss: bool = True

    @classmethod
    def from_model(cls, cfg: Any, focal: bool) -> "SetCriterionConfig":
        """The weights of a DETR-family model config: its fields of the same names (``DETRConfig`` has no
        ``focal_alpha``, ``DeformableDETRConfig`` no ``eos_coef``: those keep the defaults here)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"focal", "num_logit_classes"}
        return cls(focal=focal, num_logit_classes=cfg.num_logit_classes,
                   **{n: getattr(cfg, n) for n in sorted(names) if hasattr(cfg, n)})


class SetCriterion(nn.Module):
    """DETR / Deformable DETR set criterion with mask losses, for ``DETRPanoptic`` and ``DeformableDETRPanoptic``.

    Args:
        config: weights and the classification flavour.
        class_to_logit: ``(num_classes,)`` logit column of each contiguous class (-1: the class has no column).
    """

    def __init__(self, config: SetCriterionConfig, class_to_logit: Tensor) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("class_to_logit", class_to_logit.clone().long(), persistent=False)
        if not config.focal:
            empty = torch.ones(config.num_logit_classes + 1)
            empty[-1] = config.eos_coef
            self.register_buffer("empty_weight", empty, persistent=False)

    # ----------------------------------------------------------------- targets and matching
    def _targets(self, t: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
        """Things + stuff of one image: ``labels`` (logit columns), ``boxes`` (cxcywh normalised), ``masks``."""
        labels = torch.cat([t["thing_labels"], t["stuff_labels"]]).long().to(device)
        cols = self.class_to_logit.to(device)[labels] if labels.numel() else labels
        if bool((cols < 0).any()):
            bad = sorted(set(labels[cols < 0].tolist()))
            raise ValueError(f"classes {bad} have no logit in this model's label space (train with "
                             "label_space='contiguous')")
        h, w = (int(v) for v in t["image_size"].tolist())
        stuff = t["stuff_masks"].to(device)
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=device)
        stuff_boxes = box_xyxy_to_cxcywh(masks_to_boxes(stuff) / scale) if stuff.shape[0] else scale.new_zeros(0, 4)
        boxes = torch.cat([t["thing_boxes"].float().to(device), stuff_boxes])
        masks = torch.cat([t["thing_masks"].to(device), stuff]).float()
        return {"labels": cols, "boxes": boxes, "masks": masks}

    def _match(self, logits: Tensor, boxes: Tensor, tgt: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Hungarian match of one image's ``(Q, C[+1])`` logits and ``(Q, 4)`` boxes to its targets."""
        cfg = self.config
        if tgt["labels"].numel() == 0:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty
        with torch.no_grad():
            if cfg.focal:
                cost_class = focal_cost(logits.float(), tgt["labels"], cfg.focal_alpha, 2.0, eps=1e-8)
            else:
                cost_class = -logits.float().softmax(-1)[:, tgt["labels"]]
            cost = (cfg.set_cost_bbox * l1_cost(boxes.float(), tgt["boxes"]) + cfg.set_cost_class * cost_class
                    + cfg.set_cost_giou * giou_cost(boxes.float(), tgt["boxes"], (1, 1)))
        return hungarian(cost)

    # ----------------------------------------------------------------- losses
    def _layer_losses(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]],
                      matches: list[tuple[Tensor, Tensor]], num_boxes: float) -> dict[str, Tensor]:
        cfg = self.config
        b, q, c = logits.shape
        background = cfg.num_logit_classes  # DETR: the no-object column; focal: "no positive class"
        target_classes = torch.full((b, q), background, dtype=torch.long, device=logits.device)
        src_b, src_q, tgt_boxes = [], [], []
        for i, (qi, gi) in enumerate(matches):
            target_classes[i, qi.to(logits.device)] = targets[i]["labels"][gi.to(logits.device)]
            src_b.append(torch.full_like(qi, i))
            src_q.append(qi)
            tgt_boxes.append(targets[i]["boxes"][gi.to(logits.device)])
        if cfg.focal:
            loss_ce = sigmoid_focal_loss(logits.flatten(0, 1), target_classes.flatten(), cfg.focal_alpha, 2.0,
                                         num_boxes)
        else:
            loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)
        bi, qi_all = torch.cat(src_b).to(logits.device), torch.cat(src_q).to(logits.device)
        src = boxes[bi, qi_all]
        tgt = torch.cat(tgt_boxes)
        loss_bbox = (src - tgt).abs().sum() / num_boxes
        if src.shape[0]:
            giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
            loss_giou = (1 - giou).sum() / num_boxes
        else:
            loss_giou = src.sum() * 0
        return {"ce": cfg.cls_loss_coef * loss_ce, "bbox": cfg.bbox_loss_coef * loss_bbox,
                "giou": cfg.giou_loss_coef * loss_giou}

    def _mask_losses(self, pred_masks: Tensor, targets: list[dict[str, Tensor]],
                     matches: list[tuple[Tensor, Tensor]], num_boxes: float) -> dict[str, Tensor]:
        cfg = self.config
        src, tgt = [], []
        for i, (qi, gi) in enumerate(matches):
            src.append(pred_masks[i, qi.to(pred_masks.device)])
            tgt.append(targets[i]["masks"][gi.to(pred_masks.device)])
        src_t, tgt_t = torch.cat(src), torch.cat(tgt)
        if src_t.shape[0] == 0:
            zero = pred_masks.sum() * 0
            return {"mask": zero, "dice": zero}
        src_t = F.interpolate(src_t[:, None], size=tgt_t.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        src_f, tgt_f = src_t.flatten(1), tgt_t.flatten(1)
        return {"mask": cfg.mask_loss_coef * mask_focal_loss(src_f, tgt_f, num_boxes, cfg.focal_alpha),
                "dice": cfg.dice_loss_coef * mask_dice_loss(src_f, tgt_f, num_boxes)}

    def forward(self, model: nn.Module, images: Tensor, pad_mask: Tensor,
                targets: list[dict[str, Tensor]]) -> tuple[Tensor, dict[str, float]]:
        """Run the model on a padded batch and return ``(total loss, {term: value})``.

        Args:
            model: ``DETRPanoptic`` or ``DeformableDETRPanoptic``.
            images: ``(B, 3, H, W)`` normalised, padded.
            pad_mask: ``(B, H, W)`` bool, True on padding.
            targets: per image (``harness.engine.data.collate``): thing_masks ``(Nt, H, W)``, thing_boxes
                ``(Nt, 4)`` normalised cxcywh, thing_labels ``(Nt,)``, stuff_masks ``(Ns, H, W)``, stuff_labels
                ``(Ns,)`` contiguous, image_size ``(2,)`` unpadded ``(h, w)``.
        """
        device = images.device
        outputs: dict[str, Any] = model(images, pad_mask)
        tgts = [self._targets(t, device) for t in targets]
        num_boxes = max(float(sum(int(t["labels"].numel()) for t in tgts)), 1.0)
        layers = range(outputs["aux_logits"].shape[0]) if self.config.aux_loss else [outputs["aux_logits"].shape[0] - 1]
        last = outputs["aux_logits"].shape[0] - 1
        losses: dict[str, Tensor] = {}
        for lvl in layers:
            logits, boxes = outputs["aux_logits"][lvl], outputs["aux_boxes"][lvl]
            matches = [self._match(logits[i].detach(), boxes[i].detach(), t) for i, t in enumerate(tgts)]
            suffix = "" if lvl == last else f"_{lvl}"
            for name, value in self._layer_losses(logits, boxes, tgts, matches, num_boxes).items():
                losses[name + suffix] = value
            if lvl == last:
                losses.update(self._mask_losses(outputs["pred_masks"], tgts, matches, num_boxes))
        total = torch.stack(list(losses.values())).sum()
        logs = {k: float(v.detach()) for k, v in losses.items()}
        logs["loss"] = float(total.detach())
        return total, logs
