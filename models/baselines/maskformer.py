"""MaskFormer (Cheng et al., NeurIPS 2021) for panoptic segmentation, faithful to facebookresearch/MaskFormer.

Module tree (attribute names = the detectron2 state-dict keys, so the released ``.pkl`` loads with an identity map):

* ``backbone``: detectron2 ResNet-50 (stride in the 3x3 conv, FrozenBN eps 1e-5; ``stem``, ``res2..res5``) or Swin-L
  (window 12, 384 pretraining; ``models.backbones.SwinBackbone`` with the official Swin-Transformer-Object-Detection
  forward, outputs of all four stages through ``norm0..3``).
* ``sem_seg_head.pixel_decoder``: FPN (``adapter_1..3`` 1x1 + GN, ``layer_1..4`` 3x3 + GN + ReLU, ``mask_features``
  3x3) with, for R50, a 6-layer DETR post-norm encoder on res5 (``input_proj``, ``transformer.encoder.layers``;
  ``TransformerEncoderPixelDecoder``); Swin-L uses the plain ``BasePixelDecoder``.
* ``sem_seg_head.predictor``: DETR decoder (6 post-norm layers + final ``norm``, 100 queries, no encoder), with
  ``input_proj`` (Swin-L: 1x1 1536 -> 256 on res5; R50: identity on the encoder output), ``class_embed``
  (K + 1 logits, last = no-object) and ``mask_embed`` (3-layer MLP); masks = ``mask_embed(q) . mask_features``
  at stride 4.

Inference: ``own_post_process`` is MaskFormer's ``panoptic_inference`` (object mask threshold 0.8, overlap 0.8,
stuff of one class merged into its first segment, pixels of dropped queries void), run as upstream at the original
image size: mask logits bilinearly upsampled to the network input, cropped to the image, resized to the original
size, then sigmoid; the score-weighted argmax is ``models.postprocess.maskformer_merge`` "(p*)".

Released weights: ``model_final_6f60dc.pkl`` (R50) and ``model_final_7505c4.pkl`` (Swin-L IN21k 384); see
``docs/baselines_maskformer_pfcn.md``. Old files store pixel-decoder keys without ``pixel_decoder.``: both accepted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.baselines.common import ConfigDict, check_family
from models.baselines.maskformer_detectron2 import (
    Conv2d,
    ResNet,
    c2_xavier_fill,
    ceil_div_hw,
    fill_frozen_bn_stats,
    get_norm,
    image_size_in_pixels,
    read_detectron2_checkpoint,
    valid_sizes,
)
from models.checkpoint import CheckpointError
from models.family import Family
from models.inference import LAST_LAYER, TestTransformSpec, parse_layer
from models.position_encoding import SinePositionalEncoding
from models.postprocess import Candidates, PanopticResult, maskformer_merge

log = logging.getLogger(__name__)

__all__ = [
    "FAMILY",
    "OFFICIAL_RECIPES",
    "MaskFormer",
    "MaskFormerConfig",
    "build_criterion",
    "convert_state_dict",
    "maskformer_panoptic_inference",
]


@dataclass
class MaskFormerConfig(ConfigDict):
    """Hyper-parameters of :class:`MaskFormer`; defaults = ``maskformer_panoptic_R50_bs64_554k.yaml``."""

    name: str = "maskformer_r50_panoptic"
    num_things: int = 80
    num_stuff: int = 53
    # Backbone: "resnet" (detectron2 ResNet) or "swin_l"
    backbone: str = "resnet"
    resnet_depths: tuple[int, ...] = (3, 4, 6, 3)
    resnet_stem_channels: int = 64
    resnet_res2_channels: int = 256
    resnet_norm: str = "FrozenBN"
    freeze_at: int = 0  # MaskFormer's BACKBONE.FREEZE_AT
    swin_name: str = "swin_large_patch4_window12_384"
    swin_drop_path: float = 0.3
    # Pixel decoder
    conv_dim: int = 256
    mask_dim: int = 256
    gn_groups: int = 32
    encoder_layers: int = 6  # > 0: TransformerEncoderPixelDecoder (R50); 0: BasePixelDecoder (Swin-L)
    enforce_input_proj: bool = False
    # Transformer decoder
    hidden_dim: int = 256
    num_queries: int = 100
    nheads: int = 8
    dropout: float = 0.1
    dim_feedforward: int = 2048
    dec_layers: int = 6
    pre_norm: bool = False
    # Loss (training)
    no_object_weight: float = 0.1
    mask_weight: float = 20.0
    dice_weight: float = 1.0
    deep_supervision: bool = True
    # Inference (MASK_FORMER.TEST)
    object_mask_threshold: float = 0.8
    overlap_threshold: float = 0.8
    # Test transform (INPUT.MIN/MAX_SIZE_TEST, PIXEL_MEAN/STD, RGB, SIZE_DIVISIBILITY 0)
    test_short: int = 800
    test_long: int = 1333
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backbone not in ("resnet", "swin_l"):
            raise ValueError(f"backbone must be 'resnet' or 'swin_l', got {self.backbone!r}")
        if self.dec_layers < 1:
            raise ValueError("dec_layers must be >= 1")
        self.resnet_depths = tuple(self.resnet_depths)
        self.pixel_mean = tuple(self.pixel_mean)  # type: ignore[assignment]
        self.pixel_std = tuple(self.pixel_std)  # type: ignore[assignment]

    @property
    def num_classes(self) -> int:
        """Things + stuff (the no-object logit is extra)."""
        return self.num_things + self.num_stuff


CONFIGS: dict[str, Callable[..., MaskFormerConfig]] = {
    "maskformer_r50_panoptic": MaskFormerConfig.factory("maskformer_r50_panoptic", {}),
    # swin/maskformer_panoptic_swin_large_IN21k_384_bs64_554k.yaml: BasePixelDecoder, res5 into the decoder.
    "maskformer_swin_l_panoptic": MaskFormerConfig.factory("maskformer_swin_l_panoptic", {
        "backbone": "swin_l", "encoder_layers": 0, "enforce_input_proj": True}),
    # CPU-sized: tiny bottleneck ResNet (GN, trainable from scratch), 32 channels, 1 encoder + 2 decoder layers.
    "maskformer_tiny": MaskFormerConfig.factory("maskformer_tiny", {
        "resnet_depths": (1, 1, 1, 1), "resnet_stem_channels": 16, "resnet_res2_channels": 32, "resnet_norm": "GN",
        "conv_dim": 32, "mask_dim": 32, "gn_groups": 8, "encoder_layers": 1, "hidden_dim": 32, "num_queries": 20,
        "nheads": 4, "dropout": 0.0, "dim_feedforward": 64, "dec_layers": 2, "test_short": 128, "test_long": 256}),
}


# Upstream training recipes (configs/coco-panoptic/*.yaml + detectron2 defaults), for `harness train` to map onto
# its own settings. Iterations are at the stated batch size; lr drops x0.1 at the step.
OFFICIAL_RECIPES: dict[str, dict[str, Any]] = {
    "maskformer_r50_panoptic": {
        "optimizer": "adamw", "lr": 1e-4, "weight_decay": 1e-4, "backbone_lr_mult": 0.1, "batch_size": 64,
        "iterations": 554400, "lr_steps": (369600,), "warmup_iters": 10, "warmup_factor": 1.0,
        "clip_grad_norm": 0.01, "min_size_train": (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800),
        "max_size_train": 1333, "crop_absolute_range": (384, 600)},
    "maskformer_swin_l_panoptic": {
        "optimizer": "adamw", "lr": 6e-5, "weight_decay": 0.01, "weight_decay_norm": 0.0, "weight_decay_embed": 0.0,
        "backbone_lr_mult": 1.0, "batch_size": 64, "iterations": 554400, "lr_steps": (369600,),
        "warmup_iters": 1500, "warmup_factor": 1e-6, "clip_grad_norm": 0.01,
        "min_size_train": (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800), "max_size_train": 1000,
        "crop_absolute_range": (384, 600)},
}


# ------------------------------------------------------------------------------------------- transformer parts
class EncoderLayer(nn.Module):
    """DETR ``TransformerEncoderLayer`` (post-norm by default); sequences are ``(S, B, D)``."""

    def __init__(self, d: int, nhead: int, ffn: int, dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nhead, dropout=dropout)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout, self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, src: Tensor, pos: Tensor) -> Tensor:
        if self.pre_norm:
            s2 = self.norm1(src)
            q = k = s2 + pos
            src = src + self.dropout1(self.self_attn(q, k, value=s2)[0])
            s2 = self.norm2(src)
            return src + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(s2)))))
        q = k = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, value=src)[0]))
        return self.norm2(src + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(src))))))


class DecoderLayer(nn.Module):
    """DETR ``TransformerDecoderLayer``: self-attention, cross-attention, FFN; ``(Q, B, D)`` / ``(S, B, D)``."""

    def __init__(self, d: int, nhead: int, ffn: int, dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d, nhead, dropout=dropout)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        if self.pre_norm:
            t2 = self.norm1(tgt)
            q = k = t2 + query_pos
            tgt = tgt + self.dropout1(self.self_attn(q, k, value=t2)[0])
            t2 = self.norm2(tgt)
            tgt = tgt + self.dropout2(self.multihead_attn(query=t2 + query_pos, key=memory + pos, value=memory)[0])
            t2 = self.norm3(tgt)
            return tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(t2)))))
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, value=tgt)[0]))
        t2 = self.multihead_attn(query=tgt + query_pos, key=memory + pos, value=memory)[0]
        tgt = self.norm2(tgt + self.dropout2(t2))
        return self.norm3(tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))


class _Layers(nn.Module):
    """Holds ``layers`` (and ``norm``) so the keys read ``...encoder.layers.N`` / ``...decoder.layers.N``."""

    def __init__(self, layers: list[nn.Module], norm: nn.Module | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        if norm is not None:
            self.norm = norm


class _Transformer(nn.Module):
    def __init__(self, **parts: nn.Module) -> None:
        super().__init__()
        for name, module in parts.items():
            self.add_module(name, module)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)


class MLP(nn.Module):
    """DETR MLP: ReLU between ``num_layers`` linear layers (``layers.0..``)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, num_layers: int) -> None:
        super().__init__()
        dims = [d_in] + [d_hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [d_out]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


def _sine_pos(x: Tensor, pe: SinePositionalEncoding) -> Tensor:
    """DETR ``PositionEmbeddingSine(normalize=True)`` of a map without padding mask: ``(B, D, H, W)``."""
    return pe(torch.zeros((x.shape[0], x.shape[2], x.shape[3]), dtype=torch.bool, device=x.device))


class PixelDecoder(nn.Module):
    """``BasePixelDecoder`` (``encoder_layers == 0``) or ``TransformerEncoderPixelDecoder``."""

    def __init__(self, cfg: MaskFormerConfig, in_channels: list[int]) -> None:
        super().__init__()
        d, g = cfg.conv_dim, cfg.gn_groups
        for i, c in enumerate(in_channels[:-1]):
            self.add_module(f"adapter_{i + 1}", Conv2d(c, d, 1, bias=False, norm=get_norm("GN", d, g)))
            self.add_module(f"layer_{i + 1}", Conv2d(d, d, 3, padding=1, bias=False, norm=get_norm("GN", d, g),
                                                     activation=F.relu))
        last = len(in_channels)
        self.use_encoder = cfg.encoder_layers > 0
        if self.use_encoder:
            self.input_proj = Conv2d(in_channels[-1], d, 1)
            c2_xavier_fill(self.input_proj)
            layers = [EncoderLayer(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout, cfg.pre_norm)
                      for _ in range(cfg.encoder_layers)]
            self.transformer = _Transformer(encoder=_Layers(layers, nn.LayerNorm(d) if cfg.pre_norm else None))
            self.pe_layer = SinePositionalEncoding(d // 2, offset=0.0)
        self.add_module(f"layer_{last}", Conv2d(d if self.use_encoder else in_channels[-1], d, 3, padding=1,
                                                bias=False, norm=get_norm("GN", d, g), activation=F.relu))
        self.mask_features = Conv2d(d, cfg.mask_dim, 3, padding=1)
        for m in self.children():
            if isinstance(m, Conv2d) and m is not getattr(self, "input_proj", None):
                c2_xavier_fill(m)
        self.num_levels = last

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        """``[res2..res5] -> (mask_features (B, mask_dim, H/4, W/4), encoder output (B, D, H/32, W/32) | None)``."""
        n = self.num_levels
        x = feats[-1]
        enc = None
        if self.use_encoder:
            src = self.input_proj(x)
            b, c, h, w = src.shape
            pos = _sine_pos(x, self.pe_layer).flatten(2).permute(2, 0, 1)
            out = src.flatten(2).permute(2, 0, 1)
            for layer in self.transformer.encoder.layers:
                out = layer(out, pos)
            if hasattr(self.transformer.encoder, "norm"):
                out = self.transformer.encoder.norm(out)
            enc = out.permute(1, 2, 0).view(b, c, h, w)
            y = getattr(self, f"layer_{n}")(enc)
        else:
            y = getattr(self, f"layer_{n}")(x)
        for i in range(n - 1, 0, -1):  # res4, res3, res2: lateral + nearest top-down, then 3x3
            cur = getattr(self, f"adapter_{i}")(feats[i - 1])
            y = getattr(self, f"layer_{i}")(cur + F.interpolate(y, size=cur.shape[-2:], mode="nearest"))
        return self.mask_features(y), enc


class Predictor(nn.Module):
    """``TransformerPredictor``: DETR decoder over the input map, class and mask-embedding heads."""

    def __init__(self, cfg: MaskFormerConfig, in_channels: int) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.pe_layer = SinePositionalEncoding(d // 2, offset=0.0)
        layers = [DecoderLayer(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout, cfg.pre_norm)
                  for _ in range(cfg.dec_layers)]
        self.transformer = _Transformer(decoder=_Layers(layers, nn.LayerNorm(d)))
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        if in_channels != d or cfg.enforce_input_proj:
            self.input_proj: nn.Module = Conv2d(in_channels, d, 1)
            c2_xavier_fill(self.input_proj)
        else:
            self.input_proj = nn.Sequential()
        self.class_embed = nn.Linear(d, cfg.num_classes + 1)
        self.mask_embed = MLP(d, d, cfg.mask_dim, 3)

    def decode(self, x: Tensor, num_layers: int | None = None) -> Tensor:
        """Decoder output of each layer after the shared final norm: ``(L, B, Q, D)`` (L = ``num_layers`` or all)."""
        pos = _sine_pos(x, self.pe_layer).flatten(2).permute(2, 0, 1)
        memory = self.input_proj(x).flatten(2).permute(2, 0, 1)
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, x.shape[0], 1)
        tgt = torch.zeros_like(query_pos)
        dec = self.transformer.decoder
        hs = []
        for layer in list(dec.layers)[: num_layers or len(dec.layers)]:
            tgt = layer(tgt, memory, pos, query_pos)
            hs.append(dec.norm(tgt))
        return torch.stack(hs).transpose(1, 2)


class SemSegHead(nn.Module):
    def __init__(self, cfg: MaskFormerConfig, in_channels: list[int]) -> None:
        super().__init__()
        self.pixel_decoder = PixelDecoder(cfg, in_channels)
        self.predictor = Predictor(cfg, cfg.conv_dim if cfg.encoder_layers > 0 else in_channels[-1])


class MaskFormer(nn.Module):
    """MaskFormer for panoptic segmentation (see the module docstring); implements ``models.inference``."""

    default_post_process = "own"
    mask_stride = 4

    def __init__(self, cfg: MaskFormerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.backbone == "swin_l":
            from models.backbones import SwinBackbone

            self.backbone: nn.Module = SwinBackbone(cfg.swin_name, drop_path_rate=cfg.swin_drop_path,
                                                    out_indices=(0, 1, 2, 3))
            channels = list(self.backbone.out_channels)
        else:
            self.backbone = ResNet(cfg.resnet_depths, cfg.resnet_stem_channels, cfg.resnet_res2_channels,
                                   cfg.resnet_norm, stride_in_1x1=False, freeze_at=cfg.freeze_at,
                                   gn_groups=cfg.gn_groups)
            channels = self.backbone.out_channels
        self.sem_seg_head = SemSegHead(cfg, channels)

    def forward(self, images: Tensor, pad_mask: Tensor | None = None,
                mask_layer: int | None = None) -> dict[str, Any]:
        """Inference/training forward (MaskFormer ignores padding, as upstream).

        Args:
            images: ``(B, 3, H, W)`` normalised RGB.
            pad_mask: ``(B, H, W)`` True on padding, or None; only used to record each image's valid size.
            mask_layer: stop the decoder after layer k (1-based); its outputs replace the last layer's.

        Returns:
            ``pred_logits (B, Q, K+1)``, ``pred_masks (B, Q, H/4, W/4)`` raw logits of the last (or k-th) layer,
            ``aux_logits (L-1, B, Q, K+1)`` and ``aux_masks (L-1, B, Q, H/4, W/4)`` of the earlier layers (all
            computed, as the deep-supervised upstream forward does), ``image_sizes`` [(h, w)] valid input sizes,
            ``sizes_from_mask`` (whether they came from ``pad_mask``), ``input_size`` (H, W).
        """
        if mask_layer is not None and not 1 <= mask_layer <= self.cfg.dec_layers:
            raise ValueError(f"mask_layer {mask_layer} out of range 1..{self.cfg.dec_layers}")
        feats = self.backbone(images)
        head = self.sem_seg_head
        mask_features, enc = head.pixel_decoder(feats)
        hs = head.predictor.decode(enc if enc is not None else feats[-1], mask_layer)
        logits = head.predictor.class_embed(hs)
        masks = torch.einsum("lbqc,bchw->lbqhw", head.predictor.mask_embed(hs), mask_features)
        return {"pred_logits": logits[-1], "pred_masks": masks[-1], "aux_logits": logits[:-1], "aux_masks": masks[:-1],
                "image_sizes": valid_sizes(images, pad_mask), "sizes_from_mask": pad_mask is not None,
                "input_size": (int(images.shape[-2]), int(images.shape[-1]))}

    # ------------------------------------------------------------------ models.inference.PanopticModel
    def test_transform(self) -> TestTransformSpec:
        """detectron2 ResizeShortestEdge 800/1333 (PIL bilinear on uint8), RGB, ImageNet mean/std, no padding."""
        return TestTransformSpec(resize="detectron2", short=self.cfg.test_short, long=self.cfg.test_long,
                                 mean=self.cfg.pixel_mean, std=self.cfg.pixel_std, channel_order="rgb",
                                 size_divisor=1)

    def mask_layers(self) -> list[str]:
        """Decoder layers 1 .. L-1 (deep-supervised heads), then ``"last"``."""
        return [str(k) for k in range(1, self.cfg.dec_layers)] + [LAST_LAYER]

    def _layer_outputs(self, outputs: dict[str, Any], layer: str) -> tuple[Tensor, Tensor]:
        k = parse_layer(layer)
        n_run = outputs["aux_logits"].shape[0] + 1
        if k is None or k == n_run:
            return outputs["pred_logits"], outputs["pred_masks"]
        if k > n_run:
            raise ValueError(f"layer {layer!r} not computed: the forward ran {n_run} decoder layers")
        return outputs["aux_logits"][k - 1], outputs["aux_masks"][k - 1]

    def candidates(self, outputs: dict[str, Any], index: int, layer: str = LAST_LAYER,
                   valid_hw: tuple[int, int] | None = None) -> Candidates:
        """Queries whose softmax argmax is a real class: score = that probability, label = contiguous class,
        mask = sigmoid of the stride-4 logits cropped to the image (``valid_hw`` in mask pixels, default the
        recorded input size / 4 rounded up); ``query_index`` = query number."""
        logits, masks = self._layer_outputs(outputs, layer)
        scores, labels = F.softmax(logits[index].float(), dim=-1).max(-1)
        keep = torch.nonzero(labels != self.cfg.num_classes).flatten()
        h, w = valid_hw or ceil_div_hw(outputs["image_sizes"][index], self.mask_stride)
        m = masks[index][keep][:, :h, :w].float().sigmoid()
        return Candidates(scores=scores[keep].detach().cpu(), labels=labels[keep].detach().cpu(),
                          masks=m.detach().cpu(), query_index=keep.cpu())

    def post_process_options(self, method: str) -> dict[str, Any]:
        """(p*) and (p) at MaskFormer's 0.8 score threshold (p* also overlap 0.8); defaults for m/heuristic."""
        if method == "p*":
            return {"object_mask_threshold": self.cfg.object_mask_threshold,
                    "overlap_threshold": self.cfg.overlap_threshold}
        if method == "p":
            return {"score_threshold": self.cfg.object_mask_threshold}
        return {}

    def own_post_process(self, outputs: dict[str, Any], index: int, out_size: tuple[int, int],
                         valid_hw: tuple[int, int] | None = None) -> PanopticResult:
        """MaskFormer's ``panoptic_inference`` at ``out_size``; ``valid_hw`` in mask pixels (default: the image size
        recorded from the padding mask, also used when ``valid_hw`` is just that size / 4 rounded up)."""
        img_hw = image_size_in_pixels(outputs, index, valid_hw, self.mask_stride)
        return maskformer_panoptic_inference(outputs["pred_logits"][index], outputs["pred_masks"][index],
                                             outputs["input_size"], img_hw, out_size, self.cfg.num_things,
                                             self.cfg.object_mask_threshold, self.cfg.overlap_threshold)

    def dump_raw(self, outputs: dict[str, Any], index: int, prep: Any, result: PanopticResult) -> dict[str, np.ndarray]:
        """Raw outputs for ``predict --dump-raw`` (issue #12): ``pred_logits (Q, K+1)``, ``pred_masks (Q, h, w)``
        raw stride-4 logits, and ``panoptic_category`` / ``panoptic_instance`` (H, W) int32 of MaskFormer's own
        inference (recomputed with the exact resized size ``prep.img_shape``, whatever ``result`` came from)."""
        own = maskformer_panoptic_inference(outputs["pred_logits"][index], outputs["pred_masks"][index],
                                            outputs["input_size"], tuple(prep.img_shape), tuple(prep.ori_shape),
                                            self.cfg.num_things, self.cfg.object_mask_threshold,
                                            self.cfg.overlap_threshold)
        return {"pred_logits": outputs["pred_logits"][index].detach().float().cpu().numpy(),
                "pred_masks": outputs["pred_masks"][index].detach().float().cpu().numpy(),
                "panoptic_category": own.category.astype(np.int32),
                "panoptic_instance": own.instance.astype(np.int32)}


def maskformer_panoptic_inference(logits: Tensor, mask_logits: Tensor, input_size: tuple[int, int],
                                  img_hw: tuple[int, int], out_size: tuple[int, int], num_things: int,
                                  object_mask_threshold: float = 0.8, overlap_threshold: float = 0.8) -> PanopticResult:
    """MaskFormer's own inference for one image (``MaskFormer.forward`` eval path + ``panoptic_inference``).

    Args:
        logits: ``(Q, K+1)`` class logits (last = no-object).
        mask_logits: ``(Q, h, w)`` stride-4 mask logits over the padded input.
        input_size: ``(H_in, W_in)`` of the network input (upstream upsamples the masks to it first).
        img_hw: the resized image inside it (crop before resizing to the original size).
        out_size: ``(H, W)`` original image size.
        num_things: labels below are things.
    """
    scores, labels = F.softmax(logits.float(), dim=-1).max(-1)
    keep = (labels != logits.shape[-1] - 1) & (scores > object_mask_threshold)
    idx = torch.nonzero(keep).flatten()
    # Bilinear resizing is per channel: resizing only the kept queries gives the upstream values exactly.
    if idx.numel():
        m = mask_logits[idx].float()[None]
        m = F.interpolate(m, size=tuple(input_size), mode="bilinear", align_corners=False)
        m = m[:, :, : img_hw[0], : img_hw[1]]
        m = F.interpolate(m, size=tuple(out_size), mode="bilinear", align_corners=False)[0].sigmoid()
    else:
        m = mask_logits.new_zeros((0, *out_size), dtype=torch.float32)
    cands = Candidates(scores=scores[idx].cpu(), labels=labels[idx].cpu(), masks=m.cpu(), query_index=idx.cpu())
    return maskformer_merge(cands, num_things, tuple(out_size), object_mask_threshold=object_mask_threshold,
                            overlap_threshold=overlap_threshold)


# ----------------------------------------------------------------------------------------------- converter
def _swin_relative_index(window: int) -> Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[:, :, 0] * (2 * window - 1) + rel[:, :, 1]


def convert_state_dict(raw: dict[str, Tensor], cfg: MaskFormerConfig,
                       source: str = "<state dict>") -> dict[str, Tensor]:
    """Released MaskFormer state dict (detectron2 names) -> ours.

    * ``sem_seg_head.X`` outside ``predictor``/``pixel_decoder`` -> ``sem_seg_head.pixel_decoder.X`` (the upstream
      ``MaskFormerHead._load_from_state_dict`` rename of version-1 files); new names are fixed points;
    * ``criterion.empty_weight`` and the ``pixel_mean``/``pixel_std`` buffers are dropped;
    * Swin: ``layers.{i}.downsample`` (end of stage i, original layout) -> ``layers.{i+1}.downsample`` (timm);
      ``relative_position_index`` is checked against window 12 and dropped (timm rebuilds it);
    * ResNet FrozenBN layers without running stats get mean 0 / var 1 (detectron2's rule for old files).

    Raises:
        CheckpointError: not a MaskFormer checkpoint, or a backbone other than the config's.
    """
    check_family(raw, ("sem_seg_head.",), "MaskFormer", source)
    is_swin = any(k.startswith("backbone.patch_embed.") for k in raw)
    if is_swin != (cfg.backbone == "swin_l"):
        want = "maskformer_swin_l_panoptic" if is_swin else "maskformer_r50_panoptic"
        raise CheckpointError(f"{source} holds a MaskFormer with a {'Swin' if is_swin else 'ResNet'} backbone; "
                              f"model {cfg.name!r} has a {cfg.backbone} backbone (use --model {want})")
    out: dict[str, Tensor] = {}
    for key, value in raw.items():
        k = key
        if k == "criterion.empty_weight" or k in ("pixel_mean", "pixel_std"):
            continue
        parts = k.split(".")
        if parts[0] == "sem_seg_head" and len(parts) > 1 and parts[1] not in ("predictor", "pixel_decoder"):
            k = "sem_seg_head.pixel_decoder." + ".".join(parts[1:])
        if is_swin and k.startswith("backbone."):
            if k.endswith(".relative_position_index"):
                window = math.isqrt(value.shape[0])
                if window * window != value.shape[0] or not torch.equal(value.long(), _swin_relative_index(window)):
                    raise CheckpointError(f"{source}: {key} is not a Swin relative position index")
                continue
            if len(parts) > 3 and parts[1] == "layers" and parts[3] == "downsample":
                k = ".".join(["backbone", "layers", str(int(parts[2]) + 1)] + parts[3:])
        if k in out:
            raise CheckpointError(f"{source}: two checkpoint keys map to {k!r} (second: {key!r})")
        out[k] = value
    if not is_swin:
        fill_frozen_bn_stats(out, "backbone.", source)
    return out


def _convert_released(path: Path, cfg: MaskFormerConfig) -> dict[str, Tensor]:
    """``harness convert --from maskformer``: a released ``.pkl`` (or ``.pth``) -> our state dict."""
    return convert_state_dict(read_detectron2_checkpoint(path), cfg, str(path))


def build_criterion(cfg: MaskFormerConfig, num_things: int, num_stuff: int) -> nn.Module:
    """MaskFormer's training loss (``models.baselines.maskformer_loss.MaskFormerCriterion``)."""
    from models.baselines.maskformer_loss import MaskFormerCriterion

    return MaskFormerCriterion(cfg, num_things + num_stuff)


FAMILY = Family(
    name="maskformer",
    configs=CONFIGS,
    config_from_dict=MaskFormerConfig.from_dict,
    build=MaskFormer,
    converters={"maskformer": _convert_released},
    default_source="maskformer",
)
