"""What every panoptic model offers the harness's inference paths (predict, eval grid, profile, sweep).

Panoptic SegFormer and every baseline (``models/baselines/``) implement :class:`PanopticModel`, so
``harness predict``, ``harness eval`` (clean and COCO-C grids), ``harness profile`` and ``harness sweep`` never
branch on the model family:

* :meth:`PanopticModel.test_transform` says how the official code of that model prepares a test image
  (``harness.data.transforms.prepare`` applies it);
* ``model(images, pad_mask)`` is the inference forward; ``model(images, pad_mask, mask_layer=k)`` stops the mask
  decoder after block ``k`` (per-layer timing, Table 10) where the model has such layers;
* :meth:`PanopticModel.candidates` turns the forward's dict into the common :class:`models.postprocess.Candidates`
  (scores, labels, masks) of one image and one mask layer, so every post-processor (m, p, p*, heuristic) applies;
* :meth:`PanopticModel.own_post_process` is the model's own official post-processing (``--post-process own``,
  the default for a baseline); Panoptic SegFormer's own is "(m)".

Layer names are strings, as in the results table: ``"last"`` (the unmodified model) or ``"1"``, ``"2"``, ...
(mask-decoder block k, 1-based).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from models.postprocess import Candidates, PanopticResult

__all__ = ["TestTransformSpec", "PanopticModel", "LAST_LAYER", "parse_layer"]

LAST_LAYER = "last"


@dataclass(frozen=True)
class TestTransformSpec:
    """A model's official test-time image preparation.

    Attributes:
        resize: whose resize arithmetic: ``"mmcv"`` (mmcv ``imrescale``: cv2 INTER_LINEAR on uint8, size
            ``int(x * s + 0.5)``; Panoptic SegFormer), ``"pil"`` (torchvision ``Resize`` on a PIL image, bilinear;
            DETR / Deformable DETR), ``"detectron2"`` (``ResizeShortestEdge``: PIL bilinear on uint8; MaskFormer,
            Panoptic FCN).
        short: target short side (800 for COCO models).
        long: maximum long side (1333 for COCO models).
        mean: per-channel mean on the 0-255 scale, in ``channel_order``.
        std: per-channel std on the 0-255 scale, in ``channel_order`` (1.0 for Panoptic FCN's BGR input).
        channel_order: ``"rgb"`` or ``"bgr"``: the channel order of the network input.
        size_divisor: zero padding of the input to a multiple of this (1 = none).
    """

    resize: Literal["mmcv", "pil", "detectron2"] = "mmcv"
    short: int = 800
    long: int = 1333
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    channel_order: Literal["rgb", "bgr"] = "rgb"
    size_divisor: int = 1


def parse_layer(layer: str | int | None) -> int | None:
    """``"last"``/None -> None; ``"3"``/3 -> 3 (1-based block index). ``ValueError`` otherwise."""
    if layer is None or layer == LAST_LAYER:
        return None
    try:
        k = int(layer)
    except (TypeError, ValueError):
        raise ValueError(f"mask layer must be 'last' or a block number >= 1, got {layer!r}") from None
    if k < 1:
        raise ValueError(f"mask layer must be 'last' or a block number >= 1, got {layer!r}")
    return k


@runtime_checkable
class PanopticModel(Protocol):
    """The inference contract of every model in ``models/`` (see the module docstring).

    Attributes expected on the object: ``cfg`` (a dataclass with at least ``name``, ``num_things``,
    ``num_stuff``), and it is an ``nn.Module`` whose ``forward(images (B, 3, H, W), pad_mask (B, H, W) | None,
    mask_layer: int | None = None) -> dict`` is the inference forward.
    """

    def test_transform(self) -> TestTransformSpec:
        """The official test transform of this model."""
        ...

    def mask_layers(self) -> list[str]:
        """Layers that ``--layers all`` scores, ending with ``"last"`` (``["last"]`` for single-layer models)."""
        ...

    def candidates(self, outputs: dict[str, Any], index: int, layer: str = LAST_LAYER,
                   valid_hw: tuple[int, int] | None = None) -> Candidates:
        """Candidates of image ``index`` of the batch at mask layer ``layer`` (masks cropped to ``valid_hw``)."""
        ...

    def post_process_options(self, method: str) -> dict[str, Any]:
        """Model-specific keyword options of a post-processor (e.g. the backbone's t_cnf for "m")."""
        ...

    def own_post_process(self, outputs: dict[str, Any], index: int, out_size: tuple[int, int],
                         valid_hw: tuple[int, int] | None = None) -> PanopticResult:
        """The model's own official post-processing of image ``index`` at ``out_size`` (H, W)."""
        ...

