"""Python-side registration of the C++ ops (schemas live in csrc/fused_fpn.cpp).

* ``fused_fpn::lateral``: fake (meta) impl and autograd.
* ``fused_fpn::lateral_grad_bias_top``: fake impl and autograd (it is the fused part of lateral's
  backward; its own derivative is only needed when it is called directly and differentiated).

Backward of y = x . W^T + b + U(top):
    dx = dy . W and dW = sum_pixels dy^T x   -> ATen: convolution_backward on CPU, GEMMs elsewhere
    db = sum dy, dtop = U^T(dy)              -> fused_fpn::lateral_grad_bias_top (one pass over dy)
Double backward (``create_graph=True``): the fused kernels have no derivative, so a backward whose
result must itself be differentiated runs ``reference.lateral_backward_reference`` (unfused,
differentiable PyTorch ops) instead.
"""
from __future__ import annotations

import torch

from ._extension import extension_loaded
from ._layout import output_memory_format
from .reference import lateral_backward_reference, upsample_nearest_reference

REGISTERED = False


def lateral_fake(x, weight, bias, top):
    n, _, h, w = x.shape
    return x.new_empty((n, weight.shape[0], h, w)).contiguous(memory_format=output_memory_format(x))


def grad_bias_top_fake(grad_out, top_h, top_w):
    n, c, _, _ = grad_out.shape
    grad_bias = grad_out.new_empty((c,))
    grad_top = grad_out.new_empty((n, c, top_h, top_w)).contiguous(memory_format=output_memory_format(grad_out))
    return grad_bias, grad_top


def conv1x1_backward(grad, x, weight, need_x: bool, need_weight: bool):
    """(dx, dW) of y = conv1x1(x, weight[Cout, Cin]); None where not needed.

    CPU tensors: ATen's convolution_backward (oneDNN; deterministic). Other devices: GEMMs
    (``conv1x1_backward_gemm``): cuDNN's convolution backward may pick non-deterministic algorithms
    unless torch.use_deterministic_algorithms is on, cuBLAS GEMMs give the same bits run to run.
    With no pixels or no input channels (convolution_backward rejects those) both are zeros."""
    if x.numel() == 0 or weight.numel() == 0:
        return (torch.zeros_like(x) if need_x else None), (torch.zeros_like(weight) if need_weight else None)
    if x.device.type != "cpu":
        return conv1x1_backward_gemm(grad, x, weight, need_x, need_weight)
    dx, dw, _ = torch.ops.aten.convolution_backward(
        grad, x, weight[:, :, None, None], None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
        [need_x, need_weight, False])
    if dw is not None:
        dw = dw.view(weight.shape)
    return dx, dw


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (2-D or batched 3-D) accumulated and returned in float32 (``out_dtype``, CUDA fp16 / bf16),
    so that a long reduction (dW sums over every pixel) is neither rounded nor split-K reduced in
    half precision; float32 / float64 inputs are multiplied as they are."""
    if a.dtype in (torch.float16, torch.bfloat16) and a.device.type == "cuda" and _HAS_OUT_DTYPE:
        return (torch.bmm if a.dim() == 3 else torch.mm)(a, b, out_dtype=torch.float32)
    return torch.matmul(a, b)


# torch >= 2.8: aten::mm.dtype / aten::bmm.dtype (fp16 / bf16 in, fp32 out, on CUDA)
_HAS_OUT_DTYPE = all("dtype" in op.overloads() for op in (torch.ops.aten.mm, torch.ops.aten.bmm))


def conv1x1_backward_gemm(grad, x, weight, need_x: bool, need_weight: bool):
    """(dx, dW) of y = conv1x1(x, weight[Cout, Cin]) as GEMMs (no atomics: same bits run to run).

        dx[n, ci, p] = sum_co grad[n, co, p] * weight[co, ci]     (dx in x's memory format)
        dW[co, ci]   = sum_{n, p} grad[n, co, p] * x[n, ci, p]    (fp32 accumulation, weight's dtype)

    grad [N, Cout, H, W], x [N, Cin, H, W], both non-empty. channels_last-contiguous tensors are
    used as [N*H*W, C] matrices and NCHW-contiguous ones as N [C, H*W] matrices, without a copy;
    other strides are made contiguous in x's memory format first."""
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    fmt = output_memory_format(x)
    x = x.contiguous(memory_format=fmt)
    grad = grad.contiguous(memory_format=fmt)
    dx = dw = None
    if fmt == torch.channels_last:
        g2 = grad.permute(0, 2, 3, 1).reshape(n * h * w, cout)   # views: channels_last-contiguous
        x2 = x.permute(0, 2, 3, 1).reshape(n * h * w, cin)
        if need_x:
            dx = torch.mm(g2, weight).view(n, h, w, cin).permute(0, 3, 1, 2)
        if need_weight:
            dw = _mm_fp32_out(g2.t(), x2)
    else:
        g3 = grad.view(n, cout, h * w)
        x3 = x.view(n, cin, h * w)
        if need_x:
            dx = torch.matmul(weight.t(), g3).view(n, cin, h, w)
        if need_weight:
            per_image = _mm_fp32_out(g3, x3.transpose(1, 2))          # [N, Cout, Cin]
            dw = per_image[0] if n == 1 else per_image.sum(dim=0, dtype=per_image.dtype)
    if dw is not None:
        dw = dw.to(weight.dtype)
    return dx, dw


def lateral_setup_context(ctx, inputs, output):
    x, weight, bias, top = inputs
    ctx.save_for_backward(x, weight)
    ctx.top_hw = (top.shape[-2], top.shape[-1]) if top is not None else (0, 0)


def backward_needs_graph(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when a backward runs under ``create_graph=True`` and its gradients depend on tensors
    that require grad, i.e. they will be differentiated again (double backward)."""
    return torch.is_grad_enabled() and (grad.requires_grad or x.requires_grad or weight.requires_grad)


def lateral_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b, need_top = ctx.needs_input_grad
    if backward_needs_graph(grad, x, weight):
        return lateral_backward_reference(grad, x, weight, ctx.top_hw, ctx.needs_input_grad)
    dx = dw = db = dtop = None
    if need_x or need_w:
        dx, dw = conv1x1_backward(grad, x, weight, need_x, need_w)
    if need_b or need_top:
        db, dtop = torch.ops.fused_fpn.lateral_grad_bias_top(grad, ctx.top_hw[0], ctx.top_hw[1])
    return dx, dw, (db if need_b else None), (dtop if need_top else None)


def grad_bias_top_setup_context(ctx, inputs, output):
    grad_out, top_h, top_w = inputs
    ctx.grad_out_format = output_memory_format(grad_out)
    ctx.hw = (grad_out.shape[2], grad_out.shape[3])
    ctx.has_top = top_h > 0 and top_w > 0


def grad_bias_top_backward(ctx, g_bias, g_top):
    """The adjoint of (db, dtop) = (sum dy, U^T(dy)), both linear in dy:
        d grad_out = g_bias[None, :, None, None] + U(g_top)      (U: nearest upsample to H x W)"""
    g = g_bias[None, :, None, None]
    if ctx.has_top:
        g = g + upsample_nearest_reference(g_top, ctx.hw)
    else:
        g = g.expand(g_top.shape[0], g_bias.shape[0], *ctx.hw)
    return g.contiguous(memory_format=ctx.grad_out_format), None, None


def register() -> bool:
    """Register fake impls and autograd once; False when ``_C`` is not loaded."""
    global REGISTERED
    if REGISTERED:
        return True
    if not extension_loaded():
        return False
    torch.library.register_fake("fused_fpn::lateral")(lateral_fake)
    torch.library.register_fake("fused_fpn::lateral_grad_bias_top")(grad_bias_top_fake)
    torch.library.register_autograd("fused_fpn::lateral", lateral_backward, setup_context=lateral_setup_context)
    torch.library.register_autograd("fused_fpn::lateral_grad_bias_top", grad_bias_top_backward,
                                    setup_context=grad_bias_top_setup_context)
    REGISTERED = True
    return True
