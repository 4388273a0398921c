"""Mask decoder of Panoptic SegFormer (official ``easymd/models/panformer/mask_head.py``, re-written).

Masks come from the cross-attention **logits** (``q k^T * scale``, before the softmax): per level a
``ReLU(Linear(heads -> heads))`` over the head axis, levels 2 and 3 bilinearly upsampled to the 1/8 grid, then
``ReLU(Linear(3 * heads -> 1))``. There is no sigmoid: masks are non-negative raw values, thresholded at 0.5.

Official quirks kept by default: the padding mask is ignored (softmax over padded keys too), memory has no
positional encoding, ``pos_query`` is re-added before every block. ``ignore_padding=False`` masks padded keys
in the softmax instead (our option; makes a padded batch agree with single images inside the valid region).
Parameter names (``blocks.{i}.attn.q``, ``linear_l1.0`` ..., ``attnen``) match the checkpoints.

Attention maps (Fig. 6, Fig. B.6; ``harness predict --dump-attention``): :func:`record_attention` makes every
cross-attention of a :class:`MaskHead` keep its per-head map over the 1/8-level keys, ``(B, heads, N, h1, w1)``,
for one forward. Two kinds (:data:`ATTENTION_KINDS`):

* ``"logits"`` (default): the raw scaled dot products ``q k^T / sqrt(d)``: the attention map ``A`` of the paper
  (Eq. 1, its 1/8 split ``A_3``), which the ~200-parameter FC head turns into the mask; hence the paper's remark
  that the attention maps look like the masks.
* ``"softmax"``: the attention weights, softmax over all keys of the three levels (as the block uses them to
  aggregate values; padded keys masked when the decoder masks them), restricted to the 1/8 keys.

Recording is off by default and costs one ``None`` check per attention call when off.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))`` (timm style)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, N, D) -> (B, N, D)``."""
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    """timm-style multi-head self-attention with fused ``qkv`` (stuff decoder only)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, N, D) -> (B, N, D)``."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class MaskAttention(nn.Module):
    """Cross-attention whose raw logits also produce a mask (official ``Attention``; ``AttentionTail`` if
    ``with_value=False``, which has only ``q``/``k`` and returns the mask alone).

    Args:
        dim: ``d_model``.
        num_heads: Heads (8 official; Table B.5 compares 1).
        with_value: Build ``v``/``proj`` and return the attended values too.
    """

    def __init__(self, dim: int, num_heads: int, with_value: bool = True) -> None:
        super().__init__()
        # Opt-in recording of the 1/8-level map (see `record_attention`); None = off.
        self.record: str | None = None
        self.recorded: list[Tensor] = []
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.with_value = with_value
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        if with_value:
            self.v = nn.Linear(dim, dim)
            self.proj = nn.Linear(dim, dim)
        self.linear_l1 = nn.Sequential(nn.Linear(num_heads, num_heads), nn.ReLU())
        self.linear_l2 = nn.Sequential(nn.Linear(num_heads, num_heads), nn.ReLU())
        self.linear_l3 = nn.Sequential(nn.Linear(num_heads, num_heads), nn.ReLU())
        self.linear = nn.Sequential(nn.Linear(num_heads * 3, 1), nn.ReLU())

    def _mask(self, attn: Tensor, hw: list[tuple[int, int]]) -> Tensor:
        """``attn (B, N, L, heads)`` raw logits -> mask ``(B, N, H1*W1, 1)``."""
        b, n, _, nh = attn.shape
        (h1, w1), (h2, w2), (h3, w3) = hw[0], hw[1], hw[2]
        wedge_1 = h1 * w1
        wedge_2 = wedge_1 + h2 * w2
        f1 = self.linear_l1(attn[:, :, :wedge_1])
        f2 = self.linear_l2(attn[:, :, wedge_1:wedge_2]).permute(0, 1, 3, 2).reshape(-1, nh, h2, w2)
        f3 = self.linear_l3(attn[:, :, wedge_2:]).permute(0, 1, 3, 2).reshape(-1, nh, h3, w3)
        f2 = F.interpolate(f2, size=(h1, w1), mode="bilinear", align_corners=False)
        f3 = F.interpolate(f3, size=(h1, w1), mode="bilinear", align_corners=False)
        f2 = f2.permute(0, 2, 3, 1).reshape(b, n, wedge_1, nh)
        f3 = f3.permute(0, 2, 3, 1).reshape(b, n, wedge_1, nh)
        return self.linear(torch.cat([f1, f2, f3], -1))

    def _record(self, attn: Tensor, hw: list[tuple[int, int]], key_padding_mask: Tensor | None) -> None:
        """Keep ``(B, heads, N, h1, w1)`` float16 of the 1/8-level keys of this call (``self.record``: the kind)."""
        (h1, w1) = hw[0]
        if self.record == "softmax":
            if key_padding_mask is not None:
                attn = attn.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            attn = attn.softmax(dim=-1)
        b, nh, n, _ = attn.shape
        self.recorded = [attn[..., : h1 * w1].detach().to(torch.float16).reshape(b, nh, n, h1, w1)]

    def forward(self, query: Tensor, memory: Tensor, hw: list[tuple[int, int]],
                key_padding_mask: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
        """Attend.

        Args:
            query: ``(B, N, D)``.
            memory: ``(B, L, D)`` with ``L = H1 W1 + H2 W2 + H3 W3``.
            hw: the three ``(H, W)`` level sizes, finest first.
            key_padding_mask: ``(B, L)`` True on padding; used only in the softmax (None = official).

        Returns:
            ``(x (B, N, D) or None, mask (B, N, H1*W1, 1))``.
        """
        b, n, c = query.shape
        length = memory.shape[1]
        nh = self.num_heads
        q = self.q(query).reshape(b, n, nh, c // nh).permute(0, 2, 1, 3)
        k = self.k(memory).reshape(b, length, nh, c // nh).permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1)) * self.scale  # (B, heads, N, L) raw logits
        if self.record is not None:
            self._record(attn, hw, key_padding_mask)
        mask = self._mask(attn.permute(0, 2, 3, 1), hw)
        if not self.with_value:
            return None, mask
        if key_padding_mask is not None:
            attn = attn.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        v = self.v(memory).reshape(b, length, nh, c // nh).permute(0, 2, 1, 3)
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x), mask


class Block(nn.Module):
    """Post-norm mask-decoder block: [self-attn + norm3] -> mask cross-attn + head_norm1 -> MLP + head_norm2."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, self_attn: bool) -> None:
        super().__init__()
        norm = lambda: nn.LayerNorm(dim, eps=1e-6)  # noqa: E731
        self.head_norm1 = norm()
        self.attn = MaskAttention(dim, num_heads, with_value=True)
        self.head_norm2 = norm()
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.self_attn = self_attn
        if self_attn:
            self.self_attention = SelfAttention(dim, num_heads)
            self.norm3 = norm()

    def forward(self, query: Tensor, memory: Tensor, hw: list[tuple[int, int]],
                key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """``query (B, N, D)`` -> ``(query (B, N, D), mask (B, N, H1*W1, 1))``."""
        if self.self_attn:
            query = self.norm3(query + self.self_attention(query))
        x, mask = self.attn(query, memory, hw, key_padding_mask)
        query = self.head_norm1(query + x)
        query = self.head_norm2(query + self.mlp(query))
        return query, mask


class MaskHead(nn.Module):
    """A stack of mask-decoder blocks plus the tail attention ``attnen`` that makes the final mask.

    Args:
        dim: ``d_model``.
        num_heads: Attention heads.
        num_layers: Blocks (4 for things, 6 for stuff officially).
        self_attn: Self-attention in every block (stuff only, officially).
        mlp_ratio: MLP hidden ratio (4).
    """

    def __init__(self, dim: int = 256, num_heads: int = 8, num_layers: int = 4, self_attn: bool = False,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, self_attn) for _ in range(num_layers))
        self.attnen = MaskAttention(dim, num_heads, with_value=False)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, memory: Tensor, query: Tensor, pos_query: Tensor | None, hw: list[tuple[int, int]],
                key_padding_mask: Tensor | None = None, num_blocks: int | None = None
                ) -> tuple[list[Tensor], list[Tensor]]:
        """Decode masks.

        Args:
            memory: ``(B, L, D)`` encoder output of the three mask levels.
            query: ``(B, N, D)``; pos_query ``(B or 1, N, D)`` or None (re-added before every block, as official).
            hw: the three level sizes.
            key_padding_mask: ``(B, L)`` or None (official: None).
            num_blocks: stop after this many blocks and skip the tail (the official commented-out early return
                of ``MaskHead.forward``, used for Table 10); None runs every block and the tail.

        Returns:
            ``(masks, queries)``: ``num_layers + 1`` masks ``(B, N, H1, W1)`` (blocks then the tail) and the
            ``num_layers`` block output queries ``(B, N, D)``; with ``num_blocks = k``, ``k`` of each.
        """
        h1, w1 = hw[0]
        b, n = query.shape[:2]
        if num_blocks is not None and not 1 <= num_blocks <= len(self.blocks):
            raise ValueError(f"num_blocks {num_blocks} out of range 1..{len(self.blocks)}")
        masks, queries = [], []
        for block in self.blocks[:num_blocks]:
            q_in = query if pos_query is None else query + pos_query
            query, mask = block(q_in, memory, hw, key_padding_mask)
            masks.append(mask.reshape(b, n, h1, w1))
            queries.append(query)
        if num_blocks is not None:
            return masks, queries
        q_in = query if pos_query is None else query + pos_query
        _, mask = self.attnen(q_in, memory, hw, None)
        masks.append(mask.reshape(b, n, h1, w1))
        return masks, queries


ATTENTION_KINDS = ("logits", "softmax")


@contextmanager
def record_attention(head: MaskHead, kind: str = "logits") -> Iterator[dict[str, Tensor]]:
    """Record the cross-attention maps of ``head`` during the forwards run inside the ``with`` block.

    Yields a dict that is filled when the block exits: layer name (``"1"`` .. ``"n"`` for the blocks, ``"last"``
    for the tail ``attnen``) -> ``(B, heads, N, h1, w1)`` float16 map over the 1/8-level keys of the last forward
    (a truncated forward fills only the blocks it ran). ``kind``: ``"logits"`` or ``"softmax"`` (module docstring).

    Example::

        with record_attention(model.bbox_head.things_mask_head) as maps:
            model(images)
        maps["last"].shape  # (B, 8, 100, H/8, W/8)
    """
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention kind must be one of {ATTENTION_KINDS}, got {kind!r}")
    layers = [(str(i + 1), block.attn) for i, block in enumerate(head.blocks)] + [("last", head.attnen)]
    maps: dict[str, Tensor] = {}
    for _, attn in layers:
        attn.record, attn.recorded = kind, []
    try:
        yield maps
    finally:
        for name, attn in layers:
            if attn.recorded:
                maps[name] = attn.recorded[-1]
            attn.record, attn.recorded = None, []
