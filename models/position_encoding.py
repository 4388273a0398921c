"""Sine positional encoding, exactly as mmdet's ``SinePositionalEncoding`` used by the official config.

Official settings: ``num_feats=128, normalize=True, offset=-0.5``, temperature 10000, scale 2*pi, eps 1e-6.
Output layout: ``cat(pos_y, pos_x)`` along channels; inside each, sin and cos are interleaved.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SinePositionalEncoding(nn.Module):
    """2-d sine/cosine encoding computed from a padding mask (no parameters).

    Args:
        num_feats: Channels per axis; the output has ``2 * num_feats`` channels.
        temperature: Frequency base.
        normalize: Normalise cumulative coordinates to ``[0, scale]`` by the valid extent.
        scale: Range after normalisation.
        eps: Added to the denominator of the normalisation.
        offset: Added to the cumulative coordinates before normalising (-0.5 puts pixels at their centres).
    """

    def __init__(
        self,
        num_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        eps: float = 1e-6,
        offset: float = -0.5,
    ) -> None:
        super().__init__()
        self.num_feats = num_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.eps = eps
        self.offset = offset

    def forward(self, mask: Tensor) -> Tensor:
        """Encode positions.

        Args:
            mask: ``(B, H, W)`` bool, True on padding.

        Returns:
            ``(B, 2 * num_feats, H, W)`` float32.
        """
        not_mask = (~mask).to(torch.int32)
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            # The last row/column holds the valid extent (padding is at the bottom/right).
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = torch.arange(self.num_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        b, h, w = mask.shape
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).view(b, h, w, -1)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).view(b, h, w, -1)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
