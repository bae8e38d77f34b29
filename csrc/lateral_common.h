// Host-side pieces shared by the CPU and CUDA implementations of the fused_fpn ops: the
// output memory-format rule, the argument checks of fused_fpn::lateral, and the argument checks
// and output allocation of fused_fpn::lateral_grad_bias_top. Device- and dtype-specific checks
// stay with each backend.
#pragma once
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cstdint>

namespace fused_fpn {

// Held by the CPU and CUDA kernels of fused_fpn::lateral while they run: their own ATen calls
// (conv2d) compute in x's dtype, as the op's schema and fake implementation say, whatever autocast
// state the caller left on (the op's autocast kernel, fused_fpn/_autocast.py, excludes the autocast
// keys before it calls the op; a caller that skips that kernel may not).
struct NoAutocastInside {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// channels_last iff the channel stride is smaller than the width stride; must stay identical to
// fused_fpn/_layout.py::is_channels_last_like (lateral's output and grad_top follow it). Read as
// SymInts: conv1x1_backward runs in traces, where a plain stride() would pin every stride (and so N,
// H and W) to the traced sizes.
inline bool is_channels_last_like(const at::Tensor& t) { return t.sym_stride(1) < t.sym_stride(3); }

inline at::MemoryFormat output_memory_format(const at::Tensor& t) {
  return is_channels_last_like(t) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// y = conv1x1(x, weight) + bias by ATen's convolution, in output_memory_format(x): how the CPU and
// CUDA kernels run a level without a top map (nothing to gather). weight [Cout, Cin] (or
// [Cout, Cin, 1, 1]); x.size(1) > 0 (conv2d does not take Cin == 0). Callers hold NoAutocastInside.
inline at::Tensor lateral_as_convolution(const at::Tensor& x, const at::Tensor& weight,
                                         const c10::optional<at::Tensor>& bias) {
  const at::Tensor w4 = weight.contiguous().view({weight.size(0), weight.size(1), 1, 1});
  return at::conv2d(x, w4, bias).contiguous(output_memory_format(x));
}

// Whether a level runs as lateral_as_convolution: no top map (nothing to gather) and x dense in NCHW
// or channels_last, which conv2d reads in place. Other strides (conv2d would copy the whole of x
// first) and Cin == 0 (which conv2d does not take) go to the backend's own kernel, which reads x
// through its strides.
inline bool runs_as_convolution(const at::Tensor& x, const c10::optional<at::Tensor>& top) {
  return !top.has_value() && x.size(1) > 0 &&
         (x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast));
}

// Shapes, dtypes and devices of lateral's arguments (x's own device and dtype are the backend's to check).
inline void check_lateral_inputs(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                 const c10::optional<at::Tensor>& top) {
  TORCH_CHECK(x.dim() == 4, "fused_fpn::lateral: x must be 4-D [N, Cin, H, W], got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, "fused_fpn::lateral: weight must be 2-D [Cout, Cin], got shape ", weight.sizes());
  TORCH_CHECK(weight.size(1) == x.size(1), "fused_fpn::lateral: weight must be [Cout, Cin] with Cin = x.size(1) = ",
              x.size(1), ", got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "fused_fpn::lateral: weight dtype ", weight.scalar_type(),
              " must equal x dtype ", x.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), "fused_fpn::lateral: weight must be on x's device ", x.device(),
              ", got ", weight.device());
  const int64_t cout = weight.size(0);
  if (bias.has_value()) {
    const auto& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == cout, "fused_fpn::lateral: bias must be 1-D [Cout] with Cout = ", cout,
                ", got shape ", b.sizes());
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), "fused_fpn::lateral: bias dtype ", b.scalar_type(),
                " must equal x dtype ", x.scalar_type());
    TORCH_CHECK(b.device() == x.device(), "fused_fpn::lateral: bias must be on x's device ", x.device(), ", got ",
                b.device());
  }
  if (top.has_value()) {
    const auto& t = *top;
    TORCH_CHECK(t.dim() == 4 && t.size(0) == x.size(0) && t.size(1) == cout,
                "fused_fpn::lateral: top must be 4-D [N, Cout, Ht, Wt] with N = ", x.size(0), " and Cout = ", cout,
                ", got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fused_fpn::lateral: top dtype ", t.scalar_type(),
                " must equal x dtype ", x.scalar_type());
    TORCH_CHECK(t.device() == x.device(), "fused_fpn::lateral: top must be on x's device ", x.device(), ", got ",
                t.device());
    // Every output pixel gathers from top, so top needs pixels whenever the output has any
    // (Cin == 0 still has output pixels: bias + top).
    const bool no_output = x.size(0) == 0 || x.size(2) == 0 || x.size(3) == 0 || cout == 0;
    TORCH_CHECK(no_output || (t.size(2) > 0 && t.size(3) > 0),
                "fused_fpn::lateral: top must have non-empty spatial size, got shape ", t.sizes());
  }
}

inline void check_grad_bias_top_inputs(const at::Tensor& grad_out, int64_t top_h, int64_t top_w) {
  TORCH_CHECK(grad_out.dim() == 4, "fused_fpn::lateral_grad_bias_top: grad_out must be 4-D [N, C, H, W], got shape ",
              grad_out.sizes());
  // One of them 0 is a top with no pixels, which the forward accepts when the output has none
  // (check_lateral_inputs): its gradient is empty too.
  TORCH_CHECK(top_h >= 0 && top_w >= 0 && ((top_h == 0) == (top_w == 0) || grad_out.numel() == 0),
              "fused_fpn::lateral_grad_bias_top: top_h and top_w must both be positive (or both 0 for no top; one ",
              "of them 0 only when grad_out is empty), got ", top_h, " and ", top_w);
}

// Allocates grad_bias [C] and grad_top [N, C, top_h, top_w] (grad_out's memory format) on grad_out's
// device; returns true when nothing is left to compute (no channels, or no pixels: zeros).
inline bool allocate_grad_bias_top(const at::Tensor& grad_out, int64_t top_h, int64_t top_w, at::Tensor& db,
                                   at::Tensor& dtop) {
  const int64_t N = grad_out.size(0), C = grad_out.size(1);
  db = at::empty({C}, grad_out.options().memory_format(at::MemoryFormat::Contiguous));
  dtop = at::empty({N, C, top_h, top_w}, grad_out.options().memory_format(output_memory_format(grad_out)));
  if (C == 0) return true;
  if (grad_out.numel() == 0) {  // nothing to sum: zeros (also when H or W is 0 but the top is not)
    db.zero_();
    dtop.zero_();
    return true;
  }
  return false;
}

}  // namespace fused_fpn
