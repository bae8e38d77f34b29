// Forward kernels of fused_fpn::lateral for T = __nv_bfloat16, Math = MathWmma (see lateral_fwd.cuh).
#include "lateral_fwd.cuh"

namespace fused_fpn {
namespace cuda {

void lateral_fwd_bf16(const LateralFwdParams& p, bool channels_last, cudaStream_t stream) {
  dispatch_lateral_fwd<__nv_bfloat16, MathWmma>(p, channels_last, stream);
}

}  // namespace cuda
}  // namespace fused_fpn

// Explicit instantiations: layout {ChannelsLast, Nchw} x has_bias x has_top.
FUSED_FPN_INSTANTIATE_FWD(__nv_bfloat16, fused_fpn::cuda::MathWmma)
