"""Panoptic SegFormer (Li et al., CVPR 2022) in plain PyTorch, faithful to the official code.

Module tree (state-dict prefixes kept equal to the official checkpoints so the converter is a short rename):

* ``backbone``: ResNet / Swin / PVTv2 (``models.backbones``) -> C3, C4, C5.
* ``neck``: ChannelMapper + GN, extra stride-64 level from raw C5 (``models.neck``).
* ``bbox_head`` (name kept from mmdet for checkpoint compatibility, class :class:`PanopticHead`):
  ``transformer`` (deformable encoder + location decoder), ``cls_branches``/``reg_branches`` (one per location
  layer), ``query_embedding`` (thing queries; pos first, content second), ``stuff_query`` (content first, pos
  second), ``things_mask_head`` / ``stuff_mask_head`` (``models.mask_decoder``), ``cls_stuff_branches`` (class-fixed
  stuff head), and ``reg_branches2`` / ``cls_thing_branches`` (present in the checkpoints, weighted 0 in the
  official loss).

Inference follows ``PanformerHead.get_bboxes``: top-``max_per_image`` (query, label) pairs over the sigmoid scores of
the last location layer, thing queries ``hs[-1]`` (no pos) through the thing mask decoder, the stuff queries through
the stuff mask decoder, stuff score ``sigmoid(cls_stuff_branches[-1](last stuff query))``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones import build_backbone, load_pretrained_backbone
from models.box_ops import inverse_sigmoid
from models.configs import MODEL_CONFIGS, PanopticSegFormerConfig
from models.family import Family
from models.inference import LAST_LAYER, TestTransformSpec, parse_layer
from models.mask_decoder import MaskHead
from models.neck import ChannelMapper
from models.position_encoding import SinePositionalEncoding
from models.postprocess import Candidates, PanopticResult, candidates_from_outputs, mask_wise_merge
from models.transformer import DeformableTransformer


@dataclass
class Encoded:
    """Encoder output.

    Attributes:
        memory: ``(B, S, D)`` encoder tokens of all levels (incl. the 1/64 one).
        pos: ``(B, S, D)`` sine position + level embedding of each token.
        mask: ``(B, S)`` bool, True on padding.
        spatial_shapes: ``(L, 2)`` long, ``(H_l, W_l)``.
        level_start_index: ``(L,)`` long.
        valid_ratios: ``(B, L, 2)`` valid (w, h) fraction per level.
        mask_memory: ``(B, S3, D)`` tokens of the first three levels (what the mask decoder reads).
        mask_padding: ``(B, S3)`` bool padding of ``mask_memory``.
        mask_hw: the three ``(H, W)`` sizes, finest (1/8) first.
        image_size: padded input ``(H, W)``.
    """

    memory: Tensor
    pos: Tensor
    mask: Tensor
    spatial_shapes: Tensor
    level_start_index: Tensor
    valid_ratios: Tensor
    mask_memory: Tensor
    mask_padding: Tensor
    mask_hw: list[tuple[int, int]]
    image_size: tuple[int, int]


@dataclass
class LocationOutput:
    """Location-decoder output.

    Attributes:
        logits: ``(Ld, B, Qt, C)`` pre-sigmoid class logits per layer (C = num_things, or all classes for joint
            matching).
        boxes: ``(Ld, B, Qt, 4)`` normalised cxcywh per layer (box-free: predicted mass centre, zero size).
        queries: ``(B, Qt, D)`` last-layer thing queries ``hs[-1]`` (without pos).
        reference: ``(Ld, B, Qt, 2|4)`` reference points used for each layer's box (inverse-sigmoid space input).
    """

    logits: Tensor
    boxes: Tensor
    queries: Tensor
    reference: list[Tensor]


@dataclass
class MaskOutput:
    """Mask-decoder output (1/8 resolution, raw ReLU values, no sigmoid).

    Attributes:
        thing_masks: ``num_thing_mask_layers + 1`` tensors ``(B, K, h, w)``: each block, then the tail (final).
        stuff_masks: ``num_stuff_mask_layers + 1`` tensors ``(B, Ns, h, w)``.
        stuff_logits: ``num_stuff_mask_layers`` tensors ``(B, Ns)`` pre-sigmoid (stuff query j = stuff class j):
            ``cls_stuff_branches[i]`` on block i's stuff query (the head trained on that block).
        stuff_logits_last_head: the same with the last head ``cls_stuff_branches[-1]`` on every block's query
            (what the official per-layer hook scores with; Table 10).
        thing_logits_mask: ``num_thing_mask_layers`` tensors ``(B, K, num_things)`` from ``cls_thing_branches``.
        thing_queries: per-block thing queries ``(B, K, D)``; stuff_queries likewise ``(B, Ns, D)``.
    """

    thing_masks: list[Tensor]
    stuff_masks: list[Tensor]
    stuff_logits: list[Tensor]
    stuff_logits_last_head: list[Tensor]
    thing_logits_mask: list[Tensor]
    thing_queries: list[Tensor]
    stuff_queries: list[Tensor]


def _reg_branch(d: int, out: int = 4) -> nn.Sequential:
    """Box MLP: Linear, ReLU, Linear, ReLU, Linear(out) (keys ``.0``, ``.2``, ``.4``); out = 2 for mass centres."""
    return nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, out))


class PanopticHead(nn.Module):
    """Transformer, query embeddings, prediction branches and mask decoders (official ``PanformerHead``)."""

    def __init__(self, cfg: PanopticSegFormerConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.transformer = DeformableTransformer(
            d_model=d, num_heads=cfg.num_heads, num_levels=cfg.num_feature_levels, num_points=cfg.num_points,
            ffn_dim=cfg.dim_feedforward, dropout=cfg.dropout, num_encoder_layers=cfg.num_encoder_layers,
            num_decoder_layers=cfg.num_location_layers,
        )
        num_pred = max(cfg.num_location_layers, 1)  # Ld = 0: one head on the raw queries
        fc_cls = nn.Linear(d, cfg.num_location_classes)
        if cfg.with_box_refine:
            self.cls_branches = nn.ModuleList(copy.deepcopy(fc_cls) for _ in range(num_pred))
        else:  # shared head, as mmdet does without refinement
            self.cls_branches = nn.ModuleList(fc_cls for _ in range(num_pred))
        # Box-free (Table 6 "*"): the branches predict mass centres (cx, cy); references stay 2-d.
        reg = _reg_branch(d, 2 if cfg.box_free else 4)
        if cfg.with_box_refine:
            self.reg_branches = nn.ModuleList(copy.deepcopy(reg) for _ in range(num_pred))
        else:
            self.reg_branches = nn.ModuleList(reg for _ in range(num_pred))
        self.query_embedding = nn.Embedding(cfg.num_thing_queries, 2 * d)
        self.things_mask_head = MaskHead(d, cfg.mask_num_heads, cfg.num_thing_mask_layers, False, cfg.mask_mlp_ratio)
        self.reg_branches2 = nn.ModuleList(_reg_branch(d) for _ in range(cfg.num_thing_mask_layers))
        self.cls_thing_branches = nn.ModuleList(
            nn.Linear(d, cfg.num_location_classes) for _ in range(cfg.num_thing_mask_layers))
        if cfg.decouple_queries:
            self.stuff_query: nn.Embedding | None = nn.Embedding(cfg.num_stuff, 2 * d)
            self.stuff_mask_head: MaskHead | None = MaskHead(
                d, cfg.mask_num_heads, cfg.num_stuff_mask_layers, True, cfg.mask_mlp_ratio)
            self.cls_stuff_branches: nn.ModuleList | None = nn.ModuleList(
                nn.Linear(d, 1) for _ in range(cfg.num_stuff_mask_layers))
        else:
            self.stuff_query = None
            self.stuff_mask_head = None
            self.cls_stuff_branches = None
        self.init_weights()

    def init_weights(self) -> None:
        """Official init: class biases at prior 0.01, last box layer zero, first box head size bias -2."""
        bias = -math.log((1 - 0.01) / 0.01)
        heads = [self.cls_branches, self.cls_thing_branches, self.cls_stuff_branches or []]
        for group in heads:
            for m in group:
                nn.init.constant_(m.bias, bias)
        for group in (self.reg_branches, self.reg_branches2):
            for m in group:
                nn.init.zeros_(m[-1].weight)
                nn.init.zeros_(m[-1].bias)
        if not self.cfg.box_free:
            nn.init.constant_(self.reg_branches[0][-1].bias[2:], -2.0)


class PanopticSegFormer(nn.Module):
    """Panoptic SegFormer built from a :class:`PanopticSegFormerConfig`.

    Inputs are normalised images ``(B, 3, H, W)`` (see ``harness.data.transforms``) and a padding mask
    ``(B, H, W)`` (True on padding; None = no padding).
    """

    def __init__(self, cfg: PanopticSegFormerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone, cfg.frozen_stages, cfg.backbone_drop_path, cfg.norm_eval,
                                       cfg.backbone_norm, cfg.backbone_width)
        channels = self.backbone.out_channels
        self.neck = ChannelMapper(channels, cfg.d_model, cfg.num_feature_levels, cfg.gn_groups)
        self.positional_encoding = SinePositionalEncoding(cfg.d_model // 2, normalize=True, offset=-0.5)
        self.bbox_head = PanopticHead(cfg)
        if cfg.pretrained_backbone:
            load_pretrained_backbone(self.backbone, cfg.pretrained_backbone)

    # ------------------------------------------------------------------ encoder
    def extract(self, images: Tensor) -> list[Tensor]:
        """Backbone + neck: ``(B, 3, H, W) -> [(B, D, H/8, W/8), (H/16), (H/32), (H/64)]``."""
        return self.neck(self.backbone(images))

    def encode_features(self, feats: list[Tensor], pad_mask: Tensor) -> Encoded:
        """Run the deformable encoder on multi-scale features.

        Args:
            feats: per-level ``(B, D, H_l, W_l)``.
            pad_mask: ``(B, H, W)`` bool at input resolution, True on padding.
        """
        masks, pos = [], []
        for f in feats:
            # Nearest resize of the padding mask to each level (official).
            m = F.interpolate(pad_mask[None].float(), size=f.shape[-2:]).to(torch.bool)[0]
            masks.append(m)
            pos.append(self.positional_encoding(m))
        tr = self.bbox_head.transformer
        x, lvl_pos, mask_flat, shapes, starts, ratios = tr.flatten(feats, masks, pos)
        memory = tr.encoder(x, lvl_pos, shapes, starts, ratios, mask_flat)
        hw = [(int(h), int(w)) for h, w in shapes.tolist()]
        n3 = sum(h * w for h, w in hw[:3])
        return Encoded(memory=memory, pos=lvl_pos, mask=mask_flat, spatial_shapes=shapes, level_start_index=starts,
                       valid_ratios=ratios, mask_memory=memory[:, :n3], mask_padding=mask_flat[:, :n3],
                       mask_hw=hw[:3], image_size=(int(pad_mask.shape[-2]), int(pad_mask.shape[-1])))

    def encode(self, images: Tensor, pad_mask: Tensor | None = None) -> Encoded:
        """``images (B, 3, H, W)``, ``pad_mask (B, H, W)`` -> :class:`Encoded`."""
        if pad_mask is None:
            pad_mask = images.new_zeros((images.shape[0], *images.shape[-2:]), dtype=torch.bool)
        return self.encode_features(self.extract(images), pad_mask)

    # ------------------------------------------------------------------ location decoder
    def locate(self, enc: Encoded) -> LocationOutput:
        """Location decoder with per-layer class logits and boxes (see :class:`LocationOutput`).

        ``num_location_layers = 0``: the content queries go straight to the heads (one output "layer").
        ``box_free``: the branches predict mass centres; boxes are ``(cx, cy, 0, 0)`` (train the centres with L1 only).
        """
        head = self.bbox_head
        d = self.cfg.d_model
        b = enc.memory.shape[0]
        weight = head.query_embedding.weight
        query_pos, query = weight[:, :d], weight[:, d:]  # pos first for thing queries (official)
        query_pos = query_pos[None].expand(b, -1, -1)
        query = query[None].expand(b, -1, -1)
        init_ref = head.transformer.reference_points(query_pos).sigmoid()
        refine = head.reg_branches if self.cfg.with_box_refine else None
        if self.cfg.num_location_layers > 0:
            hs, refs = head.transformer.decoder(query, query_pos, init_ref, enc.memory, enc.spatial_shapes,
                                                enc.level_start_index, enc.valid_ratios, enc.mask, refine)
        else:
            hs, refs = [query], [init_ref]
        logits, boxes, used_refs = [], [], []
        for lvl, h in enumerate(hs):
            ref = init_ref if lvl == 0 else refs[lvl - 1]
            used_refs.append(ref)
            logits.append(head.cls_branches[lvl](h))
            tmp = head.reg_branches[lvl](h)
            inv = inverse_sigmoid(ref)
            if ref.shape[-1] == 4:
                tmp = tmp + inv
            else:
                tmp = torch.cat([tmp[..., :2] + inv, tmp[..., 2:]], -1)
            box = tmp.sigmoid()
            if box.shape[-1] == 2:  # box-free: mass centre with zero size
                box = torch.cat([box, torch.zeros_like(box)], -1)
            boxes.append(box)
        return LocationOutput(logits=torch.stack(logits), boxes=torch.stack(boxes), queries=hs[-1],
                              reference=used_refs)

    # ------------------------------------------------------------------ mask decoder
    def segment(self, enc: Encoded, thing_queries: Tensor, num_blocks: int | None = None) -> MaskOutput:
        """Thing and stuff mask decoders.

        Args:
            enc: encoder output.
            thing_queries: ``(B, K, D)`` selected last-layer thing queries (no positional embedding).
            num_blocks: stop both decoders after this many blocks, without the tails (Table 10); None = all.
        """
        head = self.bbox_head
        d = self.cfg.d_model
        b = thing_queries.shape[0]
        kpm = None if self.cfg.mask_ignore_padding else enc.mask_padding
        t_masks, t_queries = head.things_mask_head(enc.mask_memory, thing_queries, None, enc.mask_hw, kpm,
                                                   num_blocks=num_blocks)
        t_logits = [fc(q) for fc, q in zip(head.cls_thing_branches, t_queries)]
        if head.stuff_mask_head is not None:
            w = head.stuff_query.weight  # content first, pos second for stuff queries (official)
            s_query = w[:, :d][None].expand(b, -1, -1)
            s_pos = w[:, d:][None]
            s_masks, s_queries = head.stuff_mask_head(enc.mask_memory, s_query, s_pos, enc.mask_hw, kpm,
                                                      num_blocks=num_blocks)
            s_logits = [fc(q).squeeze(-1) for fc, q in zip(head.cls_stuff_branches, s_queries)]
            last_fc = head.cls_stuff_branches[-1]
            s_logits_last = [last_fc(q).squeeze(-1) for q in s_queries]
        else:  # joint matching: no stuff decoder
            h, w_ = enc.mask_hw[0]
            empty = thing_queries.new_zeros((b, 0, h, w_))
            s_masks, s_queries, s_logits, s_logits_last = [empty], [], [], []
        return MaskOutput(thing_masks=t_masks, stuff_masks=s_masks, stuff_logits=s_logits,
                          stuff_logits_last_head=s_logits_last, thing_logits_mask=t_logits,
                          thing_queries=t_queries, stuff_queries=s_queries)

    # ------------------------------------------------------------------ inference
    def select_things(self, loc: LocationOutput) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k (query, label) pairs of the last location layer: ``(scores, labels, query_index)``, each ``(B, k)``.

        As official: flatten the ``(Qt, C)`` sigmoid scores, top-k, query = idx // C, label = idx % C (one query may
        appear under several labels).
        """
        prob = loc.logits[-1].sigmoid()
        b, q, c = prob.shape
        k = min(self.cfg.max_per_image, q * c)
        scores, idx = prob.reshape(b, -1).topk(k, dim=1)
        return scores, idx % c, torch.div(idx, c, rounding_mode="floor")

    def forward(self, images: Tensor, pad_mask: Tensor | None = None,
                mask_layer: int | None = None) -> dict[str, object]:
        """Inference forward; see the model contract (``models.inference``).

        ``mask_layer = k`` stops both mask decoders after block k (the official commented-out early return): the
        masks are block k's own and the stuff scores come from the last stuff class head on block k's stuff
        query; equal to ``outputs_at_layer(model(images), k - 1)`` at a fraction of the cost (Table 10 timing).

        Returns:
            ``thing_scores (B, k)``, ``thing_labels (B, k)``, ``thing_query_index (B, k)``, ``thing_boxes (B, k, 4)``
            cxcywh normalised, ``thing_masks (B, k, h, w)``, ``stuff_scores (B, Ns)`` sigmoid, ``stuff_masks
            (B, Ns, h, w)``, ``location`` (:class:`LocationOutput`), ``masks`` (:class:`MaskOutput`, every layer),
            ``image_size`` (padded H, W).
        """
        enc = self.encode(images, pad_mask)
        loc = self.locate(enc)
        scores, labels, qidx = self.select_things(loc)
        gather = qidx[..., None]
        thing_queries = loc.queries.gather(1, gather.expand(-1, -1, loc.queries.shape[-1]))
        boxes = loc.boxes[-1].gather(1, gather.expand(-1, -1, 4))
        if mask_layer is not None:
            n_max = self.max_mask_layer()
            if not 1 <= mask_layer <= n_max:
                raise ValueError(f"mask_layer {mask_layer} out of range 1..{n_max}")
        masks = self.segment(enc, thing_queries, num_blocks=mask_layer)
        if masks.stuff_logits:
            # Last stuff head in both cases: on the tail's input query (final), or on block k's query (official hook).
            stuff_scores = masks.stuff_logits_last_head[-1].sigmoid()
        else:
            stuff_scores = scores.new_zeros((scores.shape[0], 0))
        return {
            "thing_scores": scores,
            "thing_labels": labels,
            "thing_query_index": qidx,
            "thing_boxes": boxes,
            "thing_masks": masks.thing_masks[-1],
            "stuff_scores": stuff_scores,
            "stuff_masks": masks.stuff_masks[-1],
            "location": loc,
            "masks": masks,
            "image_size": enc.image_size,
        }

    # ------------------------------------------------------------------ models.inference.PanopticModel
    def max_mask_layer(self) -> int:
        """Largest block number both mask decoders have (the thing decoder alone with joint matching)."""
        n = self.cfg.num_thing_mask_layers
        return min(n, self.cfg.num_stuff_mask_layers) if self.cfg.decouple_queries else n

    def test_transform(self) -> TestTransformSpec:
        """The official mmcv test transform at the config's ``test_scale``, RGB, ImageNet mean/std, no padding."""
        return TestTransformSpec(resize="mmcv", short=min(self.cfg.test_scale), long=max(self.cfg.test_scale),
                                 mean=self.cfg.pixel_mean, std=self.cfg.pixel_std, channel_order="rgb",
                                 size_divisor=1)

    def mask_layers(self) -> list[str]:
        """Blocks 1 .. n-1 of the mask decoders (n = :meth:`max_mask_layer`), then ``"last"`` (the tails).

        For the official R50 (4 thing / 6 stuff blocks): 1, 2, 3, last: the rows of Table 10.
        """
        return [str(k) for k in range(1, self.max_mask_layer())] + [LAST_LAYER]

    def candidates(self, outputs: dict[str, Any], index: int, layer: str = LAST_LAYER,
                   valid_hw: tuple[int, int] | None = None) -> Candidates:
        """Candidates of image ``index`` at mask layer ``layer`` (see :func:`outputs_at_layer`)."""
        k = parse_layer(layer)
        if k is not None:
            outputs = outputs_at_layer(outputs, k - 1)
        return candidates_from_outputs(outputs, index, self.cfg.num_things, valid_hw)

    def post_process_options(self, method: str) -> dict[str, Any]:
        """The config's merge thresholds for "m" (0.25, or 0.3 for Swin-L / PVTv2-B5); nothing for the others."""
        if method != "m":
            return {}
        return {"thing_threshold": self.cfg.thing_threshold, "stuff_threshold": self.cfg.stuff_threshold,
                "thing_overlap": self.cfg.thing_overlap, "stuff_overlap": self.cfg.stuff_overlap}

    def own_post_process(self, outputs: dict[str, Any], index: int, out_size: tuple[int, int],
                         valid_hw: tuple[int, int] | None = None) -> PanopticResult:
        """The official post-processing of Panoptic SegFormer: mask-wise merging "(m)"."""
        cands = candidates_from_outputs(outputs, index, self.cfg.num_things, valid_hw)
        return mask_wise_merge(cands, self.cfg.num_things, out_size, **self.post_process_options("m"))


def outputs_at_layer(outputs: dict[str, object], layer: int, stuff_head: str = "last") -> dict[str, object]:
    """Inference dict that uses mask-decoder block ``layer`` instead of the final tail (Table 10).

    Official semantics (the commented-out early return in ``MaskHead.forward``, reference §6.2): block ``i``
    (0-based) supplies the thing and stuff masks of that block (each computed from the query entering the
    block's cross-attention; for stuff, after the block's self-attention and norm); thing scores stay those of
    the location decoder; stuff scores are ``sigmoid(cls_stuff_branches[-1](stuff query after block i))``, the
    last head. ``stuff_head="block"`` uses ``cls_stuff_branches[i]`` instead, the head trained on that block
    (our option). ``layer=-1`` returns the final (tail) outputs unchanged.

    Args:
        outputs: :meth:`PanopticSegFormer.forward` result.
        layer: block index, or -1 for the final masks.
        stuff_head: ``"last"`` (official) or ``"block"``.
    """
    if stuff_head not in ("last", "block"):
        raise ValueError(f"stuff_head must be 'last' or 'block', got {stuff_head!r}")
    if layer == -1:
        return dict(outputs)
    masks = outputs["masks"]
    assert isinstance(masks, MaskOutput)
    n_things, n_stuff = len(masks.thing_masks) - 1, len(masks.stuff_masks) - 1
    if not 0 <= layer < n_things or (masks.stuff_logits and not layer < n_stuff):
        raise ValueError(f"layer {layer} out of range: {n_things} thing and {n_stuff} stuff mask-decoder blocks")
    out = dict(outputs)
    out["thing_masks"] = masks.thing_masks[layer]
    if masks.stuff_logits:
        out["stuff_masks"] = masks.stuff_masks[layer]
        logits = masks.stuff_logits_last_head if stuff_head == "last" else masks.stuff_logits
        out["stuff_scores"] = logits[layer].sigmoid()
    return out


def build_model(cfg: PanopticSegFormerConfig) -> PanopticSegFormer:
    """Construct the model (random init; backbone weights only from ``cfg.pretrained_backbone`` if set)."""
    return PanopticSegFormer(cfg)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (buffers excluded; shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def _convert_official(path: Path, cfg: PanopticSegFormerConfig) -> dict[str, Tensor]:
    """Released mmcv ``.pth`` (old or new key names) -> our state dict (``models.convert_official``)."""
    from models.convert_official import convert_state_dict, read_official

    raw, _ = read_official(path)
    return convert_state_dict(raw, cfg.backbone)


FAMILY = Family(
    name="panoptic_segformer",
    configs=MODEL_CONFIGS,
    config_from_dict=PanopticSegFormerConfig.from_dict,
    build=PanopticSegFormer,
    converters={"official-psf": _convert_official},
    default_source="official-psf",
)
