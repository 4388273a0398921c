"""Baseline models of the paper, each implementing ``models.inference.PanopticModel``.

* ``detr``: DETR panoptic (R50, R101) with its own post-processing; ``detr_modules`` (transformer, MHAttentionMap,
  MaskHeadSmallConv), ``detr_postprocess`` (``PostProcessPanoptic`` with the padding bug fixed), ``detr_criterion``
  (DETR / Deformable DETR set criteria for training).
* ``deformable_detr``: Deformable DETR multi-scale with a DETR-style panoptic mask head ("D-DETR-MS");
  ``deformable_detr_convert`` (released detection checkpoints, explicit detector-only load).
* ``common``: helpers for every baseline family (frozen BN, torchvision ResNet, released-file reading, family
  detection, partial loads, COCO category ids).
"""
