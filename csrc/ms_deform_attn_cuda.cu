// Multi-scale deformable attention: CUDA kernels for the `psf_ops` ops defined in ms_deform_attn_cpu.cpp.
//
// Built as its own shared object that only adds `TORCH_LIBRARY_IMPL(psf_ops, CUDA)`, so the CPU op keeps
// working when this library or the CUDA runtime is absent. Same layout and semantics as the CPU file.
//
// Design (vs the reference Deformable DETR kernel, see shared/reference/deformable_attention.md §1, §2.5):
//  * one thread handles CPT consecutive channels of one (n, q, m): the coordinate/bounds arithmetic is
//    amortised over CPT channels instead of being repeated per channel;
//  * one launch over the whole batch with 64-bit indexing (no im2col_step, no batch % 64 restriction);
//  * float, double, half and bfloat16 inputs; coordinates and accumulation in fp32 (opmath) for the
//    16-bit types; gradients accumulated in fp32 buffers and cast back;
//  * backward reduces grad_loc / grad_attn over the channel threads of one head with warp shuffles
//    (no shared memory, no __syncthreads per sample); atomics only for the grad_value scatter;
//  * device guard, current stream, launch checks; non-contiguous inputs are made contiguous;
//  * `scalar_type()` dispatch (the deprecated `.type()` no longer compiles), `TORCH_CHECK` not printf.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ms_deform_attn_common.h"

#include <cstdint>
#include <tuple>

namespace psf_ops {
namespace {

constexpr int kThreads = 256;

// Channels per thread: largest of 4, 2, 1 dividing D.
inline int channels_per_thread(int64_t D) { return D % 4 == 0 ? 4 : (D % 2 == 0 ? 2 : 1); }

inline bool is_pow2(int64_t x) { return x > 0 && (x & (x - 1)) == 0; }

// CPT channels moved as one vector load/store (16 B for 4 floats). The host guarantees the alignment:
// every offset used is a multiple of CPT elements and the base pointers are aligned (copied if not).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <int CPT, typename scalar_t>
__device__ __forceinline__ Vec<scalar_t, CPT> load_vec(const scalar_t* p) {
  return *reinterpret_cast<const Vec<scalar_t, CPT>*>(p);
}

// `t` contiguous with its data pointer aligned to `bytes` (a fresh copy when a view's offset breaks it).
inline at::Tensor aligned_contiguous(const at::Tensor& t, int64_t bytes) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.const_data_ptr()) % bytes != 0) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

template <typename acc_t>
struct Corners {
  acc_t w[4];       // bilinear weights
  int64_t off[4];   // element offset of each corner row, -1 when outside the map
  acc_t lh, lw, hh, hw;
};

template <typename acc_t>
__device__ __forceinline__ bool make_corners(acc_t x, acc_t y, int64_t H, int64_t W, int64_t row, Corners<acc_t>& s) {
  const acc_t h_im = y * static_cast<acc_t>(H) - acc_t(0.5);
  const acc_t w_im = x * static_cast<acc_t>(W) - acc_t(0.5);
  // Same early-out as the reference kernel (strict bounds; NaN fails every comparison).
  if (!(h_im > acc_t(-1) && w_im > acc_t(-1) && h_im < static_cast<acc_t>(H) && w_im < static_cast<acc_t>(W))) {
    return false;
  }
  const acc_t hf = floor(h_im), wf = floor(w_im);
  const int64_t h_low = static_cast<int64_t>(hf), w_low = static_cast<int64_t>(wf);
  const int64_t h_high = h_low + 1, w_high = w_low + 1;
  s.lh = h_im - hf;
  s.lw = w_im - wf;
  s.hh = acc_t(1) - s.lh;
  s.hw = acc_t(1) - s.lw;
  s.w[0] = s.hh * s.hw;
  s.w[1] = s.hh * s.lw;
  s.w[2] = s.lh * s.hw;
  s.w[3] = s.lh * s.lw;
  const bool h0 = h_low >= 0, h1 = h_high <= H - 1, w0 = w_low >= 0, w1 = w_high <= W - 1;
  s.off[0] = (h0 && w0) ? (h_low * W + w_low) * row : -1;
  s.off[1] = (h0 && w1) ? (h_low * W + w_high) * row : -1;
  s.off[2] = (h1 && w0) ? (h_high * W + w_low) * row : -1;
  s.off[3] = (h1 && w1) ? (h_high * W + w_high) * row : -1;
  return true;
}

// Forward: thread = (n, q, m, channel group of CPT).
template <typename scalar_t, int CPT>
__global__ void msda_forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                                    const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc,
                                    const scalar_t* __restrict__ attn, scalar_t* __restrict__ out, Dims d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tph = d.D / CPT;  // threads per head
  const int64_t total = d.N * d.Lq * d.M * tph;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int64_t c0 = (idx % tph) * CPT;
  const int64_t qm = idx / tph;            // (n * Lq + q) * M + m
  const int64_t m = qm % d.M;
  const int64_t n = qm / (d.M * d.Lq);
  const int64_t row = d.M * d.D;
  const scalar_t* loc_ptr = loc + qm * d.L * d.P * 2;
  const scalar_t* attn_ptr = attn + qm * d.L * d.P;
  acc_t acc[CPT];
#pragma unroll
  for (int k = 0; k < CPT; ++k) acc[k] = acc_t(0);
  for (int64_t l = 0; l < d.L; ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
    const scalar_t* base = value + (n * d.S + starts[l]) * row + m * d.D + c0;
    for (int64_t p = 0; p < d.P; ++p) {
      const int64_t lp = l * d.P + p;
      Corners<acc_t> s;
      if (!make_corners<acc_t>(static_cast<acc_t>(loc_ptr[2 * lp]), static_cast<acc_t>(loc_ptr[2 * lp + 1]), H, W,
                               row, s)) {
        continue;
      }
      const acc_t a = static_cast<acc_t>(attn_ptr[lp]);
#pragma unroll
      for (int corner = 0; corner < 4; ++corner) {
        if (s.off[corner] < 0) continue;
        const Vec<scalar_t, CPT> v = load_vec<CPT>(base + s.off[corner]);
        const acc_t aw = a * s.w[corner];
#pragma unroll
        for (int k = 0; k < CPT; ++k) acc[k] += aw * static_cast<acc_t>(v.v[k]);
      }
    }
  }
  Vec<scalar_t, CPT> o;
#pragma unroll
  for (int k = 0; k < CPT; ++k) o.v[k] = static_cast<scalar_t>(acc[k]);
  *reinterpret_cast<Vec<scalar_t, CPT>*>(out + qm * d.D + c0) = o;
}

// Sum `x` over the `width` lanes of one head (width a power of two <= 32, groups aligned in the warp).
template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t x, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) x += __shfl_down_sync(0xffffffffu, x, offset, width);
  return x;
}

// Backward: thread = (n, q, m, channel group). `shuffle` (uniform per launch): the tph threads of a head
// are a power-of-two group inside one warp, reduce with shuffles; otherwise every thread atomically adds
// its partial sums (buffers are zero-initialised). Every lane reaches every shuffle (no early return).
template <typename scalar_t, int CPT>
__global__ void msda_backward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                                     const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc,
                                     const scalar_t* __restrict__ attn, const scalar_t* __restrict__ grad_out,
                                     at::opmath_type<scalar_t>* __restrict__ grad_value,
                                     at::opmath_type<scalar_t>* __restrict__ grad_loc,
                                     at::opmath_type<scalar_t>* __restrict__ grad_attn, Dims d, bool shuffle) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tph = d.D / CPT;
  const int64_t total = d.N * d.Lq * d.M * tph;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool valid = idx < total;
  const int64_t lane_in_head = idx % tph;
  const int64_t c0 = lane_in_head * CPT;
  const int64_t qm = valid ? idx / tph : 0;
  const int64_t m = qm % d.M;
  const int64_t n = qm / (d.M * d.Lq);
  const int64_t row = d.M * d.D;
  const scalar_t* loc_ptr = loc + qm * d.L * d.P * 2;
  const scalar_t* attn_ptr = attn + qm * d.L * d.P;
  acc_t g[CPT];
  {
    const Vec<scalar_t, CPT> go = load_vec<CPT>(grad_out + qm * d.D + c0);  // qm = 0 for idle lanes: in bounds
#pragma unroll
    for (int k = 0; k < CPT; ++k) g[k] = valid ? static_cast<acc_t>(go.v[k]) : acc_t(0);
  }

  for (int64_t l = 0; l < d.L; ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
    const int64_t level_off = (n * d.S + starts[l]) * row + m * d.D + c0;
    for (int64_t p = 0; p < d.P; ++p) {
      const int64_t lp = l * d.P + p;
      acc_t s_attn = 0, s_h = 0, s_w = 0, a = 0;
      Corners<acc_t> s;
      const bool inside = valid && make_corners<acc_t>(static_cast<acc_t>(loc_ptr[2 * lp]),
                                                       static_cast<acc_t>(loc_ptr[2 * lp + 1]), H, W, row, s);
      if (inside) {
        a = static_cast<acc_t>(attn_ptr[lp]);
        acc_t x[4][CPT];
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          const bool ok = s.off[corner] >= 0;
          if (ok) {
            const Vec<scalar_t, CPT> v = load_vec<CPT>(value + level_off + s.off[corner]);
#pragma unroll
            for (int k = 0; k < CPT; ++k) x[corner][k] = static_cast<acc_t>(v.v[k]);
          } else {
#pragma unroll
            for (int k = 0; k < CPT; ++k) x[corner][k] = acc_t(0);
          }
          if (ok) {
            acc_t* gv = grad_value + level_off + s.off[corner];
            const acc_t aw = a * s.w[corner];
#pragma unroll
            for (int k = 0; k < CPT; ++k) atomicAdd(gv + k, aw * g[k]);
          }
        }
#pragma unroll
        for (int k = 0; k < CPT; ++k) {
          s_attn += g[k] * (s.w[0] * x[0][k] + s.w[1] * x[1][k] + s.w[2] * x[2][k] + s.w[3] * x[3][k]);
          s_h += g[k] * (s.hw * (x[2][k] - x[0][k]) + s.lw * (x[3][k] - x[1][k]));
          s_w += g[k] * (s.hh * (x[1][k] - x[0][k]) + s.lh * (x[3][k] - x[2][k]));
        }
        // Chain rule through w_im = x * W - 0.5 and h_im = y * H - 0.5.
        s_h *= a * static_cast<acc_t>(H);
        s_w *= a * static_cast<acc_t>(W);
      }
      if (shuffle) {
        s_attn = group_sum(s_attn, static_cast<int>(tph));
        s_h = group_sum(s_h, static_cast<int>(tph));
        s_w = group_sum(s_w, static_cast<int>(tph));
        if (inside && lane_in_head == 0) {
          grad_attn[qm * d.L * d.P + lp] = s_attn;
          grad_loc[(qm * d.L * d.P + lp) * 2] = s_w;
          grad_loc[(qm * d.L * d.P + lp) * 2 + 1] = s_h;
        }
      } else if (inside) {
        atomicAdd(grad_attn + qm * d.L * d.P + lp, s_attn);
        atomicAdd(grad_loc + (qm * d.L * d.P + lp) * 2, s_w);
        atomicAdd(grad_loc + (qm * d.L * d.P + lp) * 2 + 1, s_h);
      }
    }
  }
}

Dims check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                  const at::Tensor& sampling_loc, const at::Tensor& attn_weight) {
  for (const at::Tensor* t : {&value, &spatial_shapes, &level_start_index, &sampling_loc, &attn_weight}) {
    TORCH_CHECK(t->is_cuda() && t->device() == value.device(), "ms_deform_attn (CUDA): all inputs must be on ",
                value.device());
  }
  return check_shapes(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
}

inline unsigned int num_blocks(int64_t threads) {
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= 0x7fffffff, "ms_deform_attn (CUDA): problem too large (", threads, " threads)");
  return static_cast<unsigned int>(blocks);
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                                       const at::Tensor& level_start_index_in, const at::Tensor& sampling_loc_in,
                                       const at::Tensor& attn_weight_in) {
  const Dims d = check_inputs(value_in, spatial_shapes_in, level_start_index_in, sampling_loc_in, attn_weight_in);
  const c10::cuda::CUDAGuard guard(value_in.device());
  const int cpt = channels_per_thread(d.D);
  const at::Tensor value = aligned_contiguous(value_in, cpt * value_in.element_size());
  const at::Tensor spatial_shapes = spatial_shapes_in.contiguous();
  const at::Tensor level_start_index = level_start_index_in.contiguous();
  const at::Tensor sampling_loc = sampling_loc_in.contiguous(), attn_weight = attn_weight_in.contiguous();
  at::Tensor out = at::empty({d.N, d.Lq, d.M * d.D}, value.options());  // fresh allocation: aligned
  if (out.numel() == 0) return out;
  const unsigned int blocks = num_blocks(d.N * d.Lq * d.M * (d.D / cpt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    const auto* v = value.const_data_ptr<scalar_t>();
    const auto* ss = spatial_shapes.const_data_ptr<int64_t>();
    const auto* ls = level_start_index.const_data_ptr<int64_t>();
    const auto* lo = sampling_loc.const_data_ptr<scalar_t>();
    const auto* aw = attn_weight.const_data_ptr<scalar_t>();
    auto* o = out.mutable_data_ptr<scalar_t>();
    if (cpt == 4) {
      msda_forward_kernel<scalar_t, 4><<<blocks, kThreads, 0, stream>>>(v, ss, ls, lo, aw, o, d);
    } else if (cpt == 2) {
      msda_forward_kernel<scalar_t, 2><<<blocks, kThreads, 0, stream>>>(v, ss, ls, lo, aw, o, d);
    } else {
      msda_forward_kernel<scalar_t, 1><<<blocks, kThreads, 0, stream>>>(v, ss, ls, lo, aw, o, d);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value_in, const at::Tensor& spatial_shapes_in, const at::Tensor& level_start_index_in,
    const at::Tensor& sampling_loc_in, const at::Tensor& attn_weight_in, const at::Tensor& grad_output_in) {
  const Dims d = check_inputs(value_in, spatial_shapes_in, level_start_index_in, sampling_loc_in, attn_weight_in);
  TORCH_CHECK(grad_output_in.is_cuda() && grad_output_in.device() == value_in.device() && grad_output_in.dim() == 3 &&
                  grad_output_in.size(0) == d.N && grad_output_in.size(1) == d.Lq &&
                  grad_output_in.size(2) == d.M * d.D,
              "ms_deform_attn_backward: grad_output must be (N, Lq, M*D) on ", value_in.device());
  // grad_value is scattered with atomics: the summation order varies between runs.
  at::globalContext().alertNotDeterministic("psf_ops::ms_deform_attn_backward (CUDA)");
  const c10::cuda::CUDAGuard guard(value_in.device());
  const int cpt = channels_per_thread(d.D);
  const int64_t align = cpt * value_in.element_size();
  const at::Tensor value = aligned_contiguous(value_in, align);
  const at::Tensor spatial_shapes = spatial_shapes_in.contiguous();
  const at::Tensor level_start_index = level_start_index_in.contiguous();
  const at::Tensor sampling_loc = sampling_loc_in.contiguous(), attn_weight = attn_weight_in.contiguous();
  const at::Tensor grad_output = aligned_contiguous(grad_output_in.to(value.scalar_type()), align);
  const at::ScalarType acc_type = at::toOpMathType(value.scalar_type());
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_loc = at::zeros(sampling_loc.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_attn = at::zeros(attn_weight.sizes(), value.options().dtype(acc_type));
  const int64_t tph = d.D / cpt;
  const bool shuffle = is_pow2(tph) && tph <= 32;
  const int64_t threads = d.N * d.Lq * d.M * tph;
  if (threads > 0) {
    const unsigned int blocks = num_blocks(threads);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto* v = value.const_data_ptr<scalar_t>();
      const auto* ss = spatial_shapes.const_data_ptr<int64_t>();
      const auto* ls = level_start_index.const_data_ptr<int64_t>();
      const auto* lo = sampling_loc.const_data_ptr<scalar_t>();
      const auto* aw = attn_weight.const_data_ptr<scalar_t>();
      const auto* go = grad_output.const_data_ptr<scalar_t>();
      auto* gv = grad_value.mutable_data_ptr<acc_t>();
      auto* gl = grad_loc.mutable_data_ptr<acc_t>();
      auto* ga = grad_attn.mutable_data_ptr<acc_t>();
      if (cpt == 4) {
        msda_backward_kernel<scalar_t, 4><<<blocks, kThreads, 0, stream>>>(v, ss, ls, lo, aw, go, gv, gl, ga, d,
                                                                            shuffle);
      } else if (cpt == 2) {
        msda_backward_kernel<scalar_t, 2><<<blocks, kThreads, 0, stream>>>(v, ss, ls, lo, aw, go, gv, gl, ga, d,
                                                                            shuffle);
      } else {
        msda_backward_kernel<scalar_t, 1><<<blocks, kThreads, 0, stream>>>(v, ss, ls, lo, aw, go, gv, gl, ga, d,
                                                                            shuffle);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const at::ScalarType st = value.scalar_type();
  return {grad_value.to(st), grad_loc.to(st), grad_attn.to(st)};
}

}  // namespace
}  // namespace psf_ops

TORCH_LIBRARY_IMPL(psf_ops, CUDA, m) {
  m.impl("ms_deform_attn_forward", &psf_ops::ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &psf_ops::ms_deform_attn_backward_cuda);
}
