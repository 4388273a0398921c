"""Panoptic FCN's training loss (dvlab-research/PanopticFCN ``gt_generate.py``, ``loss.py``, ``panoptic_seg.py``).

Targets per image (from ``harness.engine.data.collate``), per level P3..P7:

* things: GT masks bilinearly resized to stride 4 (soft), mass centres of those masks, assigned to a level when
  ``sqrt(box area)`` lies in its ``instance_scales`` range; centre heat maps are CornerNet Gaussians (radius from the
  level-scaled box at overlap 0.7, sigma = diameter / 3) in the class channel;
* stuff: a one-hot map with channel 0 = all things and channel s = stuff class s (void pixels all zero), resized to
  stride 4 and then to the level; values below 0.5 are zeroed (region targets) and the classes present are assigned.

Losses (upstream weights): sigmoid focal (alpha 0.25, gamma 2) on the centre maps, summed and divided by the number
of (level, instance) assignments; focal on the region maps, averaged over pixels per (image, class), summed and
divided by the batch size; weighted dice (``1 - 2 sum(pt) / (sum(p^2) + sum(t^2))``) of the masks made by the 7
kernels at the highest predicted centre scores inside each instance (weights = those scores, normalised), times 3,
divided by the number of thing assignments; dice of the stuff masks (kernel = region-averaged kernels), times 3,
divided by the number of stuff assignments. Computed per image (upstream pads the batch; the padded rows are masked
out, so the sums are the same). Deviation for tiny inputs: fewer than 7 positions on a level use them all.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PanopticFCNCriterion", "dice", "draw_gaussian", "focal_loss", "gaussian_radius"]


def focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise sigmoid focal loss with soft targets (upstream ``sigmoid_focal_loss``, no reduction)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    return (alpha * targets + (1 - alpha) * (1 - targets)) * ce * (1 - p_t) ** gamma


def dice(pred_logits: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """``(..., P)`` logits and targets -> ``(...)`` upstream dice loss (squared denominators)."""
    p = pred_logits.sigmoid()
    part = (p**2).sum(-1) + (target**2).sum(-1)
    return 1 - 2 * (target * p).sum(-1) / part.clamp(min=eps)


def gaussian_radius(wh: Tensor, min_overlap: float = 0.7) -> Tensor:
    """CornerNet radius of boxes ``(N, 2)`` (w, h) (upstream ``get_gaussian_radius``)."""
    w, h = wh[..., 0], wh[..., 1]
    b1, c1 = h + w, w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1**2 - 4 * c1)) / 2
    b2, c2 = 2 * (h + w), (1 - min_overlap) * w * h
    r2 = (b2 + torch.sqrt(b2**2 - 16 * c2)) / 2
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (h + w), (min_overlap - 1) * w * h
    r3 = (b3 + torch.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return torch.min(r1, torch.min(r2, r3))


def draw_gaussian(fmap: Tensor, cx: int, cy: int, radius: int, sigma_factor: float) -> None:
    """Max-paste a Gaussian of ``radius`` (sigma = diameter / sigma_factor) at (cx, cy) into ``fmap`` (h, w)."""
    diameter = 2 * radius + 1
    sigma = diameter / sigma_factor
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    g = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    g[g < np.finfo(g.dtype).eps * g.max()] = 0
    gauss = torch.tensor(g, dtype=fmap.dtype, device=fmap.device)
    h, w = fmap.shape
    left, right = min(cx, radius), min(w - cx, radius + 1)
    top, bottom = min(cy, radius), min(h - cy, radius + 1)
    region = fmap[cy - top : cy + bottom, cx - left : cx + right]
    patch = gauss[radius - top : radius + bottom, radius - left : radius + right]
    if min(patch.shape) > 0 and min(region.shape) > 0:
        fmap[cy - top : cy + bottom, cx - left : cx + right] = torch.max(region, patch)


class PanopticFCNCriterion(nn.Module):
    """``criterion(model, images, pad_mask, targets) -> (loss, logs)`` for :class:`PanopticFCN`."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, model: nn.Module, images: Tensor, pad_mask: Tensor,
                targets: list[dict[str, Tensor]]) -> tuple[Tensor, dict[str, float]]:
        """Run ``model`` (training forward) and compute the four upstream losses."""
        cfg = self.cfg
        out = model(images, pad_mask)
        enc = out["encode_feat"]
        hq, wq = enc.shape[-2:]
        pos_th, pos_st = enc.new_zeros(()), enc.new_zeros(())
        seg_th, seg_st = enc.new_zeros(()), enc.new_zeros(())
        n_th = n_st = 0
        for b, t in enumerate(targets):
            h, w = (int(v) for v in t["image_size"].tolist())
            sem4, inst4, classes, centers, wh, scales = self._image_targets(t, h, w, (hq, wq))
            flat_enc = enc[b].reshape(enc.shape[1], -1)
            for lvl in range(5):
                center, region = out["center_logits"][lvl][b], out["region_logits"][lvl][b]
                kernels = out["kernels"][lvl][b]
                fh, fw = center.shape[-2:]
                lo, hi = cfg.instance_scales[lvl]
                sel = torch.nonzero((scales >= lo) & (scales <= hi)).flatten()
                heat = torch.zeros_like(center)
                if sel.numel():
                    c = centers[sel].clone()
                    c[:, 0] *= fw / wq
                    c[:, 1] *= fh / hq
                    ci = c.to(torch.int64)
                    ci[:, 0].clamp_(0, fw)
                    ci[:, 1].clamp_(0, fh)
                    lvl_wh = wh[sel] * wh.new_tensor([fw / out["input_size"][1], fh / out["input_size"][0]])
                    radius = gaussian_radius(lvl_wh, cfg.min_overlap).clamp_min(0).int().tolist()
                    for j, k in enumerate(sel.tolist()):
                        draw_gaussian(heat[classes[k]], int(ci[j, 0]), int(ci[j, 1]), radius[j], cfg.gaussian_sigma)
                pos_th = pos_th + focal_loss(center, heat, cfg.focal_alpha, cfg.focal_gamma).sum()
                score = F.interpolate(sem4[None], size=(fh, fw), mode="bilinear", align_corners=False)[0].clamp(max=1.0)
                score[score < 0.5] = 0.0
                pos_st = pos_st + focal_loss(region, score, cfg.focal_alpha, cfg.focal_gamma).flatten(1).mean(1).sum()
                if sel.numel():
                    guided = F.interpolate(inst4[sel][None], size=(fh, fw), mode="bilinear", align_corners=False)[0]
                    prob = center[classes[sel]].sigmoid()  # not detached, as upstream
                    guide = torch.where(guided > 0.1, prob, torch.zeros_like(prob)).flatten(1)
                    k = min(cfg.weighted_num, fh * fw)
                    weights, idx = guide.topk(k, dim=-1)  # (n, k)
                    feats = kernels.flatten(1)[:, idx.flatten()].reshape(1, -1, idx.numel(), 1)
                    embed = model.thing_generator.embed_extractor(feats).reshape(enc.shape[1], -1).t()
                    pred = (embed @ flat_enc).reshape(sel.numel(), k, -1)
                    tgt = inst4[sel].flatten(1)[:, None].expand(-1, k, -1)
                    wnorm = weights / weights.sum(-1, keepdim=True).clamp(min=1e-8)
                    seg_th = seg_th + (dice(pred, tgt) * wnorm).sum()
                    n_th += sel.numel()
                present = torch.nonzero(score.flatten(1).sum(-1) > 0).flatten()
                if present.numel():
                    masks = score[present].bool().float()  # (s, fh, fw)
                    feats = F.adaptive_avg_pool2d(masks[:, None] * kernels[None], 1)  # (s, C, 1, 1)
                    embed = model.stuff_generator.embed_extractor(feats).reshape(present.numel(), -1)
                    pred = embed @ flat_enc
                    seg_st = seg_st + dice(pred, sem4[present].flatten(1)).sum()
                    n_st += present.numel()
        losses = {"loss_pos_th": cfg.pos_weight * pos_th / max(n_th, 1),
                  "loss_pos_st": cfg.pos_weight * pos_st / max(len(targets), 1),
                  "loss_seg_th": cfg.seg_weight * seg_th / max(n_th, 1),
                  "loss_seg_st": cfg.seg_weight * seg_st / max(n_st, 1)}
        total = torch.stack(list(losses.values())).sum()
        logs = {k: float(v.detach()) for k, v in losses.items()}
        logs["loss"] = float(total.detach())
        return total, logs

    def _image_targets(self, t: dict[str, Tensor], h: int, w: int, size4: tuple[int, int]
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Stride-4 targets of one image on the ``size4`` canvas.

        Returns:
            ``sem4 (S+1, hq, wq)`` one-hot stuff map (channel 0 = things), ``inst4 (N, hq, wq)`` soft thing masks,
            ``classes (N,)``, ``centers (N, 2)`` mass centres (x, y) at stride 4, ``wh (N, 2)`` box sizes in input
            pixels, ``scales (N,)`` ``sqrt(box area)``.
        """
        cfg = self.cfg
        device = t["thing_masks"].device
        nh, nw = int(h / 4 + 0.5), int(w / 4 + 0.5)
        things = t["thing_masks"][:, :h, :w].float()
        sem = torch.zeros((cfg.num_stuff + 1, h, w), device=device)
        if things.shape[0]:
            sem[0] = things.amax(0)
        for m, label in zip(t["stuff_masks"][:, :h, :w], t["stuff_labels"].tolist()):
            sem[label - cfg.num_things + 1] = torch.maximum(sem[label - cfg.num_things + 1], m.float())
        sem4 = torch.zeros((cfg.num_stuff + 1, *size4), device=device)
        sem4[:, :nh, :nw] = F.interpolate(sem[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        n = things.shape[0]
        inst4 = torch.zeros((n, *size4), device=device)
        centers = torch.zeros((n, 2), device=device)
        if n:
            small = F.interpolate(things[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
            inst4[:, :nh, :nw] = small
            for j in range(n):
                nz = torch.nonzero(small[j]).float()
                centers[j] = nz.mean(0)[[1, 0]] if nz.numel() else torch.tensor([nw / 2, nh / 2], device=device)
        boxes = t["thing_boxes"].reshape(-1, 4).float()  # normalised cxcywh of the unpadded image
        wh = torch.stack([boxes[:, 2] * w, boxes[:, 3] * h], dim=1)
        scales = torch.sqrt(wh[:, 0] * wh[:, 1])
        return sem4, inst4, t["thing_labels"].long(), centers, wh, scales
