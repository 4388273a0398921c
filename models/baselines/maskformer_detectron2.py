"""detectron2 building blocks shared by the two detectron2-based baselines (MaskFormer, Panoptic FCN).

Re-implemented in plain PyTorch with detectron2's module and parameter names, so released checkpoints load with an
identity key map:

* :class:`FrozenBatchNorm2d`: weight, bias, running_mean, running_var are all **buffers** (eps 1e-5), as
  ``detectron2.layers.FrozenBatchNorm2d``; they are not parameters, so parameter counts equal the official ones.
* :class:`Conv2d`: conv -> optional ``norm`` -> optional activation (``detectron2.layers.Conv2d``).
* :class:`ResNet`: ``stem.conv1`` + ``res2..res5`` bottleneck stages (``detectron2.modeling.backbone.resnet``).
  ``stride_in_1x1`` places the stage stride in the first 1x1 conv (MSRA/Caffe2 weights, Panoptic FCN) or in the
  3x3 conv (torchvision weights, MaskFormer).
* :func:`read_detectron2_checkpoint`: a released ``.pkl`` (pickled numpy arrays, read with an allow-list
  unpickler) or ``.pth`` (``torch.load(weights_only=True)``, never a full unpickle) -> ``{name: Tensor}``
  (``"model"`` entry if present, ``module.`` stripped), as ``DetectionCheckpointer._load_file``.
* :func:`valid_sizes` / :func:`image_size_in_pixels`: each image's size inside a padded batch, for the exact crop
  upstream makes before resizing masks to the original size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.checkpoint import CheckpointError, open_released
from models.safe_load import pickle_load

log = logging.getLogger(__name__)

__all__ = [
    "Bottleneck",
    "Conv2d",
    "FrozenBatchNorm2d",
    "ResNet",
    "ceil_div_hw",
    "fill_frozen_bn_stats",
    "get_norm",
    "image_size_in_pixels",
    "read_detectron2_checkpoint",
    "valid_sizes",
]


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine terms, all stored as buffers (detectron2's layer)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``; the same two code paths as detectron2 (bitwise equal results)."""
        if x.requires_grad:
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            bias = self.bias - self.running_mean * scale
            return x * scale.reshape(1, -1, 1, 1).to(x.dtype) + bias.reshape(1, -1, 1, 1).to(x.dtype)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                            eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def get_norm(norm: str, channels: int, gn_groups: int = 32) -> nn.Module | None:
    """detectron2 ``get_norm``: ``""`` -> None, ``"FrozenBN"``, ``"GN"`` (``gn_groups`` groups), ``"BN"``."""
    if norm == "":
        return None
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if norm == "GN":
        return nn.GroupNorm(min(gn_groups, channels), channels)
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"unknown norm {norm!r}; expected '', 'FrozenBN', 'GN' or 'BN'")


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` followed by an optional ``norm`` module and activation (detectron2 ``layers.Conv2d``)."""

    def __init__(self, *args: Any, norm: nn.Module | None = None,
                 activation: Callable[[Tensor], Tensor] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def c2_msra_fill(module: nn.Conv2d) -> None:
    """Caffe2 MSRA init (kaiming normal, fan_out, relu; zero bias)."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def c2_xavier_fill(module: nn.Module) -> None:
    """Caffe2 Xavier init (kaiming uniform, a=1; zero bias)."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


class Bottleneck(nn.Module):
    """detectron2 ``BottleneckBlock``: 1x1 -> 3x3 -> 1x1 (+ projection ``shortcut`` when channels change)."""

    def __init__(self, in_channels: int, out_channels: int, bottleneck_channels: int, stride: int, norm: str,
                 stride_in_1x1: bool, gn_groups: int = 32) -> None:
        super().__init__()
        self.shortcut = None
        if in_channels != out_channels:
            self.shortcut = Conv2d(in_channels, out_channels, 1, stride=stride, bias=False,
                                   norm=get_norm(norm, out_channels, gn_groups))
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = Conv2d(in_channels, bottleneck_channels, 1, stride=s1, bias=False,
                            norm=get_norm(norm, bottleneck_channels, gn_groups))
        self.conv2 = Conv2d(bottleneck_channels, bottleneck_channels, 3, stride=s3, padding=1, bias=False,
                            norm=get_norm(norm, bottleneck_channels, gn_groups))
        self.conv3 = Conv2d(bottleneck_channels, out_channels, 1, bias=False,
                            norm=get_norm(norm, out_channels, gn_groups))
        for layer in (self.conv1, self.conv2, self.conv3, self.shortcut):
            if layer is not None:
                c2_msra_fill(layer)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        out = out + (self.shortcut(x) if self.shortcut is not None else x)
        return F.relu_(out)


class Stem(nn.Module):
    """detectron2 ``BasicStem``: 7x7/2 conv + norm + ReLU, 3x3/2 max pool."""

    def __init__(self, out_channels: int, norm: str, gn_groups: int = 32) -> None:
        super().__init__()
        self.conv1 = Conv2d(3, out_channels, 7, stride=2, padding=3, bias=False,
                            norm=get_norm(norm, out_channels, gn_groups))
        c2_msra_fill(self.conv1)

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(F.relu_(self.conv1(x)), kernel_size=3, stride=2, padding=1)


class ResNet(nn.Module):
    """detectron2 ResNet with bottleneck blocks returning ``res2..res5`` (strides 4, 8, 16, 32).

    Args:
        depths: blocks per stage (R50: ``(3, 4, 6, 3)``).
        stem_channels: stem output channels (64).
        res2_channels: output channels of ``res2`` (256); stage ``i`` has ``res2_channels * 2**i`` and a bottleneck
            of a quarter of that.
        norm: ``"FrozenBN"`` (released models), ``"GN"`` or ``"BN"``.
        stride_in_1x1: stride in the first 1x1 conv (MSRA) instead of the 3x3 (torchvision).
        freeze_at: 0 = nothing frozen, 1 = stem, k = stem + ``res2..res{k}`` (``requires_grad=False``).
    """

    def __init__(self, depths: tuple[int, ...] = (3, 4, 6, 3), stem_channels: int = 64, res2_channels: int = 256,
                 norm: str = "FrozenBN", stride_in_1x1: bool = False, freeze_at: int = 0, gn_groups: int = 32) -> None:
        super().__init__()
        self.stem = Stem(stem_channels, norm, gn_groups)
        in_ch = stem_channels
        self.out_channels: list[int] = []
        for i, depth in enumerate(depths):
            out_ch = res2_channels * 2**i
            stride = 1 if i == 0 else 2
            blocks = [Bottleneck(in_ch if j == 0 else out_ch, out_ch, out_ch // 4, stride if j == 0 else 1, norm,
                                 stride_in_1x1, gn_groups) for j in range(depth)]
            self.add_module(f"res{i + 2}", nn.Sequential(*blocks))
            self.out_channels.append(out_ch)
            in_ch = out_ch
        modules: list[nn.Module] = [self.stem] + [getattr(self, f"res{i + 2}") for i in range(len(depths))]
        for m in modules[:freeze_at]:
            for p in m.parameters():
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``(B, 3, H, W) -> [res2 (B, C2, H/4, W/4), res3, res4, res5 (H/32)]`` (ceil division per stride-2 op)."""
        x = self.stem(x)
        outs = []
        for i in range(len(self.out_channels)):
            x = getattr(self, f"res{i + 2}")(x)
            outs.append(x)
        return outs


# ------------------------------------------------------------------------------------------------ image sizes
def valid_sizes(images: Tensor, pad_mask: Tensor | None) -> list[tuple[int, int]]:
    """Per-image ``(h, w)`` of the non-padded region (the whole input when ``pad_mask`` is None)."""
    if pad_mask is None:
        return [(int(images.shape[-2]), int(images.shape[-1]))] * int(images.shape[0])
    valid = ~pad_mask.bool()
    return [(int(v.any(1).sum()), int(v.any(0).sum())) for v in valid]


def ceil_div_hw(hw: tuple[int, int], s: int) -> tuple[int, int]:
    """``(ceil(h / s), ceil(w / s))``: the stride-``s`` cells covering an ``h x w`` image."""
    return -(-int(hw[0]) // s), -(-int(hw[1]) // s)


def image_size_in_pixels(outputs: dict[str, Any], index: int, valid_hw: tuple[int, int] | None,
                         stride: int) -> tuple[int, int]:
    """The resized image's size in input pixels for cropping before the final resize.

    The size recorded from the forward's padding mask (``outputs["sizes_from_mask"]``) is exact and always wins;
    without a mask, a caller's ``valid_hw`` (mask pixels) gives ``valid_hw * stride`` (within the input), unless it
    is just the input size / ``stride`` rounded up.
    """
    recorded = tuple(int(v) for v in outputs["image_sizes"][index])
    if valid_hw is None or outputs.get("sizes_from_mask") or tuple(int(v) for v in valid_hw) == ceil_div_hw(
            recorded, stride):
        return recorded  # type: ignore[return-value]
    h_in, w_in = outputs["input_size"]
    return min(int(valid_hw[0]) * stride, h_in), min(int(valid_hw[1]) * stride, w_in)


# ----------------------------------------------------------------------------------------------- checkpoints
def _to_tensor(key: str, value: Any, path: Path) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (int, float, np.number)):
        return torch.as_tensor(value)
    raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not an array")


def read_detectron2_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Read a released detectron2 model file: ``.pkl`` (pickled numpy, e.g. MaskFormer) or ``.pth`` (torch).

    Takes the ``"model"`` entry when present (detectron2 model-zoo / checkpointer layout), else the whole dict;
    strips a ``module.`` prefix; numpy arrays become tensors.

    Raises:
        CheckpointError: missing or unreadable file, or not a dict of arrays.
    """
    p = Path(path)
    # Never a full unpickle (a checkpoint must not run code): models.safe_load allows data objects only.
    obj = open_released(p, pickle_load if p.suffix == ".pkl" else None)
    state = obj.get("model", obj.get("state_dict", obj))  # "state_dict": an mmcv file (named as such later)
    if not isinstance(state, dict):
        raise CheckpointError(f"{p}: 'model' is a {type(state).__name__}, not a dict of arrays")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{p}: state-dict key {key!r} is not a string")
        if key in ("__author__", "matching_heuristics"):
            continue
        out[key.removeprefix("module.")] = _to_tensor(key, value, p)
    return out


def fill_frozen_bn_stats(state: dict[str, Tensor], prefix: str, source: str) -> None:
    """detectron2's FrozenBN rule for old files without running stats: mean 0, var 1 (in place, with a warning)."""
    filled = 0
    for key in list(state):
        if key.startswith(prefix) and key.endswith(".norm.weight"):
            base = key[: -len("weight")]
            if base + "running_mean" not in state and base + "running_var" not in state and base + "bias" in state:
                state[base + "running_mean"] = torch.zeros_like(state[key])
                state[base + "running_var"] = torch.ones_like(state[key])
                filled += 1
    if filled:
        log.warning("%s: %d FrozenBN layers without running stats; using mean 0 / var 1 as detectron2 does",
                    source, filled)
