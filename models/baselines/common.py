"""Helpers shared by the baseline families (DETR, Deformable DETR, MaskFormer, Panoptic FCN).

Small on purpose; each piece is what more than one released code base does the same way:

* :class:`FrozenBatchNorm2d` -- torchvision / DETR / Deformable DETR / detectron2 frozen BN: four buffers (no
  parameters, so parameter counts equal the official ones), ``y = x * scale + shift`` with
  ``scale = w * rsqrt(var + eps)`` in that operation order (not ``(x - mean) / sqrt(var + eps)``, which rounds
  differently), eps 1e-5; ``num_batches_tracked`` in a checkpoint is dropped on load, as upstream.
* :class:`TorchvisionResNet` -- torchvision's ResNet with frozen BN, keys ``conv1``, ``bn1``, ``layer1..4`` (what
  DETR's ``IntermediateLayerGetter`` body holds), returning any subset of C2..C5; DETR's freezing rule (only
  layer2-4 train).
* :func:`read_released_pth` -- (``models.checkpoint``'s, re-exported) a released ``.pth``/``.pt``: ``{"model": sd}``,
  ``{"state_dict": sd}`` or a bare state dict, ``module.`` prefixes removed; DETR-style files that pickle
  ``argparse.Namespace`` load with ``weights_only=True`` (the namespace is allow-listed), anything else is refused.
* :func:`guess_family` / :func:`check_family` -- name the family a state dict belongs to from its keys, so feeding a
  Panoptic SegFormer file to the DETR converter gives "this is a Panoptic SegFormer checkpoint" instead of 500 missing
  keys.
* :func:`check_equal_copies` -- Deformable DETR (and mmdet) store a module repeated N times as N identical key groups.
* :class:`PartialLoad` / :func:`fill_new_keys` -- the explicit "detector-only" load: keys taken from the file, keys
  left at initialisation, both listed (never a silent ``strict=False``).
* :data:`COCO_PANOPTIC_IDS` -- category ids in our contiguous order (80 things, then 53 stuff, each ascending), so
  ``models`` can map released label spaces (DETR's panoptic ids, Deformable DETR's detection ids) without importing
  ``harness``.
* :class:`ConfigDict` -- ``to_dict`` / ``from_dict`` for config dataclasses (what ``models.family.Family`` needs)
  and the named-config constructors of every family's ``CONFIGS``;
  :class:`ConvertedState` -- a converter's state dict carrying its :class:`PartialLoad` (``harness convert`` stores
  it in ``model.json``); :class:`Joiner` / :class:`BackboneBody` -- DETR's ``backbone.0.body.*`` / ``backbone.1``
  layout; :func:`valid_sizes` -- unpadded ``(h, w)`` per image from a padding mask; :func:`check_data_classes` --
  ``build_criterion``'s class-count check.

Using them in another family: ``TorchvisionResNet`` covers torchvision-layout ResNets only (detectron2's MSRA
ResNet, stride in the 1x1 conv, has other names); ``FrozenBatchNorm2d(n, eps)`` fits detectron2's FrozenBN numerics;
a converter returns ``ConvertedState`` only when it leaves keys at initialisation.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from models.checkpoint import CheckpointError, read_released_pth

log = logging.getLogger(__name__)

__all__ = [
    "COCO_PANOPTIC_IDS", "COCO_NUM_THINGS", "FrozenBatchNorm2d", "TorchvisionResNet", "RESNET_CHANNELS",
    "read_released_pth", "guess_family", "check_family", "check_equal_copies", "PartialLoad", "fill_new_keys",
    "valid_sizes", "ceil_div", "ConfigDict", "BackboneBody", "Joiner", "ConvertedState", "check_data_classes",
]

# COCO panoptic category ids in contiguous order: things (ids 1..90) then stuff (92..200), ascending, as
# harness.data.format.CategoryMap orders them (tests check the two agree).
COCO_PANOPTIC_IDS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34,
    35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63,
    64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
    92, 93, 95, 100, 107, 109, 112, 118, 119, 122, 125, 128, 130, 133, 138, 141, 144, 145, 147, 148, 149, 151, 154,
    155, 156, 159, 161, 166, 168, 171, 175, 176, 177, 178, 180, 181, 184, 185, 186, 187, 188, 189, 190, 191, 192,
    193, 194, 195, 196, 197, 198, 199, 200,
)
COCO_NUM_THINGS = 80

# Output channels of C2..C5 per torchvision ResNet.
RESNET_CHANNELS: dict[str, tuple[int, int, int, int]] = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ints (the size of a stride-``b`` ResNet map of an ``a``-pixel side)."""
    return -(-a // b)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine terms, all buffers (DETR ``models/backbone.py``).

    ``forward`` computes ``x * scale + (b - mean * scale)`` with ``scale = w * rsqrt(var + eps)``, the operation order
    of torchvision, DETR, Deformable DETR and detectron2, so float32 results match theirs bit for bit.

    Args:
        num_features: channels.
        eps: added to the variance (1e-5 in DETR and Deformable DETR; detectron2 also 1e-5).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)  # present in torchvision / nn.BatchNorm2d files
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class TorchvisionResNet(nn.Module):
    """torchvision ResNet (stride in the 3x3 conv) with :class:`FrozenBatchNorm2d`, without ``avgpool``/``fc``.

    Children and state-dict keys are torchvision's (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), i.e. DETR's and
    Deformable DETR's ``backbone.0.body.*`` without the prefix. No weights are downloaded (random init).

    Args:
        name: ``resnet18`` / ``resnet34`` / ``resnet50`` / ``resnet101``.
        return_layers: which of ``layer1..layer4`` (C2..C5, strides 4..32) :meth:`forward` returns, in that order.
        train_backbone: False freezes every parameter; True freezes only the stem and ``layer1`` (DETR's rule:
            parameters whose name lacks ``layer2``/``layer3``/``layer4`` get ``requires_grad=False``).
        bn_eps: FrozenBatchNorm2d eps.
    """

    def __init__(self, name: str = "resnet50", return_layers: Iterable[str] = ("layer4",),
                 train_backbone: bool = True, bn_eps: float = 1e-5) -> None:
        super().__init__()
        import torchvision

        if name not in RESNET_CHANNELS:
            raise ValueError(f"unknown ResNet {name!r}; choose one of {', '.join(RESNET_CHANNELS)}")
        net = getattr(torchvision.models, name)(weights=None, norm_layer=lambda c: FrozenBatchNorm2d(c, bn_eps))
        for child in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.add_module(child, getattr(net, child))
        self.return_layers = tuple(return_layers)
        bad = [r for r in self.return_layers if r not in ("layer1", "layer2", "layer3", "layer4")]
        if bad:
            raise ValueError(f"return_layers must be layer1..layer4, got {bad}")
        chans = dict(zip(("layer1", "layer2", "layer3", "layer4"), RESNET_CHANNELS[name]))
        self.num_channels = [chans[r] for r in self.return_layers]
        for pname, p in self.named_parameters():
            if not train_backbone or not any(k in pname for k in ("layer2", "layer3", "layer4")):
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``(B, 3, H, W)`` -> the requested stage outputs (C2 ``(B, c2, ceil(H/4), ceil(W/4))`` ... C5)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        last = self.return_layers[-1] if self.return_layers else "layer4"
        for layer in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, layer)(x)
            if layer in self.return_layers:
                outs.append(x)
            if layer == last:
                break
        return outs


def valid_sizes(pad_mask: Tensor) -> Tensor:
    """``(B, H, W)`` bool padding mask (True on padding, bottom/right) -> ``(B, 2)`` long unpadded ``(h, w)``."""
    return torch.stack([(~pad_mask[:, :, 0]).sum(1), (~pad_mask[:, 0, :]).sum(1)], dim=1).long()


def check_data_classes(cfg: Any, num_things: int, num_stuff: int) -> None:
    """``build_criterion``'s check: the data's thing / stuff class counts must be the model config's."""
    if (num_things, num_stuff) != (cfg.num_things, cfg.num_stuff):
        raise ValueError(f"{cfg.name} has {cfg.num_things} + {cfg.num_stuff} classes, the data "
                         f"{num_things} + {num_stuff}")


# Key patterns that identify a family's released (or our) state dict; the first match wins.
# (family, where it belongs: models and --from, key prefixes)
_FAMILY_SIGNS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Panoptic SegFormer", "panoptic_segformer_* models, --from official-psf",
     ("bbox_head.",)),  # mmdet head names (transformer, cls_branches, things_mask_head / mask_head ...)
    ("DETR panoptic", "detr_*_panoptic models, --from detr", ("detr.transformer.", "detr.class_embed.")),
    ("Deformable DETR", "deformable_detr_* models, --from deformable-detr",
     ("transformer.level_embed", "transformer.reference_points.", "transformer.enc_output.")),
    ("MaskFormer", "maskformer_* models, --from maskformer",
     ("sem_seg_head.predictor.", "sem_seg_head.pixel_decoder.")),
    ("Panoptic FCN", "panoptic_fcn_* models, --from panoptic-fcn",
     ("position_head.", "kernel_head.", "feature_encoder.")),
    ("DETR detection (box-only)", "no panoptic model: DETR panoptic needs the *-panoptic-*.pth files",
     ("transformer.decoder.norm.",)),
)


def guess_family(keys: Iterable[str]) -> tuple[str, str] | None:
    """``(family name, where it belongs)`` for a state dict's keys (see ``_FAMILY_SIGNS``), or None."""
    keys = list(keys)
    for family, where, signs in _FAMILY_SIGNS:
        if any(k.startswith(s) for k in keys for s in signs):
            return family, where
    return None


def check_family(state: Mapping[str, Tensor], expected_prefixes: tuple[str, ...], expected: str,
                 source: str) -> None:
    """Raise :class:`CheckpointError` when no key starts with ``expected_prefixes``, naming what the file looks like.

    Args:
        state: the released state dict.
        expected_prefixes: key prefixes every checkpoint of the expected family has.
        expected: the family's name for the message.
        source: the file, for the message.
    """
    if any(k.startswith(p) for k in state for p in expected_prefixes):
        return
    found = guess_family(state)
    what = f"it looks like a {found[0]} checkpoint ({found[1]})" if found else "its keys match no known family"
    sample = ", ".join(sorted(state)[:3])
    raise CheckpointError(f"{source} is not a {expected} checkpoint: {what} (first keys: {sample})")


def check_equal_copies(state: Mapping[str, Tensor], prefix: str, count: int, source: str,
                       hint: str = "") -> None:
    """Check that ``prefix.0.*`` ... ``prefix.{count-1}.*`` hold identical tensors (a module repeated ``count`` times).

    Raises :class:`CheckpointError` naming the first differing key (e.g. a box-refinement checkpoint given to a
    model without refinement).
    """
    base = {k[len(f"{prefix}.0."):]: v for k, v in state.items() if k.startswith(f"{prefix}.0.")}
    for i in range(1, count):
        for rest, v in base.items():
            other = state.get(f"{prefix}.{i}.{rest}")
            if other is None:
                continue  # reported as missing by the strict load
            if other.shape != v.shape or not torch.equal(other, v):
                raise CheckpointError(f"{source}: {prefix}.{i}.{rest} differs from {prefix}.0.{rest}, but this model "
                                      f"shares one {prefix} module across layers{hint}")


@dataclass
class PartialLoad:
    """Which keys of a partial ("detector-only") load came from the file and which stayed at initialisation.

    Attributes:
        source: the file.
        from_file: model keys filled from the file.
        new: model keys left at their initial values (e.g. the mask head of a detection checkpoint).
        reasons: key -> why it is new (absent from the file, or its shape differs).
    """

    source: str
    from_file: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: counts and the new keys grouped by module prefix."""
        groups: dict[str, int] = {}
        for k in self.new:
            head = ".".join(k.split(".")[:2])
            groups[head] = groups.get(head, 0) + 1
        listed = ", ".join(f"{g} ({n})" for g, n in sorted(groups.items()))
        return (f"{self.source}: {len(self.from_file)} tensors from the file, {len(self.new)} left at initialisation"
                + (f": {listed}" if listed else ""))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record (stored in ``model.json`` ``meta`` by ``harness convert``)."""
        return {"source": self.source, "from_file": list(self.from_file), "new": list(self.new),
                "reasons": dict(self.reasons)}


def fill_new_keys(model: nn.Module, state: Mapping[str, Tensor], new_prefixes: tuple[str, ...],
                  source: str) -> tuple[dict[str, Tensor], PartialLoad]:
    """Complete a converted state dict with the model's initial values for keys under ``new_prefixes`` only.

    Every model key under one of ``new_prefixes`` that the file lacks (or holds with another shape) takes the
    model's current (initial) value and is listed in the returned :class:`PartialLoad`; every other key must come
    from the file, and the caller's strict load reports anything missing or unexpected. Nothing is silent: the
    report names every new key and is logged at WARNING level.

    Returns:
        ``(complete state dict, report)``.
    """
    own = model.state_dict()
    out = dict(state)
    report = PartialLoad(source=source)
    for key, value in own.items():
        if not key.startswith(new_prefixes):
            if key in state:
                report.from_file.append(key)
            continue
        if key not in state:
            report.reasons[key] = "not in the file"
        elif tuple(state[key].shape) != tuple(value.shape):
            report.reasons[key] = f"shape {list(state[key].shape)} in the file, {list(value.shape)} in the model"
        else:
            report.from_file.append(key)
            continue
        out[key] = value.detach().clone()
        report.new.append(key)
    if report.new:
        log.warning("partial load: %s", report.summary())
    return out, report


class ConfigDict:
    """``to_dict`` / ``from_dict`` for the baseline config dataclasses (tuples come back from JSON lists), and named
    configs (:meth:`named`, :meth:`factory`)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        kwargs = {k: (tuple(v) if isinstance(v, list) and "tuple" in str(fields[k].type) else v)
                  for k, v in data.items()}
        return cls(**kwargs)

    @classmethod
    def named(cls, name: str, defaults: Mapping[str, Any], num_things: int, num_stuff: int,
              overrides: Mapping[str, Any]) -> Any:
        """The config ``name``: the class defaults, then ``defaults``, then the caller's ``overrides``."""
        return cls(**{"name": name, "num_things": num_things, "num_stuff": num_stuff, **defaults, **overrides})

    @classmethod
    def factory(cls, name: str, defaults: Mapping[str, Any]) -> Callable[..., Any]:
        """A ``CONFIGS`` entry: ``make(num_things=80, num_stuff=53, **overrides)`` -> :meth:`named`."""
        def make(num_things: int = 80, num_stuff: int = 53, **overrides: Any) -> Any:
            return cls.named(name, defaults, num_things, num_stuff, overrides)

        make.__doc__ = f"Config ``{name}``."
        return make


class BackboneBody(nn.Module):
    """Holds a backbone as ``body`` (DETR's ``BackboneBase``), so the keys read ``backbone.0.body.*``."""

    def __init__(self, body: TorchvisionResNet) -> None:
        super().__init__()
        self.body = body
        self.num_channels = body.num_channels

    def forward(self, x: Tensor) -> list[Tensor]:
        """The body's stage outputs."""
        return self.body(x)


class Joiner(nn.Sequential):
    """DETR / Deformable DETR ``Joiner``: ``[0]`` the backbone (``.body``), ``[1]`` the position encoding."""

    def __init__(self, body: TorchvisionResNet, position: nn.Module) -> None:
        super().__init__(BackboneBody(body), position)


class ConvertedState(dict):  # type: ignore[type-arg]
    """A converted state dict (``dict[str, Tensor]``) that may carry the :class:`PartialLoad` report of its conversion.

    Converters return a plain mapping (``models.family.Converter``); ``harness convert`` stores ``partial_load``
    (when not None) in the output's ``model.json`` ``meta`` so the record of which tensors are new travels with the
    weights.
    """

    partial_load: PartialLoad | None = None
