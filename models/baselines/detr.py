"""DETR panoptic (Carion et al., ECCV 2020): facebookresearch/detr ``DETRsegm``, faithful to the released models.

Module tree = the released state dict's (identity key map; the converter only unwraps ``{"model": ...}``):

* ``detr.backbone``: ``[0].body`` torchvision ResNet with frozen BN (eps 1e-5) returning C2..C5, ``[1]`` sine
  positions (``normalize=True``, scale 2*pi, eps 1e-6, no offset);
* ``detr.input_proj`` (1x1 conv on C5), ``detr.transformer`` (``detr_modules.Transformer``), ``detr.query_embed``,
  ``detr.class_embed`` (``num_classes + 1`` logits, the last = no-object), ``detr.bbox_embed`` (3-layer MLP);
* ``bbox_attention`` (``MHAttentionMap`` of the last decoder output over the encoder memory) and ``mask_head``
  (``MaskHeadSmallConv`` on ``input_proj(C5)`` + the 8 attention maps, skips C4, C3, C2): mask logits at stride 4.

Label spaces (``label_space``): ``"coco_panoptic_id"`` (the released models: 251 logits, column = COCO panoptic
category id, 250 = no-object) or ``"contiguous"`` (models we train: column = our contiguous class, things first).

Inference contract (``models.inference``): candidates are the 100 queries, score/label = the best real class of the
softmax (no-object excluded, as DETR's box ``PostProcess``), masks = ``sigmoid(logits)`` so the 0.5 threshold of
m / p / p* / heuristic is logit 0. ``own_post_process`` is DETR's ``PostProcessPanoptic`` (threshold 0.85), with the
padding bug fixed (``detr_postprocess``). ``dump_raw`` writes the raw head outputs of the issue's parity check.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.baselines.common import (COCO_NUM_THINGS, COCO_PANOPTIC_IDS, RESNET_CHANNELS, ConfigDict, Joiner,
                                     TorchvisionResNet, check_data_classes, check_family, read_released_pth)
from models.baselines.detr_modules import MLP, MaskHeadSmallConv, MHAttentionMap, Transformer
from models.baselines.detr_postprocess import DETRStyleInference
from models.family import Family
from models.inference import LAST_LAYER
from models.position_encoding import SinePositionalEncoding
from models.postprocess import Candidates, PanopticResult

__all__ = ["DETRConfig", "DETRPanoptic", "CONFIGS", "FAMILY", "convert_detr", "convert_state_dict", "build_criterion",
           "detr_r50_panoptic", "detr_r101_panoptic", "detr_tiny"]

LABEL_SPACES = ("coco_panoptic_id", "contiguous")


@dataclass
class DETRConfig(ConfigDict):
    """DETR panoptic hyper-parameters (defaults: the released R50 model, ``hubconf.py`` ``_make_detr``).

    Training fields follow DETR's ``main.py`` defaults; the official panoptic recipe has two stages (300 box epochs,
    lr drop 200; then ``--masks --frozen_weights`` 25 epochs, lr drop 15, only the mask head trains:
    ``freeze_detr=True``).
    """

    name: str = "detr_r50_panoptic"
    backbone: str = "resnet50"
    num_things: int = 80
    num_stuff: int = 53
    label_space: str = "coco_panoptic_id"
    num_queries: int = 100
    d_model: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    mask_gn_groups: int = 8
    # Own post-processing
    panoptic_threshold: float = 0.85
    reproduce_padding_bug: bool = False
    # Training (DETR main.py)
    train_backbone: bool = True  # lr_backbone > 0: layer2-4 train, stem and layer1 frozen
    freeze_detr: bool = False  # second stage of the official recipe: only bbox_attention + mask_head train
    eos_coef: float = 0.1
    set_cost_class: float = 1.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    cls_loss_coef: float = 1.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    mask_loss_coef: float = 1.0
    dice_loss_coef: float = 1.0
    aux_loss: bool = True
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    grad_clip: float = 0.1
    epochs: int = 25
    lr_drop: int = 15
    batch_size: int = 2
    # Test transform (datasets/coco.py: RandomResize([800], max_size=1333), ToTensor, Normalize)
    test_short: int = 800
    test_long: int = 1333
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    def __post_init__(self) -> None:
        if self.label_space not in LABEL_SPACES:
            raise ValueError(f"label_space must be one of {LABEL_SPACES}, got {self.label_space!r}")
        if self.label_space == "coco_panoptic_id" and (self.num_things, self.num_stuff) != (COCO_NUM_THINGS, 53):
            raise ValueError("label_space 'coco_panoptic_id' needs the COCO classes (80 things, 53 stuff); "
                             "use label_space='contiguous' for other data")
        if self.backbone not in RESNET_CHANNELS:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(RESNET_CHANNELS)}")
        self.pixel_mean = tuple(self.pixel_mean)  # type: ignore[assignment]
        self.pixel_std = tuple(self.pixel_std)  # type: ignore[assignment]

    @property
    def num_classes(self) -> int:
        """Things + stuff (contiguous classes)."""
        return self.num_things + self.num_stuff

    @property
    def num_logit_classes(self) -> int:
        """DETR's ``num_classes``: logits before the no-object one (250 for the released models: max id + 1)."""
        return 250 if self.label_space == "coco_panoptic_id" else self.num_classes

    @property
    def class_logit_index(self) -> tuple[int, ...]:
        """Logit column of each contiguous class."""
        return COCO_PANOPTIC_IDS if self.label_space == "coco_panoptic_id" else tuple(range(self.num_classes))


def detr_r50_panoptic(num_things: int = 80, num_stuff: int = 53, **overrides: Any) -> DETRConfig:
    """Released ``detr-r50-panoptic-00ce5173.pth`` (PQ 43.4)."""
    return DETRConfig.named("detr_r50_panoptic", {"backbone": "resnet50"}, num_things, num_stuff, overrides)


def detr_r101_panoptic(num_things: int = 80, num_stuff: int = 53, **overrides: Any) -> DETRConfig:
    """Released ``detr-r101-panoptic-40021d53.pth`` (PQ 45.1; no dilation despite the hub docstring)."""
    return DETRConfig.named("detr_r101_panoptic", {"backbone": "resnet101"}, num_things, num_stuff, overrides)


def detr_tiny(num_things: int = 80, num_stuff: int = 53, **overrides: Any) -> DETRConfig:
    """CPU-sized DETR for the synthetic data: ResNet-18 (random init), d_model 64, 2+2 layers, 20 queries."""
    defaults = {"backbone": "resnet18", "label_space": "contiguous", "num_queries": 20, "d_model": 64, "nheads": 4,
                "enc_layers": 2, "dec_layers": 2, "dim_feedforward": 128, "dropout": 0.0, "mask_gn_groups": 4,
                "test_short": 256, "test_long": 256, "lr": 1e-3, "lr_backbone": 1e-4, "batch_size": 2}
    return DETRConfig.named("detr_tiny", defaults, num_things, num_stuff, overrides)


CONFIGS: dict[str, Callable[..., DETRConfig]] = {
    "detr_r50_panoptic": detr_r50_panoptic,
    "detr_r101_panoptic": detr_r101_panoptic,
    "detr_tiny": detr_tiny,
}


class DETR(nn.Module):
    """The detector part (``detr.*`` keys): backbone + position encoding, input projection, transformer, heads."""

    def __init__(self, cfg: DETRConfig) -> None:
        super().__init__()
        body = TorchvisionResNet(cfg.backbone, ("layer1", "layer2", "layer3", "layer4"), cfg.train_backbone)
        self.backbone = Joiner(body, SinePositionalEncoding(cfg.d_model // 2, normalize=True, offset=0.0))
        self.transformer = Transformer(cfg.d_model, cfg.nheads, cfg.enc_layers, cfg.dec_layers, cfg.dim_feedforward,
                                       cfg.dropout)
        self.num_queries = cfg.num_queries
        self.class_embed = nn.Linear(cfg.d_model, cfg.num_logit_classes + 1)
        self.bbox_embed = MLP(cfg.d_model, cfg.d_model, 4, 3)
        self.query_embed = nn.Embedding(cfg.num_queries, cfg.d_model)
        self.input_proj = nn.Conv2d(body.num_channels[-1], cfg.d_model, kernel_size=1)


class DETRPanoptic(DETRStyleInference, nn.Module):
    """DETR's ``DETRsegm``: :class:`DETR` + ``bbox_attention`` + ``mask_head``; implements ``PanopticModel``
    (shared methods: ``DETRStyleInference``)."""

    def __init__(self, cfg: DETRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.detr = DETR(cfg)
        if cfg.freeze_detr:
            self.detr.requires_grad_(False)
        self.bbox_attention = MHAttentionMap(cfg.d_model, cfg.d_model, cfg.nheads, dropout=0.0)
        c2, c3, c4, _ = RESNET_CHANNELS[cfg.backbone]
        self.mask_head = MaskHeadSmallConv(cfg.d_model + cfg.nheads, [c4, c3, c2], cfg.d_model, cfg.mask_gn_groups)
        cols = torch.full((cfg.num_logit_classes + 1,), -1, dtype=torch.long)
        cols[list(cfg.class_logit_index)] = torch.arange(cfg.num_classes)
        self.register_buffer("logit_to_class", cols, persistent=False)  # logit column -> contiguous class or -1
        self.register_buffer("class_to_logit", torch.tensor(cfg.class_logit_index), persistent=False)

    def forward(self, images: Tensor, pad_mask: Tensor | None = None,
                mask_layer: int | None = None) -> dict[str, Any]:
        """DETR panoptic forward.

        Args:
            images: ``(B, 3, H, W)`` normalised RGB.
            pad_mask: ``(B, H, W)`` bool, True on padding (None: no padding).
            mask_layer: must be None (DETR has a single mask head).

        Returns:
            ``pred_logits (B, Q, C+1)``, ``pred_boxes (B, Q, 4)`` sigmoid cxcywh of the unpadded image,
            ``pred_masks (B, Q, ceil(H/4), ceil(W/4))`` logits, ``aux_logits (L, B, Q, C+1)`` and
            ``aux_boxes (L, B, Q, 4)`` of every decoder layer (the last = pred_*), ``valid_sizes (B, 2)`` unpadded
            ``(h, w)`` of each image, ``image_size`` padded ``(H, W)``.
        """
        pad_mask = self._pad_mask(images, pad_mask, mask_layer)
        detr = self.detr
        c2, c3, c4, c5 = detr.backbone[0](images)
        mask = F.interpolate(pad_mask[None].float(), size=c5.shape[-2:]).to(torch.bool)[0]
        pos = detr.backbone[1](mask).to(c5.dtype)
        src_proj = detr.input_proj(c5)
        query_pos = detr.query_embed.weight.unsqueeze(1).repeat(1, images.shape[0], 1)
        hs, memory = detr.transformer(src_proj, mask, query_pos, pos)
        logits = detr.class_embed(hs)
        boxes = detr.bbox_embed(hs).sigmoid()
        bbox_mask = self.bbox_attention(hs[-1], memory, mask=mask)
        seg = self.mask_head(src_proj, bbox_mask, [c4, c3, c2])
        return self._outputs(images, pad_mask, logits, boxes, seg)

    # ------------------------------------------------------------------ models.inference.PanopticModel
    def candidates(self, outputs: dict[str, Any], index: int, layer: str = LAST_LAYER,
                   valid_hw: tuple[int, int] | None = None) -> Candidates:
        """One candidate per query: best real class of the softmax, ``sigmoid`` masks at stride 4, boxes."""
        self._check_layer(layer)
        prob = outputs["pred_logits"][index].detach().float().softmax(-1).cpu()
        scores, labels = prob[:, self.class_to_logit.cpu()].max(-1)
        masks = self._masks(outputs, index, valid_hw).detach().float().sigmoid().cpu()
        return Candidates(scores=scores, labels=labels, masks=masks,
                          boxes=outputs["pred_boxes"][index].detach().float().cpu(),
                          query_index=torch.arange(prob.shape[0]))

    def own_post_process(self, outputs: dict[str, Any], index: int, out_size: tuple[int, int],
                         valid_hw: tuple[int, int] | None = None) -> PanopticResult:
        """DETR's ``PostProcessPanoptic`` (threshold 0.85, no void, area <= 4 removed), padding bug fixed.

        A kept query whose argmax column is not a category (never the case for the released weights) is dropped.
        """
        prob = outputs["pred_logits"][index].detach().float().softmax(-1).cpu()
        scores, cols = prob.max(-1)
        labels = self.logit_to_class.cpu()[cols]
        keep = (cols != prob.shape[-1] - 1) & (scores > self.cfg.panoptic_threshold) & (labels >= 0)
        return self._own(outputs, index, scores[keep], labels[keep], keep, out_size, valid_hw)

    def dump_raw(self, outputs: dict[str, Any], index: int, prep: Any, result: PanopticResult) -> dict[str, np.ndarray]:
        """Raw outputs of image ``index`` for the parity check (issue #12), float32 unless noted.

        ``pred_logits (Q, C+1)``, ``pred_boxes (Q, 4)``, ``pred_masks (Q, h, w)`` stride-4 logits of the image's own
        region, ``aux_logits (L, Q, C+1)``, ``aux_boxes (L, Q, 4)`` (every decoder layer), and
        ``panoptic_category (H, W)`` int32: the logit column (= COCO panoptic category id for the released models)
        of each pixel's segment after DETR's own post-processing at the original size, -1 void. ``result`` is not
        used: the category map is always the own post-processing's.
        """
        own = self.own_post_process(outputs, index, tuple(prep.ori_shape))
        cat = np.full(own.category.shape, -1, dtype=np.int32)
        sel = own.category >= 0
        cat[sel] = self.class_to_logit.cpu().numpy()[own.category[sel]]

        def f32(t: Tensor) -> np.ndarray:
            return t.detach().float().cpu().numpy().astype(np.float32)

        return {"pred_logits": f32(outputs["pred_logits"][index]), "pred_boxes": f32(outputs["pred_boxes"][index]),
                "pred_masks": f32(self._masks(outputs, index, None)),
                "aux_logits": f32(outputs["aux_logits"][:, index]), "aux_boxes": f32(outputs["aux_boxes"][:, index]),
                "panoptic_category": cat}


def build_model(cfg: DETRConfig) -> DETRPanoptic:
    """Construct the model (random init; nothing downloaded)."""
    return DETRPanoptic(cfg)


def build_criterion(cfg: DETRConfig, num_things: int, num_stuff: int) -> nn.Module:
    """DETR's ``SetCriterion`` (CE with no-object weight 0.1, L1 5, GIoU 2, mask focal 1 + dice 1, aux layers).

    Call as ``criterion(model, images, pad_mask, targets) -> (loss, logs)`` (see ``detr_criterion``).
    """
    from models.baselines.detr_criterion import SetCriterion, SetCriterionConfig

    check_data_classes(cfg, num_things, num_stuff)
    crit = SetCriterionConfig.from_model(cfg, focal=False)
    return SetCriterion(crit, torch.tensor(cfg.class_logit_index))


def convert_detr(path: Path, cfg: DETRConfig) -> dict[str, Tensor]:
    """Released DETR panoptic ``.pth`` (``{"model": state_dict, ...}``) -> our state dict (identity key map).

    Raises ``CheckpointError`` naming the family when the file is not a DETR panoptic checkpoint (e.g. Panoptic
    SegFormer or a box-only DETR file); the strict load in ``models.checkpoint`` lists any other mismatch.
    """
    state, _ = read_released_pth(path)
    return convert_state_dict(state, str(path))


def convert_state_dict(state: dict[str, Tensor], source: str = "<state dict>") -> dict[str, Tensor]:
    """Check that ``state`` is a DETR panoptic state dict (``detr.*`` keys) and return it (identity key map)."""
    check_family(state, ("detr.transformer.", "detr.backbone."), "DETR panoptic", source)
    return dict(state)


FAMILY = Family(
    name="detr",
    configs=CONFIGS,
    config_from_dict=DETRConfig.from_dict,
    build=build_model,
    converters={"detr": convert_detr},
    default_source="detr",
)
