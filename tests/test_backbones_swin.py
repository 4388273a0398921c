"""Swin backbone: our timm-based ``SwinBackbone`` computes what the official Swin-Transformer-Object-Detection
backbone (used by Panoptic SegFormer, ``easymd/models/backbones/swin.py``) computes.

The reference below is a small functional re-implementation of the official forward, written from the official
algorithm and independent of ``models.backbones``: it reads the weights under their *official* names (obtained with
``models.convert_official.to_official_names``), so it also checks the name mapping (official stage ``i`` ends with
its patch merging, timm's stage ``i + 1`` starts with it).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from models.backbones import SwinBackbone
from models.convert_official import to_official_names

TINY = dict(embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 8), window_size=7)
TINY_OUT = (0, 1, 2)


# ----------------------------------------------------------------------------------------------------------------
# Reference: the official algorithm, token layout (B, H*W, C) as in the official code.
# ----------------------------------------------------------------------------------------------------------------

def _ref_rel_index(ws: int) -> Tensor:
    ys, xs = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # 2, N
    rel = coords[:, :, None] - coords[:, None, :]  # 2, N, N
    return (rel[0] + ws - 1) * (2 * ws - 1) + (rel[1] + ws - 1)


def _ref_partition(x: Tensor, ws: int) -> Tensor:
    b, h, w, c = x.shape
    return x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def _ref_reverse(win: Tensor, ws: int, h: int, w: int) -> Tensor:
    c = win.shape[-1]
    return win.view(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def _ref_stage_mask(h: int, w: int, ws: int, shift: int) -> Tensor:
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    img = torch.zeros(1, hp, wp, 1)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    mw = _ref_partition(img, ws).squeeze(-1)  # nW, N
    m = mw.unsqueeze(1) - mw.unsqueeze(2)
    return m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0)


def _ln(x: Tensor, sd: dict[str, Tensor], p: str) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-5)


def _ref_attention(x: Tensor, sd: dict[str, Tensor], p: str, heads: int, ws: int, mask: Tensor | None) -> Tensor:
    bw, n, c = x.shape
    qkv = F.linear(x, sd[p + ".qkv.weight"], sd[p + ".qkv.bias"])
    qkv = qkv.reshape(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
    bias = sd[p + ".relative_position_bias_table"][_ref_rel_index(ws).view(-1)].view(n, n, -1).permute(2, 0, 1)
    attn = attn + bias.unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        attn = (attn.view(bw // nw, nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, n, n)
    x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(bw, n, c)
    return F.linear(x, sd[p + ".proj.weight"], sd[p + ".proj.bias"])


def _ref_block(x: Tensor, h: int, w: int, sd: dict[str, Tensor], p: str, heads: int, ws: int, shift: int,
               mask: Tensor) -> Tensor:
    b, _, c = x.shape
    shortcut = x
    x = _ln(x, sd, p + ".norm1").view(b, h, w, c)
    pad_r, pad_b = (ws - w % ws) % ws, (ws - h % ws) % ws
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    hp, wp = x.shape[1], x.shape[2]
    if shift > 0:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    x = _ref_attention(_ref_partition(x, ws), sd, p + ".attn", heads, ws, mask if shift > 0 else None)
    x = _ref_reverse(x, ws, hp, wp)
    if shift > 0:
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    x = x[:, :h, :w, :].reshape(b, h * w, c)
    x = shortcut + x
    y = F.linear(_ln(x, sd, p + ".norm2"), sd[p + ".mlp.fc1.weight"], sd[p + ".mlp.fc1.bias"])
    return x + F.linear(F.gelu(y), sd[p + ".mlp.fc2.weight"], sd[p + ".mlp.fc2.bias"])


def _ref_merge(x: Tensor, h: int, w: int, sd: dict[str, Tensor], p: str) -> Tensor:
    b, _, c = x.shape
    x = x.view(b, h, w, c)
    if h % 2 == 1 or w % 2 == 1:
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1).view(b, -1, 4 * c)
    return F.linear(_ln(x, sd, p + ".norm"), sd[p + ".reduction.weight"])


def official_swin_forward(img: Tensor, sd: dict[str, Tensor], depths, heads, ws: int, out_indices) -> list[Tensor]:
    """The official ``SwinTransformer.forward`` (ape=False, patch_norm=True, eval mode) on official-named weights."""
    _, _, hi, wi = img.shape
    if wi % 4:
        img = F.pad(img, (0, 4 - wi % 4))
    if hi % 4:
        img = F.pad(img, (0, 0, 0, 4 - hi % 4))
    x = F.conv2d(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4)
    h, w = x.shape[2], x.shape[3]
    x = _ln(x.flatten(2).transpose(1, 2), sd, "patch_embed.norm")
    outs = []
    for i, depth in enumerate(depths):
        shift = ws // 2
        mask = _ref_stage_mask(h, w, ws, shift)
        for j in range(depth):
            x = _ref_block(x, h, w, sd, f"layers.{i}.blocks.{j}", heads[i], ws, 0 if j % 2 == 0 else shift, mask)
        if i in out_indices:
            out = _ln(x, sd, f"norm{i}")
            outs.append(out.view(-1, h, w, out.shape[-1]).permute(0, 3, 1, 2))
        if i < len(depths) - 1:
            x = _ref_merge(x, h, w, sd, f"layers.{i}.downsample")
            h, w = (h + 1) // 2, (w + 1) // 2
    return outs


# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_swin() -> tuple[SwinBackbone, dict[str, Tensor]]:
    """A tiny Swin (embed 32, depths 2/2/2, window 7) with randomised weights, and its official-named state dict."""
    torch.manual_seed(0)
    net = SwinBackbone("swin_tiny_patch4_window7_224", drop_path_rate=0.0, out_indices=TINY_OUT, **TINY).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            # Larger, non-trivial values so a wrong mask / bias index / padding shows up clearly.
            if name.endswith("relative_position_bias_table"):
                p.normal_(0.0, 1.0)
            elif "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    ours = {f"backbone.{k}": v for k, v in net.state_dict().items()}
    sd = {k.removeprefix("backbone."): v for k, v in to_official_names(ours, "swin_l").items()}
    return net, sd


@pytest.mark.parametrize("size", [(60, 92), (36, 44), (57, 90), (27, 30)])
def test_swin_matches_official_forward(tiny_swin, size: tuple[int, int]) -> None:
    """Sizes not multiples of 28: padding before the shift, full window and shift on maps smaller than 7 (36x44 ->
    9x11, 5x6, 3x3), odd patch merging, patch-embedding padding (57x90, 27x30)."""
    net, sd = tiny_swin
    torch.manual_seed(1)
    img = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = net(img)
        ref = official_swin_forward(img, sd, TINY["depths"], TINY["num_heads"], 7, TINY_OUT)
    assert len(ours) == len(ref) == 3
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_timm_forward_differs_from_official(tiny_swin) -> None:
    """Sanity check of the reference: timm's own stage forward (cyclic shift before padding) differs."""
    net, sd = tiny_swin
    img = torch.randn(1, 3, 36, 44)
    with torch.no_grad():
        ref = official_swin_forward(img, sd, TINY["depths"], TINY["num_heads"], 7, TINY_OUT)
        x = net.patch_embed(img)
        timm_outs = []
        for i, layer in enumerate(net.layers):
            x = layer(x)  # timm forward
            timm_outs.append(getattr(net, f"norm{i}")(x).permute(0, 3, 1, 2))
    assert max((a - b).abs().max().item() for a, b in zip(timm_outs, ref)) > 1e-2


def test_swin_l_layout() -> None:
    """Default Swin-L: window 7 in every stage (never shrunk), outputs 384/768/1536 with ``norm1..3``."""
    with torch.device("meta"):
        net = SwinBackbone()
    assert net.window_sizes == [7, 7, 7, 7]
    assert net.out_channels == (384, 768, 1536)
    assert [hasattr(net, f"norm{i}") for i in range(4)] == [False, True, True, True]
    assert [len(layer.blocks) for layer in net.layers] == [2, 2, 18, 2]
    assert all(tuple(b.attn.relative_position_bias_table.shape) == (169, b.attn.num_heads)
               for layer in net.layers for b in layer.blocks)
