"""torch.autocast for the fused lateral op, as eager ``conv2d(x) + interpolate(top)`` has it.

conv2d is an autocast op: x, weight and bias are cast to the autocast dtype (float32 / float16 /
bfloat16 ones; float64 never). interpolate and add are not: top keeps its dtype, and a top in another
dtype than the conv's output is added promoted. ``fused_fpn.lateral`` and the FPN apply that rule in
Python before they call a backend (a plain eager call of the Triton backend never reaches the
dispatcher). The registered ops (``fused_fpn::lateral``, ``fused_fpn::triton_lateral``) get the same
rule as AutocastCPU / AutocastCUDA kernels (``register_autocast_kernels``): a direct call of the op
under autocast, and a ``torch.export`` program run under whatever autocast is in force then, cast as
ATen's own convolution does. While torch.export traces, ``autocast_dtype`` is None: the program records
the uncast call (as it records an uncast ``aten.conv2d``) and the op's kernel casts when it runs.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

_AUTOCAST_KEYS = (torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
                  | torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCUDA))
_LIBRARIES = []   # the torch.library.Library objects holding the kernels (a dropped one unregisters)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype the Python layer casts to for this device type, or None: autocast off, or
    torch.export tracing (the op's autocast kernel casts when the program runs)."""
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return None
    if torch.compiler.is_exporting():
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_result_dtype(dtype: torch.dtype, cast: Optional[torch.dtype]) -> torch.dtype:
    """The dtype autocast to ``cast`` gives a tensor of ``dtype`` (float32/16 are cast, float64 never)."""
    return cast if cast is not None and dtype in (torch.float32, torch.float16, torch.bfloat16) else dtype


def autocast_tensor(t, dtype):
    """t cast to the autocast dtype when it is a float32/16 tensor of another dtype (never float64),
    else t itself (no ``to`` call: a trace would record it)."""
    if not isinstance(t, torch.Tensor):
        return t
    target = autocast_result_dtype(t.dtype, dtype)
    return t if target == t.dtype else t.to(target)


def autocast_float64_error(kept: str, other: str, cast: torch.dtype) -> TypeError:
    """The error for float64 beside autocast, which never casts float64 but casts the rest to ``cast``
    (eager's conv2d fails there too; a generic dtype check would name ``cast``, a dtype the caller
    never passed). ``kept``: what stayed float64, with its verb ("x is"); ``other``: what was cast."""
    return TypeError(f"{kept} float64, which autocast leaves as it is, while it casts {other} to {cast} "
                     f"(eager's conv2d fails the same way): run float64 outside autocast")


def check_autocast_float64(cast: torch.dtype, x: torch.Tensor, **params) -> None:
    """autocast_float64_error when autocast left x or one of ``params`` (weight, bias) in float64
    and cast the other."""
    for name, t in params.items():
        if isinstance(t, torch.Tensor) and t.dtype != x.dtype and torch.float64 in (t.dtype, x.dtype):
            kept, other = ("x", name) if x.dtype == torch.float64 else (name, "x")
            raise autocast_float64_error(f"{kept} is", other, cast)


def cast_conv_args(x, weight, bias, cast: torch.dtype):
    """(x, weight, bias) as autocast gives them to conv2d: cast to ``cast``, float64 kept (a float64
    beside a cast one raises autocast_float64_error)."""
    x, weight, bias = (autocast_tensor(t, cast) for t in (x, weight, bias))
    check_autocast_float64(cast, x, weight=weight, bias=bias)
    return x, weight, bias


def run_with_top(run, x, weight, bias, top):
    """run(x, weight, bias, top), fused, when top is None or has x's (the conv output's) dtype; else
    eager's two roundings and promotion: run without top, then + interpolate(top) (unfused)."""
    if top is None or top.dtype == x.dtype:
        return run(x, weight, bias, top)
    y = run(x, weight, bias, None)
    return y + F.interpolate(top, size=y.shape[-2:], mode="nearest")


def kernels_skipped(cast: Optional[torch.dtype]):
    """A context in which the ops' autocast kernels do not run, for calls whose inputs the Python layer
    has cast to ``cast`` (the kernels would cast nothing more, at about 15 us of Python per call on the
    dev machine). A no-op when ``cast`` is None (no autocast: nothing to skip) and while torch.compile
    traces (dynamo does not trace the guard; the traced kernels cast nothing there)."""
    if cast is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYS)


def register_autocast_kernels(qualname: str) -> None:
    """AutocastCPU and AutocastCUDA kernels for the op ``qualname`` (schema (x, weight, bias, top)):
    conv2d's casts of x, weight and bias, top as ``run_with_top`` takes it, then the op itself with
    autocast off inside it."""
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    lib = torch.library.Library(namespace, "IMPL")
    for device_type, key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
        def kernel(x, weight, bias, top, device_type=device_type):
            x, weight, bias = cast_conv_args(x, weight, bias, torch.get_autocast_dtype(device_type))
            with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYS):
                return run_with_top(op, x, weight, bias, top)
        lib.impl(name, kernel, key)
    _LIBRARIES.append(lib)
