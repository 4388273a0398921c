"""Convert the official Panoptic SegFormer ``.pth`` checkpoints to our key names.

The official files are mmcv runner checkpoints ``{"state_dict": ..., "meta": ...}`` (a raw state dict is accepted
too; a ``module.`` prefix is stripped). Our module tree keeps the official names for the neck and head, so the
conversion is a short table of **whole path-segment** renames (a substring replace would turn ``mask_head2`` into
``things_mask_head2``):

* old release names (``easymd/runner/checkpoints.py``): ``bbox_head.mask_head`` -> ``bbox_head.things_mask_head``,
  ``bbox_head.mask_head2`` -> ``bbox_head.stuff_mask_head``, ``bbox_head.cls_branches2`` ->
  ``bbox_head.cls_thing_branches``;
* PVTv2 (official ``pvt_v2.py`` -> timm): ``patch_embed1`` -> ``patch_embed``, ``patch_embed{k}`` ->
  ``stages.{k-1}.downsample``, ``block{k}`` -> ``stages.{k-1}.blocks``, ``norm{k}`` -> ``stages.{k-1}.norm``,
  ``mlp.dwconv.dwconv`` -> ``mlp.dwconv``;
* Swin (official Swin-Transformer-Object-Detection -> timm): the patch merging at the end of stage ``i`` becomes
  timm's ``layers.{i+1}.downsample``; ``relative_position_index`` buffers are dropped (constants of the window
  size that timm recomputes as non-persistent buffers);
* ResNet: identical names (torchvision = mmdet = timm).

After renaming, :func:`models.checkpoint.load_state_dict_strict` loads strictly and lists every leftover.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from models.checkpoint import CheckpointError, read_released_pth

log = logging.getLogger(__name__)

# Whole-segment renames for the head, applied to old and new names alike (new names are fixed points).
HEAD_RENAMES: dict[str, str] = {
    "mask_head": "things_mask_head",
    "mask_head2": "stuff_mask_head",
    "cls_branches2": "cls_thing_branches",
}


def read_official(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read an official ``.pth`` file: ``(state_dict, meta)``.

    ``models.checkpoint.read_released_pth``: ``weights_only=True`` with the allowlist of ``models.safe_load`` (mmcv
    ``meta`` may hold numpy scalars); a file needing anything else is refused, never unpickled fully.
    """
    state, extra = read_released_pth(path)
    meta = extra.get("meta", {})
    return state, meta if isinstance(meta, dict) else {}


def _rename_head(key: str) -> str:
    parts = key.split(".")
    if len(parts) > 1 and parts[0] == "bbox_head" and parts[1] in HEAD_RENAMES:
        parts[1] = HEAD_RENAMES[parts[1]]
    return ".".join(parts)


def _rename_pvt(key: str) -> str:
    if not key.startswith("backbone."):
        return key
    rest = key[len("backbone."):]
    m = re.match(r"^patch_embed(\d)\.(.*)$", rest)
    if m:
        k = int(m.group(1))
        rest = f"patch_embed.{m.group(2)}" if k == 1 else f"stages.{k - 1}.downsample.{m.group(2)}"
    m = re.match(r"^block(\d)\.(.*)$", rest)
    if m:
        rest = f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}"
    m = re.match(r"^norm(\d)\.(.*)$", rest)
    if m:
        rest = f"stages.{int(m.group(1)) - 1}.norm.{m.group(2)}"
    rest = re.sub(r"(^|\.)mlp\.dwconv\.dwconv\.", r"\1mlp.dwconv.", rest)
    return "backbone." + rest


def _rename_swin(key: str) -> str:
    m = re.match(r"^backbone\.layers\.(\d+)\.downsample\.(.*)$", key)
    if m:
        return f"backbone.layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
    return key


def convert_state_dict(state: Mapping[str, Tensor], backbone: str) -> dict[str, Tensor]:
    """Rename an official state dict (old or new naming) to ours.

    Args:
        state: official state dict.
        backbone: our config's backbone name (``resnet50``, ``resnet101``, ``pvtv2_b5``, ``swin_l``, ...).

    Returns:
        The renamed state dict; Swin ``relative_position_index`` buffers are removed.
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        k = key[len("module."):] if key.startswith("module.") else key
        k = _rename_head(k)
        if backbone == "pvtv2_b5":
            k = _rename_pvt(k)
        elif backbone == "swin_l":
            if k.startswith("backbone.") and k.endswith(".relative_position_index"):
                continue  # a constant of the window size; timm rebuilds it (non-persistent buffer)
            k = _rename_swin(k)
        if k in out:
            raise CheckpointError(f"two checkpoint keys map to {k!r} (second: {key!r})")
        out[k] = value
    return out


def to_official_names(state: Mapping[str, Tensor], backbone: str, old_names: bool = False) -> dict[str, Tensor]:
    """Inverse of :func:`convert_state_dict` for the key names (used by tests and for exporting).

    Swin ``relative_position_index`` buffers are not recreated. ``old_names=True`` writes the release names.
    """
    inv_head = {v: k for k, v in HEAD_RENAMES.items()} if old_names else {}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) > 1 and parts[0] == "bbox_head" and parts[1] in inv_head:
            parts[1] = inv_head[parts[1]]
        k = ".".join(parts)
        if backbone == "pvtv2_b5" and k.startswith("backbone."):
            rest = k[len("backbone."):]
            rest = re.sub(r"(^|\.)mlp\.dwconv\.", r"\1mlp.dwconv.dwconv.", rest)
            m = re.match(r"^patch_embed\.(.*)$", rest)
            if m:
                rest = f"patch_embed1.{m.group(1)}"
            m = re.match(r"^stages\.(\d)\.downsample\.(.*)$", rest)
            if m:
                rest = f"patch_embed{int(m.group(1)) + 1}.{m.group(2)}"
            m = re.match(r"^stages\.(\d)\.blocks\.(.*)$", rest)
            if m:
                rest = f"block{int(m.group(1)) + 1}.{m.group(2)}"
            m = re.match(r"^stages\.(\d)\.norm\.(.*)$", rest)
            if m:
                rest = f"norm{int(m.group(1)) + 1}.{m.group(2)}"
            k = "backbone." + rest
        elif backbone == "swin_l":
            m = re.match(r"^backbone\.layers\.(\d+)\.downsample\.(.*)$", k)
            if m:
                k = f"backbone.layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        out[k] = value
    return out


def looks_official(path: str | Path) -> bool:
    """True when ``path`` is a ``.pth``/``.pt`` file (the official checkpoints are pickled mmcv checkpoints)."""
    p = Path(path)
    return p.is_file() and p.suffix in (".pth", ".pt", ".ckpt", ".bin")
