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
//   * every 16-byte access (cp.async, 16-byte loads and stores), ldmatrix row and WMMA tile is
//     checked as the hardware and the tensors require: aligned (16 bytes; WMMA: 32-byte pointer,
//     ldm a multiple of 16 bytes) and inside the launch's dynamic shared memory or inside one tensor
//     the launch was given (``globals``, set by the launch mirrors of emu_main.cpp). On a GPU a
//     misaligned one faults ("misaligned address") and one outside the tensors reads or overwrites
//     other memory. A CTA thread cannot throw, so the first violation is recorded, the access skipped,
//     and launch() throws it (std::runtime_error "emulated CUDA kernel: ...") once the grid is done.
//     Element (scalar) accesses are not intercepted.
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
#include <cstdio>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
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
inline bool force_vectors = false; // true: the host code's 16-byte path decisions are overridden to
                                   // "on" (a test's stand-in for a wrong decision: the checks must fault)
inline int64_t launches = 0;        // emulated kernel launches so far

// ---- memory-access checks ---------------------------------------------------------------------
// A tensor of the launch: bytes [lo, hi) (its strided extent).
struct Range {
  std::uintptr_t lo = 0, hi = 0;
  const char* name = "";
};
inline std::vector<Range> globals;  // the current launch's tensors (emu_main.cpp sets them)
inline size_t smem_size = 0;        // the current launch's dynamic shared memory, bytes
inline std::mutex fault_mutex;
inline std::string fault;           // the launch's first violation, "" if none

// Bytes [p, p + extent) of a tensor of element size `elsize` with these (size, stride) pairs
// (elements; strides >= 0). Empty when a size is 0 or p is null.
inline Range strided_range(const void* p, int64_t elsize, std::initializer_list<std::pair<int64_t, int64_t>> dims,
                           const char* name) {
  int64_t last = 0;
  for (const auto& d : dims) {
    if (d.first <= 0) return Range{0, 0, name};
    last += (d.first - 1) * d.second;
  }
  const auto lo = reinterpret_cast<std::uintptr_t>(p);
  return p == nullptr ? Range{0, 0, name} : Range{lo, lo + static_cast<std::uintptr_t>((last + 1) * elsize), name};
}
inline Range dense_range(const void* p, int64_t bytes, const char* name) {
  const auto lo = reinterpret_cast<std::uintptr_t>(p);
  return p == nullptr ? Range{0, 0, name} : Range{lo, lo + static_cast<std::uintptr_t>(bytes), name};
}
// Sets the launch's tensors for the lifetime of the scope (the host thread, around emu::launch).
struct GlobalsScope {
  explicit GlobalsScope(std::vector<Range> r) { globals = std::move(r); }
  ~GlobalsScope() { globals.clear(); }
  GlobalsScope(const GlobalsScope&) = delete;
  GlobalsScope& operator=(const GlobalsScope&) = delete;
};

inline void record_fault(const std::string& what) {
  std::lock_guard<std::mutex> lock(fault_mutex);
  if (fault.empty()) fault = what;
}
inline std::string hex(std::uintptr_t v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

enum class Space { Shared, Global, Any };
// Whether an access of `bytes` at `ptr` with alignment `align` is allowed; records the violation
// (naming `what`) otherwise. Shared: inside the launch's dynamic shared memory, aligned relative to
// its base (128-byte aligned, as __align__(128) makes it on the GPU). Global: inside one tensor of
// the launch, aligned in address. Any: shared if it points there, else global.
inline bool access_ok(const void* ptr, size_t bytes, size_t align, Space space, const char* what) {
  const auto a = reinterpret_cast<std::uintptr_t>(ptr);
  const auto base = reinterpret_cast<std::uintptr_t>(smem_ptr);
  const bool in_smem = smem_ptr != nullptr && a >= base && a < base + smem_size;
  if (space == Space::Shared || (space == Space::Any && in_smem)) {
    if (!in_smem || a + bytes > base + smem_size) {
      record_fault(std::string(what) + ": " + std::to_string(bytes) + " bytes at shared-memory offset " +
                   std::to_string(static_cast<long long>(a - base)) + " are outside the launch's " +
                   std::to_string(smem_size) + " bytes of shared memory");
      return false;
    }
    if ((a - base) % align != 0) {
      record_fault(std::string(what) + ": misaligned address, shared-memory offset " +
                   std::to_string(static_cast<long long>(a - base)) + " is not a multiple of " + std::to_string(align));
      return false;
    }
    return true;
  }
  if (a % align != 0) {
    record_fault(std::string(what) + ": misaligned address " + hex(a) + " (not a multiple of " + std::to_string(align) +
                 ")");
    return false;
  }
  for (const Range& r : globals)
    if (a >= r.lo && a + bytes <= r.hi) return true;
  std::string seen;
  for (const Range& r : globals) seen += std::string(seen.empty() ? "" : ", ") + r.name + " [" + hex(r.lo) + ", " + hex(r.hi) + ")";
  record_fault(std::string(what) + ": " + std::to_string(bytes) + " bytes at " + hex(a) +
               " are not inside any tensor of the launch (" + seen + ")");
  return false;
}

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
  // the dynamic shared memory, 128-byte aligned (the kernels' __align__(128)), then room for the
  // static __shared__ arrays the emulation points at its start (emulate.py)
  constexpr size_t kStaticRoom = 64 * 1024;
  std::vector<unsigned char> smem_raw(smem_bytes + kStaticRoom + 128);
  unsigned char* smem_base = smem_raw.data() + (128 - reinterpret_cast<std::uintptr_t>(smem_raw.data()) % 128) % 128;
  smem_size = smem_bytes;
  fault.clear();
  for (unsigned z = 0; z < gz && fault.empty(); ++z)
    for (unsigned y = 0; y < gy && fault.empty(); ++y)
      for (unsigned x = 0; x < gx && fault.empty(); ++x) {
        std::memset(smem_base, 0xFF, smem_bytes + kStaticRoom);  // NaN everywhere: unwritten smem reads show up
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
            smem_ptr = smem_base;
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
  if (!fault.empty()) {
    const std::string what = fault;
    fault.clear();
    throw std::runtime_error("emulated CUDA kernel: " + what);
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
// WMMA's rules (CUDA C++ Programming Guide): a 256-bit aligned pointer, ldm a multiple of 16 bytes;
// the tile (R rows or columns of ldm elements) inside shared memory (these kernels' only source).
template <class P>
bool wmma_tile_ok(const P* ptr, unsigned ldm, int rows, int cols, bool row_major, const char* what) {
  if (ldm * sizeof(P) % 16 != 0) {
    emu::record_fault(std::string(what) + ": ldm " + std::to_string(ldm) + " is not a multiple of 16 bytes");
    return false;
  }
  const size_t extent = row_major ? (rows - 1) * size_t{ldm} + cols : (cols - 1) * size_t{ldm} + rows;
  return emu::access_ok(ptr, extent * sizeof(P), 32, emu::Space::Shared, what);
}
template <class Use, int M, int N, int K, class T, class L, class P>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* ptr, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, L>;
  if (!wmma_tile_ok(ptr, ldm, F::R, F::C, std::is_same<L, row_major>::value, "wmma::load_matrix_sync")) {
    for (auto& e : f.x) e = 0.0f;
    return;
  }
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
  if (!wmma_tile_ok(ptr, ldm, M, N, l == mem_row_major, "wmma::store_matrix_sync")) return;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) (l == mem_row_major ? ptr[i * ldm + j] : ptr[i + j * ldm]) = f.x[i * N + j];
}
}  // namespace wmma
}  // namespace nvcuda

#define TORCH_CHECK_EMU(cond, ...) do { if (!(cond)) throw std::runtime_error("check failed: " #cond); } while (0)
