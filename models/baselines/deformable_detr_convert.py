"""Released Deformable DETR detection checkpoints -> D-DETR-MS (``models/baselines/deformable_detr.py``).

Deformable DETR's layer names are renamed to ``models.transformer``'s (whole path segments); the layout is checked
(two-stage refused, box refinement must match the config, the repeated ``class_embed`` / ``bbox_embed`` copies of a
model without refinement must be identical, the decoder's ``bbox_embed`` aliases of a refinement model must equal
their twins and are dropped); then the load is an explicit **detector-only** one: the panoptic head (and
``class_embed`` when the class counts differ) takes the model's seeded initialisation and every such key is listed
in a :class:`~models.baselines.common.PartialLoad`.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from models.baselines.common import check_equal_copies, check_family
from models.checkpoint import CheckpointError

__all__ = ["HEAD_PREFIXES", "rename_transformer_key", "convert_state_dict", "to_official_names"]

# The family's converter, which also builds the model for the new keys, is `deformable_detr.convert_deformable_detr`
# (this module never imports the model module: no import circle). `cfg` below is a `DeformableDETRConfig`.

HEAD_PREFIXES = ("bbox_attention.", "mask_head.")  # the panoptic head: never in a released file

# Deformable DETR layer names -> models.transformer (mmcv-style) names, per transformer part.
_ENCODER_RENAMES = {"self_attn": "attentions.0", "norm1": "norms.0", "norm2": "norms.1",
                    "linear1": "ffns.0.layers.0.0", "linear2": "ffns.0.layers.1"}
_DECODER_RENAMES = {"self_attn": "attentions.0.attn", "cross_attn": "attentions.1", "norm2": "norms.0",
                    "norm1": "norms.1", "norm3": "norms.2", "linear1": "ffns.0.layers.0.0",
                    "linear2": "ffns.0.layers.1"}


def rename_transformer_key(key: str) -> str:
    """One Deformable DETR key -> our name (non-transformer keys unchanged). Whole path segments only."""
    if key == "transformer.level_embed":
        return "transformer.level_embeds"
    m = re.match(r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.([a-z_0-9]+)\.(.*)$", key)
    if m is None:
        return key
    part, idx, module, rest = m.groups()
    table = _ENCODER_RENAMES if part == "encoder" else _DECODER_RENAMES
    if module not in table:
        return key  # left for the strict load to report
    return f"transformer.{part}.layers.{idx}.{table[module]}.{rest}"


def convert_state_dict(state: dict[str, Tensor], cfg: Any, source: str) -> dict[str, Tensor]:
    """Deformable DETR detection state dict -> our names (detector keys only; checks the layout first).

    * two-stage checkpoints (``transformer.enc_output*``) are refused;
    * box refinement must match ``cfg.with_box_refine`` (decided by the ``transformer.decoder.bbox_embed.*`` aliases);
    * without refinement the repeated ``class_embed`` / ``bbox_embed`` copies must be identical (they are one module);
    * with refinement the decoder's ``bbox_embed`` aliases must equal ``bbox_embed`` and are dropped.
    """
    check_family(state, ("transformer.level_embed", "transformer.encoder."), "Deformable DETR", source)
    if any(k.startswith(("transformer.enc_output", "transformer.pos_trans")) for k in state):
        raise CheckpointError(f"{source} is a two-stage Deformable DETR checkpoint, which is not supported "
                              "(models: deformable_detr_r50_ms, deformable_detr_r50_ms_refine)")
    refine = any(k.startswith("transformer.decoder.bbox_embed.") for k in state)
    if refine != cfg.with_box_refine:
        want = "deformable_detr_r50_ms_refine" if refine else "deformable_detr_r50_ms"
        raise CheckpointError(f"{source} is a Deformable DETR checkpoint {'with' if refine else 'without'} box "
                              f"refinement; model {cfg.name!r} is {'with' if cfg.with_box_refine else 'without'} "
                              f"(use {want})")
    out: dict[str, Tensor] = {}
    if refine:
        for k, v in state.items():
            if k.startswith("transformer.decoder.bbox_embed."):
                twin = state.get(k[len("transformer.decoder."):])
                if twin is None or not torch.equal(twin, v):
                    raise CheckpointError(f"{source}: {k} differs from its alias {k[len('transformer.decoder.'):]}")
    else:
        hint = " (is it a box-refinement checkpoint?)"
        check_equal_copies(state, "class_embed", cfg.dec_layers, source, hint)
        check_equal_copies(state, "bbox_embed", cfg.dec_layers, source, hint)
    for k, v in state.items():
        if k.startswith("transformer.decoder.bbox_embed."):
            continue
        new = rename_transformer_key(k)
        if new in out:
            raise CheckpointError(f"{source}: two keys map to {new!r}")
        out[new] = v
    return out


def to_official_names(state: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    """Inverse of :func:`convert_state_dict` for the detector keys (head keys dropped): our names -> Deformable
    DETR's, with the decoder's ``bbox_embed`` aliases re-created for box refinement (export and tests)."""
    inv_enc = {v: k for k, v in _ENCODER_RENAMES.items()}
    inv_dec = {v: k for k, v in _DECODER_RENAMES.items()}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(HEAD_PREFIXES):
            continue
        k = "transformer.level_embed" if key == "transformer.level_embeds" else key
        m = re.match(r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.(.*)$", k)
        if m:
            part, idx, rest = m.groups()
            table = inv_enc if part == "encoder" else inv_dec
            for ours in sorted(table, key=len, reverse=True):
                if rest.startswith(ours + "."):
                    k = f"transformer.{part}.layers.{idx}.{table[ours]}.{rest[len(ours) + 1:]}"
                    break
        out[k] = value
    if cfg.with_box_refine:
        for k, v in list(out.items()):
            if k.startswith("bbox_embed."):
                out["transformer.decoder." + k] = v
    return out
