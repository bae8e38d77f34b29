"""Python-side registration of the C++ ops: their fake (meta) impls, for torch.compile / export.

The schemas live in csrc/fused_fpn.cpp, the autograd of ``fused_fpn::lateral`` and
``fused_fpn::lateral_grad_bias_top`` in csrc/autograd.cpp (C++, the Autograd key), the kernels in
csrc/cpu/ and csrc/cuda/. ``fused_fpn::conv1x1_backward`` is CompositeImplicitAutograd (made of
ATen ops), so it needs no fake impl.
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


def register() -> bool:
    """Register the fake impls once; False when ``_C`` is not loaded."""
    global REGISTERED
    if REGISTERED:
        return True
    if not extension_loaded():
        return False
    torch.library.register_fake("fused_fpn::lateral")(lateral_fake)
    torch.library.register_fake("fused_fpn::lateral_grad_bias_top")(grad_bias_top_fake)
    REGISTERED = True
    return True
