"""Python-side registration of the C++ ops (schemas live in csrc/fused_fpn.cpp).

* ``fused_fpn::lateral``: fake (meta) impl and autograd.
* ``fused_fpn::lateral_grad_bias_top``: fake impl (it is the fused part of lateral's backward).

Backward of y = x . W^T + b + U(top):
    dx = dy . W and dW = sum_pixels dy^T x   -> ATen's convolution_backward (what eager conv runs)
    db = sum dy, dtop = U^T(dy)              -> fused_fpn::lateral_grad_bias_top (one pass over dy)
"""
from __future__ import annotations

import torch

from ._extension import extension_loaded
from ._layout import output_memory_format

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
    """(dx, dW) of y = conv1x1(x, weight[Cout, Cin]) through ATen's convolution_backward.

    With no pixels or no input channels (convolution_backward rejects those) both are zeros."""
    if x.numel() == 0 or weight.numel() == 0:
        return (torch.zeros_like(x) if need_x else None), (torch.zeros_like(weight) if need_weight else None)
    dx, dw, _ = torch.ops.aten.convolution_backward(
        grad, x, weight[:, :, None, None], None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
        [need_x, need_weight, False])
    if dw is not None:
        dw = dw.view(weight.shape)
    return dx, dw


def lateral_setup_context(ctx, inputs, output):
    x, weight, bias, top = inputs
    ctx.save_for_backward(x, weight)
    ctx.top_hw = (top.shape[-2], top.shape[-1]) if top is not None else (0, 0)


def lateral_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b, need_top = ctx.needs_input_grad
    dx = dw = db = dtop = None
    if need_x or need_w:
        dx, dw = conv1x1_backward(grad, x, weight, need_x, need_w)
    if need_b or need_top:
        db, dtop = torch.ops.fused_fpn.lateral_grad_bias_top(grad, ctx.top_hw[0], ctx.top_hw[1])
    return dx, dw, (db if need_b else None), (dtop if need_top else None)


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
    REGISTERED = True
    return True
