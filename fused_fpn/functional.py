"""``fused_fpn.lateral``: the public functional op."""
from __future__ import annotations

from typing import Optional

import torch

from . import backends as _backends
from ._checks import check_lateral_args, run_check


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype in force for this device type, or None (conv2d is a lower-precision op)."""
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_result_dtype(dtype: torch.dtype, cast: Optional[torch.dtype]) -> torch.dtype:
    """The dtype autocast to ``cast`` gives a tensor of ``dtype`` (float32/16 are cast, float64 never)."""
    return cast if cast is not None and dtype in (torch.float32, torch.float16, torch.bfloat16) else dtype


def autocast_tensor(t, dtype):
    """t cast to the autocast dtype when it is a float32/16 tensor (never float64), else t."""
    if isinstance(t, torch.Tensor):
        return t.to(autocast_result_dtype(t.dtype, dtype))
    return t


def autocast_float64_error(kept: str, other: str, cast: torch.dtype) -> TypeError:
    """The error for float64 beside autocast, which never casts float64 but casts the rest to ``cast``
    (eager's conv2d fails there too; a generic dtype check would name ``cast``, a dtype the caller
    never passed). ``kept``: what stayed float64, with its verb ("x is"); ``other``: what was cast."""
    return TypeError(f"{kept} float64, which autocast leaves as it is, while it casts {other} to {cast} "
                     f"(eager's conv2d fails the same way): run float64 outside autocast")


def _check_autocast_float64(cast: torch.dtype, x: torch.Tensor, **params) -> None:
    """autocast_float64_error when autocast left x or one of ``params`` (weight, bias) in float64
    and cast the other."""
    for name, t in params.items():
        if isinstance(t, torch.Tensor) and t.dtype != x.dtype and torch.float64 in (t.dtype, x.dtype):
            kept, other = ("x", name) if x.dtype == torch.float64 else (name, "x")
            raise autocast_float64_error(f"{kept} is", other, cast)


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
    x, weight, bias = (autocast_tensor(t, cast) for t in (x, weight, bias))
    _check_autocast_float64(cast, x, weight=weight, bias=bias)
    weight = run_check(check_lateral_args, x, weight, bias, top, True)
    impl = _backends.select(backend, x)
    if top is None or top.dtype == x.dtype:
        return impl.lateral(x, weight, bias, top)
    # top in another dtype than the conv's output: eager's two roundings and promotion, unfused
    y = impl.lateral(x, weight, bias, None)
    return y + torch.nn.functional.interpolate(top, size=y.shape[-2:], mode="nearest")
