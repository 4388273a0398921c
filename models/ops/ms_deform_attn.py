"""Multi-scale deformable attention (Deformable DETR): functional API and nn.Module.

`ms_deform_attn` validates its inputs once (ValueError naming the argument), then dispatches to a
compiled kernel (csrc/, loaded by `models.ops._ext`) when one is built for the device, else to the
pure-PyTorch grid_sample fallback below. Semantics follow the Deformable DETR CUDA kernel exactly.

Backends:
    'cuda':    csrc/ms_deform_attn_cuda.cu (fp32/fp64/fp16/bf16; fp32 accumulation for 16-bit types).
    'cpp':     csrc/ms_deform_attn_cpu.cpp (fp32/fp64/fp16/bf16; fp32 accumulation for 16-bit types).
    'pytorch': grid_sample fallback (fp16/bf16 are computed in fp32 and cast back).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


BACKENDS = ("pytorch", "cpp", "cuda")


class BackendUnavailableError(RuntimeError):
    """A backend was forced with `backend=` but is not built or cannot run on the inputs' device."""


def ms_deform_attn_pytorch(
    value: Tensor,
    spatial_shapes: Tensor | Sequence[tuple[int, int]],
    level_start_index: Tensor | None,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Pure-PyTorch multi-scale deformable attention (grid_sample, align_corners=False).

    Differences from the compiled kernels (measure-zero cases, see shared/reference §3): a NaN location
    propagates NaN here (the kernels skip the sample); at exactly loc = -0.5/H (or -0.5/W) the kernels
    return a zero location gradient, grid_sample a non-zero one.

    Args:
        value: (N, S, M, D) with S = sum_l H_l * W_l.
        spatial_shapes: (L, 2) long, (H_l, W_l) per level, or a list of (H, W) ints (no host sync, friendlier
            to torch.compile).
        level_start_index: (L,) long, offset of each level in S (unused: derived from shapes).
        sampling_locations: (N, Lq, M, L, P, 2) in [0, 1], (x, y).
        attention_weights: (N, Lq, M, L, P).

    Returns:
        (N, Lq, M * D) in the dtype of `value`.
    """
    dtype = value.dtype
    if dtype in (torch.float16, torch.bfloat16):
        # grid_sample in fp16/bf16 is wrong on CPU (garbage on strided input, large error otherwise) and
        # imprecise on CUDA (16-bit coordinate math): compute in fp32 and return in the input dtype.
        value, sampling_locations, attention_weights = (
            value.float(), sampling_locations.float(), attention_weights.float()
        )
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    if isinstance(spatial_shapes, Tensor):
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    else:
        shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    value_list = value.split([h * w for h, w in shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        value_l = value_list[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid_l = sampling_grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * num_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous().to(dtype)


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_inputs(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> None:
    """Validate the op's arguments once, before dispatch; raises ValueError naming the argument at fault.

    The value-dependent checks (S == sum H*W, level_start_index == exclusive cumsum) read `spatial_shapes`
    and `level_start_index` (a host sync for CUDA tensors); they are skipped while torch.compile/export
    traces, where those tensors have no values.
    """
    tensors = {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": sampling_locations,
        "attention_weights": attention_weights,
    }
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise ValueError(f"ms_deform_attn: {name} must be a torch.Tensor, got {type(t).__name__}")
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (N, S, M, D), got shape {_shape(value)}")
    n, s, m, d = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes must be (L, 2) (H, W) per level, got {_shape(spatial_shapes)}"
        )
    num_levels = spatial_shapes.shape[0]
    if level_start_index.shape != (num_levels,):
        raise ValueError(
            f"ms_deform_attn: level_start_index must be ({num_levels},) (one entry per level of spatial_shapes), "
            f"got {_shape(level_start_index)}"
        )
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got " + _shape(sampling_locations)
        )
    _, lq, _, _, p, _ = sampling_locations.shape
    expected = (n, lq, m, num_levels, p, 2)
    if tuple(sampling_locations.shape) != expected:
        raise ValueError(
            f"ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2) = {expected} "
            f"(N={n}, M={m} from value, L={num_levels} from spatial_shapes), got {_shape(sampling_locations)}"
        )
    if tuple(attention_weights.shape) != expected[:5]:
        raise ValueError(
            f"ms_deform_attn: attention_weights must be (N, Lq, M, L, P) = {expected[:5]}, "
            f"got {_shape(attention_weights)}"
        )
    for name in ("spatial_shapes", "level_start_index"):
        if tensors[name].dtype != torch.int64:
            raise ValueError(f"ms_deform_attn: {name} must be torch.int64 (long), got {tensors[name].dtype}")
    if not value.is_floating_point():
        raise ValueError(f"ms_deform_attn: value must be a floating-point tensor, got {value.dtype}")
    for name in ("sampling_locations", "attention_weights"):
        if tensors[name].dtype != value.dtype:
            raise ValueError(
                f"ms_deform_attn: {name} has dtype {tensors[name].dtype} but value has {value.dtype}; "
                "all three must share a dtype"
            )
    for name, t in tensors.items():
        if t.device != value.device:
            raise ValueError(f"ms_deform_attn: {name} is on {t.device} but value is on {value.device}")
    if torch.compiler.is_compiling() or _is_fake(spatial_shapes) or _is_fake(level_start_index):
        return
    hw = spatial_shapes.tolist()
    if any(h <= 0 or w <= 0 for h, w in hw):
        raise ValueError(f"ms_deform_attn: spatial_shapes must be positive (H, W) per level, got {hw}")
    sizes = [h * w for h, w in hw]
    if sum(sizes) != s:
        raise ValueError(
            f"ms_deform_attn: value has S={s} tokens but spatial_shapes {hw} give sum(H*W) = {sum(sizes)}"
        )
    starts = [sum(sizes[:i]) for i in range(num_levels)]
    if level_start_index.tolist() != starts:
        raise ValueError(
            f"ms_deform_attn: level_start_index must be {starts} for spatial_shapes {hw}, "
            f"got {level_start_index.tolist()}"
        )


def _is_fake(t: Tensor) -> bool:
    return t.device.type == "meta" or type(t).__name__ == "FakeTensor"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on `device` (best first); 'pytorch' is always last."""
    from models.ops import _ext

    device_type = torch.device(device).type
    status = _ext.status()
    names = []
    if device_type == "cuda" and status["cuda"].usable:
        names.append("cuda")
    if device_type == "cpu" and status["cpp"].usable:
        names.append("cpp")
    names.append("pytorch")
    return names


def select_backend(device: torch.device | str, backend: str | None = None) -> str:
    """The backend `ms_deform_attn` uses for tensors on `device` (raises when a forced one cannot run)."""
    from models.ops import _ext

    if backend is None:
        return available_backends(device)[0]
    if backend not in BACKENDS:
        raise ValueError(f"ms_deform_attn: backend must be None or one of {BACKENDS}, got {backend!r}")
    if backend == "pytorch":
        return backend
    device_type = torch.device(device).type
    st = _ext.status()[backend]
    if not st.built:
        raise BackendUnavailableError(f"ms_deform_attn backend {backend!r} is unavailable: {st.reason}")
    wanted = "cpu" if backend == "cpp" else "cuda"
    if device_type == "meta":
        return backend  # shape propagation through the fake implementation
    if device_type != wanted:
        raise BackendUnavailableError(
            f"ms_deform_attn backend {backend!r} runs on {wanted} tensors, got tensors on {device_type}"
        )
    if not st.usable:
        raise BackendUnavailableError(f"ms_deform_attn backend {backend!r} is unavailable: {st.reason}")
    return backend


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: str | None = None,
) -> Tensor:
    """Multi-scale deformable attention (Deformable DETR semantics).

    Bilinear sampling with zero padding outside each map, pixel centres at +0.5 (grid_sample with
    align_corners=False); `out[n, q, m*D:(m+1)*D] = sum_{l,p} A[n,q,m,l,p] * bilinear(V_l[n, :, :, m], loc[n,q,m,l,p])`.

    Args:
        value: (N, S, M, D), S = sum_l H_l * W_l, levels concatenated row-major along S.
        spatial_shapes: (L, 2) int64, (H_l, W_l).
        level_start_index: (L,) int64, start of each level in S.
        sampling_locations: (N, Lq, M, L, P, 2), normalised (x, y) in [0, 1] (outside reads zeros).
        attention_weights: (N, Lq, M, L, P) (already softmax-normalised by the caller).
        backend: None = best available for the device ('cuda' on GPU, 'cpp' on CPU when built, else
            'pytorch'); or force 'pytorch', 'cpp' or 'cuda' (BackendUnavailableError when not built).

    Returns:
        (N, Lq, M * D) in the dtype of `value`.

    Raises:
        ValueError: mismatched shapes, dtypes or devices (names the argument and the expected shape).
        BackendUnavailableError: a forced backend is not built or does not run on the inputs' device.
    """
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    chosen = select_backend(value.device, backend)
    if chosen == "pytorch":
        return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return torch.ops.psf_ops.ms_deform_attn_forward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR), standard projections and init.

    Parameter names (sampling_offsets, attention_weights, value_proj, output_proj) match
    Deformable DETR and mmcv so checkpoints convert without renaming.
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.backend: str | None = None
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offset grid init (one direction per head, growing with point index), zero weights."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)
        for i in range(self.num_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        value_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from queries to multi-scale values.

        Args:
            query: (N, Lq, C), already including any positional embedding.
            reference_points: (N, Lq, L, 2) normalised (x, y), or (N, Lq, L, 4) boxes (cx, cy, w, h).
            value: (N, S, C) flattened multi-scale features.
            spatial_shapes: (L, 2) long.
            level_start_index: (L,) long.
            value_padding_mask: (N, S) bool, True on padding (those values are zeroed).

        Returns:
            (N, Lq, C).
        """
        n, lq, _ = query.shape
        s = value.shape[1]
        v = self.value_proj(value)
        if value_padding_mask is not None:
            v = v.masked_fill(value_padding_mask[..., None], 0.0)
        v = v.view(n, s, self.num_heads, self.embed_dim // self.num_heads)
        offsets = self.sampling_offsets(query).view(n, lq, self.num_heads, self.num_levels, self.num_points, 2)
        weights = self.attention_weights(query).view(n, lq, self.num_heads, self.num_levels * self.num_points)
        weights = weights.softmax(-1).view(n, lq, self.num_heads, self.num_levels, self.num_points)
        if reference_points.shape[-1] == 2:
            normaliser = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets.dtype)
            locations = reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / self.num_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"reference_points last dim must be 2 or 4, got shape {tuple(reference_points.shape)}"
            )
        if not (v.dtype == locations.dtype == weights.dtype):
            # Under autocast the projections give fp16/bf16 values and offsets while the fp32 reference points
            # promote the locations (and softmax the weights) to fp32. Rounding locations to 16 bits costs up to
            # ~0.1 px (mmcv's `type_as`), so compute in the widest dtype and return in the value dtype instead.
            wide = torch.promote_types(torch.promote_types(v.dtype, locations.dtype), weights.dtype)
            out = ms_deform_attn(
                v.to(wide), spatial_shapes, level_start_index, locations.to(wide), weights.to(wide),
                backend=self.backend,
            ).to(v.dtype)
        else:
            out = ms_deform_attn(v, spatial_shapes, level_start_index, locations, weights, backend=self.backend)
        return self.output_proj(out)
