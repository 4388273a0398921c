"""Deformable transformer: encoder + location decoder (mmdet ``DeformableDetrTransformer`` as used officially).

Both are post-norm. Module and parameter names follow mmcv (``layers.{i}.attentions.{j}``, ``ffns.0.layers``,
``norms.{k}``) so the official checkpoints load without renaming. Dropout (0.1) sits on each residual branch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.box_ops import inverse_sigmoid
from models.ops import MSDeformAttn


class FFN(nn.Module):
    """mmcv ``FFN``: ``identity + Dropout(Linear(Dropout(ReLU(Linear(x)))))``; keys ``layers.0.0``, ``layers.1``."""

    def __init__(self, d_model: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)),
            nn.Linear(hidden, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, N, D) -> (B, N, D)`` with the residual added."""
        return x + self.layers(x)


class SelfAttention(nn.Module):
    """mmcv ``MultiheadAttention`` wrapper around ``nn.MultiheadAttention`` (key ``attn.in_proj_weight``)."""

    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        """``(B, N, D)`` queries, position added to q and k only; returns ``x + attn`` ``(B, N, D)``."""
        qk = x + pos
        out = self.attn(qk, qk, x, need_weights=False)[0]
        return x + self.proj_drop(out)


class EncoderLayer(nn.Module):
    """``('self_attn', 'norm', 'ffn', 'norm')`` with multi-scale deformable self-attention."""

    def __init__(self, d_model: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int,
                 dropout: float) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([MSDeformAttn(d_model, num_heads, num_levels, num_points)])
        self.ffns = nn.ModuleList([FFN(d_model, ffn_dim, dropout)])
        self.norms = nn.ModuleList([nn.LayerNorm(d_model), nn.LayerNorm(d_model)])
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor | None) -> Tensor:
        """``x (B, S, D)``, ``reference_points (B, S, L, 2)``, ``padding_mask (B, S)`` -> ``(B, S, D)``."""
        attn = self.attentions[0](x + pos, reference_points, x, spatial_shapes, level_start_index, padding_mask)
        x = self.norms[0](x + self.drop(attn))
        return self.norms[1](self.ffns[0](x))


class DecoderLayer(nn.Module):
    """``('self_attn', 'norm', 'cross_attn', 'norm', 'ffn', 'norm')``; cross-attention is deformable."""

    def __init__(self, d_model: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int,
                 dropout: float) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([
            SelfAttention(d_model, num_heads, dropout),
            MSDeformAttn(d_model, num_heads, num_levels, num_points),
        ])
        self.ffns = nn.ModuleList([FFN(d_model, ffn_dim, dropout)])
        self.norms = nn.ModuleList([nn.LayerNorm(d_model) for _ in range(3)])
        self.drop = nn.Dropout(dropout)

    def forward(self, q: Tensor, pos: Tensor, reference_points: Tensor, memory: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor | None) -> Tensor:
        """``q, pos (B, Q, D)``, ``reference_points (B, Q, L, 2|4)``, ``memory (B, S, D)`` -> ``(B, Q, D)``."""
        q = self.norms[0](self.attentions[0](q, pos))
        attn = self.attentions[1](q + pos, reference_points, memory, spatial_shapes, level_start_index, padding_mask)
        q = self.norms[1](q + self.drop(attn))
        return self.norms[2](self.ffns[0](q))


class Encoder(nn.Module):
    """Stack of deformable encoder layers (no final norm, as official)."""

    def __init__(self, num_layers: int, **layer_kwargs: int | float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(**layer_kwargs) for _ in range(num_layers))  # type: ignore[arg-type]

    @staticmethod
    def get_reference_points(spatial_shapes: Tensor, valid_ratios: Tensor) -> Tensor:
        """Pixel-centre reference points of every level, ``(B, S, L, 2)`` normalised by the valid extent."""
        refs = []
        device = valid_ratios.device
        for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(refs, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(self, x: Tensor, pos: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                valid_ratios: Tensor, padding_mask: Tensor) -> Tensor:
        """``x, pos (B, S, D)`` -> memory ``(B, S, D)``."""
        ref = self.get_reference_points(spatial_shapes, valid_ratios)
        for layer in self.layers:
            x = layer(x, pos, ref, spatial_shapes, level_start_index, padding_mask)
        return x


class LocationDecoder(nn.Module):
    """Deformable DETR decoder with iterative box refinement; returns every layer (deep supervision).

    ``reg_branches`` (owned by the head, passed in) refine the reference boxes between layers; the refined
    boxes are detached before the next layer, as official.
    """

    def __init__(self, num_layers: int, **layer_kwargs: int | float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(**layer_kwargs) for _ in range(num_layers))  # type: ignore[arg-type]

    def forward(self, query: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, valid_ratios: Tensor, padding_mask: Tensor,
                reg_branches: nn.ModuleList | None) -> tuple[list[Tensor], list[Tensor]]:
        """Run the decoder.

        Args:
            query, query_pos: ``(B, Q, D)``.
            reference_points: ``(B, Q, 2)`` initial sigmoid reference points.
            memory: ``(B, S, D)``; padding_mask ``(B, S)``; valid_ratios ``(B, L, 2)``.
            reg_branches: one box MLP per layer for refinement, or None.

        Returns:
            ``(hs, refs)``: per-layer outputs ``(B, Q, D)`` and the reference after each layer ``(B, Q, 2|4)``.
        """
        hs, refs = [], []
        out = query
        for lid, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                ref_in = reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                ref_in = reference_points[:, :, None] * valid_ratios[:, None]
            out = layer(out, query_pos, ref_in, memory, spatial_shapes, level_start_index, padding_mask)
            if reg_branches is not None:
                tmp = reg_branches[lid](out)
                if reference_points.shape[-1] == 4:
                    new_ref = (tmp + inverse_sigmoid(reference_points)).sigmoid()
                else:
                    new_ref = torch.cat([tmp[..., :2] + inverse_sigmoid(reference_points), tmp[..., 2:]], -1)
                    new_ref = new_ref.sigmoid()
                reference_points = new_ref.detach()
            hs.append(out)
            refs.append(reference_points)
        return hs, refs


class DeformableTransformer(nn.Module):
    """Level embeddings, encoder, location decoder and the initial reference-point projection.

    Args:
        d_model, num_heads, num_levels, num_points, ffn_dim, dropout: layer sizes (official 256/8/4/4/1024/0.1).
        num_encoder_layers, num_decoder_layers: depths (official 6/6).
    """

    def __init__(self, d_model: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4,
                 ffn_dim: int = 1024, dropout: float = 0.1, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6) -> None:
        super().__init__()
        kw = dict(d_model=d_model, num_heads=num_heads, num_levels=num_levels, num_points=num_points,
                  ffn_dim=ffn_dim, dropout=dropout)
        self.d_model = d_model
        self.encoder = Encoder(num_encoder_layers, **kw)
        self.decoder = LocationDecoder(num_decoder_layers, **kw)
        self.level_embeds = nn.Parameter(torch.empty(num_levels, d_model))
        self.reference_points = nn.Linear(d_model, 2)
        self.init_weights()

    def init_weights(self) -> None:
        """Official init: xavier on matrices, MSDA grid init, reference_points xavier, level_embeds N(0, 1)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embeds)

    @staticmethod
    def get_valid_ratio(mask: Tensor) -> Tensor:
        """Valid (w, h) fraction of a ``(B, H, W)`` padding mask, ``(B, 2)``."""
        _, h, w = mask.shape
        valid_h = torch.sum(~mask[:, :, 0], 1)
        valid_w = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)

    def flatten(self, feats: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor]
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Flatten levels: ``(x (B, S, D), pos+level (B, S, D), mask (B, S), shapes (L, 2), start (L,), ratios)``."""
        xs, ms, ps, shapes = [], [], [], []
        for lvl, (f, m, p) in enumerate(zip(feats, masks, pos_embeds)):
            shapes.append(f.shape[-2:])
            xs.append(f.flatten(2).transpose(1, 2))
            ms.append(m.flatten(1))
            ps.append(p.flatten(2).transpose(1, 2) + self.level_embeds[lvl].view(1, 1, -1))
        spatial_shapes = torch.as_tensor([tuple(s) for s in shapes], dtype=torch.long, device=feats[0].device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self.get_valid_ratio(m) for m in masks], 1)
        return torch.cat(xs, 1), torch.cat(ps, 1), torch.cat(ms, 1), spatial_shapes, level_start_index, valid_ratios

