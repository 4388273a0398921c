"""Losses of Panoptic SegFormer and the full training criterion with deep supervision.

Faithful to the official `PanformerHead.loss` (`panformer_head.py:279-1003`, mmdet 2.12 losses):

- Location decoder, every layer l: sigmoid focal (weight 2, alpha 0.25, gamma 2) over all queries,
  L1 (weight 5) on normalised cxcywh and GIoU (weight 2) on pixel xyxy over the matched queries, each
  divided by the number of matched thing GT of the batch (>= 1). Layers 0..L-2 use plain Hungarian; the
  last layer uses the filter's round-1 matching (see `models.matcher`).
- Things, mask decoder: the selected queries are rematched with a dice cost; dice loss (weight 2,
  eps 1e-6, **no sigmoid**: the masks are raw ReLU values) on the tail mask and on each block mask,
  predictions upsampled x2 (1/8 -> 1/4), targets the padded GT bilinearly resized to that size (soft).
- Stuff: class-fixed targets (query j <-> stuff class j); dice on the tail and every block mask with
  weight 0 for absent classes; a one-class sigmoid focal "present" loss per block, weight 2 **times
  2** in the code (`loss_cls(...) * 2`, effective 4; `double_stuff_cls=False` gives 2).
- Mask-decoder box and thing-class losses are multiplied by 0 in the official code; they are not
  computed here (their gradient is exactly zero either way).
- Joint matching (Table 8, `decouple_queries=False`: the location head predicts all classes and there is no
  stuff decoder): detected from the logit width; stuff GT join the thing GT (box target = tight box of the
  mask, our choice: the official code has no joint variant), ratios are 1.
- Thing terms are multiplied by ``N_th / (N_th + N_st)`` and stuff terms by ``N_st / (N_th + N_st)``
  with N the batch GT counts, each clamped >= 1 (`ratio_mode="official"`). ``"none"`` uses 1 for both.

Paper (App. A.1) gives lambda_cls/seg/det = 2/1/1; the code's effective weights are those above.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from models.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, generalized_box_iou, masks_to_boxes
from models.matcher import HungarianMatcher, MatcherConfig, resize_gt_masks

__all__ = [
    "sigmoid_focal_loss",
    "dice_loss",
    "l1_loss",
    "giou_loss",
    "LossConfig",
    "PanopticCriterion",
    "build_criterion",
    "reduce_mean_counts",
]


def sigmoid_focal_loss(
    logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0, avg_factor: float = 1.0
) -> Tensor:
    """mmdet `FocalLoss(use_sigmoid=True)`: sum of per-element focal terms divided by avg_factor.

    Args:
        logits: (N, C) pre-sigmoid logits.
        labels: (N,) long; values in [0, C) are positives of that class, C means background.
        avg_factor: normaliser (number of positives).

    Returns:
        scalar loss (unweighted).
    """
    num_classes = logits.shape[1]
    target = F.one_hot(labels.clamp(max=num_classes), num_classes + 1)[:, :num_classes].to(logits.dtype)
    p = logits.sigmoid()
    pt = (1 - p) * target + p * (1 - target)
    focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * focal_weight
    return loss.sum() / avg_factor


def dice_loss(
    pred: Tensor, target: Tensor, weight: Tensor | None = None, eps: float = 1e-6, avg_factor: float = 1.0
) -> Tensor:
    """Official `DiceLoss` (no sigmoid): ``1 - 2 Σpt / (Σp² + eps + Σt² + eps)`` per mask.

    Args:
        pred: (N, ...) raw mask values.
        target: (N, ...) targets in [0, 1] (soft after resizing).
        weight: (N,) per-mask weights (0 drops a mask), or None for all ones.
        avg_factor: normaliser of the weighted sum.

    Returns:
        scalar loss (unweighted).
    """
    p = pred.flatten(1).float()
    t = target.flatten(1).float()
    per_mask = 1 - 2 * (p * t).sum(1) / ((p * p).sum(1) + eps + (t * t).sum(1) + eps)
    if weight is not None:
        per_mask = per_mask * weight
    return per_mask.sum() / avg_factor


def l1_loss(pred: Tensor, target: Tensor, avg_factor: float = 1.0) -> Tensor:
    """mmdet `L1Loss`: sum of |pred - target| over (N, 4) boxes divided by avg_factor."""
    return (pred - target).abs().sum() / avg_factor


def giou_loss(pred_xyxy: Tensor, target_xyxy: Tensor, avg_factor: float = 1.0) -> Tensor:
    """mmdet `GIoULoss`: sum of ``1 - GIoU`` over aligned (N, 4) xyxy pairs divided by avg_factor."""
    if pred_xyxy.shape[0] == 0:
        return pred_xyxy.sum() * 0
    if not torch.isfinite(pred_xyxy).all():  # diverged: report NaN (the engine names the term) instead of raising
        return pred_xyxy.sum() * float("nan")
    giou = torch.diag(generalized_box_iou(pred_xyxy, target_xyxy))
    return (1 - giou).sum() / avg_factor


def reduce_mean_counts(counts: list[float], device: torch.device) -> list[float]:
    """Mean of each count over the processes of an initialised process group (identity for one process).

    The loss normalisers (numbers of GT segments in the batch) use it, as DETR's `num_boxes` and mmdet's
    `reduce_mean(num_total_pos)`: with it, gradients averaged over N processes equal one process's gradient on
    the N local batches together.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return counts
    t = torch.tensor(counts, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(v) / dist.get_world_size() for v in t.tolist()]


@dataclass
class LossConfig:
    """Loss weights and options (defaults = the official code).

    Attributes:
        cls_weight: focal class-loss weight of the location decoder (2).
        l1_weight: L1 box-loss weight (5).
        giou_weight: GIoU box-loss weight (2).
        dice_weight: dice mask-loss weight, things and stuff (2).
        stuff_cls_weight: stuff focal weight before the hidden doubling (2).
        double_stuff_cls: multiply the stuff focal loss by 2 as the code does (effective 4).
        focal_alpha / focal_gamma: focal parameters.
        dice_eps: dice loss epsilon (1e-6).
        ratio_mode: "official" (batch GT-count ratios) or "none" (both 1).
        mask_upsample: predictions are upsampled by this factor before the dice loss (2: 1/8 -> 1/4).
        use_boxes: include the L1 (and GIoU) box losses.
        use_giou: include the GIoU loss (False for the box-free variant).
        box_target: "box" (GT boxes) or "mass_center": the box-free variant of Table 6 regresses the GT masks'
            mass centres (cx, cy, 0, 0) with L1 only (paper App. A.1); the official code has no such variant.
        deep_supervision: include every location-decoder layer and every mask-decoder block.
        detection_rounds: Hungarian rounds of the location decoder's class and box losses (official 1: one-to-one).
            k > 1 matches every GT to up to k queries (one-to-many; each round blocks the queries matched before),
            an option for training from scratch (on the tiny recipe it did not help, so it is off there too); the
            duplicates it teaches are removed by the mask-wise merge's overlap rule. The mask decoder's queries stay
            the official selection.
    """

    cls_weight: float = 2.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    dice_weight: float = 2.0
    stuff_cls_weight: float = 2.0
    double_stuff_cls: bool = True
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    dice_eps: float = 1e-6
    ratio_mode: str = "official"
    mask_upsample: int = 2
    use_boxes: bool = True
    use_giou: bool = True
    box_target: str = "box"
    deep_supervision: bool = True
    detection_rounds: int = 1


class _Model(Protocol):
    """What the criterion needs from the model (see `models.panoptic_segformer`)."""

    def encode(self, images: Tensor, pad_mask: Tensor) -> Any: ...

    def locate(self, enc: Any) -> Any: ...

    def segment(self, enc: Any, thing_queries: Tensor) -> Any: ...


@dataclass
class _Matches:
    """Per-image matching of one location-decoder layer."""

    queries: list[Tensor] = field(default_factory=list)
    gts: list[Tensor] = field(default_factory=list)


class PanopticCriterion(nn.Module):
    """The full training loss. Runs the model's three stages because matching sits between them.

    Args:
        num_things: number of thing classes.
        num_stuff: number of stuff classes (= stuff queries).
        matcher: the Hungarian matcher (cost weights, filter rounds).
        config: loss weights and options.
    """

    def __init__(
        self, num_things: int, num_stuff: int, matcher: HungarianMatcher | None = None, config: LossConfig | None = None
    ) -> None:
        super().__init__()
        self.num_things = num_things
        self.num_stuff = num_stuff
        self.matcher = matcher or HungarianMatcher()
        self.config = config or LossConfig()
        if self.config.ratio_mode not in ("official", "none"):
            raise ValueError(f"LossConfig.ratio_mode must be 'official' or 'none', got {self.config.ratio_mode!r}")
        if self.config.box_target not in ("box", "mass_center"):
            raise ValueError(f"LossConfig.box_target must be 'box' or 'mass_center', got {self.config.box_target!r}")

    @staticmethod
    def _center_targets(t: dict[str, Tensor]) -> dict[str, Tensor]:
        """Replace `thing_boxes` by the masks' mass centres as (cx, cy, 0, 0), normalised like the boxes."""
        masks = t["thing_masks"].float()  # (Nt, H, W), padded to the batch size
        h, w = t["image_size"].tolist()
        area = masks.sum((1, 2)).clamp(min=1)
        ys = torch.arange(masks.shape[1], dtype=masks.dtype, device=masks.device) + 0.5
        xs = torch.arange(masks.shape[2], dtype=masks.dtype, device=masks.device) + 0.5
        cx = (masks.sum(1) * xs).sum(1) / area / w
        cy = (masks.sum(2) * ys).sum(1) / area / h
        zeros = torch.zeros_like(cx)
        return {**t, "thing_boxes": torch.stack([cx, cy, zeros, zeros], -1).to(t["thing_boxes"].dtype)}

    # ----------------------------------------------------------------- location decoder
    def _detection_layer(
        self, logits: Tensor, boxes: Tensor | None, targets: list[dict[str, Tensor]], matches: _Matches, num_pos: float
    ) -> dict[str, Tensor]:
        """Focal + L1 + GIoU of one layer. logits (B, Q, C), boxes (B, Q, 4)."""
        cfg = self.config
        b, q, c = logits.shape
        labels = torch.full((b, q), c, dtype=torch.long, device=logits.device)
        for i, (qi, gi) in enumerate(zip(matches.queries, matches.gts)):
            labels[i, qi.to(logits.device)] = targets[i]["thing_labels"][gi].to(logits.device)
        out = {
            "cls": cfg.cls_weight
            * sigmoid_focal_loss(logits.flatten(0, 1), labels.flatten(), cfg.focal_alpha, cfg.focal_gamma, num_pos)
        }
        if cfg.use_boxes and boxes is not None:
            pred, tgt, factors = [], [], []
            for i, (qi, gi) in enumerate(zip(matches.queries, matches.gts)):
                pred.append(boxes[i, qi.to(boxes.device)])
                tgt.append(targets[i]["thing_boxes"][gi].to(boxes.device))
                h, w = targets[i]["image_size"].tolist()
                factors.append(boxes.new_tensor([w, h, w, h]).expand(len(qi), 4))
            pred_t, tgt_t, fac = torch.cat(pred), torch.cat(tgt), torch.cat(factors)
            out["l1"] = cfg.l1_weight * l1_loss(pred_t, tgt_t, num_pos)
            if cfg.use_giou:
                out["giou"] = cfg.giou_weight * giou_loss(
                    box_cxcywh_to_xyxy(pred_t) * fac, box_cxcywh_to_xyxy(tgt_t) * fac, num_pos
                )
        return out

    def _match_layer(self, logits: Tensor, boxes: Tensor | None, targets: list[dict[str, Tensor]]) -> _Matches:
        m = _Matches()
        for i, t in enumerate(targets):
            size = tuple(t["image_size"].tolist())
            qi, gi = self.matcher.match_rounds(
                logits[i], None if boxes is None else boxes[i], t["thing_labels"], t["thing_boxes"], size,
                self.config.detection_rounds,
            )
            m.queries.append(qi)
            m.gts.append(gi)
        return m

    # ----------------------------------------------------------------- forward
    def forward(
        self, model: _Model, images: Tensor, pad_mask: Tensor, targets: list[dict[str, Tensor]]
    ) -> tuple[Tensor, dict[str, float]]:
        """Run the model on a batch and return the total loss and its parts.

        Args:
            model: a `PanopticSegFormer` (encode / locate / segment).
            images: (B, 3, H, W) normalised, padded batch.
            pad_mask: (B, H, W) bool, True on padding.
            targets: per image: thing_masks (Nt, H, W) bool (padded to the batch size), thing_boxes (Nt, 4)
                normalised cxcywh of the unpadded image, thing_labels (Nt,), stuff_masks (Ns, H, W),
                stuff_labels (Ns,) contiguous (num_things + j), image_size (2,) long (h, w) unpadded.

        Returns:
            (total loss, {name: value} for logging).
        """
        cfg = self.config
        device = images.device
        enc = model.encode(images, pad_mask)
        loc = model.locate(enc)
        num_layers = loc.logits.shape[0]
        if num_layers == 0:
            raise ValueError("PanopticCriterion: the model returned no location-decoder output (logits of shape (0, ...))")

        if cfg.box_target == "mass_center":
            targets = [self._center_targets(t) for t in targets]
        joint = loc.logits.shape[-1] > self.num_things
        if joint:
            targets = [self._joint_targets(t) for t in targets]
        # Batch GT counts, averaged over processes under torchrun (mmdet `reduce_mean`), so the averaged
        # gradients equal one process's on the global batch.
        n_th, n_st = reduce_mean_counts(
            [float(sum(int(t["thing_labels"].numel()) for t in targets)),
             float(sum(int(t["stuff_labels"].numel()) for t in targets))], device)
        num_pos_th = max(n_th, 1.0)
        num_pos_st = max(n_st, 1.0)
        if cfg.ratio_mode == "official" and not joint:
            a, b_ = max(n_th, 1.0), max(n_st, 1.0)
            things_ratio, stuff_ratio = a / (a + b_), b_ / (a + b_)
        else:
            things_ratio = stuff_ratio = 1.0

        losses: dict[str, Tensor] = {}
        last = num_layers - 1
        layers = range(num_layers) if cfg.deep_supervision else [last]
        for layer in layers:
            logits_l = loc.logits[layer]
            boxes_l = loc.boxes[layer] if cfg.use_boxes else None
            if layer != last:
                matches = self._match_layer(logits_l, boxes_l, targets)
            else:
                matches, selected = _Matches(), []
                for i, t in enumerate(targets):
                    size = tuple(t["image_size"].tolist())
                    qi, gi, sel = self.matcher.filter_queries(
                        logits_l[i], None if boxes_l is None else boxes_l[i], t["thing_labels"], t["thing_boxes"], size
                    )
                    matches.queries.append(qi)
                    matches.gts.append(gi)
                    selected.append(sel)
                if cfg.detection_rounds > 1:  # one-to-many detection loss; the mask decoder keeps `selected`
                    matches = self._match_layer(logits_l, boxes_l, targets)
            for k, v in self._detection_layer(logits_l, boxes_l, targets, matches, num_pos_th).items():
                losses[f"d{layer}.loss_{k}"] = v * things_ratio

        # Gather the selected thing queries (zero-padded to the batch max; thing blocks have no
        # self-attention, so padded rows never influence real ones) and run the mask decoder.
        bsz = images.shape[0]
        kmax = max(1, max(len(s) for s in selected))
        dim = loc.queries.shape[-1]
        gathered = loc.queries.new_zeros((bsz, kmax, dim))
        for i, sel in enumerate(selected):
            if len(sel):
                gathered[i, : len(sel)] = loc.queries[i, sel.to(device)]
        masks = model.segment(enc, gathered)

        # Mask-aware rematch on the final thing mask, then dice on every thing layer.
        final_th = masks.thing_masks[-1]
        mask_hw = tuple(final_th.shape[-2:])
        pos_pred: list[tuple[int, Tensor]] = []  # (image, positions among its selected queries)
        pos_tgt: list[Tensor] = []
        for i, (t, sel) in enumerate(zip(targets, selected)):
            if len(sel) == 0:
                continue
            size = tuple(t["image_size"].tolist())
            gt_small = resize_gt_masks(t["thing_masks"].to(device), mask_hw)
            pi, gi = self.matcher.mask_aware_match(
                loc.logits[last, i, sel.to(device)],
                loc.boxes[last, i, sel.to(device)] if cfg.use_boxes else None,
                final_th[i, : len(sel)],
                t["thing_labels"],
                t["thing_boxes"] if cfg.use_boxes else None,
                gt_small,
                size,
            )
            pos_pred.append((i, pi.to(device)))
            pos_tgt.append(t["thing_masks"][gi].to(device))

        thing_layers = list(enumerate(masks.thing_masks))
        if not cfg.deep_supervision:
            thing_layers = thing_layers[-1:]
        for j, layer_masks in thing_layers:
            name = "loss_mask_things" if j == len(masks.thing_masks) - 1 else f"d{j}.loss_mask_things_f"
            if pos_pred:
                pred = torch.cat([layer_masks[i, pi] for i, pi in pos_pred])
                tgt = torch.cat(pos_tgt)
                pred, tgt = self._mask_pair(pred, tgt)
                value = cfg.dice_weight * dice_loss(pred, tgt, eps=cfg.dice_eps, avg_factor=num_pos_th)
            else:
                value = layer_masks.sum() * 0
            losses[name] = value * things_ratio

        # Stuff: class-fixed targets, weight 0 for absent classes (no stuff decoder with joint matching).
        if not joint:
            losses.update(self._stuff_losses(images, targets, masks, num_pos_st, stuff_ratio))

        total = torch.stack(list(losses.values())).sum()
        logs = {k: float(v.detach()) for k, v in losses.items()}
        logs["loss"] = float(total.detach())
        return total, logs

    def _stuff_losses(
        self, images: Tensor, targets: list[dict[str, Tensor]], masks: Any, num_pos_st: float, stuff_ratio: float
    ) -> dict[str, Tensor]:
        """Class-fixed stuff dice (every layer) and present/absent focal (every block)."""
        cfg = self.config
        device = images.device
        bsz = images.shape[0]
        losses: dict[str, Tensor] = {}
        stuff_hw = tuple(images.shape[-2:])
        stuff_tgt = images.new_zeros((bsz, self.num_stuff, *stuff_hw))
        present = torch.zeros((bsz, self.num_stuff), dtype=torch.bool, device=device)
        for i, t in enumerate(targets):
            idx = (t["stuff_labels"] - self.num_things).to(device)
            if idx.numel():
                stuff_tgt[i, idx] = t["stuff_masks"].to(device=device, dtype=stuff_tgt.dtype)
                present[i, idx] = True
        stuff_layers = list(enumerate(masks.stuff_masks))
        if not cfg.deep_supervision:
            stuff_layers = stuff_layers[-1:]
        for j, layer_masks in stuff_layers:
            name = "loss_mask_stuff" if j == len(masks.stuff_masks) - 1 else f"d{j}.loss_mask_stuff_f"
            pred, tgt = self._mask_pair(layer_masks.flatten(0, 1), stuff_tgt.flatten(0, 1))
            value = cfg.dice_weight * dice_loss(pred, tgt, present.flatten().float(), cfg.dice_eps, num_pos_st)
            losses[name] = value * stuff_ratio
        stuff_cls_layers = list(enumerate(masks.stuff_logits))
        if not cfg.deep_supervision:
            stuff_cls_layers = stuff_cls_layers[-1:]
        stuff_labels = (~present).long().flatten()  # 0 = present (positive), 1 = absent (background)
        scale = cfg.stuff_cls_weight * (2.0 if cfg.double_stuff_cls else 1.0)
        for j, logits in stuff_cls_layers:
            value = sigmoid_focal_loss(
                logits.reshape(-1, 1), stuff_labels, cfg.focal_alpha, cfg.focal_gamma, num_pos_st
            )
            losses[f"d{j}.loss_cls_stuff_f"] = scale * value * stuff_ratio
        return losses

    def _joint_targets(self, t: dict[str, Tensor]) -> dict[str, Tensor]:
        """Joint matching (Table 8): stuff GT join the thing GT, with the tight box of their mask as box target."""
        h, w = t["image_size"].tolist()
        xyxy = masks_to_boxes(t["stuff_masks"]).to(t["thing_boxes"].dtype)
        scale = xyxy.new_tensor([w, h, w, h])
        stuff_boxes = box_xyxy_to_cxcywh(xyxy / scale)
        return {
            "thing_masks": torch.cat([t["thing_masks"], t["stuff_masks"].to(t["thing_masks"].dtype)]),
            "thing_boxes": torch.cat([t["thing_boxes"], stuff_boxes]),
            "thing_labels": torch.cat([t["thing_labels"], t["stuff_labels"]]),
            "stuff_masks": t["stuff_masks"][:0],
            "stuff_labels": t["stuff_labels"][:0],
            "image_size": t["image_size"],
        }

    def _mask_pair(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Upsample predictions (N, h, w) by mask_upsample and resize targets (N, H, W) to match (bilinear)."""
        up = self.config.mask_upsample
        if up != 1:
            pred = F.interpolate(pred[None], scale_factor=up, mode="bilinear", align_corners=False)[0]
        if pred.shape[0] == 0:
            return pred, target.new_zeros((0, *pred.shape[-2:]), dtype=pred.dtype)
        tgt = F.interpolate(
            target[None].to(pred.dtype), size=tuple(pred.shape[-2:]), mode="bilinear", align_corners=False
        )[0]
        return pred, tgt


def build_criterion(cfg: Any, num_things: int, num_stuff: int, matcher: MatcherConfig | None = None,
                    loss: LossConfig | None = None) -> PanopticCriterion:
    """The Panoptic SegFormer training criterion of a model config (the family's `build_criterion`).

    Args:
        cfg: a `PanopticSegFormerConfig` (its `box_free` flag switches to mass-centre targets without GIoU).
        num_things / num_stuff: class counts of the data set.
        matcher / loss: options (default: official).
    """
    from dataclasses import replace

    matcher = matcher or MatcherConfig()
    loss = loss or LossConfig()
    if getattr(cfg, "box_free", False):  # Table 6 "6*": L1 on mass centres, no GIoU (paper App. A.1)
        matcher = replace(matcher, use_giou=False)
        loss = replace(loss, use_giou=False, box_target="mass_center")
    return PanopticCriterion(num_things, num_stuff, HungarianMatcher(matcher), loss)
