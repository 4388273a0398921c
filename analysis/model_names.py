"""How a results row (``model``, variant) relates to the paper's rows, and which tiny model stands in for which.

A results row names its model by config name (``models.zoo``). The paper names methods and backbones. This module
is the one place that relates the two:

* :data:`MODELS`: every model name the harness knows -> :class:`ModelInfo` (paper method, backbone, default
  post-processor, released weights file, whether it is a CPU-sized demo model).
* :data:`DEMO_STANDINS`: paper model -> the tiny config that plays its part in the synthetic demo. A table rendered
  from stand-ins is a *demo version*: labelled as a different model and data set, never mixed with real rows.
* :func:`row_variant`: the training variant of a run (``"default"``, ``"joint"`` for joint matching, ``"1x"`` for
  the 12-epoch R50 release, ``"loc0"`` ... for location-decoder ablations, ``"heads1"``, ``"box_free"``), from an
  explicit label, the run's ``run.json``, or the model name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Mapping

__all__ = ["ModelInfo", "MODELS", "DEMO_STANDINS", "DEFAULT_VARIANT", "model_info", "row_variant",
           "default_post_process", "is_demo_model", "display_name", "demo_standin"]

DEFAULT_VARIANT = "default"


@dataclass(frozen=True)
class ModelInfo:
    """What the paper calls a model, and where its released weights come from.

    Attributes:
        method: the paper's method name ("Panoptic SegFormer", "DETR", "D-DETR-MS", "MaskFormer", "Panoptic FCN").
        backbone: the paper's backbone label ("R50", "Swin-L", ...; "tiny" for demo models).
        post_process: the model's default post-processor in results rows ("m" or "own").
        weights: file name of the released COCO weights (None: no release, the row needs `harness train`).
        demo: a CPU-sized model for the synthetic data (never a paper measurement).
    """

    method: str
    backbone: str
    post_process: str = "own"
    weights: str | None = None
    demo: bool = False


MODELS: dict[str, ModelInfo] = {
    "panoptic_segformer_r50": ModelInfo("Panoptic SegFormer", "R50", "m", "panoptic_segformer_r50_2x.pth"),
    "panoptic_segformer_r101": ModelInfo("Panoptic SegFormer", "R101", "m", "panoptic_segformer_r101_2x.pth"),
    "panoptic_segformer_swin_l": ModelInfo("Panoptic SegFormer", "Swin-L", "m", "panoptic_segformer_swinl_2x.pth"),
    "panoptic_segformer_pvtv2_b5": ModelInfo("Panoptic SegFormer", "PVTv2-B5", "m",
                                             "panoptic_segformer_pvtv2b5_2x.pth"),
    "detr_r50_panoptic": ModelInfo("DETR", "R50", "own", "detr-r50-panoptic-00ce5173.pth"),
    "detr_r101_panoptic": ModelInfo("DETR", "R101", "own", "detr-r101-panoptic-40021d53.pth"),
    "deformable_detr_r50_ms": ModelInfo("D-DETR-MS", "R50", "own", None),
    "deformable_detr_r50_ms_refine": ModelInfo("D-DETR-MS", "R50", "own", None),
    "maskformer_r50_panoptic": ModelInfo("MaskFormer", "R50", "own", "model_final_6f60dc.pkl"),
    "maskformer_swin_l_panoptic": ModelInfo("MaskFormer", "Swin-L", "own", "model_final_7505c4.pkl"),
    "panoptic_fcn_r50_3x": ModelInfo("Panoptic FCN", "R50", "own", "panoptic_fcn_r50_3x.pth"),
    # CPU-sized configs for the synthetic demo.
    "panoptic_segformer_tiny": ModelInfo("Panoptic SegFormer", "tiny", "m", None, demo=True),
    "panoptic_segformer_tiny_joint": ModelInfo("Panoptic SegFormer (joint matching)", "tiny", "m", None, demo=True),
    "detr_tiny": ModelInfo("DETR", "tiny", "own", None, demo=True),
    "deformable_detr_tiny": ModelInfo("D-DETR-MS", "tiny", "own", None, demo=True),
    "maskformer_tiny": ModelInfo("MaskFormer", "tiny", "own", None, demo=True),
    "panoptic_fcn_tiny": ModelInfo("Panoptic FCN", "tiny", "own", None, demo=True),
}

# Paper model -> tiny stand-in for demo versions of the tables (same variant; the joint tiny model carries the
# "joint" variant in its name).
DEMO_STANDINS: dict[str, str] = {
    "panoptic_segformer_r50": "panoptic_segformer_tiny",
    "detr_r50_panoptic": "detr_tiny",
    "deformable_detr_r50_ms": "deformable_detr_tiny",
    "deformable_detr_r50_ms_refine": "deformable_detr_tiny",
    "maskformer_r50_panoptic": "maskformer_tiny",
    "panoptic_fcn_r50_3x": "panoptic_fcn_tiny",
}


def demo_standin(model: str, variant: str = DEFAULT_VARIANT) -> str | None:
    """The tiny config that stands in for ``model`` (with ``variant``) in demo tables, or None."""
    if variant == "joint" and model.startswith("panoptic_segformer"):
        return "panoptic_segformer_tiny_joint"
    return DEMO_STANDINS.get(model)


def model_info(name: str) -> ModelInfo | None:
    """The :class:`ModelInfo` of a model name, or None for a name the analysis does not know."""
    return MODELS.get(name)


def is_demo_model(name: str) -> bool:
    """A CPU-sized demo model (``*_tiny*``), whose numbers are never paper measurements."""
    info = MODELS.get(name)
    return info.demo if info is not None else "tiny" in name


def default_post_process(name: str) -> str:
    """The post-processor a model's own rows use by default ("m" for Panoptic SegFormer, "own" for baselines)."""
    info = MODELS.get(name)
    return info.post_process if info is not None else "m"


def display_name(name: str, variant: str = DEFAULT_VARIANT) -> str:
    """A model as a person reads it: ``"Panoptic SegFormer (R50)"``, ``"Panoptic SegFormer (tiny) [joint]"``."""
    info = MODELS.get(name)
    base = f"{info.method} ({info.backbone})" if info is not None else name
    if variant != DEFAULT_VARIANT and not (variant == "joint" and "joint" in base):
        base += f" [{variant}]"
    return base


def _variant_from_config(config: Mapping[str, Any]) -> str | None:
    """Variant from a model config dict (``models.configs`` keys), for the ablation knobs the paper varies."""
    if config.get("decouple_queries") is False:
        return "joint"
    if config.get("box_free") is True:
        return "box_free"
    return None


def _flat_meta(run_meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """``run.json`` as one flat dict: ``harness eval`` nests its content under ``settings`` and ``info``."""
    meta = dict(run_meta or {})
    for key in ("info", "settings"):
        if isinstance(meta.get(key), Mapping):
            meta = {**meta, **meta[key]}
    return meta


def row_variant(model: str, run_meta: Mapping[str, Any] | None = None, label: str | None = None) -> str:
    """The training variant of a run's rows.

    Order: an explicit ``label`` (``harness report --results RUN=LABEL``), ``run.json``'s ``"variant"``, the model
    config in ``run.json`` (``model_config`` / ``config``: ``decouple_queries: false`` -> "joint", ``box_free: true``
    -> "box_free"), the weights file name (``*_1x*`` -> "1x", the 12-epoch R50 release), the model name
    (``*_joint`` -> "joint"), else "default".
    """
    if label:
        return label
    meta = _flat_meta(run_meta)
    if isinstance(meta.get("variant"), str) and meta["variant"]:
        return str(meta["variant"])
    for key in ("model_config", "config"):
        cfg = meta.get(key)
        if isinstance(cfg, Mapping):
            v = _variant_from_config(cfg)
            if v is not None:
                return v
    weights = meta.get("weights")
    if isinstance(weights, str) and "_1x" in PurePath(weights).name:
        return "1x"
    if model.endswith("_joint"):
        return "joint"
    return DEFAULT_VARIANT
