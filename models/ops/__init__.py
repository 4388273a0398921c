"""Custom operators: multi-scale deformable attention (compiled kernels + PyTorch fallback)."""

from models.ops.ms_deform_attn import (
    BackendUnavailableError,
    MSDeformAttn,
    available_backends,
    ms_deform_attn,
    ms_deform_attn_pytorch,
    select_backend,
)

__all__ = [
    "BackendUnavailableError",
    "MSDeformAttn",
    "available_backends",
    "ms_deform_attn",
    "ms_deform_attn_pytorch",
    "select_backend",
]
