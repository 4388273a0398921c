"""Model configurations as plain dataclasses (no registry, no inheritance).

``panoptic_segformer_r50/_r101/_swin_l/_pvtv2_b5`` reproduce the official configs
(``configs/panformer/*.py`` of zhiqi-li/Panoptic-SegFormer); ``panoptic_segformer_tiny`` (query decoupling) and
``panoptic_segformer_tiny_joint`` (joint matching) are CPU-sized models for the synthetic data set. Every paper ablation is a field here, never a copy of code:

* Table 6, location decoder depth: ``num_location_layers`` in {0, 1, 2, 6}; box-free ("6*", mass centres instead
  of boxes): ``box_free=True``. With 0 layers the content queries go straight to the heads and the mask decoder.
* Table 8, query decoupling vs joint matching: ``decouple_queries=False`` with ``num_thing_queries=353``.
* Table B.5, mask-decoder heads 1 vs 8: ``mask_num_heads``.
* Table 10, masks from any mask-decoder layer: every block's mask is returned by one forward.
* Table 5, DETR -> Panoptic SegFormer steps that are variants of this model: ``with_box_refine``,
  ``decouple_queries`` (single-scale and the DETR mask head are not variants of this model).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class PanopticSegFormerConfig:
    """All hyper-parameters of :class:`models.panoptic_segformer.PanopticSegFormer`.

    Defaults are the official R50 settings (``configs/panformer/base.py``).
    """

    name: str = "panoptic_segformer_r50"
    # Backbone
    backbone: str = "resnet50"
    frozen_stages: int = 1
    norm_eval: bool = True  # ResNet BatchNorm frozen in eval mode (official); see build_backbone for random init
    backbone_norm: str = "bn"  # ResNet only: "bn" (official) or "gn" (trainable GroupNorm, for training from scratch)
    backbone_width: int | None = None  # ResNet only: stage width w (w, 2w, 4w, 8w); None = standard (64)
    backbone_drop_path: float | None = None
    # Neck / multi-scale features
    d_model: int = 256
    num_feature_levels: int = 4  # C3-C5 + one extra stride-64 level from raw C5
    gn_groups: int = 32
    # Deformable transformer
    num_heads: int = 8
    num_points: int = 4
    dim_feedforward: int = 1024
    dropout: float = 0.1
    num_encoder_layers: int = 6
    num_location_layers: int = 6  # Table 6: 0 / 1 / 2 / 6
    with_box_refine: bool = True
    box_free: bool = False  # Table 6 "6*": the location decoder predicts mass centres, not boxes (2-d references)
    num_thing_queries: int = 300
    # Classes (taken from the data set)
    num_things: int = 80
    num_stuff: int = 53
    decouple_queries: bool = True  # Table 8: False = one set of queries matched to things and stuff
    # Mask decoder
    num_thing_mask_layers: int = 4
    num_stuff_mask_layers: int = 6
    mask_num_heads: int = 8  # Table B.5: 1 or 8
    mask_mlp_ratio: float = 4.0
    mask_decoder_levels: int = 3  # the stride-64 level is dropped for the mask decoder
    mask_ignore_padding: bool = True  # official: the mask decoder ignores the padding mask
    # Inference (official test_cfg)
    max_per_image: int = 100
    thing_threshold: float = 0.25  # 0.3 for PVTv2-B5 / Swin-L
    stuff_threshold: float = 0.25
    thing_overlap: float = 0.4
    stuff_overlap: float = 0.2
    # Test transform (mmcv Resize keep_ratio)
    test_scale: tuple[int, int] = (1333, 800)
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    # Paths (never downloaded)
    pretrained_backbone: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_location_layers < 0:
            raise ValueError("num_location_layers must be >= 0")
        if self.mask_decoder_levels != 3 or self.num_feature_levels < 3:
            raise ValueError("the mask decoder needs 3 levels (1/8, 1/16, 1/32): num_feature_levels must be >= 3")
        if self.d_model % self.mask_num_heads or self.d_model % self.num_heads:
            raise ValueError("d_model must be divisible by num_heads and mask_num_heads")
        self.test_scale = tuple(self.test_scale)  # type: ignore[assignment]
        self.pixel_mean = tuple(self.pixel_mean)  # type: ignore[assignment]
        self.pixel_std = tuple(self.pixel_std)  # type: ignore[assignment]

    @property
    def num_classes(self) -> int:
        """Things + stuff."""
        return self.num_things + self.num_stuff

    @property
    def num_location_classes(self) -> int:
        """Class-head width of the location decoder (things only, or all classes with joint matching)."""
        return self.num_things if self.decouple_queries else self.num_classes

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PanopticSegFormerConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**data)


def _make(name: str, defaults: dict[str, Any], num_things: int, num_stuff: int,
          overrides: dict[str, Any]) -> PanopticSegFormerConfig:
    kwargs: dict[str, Any] = {"name": name, "num_things": num_things, "num_stuff": num_stuff, **defaults}
    kwargs.update(overrides)
    return PanopticSegFormerConfig(**kwargs)


def panoptic_segformer_r50(num_things: int = 80, num_stuff: int = 53, **overrides: Any) -> PanopticSegFormerConfig:
    """Official R50 (``panformer_r50_24e_coco_panoptic.py``; 12e shares the model)."""
    return _make("panoptic_segformer_r50", {"backbone": "resnet50"}, num_things, num_stuff, overrides)


def panoptic_segformer_r101(num_things: int = 80, num_stuff: int = 53, **overrides: Any) -> PanopticSegFormerConfig:
    """Official R101 (``panformer_r101_24e_coco_panoptic.py``)."""
    return _make("panoptic_segformer_r101", {"backbone": "resnet101"}, num_things, num_stuff, overrides)


def panoptic_segformer_swin_l(num_things: int = 80, num_stuff: int = 53, **overrides: Any) -> PanopticSegFormerConfig:
    """Official Swin-L window 7 (``panformer_swinl_24e_coco_panoptic.py``): merge thresholds 0.3."""
    defaults = {"backbone": "swin_l", "backbone_drop_path": 0.3, "thing_threshold": 0.3, "stuff_threshold": 0.3}
    return _make("panoptic_segformer_swin_l", defaults, num_things, num_stuff, overrides)


def panoptic_segformer_pvtv2_b5(num_things: int = 80, num_stuff: int = 53,
                                **overrides: Any) -> PanopticSegFormerConfig:
    """Official PVTv2-B5 (``panformer_pvtb5_24e_coco_panoptic.py``): merge thresholds 0.3."""
    defaults = {"backbone": "pvtv2_b5", "backbone_drop_path": 0.1, "thing_threshold": 0.3, "stuff_threshold": 0.3}
    return _make("panoptic_segformer_pvtv2_b5", defaults, num_things, num_stuff, overrides)


# The tiny configs: same architecture and code path as the official ones, smaller numbers, for CPU training on the
# synthetic data in minutes (docs/training.md: what was measured and why each number).
_TINY: dict[str, Any] = {
    "backbone": "resnet18",
    "backbone_norm": "gn",  # random init: a trainable, batch-independent norm (frozen BN kills the residual branches)
    "backbone_width": 32,  # ResNet-18 at half width (32-64-128-256)
    "frozen_stages": -1,
    "d_model": 128,  # 64 learnt things half as fast per step (Things PQ 22 vs 32 after 4,000 steps)
    "gn_groups": 32,
    "num_heads": 4,
    "num_points": 2,
    "dim_feedforward": 256,
    "dropout": 0.0,
    "num_encoder_layers": 2,
    "num_location_layers": 2,
    # The synthetic images hold 6.2 things on average, at most ~13; 30 queries found more of them than 20 or 15
    # (Things PQ 34.5 in two runs of 3,500 and 4,000 steps, vs 31.6-33.8 with 20; docs/training.md).
    "num_thing_queries": 30,
    "num_thing_mask_layers": 2,
    "num_stuff_mask_layers": 2,
    "mask_num_heads": 4,
    "mask_mlp_ratio": 2.0,
    "max_per_image": 50,
    # t_cnf of the mask-wise merge (official 0.25 for R50/R101, 0.3 for Swin-L/PVTv2): after minutes of training the
    # tiny models' rescored thing scores (class x mask quality^2) stay low, and 0.25 keeps a third of the GT things
    # out of reach; 0.15 gave the best (or a tied) Things PQ of 0.25 / 0.2 / 0.15 / 0.1 in all 14 tiny runs
    # measured (+1.1 on average over 0.2, +6.3 over 0.25; docs/training.md).
    "thing_threshold": 0.15,
    "test_scale": (128, 128),  # the demo's synthetic images (long side 128)
}


def panoptic_segformer_tiny(num_things: int = 80, num_stuff: int = 53, **overrides: Any) -> PanopticSegFormerConfig:
    """CPU-sized query-decoupled model for the synthetic data: half-width ResNet-18 (random init, GroupNorm),
    d_model 128, 2 layers in every stage, 30 thing queries, t_cnf 0.15, test scale 128."""
    return _make("panoptic_segformer_tiny", _TINY, num_things, num_stuff, overrides)


def panoptic_segformer_tiny_joint(num_things: int = 80, num_stuff: int = 53,
                                  **overrides: Any) -> PanopticSegFormerConfig:
    """The tiny model with joint matching (Table 8, App. B.4): one query set for things and stuff, no stuff mask
    decoder; ``num_thing_queries = 30 + num_stuff`` as the paper's 353 = 300 + 53."""
    defaults = {**_TINY, "decouple_queries": False, "num_thing_queries": _TINY["num_thing_queries"] + num_stuff}
    return _make("panoptic_segformer_tiny_joint", defaults, num_things, num_stuff, overrides)


MODEL_CONFIGS: dict[str, Callable[..., PanopticSegFormerConfig]] = {
    "panoptic_segformer_r50": panoptic_segformer_r50,
    "panoptic_segformer_r101": panoptic_segformer_r101,
    "panoptic_segformer_swin_l": panoptic_segformer_swin_l,
    "panoptic_segformer_pvtv2_b5": panoptic_segformer_pvtv2_b5,
    "panoptic_segformer_tiny": panoptic_segformer_tiny,
    "panoptic_segformer_tiny_joint": panoptic_segformer_tiny_joint,
}


def get_config(name: str, **kwargs: Any) -> PanopticSegFormerConfig:
    """Config by model name (keys of ``MODEL_CONFIGS``); ``ValueError`` listing the valid names otherwise."""
    try:
        fn = MODEL_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_CONFIGS)}") from None
    return fn(**kwargs)
