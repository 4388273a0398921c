"""Evaluation: run a model over a data set, post-process, write COCO panoptic predictions, score PQ.

The test transform is the official one (`harness.data.transforms`): mmcv keep-ratio rescale to the config's
`test_scale` (short side 800, long side <= 1333 for the COCO models), OpenCV bilinear on the uint8 image,
ImageNet mean/std in RGB, batch size 1 with no padding. Weights are read by `models.checkpoint` (ours or
official). Masks are resized straight to the original image size by the post-processor.

Outputs in `out_dir`: `pred/` (PNG per image) + `pred.json` (via `harness.data.writer`), `pq.json`
(`harness.metrics` result: All/Things/Stuff + per class) and, when only part of the split is scored,
`gt_subset.json` (the GT restricted to the scored images).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.data.coco_panoptic import PanopticDataset
from harness.data.writer import PanopticPredictionWriter
from harness.errors import UserError
from harness.io import atomic_write_json
from harness.logging_utils import progress_disabled
from models.configs import PanopticSegFormerConfig
from models.panoptic_segformer import PanopticSegFormer
from models.postprocess import POST_PROCESSORS, candidates_from_outputs, post_process

log = logging.getLogger(__name__)


def load_model(
    weights: str | Path,
    model_name: str | None = None,
    num_things: int | None = None,
    num_stuff: int | None = None,
    device: str = "cpu",
) -> PanopticSegFormer:
    """Build the model from weights and load them strictly (`models.checkpoint.load_model`).

    Accepts our format (`model.safetensors` + `model.json`, or the folder holding them), our training
    `checkpoint_last.pt`, and official `.pth` releases (converted on the fly; they need `model_name`).

    Args:
        weights: the weights path.
        model_name: config name, needed for official files and for our files without a config.
        num_things / num_stuff: class counts for `model_name` (from the data set); ignored for files with a config.
        device: torch device.

    Raises:
        UserError: unreadable file, unknown format, or any missing / unexpected / shape-mismatched key (all listed).
    """
    from models.checkpoint import CheckpointError
    from models.checkpoint import load_model as load_checkpoint_model

    overrides: dict[str, Any] = {}
    if model_name is not None:  # a named config takes its class counts from the data set
        overrides = {k: v for k, v in (("num_things", num_things), ("num_stuff", num_stuff)) if v is not None}
    try:
        model, _cfg = load_checkpoint_model(Path(weights), model_name, **overrides)
    except (CheckpointError, ValueError) as exc:
        raise UserError(str(exc)) from None
    return model.to(device).eval()


def apply_test_transform(image_rgb: np.ndarray, cfg: PanopticSegFormerConfig) -> torch.Tensor:
    """Official test transform of one (H, W, 3) uint8 RGB image -> (1, 3, h, w) float32 (no padding).

    Delegates to `harness.data.transforms` (mmcv-exact resize and normalisation, which expects BGR input).
    """
    from harness.data.transforms import apply_test_transform as mmcv_test_transform

    prep = mmcv_test_transform(
        np.ascontiguousarray(image_rgb[..., ::-1]), cfg.test_scale, cfg.pixel_mean, cfg.pixel_std
    )
    return torch.from_numpy(prep.image)[None]


def merge_options(method: str, cfg: PanopticSegFormerConfig) -> dict[str, Any]:
    """Per-method options taken from the model config (thresholds of "(m)" depend on the backbone)."""
    if method == "m":
        return {
            "thing_threshold": cfg.thing_threshold,
            "stuff_threshold": cfg.stuff_threshold,
            "thing_overlap": cfg.thing_overlap,
            "stuff_overlap": cfg.stuff_overlap,
        }
    return {}


def _gt_subset(dataset: PanopticDataset, image_ids: list[Any], path: Path) -> Path:
    data = json.loads(dataset.json_path.read_text(encoding="utf-8"))
    keep = set(image_ids)
    data["images"] = [im for im in data["images"] if im["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    atomic_write_json(path, data)
    return path


@torch.no_grad()
def evaluate(
    model: PanopticSegFormer | str | Path,
    data_root: str | Path,
    out_dir: str | Path,
    split: str = "val2017",
    post_process_method: str = "m",
    max_images: int | None = None,
    model_name: str | None = None,
    device: str = "cpu",
    options: dict[str, Any] | None = None,
    boundary: bool = False,
) -> dict[str, Any]:
    """Predict, write COCO panoptic files and score them.

    Args:
        model: a model or a weights path (see `load_model`).
        data_root: data set root; split: its split.
        out_dir: output folder.
        post_process_method: "m", "p", "p*" or "heuristic".
        max_images: score only the first N images of the split.
        model_name: config name for weights without a config.
        device: torch device.
        options: extra keyword options for the post-processor (override the config's).
        boundary: also compute Boundary PQ (dilation 0.02, as boundary-iou-api for COCO).

    Returns:
        `harness.metrics` result: {"pq": {"All": {pq, sq, rq, n}, "Things": ..., "Stuff": ..., "per_class": ...},
        "num_images": int}.
    """
    from tqdm import tqdm

    from harness.metrics.pq import PQOptions
    from harness.metrics.pq_files import evaluate_pq_files

    if post_process_method not in POST_PROCESSORS:
        raise UserError(f"unknown --post-process {post_process_method!r}; choose from {', '.join(POST_PROCESSORS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = PanopticDataset(data_root, split=split)
    cats = dataset.categories
    if not isinstance(model, PanopticSegFormer):
        model = load_model(model, model_name, cats.num_things, cats.num_stuff, device)
    cfg = model.cfg
    if (cfg.num_things, cfg.num_stuff) != (cats.num_things, cats.num_stuff):
        raise UserError(
            f"model has {cfg.num_things} thing / {cfg.num_stuff} stuff classes but {dataset.json_path} has "
            f"{cats.num_things} / {cats.num_stuff}"
        )
    was_training = model.training
    model.eval()
    opts = {**merge_options(post_process_method, cfg), **(options or {})}
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    pred_json = out / "pred.json"
    scored_ids = []
    with PanopticPredictionWriter(out / "pred", pred_json, cats) as writer:
        for i in tqdm(range(n), desc=f"eval ({post_process_method})", disable=progress_disabled()):
            sample = dataset[i]
            x = apply_test_transform(sample.image, cfg).to(device)
            outputs = model(x)
            cands = candidates_from_outputs(outputs, 0, cfg.num_things)
            res = post_process(post_process_method, cands, cfg.num_things, sample.image.shape[:2], **opts)
            writer.add_semantic(sample.image_id, sample.file_name, res.category, res.instance)
            scored_ids.append(sample.image_id)
    if was_training:
        model.train()
    gt_json = dataset.json_path if n == len(dataset) else _gt_subset(dataset, scored_ids, out / "gt_subset.json")
    result = evaluate_pq_files(
        gt_json, pred_json, gt_dir=dataset.png_dir, pred_dir=out / "pred", options=PQOptions(boundary=boundary)
    )
    result["post_process"] = post_process_method
    result["model"] = cfg.name
    atomic_write_json(out / "pq.json", result, indent=2)
    return result
