// CPU kernels of fused_fpn::lateral and fused_fpn::lateral_grad_bias_top.
//
// Forward, y[n, co, h, w] = sum_ci x[n, ci, h, w] W[co, ci] + b[co] + top[n, co, src_h(h), src_w(w)],
// fused by tiles: each image's output rows are cut into tiles of whole rows (Cout x rows x W
// elements, about 512 KiB, so the tile stays in the core's L2). For each tile ATen's own 1x1
// convolution (oneDNN where ATen has it, else BLAS: the fastest GEMM ATen has for this op, never
// a hand-rolled one) computes the lateral product of that tile alone, and the epilogue adds the
// bias and the nearest-gathered top while the tile is hot, writing each output element once.
// The lateral map and the upsampled map never exist in memory. Tiles run in parallel over
// at::parallel_for (the GEMM runs single-threaded inside the parallel region); small maps are cut
// into smaller tiles so that every thread gets work.
//
// Layouts: x is never copied as a whole: the tile is a view (rows [h0, h0+rows) of one image)
// in x's own strides; channels_last and NCHW tiles go to the GEMM as they are (other strided
// views may be packed tile by tile inside ATen). The output has x's memory format
// (channels_last iff x.stride(1) < x.stride(3)); the epilogue loops channels innermost for
// channels_last and pixels innermost for NCHW, so both write contiguously.
//
// Backward: dx and dW are GEMMs done by ATen (Python side); this file fuses db and dtop into
// one pass over dy (deterministic: every channel is summed in a fixed order by one thread).
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../lateral_common.h"
#include "../nearest.h"

namespace fused_fpn {
namespace {

std::vector<int64_t> src_offsets(int64_t in_size, int64_t out_size, int64_t stride) {
  std::vector<int64_t> off(static_cast<size_t>(out_size));
  const float scale = nearest_scale(in_size, out_size);
  for (int64_t d = 0; d < out_size; ++d) off[d] = nearest_src(d, scale, in_size) * stride;
  return off;
}

// Rows per tile: the tile's GEMM output (Cout x rows x W) is about 2 MiB, so it stays in the
// cores' L2 / the L3 slice for the epilogue while the GEMM still has enough columns to run at
// full speed on every thread.
int64_t tile_rows(int64_t h, int64_t w, int64_t cout, int64_t element_size) {
  constexpr int64_t kTileBytes = 2 * 1024 * 1024;
  const int64_t row_bytes = std::max<int64_t>(1, cout * w * element_size);
  return std::max<int64_t>(1, std::min<int64_t>(h, kTileBytes / row_bytes));
}

template <typename scalar_t>
void lateral_cpu_impl(const at::Tensor& x, const at::Tensor& w4, const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& top, at::Tensor& out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3), Cout = w4.size(0);
  const bool out_cl = is_channels_last_like(out);
  const int64_t so0 = out.stride(0), so1 = out.stride(1), so2 = out.stride(2), so3 = out.stride(3);
  const int64_t rows = tile_rows(H, W, Cout, x.element_size());
  const int64_t tiles_per_image = (H + rows - 1) / rows;

  at::Tensor b_contig = bias.has_value() ? bias->contiguous() : at::Tensor();
  const scalar_t* bptr = bias.has_value() ? b_contig.const_data_ptr<scalar_t>() : nullptr;
  const bool has_top = top.has_value();
  const scalar_t* tptr = has_top ? top->const_data_ptr<scalar_t>() : nullptr;
  int64_t st0 = 0, st1 = 0;
  std::vector<int64_t> ih_off, iw_off;
  if (has_top) {
    st0 = top->stride(0);
    st1 = top->stride(1);
    ih_off = src_offsets(top->size(2), H, top->stride(2));
    iw_off = src_offsets(top->size(3), W, top->stride(3));
  }
  scalar_t* optr = out.mutable_data_ptr<scalar_t>();

  // Epilogue of one tile, for output channels [c0, c1) (NCHW) or tile rows [r0, r1) (channels_last):
  // out = yt + bias + top[nearest], each output element written once, while yt is in cache.
  auto epilogue = [&](int64_t n, int64_t h0, const at::Tensor& yt, int64_t lo, int64_t hi) {
    const scalar_t* yp = yt.const_data_ptr<scalar_t>();
    const int64_t sy1 = yt.stride(1), sy2 = yt.stride(2), sy3 = yt.stride(3);
    if (out_cl) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t h = h0 + r;
        for (int64_t ww = 0; ww < W; ++ww) {
          const scalar_t* src = yp + r * sy2 + ww * sy3;
          scalar_t* dst = optr + n * so0 + h * so2 + ww * so3;
          const scalar_t* tp = has_top ? tptr + n * st0 + ih_off[h] + iw_off[ww] : nullptr;
          for (int64_t c = 0; c < Cout; ++c) {
            opmath_t v = static_cast<opmath_t>(src[c * sy1]);
            if (bptr) v += static_cast<opmath_t>(bptr[c]);
            if (tp) v += static_cast<opmath_t>(tp[c * st1]);
            dst[c * so1] = static_cast<scalar_t>(v);
          }
        }
      }
    } else {
      const int64_t nrows = yt.size(2);
      for (int64_t c = lo; c < hi; ++c) {
        const opmath_t bc = bptr ? static_cast<opmath_t>(bptr[c]) : opmath_t(0);
        for (int64_t r = 0; r < nrows; ++r) {
          const int64_t h = h0 + r;
          const scalar_t* src = yp + c * sy1 + r * sy2;
          scalar_t* dst = optr + n * so0 + c * so1 + h * so2;
          if (has_top) {
            const scalar_t* trow = tptr + n * st0 + c * st1 + ih_off[h];
            for (int64_t ww = 0; ww < W; ++ww)
              dst[ww * so3] = static_cast<scalar_t>(static_cast<opmath_t>(src[ww * sy3]) + bc +
                                                    static_cast<opmath_t>(trow[iw_off[ww]]));
          } else {
            for (int64_t ww = 0; ww < W; ++ww)
              dst[ww * so3] = static_cast<scalar_t>(static_cast<opmath_t>(src[ww * sy3]) + bc);
          }
        }
      }
    }
  };
  // The tile's GEMM: ATen's own 1x1 convolution (oneDNN / BLAS) on a view of rows [h0, h0+nrows).
  // (Cin == 0: the product is an empty sum, which conv2d does not take.)
  auto tile_gemm = [&](int64_t n, int64_t h0, int64_t nrows) {
    const at::Tensor xt = x.narrow(0, n, 1).narrow(2, h0, nrows);
    return Cin == 0 ? at::zeros({1, Cout, nrows, W}, x.options()) : at::conv2d(xt, w4);
  };
  // Tiles run one after the other; ATen's GEMM uses every thread on a tile (oneDNN runs its
  // fastest kernels multi-threaded), then the epilogue splits the tile across the threads.
  for (int64_t item = 0; item < N * tiles_per_image; ++item) {
    const int64_t n = item / tiles_per_image;
    const int64_t h0 = (item % tiles_per_image) * rows;
    const int64_t nrows = std::min(rows, H - h0);
    const at::Tensor yt = tile_gemm(n, h0, nrows);
    at::parallel_for(0, out_cl ? nrows : Cout, 1, [&](int64_t lo, int64_t hi) { epilogue(n, h0, yt, lo, hi); });
  }
}

at::Tensor lateral_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const c10::optional<at::Tensor>& top) {
  check_lateral_inputs(x, weight, bias, top);
  TORCH_CHECK(x.device().is_cpu(), "fused_fpn::lateral (CPU kernel): x must be a CPU tensor, got ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "fused_fpn::lateral (CPU kernel): x dtype must be float32, float64, bfloat16 or float16, got ", dtype);
  const auto fmt = output_memory_format(x);
  at::Tensor out = at::empty({x.size(0), weight.size(0), x.size(2), x.size(3)}, x.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const at::Tensor w4 = weight.contiguous().view({weight.size(0), weight.size(1), 1, 1});
  if (!top.has_value() && x.size(1) > 0) {
    // Nothing to gather: y = conv1x1(x) + bias is ATen's convolution itself (one pass, bias fused).
    return at::conv2d(x, w4, bias).contiguous(fmt);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "fused_fpn_lateral_cpu",
                                  [&] { lateral_cpu_impl<scalar_t>(x, w4, bias, top, out); });
  return out;
}

template <typename scalar_t>
void grad_bias_top_impl(const at::Tensor& dy, int64_t top_h, int64_t top_w, at::Tensor& db, at::Tensor& dtop) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const int64_t N = dy.size(0), C = dy.size(1), H = dy.size(2), W = dy.size(3);
  const bool has_top = top_h > 0 && top_w > 0;
  const int64_t s0 = dy.stride(0), s1 = dy.stride(1), s2 = dy.stride(2), s3 = dy.stride(3);
  // Channels innermost when dy is channels_last-like (contiguous reads); one channel per block otherwise.
  const int64_t CB = is_channels_last_like(dy) ? std::min<int64_t>(C, 64) : 1;
  const int64_t blocks = (C + CB - 1) / CB;
  std::vector<int64_t> ih, iw;
  if (has_top) {
    ih = src_offsets(top_h, H, 1);
    iw = src_offsets(top_w, W, 1);
  }
  const scalar_t* yp = dy.const_data_ptr<scalar_t>();
  scalar_t* dbp = db.mutable_data_ptr<scalar_t>();
  scalar_t* dtp = has_top ? dtop.mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t d0 = has_top ? dtop.stride(0) : 0, d1 = has_top ? dtop.stride(1) : 0;
  const int64_t d2 = has_top ? dtop.stride(2) : 0, d3 = has_top ? dtop.stride(3) : 0;

  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(has_top ? static_cast<size_t>(top_h * top_w * CB) : 0);
    std::vector<acc_t> bacc(static_cast<size_t>(CB));
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t c0 = blk * CB, cb = std::min(CB, C - c0);
      std::fill(bacc.begin(), bacc.end(), acc_t(0));
      for (int64_t n = 0; n < N; ++n) {
        if (has_top) std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t h = 0; h < H; ++h) {
          for (int64_t w = 0; w < W; ++w) {
            const scalar_t* p = yp + n * s0 + c0 * s1 + h * s2 + w * s3;
            if (has_top) {
              acc_t* a = acc.data() + (ih[h] * top_w + iw[w]) * CB;
              for (int64_t c = 0; c < cb; ++c) {
                const acc_t v = static_cast<acc_t>(p[c * s1]);
                a[c] += v;
                bacc[c] += v;
              }
            } else {
              for (int64_t c = 0; c < cb; ++c) bacc[c] += static_cast<acc_t>(p[c * s1]);
            }
          }
        }
        if (has_top) {
          for (int64_t i = 0; i < top_h; ++i)
            for (int64_t j = 0; j < top_w; ++j) {
              const acc_t* a = acc.data() + (i * top_w + j) * CB;
              scalar_t* dst = dtp + n * d0 + c0 * d1 + i * d2 + j * d3;
              for (int64_t c = 0; c < cb; ++c) dst[c * d1] = static_cast<scalar_t>(a[c]);
            }
        }
      }
      for (int64_t c = 0; c < cb; ++c) dbp[c0 + c] = static_cast<scalar_t>(bacc[c]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> lateral_grad_bias_top_cpu(const at::Tensor& grad_out, int64_t top_h,
                                                             int64_t top_w) {
  check_grad_bias_top_inputs(grad_out, top_h, top_w);
  at::Tensor db, dtop;
  if (allocate_grad_bias_top(grad_out, top_h, top_w, db, dtop)) return {db, dtop};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "fused_fpn_grad_bias_top_cpu",
                                  [&] { grad_bias_top_impl<scalar_t>(grad_out, top_h, top_w, db, dtop); });
  return {db, dtop};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_fpn, CPU, m) {
  m.impl("lateral", &lateral_cpu);
  m.impl("lateral_grad_bias_top", &lateral_grad_bias_top_cpu);
}

}  // namespace fused_fpn
