// Forward kernels of fused_fpn::lateral for T = float, Math = MathFfma (see lateral_fwd.cuh).
#include "lateral_fwd.cuh"

namespace fused_fpn {
namespace cuda {

void lateral_fwd_f32_ffma(const LateralFwdParams& p, bool channels_last, cudaStream_t stream) {
  dispatch_lateral_fwd<float, MathFfma>(p, channels_last, stream);
}

}  // namespace cuda
}  // namespace fused_fpn

// Explicit instantiations: layout {ChannelsLast, Nchw} x has_bias x has_top.
FUSED_FPN_INSTANTIATE_FWD(float, fused_fpn::cuda::MathFfma)
