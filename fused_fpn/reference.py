"""Pure-PyTorch reference of every fused_fpn op: the "torch" backend and the oracle of the tests.

The nearest rule is ATen's for ``F.interpolate(mode="nearest", size=...)`` on fp16/bf16/fp32:
    scale = float32(in_size) / float32(out_size);  src(d) = min(floor(float32(d) * scale), in_size - 1)
It is computed here in float32 for every dtype (fp64 ``F.interpolate`` on CPU uses other
arithmetic, so fp64 references must select with these indices rather than call it).
"""
from __future__ import annotations

import struct
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._layout import output_memory_format

_HALF_DTYPES = (torch.float16, torch.bfloat16)   # summed in float32 by eager's reductions and adjoints


def f32(value) -> float:
    """``value`` rounded to the nearest float32 (returned as the Python float holding it exactly)."""
    return struct.unpack("f", struct.pack("f", float(value)))[0]


def nearest_scale(in_size: int, out_size: int) -> float:
    """ATen's scale for nearest, float32(in) / float32(out), correctly rounded to float32, for
    concrete sizes: each size rounded to float32 first (as ATen's casts do: sizes past 2^24
    change), then the double quotient of two float32 values, which rounds to the same float32 as
    a float32 division (53 >= 2 * 24 + 2)."""
    return f32(f32(in_size) / f32(out_size))


def nearest_source_indices(in_size: int, out_size: int, device=None) -> torch.Tensor:
    """int64 [out_size]: the source index of every destination index (ATen's float32 rule).

    The sizes are rounded to float32 first (ATen casts them: sizes past 2^24 change), and their
    double quotient is the correctly rounded float32 quotient once cast to float32 (a double
    quotient of two float32 values rounds to the same float32); the multiply below runs in float32
    because the tensor is float32.
    """
    if out_size == 0:
        return torch.empty((0,), dtype=torch.int64, device=device)
    if isinstance(in_size, torch.SymInt) or isinstance(out_size, torch.SymInt) or torch.compiler.is_compiling():
        # symbolic sizes (torch.export / compile with dynamic shapes): float() would specialize them;
        # and any trace by dynamo (which shows sizes as ints, and cannot trace struct.pack).
        # The same float32 scale from a float64 division, rounded once more to float32 (harmless for
        # a quotient: 53 >= 2 * 24 + 2): a float32 division compiled for a GPU may be approximate
        # (div.full.f32), and one ulp low picks the row before for exact ratios; float64 division is
        # IEEE there. (MPS has no float64: a 0-d CPU tensor, which ops on MPS tensors take as a scalar.)
        f64_device = "cpu" if torch.device(device or "cpu").type == "mps" else device

        def as_f64(size):   # float32(size) (ATen's cast: sizes past 2^24 round), held in float64
            return torch.full((), size, dtype=torch.float32, device=f64_device).to(torch.float64)
        scale = (as_f64(in_size) / as_f64(out_size)).to(torch.float32)
    else:
        scale = nearest_scale(in_size, out_size)
    dst = torch.arange(out_size, dtype=torch.float32, device=device)
    src = torch.floor(dst * scale).to(torch.int64)
    return torch.clamp(src, max=in_size - 1)


def upsample_nearest_reference(top: torch.Tensor, size,
                               memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """top [N, C, Ht, Wt] -> [N, C, H, W] gathered with the float32 nearest rule (any dtype), in
    ``memory_format`` (contiguous or channels_last: the gather then runs on top's [N, Ht, Wt, C] view,
    so that adding it to a channels_last map is a dense add, not one at mismatched strides)."""
    if top.shape[-2] == 0 or top.shape[-1] == 0:   # no source pixel: only an empty output can be gathered
        if top.shape[0] * top.shape[1] * size[0] * size[1] > 0:
            raise ValueError(f"top of shape {tuple(top.shape)} has no pixels to gather {tuple(size)} from")
        # a sum keeps top in the autograd graph, so its gradient is zeros of its shape
        return top.sum(dim=(-2, -1), keepdim=True).expand(*top.shape[:2], *size)
    if top.dtype in _HALF_DTYPES and top.requires_grad:
        # gathered in float32 (exactly: the values are top's): its backward then sums each top pixel's
        # preimage in float32 and rounds once, as eager's upsample_nearest backward does (a gather in
        # float16 / bfloat16 would round after every add)
        return upsample_nearest_reference(top.float(), size, memory_format).to(top.dtype)
    ih = nearest_source_indices(top.shape[-2], size[0], top.device)
    iw = nearest_source_indices(top.shape[-1], size[1], top.device)
    if memory_format == torch.channels_last:
        return top.permute(0, 2, 3, 1)[:, ih[:, None], iw[None, :]].permute(0, 3, 1, 2)
    return top[:, :, ih[:, None], iw[None, :]]


def lateral_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      top: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = conv1x1(x; weight, bias) + nearest(top, size=x.shape[-2:]), unfused.

    x [N, Cin, H, W], weight [Cout, Cin] (or [Cout, Cin, 1, 1]), bias [Cout], top [N, Cout, Ht, Wt].
    Output [N, Cout, H, W] in x's memory format (see ``fused_fpn._layout``).
    """
    w4 = weight if weight.dim() == 4 else weight[:, :, None, None]
    n, cin, h, w = x.shape
    if cin == 0 or h == 0 or w == 0 or w4.shape[0] == 0:   # conv2d rejects these; einsum gives the
        # (empty or zero) sum
        y = torch.einsum("nchw,oc->nohw", x, w4[:, :, 0, 0])   # and keeps x, weight in the graph
        if bias is not None:
            y = y + bias[None, :, None, None]
    else:
        y = F.conv2d(x, w4, bias)
    fmt = output_memory_format(x)
    if top is not None:
        y = y + upsample_nearest_reference(top, x.shape[-2:], fmt)
    return y.contiguous(memory_format=fmt)


def lateral_grad_bias_top_reference(grad_out: torch.Tensor, top_h: int, top_w: int
                                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_bias [C], grad_top [N, C, top_h, top_w]): the adjoints of "+ bias" and "+ nearest(top)".

    grad_top[n, c, i, j] sums grad_out over the pixels whose nearest source is (i, j).
    top_h == top_w == 0 means "no top" (grad_top is [N, C, 0, 0]); one of them 0 is a top without pixels
    (grad_top [N, C, top_h, top_w], empty too).
    """
    n, c, h, w = grad_out.shape
    grad_bias = grad_out.sum(dim=(0, 2, 3))
    fmt = output_memory_format(grad_out)
    if top_h == 0 or top_w == 0:
        return grad_bias, grad_out.new_empty((n, c, top_h, top_w)).contiguous(memory_format=fmt)
    ih = nearest_source_indices(top_h, h, grad_out.device)
    iw = nearest_source_indices(top_w, w, grad_out.device)
    flat = (ih[:, None] * top_w + iw[None, :]).reshape(-1)
    acc = torch.float32 if grad_out.dtype in _HALF_DTYPES else grad_out.dtype   # one rounding, as the kernels
    grad_top = grad_out.new_zeros((n, c, top_h * top_w), dtype=acc)
    grad_top.index_add_(2, flat, grad_out.reshape(n, c, h * w).to(acc))
    return grad_bias, grad_top.view(n, c, top_h, top_w).to(grad_out.dtype).contiguous(memory_format=fmt)


def lateral_backward_reference(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, top_hw,
                               needs) -> Tuple[Optional[torch.Tensor], ...]:
    """(dx, dW, db, dtop) of y = lateral(x, weight, bias, top) for the incoming gradient ``grad``,
    in differentiable PyTorch ops (None where ``needs`` is False):

        dx[n, i, h, w] = sum_o grad[n, o, h, w] weight[o, i]      (x's memory format)
        dW[o, i]       = sum_{n, h, w} grad[n, o, h, w] x[n, i, h, w]
        db, dtop       = lateral_grad_bias_top_reference(grad, *top_hw)

    grad [N, Cout, H, W], x [N, Cin, H, W], weight [Cout, Cin], top_hw (Ht, Wt) or (0, 0), needs
    four bools. The triton backend's backward runs this when it must itself be differentiated
    (``create_graph=True``: double backward), since its fused kernels have no derivative (the C++
    ops do the same in csrc/autograd.cpp, with the fused db + dtop op, which has one).
    """
    need_x, need_w, need_b, need_top = needs
    dx = dw = db = dtop = None
    if need_x:
        dx = torch.einsum("nohw,oi->nihw", grad, weight).contiguous(memory_format=output_memory_format(x))
    if need_w:
        dw = torch.einsum("nohw,nihw->oi", grad, x)
    if need_b or need_top:
        db, dtop = lateral_grad_bias_top_reference(grad, top_hw[0], top_hw[1])
    return dx, dw, (db if need_b else None), (dtop if need_top else None)
