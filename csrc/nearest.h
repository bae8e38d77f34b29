// ATen's nearest-neighbour source index (F.interpolate(mode="nearest", size=...)), shared by
// the CPU and CUDA kernels. Float32 arithmetic on purpose: it is what ATen does for fp16, bf16,
// fp32 (and what every fused_fpn kernel does for every dtype, fp64 included).
//   scale = (float)in_size / (float)out_size
//   src   = min((int64)floorf((float)dst * scale), in_size - 1)
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FUSED_FPN_HD __host__ __device__ __forceinline__
#else
#define FUSED_FPN_HD inline
#endif

namespace fused_fpn {

FUSED_FPN_HD float nearest_scale(int64_t in_size, int64_t out_size) {
  return static_cast<float>(in_size) / static_cast<float>(out_size);
}

FUSED_FPN_HD int64_t nearest_src(int64_t dst, float scale, int64_t in_size) {
  const int64_t s = static_cast<int64_t>(floorf(static_cast<float>(dst) * scale));
  return s < in_size - 1 ? s : in_size - 1;
}

}  // namespace fused_fpn
