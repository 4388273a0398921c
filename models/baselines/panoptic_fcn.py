"""Panoptic FCN (Li et al., CVPR 2021), faithful to dvlab-research/PanopticFCN (R50 3x release).

Module tree (attribute names = the released detectron2 state-dict keys):

* ``backbone``: ``bottom_up`` = MSRA ResNet-50 (stride in the 1x1 conv, FrozenBN eps 1e-5, ``FREEZE_AT 2``),
  FPN ``fpn_lateral{2..5}`` / ``fpn_output{2..5}`` (no norm) and ``top_block.p6/p7`` from P5 -> P2..P7.
* ``semantic_fpn`` (``p2..p5``: 3x3 GN ReLU convs, x2 bilinear upsampling, summed at stride 4) ->
  ``feature_encoder`` (coord-conv + 3 convs, 64 channels, no norm) -> ``encode_feat`` at stride 4.
* For each of P3..P7, shared heads: ``position_head`` (3 DCNv2 3x3 + GN + ReLU; ``out_inst`` thing centres,
  ``out_sem`` stuff regions with channel 0 = "things") and ``kernel_head`` (coord-conv + 3 GN convs, ``out_conv``).
* ``thing_generator`` / ``stuff_generator``: 1x1 ``embed_extractor`` (256 -> 64) on the gathered kernels, kernel
  fusion at test time, masks = ``kernel @ encode_feat``.

DCNv2 is torchvision's ``deform_conv2d(..., mask=...)`` on the official ``offset_mask_conv`` output: channels
``[0:18]`` are the offsets (dy at 2k, dx at 2k+1, as detectron2's ``ModulatedDeformConv``), ``sigmoid([18:27])``
the modulation; it runs on CPU and GPU.

Inference (``PanopticFCN.inference`` upstream): per level, thing centres = ``(sigmoid + avg-pool) / 2``, 3x3 max-pool
NMS, top ``min(hw, 50)``, score > 0.05; stuff = region argmax, mean probability > 0.05; kernels gathered (things) or
region-averaged (stuff); things sorted by score; cosine kernel fusion (>= 0.9, same class); stuff kernels of a class
averaged. ``own_post_process``: rescoring by mask quality (threshold 0.4), score >= 0.05, top 100; x4 upsampling,
crop, resize to the original size; then ``combine_thing_and_stuff`` (instance score >= 0.2, overlap 0.5, stuff area
>= 4096). Input: BGR 0-255 minus [123.675, 116.28, 103.53] (the RGB mean applied to BGR, as released), std 1, zero
padding to a multiple of 32. Batch size must be 1 upstream; here every image of a batch is processed on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.baselines.common import ConfigDict, check_data_classes, check_family
from models.baselines.maskformer_detectron2 import (
    Conv2d,
    ResNet,
    c2_msra_fill,
    c2_xavier_fill,
    ceil_div_hw,
    fill_frozen_bn_stats,
    get_norm,
    image_size_in_pixels,
    read_detectron2_checkpoint,
    valid_sizes,
)
from models.family import Family
from models.inference import LAST_LAYER, TestTransformSpec, parse_layer
from models.postprocess import Candidates, PanopticResult

log = logging.getLogger(__name__)

__all__ = [
    "FAMILY",
    "OFFICIAL_RECIPES",
    "PanopticFCN",
    "PanopticFCNConfig",
    "build_criterion",
    "combine_thing_and_stuff",
    "convert_state_dict",
]


@dataclass
class PanopticFCNConfig(ConfigDict):
    """Hyper-parameters of :class:`PanopticFCN`; defaults = ``configs/PanopticFCN-R50-3x.yaml``."""

    name: str = "panoptic_fcn_r50_3x"
    num_things: int = 80
    num_stuff: int = 53
    # Backbone (MSRA R-50) and FPN
    resnet_depths: tuple[int, ...] = (3, 4, 6, 3)
    resnet_stem_channels: int = 64
    resnet_res2_channels: int = 256
    resnet_norm: str = "FrozenBN"
    stride_in_1x1: bool = True
    freeze_at: int = 2
    fpn_channels: int = 256
    # Heads
    gn_groups: int = 32
    semantic_dim: int = 256
    position_convs: int = 3
    position_dim: int = 256
    position_deform: bool = True
    center_bias: float = -2.19
    kernel_convs: int = 3
    kernel_dim: int = 256
    encoder_convs: int = 3
    encoder_dim: int = 64
    # Inference
    thing_thres: float = 0.05
    stuff_thres: float = 0.05
    top_num: int = 100
    pool_sizes: tuple[int, ...] = (3, 3, 3, 5, 5)
    similar_thres: float = 0.9
    class_specific: bool = True
    inst_thres: float = 0.4
    overlap_thresh: float = 0.5
    stuff_area_limit: int = 4096
    combine_inst_thresh: float = 0.2
    # Training (LOSS_WEIGHT, POSITION_HEAD.THING, KERNEL_HEAD.INSTANCE_SCALES)
    pos_weight: float = 1.0
    seg_weight: float = 3.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    weighted_num: int = 7
    min_overlap: float = 0.7
    gaussian_sigma: float = 3.0
    instance_scales: tuple[tuple[int, int], ...] = ((1, 64), (32, 128), (64, 256), (128, 512), (256, 2048))
    # Test transform (BGR, mean on BGR channels as released, std 1, pad to 32)
    test_short: int = 800
    test_long: int = 1333
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    size_divisor: int = 32
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.pool_sizes) != 5 or len(self.instance_scales) != 5:
            raise ValueError("pool_sizes and instance_scales need one entry per level P3..P7")
        self.resnet_depths = tuple(self.resnet_depths)
        self.pool_sizes = tuple(self.pool_sizes)
        self.instance_scales = tuple(tuple(s) for s in self.instance_scales)  # type: ignore[assignment]
        self.pixel_mean = tuple(self.pixel_mean)  # type: ignore[assignment]
        self.pixel_std = tuple(self.pixel_std)  # type: ignore[assignment]


CONFIGS: dict[str, Callable[..., PanopticFCNConfig]] = {
    "panoptic_fcn_r50_3x": PanopticFCNConfig.factory("panoptic_fcn_r50_3x", {}),
    # CPU-sized: tiny GN ResNet (trainable from scratch), 32-channel FPN/heads, one DCN layer, 16-d encoder.
    "panoptic_fcn_tiny": PanopticFCNConfig.factory("panoptic_fcn_tiny", {
        "resnet_depths": (1, 1, 1, 1), "resnet_stem_channels": 16, "resnet_res2_channels": 32, "resnet_norm": "GN",
        "freeze_at": 0, "fpn_channels": 32, "gn_groups": 8, "semantic_dim": 32, "position_convs": 1,
        "position_dim": 32, "kernel_convs": 1, "kernel_dim": 32, "encoder_convs": 2, "encoder_dim": 16,
        "top_num": 40, "stuff_area_limit": 64, "test_short": 128, "test_long": 256}),
}


# Upstream training recipe (configs/PanopticFCN-R50-3x.yaml + detectron2 defaults: SGD momentum 0.9), for
# `harness train` to map onto its own settings.
OFFICIAL_RECIPES: dict[str, dict[str, Any]] = {
    "panoptic_fcn_r50_3x": {
        "optimizer": "sgd", "momentum": 0.9, "lr": 0.01, "weight_decay": 1e-4, "batch_size": 16,
        "iterations": 270000, "lr_schedule": "poly", "poly_power": 0.9, "warmup_iters": 1000, "warmup_factor": 0.001,
        "clip_grad_value": 35.0, "min_size_train": (640, 672, 704, 736, 768, 800), "max_size_train": 1333},
}


# ------------------------------------------------------------------------------------------------- modules
def _register_deform_conv_flops() -> None:
    """Teach ``torch.utils.flop_counter`` torchvision's DCN (counted like a dense conv: 2 * MACs)."""
    try:
        import torchvision.ops  # noqa: F401  (registers torch.ops.torchvision)
        from torch.utils.flop_counter import register_flop_formula

        @register_flop_formula(torch.ops.torchvision.deform_conv2d)
        def _flops(input_shape: Any, weight_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
            cin_per_group, kh, kw = weight_shape[1], weight_shape[2], weight_shape[3]
            return 2 * int(np.prod(out_shape)) * int(cin_per_group) * int(kh) * int(kw)
    except (ImportError, AttributeError, RuntimeError, ValueError) as exc:  # already registered, or no torchvision
        log.debug("deform_conv2d FLOP formula not registered: %s", exc)


_register_deform_conv_flops()


class ModulatedDeformConv(nn.Module):
    """detectron2 ``ModulatedDeformConv`` (weight, optional bias, norm, activation) via torchvision."""

    def __init__(self, cin: int, cout: int, k: int = 3, padding: int = 1, bias: bool = False,
                 norm: nn.Module | None = None, activation: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, k, k))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")
        self.padding = padding
        self.norm = norm
        self.activation = activation

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        from torchvision.ops import deform_conv2d

        x = deform_conv2d(x, offset, self.weight, self.bias, padding=(self.padding, self.padding), mask=mask)
        if self.norm is not None:
            x = self.norm(x)
        return self.activation(x) if self.activation is not None else x


class ModulatedDeformConvWithOff(nn.Module):
    """``offset_mask_conv`` (27 = 18 offsets + 9 masks) + ``dcnv2`` (PanopticFCN ``deform_conv_with_off.py``)."""

    def __init__(self, cin: int, cout: int, norm: nn.Module | None, activation: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.offset_mask_conv = nn.Conv2d(cin, 27, 3, padding=1)
        self.dcnv2 = ModulatedDeformConv(cin, cout, bias=norm is None, norm=norm, activation=activation)

    def forward(self, x: Tensor) -> Tensor:
        om = self.offset_mask_conv(x)
        return self.dcnv2(x, om[:, :18], om[:, 18:].sigmoid())


def coord_conv(feat: Tensor) -> Tensor:
    """Append two coordinate channels in [-1, 1] (first varies along H, second along W), as upstream."""
    ys = torch.linspace(-1, 1, feat.shape[-2], device=feat.device, dtype=feat.dtype)
    xs = torch.linspace(-1, 1, feat.shape[-1], device=feat.device, dtype=feat.dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    b = feat.shape[0]
    return torch.cat([feat, gy[None, None].expand(b, -1, -1, -1), gx[None, None].expand(b, -1, -1, -1)], dim=1)


class SingleHead(nn.Module):
    """``SingleHead``: optional coord channels, then ``num_convs`` 3x3 (deformable) conv + norm + ReLU."""

    def __init__(self, cin: int, dim: int, num_convs: int, name: str, deform: bool = False, coord: bool = False,
                 norm: str = "", gn_groups: int = 32) -> None:
        super().__init__()
        self.coord = coord
        self.convs: list[nn.Module] = []
        for k in range(num_convs):
            c = cin if k == 0 else dim
            if deform:
                conv: nn.Module = ModulatedDeformConvWithOff(c, dim, get_norm(norm, dim, gn_groups), F.relu)
            else:
                conv = Conv2d(c, dim, 3, padding=1, bias=not norm, norm=get_norm(norm, dim, gn_groups),
                              activation=F.relu)
            self.add_module(f"{name}_head_{k + 1}", conv)
            self.convs.append(conv)

    def forward(self, x: Tensor) -> Tensor:
        if self.coord:
            x = coord_conv(x)
        for conv in self.convs:
            x = conv(x)
        return x


class PositionHead(nn.Module):
    def __init__(self, cfg: PanopticFCNConfig) -> None:
        super().__init__()
        self.position_head = SingleHead(cfg.fpn_channels, cfg.position_dim, cfg.position_convs, "position_head",
                                        deform=cfg.position_deform, norm="GN", gn_groups=cfg.gn_groups)
        self.out_inst = nn.Conv2d(cfg.position_dim, cfg.num_things, 3, padding=1)
        self.out_sem = nn.Conv2d(cfg.position_dim, cfg.num_stuff + 1, 3, padding=1)
        for layer in (self.out_inst, self.out_sem):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, cfg.center_bias)

    def forward(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        x = self.position_head(feat)
        return self.out_inst(x), self.out_sem(x)


class KernelHead(nn.Module):
    def __init__(self, cfg: PanopticFCNConfig) -> None:
        super().__init__()
        self.kernel_head = SingleHead(cfg.fpn_channels + 2, cfg.kernel_dim, cfg.kernel_convs, "kernel_head",
                                      coord=True, norm="GN", gn_groups=cfg.gn_groups)
        self.out_conv = nn.Conv2d(cfg.kernel_dim, cfg.kernel_dim, 3, padding=1)
        nn.init.normal_(self.out_conv.weight, std=0.01)
        nn.init.zeros_(self.out_conv.bias)

    def forward(self, feat: Tensor) -> Tensor:
        return self.out_conv(self.kernel_head(feat))


class FeatureEncoder(nn.Module):
    def __init__(self, cfg: PanopticFCNConfig) -> None:
        super().__init__()
        self.encode_head = SingleHead(cfg.semantic_dim + 2, cfg.encoder_dim, cfg.encoder_convs, "encode_head",
                                      coord=True)

    def forward(self, feat: Tensor) -> Tensor:
        return self.encode_head(feat)


class Generator(nn.Module):
    """``ThingGenerator`` / ``StuffGenerator``: the 1x1 ``embed_extractor`` (kernel weights -> encoder dim)."""

    def __init__(self, cfg: PanopticFCNConfig) -> None:
        super().__init__()
        self.embed_extractor = nn.Conv2d(cfg.kernel_dim, cfg.encoder_dim, 1)
        nn.init.normal_(self.embed_extractor.weight, std=0.01)
        nn.init.zeros_(self.embed_extractor.bias)


class TopBlock(nn.Module):
    """``LastLevelP6P7fromP5``: P6 = conv(P5), P7 = conv(relu(P6))."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.p6, self.p7 = nn.Conv2d(ch, ch, 3, 2, 1), nn.Conv2d(ch, ch, 3, 2, 1)
        for m in (self.p6, self.p7):
            c2_xavier_fill(m)

    def forward(self, p5: Tensor) -> list[Tensor]:
        p6 = self.p6(p5)
        return [p6, self.p7(F.relu(p6))]


class Backbone(nn.Module):
    """ResNet ``bottom_up`` + FPN (sum fusion, nearest x2) + P6/P7 -> ``[P2, ..., P7]``."""

    def __init__(self, cfg: PanopticFCNConfig) -> None:
        super().__init__()
        self.bottom_up = ResNet(cfg.resnet_depths, cfg.resnet_stem_channels, cfg.resnet_res2_channels,
                                cfg.resnet_norm, stride_in_1x1=cfg.stride_in_1x1, freeze_at=cfg.freeze_at,
                                gn_groups=cfg.gn_groups)
        ch = cfg.fpn_channels
        for i, c in enumerate(self.bottom_up.out_channels):
            self.add_module(f"fpn_lateral{i + 2}", nn.Conv2d(c, ch, 1))
            self.add_module(f"fpn_output{i + 2}", nn.Conv2d(ch, ch, 3, padding=1))
            c2_xavier_fill(getattr(self, f"fpn_lateral{i + 2}"))
            c2_xavier_fill(getattr(self, f"fpn_output{i + 2}"))
        self.top_block = TopBlock(ch)

    def forward(self, x: Tensor) -> list[Tensor]:
        c = self.bottom_up(x)
        prev = self.fpn_lateral5(c[3])
        outs = [self.fpn_output5(prev)]
        for lvl in (4, 3, 2):
            prev = getattr(self, f"fpn_lateral{lvl}")(c[lvl - 2]) + F.interpolate(prev, scale_factor=2.0,
                                                                                  mode="nearest")
            outs.insert(0, getattr(self, f"fpn_output{lvl}")(prev))
        return outs + self.top_block(outs[-1])


class SemanticFPN(nn.Module):
    """P2..P5 -> stride 4: ``log2(stride / 4)`` (at least 1) conv+GN+ReLU steps, x2 bilinear after each if needed."""

    def __init__(self, cfg: PanopticFCNConfig) -> None:
        super().__init__()
        d = cfg.semantic_dim
        for lvl in (2, 3, 4, 5):
            ops: list[nn.Module] = []
            for k in range(max(1, lvl - 2)):
                conv = Conv2d(cfg.fpn_channels if k == 0 else d, d, 3, padding=1, bias=False,
                              norm=get_norm("GN", d, cfg.gn_groups), activation=F.relu)
                c2_msra_fill(conv)
                ops.append(conv)
                if lvl > 2:
                    ops.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.add_module(f"p{lvl}", nn.Sequential(*ops))

    def forward(self, feats: list[Tensor]) -> Tensor:
        x = self.p2(feats[0])
        for lvl in (3, 4, 5):
            x = x + getattr(self, f"p{lvl}")(feats[lvl - 2])
        return x


# --------------------------------------------------------------------------------------------------- model
@dataclass
class Detections:
    """Kernel-fused outputs of one image before post-processing (stride-4 mask logits over the padded input).

    Attributes:
        thing_logits: ``(K, h, w)`` fused thing masks in fusion order.
        thing_scores: ``(K,)`` centre scores of the fused things (before mask rescoring).
        thing_classes: ``(K,)`` long thing classes (0 .. num_things - 1).
        stuff_logits: ``(S, h, w)`` fused stuff masks, ascending class.
        stuff_scores: ``(S,)`` mean region probabilities, averaged over the levels.
        stuff_classes: ``(S,)`` long region classes (0 = "things", 1 .. num_stuff = stuff).
    """

    thing_logits: Tensor
    thing_scores: Tensor
    thing_classes: Tensor
    stuff_logits: Tensor
    stuff_scores: Tensor
    stuff_classes: Tensor


def topk_score(scores: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Upstream ``topk_score``: top k per class, then top k overall -> ``(scores, position index, class)``."""
    b, c, h, w = scores.shape
    top_scores, top_inds = torch.topk(scores.reshape(b, c, -1), k)
    top_inds = top_inds % (h * w)
    score, index = torch.topk(top_scores.reshape(b, -1), k)
    classes = index // k
    inds = top_inds.view(b, -1, 1).gather(1, index.unsqueeze(2)).reshape(b, k)
    return score, inds, classes


class PanopticFCN(nn.Module):
    """Panoptic FCN (see the module docstring); implements ``models.inference.PanopticModel``."""

    default_post_process = "own"
    mask_stride = 4

    def __init__(self, cfg: PanopticFCNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.semantic_fpn = SemanticFPN(cfg)
        self.position_head = PositionHead(cfg)
        self.kernel_head = KernelHead(cfg)
        self.feature_encoder = FeatureEncoder(cfg)
        self.thing_generator = Generator(cfg)
        self.stuff_generator = Generator(cfg)

    def forward(self, images: Tensor, pad_mask: Tensor | None = None,
                mask_layer: int | None = None) -> dict[str, Any]:
        """Network forward; in eval mode also the per-image kernel generation and fusion (upstream ``inference``
        up to the masks).

        Args:
            images: ``(B, 3, H, W)`` normalised BGR; zero-padded here to a multiple of ``size_divisor`` if needed.
            pad_mask: ``(B, H, W)`` True on padding (gives each image's valid size), or None (all valid).
            mask_layer: unsupported (single-layer model); must be None or 1.

        Returns:
            ``center_logits`` / ``region_logits`` / ``kernels``: five ``(B, C, h_l, w_l)`` tensors (P3..P7),
            ``encode_feat (B, E, H/4, W/4)``, ``image_sizes`` [(h, w)] (``sizes_from_mask``: from ``pad_mask``),
            ``input_size`` (padded H, W), and in eval mode ``detections`` (one :class:`Detections` per image).
        """
        if mask_layer not in (None, 1):
            raise ValueError(f"Panoptic FCN has a single mask layer; got mask_layer={mask_layer}")
        sizes = valid_sizes(images, pad_mask)
        div = self.cfg.size_divisor
        ph, pw = (-images.shape[-2]) % div, (-images.shape[-1]) % div
        if ph or pw:
            images = F.pad(images, (0, pw, 0, ph))
        feats = self.backbone(images)
        encode_feat = self.feature_encoder(self.semantic_fpn(feats[:4]))
        centers, regions, kernels = [], [], []
        for f in feats[1:]:
            c, r = self.position_head(f)
            centers.append(c)
            regions.append(r)
            kernels.append(self.kernel_head(f))
        out: dict[str, Any] = {"center_logits": centers, "region_logits": regions, "kernels": kernels,
                               "encode_feat": encode_feat, "image_sizes": sizes,
                               "sizes_from_mask": pad_mask is not None,
                               "input_size": (int(images.shape[-2]), int(images.shape[-1]))}
        if not self.training:
            with torch.no_grad():
                out["detections"] = [self.generate(out, i) for i in range(images.shape[0])]
        return out

    # ------------------------------------------------------------------ kernel generation and fusion
    def _level(self, center: Tensor, region: Tensor, weights: Tensor, pool: int) -> tuple[Tensor, ...]:
        """``inference_single_level`` for one image (tensors ``(1, C, h, w)``)."""
        cfg = self.cfg
        c = center.sigmoid()
        c = (c + F.avg_pool2d(c, kernel_size=pool, stride=1, padding=(pool - 1) // 2)) / 2.0
        c = c * (F.max_pool2d(c, 3, stride=1, padding=1) == c).float()
        h, w = c.shape[-2:]
        score, index, cls = topk_score(c, min(h * w, cfg.top_num // 2))
        keep = score > cfg.thing_thres
        score_th, class_th, index = score[keep], cls[keep], index[keep]
        flat = weights.reshape(*weights.shape[:2], -1)
        feat_th = flat.gather(2, index[None, None].expand(1, flat.shape[1], -1))  # (1, C, N)
        r = region.sigmoid()
        cate = r.argmax(dim=1)
        class_st, num_st = torch.unique(cate, return_counts=True)
        st_mask = F.one_hot(cate, num_classes=r.shape[1]).permute(0, 3, 1, 2).contiguous()
        score_st = (r * st_mask).reshape(1, r.shape[1], -1)
        score_st = (score_st.sum(dim=-1)[:, class_st] / num_st).squeeze(0)
        keep = score_st > cfg.stuff_thres
        st_mask = st_mask[:, class_st][:, keep].unsqueeze(2)
        feat_st = (st_mask * weights.unsqueeze(1)).reshape(-1, *weights.shape[-3:])
        feat_st = F.adaptive_avg_pool2d(feat_st, output_size=1)  # (S, C, 1, 1): mean over the whole map
        return feat_th, class_th, score_th, feat_st, score_st[keep], class_st[keep]

    def _fuse_things(self, embed: Tensor, classes: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``ThingGenerator.kernel_fusion``: greedy class-specific grouping of kernels with cosine >= 0.9."""
        n = embed.norm(dim=1).unsqueeze(-1)
        unit = embed / n.clamp(min=1e-8)
        label = unit.mm(unit.t()).triu(diagonal=0) >= self.cfg.similar_thres
        if self.cfg.class_specific:
            label = label & (classes.unsqueeze(-1) == classes.unsqueeze(0))
        cum = torch.cumsum(label.float(), dim=0) < 2
        keep = cum.diagonal(0)
        label = (label[keep] & cum[keep]).float()
        return torch.mm(label, embed) / label.sum(dim=1, keepdim=True), classes[keep], scores[keep]

    def generate(self, outputs: dict[str, Any], index: int) -> Detections:
        """Thing and stuff kernels of image ``index``, fused, and their stride-4 mask logits."""
        enc = outputs["encode_feat"][index : index + 1]
        _, e, h, w = enc.shape
        flat = enc.reshape(1, e, -1)
        th_feat, th_cls, th_score, st_feat, st_score, st_cls = [], [], [], [], [], []
        for lvl, pool in enumerate(self.cfg.pool_sizes):
            f_th, c_th, s_th, f_st, s_st, c_st = self._level(outputs["center_logits"][lvl][index : index + 1],
                                                             outputs["region_logits"][lvl][index : index + 1],
                                                             outputs["kernels"][lvl][index : index + 1], pool)
            th_feat.append(f_th), th_cls.append(c_th), th_score.append(s_th)
            st_feat.append(f_st), st_score.append(s_st), st_cls.append(c_st)
        scores, classes = torch.cat(th_score), torch.cat(th_cls)
        if scores.numel():
            order = torch.argsort(scores, descending=True)
            feat = torch.cat(th_feat, dim=2)[:, :, order].unsqueeze(-1)  # (1, C, N, 1)
            embed = self.thing_generator.embed_extractor(feat).reshape(1, e, -1).permute(0, 2, 1)[0]
            embed, classes, scores = self._fuse_things(embed, classes[order], scores[order])
            thing_logits = torch.matmul(embed, flat).reshape(-1, h, w)
        else:
            thing_logits = enc.new_zeros((0, h, w))
        s_scores, s_classes = torch.cat(st_score), torch.cat(st_cls)
        if s_scores.numel():
            embed = self.stuff_generator.embed_extractor(torch.cat(st_feat)).reshape(-1, e)
            uniq = torch.unique(s_classes)
            label = (s_classes.unsqueeze(0) == uniq.unsqueeze(1)).float()
            norm = label.sum(dim=1, keepdim=True)
            embed = torch.mm(label, embed) / norm
            s_scores = (torch.mm(label, s_scores.unsqueeze(-1)) / norm).squeeze(-1)
            s_classes = uniq
            stuff_logits = torch.matmul(embed, flat).reshape(-1, h, w)
        else:
            stuff_logits = enc.new_zeros((0, h, w))
        return Detections(thing_logits, scores, classes.long(), stuff_logits, s_scores, s_classes.long())

    def _detections(self, outputs: dict[str, Any], index: int) -> Detections:
        dets = outputs.get("detections")
        return dets[index] if dets is not None else self.generate(outputs, index)

    # ------------------------------------------------------------------ models.inference.PanopticModel
    def test_transform(self) -> TestTransformSpec:
        """detectron2 ResizeShortestEdge 800/1333 (PIL bilinear on uint8), BGR, mean as released, std 1, pad 32."""
        return TestTransformSpec(resize="detectron2", short=self.cfg.test_short, long=self.cfg.test_long,
                                 mean=self.cfg.pixel_mean, std=self.cfg.pixel_std, channel_order="bgr",
                                 size_divisor=self.cfg.size_divisor)

    def mask_layers(self) -> list[str]:
        """Single-layer model."""
        return [LAST_LAYER]

    def candidates(self, outputs: dict[str, Any], index: int, layer: str = LAST_LAYER,
                   valid_hw: tuple[int, int] | None = None) -> Candidates:
        """Fused things (centre score, thing class) then fused stuff (region score, contiguous stuff class; the
        "things" region class 0 is left out), masks = sigmoid of the stride-4 logits cropped to the image
        (``valid_hw`` in mask pixels, default the recorded size / 4 rounded up)."""
        if parse_layer(layer) not in (None, 1):
            raise ValueError(f"Panoptic FCN has a single mask layer; got layer {layer!r}")
        d = self._detections(outputs, index)
        h, w = valid_hw or ceil_div_hw(outputs["image_sizes"][index], self.mask_stride)
        st = d.stuff_classes > 0
        masks = torch.cat([d.thing_logits, d.stuff_logits[st]])[:, :h, :w].float().sigmoid()
        labels = torch.cat([d.thing_classes, d.stuff_classes[st] - 1 + self.cfg.num_things])
        return Candidates(scores=torch.cat([d.thing_scores, d.stuff_scores[st]]).float().cpu(),
                          labels=labels.cpu(), masks=masks.cpu())

    def post_process_options(self, method: str) -> dict[str, Any]:
        """Our choice for the shared post-processors: Panoptic FCN's combine threshold 0.2 as score threshold."""
        if method == "heuristic":
            return {"instance_score_threshold": self.cfg.combine_inst_thresh,
                    "overlap_threshold": self.cfg.overlap_thresh, "stuff_area_limit": self.cfg.stuff_area_limit}
        if method == "p":
            return {"score_threshold": self.cfg.combine_inst_thresh}
        if method == "p*":
            return {"object_mask_threshold": self.cfg.combine_inst_thresh}
        return {}

    def own_post_process(self, outputs: dict[str, Any], index: int, out_size: tuple[int, int],
                         valid_hw: tuple[int, int] | None = None) -> PanopticResult:
        """Upstream ``process_inst`` + stuff resizing + ``combine_thing_and_stuff`` at ``out_size`` (``valid_hw`` in
        mask pixels; the image size recorded from the padding mask wins when ``valid_hw`` agrees with it)."""
        img_hw = image_size_in_pixels(outputs, index, valid_hw, self.mask_stride)
        return self._own(self._detections(outputs, index), img_hw, out_size)

    def _own(self, d: Detections, img_hw: tuple[int, int], out_size: tuple[int, int]) -> PanopticResult:
        cfg = self.cfg

        def resize(x: Tensor) -> Tensor:  # (1, N, h, w) stride 4 -> (N, H, W): x4, crop, resize (upstream)
            x = F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)[..., : img_hw[0], : img_hw[1]]
            return F.interpolate(x, size=tuple(out_size), mode="bilinear", align_corners=False)[0]

        thing_masks = classes = scores = None
        if d.thing_logits.shape[0]:
            inst = d.thing_logits.float().sigmoid()
            mask = inst > cfg.inst_thres
            seg_score = (inst * mask.float()).sum((1, 2)) / (mask.sum((1, 2)).float() + 1e-6)
            scores = d.thing_scores * seg_score
            order = torch.argsort(scores, descending=True)
            inst, scores, classes = inst[order], scores[order], d.thing_classes[order]
            keep = scores >= 0.05
            if keep.sum() > 0:
                inst, scores, classes = inst[keep], scores[keep], classes[keep]
                order = torch.argsort(scores, descending=True)[: cfg.top_num]
                inst, scores, classes = inst[order], scores[order].reshape(-1), classes[order].reshape(-1)
                thing_masks = resize(inst.unsqueeze(0)) > cfg.inst_thres
            else:
                classes = scores = None
        sem = torch.zeros((cfg.num_stuff + 1, *out_size), device=d.stuff_logits.device)
        if d.stuff_logits.shape[0]:
            sem[d.stuff_classes] += resize(d.stuff_logits.float().sigmoid().unsqueeze(0))
        stuff_scores = {int(c): float(s) for c, s in zip(d.stuff_classes.tolist(), d.stuff_scores.tolist())}
        return combine_thing_and_stuff(thing_masks, classes, scores, sem.argmax(dim=0), cfg.num_things,
                                       cfg.overlap_thresh, cfg.stuff_area_limit, cfg.combine_inst_thresh,
                                       stuff_scores)

    def dump_raw(self, outputs: dict[str, Any], index: int, prep: Any, result: PanopticResult) -> dict[str, np.ndarray]:
        """Raw outputs for ``predict --dump-raw`` (issue #12); the panoptic maps are the own inference, recomputed
        with the exact resized size ``prep.img_shape`` (whatever ``result`` came from)."""
        d = self._detections(outputs, index)

        def arr(t: Tensor, dtype: Any = np.float32) -> np.ndarray:
            return t.detach().cpu().numpy().astype(dtype)

        raw: dict[str, np.ndarray] = {}
        for lvl in range(5):
            raw[f"center_logits_p{lvl + 3}"] = arr(outputs["center_logits"][lvl][index])
        for lvl in range(5):
            raw[f"region_logits_p{lvl + 3}"] = arr(outputs["region_logits"][lvl][index])
        raw["encode_feat"] = arr(outputs["encode_feat"][index])
        raw.update(thing_mask_logits=arr(d.thing_logits), thing_scores=arr(d.thing_scores),
                   thing_classes=arr(d.thing_classes, np.int64), stuff_mask_logits=arr(d.stuff_logits),
                   stuff_scores=arr(d.stuff_scores), stuff_classes=arr(d.stuff_classes, np.int64))
        own = self._own(d, tuple(prep.img_shape), tuple(prep.ori_shape))
        raw["panoptic_category"] = own.category.astype(np.int32)
        raw["panoptic_instance"] = own.instance.astype(np.int32)
        return raw


def combine_thing_and_stuff(thing_masks: Tensor | None, thing_classes: Tensor | None, thing_scores: Tensor | None,
                            stuff_map: Tensor, num_things: int, overlap_threshold: float = 0.5,
                            stuff_area_limit: int = 4096, inst_threshold: float = 0.2,
                            stuff_scores: dict[int, float] | None = None) -> PanopticResult:
    """Upstream ``combine_thing_and_stuff`` (panopticapi's heuristic with instance threshold 0.2) as a
    :class:`PanopticResult` (contiguous labels: things as is, stuff region class s -> ``num_things + s - 1``).

    Args:
        thing_masks: ``(K, H, W)`` bool, sorted by score (descending), or None.
        thing_classes / thing_scores: ``(K,)``, or None.
        stuff_map: ``(H, W)`` long argmax of the region classes (0 = "things", skipped).
        stuff_scores: region class -> score written into the segment list (upstream writes none; default 1.0).
    """
    out_size = tuple(stuff_map.shape)
    seg = torch.zeros(out_size, dtype=torch.int32)
    category = torch.full(out_size, -1, dtype=torch.int32)
    instance = torch.zeros(out_size, dtype=torch.int32)
    segments: list[dict[str, Any]] = []
    sid = n_inst = 0
    if thing_classes is not None and thing_masks is not None and thing_scores is not None:
        keep = thing_scores >= inst_threshold
        for m, c, s in zip(thing_masks[keep].cpu(), thing_classes[keep].cpu(), thing_scores[keep].cpu()):
            area = int(m.sum())
            inter = int((m & (seg > 0)).sum())
            if area == 0 or inter * 1.0 / area > overlap_threshold:
                continue
            if inter > 0:
                m = m & (seg == 0)
            sid += 1
            seg[m] = sid
            category[m] = int(c)
            n_inst += 1
            instance[m] = n_inst
            segments.append({"label": int(c), "isthing": True, "score": float(s), "instance": n_inst,
                             "area": int(m.sum())})
    stuff_map = stuff_map.cpu()
    for label in torch.unique(stuff_map).tolist():
        if label == 0:  # the special "things" region class
            continue
        m = (stuff_map == label) & (seg == 0)
        area = int(m.sum())
        if area < stuff_area_limit:
            continue
        sid += 1
        seg[m] = sid
        category[m] = num_things + label - 1
        score = 1.0 if stuff_scores is None else float(stuff_scores.get(label, 1.0))
        segments.append({"label": num_things + label - 1, "isthing": False, "score": score, "instance": 0,
                         "area": area})
    return PanopticResult(category=category.numpy(), instance=instance.numpy(), segments=segments)


# ----------------------------------------------------------------------------------------------- converter
def convert_state_dict(raw: dict[str, Tensor], cfg: PanopticFCNConfig,
                       source: str = "<state dict>") -> dict[str, Tensor]:
    """Released Panoptic FCN state dict (detectron2 names) -> ours: identity names; FrozenBN layers without running
    stats get mean 0 / var 1 (detectron2's rule); ``pixel_mean``/``pixel_std`` buffers (if any) are dropped.

    Raises:
        CheckpointError: not a Panoptic FCN checkpoint (names the family it looks like).
    """
    for head in ("position_head.", "kernel_head."):  # both heads
        check_family(raw, (head,), "Panoptic FCN", source)
    out = {k: v for k, v in raw.items() if k not in ("pixel_mean", "pixel_std")}
    fill_frozen_bn_stats(out, "backbone.bottom_up.", source)
    return out


def _convert_released(path: Path, cfg: PanopticFCNConfig) -> dict[str, Tensor]:
    """``harness convert --from panoptic-fcn``: a released detectron2 ``.pth`` -> our state dict."""
    return convert_state_dict(read_detectron2_checkpoint(path), cfg, str(path))


def build_criterion(cfg: PanopticFCNConfig, num_things: int, num_stuff: int) -> nn.Module:
    """Panoptic FCN's training loss (``models.baselines.panoptic_fcn_loss.PanopticFCNCriterion``)."""
    from models.baselines.panoptic_fcn_loss import PanopticFCNCriterion

    check_data_classes(cfg, num_things, num_stuff)
    return PanopticFCNCriterion(cfg)


FAMILY = Family(
    name="panoptic_fcn",
    configs=CONFIGS,
    config_from_dict=PanopticFCNConfig.from_dict,
    build=PanopticFCN,
    converters={"panoptic-fcn": _convert_released},
    default_source="panoptic-fcn",
)
