"""Backbones built from timm modules, returning C3/C4/C5 (strides 8/16/32).

No weights are downloaded: ``pretrained`` is a local path (timm/torchvision-style state dict) or None.

Parameter names:
  * ResNet: the timm children are adopted directly, so keys are ``conv1``, ``bn1``, ``layer1..4`` (identical to
    torchvision and mmdet); the official checkpoints load without renaming.
  * PVTv2 and Swin keep timm's names (``patch_embed``, ``stages.{i}`` / ``layers.{i}``); ``models.convert_official``
    maps the official names onto them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

# Output channels of C3/C4/C5 per backbone name.
BACKBONE_CHANNELS: dict[str, tuple[int, int, int]] = {
    "resnet18": (128, 256, 512),
    "resnet50": (512, 1024, 2048),
    "resnet101": (512, 1024, 2048),
    "swin_l": (384, 768, 1536),
    "pvtv2_b5": (128, 320, 512),
}


class _GroupNorm(nn.GroupNorm):
    """GroupNorm taking only the channel count (timm's ``norm_layer`` call): 32 groups, fewer for thin layers
    (at least 4 channels per group)."""

    def __init__(self, num_channels: int, **kwargs: object) -> None:
        super().__init__(max(1, min(32, num_channels // 4)), num_channels)


class ResNetBackbone(nn.Module):
    """ResNet as configured by the official code (mmdet ``style='pytorch'``, ``frozen_stages=1``, ``norm_eval``).

    The stem and ``layer1`` get ``requires_grad=False``; every BatchNorm stays in eval mode with frozen affine
    parameters (they remain ``nn.Parameter`` so the parameter count equals the official one).

    Args:
        name: timm model name (``resnet18``, ``resnet50``, ``resnet101``).
        frozen_stages: -1 freezes nothing, 0 the stem, ``k`` the stem and ``layer1..k``.
        norm_eval: Keep BatchNorm in eval mode during training (ignored with ``norm="gn"``).
        zero_init_last: timm's zero init of each residual branch's last norm scale (harmless only when that
            scale trains: with frozen BatchNorm it switches the branches off for good).
        norm: ``"bn"`` (BatchNorm, official) or ``"gn"`` (GroupNorm, trainable, batch-independent: for training
            from scratch with small batches, e.g. the tiny config).
        width: stage width ``w`` (stages ``w, 2w, 4w, 8w``); None = the standard 64.
    """

    def __init__(self, name: str = "resnet50", frozen_stages: int = 1, norm_eval: bool = True,
                 zero_init_last: bool = True, norm: str = "bn", width: int | None = None) -> None:
        super().__init__()
        import timm

        kwargs: dict[str, object] = {}
        if norm == "gn":
            kwargs["norm_layer"] = _GroupNorm
        elif norm != "bn":
            raise ValueError(f"ResNet norm must be 'bn' or 'gn', got {norm!r}")
        if width is not None:  # a narrower ResNet: stage widths (w, 2w, 4w, 8w), stem w
            kwargs.update(channels=(width, 2 * width, 4 * width, 8 * width), stem_width=width)
        body = timm.create_model(name, pretrained=False, features_only=True, out_indices=(2, 3, 4),
                                 zero_init_last=zero_init_last, **kwargs)
        for child_name, child in body.named_children():
            self.add_module(child_name, child)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval and norm == "bn"
        self.out_channels = tuple(body.feature_info.channels())
        self._freeze()

    def _freeze(self) -> None:
        if self.frozen_stages >= 0:
            for m in (self.conv1, self.bn1):
                for p in m.parameters():
                    p.requires_grad_(False)
        for i in range(1, self.frozen_stages + 1):
            for p in getattr(self, f"layer{i}").parameters():
                p.requires_grad_(False)
        if self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    for p in m.parameters():
                        p.requires_grad_(False)

    def train(self, mode: bool = True) -> "ResNetBackbone":
        """Switch mode but keep BatchNorm (and frozen stages) in eval mode, as mmdet's ``norm_eval``."""
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        """``(B, 3, H, W) -> [C3 (B, c3, H/8, W/8), C4 (H/16), C5 (H/32)]``."""
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        c3 = self.layer2(x)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]


class PVTv2Backbone(nn.Module):
    """PVTv2-B5 (timm ``pvt_v2_b5``) returning stages 2-4, each after its stage norm.

    Official: embed (64, 128, 320, 512), heads (1, 2, 5, 8), depths (3, 6, 40, 3), sr (8, 4, 2, 1), LN eps 1e-6,
    drop_path 0.1. Key layout differs from the official ``block{i}``/``patch_embed{i}``/``norm{i}`` names only by
    renaming (see ``models.convert_official``).
    """

    def __init__(self, name: str = "pvt_v2_b5", drop_path_rate: float = 0.1) -> None:
        super().__init__()
        import timm

        net = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate)
        self.patch_embed = net.patch_embed
        self.stages = net.stages
        self.out_channels = tuple(int(s.norm.normalized_shape[0]) for s in net.stages)[1:]

    def forward(self, x: Tensor) -> list[Tensor]:
        """``(B, 3, H, W) -> [(B, 128, H/8, W/8), (B, 320, H/16, W/16), (B, 512, H/32, W/32)]``."""
        x = self.patch_embed(x)
        outs = []
        for stage in self.stages:
            x = stage(x)  # timm stages take and return NCHW
            outs.append(x)
        return outs[1:]


def _shifted_window_mask(hp: int, wp: int, window: int, shift: int, device: torch.device,
                         dtype: torch.dtype) -> Tensor:
    """Attention mask of the shifted windows for a ``hp x wp`` map (both multiples of ``window``), as official.

    The padded map is split into 3 x 3 regions by the slices ``[0, -window)``, ``[-window, -shift)``,
    ``[-shift, end)`` of each axis; two tokens of one window may attend to each other only when they lie in the same
    region (0), else -100. Returns ``(num_windows, window**2, window**2)``.
    """
    region = torch.zeros(hp, wp, device=device, dtype=torch.float32)
    bounds = ((0, -window), (-window, -shift), (-shift, None))
    label = 0
    for h0, h1 in bounds:
        for w0, w1 in bounds:
            region[h0:h1, w0:w1] = label
            label += 1
    region = region.view(hp // window, window, wp // window, window).permute(0, 2, 1, 3).reshape(-1, window * window)
    different = region[:, None, :] != region[:, :, None]
    return torch.zeros(different.shape, device=device, dtype=dtype).masked_fill(different, -100.0)


def _to_windows(x: Tensor, window: int) -> Tensor:
    """``(B, Hp, Wp, C) -> (B * Hp/window * Wp/window, window**2, C)``, windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def _from_windows(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`_to_windows`: ``(B * nW, window**2, C) -> (B, h, w, C)``."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def swin_block_official(block: nn.Module, x: Tensor, window: int, shift: int, mask: Tensor | None) -> Tensor:
    """Run a timm ``SwinTransformerBlock``'s parameters with the official Swin-Transformer-Object-Detection order.

    ``norm1`` -> zero-pad right/bottom to multiples of ``window`` -> cyclic shift by ``-shift`` -> window attention
    (with ``mask`` for shifted blocks) -> reverse shift -> crop -> residual (drop path); then
    ``x + drop_path(mlp(norm2(x)))``. The window is never shrunk and the shift never disabled.

    Args:
        block: timm ``SwinTransformerBlock`` (uses ``norm1``, ``attn``, ``drop_path1``, ``norm2``, ``mlp``,
            ``drop_path2``).
        x: ``(B, H, W, C)``.
        window: window size (the size of ``block.attn``'s relative position table).
        shift: 0 (W-MSA) or ``window // 2`` (SW-MSA).
        mask: :func:`_shifted_window_mask` for the padded size of this stage, used when ``shift > 0``.
    """
    b, h, w, c = x.shape
    y = block.norm1(x)
    pad_b, pad_r = (-h) % window, (-w) % window
    if pad_b or pad_r:
        y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
    hp, wp = h + pad_b, w + pad_r
    if shift:
        y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
    y = block.attn(_to_windows(y, window), mask=mask if shift else None)
    y = _from_windows(y, window, hp, wp)
    if shift:
        y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
    if pad_b or pad_r:
        y = y[:, :h, :w, :]
    x = x + block.drop_path1(y)
    return x + block.drop_path2(block.mlp(block.norm2(x)))


class SwinBackbone(nn.Module):
    """Swin Transformer (default Swin-L window 7) with the official Swin-Transformer-Object-Detection forward.

    Parameters are timm's (``patch_embed``, ``layers.{i}.downsample`` / ``.blocks.{j}``) plus one LayerNorm per
    output (``norm{i}`` for ``i`` in ``out_indices``, as official); ``models.convert_official`` maps the official
    names. The forward is the official one, not timm's:

    * patch embedding: zero-pad the image right/bottom to a multiple of the patch size, conv, LayerNorm;
    * every block pads its (normalised) map right/bottom to multiples of the window *before* the cyclic shift, uses
      the full window (7) and shift (3 on odd blocks) on every map, even one smaller than the window, and the
      shifted-window mask (-100) built once per stage for the padded size (:func:`swin_block_official`);
      timm's own forward shifts before padding (and by default shrinks the window / drops the shift on small maps);
    * patch merging zero-pads odd sizes to even (timm = official), then LayerNorm and reduction;
    * stage ``i`` output (before the next merging, timm's ``layers.{i}`` output) goes through ``norm{i}``.

    Attention runs through timm's ``WindowAttention`` (scaled ``q @ k^T`` + relative position bias + mask, softmax;
    same index table as official). With ``TIMM_FUSED_ATTN=2`` timm would use ``scaled_dot_product_attention``
    instead, equal up to rounding. ``tests/test_backbones_swin.py`` checks the whole forward against an
    independent re-implementation of the official one. timm's ``grad_checkpointing`` flag is not used.

    Args:
        name: timm Swin model name.
        drop_path_rate: stochastic depth, linear over all blocks (official rule).
        out_indices: stages to return (official Panoptic SegFormer: ``(1, 2, 3)``).
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``embed_dim``, ``depths``, ``num_heads`` for a small
            model in tests).
    """

    def __init__(self, name: str = "swin_large_patch4_window7_224", drop_path_rate: float = 0.3,
                 out_indices: tuple[int, ...] = (1, 2, 3), **timm_kwargs: object) -> None:
        super().__init__()
        import timm

        # always_partition: timm keeps the full window and shift for every stage (its own forward is not used).
        net = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate,
                                strict_img_size=False, dynamic_img_size=True, always_partition=True, **timm_kwargs)
        self.patch_embed = net.patch_embed
        # Pad the input to a multiple of the patch size, as the official Swin (not floor).
        self.patch_embed.dynamic_img_pad = True
        self.layers = net.layers
        self.window_sizes: list[int] = []
        for layer in net.layers:
            win_h, win_w = layer.blocks[0].attn.window_size
            if win_h != win_w:
                raise ValueError(f"square windows only, got {(win_h, win_w)}")
            self.window_sizes.append(int(win_h))
        dims = [int(layer.blocks[0].norm1.normalized_shape[0]) for layer in net.layers]
        self.out_indices = tuple(out_indices)
        self.out_channels = tuple(dims[i] for i in self.out_indices)
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(dims[i]))

    def forward(self, x: Tensor) -> list[Tensor]:
        """``(B, 3, H, W) -> [(B, C_i, H_i, W_i) for i in out_indices]``, ``H_0 = ceil(H / 4)``, ``H_{i+1} =
        ceil(H_i / 2)`` (Swin-L: ``[(B, 384, H/8, W/8), (B, 768, H/16, W/16), (B, 1536, H/32, W/32)]``)."""
        x = self.patch_embed(x)  # (B, ceil(H/4), ceil(W/4), C), NHWC
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer.downsample(x)  # Identity for stage 0, else PatchMerging (pads odd sizes)
            window = self.window_sizes[i]
            shift = window // 2
            h, w = x.shape[1], x.shape[2]
            mask = None
            if shift and len(layer.blocks) > 1:
                mask = _shifted_window_mask(-(-h // window) * window, -(-w // window) * window, window, shift,
                                            x.device, x.dtype)
            for j, block in enumerate(layer.blocks):
                x = swin_block_official(block, x, window, shift if j % 2 == 1 else 0, mask)
            if i in self.out_indices:
                outs.append(getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2).contiguous())
        return outs


def build_backbone(name: str, frozen_stages: int = 1, drop_path_rate: float | None = None,
                   norm_eval: bool = True, norm: str = "bn", width: int | None = None) -> nn.Module:
    """Build a backbone by its config name (``resnet18/50/101``, ``swin_l``, ``pvtv2_b5``); random init.

    ``norm_eval`` (ResNet only) freezes BatchNorm as the official config does, which is right for ImageNet weights
    and wrong from scratch: timm zero-initialises the last norm scale of every residual block, so with frozen
    BatchNorm the residual branches stay off for good and only the stem and the 1x1 strided shortcuts learn (a
    backbone with an ~11-px receptive field; the reason the old tiny recipe learnt no things, docs/training.md).
    ``norm="gn"`` (GroupNorm, trained) and ``width`` are for random-init training (the tiny config).
    """
    if name in ("resnet18", "resnet50", "resnet101"):
        return ResNetBackbone(name, frozen_stages=frozen_stages, norm_eval=norm_eval, norm=norm, width=width)
    if norm != "bn" or width is not None:
        raise ValueError(f"backbone norm / width options exist for ResNets only, not {name!r}")
    if name == "pvtv2_b5":
        return PVTv2Backbone(drop_path_rate=0.1 if drop_path_rate is None else drop_path_rate)
    if name == "swin_l":
        return SwinBackbone(drop_path_rate=0.3 if drop_path_rate is None else drop_path_rate)
    raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONE_CHANNELS)}")


def load_pretrained_backbone(backbone: nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """Load ImageNet weights into ``backbone`` from a local file (never downloads).

    Accepts a raw state dict or one wrapped under ``state_dict``/``model``; ``module.``/``backbone.`` prefixes and
    classifier keys are dropped. Official-style PVTv2 / Swin names (``block1``, end-of-stage downsampling) are
    mapped to the timm layout. Loading is non-strict (pretraining checkpoints lack our extra output norms).

    Returns:
        ``(missing, unexpected)`` key lists.

    Raises:
        models.files.InputError: the file is unreadable, holds code (``models.safe_load``), or is not a state dict.
    """
    from models.files import InputError
    from models.safe_load import torch_load

    obj = torch_load(path)  # an unreadable or unsafe file: UnsafeCheckpointError naming it (one CLI line)
    if not isinstance(obj, dict):
        raise InputError(f"pretrained backbone {path}: holds a {type(obj).__name__}, not a state dict")
    for k in ("state_dict", "model"):
        if k in obj and isinstance(obj[k], dict):
            obj = obj[k]
            break
    from models.convert_official import convert_state_dict

    sd = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in obj.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith(("fc.", "head.", "norm.")) and not k.endswith("attn_mask")}
    if isinstance(backbone, (PVTv2Backbone, SwinBackbone)) and not any(k.startswith("stages.") for k in sd):
        kind = "pvtv2_b5" if isinstance(backbone, PVTv2Backbone) else "swin_l"
        renamed = convert_state_dict({f"backbone.{k}": v for k, v in sd.items()}, kind)
        sd = {k.removeprefix("backbone."): v for k, v in renamed.items()}
    missing, unexpected = backbone.load_state_dict(sd, strict=False)
    if missing:
        log.warning("pretrained backbone %s: %d missing keys, e.g. %s", path, len(missing), missing[:3])
    if unexpected:
        log.warning("pretrained backbone %s: %d unexpected keys, e.g. %s", path, len(unexpected), unexpected[:3])
    return list(missing), list(unexpected)
