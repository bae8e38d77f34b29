// Small device helpers shared by the CUDA kernels of fused_fpn: dtype conversions that do not
// depend on the __CUDA_NO_HALF_CONVERSIONS__ family of macros (torch extensions define them),
// 16-byte packs, the cp.async primitives and the ldmatrix / mma.sync ones (sm_80+).
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

// Warp-wide tensor-core primitives (sm_80+), with the register layouts of the PTX ISA; every lane
// of the warp calls them together. Lane l, g = l / 4, q = l % 4; a register holds two 16-bit
// elements, the lower-indexed one in its low half.
//
// ldmatrix_x4: four 8 x 8 matrices of 16-bit elements; lanes 8 i .. 8 i + 7 give the addresses of
// matrix i's rows 0..7 (16 contiguous, 16-byte aligned shared-memory bytes each); r[i] receives row
// g, columns 2q and 2q + 1 of matrix i. ldmatrix_x4_trans: the same rows, and r[i] receives
// matrix i's rows 2q and 2q + 1 of column g (the transposed matrix's row g, columns 2q, 2q + 1).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// ldmatrix on fp32 data: each 32-bit element is a pair of 16-bit ones, so a 16-byte row holds 4
// fp32 and r[i] receives row g, element q of matrix i (no .trans: it would split the elements).
//
// d += A . B, A 16 x 16 (row-major fragment), B 16 x 8 (column-major fragment), bf16 inputs, fp32
// accumulation (mma.sync.m16n8k16):
//   a[0] = A[g][2q, 2q+1]   a[1] = A[g+8][2q, 2q+1]   a[2] = A[g][2q+8, 2q+9]   a[3] = A[g+8][2q+8, 2q+9]
//   b[0] = B[2q, 2q+1][g]   b[1] = B[2q+8, 2q+9][g]
//   d[0], d[1] = D[g][2q, 2q+1]   d[2], d[3] = D[g+8][2q, 2q+1]
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// d += A . B, A 16 x 8, B 8 x 8, TF32 inputs (fp32 bit patterns), fp32 accumulation (mma.sync.m16n8k8):
//   a[0] = A[g][q]   a[1] = A[g+8][q]   a[2] = A[g][q+4]   a[3] = A[g+8][q+4]
//   b[0] = B[q][g]   b[1] = B[q+4][g]
//   d as for mma_bf16_16816.
__device__ __forceinline__ void mma_tf32_1688(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// An fp32 bit pattern rounded to TF32 (cvt.rna.tf32.f32: to nearest, ties away; what
// nvcuda::wmma::__float_to_tf32 does).
__device__ __forceinline__ uint32_t f32_to_tf32(uint32_t bits) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(__uint_as_float(bits)));
  return r;
}

}  // namespace cuda
}  // namespace fused_fpn
