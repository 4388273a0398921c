"""Multi-scale deformable attention (Deformable DETR): functional API and nn.Module.

`ms_deform_attn` dispatches to a compiled kernel (csrc/) when one is built, else to the
pure-PyTorch grid_sample fallback below. Semantics follow Deformable DETR exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def ms_deform_attn_pytorch(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Pure-PyTorch multi-scale deformable attention (grid_sample, align_corners=False).

    Args:
        value: (N, S, M, D) with S = sum_l H_l * W_l.
        spatial_shapes: (L, 2) long, (H_l, W_l) per level.
        level_start_index: (L,) long, offset of each level in S (unused: derived from shapes).
        sampling_locations: (N, Lq, M, L, P, 2) in [0, 1], (x, y).
        attention_weights: (N, Lq, M, L, P).

    Returns:
        (N, Lq, M * D) in the dtype of `value`.
    """
    dtype = value.dtype
    if value.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        # grid_sample on CPU needs fp32: compute in fp32 and return in the input dtype.
        value, sampling_locations, attention_weights = (
            value.float(), sampling_locations.float(), attention_weights.float()
        )
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    value_list = value.split([h * w for h, w in shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        value_l = value_list[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid_l = sampling_grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * num_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous().to(dtype)


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: str | None = None,
) -> Tensor:
    """Multi-scale deformable attention; see `ms_deform_attn_pytorch` for shapes.

    `backend`: None (best available), 'pytorch', 'cpp' or 'cuda'.
    """
    if backend not in (None, "pytorch"):
        raise RuntimeError(f"ms_deform_attn backend {backend!r} is not built")
    return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR), standard projections and init.

    Parameter names (sampling_offsets, attention_weights, value_proj, output_proj) match
    Deformable DETR and mmcv so checkpoints convert without renaming.
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.backend: str | None = None
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offset grid init (one direction per head, growing with point index), zero weights."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)
        for i in range(self.num_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        value_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from queries to multi-scale values.

        Args:
            query: (N, Lq, C), already including any positional embedding.
            reference_points: (N, Lq, L, 2) normalised (x, y), or (N, Lq, L, 4) boxes (cx, cy, w, h).
            value: (N, S, C) flattened multi-scale features.
            spatial_shapes: (L, 2) long.
            level_start_index: (L,) long.
            value_padding_mask: (N, S) bool, True on padding (those values are zeroed).

        Returns:
            (N, Lq, C).
        """
        n, lq, _ = query.shape
        s = value.shape[1]
        v = self.value_proj(value)
        if value_padding_mask is not None:
            v = v.masked_fill(value_padding_mask[..., None], 0.0)
        v = v.view(n, s, self.num_heads, self.embed_dim // self.num_heads)
        offsets = self.sampling_offsets(query).view(n, lq, self.num_heads, self.num_levels, self.num_points, 2)
        weights = self.attention_weights(query).view(n, lq, self.num_heads, self.num_levels * self.num_points)
        weights = weights.softmax(-1).view(n, lq, self.num_heads, self.num_levels, self.num_points)
        if reference_points.shape[-1] == 2:
            normaliser = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets.dtype)
            locations = reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / self.num_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"reference_points last dim must be 2 or 4, got shape {tuple(reference_points.shape)}"
            )
        out = ms_deform_attn(v, spatial_shapes, level_start_index, locations, weights, backend=self.backend)
        return self.output_proj(out)
