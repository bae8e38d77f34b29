// Forward kernels of fused_fpn::lateral for T = float, Math = MathTf32 (see lateral_fwd.cuh).
#include "lateral_fwd.cuh"

namespace fused_fpn {
namespace cuda {

void lateral_fwd_f32_tf32(const LateralFwdParams& p, bool channels_last, cudaStream_t stream) {
  dispatch_lateral_fwd<float, MathTf32>(p, channels_last, stream);
}

}  // namespace cuda
}  // namespace fused_fpn

// Explicit instantiations: layout {ChannelsLast, Nchw} x has_bias x has_top.
FUSED_FPN_INSTANTIATE_FWD(float, fused_fpn::cuda::MathTf32)
