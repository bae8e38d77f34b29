// Host side of the CUDA backend: argument checks, allocation, layout / vector-path decisions,
// device guard, current stream, and the CUDA registrations of the fused_fpn ops.
// The stream is c10::cuda::getCurrentCUDAStream(), the function at::cuda::getCurrentCUDAStream()
// forwards to (ATen/cuda/CUDAContext.h is not included: it needs the cuSPARSE / cuBLAS headers,
// which a bare nvcc install, like the CI machine's, does not have).
//
//   fused_fpn::lateral                y = x . W^T + b + U(top)       (lateral_fwd_*.cu;
//                                     no top and x dense: ATen's conv2d, runs_as_convolution)
//   fused_fpn::lateral_grad_bias_top  db = sum dy, dtop = U^T(dy)    (lateral_bwd.cu)
//
// Semantics are those of the CPU kernel (csrc/cpu/lateral_cpu.cpp) and csrc/nearest.h; the output
// (and grad_top) is channels_last iff x.stride(1) < x.stride(3) (grad_out's strides for grad_top),
// the rule of fused_fpn/_layout.py. x, top and grad_out are read through their strides: never
// copied. weight and bias are made contiguous (a copy only for an unusual non-contiguous weight).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <tuple>

#include "../lateral_common.h"
#include "../nearest.h"
#include "lateral_cuda.h"

namespace fused_fpn {
namespace {

bool aligned16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

bool divisible(int64_t v, int64_t by) { return v % by == 0; }

int multiprocessor_count(int device) {
  constexpr int kCached = 64;         // devices 0..63 are cached; a higher index is queried each call
  static std::atomic<int> cache[kCached];  // zero-initialized (static storage): 0 = not queried yet
  int v = device < kCached ? cache[device].load(std::memory_order_relaxed) : 0;
  if (v == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
    if (device < kCached) cache[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

// Whether fp32 convolutions may use TF32 (what eager conv2d does): torch.backends.cudnn.allow_tf32,
// or since torch 2.9 torch.backends.cudnn.conv.fp32_precision (the per-op query also works when
// the legacy and the new flags were mixed, where the op-less query throws).
bool conv_allows_tf32() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
  return at::globalContext().allowTF32CuDNN(at::Float32Op::CONV);
#else
  return at::globalContext().allowTF32CuDNN();
#endif
}

void check_supported_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, op, " (CUDA kernel): ", name,
              " dtype must be float16, bfloat16 or float32, got ", dt);
}

at::Tensor lateral_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        const c10::optional<at::Tensor>& top) {
  check_lateral_inputs(x, weight, bias, top);
  TORCH_CHECK(x.is_cuda(), "fused_fpn::lateral (CUDA kernel): x must be a CUDA tensor, got ", x.device());
  check_supported_dtype(x, "fused_fpn::lateral", "x");
  c10::cuda::CUDAGuard guard(x.device());
  const NoAutocastInside no_autocast;
  const bool cl = is_channels_last_like(x);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const int64_t N = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3), Cout = weight.size(0);
  TORCH_CHECK(Cin < (int64_t{1} << 24) && Cout < (int64_t{1} << 24),
              "fused_fpn::lateral (CUDA kernel): x.size(1) (Cin) and weight.size(0) (Cout) must be < 2^24, got ", Cin,
              " and ", Cout);
  // A level without a top map (P5 of an FPN) is a 1x1 convolution plus bias: there is nothing to
  // gather, so ATen's convolution (cuDNN) runs it, exactly as eager conv2d does (same algorithms,
  // fp32 accumulation, TF32 iff cudnn.allow_tf32). On the H200 (benchmarks/results/
  // nvidia-h200_2026-11-30_cudagraphs_subset.md, lateral_P5) that was 2.3x faster than this
  // backend's split-K GEMM and needed no fp32 workspace. Only for x dense in NCHW or channels_last
  // (runs_as_convolution, lateral_common.h); other strides go to the kernel, which reads them in place.
  if (N * Cout * H * W > 0 && runs_as_convolution(x, top)) {
    return lateral_as_convolution(x, weight, bias);
  }
  at::Tensor out = at::empty({N, Cout, H, W}, x.options().memory_format(fmt));
  if (out.numel() == 0) return out;

  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t vec = 16 / static_cast<int64_t>(x.element_size());
  const int64_t HW = H * W;

  cuda::LateralFwdParams p{};
  p.x = x.const_data_ptr();
  p.w = w.const_data_ptr();
  p.bias = bias.has_value() ? b.const_data_ptr() : nullptr;
  p.top = top.has_value() ? top->const_data_ptr() : nullptr;
  p.out = out.mutable_data_ptr();
  p.N = N;
  p.Cin = Cin;
  p.H = H;
  p.W = W;
  p.Cout = Cout;
  p.sx0 = x.stride(0);
  p.sx1 = x.stride(1);
  p.sx2 = x.stride(2);
  p.sx3 = x.stride(3);
  if (top.has_value()) {
    const at::Tensor& t = *top;
    p.Ht = t.size(2);
    p.Wt = t.size(3);
    p.st0 = t.stride(0);
    p.st1 = t.stride(1);
    p.st2 = t.stride(2);
    p.st3 = t.stride(3);
    p.scale_h = nearest_scale(p.Ht, H);
    p.scale_w = nearest_scale(p.Wt, W);
  }
  // 16-byte paths: every 16-byte chunk must be contiguous in memory and 16-byte aligned.
  if (cl) {
    p.vec_x = p.sx1 == 1 && divisible(Cin, vec) && divisible(p.sx0, vec) && divisible(p.sx2, vec) &&
              divisible(p.sx3, vec) && aligned16(p.x);
    p.vec_out = divisible(Cout, vec) && aligned16(p.out);
    p.vec_top = top.has_value() && p.vec_out && p.st1 == 1 && divisible(p.st0, vec) && divisible(p.st2, vec) &&
                divisible(p.st3, vec) && aligned16(p.top);
  } else {
    p.vec_x = p.sx3 == 1 && (H == 1 || p.sx2 == W) && divisible(HW, vec) && divisible(p.sx1, vec) &&
              divisible(p.sx0, vec) && aligned16(p.x);
    p.vec_out = divisible(HW, vec) && aligned16(p.out);
    p.vec_top = false;  // NCHW gathers run along pixels through the nearest map: element loads
  }
  p.vec_w = divisible(Cin, vec) && aligned16(p.w);

  // Split-K when the output tiles fill at most half of the SMs and K is deep (few pixels and
  // many input channels, e.g. P5 with a top map or strided x): about one CTA per SM, each split
  // >= 4 K tiles. Deterministic: the partial sums are added in a fixed order by a second kernel
  // (lateral_fwd.cuh).
  const int64_t BK = 64 / static_cast<int64_t>(x.element_size());
  const int64_t KT = (Cin + BK - 1) / BK;
  const int64_t tiles = ((N * HW + cuda::kFwdBM - 1) / cuda::kFwdBM) * ((Cout + cuda::kFwdBN - 1) / cuda::kFwdBN);
  p.k_split = 1;
  p.k_tiles_per_split = std::max<int64_t>(KT, 1);
  p.partial = nullptr;
  at::Tensor partial;
  const int64_t sms = multiprocessor_count(x.get_device());
  if (2 * tiles <= sms && KT >= 8) {
    int64_t splits = std::min<int64_t>((sms + tiles - 1) / tiles, KT / 4);
    if (splits > 1) {
      const int64_t per = (KT + splits - 1) / splits;
      splits = (KT + per - 1) / per;  // no empty split
      partial = at::empty({splits, N * HW, Cout}, x.options().dtype(at::kFloat));
      p.k_split = splits;
      p.k_tiles_per_split = per;
      p.partial = partial.mutable_data_ptr<float>();
    }
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (x.scalar_type()) {
    case at::kHalf:
      cuda::lateral_fwd_f16(p, cl, stream);
      break;
    case at::kBFloat16:
      cuda::lateral_fwd_bf16(p, cl, stream);
      break;
    default:  // float32: TF32 tensor cores iff cudnn.allow_tf32 (what eager conv2d does), else exact FMA
      if (conv_allows_tf32()) {
        cuda::lateral_fwd_f32_tf32(p, cl, stream);
      } else {
        cuda::lateral_fwd_f32_ffma(p, cl, stream);
      }
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> lateral_grad_bias_top_cuda(const at::Tensor& grad_out, int64_t top_h,
                                                              int64_t top_w) {
  check_grad_bias_top_inputs(grad_out, top_h, top_w);
  TORCH_CHECK(grad_out.is_cuda(),
              "fused_fpn::lateral_grad_bias_top (CUDA kernel): grad_out must be a CUDA tensor, got ",
              grad_out.device());
  check_supported_dtype(grad_out, "fused_fpn::lateral_grad_bias_top", "grad_out");
  c10::cuda::CUDAGuard guard(grad_out.device());
  const bool cl = is_channels_last_like(grad_out);
  const int64_t N = grad_out.size(0), C = grad_out.size(1), H = grad_out.size(2), W = grad_out.size(3);
  const bool has_top = top_h > 0;
  // Row groups per image: one per top row (its preimage rows), else runs of rows_per_group dy rows.
  const int64_t rows_per_group = has_top ? 0 : std::max<int64_t>(1, (H + 63) / 64);
  const int64_t R = has_top ? top_h : (H + rows_per_group - 1) / rows_per_group;
  const int64_t blocks = cuda::grad_bias_top_blocks(N, C, R, cl);
  TORCH_CHECK(grad_out.numel() == 0 || blocks <= cuda::kMaxGridBlocks,
              "fused_fpn::lateral_grad_bias_top (CUDA kernel): grad_out ", grad_out.sizes(), " with a top of ", top_h,
              " x ", top_w, " needs more than ", cuda::kMaxGridBlocks,
              " blocks (row groups x images x channels, or blocks of ", cuda::kGradTopChannelsPerBlock,
              " channels for channels_last) in one launch");
  at::Tensor db, dtop;
  if (allocate_grad_bias_top(grad_out, top_h, top_w, db, dtop)) return {db, dtop};
  cuda::GradBiasTopParams p{};
  p.dy = grad_out.const_data_ptr();
  p.db = db.mutable_data_ptr();
  p.dtop = has_top ? dtop.mutable_data_ptr() : nullptr;
  p.N = N;
  p.C = C;
  p.H = H;
  p.W = W;
  p.s0 = grad_out.stride(0);
  p.s1 = grad_out.stride(1);
  p.s2 = grad_out.stride(2);
  p.s3 = grad_out.stride(3);
  if (has_top) {
    p.Ht = top_h;
    p.Wt = top_w;
    p.d0 = dtop.stride(0);
    p.d1 = dtop.stride(1);
    p.d2 = dtop.stride(2);
    p.d3 = dtop.stride(3);
    p.scale_h = nearest_scale(top_h, H);
    p.scale_w = nearest_scale(top_w, W);
  }
  p.rows_per_group = rows_per_group;
  p.R = R;
  at::Tensor partial = at::empty({N * p.R, C}, grad_out.options().dtype(at::kFloat));
  p.partial = partial.mutable_data_ptr<float>();
  const int dtype = grad_out.scalar_type() == at::kHalf ? 0 : grad_out.scalar_type() == at::kBFloat16 ? 1 : 2;
  cuda::lateral_grad_bias_top(p, dtype, cl, c10::cuda::getCurrentCUDAStream());
  return {db, dtop};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_fpn, CUDA, m) {
  m.impl("lateral", &lateral_cuda);
  m.impl("lateral_grad_bias_top", &lateral_grad_bias_top_cuda);
}

}  // namespace fused_fpn
