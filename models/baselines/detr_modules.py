"""DETR building blocks (facebookresearch/detr ``models/transformer.py``, ``segmentation.py``, ``detr.py``).

Attribute names equal DETR's, so the released state dicts load with an identity key map:

* :class:`Transformer`: post-norm encoder (no final norm) and decoder with a shared final ``LayerNorm`` applied to
  every intermediate output; ``nn.MultiheadAttention`` in DETR's sequence-first layout (``(S, B, D)``), positions
  added to queries and keys only, queries start at zero. (DETR's ``pre_norm`` variant is not used by any released
  panoptic model and is not implemented.)
* :class:`MLP`: ReLU between ``layers``.
* :class:`MHAttentionMap`: the 2-d attention of the panoptic head; the softmax runs **jointly over heads and
  positions** (``weights.flatten(2)``), padded positions at ``-inf``.
* :class:`MaskHeadSmallConv`: the FPN-style conv head, GroupNorm(8) after every conv but the last, nearest
  upsampling, adapters on C4/C3/C2; output stride 4. ``gn_groups`` is a parameter only so the tiny CPU config can use
  narrow layers (DETR: 8).

The Deformable DETR panoptic baseline (``deformable_detr.py``) reuses :class:`MLP`, :class:`MHAttentionMap` and
:class:`MaskHeadSmallConv`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Transformer", "MLP", "MHAttentionMap", "MaskHeadSmallConv"]


class EncoderLayer(nn.Module):
    """DETR ``TransformerEncoderLayer.forward_post``: self-attention, add, norm1, FFN, add, norm2."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: Tensor, key_padding_mask: Tensor | None, pos: Tensor) -> Tensor:
        """``src, pos (S, B, D)``, ``key_padding_mask (B, S)`` -> ``(S, B, D)``."""
        q = k = src + pos
        src2 = self.self_attn(q, k, value=src, key_padding_mask=key_padding_mask)[0]
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(src2))


class DecoderLayer(nn.Module):
    """DETR ``TransformerDecoderLayer.forward_post``: self-attn, norm1, cross-attn, norm2, FFN, norm3."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Tensor | None, pos: Tensor,
                query_pos: Tensor) -> Tensor:
        """``tgt, query_pos (Q, B, D)``, ``memory, pos (S, B, D)`` -> ``(Q, B, D)``."""
        q = k = tgt + query_pos
        tgt2 = self.self_attn(q, k, value=tgt)[0]
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.multihead_attn(query=tgt + query_pos, key=memory + pos, value=memory,
                                   key_padding_mask=memory_key_padding_mask)[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(tgt2))


class _Stack(nn.Module):
    """``layers`` (+ optional ``norm``), DETR's ``TransformerEncoder`` / ``TransformerDecoder`` containers."""

    def __init__(self, layer: nn.Module, num_layers: int, norm: nn.Module | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm


class Transformer(nn.Module):
    """DETR's encoder-decoder (post-norm; the decoder returns every layer's output after ``decoder.norm``).

    Args:
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout: DETR's 256 / 8 / 6 / 6 /
            2048 / 0.1.
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = _Stack(EncoderLayer(d_model, nhead, dim_feedforward, dropout), num_encoder_layers, None)
        self.decoder = _Stack(DecoderLayer(d_model, nhead, dim_feedforward, dropout), num_decoder_layers,
                              nn.LayerNorm(d_model))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.d_model = d_model
        self.nhead = nhead

    def forward(self, src: Tensor, mask: Tensor, query_pos: Tensor, pos_embed: Tensor) -> tuple[Tensor, Tensor]:
        """Encode a feature map and decode the queries.

        Args:
            src: ``(B, D, h, w)`` projected features.
            mask: ``(B, h, w)`` bool, True on padding.
            query_pos: ``(Q, B, D)`` learned query positions, already repeated over the batch (DETR does the
                ``query_embed.weight.unsqueeze(1).repeat(1, B, 1)`` inside; done by the caller here so no parameter is
                a module input, which FlopCounterMode's module hooks reject under no_grad / inference_mode).
            pos_embed: ``(B, D, h, w)`` sine positions.

        Returns:
            ``hs (L, B, Q, D)`` (every decoder layer, after ``decoder.norm``) and ``memory (B, D, h, w)``.
        """
        bs, c, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)
        pos = pos_embed.flatten(2).permute(2, 0, 1)
        mask = mask.flatten(1)
        memory = src
        for layer in self.encoder.layers:
            memory = layer(memory, mask, pos)
        out = torch.zeros_like(query_pos)
        hs = []
        for layer in self.decoder.layers:
            out = layer(out, memory, mask, pos, query_pos)
            hs.append(self.decoder.norm(out))
        return torch.stack(hs).transpose(1, 2), memory.permute(1, 2, 0).view(bs, c, h, w)


class MLP(nn.Module):
    """DETR's "very simple multi-layer perceptron": ``num_layers`` Linear layers with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        """``(..., input_dim) -> (..., output_dim)``."""
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


class MHAttentionMap(nn.Module):
    """DETR's 2-d attention map: only the softmax of ``q . k``, no value product.

    The key projection is applied to the ``(B, D, h, w)`` map as a 1x1 conv reusing ``k_linear``'s weight; the
    softmax is taken over ``heads x h x w`` jointly (DETR ``weights.flatten(2)``).
    """

    def __init__(self, query_dim: int, hidden_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.dropout = nn.Dropout(dropout)
        self.q_linear = nn.Linear(query_dim, hidden_dim)
        self.k_linear = nn.Linear(query_dim, hidden_dim)
        nn.init.zeros_(self.k_linear.bias)
        nn.init.zeros_(self.q_linear.bias)
        nn.init.xavier_uniform_(self.k_linear.weight)
        nn.init.xavier_uniform_(self.q_linear.weight)
        self.normalize_fact = float(hidden_dim / num_heads) ** -0.5

    def forward(self, q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
        """``q (B, Q, D)``, ``k (B, D, h, w)``, ``mask (B, h, w)`` -> weights ``(B, Q, heads, h, w)``."""
        q = self.q_linear(q)
        k = F.conv2d(k, self.k_linear.weight.unsqueeze(-1).unsqueeze(-1), self.k_linear.bias)
        qh = q.view(q.shape[0], q.shape[1], self.num_heads, self.hidden_dim // self.num_heads)
        kh = k.view(k.shape[0], self.num_heads, self.hidden_dim // self.num_heads, k.shape[-2], k.shape[-1])
        weights = torch.einsum("bqnc,bnchw->bqnhw", qh * self.normalize_fact, kh)
        if mask is not None:
            weights = weights.masked_fill(mask.unsqueeze(1).unsqueeze(1), float("-inf"))
        weights = F.softmax(weights.flatten(2), dim=-1).view(weights.size())
        return self.dropout(weights)


def _expand(tensor: Tensor, length: int) -> Tensor:
    """``(B, C, h, w) -> (B * length, C, h, w)``, each image repeated ``length`` times (DETR ``_expand``)."""
    return tensor.unsqueeze(1).repeat(1, int(length), 1, 1, 1).flatten(0, 1)


class MaskHeadSmallConv(nn.Module):
    """DETR's FPN-style mask head.

    Args:
        dim: input channels (``d_model + num_heads``: the projected map concatenated with the attention maps).
        fpn_dims: channels of the three skip features, coarse to fine (C4, C3, C2: 1024 / 512 / 256 for R50).
        context_dim: ``d_model``; the widths are ``dim, d/2, d/4, d/8, d/16`` and a 1-channel output.
        gn_groups: GroupNorm groups (DETR: 8).
    """

    def __init__(self, dim: int, fpn_dims: list[int], context_dim: int, gn_groups: int = 8) -> None:
        super().__init__()
        inter = [dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16]
        self.lay1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.gn1 = nn.GroupNorm(gn_groups, dim)
        self.lay2 = nn.Conv2d(dim, inter[1], 3, padding=1)
        self.gn2 = nn.GroupNorm(gn_groups, inter[1])
        self.lay3 = nn.Conv2d(inter[1], inter[2], 3, padding=1)
        self.gn3 = nn.GroupNorm(gn_groups, inter[2])
        self.lay4 = nn.Conv2d(inter[2], inter[3], 3, padding=1)
        self.gn4 = nn.GroupNorm(gn_groups, inter[3])
        self.lay5 = nn.Conv2d(inter[3], inter[4], 3, padding=1)
        self.gn5 = nn.GroupNorm(gn_groups, inter[4])
        self.out_lay = nn.Conv2d(inter[4], 1, 3, padding=1)
        self.dim = dim
        self.adapter1 = nn.Conv2d(fpn_dims[0], inter[1], 1)
        self.adapter2 = nn.Conv2d(fpn_dims[1], inter[2], 1)
        self.adapter3 = nn.Conv2d(fpn_dims[2], inter[3], 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.constant_(m.bias, 0)

    def _fuse(self, adapter: nn.Conv2d, fpn: Tensor, x: Tensor) -> Tensor:
        cur = adapter(fpn)
        if cur.size(0) != x.size(0):
            cur = _expand(cur, x.size(0) // cur.size(0))
        return cur + F.interpolate(x, size=cur.shape[-2:], mode="nearest")

    def forward(self, x: Tensor, bbox_mask: Tensor, fpns: list[Tensor]) -> Tensor:
        """Mask logits of every query.

        Args:
            x: ``(B, D, h, w)`` stride-32 map (DETR: ``input_proj(C5)``).
            bbox_mask: ``(B, Q, heads, h, w)`` attention maps.
            fpns: ``[C4, C3, C2]`` ``(B, c, H_s, W_s)``.

        Returns:
            ``(B * Q, 1, H_4, W_4)`` logits at stride 4 (C2's size).
        """
        x = torch.cat([_expand(x, bbox_mask.shape[1]), bbox_mask.flatten(0, 1)], 1)
        x = F.relu(self.gn1(self.lay1(x)))
        x = F.relu(self.gn2(self.lay2(x)))
        x = F.relu(self.gn3(self.lay3(self._fuse(self.adapter1, fpns[0], x))))
        x = F.relu(self.gn4(self.lay4(self._fuse(self.adapter2, fpns[1], x))))
        x = F.relu(self.gn5(self.lay5(self._fuse(self.adapter3, fpns[2], x))))
        return self.out_lay(x)
