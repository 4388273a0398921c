"""Single-cell evaluation: clean images, one post-processor, the last layer (the grid's simplest case).

:func:`evaluate` is the programmatic ``harness eval --weights W --data ROOT --out DIR``: a grid run
(:mod:`harness.engine.grid`) of the clean cell with one post-processor, which also writes the files this function
always wrote: ``DIR/pred/*.png`` + ``DIR/pred.json`` (COCO panoptic; ``pred`` links to
``DIR/predictions/<model>/none_0/<method>_last/``), ``DIR/pq.json`` (All / Things / Stuff + per class, fractions)
and ``DIR/gt_subset.json`` (the GT restricted to the scored images). The model goes through the
``models.inference.PanopticModel`` contract, so any model family works.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from harness.engine.loading import load_model

log = logging.getLogger(__name__)

__all__ = ["load_model", "evaluate"]


def evaluate(
    model: torch.nn.Module | str | Path,
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
    """Predict the clean split, write COCO panoptic files and score them.

    Args:
        model: a model (any ``models.inference.PanopticModel``) or a weights path (see `load_model`).
        data_root: data set root; split: its split.
        out_dir: output folder (a folder holding another evaluation is replaced, as before).
        post_process_method: "m", "p", "p*", "heuristic" or "own".
        max_images: score only the first N images (ascending image id).
        model_name: model name for weights without a config.
        device: torch device.
        options: extra keyword options for the post-processor (override the model's).
        boundary: also compute Boundary PQ (dilation 0.02, as boundary-iou-api for COCO).

    Returns:
        {"pq": {"All": {pq, sq, rq, n}, "Things": ..., "Stuff": ..., "per_class": ...}, "boundary_pq": ... (with
        boundary), "num_images": int, "post_process": str, "model": str}, fractions in [0, 1].
    """
    import json

    from harness.engine.grid import run_grid
    from harness.engine.grid_config import GridOptions

    is_module = isinstance(model, torch.nn.Module)
    was_training = bool(is_module and model.training)
    opts = GridOptions(
        weights=None if is_module else model, model_object=model if is_module else None, data=data_root,
        out=out_dir, model=model_name, split=split, max_images=max_images, post_process=[post_process_method],
        pp_options={post_process_method: dict(options)} if options else {}, boundary=boundary,
        save_predictions=True, workers=0, score_workers=0, device=device, replace=True)
    try:
        outcome = run_grid(opts)
    finally:
        if was_training:
            model.train()  # type: ignore[union-attr]
    return json.loads((outcome.out / "pq.json").read_text(encoding="utf-8"))
