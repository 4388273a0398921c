"""FLOP counting for every model family: PyTorch's FLOP counter plus formulas for the ops it cannot see, and an
emulation of the mmcv counter the paper's Table 1 used.

Two conventions (docs/model.md, "Cost profile"):

* **ours** (:func:`count_flops`): ``torch.utils.flop_counter.FlopCounterMode`` on one forward, 2 FLOPs per
  multiply-add, every matrix product counted (convolutions, linear layers, attention ``q @ k^T`` and ``attn @ v``,
  ``scaled_dot_product_attention``), plus registered formulas for the ops the counter gives zero:

  - multi-scale deformable attention ``torch.ops.psf_ops.ms_deform_attn_forward`` (compiled CPU/CUDA kernels):
    per query, head, level, point and channel a bilinear sample (4 multiply-adds) and its attention weight
    (1 multiply-add): ``2 * 5 * N * Lq * M * L * P * D``;
  - its PyTorch fallback, ``grid_sampler_2d`` (bilinear: 4 multiply-adds per output value; nearest: 0;
    bicubic: 16); the fallback's attention weighting is an elementwise multiply and sum, which the counter does
    not count, so the fallback path counts 4/5 of the core (measured: 0.2 % of R50's total);
  - bilinear / bicubic resizing (``upsample_bilinear2d``, ``_upsample_bilinear2d_aa``, ``upsample_bicubic2d``):
    4 / 16 multiply-adds per output value (the mask decoder's per-level attention-map resizes);
  - ``scaled_dot_product_attention`` on the CPU (``_scaled_dot_product_flash_attention_for_cpu``; the counter
    knows only the CUDA kernels), so CPU and GPU counts agree;
  - the fused inference kernels of ``nn.MultiheadAttention`` (``_native_multi_head_attention``, taken in eval mode
    when query, key and value are one tensor) and ``nn.TransformerEncoderLayer``
    (``_transformer_encoder_layer_fwd``), which the counter would otherwise count as zero.

  Elementwise work (normalisation, activations, softmax, residual adds) is not counted, as in PyTorch's counter
  and fvcore.
* **mmcv** (:func:`count_mmcv_flops`): the rules of ``mmcv.cnn.get_model_complexity_info`` (mmcv 1.x, used by the
  official ``tools/ana_tools/get_flops.py``), emulated with forward hooks: one FLOP per multiply-add, counted only
  in modules whose exact type is ``nn.Conv{1,2,3}d`` (multiply-adds + bias), ``nn.Linear`` (input elements x
  output features, no bias), ``nn.ReLU``/``PReLU``/``ELU``/``LeakyReLU``/``ReLU6`` (output elements), pooling
  (input elements), ``BatchNorm``/``GroupNorm``/``InstanceNorm``/``LayerNorm`` (input elements, x2 when affine),
  ``nn.Upsample`` (output elements) and ``nn.ConvTranspose2d``. Functional calls (``q @ k^T``, ``F.interpolate``,
  softmax, GELU), ``nn.MultiheadAttention``'s projections (its ``out_proj`` is not exactly ``nn.Linear``) and
  the compiled deformable-attention op count zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

__all__ = [
    "FlopReport",
    "msda_flop",
    "grid_sampler_flop",
    "upsample_flop",
    "native_mha_flop",
    "sdpa_cpu_flop",
    "transformer_layer_flop",
    "flop_formulas",
    "count_flops",
    "count_mmcv_flops",
    "count_parameters",
    "MMCV_MODULE_RULES",
]

# Multiply-adds per output value of each interpolation mode (grid_sampler: 0 bilinear, 1 nearest, 2 bicubic).
_MACS_PER_SAMPLE = {0: 4, 1: 0, 2: 16}


def _prod(shape: Any) -> int:
    return int(math.prod(int(s) for s in shape))


def msda_flop(value: Any, spatial_shapes: Any, level_start_index: Any, sampling_locations: Any,
              attention_weights: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of ``ms_deform_attn_forward``: ``2 * 5 * N * Lq * M * L * P * D``.

    Args are shapes: value ``(N, S, M, D)``, sampling_locations ``(N, Lq, M, L, P, 2)``. Per sample and channel a
    bilinear interpolation (4 multiply-adds) and the attention-weighted accumulation (1 multiply-add).
    """
    n, _, m, d = (int(s) for s in value)
    _, lq, _, levels, points, _ = (int(s) for s in sampling_locations)
    return 2 * 5 * n * lq * m * levels * points * d


def grid_sampler_flop(input: Any, grid: Any, interpolation_mode: int = 0, *args: Any, out_shape: Any = None,
                      **kwargs: Any) -> int:
    """FLOPs of ``grid_sampler_2d``: multiply-adds per output value (bilinear 4, nearest 0, bicubic 16) x 2.

    ``input (N, C, H, W)``, ``grid (N, Ho, Wo, 2)``: output ``(N, C, Ho, Wo)``.
    """
    n, c = int(input[0]), int(input[1])
    return 2 * _MACS_PER_SAMPLE.get(int(interpolation_mode), 4) * n * c * _prod(grid[1:-1])


def upsample_flop(macs_per_value: int) -> Callable[..., int]:
    """Formula for a resize op: ``2 * macs_per_value`` per output value."""

    def formula(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return 2 * macs_per_value * _prod(out_shape) if out_shape is not None else 0

    return formula


def native_mha_flop(query: Any, key: Any, value: Any, embed_dim: int, num_head: int, *args: Any,
                    out_shape: Any = None, **kwargs: Any) -> int:
    """``_native_multi_head_attention`` (``nn.MultiheadAttention``'s fused inference path): q/k/v and output
    projections plus ``q @ k^T`` and ``attn @ v``, 2 FLOPs per multiply-add. Shapes ``(B, L, E)`` / ``(B, S, E)``."""
    b, lq, e = (int(s) for s in query)
    s_len = int(key[1])
    proj = b * lq * e * e + 2 * b * s_len * e * e + b * lq * e * e
    return 2 * (proj + 2 * b * lq * s_len * e)


def transformer_layer_flop(src: Any, embed_dim: int, num_heads: int, qkv_weight: Any, qkv_bias: Any,
                           proj_weight: Any, proj_bias: Any, use_gelu: bool, norm_first: bool, eps: float,
                           norm_weight_1: Any, norm_bias_1: Any, norm_weight_2: Any, norm_bias_2: Any,
                           ffn_weight_1: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """``_transformer_encoder_layer_fwd`` (``nn.TransformerEncoderLayer``'s fused path): self-attention + FFN."""
    b, length, e = (int(s) for s in src)
    hidden = int(ffn_weight_1[0])
    return native_mha_flop(src, src, src, embed_dim, num_heads) + 2 * 2 * b * length * e * hidden


def sdpa_cpu_flop(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """``_scaled_dot_product_flash_attention_for_cpu``: ``q @ k^T`` and ``attn @ v`` (PyTorch's counter has the
    CUDA kernels only, so ``scaled_dot_product_attention`` on the CPU would count zero)."""
    from torch.utils.flop_counter import sdpa_flop_count

    return int(sdpa_flop_count(query, key, value))


def flop_formulas() -> dict[Any, Callable[..., int]]:
    """``custom_mapping`` for ``FlopCounterMode``: the ops it misses (see the module docstring).

    The deformable-attention op is included only when the compiled library is loaded (``models.ops``).
    """
    aten = torch.ops.aten
    formulas: dict[Any, Callable[..., int]] = {
        aten.grid_sampler_2d: grid_sampler_flop,
        aten.cudnn_grid_sampler: lambda input, grid, out_shape=None, **kw: grid_sampler_flop(input, grid, 0),
        aten.upsample_bilinear2d: upsample_flop(4),
        aten._upsample_bilinear2d_aa: upsample_flop(4),
        aten.upsample_bicubic2d: upsample_flop(16),
        aten._upsample_bicubic2d_aa: upsample_flop(16),
        aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu_flop,
        aten._native_multi_head_attention: native_mha_flop,
        aten._transformer_encoder_layer_fwd: transformer_layer_flop,
    }
    from models.ops import _ext

    _ext.status()  # loads the compiled library if it is built
    if hasattr(torch.ops, "psf_ops") and hasattr(torch.ops.psf_ops, "ms_deform_attn_forward"):
        formulas[torch.ops.psf_ops.ms_deform_attn_forward] = msda_flop
    return formulas


@dataclass
class FlopReport:
    """FLOPs of one forward.

    Attributes:
        total: all counted FLOPs.
        by_op: op name -> FLOPs.
        by_module: top-level submodule (``backbone``, ``neck``, ``bbox_head.transformer`` ...) -> FLOPs.
        convention: ``"torch"`` (2 per multiply-add) or ``"mmcv"`` (1 per multiply-add, module rules).
    """

    total: int
    by_op: dict[str, int] = field(default_factory=dict)
    by_module: dict[str, int] = field(default_factory=dict)
    convention: str = "torch"


def count_flops(model: nn.Module, forward: Callable[[], Any], depth: int = 3) -> FlopReport:
    """Count FLOPs of ``forward()`` (a closure calling ``model``) with PyTorch's counter + our formulas.

    Args:
        model: the model (for module names in ``by_module``).
        forward: runs one forward pass (``lambda: model(x)``); run here under ``torch.no_grad``.
        depth: module-name depth kept in ``by_module`` (1 = ``backbone``, 2 = ``bbox_head.transformer`` ...).

    ``by_module`` attributes every op to the modules on the call stack, by the outermost one: a head called from
    inside the decoder (``reg_branches`` refining boxes) counts for the decoder, so each level adds up to the total
    (less what the root module computes itself).
    """
    from torch.utils.flop_counter import FlopCounterMode

    names = {id(m): name for name, m in model.named_modules() if name}
    stack: list[str] = []
    by_module: dict[str, int] = {}

    class Counter(FlopCounterMode):
        def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
            if func_packet in self.flop_registry:
                n = int(self.flop_registry[func_packet](*args, **kwargs, out_val=out))
                for par in set(self.mod_tracker.parents):
                    self.flop_counts[par][func_packet] += n
                for k in range(1, depth + 1):
                    deep = next((s for s in stack if s.count(".") + 1 >= k), None)
                    if deep is not None:
                        key = ".".join(deep.split(".")[:k])
                        by_module[key] = by_module.get(key, 0) + n
            return out

    def pre(module: nn.Module, args: Any) -> None:
        name = names.get(id(module))
        if name is not None:
            stack.append(name)

    def post(module: nn.Module, args: Any, output: Any) -> None:
        name = names.get(id(module))
        if name is not None and stack and stack[-1] == name:
            stack.pop()

    counter = Counter(display=False, custom_mapping=flop_formulas())
    # The counter's module tracker hooks the backward of inputs that require grad; views of parameters taken under
    # no_grad require grad without a grad_fn and break it, so parameters stop requiring grad while counting.
    flags = [(p, p.requires_grad) for p in model.parameters()]
    hooks = [nn.modules.module.register_module_forward_pre_hook(pre),
             nn.modules.module.register_module_forward_hook(post, always_call=True)]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with counter, torch.no_grad():
            forward()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    by_op: dict[str, int] = {}
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        by_op[str(op)] = by_op.get(str(op), 0) + int(n)
    return FlopReport(total=int(counter.get_total_flops()), by_op=by_op, by_module=dict(sorted(by_module.items())),
                      convention="torch")


# ----------------------------------------------------------------------------- mmcv emulation


def _mmcv_conv(m: nn.Module, inp: tuple, out: torch.Tensor) -> int:
    per_position = _prod(m.kernel_size) * m.in_channels * (m.out_channels // m.groups)
    active = int(out.shape[0]) * _prod(out.shape[2:])
    return per_position * active + (m.out_channels * active if m.bias is not None else 0)


def _mmcv_deconv(m: nn.Module, inp: tuple, out: torch.Tensor) -> int:
    x = inp[0]
    per_position = _prod(m.kernel_size) * m.in_channels * (m.out_channels // m.groups)
    flops = per_position * int(x.shape[0]) * _prod(x.shape[2:])
    if m.bias is not None:  # mmcv multiplies by output_height twice (a known slip), kept
        flops += m.out_channels * int(x.shape[0]) * int(out.shape[2]) * int(out.shape[2])
    return flops


def _mmcv_linear(m: nn.Module, inp: tuple, out: torch.Tensor) -> int:
    return _prod(inp[0].shape) * int(out.shape[-1])


def _mmcv_out_numel(m: nn.Module, inp: tuple, out: torch.Tensor) -> int:
    return int(out.numel())


def _mmcv_in_numel(m: nn.Module, inp: tuple, out: torch.Tensor) -> int:
    return int(inp[0].numel())


def _mmcv_norm(m: nn.Module, inp: tuple, out: torch.Tensor) -> int:
    affine = getattr(m, "affine", False) or getattr(m, "elementwise_affine", False)
    return int(inp[0].numel()) * (2 if affine else 1)


# Exact module type -> rule, as mmcv's `get_modules_mapping` (mmcv's own Conv2d/Linear/MaxPool wrappers are
# subclasses it lists separately; ours are plain torch modules).
MMCV_MODULE_RULES: dict[type, Callable[[nn.Module, tuple, Any], int]] = {
    nn.Conv1d: _mmcv_conv, nn.Conv2d: _mmcv_conv, nn.Conv3d: _mmcv_conv,
    nn.ReLU: _mmcv_out_numel, nn.PReLU: _mmcv_out_numel, nn.ELU: _mmcv_out_numel,
    nn.LeakyReLU: _mmcv_out_numel, nn.ReLU6: _mmcv_out_numel,
    nn.MaxPool1d: _mmcv_in_numel, nn.AvgPool1d: _mmcv_in_numel, nn.MaxPool2d: _mmcv_in_numel,
    nn.AvgPool2d: _mmcv_in_numel, nn.MaxPool3d: _mmcv_in_numel, nn.AvgPool3d: _mmcv_in_numel,
    nn.AdaptiveMaxPool1d: _mmcv_in_numel, nn.AdaptiveAvgPool1d: _mmcv_in_numel,
    nn.AdaptiveMaxPool2d: _mmcv_in_numel, nn.AdaptiveAvgPool2d: _mmcv_in_numel,
    nn.AdaptiveMaxPool3d: _mmcv_in_numel, nn.AdaptiveAvgPool3d: _mmcv_in_numel,
    nn.BatchNorm1d: _mmcv_norm, nn.BatchNorm2d: _mmcv_norm, nn.BatchNorm3d: _mmcv_norm,
    nn.GroupNorm: _mmcv_norm, nn.InstanceNorm1d: _mmcv_norm, nn.InstanceNorm2d: _mmcv_norm,
    nn.InstanceNorm3d: _mmcv_norm, nn.LayerNorm: _mmcv_norm,
    nn.Linear: _mmcv_linear,
    nn.Upsample: _mmcv_out_numel,
    nn.ConvTranspose2d: _mmcv_deconv,
}


def count_mmcv_flops(model: nn.Module, forward: Callable[[], Any], depth: int = 3) -> FlopReport:
    """FLOPs of ``forward()`` by the rules of mmcv's ``get_model_complexity_info`` (see the module docstring).

    One FLOP = one multiply-add. ``by_op`` is keyed by module type name, ``by_module`` by submodule name (up to
    ``depth`` levels).
    """
    totals: dict[str, int] = {}
    by_type: dict[str, int] = {}
    handles = []

    def hook_for(name: str, rule: Callable[[nn.Module, tuple, Any], int]) -> Callable[..., None]:
        parts = name.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, min(depth, len(parts)) + 1)]

        def hook(module: nn.Module, inp: tuple, out: Any) -> None:
            out_t = out[0] if isinstance(out, (tuple, list)) else out
            n = int(rule(module, inp, out_t))
            for p in prefixes:
                totals[p] = totals.get(p, 0) + n
            key = type(module).__name__
            by_type[key] = by_type.get(key, 0) + n
            totals[""] = totals.get("", 0) + n

        return hook

    for name, module in model.named_modules():
        rule = MMCV_MODULE_RULES.get(type(module))
        if rule is not None:
            handles.append(module.register_forward_hook(hook_for(name, rule)))
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    total = totals.pop("", 0)
    return FlopReport(total=total, by_op=by_type, by_module=totals, convention="mmcv")


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (buffers excluded; shared parameters counted once). mmcv counts only those with
    ``requires_grad``; the paper's #P counts all (frozen ResNet stem and BatchNorm included)."""
    return sum(p.numel() for p in model.parameters())
