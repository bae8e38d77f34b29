// Small device helpers shared by the CUDA kernels of fused_fpn: dtype conversions that do not
// depend on the __CUDA_NO_HALF_CONVERSIONS__ family of macros (torch extensions define them),
// 16-byte packs and the cp.async primitives (sm_80+).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fused_fpn {
namespace cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Elements of T in one 16-byte vector.
template <typename T>
struct Vec16 {
  static constexpr int kN = 16 / static_cast<int>(sizeof(T));
};

// Reads / writes kN elements of T as one 16-byte access (ptr must be 16-byte aligned). The
// register-level reinterpretation goes through a union (not a pointer cast: that breaks strict
// aliasing, and a host compiler indeed miscompiles the pointer-cast version).
template <typename T>
union Pack16 {
  uint4 raw;
  T e[Vec16<T>::kN];
};

template <typename T>
__device__ __forceinline__ void load16_as_float(const T* ptr, float* dst) {
  Pack16<T> pack;
  pack.raw = *reinterpret_cast<const uint4*>(ptr);
#pragma unroll
  for (int i = 0; i < Vec16<T>::kN; ++i) dst[i] = to_float(pack.e[i]);
}

template <typename T>
__device__ __forceinline__ void store16_from_float(T* ptr, const float* src) {
  Pack16<T> pack;
#pragma unroll
  for (int i = 0; i < Vec16<T>::kN; ++i) pack.e[i] = from_float<T>(src[i]);
  *reinterpret_cast<uint4*>(ptr) = pack.raw;
}

// 16-byte global -> shared asynchronous copy; with valid == false nothing is read and the 16
// shared bytes are zero-filled (src-size 0), so tails never touch memory outside the tensor.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

}  // namespace cuda
}  // namespace fused_fpn
