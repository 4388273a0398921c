"""Custom operators: multi-scale deformable attention (compiled kernels + PyTorch fallback)."""

from models.ops.ms_deform_attn import MSDeformAttn, ms_deform_attn, ms_deform_attn_pytorch

__all__ = ["MSDeformAttn", "ms_deform_attn", "ms_deform_attn_pytorch"]
