// Forward kernel of fused_fpn::lateral on CUDA: one tiled GEMM over pixels with a fused
// bias + nearest-gather epilogue.
//
//   y[n, co, h, w] = sum_ci x[n, ci, h, w] * W[co, ci] + b[co] + top[n, co, src_h(h), src_w(w)]
//   src_h(h) = nearest_src(h, float(Ht) / float(H), Ht)   (csrc/nearest.h: ATen's float32 rule)
//
// As a GEMM: M = N*H*W pixels (rows), K = Cin, N = Cout (columns); C[m, co] = X[m, :] . W[co, :].
//
// Shapes and layouts
//   x    [N, Cin, H, W]   any strides (elements). Pixel m = (n, h, w) starts at n*sx0 + h*sx2 + w*sx3.
//   W    [Cout, Cin]      contiguous (the host makes it so; it is small).
//   b    [Cout]           contiguous (optional).
//   top  [N, Cout, Ht, Wt] any strides (optional), gathered in the epilogue, never upsampled in memory.
//   y    [N, Cout, H, W]  channels_last-contiguous (Layout = ChannelsLast) or contiguous (Layout = Nchw),
//                         allocated by the host by the rule "channels_last iff x.stride(1) < x.stride(3)".
//
// CTA tile: BM = 128 pixels x BN = 128 output channels, BK = 64 bytes of K per stage, a 3-stage
// cp.async pipeline of the x and W tiles (16-byte copies when strides and pointers
// allow, element loads otherwise: odd channel counts, misaligned or strided views). The CTA
// index puts the Cout tiles fastest, so the CTAs that share an x tile run together and the
// second read of x hits L2 (x is read from DRAM about once). After the K loop the fp32
// accumulators go through shared memory (the pipeline buffers are reused) so the epilogue reads
// and writes in the output's contiguous direction with 16-byte accesses.
//
// Split-K (p.k_split > 1, chosen by the host only when the output tiles cannot fill the GPU and K
// is deep, e.g. a P5-sized level with a top map): the CTAs of one output tile each own a range of K
// tiles and store raw fp32 sums to a workspace; lateral_splitk_epilogue_kernel then adds the
// k_split partial sums in a fixed order, the bias and the gathered top. No atomics: results are
// deterministic.
//
// Threads: the tensor-core paths run 4 warps, 2 x 2 warp tiles of 64 x 64 (128 fp32 accumulators
// per thread: each fragment load feeds 4 MMAs, and the next K slice's fragments load while this
// slice's MMAs issue); fp16 goes through nvcuda::wmma (WmmaMath), bf16 and TF32 through ldmatrix +
// mma.sync in PTX (PtxMma); the exact-fp32 FMA path runs 16 x 16 threads of 8 x 8 outputs.
//
// Template parameters (compile-time switches, each instantiated explicitly in a .cu file):
//   T        element type: __half, __nv_bfloat16, float (accumulation is always fp32).
//   Math     MathWmma (fp16/bf16 tensor cores: WMMA for fp16, ldmatrix + mma.sync for bf16),
//            MathTf32 (fp32 inputs on TF32 tensor cores through ldmatrix + mma.sync, when
//            cudnn.allow_tf32 is on, as eager conv does), MathFfma (exact fp32 FMA otherwise).
//   Layout   ChannelsLast / Nchw: which direction of x and y is contiguous, so the shared-memory
//            tiles and the epilogue are arranged for coalesced, vectorized global accesses.
//   kHasBias whether b exists (no load, no add, no shared staging when false).
//   kHasTop  whether top exists (no per-pixel gather offsets, no loads when false).
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <mma.h>

#include <algorithm>
#include <atomic>
#include <type_traits>

#include "../nearest.h"
#include "cuda_utils.cuh"
#include "lateral_cuda.h"

namespace fused_fpn {
namespace cuda {

template <typename T, typename Math, typename Layout>
struct FwdTile {
  static constexpr bool kCL = std::is_same<Layout, ChannelsLast>::value;
  static constexpr bool kTensorCores = !std::is_same<Math, MathFfma>::value;
  static constexpr int BM = kFwdBM;
  static constexpr int BN = kFwdBN;
  static constexpr int BK = 64 / static_cast<int>(sizeof(T));  // 32 (fp16/bf16) or 16 (fp32)
  static constexpr int VEC = Vec16<T>::kN;                      // elements per 16 bytes
  static constexpr int PAD = VEC;                               // 16 bytes of row padding
  // TF32 Nchw reads its A operands with 32-bit shared loads, lane (g, q) at As[q][g] (PtxMma): a
  // pitch of BM + 8 floats puts the 32 lanes in 32 banks (8q + g), BM + 4 in 20 (4q + g).
  static constexpr int PAD_A = std::is_same<Math, MathTf32>::value && !kCL ? 2 * VEC : PAD;
  static constexpr int kThreads = kTensorCores ? kFwdThreadsMma : kFwdThreadsFfma;
  static constexpr int kStages = kFwdStages;
  static constexpr int kEpiBatch = kEpiChunks / kThreads;      // 16-byte chunks per thread per epilogue batch: 8 or 4
  // Shared-memory tiles (elements of T):
  //   A (x): ChannelsLast As[m][k], pitch LDA = BK + PAD;  Nchw As[k][m], pitch LDA = BM + PAD_A
  //   B (W): Bs[n][k], pitch LDB = BK + PAD (column-major K x N for the MMA)
  //   C (fp32 accumulators, after the K loop): ChannelsLast Cs[m][n] pitch BN + 4, Nchw Cs[n][m] pitch BM + 4
  static constexpr int LDA = kCL ? BK + PAD : BM + PAD_A;
  static constexpr int LDB = BK + PAD;
  static constexpr int LDC = kCL ? BN + 4 : BM + 4;
  static constexpr int kABytes = (kCL ? BM * LDA : BK * LDA) * static_cast<int>(sizeof(T));
  static constexpr int kBBytes = BN * LDB * static_cast<int>(sizeof(T));
  static constexpr int kStageBytes = kABytes + kBBytes;
  static constexpr int kPipeBytes = kStages * kStageBytes;
  static constexpr int kCBytes = (kCL ? BM : BN) * LDC * 4;
  static constexpr int kUnionBytes = ((kPipeBytes > kCBytes ? kPipeBytes : kCBytes) + 127) / 128 * 128;
  // then: x offset, top offset and output offset of each of the BM pixels (int64), bias (fp32)
  static constexpr int kSmemBytes = kUnionBytes + 3 * BM * 8 + BN * 4;
  static_assert(kABytes % 128 == 0 && kBBytes % 128 == 0, "stage buffers keep 128-byte alignment");
  // Warp tiling of the 128 x 128 CTA tile for the tensor-core paths: 2 x 2 warps of 64 x 64.
  static constexpr int kWarpsM = 2, kWarpsN = 2, WM = BM / kWarpsM, WN = BN / kWarpsN;
  static constexpr int kFragsM = WM / 16, kFragsN = WN / 16;
  static_assert(!kTensorCores || kWarpsM * kWarpsN * 32 == kThreads, "one warp per warp tile");
};

// ---- tensor-core MMA over one BK slice of the stage buffers --------------------------------
// acc += A(BM x BK) . B(BK x BN) for a warp's 64 x 64, in K slices of KF with two operand sets:
// slice s + 1's operands load from shared memory (Math::load) while slice s's MMAs issue
// (Math::mma_all).
template <int kSlices, int KF, typename Math, typename T>
__device__ __forceinline__ void run_slices(Math& math, const T* As, const T* Bs) {
  typename Math::Operands op[2];
  math.load(op[0], As, Bs, 0);
#pragma unroll
  for (int s = 0; s < kSlices; ++s) {
    if (s + 1 < kSlices) math.load(op[(s + 1) % 2], As, Bs, (s + 1) * KF);
    math.mma_all(op[s % 2]);
  }
}

// fp16 through nvcuda::wmma.
template <typename Layout>
struct WmmaMath {
  using Cfg = FwdTile<__half, MathWmma, Layout>;
  static constexpr int KF = 16;
  using ALayout = typename std::conditional<Cfg::kCL, nvcuda::wmma::row_major, nvcuda::wmma::col_major>::type;
  using AccFrag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, KF, float>;
  using AFrag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, KF, __half, ALayout>;
  using BFrag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, KF, __half, nvcuda::wmma::col_major>;

  AccFrag acc[Cfg::kFragsM][Cfg::kFragsN];
  int wm, wn;  // this warp's tile origin inside the CTA tile

  __device__ __forceinline__ void init(int tid) {
    const int warp = tid / 32;
    wm = (warp % Cfg::kWarpsM) * Cfg::WM;
    wn = (warp / Cfg::kWarpsM) * Cfg::WN;
#pragma unroll
    for (int i = 0; i < Cfg::kFragsM; ++i)
#pragma unroll
      for (int j = 0; j < Cfg::kFragsN; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
  }

  // The warp's A fragments (its 64 rows) and B fragments (its 64 columns) of one K slice.
  struct Operands {
    AFrag a[Cfg::kFragsM];
    BFrag b[Cfg::kFragsN];
  };

  __device__ __forceinline__ void load(Operands& op, const __half* As, const __half* Bs, int ks) const {
#pragma unroll
    for (int i = 0; i < Cfg::kFragsM; ++i) {
      const int m = wm + i * 16;
      nvcuda::wmma::load_matrix_sync(op.a[i], Cfg::kCL ? As + m * Cfg::LDA + ks : As + ks * Cfg::LDA + m, Cfg::LDA);
    }
#pragma unroll
    for (int j = 0; j < Cfg::kFragsN; ++j) {
      nvcuda::wmma::load_matrix_sync(op.b[j], Bs + (wn + j * 16) * Cfg::LDB + ks, Cfg::LDB);
    }
  }

  // acc += one K slice's A . B for this warp's 64 x 64 (16 MMAs).
  __device__ __forceinline__ void mma_all(const Operands& op) {
#pragma unroll
    for (int i = 0; i < Cfg::kFragsM; ++i)
#pragma unroll
      for (int j = 0; j < Cfg::kFragsN; ++j) nvcuda::wmma::mma_sync(acc[i][j], op.a[i], op.b[j], acc[i][j]);
  }

  __device__ __forceinline__ void compute(const __half* As, const __half* Bs) {
    run_slices<Cfg::BK / KF, KF>(*this, As, Bs);
  }

  // Accumulators -> Cs (fp32): ChannelsLast Cs[m][n] (row-major), Nchw Cs[n][m] (column-major).
  __device__ __forceinline__ void store(float* Cs) {
#pragma unroll
    for (int i = 0; i < Cfg::kFragsM; ++i)
#pragma unroll
      for (int j = 0; j < Cfg::kFragsN; ++j) {
        const int m = wm + i * 16, n = wn + j * 16;
        if constexpr (Cfg::kCL) {
          nvcuda::wmma::store_matrix_sync(Cs + m * Cfg::LDC + n, acc[i][j], Cfg::LDC, nvcuda::wmma::mem_row_major);
        } else {
          nvcuda::wmma::store_matrix_sync(Cs + n * Cfg::LDC + m, acc[i][j], Cfg::LDC, nvcuda::wmma::mem_col_major);
        }
      }
  }
};

// ---- bf16 and TF32: the same warp tiling with ldmatrix + mma.sync (PTX) instead of WMMA --------
// nvcc 13.0 lowers nvcuda::wmma's bf16 and TF32 fragment loads to 32-bit generic loads (sm_90 SASS:
// 64 LD.E per K step where the fp16 kernels have 16 LDSM; for bf16 Nchw also 32 MOVM register
// transposes), so these two issue the instructions themselves (cuda_utils.cuh). Per warp and K slice
// (16 deep for bf16, 8 for TF32): 4 ldmatrix.x4 for B (one per 16 columns), for A 4 ldmatrix.x4
// (one per 16 rows) except TF32 Nchw (4 32-bit shared loads per 16 rows: ldmatrix.trans
// transposes 16-bit elements), and 32 MMAs (m16n8k16 bf16 / m16n8k8 TF32). The operand registers
// are laid out alike for both (the PTX ISA's): lane l, g = l / 4, q = l % 4, c = 16 bytes of a row
// (8 bf16 or 4 fp32):
//   a[0] = A[g][q-th pair or element]  a[1] = the same of row g + 8  a[2], a[3] = rows g, g + 8 at c
//   b[0] = B[q-th pair or element][g]  b[1] = the same at c
// acc[i][j][v]: row wm + 16 i + g + 8 (v / 2), column wn + 8 j + 2q + v % 2.
template <typename T>
struct PtxMmaOp;
template <>
struct PtxMmaOp<__nv_bfloat16> {
  static constexpr int K = 16;  // mma.sync.m16n8k16, bf16 operands as loaded
  __device__ __forceinline__ static uint32_t operand(uint32_t v) { return v; }
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    mma_bf16_16816(d, a, b);
  }
};
template <>
struct PtxMmaOp<float> {
  static constexpr int K = 8;  // mma.sync.m16n8k8, fp32 operands rounded to TF32 (as WMMA's __float_to_tf32)
  __device__ __forceinline__ static uint32_t operand(uint32_t v) { return f32_to_tf32(v); }
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    mma_tf32_1688(d, a, b);
  }
};

template <typename T, typename Math, typename Layout>
struct PtxMma {
  using Cfg = FwdTile<T, Math, Layout>;
  using Op = PtxMmaOp<T>;
  static constexpr int KF = Op::K;
  static constexpr int kC = 16 / static_cast<int>(sizeof(T));  // elements in 16 bytes: KF / 2
  static_assert(2 * kC == KF, "an A or B row of one K slice is two 16-byte halves");
  static constexpr int kTilesM = Cfg::WM / 16;  // m16 tiles per warp
  static constexpr int kTilesN = Cfg::WN / 8;   // n8 tiles per warp
  static_assert(kTilesN % 2 == 0, "one ldmatrix.x4 loads the B operands of two n8 tiles");

  float acc[kTilesM][kTilesN][4];
  int wm, wn, lane;

  __device__ __forceinline__ void init(int tid) {
    const int warp = tid / 32;
    lane = tid % 32;
    wm = (warp % Cfg::kWarpsM) * Cfg::WM;
    wn = (warp / Cfg::kWarpsM) * Cfg::WN;
#pragma unroll
    for (int i = 0; i < kTilesM; ++i)
#pragma unroll
      for (int j = 0; j < kTilesN; ++j)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.0f;
  }

  struct Operands {
    uint32_t a[kTilesM][4];
    uint32_t b[kTilesN][2];
  };

  // Lane l gives the row address of matrix l / 8, row l % 8, of each ldmatrix.x4 (rows of 16 bytes:
  // kC elements of K):
  //   A, ChannelsLast (As[m][k]): matrices (m 0-7, first half of the slice's K), (m 8-15, first
  //     half), (m 0-7, second half), (m 8-15, second half) = a[0..3]. Nchw (As[k][m]): bf16, the
  //     same four stored as rows of k, loaded transposed; TF32, element loads at a's positions.
  //   B (Bs[n][k], i.e. B column-major): (n 0-7, first half), (n 0-7, second half) = b of n8 tile
  //     2jj; (n 8-15, first half), (n 8-15, second half) = b of n8 tile 2jj + 1.
  __device__ __forceinline__ void load(Operands& op, const T* As, const T* Bs, int ks) const {
    const int mat = lane / 8, row = lane % 8;
#pragma unroll
    for (int i = 0; i < kTilesM; ++i) {
      const int m0 = wm + i * 16;
      if constexpr (Cfg::kCL) {
        ldmatrix_x4(op.a[i], As + (m0 + (mat % 2) * 8 + row) * Cfg::LDA + ks + (mat / 2) * kC);
      } else if constexpr (sizeof(T) == 2) {
        ldmatrix_x4_trans(op.a[i], As + (ks + (mat / 2) * kC + row) * Cfg::LDA + m0 + (mat % 2) * 8);
      } else {  // a[v] = A[g + 8 (v % 2)][q + 4 (v / 2)] = As[ks + q + 4 (v / 2)][m0 + g + 8 (v % 2)]
        const T* a = As + (ks + lane % 4) * Cfg::LDA + m0 + lane / 4;
        op.a[i][0] = __float_as_uint(a[0]);
        op.a[i][1] = __float_as_uint(a[8]);
        op.a[i][2] = __float_as_uint(a[4 * Cfg::LDA]);
        op.a[i][3] = __float_as_uint(a[4 * Cfg::LDA + 8]);
      }
#pragma unroll
      for (int v = 0; v < 4; ++v) op.a[i][v] = Op::operand(op.a[i][v]);
    }
#pragma unroll
    for (int jj = 0; jj < kTilesN / 2; ++jj) {
      uint32_t r[4];
      ldmatrix_x4(r, Bs + (wn + jj * 16 + (mat / 2) * 8 + row) * Cfg::LDB + ks + (mat % 2) * kC);
      op.b[2 * jj][0] = Op::operand(r[0]);
      op.b[2 * jj][1] = Op::operand(r[1]);
      op.b[2 * jj + 1][0] = Op::operand(r[2]);
      op.b[2 * jj + 1][1] = Op::operand(r[3]);
    }
  }

  // acc += one K slice's A . B for this warp's 64 x 64 (32 MMAs).
  __device__ __forceinline__ void mma_all(const Operands& op) {
#pragma unroll
    for (int i = 0; i < kTilesM; ++i)
#pragma unroll
      for (int j = 0; j < kTilesN; ++j) Op::mma(acc[i][j], op.a[i], op.b[j]);
  }

  __device__ __forceinline__ void compute(const T* As, const T* Bs) {
    run_slices<Cfg::BK / KF, KF>(*this, As, Bs);
  }

  // Accumulators -> Cs (fp32): ChannelsLast Cs[m][n] (row-major), Nchw Cs[n][m] (column-major).
  __device__ __forceinline__ void store(float* Cs) {
    const int g = lane / 4, q = lane % 4;
#pragma unroll
    for (int i = 0; i < kTilesM; ++i)
#pragma unroll
      for (int j = 0; j < kTilesN; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // rows g and g + 8
          const int m = wm + i * 16 + g + 8 * h, n = wn + j * 8 + 2 * q;
          if constexpr (Cfg::kCL) {
            Cs[m * Cfg::LDC + n] = acc[i][j][2 * h];
            Cs[m * Cfg::LDC + n + 1] = acc[i][j][2 * h + 1];
          } else {
            Cs[n * Cfg::LDC + m] = acc[i][j][2 * h];
            Cs[(n + 1) * Cfg::LDC + m] = acc[i][j][2 * h + 1];
          }
        }
  }
};

// ---- exact fp32 FMA on the CUDA cores: each thread owns an 8 x 8 micro-tile -----------------
// Thread (tx, ty) = (tid % 16, tid / 16) computes rows ty + 16 i and columns tx + 16 j.
template <typename Layout>
struct FfmaMath {
  using Cfg = FwdTile<float, MathFfma, Layout>;
  static constexpr int TM = Cfg::BM / 16, TN = Cfg::BN / 16;
  static_assert(Cfg::kThreads == 256, "16 x 16 threads");
  float acc[TM][TN];
  int tx, ty;

  __device__ __forceinline__ void init(int tid) {
    tx = tid % 16;
    ty = tid / 16;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;
  }

  __device__ __forceinline__ void compute(const float* As, const float* Bs) {
#pragma unroll 2
    for (int k = 0; k < Cfg::BK; ++k) {
      float a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const int m = ty + 16 * i;
        a[i] = Cfg::kCL ? As[m * Cfg::LDA + k] : As[k * Cfg::LDA + m];
      }
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = Bs[(tx + 16 * j) * Cfg::LDB + k];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(float* Cs) {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int m = ty + 16 * i, n = tx + 16 * j;
        Cs[Cfg::kCL ? m * Cfg::LDC + n : n * Cfg::LDC + m] = acc[i][j];
      }
  }
};

template <typename T, typename Math, typename Layout>
struct MathImpl;
template <typename Layout>
struct MathImpl<__half, MathWmma, Layout> {
  using type = WmmaMath<Layout>;
};
template <typename Layout>
struct MathImpl<__nv_bfloat16, MathWmma, Layout> {
  using type = PtxMma<__nv_bfloat16, MathWmma, Layout>;
};
template <typename Layout>
struct MathImpl<float, MathTf32, Layout> {
  using type = PtxMma<float, MathTf32, Layout>;
};
template <typename Layout>
struct MathImpl<float, MathFfma, Layout> {
  using type = FfmaMath<Layout>;
};

// ---- loads of one pipeline stage (k-tile k0) into As / Bs ------------------------------------
// 32-bit tile-local indices (rows / cols / K left in this tile) keep the register budget: only
// the per-pixel x offsets (s_xoff) and the NCHW channel stride products are 64-bit.
//   rows_valid: pixels of this tile < M;  cols_valid: output channels < Cout;  w_tile = W + co0 * Cin.
template <typename T, typename Math, typename Layout>
__device__ __forceinline__ void load_stage(const LateralFwdParams& p, const T* __restrict__ x,
                                           const T* __restrict__ w_tile, const int64_t* s_xoff, int rows_valid,
                                           int cols_valid, int cin, int k0, T* As, T* Bs, int tid) {
  using Cfg = FwdTile<T, Math, Layout>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, VEC = Cfg::VEC, NT = Cfg::kThreads;
  const T zero = from_float<T>(0.0f);
  // A = x tile
  if (p.vec_x) {
    if constexpr (Cfg::kCL) {  // 16 bytes = VEC consecutive channels of one pixel (x.stride(1) == 1)
      constexpr int CPR = BK / VEC;
      static_assert((BM * CPR) % NT == 0, "whole chunks per thread");
#pragma unroll
      for (int it = 0; it < BM * CPR / NT; ++it) {
        const int c = tid + it * NT;
        const int r = c / CPR, kc = (c % CPR) * VEC;
        const int k = k0 + kc;
        const bool valid = (r < rows_valid) && (k < cin);
        cp_async_16(As + r * Cfg::LDA + kc, valid ? x + s_xoff[r] + k : x, valid);
      }
    } else {  // 16 bytes = VEC consecutive pixels of one channel (same image: HW % VEC == 0)
      constexpr int CPR = BM / VEC;
      static_assert((BK * CPR) % NT == 0, "whole chunks per thread");
#pragma unroll
      for (int it = 0; it < BK * CPR / NT; ++it) {
        const int c = tid + it * NT;
        const int kk = c / CPR, r = (c % CPR) * VEC;
        const int k = k0 + kk;
        const bool valid = (r < rows_valid) && (k < cin);
        cp_async_16(As + kk * Cfg::LDA + r, valid ? x + s_xoff[r] + static_cast<int64_t>(k) * p.sx1 : x, valid);
      }
    }
  } else {
    if constexpr (Cfg::kCL) {  // consecutive threads walk channels (contiguous in channels_last)
#pragma unroll 1
      for (int e = tid; e < BM * BK; e += NT) {
        const int r = e / BK, kk = e % BK;
        const int k = k0 + kk;
        As[r * Cfg::LDA + kk] =
            (r < rows_valid && k < cin) ? x[s_xoff[r] + static_cast<int64_t>(k) * p.sx1] : zero;
      }
    } else {  // consecutive threads walk pixels (contiguous in NCHW)
#pragma unroll 1
      for (int e = tid; e < BM * BK; e += NT) {
        const int kk = e / BM, r = e % BM;
        const int k = k0 + kk;
        As[kk * Cfg::LDA + r] =
            (r < rows_valid && k < cin) ? x[s_xoff[r] + static_cast<int64_t>(k) * p.sx1] : zero;
      }
    }
  }
  // B = W tile, Bs[n][k]; W is contiguous [Cout, Cin] and r * Cin < 2^31 (host check)
  if (p.vec_w) {
    constexpr int CPR = BK / VEC;
    static_assert((BN * CPR) % NT == 0, "whole chunks per thread");
#pragma unroll
    for (int it = 0; it < BN * CPR / NT; ++it) {
      const int c = tid + it * NT;
      const int r = c / CPR, kc = (c % CPR) * VEC;
      const int k = k0 + kc;
      const bool valid = (r < cols_valid) && (k < cin);
      cp_async_16(Bs + r * Cfg::LDB + kc, valid ? w_tile + r * cin + k : w_tile, valid);
    }
  } else {
#pragma unroll 1
    for (int e = tid; e < BN * BK; e += NT) {
      const int r = e / BK, kk = e % BK;
      const int k = k0 + kk;
      Bs[r * Cfg::LDB + kk] = (r < cols_valid && k < cin) ? w_tile[r * cin + k] : zero;
    }
  }
}

template <typename T, typename Math, typename Layout, bool kHasBias, bool kHasTop>
__global__ void __launch_bounds__(FwdTile<T, Math, Layout>::kThreads, 2) lateral_fwd_kernel(const LateralFwdParams p) {
  using Cfg = FwdTile<T, Math, Layout>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, VEC = Cfg::VEC, NT = Cfg::kThreads;
  constexpr int kEpiBatch = Cfg::kEpiBatch;
  extern __shared__ __align__(128) unsigned char smem[];
  int64_t* s_xoff = reinterpret_cast<int64_t*>(smem + Cfg::kUnionBytes);  // x offset of pixel r
  int64_t* s_toff = s_xoff + BM;  // top offset of pixel r's nearest source (channel 0)
  int64_t* s_ooff = s_toff + BM;  // output offset of pixel r (channel 0)
  float* s_bias = reinterpret_cast<float*>(s_ooff + BM);
  float* Cs = reinterpret_cast<float*>(smem);

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w = static_cast<const T*>(p.w);
  T* __restrict__ out = static_cast<T*>(p.out);
  const int tid = threadIdx.x;
  const int64_t HW = p.H * p.W;
  const int64_t M = p.N * HW;
  const int n_tiles = static_cast<int>((p.Cout + BN - 1) / BN);
  const int64_t bid = blockIdx.x;
  const int co0 = static_cast<int>(bid % n_tiles) * BN;  // Cout tiles fastest: x tiles shared in L2
  const int64_t split = (bid / n_tiles) % p.k_split;     // this CTA's K range (split-K)
  const int64_t m0 = (bid / n_tiles / p.k_split) * BM;

  // Per-pixel offsets of this tile (64-bit), computed once.
  for (int r = tid; r < BM; r += NT) {
    const int64_t m = m0 + r;
    int64_t xo = 0, to = 0, oo = 0;
    if (m < M) {
      const int64_t n = m / HW, hw = m - n * HW, h = hw / p.W, ww = hw - h * p.W;
      xo = n * p.sx0 + h * p.sx2 + ww * p.sx3;
      if constexpr (kHasTop) {
        to = n * p.st0 + nearest_src(h, p.scale_h, p.Ht) * p.st2 + nearest_src(ww, p.scale_w, p.Wt) * p.st3;
      }
      oo = Cfg::kCL ? m * p.Cout : n * p.Cout * HW + hw;
    }
    s_xoff[r] = xo;
    s_toff[r] = to;
    s_ooff[r] = oo;
  }
  if constexpr (kHasBias) {
    const T* bias = static_cast<const T*>(p.bias);
    for (int c = tid; c < BN; c += NT) s_bias[c] = (co0 + c < p.Cout) ? to_float(bias[co0 + c]) : 0.0f;
  }
  __syncthreads();

  typename MathImpl<T, Math, Layout>::type mma;
  mma.init(tid);
  const int64_t KT_all = (p.Cin + BK - 1) / BK;
  const int64_t kt_begin = split * p.k_tiles_per_split;
  const int64_t kt_end = kt_begin + p.k_tiles_per_split < KT_all ? kt_begin + p.k_tiles_per_split : KT_all;
  const int64_t KT = kt_end > kt_begin ? kt_end - kt_begin : 0;  // K tiles of this CTA: kt_begin + [0, KT)
  const int rows_valid = static_cast<int>(M - m0 < BM ? M - m0 : BM);
  const int cols_valid = static_cast<int>(p.Cout - co0 < BN ? p.Cout - co0 : BN);
  const int cin = static_cast<int>(p.Cin);
  const T* __restrict__ w_tile = w + static_cast<int64_t>(co0) * p.Cin;
  auto stage_a = [&](int s) { return reinterpret_cast<T*>(smem + s * Cfg::kStageBytes); };
  auto stage_b = [&](int s) { return reinterpret_cast<T*>(smem + s * Cfg::kStageBytes + Cfg::kABytes); };

  // Prologue: stages 0 .. kStages-2 in flight (one commit group each, possibly empty).
#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < KT) {
      load_stage<T, Math, Layout>(p, x, w_tile, s_xoff, rows_valid, cols_valid, cin,
                                  static_cast<int>((kt_begin + s) * BK), stage_a(s), stage_b(s), tid);
    }
    cp_async_commit();
  }
  for (int64_t kt = 0; kt < KT; ++kt) {
    cp_async_wait<Cfg::kStages - 2>();  // k-tile kt has landed (this thread's copies) ...
    __syncthreads();                    // ... and everybody's; and slot (kt-1) % kStages is free
    const int64_t nk = kt + Cfg::kStages - 1;
    if (nk < KT) {
      const int s = static_cast<int>(nk % Cfg::kStages);
      load_stage<T, Math, Layout>(p, x, w_tile, s_xoff, rows_valid, cols_valid, cin,
                                  static_cast<int>((kt_begin + nk) * BK), stage_a(s), stage_b(s), tid);
    }
    cp_async_commit();
    const int s = static_cast<int>(kt % Cfg::kStages);
    mma.compute(stage_a(s), stage_b(s));
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the stage buffers: reuse them for the C tile
  mma.store(Cs);
  __syncthreads();

  if (p.k_split > 1) {  // split-K: raw fp32 partial sums; lateral_splitk_epilogue_kernel finishes
    float* __restrict__ part = p.partial;
    if constexpr (Cfg::kCL) {  // [k_split, M, Cout], consecutive threads along Cout
#pragma unroll 1
      for (int e = tid; e < BM * BN; e += NT) {
        const int r = e / BN, cc = e % BN;
        if (m0 + r < M && co0 + cc < p.Cout) part[(split * M + m0 + r) * p.Cout + co0 + cc] = Cs[r * Cfg::LDC + cc];
      }
    } else {  // [k_split, Cout, M], consecutive threads along pixels
#pragma unroll 1
      for (int e = tid; e < BM * BN; e += NT) {
        const int cc = e / BM, r = e % BM;
        if (m0 + r < M && co0 + cc < p.Cout) part[(split * p.Cout + co0 + cc) * M + m0 + r] = Cs[cc * Cfg::LDC + r];
      }
    }
    return;
  }

  // Epilogue: y = C + b + top[nearest], each output element written exactly once. The vectorized
  // paths take kEpiBatch 16-byte chunks per thread at a time (kEpiChunks = 1024 per CTA, whatever
  // its thread count) and issue all their top gathers before the first add: one chunk at a time
  // kept a single gather in flight per thread, so the loop waited a full memory round trip per chunk.
  const T* __restrict__ top = static_cast<const T*>(p.top);
  if constexpr (Cfg::kCL) {
    if (p.vec_out) {  // Cout % VEC == 0: a 16-byte chunk is VEC channels of one pixel
      constexpr int CPR = BN / VEC;
      static_assert((BM * CPR) % (NT * kEpiBatch) == 0, "whole batches per thread");
#pragma unroll 1
      for (int c0 = tid; c0 < BM * CPR; c0 += NT * kEpiBatch) {
        Pack16<T> tops[kEpiBatch];  // the batch's top chunks: every gather issued before the first add
        if constexpr (kHasTop) {
#pragma unroll
          for (int u = 0; u < kEpiBatch; ++u) {
            const int c = c0 + u * NT, r = c / CPR, co = co0 + (c % CPR) * VEC;
            if (m0 + r >= M || co >= p.Cout) continue;
            const T* tp = top + s_toff[r] + static_cast<int64_t>(co) * p.st1;
            if (p.vec_top) {
              tops[u].raw = *reinterpret_cast<const uint4*>(tp);
            } else {
#pragma unroll
              for (int i = 0; i < VEC; ++i) tops[u].e[i] = tp[i * p.st1];
            }
          }
        }
#pragma unroll
        for (int u = 0; u < kEpiBatch; ++u) {
          const int c = c0 + u * NT, r = c / CPR, cc = (c % CPR) * VEC, co = co0 + cc;
          if (m0 + r >= M || co >= p.Cout) continue;
          float v[VEC];
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            v[i] = Cs[r * Cfg::LDC + cc + i];
            if constexpr (kHasBias) v[i] += s_bias[cc + i];
            if constexpr (kHasTop) v[i] += to_float(tops[u].e[i]);
          }
          store16_from_float<T>(out + s_ooff[r] + co, v);
        }
      }
    } else {
#pragma unroll 1
      for (int e = tid; e < BM * BN; e += NT) {
        const int r = e / BN, cc = e % BN;
        const int64_t m = m0 + r;
        const int co = co0 + cc;
        if (m >= M || co >= p.Cout) continue;
        float v = Cs[r * Cfg::LDC + cc];
        if constexpr (kHasBias) v += s_bias[cc];
        if constexpr (kHasTop) v += to_float(top[s_toff[r] + co * p.st1]);
        out[s_ooff[r] + co] = from_float<T>(v);
      }
    }
  } else {
    if (p.vec_out) {  // H*W % VEC == 0: a 16-byte chunk is VEC pixels of one channel, one image
      constexpr int CPC = BM / VEC;
      static_assert((BN * CPC) % (NT * kEpiBatch) == 0, "whole batches per thread");
#pragma unroll 1
      for (int c0 = tid; c0 < BN * CPC; c0 += NT * kEpiBatch) {
        Pack16<T> tops[kEpiBatch];  // the batch's gathered top values, all loads issued first
        if constexpr (kHasTop) {
#pragma unroll
          for (int u = 0; u < kEpiBatch; ++u) {
            const int c = c0 + u * NT, r = (c % CPC) * VEC, co = co0 + c / CPC;
            if (m0 + r >= M || co >= p.Cout) continue;
#pragma unroll
            for (int i = 0; i < VEC; ++i) tops[u].e[i] = top[s_toff[r + i] + static_cast<int64_t>(co) * p.st1];
          }
        }
#pragma unroll
        for (int u = 0; u < kEpiBatch; ++u) {
          const int c = c0 + u * NT, cc = c / CPC, r = (c % CPC) * VEC, co = co0 + cc;
          if (m0 + r >= M || co >= p.Cout) continue;
          float v[VEC];
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            v[i] = Cs[cc * Cfg::LDC + r + i];
            if constexpr (kHasBias) v[i] += s_bias[cc];
            if constexpr (kHasTop) v[i] += to_float(tops[u].e[i]);
          }
          store16_from_float<T>(out + s_ooff[r] + static_cast<int64_t>(co) * HW, v);
        }
      }
    } else {
#pragma unroll 1
      for (int e = tid; e < BM * BN; e += NT) {
        const int cc = e / BM, r = e % BM;
        const int64_t m = m0 + r;
        const int co = co0 + cc;
        if (m >= M || co >= p.Cout) continue;
        float v = Cs[cc * Cfg::LDC + r];
        if constexpr (kHasBias) v += s_bias[cc];
        if constexpr (kHasTop) v += to_float(top[s_toff[r] + co * p.st1]);
        out[s_ooff[r] + static_cast<int64_t>(co) * HW] = from_float<T>(v);
      }
    }
  }
}

// Second pass of split-K: y = sum_{s < k_split} partial[s] (in order s = 0, 1, ...) + b + top[nearest].
// One thread per output element, consecutive threads along the output's contiguous dimension
// (Cout for ChannelsLast, pixels for Nchw). Same template switches as the GEMM kernel minus Math.
template <typename T, typename Layout, bool kHasBias, bool kHasTop>
__global__ void __launch_bounds__(256) lateral_splitk_epilogue_kernel(const LateralFwdParams p) {
  constexpr bool kCL = std::is_same<Layout, ChannelsLast>::value;
  const int64_t HW = p.H * p.W, M = p.N * HW, total = M * p.Cout;
  const float* __restrict__ part = p.partial;
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  const T* __restrict__ top = static_cast<const T*>(p.top);
  T* __restrict__ out = static_cast<T*>(p.out);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = kCL ? idx / p.Cout : idx % M;
    const int64_t co = kCL ? idx % p.Cout : idx / M;
    float v = 0.0f;
    for (int64_t s = 0; s < p.k_split; ++s) v += part[s * total + idx];
    if constexpr (kHasBias) v += to_float(bias[co]);
    const int64_t n = m / HW, hw = m - n * HW;
    if constexpr (kHasTop) {
      const int64_t h = hw / p.W, w = hw - h * p.W;
      v += to_float(top[n * p.st0 + co * p.st1 + nearest_src(h, p.scale_h, p.Ht) * p.st2 +
                        nearest_src(w, p.scale_w, p.Wt) * p.st3]);
    }
    out[kCL ? idx : (n * p.Cout + co) * HW + hw] = from_float<T>(v);
  }
}

// Host launcher of one instantiation, on `stream`.
template <typename T, typename Math, typename Layout, bool kHasBias, bool kHasTop>
void launch_lateral_fwd(const LateralFwdParams& p, cudaStream_t stream) {
  using Cfg = FwdTile<T, Math, Layout>;
  auto kernel = lateral_fwd_kernel<T, Math, Layout, kHasBias, kHasTop>;
  // Dynamic shared memory above 48 KiB needs an opt-in, once per device and instantiation (one bit
  // per device 0..63; a device of a higher index opts in on every launch, which is also correct).
  static std::atomic<uint64_t> configured{0};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (!(configured.load(std::memory_order_relaxed) & bit)) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
    configured.fetch_or(bit, std::memory_order_relaxed);
  }
  const int64_t M = p.N * p.H * p.W;
  TORCH_CHECK(p.k_split >= 1 && (p.k_split == 1 || p.partial != nullptr),
              "fused_fpn::lateral (CUDA): split-K needs a workspace, got k_split = ", p.k_split);
  const int64_t blocks = ((M + Cfg::BM - 1) / Cfg::BM) * ((p.Cout + Cfg::BN - 1) / Cfg::BN) * p.k_split;
  TORCH_CHECK(blocks <= 0x7fffffffLL, "fused_fpn::lateral (CUDA): too many output tiles (", blocks,
              ") for one launch: N*H*W = ", M, ", Cout = ", p.Cout);
  kernel<<<static_cast<unsigned>(blocks), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.k_split > 1) {
    const int64_t total = M * p.Cout;
    const int64_t eblocks = std::min<int64_t>((total + 255) / 256, int64_t{1} << 20);
    lateral_splitk_epilogue_kernel<T, Layout, kHasBias, kHasTop><<<static_cast<unsigned>(eblocks), 256, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Dispatch of one (dtype, math) over layout x has-bias x has-top.
template <typename T, typename Math>
void dispatch_lateral_fwd(const LateralFwdParams& p, bool channels_last, cudaStream_t stream) {
  const bool has_bias = p.bias != nullptr, has_top = p.top != nullptr;
#define FUSED_FPN_FWD_CASE(LAYOUT, B, TP) \
  if (has_bias == B && has_top == TP) return launch_lateral_fwd<T, Math, LAYOUT, B, TP>(p, stream);
  if (channels_last) {
    FUSED_FPN_FWD_CASE(ChannelsLast, true, true)
    FUSED_FPN_FWD_CASE(ChannelsLast, true, false)
    FUSED_FPN_FWD_CASE(ChannelsLast, false, true)
    FUSED_FPN_FWD_CASE(ChannelsLast, false, false)
  } else {
    FUSED_FPN_FWD_CASE(Nchw, true, true)
    FUSED_FPN_FWD_CASE(Nchw, true, false)
    FUSED_FPN_FWD_CASE(Nchw, false, true)
    FUSED_FPN_FWD_CASE(Nchw, false, false)
  }
#undef FUSED_FPN_FWD_CASE
}

}  // namespace cuda
}  // namespace fused_fpn

// Explicit instantiation of the 8 kernels (layout x bias x top) of one (T, Math), for the .cu files.
#define FUSED_FPN_INSTANTIATE_FWD(T, MATH)                                                                      \
  template void fused_fpn::cuda::launch_lateral_fwd<T, MATH, fused_fpn::cuda::ChannelsLast, true, true>(       \
      const fused_fpn::cuda::LateralFwdParams&, cudaStream_t);                                                  \
  template void fused_fpn::cuda::launch_lateral_fwd<T, MATH, fused_fpn::cuda::ChannelsLast, true, false>(      \
      const fused_fpn::cuda::LateralFwdParams&, cudaStream_t);                                                  \
  template void fused_fpn::cuda::launch_lateral_fwd<T, MATH, fused_fpn::cuda::ChannelsLast, false, true>(      \
      const fused_fpn::cuda::LateralFwdParams&, cudaStream_t);                                                  \
  template void fused_fpn::cuda::launch_lateral_fwd<T, MATH, fused_fpn::cuda::ChannelsLast, false, false>(     \
      const fused_fpn::cuda::LateralFwdParams&, cudaStream_t);                                                  \
  template void fused_fpn::cuda::launch_lateral_fwd<T, MATH, fused_fpn::cuda::Nchw, true, true>(               \
      const fused_fpn::cuda::LateralFwdParams&, cudaStream_t);                                                  \
  template void fused_fpn::cuda::launch_lateral_fwd<T, MATH, fused_fpn::cuda::Nchw, true, false>(              \
      const fused_fpn::cuda::LateralFwdParams&, cudaStream_t);                                                  \
  template void fused_fpn::cuda::launch_lateral_fwd<T, MATH, fused_fpn::cuda::Nchw, false, true>(              \
      const fused_fpn::cuda::LateralFwdParams&, cudaStream_t);                                                  \
  template void fused_fpn::cuda::launch_lateral_fwd<T, MATH, fused_fpn::cuda::Nchw, false, false>(             \
      const fused_fpn::cuda::LateralFwdParams&, cudaStream_t);
