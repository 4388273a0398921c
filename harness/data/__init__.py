"""COCO-panoptic data layer: format primitives, reader, training targets, prediction writer.

Kept import-light on purpose (no torch, no OpenCV here): import the submodule you need,
e.g. `from harness.data.coco_panoptic import PanopticDataset`. `targets` is the only
submodule that imports torch.

- `format`: `rgb2id`, `id2rgb`, `VOID`, `OFFSET`, `CategoryMap` (things-first contiguous ids).
- `coco_panoptic`: `load_panoptic_json`, `PanopticDataset`, `PanopticSample`, `Segment`,
  `coco_categories`, `coco_category_map` (the 133 COCO panoptic categories, package data).
- `targets`: `build_targets(sample, categories)` -> thing/stuff mask, box, label tensors.
- `writer`: `PanopticPredictionWriter` (PNG + JSON predictions for panopticapi).
- `panoptic_json`: the validating readers of every JSON format we read (panoptic GT/predictions,
  instances, results, categories), pairing by image id, PNG-header size checks (docs/errors.md).
- `images`: the image decoders (OpenCV as mmcv, PIL as the COCO-C script; 16-bit scaled, never
  clipped), C-library messages captured, `png_header`.
"""
