// Backward kernels of fused_fpn::lateral on CUDA: fused_fpn::lateral_grad_bias_top.
//
// One pass over dy = grad_out [N, C, H, W] (any strides) computes
//   dtop[n, c, i, j] = sum_{h : src_h(h) = i} sum_{w : src_w(w) = j} dy[n, c, h, w]    (U^T(dy))
//   db[c]            = sum_{n, h, w} dy[n, c, h, w]
// with src_h(h) = nearest_src(h, float(Ht) / float(H), Ht) (csrc/nearest.h, ATen's float32 rule).
// The nearest map is monotone, so the preimage of top row i is a contiguous range of dy rows
// [first(i), first(i + 1)) (empty when the top is larger than dy), found by binary search on the
// device; likewise for columns. Every dy element belongs to exactly one preimage: dy is read once.
//
// Deterministic, no float atomics: every sum runs in a fixed order in fp32, then
//   kernel 1 (per row group r of image n): dtop for the top row r, and the fp32 partial sum of
//            its dy rows per channel -> partial[n * R + r, c] (fixed-shape in-block reduction);
//   kernel 2: db[c] = sum_q partial[q, c] in order q = 0, 1, ...
// Without a top the row groups are runs of rows_per_group dy rows (R = ceil(H / rows_per_group)).
//
// Template parameters: T (dtype of dy, db, dtop: __half, __nv_bfloat16, float), Layout
// (ChannelsLast: threads walk channels, contiguous in dy; Nchw: threads walk top columns / dy
// columns, contiguous in dy) and kHasTop (no dtop work at all when false).
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <type_traits>

#include "../nearest.h"
#include "cuda_utils.cuh"
#include "lateral_cuda.h"

namespace fused_fpn {
namespace cuda {

// Smallest d in [0, out_size] with nearest_src(d) >= i (out_size when there is none).
__device__ __forceinline__ int64_t first_dst_at_least(int64_t i, float scale, int64_t in_size, int64_t out_size) {
  int64_t lo = 0, hi = out_size;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (nearest_src(mid, scale, in_size) >= i) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

constexpr int kClLanes = 32;   // channels per block (threadIdx.x), contiguous in channels_last dy
constexpr int kClGroups = 8;   // column groups per block (threadIdx.y)
constexpr int kNchwThreads = 128;

// Rows [h_lo, h_hi) of dy in row group r.
__device__ __forceinline__ void group_rows(const GradBiasTopParams& p, bool has_top, int64_t r, int64_t& h_lo,
                                           int64_t& h_hi) {
  if (has_top) {
    h_lo = first_dst_at_least(r, p.scale_h, p.Ht, p.H);
    h_hi = first_dst_at_least(r + 1, p.scale_h, p.Ht, p.H);
  } else {
    h_lo = r * p.rows_per_group;
    h_hi = h_lo + p.rows_per_group < p.H ? h_lo + p.rows_per_group : p.H;
  }
}

// One thread's share of row group r of one (n, c) plane of dy, rows [h_lo, h_hi): the columns
// start, start + step, ... With a top: those are top columns j, each one's preimage sum is written to
// dtop[n, c, r, j]; without: dy columns w. Returns the sum of everything this thread read.
template <typename T, bool kHasTop>
__device__ __forceinline__ float sum_row_group(const GradBiasTopParams& p, const T* base, int64_t n, int64_t c,
                                               int64_t r, int64_t h_lo, int64_t h_hi, int64_t start, int64_t step) {
  float total = 0.0f;
  if constexpr (kHasTop) {
    T* __restrict__ dtop = static_cast<T*>(p.dtop);
    for (int64_t j = start; j < p.Wt; j += step) {
      const int64_t w_lo = first_dst_at_least(j, p.scale_w, p.Wt, p.W);
      const int64_t w_hi = first_dst_at_least(j + 1, p.scale_w, p.Wt, p.W);
      float s = 0.0f;
      for (int64_t h = h_lo; h < h_hi; ++h)
        for (int64_t w = w_lo; w < w_hi; ++w) s += to_float(base[h * p.s2 + w * p.s3]);
      dtop[n * p.d0 + c * p.d1 + r * p.d2 + j * p.d3] = from_float<T>(s);
      total += s;
    }
  } else {
    for (int64_t h = h_lo; h < h_hi; ++h)
      for (int64_t w = start; w < p.W; w += step) total += to_float(base[h * p.s2 + w * p.s3]);
  }
  return total;
}

// Kernel 1 runs one block per work item, in a 1-D grid (its x size may reach 2^31 - 1; y and z only
// 65535, which limited N and C when they were grid axes): block q is (row group r, image n, channel
// block cb) with q = r + R * (n + N * cb) for channels_last dy (cb: kClLanes channels), or (r, c, n)
// with q = r + R * (c + C * n) for NCHW-like dy. The host checks the count (grad_bias_top_blocks,
// lateral_cuda.h) fits, so q, R, N and C fit in 32 bits and the split needs no 64-bit division.
static_assert(kClLanes == kGradTopChannelsPerBlock, "lateral_cuda.h counts blocks of this many channels");

// channels_last dy. block (32, 8): lane x = channel, y = column group.
template <typename T, bool kHasTop>
__global__ void __launch_bounds__(kClLanes* kClGroups)
    grad_bias_top_cl_kernel(const GradBiasTopParams p) {
  __shared__ float red[kClGroups][kClLanes];
  const uint32_t q = blockIdx.x, rows = static_cast<uint32_t>(p.R), images = static_cast<uint32_t>(p.N);
  const int64_t r = q % rows, n = (q / rows) % images;
  const int64_t c = static_cast<int64_t>(q / rows / images) * kClLanes + threadIdx.x;
  const int g = threadIdx.y;
  const bool active = c < p.C;
  const T* __restrict__ dy = static_cast<const T*>(p.dy);
  int64_t h_lo, h_hi;
  group_rows(p, kHasTop, r, h_lo, h_hi);
  const float total =
      active ? sum_row_group<T, kHasTop>(p, dy + n * p.s0 + c * p.s1, n, c, r, h_lo, h_hi, g, kClGroups) : 0.0f;
  red[g][threadIdx.x] = total;
  __syncthreads();
  if (g == 0 && active) {
    float s = red[0][threadIdx.x];
#pragma unroll
    for (int k = 1; k < kClGroups; ++k) s += red[k][threadIdx.x];
    p.partial[(n * p.R + r) * p.C + c] = s;
  }
}

// NCHW-like dy. block 128: threads walk top columns j (or dy columns w).
template <typename T, bool kHasTop>
__global__ void __launch_bounds__(kNchwThreads) grad_bias_top_nchw_kernel(const GradBiasTopParams p) {
  __shared__ float red[kNchwThreads];
  const uint32_t q = blockIdx.x, rows = static_cast<uint32_t>(p.R), channels = static_cast<uint32_t>(p.C);
  const int64_t r = q % rows, c = (q / rows) % channels, n = q / rows / channels;
  const int tid = threadIdx.x;
  const T* __restrict__ dy = static_cast<const T*>(p.dy);
  const T* base = dy + n * p.s0 + c * p.s1;
  int64_t h_lo, h_hi;
  group_rows(p, kHasTop, r, h_lo, h_hi);
  const float total = sum_row_group<T, kHasTop>(p, base, n, c, r, h_lo, h_hi, tid, kNchwThreads);
  // Fixed-shape tree reduction: the same order on every run.
  red[tid] = total;
  __syncthreads();
#pragma unroll
  for (int stride = kNchwThreads / 2; stride > 0; stride /= 2) {
    if (tid < stride) red[tid] += red[tid + stride];
    __syncthreads();
  }
  if (tid == 0) p.partial[(n * p.R + r) * p.C + c] = red[0];
}

// db[c] = sum_{q < rows} partial[q, c], q ascending. grid ceil(C / 256), block 256.
template <typename T>
__global__ void __launch_bounds__(256) grad_bias_reduce_kernel(const float* __restrict__ partial, int64_t rows,
                                                               int64_t C, T* __restrict__ db) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float s = 0.0f;
  for (int64_t q = 0; q < rows; ++q) s += partial[q * C + c];
  db[c] = from_float<T>(s);
}

template <typename T, typename Layout, bool kHasTop>
void launch_grad_bias_top(const GradBiasTopParams& p, cudaStream_t stream) {
  constexpr bool kChannelsLast = std::is_same<Layout, ChannelsLast>::value;
  const int64_t blocks = grad_bias_top_blocks(p.N, p.C, p.R, kChannelsLast);  // <= kMaxGridBlocks (host check)
  if constexpr (kChannelsLast) {
    grad_bias_top_cl_kernel<T, kHasTop>
        <<<static_cast<unsigned>(blocks), dim3(kClLanes, kClGroups), 0, stream>>>(p);
  } else {
    grad_bias_top_nchw_kernel<T, kHasTop><<<static_cast<unsigned>(blocks), kNchwThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const unsigned reduce_blocks = static_cast<unsigned>((p.C + 255) / 256);
  grad_bias_reduce_kernel<T><<<reduce_blocks, 256, 0, stream>>>(p.partial, p.N * p.R, p.C, static_cast<T*>(p.db));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void dispatch_grad_bias_top(const GradBiasTopParams& p, bool channels_last, cudaStream_t stream) {
  const bool has_top = p.dtop != nullptr;
  if (channels_last) {
    if (has_top) return launch_grad_bias_top<T, ChannelsLast, true>(p, stream);
    return launch_grad_bias_top<T, ChannelsLast, false>(p, stream);
  }
  if (has_top) return launch_grad_bias_top<T, Nchw, true>(p, stream);
  return launch_grad_bias_top<T, Nchw, false>(p, stream);
}

void lateral_grad_bias_top(const GradBiasTopParams& p, int dtype, bool channels_last, cudaStream_t stream) {
  switch (dtype) {
    case 0:
      return dispatch_grad_bias_top<__half>(p, channels_last, stream);
    case 1:
      return dispatch_grad_bias_top<__nv_bfloat16>(p, channels_last, stream);
    case 2:
      return dispatch_grad_bias_top<float>(p, channels_last, stream);
    default:
      TORCH_CHECK(false, "fused_fpn::lateral_grad_bias_top (CUDA): unsupported dtype code ", dtype);
  }
}

}  // namespace cuda
}  // namespace fused_fpn

// Explicit instantiations: dtype x layout x has_top.
#define FUSED_FPN_INSTANTIATE_BWD(T)                                                                             \
  template void fused_fpn::cuda::launch_grad_bias_top<T, fused_fpn::cuda::ChannelsLast, true>(                  \
      const fused_fpn::cuda::GradBiasTopParams&, cudaStream_t);                                                  \
  template void fused_fpn::cuda::launch_grad_bias_top<T, fused_fpn::cuda::ChannelsLast, false>(                 \
      const fused_fpn::cuda::GradBiasTopParams&, cudaStream_t);                                                  \
  template void fused_fpn::cuda::launch_grad_bias_top<T, fused_fpn::cuda::Nchw, true>(                          \
      const fused_fpn::cuda::GradBiasTopParams&, cudaStream_t);                                                  \
  template void fused_fpn::cuda::launch_grad_bias_top<T, fused_fpn::cuda::Nchw, false>(                         \
      const fused_fpn::cuda::GradBiasTopParams&, cudaStream_t);
FUSED_FPN_INSTANTIATE_BWD(__half)
FUSED_FPN_INSTANTIATE_BWD(__nv_bfloat16)
FUSED_FPN_INSTANTIATE_BWD(float)
