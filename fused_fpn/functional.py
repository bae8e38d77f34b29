"""``fused_fpn.lateral``: the public functional op."""
from __future__ import annotations

from typing import Optional

import torch

from . import backends as _backends
from ._autocast import autocast_dtype, cast_conv_args, kernels_skipped, run_with_top
from ._checks import check_lateral_args, run_check


def lateral(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
            top: Optional[torch.Tensor] = None, *, backend: str = "auto") -> torch.Tensor:
    """y = conv1x1(x; weight, bias) + upsample_nearest(top, size=x.shape[-2:]), fused: one kernel
    launch per call on triton and cuda (cuda's split-K: a GEMM and an epilogue kernel), cache-sized
    tiles of ATen's GEMM and an epilogue on cpu. Without a top and with x dense (NCHW or
    channels_last), cpu and cuda run ATen's conv2d (nothing to gather).

    Args:
        x:      [N, Cin, H, W], NCHW or channels_last (any strides; the fused backends never copy it as a
                whole: see README for the cpu backend's NCHW tiles; "torch" is ATen's conv2d).
        weight: [Cout, Cin] or [Cout, Cin, 1, 1].
        bias:   [Cout] or None.
        top:    [N, Cout, Ht, Wt] or None; any Ht, Wt (nearest up- or down-sampling, ATen's index rule).
        backend: "auto" (fastest available for x's device), "torch", "cpu", "triton" or "cuda".

    Returns [N, Cout, H, W] in x's memory format and dtype. Differentiable in all inputs.
    Under torch.autocast x, weight and bias are cast to the autocast dtype, as eager conv2d does; top
    keeps its dtype, as in eager's interpolate + add: a top in the autocast dtype (an FPN's, always)
    is fused, a top in another dtype (float32, say) is added after the fused conv, in the promoted
    dtype, as eager does (unfused: an extra pass).
    Under torch.fx.symbolic_trace (proxies for tensors) the call is recorded as one call_function
    node of this function, which runs when the traced module does.
    """
    proxy = next((t for t in (x, weight, bias, top) if isinstance(t, torch.fx.Proxy)), None)
    if proxy is not None:
        return proxy.tracer.create_proxy("call_function", lateral, (x, weight, bias, top), {"backend": backend})
    cast = autocast_dtype(x.device.type) if isinstance(x, torch.Tensor) else None
    if cast is None:
        weight = run_check(check_lateral_args, x, weight, bias, top)
        return _backends.select(backend, x).lateral(x, weight, bias, top)
    # autocast casts float32/16 inputs of conv2d (never float64); eager's F.interpolate and add are not
    # autocast ops, so top keeps its dtype and the sum is promoted (a float32 top gives a float32 sum)
    x, weight, bias = cast_conv_args(x, weight, bias, cast)
    weight = run_check(check_lateral_args, x, weight, bias, top, True)
    impl = _backends.select(backend, x)
    with kernels_skipped(cast):
        return run_with_top(impl.lateral, x, weight, bias, top)
