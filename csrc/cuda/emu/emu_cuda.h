// Host emulation of the CUDA execution model, just enough to run fused_fpn's CUDA kernels on the
// CPU (csrc/cuda/emu/emulate.py builds it; tests/test_cuda_build.py uses it on GPU-less CI):
//   * a CTA = blockDim std::threads sharing one shared-memory buffer (filled with 0xFF = NaN
//     before every CTA) and a std::barrier for __syncthreads; exited threads drop out;
//   * WMMA fragments (fp16) are whole matrices held by every thread of the warp (fp32 math);
//     cp.async copies land only when cp.async.wait_group retires their group (EMU_DEFER=1), the
//     latest moment the hardware allows;
//   * the warp-wide PTX primitives of bf16 / TF32 (ldmatrix, mma.sync, emulated in emulate.py)
//     exchange the lanes' addresses and registers through a per-warp buffer and a per-warp
//     std::barrier, with the register layouts of the PTX ISA: a lane gets exactly the elements the
//     hardware gives it (fp32 math; TF32 rounding is not emulated).
// It checks indexing, tails, layouts, vector paths, the pipeline's wait / barrier logic and the
// host code's decisions; not timing, not tensor-core rounding, not the real memory model.
#pragma once
#include <cuda_runtime.h>   // host-usable: vector types, cudaStream_t
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>
#include <stdexcept>

#undef __global__
#define __global__
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace emu {
struct D3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local D3 tIdx, bIdx;
inline D3 bDim, gDim;
inline thread_local unsigned char* smem_ptr = nullptr;
inline std::barrier<>* bar = nullptr;
inline int sm_count = 132;
inline bool tf32 = false;
inline bool topless_conv = true;   // false: the host code's conv2d route is off (the kernel runs)
inline int64_t launches = 0;        // emulated kernel launches so far

// One warp's exchange buffer for the warp-wide primitives: two sets (alternating calls), so one
// barrier per call suffices (a lane rewrites a set only after every lane passed the next call's barrier).
struct WarpShare {
  const unsigned char* addr[2][32];
  uint32_t regs[2][32][6];
};
inline thread_local std::barrier<>* warp_bar = nullptr;
inline thread_local WarpShare* warp_share = nullptr;
inline thread_local int lane_id = 0;
inline thread_local int warp_parity = 0;

inline void launch(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, size_t smem_bytes,
                   const std::function<void()>& body) {
  ++launches;
  gDim = {gx, gy, gz};
  bDim = {bx, by, 1};
  const unsigned nt = bx * by;
  std::vector<unsigned char> smem(smem_bytes + 64 * 1024);
  for (unsigned z = 0; z < gz; ++z)
    for (unsigned y = 0; y < gy; ++y)
      for (unsigned x = 0; x < gx; ++x) {
        std::memset(smem.data(), 0xFF, smem.size());  // NaN everywhere: unwritten smem reads show up
        std::barrier<> b(nt);
        bar = &b;
        const unsigned nw = (nt + 31) / 32;
        std::vector<std::unique_ptr<std::barrier<>>> wbars;
        for (unsigned w = 0; w < nw; ++w) wbars.push_back(std::make_unique<std::barrier<>>(std::min(32u, nt - 32 * w)));
        std::vector<WarpShare> shares(nw);
        std::vector<std::thread> ts;
        ts.reserve(nt);
        for (unsigned t = 0; t < nt; ++t)
          ts.emplace_back([&, t, x, y, z] {
            tIdx = {t % bx, t / bx, 0};
            bIdx = {x, y, z};
            smem_ptr = smem.data();
            warp_bar = wbars[t / 32].get();
            warp_share = &shares[t / 32];
            lane_id = static_cast<int>(t % 32);
            warp_parity = 0;
            body();
            warp_bar->arrive_and_drop();
            b.arrive_and_drop();
          });
        for (auto& th : ts) th.join();
      }
}
}  // namespace emu

inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, 4);
  return u;
}

#define threadIdx (emu::tIdx)
#define blockIdx (emu::bIdx)
#define blockDim (emu::bDim)
#define gridDim (emu::gDim)
inline void __syncthreads() { emu::bar->arrive_and_wait(); }

// ---- WMMA emulation: every thread of the warp holds the whole fragment ------------------------
namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K> struct Dims;
template <int M, int N, int K> struct Dims<matrix_a, M, N, K> { static constexpr int R = M, C = K; };
template <int M, int N, int K> struct Dims<matrix_b, M, N, K> { static constexpr int R = K, C = N; };
template <int M, int N, int K> struct Dims<accumulator, M, N, K> { static constexpr int R = M, C = N; };
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int R = Dims<Use, M, N, K>::R, C = Dims<Use, M, N, K>::C;
  static constexpr int num_elements = R * C;
  float x[R * C];
};
inline float tof(float v) { return v; }
inline float tof(__half v) { return __half2float(v); }
inline float tof(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class Use, int M, int N, int K, class T, class L, class P>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* ptr, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, L>;
  for (int i = 0; i < F::R; ++i)
    for (int j = 0; j < F::C; ++j)
      f.x[i * F::C + j] = std::is_same<L, row_major>::value ? tof(ptr[i * ldm + j]) : tof(ptr[i + j * ldm]);
}
template <int M, int N, int K, class T>
void fill_fragment(fragment<accumulator, M, N, K, T>& f, float v) {
  for (auto& e : f.x) e = v;
}
template <int M, int N, int K, class TA, class LA, class TB, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) s += a.x[i * K + k] * b.x[k * N + j];
      out[i * N + j] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}
template <int M, int N, int K>
void store_matrix_sync(float* ptr, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t l) {
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) (l == mem_row_major ? ptr[i * ldm + j] : ptr[i + j * ldm]) = f.x[i * N + j];
}
}  // namespace wmma
}  // namespace nvcuda

#define TORCH_CHECK_EMU(cond, ...) do { if (!(cond)) throw std::runtime_error("check failed: " #cond); } while (0)
