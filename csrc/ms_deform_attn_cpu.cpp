// Multi-scale deformable attention (Deformable DETR semantics): CPU kernels and op registration.
//
// This file defines the `psf_ops` library (schemas + CPU kernels). The CUDA kernels live in a
// separate shared object (ms_deform_attn_cuda.cu) that only adds `TORCH_LIBRARY_IMPL(psf_ops, CUDA)`,
// so the CPU op stays usable when the CUDA extension is absent or cannot be loaded.
//
// Layout (all row-major, made contiguous here):
//   value               (N, S, M, D)       S = sum_l H_l * W_l, levels concatenated along S
//   spatial_shapes      (L, 2) int64       (H_l, W_l)
//   level_start_index   (L,) int64
//   sampling_loc        (N, Lq, M, L, P, 2) normalised (x, y); pixel = loc * size - 0.5
//   attn_weight         (N, Lq, M, L, P)
//   output              (N, Lq, M * D)
//
// Semantics match the reference CUDA kernel exactly, including its early-out: a sample is skipped
// (contributes nothing, zero gradient) unless -1 < h_im < H and -1 < w_im < W; corners outside the
// map read as zero. NaN locations fail every comparison and are skipped too.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/headeronly/version.h>

#include "ms_deform_attn_common.h"

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#define PSF_STR2(x) #x
#define PSF_STR(x) PSF_STR2(x)

namespace psf_ops {
namespace {

// One bilinear sample: the four corner weights and pointers (a shared zero row for corners outside
// the map) so the channel loop below is branch-free and vectorises.
template <typename acc_t>
struct Sample {
  acc_t lh, lw, hh, hw;
  int64_t off[4];  // element offset of each corner row, or -1 when outside the map
};

template <typename acc_t>
inline bool make_sample(acc_t x, acc_t y, int64_t H, int64_t W, int64_t row, Sample<acc_t>& s) {
  const acc_t h_im = y * static_cast<acc_t>(H) - acc_t(0.5);
  const acc_t w_im = x * static_cast<acc_t>(W) - acc_t(0.5);
  if (!(h_im > acc_t(-1) && w_im > acc_t(-1) && h_im < static_cast<acc_t>(H) && w_im < static_cast<acc_t>(W))) {
    return false;
  }
  const acc_t hf = std::floor(h_im);
  const acc_t wf = std::floor(w_im);
  const int64_t h_low = static_cast<int64_t>(hf), w_low = static_cast<int64_t>(wf);
  const int64_t h_high = h_low + 1, w_high = w_low + 1;
  s.lh = h_im - hf;
  s.lw = w_im - wf;
  s.hh = acc_t(1) - s.lh;
  s.hw = acc_t(1) - s.lw;
  const bool h0 = h_low >= 0, h1 = h_high <= H - 1, w0 = w_low >= 0, w1 = w_high <= W - 1;
  s.off[0] = (h0 && w0) ? (h_low * W + w_low) * row : -1;
  s.off[1] = (h0 && w1) ? (h_low * W + w_high) * row : -1;
  s.off[2] = (h1 && w0) ? (h_high * W + w_low) * row : -1;
  s.off[3] = (h1 && w1) ? (h_high * W + w_high) * row : -1;
  return true;
}

template <typename scalar_t>
void forward_impl(const scalar_t* value, const int64_t* shapes, const int64_t* starts, const scalar_t* loc,
                  const scalar_t* attn, scalar_t* out, const Dims& d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = d.M * d.D;  // elements between consecutive tokens
  const int64_t grain = std::max<int64_t>(1, 64 / std::max<int64_t>(1, d.M));
  at::parallel_for(0, d.N * d.Lq, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(d.D);
    const std::vector<scalar_t> zeros(d.D, scalar_t(0));
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / d.Lq;
      for (int64_t m = 0; m < d.M; ++m) {
        const int64_t qm = nq * d.M + m;
        const scalar_t* loc_ptr = loc + qm * d.L * d.P * 2;
        const scalar_t* attn_ptr = attn + qm * d.L * d.P;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        acc_t* __restrict__ a = acc.data();
        for (int64_t l = 0; l < d.L; ++l) {
          const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
          const scalar_t* base = value + (n * d.S + starts[l]) * row + m * d.D;
          for (int64_t p = 0; p < d.P; ++p) {
            const int64_t lp = l * d.P + p;
            Sample<acc_t> s;
            if (!make_sample<acc_t>(static_cast<acc_t>(loc_ptr[2 * lp]), static_cast<acc_t>(loc_ptr[2 * lp + 1]), H, W,
                                    row, s)) {
              continue;
            }
            const acc_t w = static_cast<acc_t>(attn_ptr[lp]);
            const acc_t a1 = w * s.hh * s.hw, a2 = w * s.hh * s.lw, a3 = w * s.lh * s.hw, a4 = w * s.lh * s.lw;
            const scalar_t* __restrict__ v1 = s.off[0] >= 0 ? base + s.off[0] : zeros.data();
            const scalar_t* __restrict__ v2 = s.off[1] >= 0 ? base + s.off[1] : zeros.data();
            const scalar_t* __restrict__ v3 = s.off[2] >= 0 ? base + s.off[2] : zeros.data();
            const scalar_t* __restrict__ v4 = s.off[3] >= 0 ? base + s.off[3] : zeros.data();
#pragma omp simd
            for (int64_t c = 0; c < d.D; ++c) {
              a[c] += a1 * static_cast<acc_t>(v1[c]) + a2 * static_cast<acc_t>(v2[c]) +
                      a3 * static_cast<acc_t>(v3[c]) + a4 * static_cast<acc_t>(v4[c]);
            }
          }
        }
        scalar_t* o = out + qm * d.D;
        for (int64_t c = 0; c < d.D; ++c) o[c] = static_cast<scalar_t>(a[c]);
      }
    }
  });
}

// Backward. grad_value is a scatter, so work is split over (batch, head) pairs: each task owns the
// slice grad_value[n, :, m, :] and the (n, :, m) rows of the other grads, so no two threads write the
// same element (no atomics, deterministic). Gradients are accumulated in acc_t buffers.
template <typename scalar_t>
void backward_impl(const scalar_t* value, const int64_t* shapes, const int64_t* starts, const scalar_t* loc,
                   const scalar_t* attn, const scalar_t* grad_out, at::opmath_type<scalar_t>* grad_value,
                   at::opmath_type<scalar_t>* grad_loc, at::opmath_type<scalar_t>* grad_attn, const Dims& d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = d.M * d.D;
  at::parallel_for(0, d.N * d.M, 1, [&](int64_t begin, int64_t end) {
    const std::vector<scalar_t> zeros(d.D, scalar_t(0));
    std::vector<acc_t> sink(4 * d.D);  // write target for corners outside the map (discarded)
    std::vector<acc_t> g(d.D);
    for (int64_t nm = begin; nm < end; ++nm) {
      const int64_t n = nm / d.M, m = nm % d.M;
      for (int64_t q = 0; q < d.Lq; ++q) {
        const int64_t qm = (n * d.Lq + q) * d.M + m;
        const scalar_t* loc_ptr = loc + qm * d.L * d.P * 2;
        const scalar_t* attn_ptr = attn + qm * d.L * d.P;
        acc_t* gloc = grad_loc + qm * d.L * d.P * 2;
        acc_t* gattn = grad_attn + qm * d.L * d.P;
        const scalar_t* go = grad_out + qm * d.D;
        for (int64_t c = 0; c < d.D; ++c) g[c] = static_cast<acc_t>(go[c]);
        const acc_t* __restrict__ gp = g.data();
        for (int64_t l = 0; l < d.L; ++l) {
          const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
          const int64_t level_off = (n * d.S + starts[l]) * row + m * d.D;
          const scalar_t* base = value + level_off;
          acc_t* gbase = grad_value + level_off;
          for (int64_t p = 0; p < d.P; ++p) {
            const int64_t lp = l * d.P + p;
            Sample<acc_t> s;
            if (!make_sample<acc_t>(static_cast<acc_t>(loc_ptr[2 * lp]), static_cast<acc_t>(loc_ptr[2 * lp + 1]), H, W,
                                    row, s)) {
              continue;
            }
            const acc_t w = static_cast<acc_t>(attn_ptr[lp]);
            const acc_t w1 = s.hh * s.hw, w2 = s.hh * s.lw, w3 = s.lh * s.hw, w4 = s.lh * s.lw;
            const acc_t aw1 = w * w1, aw2 = w * w2, aw3 = w * w3, aw4 = w * w4;
            const acc_t lh = s.lh, lw = s.lw, hh = s.hh, hw = s.hw;
            const scalar_t* __restrict__ v1 = s.off[0] >= 0 ? base + s.off[0] : zeros.data();
            const scalar_t* __restrict__ v2 = s.off[1] >= 0 ? base + s.off[1] : zeros.data();
            const scalar_t* __restrict__ v3 = s.off[2] >= 0 ? base + s.off[2] : zeros.data();
            const scalar_t* __restrict__ v4 = s.off[3] >= 0 ? base + s.off[3] : zeros.data();
            acc_t* __restrict__ g1 = s.off[0] >= 0 ? gbase + s.off[0] : sink.data();
            acc_t* __restrict__ g2 = s.off[1] >= 0 ? gbase + s.off[1] : sink.data() + d.D;
            acc_t* __restrict__ g3 = s.off[2] >= 0 ? gbase + s.off[2] : sink.data() + 2 * d.D;
            acc_t* __restrict__ g4 = s.off[3] >= 0 ? gbase + s.off[3] : sink.data() + 3 * d.D;
            acc_t s_attn = 0, s_h = 0, s_w = 0;
#pragma omp simd reduction(+ : s_attn, s_h, s_w)
            for (int64_t c = 0; c < d.D; ++c) {
              const acc_t x1 = static_cast<acc_t>(v1[c]), x2 = static_cast<acc_t>(v2[c]);
              const acc_t x3 = static_cast<acc_t>(v3[c]), x4 = static_cast<acc_t>(v4[c]);
              const acc_t gc = gp[c];
              s_attn += gc * (w1 * x1 + w2 * x2 + w3 * x3 + w4 * x4);
              s_h += gc * (hw * (x3 - x1) + lw * (x4 - x2));
              s_w += gc * (hh * (x2 - x1) + lh * (x4 - x3));
              g1[c] += aw1 * gc;
              g2[c] += aw2 * gc;
              g3[c] += aw3 * gc;
              g4[c] += aw4 * gc;
            }
            gattn[lp] = s_attn;
            // Chain rule through w_im = x * W - 0.5 and h_im = y * H - 0.5.
            gloc[2 * lp] = static_cast<acc_t>(W) * w * s_w;
            gloc[2 * lp + 1] = static_cast<acc_t>(H) * w * s_h;
          }
        }
      }
    }
  });
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                                      const at::Tensor& level_start_index_in, const at::Tensor& sampling_loc_in,
                                      const at::Tensor& attn_weight_in) {
  const Dims d = check_shapes(value_in, spatial_shapes_in, level_start_index_in, sampling_loc_in, attn_weight_in);
  const at::Tensor value = value_in.contiguous(), spatial_shapes = spatial_shapes_in.contiguous();
  const at::Tensor level_start_index = level_start_index_in.contiguous(), sampling_loc = sampling_loc_in.contiguous();
  const at::Tensor attn_weight = attn_weight_in.contiguous();
  at::Tensor out = at::empty({d.N, d.Lq, d.M * d.D}, value.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    forward_impl<scalar_t>(value.const_data_ptr<scalar_t>(), spatial_shapes.const_data_ptr<int64_t>(),
                           level_start_index.const_data_ptr<int64_t>(), sampling_loc.const_data_ptr<scalar_t>(),
                           attn_weight.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), d);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value_in, const at::Tensor& spatial_shapes_in, const at::Tensor& level_start_index_in,
    const at::Tensor& sampling_loc_in, const at::Tensor& attn_weight_in, const at::Tensor& grad_output_in) {
  const Dims d = check_shapes(value_in, spatial_shapes_in, level_start_index_in, sampling_loc_in, attn_weight_in);
  TORCH_CHECK(grad_output_in.dim() == 3 && grad_output_in.size(0) == d.N && grad_output_in.size(1) == d.Lq &&
                  grad_output_in.size(2) == d.M * d.D,
              "ms_deform_attn_backward: grad_output must be (N, Lq, M*D), got ", grad_output_in.sizes());
  const at::Tensor value = value_in.contiguous(), spatial_shapes = spatial_shapes_in.contiguous();
  const at::Tensor level_start_index = level_start_index_in.contiguous(), sampling_loc = sampling_loc_in.contiguous();
  const at::Tensor attn_weight = attn_weight_in.contiguous();
  const at::Tensor grad_output = grad_output_in.to(value.scalar_type()).contiguous();
  const at::ScalarType acc_type = at::toOpMathType(value.scalar_type());
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_loc = at::zeros(sampling_loc.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_attn = at::zeros(attn_weight.sizes(), value.options().dtype(acc_type));
  if (d.N * d.Lq * d.M > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_impl<scalar_t>(value.const_data_ptr<scalar_t>(), spatial_shapes.const_data_ptr<int64_t>(),
                              level_start_index.const_data_ptr<int64_t>(), sampling_loc.const_data_ptr<scalar_t>(),
                              attn_weight.const_data_ptr<scalar_t>(), grad_output.const_data_ptr<scalar_t>(),
                              grad_value.mutable_data_ptr<acc_t>(), grad_loc.mutable_data_ptr<acc_t>(),
                              grad_attn.mutable_data_ptr<acc_t>(), d);
    });
  }
  const at::ScalarType st = value.scalar_type();
  return {grad_value.to(st), grad_loc.to(st), grad_attn.to(st)};
}

// The torch version this object was compiled against; the Python loader refuses a stale build.
std::string build_info() {
  return std::string("torch=") + PSF_STR(TORCH_VERSION_MAJOR) "." PSF_STR(TORCH_VERSION_MINOR) "." PSF_STR(
             TORCH_VERSION_PATCH) ";openmp=" +
#ifdef _OPENMP
         "1";
#else
         "0";
#endif
}

}  // namespace
}  // namespace psf_ops

TORCH_LIBRARY(psf_ops, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) -> (Tensor, Tensor, Tensor)");
  m.def("build_info() -> str", &psf_ops::build_info);
}

TORCH_LIBRARY_IMPL(psf_ops, CPU, m) {
  m.impl("ms_deform_attn_forward", &psf_ops::ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &psf_ops::ms_deform_attn_backward_cpu);
}
