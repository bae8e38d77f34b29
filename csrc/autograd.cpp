// Autograd of the fused_fpn ops, in C++ (the Autograd dispatch key): a backward recorded and run
// without a Python autograd Function in between (on a tiny CPU map, forward + backward took 112-125
// us instead of 181 us with torch.library.register_autograd; benchmarks/launch_overhead.py).
//
// fused_fpn::lateral,  y = x . W^T + b + U(top)   (U: nearest upsample of top to x's H x W)
//   dx[n, i, h, w] = sum_o dy[n, o, h, w] W[o, i]          conv1x1_backward: ATen's
//   dW[o, i]       = sum_{n, h, w} dy[n, o, h, w] x[n, i, h, w]   convolution_backward on CPU,
//                                                          GEMMs on other devices (see there)
//   db, dtop       = fused_fpn::lateral_grad_bias_top(dy)  one fused pass over dy
// fused_fpn::lateral_grad_bias_top, (db, dtop) = (sum dy, U^T(dy)): linear, so its adjoint is
//   d dy = db_grad[None, :, None, None] + U(dtop_grad)
//
// Double backward (create_graph=True): the fused kernels have no derivative, so a backward whose
// result will be differentiated again computes dx, dW with einsum (differentiable ATen ops) and
// db, dtop through the dispatcher (so lateral_grad_bias_top's own autograd below is recorded).
//
// Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp): the tangent of lateral is the fused
// op again, y' = lateral(x', W, b', top') + lateral(x, W'), and lateral_grad_bias_top is linear.
// torch.func.grad / vjp / vmap-of-grad cannot run C++ autograd Functions (a functorch limit; they
// raise), torch.func.vmap of the forward alone works (slow per-sample fallback).
//
// Sizes are read as SymInts throughout: torch.compile traces these backwards with symbolic shapes.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

#include "lateral_common.h"
#include "nearest.h"

namespace fused_fpn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_lateral(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        const c10::optional<at::Tensor>& top) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fused_fpn::lateral", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                         const c10::optional<at::Tensor>&)>();
  return op.call(x, weight, bias, top);
}

std::tuple<at::Tensor, at::Tensor> call_grad_bias_top(const at::Tensor& grad, c10::SymInt top_h, c10::SymInt top_w) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fused_fpn::lateral_grad_bias_top", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, c10::SymInt, c10::SymInt)>();
  return op.call(grad, std::move(top_h), std::move(top_w));
}

using MatmulOutDtype = at::Tensor(const at::Tensor&, const at::Tensor&, at::ScalarType);

// aten::mm.dtype / aten::bmm.dtype (fp16 / bf16 in, fp32 out; recent torch only), looked up at run
// time so that _C also builds against the older torch the package supports (pyproject: torch >= 2.6).
c10::optional<c10::TypedOperatorHandle<MatmulOutDtype>> find_out_dtype_op(const char* name) {
  auto op = c10::Dispatcher::singleton().findOp({name, "dtype"});
  if (!op.has_value()) return c10::nullopt;
  return op->typed<MatmulOutDtype>();
}

// The out_dtype overloads of mm (batched: bmm), or nullopt on a torch without them.
const c10::optional<c10::TypedOperatorHandle<MatmulOutDtype>>& out_dtype_op(bool batched) {
  static const auto mm_out_dtype = find_out_dtype_op("aten::mm");
  static const auto bmm_out_dtype = find_out_dtype_op("aten::bmm");
  return batched ? bmm_out_dtype : mm_out_dtype;
}

// Whether matmul_fp32_accumulate multiplies a through an out_dtype overload: CUDA fp16 / bf16.
bool accumulates_through_out_dtype(const at::Tensor& a, bool batched) {
  const bool half = a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16;
  return half && a.is_cuda() && out_dtype_op(batched).has_value();
}

// a @ b (mm for 2-D, bmm for batched 3-D) accumulated and returned in float32 for CUDA fp16 / bf16
// (the out_dtype overloads of mm / bmm), so that dW's long reduction over pixels is neither rounded
// nor split-K reduced in half precision; other inputs (or a torch without those overloads) are
// multiplied as they are. mm / bmm, never at::matmul: torch 2.11's matmul reads the sizes to decide
// whether to fold a batch into one mm, which pins N and H*W in traces with symbolic sizes.
at::Tensor matmul_fp32_accumulate(const at::Tensor& a, const at::Tensor& b) {
  const bool batched = a.dim() == 3;
  if (accumulates_through_out_dtype(a, batched)) return out_dtype_op(batched)->call(a, b, at::kFloat);
  return batched ? at::bmm(a, b) : at::mm(a, b);
}

// (dx, dW) of y = conv1x1(x, weight [Cout, Cin]) as GEMMs: no atomics, so the same bits run to run
// (cuDNN's convolution backward may pick non-deterministic algorithms). grad [N, Cout, H, W] and
// x [N, Cin, H, W] in x's memory format are used without a copy: channels_last as [N*H*W, C]
// matrices, NCHW as N [C, H*W] matrices (other strides are made contiguous first). dx follows x's
// memory format; dW accumulates in fp32 for fp16 / bf16 and is returned in weight's dtype.
std::tuple<at::Tensor, at::Tensor> conv1x1_backward_gemm(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                         const at::Tensor& weight, bool need_x, bool need_weight) {
  const c10::SymInt n = x_in.sym_size(0), cin = x_in.sym_size(1), h = x_in.sym_size(2), w = x_in.sym_size(3);
  const c10::SymInt cout = weight.sym_size(0);
  const at::MemoryFormat fmt = output_memory_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor grad = grad_in.contiguous(fmt);
  at::Tensor dx, dw;
  if (fmt == at::MemoryFormat::ChannelsLast) {
    const c10::SymInt pixels = n * h * w;
    const at::Tensor g2 = grad.permute({0, 2, 3, 1}).reshape_symint({pixels, cout});  // views
    const at::Tensor x2 = x.permute({0, 2, 3, 1}).reshape_symint({pixels, cin});
    if (need_x) dx = at::mm(g2, weight).view_symint({n, h, w, cin}).permute({0, 3, 1, 2});
    if (need_weight) dw = matmul_fp32_accumulate(g2.t(), x2);
  } else {
    // bmm.dtype's fake implementation reads the batch size as an int: in a trace with symbolic sizes
    // torch 2.14 pins N there and 2.11 fails. On that path (dW of CUDA fp16 / bf16) N is made
    // concrete here, the one guard the trace then holds (H and W stay symbolic); eager sizes are
    // concrete anyway.
    const c10::SymInt batch = need_weight && n.is_symbolic() && accumulates_through_out_dtype(grad, true)
                                  ? c10::SymInt(n.guard_int(__FILE__, __LINE__))
                                  : n;
    const at::Tensor g3 = grad.view_symint({batch, cout, h * w});
    const at::Tensor x3 = x.view_symint({batch, cin, h * w});
    // W^T broadcast over the batch as a stride-0 view (what at::matmul would do, without its size checks)
    if (need_x) dx = at::bmm(weight.t().expand_symint({batch, cin, cout}), g3).view_symint({batch, cin, h, w});
    if (need_weight) {
      const at::Tensor per_image = matmul_fp32_accumulate(g3, x3.transpose(1, 2));  // [N, Cout, Cin]
      dw = per_image.sum(0, false, per_image.scalar_type());  // no branch on N: a branch would guard on it
    }
  }
  if (dw.defined()) dw = dw.to(weight.scalar_type());
  return {dx, dw};
}

// (dx, dW) of y = conv1x1(x, weight [Cout, Cin]); undefined where not needed. CPU tensors: ATen's
// convolution_backward (oneDNN; deterministic); other devices, or use_gemm: conv1x1_backward_gemm.
// With no pixels or no input channels (convolution_backward rejects those) both are zeros.
std::tuple<at::Tensor, at::Tensor> conv1x1_backward(const at::Tensor& grad, const at::Tensor& x,
                                                    const at::Tensor& weight, bool need_x, bool need_weight,
                                                    bool use_gemm = false) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 2 && weight.sym_size(1) == x.sym_size(1),
              "fused_fpn::conv1x1_backward: x must be 4-D [N, Cin, H, W] and weight 2-D [Cout, Cin], got x ",
              x.sym_sizes(), " and weight ", weight.sym_sizes());
  TORCH_CHECK(grad.dim() == 4 && grad.sym_size(0) == x.sym_size(0) && grad.sym_size(1) == weight.sym_size(0) &&
                  grad.sym_size(2) == x.sym_size(2) && grad.sym_size(3) == x.sym_size(3),
              "fused_fpn::conv1x1_backward: grad must be [N, Cout, H, W] = [", x.sym_size(0), ", ", weight.sym_size(0),
              ", ", x.sym_size(2), ", ", x.sym_size(3), "], got ", grad.sym_sizes());
  if (x.sym_numel() == 0 || weight.sym_numel() == 0) {
    return {need_x ? at::zeros_like(x) : at::Tensor(), need_weight ? at::zeros_like(weight) : at::Tensor()};
  }
  if (use_gemm || !x.is_cpu()) return conv1x1_backward_gemm(grad, x, weight, need_x, need_weight);
  auto result = at::convolution_backward(grad, x, weight.unsqueeze(2).unsqueeze(3), c10::nullopt, {1, 1}, {0, 0},
                                         {1, 1}, false, {0, 0}, 1, {need_x, need_weight, false});
  at::Tensor dw = std::get<1>(result);
  if (dw.defined()) dw = dw.view_symint(weight.sym_sizes());
  return {std::get<0>(result), dw};
}

// True when a backward runs under create_graph=True and its result depends on tensors that
// require grad: it will be differentiated again.
bool backward_needs_graph(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight) {
  return at::GradMode::is_enabled() && (grad.requires_grad() || x.requires_grad() || weight.requires_grad());
}

struct LateralFunction : public torch::autograd::Function<LateralFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& top) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor y = call_lateral(x, weight, bias, top);
    const bool has_bias = bias.has_value() && bias->defined(), has_top = top.has_value() && top->defined();
    // x and W are kept where eager's conv node keeps them: when x, W or bias requires grad. When only top
    // does (a frozen lateral conv), eager makes no conv node, and db / dtop read the incoming gradient
    // alone: neither is kept (nor version-checked, nor an inference tensor held). (requires_grad, not
    // needs_input_grad: inside a backward, a checkpoint's recomputation would read that graph task's
    // subset and save fewer tensors than the forward did.)
    const bool keep = x.requires_grad() || weight.requires_grad() || (has_bias && bias->requires_grad());
    if (keep) ctx->save_for_backward({x, weight});
    ctx->saved_data["keeps_operands"] = keep;
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["has_top"] = has_top;
    ctx->saved_data["top_h"] = has_top ? top->sym_size(2) : c10::SymInt(0);
    ctx->saved_data["top_w"] = has_top ? top->sym_size(3) : c10::SymInt(0);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad = grads[0];
    // needs_input_grad counts the tensor inputs only (an absent bias or top has no edge); the
    // returned list has one entry per forward argument
    const bool has_bias = ctx->saved_data["has_bias"].toBool(), has_top = ctx->saved_data["has_top"].toBool();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_b = has_bias && ctx->needs_input_grad(2);
    const bool need_top = has_top && ctx->needs_input_grad(has_bias ? 3 : 2);
    at::Tensor dx, dw, db, dtop;
    // unpacked whenever kept, as eager's node does: a second backward without retain_graph, or x changed in
    // place since the forward, raises here
    const variable_list saved = ctx->saved_data["keeps_operands"].toBool() ? ctx->get_saved_variables()
                                                                           : variable_list{};
    if (need_x || need_w) {  // then x and W were kept (forward)
      const at::Tensor& x = saved[0];
      const at::Tensor& weight = saved[1];
      if (backward_needs_graph(grad, x, weight)) {  // double backward: differentiable ops
        if (need_x) dx = at::einsum("nohw,oi->nihw", {grad, weight}).contiguous(output_memory_format(x));
        if (need_w) dw = at::einsum("nohw,nihw->oi", {grad, x});
      } else {
        std::tie(dx, dw) = conv1x1_backward(grad, x, weight, need_x, need_w);
      }
    }
    if (need_b || need_top) {
      std::tie(db, dtop) = call_grad_bias_top(grad, ctx->saved_data["top_h"].toSymInt(),
                                              ctx->saved_data["top_w"].toSymInt());
    }
    return {dx, dw, need_b ? db : at::Tensor(), need_top ? dtop : at::Tensor()};
  }
};

struct GradBiasTopFunction : public torch::autograd::Function<GradBiasTopFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_out, c10::SymInt top_h,
                               c10::SymInt top_w) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto result = call_grad_bias_top(grad_out, top_h, top_w);
    ctx->saved_data["h"] = grad_out.sym_size(2);
    ctx->saved_data["w"] = grad_out.sym_size(3);
    ctx->saved_data["n"] = grad_out.sym_size(0);
    ctx->saved_data["channels_last"] = is_channels_last_like(grad_out);
    return {std::get<0>(result), std::get<1>(result)};
  }

  // d grad_out = g_bias[None, :, None, None] + U(g_top), in grad_out's memory format.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& g_bias = grads[0];
    const at::Tensor& g_top = grads[1];
    const c10::SymInt h = ctx->saved_data["h"].toSymInt(), w = ctx->saved_data["w"].toSymInt();
    const c10::SymInt n = ctx->saved_data["n"].toSymInt(), c = g_bias.sym_size(0);
    const auto fmt = ctx->saved_data["channels_last"].toBool() ? at::MemoryFormat::ChannelsLast
                                                                : at::MemoryFormat::Contiguous;
    at::Tensor g = g_bias.view_symint({1, c, 1, 1}).expand_symint({n, c, h, w});
    if (g_top.sym_size(2) > 0 && g_top.sym_size(3) > 0) {
      // nearest gather with the kernels' float32 index rule (nearest.h: min(floor(float(d) * scale),
      // in - 1), one float32 multiply), computed on g_top's device: no host-to-device copy. Concrete
      // sizes: only a double backward (never traced by torch.compile) gets here.
      auto source_rows = [&](int64_t in_size, int64_t out_size) {
        const float scale = nearest_scale(in_size, out_size);
        return at::arange(out_size, g_top.options().dtype(at::kFloat))
            .mul_(scale)
            .floor_()
            .to(at::kLong)
            .clamp_max_(in_size - 1);
      };
      const int64_t th = g_top.size(2), tw = g_top.size(3);
      const at::Tensor gathered = g_top.index_select(2, source_rows(th, h.guard_int(__FILE__, __LINE__)))
                                      .index_select(3, source_rows(tw, w.guard_int(__FILE__, __LINE__)));
      g = g + gathered;
    }
    return {g.contiguous(fmt), at::Tensor(), at::Tensor()};
  }
};

bool requires_grad(const c10::optional<at::Tensor>& t) { return t.has_value() && t->requires_grad(); }

// Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) at level 0, as ATen's generated
// kernels do: the tangent of t (undefined if none) and t without its tangent.
at::Tensor tangent_of(const at::Tensor& t) { return t.defined() ? t._fw_grad(/*level=*/0) : at::Tensor(); }
at::Tensor tangent_of(const c10::optional<at::Tensor>& t) { return t.has_value() ? tangent_of(*t) : at::Tensor(); }
at::Tensor primal_of(const at::Tensor& t) { return tangent_of(t).defined() ? t._fw_primal(0) : t; }
c10::optional<at::Tensor> optional_tensor(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// y' = lateral(x', W, b', top') + lateral(x, W') for the tangents x', W', b', top' (undefined: zero);
// both terms are the fused op again (through the dispatcher, so they are differentiable too).
at::Tensor lateral_tangent(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& x_t,
                           const at::Tensor& w_t, const at::Tensor& b_t, const at::Tensor& top_t) {
  const at::Tensor x_p = primal_of(x), w_p = primal_of(weight);
  at::Tensor y_t;
  if (x_t.defined() || b_t.defined() || top_t.defined()) {
    y_t = call_lateral(x_t.defined() ? x_t : at::zeros_like(x_p), w_p, optional_tensor(b_t), optional_tensor(top_t));
  }
  if (w_t.defined()) {
    at::Tensor term = call_lateral(x_p, w_t, c10::nullopt, c10::nullopt);
    y_t = y_t.defined() ? y_t + term : term;
  }
  return y_t.contiguous(output_memory_format(x));
}

at::Tensor lateral_autograd(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& top) {
  const at::Tensor x_t = tangent_of(x), w_t = tangent_of(weight), b_t = tangent_of(bias), top_t = tangent_of(top);
  at::Tensor y;
  if (!at::GradMode::is_enabled() ||
      !(x.requires_grad() || weight.requires_grad() || requires_grad(bias) || requires_grad(top))) {
    at::AutoDispatchBelowADInplaceOrView guard;  // nothing to record
    y = call_lateral(x, weight, bias, top);
  } else {
    y = LateralFunction::apply(x, weight, bias, top);
  }
  if (x_t.defined() || w_t.defined() || b_t.defined() || top_t.defined()) {
    y._set_fw_grad(lateral_tangent(x, weight, x_t, w_t, b_t, top_t), /*level=*/0, /*is_inplace_op=*/false);
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor> grad_bias_top_autograd(const at::Tensor& grad_out, c10::SymInt top_h,
                                                          c10::SymInt top_w) {
  const at::Tensor grad_t = tangent_of(grad_out);
  at::Tensor db, dtop;
  if (!at::GradMode::is_enabled() || !grad_out.requires_grad()) {  // e.g. inside lateral's backward
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(db, dtop) = call_grad_bias_top(grad_out, top_h, top_w);
  } else {
    auto result = GradBiasTopFunction::apply(grad_out, top_h, top_w);
    db = result[0];
    dtop = result[1];
  }
  if (grad_t.defined()) {  // linear in grad_out: the tangents are the op applied to its tangent
    auto tangents = call_grad_bias_top(grad_t, top_h, top_w);
    db._set_fw_grad(std::get<0>(tangents), 0, false);
    dtop._set_fw_grad(std::get<1>(tangents), 0, false);
  }
  return {db, dtop};
}

// fused_fpn::conv1x1_backward: the backward's dx / dW step as an op of its own, so that the tests can
// run both of its paths (use_gemm) on CPU tensors and trace them with fake CUDA tensors.
std::tuple<at::Tensor, at::Tensor> conv1x1_backward_op(const at::Tensor& grad, const at::Tensor& x,
                                                       const at::Tensor& weight, bool need_x, bool need_weight,
                                                       bool use_gemm) {
  TORCH_CHECK(grad.dim() == 4 && x.dim() == 4 && weight.dim() == 2,
              "fused_fpn::conv1x1_backward: grad [N, Cout, H, W], x [N, Cin, H, W] and weight [Cout, Cin] expected, "
              "got shapes ", grad.sizes(), ", ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "fused_fpn::conv1x1_backward: x must have a floating-point dtype (float16, bfloat16, float32, float64), "
              "got ", x.scalar_type());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
              "fused_fpn::conv1x1_backward: grad and weight must have x's dtype ", x.scalar_type(), ", got grad ",
              grad.scalar_type(), " and weight ", weight.scalar_type());
  TORCH_CHECK(grad.device() == x.device() && weight.device() == x.device(),
              "fused_fpn::conv1x1_backward: grad and weight must be on x's device ", x.device(), ", got grad on ",
              grad.device(), " and weight on ", weight.device());
  return conv1x1_backward(grad, x, weight, need_x, need_weight, use_gemm);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_fpn, CompositeImplicitAutograd, m) { m.impl("conv1x1_backward", &conv1x1_backward_op); }

TORCH_LIBRARY_IMPL(fused_fpn, Autograd, m) {
  m.impl("lateral", &lateral_autograd);
  m.impl("lateral_grad_bias_top", &grad_bias_top_autograd);
}

}  // namespace fused_fpn
