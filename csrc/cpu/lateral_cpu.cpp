// CPU kernels of fused_fpn::lateral and fused_fpn::lateral_grad_bias_top.
//
// Forward, y[n, co, h, w] = sum_ci x[n, ci, h, w] W[co, ci] + b[co] + top[n, co, src_h(h), src_w(w)],
// fused by tiles: each image's output rows are cut into tiles of whole rows (Cout x rows x W
// elements, about 2 MiB: in the cores' L2 / L3 slice, see tile_rows). For each tile ATen's own 1x1
// convolution (oneDNN where ATen has it, else BLAS: the fastest GEMM ATen has for this op, never
// a hand-rolled one) computes the lateral product and bias of that tile alone (rounded to the output
// dtype, as eager's conv2d rounds it), and the epilogue adds the nearest-gathered top while the tile
// is hot (in fp32, one more rounding: eager's add), writing each output element once, by rows of
// unit stride that the compiler vectorizes (add_rows, add_rows_doubled; 2026-12-05: the element-wise
// loops with runtime strides before them took 2.1-3.4 ms of a 512 x 512 image's P2 call, fp32, 2
// threads, profiler self time; the rows 1.3-1.8 ms).
// The lateral map and the upsampled map never exist in memory. Tiles run one after the other:
// ATen's GEMM uses every thread on a tile, then at::parallel_for splits the tile's epilogue (by
// rows for channels_last, by channels for NCHW). A level without a top map and x dense is ATen's
// conv2d with the bias: nothing to gather (a strided view without a top takes the tiles, whose
// epilogue then only stores).
//
// Layouts: x is never copied as a whole: the tile is a view (rows [h0, h0+rows) of one image)
// in x's own strides. A channels_last tile is dense and goes to the convolution as it is; an NCHW
// tile (a band of rows in each channel plane) and other strided views are packed tile by tile
// inside ATen's conv2d, one cache-sized copy per tile (at::mm on the band as a strided matrix
// avoids it but was not faster here: 6.8 ms against 6.4 ms for a 512 x 13 x 152 fp32 tile).
// The output has x's memory format (channels_last iff x.stride(1) < x.stride(3)); the epilogue
// loops channels innermost for channels_last and pixels innermost for NCHW, so both write
// contiguously.
//
// Backward: dx and dW are done by ATen (csrc/autograd.cpp); this file fuses db and
// dtop into one pass over dy (GradBiasTopPass; deterministic: fixed summation order, independent
// of the thread count).
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
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

// dst[i] = y[i] + t[i] for i in [0, n), added in opmath_t and rounded once to scalar_t (eager's add;
// t == nullptr: dst[i] = y[i]). The epilogue's hot loop: unit strides and no aliasing (dst is the
// fresh output, y the tile's conv output, t the top map or a row gathered from it), so the compiler
// vectorizes it.
template <typename scalar_t>
inline void add_rows(scalar_t* __restrict__ dst, const scalar_t* __restrict__ y, const scalar_t* __restrict__ t,
                     int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (t == nullptr) {
    std::copy(y, y + n, dst);
    return;
  }
  for (int64_t i = 0; i < n; ++i)
    dst[i] = static_cast<scalar_t>(static_cast<opmath_t>(y[i]) + static_cast<opmath_t>(t[i]));
}

// dst[i] = y[i] + t[i / 2] for i in [0, n): add_rows for a top row read through a nearest column map
// that takes each top column twice in turn (2x upsampling, the FPN's usual one), without gathering
// the row first.
template <typename scalar_t>
inline void add_rows_doubled(scalar_t* __restrict__ dst, const scalar_t* __restrict__ y,
                             const scalar_t* __restrict__ t, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t pairs = n / 2;
  for (int64_t j = 0; j < pairs; ++j) {
    const opmath_t tj = static_cast<opmath_t>(t[j]);
    dst[2 * j] = static_cast<scalar_t>(static_cast<opmath_t>(y[2 * j]) + tj);
    dst[2 * j + 1] = static_cast<scalar_t>(static_cast<opmath_t>(y[2 * j + 1]) + tj);
  }
  if (n % 2 != 0) dst[n - 1] = static_cast<scalar_t>(static_cast<opmath_t>(y[n - 1]) + static_cast<opmath_t>(t[pairs]));
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

  // The bias goes into the tile's conv2d, as in eager's conv2d(x, W, b) + top: the conv output with
  // its bias is rounded to the output dtype before top is added, so reduced precisions round as eager
  // does. With Cin == 0 there is no conv (the product is an empty sum): the epilogue adds the bias.
  at::Tensor b_contig = bias.has_value() ? bias->contiguous() : at::Tensor();
  const scalar_t* bptr = bias.has_value() && Cin == 0 ? b_contig.const_data_ptr<scalar_t>() : nullptr;
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
  // The nearest column map reads top column w / 2 for output column w, at unit stride: add_rows_doubled.
  bool columns_doubled = has_top;
  for (int64_t ww = 0; columns_doubled && ww < W; ++ww) columns_doubled = iw_off[ww] == ww / 2;

  // Epilogue of one tile, for output channels [c0, c1) (NCHW) or tile rows [r0, r1) (channels_last):
  // out = yt + top[nearest] (+ bias when Cin == 0), each output element written once, while yt is in cache.
  // Where out and yt have unit stride along the loop's inner dimension (channels for channels_last,
  // pixels of a row for NCHW) and there is no bias to add, add_rows does the adding: channels_last
  // adds a pixel's Cout channels at a time (its top pixel, gathered into a row first where top's
  // channels are not contiguous), NCHW a row of W pixels, its top row gathered by the nearest
  // column map once per source row (consecutive output rows that read the same top row reuse it).
  // Other strides (and Cin == 0) take the element-wise loops below them.
  auto epilogue_rows = [&](int64_t n, int64_t h0, const at::Tensor& yt, int64_t lo, int64_t hi) {
    const scalar_t* yp = yt.const_data_ptr<scalar_t>();
    const int64_t sy1 = yt.stride(1), sy2 = yt.stride(2), sy3 = yt.stride(3);
    if (out_cl) {
      std::vector<scalar_t> gathered(has_top && st1 != 1 ? static_cast<size_t>(Cout) : 0);
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t h = h0 + r;
        for (int64_t ww = 0; ww < W; ++ww) {
          const scalar_t* tp = has_top ? tptr + n * st0 + ih_off[h] + iw_off[ww] : nullptr;
          if (tp != nullptr && st1 != 1) {
            for (int64_t c = 0; c < Cout; ++c) gathered[c] = tp[c * st1];
            tp = gathered.data();
          }
          add_rows(optr + n * so0 + h * so2 + ww * so3, yp + r * sy2 + ww * sy3, tp, Cout);
        }
      }
    } else {
      const int64_t nrows = yt.size(2);
      if (columns_doubled) {
        for (int64_t c = lo; c < hi; ++c)
          for (int64_t r = 0; r < nrows; ++r) {
            const int64_t h = h0 + r;
            add_rows_doubled(optr + n * so0 + c * so1 + h * so2, yp + c * sy1 + r * sy2,
                             tptr + n * st0 + c * st1 + ih_off[h], W);
          }
        return;
      }
      std::vector<scalar_t> gathered(has_top ? static_cast<size_t>(W) : 0);
      for (int64_t c = lo; c < hi; ++c) {
        int64_t gathered_from = -1;   // ih_off of the top row in `gathered`
        for (int64_t r = 0; r < nrows; ++r) {
          const int64_t h = h0 + r;
          if (has_top && ih_off[h] != gathered_from) {
            const scalar_t* trow = tptr + n * st0 + c * st1 + ih_off[h];
            for (int64_t ww = 0; ww < W; ++ww) gathered[ww] = trow[iw_off[ww]];
            gathered_from = ih_off[h];
          }
          add_rows(optr + n * so0 + c * so1 + h * so2, yp + c * sy1 + r * sy2, has_top ? gathered.data() : nullptr, W);
        }
      }
    }
  };
  auto epilogue = [&](int64_t n, int64_t h0, const at::Tensor& yt, int64_t lo, int64_t hi) {
    const scalar_t* yp = yt.const_data_ptr<scalar_t>();
    const int64_t sy1 = yt.stride(1), sy2 = yt.stride(2), sy3 = yt.stride(3);
    const bool unit_inner = out_cl ? (so1 == 1 && sy1 == 1) : (so3 == 1 && sy3 == 1);
    if (bptr == nullptr && unit_inner) {
      epilogue_rows(n, h0, yt, lo, hi);
      return;
    }
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
  // The tile's GEMM + bias: ATen's own 1x1 convolution (oneDNN / BLAS) on a view of rows [h0, h0+nrows).
  // (Cin == 0: the product is an empty sum, which conv2d does not take.)
  auto tile_gemm = [&](int64_t n, int64_t h0, int64_t nrows) {
    const at::Tensor xt = x.narrow(0, n, 1).narrow(2, h0, nrows);
    return Cin == 0 ? at::zeros({1, Cout, nrows, W}, x.options()) : at::conv2d(xt, w4, b_contig);
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
  const NoAutocastInside no_autocast;
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "fused_fpn::lateral (CPU kernel): x dtype must be float32, float64, bfloat16 or float16, got ", dtype);
  const auto fmt = output_memory_format(x);
  const std::array<int64_t, 4> out_sizes{x.size(0), weight.size(0), x.size(2), x.size(3)};
  if (std::find(out_sizes.begin(), out_sizes.end(), 0) != out_sizes.end()) {
    return at::empty(out_sizes, x.options().memory_format(fmt));
  }
  // nothing to gather: ATen's conv2d, for x dense (a strided view takes the tiles: no copy of all of x)
  if (runs_as_convolution(x, top)) return lateral_as_convolution(x, weight, bias);
  const at::Tensor w4 = weight.contiguous().view({weight.size(0), weight.size(1), 1, 1});
  at::Tensor out = at::empty(out_sizes, x.options().memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "fused_fpn_lateral_cpu",
                                  [&] { lateral_cpu_impl<scalar_t>(x, w4, bias, top, out); });
  return out;
}

// Preimage starts of the nearest map src(d) (monotone in d): dy index d in [0, dst) reads top index
// src(d); top index t gathers dy indices [first[t], first[t + 1]) (empty when nearest down-sampling
// skips t). first has src_size + 1 entries, first[src_size] = dst_size.
std::vector<int64_t> preimage_starts(int64_t src_size, int64_t dst_size) {
  const std::vector<int64_t> src = src_offsets(src_size, dst_size, 1);
  std::vector<int64_t> first(static_cast<size_t>(src_size + 1), dst_size);
  for (int64_t d = dst_size - 1; d >= 0; --d) first[src[d]] = d;
  for (int64_t t = src_size - 1; t >= 0; --t) first[t] = std::min(first[t], first[t + 1]);
  return first;
}

// db[c] = sum over n, h, w of dy[n, c, h, w];  dtop[n, c, i, j] = sum of dy over the preimage of (i, j),
// i.e. rows [hs[i], hs[i + 1]) x columns [ws[j], ws[j + 1]) (preimage_starts). One pass over dy
// [N, C, H, W] (any strides), in work units that each write their own dtop elements:
//   pixels innermost (NCHW-like): unit (n, c), its plane read front to back; for each top row i the
//     preimage rows are summed into colsum[w] (contiguous reads along w), then each top column j sums
//     its columns.
//   channels innermost (channels_last-like): unit (n, i, block of top columns); all C channels of the
//     preimage pixels are summed into colsum[w][c] (contiguous reads along c: every cache line of dy
//     is read by one unit), then each top column j sums its columns.
// The contiguous case of the inner loops (accumulate, store) is specialised so that the compiler
// vectorises it. Sums run
// in opmath (float for fp16 / bf16 / fp32, as eager's upsample backward); each unit writes its own
// dtop elements and its partial db, and the partials are added in a fixed order afterwards in acc_t:
// deterministic. Without a top the identity map takes its place (every dy pixel its own preimage) and
// only db is written.
template <typename scalar_t>
struct GradBiasTopPass {
  using op_t = at::opmath_type<scalar_t>;
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  int64_t N, C, H, W, TH, TW;
  bool has_top;
  std::vector<int64_t> hs, ws;
  int64_t s0, s1, s2, s3, d0, d1, d2, d3;
  const scalar_t* yp;
  scalar_t* dtp;

  GradBiasTopPass(const at::Tensor& dy, int64_t top_h, int64_t top_w, at::Tensor& dtop)
      : N(dy.size(0)), C(dy.size(1)), H(dy.size(2)), W(dy.size(3)), has_top(top_h > 0 && top_w > 0) {
    TH = has_top ? top_h : H;
    TW = has_top ? top_w : W;
    hs = preimage_starts(TH, H);
    ws = preimage_starts(TW, W);
    s0 = dy.stride(0), s1 = dy.stride(1), s2 = dy.stride(2), s3 = dy.stride(3);
    d0 = has_top ? dtop.stride(0) : 0, d1 = has_top ? dtop.stride(1) : 0;
    d2 = has_top ? dtop.stride(2) : 0, d3 = has_top ? dtop.stride(3) : 0;
    yp = dy.const_data_ptr<scalar_t>();
    dtp = has_top ? dtop.mutable_data_ptr<scalar_t>() : nullptr;
  }

  // dst[k] = (first ? 0 : dst[k]) + src[k * stride] for k in [0, n): one dy row (or pixel) added into
  // the column sums; stride 1 is its own loop so that the compiler vectorises it.
  static void accumulate(op_t* dst, const scalar_t* src, int64_t n, int64_t stride, bool first) {
    if (stride == 1 && first) {
      for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<op_t>(src[k]);
    } else if (stride == 1) {
      for (int64_t k = 0; k < n; ++k) dst[k] += static_cast<op_t>(src[k]);
    } else {
      for (int64_t k = 0; k < n; ++k) dst[k] = (first ? op_t(0) : dst[k]) + static_cast<op_t>(src[k * stride]);
    }
  }

  // dst[k * stride] = src[k] in scalar_t for k in [0, n) (stride 1 vectorised as above).
  static void store(scalar_t* dst, const op_t* src, int64_t n, int64_t stride) {
    if (stride == 1) {
      for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<scalar_t>(src[k]);
    } else {
      for (int64_t k = 0; k < n; ++k) dst[k * stride] = static_cast<scalar_t>(src[k]);
    }
  }

  // Sum of v[0, n) in a fixed order: 8 interleaved partial sums (vectorisable), then those in order.
  static op_t fixed_order_sum(const op_t* v, int64_t n) {
    op_t lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      for (int l = 0; l < 8; ++l) lanes[l] += v[j + l];
    }
    for (; j < n; ++j) lanes[j % 8] += v[j];
    op_t total = 0;
    for (int l = 0; l < 8; ++l) total += lanes[l];
    return total;
  }

  // dbpart [rows, C]: partial sums of db, one row per image (pixels inner) or per work unit
  // (channels inner); grad_bias_top_impl adds the rows up in order.
  void pixels_inner(std::vector<acc_t>& dbpart) const {
    // one unit per (image, channel): its plane is read front to back, one top row's preimage at a time
    dbpart.assign(static_cast<size_t>(N * C), acc_t(0));
    // k when every top column's preimage is exactly k dy columns (W == k * TW, ws[j] == k * j), else 0
    int64_t fold_k = W % TW == 0 ? W / TW : 0;
    for (int64_t j = 0; fold_k > 0 && j <= TW; ++j) {
      if (ws[j] != fold_k * j) fold_k = 0;
    }
    const int64_t plane = std::max<int64_t>(1, H * W);
    at::parallel_for(0, N * C, std::max<int64_t>(1, 65536 / plane), [&](int64_t begin, int64_t end) {
      std::vector<op_t> cs(static_cast<size_t>(W)), v(static_cast<size_t>(TW));
      for (int64_t u = begin; u < end; ++u) {
        const int64_t c = u % C, n = u / C;
        const scalar_t* src = yp + n * s0 + c * s1;
        acc_t plane_total = 0;
        for (int64_t i = 0; i < TH; ++i) {
          if (hs[i] == hs[i + 1]) std::fill(cs.begin(), cs.end(), op_t(0));  // empty preimage
          for (int64_t h = hs[i]; h < hs[i + 1]; ++h) {  // the first row is stored, the others added
            accumulate(cs.data(), src + h * s2, W, s3, h == hs[i]);
          }
          // fold the columns into top columns: v[j] = sum of cs over [ws[j], ws[j + 1])
          if (fold_k == 2) {  // exact 2x (the FPN's sizes): a fixed-stride fold the compiler vectorises
            for (int64_t j = 0; j < TW; ++j) v[j] = cs[2 * j] + cs[2 * j + 1];
          } else if (fold_k == 1) {
            for (int64_t j = 0; j < TW; ++j) v[j] = cs[j];
          } else {
            for (int64_t j = 0; j < TW; ++j) {
              op_t sum = 0;
              for (int64_t w = ws[j]; w < ws[j + 1]; ++w) sum += cs[w];
              v[j] = sum;
            }
          }
          plane_total += static_cast<acc_t>(fixed_order_sum(v.data(), TW));
          if (has_top) store(dtp + n * d0 + c * d1 + i * d2, v.data(), TW, d3);
        }
        dbpart[n * C + c] = plane_total;
      }
    });
  }

  void channels_inner(std::vector<acc_t>& dbpart) const {
    // top columns per unit: the unit's colsum (its dy columns x C) stays under about 256 KB (in L2), so
    // that each unit reads long contiguous runs of dy rows
    const int64_t TJ = std::max<int64_t>(1, std::min<int64_t>(TW, TW * std::max<int64_t>(1, 65536 / std::max<int64_t>(C, 1)) / std::max<int64_t>(W, 1)));
    const int64_t jblocks = (TW + TJ - 1) / TJ;
    dbpart.assign(static_cast<size_t>(N * TH * jblocks * C), acc_t(0));
    at::parallel_for(0, N * TH * jblocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<op_t> colsum, run(static_cast<size_t>(C)), total(static_cast<size_t>(C));
      for (int64_t u = begin; u < end; ++u) {
        const int64_t jb = u % jblocks, i = (u / jblocks) % TH, n = u / jblocks / TH;
        const int64_t j0 = jb * TJ, j1 = std::min(TW, j0 + TJ), w0 = ws[j0], w1 = ws[j1];
        colsum.resize(static_cast<size_t>((w1 - w0) * C));
        if (hs[i] == hs[i + 1]) std::fill(colsum.begin(), colsum.end(), op_t(0));  // empty preimage
        for (int64_t h = hs[i]; h < hs[i + 1]; ++h) {  // the first row is stored, the others added
          for (int64_t w = w0; w < w1; ++w) {
            accumulate(colsum.data() + (w - w0) * C, yp + n * s0 + h * s2 + w * s3, C, s1, h == hs[i]);
          }
        }
        std::fill(total.begin(), total.end(), op_t(0));
        for (int64_t j = j0; j < j1; ++j) {
          if (ws[j] == ws[j + 1]) {
            std::fill(run.begin(), run.end(), op_t(0));  // empty preimage
          } else {
            const op_t* cs = colsum.data() + (ws[j] - w0) * C;
            for (int64_t c = 0; c < C; ++c) run[c] = cs[c];
            for (int64_t w = ws[j] + 1; w < ws[j + 1]; ++w) {
              cs = colsum.data() + (w - w0) * C;
              for (int64_t c = 0; c < C; ++c) run[c] += cs[c];
            }
          }
          for (int64_t c = 0; c < C; ++c) total[c] += run[c];
          if (has_top) store(dtp + n * d0 + i * d2 + j * d3, run.data(), C, d1);
        }
        acc_t* dbrow = dbpart.data() + u * C;
        for (int64_t c = 0; c < C; ++c) dbrow[c] = static_cast<acc_t>(total[c]);
      }
    });
  }
};

template <typename scalar_t>
void grad_bias_top_impl(const at::Tensor& dy, int64_t top_h, int64_t top_w, at::Tensor& db, at::Tensor& dtop) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const GradBiasTopPass<scalar_t> pass(dy, top_h, top_w, dtop);
  std::vector<acc_t> dbpart;
  if (is_channels_last_like(dy)) {
    pass.channels_inner(dbpart);
  } else {
    pass.pixels_inner(dbpart);
  }
  const int64_t C = dy.size(1), rows = static_cast<int64_t>(dbpart.size()) / std::max<int64_t>(C, 1);
  scalar_t* dbp = db.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, C, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(static_cast<size_t>(end - begin), acc_t(0));
    for (int64_t r = 0; r < rows; ++r) {  // rows in order for every channel: deterministic
      const acc_t* row = dbpart.data() + r * C + begin;
      for (int64_t c = 0; c < end - begin; ++c) sum[c] += row[c];
    }
    for (int64_t c = begin; c < end; ++c) dbp[c] = static_cast<scalar_t>(sum[c - begin]);
  });
}

std::tuple<at::Tensor, at::Tensor> lateral_grad_bias_top_cpu(const at::Tensor& grad_out, int64_t top_h,
                                                             int64_t top_w) {
  check_grad_bias_top_inputs(grad_out, top_h, top_w);
  const auto dtype = grad_out.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "fused_fpn::lateral_grad_bias_top (CPU kernel): grad_out dtype must be float32, float64, bfloat16 or "
              "float16, got ", dtype);
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
