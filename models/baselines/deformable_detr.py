"""D-DETR-MS: Deformable DETR multi-scale (Zhu et al., ICLR 2021) with a DETR-style panoptic mask head.

**Detector** = fundamentalvision/Deformable-DETR ``DeformableDETR`` (single-stage; with or without iterative box
refinement): torchvision ResNet with frozen BN (eps 1e-5) -> C3, C4, C5 (1x1 conv + GN(32) each) plus a 4th level
(3x3 stride-2 conv + GN(32) on raw C5); sine positions with offset -0.5 and eps 1e-6; the deformable transformer
(6 + 6 layers, 8 heads, 4 points, FFN 1024, post-norm, no final norms) is ``models.transformer`` (shared with Panoptic
SegFormer, numerically the same layers); 300 queries (``query_embed`` ``(300, 512)``, position first); per-layer
sigmoid class heads (no no-object logit) and box MLPs, shared across layers without refinement.

**Panoptic head: no public code or weights exist.** The paper (App. A.2) says: DETR's panoptic head transplanted,
attention maps only at stride 32, for multi-scale "we only multiply queries and the features (from C5)", box
refinement on, 300 queries. Our choices, each the closest analogue of DETR's ``DETRsegm``:

1. queries = the last decoder layer's output ``hs[-1]`` without query position (DETR: ``hs[-1]``);
2. attention maps = DETR's ``MHAttentionMap`` (8 heads, softmax jointly over heads and positions) of those queries
   over the **encoder memory of the stride-32 (C5) level**, padding at -inf (DETR: the encoder memory of C5; the
   stride-64 level is not used);
3. mask-head input = ``input_proj[2](C5)`` (the projected C5 before the encoder, DETR's ``src_proj``) concatenated
   with the 8 maps; skips = raw backbone C4, C3 and **C2** (C2 is added to the backbone outputs; the detector alone
   returns C3-C5) -> DETR's ``MaskHeadSmallConv(264, [1024, 512, 256], 256)`` unchanged, logits at stride 4;
4. the head runs on all 300 queries (consistent with the paper's 618.7 GFLOPs for this model, Table 5);
5. scores: sigmoid class probabilities; candidates are the top-100 (query, class) pairs of the last layer, as the
   official detection ``PostProcess`` and Panoptic SegFormer select things; masks ``sigmoid(logits)``;
6. own post-processing = DETR's ``PostProcessPanoptic`` on the candidates whose score exceeds 0.25 (our choice: no
   official value exists; 0.25 is Panoptic SegFormer's t_cnf and Mask DINO's object threshold for sigmoid-focal
   classifiers; DETR's 0.85 is a softmax probability), padding bug fixed;
7. training = Deformable DETR's criterion (focal classification, L1 + GIoU, Hungarian matching with the focal cost,
   every decoder layer) plus DETR's mask focal + dice on the last layer; stuff segments are matched like things
   with boxes from their masks (joint matching, as DETR).

The Panoptic SegFormer repository's first commit (@38b0b46, ``detr_panoptic_head.py``, its caller lost) had a
variant: raw (not softmaxed) 8-head q.k logits with ``memory + pos`` as keys, the 1/32 memory (not the projected
C5) as the head input, 256-channel neck features as skips and a sigmoid output at stride 8. We follow the paper's
"DETR's panoptic head" instead; the difference is documented in docs/baselines.md.

**Label spaces.** ``"coco_detection_id"`` (the released detection weights: 91 logits indexed by COCO category id;
only the 80 thing ids are classes, so stuff is never predicted) or ``"contiguous"`` (panoptic training: one logit
per contiguous class). Released weights load with ``--from deformable-detr`` as an explicit **detector-only** load:
``bbox_attention`` / ``mask_head`` (and ``class_embed`` when the label spaces differ) stay at their seeded
initialisation and are listed (``models.baselines.common.PartialLoad``); see ``deformable_detr_convert``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.baselines.common import (COCO_NUM_THINGS, COCO_PANOPTIC_IDS, RESNET_CHANNELS, ConfigDict, Joiner,
                                     TorchvisionResNet, check_data_classes)
from models.baselines.common import ConvertedState, fill_new_keys, read_released_pth
from models.baselines.deformable_detr_convert import HEAD_PREFIXES, convert_state_dict, to_official_names
from models.baselines.detr_modules import MLP, MaskHeadSmallConv, MHAttentionMap
from models.baselines.detr_postprocess import DETRStyleInference
from models.box_ops import box_cxcywh_to_xyxy, inverse_sigmoid
from models.family import Family
from models.inference import LAST_LAYER
from models.position_encoding import SinePositionalEncoding
from models.postprocess import Candidates, PanopticResult
from models.transformer import DeformableTransformer

__all__ = ["DeformableDETRConfig", "DeformableDETRPanoptic", "CONFIGS", "FAMILY", "convert_deformable_detr",
           "deformable_detr_r50_ms", "deformable_detr_r50_ms_refine", "deformable_detr_tiny", "HEAD_PREFIXES",
           "build_criterion", "convert_state_dict", "to_official_names"]

LABEL_SPACES = ("coco_detection_id", "contiguous")


@dataclass
class DeformableDETRConfig(ConfigDict):
    """D-DETR-MS hyper-parameters (defaults: Deformable DETR ``main.py``, multi-scale, single-stage)."""

    name: str = "deformable_detr_r50_ms"
    backbone: str = "resnet50"
    num_things: int = 80
    num_stuff: int = 53
    label_space: str = "coco_detection_id"
    with_box_refine: bool = False
    num_queries: int = 300
    num_feature_levels: int = 4
    d_model: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    n_points: int = 4  # enc_n_points = dec_n_points = 4
    gn_groups: int = 32  # input_proj GroupNorm
    mask_gn_groups: int = 8  # mask head GroupNorm (DETR)
    # Inference
    max_per_image: int = 100  # top-k (query, class) pairs (official PostProcess)
    panoptic_threshold: float = 0.25
    reproduce_padding_bug: bool = False
    # Training (Deformable DETR main.py; DETR's mask losses)
    train_backbone: bool = True
    freeze_detector: bool = False  # train only bbox_attention + mask_head (DETR's --frozen_weights stage)
    focal_alpha: float = 0.25
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    mask_loss_coef: float = 1.0
    dice_loss_coef: float = 1.0
    aux_loss: bool = True
    lr: float = 2e-4
    lr_backbone: float = 2e-5
    lr_linear_proj_mult: float = 0.1  # reference_points, sampling_offsets
    weight_decay: float = 1e-4
    grad_clip: float = 0.1
    epochs: int = 50
    lr_drop: int = 40
    batch_size: int = 2
    # Test transform (same as DETR)
    test_short: int = 800
    test_long: int = 1333
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    def __post_init__(self) -> None:
        if self.label_space not in LABEL_SPACES:
            raise ValueError(f"label_space must be one of {LABEL_SPACES}, got {self.label_space!r}")
        if self.label_space == "coco_detection_id" and self.num_things != COCO_NUM_THINGS:
            raise ValueError("label_space 'coco_detection_id' needs the 80 COCO thing classes; "
                             "use label_space='contiguous' for other data")
        if self.backbone not in RESNET_CHANNELS:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(RESNET_CHANNELS)}")
        if self.num_feature_levels < 3:
            raise ValueError("D-DETR-MS needs num_feature_levels >= 3 (the mask head reads the C5 level)")
        self.pixel_mean = tuple(self.pixel_mean)  # type: ignore[assignment]
        self.pixel_std = tuple(self.pixel_std)  # type: ignore[assignment]

    @property
    def num_classes(self) -> int:
        """Things + stuff (contiguous classes)."""
        return self.num_things + self.num_stuff

    @property
    def num_logit_classes(self) -> int:
        """Width of the sigmoid class head (91 for the released detection weights)."""
        return 91 if self.label_space == "coco_detection_id" else self.num_classes

    @property
    def class_logit_index(self) -> tuple[int, ...]:
        """Logit column of each predictable contiguous class (classes 0..len-1; COCO detection: the 80 things)."""
        if self.label_space == "coco_detection_id":
            return COCO_PANOPTIC_IDS[:COCO_NUM_THINGS]
        return tuple(range(self.num_classes))


def deformable_detr_r50_ms(num_things: int = 80, num_stuff: int = 53, **overrides: Any) -> DeformableDETRConfig:
    """Deformable DETR R50 multi-scale, no box refinement (released ``r50_deformable_detr-checkpoint.pth``)."""
    return DeformableDETRConfig.named("deformable_detr_r50_ms", {}, num_things, num_stuff, overrides)


def deformable_detr_r50_ms_refine(num_things: int = 80, num_stuff: int = 53,
                                  **overrides: Any) -> DeformableDETRConfig:
    """With iterative box refinement: the paper's D-DETR-MS (released ``r50_deformable_detr_plus_iterative_bbox_
    refinement-checkpoint.pth``)."""
    return DeformableDETRConfig.named("deformable_detr_r50_ms_refine", {"with_box_refine": True}, num_things,
                                      num_stuff, overrides)


def deformable_detr_tiny(num_things: int = 80, num_stuff: int = 53, **overrides: Any) -> DeformableDETRConfig:
    """CPU-sized D-DETR-MS for the synthetic data: ResNet-18, d_model 64, 2 + 2 layers, 30 queries, refinement."""
    defaults = {"backbone": "resnet18", "label_space": "contiguous", "with_box_refine": True, "num_queries": 30,
                "d_model": 64, "nheads": 4, "enc_layers": 2, "dec_layers": 2, "dim_feedforward": 128,
                "dropout": 0.0, "n_points": 2, "gn_groups": 16, "mask_gn_groups": 4, "max_per_image": 30,
                "test_short": 256, "test_long": 256, "lr": 1e-3, "lr_backbone": 1e-4}
    return DeformableDETRConfig.named("deformable_detr_tiny", defaults, num_things, num_stuff, overrides)


CONFIGS: dict[str, Callable[..., DeformableDETRConfig]] = {
    "deformable_detr_r50_ms": deformable_detr_r50_ms,
    "deformable_detr_r50_ms_refine": deformable_detr_r50_ms_refine,
    "deformable_detr_tiny": deformable_detr_tiny,
}


class DeformableDETRPanoptic(DETRStyleInference, nn.Module):
    """Deformable DETR + DETR-style mask head; implements ``models.inference.PanopticModel`` (the methods shared with
    DETR: ``DETRStyleInference``).

    Keys: ``backbone.0.body.*``, ``input_proj.{l}.{0,1}``, ``query_embed``, ``class_embed.{i}``,
    ``bbox_embed.{i}.layers.{j}`` as Deformable DETR; ``transformer.*`` in ``models.transformer`` names (the
    converter renames); ``bbox_attention.*`` and ``mask_head.*`` as DETR's panoptic head.
    """

    def __init__(self, cfg: DeformableDETRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        body = TorchvisionResNet(cfg.backbone, ("layer1", "layer2", "layer3", "layer4"), cfg.train_backbone)
        self.backbone = Joiner(body, SinePositionalEncoding(d // 2, normalize=True, offset=-0.5))
        c2, c3, c4, c5 = RESNET_CHANNELS[cfg.backbone]
        proj = [nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(cfg.gn_groups, d)) for c in (c3, c4, c5)]
        in_ch = c5
        for _ in range(cfg.num_feature_levels - 3):
            proj.append(nn.Sequential(nn.Conv2d(in_ch, d, 3, stride=2, padding=1), nn.GroupNorm(cfg.gn_groups, d)))
            in_ch = d
        self.input_proj = nn.ModuleList(proj)
        self.transformer = DeformableTransformer(d, cfg.nheads, cfg.num_feature_levels, cfg.n_points,
                                                 cfg.dim_feedforward, cfg.dropout, cfg.enc_layers, cfg.dec_layers)
        self.query_embed = nn.Embedding(cfg.num_queries, 2 * d)
        class_embed = nn.Linear(d, cfg.num_logit_classes)
        bbox_embed = MLP(d, d, 4, 3)
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)
        for p in self.input_proj:
            nn.init.xavier_uniform_(p[0].weight, gain=1)
            nn.init.zeros_(p[0].bias)
        if cfg.with_box_refine:
            self.class_embed = nn.ModuleList(_clone(class_embed) for _ in range(cfg.dec_layers))
            self.bbox_embed = nn.ModuleList(_clone(bbox_embed) for _ in range(cfg.dec_layers))
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        else:  # one module repeated (the released state dict holds identical copies)
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList(class_embed for _ in range(cfg.dec_layers))
            self.bbox_embed = nn.ModuleList(bbox_embed for _ in range(cfg.dec_layers))
        if cfg.freeze_detector:
            self.requires_grad_(False)
        self.bbox_attention = MHAttentionMap(d, d, cfg.nheads, dropout=0.0)
        self.mask_head = MaskHeadSmallConv(d + cfg.nheads, [c4, c3, c2], d, cfg.mask_gn_groups)
        cols = torch.full((cfg.num_logit_classes,), -1, dtype=torch.long)
        index = list(cfg.class_logit_index)
        cols[index] = torch.arange(len(index))
        self.register_buffer("logit_to_class", cols, persistent=False)  # logit column -> contiguous class or -1
        self.register_buffer("class_to_logit", torch.tensor(index), persistent=False)

    def forward(self, images: Tensor, pad_mask: Tensor | None = None,
                mask_layer: int | None = None) -> dict[str, Any]:
        """D-DETR-MS forward.

        Args:
            images: ``(B, 3, H, W)`` normalised RGB.
            pad_mask: ``(B, H, W)`` bool, True on padding (None: no padding).
            mask_layer: must be None (one mask head).

        Returns:
            ``pred_logits (B, Q, C)`` sigmoid logits, ``pred_boxes (B, Q, 4)`` cxcywh of the unpadded image,
            ``pred_masks (B, Q, ceil(H/4), ceil(W/4))`` logits, ``aux_logits (L, B, Q, C)``, ``aux_boxes (L, B, Q,
            4)`` (every decoder layer; the last = pred_*), ``valid_sizes (B, 2)``, ``image_size`` padded ``(H, W)``.
        """
        pad_mask = self._pad_mask(images, pad_mask, mask_layer)
        c2, c3, c4, c5 = self.backbone[0](images)
        srcs, masks, pos = [], [], []
        for lvl in range(self.cfg.num_feature_levels):
            if lvl < 3:
                src = self.input_proj[lvl]((c3, c4, c5)[lvl])
            else:  # extra levels: from raw C5 first, then from the previous extra level
                src = self.input_proj[lvl](c5 if lvl == 3 else srcs[-1])
            m = F.interpolate(pad_mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
            srcs.append(src)
            masks.append(m)
            pos.append(self.backbone[1](m).to(src.dtype))
        tr = self.transformer
        x, lvl_pos, mask_flat, shapes, starts, ratios = tr.flatten(srcs, masks, pos)
        memory = tr.encoder(x, lvl_pos, shapes, starts, ratios, mask_flat)
        b = images.shape[0]
        query_pos, tgt = torch.split(self.query_embed.weight, self.cfg.d_model, dim=1)  # position first
        # repeat, not expand: a view of a parameter made under no_grad breaks FlopCounterMode's module hooks
        query_pos = query_pos.unsqueeze(0).repeat(b, 1, 1)
        tgt = tgt.unsqueeze(0).repeat(b, 1, 1)
        init_ref = tr.reference_points(query_pos).sigmoid()
        refine = self.bbox_embed if self.cfg.with_box_refine else None
        hs, refs = tr.decoder(tgt, query_pos, init_ref, memory, shapes, starts, ratios, mask_flat, refine)
        logits, boxes = [], []
        for lvl, h in enumerate(hs):
            ref = inverse_sigmoid(init_ref if lvl == 0 else refs[lvl - 1])
            tmp = self.bbox_embed[lvl](h)
            if ref.shape[-1] == 4:
                tmp = tmp + ref
            else:
                tmp = torch.cat([tmp[..., :2] + ref, tmp[..., 2:]], -1)
            logits.append(self.class_embed[lvl](h))
            boxes.append(tmp.sigmoid())
        h5, w5 = srcs[2].shape[-2:]
        start = int(starts[2])
        mem5 = memory[:, start: start + h5 * w5].transpose(1, 2).reshape(b, self.cfg.d_model, h5, w5)
        bbox_mask = self.bbox_attention(hs[-1], mem5, mask=masks[2])
        seg = self.mask_head(srcs[2], bbox_mask, [c4, c3, c2])
        return self._outputs(images, pad_mask, torch.stack(logits), torch.stack(boxes), seg)

    # ------------------------------------------------------------------ models.inference.PanopticModel
    def _select(self, outputs: dict[str, Any], index: int) -> tuple[Tensor, Tensor, Tensor]:
        """Top-``max_per_image`` (query, class) pairs of the sigmoid scores over the classes' logit columns."""
        prob = outputs["pred_logits"][index].detach().float().sigmoid().cpu()[:, self.class_to_logit.cpu()]
        q, c = prob.shape
        scores, idx = prob.reshape(-1).topk(min(self.cfg.max_per_image, q * c))
        return scores, idx % c, torch.div(idx, c, rounding_mode="floor")

    def candidates(self, outputs: dict[str, Any], index: int, layer: str = LAST_LAYER,
                   valid_hw: tuple[int, int] | None = None) -> Candidates:
        """Top-100 (query, class) pairs: sigmoid score, contiguous label, ``sigmoid`` mask at stride 4, box."""
        self._check_layer(layer)
        scores, labels, query = self._select(outputs, index)
        masks = self._masks(outputs, index, valid_hw)
        masks = masks[query.to(masks.device)].detach().float().sigmoid().cpu()
        boxes = outputs["pred_boxes"][index].detach().float().cpu()[query]
        return Candidates(scores=scores, labels=labels, masks=masks, boxes=boxes, query_index=query)

    def own_post_process(self, outputs: dict[str, Any], index: int, out_size: tuple[int, int],
                         valid_hw: tuple[int, int] | None = None) -> PanopticResult:
        """DETR's ``PostProcessPanoptic`` on the candidates scoring above ``panoptic_threshold`` (score order)."""
        scores, labels, query = self._select(outputs, index)
        keep = scores > self.cfg.panoptic_threshold
        return self._own(outputs, index, scores[keep], labels[keep], query[keep], out_size, valid_hw)

    def dump_raw(self, outputs: dict[str, Any], index: int, prep: Any, result: PanopticResult) -> dict[str, np.ndarray]:
        """Raw detector outputs of image ``index`` and the official top-100 ``PostProcess`` (issue #12).

        ``pred_logits (Q, C)``, ``pred_boxes (Q, 4)``, ``aux_logits (L, Q, C)``, ``aux_boxes (L, Q, 4)`` float32;
        ``topk_scores (100,)`` float32, ``topk_labels (100,)`` int64 logit column (= COCO category id),
        ``topk_boxes (100, 4)`` float32 xyxy in original-image pixels: sigmoid, top-100 over all ``Q x C`` entries,
        ``query = idx // C``, ``label = idx % C``, boxes scaled by the original ``(W, H, W, H)``.
        """
        logits = outputs["pred_logits"][index].detach().float().cpu()
        boxes = outputs["pred_boxes"][index].detach().float().cpu()
        prob = logits.sigmoid()
        q, c = prob.shape
        scores, idx = prob.view(1, -1).topk(min(100, q * c), dim=1)
        query, labels = idx // c, idx % c
        xyxy = torch.gather(box_cxcywh_to_xyxy(boxes)[None], 1, query.unsqueeze(-1).repeat(1, 1, 4))
        img_h, img_w = (int(v) for v in prep.ori_shape)
        xyxy = xyxy * torch.tensor([[img_w, img_h, img_w, img_h]])[:, None, :]
        aux_l = outputs["aux_logits"][:, index].detach().float().cpu()
        aux_b = outputs["aux_boxes"][:, index].detach().float().cpu()
        return {"pred_logits": logits.numpy(), "pred_boxes": boxes.numpy(), "aux_logits": aux_l.numpy(),
                "aux_boxes": aux_b.numpy(), "topk_scores": scores[0].numpy().astype(np.float32),
                "topk_labels": labels[0].numpy().astype(np.int64), "topk_boxes": xyxy[0].numpy().astype(np.float32)}


def _clone(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


def build_model(cfg: DeformableDETRConfig) -> DeformableDETRPanoptic:
    """Construct the model (random init; nothing downloaded)."""
    return DeformableDETRPanoptic(cfg)


def build_criterion(cfg: DeformableDETRConfig, num_things: int, num_stuff: int) -> nn.Module:
    """Deformable DETR's ``SetCriterion`` (focal 2, L1 5, GIoU 2, focal matching cost) + DETR's mask focal + dice.

    Call as ``criterion(model, images, pad_mask, targets) -> (loss, logs)`` (see ``detr_criterion``).
    """
    from models.baselines.detr_criterion import SetCriterion, SetCriterionConfig

    check_data_classes(cfg, num_things, num_stuff)
    crit = SetCriterionConfig.from_model(cfg, focal=True)
    index = torch.full((cfg.num_classes,), -1, dtype=torch.long)
    index[: len(cfg.class_logit_index)] = torch.tensor(cfg.class_logit_index)
    return SetCriterion(crit, index)


def convert_deformable_detr(path: Path, cfg: DeformableDETRConfig) -> ConvertedState:
    """Released Deformable DETR detection ``.pth`` -> our state dict: an explicit **detector-only** load.

    The detector keys come from the file (renamed, checked: ``deformable_detr_convert``); the panoptic head
    (``bbox_attention``, ``mask_head``), and ``class_embed`` when the file's class count differs from the config's
    label space, take the model's initialisation with seed 0 (reproducible). The returned mapping carries
    ``partial_load`` (a :class:`~models.baselines.common.PartialLoad` listing every key from the file and every new
    key), which is also logged; ``harness convert`` stores it in ``model.json``.
    """
    raw, _ = read_released_pth(path)
    state = convert_state_dict(raw, cfg, str(path))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DeformableDETRPanoptic(cfg)
    new_prefixes = HEAD_PREFIXES
    cls_shape = state.get("class_embed.0.weight")
    if cls_shape is not None and cls_shape.shape[0] != cfg.num_logit_classes:
        new_prefixes = new_prefixes + ("class_embed.",)
    full, report = fill_new_keys(model, state, new_prefixes, str(path))
    out = ConvertedState(full)
    out.partial_load = report
    return out


FAMILY = Family(
    name="deformable_detr",
    configs=CONFIGS,
    config_from_dict=DeformableDETRConfig.from_dict,
    build=build_model,
    converters={"deformable-detr": convert_deformable_detr},
    default_source="deformable-detr",
)
