"""Box utilities shared by the model, the losses and the post-processing.

Boxes are ``(..., 4)`` tensors. ``cxcywh`` is (centre x, centre y, width, height), ``xyxy`` is
(x0, y0, x1, y1); both are usually normalised to [0, 1] by the image size.
"""

from __future__ import annotations

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """Convert ``(..., 4)`` cxcywh boxes to xyxy."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """Convert ``(..., 4)`` xyxy boxes to cxcywh."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``(N, 4)`` xyxy boxes, ``(N,)``."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of xyxy boxes.

    Args:
        boxes1: ``(N, 4)`` xyxy.
        boxes2: ``(M, 4)`` xyxy.

    Returns:
        ``(iou (N, M), union (N, M))``.
    """
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalised IoU (Rezatofighi et al. 2019) of xyxy boxes, ``(N, M)``.

    Degenerate boxes (x1 < x0) give wrong results, hence the assertions (as in DETR).
    """
    if not bool((boxes1[:, 2:] >= boxes1[:, :2]).all()):
        raise ValueError("boxes1 has degenerate boxes (x1 < x0 or y1 < y0)")
    if not bool((boxes2[:, 2:] >= boxes2[:, :2]).all()):
        raise ValueError("boxes2 has degenerate boxes (x1 < x0 or y1 < y0)")
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / area


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Numerically safe logit, as in Deformable DETR: ``log(x / (1 - x))`` with both clamped to ``eps``."""
    x = x.clamp(min=0, max=1)
    x1 = x.clamp(min=eps)
    x2 = (1 - x).clamp(min=eps)
    return torch.log(x1 / x2)


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight xyxy boxes (pixel units, exclusive max + 0) around ``(N, H, W)`` boolean masks, ``(N, 4)``.

    Empty masks give a zero box.
    """
    if masks.numel() == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    n, h, w = masks.shape
    ys = torch.arange(h, dtype=torch.float32, device=masks.device)
    xs = torch.arange(w, dtype=torch.float32, device=masks.device)
    m = masks.bool()
    any_y = m.any(dim=2)  # (N, H)
    any_x = m.any(dim=1)  # (N, W)
    big = torch.tensor(float(max(h, w)) + 1, device=masks.device)
    y0 = torch.where(any_y, ys[None], big).amin(dim=1)
    y1 = torch.where(any_y, ys[None], -big).amax(dim=1) + 1
    x0 = torch.where(any_x, xs[None], big).amin(dim=1)
    x1 = torch.where(any_x, xs[None], -big).amax(dim=1) + 1
    out = torch.stack((x0, y0, x1, y1), dim=1)
    empty = ~m.flatten(1).any(dim=1)
    out[empty] = 0
    return out
