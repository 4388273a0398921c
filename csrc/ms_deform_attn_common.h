// Shared by the CPU and CUDA kernels of multi-scale deformable attention: problem sizes and the
// shape/dtype checks that guard direct op calls (the Python wrapper raises clear ValueErrors first).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace psf_ops {

struct Dims {
  int64_t N, S, M, D, Lq, L, P;
};

inline Dims check_shapes(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                  const at::Tensor& sampling_loc, const at::Tensor& attn_weight) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (L, 2)");
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong, "ms_deform_attn: spatial_shapes must be int64");
  TORCH_CHECK(level_start_index.scalar_type() == at::kLong, "ms_deform_attn: level_start_index must be int64");
  TORCH_CHECK(sampling_loc.dim() == 6 && sampling_loc.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got ", sampling_loc.sizes());
  TORCH_CHECK(attn_weight.dim() == 5, "ms_deform_attn: attention_weights must be (N, Lq, M, L, P)");
  Dims d{value.size(0), value.size(1), value.size(2), value.size(3),
         sampling_loc.size(1), sampling_loc.size(3), sampling_loc.size(4)};
  TORCH_CHECK(sampling_loc.size(0) == d.N && sampling_loc.size(2) == d.M,
              "ms_deform_attn: sampling_locations N/M mismatch");
  TORCH_CHECK(spatial_shapes.size(0) == d.L && level_start_index.numel() == d.L,
              "ms_deform_attn: number of levels mismatch");
  TORCH_CHECK(attn_weight.sizes() == sampling_loc.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights shape mismatch");
  TORCH_CHECK(sampling_loc.scalar_type() == value.scalar_type() && attn_weight.scalar_type() == value.scalar_type(),
              "ms_deform_attn: value, sampling_locations and attention_weights must share a dtype");
  return d;
}

}  // namespace psf_ops
