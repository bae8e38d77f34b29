"""Python-side registration of the C++ ops: their fake (meta) impls, for torch.compile / export, and
the autocast kernels of ``fused_fpn::lateral`` (``fused_fpn._autocast``).

The schemas live in csrc/fused_fpn.cpp, the autograd of ``fused_fpn::lateral`` and
``fused_fpn::lateral_grad_bias_top`` in csrc/autograd.cpp (C++, the Autograd key), the kernels in
csrc/cpu/ and csrc/cuda/. ``fused_fpn::conv1x1_backward`` is CompositeImplicitAutograd (made of
ATen ops), so it needs no fake impl.
"""
from __future__ import annotations

import torch

from ._autocast import register_autocast_kernels
from ._checks import check_lateral_args, check_top_size
from ._extension import extension_loaded
from ._layout import output_memory_format

REGISTERED = False


def lateral_fake(x, weight, bias, top):
    """Output of ``fused_fpn::lateral`` (meta / fake tensors): the kernels' checks of shapes, dtypes and
    devices first, so that a direct call on meta tensors or a trace fails as the real op would."""
    if isinstance(weight, torch.Tensor) and weight.dim() != 2:   # the op takes [Cout, Cin] only
        raise ValueError(f"fused_fpn::lateral: weight must be 2-D [Cout, Cin], got shape {tuple(weight.shape)}")
    check_lateral_args(x, weight, bias, top)
    n, _, h, w = x.shape
    return x.new_empty((n, weight.shape[0], h, w)).contiguous(memory_format=output_memory_format(x))


def grad_bias_top_fake(grad_out, top_h, top_w):
    if grad_out.dim() != 4:
        raise ValueError(f"fused_fpn::lateral_grad_bias_top: grad_out must be 4-D [N, C, H, W], got shape "
                         f"{tuple(grad_out.shape)}")
    check_top_size("fused_fpn::lateral_grad_bias_top", grad_out, top_h, top_w)
    n, c, _, _ = grad_out.shape
    grad_bias = grad_out.new_empty((c,))
    grad_top = grad_out.new_empty((n, c, top_h, top_w)).contiguous(memory_format=output_memory_format(grad_out))
    return grad_bias, grad_top


def register() -> bool:
    """Register the fake impls and autocast kernels once; False when ``_C`` is not loaded."""
    global REGISTERED
    if REGISTERED:
        return True
    if not extension_loaded():
        return False
    torch.library.register_fake("fused_fpn::lateral")(lateral_fake)
    torch.library.register_fake("fused_fpn::lateral_grad_bias_top")(grad_bias_top_fake)
    register_autocast_kernels("fused_fpn::lateral")
    REGISTERED = True
    return True
